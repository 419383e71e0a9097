//! Streaming replicas for tenant reads, with read-your-writes per org.
//!
//! Each replica has its own tenant pool (tenant-affine sub-pools, like the
//! primary's) and a probe connection. A poller asks every replica how far
//! it has replayed (`pg_last_wal_replay_lsn()`) and the primary how far it
//! has written, every [`ReplicaConfig::poll`]: a replica's lag is the time
//! since the primary was where the replica is now.
//!
//! The position of each org's last write through this process (read right
//! after its COMMIT, in the same write) is kept per org. A read of org X
//! may go to a replica that is up, lags at most `max_lag`, and has replayed
//! at least the largest of: X's last write here, the position the client
//! sent (`Tenantry-Position`), and the floor (raised by org changes, and by
//! positions forgotten for room). Otherwise it goes to the primary.
//!
//! A position is kept until it is idle for `max_lag` plus a margin: by
//! then any replica within `max_lag` has replayed it, so forgetting it
//! changes no choice. One forgotten early (the map is full) raises the
//! floor instead, which holds every org to it: safe, and only costs reads
//! on the primary until the replicas pass it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use moka::notification::RemovalCause;
use sqlx::PgPool;
use uuid::Uuid;

use crate::base::lsn::Lsn;
use crate::pg::pools::{PoolConfig, TenantPool};

#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// A replica further behind than this serves no read.
    pub max_lag: Duration,
    /// How often replicas and the primary are asked for their positions.
    pub poll: Duration,
    /// Orgs whose last write position is kept (beyond: see the floor).
    pub max_orgs: u64,
}

/// The default of `--replica-max-lag`.
pub const DEFAULT_MAX_LAG: Duration = Duration::from_secs(5);

impl Default for ReplicaConfig {
    fn default() -> Self {
        ReplicaConfig {
            max_lag: DEFAULT_MAX_LAG,
            poll: Duration::from_millis(100),
            max_orgs: 100_000,
        }
    }
}

/// How long a probe may take before its replica counts as down.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Kept beyond `max_lag`: a poll's age, and the time between a write's
/// commit and its position being noted.
const POSITION_MARGIN: Duration = Duration::from_secs(1);

/// One replica: its tenant pool and what the poller last learnt of it.
pub struct Replica {
    /// `host:port`, for logs and metric labels (no credentials).
    name: String,
    tenants: TenantPool,
    probe: PgPool,
    replayed: AtomicU64,
    /// Milliseconds; `u64::MAX` until known.
    lag_ms: AtomicU64,
    up: AtomicBool,
    /// Reads it served.
    served: AtomicU64,
}

