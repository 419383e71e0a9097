//! Background jobs, three figures on one database:
//!
//! 1. jobs per second with `--workers` workers over `--orgs` orgs, no-op
//!    jobs and jobs that insert one row in their org's schema, each against
//!    a bare `FOR UPDATE SKIP LOCKED` loop (one statement per job, the
//!    insert included, as many tasks) on one table of the same PostgreSQL,
//!    alternated for `--rounds` rounds;
//! 2. a quiet org's job wait (due to started), p50 and p99, while a noisy
//!    org has `--noisy` jobs queued;
//! 3. a bulk import of `--rows` tests through the job (`tests.import`, as
//!    `POST /v1/orgs/{slug}/tests/import` queues it) in rows per second,
//!    against one COPY of the same rows.
//!
//!     cargo bench --bench jobs -- --orgs 100 --jobs 20000 --workers 4 --rounds 3 --noisy 10000 --rows 100000

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{arg, bench_pool, ms, Stats};
use sqlx::PgPool;
use tenantry::jobs::worker::{WorkerConfig, Workers};
use tenantry::jobs::{JobFuture, JobKinds, JobRun, NewJob};
use tenantry::serving::router::{RouterConfig, TenantRouter};
use tenantry::tenants::provision::{self, NewOrg};
use tenantry::tenants::template::Template;

static DONE: AtomicUsize = AtomicUsize::new(0);

fn noop(_: &mut JobRun) -> JobFuture<'_> {
    Box::pin(async {
        DONE.fetch_add(1, Ordering::Relaxed);
        Ok(())
    })
}

/// Writes one row in the org's schema: its success commits with the row.
fn write(run: &mut JobRun) -> JobFuture<'_> {
    Box::pin(async move {
        let id = run.id();
        run.tx()
            .await?
            .query("INSERT INTO bench_rows (job) VALUES ($1)")
            .bind(id)
            .execute()
            .await?;
        DONE.fetch_add(1, Ordering::Relaxed);
        Ok(())
    })
}

fn kinds() -> JobKinds {
    let mut kinds = tenantry::api::jobs::default_kinds();
    kinds.register("bench.noop", noop).unwrap();
    kinds.register("bench.write", write).unwrap();
    kinds
}

/// `workers` workers as `serve --workers` starts them, the ready index and
/// LISTEN on `pool`.
fn start_workers(router: &TenantRouter, pool: &PgPool, workers: usize) -> Workers {
    let config = WorkerConfig {
        concurrency: workers,
        idle_poll: Duration::from_millis(100),
        ..WorkerConfig::default()
    };
    Workers::spawn(
        router.clone(),
        pool.clone(),
        Some(pool.clone()),
        kinds(),
        config,
    )
}

