//! How tenantry connects. A connection budget that does not grow with the
//! number of tenants, split so that each backend serves a bounded slice of
//! them: the tenant pool is `sub_pools` small pools, a tenant's requests go
//! to its home sub-pool (chosen by a hash of the org id) or, when home is
//! busier, to a second choice (power of two choices), so one hot tenant
//! cannot stall its neighbours and each backend caches the catalog and
//! prepared statements of about `2 / sub_pools` of the tenants instead of all
//! of them. Registry queries (auth, resolve) use a separate small pool.
//!
//! Every connection starts with an empty `search_path`: registry SQL is
//! schema-qualified and tenant SQL runs inside a tenant transaction, so an
//! unqualified name anywhere else fails loudly instead of resolving in
//! `public`. This is the same for every connection and carries no tenant
//! state.
//!
//! Tenant connections are tokio-postgres clients (pooled by deadpool),
//! which pipeline: see `pipeline`. Registry and admin
//! connections are sqlx's.
//!
//! Behind a transaction-pooling PgBouncer ([`Pooler::Transaction`]) a
//! session belongs to no one between transactions, so nothing is set per
//! session (tenant transactions set everything with `SET LOCAL` in their
//! BEGIN message), statements are unnamed, and registry SQL of the serving
//! side runs inside explicit transactions ([`ServingConn`]).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool::managed::{Hook, HookError, Metrics, RecycleError, RecycleResult};
use deadpool::Runtime;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor, PgPool, Postgres};
use uuid::Uuid;

use crate::pg::pipeline::TenantConnection;

/// Opens tenant connections for deadpool.
pub struct TenantConnector {
    pg: tokio_postgres::Config,
    set_session: bool,
    statement_cache: usize,
}

impl deadpool::managed::Manager for TenantConnector {
    type Type = TenantConnection;
    type Error = tokio_postgres::Error;

    async fn create(&self) -> Result<TenantConnection, tokio_postgres::Error> {
        let (client, connection) = self.pg.connect(tokio_postgres::NoTls).await?;
        // ends when the client is dropped (or the socket closes)
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "tenant connection ended");
            }
        });
        // Behind a transaction pooler this would set another client's
        // session, and not reliably ours.
        if self.set_session {
            client.batch_execute("SET search_path TO ''").await?;
        }
        Ok(TenantConnection::new(client, self.statement_cache))
    }

    async fn recycle(
        &self,
        conn: &mut TenantConnection,
        _: &Metrics,
    ) -> RecycleResult<tokio_postgres::Error> {
        // A connection whose socket closed is dropped on its way out; no
        // query on the way (sqlx pinged every connection it took back).
        if conn.is_closed() {
            return Err(RecycleError::message("the connection is closed"));
        }
        Ok(())
    }
}

/// Closes `conn` instead of giving it back to its pool (it failed in a way
/// that leaves its session in doubt).
pub fn discard(conn: TenantConn) {
    drop(deadpool::managed::Object::take(conn));
}

/// One tenant sub-pool.
pub type TenantSubPool = deadpool::managed::Pool<TenantConnector>;
type Pool = TenantSubPool;

/// A pooled tenant connection.
pub type TenantConn = deadpool::managed::Object<TenantConnector>;

/// What sits between tenantry and PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Pooler {
    /// Nothing, or a session-pooling proxy: each connection is one session.
    #[default]
    None,
    /// A transaction-pooling PgBouncer (1.18 and later): consecutive
    /// transactions of one connection may run on different server
    /// sessions. Named prepared statements and session settings break
    /// there; unnamed statements work inside a transaction (sqlx sends
    /// their Parse and Execute as two round trips, which may otherwise land
    /// on two sessions; the tenant path sends them in one write).
    Transaction,
}

impl Pooler {
    /// Whether statements may be prepared once per connection and kept.
    pub fn named_statements(self) -> bool {
        self == Pooler::None
    }
}

/// A connection for registry SQL of the serving side (token lookups,
/// resolving slugs, recording token use), opened the way the pooler needs:
/// a plain pooled connection with named statements; or, behind a
/// transaction pooler, an explicit transaction with unnamed statements.
pub enum ServingConn {
    Session(PoolConnection<Postgres>),
    Transaction(sqlx::Transaction<'static, Postgres>),
}

impl ServingConn {
    pub async fn open(pool: &PgPool, pooler: Pooler) -> Result<Self, sqlx::Error> {
        Ok(match pooler {
            Pooler::None => ServingConn::Session(pool.acquire().await?),
            Pooler::Transaction => ServingConn::Transaction(pool.begin().await?),
        })
    }

