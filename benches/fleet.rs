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
use tenantry::tenants::fleet::{self, MigrateOptions};
use tenantry::tenants::provision::{self, NewOrg};
use tenantry::tenants::template::Template;

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

/// What a raw per-tenant transaction does besides the DDL: the steps of
/// `fleet::migrate`'s transaction, added one by one for the breakdown.
#[derive(Clone, Copy)]
struct Extras {
    history: bool,
    locks: bool,
    registry: bool,
    role: bool,
    /// tenantry's first message as is: search_path set, the whole history
    /// read as JSON
    json_history: bool,
    /// the lock-and-read part sent first, then the rest (two round trips)
    two_messages: bool,
    /// distinguishes the history rows of successive loops
    step: u32,
}

const RAW: Extras = Extras {
    history: false,
    locks: false,
    registry: false,
    role: false,
    json_history: false,
    two_messages: false,
    step: 0,
};

async fn raw_loop(pool: &sqlx::PgPool, tenants: &[Tenant], column: &str, jobs: usize) -> f64 {
    raw_loop_with(pool, tenants, column, jobs, RAW).await
}

async fn raw_loop_with(
    pool: &sqlx::PgPool,
    tenants: &[Tenant],
    column: &str,
    jobs: usize,
    extras: Extras,
) -> f64 {
    let started = Instant::now();
    let sqls: Vec<String> = tenants
        .iter()
        .map(|t| {
            let (s, id) = (&t.schema, t.id);
            let mut sql = String::from("BEGIN;\n");
            if extras.json_history {
                sql.push_str(&format!(
                    "SET LOCAL search_path TO {s}; SET LOCAL lock_timeout = 1000;\n\
                     WITH lock AS MATERIALIZED (SELECT pg_advisory_xact_lock(hashtextextended('tenantry:{id}', 0))) \
                     SELECT o.status::text, o.template_version, \
                       (SELECT coalesce(json_agg(json_build_array(version, name, checksum) ORDER BY version), '[]') \
                        FROM {s}.refinery_schema_history)::text \
                     FROM lock, tenantry.organizations o WHERE o.id = '{id}' FOR UPDATE OF o;\n"
                ));
            } else if extras.locks {
                sql.push_str(&format!(
                    "WITH lock AS MATERIALIZED (SELECT pg_advisory_xact_lock(hashtextextended('tenantry:{id}', 0))) \
                     SELECT o.status, o.template_version, (SELECT max(version) FROM {s}.refinery_schema_history) \
                     FROM lock, tenantry.organizations o WHERE o.id = '{id}' FOR UPDATE OF o;\n"
                ));
            }
            if extras.two_messages {
                sql.push('\u{0}');
            }
            if extras.role {
                sql.push_str(&format!("SET LOCAL ROLE {};\n", t.role));
            }
            sql.push_str(&format!(
                "ALTER TABLE {s}.tests ADD COLUMN {column} integer NOT NULL DEFAULT 0;\n\
                 CREATE INDEX tests_{column}_idx ON {s}.tests ({column});\n"
            ));
            if extras.history {
                // a version far above the template's, one per loop
                let version = 1000 + extras.step;
                sql.push_str(&format!(
                    "INSERT INTO {s}.refinery_schema_history (version, name, applied_on, checksum) \
                     VALUES ({version}, '{column}', '2026-11-28T00:00:00Z', '1');\n"
                ));
            }
            if extras.role {
                sql.push_str("RESET ROLE;\n");
            }
            if extras.registry {
                sql.push_str(&format!(
                    "UPDATE tenantry.organizations SET template_version = template_version, updated_at = now() WHERE id = '{id}';\n\
                     DELETE FROM tenantry.migration_failures WHERE organization_id = '{id}';\n"
                ));
            }
            sql.push_str("COMMIT;");
            sql
        })
        .collect();
    let pool = pool.clone();
    fleet::for_each_bounded(
        sqls,
        jobs,
        move |sql| {
            let pool = pool.clone();
            async move {
                // a failure would leave an aborted transaction on a pooled
                // connection: stop the whole program instead
                // NUL separates the messages of a two-message transaction
                let mut conn = pool.acquire().await.unwrap_or_else(fail);
                for message in sql.split('\u{0}') {
                    sqlx::Executor::execute(&mut *conn, sqlx::raw_sql(message))
                        .await
                        .unwrap_or_else(fail);
                }
            }
        },
        |_| {},
    )
    .await;
    started.elapsed().as_secs_f64()
}

