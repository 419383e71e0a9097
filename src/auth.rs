//! Bearer-token authentication: a presented token is hashed and looked up
//! in the registry; the verified principal (never the secret) is cached
//! briefly by digest. Revoking through [`Authenticator::revoke`] takes effect
//! at once in this process; other processes converge within the TTL.

use std::time::Duration;

use moka::future::Cache;
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::Error;
use crate::registry::{self, Principal};
use crate::secret::{token_hash, TOKEN_PREFIX};

#[derive(Clone)]
pub struct Authenticator {
    pool: PgPool,
    cache: Cache<[u8; 32], Principal>,
}

impl Authenticator {
    pub fn new(pool: PgPool, ttl: Duration) -> Self {
        Authenticator {
            pool,
            cache: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ttl)
                .build(),
        }
    }

    /// The principal a presented token acts for, or `None` when it is not a
    /// valid, unrevoked token. Malformed tokens are refused without a query.
    pub async fn authenticate(&self, presented: &str) -> Result<Option<Principal>, Error> {
        if !well_formed(presented) {
            return Ok(None);
        }
        let hash = token_hash(presented);
        if let Some(p) = self.cache.get(&hash).await {
            return Ok(Some(p));
        }
        let principal = registry::authenticate_hash(&self.pool, &hash).await?;
        if let Some(p) = &principal {
            self.cache.insert(hash, p.clone()).await;
        }
        Ok(principal)
    }

    /// Revokes a token and forgets it in this process at once. Returns false
    /// when there was no active token with that id.
    pub async fn revoke(&self, token_id: Uuid) -> Result<bool, Error> {
        match registry::revoke_token(&self.pool, token_id).await? {
            Some(hash) => {
                if let Ok(hash) = <[u8; 32]>::try_from(hash.as_slice()) {
                    self.cache.invalidate(&hash).await;
                }
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

/// `tny_<8 hex>_<64 hex>`.
fn well_formed(token: &str) -> bool {
    let mut parts = token.splitn(3, '_');
    let is_hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    matches!(
        (parts.next(), parts.next(), parts.next()),
        (Some(TOKEN_PREFIX), Some(prefix), Some(secret)) if is_hex(prefix, 8) && is_hex(secret, 64)
    )
}
