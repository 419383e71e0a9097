//! The tenant router: resolves an org slug to its tenant through a moka cache
//! and opens tenant transactions that run as the tenant's role with a
//! `search_path` of exactly the tenant's schema then the shared schema,
//! both set transaction-locally in the same message as BEGIN, which is sent
//! in one write with the transaction's first statement (and, for reads,
//! with the ROLLBACK that ends it): one round trip per statement.
//!
//! Invariants this module carries (`docs/invariants.md`):
//! 1. a tenant transaction's search_path is the tenant schema, then the
//!    read-only shared schema: if the tenant schema vanished, queries fail
//!    instead of falling through to `public` (no tenant table is named like
//!    a shared one, checked when the templates load);
//! 2. no tenant state outlives the transaction: `SET LOCAL` ends with COMMIT
//!    or ROLLBACK, and [`TenantRouter::begin`] survives cancellation;
//! 7. the transaction runs as the tenant's role: PostgreSQL refuses the
//!    registry, `public` and other tenants' schemas (see `roles`);
//! 6. the cache is invalidated by `tenancy` (at once for this process's
//!    changes, through NOTIFY for others'; at worst the TTL bounds staleness).

use std::borrow::Cow;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;
use moka::Expiry;
use sqlx::PgPool;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

use crate::base::error::Error;
use crate::base::ident::{RoleName, SchemaName, Slug};
use crate::base::lsn::Lsn;
use crate::pg::pipeline::{FromTenantRow, Sent, TenantParam};
use crate::pg::pools::{Placement, PoolConfig, TenantConn, TenantPool};
use crate::registry::{self, OrgStatus, Principal};
use crate::serving::fairness::{FairnessConfig, TenantLimiter, TenantSlot};
use crate::serving::replicas::Replicas;

/// What the router knows about an org.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub id: Uuid,
    pub slug: Slug,
    pub schema: SchemaName,
    /// Its PostgreSQL role, which tenant transactions run as.
    pub role: RoleName,
    pub status: OrgStatus,
    pub template_version: i32,
    /// The BEGIN messages of its transactions (role, search path,
    /// timeouts), read-write and read-only, built once when the tenant is
    /// resolved.
    begin: Box<str>,
    begin_read: Box<str>,
}

impl Tenant {
    /// The message that opens its read-only transactions (BEGIN READ ONLY,
    /// role, search path, timeouts): for tools that measure the wire.
    pub fn read_begin(&self) -> &str {
        &self.begin_read
    }
}

/// How tenant SQL is sent, decided in [`TenantTx`] so that no handler has
/// to remember it. [`StatementMode::Auto`] (the default) chooses per-tenant
/// statements while each connection's share of the active tenants' statements
/// fits its statement cache, shared ones beyond. PostgreSQL re-plans a prepared statement whenever it runs
/// under another `search_path` than it was planned under, so a statement
/// shared by tenants is re-planned at (nearly) every tenant switch on a
/// connection; a statement per tenant keeps its plan but multiplies the
/// statements a connection must cache. See docs/scaling.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatementMode {
    /// [`StatementMode::PerTenant`] while (active tenants / sub-pools) x
    /// (distinct statements) fits in three quarters of a connection's
    /// statement cache, otherwise [`StatementMode::Shared`]: an LRU cache
    /// cycling through more statements than it holds misses every time,
    /// which costs more than re-planning a shared statement.
    Auto,
    /// The statement text carries the tenant's schema in a trailing comment:
    /// one prepared statement (and plan) per tenant and connection.
    PerTenant,
    /// One prepared statement per text, shared by all tenants (re-planned
    /// when the tenant changes).
    Shared,
    /// The unnamed statement: parsed and planned each time, nothing cached
    /// (what transaction-pooling PgBouncer 1.18 needs).
    Unnamed,
}

#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// How long a resolved tenant is trusted without asking the registry.
    pub ttl: Duration,
    /// How long an unknown slug is remembered as unknown.
    pub negative_ttl: Duration,
    pub max_tenants: u64,
    pub statements: StatementMode,
    /// `statement_timeout` of tenant transactions.
    pub statement_timeout: Duration,
    /// `lock_timeout` of tenant transactions: a request waiting this long
    /// for a lock fails (503 `tenant_busy`) instead of holding a connection.
    pub lock_timeout: Duration,
    /// How many transactions one tenant may have in flight, and how long
    /// the ones beyond wait (`None`: [`FairnessConfig::for_pool`] of the
    /// tenant pool).
    pub fairness: Option<FairnessConfig>,
    /// Count transactions per org for a `/metrics` family of the N busiest
    /// (0: off, the default; see `metrics::TOP_TENANTS`).
    pub top_tenants: usize,
    /// Run tenant transactions as the tenant's role (invariant 7). Only
    /// benchmarks turn it off, to measure what it costs.
    #[doc(hidden)]
    pub set_role: bool,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            ttl: Duration::from_secs(30),
            negative_ttl: Duration::from_secs(2),
            max_tenants: 100_000,
            statements: StatementMode::Auto,
            statement_timeout: Duration::from_secs(10),
            lock_timeout: Duration::from_secs(2),
            fairness: None,
            top_tenants: 0,
            set_role: true,
        }
    }
}

