//! Fleet migrations: the tenant template applied to every tenant that is
//! behind, `jobs` tenants at a time.
//!
//! Per tenant, the guarantees are: one transaction (per run of
//! transactional migrations), the per-tenant advisory lock and the registry
//! row lock, a re-check of the registry and the history under the locks,
//! failure isolation (a failing tenant is rolled back, recorded and the
//! others go on), and divergence detection (refinery's rules, against the
//! history rows refinery writes).
//!
//! Cost near the floor of raw DDL: a tenant costs two round trips, (1)
//! BEGIN + settings + locks + the registry row and the whole history, read
//! under the locks on the connection that then migrates (so its catalog
//! entries are loaded once), and (2) the migration with its history row,
//! the registry update and COMMIT; plus one per further migration.
//!
//! The per-tenant advisory lock is tried, not waited for, until the lock
//! timeout: a statement waiting for it would hold a snapshot that a
//! concurrent index build of the lock's holder waits for (a deadlock).
//!
//! Lock-safe: each tenant's transaction sets `lock_timeout` (shorter than
//! the serving one, so readers queued behind a waiting migration never time
//! out); a tenant that times out is retried after the others, with backoff,
//! and reported as `lock_timeout` if it never gets its locks.
//!
//! Online: a migration whose first line is `-- tenantry:no-transaction`
//! (one statement, e.g. `CREATE INDEX CONCURRENTLY`) runs outside a
//! transaction under a session-level advisory lock, after dropping the
//! invalid indexes a failed concurrent build leaves behind, and is recorded
//! in the history only once it succeeded. A concurrent build runs without
//! lock timeout: its lock blocks neither readers nor writers, and its waits
//! for older transactions must not fail it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use refinery_core::Migration;
use serde::Serialize;
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres, Row};
use uuid::Uuid;

use super::{for_each_bounded, FleetRow, FleetTenant};
use crate::base::error::{sqlstate, Error};
use crate::base::ident::{quote_ident, RoleName};
use crate::pg::engine::Engine;
use crate::pg::statements::{send_statements, simple_query, simple_rows};
use crate::registry::OrgStatus;
use crate::tenants::template::{history_insert, Template, HISTORY_TABLE};

#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// Tenants migrated at once.
    pub jobs: usize,
    /// Only these orgs (all when empty).
    pub only: Vec<crate::base::ident::Slug>,
    /// Stop at this template version (the template's latest when `None`).
    pub target: Option<i32>,
    /// `lock_timeout` of each tenant's migration.
    pub lock_timeout: Duration,
    /// Further attempts for a tenant whose locks timed out.
    pub lock_retries: u32,
}

/// Default `lock_timeout` of a tenant's migration: shorter than the serving
/// lock timeout (2 s), so requests queued behind a migration that waits for
/// a lock get through when it gives up.
pub const DEFAULT_MIGRATION_LOCK_TIMEOUT: Duration = Duration::from_millis(1000);

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            jobs: 4,
            only: vec![],
            target: None,
            lock_timeout: DEFAULT_MIGRATION_LOCK_TIMEOUT,
            lock_retries: 3,
        }
    }
}