fn fail<T>(e: sqlx::Error) -> T {
    eprintln!("raw loop failed: {e}");
    std::process::exit(1)
}

struct Tenant {
    id: uuid::Uuid,
    schema: String,
    role: String,
}

#[tokio::main]
async fn main() {
    let tenants: usize = arg("--tenants", 1000);
    let jobs: usize = arg("--jobs", 4);
    let (setup, url) = bench_pool(4).await;
    tenantry::tenants::migrate_database(&setup).await.unwrap();
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
    let rows: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("SELECT id, schema_name FROM tenantry.organizations ORDER BY slug")
            .fetch_all(&setup)
            .await
            .unwrap();
    assert_eq!(rows.len(), tenants);
    let schemas: Vec<Tenant> = rows
        .into_iter()
        .map(|(id, schema)| Tenant {
            id,
            schema,
            role: tenantry::base::ident::RoleName::for_org(&id).quoted(),
        })
        .collect();
    setup.close().await;

    let pool = common::fleet_pool(&url, jobs).await;

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

    // The breakdown: the raw loop at the same parallelism, adding the
    // steps of a tenantry transaction one at a time.
    let mut breakdown = vec![];
    let mut extras = RAW;
    for (step, label) in [
        "+ history row (refinery_schema_history insert)",
        "+ advisory lock, registry row lock, re-check",
        "+ registry update, failure record cleared",
        "+ SET LOCAL ROLE (DDL as the tenant's role)",
        "+ search_path, lock_timeout, history as JSON",
        "+ lock-and-read first, then the rest (2 trips)",
    ]
    .into_iter()
    .enumerate()
    {
        match step {
            0 => extras.history = true,
            1 => extras.locks = true,
            2 => extras.registry = true,
            3 => extras.role = true,
            4 => extras.json_history = true,
            _ => extras.two_messages = true,
        }
        extras.step = step as u32 + 1;
        let before = cpu_ticks();
        let secs = raw_loop_with(&pool, &schemas, &format!("step{step}"), jobs, extras).await;
        breakdown.push((label, secs, per_tenant_us(&before, &cpu_ticks())));
    }
    // (the breakdown's history rows are not the template's: removed, untimed)
    for t in &schemas {
        sqlx::raw_sql(&format!(
            "DELETE FROM {}.refinery_schema_history WHERE version > 1000",
            t.schema
        ))
        .execute(&pool)
        .await
        .unwrap();
    }

    let (_dir, v2) = common::template_with(&[(
        "V2__priority.sql",
        "ALTER TABLE tests ADD COLUMN priority integer NOT NULL DEFAULT 0;\n\
         CREATE INDEX tests_priority_idx ON tests (priority);\n",
    )]);
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

    let c4 = cpu_ticks();
    let raw_after = raw_loop(&pool, &schemas, "raw_after", jobs).await;
    let cpu_after = per_tenant_us(&c4, &cpu_ticks());

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
    for (label, secs, cpu) in &breakdown {
        row(label, *secs, *cpu);
    }
    row(
        &format!("tenantry migrate (refinery, locks, {jobs} jobs)"),
        report.seconds,
        cpu_tenantry,
    );
    row(
        &format!("raw SQL loop again, {jobs} jobs (drift check)"),
        raw_after,
        cpu_after,
    );
    let raw_mean = (raw_par + raw_after) / 2.0;
    println!(
        "ratio tenantry / raw loop: {:.2}x vs {jobs} jobs (mean of both raw runs), {:.2}x vs 1 job",
        report.seconds / raw_mean,
        report.seconds / raw_seq
    );
    println!("no-op run over {tenants} tenants: {:.3} s", noop_secs);
    println!(
        "runner resident memory: {} KiB before, peak {} KiB during the migration",
        rss_before, peak
    );
}
