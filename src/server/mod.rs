//! A serving process: builds the application state, bootstraps the first
//! superuser, runs the background work, serves HTTP until SIGINT/SIGTERM
//! and then drains in-flight requests. [`Tenantry`] does the same setup in
//! one call for apps that embed tenantry.

mod embed;

pub use embed::{Tenantry, TenantryBuilder};

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::net::TcpListener;

use crate::api::{self, AppState};
use crate::base::error::Error;
use crate::jobs::worker::{WorkerConfig, Workers};
use crate::jobs::JobKinds;
use crate::pg::pools::{PoolConfig, TenantPool};
use crate::registry::{self, IssuedToken};
use crate::serving::auth::{AuthConfig, Authenticator};
use crate::serving::router::{RouterConfig, TenantRouter};
use crate::tenancy::Tenancy;
use crate::tenants::provision;
use crate::tenants::template::Template;

/// The email of the superuser created on first start.
pub const BOOTSTRAP_SUPERUSER: &str = "admin@localhost";

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub router: RouterConfig,
    pub auth: AuthConfig,
    /// Listen for registry changes of other processes (LISTEN/NOTIFY). Off,
    /// other processes' changes reach this one only through the TTLs.
    pub listen_for_changes: bool,
    /// A request running longer gets 503 `timeout`.
    pub request_timeout: Duration,
    /// After a shutdown signal, in-flight requests get this long to finish.
    pub shutdown_timeout: Duration,
    /// Serve `GET /metrics` on this address instead of the API's listener
    /// (e.g. one that only the monitoring network reaches).
    pub metrics_bind: Option<std::net::SocketAddr>,
    /// A direct connection to PostgreSQL for LISTEN, which needs a session
    /// of its own: behind a transaction pooler, without it, other
    /// processes' changes arrive only through the cache TTLs.
    pub listen_url: Option<String>,
    /// Tenant schemas kept pre-built for signups (see `warm`); 0: none.
    pub warm_schemas: usize,
    /// Background jobs this process runs at once (see `jobs`); 0: none
    /// (another process, `tenantry work`, runs them).
    pub workers: usize,
    /// Leases, retries and polling of the workers (`concurrency` and
    /// `shutdown_timeout` come from `workers` and `shutdown_timeout`).
    pub jobs: WorkerConfig,
    /// The job kinds the workers run: the API's (the tests import), and an
    /// embedding app's own.
    pub job_kinds: JobKinds,
    /// Streaming replicas of the database (the serving role's URLs) that
    /// orgs' reads may use (see `replicas`); empty: every read on the
    /// primary.
    pub replica_urls: Vec<String>,
    /// Lag bound and polling of the replicas.
    pub replicas: crate::serving::replicas::ReplicaConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            router: RouterConfig::default(),
            auth: AuthConfig::default(),
            listen_for_changes: true,
            request_timeout: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(30),
            metrics_bind: None,
            listen_url: None,
            warm_schemas: 0,
            workers: 0,
            jobs: WorkerConfig::default(),
            job_kinds: crate::api::jobs::default_kinds(),
            replica_urls: Vec::new(),
            replicas: Default::default(),
        }
    }
}

impl ServerConfig {
    /// Refuses settings that would expose what they must not: the
    /// per-org metric family names orgs, so it is served only on a
    /// listener of its own (`metrics_bind`), never on the API's, which
    /// anyone who can send a request reaches.
    pub fn check(&self) -> Result<(), Error> {
        if self.replicas.max_lag.is_zero() || self.replicas.poll.is_zero() {
            return Err(Error::Validation {
                field: "replica max lag",
                message: "the lag bound and the poll interval of replicas must be above zero"
                    .into(),
            });
        }
        if self.router.top_tenants > 0 && self.metrics_bind.is_none() {
            return Err(Error::Validation {
                field: "metrics top tenants",
                message: "--metrics-top-tenants labels metrics with org slugs, so it needs \
                          --metrics-bind (a metrics listener of its own, which the API's \
                          clients do not reach)"
                    .into(),
            });
        }
        Ok(())
    }
}

/// A server's connections.
pub struct Pools {
    /// The admin role: registry changes, provisioning, statistics.
    pub admin: PgPool,
    /// The serving role: token lookups, resolving slugs, LISTEN.
    pub control: PgPool,
    /// The serving role: tenant transactions, in sub-pools.
    pub tenants: TenantPool,
}

/// Connections of the admin and control pools of a server (each).
pub const SMALL_POOL: u32 = 4;

/// The admin and control pools: small, few distinct statements.
pub fn small_pool_config(tenants: &PoolConfig) -> PoolConfig {
    PoolConfig {
        max_connections: SMALL_POOL,
        statement_cache: 100,
        ..tenants.clone()
    }
}

impl Pools {
    /// A server's pools: `admin` (see [`admin_pool_config`]), and the
    /// control and tenant pools on `serving_url`, connecting lazily.
    pub fn connect_lazy(
        admin: PgPool,
        serving_url: &str,
        tenants: &PoolConfig,
    ) -> Result<Pools, sqlx::Error> {
        Ok(Pools {
            admin,
            control: crate::pg::pools::connect_lazy(serving_url, &small_pool_config(tenants))?,
            tenants: TenantPool::connect_lazy(serving_url, tenants)?,
        })
    }