    pub fn conn(&mut self) -> &mut sqlx::PgConnection {
        match self {
            ServingConn::Session(c) => c,
            ServingConn::Transaction(tx) => tx,
        }
    }

    /// Whether statements on it may be named (`persistent`).
    pub fn named(&self) -> bool {
        matches!(self, ServingConn::Session(_))
    }

    /// Commits the transaction, if there is one.
    pub async fn finish(self) -> Result<(), sqlx::Error> {
        match self {
            ServingConn::Session(_) => Ok(()),
            ServingConn::Transaction(tx) => tx.commit().await,
        }
    }
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Connections of this pool (for the tenant pool: all its sub-pools
    /// together), whatever the number of tenants.
    pub max_connections: u32,
    /// Sub-pools of the tenant pool (1: no affinity; 0: one per
    /// connection).
    pub sub_pools: u32,
    /// How many more transactions than its connections a tenant's home
    /// sub-pool may have (running or waiting) before a transaction goes to
    /// the tenant's second choice instead (when that one is less loaded).
    /// Higher keeps tenants on fewer connections; lower balances sooner.
    pub spill_margin: u32,
    /// Each backend caches catalog entries of every tenant schema it touches
    /// (~58 KB per tenant, never evicted), so connections are recycled.
    pub max_lifetime: Duration,
    pub idle_timeout: Duration,
    pub acquire_timeout: Duration,
    /// Prepared statements kept per connection (see `router::StatementMode`).
    pub statement_cache: usize,
    pub pooler: Pooler,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_connections: 16,
            sub_pools: DEFAULT_SUB_POOLS,
            spill_margin: DEFAULT_SPILL_MARGIN,
            max_lifetime: Duration::from_secs(15 * 60),
            idle_timeout: Duration::from_secs(5 * 60),
            acquire_timeout: Duration::from_secs(10),
            statement_cache: 1024,
            pooler: Pooler::None,
        }
    }
}

/// Sub-pools of a default tenant pool: see docs/scaling.md for the
/// measurements behind it.
pub const DEFAULT_SUB_POOLS: u32 = 0;
/// See [`PoolConfig::spill_margin`] and docs/scaling.md.
pub const DEFAULT_SPILL_MARGIN: u32 = 8;

/// How long a transaction waits for its home sub-pool before the second
/// choice may serve it too: well above a normal transaction's time, far
/// below what a request should wait behind a stuck neighbour.
pub const SPILL_AFTER: Duration = Duration::from_millis(10);

/// How far back a sub-pool's slow holds count (the time constant of their
/// decay): a few of a noisy tenant's slow transactions, short enough that a
/// sub-pool it left is soon waited for again.
const SLOW_WINDOW: Duration = Duration::from_millis(100);

/// `value` after `elapsed_us` of decay with [`SLOW_WINDOW`] as time
/// constant.
fn decayed(value: u64, elapsed_us: u64) -> f64 {
    value as f64 * (-(elapsed_us as f64) / SLOW_WINDOW.as_micros() as f64).exp()
}

fn options(config: &PoolConfig, max_connections: u32) -> PgPoolOptions {
    let set_session = config.pooler == Pooler::None;
    PgPoolOptions::new()
        .max_connections(max_connections)
        .max_lifetime(config.max_lifetime)
        .idle_timeout(config.idle_timeout)
        .acquire_timeout(config.acquire_timeout)
        // The ping costs a round trip per request; broken connections surface
        // as errors on use and are replaced, and lifetimes are bounded.
        .test_before_acquire(false)
        .after_connect(move |conn, _meta| {
            Box::pin(async move {
                // Behind a transaction pooler this would set another
                // client's session, and not reliably ours.
                if set_session {
                    conn.execute("SET search_path TO ''").await?;
                }
                Ok(())
            })
        })
}