type Entry = Option<Arc<Tenant>>;

/// What a tenant transaction may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    ReadWrite,
    ReadOnly,
}

/// How a cache miss finds its org.
#[derive(Clone, Copy)]
enum Lookup<'a> {
    Slug(&'a Slug),
    Id(Uuid),
}

fn unshare(e: Arc<Error>) -> Error {
    match Arc::try_unwrap(e) {
        Ok(e) => e,
        Err(shared) => Error::Shared(shared),
    }
}

fn count_resolve(loaded: bool, found: &Entry) {
    crate::telemetry::resolve(match (loaded, found) {
        (true, _) => "miss",
        (false, Some(_)) => "hit",
        (false, None) => "negative_hit",
    });
}

/// Known tenants live for `ttl`, unknown slugs for `negative_ttl`.
struct EntryExpiry {
    ttl: Duration,
    negative_ttl: Duration,
}

impl<K> Expiry<K, Entry> for EntryExpiry {
    fn expire_after_create(&self, _: &K, value: &Entry, _: Instant) -> Option<Duration> {
        Some(match value {
            Some(_) => self.ttl,
            None => self.negative_ttl,
        })
    }
}

#[derive(Clone)]
pub struct TenantRouter {
    /// Registry lookups.
    control: PgPool,
    tenants: TenantPool,
    cache: Cache<Slug, Entry>,
    /// The tenants of org tokens, by org id: an org token is authorized
    /// against its own org before any slug is resolved, so the slugs a
    /// client makes up cost no registry query and no cache entry.
    by_id: Cache<Uuid, Entry>,
    /// Registry queries made to resolve orgs, by slug or by id.
    lookups: Arc<std::sync::atomic::AtomicU64>,
    statements: Arc<StatementRule>,
    /// `SET LOCAL` settings every tenant transaction starts with.
    settings: Arc<str>,
    limiter: Arc<TenantLimiter>,
    top_tenants: Option<Arc<crate::telemetry::TopTenants>>,
    set_role: bool,
    /// Where reads may go besides the primary (see `replicas`); `None`:
    /// every read on the primary, and no write positions read.
    replicas: Option<Arc<Replicas>>,
}

impl TenantRouter {
    /// A router resolving through `control` and running tenant
    /// transactions on `tenants`.
    pub fn new(control: PgPool, tenants: TenantPool, config: &RouterConfig) -> Self {
        let cache = Cache::builder()
            .max_capacity(config.max_tenants)
            .expire_after(EntryExpiry {
                ttl: config.ttl,
                negative_ttl: config.negative_ttl,
            })
            .build();
        let by_id = Cache::builder()
            .max_capacity(config.max_tenants)
            .expire_after(EntryExpiry {
                ttl: config.ttl,
                negative_ttl: config.negative_ttl,
            })
            .support_invalidation_closures()
            .build();
        let settings = format!(
            "SET LOCAL statement_timeout = {}; SET LOCAL lock_timeout = {}",
            config.statement_timeout.as_millis().max(1),
            config.lock_timeout.as_millis().max(1)
        );
        let pooler = tenants.pooler();
        let fairness = config
            .fairness
            .unwrap_or_else(|| FairnessConfig::for_pool(tenants.max_connections()));
        TenantRouter {
            control,
            tenants,
            limiter: TenantLimiter::new(fairness),
            top_tenants: crate::telemetry::TopTenants::new(config.top_tenants),
            cache,
            by_id,
            lookups: Default::default(),
            statements: Arc::new(StatementRule {
                // a transaction pooler has no named statements to offer
                mode: if pooler.named_statements() {
                    config.statements
                } else {
                    StatementMode::Unnamed
                },
                seen: Default::default(),
                distinct: Default::default(),
            }),
            settings: settings.into(),
            set_role: config.set_role,
            replicas: None,
        }
    }

    /// This router with reads going to `replicas` when they are far enough
    /// (see [`TenantRouter::read_after`]); its writes read their WAL
    /// position from then on. The caller polls them
    /// ([`Replicas::spawn_poller`]).
    pub fn with_replicas(mut self, replicas: Arc<Replicas>) -> Self {
        self.replicas = (!replicas.replicas().is_empty()).then_some(replicas);
        self
    }

    pub fn replicas(&self) -> Option<&Arc<Replicas>> {
        self.replicas.as_ref()
    }

