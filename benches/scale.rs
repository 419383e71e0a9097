//! Scale benchmark: tenantry at 100, 1,000 and 10,000 tenants in one run.
//!
//!     cargo bench --bench scale -- --tenants 10000 --sizes 100,1000,10000 \
//!         --configs k1-pertenant,k8-pertenant,k8-shared --seconds 10 --warmup 10
//!
//! Builds the tenant set once (N orgs, a token and one test row each) in a
//! database that later runs reuse: a persistent throwaway cluster in
//! `--data-dir` (default `target/scale-pg`), or `tenantry_scale` on
//! DATABASE_URL's server. Building records each org's create time, so the
//! median create time of the first and the last 1,000 orgs is printed.
//!
//! Then, for each size N (the first N orgs), each configuration (sub-pools
//! `k` of a 16-connection tenant pool, statement mode) and each traffic
//! pattern (uniform round robin; Zipf, s = 1), it starts a server in this
//! process on fresh connections, drives `GET /v1/orgs/{slug}/tests/{id}`
//! with bearer auth through wrk (`-t2 -c32`, a warm-up run, then the
//! measured run) and prints req/s, p50, p99, CPU per request, and the ratio
//! to the same configuration at the smallest N. After each uniform run it
//! sums the memory of the server's PostgreSQL backends
//! (`/proc/<pid>/smaps_rollup`: Pss, and private memory). At the largest N
//! it times the admin paths: walking `GET /v1/admin/orgs`,
//! `GET /v1/admin/stats`, and `doctor`.

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use common::{arg, cpu_ticks, ms, Stats};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tenantry::base::ident::Slug;
use tenantry::pg::embedded::{Durability, LocalPostgres};
use tenantry::pg::pools::PoolConfig;
use tenantry::server::{Pools, ServerConfig};
use tenantry::serving::router::{RouterConfig, StatementMode};
use tenantry::tenants::provision::{self, NewOrg};
use tenantry::tenants::template::Template;

const DB_NAME: &str = "tenantry_scale";
const POOL_SIZE: u32 = 16;

#[derive(Clone, Debug)]
struct Config {
    name: String,
    sub_pools: u32,
    spill_margin: u32,
    statements: StatementMode,
    /// Tenant transactions run as the tenant's role (`-norole`: not, to
    /// measure what it costs).
    set_role: bool,
}

/// `k<sub-pools>[m<spill margin>]-<statements>[-norole]`, e.g.
/// `k16-pertenant` or `k16m2-shared`.
fn parse_config(s: &str) -> Config {
    let (k, rest) = s.split_once('-').expect("configs look like k8-pertenant");
    let (stmt, set_role) = match rest.strip_suffix("-norole") {
        Some(stmt) => (stmt, false),
        None => (rest, true),
    };
    let (k, margin) = k.split_once('m').unwrap_or((k, "0"));
    Config {
        name: s.to_owned(),
        set_role,
        sub_pools: k.trim_start_matches('k').parse().expect("k<number>"),
        spill_margin: margin.parse().expect("m<number>"),
        statements: match stmt {
            "auto" => StatementMode::Auto,
            "pertenant" => StatementMode::PerTenant,
            "shared" => StatementMode::Shared,
            "unnamed" => StatementMode::Unnamed,
            other => panic!("unknown statement mode {other}"),
        },
    }
}

struct Target {
    slug: String,
    token: String,
    test_id: uuid::Uuid,
}