async fn schema(pool: &PgPool, slug: &str) -> String {
    sqlx::query_scalar("SELECT schema_name FROM tenantry.organizations WHERE slug = $1")
        .bind(slug)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Queues `n` jobs of `kind` in `org`'s table (as the admin, in one
/// statement) and announces them.
async fn queue(pool: &PgPool, slug: &str, kind: &str, n: usize) {
    let s = schema(pool, slug).await;
    sqlx::query(&format!(
        "INSERT INTO {s}.tenantry_jobs (kind) SELECT $2 FROM generate_series(1, $1)"
    ))
    .bind(n as i32)
    .bind(kind)
    .execute(pool)
    .await
    .unwrap();
    let id: uuid::Uuid =
        sqlx::query_scalar("SELECT id FROM tenantry.organizations WHERE slug = $1")
            .bind(slug)
            .fetch_one(pool)
            .await
            .unwrap();
    tenantry::jobs::queue::announce(pool, id, time::OffsetDateTime::now_utc())
        .await
        .unwrap();
}

async fn tenantry_round(
    pool: &PgPool,
    router: &TenantRouter,
    orgs: &[String],
    kind: &str,
    jobs: usize,
    workers: usize,
) -> f64 {
    for (i, org) in orgs.iter().enumerate() {
        let n = jobs / orgs.len() + usize::from(i < jobs % orgs.len());
        queue(pool, org, kind, n).await;
    }
    DONE.store(0, Ordering::Relaxed);
    let started = Instant::now();
    let w = start_workers(router, pool, workers);
    while DONE.load(Ordering::Relaxed) < jobs {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let rate = jobs as f64 / started.elapsed().as_secs_f64();
    w.shutdown().await;
    rate
}

/// The same jobs in one table, each taken and finished by one statement
/// (`write`: which also inserts its row).
async fn bare_round(pool: &PgPool, jobs: usize, workers: usize, write: bool) -> f64 {
    sqlx::query("TRUNCATE bench_queue")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO bench_queue (kind) SELECT 'bench.noop' FROM generate_series(1, $1)")
        .bind(jobs as i32)
        .execute(pool)
        .await
        .unwrap();
    let started = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let take = "UPDATE bench_queue SET state = 'succeeded', finished_at = now() \
                     WHERE id = (SELECT id FROM bench_queue WHERE state = 'queued' \
                                 ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id";
                let sql = if write {
                    format!(
                        "WITH taken AS ({take}) INSERT INTO bench_rows_bare (job) \
                         SELECT id FROM taken RETURNING job"
                    )
                } else {
                    take.to_owned()
                };
                loop {
                    let done: Option<i64> = sqlx::query_scalar(&sql)
                        .fetch_optional(&pool)
                        .await
                        .unwrap();
                    if done.is_none() {
                        break;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    jobs as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let orgs_n: usize = arg("--orgs", 100);
    let jobs: usize = arg("--jobs", 20_000);
    let workers: usize = arg("--workers", 4);
    let rounds: usize = arg("--rounds", 3);
    let noisy: usize = arg("--noisy", 10_000);
    let rows: usize = arg("--rows", 100_000);
    let (pool, url) = bench_pool(workers as u32 * 2 + 4).await;
    tenantry::tenants::migrate_database(&pool).await.unwrap();
    let template = Arc::new(Template::embedded());
    for slug in ["noisy", "quiet", "import"] {
        provision::create_org(&pool, &template, &NewOrg::parse(slug, slug, None).unwrap())
            .await
            .unwrap();
    }
    let mut orgs = vec![];
    for i in 0..orgs_n {
        let slug = format!("jobs-{i:04}");
        provision::create_org(
            &pool,
            &template,
            &NewOrg::parse(&slug, "Jobs", None).unwrap(),
        )
        .await
        .unwrap();
        orgs.push(slug);
    }
    sqlx::raw_sql(
        "CREATE TABLE bench_queue (id bigserial PRIMARY KEY, kind text NOT NULL, \
           payload jsonb NOT NULL DEFAULT '{}', state text NOT NULL DEFAULT 'queued', \
           finished_at timestamptz); \
         CREATE INDEX ON bench_queue (id) WHERE state = 'queued'; \
         CREATE TABLE bench_rows_bare (job bigint PRIMARY KEY)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let router = TenantRouter::single(pool.clone(), &url, &RouterConfig::default()).unwrap();

    for org in &orgs {
        let s = schema(&pool, org).await;
        sqlx::raw_sql(&format!(
            "CREATE TABLE {s}.bench_rows (job uuid PRIMARY KEY); \
             ALTER TABLE {s}.bench_rows OWNER TO {}",
            tenantry::base::ident::quote_ident(&s)
        ))
        .execute(&pool)
        .await
        .unwrap();
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for (kind, what) in [
        ("bench.noop", "no-op jobs"),
        ("bench.write", "jobs that insert one row"),
    ] {
        let write = kind == "bench.write";
        println!("== {what} per second, {workers} workers, {jobs} jobs over {orgs_n} orgs");
        let (mut ours, mut bare) = (vec![], vec![]);
        for round in 1..=rounds {
            if write {
                sqlx::query("TRUNCATE bench_rows_bare")
                    .execute(&pool)
                    .await
                    .unwrap();
            }
            let b = bare_round(&pool, jobs, workers, write).await;
            let t = tenantry_round(&pool, &router, &orgs, kind, jobs, workers).await;
            println!(
                "round {round}: bare SKIP LOCKED loop {b:.0}/s, tenantry {t:.0}/s ({:.2}x)",
                t / b
            );
            bare.push(b);
            ours.push(t);
        }
        let (b, t) = (median(&mut bare), median(&mut ours));
        println!("median: bare {b:.0}/s, tenantry {t:.0}/s: {:.2}x", t / b);
    }

    println!("== a quiet org's wait beside a noisy org with {noisy} jobs queued");
    queue(&pool, "noisy", "bench.noop", noisy).await;
    DONE.store(0, Ordering::Relaxed);
    let w = start_workers(&router, &pool, workers);
    let quiet = "quiet";
    let mut ids = vec![];
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let slug = tenantry::base::ident::Slug::parse(quiet).unwrap();
        let id = router
            .with_tenant(&slug, async |tx| {
                tx.enqueue(NewJob::new("bench.noop", serde_json::json!({})))
                    .await
            })
            .await
            .unwrap()
            .unwrap();
        ids.push(id);
    }
    let qs = schema(&pool, quiet).await;
    let waits: Vec<Duration> = loop {
        let rows: Vec<(Option<f64>,)> = sqlx::query_as(&format!(
            "SELECT extract(epoch FROM started_at - run_at)::float8 FROM {qs}.tenantry_jobs \
             WHERE state = 'succeeded'"
        ))
        .fetch_all(&pool)
        .await
        .unwrap();
        if rows.len() == ids.len() {
            break rows
                .into_iter()
                .map(|(s,)| Duration::from_secs_f64(s.unwrap().max(0.0)))
                .collect();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let ns = schema(&pool, "noisy").await;
    let left: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {ns}.tenantry_jobs WHERE state = 'queued'"
    ))
    .fetch_one(&pool)
    .await
    .unwrap();
    w.shutdown().await;
    // what is left of the noisy org must not compete with the import
    sqlx::query(&format!(
        "UPDATE {ns}.tenantry_jobs SET state = 'cancelled' WHERE state IN ('queued', 'running')"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let s = Stats::of(waits);
    println!(
        "quiet org: {} jobs, wait p50 {:.1} ms, p99 {:.1} ms; the noisy org still had {left} queued",
        s.n,
        ms(s.median),
        ms(s.p99)
    );

    println!("== bulk import of {rows} tests: the import job against one COPY");
    let org = "import";
    let s = schema(&pool, org).await;
    let (behavior, status): (uuid::Uuid, uuid::Uuid) = sqlx::query_as(&format!(
        "WITH b AS (INSERT INTO {s}.behaviors (name, created_by, updated_by) VALUES ('b', $1, $1) RETURNING id), \
              t AS (INSERT INTO {s}.statuses (name, created_by, updated_by) VALUES ('s', $1, $1) RETURNING id) \
         SELECT (SELECT id FROM b), (SELECT id FROM t)"
    ))
    .bind(uuid::Uuid::nil())
    .fetch_one(&pool)
    .await
    .unwrap();
    let lines: Vec<serde_json::Value> = (0..rows)
        .map(|i| {
            serde_json::json!({"prompt": format!("prompt {i} of the bulk import benchmark"),
                "expected_outcome": "the expected outcome", "behavior_id": behavior, "status_id": status})
        })
        .collect();
    // COPY first, into a table like tests (same columns and indexes)
    sqlx::raw_sql(&format!(
        "CREATE TABLE {s}.copy_target (LIKE {s}.tests INCLUDING ALL)"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let mut text = String::new();
    for l in &lines {
        text.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\t{}\n",
            l["prompt"].as_str().unwrap(),
            l["expected_outcome"].as_str().unwrap(),
            behavior,
            status,
            uuid::Uuid::nil(),
            uuid::Uuid::nil()
        ));
    }
    let started = Instant::now();
    let mut conn = pool.acquire().await.unwrap();
    let mut copy = conn
        .copy_in_raw(&format!(
            "COPY {s}.copy_target (prompt, expected_outcome, behavior_id, status_id, created_by, updated_by) FROM STDIN"
        ))
        .await
        .unwrap();
    copy.send(text.as_bytes()).await.unwrap();
    copy.finish().await.unwrap();
    let copy_rate = rows as f64 / started.elapsed().as_secs_f64();
    drop(conn);
    let payload = serde_json::json!({"by": uuid::Uuid::nil(), "rows": lines});
    let slug = tenantry::base::ident::Slug::parse(org).unwrap();
    let started = Instant::now();
    let id = router
        .with_tenant(&slug, async |tx| {
            tx.enqueue(NewJob::new(tenantry::api::jobs::IMPORT_TESTS, payload))
                .await
        })
        .await
        .unwrap()
        .unwrap();
    let w = start_workers(&router, &pool, workers);
    loop {
        let state: String = sqlx::query_scalar(&format!(
            "SELECT state FROM {s}.tenantry_jobs WHERE id = $1"
        ))
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
        if state == "succeeded" {
            break;
        }
        assert!(state == "queued" || state == "running", "import {state}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let job_rate = rows as f64 / started.elapsed().as_secs_f64();
    w.shutdown().await;
    println!(
        "COPY {copy_rate:.0} rows/s; import job {job_rate:.0} rows/s ({:.2}x of COPY; enqueue included)",
        job_rate / copy_rate
    );
}
