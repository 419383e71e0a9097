//! How tenantry connects: one pool for all tenants, whatever their number,
//! with bounded connection lifetime and a session default that resolves no
//! unqualified names outside a tenant transaction.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor, PgPool};

#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Connections shared by all tenants.
    pub max_connections: u32,
    /// Each backend caches catalog entries of every tenant schema it touches
    /// (~58 KB per tenant, never evicted), so connections are recycled.
    pub max_lifetime: Duration,
    pub idle_timeout: Duration,
    pub acquire_timeout: Duration,
    /// Prepared statements kept per connection. Tenant SQL is prepared once
    /// per tenant and connection (see `TenantTx::sql`), so this should cover
    /// the statements of the tenants a connection serves in its lifetime;
    /// each costs a few KB in its backend.
    pub statement_cache: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_connections: 16,
            max_lifetime: Duration::from_secs(15 * 60),
            idle_timeout: Duration::from_secs(5 * 60),
            acquire_timeout: Duration::from_secs(10),
            statement_cache: 1024,
        }
    }
}

/// Opens the shared pool. Every connection starts with an empty
/// `search_path`: registry SQL is schema-qualified and tenant SQL runs inside
/// a tenant transaction, so an unqualified name anywhere else fails loudly
/// instead of resolving in `public`. This is the same for every connection
/// and carries no tenant state.
pub async fn connect(url: &str, config: &PoolConfig) -> Result<PgPool, sqlx::Error> {
    let options: PgConnectOptions = url.parse()?;
    let options = options.statement_cache_capacity(config.statement_cache);
    PgPoolOptions::new()
        .max_connections(config.max_connections)
        .max_lifetime(config.max_lifetime)
        .idle_timeout(config.idle_timeout)
        .acquire_timeout(config.acquire_timeout)
        // The ping costs a round trip per request; broken connections surface
        // as errors on use and are replaced, and lifetimes are bounded.
        .test_before_acquire(false)
        .after_connect(|conn, _meta| {
            Box::pin(async move {
                conn.execute("SET search_path TO ''").await?;
                Ok(())
            })
        })
        .connect_with(options)
        .await
}