    /// The position a read of `org` must see to include every write of it
    /// through this process (`None` without replicas): what a client sends
    /// back as `Tenantry-Position` to read its writes on another server.
    pub fn position_of(&self, org: &Uuid) -> Option<Lsn> {
        self.replicas.as_ref().map(|r| r.position_of(org))
    }

    /// Holds every org's replica reads to the primary's current position:
    /// an org changed (created, imported, suspended, deleted), and a
    /// replica may hold it half-replayed. Without replicas, nothing.
    pub async fn hold_reads_to_now(&self) {
        let Some(replicas) = &self.replicas else {
            return;
        };
        let now = crate::serving::replicas::probe(
            &self.control,
            "SELECT pg_current_wal_insert_lsn()::text",
        )
        .await;
        match now {
            Ok(Some(at)) => replicas.raise_floor(at),
            _ => {
                tracing::warn!("could not read the primary's WAL position after an org change; reading from the primary for a while");
                replicas.primary_only_for_a_while();
            }
        }
    }

    /// A router resolving through `pool` and running tenant transactions on
    /// one plain pool to `tenant_url` (no tenant affinity) of as many
    /// connections as `pool`, for scripts and tests.
    pub fn single(pool: PgPool, tenant_url: &str, config: &RouterConfig) -> Result<Self, Error> {
        let connections = PoolConfig {
            max_connections: pool.options().get_max_connections(),
            ..PoolConfig::default()
        };
        let tenants = TenantPool::single(tenant_url, &connections)?;
        Ok(TenantRouter::new(pool, tenants, config))
    }

    pub fn tenant_pool(&self) -> &TenantPool {
        &self.tenants
    }

    pub fn control_pool(&self) -> &PgPool {
        &self.control
    }

    /// The tenant for `slug`, or `None` for an unknown slug. A cache hit
    /// costs no SQL; concurrent misses for one slug share one registry query.
    pub async fn resolve(&self, slug: &Slug) -> Result<Option<Arc<Tenant>>, Error> {
        let loaded = std::sync::atomic::AtomicBool::new(false);
        let found = self
            .cache
            .try_get_with_by_ref(slug, self.load(&loaded, Lookup::Slug(slug)))
            .await
            .map_err(unshare)?;
        count_resolve(loaded.into_inner(), &found);
        Ok(found)
    }

    /// The tenant `slug` if the caller may use it: any org for a superuser;
    /// for an org token, its own org only, checked before the slug is
    /// looked up: the token's org is resolved by its id (cached), and any
    /// other slug is `None` at no cost, exactly like a slug that does not
    /// exist. So a token cannot make the server query the registry, fill
    /// its caches or time the difference between existing and missing orgs.
    pub async fn resolve_for(
        &self,
        principal: &Principal,
        slug: &Slug,
    ) -> Result<Option<Arc<Tenant>>, Error> {
        if principal.is_superuser {
            return self.resolve(slug).await;
        }
        let Some(org_id) = principal.organization_id else {
            return Ok(None);
        };
        let loaded = std::sync::atomic::AtomicBool::new(false);
        let own = self
            .by_id
            .try_get_with(org_id, self.load(&loaded, Lookup::Id(org_id)))
            .await
            .map_err(unshare)?;
        count_resolve(loaded.into_inner(), &own);
        Ok(own.filter(|tenant| tenant.slug == *slug))
    }

    /// The tenant of org `id` (cached like tokens' orgs), or `None`: for
    /// work that names its org by id, such as background jobs.
    pub async fn resolve_id(&self, id: Uuid) -> Result<Option<Arc<Tenant>>, Error> {
        let loaded = std::sync::atomic::AtomicBool::new(false);
        let found = self
            .by_id
            .try_get_with(id, self.load(&loaded, Lookup::Id(id)))
            .await
            .map_err(unshare)?;
        count_resolve(loaded.into_inner(), &found);
        Ok(found)
    }