fn connect_options(url: &str, config: &PoolConfig) -> Result<PgConnectOptions, sqlx::Error> {
    let options: PgConnectOptions = url.parse()?;
    let cache = if config.pooler.named_statements() {
        config.statement_cache
    } else {
        0
    };
    Ok(options.statement_cache_capacity(cache))
}

/// Opens one pool of `config.max_connections` (registry, admin, CLI).
pub async fn connect(url: &str, config: &PoolConfig) -> Result<PgPool, sqlx::Error> {
    options(config, config.max_connections)
        .connect_with(connect_options(url, config)?)
        .await
}

/// Like [`connect`], opening connections on first use.
pub fn connect_lazy(url: &str, config: &PoolConfig) -> Result<PgPool, sqlx::Error> {
    Ok(options(config, config.max_connections).connect_lazy_with(connect_options(url, config)?))
}

/// The tenant pool: sub-pools with tenant affinity.
#[derive(Clone)]
pub struct TenantPool {
    subs: Arc<[SubPool]>,
    spill_margin: usize,
    statement_cache: usize,
    pooler: Pooler,
    /// What it was made with: a replica's tenant pool is made alike.
    config: Arc<PoolConfig>,
}

struct SubPool {
    pool: Pool,
    max: u32,
    /// Transactions holding or waiting for one of its connections.
    load: AtomicUsize,
    /// Time its connections spent in slow holds (each longer than
    /// [`SPILL_AFTER`]), microseconds, decaying with [`SLOW_WINDOW`] as time
    /// constant, as of `slow_at` (microseconds since `epoch`). Its share of
    /// the window says whether waiting for this sub-pool is pointless (a
    /// noisy tenant's slow requests, lock waits hold it). Counted in time,
    /// not per hold: counted per hold, the 1 ms holds of the tenants that
    /// got a noisy org's sub-pools in between its 40 ms ones kept their
    /// average at 1.5-7 ms, and those tenants waited at home for nothing;
    /// and one slow hold (a backend's first, its caches cold) stays a
    /// minority of the window, where an average weighted by length kept
    /// the sub-pool slow for its next twenty holds and sent tenants of the
    /// affinity test to a third backend.
    slow_hold_us: AtomicU64,
    slow_at: AtomicU64,
    /// Transactions holding one of its connections now, and the sum of the
    /// times they took it (microseconds since `epoch`): how long the current
    /// holds have lasted, before any of them ends and reaches the average.
    holding: AtomicUsize,
    held_since_sum: AtomicU64,
    epoch: Instant,
    /// A background task is opening a connection for it (see
    /// [`SubPool::connect_in_background`]).
    connecting: Arc<AtomicBool>,
}

