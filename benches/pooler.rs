//! Behind PgBouncer: `GET /v1/orgs/{slug}/tests/{id}` over N tenants, in one
//! run and on one database, served by three servers in alternating phases:
//!
//! - `direct`: straight to PostgreSQL, the defaults (prepared statements);
//! - `direct-unnamed`: straight to PostgreSQL with unnamed statements (what
//!   `--pooler transaction` sends), to separate their cost from the hop;
//! - `pgbouncer`: through a real PgBouncer in transaction pooling mode
//!   (`--pooler transaction`), `default_pool_size` server connections.
//!
//! Ratios are against `direct`.
//!
//!     cargo bench --bench pooler -- --tenants 100 --concurrency 32 --seconds 5 --rounds 3 --bouncer-pool 16

mod common;

#[path = "../tests/common/pgbouncer.rs"]
mod pgbouncer;

use common::{arg, bench_pool, load, ms, Stats, Target};
use tenantry::pg::pools::{PoolConfig, Pooler};
use tenantry::server::{self, ServerConfig};
use tenantry::serving::router::{RouterConfig, StatementMode};
use tenantry::tenants::template::Template;

/// A server whose serving connections go to `serving_url`; admin work to
/// `direct_url`.
async fn start(
    direct_url: &str,
    serving_url: &str,
    pool: &PoolConfig,
    config: ServerConfig,
) -> String {
    let admin = tenantry::pg::pools::connect(
        direct_url,
        &PoolConfig {
            pooler: Pooler::None,
            ..server::small_pool_config(pool)
        },
    )
    .await
    .unwrap();
    let pools = server::Pools::connect_lazy(admin, serving_url, pool).unwrap();
    let state = server::state(pools, &config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        server::serve(listener, state, &config, std::future::pending())
            .await
            .unwrap()
    });
    base
}

#[tokio::main]
async fn main() {
    let tenants: usize = arg("--tenants", 100);
    let concurrency: usize = arg("--concurrency", 32);
    let seconds: f64 = arg("--seconds", 5.0);
    let rounds: usize = arg("--rounds", 3);
    let pool_size: u32 = arg("--pool", 16);
    let bouncer_pool: u32 = arg("--bouncer-pool", 16);

    let (setup_pool, url) = bench_pool(4).await;
    tenantry::tenants::migrate_database(&setup_pool)
        .await
        .unwrap();
    let template = Template::embedded();
    let mut targets = Vec::new();
    for i in 0..tenants {
        let t = common::bench_tenant(&setup_pool, &template, i).await;
        targets.push(Target {
            path: format!("/v1/orgs/{}/tests/{}", t.slug, t.test_id),
            token: t.token,
        });
    }
    setup_pool.close().await;
    let targets = std::sync::Arc::new(targets);

    let bouncer = pgbouncer::PgBouncer::start(&url, bouncer_pool);
    let pool = PoolConfig {
        max_connections: pool_size,
        ..PoolConfig::default()
    };
    let direct = start(&url, &url, &pool, ServerConfig::default()).await;
    let unnamed = start(
        &url,
        &url,
        &pool,
        ServerConfig {
            router: RouterConfig {
                statements: StatementMode::Unnamed,
                ..RouterConfig::default()
            },
            ..ServerConfig::default()
        },
    )
    .await;
    let bounced = start(
        &url,
        &bouncer.url_for(&url),
        &PoolConfig {
            pooler: Pooler::Transaction,
            ..pool.clone()
        },
        ServerConfig {
            listen_url: Some(url.clone()),
            ..ServerConfig::default()
        },
    )
    .await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency * 2)
        .build()
        .unwrap();
    let servers = [
        ("direct", direct),
        ("direct-unnamed", unnamed),
        ("pgbouncer", bounced),
    ];
    println!(
        "{tenants} tenants, {concurrency} clients, tenant pool {pool_size}, pgbouncer default_pool_size {bouncer_pool}, {rounds} rounds of {seconds} s each"
    );
    // warm every server's caches and connections
    for (_, base) in &servers {
        load(&client, base, &targets, concurrency, 1.0).await;
    }
    let mut results: Vec<Vec<(f64, Stats)>> = servers.iter().map(|_| vec![]).collect();
    for _ in 0..rounds {
        for (i, (_, base)) in servers.iter().enumerate() {
            let (stats, rps) = load(&client, base, &targets, concurrency, seconds).await;
            results[i].push((rps, stats));
        }
    }
    let mean = |r: &Vec<(f64, Stats)>| r.iter().map(|(rps, _)| rps).sum::<f64>() / r.len() as f64;
    let base_rps = mean(&results[0]);
    println!("| server | req/s | vs direct | p50 ms | p99 ms |");
    println!("|---|---|---|---|---|");
    for ((name, _), r) in servers.iter().zip(&results) {
        let rps = mean(r);
        let worst_p99 = r.iter().map(|(_, s)| s.p99).max().unwrap();
        let p50 = r.iter().map(|(_, s)| ms(s.median)).sum::<f64>() / r.len() as f64;
        println!(
            "| {name} | {rps:.0} | {:.2}x | {p50:.2} | {:.2} |",
            rps / base_rps,
            ms(worst_p99)
        );
    }
}