    /// Registry queries made by this router to resolve orgs so far.
    pub fn registry_lookups(&self) -> u64 {
        self.lookups.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Loads one org from the registry for a cache.
    async fn load(
        &self,
        loaded: &std::sync::atomic::AtomicBool,
        lookup: Lookup<'_>,
    ) -> Result<Entry, Error> {
        loaded.store(true, std::sync::atomic::Ordering::Relaxed);
        self.lookups
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pool = &self.control;
        let pooler = self.tenants.pooler();
        let attempts = pool.options().get_max_connections() as usize + 2;
        let org = crate::base::error::retry_dead_connections(attempts, || async {
            let mut conn = crate::pg::pools::ServingConn::open(pool, pooler).await?;
            let named = conn.named();
            let org = match lookup {
                Lookup::Slug(slug) => registry::find_org_sent(conn.conn(), slug, named).await?,
                Lookup::Id(id) => registry::find_org_by_id_sent(conn.conn(), id, named).await?,
            };
            conn.finish().await?;
            Ok::<_, Error>(org)
        })
        .await?;
        Ok(org.map(|o| {
            let role = RoleName::for_org(&o.id);
            let begin = self
                .begin_sql(Access::ReadWrite, &role, &o.schema_name)
                .into();
            let begin_read = self
                .begin_sql(Access::ReadOnly, &role, &o.schema_name)
                .into();
            Arc::new(Tenant {
                role,
                begin_read,
                id: o.id,
                slug: o.slug,
                schema: o.schema_name,
                status: o.status,
                template_version: o.template_version,
                begin,
            })
        }))
    }

    /// Opens a transaction scoped to `tenant` on a connection of the
    /// tenant's sub-pool. Nothing is sent yet: `BEGIN; SET LOCAL ROLE
    /// <tenant role>; SET LOCAL search_path TO <tenant schema>` and the
    /// statement and lock timeouts, all transaction-local, go out in one
    /// write with the first statement (see [`TenantTx`]). A transaction
    /// that sends nothing costs nothing.
    ///
    /// A pooled connection whose backend died (killed, server restarted)
    /// fails the first statement's pipeline before anything of it can have
    /// committed; the pipeline is then sent again on another connection (up
    /// to once per connection of the pool, and a new connection waits out
    /// a restarting server), so such faults never reach the caller while
    /// the server comes back within the acquire timeout.
    ///
    /// A tenant with its limit of transactions in flight (see `fairness`)
    /// waits here, before taking a connection, and may be refused with
    /// [`Error::TenantBusy`].
    pub async fn begin(&self, tenant: &Arc<Tenant>) -> Result<TenantTx, Error> {
        self.begin_on(&self.tenants, tenant, Access::ReadWrite)
            .await
    }

    /// A transaction on `pool`: the primary's tenant pool (dead connections
    /// are retried on it), or a replica's (they are not: the read goes to
    /// the primary instead).
    async fn begin_on(
        &self,
        pool: &TenantPool,
        tenant: &Arc<Tenant>,
        access: Access,
    ) -> Result<TenantTx, Error> {
        if let Some(top) = &self.top_tenants {
            top.count(&tenant.slug);
        }
        let slot = self.limiter.admit(&tenant.id).await?;
        let in_flight = slot.as_ref().map_or(0, |s| s.in_flight());
        let waiting = std::time::Instant::now();
        let (conn, placement) = pool.acquire(&tenant.id, in_flight).await?;
        crate::telemetry::observe_acquire(waiting.elapsed());
        let primary = std::ptr::eq(pool, &self.tenants);
        Ok(TenantTx {
            conn: Some(conn),
            access,
            open: false,
            retry_dead: primary,
            replicas: self.replicas.clone().filter(|_| primary),
            pool: pool.clone(),
            in_flight,
            _placement: Some(placement),
            _slot: slot,
            tenant: tenant.clone(),
            statements: self.statement_mode(),
            rule: self.statements.clone(),
            outcome: crate::telemetry::TxOutcome::begun(),
            jobs_due: None,
            control: self.control.clone(),
            done: false,
        })
    }

    /// Transactions per org, when the top-N metric is on.
    pub fn top_tenants(&self) -> Option<&crate::telemetry::TopTenants> {
        self.top_tenants.as_deref()
    }

    /// The per-tenant limit of transactions in flight.
    pub fn fairness(&self) -> FairnessConfig {
        self.limiter.config()
    }

    /// Runs the read-only work `f` for `tenant`: each of its statements
    /// runs in a read-only transaction of its own (PostgreSQL refuses any
    /// write in it), sent in one write with the BEGIN and context before it
    /// and the ROLLBACK after it. So a read costs one round trip per
    /// statement and nothing to end it, and the connection goes back to the
    /// pool clean. Under READ COMMITTED (PostgreSQL's default) each
    /// statement of one transaction sees a snapshot of its own anyway, so
    /// a read sees what one read-only transaction would; work that needs
    /// one snapshot across statements (REPEATABLE READ) or
    /// transaction-local settings of its own uses [`TenantRouter::begin`].
    ///
    /// If the connection dies under it (a backend killed, the server
    /// restarting), the statement, or the work, runs again on another
    /// connection: reads see no error. One kill of every backend (a
    /// failover, an operator's `pg_terminate_backend` sweep) can reach a
    /// pooled connection after the retry took it, so the work is tried up
    /// to once per connection of the pool (plus two): by then it runs on a
    /// connection opened after the faults.
    ///
    /// `f` is an async closure: `async move |tx| ..` when it uses values of
    /// the caller, which it must own (clone them, or an `Arc`): rustc cannot
    /// yet prove the caller's future `Send` when an async closure holds a
    /// reference into the caller. (Before async closures this took
    /// `|tx| Box::pin(async move { .. })`; that form no longer infers.)
    ///
    /// With replicas, the read may run on one (see [`TenantRouter::read_after`]).
    pub async fn read<T, F>(&self, tenant: &Arc<Tenant>, f: F) -> Result<T, Error>
    where
        F: AsyncFn(&mut TenantTx) -> Result<T, Error>,
    {
        self.read_after(tenant, None, f).await
    }

    /// [`TenantRouter::read`] that must see every write committed before
    /// `at_least` (a position a client got from another server), as well
    /// as this process's own writes of the org.
    ///
    /// With replicas, it runs on a replica that is up, lags at most
    /// `--replica-max-lag` and has replayed at least the org's last write
    /// through this process, `at_least` and the floor (see `replicas`);
    /// otherwise, and whenever it fails there (any error: a replica that
    /// is down, a schema it has not replayed yet), on the primary. So a
    /// replica never fails a read, and a read never misses a write this
    /// process acknowledged (or one the client names).
    pub async fn read_after<T, F>(
        &self,
        tenant: &Arc<Tenant>,
        at_least: Option<Lsn>,
        f: F,
    ) -> Result<T, Error>
    where
        F: AsyncFn(&mut TenantTx) -> Result<T, Error>,
    {
        if let Some(replicas) = &self.replicas {
            if let Some(replica) = replicas.choose(&tenant.id, at_least.unwrap_or_default()) {
                let read = async {
                    let mut tx = self
                        .begin_on(replica.tenant_pool(), tenant, Access::ReadOnly)
                        .await?;
                    let out = f(&mut tx).await?;
                    tx.end_read();
                    Ok::<_, Error>(out)
                };
                match read.await {
                    Ok(out) => {
                        replica.served_one();
                        crate::telemetry::read_on("replica");
                        return Ok(out);
                    }
                    // the primary would refuse it alike
                    Err(e @ Error::TenantBusy { .. }) => return Err(e),
                    Err(e) => {
                        if matches!(&e, Error::Database(db) if crate::base::error::is_connection_error(db))
                        {
                            replica.mark_down();
                        }
                        tracing::debug!(error = %e, replica = replica.name(),
                            "a read failed on a replica; reading from the primary");
                        replicas.fell_back();
                        crate::telemetry::replica_fallback();
                    }
                }
            }
            crate::telemetry::read_on("primary");
        }
        let attempts = self.tenants.max_connections() as usize + 2;
        crate::base::error::retry_dead_connections(attempts, || async {
            let mut tx = self
                .begin_on(&self.tenants, tenant, Access::ReadOnly)
                .await?;
            let out = f(&mut tx).await?;
            tx.end_read();
            Ok(out)
        })
        .await
    }

    /// The statement mode of the next tenant transaction (see
    /// [`StatementMode::Auto`]).
    pub fn statement_mode(&self) -> StatementMode {
        let rule = &self.statements;
        if rule.mode != StatementMode::Auto {
            return rule.mode;
        }
        let distinct = rule
            .distinct
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(1) as u64;
        let per_connection = self.cache.entry_count() / self.tenants.sub_pool_count() as u64 + 1;
        let fits = per_connection * distinct <= self.tenants.statement_cache() as u64 * 3 / 4;
        if fits {
            StatementMode::PerTenant
        } else {
            StatementMode::Shared
        }
    }

    /// The BEGIN message of a tenant transaction as `role` in `schema`.
    fn begin_sql(&self, access: Access, role: &RoleName, schema: &SchemaName) -> String {
        let begin = match access {
            Access::ReadWrite => "BEGIN",
            Access::ReadOnly => "BEGIN READ ONLY",
        };
        let role = if self.set_role {
            format!(" SET LOCAL ROLE {};", role.quoted())
        } else {
            String::new()
        };
        format!(
            "{begin};{role} SET LOCAL search_path TO {}; {}",
            schema.tenant_search_path(),
            self.settings
        )
    }

    /// Runs `f` in a transaction of the org `slug` and commits when it
    /// returns `Ok`: for background jobs and scripts.
    pub async fn with_tenant<T, F>(&self, slug: &Slug, f: F) -> Result<T, Error>
    where
        F: AsyncFnOnce(&mut TenantTx) -> Result<T, Error>,
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

    /// Forgets what this process knows about `slug`: under that slug, and
    /// the org (by id) that had it.
    pub async fn invalidate(&self, slug: &Slug) {
        self.cache.invalidate(slug).await;
        let slug = slug.clone();
        let had = move |_: &Uuid, entry: &Entry| entry.as_ref().is_some_and(|t| t.slug == slug);
        // Built with support_invalidation_closures, so this cannot fail;
        // forgetting everything would be the safe fallback anyway.
        if self.by_id.invalidate_entries_if(had).is_err() {
            self.by_id.invalidate_all();
        }
    }

    pub fn invalidate_all(&self) {
        self.cache.invalidate_all();
        self.by_id.invalidate_all();
    }

    /// Tenants currently cached (resolved within the TTL), as of the
    /// cache's last housekeeping.
    pub fn cached_tenants(&self) -> u64 {
        self.cache.entry_count()
    }

    /// Runs the cache's pending housekeeping now (it otherwise runs as
    /// the cache is used), so that counts are current.
    pub async fn housekeep(&self) {
        self.cache.run_pending_tasks().await;
    }
}

/// The statement rule of a router, and the distinct statements its tenant
/// transactions have sent (their texts are `'static`: keyed by address).
struct StatementRule {
    mode: StatementMode,
    seen: dashmap::DashSet<usize>,
    /// `seen.len()` without locking every shard at each `begin`.
    distinct: std::sync::atomic::AtomicUsize,
}

impl StatementRule {
    fn note(&self, sql: &'static str) {
        let key = sql.as_ptr() as usize;
        if !self.seen.contains(&key) && self.seen.insert(key) {
            self.distinct
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// A transaction confined to one tenant's schema. Dropping it without
/// [`TenantTx::commit`] rolls back. The only database access tenant handlers
/// get; its query methods apply the statement rule ([`StatementMode`]) and
/// send the tenant's context with the first statement.
///
/// It never hands out its connection, so tenant code cannot end the
/// transaction behind the router's back or send SQL outside the statement
/// rule:
///
/// ```compile_fail
/// fn raw(tx: &mut tenantry::serving::router::TenantTx) -> &mut tenantry::pg::pools::TenantConn {
///     tx.conn()
/// }
/// ```
pub struct TenantTx {
    /// `None` once handed to the task that rolls back an abandoned
    /// transaction (see `Drop`).
    conn: Option<TenantConn>,
    access: Access,
    /// A transaction block may be open on the server: read-write from its
    /// first statement on; read-only while a pipeline is in flight or
    /// failed. Set before anything is sent, so that a transaction dropped
    /// half-way is rolled back before its connection serves anyone else.
    open: bool,
    /// To send a first statement again on another connection when the one
    /// drawn was dead.
    pool: TenantPool,
    in_flight: usize,
    // dropped after `conn`: the sub-pool counts the transaction until then
    _placement: Option<Placement>,
    // then the tenant's place among its transactions in flight
    _slot: Option<TenantSlot>,
    tenant: Arc<Tenant>,
    /// Decided when the transaction began (never `Auto`).
    statements: StatementMode,
    rule: Arc<StatementRule>,
    /// Counts the transaction committed, or rolled back when dropped.
    outcome: crate::telemetry::TxOutcome,
    /// The earliest due time of the jobs this transaction enqueued: once it
    /// commits, the registry's ready index is told (see `jobs`).
    jobs_due: Option<time::OffsetDateTime>,
    /// To tell the registry (a serving function) of enqueued jobs.
    control: PgPool,
    /// Committed (by [`TenantQuery::and_commit`]): nothing more to do.
    done: bool,
    /// On the primary's pool: a dead connection under the first statement
    /// is replaced and the pipeline sent again. On a replica's, the error
    /// returns and the read goes to the primary.
    retry_dead: bool,
    /// Noted with the WAL position of each commit (on the primary, with
    /// replicas), so that the org's next reads see it.
    replicas: Option<Arc<Replicas>>,
}

/// A statement's parameters, with the types they are sent as.
type Params<'q> = Vec<(Box<dyn ToSql + Sync + Send + 'q>, Type)>;

impl TenantTx {
    pub fn tenant(&self) -> &Tenant {
        &self.tenant
    }

    /// A query whose rows map to `O`, sent by the statement rule.
    pub fn query_as<'q, O>(&mut self, sql: &'static str) -> TenantQuery<'_, 'q, O> {
        TenantQuery {
            tx: self,
            sql,
            params: Vec::new(),
            commit: false,
            _row: PhantomData,
        }
    }

    /// A statement run for its effect (see [`TenantQuery::execute`]).
    pub fn query<'q>(&mut self, sql: &'static str) -> TenantQuery<'_, 'q, ()> {
        self.query_as(sql)
    }