    /// Closes every connection (e.g. on shutdown).
    pub async fn close(&self) {
        self.tenants.close().await;
        self.control.close().await;
        self.admin.close().await;
    }
}

/// The state of a server on `pools`, whose registry and shared schema must
/// be migrated (`tenants::migrate_database`, which also refuses a tenant
/// template that clashes with the shared schema).
pub async fn state(pools: Pools, config: &ServerConfig) -> Result<AppState, Error> {
    config.check()?;
    let template = Template::embedded();
    // the recorder first, so that everything from here on is counted
    crate::telemetry::handle();
    let auth_config = AuthConfig {
        pooler: pools.tenants.pooler(),
        ..config.auth.clone()
    };
    let mut router = TenantRouter::new(pools.control.clone(), pools.tenants, &config.router);
    if !config.replica_urls.is_empty() {
        router = with_replicas(router, &pools.admin, config).await?;
    }
    let auth = Authenticator::load(pools.control, &auth_config).await?;
    Ok(AppState {
        tenancy: Tenancy::new(pools.admin, router, auth, Arc::new(template)),
        request_timeout: config.request_timeout,
        metrics_on_api: config.metrics_bind.is_none(),
    })
}

/// `router` reading from `config`'s replicas, polled from now on (until
/// the router is dropped). Citus is refused: a replica of the coordinator
/// holds no tenant rows, and the coordinator's WAL position says nothing
/// of the workers'.
async fn with_replicas(
    router: TenantRouter,
    admin: &PgPool,
    config: &ServerConfig,
) -> Result<TenantRouter, Error> {
    let engine = crate::pg::engine::Engine::detect(&mut *admin.acquire().await?).await?;
    if engine.is_citus() {
        return Err(Error::Validation {
            field: "replica URL",
            message: "reads from replicas need plain PostgreSQL; on Citus, each worker \
                      would need replicas of its own, which tenantry does not track"
                .into(),
        });
    }
    let replicas = crate::serving::replicas::Replicas::connect_lazy(
        &config.replica_urls,
        router.tenant_pool().config(),
        config.replicas.clone(),
    )
    .map_err(|e| Error::Validation {
        field: "replica URL",
        message: e.to_string(),
    })?;
    let replicas = Arc::new(replicas);
    crate::serving::replicas::Replicas::spawn_poller(&replicas, router.control_pool().clone());
    Ok(router.with_replicas(replicas))
}

/// The password of a connection URL, percent-decoded.
pub fn url_password(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url).ok()?;
    let raw = parsed.password()?;
    Some(
        percent_encoding::percent_decode_str(raw)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

/// Makes the database ready to serve: gives orgs created before tenant roles
/// their role, and makes the login role of `serving_url` a serving role
/// (creating it with `password` when missing). Returns warnings for the
/// operator.
pub async fn prepare_serving(
    admin: &PgPool,
    admin_url: &str,
    serving_url: &str,
    password: Option<&str>,
) -> Result<Vec<String>, Error> {
    let mut notes = vec![];
    let upgraded = crate::registry::roles::ensure_tenant_roles(admin).await?;
    if !upgraded.is_empty() {
        notes.push(format!(
            "{} organization(s) created by an earlier version got their PostgreSQL role",
            upgraded.len()
        ));
    }
    let options: sqlx::postgres::PgConnectOptions = serving_url.parse()?;
    let role = crate::base::ident::RoleName::parse(options.get_username()).map_err(|e| {
        Error::Validation {
            field: "app database url",
            message: e.to_string(),
        }
    })?;
    if serving_url == admin_url {
        let superuser: bool =
            sqlx::query_scalar("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
                .fetch_one(admin)
                .await?;
        if superuser {
            notes.push(format!(
                "tenant connections log in as {role}, a superuser: tenant roles still confine every \
                 tenant transaction, but set TENANTRY_APP_DATABASE_URL to a role that is not one"
            ));
        }
    } else {
        crate::registry::roles::ensure_serving_role(admin, &role, password).await?;
    }
    Ok(notes)
}

/// Creates the first superuser and returns its token when the registry has
/// none, so a fresh installation can be administered at all.
pub async fn bootstrap_superuser(pool: &PgPool) -> Result<Option<IssuedToken>, Error> {
    if registry::has_superuser(pool).await? {
        return Ok(None);
    }
    let (_, token) =
        provision::issue_superuser_token(pool, BOOTSTRAP_SUPERUSER, Some("bootstrap"), None)
            .await?;
    Ok(Some(token))
}

/// Serves the API on `listener` until `shutdown` resolves, then lets
/// in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    config: &ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // bound first: a bad address fails before anything is started
    let metrics_task = spawn_metrics(&state, config).await?;
    let background = Background::spawn(&state, config);
    // In-flight requests get `shutdown_timeout` to finish after the signal.
    let (signalled, mut on_signal) = tokio::sync::watch::channel(false);
    let graceful = {
        let mut on_signal = on_signal.clone();
        async move {
            let _ = on_signal.wait_for(|s| *s).await;
        }
    };
    tokio::spawn(async move {
        shutdown.await;
        let _ = signalled.send(true);
    });
    let server = axum::serve(listener, api::app(state)).with_graceful_shutdown(graceful);
    let deadline = config.shutdown_timeout;
    let result = tokio::select! {
        r = server => r,
        _ = async {
            let _ = on_signal.wait_for(|s| *s).await;
            tokio::time::sleep(deadline).await;
        } => {
            tracing::warn!(seconds = deadline.as_secs_f64(), "shutdown deadline passed; dropping requests still in flight");
            Ok(())
        }
    };
    if let Some(task) = metrics_task {
        task.abort();
    }
    background.stop().await;
    result
}

/// Serves `GET /metrics` on `config.metrics_bind`, when set, until the
/// task is aborted.
async fn spawn_metrics(
    state: &AppState,
    config: &ServerConfig,
) -> std::io::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(addr) = config.metrics_bind else {
        return Ok(None);
    };
    let metrics_listener = TcpListener::bind(addr).await?;
    tracing::info!(addr = %metrics_listener.local_addr()?, "metrics on their own listener");
    let tenancy = state.tenancy.clone();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let tenancy = tenancy.clone();
            async move { api::metrics_response(&tenancy) }
        }),
    );
    Ok(Some(tokio::spawn(async move {
        if let Err(e) = axum::serve(metrics_listener, app).await {
            tracing::warn!(error = %e, "the metrics listener stopped");
        }
    })))
}

