//! Test harness: a real PostgreSQL for every test binary. Uses DATABASE_URL
//! when set; otherwise starts one throwaway cluster from the system's
//! binaries (fsync off), shared by the tests of this binary and removed by a
//! watchdog once the binary exits. Each test gets its own fresh database, so
//! tests run in parallel without seeing each other.
//!
//! With `TENANTRY_TEST_POOLER=pgbouncer`, servers' serving connections go
//! through a real PgBouncer in transaction pooling mode (`--pooler
//! transaction`), LISTEN through a direct connection; admin work stays
//! direct, as the README tells operators.
//!
//! With `TENANTRY_TEST_ENGINE=citus`, the server is the coordinator of a
//! throwaway Citus cluster (a coordinator and two workers) and each test
//! database is a Citus database with both workers added.
#![allow(dead_code)]

pub mod citus;
pub mod pgbouncer;
/// The benchmarks' proxy in front of PostgreSQL: counts round trips.
#[path = "../../benches/common/wire_proxy.rs"]
pub mod wire_proxy;

use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};
use tenantry::pg::embedded::{Durability, LocalPostgres};

static SERVER: OnceLock<String> = OnceLock::new();

/// Whether this run is on Citus (`TENANTRY_TEST_ENGINE`).
pub fn citus_run() -> bool {
    match std::env::var("TENANTRY_TEST_ENGINE").as_deref() {
        Err(_) | Ok("") | Ok("postgres") => false,
        Ok("citus") => true,
        Ok(other) => panic!("TENANTRY_TEST_ENGINE={other:?}: expected citus or postgres"),
    }
}

/// The Citus cluster of a Citus run.
pub fn citus_cluster() -> &'static citus::CitusCluster {
    static CLUSTER: OnceLock<citus::CitusCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        assert!(
            citus::installed(),
            "TENANTRY_TEST_ENGINE=citus, but the Citus extension is not installed"
        );
        citus::CitusCluster::start()
    })
}

/// Makes `url` (a server's maintenance database) the server of this test
/// binary, before anything else asks for one: for tests that bring a
/// cluster of their own (e.g. with replicas). False if one was chosen
/// already.
pub fn use_server(url: String) -> bool {
    SERVER.set(url).is_ok()
}

/// URL of the server's maintenance database.
fn server() -> &'static str {
    SERVER.get_or_init(|| {
        if citus_run() {
            return citus_cluster().coordinator_url();
        }
        if let Ok(url) = std::env::var("DATABASE_URL") {
            PgConnectOptions::from_str(&url).expect("DATABASE_URL must be a valid URL");
            return url;
        }
        let dir = tempfile::Builder::new()
            .prefix("tenantry-test-pg-")
            .tempdir()
            .expect("temp dir")
            .keep();
        let pg = LocalPostgres::ensure_running(&dir, Durability::Throwaway)
            .unwrap_or_else(|e| panic!("cannot start a test PostgreSQL: {e}"));
        pg.remove_when_process_exits(std::process::id())
            .expect("watchdog for the test cluster");
        pg.url("postgres")
    })
}

/// Whether this run goes through PgBouncer (`TENANTRY_TEST_POOLER`).
pub fn pooler_run() -> bool {
    match std::env::var("TENANTRY_TEST_POOLER").as_deref() {
        Err(_) | Ok("") | Ok("none") => false,
        Ok("pgbouncer") => true,
        Ok(other) => panic!("TENANTRY_TEST_POOLER={other:?}: expected pgbouncer or none"),
    }
}

/// The PgBouncer of a pooler run.
pub fn bouncer() -> &'static pgbouncer::PgBouncer {
    static BOUNCER: OnceLock<pgbouncer::PgBouncer> = OnceLock::new();
    BOUNCER.get_or_init(|| pgbouncer::PgBouncer::start(server(), pgbouncer::POOL_SIZE))
}

/// The URL and pooler serving connections to `url`'s database use in
/// this run: `url` itself, or the same through PgBouncer.
pub fn serving(url: &str) -> (String, tenantry::pg::pools::Pooler) {
    if pooler_run() {
        (
            bouncer().url_for(url),
            tenantry::pg::pools::Pooler::Transaction,
        )
    } else {
        (url.to_owned(), tenantry::pg::pools::Pooler::None)
    }
}

/// `url` with its database name replaced by `database`.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let authority_start = base.find("://").map(|i| i + 3).unwrap_or(0);
    let host_end = base[authority_start..]
        .find('/')
        .map(|i| authority_start + i)
        .unwrap_or(base.len());
    format!("{}/{database}{query}", &base[..host_end])
}

pub struct TestDb {
    pub pool: PgPool,
    /// URL of this test's database.
    pub url: String,
    pub name: String,
}

