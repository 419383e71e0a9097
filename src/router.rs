//! The tenant router: resolves an org slug to its tenant through a moka cache
//! and opens tenant transactions whose `search_path` is exactly the tenant's
//! schema, set transaction-locally in the same message as BEGIN.
//!
//! Invariants this module carries (see `shared/design.md`):
//! 1. a tenant transaction's search_path is the tenant schema alone: if the
//!    schema vanished, queries fail instead of falling through to `public`;
//! 2. no tenant state outlives the transaction: `SET LOCAL` ends with COMMIT
//!    or ROLLBACK, and [`TenantRouter::begin`] survives cancellation;
//! 6. the cache is invalidated by `tenancy` (at once for this process's
//!    changes, through NOTIFY for others'; at worst the TTL bounds staleness).

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;
use moka::Expiry;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::error::Error;
use crate::ident::{SchemaName, Slug};
use crate::registry::{self, OrgStatus};

/// What a [`TenantRouter::with_tenant`] closure returns: a boxed future
/// borrowing the tenant transaction.
pub type TenantFuture<'t, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, Error>> + Send + 't>>;

/// What the router knows about an org.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub id: Uuid,
    pub slug: Slug,
    pub schema: SchemaName,
    pub status: OrgStatus,
    pub template_version: i32,
}

#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// How long a resolved tenant is trusted without asking the registry.
    pub ttl: Duration,
    /// How long an unknown slug is remembered as unknown.
    pub negative_ttl: Duration,
    pub max_tenants: u64,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            ttl: Duration::from_secs(30),
            negative_ttl: Duration::from_secs(2),
            max_tenants: 100_000,
        }
    }
}

type Entry = Option<Arc<Tenant>>;

/// Known tenants live for `ttl`, unknown slugs for `negative_ttl`.
struct EntryExpiry {
    ttl: Duration,
    negative_ttl: Duration,
}

impl Expiry<Slug, Entry> for EntryExpiry {
    fn expire_after_create(&self, _: &Slug, value: &Entry, _: Instant) -> Option<Duration> {
        Some(match value {
            Some(_) => self.ttl,
            None => self.negative_ttl,
        })
    }
}

#[derive(Clone)]
pub struct TenantRouter {
    pool: PgPool,
    cache: Cache<Slug, Entry>,
}

impl TenantRouter {
    pub fn new(pool: PgPool, config: &RouterConfig) -> Self {
        let cache = Cache::builder()
            .max_capacity(config.max_tenants)
            .expire_after(EntryExpiry {
                ttl: config.ttl,
                negative_ttl: config.negative_ttl,
            })
            .build();
        TenantRouter { pool, cache }
    }

    /// The tenant for `slug`, or `None` for an unknown slug. A cache hit
    /// costs no SQL; concurrent misses for one slug share one registry query.
    pub async fn resolve(&self, slug: &Slug) -> Result<Option<Arc<Tenant>>, Error> {
        let pool = &self.pool;
        self.cache
            .try_get_with_by_ref(slug, async move {
                let mut conn = pool.acquire().await?;
                let org = registry::find_org(&mut conn, slug).await?;
                Ok::<_, Error>(org.map(|o| {
                    Arc::new(Tenant {
                        id: o.id,
                        slug: o.slug,
                        schema: o.schema_name,
                        status: o.status,
                        template_version: o.template_version,
                    })
                }))
            })
            .await
            .map_err(|e: Arc<Error>| match Arc::try_unwrap(e) {
                Ok(e) => e,
                Err(shared) => Error::Shared(shared),
            })
    }