    /// `sql` as this transaction sends it: tagged with the tenant's schema
    /// in a trailing comment under [`StatementMode::PerTenant`] (schema names
    /// are `[a-z0-9_]`, so the tag cannot end the comment).
    pub fn sql(&self, sql: &'static str) -> Cow<'static, str> {
        self.rule.note(sql);
        match self.statements {
            StatementMode::PerTenant => Cow::Owned(format!("{sql} /* {} */", self.tenant.schema)),
            StatementMode::Auto | StatementMode::Shared | StatementMode::Unnamed => {
                Cow::Borrowed(sql)
            }
        }
    }

    /// Sends one statement: with the BEGIN and context before it when it
    /// opens the transaction (a read's every statement, a read-write
    /// transaction's first), and a read's ROLLBACK after it.
    async fn send(
        &mut self,
        sql: &'static str,
        params: &Params<'_>,
        commit: bool,
    ) -> Result<Sent, sqlx::Error> {
        let sent = self.send_pipeline(sql, params, commit).await;
        if commit && self.access == Access::ReadWrite {
            // ended either way: a failed statement or COMMIT rolled back
            self.open = false;
            if let Ok(sent) = &sent {
                self.note_position(sent.position);
                self.committed().await;
            }
        }
        sent
    }

    async fn send_pipeline(
        &mut self,
        sql: &'static str,
        params: &Params<'_>,
        commit: bool,
    ) -> Result<Sent, sqlx::Error> {
        if self.done {
            // a statement now would open a transaction nobody commits
            return Err(sqlx::Error::Protocol(
                "this tenant transaction was committed with and_commit; begin another".into(),
            ));
        }
        let text = self.sql(sql);
        let named = self.statements != StatementMode::Unnamed;
        let tenant = self.tenant.clone();
        let end = commit.then_some("COMMIT");
        // a read's statements end with ROLLBACK: nothing to replay
        let position = commit && self.access == Access::ReadWrite && self.replicas.is_some();
        let (before, after) = match self.access {
            Access::ReadOnly => (Some(&*tenant.begin_read), Some("ROLLBACK")),
            Access::ReadWrite if !self.open => (Some(&*tenant.begin), end),
            Access::ReadWrite => (None, end),
        };
        self.open = true;
        let attempts = self.pool.max_connections() as usize + 2;
        let started = Instant::now();
        let mut attempt = 1;
        loop {
            let conn = self.conn.as_mut().expect("a connection until dropped");
            let result = conn
                .send(before, &text, params, named, after, position)
                .await;
            match result {
                // The pipeline began the transaction and the connection
                // died: the server rolled back whatever it ran.
                Err(e)
                    if before.is_some()
                        && self.retry_dead
                        && crate::base::error::is_connection_error(&e)
                        && (attempt < attempts
                            || started.elapsed()
                                < crate::base::error::DEAD_CONNECTION_RETRY_BUDGET) =>
                {
                    tracing::debug!(error = %e, attempt, "the connection was dead; sending again");
                    if let Some(dead) = self.conn.take() {
                        crate::pg::pools::discard(dead);
                    }
                    if attempt >= attempts {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    attempt += 1;
                    // the old place is given back before the new one is taken
                    self._placement = None;
                    let (conn, placement) =
                        self.pool.acquire(&self.tenant.id, self.in_flight).await?;
                    self.conn = Some(conn);
                    self._placement = Some(placement);
                }
                Ok(sent) => {
                    if self.access == Access::ReadOnly {
                        self.open = false;
                    }
                    return Ok(sent);
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub async fn commit(mut self) -> Result<(), Error> {
        if self.done {
            return Ok(());
        }
        if self.replicas.is_some() && self.open {
            let conn = self.conn.as_ref().expect("a connection until dropped");
            let ended = conn.execute_at_position("COMMIT").await;
            self.open = false;
            self.note_position(ended?);
        } else {
            // without replicas, or nothing sent (nothing to replay)
            self.end("COMMIT").await?;
        }
        self.committed().await;
        Ok(())
    }

    /// With replicas, after a COMMIT that wrote: the org's next reads must
    /// see `position`; one that could not be read counts as the largest, so
    /// they go to the primary until it expires.
    fn note_position(&self, position: Option<Lsn>) {
        if let Some(replicas) = &self.replicas {
            replicas.note_write(&self.tenant.id, position.unwrap_or(Lsn(u64::MAX)));
        }
    }

    /// After the COMMIT succeeded: counts it and announces enqueued jobs.
    async fn committed(&mut self) {
        self.done = true;
        self.outcome.committed();
        if let Some(at) = self.jobs_due.take() {
            crate::telemetry::jobs_enqueued();
            // The jobs exist now; a hint lost here (the registry
            // unreachable, this process killed) is found by the sweep.
            let hint = announce_jobs(&self.control, self.pool.pooler(), self.tenant.id, at).await;
            if let Err(e) = hint {
                tracing::warn!(error = %e, org = %self.tenant.slug,
                    "could not announce enqueued jobs; the sweep will find them");
            }
        }
    }

    /// Notes a job this transaction enqueued, due at `at`.
    pub(crate) fn note_job_due(&mut self, at: time::OffsetDateTime) {
        self.jobs_due = Some(self.jobs_due.map_or(at, |t| t.min(at)));
    }

    /// Ends an open transaction block with `sql` (COMMIT or ROLLBACK). It
    /// is ended either way: a failed COMMIT rolls back.
    async fn end(&mut self, sql: &str) -> Result<(), Error> {
        if !self.open {
            return Ok(());
        }
        let conn = self.conn.as_ref().expect("a connection until dropped");
        let done = conn.execute_simple(sql).await;
        self.open = false;
        Ok(done?)
    }

    /// Ends a read: each statement ended its own transaction, so the
    /// connection is clean and goes back to the pool as it is (invariant 2).
    /// Counted as committed: the read succeeded and had nothing to write.
    fn end_read(mut self) {
        self.outcome.committed();
    }

    pub async fn rollback(mut self) -> Result<(), Error> {
        self.end("ROLLBACK").await
    }
}

/// Tells the registry's ready index that `org` has a job due at `at`
/// (`tenantry.serving_jobs_due`). Behind a transaction pooler the
/// statement runs inside a transaction of its own ([`ServingConn`]): an
/// unnamed statement sent alone may have its Parse and its Execute land on
/// two server sessions there, and fail.
async fn announce_jobs(
    control: &PgPool,
    pooler: crate::pg::pools::Pooler,
    org: Uuid,
    at: time::OffsetDateTime,
) -> Result<(), sqlx::Error> {
    let mut conn = crate::pg::pools::ServingConn::open(control, pooler).await?;
    let named = conn.named();
    sqlx::query("SELECT tenantry.serving_jobs_due($1, $2)")
        .persistent(named)
        .bind(org)
        .bind(at)
        .execute(conn.conn())
        .await?;
    conn.finish().await
}

impl Drop for TenantTx {
    /// A transaction dropped with its block open (a handler's error, a
    /// cancelled request, a failed pipeline) is rolled back on a task of its
    /// own before its connection, place and slot are given back; a
    /// connection that cannot roll back is closed instead of pooled.
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        let Some(conn) = self.conn.take() else {
            return;
        };
        let (placement, slot) = (self._placement.take(), self._slot.take());
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    if conn.execute_simple("ROLLBACK").await.is_err() {
                        crate::pg::pools::discard(conn);
                    }
                    drop(placement);
                    drop(slot);
                });
            }
            // No runtime left (shutdown): never pooled with a block open.
            Err(_) => crate::pg::pools::discard(conn),
        }
    }
}

/// What a statement run for its effect did.
#[derive(Debug, Clone, Copy)]
pub struct QueryDone {
    rows_affected: u64,
}

impl QueryDone {
    pub fn rows_affected(&self) -> u64 {
        self.rows_affected
    }
}

/// A tenant query being built: bind its parameters, then fetch or execute.
#[must_use = "a query does nothing until it is fetched or executed"]
pub struct TenantQuery<'t, 'q, O> {
    tx: &'t mut TenantTx,
    sql: &'static str,
    params: Params<'q>,
    /// COMMIT in the same write (see [`TenantQuery::and_commit`]).
    commit: bool,
    _row: PhantomData<fn() -> O>,
}

impl<'q, O> TenantQuery<'_, 'q, O> {
    pub fn bind<T: TenantParam + 'q>(mut self, value: T) -> Self {
        self.params.push((Box::new(value), T::pg_type()));
        self
    }

