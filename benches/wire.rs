//! The tenant transaction on the wire: what tenantry's read path costs
//! (tokio-postgres since issue 19, which pipelines what is polled
//! together), against the same messages pipelined by hand and a shared
//! table filtered by organization id with either driver. The measure that
//! chose the tenant path's driver (issue 19); until then tenantry sent the
//! context, the statement and the end of the transaction one after another
//! through sqlx (three round trips). In one run, on one
//! database of N orgs, each side with its own pool of P connections, C
//! tasks reading one row by id, round robin over the orgs, phases
//! alternating:
//!
//! - `routed (tenantry)`: tenantry's read path as it is (`TenantRouter::read`,
//!   its tenant pool and affinity, the per-tenant limit): `BEGIN READ ONLY;
//!   SET LOCAL ROLE ..; SET LOCAL search_path ..; SET LOCAL` timeouts, the
//!   statement and a ROLLBACK, sent in one write;
//! - `routed, pipelined (tokio-postgres)`: the same three messages, the same
//!   per-tenant statement texts, sent together by hand on a plain
//!   deadpool-postgres pool (fast recycling, no round trip on release): what
//!   tenantry's own work around them costs;
//! - `shared table (sqlx)` and `shared table (tokio-postgres)`: one
//!   statement, `WHERE org_id = $1 AND id = $2`, no transaction: the floor.
//!
//! With `--delay-us D` every connection of every side goes through a proxy
//! that holds each chunk D microseconds each way, as if PostgreSQL ran on
//! another host; the proxy counts the client's turns (writes after the
//! server has answered): round trips per read, releases included.
//! PostgreSQL's CPU per read is printed too.
//!
//! `--sides 0,2` runs only those sides (numbered as printed); `--sub-pools`
//! and `--spill-margin` set the router's tenant pool (tenantry's defaults
//! otherwise).
//!
//!     cargo bench --bench wire -- --tenants 100 --concurrency 32 --pool 16 --seconds 5 --rounds 3 --delay-us 0
//!     cargo bench --bench wire -- --delay-us 250

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::wire_proxy::{upstream_of, WireProxy};
use common::{arg, bench_pool, cpu_ticks, ms, Stats};
use futures_util::future::{try_join, try_join3};
use tenantry::api::resources::TestCase;
use tenantry::base::ident::Slug;
use tenantry::pg::pools::{PoolConfig, TenantPool};
use tenantry::serving::router::{RouterConfig, Tenant, TenantRouter};
use uuid::Uuid;

const GET: &str = "SELECT id, prompt, expected_outcome, behavior_id, status_id, created_by, updated_by, created_at, updated_at FROM tests WHERE id = $1";
const GET_SHARED: &str = "SELECT id, prompt, expected_outcome, behavior_id, status_id, created_by, updated_by, created_at, updated_at FROM bench_shared.tests WHERE org_id = $1 AND id = $2";

struct Org {
    tenant: Arc<Tenant>,
    test_id: Uuid,
    /// The statement as tenantry sends it per tenant (schema tag).
    get_tagged: String,
    /// tenantry's BEGIN message without the timeouts, and without the role.
    begin_no_timeouts: String,
    begin_no_role: String,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    RoutedTenantry,
    RoutedPipelined,
    SharedSqlx,
    SharedTokioPostgres,
    PipelinedNoTimeouts,
    PipelinedNoRole,
}

impl Side {
    const ALL: [Side; 6] = [
        Side::RoutedTenantry,
        Side::RoutedPipelined,
        Side::SharedSqlx,
        Side::SharedTokioPostgres,
        Side::PipelinedNoTimeouts,
        Side::PipelinedNoRole,
    ];

    fn name(self) -> &'static str {
        match self {
            Side::RoutedTenantry => "routed (tenantry)",
            Side::RoutedPipelined => "routed, pipelined (tokio-postgres)",
            Side::SharedSqlx => "shared table (sqlx)",
            Side::SharedTokioPostgres => "shared table (tokio-postgres)",
            Side::PipelinedNoTimeouts => "pipelined, timeouts not set",
            Side::PipelinedNoRole => "pipelined, role not switched",
        }
    }
}