impl TestDb {
    /// A new empty database with the registry migrated.
    pub async fn new() -> TestDb {
        let db = TestDb::empty().await;
        tenantry::tenants::migrate_database(&db.pool)
            .await
            .expect("registry migrations");
        db
    }

    /// A new database on the Citus cluster (whatever the run), registry
    /// migrated; `None` (after saying so) when Citus is not installed and
    /// `TENANTRY_REQUIRE_CITUS` is not set.
    pub async fn on_citus() -> Option<TestDb> {
        if !citus::installed() {
            assert!(
                std::env::var("TENANTRY_REQUIRE_CITUS").as_deref() != Ok("1"),
                "TENANTRY_REQUIRE_CITUS=1 but the Citus extension is not installed"
            );
            eprintln!("skipped: the Citus extension is not installed");
            return None;
        }
        let cluster = citus_cluster();
        let name = format!("tenantry_test_{}", uuid::Uuid::new_v4().simple());
        cluster.create_database(&name).await;
        let url = cluster.url(cluster.coordinator, &name);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await
            .expect("connect to test database");
        tenantry::tenants::migrate_database(&pool)
            .await
            .expect("registry migrations");
        Some(TestDb { pool, url, name })
    }

    /// A new empty database, nothing applied.
    pub async fn empty() -> TestDb {
        let name = format!("tenantry_test_{}", uuid::Uuid::new_v4().simple());
        if citus_run() {
            citus_cluster().create_database(&name).await;
        } else {
            let mut admin = PgConnection::connect(server())
                .await
                .expect("connect to test server");
            sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
                .execute(&mut admin)
                .await
                .expect("create test database");
            admin.close().await.ok();
        }
        let url = with_database(server(), &name);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await
            .expect("connect to test database");
        // a run for one PostgreSQL version must not fall back to another
        if let Ok(major) = std::env::var("TENANTRY_TEST_PG_MAJOR") {
            let version: String = sqlx::query_scalar("SHOW server_version_num")
                .fetch_one(&pool)
                .await
                .unwrap();
            assert_eq!(
                version.parse::<u32>().unwrap() / 10000,
                major
                    .parse::<u32>()
                    .expect("TENANTRY_TEST_PG_MAJOR is a number"),
                "TENANTRY_TEST_PG_MAJOR={major} but the test server is PostgreSQL {version}"
            );
        }
        TestDb { pool, url, name }
    }

    pub async fn schema_exists(&self, schema: &str) -> bool {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(schema)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Tables of a schema, sorted.
    pub async fn tables(&self, schema: &str) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = $1 ORDER BY tablename",
        )
        .bind(schema)
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    /// Runs the `tenantry` binary against this database; returns (success,
    /// stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tenantry"))
            .args(args)
            .env("DATABASE_URL", &self.url)
            .env_remove("RUST_LOG")
            .output()
            .expect("run the tenantry binary");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The schema the registry records for org `slug`.
    pub async fn schema_of(&self, slug: &str) -> String {
        sqlx::query_scalar("SELECT schema_name FROM tenantry.organizations WHERE slug = $1")
            .bind(slug)
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("no org {slug}: {e}"))
    }

    /// Creates orgs `<prefix>-00`, `<prefix>-01`, ... with the built-in
    /// template; returns their slugs.
    pub async fn create_orgs(&self, prefix: &str, n: usize) -> Vec<String> {
        let template = tenantry::tenants::template::Template::embedded();
        let mut slugs = vec![];
        for i in 0..n {
            let slug = format!("{prefix}-{i:02}");
            tenantry::tenants::provision::create_org(
                &self.pool,
                &template,
                &tenantry::tenants::provision::NewOrg::parse(&slug, "Test", None).unwrap(),
            )
            .await
            .unwrap();
            slugs.push(slug);
        }
        slugs
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(&self.pool).await.unwrap()
    }
}

/// A running server on port 0 over its own fresh database, with a
/// superuser token.
pub struct TestApp {
    pub addr: std::net::SocketAddr,
    pub db: TestDb,
    pub http: reqwest::Client,
    pub superuser: String,
    pub state: tenantry::api::AppState,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(tenantry::server::ServerConfig::default()).await
}

pub async fn spawn_app_with(config: tenantry::server::ServerConfig) -> TestApp {
    let db = TestDb::new().await;
    spawn_app_on(db, config).await
}

/// Another server process (own caches, own pool) on an existing database.
pub async fn spawn_app_on(db: TestDb, config: tenantry::server::ServerConfig) -> TestApp {
    spawn_app_with_pool(db, &tenantry::pg::pools::PoolConfig::default(), config).await
}

