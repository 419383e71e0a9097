//! Bearer-token authentication: a presented token is hashed and looked up
//! in the registry; the verified principal (never the secret) is cached by
//! digest.
//!
//! Abuse costs no database work: a token that is not well formed, or whose
//! MAC does not match this installation's key (format 2) and whose display
//! prefix is not one of the pre-MAC tokens', is refused without a query;
//! unknown and revoked digests are remembered briefly; lookups of one digest
//! are coalesced; and `last_used_at` is written at most once per token per
//! interval, in batches, instead of once per request. Revocations reach the
//! cache through the tenancy core above (at once here, by NOTIFY elsewhere); the
//! TTL bounds staleness if a notification is lost.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::mapref::entry::Entry as Slot;
use dashmap::DashMap;
use moka::future::Cache;
use moka::Expiry;
use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::base::error::Error;
use crate::base::secret::{mac_matches, token_hash, SECRET_HEX, TOKEN_PREFIX};
use crate::pg::pools::ServingConn;
use crate::registry::{self, Principal};

#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// How long a verified token is trusted without asking the registry.
    pub ttl: Duration,
    /// How long an unknown or revoked token is remembered as such.
    pub negative_ttl: Duration,
    /// `last_used_at` is written at most once per token per this interval.
    pub usage_interval: Duration,
    /// How registry SQL reaches PostgreSQL (a server takes it from its
    /// pools' configuration).
    pub pooler: crate::pg::pools::Pooler,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            ttl: Duration::from_secs(10),
            negative_ttl: Duration::from_secs(60),
            usage_interval: Duration::from_secs(60),
            pooler: crate::pg::pools::Pooler::None,
        }
    }
}

type Entry = Option<Principal>;

/// Valid tokens live for the TTL, but never past their own expiry; unknown
/// ones for the negative TTL.
struct EntryExpiry {
    ttl: Duration,
    negative_ttl: Duration,
}

impl Expiry<[u8; 32], Entry> for EntryExpiry {
    fn expire_after_create(&self, _: &[u8; 32], value: &Entry, _: Instant) -> Option<Duration> {
        Some(match value {
            None => self.negative_ttl,
            Some(p) => match p.expires_at {
                None => self.ttl,
                Some(at) => {
                    let left = at - OffsetDateTime::now_utc();
                    self.ttl.min(left.try_into().unwrap_or(Duration::ZERO))
                }
            },
        })
    }
}

/// What may be looked up at all: tokens with this installation's MAC, and
/// tokens from before MACs (by display prefix, a fixed set that only
/// shrinks).
struct Gate {
    key: Vec<u8>,
    legacy_prefixes: HashSet<String>,
}

impl Gate {
    fn admits(&self, token: &str) -> bool {
        mac_matches(&self.key, token) || self.legacy_prefixes.contains(&token[4..12])
    }
}

/// Token uses waiting to be written, and when each token was last queued.
#[derive(Default)]
struct Usage {
    /// Sharded: every authenticated request looks here.
    queued_at: DashMap<Uuid, Instant>,
    /// Touched once per token and interval.
    pending: Mutex<Vec<Uuid>>,
}

#[derive(Clone)]
pub struct Authenticator {
    pool: PgPool,
    pooler: crate::pg::pools::Pooler,
    cache: Cache<[u8; 32], Entry>,
    gate: Arc<Gate>,
    usage: Arc<Usage>,
    usage_interval: Duration,
}

impl Authenticator {
    /// An authenticator over the registry reachable through `pool` (reads
    /// the token key and the pre-MAC token prefixes once).
    pub async fn load(pool: PgPool, config: &AuthConfig) -> Result<Self, Error> {
        let pooler = config.pooler;
        let mut conn = ServingConn::open(&pool, pooler).await?;
        let named = conn.named();
        let key = registry::token_key_sent(conn.conn(), named).await?;
        let legacy_prefixes = registry::legacy_token_prefixes(conn.conn(), named)
            .await?
            .into_iter()
            .collect();
        conn.finish().await?;
        Ok(Authenticator {
            pool,
            pooler,
            cache: Cache::builder()
                .max_capacity(100_000)
                .expire_after(EntryExpiry {
                    ttl: config.ttl,
                    negative_ttl: config.negative_ttl,
                })
                .build(),
            gate: Arc::new(Gate {
                key,
                legacy_prefixes,
            }),
            usage: Arc::default(),
            usage_interval: config.usage_interval,
        })
    }

