//! The tenancy core, above the tenant-schema and serving layers: every org
//! change goes through [`Orgs`], and a server's [`Tenancy`] keeps its
//! router and authenticator coherent with every change, its own at once
//! (invariant 6, `docs/invariants.md`) and other processes' through the
//! listener. The HTTP API and the CLI stay thin on top of it.

mod orgs;

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;

pub use self::orgs::{Caches, Orgs};
use crate::registry::changes::{Change, REGISTRY_CHANNEL};
use crate::serving::auth::Authenticator;
use crate::serving::router::TenantRouter;
use crate::telemetry::PoolSample;
use crate::tenants::template::Template;

/// A server's view of the tenancy: the org changes (through the admin
/// pool), the router and the authenticator, kept coherent with every
/// change.
#[derive(Clone)]
pub struct Tenancy {
    orgs: Orgs,
    caches: Caches,
    listening: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Tenancy {
    pub fn new(
        admin: PgPool,
        router: TenantRouter,
        auth: Authenticator,
        template: Arc<Template>,
    ) -> Self {
        let caches = Caches { router, auth };
        Tenancy {
            orgs: Orgs::new(admin, template).with_caches(caches.clone()),
            caches,
            listening: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }

    /// Every org change, applied to this server's caches too.
    pub fn orgs(&self) -> &Orgs {
        &self.orgs
    }

    pub fn router(&self) -> &TenantRouter {
        &self.caches.router
    }

    pub fn auth(&self) -> &Authenticator {
        &self.caches.auth
    }

    /// The pool of the admin role: registry writes, provisioning.
    pub fn admin_pool(&self) -> &PgPool {
        self.orgs.admin_pool()
    }

    pub fn template(&self) -> &Template {
        self.orgs.template()
    }

    /// Applies a change to this process's caches.
    pub async fn apply(&self, change: &Change) {
        self.caches.apply(change).await
    }

    /// The Prometheus text of every metric, with this server's pools
    /// sampled now.
    pub fn render_metrics(&self) -> String {
        let router = self.router();
        let tenants = router.tenant_pool();
        let pools = [
            PoolSample {
                pool: "tenants",
                open: tenants.size() as usize,
                idle: tenants.num_idle(),
                max: tenants.max_connections(),
            },
            PoolSample::of("control", router.control_pool()),
            PoolSample::of("admin", self.admin_pool()),
        ];
        let replica_pools = router.replicas().map(|r| {
            let pools = r.replicas().iter().map(|r| r.tenant_pool());
            pools.fold(
                PoolSample {
                    pool: "replicas",
                    open: 0,
                    idle: 0,
                    max: 0,
                },
                |sum, p| PoolSample {
                    open: sum.open + p.size() as usize,
                    idle: sum.idle + p.num_idle(),
                    max: sum.max + p.max_connections(),
                    ..sum
                },
            )
        });
        let pools: Vec<PoolSample> = pools.into_iter().chain(replica_pools).collect();
        crate::telemetry::render(&pools, router.top_tenants())
    }

    /// Keeps `target` warm schemas ready (see `warm`), refilling after each
    /// org created here.
    pub fn spawn_warm_refill(&self, target: usize) -> tokio::task::JoinHandle<()> {
        crate::tenants::warm::spawn_refill(
            self.admin_pool().clone(),
            self.orgs.template().clone(),
            target,
            self.orgs.created(),
        )
    }

    /// True while the listener is connected and listening.
    pub fn is_listening(&self) -> bool {
        *self.listening.borrow()
    }

    /// Waits until the listener is listening (for tests and readiness).
    pub async fn wait_listening(&self) {
        let mut rx = self.listening.subscribe();
        let _ = rx.wait_for(|on| *on).await;
    }

    /// Listens for other processes' changes and applies them. While the
    /// listener reconnects, notifications are lost, so every (re)connect
    /// forgets everything cached.
    pub fn spawn_listener(&self, pool: PgPool) -> tokio::task::JoinHandle<()> {
        let tenancy = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = tenancy.listen(&pool).await {
                    tracing::warn!(error = %e, "registry listener failed; retrying");
                }
                tenancy.listening.send_replace(false);
                tenancy.apply(&Change::Everything).await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    }

    async fn listen(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
        listener.listen(REGISTRY_CHANNEL).await?;
        // Anything announced before LISTEN took effect is unknown to us.
        self.apply(&Change::Everything).await;
        self.listening.send_replace(true);
        loop {
            match listener.try_recv().await? {
                Some(n) => self.apply(&Change::parse(n.payload())).await,
                None => {
                    // the connection dropped and was re-established
                    self.apply(&Change::Everything).await;
                }
            }
        }
    }
}