/// A server whose tenant and control connections log in as `role` (created
/// with `password`, a serving role: not a superuser), over a fresh database.
pub async fn spawn_app_serving_as(db: TestDb, role: &str, password: &str) -> TestApp {
    spawn_app_serving_as_with(
        db,
        role,
        password,
        tenantry::server::ServerConfig::default(),
    )
    .await
}

/// [`spawn_app_serving_as`] with `config`.
pub async fn spawn_app_serving_as_with(
    db: TestDb,
    role: &str,
    password: &str,
    config: tenantry::server::ServerConfig,
) -> TestApp {
    let serving_url = with_user(&db.url, role, password);
    let admin = tenantry::pg::pools::connect(
        &db.url,
        &tenantry::server::small_pool_config(&Default::default()),
    )
    .await
    .expect("admin pool");
    let notes = tenantry::server::prepare_serving(&admin, &db.url, &serving_url, Some(password))
        .await
        .expect("serving role");
    assert!(notes.is_empty(), "{notes:?}");
    spawn_app_with_urls(db, admin, &serving_url, config).await
}

/// `url` with its user and password replaced (percent-encoded).
pub fn with_user(url: &str, user: &str, password: &str) -> String {
    let mut parsed = url::Url::parse(url).expect("a database URL");
    parsed.set_username(user).unwrap();
    parsed.set_password(Some(password)).unwrap();
    parsed.to_string()
}

pub async fn spawn_app_with_pool(
    db: TestDb,
    pool_config: &tenantry::pg::pools::PoolConfig,
    config: tenantry::server::ServerConfig,
) -> TestApp {
    let pool =
        tenantry::pg::pools::connect(&db.url, &tenantry::server::small_pool_config(pool_config))
            .await
            .expect("server admin pool");
    let url = db.url.clone();
    spawn_app_with_pools(db, pool, &url, pool_config, config).await
}

async fn spawn_app_with_urls(
    db: TestDb,
    admin: sqlx::PgPool,
    serving_url: &str,
    config: tenantry::server::ServerConfig,
) -> TestApp {
    spawn_app_with_pools(db, admin, serving_url, &Default::default(), config).await
}

async fn spawn_app_with_pools(
    db: TestDb,
    pool: sqlx::PgPool,
    serving_url: &str,
    pool_config: &tenantry::pg::pools::PoolConfig,
    mut config: tenantry::server::ServerConfig,
) -> TestApp {
    let (serving_url, pooler) = {
        let direct = serving_url;
        let (url, pooler) = serving(direct);
        if pooler != tenantry::pg::pools::Pooler::None {
            config.listen_url.get_or_insert_with(|| direct.to_owned());
        }
        (url, pooler)
    };
    let pool_config = &tenantry::pg::pools::PoolConfig {
        pooler,
        ..pool_config.clone()
    };
    let pools = tenantry::server::Pools::connect_lazy(pool, &serving_url, pool_config)
        .expect("server pools");
    serve_app(db, pools, config).await
}

/// A server whose tenant connections go to `tenant_url` (e.g. a proxy in
/// front of the database) while its admin and control connections go
/// straight to the database.
pub async fn spawn_app_with_tenant_url(
    db: TestDb,
    tenant_url: &str,
    pool_config: tenantry::pg::pools::PoolConfig,
) -> TestApp {
    let mut config = tenantry::server::ServerConfig::default();
    if pool_config.pooler != tenantry::pg::pools::Pooler::None {
        config.listen_url = Some(db.url.clone());
    }
    let admin =
        tenantry::pg::pools::connect(&db.url, &tenantry::server::small_pool_config(&pool_config))
            .await
            .expect("server admin pool");
    let control = tenantry::pg::pools::connect_lazy(
        &db.url,
        &tenantry::server::small_pool_config(&pool_config),
    )
    .expect("control pool");
    let tenants = tenantry::pg::pools::TenantPool::connect_lazy(tenant_url, &pool_config)
        .expect("tenant pool");
    let pools = tenantry::server::Pools {
        admin,
        control,
        tenants,
    };
    serve_app(db, pools, config).await
}