    /// The principal a presented token acts for, or `None` when it is not a
    /// valid, unrevoked, unexpired token.
    pub async fn authenticate(&self, presented: &str) -> Result<Option<Principal>, Error> {
        if !well_formed(presented) {
            return Ok(None);
        }
        let hash = token_hash(presented);
        let counted = crate::telemetry::auth;
        let principal = match self.cache.get(&hash).await {
            Some(entry) => {
                counted(if entry.is_some() {
                    "hit"
                } else {
                    "negative_hit"
                });
                entry
            }
            None if !self.gate.admits(presented) => {
                counted("rejected");
                None
            }
            None => {
                counted("miss");
                let (pool, pooler) = (&self.pool, self.pooler);
                let attempts = pool.options().get_max_connections() as usize + 2;
                self.cache
                    .try_get_with(hash, async move {
                        crate::base::error::retry_dead_connections(attempts, || {
                            lookup_token(pool, pooler, &hash)
                        })
                        .await
                    })
                    .await
                    .map_err(|e: Arc<Error>| match Arc::try_unwrap(e) {
                        Ok(e) => e,
                        Err(shared) => Error::Shared(shared),
                    })?
            }
        };
        // A cached principal may outlive its token's expiry by a moment.
        let principal =
            principal.filter(|p| p.expires_at.is_none_or(|at| at > OffsetDateTime::now_utc()));
        if let Some(p) = &principal {
            self.note_use(p.token_id);
        }
        Ok(principal)
    }

    /// Forgets a token (by digest) in this process.
    pub async fn forget(&self, hash: &[u8; 32]) {
        self.cache.invalidate(hash).await;
    }

    pub fn forget_all(&self) {
        self.cache.invalidate_all();
    }

    fn note_use(&self, token_id: Uuid) {
        let now = Instant::now();
        let due = |at: &Instant| now.duration_since(*at) >= self.usage_interval;
        // a shared look first: nearly every use is not due
        if self
            .usage
            .queued_at
            .get(&token_id)
            .is_some_and(|at| !due(&at))
        {
            return;
        }
        let queued = match self.usage.queued_at.entry(token_id) {
            Slot::Occupied(mut at) if due(at.get()) => {
                at.insert(now);
                true
            }
            Slot::Occupied(_) => false,
            Slot::Vacant(at) => {
                at.insert(now);
                true
            }
        };
        if queued {
            self.usage
                .pending
                .lock()
                .expect("usage lock")
                .push(token_id);
        }
    }

    /// Writes the queued `last_used_at` updates in one statement.
    pub async fn flush_usage(&self) -> Result<usize, Error> {
        let interval = self.usage_interval;
        self.usage.queued_at.retain(|_, at| at.elapsed() < interval);
        let pending = std::mem::take(&mut *self.usage.pending.lock().expect("usage lock"));
        if !pending.is_empty() {
            let mut conn = ServingConn::open(&self.pool, self.pooler).await?;
            let named = conn.named();
            registry::record_token_use(conn.conn(), &pending, named).await?;
            conn.finish().await?;
        }
        Ok(pending.len())
    }

    /// Flushes token uses every second until aborted.
    pub fn spawn_usage_writer(&self) -> tokio::task::JoinHandle<()> {
        let auth = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = auth.flush_usage().await {
                    tracing::warn!(error = %e, "could not record token use");
                }
            }
        })
    }
}

async fn lookup_token(
    pool: &PgPool,
    pooler: crate::pg::pools::Pooler,
    hash: &[u8; 32],
) -> Result<Option<Principal>, Error> {
    let mut conn = ServingConn::open(pool, pooler).await?;
    let named = conn.named();
    let found = registry::authenticate_hash(conn.conn(), hash, named).await?;
    conn.finish().await?;
    Ok(found)
}

/// `tny_<8 hex>_<64 hex>`.
fn well_formed(token: &str) -> bool {
    let mut parts = token.splitn(3, '_');
    let is_hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    matches!(
        (parts.next(), parts.next(), parts.next()),
        (Some(TOKEN_PREFIX), Some(prefix), Some(secret)) if is_hex(prefix, 8) && is_hex(secret, SECRET_HEX)
    )
}
