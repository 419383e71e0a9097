//! Operations over every tenant: applying the tenant template to the whole
//! fleet, read-only queries across all tenants, per-org statistics and the
//! doctor. Each tenant gets its own transaction; a failing tenant is
//! reported and the others go on.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::base::error::Error;
use crate::base::ident::{quote_ident, RoleName, SchemaName, Slug, TENANT_SCHEMA_PREFIX};
use crate::registry::OrgStatus;
use crate::tenants::template::HISTORY_TABLE;

/// One tenant as the fleet sees it.
#[derive(Debug, Clone, Serialize)]
pub struct FleetTenant {
    pub id: Uuid,
    #[serde(serialize_with = "display")]
    pub slug: Slug,
    #[serde(serialize_with = "display")]
    pub schema: SchemaName,
    pub status: OrgStatus,
    pub template_version: i32,
}

fn display<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

#[derive(sqlx::FromRow)]
struct FleetRow {
    id: Uuid,
    slug: String,
    schema_name: String,
    status: OrgStatus,
    template_version: i32,
}

impl TryFrom<FleetRow> for FleetTenant {
    type Error = Error;
    fn try_from(r: FleetRow) -> Result<Self, Error> {
        let (slug, schema) = crate::registry::parse_stored(&r.slug, &r.schema_name)?;
        Ok(FleetTenant {
            id: r.id,
            slug,
            schema,
            status: r.status,
            template_version: r.template_version,
        })
    }
}

