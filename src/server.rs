//! `tenantry serve`: builds the application state, bootstraps the first
//! superuser, serves HTTP until SIGINT/SIGTERM and then drains in-flight
//! requests.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::net::TcpListener;

use crate::api::{self, AppState};
use crate::auth::Authenticator;
use crate::error::Error;
use crate::provision;
use crate::registry::{self, IssuedToken};
use crate::router::{RouterConfig, TenantRouter};
use crate::template::Template;

/// The email of the superuser created on first start.
pub const BOOTSTRAP_SUPERUSER: &str = "admin@localhost";

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub router: RouterConfig,
    /// How long a verified token is trusted without asking the registry.
    pub auth_ttl: Duration,
    /// Listen for registry changes of other processes (LISTEN/NOTIFY). Off,
    /// other processes' changes reach this one only through the TTLs.
    pub listen_for_changes: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            router: RouterConfig::default(),
            auth_ttl: Duration::from_secs(10),
            listen_for_changes: true,
        }
    }
}

/// The state of a server on `pool`, whose registry must be migrated.
pub fn state(pool: PgPool, config: &ServerConfig) -> AppState {
    AppState {
        router: TenantRouter::new(pool.clone(), &config.router),
        auth: Authenticator::new(pool.clone(), config.auth_ttl),
        template: Arc::new(Template::embedded()),
        pool,
    }
}

/// Creates the first superuser and returns its token when the registry has
/// none, so a fresh installation can be administered at all.
pub async fn bootstrap_superuser(pool: &PgPool) -> Result<Option<IssuedToken>, Error> {
    if registry::has_superuser(pool).await? {
        return Ok(None);
    }
    let (_, token) =
        provision::issue_superuser_token(pool, BOOTSTRAP_SUPERUSER, Some("bootstrap")).await?;
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
    let listener_task = config
        .listen_for_changes
        .then(|| state.router.spawn_listener());
    let result = axum::serve(listener, api::app(state))
        .with_graceful_shutdown(shutdown)
        .await;
    if let Some(task) = listener_task {
        task.abort();
    }
    result
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
