//! Fleet migrations under load: while HTTP clients read and write tests
//! in every tenant, two template changes are rolled out to all of them.
//!
//!     cargo bench --bench fleet_load -- --tenants 1000 --jobs 4
//!
//! Creates N orgs (a token and one test each), starts a server (tenant pool
//! 16) in this process and `--concurrency` clients (default 32) sending, to
//! uniformly random tenants, `GET /v1/orgs/{slug}/tests/{id}` and (one in
//! `--writes-every`, default 5) `PATCH` of the same test. After `--before`
//! seconds of traffic (default 10) it applies:
//!
//! 1. V2, one transaction per tenant: `ADD COLUMN ... NOT NULL DEFAULT 0`
//!    and a plain `CREATE INDEX` on `tests`;
//! 2. after a pause, V3 (another column with a default) and V4
//!    `-- tenantry:no-transaction` `CREATE INDEX CONCURRENTLY`.
//!
//! It prints, for the traffic before and during each run, requests, req/s,
//! p50, p99 and max latency (by the request's start time), the runs'
//! durations and every failed request (non-2xx or transport error).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::arg;
use tenantry::base::ident::Slug;
use tenantry::pg::pools::PoolConfig;
use tenantry::server::ServerConfig;
use tenantry::tenants::fleet::{self, MigrateOptions};
use tenantry::tenants::provision::{self, NewOrg};
use tenantry::tenants::template::Template;

struct Target {
    slug: String,
    token: String,
    test_id: uuid::Uuid,
}

/// One request: start (since the load began), latency, success.
#[derive(Clone, Copy)]
struct Sample {
    start_us: u64,
    latency_us: u64,
    ok: bool,
}

async fn create_targets(pool: &sqlx::PgPool, n: usize) -> Vec<Target> {
    let template = Arc::new(Template::embedded());
    let targets = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let (pool2, targets2) = (pool.clone(), targets.clone());
    fleet::for_each_bounded(
        (0..n).collect(),
        4,
        move |i| {
            let (pool, template, targets) = (pool2.clone(), template.clone(), targets2.clone());
            async move {
                let slug = format!("load-{i:05}");
                let created = provision::create_org(
                    &pool,
                    &template,
                    &NewOrg::parse(&slug, "Load", None).unwrap(),
                )
                .await
                .unwrap();
                let (_, token) = provision::issue_org_token(
                    &pool,
                    &Slug::parse(&slug).unwrap(),
                    "bench@load.test",
                    None,
                    None,
                )
                .await
                .unwrap();
                let schema = created.organization.schema_name.quoted();
                let test_id: uuid::Uuid = sqlx::query_scalar(&format!(
                    "INSERT INTO {schema}.tests (prompt, expected_outcome, behavior_id, status_id, created_by, updated_by) \
                     SELECT 'p', 'o', (SELECT id FROM {schema}.behaviors LIMIT 1), (SELECT id FROM {schema}.statuses LIMIT 1), \
                            '00000000-0000-0000-0000-000000000000', '00000000-0000-0000-0000-000000000000' RETURNING id"
                ))
                .persistent(false)
                .fetch_one(&pool)
                .await
                .unwrap();
                targets.lock().unwrap().push(Target {
                    slug,
                    token: token.token,
                    test_id,
                });
            }
        },
        |_| {},
    )
    .await;
    Arc::try_unwrap(targets)
        .ok()
        .expect("all workers finished")
        .into_inner()
        .unwrap()
}

/// One client: requests to random tenants until `stop`.
async fn client(
    base: String,
    targets: Arc<Vec<Target>>,
    epoch: Instant,
    stop: Arc<AtomicBool>,
    seed: u64,
    writes_every: u64,
) -> (Vec<Sample>, Vec<String>) {
    let http = reqwest::Client::new();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        // xorshift64
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut samples, mut failures) = (vec![], vec![]);
    while !stop.load(Ordering::Relaxed) {
        let r = next();
        let t = &targets[(r % targets.len() as u64) as usize];
        let url = format!("{base}/v1/orgs/{}/tests/{}", t.slug, t.test_id);
        let started = Instant::now();
        let request = if (r >> 32) % writes_every == 0 {
            http.patch(&url)
                .json(&serde_json::json!({ "prompt": format!("p{}", r % 1000) }))
        } else {
            http.get(&url)
        };
        let result = request.bearer_auth(&t.token).send().await;
        let ok = match result {
            Ok(res) if res.status().is_success() => {
                let _ = res.bytes().await;
                true
            }
            Ok(res) => {
                let status = res.status();
                let body = res.text().await.unwrap_or_default();
                failures.push(format!("{status} {url}: {body}"));
                false
            }
            Err(e) => {
                failures.push(format!("{url}: {e}"));
                false
            }
        };
        samples.push(Sample {
            start_us: started.duration_since(epoch).as_micros() as u64,
            latency_us: started.elapsed().as_micros() as u64,
            ok,
        });
    }
    (samples, failures)
}

