//! Shared by the benchmark programs: a database to measure against, a
//! server in the benchmark's process, and latency statistics.
#![allow(dead_code)]

pub mod wire_proxy;

use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tenantry::pg::embedded::{Durability, LocalPostgres};

/// A fresh database on DATABASE_URL's server, or on a throwaway local
/// cluster (fsync off) that is removed when the program exits.
pub async fn bench_pool(max_connections: u32) -> (PgPool, String) {
    let server_url = match std::env::var("DATABASE_URL") {
        Ok(url) => url,
        Err(_) => {
            let dir = std::env::temp_dir().join(format!("tenantry-bench-{}", std::process::id()));
            let pg = LocalPostgres::ensure_running(&dir, Durability::Throwaway)
                .expect("local PostgreSQL");
            pg.remove_when_process_exits(std::process::id())
                .expect("watchdog");
            pg.url("postgres")
        }
    };
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&server_url)
        .await
        .expect("connect");
    let name = format!("tenantry_bench_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .expect("create database");
    admin.close().await;
    let (base, _) = server_url.rsplit_once('/').expect("URL has a database");
    let url = format!("{base}/{name}");
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .connect(&url)
        .await
        .expect("connect to bench database");
    (pool, url)
}

pub struct Stats {
    pub median: Duration,
    pub p95: Duration,
    pub p99: Duration,
    pub total: Duration,
    pub n: usize,
}

impl Stats {
    pub fn of(mut samples: Vec<Duration>) -> Stats {
        samples.sort();
        let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
        Stats {
            median: at(0.5),
            p95: at(0.95),
            p99: at(0.99),
            total: samples.iter().sum(),
            n: samples.len(),
        }
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `--name value` from the command line, or `default`.
pub fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("bad value for {name}")))
        .unwrap_or(default)
}

/// The fields after the command of a /proc stat file (state is 0, ppid 1,
/// utime 11, stime 12).
fn stat_fields(stat_path: &std::path::Path) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    let rest = &stat[stat.rfind(')').map(|i| i + 2).unwrap_or(0)..];
    Some(rest.split(' ').map(|v| v.parse().unwrap_or(0)).collect())
}

/// CPU time (clock ticks, user + system) of a process from /proc.
fn process_ticks(stat_path: &std::path::Path) -> u64 {
    stat_fields(stat_path).map_or(0, |f| f.get(11).unwrap_or(&0) + f.get(12).unwrap_or(&0))
}

/// CPU ticks (user + system, 100 per second) of one PostgreSQL cluster:
/// its postmaster `postmaster` and every process it started.
pub fn cluster_ticks(postmaster: u32) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Some(f) = stat_fields(&e.path().join("stat")) else {
            continue;
        };
        if pid == postmaster || f.get(1) == Some(&(postmaster as u64)) {
            total += f.get(11).unwrap_or(&0) + f.get(12).unwrap_or(&0);
        }
    }
    total
}

/// A snapshot of CPU ticks (100 per second): each postgres process's, and
/// this process's. Both share the machine's cores, so where the work goes
/// matters.
pub struct CpuSnapshot {
    postgres: std::collections::HashMap<u32, u64>,
    me: u64,
}

pub fn cpu_ticks() -> CpuSnapshot {
    let mut postgres = std::collections::HashMap::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let is_pg =
            std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "postgres");
        if is_pg {
            postgres.insert(pid, process_ticks(&e.path().join("stat")));
        }
    }
    CpuSnapshot {
        postgres,
        me: process_ticks(std::path::Path::new("/proc/self/stat")),
    }
}

impl CpuSnapshot {
    /// Ticks spent since `earlier` by (postgres, this process). Processes
    /// that exited in between are not counted; new ones count fully.
    pub fn since(&self, earlier: &CpuSnapshot) -> (u64, u64) {
        let pg = self
            .postgres
            .iter()
            .map(|(pid, t)| t.saturating_sub(earlier.postgres.get(pid).copied().unwrap_or(0)))
            .sum();
        (pg, self.me.saturating_sub(earlier.me))
    }
}

/// A server over `url` (admin, control and tenant pools, all on that URL),
/// listening on port 0; it stops when the returned sender is dropped.
pub async fn start_server(
    url: &str,
    pool_config: &tenantry::pg::pools::PoolConfig,
    server_config: tenantry::server::ServerConfig,
) -> (
    String,
    tenantry::server::Pools,
    tokio::sync::oneshot::Sender<()>,
) {
    use tenantry::server::{self, Pools};
    let admin = tenantry::pg::pools::connect(url, &server::small_pool_config(pool_config))
        .await
        .unwrap();
    let control =
        tenantry::pg::pools::connect_lazy(url, &server::small_pool_config(pool_config)).unwrap();
    let tenants = tenantry::pg::pools::TenantPool::connect_lazy(url, pool_config).unwrap();
    let pools = Pools {
        admin: admin.clone(),
        control: control.clone(),
        tenants: tenants.clone(),
    };
    let state = server::state(pools, &server_config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        server::serve(listener, state, &server_config, shutdown)
            .await
            .unwrap()
    });
    (
        base,
        Pools {
            admin,
            control,
            tenants,
        },
        stop,
    )
}

