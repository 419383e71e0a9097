//! The tenant router: resolves an org slug to its tenant through a moka cache
//! and opens tenant transactions that run as the tenant's role with a
//! `search_path` of exactly the tenant's schema then the shared schema,
//! both set transaction-locally in the same message as BEGIN.
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
use sqlx::postgres::{PgArguments, PgQueryResult, PgRow};
use sqlx::{Arguments, Encode, FromRow, PgPool, Postgres, Transaction, Type};
use uuid::Uuid;

use crate::base::error::Error;
use crate::base::ident::{RoleName, SchemaName, Slug};
use crate::pg::pools::{Placement, TenantPool};
use crate::registry::{self, OrgStatus, Principal};
use crate::serving::fairness::{FairnessConfig, TenantLimiter, TenantSlot};

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
                distinct: Default::default(),
            }),
            settings: settings.into(),
            set_role: config.set_role,
        }
    }

    /// A router over one plain pool (no tenant affinity), for scripts and
    /// tests.
    pub fn single(pool: PgPool, config: &RouterConfig) -> Self {
        TenantRouter::new(pool.clone(), TenantPool::single(pool), config)
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

    /// Opens a transaction scoped to `tenant`, in one round trip on a
    /// connection of the tenant's sub-pool: `BEGIN; SET LOCAL ROLE <tenant
    /// role>; SET LOCAL search_path TO <tenant schema>` plus the statement and
    /// lock timeouts, all transaction-local.
    ///
    /// Cancellation safety: sqlx counts a transaction only once BEGIN has
    /// answered, so a caller dropped while BEGIN is in flight would return a
    /// connection to the pool that is, on the server, inside a transaction
    /// with this tenant's search_path. [`DetachOnDrop`] hands such an
    /// unfinished BEGIN to a background task that completes it and drops the
    /// transaction, which queues its ROLLBACK before the connection is reused.
    ///
    /// A pooled connection whose backend died (killed, server restarted)
    /// fails its BEGIN and is discarded; the BEGIN is then retried on
    /// another connection (up to once per connection of the pool, and a
    /// new connection waits out a restarting server), so such faults never
    /// reach the caller while the server comes back within the acquire
    /// timeout.
    ///
    /// A tenant with its limit of transactions in flight (see `fairness`)
    /// waits here, before taking a connection, and may be refused with
    /// [`Error::TenantBusy`].
    pub async fn begin(&self, tenant: &Arc<Tenant>) -> Result<TenantTx, Error> {
        self.begin_as(tenant, Access::ReadWrite).await
    }

    async fn begin_as(&self, tenant: &Arc<Tenant>, access: Access) -> Result<TenantTx, Error> {
        if let Some(top) = &self.top_tenants {
            top.count(&tenant.slug);
        }
        let slot = self.limiter.admit(&tenant.id).await?;
        let in_flight = slot.as_ref().map_or(0, |s| s.in_flight());
        let attempts = self.tenants.max_connections() as usize + 2;
        let mut tx = crate::base::error::retry_dead_connections(attempts, || {
            self.begin_once(tenant, access, in_flight)
        })
        .await?;
        tx._slot = slot;
        Ok(tx)
    }

    /// Transactions per org, when the top-N metric is on.
    pub fn top_tenants(&self) -> Option<&crate::telemetry::TopTenants> {
        self.top_tenants.as_deref()
    }

    /// The per-tenant limit of transactions in flight.
    pub fn fairness(&self) -> FairnessConfig {
        self.limiter.config()
    }

    /// Runs the read-only work `f` in a read-only transaction of `tenant`
    /// (PostgreSQL refuses any write in it). If the connection dies under
    /// it (a backend killed, the server restarting), the work runs again on
    /// another connection: reads see no error. One kill of every backend (a
    /// failover, an operator's `pg_terminate_backend` sweep) can reach a
    /// pooled connection after the retry took it, so, as for BEGIN, the
    /// work is tried up to once per connection of the pool (plus two): by
    /// then it runs on a connection opened after the faults.
    ///
    /// A read-only transaction has nothing to commit: it ends with a
    /// ROLLBACK queued on the connection, sent with its release, before
    /// anyone else uses it (see [`TenantTx::end_read`]). So a read costs
    /// the BEGIN and its statements, not a COMMIT round trip as well.
    ///
    /// `f` is an async closure: `async move |tx| ..` when it uses values of
    /// the caller, which it must own (clone them, or an `Arc`): rustc cannot
    /// yet prove the caller's future `Send` when an async closure holds a
    /// reference into the caller. (Before async closures this took
    /// `|tx| Box::pin(async move { .. })`; that form no longer infers.)
    pub async fn read<T, F>(&self, tenant: &Arc<Tenant>, f: F) -> Result<T, Error>
    where
        F: AsyncFn(&mut TenantTx) -> Result<T, Error>,
    {
        let attempts = self.tenants.max_connections() as usize + 2;
        crate::base::error::retry_dead_connections(attempts, || async {
            let mut tx = self.begin_as(tenant, Access::ReadOnly).await?;
            let out = f(&mut tx).await?;
            tx.end_read();
            Ok(out)
        })
        .await
    }

    async fn begin_once(
        &self,
        tenant: &Arc<Tenant>,
        access: Access,
        in_flight: usize,
    ) -> Result<TenantTx, Error> {
        let sql = String::from(match access {
            Access::ReadWrite => &*tenant.begin,
            Access::ReadOnly => &*tenant.begin_read,
        });
        // Waiting for a connection can be abandoned safely; the BEGIN on it
        // cannot (see above).
        let waiting = std::time::Instant::now();
        let (conn, placement) = self.tenants.acquire(&tenant.id, in_flight).await?;
        crate::telemetry::observe_acquire(waiting.elapsed());
        let mut begin = DetachOnDrop(Some(Box::pin(async move {
            let tx = Transaction::begin(conn, Some(sql.into())).await?;
            Ok((tx, placement))
        })));
        let (tx, placement) = begin.run().await?;
        Ok(TenantTx {
            tx,
            _placement: placement,
            _slot: None,
            tenant: tenant.clone(),
            statements: self.statement_mode(),
            rule: self.statements.clone(),
            outcome: crate::telemetry::TxOutcome::begun(),
        })
    }

    /// The statement mode of the next tenant transaction (see
    /// [`StatementMode::Auto`]).
    pub fn statement_mode(&self) -> StatementMode {
        let rule = &self.statements;
        if rule.mode != StatementMode::Auto {
            return rule.mode;
        }
        let distinct = rule.distinct.read().expect("statement set").len().max(1) as u64;
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

type BeginFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<(Transaction<'static, Postgres>, Placement), sqlx::Error>,
            > + Send,
    >,
>;

/// A BEGIN in progress that, if abandoned half-way, is finished on a
/// background task instead of being dropped (see [`TenantRouter::begin`]).
/// The happy path costs one allocation and no task.
struct DetachOnDrop(Option<BeginFuture>);

impl DetachOnDrop {
    async fn run(&mut self) -> Result<(Transaction<'static, Postgres>, Placement), sqlx::Error> {
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

/// The statement rule of a router, and the distinct statements its tenant
/// transactions have sent (their texts are `'static`: keyed by address).
struct StatementRule {
    mode: StatementMode,
    distinct: std::sync::RwLock<std::collections::HashSet<usize>>,
}

impl StatementRule {
    fn note(&self, sql: &'static str) {
        let key = sql.as_ptr() as usize;
        if !self.distinct.read().expect("statement set").contains(&key) {
            self.distinct.write().expect("statement set").insert(key);
        }
    }
}

/// A transaction confined to one tenant's schema. Dropping it without
/// [`TenantTx::commit`] rolls back. The only database access tenant handlers
/// get; its query methods apply the statement rule ([`StatementMode`]).
///
/// It never hands out its connection, so tenant code cannot end the
/// transaction behind the router's back or send SQL outside the statement
/// rule:
///
/// ```compile_fail
/// fn raw(tx: &mut tenantry::serving::router::TenantTx) -> &mut sqlx::PgConnection {
///     tx.conn()
/// }
/// ```
pub struct TenantTx {
    tx: Transaction<'static, Postgres>,
    // dropped after `tx`: the sub-pool counts the transaction until then
    _placement: Placement,
    // then the tenant's place among its transactions in flight
    _slot: Option<TenantSlot>,
    tenant: Arc<Tenant>,
    /// Decided when the transaction began (never `Auto`).
    statements: StatementMode,
    rule: Arc<StatementRule>,
    /// Counts the transaction committed, or rolled back when dropped.
    outcome: crate::telemetry::TxOutcome,
}

impl TenantTx {
    pub fn tenant(&self) -> &Tenant {
        &self.tenant
    }

    /// A query whose rows map to `O`, sent by the statement rule.
    pub fn query_as<O>(&mut self, sql: &'static str) -> TenantQuery<'_, O> {
        TenantQuery {
            tx: self,
            sql,
            args: Ok(PgArguments::default()),
            _row: PhantomData,
        }
    }

    /// A statement run for its effect (see [`TenantQuery::execute`]).
    pub fn query(&mut self, sql: &'static str) -> TenantQuery<'_, ()> {
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

    pub async fn commit(self) -> Result<(), Error> {
        // the placement goes after the COMMIT (see the field)
        let TenantTx {
            tx,
            outcome,
            _placement,
            ..
        } = self;
        tx.commit().await?;
        outcome.committed();
        Ok(())
    }

    /// Ends a read-only transaction without a round trip: dropping the
    /// transaction queues its ROLLBACK, which sqlx sends with the
    /// connection's release and before the connection serves anyone else,
    /// so the tenant's role and search path end with it (invariant 2).
    /// Counted as committed: the read succeeded and had nothing to write.
    fn end_read(self) {
        let TenantTx {
            tx,
            outcome,
            _placement,
            ..
        } = self;
        drop(tx);
        outcome.committed();
    }

    pub async fn rollback(self) -> Result<(), Error> {
        self.tx.rollback().await?;
        Ok(())
    }
}

/// A tenant query being built: bind its parameters, then fetch or execute.
#[must_use = "a query does nothing until it is fetched or executed"]
pub struct TenantQuery<'t, O> {
    tx: &'t mut TenantTx,
    sql: &'static str,
    args: Result<PgArguments, sqlx::error::BoxDynError>,
    _row: PhantomData<fn() -> O>,
}

impl<'t, O> TenantQuery<'t, O> {
    pub fn bind<'q, T>(mut self, value: T) -> Self
    where
        T: 'q + Encode<'q, Postgres> + Type<Postgres>,
    {
        if let Ok(args) = &mut self.args {
            if let Err(e) = args.add(value) {
                self.args = Err(e);
            }
        }
        self
    }

    /// The transaction, the statement text, whether to prepare it, and the
    /// arguments (or the error of binding one of them).
    fn parts(
        self,
    ) -> Result<(&'t mut TenantTx, Cow<'static, str>, bool, PgArguments), sqlx::Error> {
        let args = self.args.map_err(sqlx::Error::Encode)?;
        let text = self.tx.sql(self.sql);
        let persistent = self.tx.statements != StatementMode::Unnamed;
        Ok((self.tx, text, persistent, args))
    }

    pub async fn execute(self) -> Result<PgQueryResult, sqlx::Error> {
        let (tx, text, persistent, args) = self.parts()?;
        sqlx::query_with(&text, args)
            .persistent(persistent)
            .execute(&mut *tx.tx)
            .await
    }
}

impl<'t, O> TenantQuery<'t, O>
where
    O: for<'r> FromRow<'r, PgRow> + Send + Unpin,
{
    pub async fn fetch_all(self) -> Result<Vec<O>, sqlx::Error> {
        let (tx, text, persistent, args) = self.parts()?;
        sqlx::query_as_with(&text, args)
            .persistent(persistent)
            .fetch_all(&mut *tx.tx)
            .await
    }

    pub async fn fetch_optional(self) -> Result<Option<O>, sqlx::Error> {
        let (tx, text, persistent, args) = self.parts()?;
        sqlx::query_as_with(&text, args)
            .persistent(persistent)
            .fetch_optional(&mut *tx.tx)
            .await
    }

    pub async fn fetch_one(self) -> Result<O, sqlx::Error> {
        let (tx, text, persistent, args) = self.parts()?;
        sqlx::query_as_with(&text, args)
            .persistent(persistent)
            .fetch_one(&mut *tx.tx)
            .await
    }
}
