//! `tenantry serve`: configuration from flags, the server's pools, and the
//! bootstrap superuser.

use std::time::Duration;

use super::{Database, DbArgs, ServeArgs};
use crate::pg::pools::{PoolConfig, Pooler};
use crate::server::{self, ServerConfig};
use crate::serving::auth::AuthConfig;
use crate::serving::fairness::FairnessConfig;
use crate::serving::router::RouterConfig;

/// What the process does: serve HTTP (and jobs with --workers), or only
/// run jobs (`tenantry work`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    Http,
    Jobs,
}

pub(super) async fn serve(db_args: &DbArgs, args: ServeArgs, mode: Mode) -> anyhow::Result<()> {
    if mode == Mode::Jobs && args.workers == 0 {
        anyhow::bail!("tenantry work needs --workers of at least 1");
    }
    let pool_config = PoolConfig {
        max_connections: args.pool_size,
        sub_pools: args.sub_pools,
        spill_margin: args.spill_margin,
        max_lifetime: Duration::from_secs(args.conn_max_lifetime),
        statement_cache: args.statement_cache,
        pooler: args.pooler,
        ..PoolConfig::default()
    };
    if args.pooler == Pooler::Transaction && args.app_database_url.is_none() {
        anyhow::bail!(
            "--pooler transaction needs --app-database-url (TENANTRY_APP_DATABASE_URL) pointing at \
             the pooler; DATABASE_URL is for admin work (migrations, provisioning) and must reach \
             PostgreSQL directly"
        );
    }
    // admin work always talks to PostgreSQL directly
    let admin_config = PoolConfig {
        pooler: Pooler::None,
        ..server::small_pool_config(&pool_config)
    };
    let config = ServerConfig {
        router: RouterConfig {
            ttl: Duration::from_secs(args.cache_ttl),
            statement_timeout: Duration::from_millis(args.statement_timeout_ms.max(1)),
            lock_timeout: Duration::from_millis(args.lock_timeout_ms.max(1)),
            fairness: Some(FairnessConfig {
                max_in_flight: args
                    .tenant_max_in_flight
                    .unwrap_or(FairnessConfig::for_pool(args.pool_size).max_in_flight),
                queue: Duration::from_millis(args.tenant_queue_ms),
            }),
            top_tenants: args.metrics_top_tenants.into(),
            ..RouterConfig::default()
        },
        request_timeout: Duration::from_secs(args.request_timeout.max(1)),
        shutdown_timeout: Duration::from_secs(args.shutdown_timeout),
        metrics_bind: args.metrics_bind,
        listen_url: args.listen_url.clone(),
        warm_schemas: args.warm_schemas as usize,
        workers: args.workers as usize,
        jobs: crate::jobs::worker::WorkerConfig {
            lease: Duration::from_secs(args.job_lease),
            ..Default::default()
        },
        auth: AuthConfig {
            ttl: Duration::from_secs(args.auth_ttl),
            ..AuthConfig::default()
        },
        replicas: crate::serving::replicas::ReplicaConfig {
            max_lag: args.replica_max_lag,
            ..Default::default()
        },
        ..ServerConfig::default()
    };
    if args.local_replicas > 0 && db_args.database_url.is_some() {
        anyhow::bail!(
            "--local-replicas makes replicas of the local cluster, which DATABASE_URL replaces; \
             give your own replicas with --replica-url"
        );
    }
    config.check()?;
    let mut db = Database::connect(db_args, &admin_config).await?;
    if let Some(token) = server::bootstrap_superuser(&db.pool).await? {
        println!(
            "created superuser {} with API token (shown once, store it now):",
            server::BOOTSTRAP_SUPERUSER
        );
        println!("{}", token.token);
    }
    // before the listening line: once it is printed, reads may use them
    let mut config = config;
    config.replica_urls = args.replica_urls.clone();
    let local_replicas = db.start_local_replicas(args.local_replicas).await?;
    if !local_replicas.is_empty() {
        db.reconnect(&admin_config).await?;
    }
    for replica in &local_replicas {
        let url = db.local_app_url_on(replica)?;
        println!("reading from a local replica on port {}", replica.port());
        config.replica_urls.push(url);
    }
    let listener = match mode {
        Mode::Http => {
            let listener = tokio::net::TcpListener::bind(args.bind)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.bind))?;
            let addr = listener.local_addr()?;
            tracing::info!(%addr, "listening");
            println!("tenantry listening on http://{addr}");
            Some(listener)
        }
        Mode::Jobs => None,
    };
    let (serving_url, password) = match (&args.app_database_url, db.local_app_url()?) {
        (Some(url), _) => (url.clone(), server::url_password(url)),
        (None, Some((url, password))) => (url, Some(password)),
        (None, None) => (db.url.clone(), None),
    };
    for note in
        server::prepare_serving(&db.pool, &db.url, &serving_url, password.as_deref()).await?
    {
        tracing::warn!("{note}");
    }
    let pools = server::Pools::connect_lazy(db.pool.clone(), &serving_url, &pool_config)?;
    let state = server::state(pools, &config).await?;
    let served = match listener {
        Some(listener) => {
            server::serve(listener, state.clone(), &config, server::shutdown_signal()).await
        }
        None => {
            println!("tenantry working: {} job(s) at once", config.workers);
            server::work(state.clone(), &config, server::shutdown_signal()).await
        }
    };
    state.tenancy.router().tenant_pool().close().await;
    state.tenancy.router().control_pool().close().await;
    drop(state);
    for replica in local_replicas.into_iter().filter(|r| r.started_here()) {
        tokio::task::spawn_blocking(move || replica.stop()).await??;
    }
    db.close().await?;
    Ok(served?)
}