/// What happened to one tenant.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum TenantOutcome {
    Migrated {
        slug: String,
        from: i32,
        to: i32,
        applied: Vec<String>,
        ms: f64,
    },
    /// Already current when its turn came (e.g. another runner did it), or
    /// deleted/suspended-for-deletion in the meantime.
    Skipped { slug: String, reason: String },
    Failed {
        slug: String,
        from: i32,
        migration: Option<String>,
        error: String,
        /// An applied migration differs from (or is missing in) the template.
        diverged: bool,
    },
    /// Never got its locks within the lock timeout, after every retry: left
    /// at its version, nothing wrong with its SQL.
    LockTimeout {
        slug: String,
        from: i32,
        attempts: u32,
        error: String,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct FleetReport {
    pub target: i32,
    /// Tenants the registry already showed at the target, untouched.
    pub up_to_date: usize,
    pub migrated: usize,
    pub skipped: usize,
    pub failed: usize,
    pub lock_timeouts: usize,
    /// The failed and lock-timed-out tenants.
    pub failures: Vec<TenantOutcome>,
    /// Warm schemas rebuilt at the new version (see `warm`): only by a run
    /// of every org to the template's latest version.
    pub warm_rebuilt: usize,
    pub seconds: f64,
}

/// The registry's view of who is behind `target`, from one query.
pub struct Plan {
    pub target: i32,
    pub behind: Vec<FleetTenant>,
    pub up_to_date: usize,
    /// What the database runs on (DDL is sent differently on Citus).
    pub engine: Engine,
}

/// Reads the plan: tenants (active or suspended) whose `template_version` is
/// below `target`. No tenant schema is touched.
pub async fn plan(
    pool: &PgPool,
    template: &Template,
    opts: &MigrateOptions,
) -> Result<Plan, Error> {
    let target = resolve_target(template, opts.target)?;
    let only: Vec<String> = opts.only.iter().map(|s| s.to_string()).collect();
    let rows: Vec<(FleetRow, i64)> = sqlx::query_as::<_, (Uuid, String, String, OrgStatus, i32, i64)>(
        "WITH scope AS ( \
           SELECT id, slug, schema_name, status, template_version FROM tenantry.organizations \
           WHERE status IN ('active', 'suspended') AND (cardinality($2::text[]) = 0 OR slug = ANY($2))) \
         SELECT id, slug, schema_name, status, template_version, \
                (SELECT count(*) FROM scope WHERE template_version >= $1) \
         FROM scope WHERE template_version < $1 ORDER BY slug",
    )
    .bind(target)
    .bind(&only)
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|(id, slug, schema_name, status, template_version, up)| {
        (
            FleetRow {
                id,
                slug,
                schema_name,
                status,
                template_version,
            },
            up,
        )
    })
    .collect();
    let up_to_date = match rows.first() {
        Some((_, up)) => *up as usize,
        None => sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM tenantry.organizations \
             WHERE status IN ('active', 'suspended') AND (cardinality($1::text[]) = 0 OR slug = ANY($1))",
        )
        .bind(&only)
        .fetch_one(pool)
        .await? as usize,
    };
    if !only.is_empty() {
        let known: i64 =
            sqlx::query_scalar("SELECT count(*) FROM tenantry.organizations WHERE slug = ANY($1)")
                .bind(&only)
                .fetch_one(pool)
                .await?;
        if known as usize != only.len() {
            return Err(Error::Validation {
                field: "only",
                message: "some of the given orgs do not exist".into(),
            });
        }
    }
    let behind = rows
        .into_iter()
        .map(|(r, _)| FleetTenant::try_from(r))
        .collect::<Result<Vec<_>, _>>()?;
    let engine = Engine::detect(&mut *pool.acquire().await?).await?;
    Ok(Plan {
        target,
        behind,
        up_to_date,
        engine,
    })
}

fn resolve_target(template: &Template, target: Option<i32>) -> Result<i32, Error> {
    let latest = template.latest_version();
    match target {
        None => Ok(latest),
        Some(t) if template.migrations().iter().any(|m| m.version() == t) => Ok(t),
        Some(t) => Err(Error::Validation {
            field: "target",
            message: format!("the template has no version {t} (latest is {latest})"),
        }),
    }
}

/// Names of the template's migrations above `from` up to `target`.
pub fn pending(template: &Template, from: i32, target: i32) -> Vec<String> {
    template
        .migrations()
        .iter()
        .filter(|m| m.version() > from && m.version() <= target)
        .map(ToString::to_string)
        .collect()
}

/// Applies the template to every tenant behind the target (see the module
/// documentation). Calls `progress` with each tenant's final outcome.
pub async fn migrate(
    pool: &PgPool,
    template: &Template,
    opts: &MigrateOptions,
    progress: impl FnMut(&TenantOutcome),
) -> Result<FleetReport, Error> {
    let started = Instant::now();
    let plan = plan(pool, template, opts).await?;
    migrate_planned(pool, template, plan, opts, started, progress).await
}