/// The background work of a serving process: the registry listener, the
/// token-use writer, metrics upkeep and the warm-pool refill. Dropping it
/// stops them; [`Background::stop`] also records the token use not yet
/// written.
pub struct Background {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    auth: Authenticator,
    workers: Option<Workers>,
}

impl Background {
    pub fn spawn(state: &AppState, config: &ServerConfig) -> Background {
        let tenancy = &state.tenancy;
        let mut tasks = vec![];
        match listen_pool(state, config) {
            Ok(Some(pool)) => tasks.push(tenancy.spawn_listener(pool)),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for registry changes: --listen-url is not a valid database URL");
            }
        }
        tasks.push(tenancy.auth().spawn_usage_writer());
        tasks.push(crate::telemetry::spawn_upkeep());
        if config.warm_schemas > 0 {
            tasks.push(tenancy.spawn_warm_refill(config.warm_schemas));
        }
        let workers = (config.workers > 0).then(|| {
            // the admin pool reaches PostgreSQL directly: LISTEN works there
            Workers::spawn(
                tenancy.router().clone(),
                tenancy.admin_pool().clone(),
                Some(tenancy.admin_pool().clone()),
                config.job_kinds.clone(),
                WorkerConfig {
                    concurrency: config.workers,
                    shutdown_timeout: config.shutdown_timeout,
                    ..config.jobs.clone()
                },
            )
        });
        Background {
            tasks,
            auth: tenancy.auth().clone(),
            workers,
        }
    }

    /// Stops the tasks (a warm build cut off rolls back: nothing
    /// half-built is left), lets running jobs finish within the shutdown
    /// timeout (handing the rest back) and records the token use not yet
    /// written.
    pub async fn stop(mut self) {
        if let Some(workers) = self.workers.take() {
            workers.shutdown().await;
        }
        for task in self.tasks.drain(..) {
            task.abort();
        }
        if let Err(e) = self.auth.flush_usage().await {
            tracing::warn!(error = %e, "could not record token use");
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Where the server LISTENs for other processes' registry changes: its
/// control pool; behind a transaction pooler, a direct connection to
/// PostgreSQL (`listen_url`) or nowhere, with a warning.
fn listen_pool(state: &AppState, config: &ServerConfig) -> Result<Option<PgPool>, sqlx::Error> {
    if !config.listen_for_changes {
        return Ok(None);
    }
    let router = state.tenancy.router();
    if let Some(url) = &config.listen_url {
        let direct = PoolConfig {
            max_connections: 1,
            ..PoolConfig::default()
        };
        return Ok(Some(crate::pg::pools::connect_lazy(url, &direct)?));
    }
    if router.tenant_pool().pooler().named_statements() {
        return Ok(Some(router.control_pool().clone()));
    }
    tracing::warn!(
        "behind a transaction pooler LISTEN needs a direct connection: without --listen-url, \
         other processes' changes (suspended orgs, revoked tokens) reach this one only \
         after the cache TTLs (--cache-ttl, --auth-ttl)"
    );
    Ok(None)
}

/// Runs the background work of `state` (jobs, with `config.workers` of
/// them at once, and the registry listener) without the API, until
/// `shutdown` resolves; then lets running jobs finish within the shutdown
/// timeout and hands the rest back. `GET /metrics` is served on
/// `config.metrics_bind` when set.
pub async fn work(
    state: AppState,
    config: &ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let metrics_task = spawn_metrics(&state, config).await?;
    let background = Background::spawn(&state, config);
    shutdown.await;
    background.stop().await;
    if let Some(task) = metrics_task {
        task.abort();
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutting down: finishing in-flight requests");
}
