//! Fleet migration benchmark. Creates N tenants, then in one run on one
//! database: the same DDL (ADD COLUMN + CREATE INDEX on `tests`) as a plain
//! loop of raw SQL transactions, sequential and with the runner's
//! parallelism; then `fleet::migrate` applying it as template V2 through
//! refinery; then a no-op run. Prints times, ratios and the runner's peak
//! resident memory.
//!
//!     cargo bench --bench fleet -- --tenants 1000 --jobs 4
//!     cargo bench --bench fleet -- --tenants 10000 --jobs 4

mod common;

use std::sync::Arc;
use std::time::Instant;

use common::{arg, bench_pool, cpu_ticks};
use tenantry::db::PoolConfig;
use tenantry::fleet::{self, MigrateOptions};
use tenantry::provision::{self, NewOrg};
use tenantry::template::Template;

fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Resets the peak-RSS mark (VmHWM) so a phase's own peak can be read.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

async fn raw_loop(pool: &sqlx::PgPool, schemas: &[String], column: &str, jobs: usize) -> f64 {
    let started = Instant::now();
    let sqls: Vec<String> = schemas
        .iter()
        .map(|s| {
            format!(
                "BEGIN; ALTER TABLE {s}.tests ADD COLUMN {column} integer NOT NULL DEFAULT 0; \
                 CREATE INDEX tests_{column}_idx ON {s}.tests ({column}); COMMIT;"
            )
        })
        .collect();
    let pool = pool.clone();
    fleet::for_each_bounded(
        sqls,
        jobs,
        move |sql| {
            let pool = pool.clone();
            async move { sqlx::raw_sql(&sql).execute(&pool).await.unwrap() }
        },
        |_| {},
    )
    .await;
    started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let tenants: usize = arg("--tenants", 1000);
    let jobs: usize = arg("--jobs", 4);
    let (setup, url) = bench_pool(4).await;
    tenantry::registry::migrate(&setup).await.unwrap();
    let embedded = Arc::new(Template::embedded());
    let started = Instant::now();
    let setup2 = setup.clone();
    fleet::for_each_bounded(
        (0..tenants).collect(),
        4,
        move |i| {
            let (pool, template) = (setup2.clone(), embedded.clone());
            async move {
                let new = NewOrg::parse(&format!("fleet-{i:05}"), "Fleet", None).unwrap();
                provision::create_org(&pool, &template, &new).await.unwrap();
            }
        },
        |_| {},
    )
    .await;
    println!(
        "created {tenants} tenants in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let schemas: Vec<String> = (0..tenants).map(|i| format!("t_fleet_{i:05}")).collect();
    setup.close().await;

    let pool = tenantry::db::connect(
        &url,
        &PoolConfig {
            max_connections: jobs as u32 + 1,
            ..PoolConfig::default()
        },
    )
    .await
    .unwrap();

    let per_tenant_us = |earlier: &common::CpuSnapshot, later: &common::CpuSnapshot| {
        let (pg, me) = later.since(earlier);
        let us = |ticks: u64| ticks as f64 * 10_000.0 / tenants as f64;
        (us(pg), us(me))
    };
    let c0 = cpu_ticks();
    let raw_seq = raw_loop(&pool, &schemas, "raw_seq", 1).await;
    let c1 = cpu_ticks();
    let raw_par = raw_loop(&pool, &schemas, "raw_par", jobs).await;
    let c2 = cpu_ticks();
    let (cpu_seq, cpu_par) = (per_tenant_us(&c0, &c1), per_tenant_us(&c1, &c2));

    let dir = tempfile::tempdir().unwrap();
    for m in Template::embedded().migrations() {
        std::fs::write(dir.path().join(format!("{m}.sql")), m.sql().unwrap()).unwrap();
    }
    std::fs::write(
        dir.path().join("V2__priority.sql"),
        "ALTER TABLE tests ADD COLUMN priority integer NOT NULL DEFAULT 0;\n\
         CREATE INDEX tests_priority_idx ON tests (priority);\n",
    )
    .unwrap();
    let v2 = Template::from_dir(dir.path()).unwrap();
    let opts = MigrateOptions {
        jobs,
        ..MigrateOptions::default()
    };

    let rss_before = status_kb("VmRSS:");
    reset_peak_rss();
    let c3 = cpu_ticks();
    let report = fleet::migrate(&pool, &v2, &opts, |_| {}).await.unwrap();
    let cpu_tenantry = per_tenant_us(&c3, &cpu_ticks());
    let peak = status_kb("VmHWM:");
    assert_eq!((report.migrated, report.failed), (tenants, 0));

    let noop_started = Instant::now();
    let noop = fleet::migrate(&pool, &v2, &opts, |_| {}).await.unwrap();
    let noop_secs = noop_started.elapsed().as_secs_f64();
    assert_eq!((noop.migrated, noop.up_to_date), (0, tenants));

    println!("fleet migration of {tenants} tenants by one template version (ADD COLUMN + CREATE INDEX), jobs {jobs}");
    println!(
        "{:<44} {:>10} {:>10} {:>12} {:>12}",
        "", "seconds", "ms/tenant", "pg us/tenant", "app us/tenant"
    );
    let row = |label: &str, s: f64, (pg, app): (f64, f64)| {
        println!(
            "{label:<44} {s:>10.2} {:>10.2} {pg:>12.0} {app:>12.0}",
            s * 1000.0 / tenants as f64
        )
    };
    row(
        "raw SQL loop, 1 transaction per tenant, 1 job",
        raw_seq,
        cpu_seq,
    );
    row(
        &format!("raw SQL loop, 1 transaction per tenant, {jobs} jobs"),
        raw_par,
        cpu_par,
    );
    row(
        &format!("tenantry migrate (refinery, locks, {jobs} jobs)"),
        report.seconds,
        cpu_tenantry,
    );
    println!(
        "ratio tenantry / raw loop: {:.2}x vs {jobs} jobs, {:.2}x vs 1 job",
        report.seconds / raw_par,
        report.seconds / raw_seq
    );
    println!("no-op run over {tenants} tenants: {:.3} s", noop_secs);
    println!(
        "runner resident memory: {} KiB before, peak {} KiB during the migration",
        rss_before, peak
    );
}