/// [`migrate`] with a plan the caller already read (e.g. to size a progress
/// bar); `started` is when the run began, for the report's duration.
pub async fn migrate_planned(
    pool: &PgPool,
    template: &Template,
    plan: Plan,
    opts: &MigrateOptions,
    started: Instant,
    mut progress: impl FnMut(&TenantOutcome),
) -> Result<FleetReport, Error> {
    let target = plan.target;
    let engine = plan.engine;
    let mut report = FleetReport {
        target,
        up_to_date: plan.up_to_date,
        migrated: 0,
        skipped: 0,
        failed: 0,
        lock_timeouts: 0,
        failures: vec![],
        warm_rebuilt: 0,
        seconds: 0.0,
    };
    let template = Arc::new(template.clone());
    let mut todo = plan.behind;
    let mut gave_up: Vec<(FleetTenant, String)> = vec![];
    let mut attempt = 0;
    loop {
        attempt += 1;
        let last = attempt > opts.lock_retries;
        let timed_out = Arc::new(Mutex::new(Vec::new()));
        let (pool2, template2, lock_timeout) = (pool.clone(), template.clone(), opts.lock_timeout);
        let timed_out2 = timed_out.clone();
        for_each_bounded(
            std::mem::take(&mut todo),
            opts.jobs.max(1),
            move |tenant| {
                let (pool, template) = (pool2.clone(), template2.clone());
                async move {
                    let outcome =
                        migrate_tenant(&pool, &template, &tenant, target, lock_timeout, engine)
                            .await;
                    (tenant, outcome)
                }
            },
            |(tenant, outcome)| {
                if let TenantOutcome::LockTimeout { .. } = &outcome {
                    if !last {
                        timed_out2.lock().expect("retry list").push(tenant);
                        return;
                    }
                }
                match &outcome {
                    TenantOutcome::Migrated { .. } => report.migrated += 1,
                    TenantOutcome::Skipped { .. } => report.skipped += 1,
                    TenantOutcome::Failed { .. } => {
                        report.failed += 1;
                        report.failures.push(outcome.clone());
                    }
                    TenantOutcome::LockTimeout { error, .. } => {
                        report.lock_timeouts += 1;
                        report
                            .failures
                            .push(with_attempts(outcome.clone(), attempt));
                        gave_up.push((tenant.clone(), error.clone()));
                    }
                }
                progress(&outcome);
            },
        )
        .await;
        todo = std::mem::take(&mut *timed_out.lock().expect("retry list"));
        if todo.is_empty() {
            break;
        }
        // Whatever held the locks may let go: back off, then try again.
        tokio::time::sleep(Duration::from_millis(500) * 2u32.pow(attempt.min(5))).await;
    }
    for (t, error) in gave_up {
        let error = format!("lock_timeout: {error}");
        if let Err(e) = record_failure(pool, &t, target, None, &error, false).await {
            tracing::warn!(slug = %t.slug, error = %e, "could not record the failure");
        }
    }
    // Signups must not take a schema older than the orgs they join.
    if opts.only.is_empty() && target == template.latest_version() {
        match crate::tenants::warm::rebuild_outdated(pool, &template).await {
            Ok(n) => report.warm_rebuilt = n,
            Err(e) => {
                tracing::warn!(error = %e, "could not rebuild outdated warm schemas; signups build their own meanwhile")
            }
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

fn with_attempts(outcome: TenantOutcome, n: u32) -> TenantOutcome {
    match outcome {
        TenantOutcome::LockTimeout {
            slug, from, error, ..
        } => TenantOutcome::LockTimeout {
            slug,
            from,
            attempts: n,
            error,
        },
        other => other,
    }
}

/// A tenant's migration history: (version, name, checksum), by version.
type History = Vec<(i32, String, String)>;

/// Why a tenant's migration stopped.
enum Stop {
    /// Nothing (more) to do when its turn came: another runner did it, or
    /// the org was deleted or is no longer active or suspended.
    Changed,
    /// An applied migration differs from (or is missing in) the template.
    Diverged { migration: String, message: String },
    /// Another runner held the tenant's migration lock for the whole lock
    /// timeout.
    Busy,
    Failed {
        migration: Option<String>,
        error: sqlx::Error,
    },
}

/// What one step (one transaction, or one no-transaction migration) did.
struct Step {
    applied: Vec<String>,
    now_at: i32,
    /// Nothing left up to the target.
    finished: bool,
}

async fn migrate_tenant(
    pool: &PgPool,
    template: &Template,
    t: &FleetTenant,
    target: i32,
    lock_timeout: Duration,
    engine: Engine,
) -> TenantOutcome {
    let started = Instant::now();
    let slug = t.slug.to_string();
    let failed = |migration: Option<String>, error: String, diverged: bool| {
        let (pool, t) = (pool.clone(), t.clone());
        async move {
            if let Err(e) =
                record_failure(&pool, &t, target, migration.as_deref(), &error, diverged).await
            {
                tracing::warn!(slug = %t.slug, error = %e, "could not record the failure");
            }
            TenantOutcome::Failed {
                slug: t.slug.to_string(),
                from: t.template_version,
                migration,
                error,
                diverged,
            }
        }
    };
    let mut registry_at = t.template_version;
    let mut applied = vec![];
    loop {
        match migrate_step(pool, template, t, target, lock_timeout, engine).await {
            Ok(step) => {
                applied.extend(step.applied);
                registry_at = step.now_at;
                if step.finished {
                    break;
                }
            }
            Err(Stop::Changed) if applied.is_empty() => {
                return TenantOutcome::Skipped {
                    slug,
                    reason: "already at the target, or no longer active".into(),
                }
            }
            Err(Stop::Changed) => break,
            Err(Stop::Diverged { migration, message }) => {
                return failed(Some(migration), message, true).await
            }
            Err(Stop::Busy) => {
                return TenantOutcome::LockTimeout {
                    slug,
                    from: registry_at,
                    attempts: 1,
                    error: format!(
                        "another runner held this tenant's migration lock for {} ms",
                        lock_timeout.as_millis()
                    ),
                }
            }
            Err(Stop::Failed { error, .. }) if sqlstate(&error).as_deref() == Some("55P03") => {
                return TenantOutcome::LockTimeout {
                    slug,
                    from: registry_at,
                    attempts: 1,
                    error: crate::base::error::chain(&error),
                }
            }
            Err(Stop::Failed { migration, error }) => {
                return failed(migration, crate::base::error::chain(&error), false).await
            }
        }
    }
    TenantOutcome::Migrated {
        slug,
        from: t.template_version,
        to: registry_at,
        applied,
        ms: started.elapsed().as_secs_f64() * 1000.0,
    }
}

/// A pooled connection that is closed instead of reused unless the work on
/// it finished cleanly (so no half-done transaction or session setting ever
/// goes back to the pool, whatever failed or was cancelled).
struct Guarded {
    conn: PoolConnection<Postgres>,
    clean: bool,
}

impl Guarded {
    /// Ends the transaction; the connection is clean if that worked.
    async fn rollback(&mut self) {
        self.clean = simple_query(&mut self.conn, "ROLLBACK").await.is_ok();
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if !self.clean {
            self.conn.close_on_drop();
        }
    }
}

/// The lock-and-read statements: tries the per-tenant advisory lock
/// (without waiting: see [`lock_and_read`]), then, only if it was granted,
/// reads the registry row (locked in a transaction) and the tenant's whole
/// history. Two statements, so that the read takes its snapshot after the
/// lock was granted and sees what the previous holder committed.
fn check_sql(t: &FleetTenant, try_lock: &str, for_update: bool) -> String {
    format!(
        "SELECT set_config('tenantry.fleet_locked', {try_lock}(hashtextextended('tenantry:{id}', 0))::text, true);\n\
         SELECT o.status::text, o.template_version, \
           (SELECT coalesce(json_agg(json_build_array(version, name, checksum) ORDER BY version), '[]') \
            FROM {s}.{HISTORY_TABLE})::text \
         FROM tenantry.organizations o \
         WHERE o.id = '{id}' AND current_setting('tenantry.fleet_locked') = 'true'{upd}",
        id = t.id,
        s = t.schema.quoted(),
        upd = if for_update { " FOR UPDATE OF o" } else { "" }
    )
}

/// Another runner held the tenant's lock for the whole lock timeout.
struct Busy;

/// Sends `prefix` + [`check_sql`] until the advisory lock is granted or
/// `lock_timeout` has passed (then `Busy`; a transaction opened by `prefix`
/// is rolled back before each new try).
///
/// It polls instead of waiting in the statement: a statement waiting for
/// the lock holds a snapshot, and a concurrent index build of the runner
/// holding the lock waits for every older snapshot to go, so waiting would
/// deadlock with it.
async fn lock_and_read(
    conn: &mut PgConnection,
    prefix: &str,
    check: &str,
    in_transaction: bool,
    lock_timeout: Duration,
) -> Result<Result<Option<Locked>, Busy>, sqlx::Error> {
    let deadline = Instant::now() + lock_timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        let rows = simple_rows(conn, &format!("{prefix}{check}")).await?;
        let granted = rows
            .iter()
            .find(|r| r.len() == 1)
            .map(|r| r.try_get::<String, _>(0))
            .transpose()?
            .is_some_and(|v| v == "true");
        if granted {
            return Locked::read(rows).map(Ok);
        }
        if in_transaction {
            simple_query(conn, "ROLLBACK").await?;
        }
        if Instant::now() + pause > deadline {
            return Ok(Err(Busy));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// What the lock-and-read query saw: the registry's version and the
/// history; `None` when the org is gone or neither active nor suspended.
struct Locked {
    registry_at: i32,
    history: History,
}

impl Locked {
    /// From the rows of [`check_sql`]'s statements: the lock's row has one
    /// column, the registry's three (none when the org is gone).
    fn read(rows: Vec<sqlx::postgres::PgRow>) -> Result<Option<Locked>, sqlx::Error> {
        let Some(row) = rows.into_iter().rfind(|r| r.len() == 3) else {
            return Ok(None);
        };
        let status: String = row.try_get(0)?;
        if !matches!(status.as_str(), "active" | "suspended") {
            return Ok(None);
        }
        let json: String = row.try_get(2)?;
        let history = serde_json::from_str(&json)
            .map_err(|e| sqlx::Error::Decode(format!("migration history: {e}").into()))?;
        Ok(Some(Locked {
            registry_at: row.try_get(1)?,
            history,
        }))
    }

    fn history_at(&self) -> Option<i32> {
        self.history.iter().map(|h| h.0).max()
    }
}

fn record_sql(t: &FleetTenant, now_at: i32) -> String {
    format!(
        "UPDATE tenantry.organizations SET template_version = {now_at}, updated_at = now() WHERE id = '{id}';\n\
         DELETE FROM tenantry.migration_failures WHERE organization_id = '{id}'",
        id = t.id
    )
}

/// One step of a tenant's migration: locks and reads the registry row and
/// the history, then applies the run of transactional migrations that
/// comes next in the same transaction, or hands the next no-transaction
/// migration to [`run_no_transaction`].
async fn migrate_step(
    pool: &PgPool,
    template: &Template,
    t: &FleetTenant,
    target: i32,
    lock_timeout: Duration,
    engine: Engine,
) -> Result<Step, Stop> {
    let failed = |migration: Option<&Migration>| {
        let migration = migration.map(ToString::to_string);
        move |error| Stop::Failed { migration, error }
    };
    let mut g = Guarded {
        conn: pool.acquire().await.map_err(failed(None))?,
        clean: false,
    };
    // Round trip 1: BEGIN, settings, locks, the registry row and history.
    let begin = format!(
        "BEGIN; SET LOCAL search_path TO {}; SET LOCAL lock_timeout = {};\n",
        t.schema.quoted(),
        lock_timeout.as_millis().max(1),
    );
    let check = check_sql(t, "pg_try_advisory_xact_lock", true);
    let locked = lock_and_read(&mut g.conn, &begin, &check, true, lock_timeout).await;
    let locked = match locked {
        Ok(Ok(Some(locked))) => locked,
        Ok(Ok(None)) => {
            g.rollback().await;
            return Err(Stop::Changed);
        }
        Ok(Err(Busy)) => {
            g.clean = true;
            return Err(Stop::Busy);
        }
        Err(e) => {
            g.rollback().await;
            return Err(failed(None)(e));
        }
    };
    let pending = match template.pending(&locked.history, target) {
        Ok(pending) => pending,
        Err(d) => {
            g.rollback().await;
            return Err(Stop::Diverged {
                migration: d.migration,
                message: d.message,
            });
        }
    };
    let history_at = locked.history_at();
    let finish = |now_at: i32| format!("RESET ROLE;\n{};\nCOMMIT", record_sql(t, now_at));
    let Some(first) = pending.first() else {
        // Behind in the registry only (the history has it all), or done.
        let now_at = history_at.unwrap_or(locked.registry_at);
        if now_at <= locked.registry_at {
            g.rollback().await;
            return Err(Stop::Changed);
        }
        if let Err(e) = simple_query(&mut g.conn, &finish(now_at)).await {
            g.rollback().await;
            return Err(failed(None)(e));
        }
        g.clean = true;
        return Ok(Step {
            applied: vec![],
            now_at,
            finished: true,
        });
    };
    if template.is_no_transaction(first) {
        g.rollback().await;
        drop(g);
        run_no_transaction(pool, t, first, locked.registry_at, history_at, lock_timeout).await?;
        return Ok(Step {
            applied: vec![first.to_string()],
            now_at: first.version(),
            finished: pending.len() == 1,
        });
    }
    // Round trip 2 (and one per further migration): each migration with its
    // history row, as the tenant's role, one message each (so a failure
    // names its migration); the last message also records the new version
    // and commits.
    let run: Vec<&Migration> = pending
        .iter()
        .copied()
        .take_while(|m| !template.is_no_transaction(m))
        .collect();
    let now_at = run.last().map_or(locked.registry_at, |m| m.version());
    let role = RoleName::for_org(&t.id);
    // On Citus the DDL runs as the admin, one statement per message, and
    // what it made is handed to the tenant's role before the commit (see
    // `engine`).
    let citus = engine.is_citus();
    for (i, m) in run.iter().enumerate() {
        let mut message = String::new();
        if i == 0 && !citus {
            message.push_str(&format!("SET LOCAL ROLE {};\n", role.quoted()));
        }
        message.push_str(&template.transactional_sql(m));
        // "\n;\n" ends a trailing line comment of the migration
        message.push_str("\n;\n");
        message.push_str(&history_insert(m));
        let last = i + 1 == run.len();
        if last && citus {
            let handed = send_statements(&mut g.conn, &message, true).await;
            let handed = match handed {
                Ok(_) => {
                    crate::pg::statements::hand_over_schema(&mut g.conn, &t.schema, &role, true)
                        .await
                        .map_err(|e| match e {
                            Error::Database(db) => db,
                            other => sqlx::Error::Protocol(other.to_string()),
                        })
                }
                Err(e) => Err(e),
            };
            if let Err(e) = handed {
                g.rollback().await;
                return Err(failed(Some(m))(e));
            }
            message = String::new();
        } else if last {
            message.push_str(";\n");
        }
        if last {
            message.push_str(&finish(now_at));
        }
        if let Err(e) = send_statements(&mut g.conn, &message, citus).await {
            g.rollback().await;
            return Err(failed(Some(m))(e));
        }
    }
    g.clean = true;
    Ok(Step {
        applied: run.iter().map(ToString::to_string).collect(),
        now_at,
        finished: run.len() == pending.len(),
    })
}

/// One no-transaction migration: outside a transaction, under the
/// per-tenant advisory lock held by the session, on a connection that is
/// closed afterwards (which also releases the lock).
async fn run_no_transaction(
    pool: &PgPool,
    t: &FleetTenant,
    m: &Migration,
    registry_at: i32,
    history_at: Option<i32>,
    lock_timeout: Duration,
) -> Result<(), Stop> {
    let failed = |error| Stop::Failed {
        migration: Some(m.to_string()),
        error,
    };
    let mut g = Guarded {
        conn: pool.acquire().await.map_err(failed)?,
        clean: false,
    };
    let setup = format!("SET lock_timeout = {};\n", lock_timeout.as_millis().max(1));
    let check = check_sql(t, "pg_try_advisory_lock", false);
    let locked = lock_and_read(&mut g.conn, &setup, &check, false, lock_timeout)
        .await
        .map_err(failed)?;
    match locked {
        Ok(Some(l)) if l.registry_at == registry_at && l.history_at() == history_at => {}
        Ok(_) => return Err(Stop::Changed),
        Err(Busy) => return Err(Stop::Busy),
    }
    let role = RoleName::for_org(&t.id);
    simple_query(
        &mut g.conn,
        &format!(
            "SET ROLE {}; SET search_path TO {}",
            role.quoted(),
            t.schema.quoted()
        ),
    )
    .await
    .map_err(failed)?;
    // A concurrent index build that failed (killed, cancelled, timed out)
    // leaves an invalid index behind; drop it so that the build can run
    // again and end with one valid index.
    let invalid: Vec<String> = simple_rows(
        &mut g.conn,
        &format!(
            "SELECT c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = '{}' AND NOT i.indisvalid",
            t.schema
        ),
    )
    .await
    .map_err(failed)?
    .iter()
    .map(|r| r.get::<String, _>(0))
    .collect();
    for index in invalid {
        tracing::info!(slug = %t.slug, index = %index, "dropping an invalid index left by a failed build");
        simple_query(
            &mut g.conn,
            &format!(
                "DROP INDEX CONCURRENTLY IF EXISTS {}.{}",
                t.schema.quoted(),
                quote_ident(&index)
            ),
        )
        .await
        .map_err(failed)?;
    }
    let statement = m.sql().unwrap_or_default();
    if is_concurrent(statement) {
        // A concurrent build holds SHARE UPDATE EXCLUSIVE, which neither
        // readers nor writers wait for, and then waits for every older
        // transaction of the database to end. Under a lock timeout any long
        // report elsewhere would fail the build; without one it simply
        // waits, blocking no one.
        simple_query(&mut g.conn, "SET lock_timeout = 0")
            .await
            .map_err(failed)?;
    }
    simple_query(&mut g.conn, statement).await.map_err(failed)?;
    let record = format!(
        "BEGIN;\n{};\nRESET ROLE;\n{};\nCOMMIT",
        history_insert(m),
        record_sql(t, m.version())
    );
    if let Err(e) = simple_query(&mut g.conn, &record).await {
        let _ = simple_query(&mut g.conn, "ROLLBACK").await;
        return Err(failed(e));
    }
    // the connection carries session settings and the session lock: it is
    // closed, not reused (clean stays false)
    Ok(())
}

/// Whether a statement builds or drops concurrently (the word as code, not
/// in a comment or literal).
fn is_concurrent(statement: &str) -> bool {
    crate::base::sql::remove_keyword(statement, "CONCURRENTLY") != statement
}

async fn record_failure(
    pool: &PgPool,
    t: &FleetTenant,
    target: i32,
    migration: Option<&str>,
    error: &str,
    diverged: bool,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO tenantry.migration_failures \
           (organization_id, from_version, target_version, migration, error, diverged) \
         SELECT $1, $2, $3, $4, $5, $6 WHERE EXISTS (SELECT 1 FROM tenantry.organizations WHERE id = $1) \
         ON CONFLICT (organization_id) DO UPDATE SET from_version = EXCLUDED.from_version, \
           target_version = EXCLUDED.target_version, migration = EXCLUDED.migration, \
           error = EXCLUDED.error, diverged = EXCLUDED.diverged, failed_at = now()",
    )
    .bind(t.id)
    .bind(t.template_version)
    .bind(target)
    .bind(migration)
    .bind(error)
    .bind(diverged)
    .execute(pool)
    .await?;
    Ok(())
}