impl SubPool {
    fn new(pool: Pool) -> Self {
        SubPool {
            max: pool.status().max_size as u32,
            pool,
            load: AtomicUsize::new(0),
            slow_hold_us: AtomicU64::new(0),
            slow_at: AtomicU64::new(0),
            holding: AtomicUsize::new(0),
            held_since_sum: AtomicU64::new(0),
            epoch: Instant::now(),
            connecting: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Opens a connection in a task of its own when this sub-pool has room
    /// for one and none idle. A transaction's wait for a sub-pool can be
    /// abandoned (its other choice frees first, or [`SPILL_AFTER`]
    /// passes), and a connection being opened inside that wait is dropped
    /// with it: when opening one takes longer than the other choice takes
    /// to free (a busy database, a remote one), a sub-pool could stay
    /// without a connection for good, each try paying a backend's start
    /// and authentication for nothing. Opened here, the connection joins
    /// the sub-pool whoever waits. One such task at a time.
    fn connect_in_background(&self) {
        let status = self.pool.status();
        let room = status.size < status.max_size;
        if !room || status.available > 0 || self.connecting.swap(true, Ordering::AcqRel) {
            return;
        }
        let (pool, connecting) = (self.pool.clone(), self.connecting.clone());
        tokio::spawn(async move {
            // dropped at once: back to the sub-pool, idle
            let _ = pool.get().await;
            connecting.store(false, Ordering::Release);
        });
    }

    /// Slow holds took more than half of its connections' time lately.
    fn holds_slowly(&self) -> bool {
        let connections = self.max.max(1) as f64;
        self.slow_share() / connections > 0.5
    }

    /// The decayed slow-hold time over [`SLOW_WINDOW`]: about the share of
    /// the window one connection spent in slow holds (summed over its
    /// connections).
    fn slow_share(&self) -> f64 {
        self.slow_share_at(Instant::now())
    }

    fn slow_share_at(&self, now: Instant) -> f64 {
        let (held, at) = (
            self.slow_hold_us.load(Ordering::Relaxed),
            self.slow_at.load(Ordering::Relaxed),
        );
        let now = now.saturating_duration_since(self.epoch).as_micros() as u64;
        decayed(held, now.saturating_sub(at)) / SLOW_WINDOW.as_micros() as f64
    }

    /// The transactions holding its connections now have held them longer
    /// than [`SPILL_AFTER`] on average: slow holds that have not ended yet,
    /// so the average does not know them.
    fn held_long_now(&self) -> bool {
        // The two counters are read apart: a hold starting or ending in
        // between skews one reading, which a heuristic can afford.
        let holding = self.holding.load(Ordering::Relaxed) as u64;
        if holding == 0 {
            return false;
        }
        let mean_since = self.held_since_sum.load(Ordering::Relaxed) / holding;
        self.micros_now().saturating_sub(mean_since) > SPILL_AFTER.as_micros() as u64
    }

    fn micros_now(&self) -> u64 {
        self.epoch.elapsed().as_micros().min(u64::MAX as u128) as u64
    }

    /// Counts one hold of `sample` microseconds if it was slow. Concurrent
    /// updates may lose one, which a heuristic can afford.
    fn record_hold(&self, sample: u64) {
        if sample <= SPILL_AFTER.as_micros() as u64 {
            return;
        }
        let now = self.micros_now();
        let (held, at) = (
            self.slow_hold_us.load(Ordering::Relaxed),
            self.slow_at.load(Ordering::Relaxed),
        );
        let held = decayed(held, now.saturating_sub(at)) as u64;
        self.slow_hold_us
            .store(held.saturating_add(sample), Ordering::Relaxed);
        self.slow_at.store(now, Ordering::Relaxed);
    }
}

/// Which sub-pool a tenant transaction runs on; releases its place when
/// dropped.
pub struct Placement {
    subs: Arc<[SubPool]>,
    index: usize,
    /// When it got its connection, in microseconds since its sub-pool's
    /// epoch (`None` while waiting).
    held_since: Option<u64>,
}

impl Placement {
    pub fn index(&self) -> usize {
        self.index
    }
}

impl Placement {
    fn holding(mut self) -> Self {
        let sub = &self.subs[self.index];
        let micros = sub.micros_now();
        sub.held_since_sum.fetch_add(micros, Ordering::Relaxed);
        sub.holding.fetch_add(1, Ordering::Relaxed);
        self.held_since = Some(micros);
        self
    }
}

impl Drop for Placement {
    fn drop(&mut self) {
        let sub = &self.subs[self.index];
        sub.load.fetch_sub(1, Ordering::Relaxed);
        if let Some(since) = self.held_since {
            sub.holding.fetch_sub(1, Ordering::Relaxed);
            sub.held_since_sum.fetch_sub(since, Ordering::Relaxed);
            sub.record_hold(sub.micros_now().saturating_sub(since));
        }
    }
}

/// A tenant sub-pool of `size` tokio-postgres connections, opened on first
/// use, with the same lifetimes and session setting as [`options`] gives
/// sqlx's pools.
fn tenant_sub_pool(pg: &tokio_postgres::Config, config: &PoolConfig, size: u32) -> Pool {
    let manager = TenantConnector {
        pg: pg.clone(),
        set_session: config.pooler == Pooler::None,
        statement_cache: if config.pooler.named_statements() {
            config.statement_cache
        } else {
            0
        },
    };
    let (max_lifetime, idle_timeout) = (config.max_lifetime, config.idle_timeout);
    Pool::builder(manager)
        .max_size(size.max(1) as usize)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(config.acquire_timeout))
        .create_timeout(Some(config.acquire_timeout))
        .pre_recycle(Hook::sync_fn(move |_, metrics| {
            if metrics.age() > max_lifetime || metrics.last_used() > idle_timeout {
                return Err(HookError::message("past its lifetime or idle too long"));
            }
            Ok(())
        }))
        .build()
        .expect("a runtime and a size are set")
}

/// Connection settings of a URL for tokio-postgres, named like sqlx's.
fn tenant_connect_config(url: &str) -> Result<tokio_postgres::Config, sqlx::Error> {
    let mut pg: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| sqlx::Error::Configuration(e.into()))?;
    if pg.get_application_name().is_none() {
        pg.application_name("tenantry");
    }
    Ok(pg)
}

