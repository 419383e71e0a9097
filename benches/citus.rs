//! tenantry on Citus against plain PostgreSQL, in one run on this machine:
//! a throwaway plain cluster and a throwaway Citus cluster (a coordinator
//! and two workers) side by side.
//!
//! - provisioning: `create_org` per org, alternating between the engines;
//! - routed `GET /v1/orgs/{slug}/tests/{id}` over the same number of
//!   tenants (spread over both workers on Citus), phases alternating: the
//!   coordinator hop's cost as a ratio;
//! - a move of a tenant with `--move-rows` tests to the other worker while
//!   a writer inserts through the API: move time, the longest write stall
//!   the writer saw, and acknowledged rows lost (must be 0).
//!
//! Needs the Citus extension installed for the server binaries.
//!
//!     cargo bench --bench citus -- --tenants 100 --concurrency 32 --seconds 5 --rounds 3 --move-rows 100000

mod common;

#[path = "../tests/common/pgbouncer.rs"]
mod pgbouncer;

#[path = "../tests/common/citus.rs"]
mod citus;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{arg, bench_pool, load, ms, start_server, Stats, Target};
use tenantry::base::ident::Slug;
use tenantry::pg::pools::PoolConfig;
use tenantry::server::ServerConfig;
use tenantry::tenants::provision::{self, NewOrg};
use tenantry::tenants::template::Template;