/// The server's database: reused across runs.
async fn database() -> (String, Option<LocalPostgres>) {
    let server_url = match std::env::var("DATABASE_URL") {
        Ok(url) => (url, None),
        Err(_) => {
            let dir: PathBuf = arg("--data-dir", PathBuf::from("target/scale-pg"));
            let pg = tokio::task::spawn_blocking(move || {
                LocalPostgres::ensure_running(&dir, Durability::Throwaway)
            })
            .await
            .unwrap()
            .expect("local PostgreSQL");
            (pg.url("postgres"), Some(pg))
        }
    };
    let (url, pg) = server_url;
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .expect("connect");
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(DB_NAME)
            .fetch_one(&admin)
            .await
            .unwrap();
    if !exists {
        sqlx::query(&format!("CREATE DATABASE {DB_NAME}"))
            .execute(&admin)
            .await
            .unwrap();
    }
    // pg_stat_statements keys statements by the relations they touch, so
    // tenant SQL makes an entry per tenant; beyond pg_stat_statements.max
    // (5,000) every new one evicts and sorts (measured: several % of
    // PostgreSQL's CPU at 10,000 tenants). Off unless --stat-statements:
    // the figures are tenantry's, not the extension's.
    let track = if std::env::args().any(|a| a == "--stat-statements") {
        "top"
    } else {
        "none"
    };
    let _ = sqlx::query(&format!(
        "ALTER DATABASE {DB_NAME} SET pg_stat_statements.track = '{track}'"
    ))
    .execute(&admin)
    .await;
    admin.close().await;
    let (base, _) = url.rsplit_once('/').expect("URL has a database");
    (format!("{base}/{DB_NAME}"), pg)
}

/// The first `n` targets, building what is missing.
async fn tenant_set(pool: &PgPool, n: usize) -> Vec<Target> {
    tenantry::tenants::migrate_database(pool).await.unwrap();
    // a set built by an earlier version gets its tenant roles
    tenantry::registry::roles::ensure_tenant_roles(pool)
        .await
        .unwrap();
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS public.bench_targets (
           n int PRIMARY KEY, slug text NOT NULL, token text NOT NULL, test_id uuid NOT NULL,
           create_ms float8 NOT NULL)",
    )
    .execute(pool)
    .await
    .unwrap();
    let have: i64 = sqlx::query_scalar("SELECT count(*) FROM public.bench_targets")
        .fetch_one(pool)
        .await
        .unwrap();
    let template = Template::embedded();
    let started = Instant::now();
    // Test rows are inserted on a connection of their own, replaced every
    // 500 orgs: a backend that has written into many tenants keeps the
    // foreign-key check plans of each (in its plan cache), which makes every
    // later DDL's invalidation messages expensive for it (see
    // docs/scaling.md); that cost must not land on the connections whose
    // create times are measured.
    let mut inserter: Option<sqlx::PgConnection> = None;
    for i in have as usize..n {
        let slug = format!("scale-{i:05}");
        let t = Instant::now();
        let created = provision::create_org(
            pool,
            &template,
            &NewOrg::parse(&slug, "Scale", None).unwrap(),
        )
        .await
        .unwrap();
        let create_ms = ms(t.elapsed());
        let (_, token) = provision::issue_org_token(
            pool,
            &Slug::parse(&slug).unwrap(),
            "bench@scale.test",
            None,
            None,
        )
        .await
        .unwrap();
        let schema = created.organization.schema_name.quoted();
        if i % 500 == 0 {
            if let Some(old) = inserter.take() {
                sqlx::Connection::close(old).await.unwrap();
            }
        }
        let conn = match &mut inserter {
            Some(c) => c,
            None => inserter.insert(pool.acquire().await.unwrap().detach()),
        };
        let test_id: uuid::Uuid = sqlx::query_scalar(&format!(
            "INSERT INTO {schema}.tests (prompt, expected_outcome, behavior_id, status_id, created_by, updated_by) \
             SELECT 'p', 'o', (SELECT id FROM {schema}.behaviors LIMIT 1), (SELECT id FROM {schema}.statuses LIMIT 1), \
                    '00000000-0000-0000-0000-000000000000', '00000000-0000-0000-0000-000000000000' RETURNING id"
        ))
        .persistent(false)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        sqlx::query("INSERT INTO public.bench_targets VALUES ($1, $2, $3, $4, $5)")
            .bind(i as i32)
            .bind(&slug)
            .bind(&token.token)
            .bind(test_id)
            .bind(create_ms)
            .execute(pool)
            .await
            .unwrap();
        if (i + 1) % 1000 == 0 {
            eprintln!(
                "built {} orgs ({:.0} s)",
                i + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    let rows: Vec<(String, String, uuid::Uuid)> = sqlx::query_as(
        "SELECT slug, token, test_id FROM public.bench_targets WHERE n < $1 ORDER BY n",
    )
    .bind(n as i32)
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(slug, token, test_id)| Target {
            slug,
            token,
            test_id,
        })
        .collect()
}

/// Median create time of the first and the last 1,000 orgs (of `n`).
async fn provisioning_figures(pool: &PgPool, n: usize) {
    let median = |from: usize, to: usize| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, Option<f64>>(
                "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY create_ms) \
                 FROM public.bench_targets WHERE n >= $1 AND n < $2",
            )
            .bind(from as i32)
            .bind(to as i32)
            .fetch_one(&pool)
            .await
            .unwrap()
            .unwrap_or(f64::NAN)
        }
    };
    let block = 1000.min(n);
    let first = median(0, block).await;
    let last = median(n - block, n).await;
    println!(
        "provisioning (recorded when the set was built): median create of orgs 1-{block}: {first:.2} ms, \
         of orgs {}-{n}: {last:.2} ms, ratio {:.2}",
        n - block + 1,
        last / first
    );
}