impl Replica {
    /// Reads it served since the server started.
    pub fn reads_served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    pub(crate) fn served_one(&self) {
        self.served.fetch_add(1, Ordering::Relaxed);
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn tenant_pool(&self) -> &TenantPool {
        &self.tenants
    }

    /// Replayed up to here, as of the last poll.
    pub fn replayed(&self) -> Lsn {
        Lsn(self.replayed.load(Ordering::Acquire))
    }

    /// Its lag as of the last poll (`None`: down or not polled yet).
    pub fn lag(&self) -> Option<Duration> {
        let ms = self.lag_ms.load(Ordering::Relaxed);
        (self.is_up() && ms != u64::MAX).then(|| Duration::from_millis(ms))
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// A read on it failed with a dead connection: no reads until the
    /// poller reaches it again.
    pub fn mark_down(&self) {
        if self.up.swap(false, Ordering::AcqRel) {
            tracing::warn!(replica = %self.name, "replica unreachable; reading from the primary");
        }
    }
}

/// The replicas of a server and the write positions of its orgs.
pub struct Replicas {
    replicas: Box<[Replica]>,
    positions: moka::sync::Cache<Uuid, Arc<AtomicU64>>,
    floor: Arc<AtomicU64>,
    config: ReplicaConfig,
    fallbacks: AtomicU64,
    /// Until then (microseconds since `epoch`), every read goes to the
    /// primary: an org changed and the primary's position could not be
    /// read.
    primary_only_until: AtomicU64,
    epoch: Instant,
}

impl Replicas {
    /// Reads chosen for a replica that ran on the primary after failing
    /// there.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }

    pub(crate) fn fell_back(&self) {
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    /// Replicas at `urls` (the serving role's credentials), each with a
    /// tenant pool shaped by `pools`; connections open on first use.
    pub fn connect_lazy(
        urls: &[String],
        pools: &PoolConfig,
        config: ReplicaConfig,
    ) -> Result<Replicas, sqlx::Error> {
        let replicas = urls
            .iter()
            .map(|url| {
                let name = url::Url::parse(url)
                    .ok()
                    .map(|u| {
                        format!(
                            "{}:{}",
                            u.host_str().unwrap_or("?"),
                            u.port().unwrap_or(5432)
                        )
                    })
                    .unwrap_or_else(|| "replica".into());
                let tenant_config = PoolConfig {
                    // a replica that stops answering is skipped by the
                    // poller within a second; a read should not wait longer
                    acquire_timeout: pools.acquire_timeout.min(Duration::from_secs(2)),
                    ..pools.clone()
                };
                let probe_config = PoolConfig {
                    max_connections: 1,
                    acquire_timeout: PROBE_TIMEOUT,
                    statement_cache: 0,
                    ..pools.clone()
                };
                Ok(Replica {
                    name,
                    tenants: TenantPool::connect_lazy(url, &tenant_config)?,
                    probe: crate::pg::pools::connect_lazy(url, &probe_config)?,
                    replayed: AtomicU64::new(0),
                    lag_ms: AtomicU64::new(u64::MAX),
                    up: AtomicBool::new(false),
                    served: AtomicU64::new(0),
                })
            })
            .collect::<Result<Box<[Replica]>, sqlx::Error>>()?;
        let floor = Arc::new(AtomicU64::new(0));
        let evicted = floor.clone();
        let positions = moka::sync::Cache::builder()
            .max_capacity(config.max_orgs)
            .time_to_idle(config.max_lag + POSITION_MARGIN)
            .eviction_listener(move |_, position: Arc<AtomicU64>, cause| {
                // expired: every replica within the lag bound has it
                if cause == RemovalCause::Size {
                    evicted.fetch_max(position.load(Ordering::Acquire), Ordering::AcqRel);
                }
            })
            .build();
        Ok(Replicas {
            replicas,
            positions,
            floor,
            config,
            fallbacks: AtomicU64::new(0),
            primary_only_until: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    pub fn replicas(&self) -> &[Replica] {
        &self.replicas
    }

    pub fn config(&self) -> &ReplicaConfig {
        &self.config
    }

    /// A write of `org` committed at or before `position`.
    pub fn note_write(&self, org: &Uuid, position: Lsn) {
        self.positions
            .get_with(*org, || Arc::new(AtomicU64::new(0)))
            .fetch_max(position.0, Ordering::AcqRel);
    }

    /// The position a replica must have replayed to serve `org`'s reads
    /// with everything written through this process (and before `floor`).
    pub fn position_of(&self, org: &Uuid) -> Lsn {
        let own = self
            .positions
            .get(org)
            .map_or(0, |p| p.load(Ordering::Acquire));
        Lsn(own.max(self.floor.load(Ordering::Acquire)))
    }

    /// Holds every org's reads to `position` (an org changed: created,
    /// imported, suspended; its schema may be half-replayed before it).
    pub fn raise_floor(&self, position: Lsn) {
        self.floor.fetch_max(position.0, Ordering::AcqRel);
    }

    /// Sends every read to the primary for the lag bound (plus a margin):
    /// an org changed at an unknown position, which by then every replica
    /// within the bound has replayed.
    pub fn primary_only_for_a_while(&self) {
        let until = self.epoch.elapsed() + self.config.max_lag + POSITION_MARGIN;
        self.primary_only_until
            .fetch_max(until.as_micros() as u64, Ordering::AcqRel);
    }

    /// A replica that may serve `org` a read that must see `at_least`:
    /// up, within the lag bound, replayed far enough. Among several, the
    /// org's own (by its id), so that an org's reads use one replica's
    /// caches.
    pub fn choose(&self, org: &Uuid, at_least: Lsn) -> Option<&Replica> {
        let needed = self.position_of(org).max(at_least);
        let max_lag = self.config.max_lag.as_millis() as u64;
        let n = self.replicas.len();
        if n == 0 {
            return None;
        }
        let held = self.primary_only_until.load(Ordering::Acquire);
        if held > 0 && (self.epoch.elapsed().as_micros() as u64) < held {
            return None;
        }
        let first = (org.as_u128() % n as u128) as usize;
        (0..n).map(|i| &self.replicas[(first + i) % n]).find(|r| {
            r.is_up()
                && r.lag_ms.load(Ordering::Relaxed) <= max_lag
                && r.replayed.load(Ordering::Acquire) >= needed.0
        })
    }

    /// Polls the replicas every `poll` until `replicas` is dropped.
    pub fn spawn_poller(replicas: &Arc<Replicas>, primary: PgPool) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Replicas> = Arc::downgrade(replicas);
        let every = replicas.config.poll;
        tokio::spawn(async move {
            let mut history = PrimaryHistory::default();
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(replicas) = weak.upgrade() else {
                    return;
                };
                replicas.poll(&primary, &mut history).await;
            }
        })
    }

    async fn poll(&self, primary: &PgPool, history: &mut PrimaryHistory) {
        // the primary first: a replica at its position then lags by nothing
        match probe(primary, "SELECT pg_current_wal_lsn()::text").await {
            Ok(Some(at)) => history.push(Instant::now(), at, self.config.max_lag + POSITION_MARGIN),
            Ok(None) | Err(_) => {
                tracing::debug!("could not read the primary's WAL position");
            }
        }
        let polls = self.replicas.iter().map(|replica| async move {
            let replayed = probe(&replica.probe, "SELECT pg_last_wal_replay_lsn()::text").await;
            (replica, replayed)
        });
        for (replica, replayed) in futures_util::future::join_all(polls).await {
            match replayed {
                Ok(Some(at)) => {
                    replica.replayed.store(at.0, Ordering::Release);
                    let lag = history
                        .lag_of(Instant::now(), at)
                        .map_or(u64::MAX, |l| l.as_millis() as u64);
                    replica.lag_ms.store(lag, Ordering::Relaxed);
                    if !replica.up.swap(true, Ordering::AcqRel) {
                        tracing::info!(replica = %replica.name, position = %at, "replica serving reads");
                    }
                }
                Ok(None) => {
                    // not in recovery: promoted, or not a replica at all
                    if replica.up.swap(false, Ordering::AcqRel) {
                        tracing::warn!(replica = %replica.name,
                            "no longer a replica (promoted?); reading from the primary");
                    }
                }
                Err(e) => {
                    if replica.up.swap(false, Ordering::AcqRel) {
                        tracing::warn!(replica = %replica.name, error = %e,
                            "replica unreachable; reading from the primary");
                    }
                }
            }
            crate::telemetry::replica_state(&replica.name, replica.is_up(), replica.lag());
        }
    }
}

/// Asks `pool` for a WAL position (NULL is `None`), in one simple-query
/// message: no prepared statement, which a transaction pooler in front
/// of the primary could lose between messages.
pub(crate) async fn probe(pool: &PgPool, sql: &'static str) -> Result<Option<Lsn>, sqlx::Error> {
    use sqlx::Row;
    let ask = sqlx::raw_sql(sql).fetch_one(pool);
    let row = tokio::time::timeout(PROBE_TIMEOUT, ask)
        .await
        .map_err(|_| sqlx::Error::PoolTimedOut)??;
    let text: Option<String> = row.try_get(0)?;
    Ok(text.and_then(|t| Lsn::parse(&t).ok()))
}

/// The primary's write position at each poll of the last `max_lag` (plus a
/// margin): how long ago the primary was where a replica is now.
#[derive(Default)]
struct PrimaryHistory {
    samples: std::collections::VecDeque<(Instant, Lsn)>,
}

impl PrimaryHistory {
    fn push(&mut self, now: Instant, at: Lsn, keep: Duration) {
        self.samples.push_back((now, at));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > keep)
        {
            self.samples.pop_front();
        }
    }

    /// The time since the last poll at which the primary had written no
    /// more than `replayed`: the replica has everything written up to
    /// then. `None` when that is older than the history (too far behind).
    fn lag_of(&self, now: Instant, replayed: Lsn) -> Option<Duration> {
        self.samples
            .iter()
            .rev()
            .find(|(_, at)| *at <= replayed)
            .map(|(t, _)| now.saturating_duration_since(*t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_replicas(max_orgs: u64) -> Replicas {
        let urls = [
            "postgres://u:p@127.0.0.1:1/db".to_owned(),
            "postgres://u:p@127.0.0.1:2/db".to_owned(),
        ];
        let config = ReplicaConfig {
            max_orgs,
            ..ReplicaConfig::default()
        };
        Replicas::connect_lazy(&urls, &PoolConfig::default(), config).unwrap()
    }

    fn set(r: &Replica, up: bool, replayed: u64, lag_ms: u64) {
        r.up.store(up, Ordering::Release);
        r.replayed.store(replayed, Ordering::Release);
        r.lag_ms.store(lag_ms, Ordering::Relaxed);
    }

    #[tokio::test]
    async fn a_replica_serves_an_org_only_past_its_writes_the_clients_and_the_floor() {
        let replicas = two_replicas(1000);
        let org = Uuid::new_v4();
        assert!(replicas.choose(&org, Lsn(0)).is_none(), "not polled yet");
        let [a, b] = &*replicas.replicas else {
            panic!()
        };
        set(a, true, 100, 10);
        set(b, true, 50, 10);
        assert!(replicas.choose(&org, Lsn(0)).is_some());
        // the org wrote at 80: only the replica at 100 may serve it
        replicas.note_write(&org, Lsn(80));
        assert_eq!(replicas.choose(&org, Lsn(0)).unwrap().name(), "127.0.0.1:1");
        // a smaller later-noted write does not lower it
        replicas.note_write(&org, Lsn(60));
        assert_eq!(replicas.position_of(&org), Lsn(80));
        // the client's position beyond both: the primary
        assert!(replicas.choose(&org, Lsn(101)).is_none());
        // another org is not held back by this one's writes
        assert!(replicas.choose(&Uuid::new_v4(), Lsn(0)).is_some());
        // down, or too far behind: skipped
        set(a, false, 100, 10);
        assert!(replicas.choose(&org, Lsn(0)).is_none());
        set(a, true, 100, DEFAULT_MAX_LAG.as_millis() as u64 + 1);
        assert!(replicas.choose(&org, Lsn(0)).is_none());
        set(a, true, 100, 10);
        // an org change at 120 holds every org
        replicas.raise_floor(Lsn(120));
        assert!(replicas.choose(&Uuid::new_v4(), Lsn(0)).is_none());
        set(b, true, 130, 10);
        assert_eq!(replicas.choose(&org, Lsn(0)).unwrap().name(), "127.0.0.1:2");
        // at an unknown position: nothing but the primary for a while
        replicas.primary_only_for_a_while();
        assert!(replicas.choose(&org, Lsn(0)).is_none());
    }

    #[tokio::test]
    async fn a_position_forgotten_for_room_raises_the_floor() {
        let replicas = two_replicas(1);
        for i in 1..=50u64 {
            replicas.note_write(&Uuid::new_v4(), Lsn(i * 10));
            replicas.positions.run_pending_tasks();
        }
        // at most one kept; every one evicted raised the floor to its own
        assert!(replicas.positions.entry_count() <= 1);
        let floor = replicas.floor.load(Ordering::Acquire);
        assert!(floor >= 480, "floor {floor}");
        assert!(replicas.position_of(&Uuid::new_v4()) >= Lsn(480));
    }

    #[test]
    fn lag_is_the_time_since_the_primary_was_where_the_replica_is() {
        let mut history = PrimaryHistory::default();
        let keep = Duration::from_secs(60);
        let start = Instant::now();
        let ms = |n| start + Duration::from_millis(n);
        history.push(ms(0), Lsn(100), keep);
        history.push(ms(100), Lsn(200), keep);
        history.push(ms(200), Lsn(200), keep);
        // behind everything kept: unknown, so too far
        assert_eq!(history.lag_of(ms(250), Lsn(99)), None);
        // has what the primary had at 0 ms, not what it had at 100 ms
        assert_eq!(
            history.lag_of(ms(250), Lsn(150)),
            Some(Duration::from_millis(250))
        );
        // caught up (or past: read after the primary): one poll's age
        assert_eq!(
            history.lag_of(ms(250), Lsn(200)),
            Some(Duration::from_millis(50))
        );
        assert_eq!(
            history.lag_of(ms(250), Lsn(250)),
            Some(Duration::from_millis(50))
        );
        // samples older than `keep` go
        history.push(ms(70_000), Lsn(300), keep);
        assert_eq!(history.lag_of(ms(70_000), Lsn(150)), None);
    }
}
