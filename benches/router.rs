//! Router benchmark. In one run, on one database and one pool:
//!
//! - HTTP: `GET /v1/orgs/{slug}/tests/{id}` spread over N tenants through the
//!   router (token auth, cached resolve, `BEGIN; SET LOCAL search_path`,
//!   query, COMMIT) against (a) a baseline route that serves the same query
//!   from one fixed schema without routing and (b) a "qualified" route that
//!   spreads over the same N schemas without the router (schema named in the
//!   SQL); same auth, plain transactions, same concurrency, phases
//!   alternating. CPU per request of PostgreSQL and of this process is
//!   printed too: both share the machine's cores;
//! - HTTP, like with like: the same GET served from one table shared by all
//!   orgs and filtered by organization id (`WHERE org_id = $1 AND id = $2`,
//!   one statement, no transaction: the model that passes the org
//!   explicitly), as an app's own route under tenantry's whole request
//!   handling (`api::app_with`: request id, log, metrics, timeout, token
//!   auth, org resolve), against the routed route;
//! - library: `TenantRouter::resolve` on a cache hit, and `begin` + COMMIT
//!   against a plain pool transaction.
//!
//!     cargo bench --bench router -- --tenants 100 --concurrency 32 --seconds 5 --rounds 3

mod common;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::routing::get;
use axum::Extension;
use axum::{Json, Router};
use common::{arg, bench_pool, cpu_ticks, load, ms, Stats, Target};
use tenantry::api::error::ApiError;
use tenantry::api::extract::{ApiPath, Auth, OrgScope};
use tenantry::api::resources::TestCase;
use tenantry::base::ident::{SchemaName, Slug};
use tenantry::pg::pools::PoolConfig;
use tenantry::server::{self, ServerConfig};
use tenantry::tenants::template::Template;
use uuid::Uuid;

const BASELINE_SCHEMA: &str = "bench_fixed";

