//! Reads from a replica with read-your-writes per org: 90% reads and 10%
//! writes over `--orgs` orgs from `--clients` concurrent clients, through
//! a router without replicas (every read on the primary) and one with a
//! local streaming replica (made as `serve --local-replicas` makes it),
//! alternated for `--rounds` rounds of `--seconds` each, on one cluster.
//!
//! Each write inserts a row in its org and records it once committed;
//! each read fetches its org's last recorded row, so a read that misses a
//! write acknowledged before it began is a read-your-writes violation,
//! counted here (it must be 0). Printed per round: requests per second,
//! p50 and p99, the share of reads the replica served, and the primary's
//! CPU per request (ticks of its postmaster and backends, from /proc).
//!
//!     cargo bench --bench replicas -- --orgs 1000 --clients 32 --rounds 3 --seconds 10

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{arg, cluster_ticks, ms, Stats};
use futures_util::StreamExt;
use tenantry::pg::embedded::{Durability, LocalPostgres};
use tenantry::pg::pools::{PoolConfig, TenantPool};
use tenantry::serving::replicas::{ReplicaConfig, Replicas};
use tenantry::serving::router::{RouterConfig, Tenant, TenantRouter};
use tenantry::tenants::provision::{self, NewOrg};
use tenantry::tenants::template::Template;
use uuid::Uuid;

const INSERT: &str =
    "INSERT INTO behaviors (name, created_by, updated_by) VALUES ($1, $2, $2) RETURNING id";
const READ: &str = "SELECT id, name FROM behaviors WHERE id = $1";
const LIST: &str = "SELECT id, name FROM behaviors ORDER BY name LIMIT 10";

fn postmaster_pid(pg: &LocalPostgres) -> u32 {
    let text = std::fs::read_to_string(pg.data_dir().join("postmaster.pid")).unwrap();
    text.lines().next().unwrap().trim().parse().unwrap()
}

struct Round {
    requests: u64,
    seconds: f64,
    latency: Stats,
    reads: u64,
    on_replica: u64,
    violations: u64,
    primary_ticks: u64,
}