    /// Commits the transaction in the same write as this statement, one
    /// round trip fewer than a separate [`TenantTx::commit`]: for the last
    /// statement of a write. When it returns, the transaction is over:
    /// committed on `Ok`, rolled back on `Err` (the statement or the
    /// COMMIT failed). A read-only transaction's statements end it anyway.
    pub fn and_commit(mut self) -> Self {
        self.commit = true;
        self
    }

    pub async fn execute(self) -> Result<QueryDone, sqlx::Error> {
        let sent = self.tx.send(self.sql, &self.params, self.commit).await?;
        Ok(QueryDone {
            rows_affected: sent.rows_affected,
        })
    }
}

impl<O: FromTenantRow> TenantQuery<'_, '_, O> {
    pub async fn fetch_all(self) -> Result<Vec<O>, sqlx::Error> {
        let sent = self.tx.send(self.sql, &self.params, self.commit).await?;
        sent.rows.iter().map(O::from_row).collect()
    }

    pub async fn fetch_optional(self) -> Result<Option<O>, sqlx::Error> {
        let sent = self.tx.send(self.sql, &self.params, self.commit).await?;
        sent.rows.first().map(O::from_row).transpose()
    }

    pub async fn fetch_one(self) -> Result<O, sqlx::Error> {
        self.fetch_optional().await?.ok_or(sqlx::Error::RowNotFound)
    }
}