impl TenantPool {
    /// Connects lazily: connections open on first use. `max_connections` is
    /// spread over `sub_pools` (each gets at least one).
    pub fn connect_lazy(url: &str, config: &PoolConfig) -> Result<Self, sqlx::Error> {
        let k = match config.sub_pools {
            0 => config.max_connections.max(1),
            k => k.clamp(1, config.max_connections.max(1)),
        };
        let pg = tenant_connect_config(url)?;
        let subs: Arc<[SubPool]> = (0..k)
            .map(|i| {
                // the remainder goes to the first sub-pools
                let size = config.max_connections / k + u32::from(i < config.max_connections % k);
                SubPool::new(tenant_sub_pool(&pg, config, size.max(1)))
            })
            .collect();
        spawn_reaper(&subs, config);
        Ok(TenantPool {
            subs,
            spill_margin: config.spill_margin as usize,
            statement_cache: config.statement_cache,
            pooler: config.pooler,
            config: Arc::new(config.clone()),
        })
    }

    /// The configuration it was made with.
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// A tenant pool of one sub-pool of `config.max_connections` (no
    /// affinity), for scripts and tests.
    pub fn single(url: &str, config: &PoolConfig) -> Result<Self, sqlx::Error> {
        TenantPool::connect_lazy(
            url,
            &PoolConfig {
                sub_pools: 1,
                ..config.clone()
            },
        )
    }

    /// The tenant's two candidate sub-pools: (home, second choice).
    pub fn candidates(&self, tenant: &Uuid) -> (usize, usize) {
        let k = self.subs.len();
        if k == 1 {
            return (0, 0);
        }
        // Org ids are random (v4): their bits are already well mixed.
        let (hi, lo) = tenant.as_u64_pair();
        let home = (lo % k as u64) as usize;
        let step = 1 + (hi % (k as u64 - 1)) as usize;
        (home, (home + step) % k)
    }

    fn placement(&self, index: usize) -> Placement {
        self.subs[index].load.fetch_add(1, Ordering::Relaxed);
        Placement {
            subs: self.subs.clone(),
            index,
            held_since: None,
        }
    }