async fn round(
    router: &TenantRouter,
    tenants: &Arc<Vec<Arc<Tenant>>>,
    clients: usize,
    seconds: u64,
    primary: u32,
) -> Round {
    // each org's last write, recorded once committed
    let last: Arc<Mutex<HashMap<Uuid, Uuid>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let (reads, violations) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let served_before: u64 = router
        .replicas()
        .map_or(0, |r| r.replicas().iter().map(|x| x.reads_served()).sum());
    let ticks_before = cluster_ticks(primary);
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (router, tenants, last, stop) =
                (router.clone(), tenants.clone(), last.clone(), stop.clone());
            let (reads, violations) = (reads.clone(), violations.clone());
            tokio::spawn(async move {
                let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ (c as u64 + 1);
                let mut latencies = vec![];
                let mut next = move || {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed
                };
                while !stop.load(Ordering::Relaxed) {
                    // two draws: the org and the operation independent
                    let tenant = &tenants[(next() % tenants.len() as u64) as usize];
                    let write = next() % 10 == 0;
                    let began = Instant::now();
                    if write {
                        let mut tx = router.begin(tenant).await.unwrap();
                        let (id,): (Uuid,) = tx
                            .query_as(INSERT)
                            .bind(format!("w{}", Uuid::new_v4().simple()))
                            .bind(tenant.id)
                            .and_commit()
                            .fetch_one()
                            .await
                            .unwrap();
                        tx.commit().await.unwrap();
                        last.lock().unwrap().insert(tenant.id, id);
                    } else {
                        let expected = last.lock().unwrap().get(&tenant.id).copied();
                        let found = router
                            .read(tenant, async move |tx| {
                                Ok(match expected {
                                    Some(id) => tx
                                        .query_as::<(Uuid, String)>(READ)
                                        .bind(id)
                                        .fetch_optional()
                                        .await?
                                        .is_some(),
                                    None => {
                                        tx.query_as::<(Uuid, String)>(LIST).fetch_all().await?;
                                        true
                                    }
                                })
                            })
                            .await
                            .unwrap();
                        reads.fetch_add(1, Ordering::Relaxed);
                        if !found {
                            violations.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    latencies.push(began.elapsed());
                }
                latencies
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = vec![];
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    let served: u64 = router
        .replicas()
        .map_or(0, |r| r.replicas().iter().map(|x| x.reads_served()).sum());
    Round {
        requests: latencies.len() as u64,
        seconds: elapsed,
        latency: Stats::of(latencies),
        reads: reads.load(Ordering::Relaxed),
        on_replica: served - served_before,
        violations: violations.load(Ordering::Relaxed),
        primary_ticks: cluster_ticks(primary) - ticks_before,
    }
}

fn print(label: &str, r: &Round) {
    println!(
        "{label:<16} {:>8.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  replica reads {:>5.1}% ({} of {})  primary CPU {:>6.1} us/req  violations {}",
        r.requests as f64 / r.seconds,
        ms(r.latency.median),
        ms(r.latency.p99),
        100.0 * r.on_replica as f64 / r.reads.max(1) as f64,
        r.on_replica,
        r.reads,
        r.primary_ticks as f64 * 10_000.0 / r.requests.max(1) as f64,
        r.violations,
    );
}

#[tokio::main]
async fn main() {
    let orgs: usize = arg("--orgs", 1000);
    let clients: usize = arg("--clients", 32);
    let rounds: usize = arg("--rounds", 3);
    let seconds: u64 = arg("--seconds", 10);
    let pool_size: u32 = arg("--pool", 16);

    let dir = std::env::temp_dir().join(format!("tenantry-bench-replicas-{}", std::process::id()));
    let pg = LocalPostgres::ensure_running(&dir, Durability::Throwaway).expect("local PostgreSQL");
    pg.remove_when_process_exits(std::process::id())
        .expect("watchdog");
    let replica = pg
        .ensure_replica(1, Durability::Throwaway, None)
        .expect("a local replica");
    let admin = sqlx::PgPool::connect(&pg.url("postgres")).await.unwrap();
    tenantry::tenants::migrate_database(&admin).await.unwrap();
    let template = Arc::new(Template::embedded());
    let made = Instant::now();
    let slugs: Vec<String> = (0..orgs).map(|i| format!("r{i}")).collect();
    futures_util::stream::iter(slugs.iter())
        .map(|slug| {
            let (admin, template) = (admin.clone(), template.clone());
            async move {
                provision::create_org(&admin, &template, &NewOrg::parse(slug, slug, None).unwrap())
                    .await
                    .unwrap();
            }
        })
        .buffer_unordered(4)
        .collect::<Vec<()>>()
        .await;
    eprintln!("{orgs} orgs in {:.1} s", made.elapsed().as_secs_f64());

    let pools = PoolConfig {
        max_connections: pool_size,
        ..PoolConfig::default()
    };
    let control = tenantry::pg::pools::connect(
        &pg.url("postgres"),
        &tenantry::server::small_pool_config(&pools),
    )
    .await
    .unwrap();
    let plain = TenantRouter::new(
        control.clone(),
        TenantPool::connect_lazy(&pg.url("postgres"), &pools).unwrap(),
        &RouterConfig::default(),
    );
    let replicas = Arc::new(
        Replicas::connect_lazy(&[replica.url("postgres")], &pools, ReplicaConfig::default())
            .unwrap(),
    );
    Replicas::spawn_poller(&replicas, control.clone());
    let with_replica = TenantRouter::new(
        control.clone(),
        TenantPool::connect_lazy(&pg.url("postgres"), &pools).unwrap(),
        &RouterConfig::default(),
    )
    .with_replicas(replicas.clone());
    let mut tenants = vec![];
    for slug in &slugs {
        let slug = tenantry::base::ident::Slug::parse(slug).unwrap();
        tenants.push(plain.resolve(&slug).await.unwrap().unwrap());
    }
    let tenants = Arc::new(tenants);
    while !replicas.replicas()[0].is_up() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let primary = postmaster_pid(&pg);
    println!(
        "{orgs} orgs, {clients} clients, 90% reads / 10% writes, {seconds} s rounds, pool {pool_size} (each side)"
    );
    // one warm-up round each, not counted
    round(&plain, &tenants, clients, 2, primary).await;
    round(&with_replica, &tenants, clients, 2, primary).await;
    let (mut a, mut b) = (vec![], vec![]);
    for i in 0..rounds {
        let r = round(&plain, &tenants, clients, seconds, primary).await;
        print(&format!("primary only #{}", i + 1), &r);
        a.push(r);
        let r = round(&with_replica, &tenants, clients, seconds, primary).await;
        print(&format!("with replica #{}", i + 1), &r);
        b.push(r);
    }
    let sum =
        |rs: &[Round], f: &dyn Fn(&Round) -> f64| rs.iter().map(f).sum::<f64>() / rs.len() as f64;
    let rate = |r: &Round| r.requests as f64 / r.seconds;
    let cpu = |r: &Round| r.primary_ticks as f64 / r.requests.max(1) as f64;
    let p99 = |r: &Round| ms(r.latency.p99);
    let p50 = |r: &Round| ms(r.latency.median);
    println!(
        "with replica / primary only: throughput {:.2}x, p50 {:.2}x, p99 {:.2}x, primary CPU per request {:.2}x; violations {} (primary only) and {} (with replica)",
        sum(&b, &rate) / sum(&a, &rate),
        sum(&b, &p50) / sum(&a, &p50),
        sum(&b, &p99) / sum(&a, &p99),
        sum(&b, &cpu) / sum(&a, &cpu),
        a.iter().map(|r| r.violations).sum::<u64>(),
        b.iter().map(|r| r.violations).sum::<u64>(),
    );
}