/// Runs `work` over `items` with at most `jobs` at a time, calling `done`
/// with each result as it arrives. Workers pull from a shared queue, so
/// memory stays proportional to `jobs`, not to the number of items.
pub async fn for_each_bounded<T, R, F, Fut>(
    items: Vec<T>,
    jobs: usize,
    work: F,
    mut done: impl FnMut(R),
) where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = R> + Send,
{
    let queue = Arc::new(Mutex::new(VecDeque::from(items)));
    let work = Arc::new(work);
    let (tx, mut rx) = tokio::sync::mpsc::channel(jobs.max(1) * 2);
    for _ in 0..jobs.max(1) {
        let (queue, work, tx) = (queue.clone(), work.clone(), tx.clone());
        tokio::spawn(async move {
            loop {
                let next = queue.lock().expect("queue lock").pop_front();
                let Some(item) = next else { break };
                if tx.send(work(item).await).await.is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    while let Some(r) = rx.recv().await {
        done(r);
    }
}

pub mod audit;
mod migrate;

pub use migrate::{
    migrate, migrate_planned, pending, plan, FleetReport, MigrateOptions, Plan, TenantOutcome,
};

#[derive(Debug, Clone, Serialize)]
pub struct FleetStatus {
    /// The shared schema's version.
    pub shared_version: i32,
    /// (template_version, number of tenants), ascending.
    pub versions: Vec<(i32, i64)>,
    pub failed: Vec<RecordedFailure>,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct RecordedFailure {
    pub slug: String,
    pub from_version: i32,
    pub target_version: i32,
    pub migration: Option<String>,
    pub error: String,
    pub diverged: bool,
    #[serde(with = "time::serde::rfc3339")]
    pub failed_at: time::OffsetDateTime,
}

pub async fn status(pool: &PgPool) -> Result<FleetStatus, Error> {
    let versions = sqlx::query_as(
        "SELECT template_version, count(*) FROM tenantry.organizations \
         WHERE status IN ('active', 'suspended') GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(pool)
    .await?;
    let failed = sqlx::query_as(
        "SELECT o.slug, f.from_version, f.target_version, f.migration, f.error, f.diverged, f.failed_at \
         FROM tenantry.migration_failures f JOIN tenantry.organizations o ON o.id = f.organization_id \
         ORDER BY o.slug",
    )
    .fetch_all(pool)
    .await?;
    let shared_version = crate::tenants::shared::version(&mut *pool.acquire().await?).await?;
    Ok(FleetStatus {
        shared_version,
        versions,
        failed,
    })
}

// ---------------------------------------------------------------- query

/// Rows of one tenant's read-only query, each a JSON object in column order.
#[derive(Debug, Clone)]
pub enum QueryOutcome {
    Rows {
        slug: String,
        rows: Vec<serde_json::Map<String, serde_json::Value>>,
    },
    Failed {
        slug: String,
        error: String,
    },
}

pub async fn active_tenants(pool: &PgPool) -> Result<Vec<FleetTenant>, Error> {
    let rows: Vec<FleetRow> = sqlx::query_as(
        "SELECT id, slug, schema_name, status, template_version FROM tenantry.organizations \
         WHERE status = 'active' ORDER BY slug",
    )
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(FleetTenant::try_from).collect()
}

/// Checks a cross-tenant query before it is run: it must start like a
/// read-only statement (SELECT, WITH, VALUES, TABLE), and trailing
/// semicolons are dropped. It then runs wrapped as
/// `SELECT to_json(q)::text FROM (<sql>) q` in a READ ONLY transaction
/// through the extended protocol, which accepts one statement only; the
/// read-only transaction is what really refuses writes (e.g. a
/// data-modifying WITH), the first-word check gives a clear message early.
pub fn prepare_query(sql: &str) -> Result<String, Error> {
    let body = sql
        .trim()
        .trim_end_matches(|c: char| c == ';' || c.is_whitespace());
    let invalid = |message: &str| Error::Validation {
        field: "query",
        message: message.into(),
    };
    if body.is_empty() {
        return Err(invalid("the query is empty"));
    }
    let first = first_keyword(body).to_ascii_lowercase();
    if !matches!(first.as_str(), "select" | "with" | "values" | "table") {
        return Err(invalid(&format!(
            "only read-only SELECT statements can run across tenants; writes are refused (got {first:?})"
        )));
    }
    Ok(format!("SELECT to_json(q)::text FROM ({body}\n) q"))
}

/// The first word of `sql`, after leading comments, whitespace and `(`.
fn first_keyword(mut sql: &str) -> &str {
    loop {
        sql = sql.trim_start_matches(|c: char| c.is_whitespace() || c == '(');
        if let Some(rest) = sql.strip_prefix("--") {
            sql = rest.split_once('\n').map(|(_, r)| r).unwrap_or("");
        } else if let Some(rest) = sql.strip_prefix("/*") {
            sql = rest.split_once("*/").map(|(_, r)| r).unwrap_or("");
        } else {
            break;
        }
    }
    let end = sql
        .find(|c: char| !c.is_alphanumeric() && c != '_')
        .unwrap_or(sql.len());
    &sql[..end]
}

/// Runs a read-only query in every active tenant, `jobs` at a time, each
/// in a READ ONLY transaction with a statement timeout. A failing tenant is
/// reported and does not stop the others.
pub async fn query_all(
    pool: &PgPool,
    sql: &str,
    jobs: usize,
    statement_timeout: Duration,
    each: impl FnMut(QueryOutcome),
) -> Result<(), Error> {
    let wrapped = Arc::new(prepare_query(sql)?);
    let tenants = active_tenants(pool).await?;
    let pool = pool.clone();
    let timeout_ms = statement_timeout.as_millis().max(1);
    for_each_bounded(
        tenants,
        jobs,
        move |t| {
            let (pool, wrapped) = (pool.clone(), wrapped.clone());
            async move {
                let slug = t.slug.to_string();
                match query_tenant(&pool, &t, &wrapped, timeout_ms).await {
                    Ok(rows) => QueryOutcome::Rows { slug, rows },
                    Err(e) => QueryOutcome::Failed {
                        slug,
                        error: read_only_message(&e),
                    },
                }
            }
        },
        each,
    )
    .await;
    Ok(())
}

fn read_only_message(e: &sqlx::Error) -> String {
    match crate::base::error::sqlstate(e).as_deref() {
        Some("25006") => format!("writes are refused: {e}"),
        _ => e.to_string(),
    }
}

async fn query_tenant(
    pool: &PgPool,
    t: &FleetTenant,
    wrapped: &str,
    timeout_ms: u128,
) -> Result<Vec<serde_json::Map<String, serde_json::Value>>, sqlx::Error> {
    // Confined to the tenant's role: the query cannot read the registry or
    // another tenant, whatever it names.
    let begin = format!(
        "BEGIN READ ONLY; SET LOCAL ROLE {}; SET LOCAL search_path TO {}; SET LOCAL statement_timeout = {timeout_ms}",
        RoleName::for_org(&t.id).quoted(),
        t.schema.tenant_search_path()
    );
    let mut tx = pool.begin_with(begin).await?;
    let rows: Vec<String> = sqlx::query_scalar(wrapped)
        .persistent(false)
        .fetch_all(&mut *tx)
        .await?;
    tx.rollback().await?;
    rows.into_iter()
        .map(|r| match serde_json::from_str::<serde_json::Value>(&r) {
            Ok(serde_json::Value::Object(m)) => Ok(m),
            _ => Err(sqlx::Error::Decode("query row is not a JSON object".into())),
        })
        .collect()
}

/// Per-org row counts: PostgreSQL's own estimates (the statistics of live
/// tuples), not a count of each table.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct OrgStats {
    pub slug: String,
    pub tests: Option<i64>,
    pub behaviors: Option<i64>,
    pub statuses: Option<i64>,
    /// Set when the org's counts could not be read (e.g. its schema is
    /// missing).
    pub error: Option<String>,
}

/// Row-count estimates of every active org in one catalog query: the
/// statistics PostgreSQL keeps per table (live tuples, updated as
/// transactions commit, shortly after), looked up by the tables' names
/// through the catalog's index. No tenant table is opened, so this stays
/// fast at any tenant count and loads no tenant's catalog entries into the
/// backend.
///
/// On Citus the tables live on the workers: their statistics are read there,
/// one query per worker (`run_command_on_workers`), and matched to the orgs
/// by schema and table name.
pub async fn stats(pool: &PgPool) -> Result<Vec<OrgStats>, Error> {
    if crate::pg::engine::Engine::detect(&mut *pool.acquire().await?)
        .await?
        .is_citus()
    {
        return stats_on_workers(pool).await;
    }
    Ok(sqlx::query_as(
        "SELECT o.slug, \
           max(pg_stat_get_live_tuples(c.oid)) FILTER (WHERE c.relname = 'tests') AS tests, \
           max(pg_stat_get_live_tuples(c.oid)) FILTER (WHERE c.relname = 'behaviors') AS behaviors, \
           max(pg_stat_get_live_tuples(c.oid)) FILTER (WHERE c.relname = 'statuses') AS statuses, \
           CASE WHEN n.oid IS NULL THEN 'schema ' || o.schema_name || ' is missing' END AS error \
         FROM tenantry.organizations o \
         LEFT JOIN pg_namespace n ON n.nspname = o.schema_name \
         LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relkind IN ('r', 'p') \
           AND c.relname IN ('tests', 'behaviors', 'statuses') \
         WHERE o.status = 'active' \
         GROUP BY o.slug, o.schema_name, n.oid ORDER BY o.slug",
    )
    .fetch_all(pool)
    .await?)
}

async fn stats_on_workers(pool: &PgPool) -> Result<Vec<OrgStats>, Error> {
    let orgs: Vec<(String, String, bool)> = sqlx::query_as(
        "SELECT o.slug, o.schema_name, n.oid IS NOT NULL FROM tenantry.organizations o \
         LEFT JOIN pg_namespace n ON n.nspname = o.schema_name \
         WHERE o.status = 'active' ORDER BY o.slug",
    )
    .fetch_all(pool)
    .await?;
    // (schema, shard table, live tuples) of every tenant table on a worker
    let per_worker: Vec<(bool, String)> = sqlx::query_as(
        "SELECT success, result FROM run_command_on_workers($q$ \
           SELECT coalesce(json_agg(json_build_array(schemaname, relname, n_live_tup)), '[]') \
           FROM pg_stat_user_tables WHERE schemaname LIKE 't\\_%' $q$)",
    )
    .fetch_all(pool)
    .await?;
    let mut counts: std::collections::HashMap<(String, String), i64> = Default::default();
    for (success, result) in per_worker {
        if !success {
            return Err(Error::Internal(format!(
                "a worker did not answer: {result}"
            )));
        }
        let rows: Vec<(String, String, i64)> = serde_json::from_str(&result)
            .map_err(|e| Error::Internal(format!("worker statistics: {e}")))?;
        for (schema, shard, live) in rows {
            // a shard is named after its table plus `_<shard id>`
            let table = shard
                .rsplit_once('_')
                .filter(|(_, id)| id.bytes().all(|b| b.is_ascii_digit()))
                .map_or(shard.as_str(), |(table, _)| table)
                .to_owned();
            *counts.entry((schema, table)).or_default() += live;
        }
    }
    Ok(orgs
        .into_iter()
        .map(|(slug, schema, exists)| {
            let count = |table: &str| {
                exists.then(|| {
                    counts
                        .get(&(schema.clone(), table.to_owned()))
                        .copied()
                        .unwrap_or(0)
                })
            };
            OrgStats {
                tests: count("tests"),
                behaviors: count("behaviors"),
                statuses: count("statuses"),
                error: (!exists).then(|| format!("schema {schema} is missing")),
                slug,
            }
        })
        .collect())
}

// ---------------------------------------------------------------- doctor

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum Finding {
    /// A `t_*` schema no organization owns and not in the warm pool.
    OrphanSchema { schema: String },
    /// An organization whose schema does not exist.
    MissingSchema { slug: String, schema: String },
    /// An organization left in `provisioning` or `deleting`.
    StuckStatus { slug: String, status: String },
    /// `template_version` disagrees with the schema's refinery history.
    VersionMismatch {
        slug: String,
        registry: i32,
        history: Option<i32>,
    },
    /// A warm-pool row whose schema does not exist (signups skip it).
    MissingWarmSchema { schema: String },
    /// An organization without its PostgreSQL role (created by a version
    /// before tenant roles): its requests cannot be served.
    MissingRole { slug: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct DoctorReport {
    pub findings: Vec<Finding>,
    /// What `--repair` did, one line per fix.
    pub repaired: Vec<String>,
    /// Findings left alone because no automatic fix is safe.
    pub left: Vec<String>,
}

pub async fn doctor(pool: &PgPool, repair: bool) -> Result<DoctorReport, Error> {
    let mut findings = vec![];
    let orphans: Vec<String> = sqlx::query_scalar(
        "SELECT n.nspname::text FROM pg_namespace n \
         WHERE left(n.nspname, length($1)) = $1 \
           AND NOT EXISTS (SELECT 1 FROM tenantry.organizations o WHERE o.schema_name = n.nspname) \
           AND NOT EXISTS (SELECT 1 FROM tenantry.warm_schemas w WHERE w.schema_name = n.nspname) \
         ORDER BY 1",
    )
    .bind(TENANT_SCHEMA_PREFIX)
    .fetch_all(pool)
    .await?;
    findings.extend(
        orphans
            .into_iter()
            .map(|schema| Finding::OrphanSchema { schema }),
    );
    let lost_warm: Vec<String> = sqlx::query_scalar(
        "SELECT w.schema_name FROM tenantry.warm_schemas w \
         WHERE NOT EXISTS (SELECT 1 FROM pg_namespace n WHERE n.nspname = w.schema_name) \
         ORDER BY 1",
    )
    .fetch_all(pool)
    .await?;
    findings.extend(
        lost_warm
            .into_iter()
            .map(|schema| Finding::MissingWarmSchema { schema }),
    );
    // One catalog query for what the registry and the catalog say about
    // each org; the tenants' history tables are then read in batches.
    let orgs: Vec<(String, String, OrgStatus, i32, bool, bool)> = sqlx::query_as(
        "SELECT o.slug, o.schema_name, o.status, o.template_version, n.oid IS NOT NULL, \
                EXISTS (SELECT 1 FROM pg_class c WHERE c.relnamespace = n.oid AND c.relname = $1) \
         FROM tenantry.organizations o LEFT JOIN pg_namespace n ON n.nspname = o.schema_name \
         ORDER BY o.slug",
    )
    .bind(HISTORY_TABLE)
    .fetch_all(pool)
    .await?;
    let with_history: Vec<SchemaName> = orgs
        .iter()
        .filter(|o| o.5)
        .filter_map(|o| SchemaName::parse(&o.1).ok())
        .collect();
    let jobs = (pool.options().get_max_connections() as usize)
        .saturating_sub(1)
        .max(1);
    let versions = history_versions(pool, with_history, jobs).await?;
    for (slug, schema, status, version, exists, _) in orgs {
        if matches!(status, OrgStatus::Provisioning | OrgStatus::Deleting) {
            findings.push(Finding::StuckStatus {
                slug: slug.clone(),
                status: status.to_string(),
            });
        }
        if !exists {
            findings.push(Finding::MissingSchema { slug, schema });
            continue;
        }
        let history = versions.get(&schema).copied().flatten();
        if history != Some(version) {
            findings.push(Finding::VersionMismatch {
                slug,
                registry: version,
                history,
            });
        }
    }
    findings.extend(
        crate::registry::roles::orgs_without_roles(pool)
            .await?
            .into_iter()
            .map(|(slug, _, _)| Finding::MissingRole { slug }),
    );
    let mut report = DoctorReport {
        findings: findings.clone(),
        repaired: vec![],
        left: vec![],
    };
    let mut roles_repaired = false;
    for f in findings {
        match (&f, repair) {
            (Finding::VersionMismatch { slug, history: Some(h), .. }, true) => {
                sqlx::query("UPDATE tenantry.organizations SET template_version = $2, updated_at = now() WHERE slug = $1")
                    .bind(slug)
                    .bind(h)
                    .execute(pool)
                    .await?;
                report.repaired.push(format!("{slug}: template_version set to {h}, as its history says"));
            }
            (Finding::StuckStatus { slug, status }, true) if status == "deleting" => {
                let slug = Slug::parse(slug)?;
                crate::tenants::provision::delete_org(pool, &slug).await?;
                report.repaired.push(format!("{slug}: finished its deletion (schema dropped, row removed)"));
            }
            (Finding::MissingRole { slug }, true) => {
                if !roles_repaired {
                    crate::registry::roles::ensure_tenant_roles(pool).await?;
                    roles_repaired = true;
                }
                report.repaired.push(format!("{slug}: role created; it now owns the org's schema"));
            }
            (Finding::MissingWarmSchema { schema }, true) => {
                crate::tenants::warm::forget_missing(pool, schema).await?;
                report.repaired.push(format!("{schema}: removed from the warm pool (its schema was gone)"));
            }
            (Finding::OrphanSchema { schema }, _) => report.left.push(format!(
                "{schema}: no organization owns it; inspect it, then DROP SCHEMA {} CASCADE or recreate its org",
                quote_ident(schema)
            )),
            (Finding::MissingSchema { slug, schema }, _) => report.left.push(format!(
                "{slug}: schema {schema} is missing; restore it from a backup or delete the org"
            )),
            (other, _) => report.left.push(format!("{other:?}")),
        }
    }
    Ok(report)
}

/// The highest applied version in the history table of each schema, read
/// `HISTORY_BATCH` schemas per query (one round trip per batch, not per
/// tenant) on up to `jobs` connections at once, each closed afterwards: it
/// has opened many tenants' history tables, and the pool should not keep
/// those cache entries.
async fn history_versions(
    pool: &PgPool,
    schemas: Vec<SchemaName>,
    jobs: usize,
) -> Result<std::collections::HashMap<String, Option<i32>>, Error> {
    const HISTORY_BATCH: usize = 250;
    let batches: Vec<Vec<SchemaName>> = schemas
        .chunks(HISTORY_BATCH)
        .map(<[SchemaName]>::to_vec)
        .collect();
    let mut out = std::collections::HashMap::with_capacity(schemas.len());
    let mut failure = None;
    let pool = pool.clone();
    for_each_bounded(
        batches,
        jobs,
        move |batch| {
            let pool = pool.clone();
            async move {
                let sql = batch
                    .iter()
                    .map(|s| {
                        format!(
                            "SELECT '{s}'::text, (SELECT max(version) FROM {}.{HISTORY_TABLE})",
                            s.quoted()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(" UNION ALL ");
                let mut conn = pool.acquire().await?;
                conn.close_on_drop();
                sqlx::query_as::<_, (String, Option<i32>)>(&sql)
                    .persistent(false)
                    .fetch_all(&mut *conn)
                    .await
            }
        },
        |rows| match rows {
            Ok(rows) => out.extend(rows),
            Err(e) => failure = Some(e),
        },
    )
    .await;
    match failure {
        Some(e) => Err(e.into()),
        None => Ok(out),
    }
}
