//! [`Tenantry`]: tenantry inside an app of your own, set up in one call from
//! a database URL. It migrates the registry, makes the serving role ready,
//! connects the pools, starts the background work a server runs (the
//! registry listener, token-use writes, metrics upkeep) and hands out the
//! router, the state of tenant extractors (`OrgScope`) and tenantry's API.

use std::future::{Future, IntoFuture};
use std::pin::Pin;

use axum::Router;

use super::{
    prepare_serving, small_pool_config, state, url_password, Background, Pools, ServerConfig,
};
use crate::api::{self, AppState, TenantApi};
use crate::base::error::Error;
use crate::pg::pools::{PoolConfig, Pooler};
use crate::serving::router::TenantRouter;
use crate::tenancy::Tenancy;

/// A running tenantry inside an app: see [`Tenantry::connect`].
///
/// ```no_run
/// # async fn demo() -> Result<(), tenantry::Error> {
/// use axum::routing::get;
/// use tenantry::api::extract::OrgScope;
///
/// async fn count(org: OrgScope) -> Result<String, tenantry::api::error::ApiError> {
///     let n: Option<(i64,)> = org
///         .read(async |tx| Ok(tx.query_as("SELECT count(*) FROM tests").fetch_optional().await?))
///         .await?;
///     Ok(n.map_or(0, |(n,)| n).to_string())
/// }
///
/// let tenantry = tenantry::Tenantry::connect("postgres://localhost/app").await?;
/// let app = tenantry.app(axum::Router::new().route("/v1/orgs/{slug}/count", get(count)));
/// # let _ = app; Ok(()) }
/// ```
pub struct Tenantry {
    state: AppState,
    background: Background,
}

impl Tenantry {
    /// Tenantry on the database at `database_url` with the defaults of
    /// `tenantry serve`; the same role serves tenant transactions.
    pub async fn connect(database_url: &str) -> Result<Tenantry, Error> {
        Tenantry::builder(database_url).await
    }

    /// Tenantry on the database at `database_url` (an admin role: it
    /// migrates the registry and creates tenant roles), configured further
    /// before it is awaited.
    pub fn builder(database_url: impl Into<String>) -> TenantryBuilder {
        TenantryBuilder {
            database_url: database_url.into(),
            serving_url: None,
            pool: PoolConfig::default(),
            config: ServerConfig::default(),
        }
    }

    /// The core: org changes (`tenancy().orgs()`), the router, the
    /// authenticator.
    pub fn tenancy(&self) -> &Tenancy {
        &self.state.tenancy
    }

    /// The slug -> tenant router and its tenant transactions.
    pub fn router(&self) -> &TenantRouter {
        self.state.tenancy.router()
    }

    /// The state of routes that use tenant extractors (`OrgScope`): the
    /// router and the authenticator, never a pool.
    pub fn tenant_state(&self) -> TenantApi {
        TenantApi::of(&self.state.tenancy)
    }

    /// Tenantry's own API (org routes, admin routes, health, metrics,
    /// OpenAPI), ready to serve or merge.
    pub fn api(&self) -> Router {
        api::app(self.state.clone())
    }

    /// Your tenant routes beside tenantry's API, under the same request
    /// handling: request ids, the request log, metrics, the body limit and
    /// the request timeout.
    pub fn app(&self, routes: Router<TenantApi>) -> Router {
        api::app_with(self.state.clone(), routes)
    }

    /// Stops the background work and records token use not yet written.
    pub async fn shutdown(self) {
        self.background.stop().await;
    }
}

/// Configures a [`Tenantry`]; awaiting it starts it.
pub struct TenantryBuilder {
    database_url: String,
    serving_url: Option<String>,
    pool: PoolConfig,
    config: ServerConfig,
}

impl TenantryBuilder {
    /// The login role of tenant connections (default: the admin URL's).
    /// Made a serving role if it is not one (see `registry::roles`).
    pub fn serving_url(mut self, url: impl Into<String>) -> Self {
        self.serving_url = Some(url.into());
        self
    }

    /// The tenant pool: size, sub-pools, statement cache, pooler.
    pub fn pool(mut self, pool: PoolConfig) -> Self {
        self.pool = pool;
        self
    }

    /// Router, authentication, timeouts, warm schemas, workers.
    pub fn config(mut self, config: ServerConfig) -> Self {
        self.config = config;
        self
    }

    /// Runs `n` background jobs at once in this process (0, the default:
    /// none; `tenantry work` may run them instead).
    pub fn workers(mut self, n: usize) -> Self {
        self.config.workers = n;
        self
    }

    /// Reads orgs' data from the streaming replica at `url` (the serving
    /// role's credentials) when it has replayed the org's last write (see
    /// `serving::replicas`); repeat for several. A read that fails there
    /// runs on the primary.
    pub fn replica(mut self, url: impl Into<String>) -> Self {
        self.config.replica_urls.push(url.into());
        self
    }

    /// A replica further behind than `lag` serves no read (default 5 s).
    pub fn replica_max_lag(mut self, lag: std::time::Duration) -> Self {
        self.config.replicas.max_lag = lag;
        self
    }

    /// Runs jobs of `kind` with `handler` (see `jobs::JobHandler`), beside
    /// tenantry's own kinds. A kind is 1 to 100 of `a-z 0-9 _ . : -`.
    pub fn job_kind(
        mut self,
        kind: &str,
        handler: impl crate::jobs::JobHandler,
    ) -> Result<Self, Error> {
        self.config.job_kinds.register(kind, handler)?;
        Ok(self)
    }

    async fn start(self) -> Result<Tenantry, Error> {
        let admin_config = PoolConfig {
            pooler: Pooler::None,
            ..small_pool_config(&self.pool)
        };
        let admin = crate::pg::pools::connect(&self.database_url, &admin_config).await?;
        crate::tenants::migrate_database(&admin).await?;
        let serving_url = self.serving_url.as_deref().unwrap_or(&self.database_url);
        let password = url_password(serving_url);
        for note in
            prepare_serving(&admin, &self.database_url, serving_url, password.as_deref()).await?
        {
            tracing::warn!("{note}");
        }
        let pools = Pools::connect_lazy(admin, serving_url, &self.pool)?;
        let state = state(pools, &self.config).await?;
        let background = Background::spawn(&state, &self.config);
        Ok(Tenantry { state, background })
    }
}

impl IntoFuture for TenantryBuilder {
    type Output = Result<Tenantry, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.start())
    }
}