    /// Opens a transaction scoped to `tenant`: `BEGIN; SET LOCAL search_path`
    /// in one round trip.
    ///
    /// Cancellation safety: sqlx counts a transaction only once BEGIN has
    /// answered, so a caller dropped while BEGIN is in flight would return a
    /// connection to the pool that is, on the server, inside a transaction
    /// with this tenant's search_path. [`DetachOnDrop`] hands such an
    /// unfinished BEGIN to a background task that completes it and drops the
    /// transaction, which queues its ROLLBACK before the connection is reused.
    pub async fn begin(&self, tenant: &Arc<Tenant>) -> Result<TenantTx, Error> {
        let sql = format!("BEGIN; SET LOCAL search_path TO {}", tenant.schema.quoted());
        let pool = self.pool.clone();
        let mut begin = DetachOnDrop(Some(Box::pin(async move { pool.begin_with(sql).await })));
        let tx = begin.run().await?;
        Ok(TenantTx {
            tx,
            tenant: tenant.clone(),
        })
    }

    /// Runs `f` in a transaction of the org `slug` and commits when it
    /// returns `Ok`: for background jobs and scripts.
    pub async fn with_tenant<T, F>(&self, slug: &Slug, f: F) -> Result<T, Error>
    where
        F: for<'t> FnOnce(&'t mut TenantTx) -> TenantFuture<'t, T>,
    {
        let tenant = self
            .resolve(slug)
            .await?
            .ok_or_else(|| Error::OrgNotFound(slug.to_string()))?;
        let mut tx = self.begin(&tenant).await?;
        let out = f(&mut tx).await?;
        tx.commit().await?;
        Ok(out)
    }

    /// Forgets what this process knows about `slug`.
    pub async fn invalidate(&self, slug: &Slug) {
        self.cache.invalidate(slug).await;
    }

    pub fn invalidate_all(&self) {
        self.cache.invalidate_all();
    }
}

type BeginFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<Transaction<'static, Postgres>, sqlx::Error>>
            + Send,
    >,
>;

/// A BEGIN in progress that, if abandoned half-way, is finished on a
/// background task instead of being dropped (see [`TenantRouter::begin`]).
/// The happy path costs one allocation and no task.
struct DetachOnDrop(Option<BeginFuture>);

impl DetachOnDrop {
    async fn run(&mut self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        let fut = self.0.as_mut().expect("run once");
        let result = fut.await;
        self.0 = None;
        result
    }
}

impl Drop for DetachOnDrop {
    fn drop(&mut self) {
        if let Some(unfinished) = self.0.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(async move {
                        // The transaction, if BEGIN succeeded, is dropped
                        // here: sqlx queues its ROLLBACK.
                        let _ = unfinished.await;
                    });
                }
                // No runtime left (shutdown): the pool is going away too.
                Err(_) => drop(unfinished),
            }
        }
    }
}

/// A transaction confined to one tenant's schema. Dropping it without
/// [`TenantTx::commit`] rolls back. The only database access tenant handlers
/// get.
pub struct TenantTx {
    tx: Transaction<'static, Postgres>,
    tenant: Arc<Tenant>,
}

impl TenantTx {
    pub fn tenant(&self) -> &Tenant {
        &self.tenant
    }

    /// The connection, inside this tenant's transaction.
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// `sql` tagged with this tenant's schema in a trailing comment.
    ///
    /// PostgreSQL re-analyses and re-plans a prepared statement whenever it
    /// runs under a different `search_path` than it was planned under. With
    /// one statement text shared by all tenants, a pooled connection that
    /// serves tenants in turn re-plans on nearly every request. Tagged text
    /// gives each connection one prepared statement per tenant, whose plan
    /// stays valid (the statement cache size is `PoolConfig::statement_cache`).
    /// Measured: 0.72x -> 0.94x of a single fixed schema's throughput at 100
    /// rotating tenants, see docs/benchmarks.md. Schema names are
    /// `[a-z0-9_]`, so the tag cannot end the comment.
    pub fn sql(&self, sql: &str) -> String {
        format!("{sql} /* {} */", self.tenant.schema)
    }

    pub async fn commit(self) -> Result<(), Error> {
        self.tx.commit().await?;
        Ok(())
    }

    pub async fn rollback(self) -> Result<(), Error> {
        self.tx.rollback().await?;
        Ok(())
    }
}