/// Creates `count` more orgs now, one at a time on one connection, and
/// prints their median create time (to compare with the first orgs of the
/// set, created into an empty database); then deletes them again.
async fn probe_creates(url: &str, count: usize) {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .unwrap();
    let template = Template::embedded();
    let existing: i64 = sqlx::query_scalar("SELECT count(*) FROM tenantry.organizations")
        .fetch_one(&pool)
        .await
        .unwrap();
    let mut times = vec![];
    for i in 0..count {
        let slug = format!("probe-{i:05}");
        let t = Instant::now();
        provision::create_org(
            &pool,
            &template,
            &NewOrg::parse(&slug, "Probe", None).unwrap(),
        )
        .await
        .unwrap();
        times.push(t.elapsed());
    }
    let stats = Stats::of(times);
    println!(
        "provisioning now, at {existing} orgs: {count} creates on one connection, median {:.2} ms, p95 {:.2} ms",
        ms(stats.median),
        ms(stats.p95)
    );
    for i in 0..count {
        provision::delete_org(&pool, &Slug::parse(&format!("probe-{i:05}")).unwrap())
            .await
            .unwrap();
    }
    pool.close().await;
}

/// A wrk script driving the targets: uniform round robin (each thread from
/// its own offset) or Zipf with s = 1 over the targets' order.
fn wrk_script(targets: &[Target], zipf: bool) -> String {
    let mut lua = String::from("local targets = {\n");
    for t in targets {
        let _ = writeln!(
            lua,
            "{{\"/v1/orgs/{}/tests/{}\", \"Bearer {}\"}},",
            t.slug, t.test_id, t.token
        );
    }
    lua.push_str("}\nlocal n = #targets\n");
    let _ = writeln!(lua, "local zipf = {zipf}");
    lua.push_str(
        r#"
local threads = 0
function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end
local i, cdf = 0, nil
function init(args)
  i = math.floor((tid or 0) * n / 2)
  math.randomseed(12345 + (tid or 0))
  if zipf then
    cdf = {}
    local sum = 0
    for k = 1, n do sum = sum + 1 / k; cdf[k] = sum end
    for k = 1, n do cdf[k] = cdf[k] / sum end
  end
end
function request()
  local t
  if zipf then
    local u, lo, hi = math.random(), 1, n
    while lo < hi do
      local mid = math.floor((lo + hi) / 2)
      if cdf[mid] < u then lo = mid + 1 else hi = mid end
    end
    t = targets[lo]
  else
    i = i + 1
    if i > n then i = 1 end
    t = targets[i]
  end
  return wrk.format("GET", t[1], {["Authorization"] = t[2]})
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.status, e.connect + e.read + e.write + e.timeout))
end
"#,
    );
    lua
}

struct Run {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: u64,
    pg_us: f64,
    app_us: f64,
}