/// Serves `pools` on a free port, with a superuser token issued on the
/// admin pool.
async fn serve_app(
    db: TestDb,
    pools: tenantry::server::Pools,
    config: tenantry::server::ServerConfig,
) -> TestApp {
    let (_, token) = tenantry::tenants::provision::issue_superuser_token(
        &pools.admin,
        "root@tenantry.test",
        None,
        None,
    )
    .await
    .expect("superuser");
    let superuser = token.token;
    let state = tenantry::server::state(pools, &config)
        .await
        .expect("server state");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_state = state.clone();
    tokio::spawn(async move {
        tenantry::server::serve(listener, server_state, &config, std::future::pending())
            .await
            .unwrap()
    });
    TestApp {
        addr,
        db,
        http: reqwest::Client::new(),
        superuser,
        state,
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A request with a bearer token.
    pub fn req(&self, method: reqwest::Method, path: &str, token: &str) -> reqwest::RequestBuilder {
        self.http.request(method, self.url(path)).bearer_auth(token)
    }

    /// GET/POST/... with a JSON body (or none); returns status and JSON body
    /// (Null for empty bodies).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut req = self.req(method, path, token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.expect("request");
        let status = res.status().as_u16();
        let text = res.text().await.unwrap();
        let json = if text.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("non-JSON body: {text}"))
        };
        (status, json)
    }

    /// The text of `GET /metrics` on the API's listener.
    pub async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The router's tenant for `slug` (which must exist).
    pub async fn tenant(&self, slug: &str) -> std::sync::Arc<tenantry::serving::router::Tenant> {
        self.state
            .tenancy
            .router()
            .resolve(&tenantry::base::ident::Slug::parse(slug).unwrap())
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("no org {slug}"))
    }

    /// Creates an org through the admin API and a token for one of its users.
    pub async fn org_with_token(&self, slug: &str) -> String {
        let (s, body) = self
            .call(
                reqwest::Method::POST,
                "/v1/admin/orgs",
                &self.superuser,
                Some(serde_json::json!({"slug": slug, "name": format!("Org {slug}"), "owner_email": format!("owner@{slug}.test")})),
            )
            .await;
        assert_eq!(s, 201, "{body}");
        self.member_token(slug).await
    }

    /// A token for a new member of the existing org `slug`.
    pub async fn member_token(&self, slug: &str) -> String {
        let (s, body) = self
            .call(
                reqwest::Method::POST,
                &format!("/v1/admin/orgs/{slug}/tokens"),
                &self.superuser,
                Some(serde_json::json!({"email": format!("member@{slug}.test")})),
            )
            .await;
        assert_eq!(s, 201, "{body}");
        body["token"]["token"].as_str().unwrap().to_owned()
    }

    /// The worst case of tenant affinity, made on purpose: creates orgs
    /// `{prefix}-0`, `{prefix}-1`, … until one has the same two tenant
    /// sub-pools as `of` (about one org in 120 with 16 sub-pools), and
    /// returns its slug and a member's token. `None` with fewer than three
    /// sub-pools, where every org shares them.
    pub async fn org_sharing_sub_pools_with(
        &self,
        of: &str,
        prefix: &str,
    ) -> Option<(String, String)> {
        let pool = self.state.tenancy.router().tenant_pool();
        if pool.sub_pool_count() < 3 {
            return None;
        }
        let choices = |id: &uuid::Uuid| {
            let (home, alt) = pool.candidates(id);
            [home.min(alt), home.max(alt)]
        };
        let wanted = choices(&self.tenant(of).await.id);
        for i in 0..3000 {
            let slug = format!("{prefix}-{i}");
            let (s, body) = self
                .call(
                    reqwest::Method::POST,
                    "/v1/admin/orgs",
                    &self.superuser,
                    Some(serde_json::json!({"slug": slug, "name": slug, "owner_email": format!("owner@{slug}.test")})),
                )
                .await;
            assert_eq!(s, 201, "{body}");
            if choices(&self.tenant(&slug).await.id) == wanted {
                let token = self.member_token(&slug).await;
                return Some((slug, token));
            }
        }
        panic!("no org of 3000 shares the sub-pools of {of}");
    }
}

/// Reads a `tenantry serve` child's stdout until its listening line:
/// (address, the lines before it, among them a bootstrap token if one was
/// printed). Fails if the child exits first or does not listen in 120 s.
pub async fn until_listening(child: &mut tokio::process::Child) -> (String, Vec<String>) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = vec![];
    let read = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(addr) = line.strip_prefix("tenantry listening on ") {
                return addr.to_owned();
            }
            seen.push(line);
        }
        panic!("serve exited before listening: {seen:?}");
    };
    let addr = tokio::time::timeout(Duration::from_secs(120), read)
        .await
        .expect("serve did not start within 120 s");
    (addr, seen)
}

/// Stops a `tenantry serve` child with SIGTERM, as an operator does, and
/// checks that it exits successfully within 60 s.
pub async fn terminate(mut child: tokio::process::Child) {
    let pid = child.id().expect("a running child") as i32;
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("serve did not stop within 60 s")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// The bootstrap token among lines a `tenantry serve` printed.
pub fn bootstrap_token(printed: &[String]) -> String {
    printed
        .iter()
        .find(|l| l.starts_with("tny_"))
        .unwrap_or_else(|| panic!("no bootstrap token in {printed:?}"))
        .clone()
}