struct Sides {
    router: TenantRouter,
    sqlx_pool: sqlx::PgPool,
    pipelined: deadpool_postgres::Pool,
    shared_pipelined: deadpool_postgres::Pool,
    orgs: Vec<Org>,
}

fn row_of(row: &tokio_postgres::Row) -> TestCase {
    TestCase {
        id: row.get(0),
        prompt: row.get(1),
        expected_outcome: row.get(2),
        behavior_id: row.get(3),
        status_id: row.get(4),
        created_by: row.get(5),
        updated_by: row.get(6),
        created_at: row.get(7),
        updated_at: row.get(8),
    }
}

impl Sides {
    async fn read(&self, side: Side, org: &Org) -> TestCase {
        let id = org.test_id;
        let found = match side {
            Side::RoutedTenantry => self
                .router
                .read(&org.tenant, async move |tx| {
                    Ok(tx
                        .query_as::<TestCase>(GET)
                        .bind(id)
                        .fetch_optional()
                        .await?)
                })
                .await
                .unwrap(),
            Side::RoutedPipelined | Side::PipelinedNoTimeouts | Side::PipelinedNoRole => {
                use futures_util::FutureExt;
                let client = self.pipelined.get().await.unwrap();
                // BEGIN goes first (polled once, it is sent); a statement not
                // yet prepared on this connection is then parsed inside the
                // tenant's context, where its names resolve: one more round
                // trip, once per connection and tenant. tokio-postgres hands
                // each request's answers over a bounded channel, so requests
                // sent together must be awaited together: a BEGIN left
                // unpolled while the Parse is awaited stalls the connection.
                let begin = match side {
                    Side::PipelinedNoTimeouts => &org.begin_no_timeouts,
                    Side::PipelinedNoRole => &org.begin_no_role,
                    _ => org.tenant.read_begin(),
                };
                let mut begin = Box::pin(client.batch_execute(begin));
                assert!(begin.as_mut().now_or_never().is_none());
                let mut prepared = Box::pin(client.prepare_cached(&org.get_tagged));
                let row = match prepared.as_mut().now_or_never() {
                    Some(get) => {
                        let get = get.unwrap();
                        let (_, row, _) = try_join3(
                            begin,
                            client.query_opt(&get, &[&id]),
                            client.batch_execute("ROLLBACK"),
                        )
                        .await
                        .unwrap();
                        row
                    }
                    None => {
                        let (_, get) = try_join(begin, prepared).await.unwrap();
                        let (row, _) = try_join(
                            client.query_opt(&get, &[&id]),
                            client.batch_execute("ROLLBACK"),
                        )
                        .await
                        .unwrap();
                        row
                    }
                };
                row.as_ref().map(row_of)
            }
            Side::SharedSqlx => sqlx::query_as::<_, TestCase>(GET_SHARED)
                .bind(org.tenant.id)
                .bind(id)
                .fetch_optional(&self.sqlx_pool)
                .await
                .unwrap(),
            Side::SharedTokioPostgres => {
                let client = self.shared_pipelined.get().await.unwrap();
                let get = client.prepare_cached(GET_SHARED).await.unwrap();
                let row = client
                    .query_opt(&get, &[&org.tenant.id, &id])
                    .await
                    .unwrap();
                row.as_ref().map(row_of)
            }
        };
        found.unwrap_or_else(|| panic!("{}: no test {id}", side.name()))
    }
}

/// C tasks reading for `seconds`, round robin over the orgs.
async fn run(sides: &Arc<Sides>, side: Side, concurrency: usize, seconds: f64) -> Vec<Duration> {
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..concurrency {
        let sides = sides.clone();
        tasks.spawn(async move {
            let mut samples = vec![];
            let mut i = task;
            while Instant::now() < until {
                let org = &sides.orgs[i % sides.orgs.len()];
                let t = Instant::now();
                let row = sides.read(side, org).await;
                samples.push(t.elapsed());
                assert_eq!(row.id, org.test_id);
                i += concurrency;
            }
            samples
        });
    }
    let mut all = vec![];
    while let Some(s) = tasks.join_next().await {
        all.extend(s.unwrap());
    }
    all
}