    /// A connection for a transaction of `tenant`, from its home sub-pool
    /// when home has one free or frees one soon; otherwise from whichever of
    /// home and the second choice frees one first. The second choice is
    /// considered at once when home holds `spill_margin` more transactions
    /// than connections (and the second choice fewer), or when home is held
    /// slowly: holds longer than [`SPILL_AFTER`] (a noisy tenant's slow
    /// requests, lock waits) took most of its time over the last
    /// [`SLOW_WINDOW`] or so, or its current holders have lasted that long;
    /// else after waiting [`SPILL_AFTER`] at home.
    ///
    /// When both choices are held slowly, now or at a look every
    /// [`SPILL_AFTER`] while waiting, the least loaded other sub-pool serves
    /// too if it is not held slowly itself, unless the tenant's own admitted transactions (`in_flight`, this
    /// one included; 0 when nothing counts them) outnumber its two choices'
    /// connections: then it is what fills them, and it waits for them
    /// instead of spreading to its neighbours' homes. Waiting is cancel-safe.
    pub async fn acquire(
        &self,
        tenant: &Uuid,
        in_flight: usize,
    ) -> Result<(TenantConn, Placement), sqlx::Error> {
        let (home, alt) = self.candidates(tenant);
        let sub = |i: usize| &self.subs[i];
        if let Some(conn) = sub(home).try_get() {
            return Ok((conn, self.placement(home).holding()));
        }
        let waiting = self.placement(home);
        sub(home).connect_in_background();
        if home == alt {
            return Ok((sub(home).get().await?, waiting.holding()));
        }
        let load = |i: usize| sub(i).load.load(Ordering::Relaxed);
        let capacity = |i: usize| sub(i).max as usize;
        // Slow holds took most of its time lately, or the transactions
        // holding it now have lasted long: a slow hold counts only once it
        // ends.
        let slow = |i: usize| sub(i).holds_slowly() || sub(i).held_long_now();
        let congested = (load(home) > capacity(home) + self.spill_margin && load(alt) < load(home))
            || slow(home);
        if !congested {
            if let Ok(conn) = tokio::time::timeout(SPILL_AFTER, sub(home).get()).await {
                return Ok((conn?, waiting.holding()));
            }
        }
        let also = self.placement(alt);
        sub(alt).connect_in_background();
        // Another tenant may hold both of this tenant's choices with slow
        // transactions: its own two choices are the same pair about once in
        // k(k-1)/2 tenants, and without a third choice those neighbours
        // would queue behind it. Only slow holds open the third: under
        // quick traffic a tenant stays on its two, which is what keeps each
        // backend's tenant set small.
        let may_escape = self.subs.len() >= 3 && in_flight <= capacity(home) + capacity(alt);
        // The third: the least loaded other sub-pool, if it is not held
        // slowly itself. When every sub-pool is slow (the database or the
        // machine is, not a neighbour), leaving the pair buys nothing and
        // costs affinity.
        let escape = || {
            if !(may_escape && slow(home) && slow(alt)) {
                return None;
            }
            let third = self.least_loaded_except(home, alt);
            (!slow(third)).then_some(third)
        };
        let mut third = escape();
        if third.is_none() {
            let pair = async {
                tokio::select! {
                    conn = sub(home).get() => Ok::<_, sqlx::Error>((conn?, true)),
                    conn = sub(alt).get() => Ok((conn?, false)),
                }
            };
            tokio::pin!(pair);
            let got = if may_escape {
                // Holds that were young then may have lasted long by now:
                // looked at again every SPILL_AFTER. Once was not enough: a
                // tenant sharing a noisy org's pair, arriving as the noisy
                // org started, waited out one of its 40 ms holds (65 ms).
                loop {
                    match tokio::time::timeout(SPILL_AFTER, &mut pair).await {
                        Ok(got) => break Some(got?),
                        Err(_) => {
                            third = escape();
                            if third.is_some() {
                                break None;
                            }
                        }
                    }
                }
            } else {
                Some(pair.await?)
            };
            if let Some((conn, at_home)) = got {
                return Ok((conn, if at_home { waiting } else { also }.holding()));
            }
        }
        let third = third.expect("a third sub-pool was chosen");
        let spilled = self.placement(third);
        sub(third).connect_in_background();
        // in order: the third only when neither of the pair is free, so a
        // stale average never moves a tenant off a pair with room
        tokio::select! {
            biased;
            conn = sub(home).get() => Ok((conn?, waiting.holding())),
            conn = sub(alt).get() => Ok((conn?, also.holding())),
            conn = sub(third).get() => Ok((conn?, spilled.holding())),
        }
    }

    /// The sub-pool with the fewest transactions holding or waiting, other
    /// than `a` and `b` (there are at least three).
    fn least_loaded_except(&self, a: usize, b: usize) -> usize {
        (0..self.subs.len())
            .filter(|i| *i != a && *i != b)
            .min_by_key(|i| self.subs[*i].load.load(Ordering::Relaxed))
            .expect("at least three sub-pools")
    }

    pub fn pooler(&self) -> Pooler {
        self.pooler
    }

    pub fn sub_pool_count(&self) -> usize {
        self.subs.len()
    }

    /// Prepared statements each connection keeps.
    pub fn statement_cache(&self) -> usize {
        self.statement_cache
    }

    pub fn sub_pools(&self) -> impl Iterator<Item = &Pool> {
        self.subs.iter().map(|s| &s.pool)
    }

    /// Connections over all sub-pools at most.
    pub fn max_connections(&self) -> u32 {
        self.subs.iter().map(|s| s.max).sum()
    }

    /// Open connections over all sub-pools.
    pub fn size(&self) -> u32 {
        self.subs.iter().map(|s| s.pool.status().size as u32).sum()
    }

    pub fn num_idle(&self) -> usize {
        self.subs.iter().map(|s| s.pool.status().available).sum()
    }

    pub async fn close(&self) {
        for s in self.subs.iter() {
            s.pool.close();
        }
    }
}

