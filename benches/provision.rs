//! Provisioning benchmark: time to create one organization through
//! `provision::create_org` (registry row, owner, schema, template through
//! refinery, initial data, one transaction) against raw SQL sent as one
//! message in one transaction, interleaved in one run on one database:
//!
//! - "raw DDL": CREATE SCHEMA + the template's tables;
//! - "raw DDL + history": the same plus refinery's history table, i.e.
//!   exactly the DDL that provisioning runs.
//!
//!     cargo bench --bench provision -- --orgs 200

mod common;

use std::time::Instant;

use common::{arg, bench_pool, ms, Stats};
use tenantry::tenants::provision::{self, NewOrg};
use tenantry::tenants::template::{Template, HISTORY_TABLE};

#[tokio::main]
async fn main() {
    let orgs: usize = arg("--orgs", 200);
    let (pool, _) = bench_pool(4).await;
    tenantry::tenants::migrate_database(&pool).await.unwrap();
    let template = Template::embedded();
    let ddl: String = template
        .migrations()
        .iter()
        .map(|m| m.sql().unwrap().to_owned())
        .collect::<Vec<_>>()
        .join("\n;\n");

    // Warm up connections and catalog caches.
    for i in 0..5 {
        let new = NewOrg::parse(&format!("warm-{i}"), "Warm", Some("o@warm.example")).unwrap();
        provision::create_org(&pool, &template, &new).await.unwrap();
    }

    let history = format!(
        "CREATE TABLE {HISTORY_TABLE}(version int4 PRIMARY KEY, name varchar(255), \
         applied_on varchar(255), checksum varchar(255))"
    );
    let mut routed = Vec::with_capacity(orgs);
    let mut raw = Vec::with_capacity(orgs);
    let mut raw_history = Vec::with_capacity(orgs);
    for i in 0..orgs {
        let new = NewOrg::parse(
            &format!("org-{i}"),
            "Bench Org",
            Some("owner@bench.example"),
        )
        .unwrap();
        let t = Instant::now();
        provision::create_org(&pool, &template, &new).await.unwrap();
        routed.push(t.elapsed());

        let sql = format!(
            "BEGIN; CREATE SCHEMA raw_{i}; SET LOCAL search_path TO raw_{i};\n{ddl}\n; COMMIT;"
        );
        let t = Instant::now();
        sqlx::raw_sql(&sql).execute(&pool).await.unwrap();
        raw.push(t.elapsed());

        let sql = format!(
            "BEGIN; CREATE SCHEMA rawh_{i}; SET LOCAL search_path TO rawh_{i}; {history};\n{ddl}\n; COMMIT;"
        );
        let t = Instant::now();
        sqlx::raw_sql(&sql).execute(&pool).await.unwrap();
        raw_history.push(t.elapsed());
    }
    let p = Stats::of(routed);
    let r = Stats::of(raw);
    let h = Stats::of(raw_history);
    println!("provisioning {orgs} orgs (interleaved with raw DDL, same database)");
    println!(
        "{:<28} {:>10} {:>10} {:>12}",
        "", "median ms", "p95 ms", "total s"
    );
    println!(
        "{:<28} {:>10.2} {:>10.2} {:>12.2}",
        "tenantry create_org",
        ms(p.median),
        ms(p.p95),
        p.total.as_secs_f64()
    );
    println!(
        "{:<28} {:>10.2} {:>10.2} {:>12.2}",
        "raw DDL (schema + tables)",
        ms(r.median),
        ms(r.p95),
        r.total.as_secs_f64()
    );
    println!(
        "{:<28} {:>10.2} {:>10.2} {:>12.2}",
        "raw DDL + history table",
        ms(h.median),
        ms(h.p95),
        h.total.as_secs_f64()
    );
    for (label, base) in [("raw DDL", &r), ("raw DDL + history", &h)] {
        println!(
            "ratio tenantry / {label}: median {:.2}x, p95 {:.2}x, total {:.2}x",
            p.median.as_secs_f64() / base.median.as_secs_f64(),
            p.p95.as_secs_f64() / base.p95.as_secs_f64(),
            p.total.as_secs_f64() / base.total.as_secs_f64()
        );
    }
}