fn deadpool(url: &str, size: usize) -> deadpool_postgres::Pool {
    let config: tokio_postgres::Config = url.parse().expect("URL for tokio-postgres");
    let manager = deadpool_postgres::Manager::from_config(
        config,
        tokio_postgres::NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    deadpool_postgres::Pool::builder(manager)
        .max_size(size)
        .build()
        .unwrap()
}

#[tokio::main]
async fn main() {
    let tenants: usize = arg("--tenants", 100);
    let concurrency: usize = arg("--concurrency", 32);
    let pool_size: u32 = arg("--pool", 16);
    let seconds: f64 = arg("--seconds", 5.0);
    let rounds: usize = arg("--rounds", 3);
    let delay_us: u64 = arg("--delay-us", 0);
    // e.g. `--sides 0,2`: only these (numbered as in the table); all by default
    let only: String = arg("--sides", "0,1,2,3".to_owned());
    // 4 and 5 (the context without its timeouts, without its role) only
    // when asked for: what each part of the context costs
    let only: Vec<usize> = only
        .split(',')
        .map(|k| k.parse().expect("--sides"))
        .collect();

    let (setup_pool, url) = bench_pool(4).await;
    tenantry::tenants::migrate_database(&setup_pool)
        .await
        .unwrap();
    let template = tenantry::tenants::template::Template::embedded();
    let mut made = vec![];
    for i in 0..tenants {
        let t = common::bench_tenant(&setup_pool, &template, i).await;
        if i == 0 {
            sqlx::raw_sql(&format!(
                "CREATE SCHEMA bench_shared; \
                 CREATE TABLE bench_shared.tests (org_id uuid NOT NULL, LIKE {}.tests); \
                 ALTER TABLE bench_shared.tests ADD PRIMARY KEY (org_id, id);",
                t.schema
            ))
            .execute(&setup_pool)
            .await
            .unwrap();
        }
        sqlx::query(&format!(
            "INSERT INTO bench_shared.tests SELECT o.id, t.* FROM {}.tests t, tenantry.organizations o WHERE o.slug = $1",
            t.schema
        ))
        .bind(&t.slug)
        .execute(&setup_pool)
        .await
        .unwrap();
        made.push(t);
    }
    sqlx::raw_sql("ANALYZE").execute(&setup_pool).await.unwrap();
    setup_pool.close().await;

    let proxy = (delay_us > 0)
        .then(|| WireProxy::start(upstream_of(&url), Duration::from_micros(delay_us)));
    // every side connects through the proxy when there is one
    let wire_url = proxy.as_ref().map_or(url.clone(), |p| p.url(&url));
    let pool_config = PoolConfig {
        max_connections: pool_size,
        sub_pools: arg("--sub-pools", PoolConfig::default().sub_pools),
        spill_margin: arg("--spill-margin", PoolConfig::default().spill_margin),
        ..PoolConfig::default()
    };
    let control = tenantry::pg::pools::connect(
        &wire_url,
        &tenantry::server::small_pool_config(&pool_config),
    )
    .await
    .unwrap();
    let tenant_pool = TenantPool::connect_lazy(&wire_url, &pool_config).unwrap();
    let router = TenantRouter::new(control, tenant_pool, &RouterConfig::default());
    let mut orgs = vec![];
    for t in &made {
        let tenant = router
            .resolve(&Slug::parse(&t.slug).unwrap())
            .await
            .unwrap()
            .unwrap();
        let begin = tenant.read_begin();
        let (no_timeouts, _) = begin
            .split_once("; SET LOCAL statement_timeout")
            .expect("timeouts in the BEGIN message");
        let role = format!(" SET LOCAL ROLE {};", tenant.role.quoted());
        assert!(begin.contains(&role), "{begin}");
        orgs.push(Org {
            get_tagged: format!("{GET} /* {} */", tenant.schema),
            begin_no_timeouts: no_timeouts.to_owned(),
            begin_no_role: begin.replace(&role, ""),
            tenant,
            test_id: t.test_id,
        });
    }
    let sides = Arc::new(Sides {
        router,
        sqlx_pool: tenantry::pg::pools::connect(&wire_url, &pool_config)
            .await
            .unwrap(),
        pipelined: deadpool(&wire_url, pool_size as usize),
        shared_pipelined: deadpool(&wire_url, pool_size as usize),
        orgs,
    });
    println!(
        "{tenants} orgs, {concurrency} tasks, {pool_size} connections a side, {seconds} s a phase, {rounds} rounds, delay {delay_us} us each way"
    );
    for k in &only {
        run(&sides, Side::ALL[*k], concurrency, 1.0).await; // warm: connections, statements
    }
    let mut samples: Vec<Vec<Duration>> = vec![vec![]; Side::ALL.len()];
    let mut seconds_run = vec![0.0; Side::ALL.len()];
    let mut pg_ticks = vec![0u64; Side::ALL.len()];
    let mut turns = vec![0u64; Side::ALL.len()];
    for round in 0..rounds {
        // alternate the order so that no side always runs first
        let order: Vec<usize> = if round % 2 == 0 {
            (0..Side::ALL.len()).collect()
        } else {
            (0..Side::ALL.len()).rev().collect()
        };
        for k in order.into_iter().filter(|k| only.contains(k)) {
            let side = Side::ALL[k];
            let turns_before = proxy.as_ref().map_or(0, |p| p.turns());
            let cpu = cpu_ticks();
            let t = Instant::now();
            let s = run(&sides, side, concurrency, seconds).await;
            seconds_run[k] += t.elapsed().as_secs_f64();
            pg_ticks[k] += cpu_ticks().since(&cpu).0;
            turns[k] += proxy.as_ref().map_or(0, |p| p.turns()) - turns_before;
            println!(
                "  round {} {:<36} {:>8.0} reads/s",
                round + 1,
                side.name(),
                s.len() as f64 / t.elapsed().as_secs_f64()
            );
            samples[k].extend(s);
        }
    }
    println!();
    println!(
        "{:<36} {:>9} {:>8} {:>8} {:>12} {:>13}",
        "side", "reads/s", "p50 ms", "p99 ms", "PG ms/1000", "round trips"
    );
    let mut figures = vec![];
    for (k, side) in Side::ALL.iter().enumerate() {
        let n = samples[k].len();
        if n == 0 {
            figures.push((0.0, Duration::ZERO, Duration::ZERO));
            continue;
        }
        let stats = Stats::of(std::mem::take(&mut samples[k]));
        let rate = n as f64 / seconds_run[k];
        let pg_ms_per_1000 = pg_ticks[k] as f64 * 10.0 / n as f64 * 1000.0;
        let trips = if proxy.is_some() {
            format!("{:.2}", turns[k] as f64 / n as f64)
        } else {
            "-".to_owned()
        };
        println!(
            "{:<36} {:>9.0} {:>8.2} {:>8.2} {:>12.0} {:>13}",
            side.name(),
            rate,
            ms(stats.median),
            ms(stats.p99),
            pg_ms_per_1000,
            trips
        );
        figures.push((rate, stats.median, stats.p99));
    }
    let ratio = |a: usize, b: usize| {
        let (ra, pa, qa) = figures[a];
        let (rb, pb, qb) = figures[b];
        format!(
            "{:.2}x reads/s, p50 {:.2}x, p99 {:.2}x",
            ra / rb,
            pa.as_secs_f64() / pb.as_secs_f64(),
            qa.as_secs_f64() / qb.as_secs_f64()
        )
    };
    println!();
    for (label, a, b) in [
        ("tenantry / pipelined by hand", 0, 1),
        ("tenantry / shared (sqlx)", 0, 2),
        ("tenantry / shared (tokio-postgres)", 0, 3),
        ("pipelined / shared (tokio-postgres)", 1, 3),
        ("pipelined / shared (sqlx)", 1, 2),
        ("timeouts not set / pipelined", 4, 1),
        ("role not switched / pipelined", 5, 1),
    ] {
        if only.contains(&a) && only.contains(&b) {
            println!("{label:<37} {}", ratio(a, b));
        }
    }
}