/// Closes idle connections past `idle_timeout` or `max_lifetime` every few
/// seconds (deadpool checks them only when they are taken), until the pool
/// is dropped.
fn spawn_reaper(subs: &Arc<[SubPool]>, config: &PoolConfig) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let pools: Vec<_> = subs.iter().map(|s| s.pool.weak()).collect();
    let (max_lifetime, idle_timeout) = (config.max_lifetime, config.idle_timeout);
    let every = idle_timeout
        .min(max_lifetime)
        .clamp(Duration::from_millis(100), Duration::from_secs(30));
    runtime.spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let mut alive = false;
            for pool in pools.iter().filter_map(|p| p.upgrade()) {
                alive = true;
                pool.retain(|_, m| m.age() < max_lifetime && m.last_used() < idle_timeout);
            }
            if !alive {
                return;
            }
        }
    });
}

impl SubPool {
    /// An idle connection now, if there is one.
    fn try_get(&self) -> Option<TenantConn> {
        if self.pool.status().available == 0 {
            return None;
        }
        let now = deadpool::managed::Timeouts {
            wait: Some(Duration::ZERO),
            ..self.pool.timeouts()
        };
        // may open one when the idle one just went: a connect, as the wait
        // would have done
        futures_util::FutureExt::now_or_never(self.pool.timeout_get(&now)).and_then(Result::ok)
    }

    /// A connection, waiting up to the acquire timeout.
    async fn get(&self) -> Result<TenantConn, sqlx::Error> {
        self.pool.get().await.map_err(pool_error)
    }
}

/// A deadpool error as the sqlx error the rest of the crate knows.
fn pool_error(e: deadpool::managed::PoolError<tokio_postgres::Error>) -> sqlx::Error {
    use deadpool::managed::PoolError;
    match e {
        PoolError::Timeout(_) => sqlx::Error::PoolTimedOut,
        PoolError::Closed | PoolError::NoRuntimeSpecified => sqlx::Error::PoolClosed,
        PoolError::Backend(e) => crate::pg::pipeline::driver_error(e),
        PoolError::PostCreateHook(e) => sqlx::Error::Io(std::io::Error::other(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub_pool() -> SubPool {
        // never connects: only the hold bookkeeping is exercised; one
        // connection, like each of the default sub-pools
        let pg = tenant_connect_config("postgres://nowhere/none").unwrap();
        SubPool::new(tenant_sub_pool(&pg, &PoolConfig::default(), 1))
    }

    #[tokio::test]
    async fn quick_holds_beside_slow_ones_do_not_hide_them() {
        let sub = sub_pool();
        // a noisy tenant's 40 ms holds with twenty 1 ms holds between each
        // (counted per hold, the average would be 2.9 ms)
        for _ in 0..5 {
            sub.record_hold(40_000);
            for _ in 0..20 {
                sub.record_hold(1_000);
            }
        }
        assert!(sub.holds_slowly(), "{}", sub.slow_share());
    }

    #[tokio::test]
    async fn one_slow_hold_does_not_mark_a_sub_pool_slow_but_a_run_does() {
        let sub = sub_pool();
        sub.record_hold(40_000);
        assert!(!sub.holds_slowly(), "{}", sub.slow_share());
        sub.record_hold(40_000);
        assert!(sub.holds_slowly(), "{}", sub.slow_share());
    }

    #[tokio::test]
    async fn slow_holds_are_forgotten_within_a_few_windows() {
        let mut sub = sub_pool();
        // a 5 s lock wait that ended at `ended`, 0.1 s into the sub-pool's life
        sub.epoch -= Duration::from_secs(10);
        let ended = 100_000;
        sub.slow_hold_us.store(5_000_000, Ordering::Relaxed);
        sub.slow_at.store(ended, Ordering::Relaxed);
        let at = |after: Duration| sub.epoch + Duration::from_micros(ended) + after;
        assert!(sub.slow_share_at(at(SLOW_WINDOW * 3)) > 0.5);
        assert!(sub.slow_share_at(at(SLOW_WINDOW * 6)) < 0.5);
    }

    #[tokio::test]
    async fn holds_of_any_length_fit() {
        let sub = sub_pool();
        for _ in 0..100 {
            sub.record_hold(u64::MAX);
        }
        assert!(sub.holds_slowly());
    }
}