/// Runs wrk for `secs` against `base` with `script`.
async fn wrk(base: &str, script: &std::path::Path, secs: u64) -> Run {
    let before = cpu_ticks();
    let out = tokio::process::Command::new("wrk")
        .args([
            "-t2",
            "-c32",
            &format!("-d{secs}s"),
            "--timeout",
            "10s",
            "-s",
        ])
        .arg(script)
        .arg(base)
        .output()
        .await
        .expect("wrk is installed (apt-get install wrk)");
    let (pg, me) = cpu_ticks().since(&before);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("no result from wrk: {text}"));
    let f: Vec<u64> = line
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    let (requests, duration_us, p50, p99, bad_status, socket_errors) =
        (f[0], f[1], f[2], f[3], f[4], f[5]);
    assert_eq!(bad_status, 0, "non-2xx responses: {text}");
    assert_eq!(socket_errors, 0, "socket errors: {text}");
    let per_req = |ticks: u64| ticks as f64 * 10_000.0 / requests as f64;
    Run {
        rps: requests as f64 / (duration_us as f64 / 1e6),
        p50_ms: p50 as f64 / 1000.0,
        p99_ms: p99 as f64 / 1000.0,
        requests,
        pg_us: per_req(pg),
        app_us: per_req(me),
    }
}

/// Memory of the client backends connected to the bench database, from
/// /proc: (backends, sum of Pss, sum of private memory), in MB.
async fn backend_memory(pool: &PgPool) -> (usize, f64, f64) {
    let pids: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
         AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let (mut pss, mut private) = (0u64, 0u64);
    for pid in &pids {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) else {
            continue;
        };
        for line in text.lines() {
            let mut parts = line.split_whitespace();
            let (Some(key), Some(kb)) = (parts.next(), parts.next()) else {
                continue;
            };
            let kb: u64 = kb.parse().unwrap_or(0);
            match key {
                "Pss:" => pss += kb,
                "Private_Clean:" | "Private_Dirty:" => private += kb,
                _ => {}
            }
        }
    }
    (pids.len(), pss as f64 / 1024.0, private as f64 / 1024.0)
}

/// A server over `url` with this configuration, on port 0.
async fn start_server(
    url: &str,
    config: &Config,
) -> (String, Pools, tokio::sync::oneshot::Sender<()>) {
    let pool_config = PoolConfig {
        max_connections: POOL_SIZE,
        sub_pools: config.sub_pools,
        spill_margin: config.spill_margin,
        ..PoolConfig::default()
    };
    let server_config = ServerConfig {
        router: RouterConfig {
            statements: config.statements,
            set_role: config.set_role,
            ..RouterConfig::default()
        },
        ..ServerConfig::default()
    };
    common::start_server(url, &pool_config, server_config).await
}