fn window_row(label: &str, samples: &[Sample], from: Duration, to: Duration) {
    let (from_us, to_us) = (from.as_micros() as u64, to.as_micros() as u64);
    let mut lat: Vec<u64> = samples
        .iter()
        .filter(|s| s.start_us >= from_us && s.start_us < to_us)
        .map(|s| s.latency_us)
        .collect();
    let failed = samples
        .iter()
        .filter(|s| s.start_us >= from_us && s.start_us < to_us && !s.ok)
        .count();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |&us| us as f64 / 1000.0)
    };
    let secs = (to - from).as_secs_f64();
    println!(
        "{label:<40} {secs:>8.2} {:>9} {:>8.0} {:>8.2} {:>8.2} {:>8.1} {failed:>7}",
        lat.len(),
        lat.len() as f64 / secs,
        pct(0.5),
        pct(0.99),
        lat.last().map_or(0.0, |&us| us as f64 / 1000.0),
    );
}

#[tokio::main]
async fn main() {
    let tenants: usize = arg("--tenants", 1000);
    let jobs: usize = arg("--jobs", 4);
    let before: u64 = arg("--before", 10);
    let concurrency: u64 = arg("--concurrency", 32);
    let writes_every: u64 = arg("--writes-every", 5);

    let (setup, url) = common::bench_pool(4).await;
    tenantry::tenants::migrate_database(&setup).await.unwrap();
    let started = Instant::now();
    let targets = Arc::new(create_targets(&setup, tenants).await);
    println!(
        "created {tenants} tenants in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let (_dir, template) = common::template_with(&[
        (
            "V2__priority.sql",
            "ALTER TABLE tests ADD COLUMN priority integer NOT NULL DEFAULT 0;\n\
             CREATE INDEX tests_priority_idx ON tests (priority);\n",
        ),
        (
            "V3__weight.sql",
            "ALTER TABLE tests ADD COLUMN weight integer NOT NULL DEFAULT 1;\n",
        ),
        (
            "V4__weight_index.sql",
            "-- tenantry:no-transaction\nCREATE INDEX CONCURRENTLY tests_weight_idx ON tests (weight);\n",
        ),
    ]);
    let migration_pool = common::fleet_pool(&url, jobs).await;

    let (base, _pools, stop_server) =
        common::start_server(&url, &PoolConfig::default(), ServerConfig::default()).await;
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..concurrency)
        .map(|i| {
            tokio::spawn(client(
                base.clone(),
                targets.clone(),
                epoch,
                stop.clone(),
                i + 1,
                writes_every,
            ))
        })
        .collect();

    // The load runs for `before` seconds, then through both roll-outs.
    tokio::time::sleep(Duration::from_secs(before)).await;
    let mut runs = vec![];
    for (label, target) in [
        ("V2: column + index, one transaction", 2),
        ("V3+V4: column, then CONCURRENTLY", 4),
    ] {
        let from = epoch.elapsed();
        let report = fleet::migrate(
            &migration_pool,
            &template,
            &MigrateOptions {
                jobs,
                target: Some(target),
                ..MigrateOptions::default()
            },
            |_| {},
        )
        .await
        .unwrap();
        let to = epoch.elapsed();
        assert_eq!(
            (report.migrated, report.failed, report.lock_timeouts),
            (tenants, 0, 0),
            "{report:?}"
        );
        runs.push((label, from, to, report.seconds));
        // a pause between the runs, measured as quiet traffic
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (mut samples, mut failures) = (vec![], vec![]);
    for c in clients {
        let (s, f) = c.await.unwrap();
        samples.extend(s);
        failures.extend(f);
    }
    drop(stop_server);

    println!(
        "HTTP load during fleet migrations: {tenants} tenants, {concurrency} clients, \
         1 in {writes_every} requests a PATCH, tenant pool 16, migrate --jobs {jobs}"
    );
    println!(
        "{:<40} {:>8} {:>9} {:>8} {:>8} {:>8} {:>8} {:>7}",
        "traffic", "seconds", "requests", "req/s", "p50 ms", "p99 ms", "max ms", "failed"
    );
    // the first second warms the caches up
    window_row(
        "before (steady state)",
        &samples,
        Duration::from_secs(1),
        runs[0].1,
    );
    for (label, from, to, _) in &runs {
        window_row(&format!("during {label}"), &samples, *from, *to);
    }
    for (label, _, _, secs) in &runs {
        println!("{label}: {secs:.2} s for {tenants} tenants");
    }
    println!("failed requests: {}", failures.len());
    for f in failures.iter().take(20) {
        println!("  {f}");
    }
}