#[tokio::main]
async fn main() {
    let tenants: usize = arg("--tenants", 100);
    let concurrency: usize = arg("--concurrency", 32);
    let seconds: f64 = arg("--seconds", 5.0);
    let rounds: usize = arg("--rounds", 3);
    let move_rows: i64 = arg("--move-rows", 100_000);
    assert!(
        citus::installed(),
        "the Citus extension is not installed for this PostgreSQL"
    );

    let (plain, plain_url) = bench_pool(4).await;
    let cluster = citus::CitusCluster::start();
    let name = format!("tenantry_bench_{}", uuid::Uuid::new_v4().simple());
    cluster.create_database(&name).await;
    let citus_url = cluster.url(cluster.coordinator, &name);
    let citus = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&citus_url)
        .await
        .unwrap();
    for pool in [&plain, &citus] {
        tenantry::tenants::migrate_database(pool).await.unwrap();
    }

    // provisioning, alternating
    let template = Template::embedded();
    let (mut plain_ms, mut citus_ms) = (vec![], vec![]);
    let mut made: Vec<(String, String, String)> = vec![];
    for i in 0..tenants {
        let slug = format!("bench-{i:04}");
        let new = NewOrg::parse(&slug, "Bench", None).unwrap();
        let mut schemas = vec![];
        for (pool, times) in [(&plain, &mut plain_ms), (&citus, &mut citus_ms)] {
            let started = Instant::now();
            let created = provision::create_org(pool, &template, &new).await.unwrap();
            times.push(started.elapsed());
            schemas.push(created.organization.schema_name.to_string());
        }
        made.push((slug, schemas[0].clone(), schemas[1].clone()));
    }
    let (p, c) = (Stats::of(plain_ms), Stats::of(citus_ms));
    println!("provisioning {tenants} orgs per engine, alternating");
    println!(
        "  plain: median {:.2} ms, p95 {:.2} ms; citus: median {:.2} ms, p95 {:.2} ms; citus/plain median {:.2}x",
        ms(p.median),
        ms(p.p95),
        ms(c.median),
        ms(c.p95),
        c.median.as_secs_f64() / p.median.as_secs_f64()
    );

    // routed reads, alternating
    let mut plain_targets = vec![];
    let mut citus_targets = vec![];
    for (slug, plain_schema, citus_schema) in &made {
        for (pool, schema, targets) in [
            (&plain, plain_schema, &mut plain_targets),
            (&citus, citus_schema, &mut citus_targets),
        ] {
            let t = common::populate(pool, slug, schema).await;
            targets.push(Target {
                path: format!("/v1/orgs/{}/tests/{}", t.slug, t.test_id),
                token: t.token,
            });
        }
    }
    let pool_config = PoolConfig::default();
    let (plain_base, _, _plain_stop) =
        start_server(&plain_url, &pool_config, ServerConfig::default()).await;
    let (citus_base, citus_pools, _citus_stop) =
        start_server(&citus_url, &pool_config, ServerConfig::default()).await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency * 2)
        .build()
        .unwrap();
    let sides = [
        ("plain", plain_base.clone(), Arc::new(plain_targets)),
        ("citus", citus_base.clone(), Arc::new(citus_targets)),
    ];
    for (_, base, targets) in &sides {
        load(&client, base, targets, concurrency, 1.0).await;
    }
    let mut rps: Vec<Vec<(f64, Stats)>> = vec![vec![], vec![]];
    for _ in 0..rounds {
        for (i, (_, base, targets)) in sides.iter().enumerate() {
            let (stats, r) = load(&client, base, targets, concurrency, seconds).await;
            rps[i].push((r, stats));
        }
    }
    let mean = |r: &Vec<(f64, Stats)>| r.iter().map(|x| x.0).sum::<f64>() / r.len() as f64;
    println!(
        "routed GET by id, {tenants} tenants, {concurrency} clients, {rounds} x {seconds} s per side"
    );
    for (i, (name, _, _)) in sides.iter().enumerate() {
        let p50 = rps[i].iter().map(|x| ms(x.1.median)).sum::<f64>() / rounds as f64;
        let p99 = rps[i].iter().map(|x| ms(x.1.p99)).fold(0.0, f64::max);
        println!(
            "  {name}: {:.0} req/s, p50 {p50:.2} ms, p99 {p99:.2} ms (worst round)",
            mean(&rps[i])
        );
    }
    println!(
        "  citus/plain throughput {:.2}x",
        mean(&rps[1]) / mean(&rps[0])
    );

    // a move under a steady writer
    let slug = "bench-0000";
    let schema = &made[0].2;
    sqlx::raw_sql(&format!(
        "INSERT INTO {schema}.tests (prompt, expected_outcome, behavior_id, status_id, created_by, updated_by) \
         SELECT 'seed ' || g, 'ok', (SELECT id FROM {schema}.behaviors LIMIT 1), (SELECT id FROM {schema}.statuses LIMIT 1), \
                '00000000-0000-0000-0000-000000000000', '00000000-0000-0000-0000-000000000000' \
         FROM generate_series(1, {move_rows}) g"
    ))
    .execute(&citus)
    .await
    .unwrap();
    let ids: (String, String) = sqlx::query_as(&format!(
        "SELECT (SELECT id::text FROM {schema}.behaviors LIMIT 1), (SELECT id::text FROM {schema}.statuses LIMIT 1)"
    ))
    .fetch_one(&citus)
    .await
    .unwrap();
    let nodes = tenantry::tenants::placement::nodes(&citus).await.unwrap();
    let mut conn = citus.acquire().await.unwrap();
    let from = tenantry::tenants::placement::nodes_of(&mut conn, &[schema.as_str()])
        .await
        .unwrap()
        .remove(schema.as_str())
        .unwrap();
    drop(conn);
    let to = nodes.iter().find(|n| n.node != from).unwrap().node.clone();
    let token = sides[1].2[0].token.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (client, url, stop) = (
            client.clone(),
            format!("{citus_base}/v1/orgs/{slug}/tests"),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut log: Vec<(Instant, Duration, String, u16)> = vec![];
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let prompt = format!("w-{n}");
                let sent = Instant::now();
                let status = client
                    .post(&url)
                    .bearer_auth(&token)
                    .json(
                        &serde_json::json!({"prompt": prompt, "expected_outcome": "ok",
                        "behavior_id": ids.0, "status_id": ids.1}),
                    )
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16();
                log.push((sent, sent.elapsed(), prompt, status));
            }
            log
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let move_started = Instant::now();
    let moved = tenantry::tenants::placement::move_org(
        &citus_pools.admin,
        &Slug::parse(slug).unwrap(),
        &to,
    )
    .await
    .unwrap();
    let move_ended = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let log = writer.await.unwrap();
    let stored: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT prompt FROM {schema}.tests WHERE prompt LIKE 'w-%'"
    ))
    .fetch_all(&citus)
    .await
    .unwrap();
    let stored: std::collections::HashSet<String> = stored.into_iter().collect();
    let acked: Vec<&(Instant, Duration, String, u16)> =
        log.iter().filter(|l| (200..300).contains(&l.3)).collect();
    let lost = acked.iter().filter(|l| !stored.contains(&l.2)).count();
    let refused = log.len() - acked.len();
    let longest = log
        .iter()
        .filter(|l| l.0 + l.1 >= move_started && l.0 <= move_ended)
        .map(|l| l.1)
        .max()
        .unwrap_or_default();
    println!(
        "move of a tenant with {move_rows} tests {from} -> {to} under a steady writer: \
         {:.2} s (citus_schema_move, block_writes); longest write stall {:.0} ms; \
         {} writes acknowledged, {refused} refused, {lost} acknowledged rows lost",
        moved.seconds,
        ms(longest),
        acked.len()
    );
}