#[tokio::main]
async fn main() {
    let max: usize = arg("--tenants", 10_000);
    let sizes: Vec<usize> = arg("--sizes", format!("100,1000,{max}"))
        .split(',')
        .map(|s| s.parse().expect("--sizes 100,1000,10000"))
        .collect();
    let configs: Vec<Config> = arg("--configs", "k1-pertenant,k8-pertenant".to_string())
        .split(',')
        .map(parse_config)
        .collect();
    let patterns: Vec<String> = arg("--patterns", "uniform,zipf".to_string())
        .split(',')
        .map(str::to_owned)
        .collect();
    let seconds: u64 = arg("--seconds", 10);
    let warmup: u64 = arg("--warmup", 10);

    let (url, local) = database().await;
    let setup = PgPoolOptions::new()
        .max_connections(3)
        .connect(&url)
        .await
        .unwrap();
    let all = tenant_set(&setup, max).await;
    provisioning_figures(&setup, max).await;
    let probes: usize = arg("--probe-creates", 0);
    if probes > 0 {
        probe_creates(&url, probes).await;
    }
    let script_dir = tempfile::tempdir().unwrap();

    println!(
        "HTTP GET one test by id with bearer auth, wrk -t2 -c32, tenant pool {POOL_SIZE}, warm-up {warmup} s, measured {seconds} s"
    );
    println!(
        "{:<15} {:<8} {:>6} {:>9} {:>8} {:>8} {:>9} {:>8} {:>10} {:>10} {:>12} {:>12}",
        "config",
        "pattern",
        "N",
        "req/s",
        "p50 ms",
        "p99 ms",
        "requests",
        "pg us",
        "app us",
        "ratio rps",
        "ratio p99",
        "mem MB"
    );
    let mut first: BTreeMap<(String, String), (f64, f64)> = BTreeMap::new();
    for &n in &sizes {
        let targets = &all[..n.min(all.len())];
        for config in &configs {
            for pattern in &patterns {
                let script = script_dir.path().join(format!("{pattern}-{n}.lua"));
                if !script.exists() {
                    std::fs::write(&script, wrk_script(targets, pattern == "zipf")).unwrap();
                }
                let (base, pools, stop) = start_server(&url, config).await;
                let warm = wrk(&base, &script, warmup).await;
                let run = wrk(&base, &script, seconds).await;
                let (backends, pss, private) = backend_memory(&pools.admin).await;
                let key = (config.name.clone(), pattern.clone());
                let (rps0, p990) = *first.entry(key).or_insert((run.rps, run.p99_ms));
                println!(
                    "{:<15} {:<8} {:>6} {:>9.0} {:>8.2} {:>8.2} {:>9} {:>8.0} {:>10.0} {:>9.2}x {:>11.2}x {:>6.0}/{:<5.0}",
                    config.name,
                    pattern,
                    n,
                    run.rps,
                    run.p50_ms,
                    run.p99_ms,
                    run.requests,
                    run.pg_us,
                    run.app_us,
                    run.rps / rps0,
                    run.p99_ms / p990,
                    pss,
                    private,
                );
                eprintln!(
                    "  (warm-up {:.0} req/s; {backends} backends; memory = Pss/private of them)",
                    warm.rps
                );
                if n == *sizes.last().unwrap()
                    && pattern == "uniform"
                    && config.name == configs[0].name
                {
                    admin_figures(&base, &pools.admin).await;
                }
                drop(stop);
                pools.tenants.close().await;
                pools.control.close().await;
                pools.admin.close().await;
            }
        }
    }
    setup.close().await;
    if let Some(pg) = local.filter(LocalPostgres::started_here) {
        // The cluster stays on disk for the next run.
        tokio::task::spawn_blocking(move || pg.stop())
            .await
            .unwrap()
            .unwrap();
    }
}

/// Times the admin paths at the current tenant count.
async fn admin_figures(base: &str, admin: &PgPool) {
    let (_, token) = provision::issue_superuser_token(admin, "scale@bench.test", None, None)
        .await
        .unwrap();
    let client = reqwest::Client::new();
    let mut cursor: Option<String> = None;
    let (mut pages, mut orgs) = (0, 0);
    let mut page_times = vec![];
    let started = Instant::now();
    loop {
        let url = match &cursor {
            Some(c) => format!("{base}/v1/admin/orgs?limit=1000&cursor={c}"),
            None => format!("{base}/v1/admin/orgs?limit=1000"),
        };
        let t = Instant::now();
        let page: serde_json::Value = client
            .get(url)
            .bearer_auth(&token.token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        page_times.push(t.elapsed());
        pages += 1;
        orgs += page["items"].as_array().unwrap().len();
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let walk = started.elapsed();
    let t = Instant::now();
    let stats: serde_json::Value = client
        .get(format!("{base}/v1/admin/stats"))
        .bearer_auth(&token.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let stats_time = t.elapsed();
    let t = Instant::now();
    let report = tenantry::tenants::fleet::doctor(admin, false)
        .await
        .unwrap();
    let doctor_time = t.elapsed();
    let page = Stats::of(page_times);
    println!(
        "admin at {orgs} orgs: GET /v1/admin/orgs walk {pages} pages of 1000 in {:.0} ms (median page {:.1} ms); \
         GET /v1/admin/stats {} orgs in {:.0} ms; doctor {:.2} s ({} findings)",
        ms(walk),
        ms(page.median),
        stats.as_array().map_or(0, Vec::len),
        ms(stats_time),
        doctor_time.as_secs_f64(),
        report.findings.len()
    );
}