/// The baseline: the same query, one fixed schema, no routing.
async fn baseline_get(
    State(app): State<tenantry::api::AppState>,
    _auth: Auth,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<TestCase>, ApiError> {
    let mut tx = app.tenancy.admin_pool().begin().await?;
    let row: Option<TestCase> = sqlx::query_as(
        "SELECT id, prompt, expected_outcome, behavior_id, status_id, created_by, updated_by, created_at, updated_at \
         FROM bench_fixed.tests WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    row.map(Json)
        .ok_or_else(|| ApiError::not_found("no such test"))
}

/// Spreads over the tenants' schemas like the router, but without it: the
/// schema is named in the SQL, in a plain pool transaction.
async fn qualified_get(
    State(app): State<tenantry::api::AppState>,
    _auth: Auth,
    ApiPath((schema, id)): ApiPath<(String, Uuid)>,
) -> Result<Json<TestCase>, ApiError> {
    let schema = SchemaName::parse(&schema).map_err(|_| ApiError::not_found("no such schema"))?;
    let mut tx = app.tenancy.admin_pool().begin().await?;
    let row: Option<TestCase> = sqlx::query_as(&format!(
        "SELECT id, prompt, expected_outcome, behavior_id, status_id, created_by, updated_by, created_at, updated_at \
         FROM {}.tests WHERE id = $1",
        schema.quoted()
    ))
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    row.map(Json)
        .ok_or_else(|| ApiError::not_found("no such test"))
}

/// The shared-table model: the org comes from the same auth and resolve as
/// the routed route's, the row from one table of every org's tests.
async fn shared_table_get(
    org: OrgScope,
    Extension(pool): Extension<sqlx::PgPool>,
    ApiPath((_slug, id)): ApiPath<(String, Uuid)>,
) -> Result<Json<TestCase>, ApiError> {
    let row: Option<TestCase> = sqlx::query_as(
        "SELECT id, prompt, expected_outcome, behavior_id, status_id, created_by, updated_by, created_at, updated_at \
         FROM bench_shared.tests WHERE org_id = $1 AND id = $2",
    )
    .bind(org.tenant.id)
    .bind(id)
    .fetch_optional(&pool)
    .await?;
    row.map(Json)
        .ok_or_else(|| ApiError::not_found("no such test"))
}

#[tokio::main]
async fn main() {
    let tenants: usize = arg("--tenants", 100);
    let concurrency: usize = arg("--concurrency", 32);
    let seconds: f64 = arg("--seconds", 5.0);
    let rounds: usize = arg("--rounds", 3);
    let pool_size: u32 = arg("--pool", 16);

    let (setup_pool, url) = bench_pool(4).await;
    tenantry::tenants::migrate_database(&setup_pool)
        .await
        .unwrap();
    let template = Template::embedded();
    let mut targets = Vec::new();
    let mut baseline_targets = Vec::new();
    let mut qualified_targets = Vec::new();
    let mut shared_targets = Vec::new();
    let mut slugs = Vec::new();
    for i in 0..tenants {
        let common::BenchTenant {
            slug,
            schema,
            token,
            test_id: id,
        } = common::bench_tenant(&setup_pool, &template, i).await;
        targets.push(Target {
            path: format!("/v1/orgs/{slug}/tests/{id}"),
            token: token.clone(),
        });
        qualified_targets.push(Target {
            path: format!("/qualified/{schema}/tests/{id}"),
            token: token.clone(),
        });
        shared_targets.push(Target {
            path: format!("/v1/shared-table/orgs/{slug}/tests/{id}"),
            token: token.clone(),
        });
        slugs.push(Slug::parse(&slug).unwrap());
        if i == 0 {
            // one table of every org's tests, keyed by org
            sqlx::raw_sql(&format!(
                "CREATE SCHEMA bench_shared; \
                 CREATE TABLE bench_shared.tests (org_id uuid NOT NULL, LIKE {schema}.tests); \
                 ALTER TABLE bench_shared.tests ADD PRIMARY KEY (org_id, id);"
            ))
            .execute(&setup_pool)
            .await
            .unwrap();
        }
        sqlx::query(&format!(
            "INSERT INTO bench_shared.tests SELECT o.id, t.* FROM {schema}.tests t, tenantry.organizations o WHERE o.slug = $1"
        ))
        .bind(&slug)
        .execute(&setup_pool)
        .await
        .unwrap();
        if i == 0 {
            // the baseline schema: a copy of one tenant's rows
            sqlx::raw_sql(&format!(
                "CREATE SCHEMA {BASELINE_SCHEMA}; CREATE TABLE {BASELINE_SCHEMA}.tests (LIKE {schema}.tests INCLUDING ALL); \
                 INSERT INTO {BASELINE_SCHEMA}.tests SELECT * FROM {schema}.tests;"
            ))
            .execute(&setup_pool)
            .await
            .unwrap();
        }
    }
    // baseline targets: the same ids, the same tokens, one schema
    let fixed_ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM bench_fixed.tests ORDER BY id")
        .fetch_all(&setup_pool)
        .await
        .unwrap();
    for (i, t) in targets.iter().enumerate() {
        baseline_targets.push(Target {
            path: format!("/baseline/tests/{}", fixed_ids[i % fixed_ids.len()]),
            token: t.token.clone(),
        });
    }
    setup_pool.close().await;

    let pool = tenantry::pg::pools::connect(
        &url,
        &PoolConfig {
            max_connections: pool_size,
            ..PoolConfig::default()
        },
    )
    .await
    .unwrap();
    // No affinity, and as many connections for the router's tenant
    // transactions (tokio-postgres) as for the baselines (sqlx); sides
    // alternate, so each has its pool to itself.
    let single = || {
        tenantry::pg::pools::TenantPool::single(
            &url,
            &PoolConfig {
                max_connections: pool_size,
                ..PoolConfig::default()
            },
        )
        .unwrap()
    };
    let pools = server::Pools {
        admin: pool.clone(),
        control: pool.clone(),
        tenants: single(),
    };
    let state = server::state(pools, &ServerConfig::default())
        .await
        .unwrap();
    let shared_table = Router::new()
        .route(
            "/v1/shared-table/orgs/{slug}/tests/{id}",
            get(shared_table_get),
        )
        .layer(Extension(pool.clone()));
    let app = Router::new()
        .route("/baseline/tests/{id}", get(baseline_get))
        .route("/qualified/{schema}/tests/{id}", get(qualified_get))
        .with_state(state.clone())
        .merge(tenantry::api::app_with(state.clone(), shared_table));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    // The same API on the same pool, with tenant transactions not switching
    // to the tenant's role: what the role costs.
    let no_roles = server::state(
        server::Pools {
            admin: pool.clone(),
            control: pool.clone(),
            tenants: single(),
        },
        &ServerConfig {
            router: tenantry::serving::router::RouterConfig {
                set_role: false,
                ..Default::default()
            },
            ..ServerConfig::default()
        },
    )
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base_no_roles = format!("http://{}", listener.local_addr().unwrap());
    let app_no_roles = tenantry::api::app(no_roles);
    tokio::spawn(async move { axum::serve(listener, app_no_roles).await.unwrap() });

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .unwrap();
    let routed_targets = Arc::new(targets);
    let baseline_targets = Arc::new(baseline_targets);
    let qualified_targets = Arc::new(qualified_targets);
    let shared_targets = Arc::new(shared_targets);
    // warm-up: caches, prepared statements, connections
    load(&client, &base, &shared_targets, concurrency, 1.0).await;
    load(&client, &base, &routed_targets, concurrency, 1.0).await;
    load(&client, &base, &baseline_targets, concurrency, 1.0).await;
    load(&client, &base, &qualified_targets, concurrency, 1.0).await;
    load(&client, &base_no_roles, &routed_targets, concurrency, 1.0).await;

    println!("HTTP GET one test by id: {tenants} tenants, concurrency {concurrency}, pool {pool_size}, {rounds} x {seconds}s per side, alternating");
    println!(
        "{:<10} {:>6} {:>10} {:>9} {:>9} {:>9} {:>10} {:>10}",
        "side", "round", "req/s", "p50 ms", "p99 ms", "requests", "pg us/req", "app us/req"
    );
    let mut sums = [
        (0.0, Vec::new()),
        (0.0, Vec::new()),
        (0.0, Vec::new()),
        (0.0, Vec::new()),
        (0.0, Vec::new()),
    ];
    for round in 0..rounds {
        let sides = [
            ("baseline", &base, &baseline_targets),
            ("qualified", &base, &qualified_targets),
            ("routed", &base, &routed_targets),
            ("no-roles", &base_no_roles, &routed_targets),
            ("shared-tbl", &base, &shared_targets),
        ];
        for (side, (name, base, t)) in sides.into_iter().enumerate() {
            let before = cpu_ticks();
            let (stats, rps) = load(&client, base, t, concurrency, seconds).await;
            let (pg, me) = cpu_ticks().since(&before);
            let per_req = |ticks: u64| ticks as f64 * 10_000.0 / stats.n as f64; // 100 ticks/s -> us
            println!(
                "{name:<10} {round:>6} {rps:>10.0} {:>9.2} {:>9.2} {:>9} {:>10.0} {:>10.0}",
                ms(stats.median),
                ms(stats.p99),
                stats.n,
                per_req(pg),
                per_req(me)
            );
            sums[side].0 += rps;
            sums[side].1.push((stats.median, stats.p99));
        }
    }
    let avg = |side: usize| {
        let (rps, lat) = &sums[side];
        let n = lat.len() as f64;
        (
            rps / n,
            lat.iter().map(|l| ms(l.0)).sum::<f64>() / n,
            lat.iter().map(|l| ms(l.1)).sum::<f64>() / n,
        )
    };
    let (b_rps, b_p50, b_p99) = avg(0);
    let (q_rps, q_p50, q_p99) = avg(1);
    let (r_rps, r_p50, r_p99) = avg(2);
    let (n_rps, n_p50, n_p99) = avg(3);
    println!("mean baseline:  {b_rps:.0} req/s, p50 {b_p50:.2} ms, p99 {b_p99:.2} ms");
    println!("mean qualified: {q_rps:.0} req/s, p50 {q_p50:.2} ms, p99 {q_p99:.2} ms");
    println!("mean routed:    {r_rps:.0} req/s, p50 {r_p50:.2} ms, p99 {r_p99:.2} ms");
    let (s_rps, s_p50, s_p99) = avg(4);
    println!("mean no-roles:  {n_rps:.0} req/s, p50 {n_p50:.2} ms, p99 {n_p99:.2} ms");
    println!("mean shared-table: {s_rps:.0} req/s, p50 {s_p50:.2} ms, p99 {s_p99:.2} ms");
    println!(
        "ratio routed/shared-table (one table filtered by org id, same request handling; target >= 0.95x req/s, p99 <= 1.1x): throughput {:.3}x, p50 {:.3}x, p99 {:.3}x",
        r_rps / s_rps,
        r_p50 / s_p50,
        r_p99 / s_p99
    );
    println!(
        "ratio routed/no-roles (the tenant role's cost): throughput {:.3}x, p50 {:.3}x, p99 {:.3}x",
        r_rps / n_rps,
        r_p50 / n_p50,
        r_p99 / n_p99
    );
    println!(
        "ratio routed/baseline (one fixed schema): throughput {:.3}x, p50 {:.3}x, p99 {:.3}x",
        r_rps / b_rps,
        r_p50 / b_p50,
        r_p99 / b_p99
    );
    println!(
        "ratio routed/qualified (same {tenants} schemas, no router): throughput {:.3}x, p50 {:.3}x, p99 {:.3}x",
        r_rps / q_rps,
        r_p50 / q_p50,
        r_p99 / q_p99
    );

    // library level
    let router = state.tenancy.router().clone();
    for s in &slugs {
        router.resolve(s).await.unwrap();
    }
    let n = 200_000;
    let t = Instant::now();
    for i in 0..n {
        std::hint::black_box(router.resolve(&slugs[i % slugs.len()]).await.unwrap());
    }
    let resolve_ns = t.elapsed().as_nanos() as f64 / n as f64;
    let tenant = router.resolve(&slugs[0]).await.unwrap().unwrap();
    let m = 5_000;
    let mut routed_begin = Vec::with_capacity(m);
    let mut plain_begin = Vec::with_capacity(m);
    for _ in 0..m {
        let t = Instant::now();
        let tx = router.begin(&tenant).await.unwrap();
        tx.commit().await.unwrap();
        routed_begin.push(t.elapsed());
        let t = Instant::now();
        let tx = pool.begin().await.unwrap();
        tx.commit().await.unwrap();
        plain_begin.push(t.elapsed());
    }
    // the same BEGIN message without the router's cancellation guard
    let mut unspawned = Vec::with_capacity(m);
    let begin_sql = format!("BEGIN; SET LOCAL search_path TO {}", tenant.schema.quoted());
    for _ in 0..m {
        let t = Instant::now();
        let tx = pool.begin_with(begin_sql.clone()).await.unwrap();
        tx.commit().await.unwrap();
        unspawned.push(t.elapsed());
    }
    let ub = Stats::of(unspawned);
    println!(
        "library: pool.begin_with(BEGIN; SET LOCAL ..)+commit, without the router's cancellation guard: median {:.1} us",
        ms(ub.median) * 1000.0
    );
    let rb = Stats::of(routed_begin);
    let pb = Stats::of(plain_begin);
    // One query through each path, sequentially: where the per-request cost goes.
    let ids: Vec<Uuid> = {
        let mut v = Vec::new();
        for t in routed_targets.iter() {
            v.push(t.path.rsplit('/').next().unwrap().parse().unwrap());
        }
        v
    };
    let tenants_arc: Vec<_> = {
        let mut v = Vec::new();
        for s in &slugs {
            v.push(router.resolve(s).await.unwrap().unwrap());
        }
        v
    };
    let get_sql = tenantry::api::resources::GET_TEST;
    let mut one_tenant = Vec::with_capacity(m);
    let mut many_tenants = Vec::with_capacity(m);
    let mut fixed = Vec::with_capacity(m);
    for i in 0..m {
        let t = Instant::now();
        let mut tx = router.begin(&tenants_arc[0]).await.unwrap();
        let _: Option<TestCase> = tx
            .query_as(get_sql)
            .bind(ids[0])
            .fetch_optional()
            .await
            .unwrap();
        tx.commit().await.unwrap();
        one_tenant.push(t.elapsed());

        let k = i % tenants_arc.len();
        let t = Instant::now();
        let mut tx = router.begin(&tenants_arc[k]).await.unwrap();
        let _: Option<TestCase> = tx
            .query_as(get_sql)
            .bind(ids[k])
            .fetch_optional()
            .await
            .unwrap();
        tx.commit().await.unwrap();
        many_tenants.push(t.elapsed());

        let t = Instant::now();
        let mut tx = pool.begin().await.unwrap();
        let _: Option<TestCase> = sqlx::query_as(
            "SELECT id, prompt, expected_outcome, behavior_id, status_id, created_by, updated_by, created_at, updated_at \
             FROM bench_fixed.tests WHERE id = $1",
        )
        .bind(fixed_ids[0])
        .fetch_optional(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
        fixed.push(t.elapsed());
    }
    let (o, mt, f) = (
        Stats::of(one_tenant),
        Stats::of(many_tenants),
        Stats::of(fixed),
    );
    println!(
        "library: begin+GET+commit median: fixed schema {:.1} us, routed one tenant {:.1} us ({:.2}x), routed rotating {} tenants {:.1} us ({:.2}x)",
        ms(f.median) * 1000.0,
        ms(o.median) * 1000.0,
        o.median.as_secs_f64() / f.median.as_secs_f64(),
        tenants_arc.len(),
        ms(mt.median) * 1000.0,
        mt.median.as_secs_f64() / f.median.as_secs_f64()
    );
    println!("library: resolve (cache hit) {resolve_ns:.0} ns/op over {n} calls");
    // the per-tenant limit's bookkeeping on every begin, uncontended
    let limiter = tenantry::serving::fairness::TenantLimiter::new(
        tenantry::serving::fairness::FairnessConfig::for_pool(16),
    );
    let ids: Vec<Uuid> = (0..100).map(|_| Uuid::new_v4()).collect();
    let started = Instant::now();
    let rounds = 200_000;
    for i in 0..rounds {
        let slot = limiter.admit(&ids[i % ids.len()]).await.unwrap();
        drop(slot);
    }
    println!(
        "library: per-tenant limit admit+release {:.0} ns/op over {rounds} calls",
        started.elapsed().as_nanos() as f64 / rounds as f64
    );
    println!(
        "library: router.begin+commit with no statement (sends nothing: the context goes with a first statement) median {:.1} us (p99 {:.1} us) vs pool.begin+commit median {:.1} us (p99 {:.1} us): {:.2}x",
        ms(rb.median) * 1000.0,
        ms(rb.p99) * 1000.0,
        ms(pb.median) * 1000.0,
        ms(pb.p99) * 1000.0,
        rb.median.as_secs_f64() / pb.median.as_secs_f64()
    );
}