/// The built-in tenant template plus `extra` migration files (name, SQL),
/// in a temporary directory that lives as long as the returned handle.
pub fn template_with(
    extra: &[(&str, &str)],
) -> (tempfile::TempDir, tenantry::tenants::template::Template) {
    use tenantry::tenants::template::Template;
    let dir = tempfile::tempdir().unwrap();
    for m in Template::embedded().migrations() {
        std::fs::write(dir.path().join(format!("{m}.sql")), m.sql().unwrap()).unwrap();
    }
    for (file, sql) in extra {
        std::fs::write(dir.path().join(file), sql).unwrap();
    }
    let template = Template::from_dir(dir.path()).unwrap();
    (dir, template)
}

/// A pool for a fleet run of `jobs` workers (and one connection more for
/// the plan and the bookkeeping).
pub async fn fleet_pool(url: &str, jobs: usize) -> PgPool {
    tenantry::pg::pools::connect(
        url,
        &tenantry::pg::pools::PoolConfig {
            max_connections: jobs as u32 + 1,
            ..tenantry::pg::pools::PoolConfig::default()
        },
    )
    .await
    .unwrap()
}

/// A request of an HTTP load: path and bearer token.
pub struct Target {
    pub path: String,
    pub token: String,
}

/// `concurrency` keep-alive clients sending GETs over `targets` for
/// `secs`; every answer must be 200. Returns latency stats and req/s.
pub async fn load(
    client: &reqwest::Client,
    base: &str,
    targets: &std::sync::Arc<Vec<Target>>,
    concurrency: usize,
    secs: f64,
) -> (Stats, f64) {
    let deadline = std::time::Instant::now() + Duration::from_secs_f64(secs);
    let started = std::time::Instant::now();
    let handles: Vec<_> = (0..concurrency)
        .map(|w| {
            let (client, base, targets) = (client.clone(), base.to_owned(), targets.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut i = w;
                while std::time::Instant::now() < deadline {
                    let t = &targets[i % targets.len()];
                    i += concurrency + 1;
                    let start = std::time::Instant::now();
                    let res = client
                        .get(format!("{base}{}", t.path))
                        .bearer_auth(&t.token)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(res.status(), 200);
                    res.bytes().await.unwrap();
                    lat.push(start.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    let n = all.len() as f64;
    (Stats::of(all), n / elapsed)
}

/// A tenant of an HTTP benchmark: org `bench-<i>` with a token and 20
/// tests, `test_id` the 8th.
pub struct BenchTenant {
    pub slug: String,
    pub schema: String,
    pub token: String,
    pub test_id: uuid::Uuid,
}

pub async fn bench_tenant(
    pool: &PgPool,
    template: &tenantry::tenants::template::Template,
    i: usize,
) -> BenchTenant {
    use tenantry::tenants::provision::{self, NewOrg};
    let slug = format!("bench-{i:04}");
    let created = provision::create_org(
        pool,
        template,
        &NewOrg::parse(&slug, "Bench", None).unwrap(),
    )
    .await
    .unwrap();
    populate(pool, &slug, created.organization.schema_name.as_str()).await
}

/// A token and 20 tests for the existing org `slug`.
pub async fn populate(pool: &PgPool, slug: &str, schema: &str) -> BenchTenant {
    use tenantry::tenants::provision;
    let slug = slug.to_owned();
    let (_, token) = provision::issue_org_token(
        pool,
        &tenantry::base::ident::Slug::parse(&slug).unwrap(),
        "bench@bench.test",
        None,
        None,
    )
    .await
    .unwrap();
    let schema = schema.to_owned();
    let test_id: uuid::Uuid = sqlx::query_scalar(&format!(
        "INSERT INTO {schema}.tests (prompt, expected_outcome, behavior_id, status_id, created_by, updated_by) \
         SELECT 'prompt ' || g, 'ok', (SELECT id FROM {schema}.behaviors LIMIT 1), (SELECT id FROM {schema}.statuses LIMIT 1), \
                '00000000-0000-0000-0000-000000000000', '00000000-0000-0000-0000-000000000000' \
         FROM generate_series(1, 20) g RETURNING id"
    ))
    .fetch_all(pool)
    .await
    .unwrap()[7];
    BenchTenant {
        slug,
        schema,
        token: token.token,
        test_id,
    }
}
