//! The shared schema: data every org reads and only the admin writes
//! (plans, feature flags, the catalog of presets new orgs start from).
//!
//! - Its migrations (`shared_template/`, compiled in, or a directory given
//!   to `tenantry migrate`) keep their own history inside the schema and are
//!   applied before any tenant migration: at startup, like the registry,
//!   and by `tenantry migrate`.
//! - One reader role per database (`tenantry_shared_<database oid>`, see
//!   `registry::roles`) has USAGE on the schema, SELECT on its tables and
//!   EXECUTE on its routines; every tenant role is a member of it and of
//!   nothing else. Only the admin (the schema's owner) writes. PUBLIC has
//!   USAGE on the schema too, which reads nothing by itself and spares
//!   PostgreSQL a membership lookup at every tenant transaction.
//! - A tenant transaction searches the tenant's schema first and this one
//!   second (invariant 1). A tenant relation or routine named like a shared
//!   one would hide it, and a shared one would answer for a tenant table the
//!   tenant schema lacks, so [`check_no_shadowing`] refuses such a pair of
//!   templates before either is used.
//! - On Citus its tables are reference tables, copied to every worker, so a
//!   tenant query that joins them runs on the tenant's node alone.

use sqlx::{PgConnection, PgPool};

use crate::base::error::{Error, TemplateError};
use crate::base::ident::{quote_ident, RoleName};
use crate::pg::engine::Engine;
use crate::pg::migrations::HISTORY_TABLE;
use crate::pg::statements::{send_statements, simple_query};
use crate::tenants::template::Template;

pub use crate::base::ident::SHARED_SCHEMA;

/// Serialises shared migrations between processes started at once.
const SHARED_MIGRATION_LOCK: i64 = 0x7465_6e61_6e74_5348; // "tenanSH"

mod embedded_shared {
    refinery::embed_migrations!("shared_template");
}

/// The shared template compiled into this binary from `shared_template/`.
pub fn embedded_template() -> Template {
    Template::from_migrations(
        embedded_shared::migrations::runner()
            .get_migrations()
            .clone(),
    )
    .expect("the embedded shared template has migrations")
}

/// What [`migrate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedMigrated {
    /// Names (`V2__plans`) of the migrations applied by this call.
    pub applied: Vec<String>,
    /// The shared schema's version afterwards.
    pub version: i32,
    /// Tenant roles of an earlier version made members of the reader role.
    pub readers_added: usize,
}

/// Creates the shared schema and its reader role if needed, applies the
/// pending migrations of `template`, grants the reader role SELECT on every
/// shared table, makes every tenant role a reader and, on Citus, makes
/// every shared table a reference table; then checks the `tenant`
/// template against the result: its required shared version is there, and
/// none of its names shadows a shared one. All in one transaction under an
/// advisory lock, so a failed check leaves the shared schema as it was. A
/// database whose shared schema is ahead of `template` (migrated by a newer
/// release or a template directory) is left as it is, as long as the
/// migrations both know agree.
#[tracing::instrument(skip_all)]
pub async fn migrate(
    pool: &PgPool,
    template: &Template,
    tenant: &Template,
) -> Result<SharedMigrated, Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(SHARED_MIGRATION_LOCK)
        .execute(&mut *tx)
        .await?;
    let engine = Engine::detect(&mut tx).await?;
    if engine.is_citus() {
        // A schema of reference tables, not a distributed (tenant) schema.
        simple_query(
            &mut tx,
            "SET LOCAL citus.enable_schema_based_sharding = off",
        )
        .await?;
    }
    let schema = quote_ident(SHARED_SCHEMA);
    simple_query(&mut tx, &format!("CREATE SCHEMA IF NOT EXISTS {schema}")).await?;
    let reader = crate::registry::roles::ensure_shared_reader(&mut tx).await?;
    // USAGE on the schema for PUBLIC as well as the reader: PostgreSQL
    // checks it for every schema of the search path whenever the role
    // changes, i.e. at every tenant transaction, and a right held through a
    // membership makes it compute the tenant role's memberships, a lookup
    // that grows with the tenant roles a backend has served. A right held
    // by PUBLIC is found first. USAGE alone reads nothing: tables keep their
    // SELECT for the reader only and routines their EXECUTE (`grant_reads`).
    simple_query(
        &mut tx,
        &format!(
            "SET LOCAL search_path TO {schema}; GRANT USAGE ON SCHEMA {schema} TO {r}, PUBLIC",
            r = reader.quoted()
        ),
    )
    .await?;

    let history = applied(&mut tx).await?;
    let (_, ahead) = pending_of(template, &history)?;
    let applied = if ahead {
        tracing::warn!(
            database = history.iter().map(|a| a.0).max().unwrap_or(0),
            template = template.latest_version(),
            "the shared schema is ahead of this release's shared template; left as it is"
        );
        vec![]
    } else {
        crate::pg::migrations::run(&mut tx, template.migrations(), SHARED_SCHEMA, None, false)
            .await
            .map_err(Error::Template)?
            .migrations
    };

    if engine.is_citus() {
        make_reference_tables(&mut tx).await?;
    }
    grant_reads(&mut tx, &reader).await?;
    let readers_added = crate::registry::roles::make_tenant_roles_readers(&mut tx, &reader).await?;
    let version = version(&mut tx).await?;
    check_requirement(tenant, version)?;
    check_no_shadowing(&mut tx, tenant, engine.is_citus()).await?;
    crate::tenants::catalog::refresh_initial_data_seed(&mut tx).await?;
    tx.commit().await?;
    if !applied.is_empty() {
        tracing::info!(?applied, version, "shared schema migrated");
    }
    Ok(SharedMigrated {
        applied,
        version,
        readers_added,
    })
}

/// (version, name, checksum) of every migration applied to the shared
/// schema; none before its history table exists.
async fn applied(conn: &mut PgConnection) -> Result<Vec<(i32, String, String)>, Error> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(format!("{}.{HISTORY_TABLE}", quote_ident(SHARED_SCHEMA)))
        .fetch_one(&mut *conn)
        .await?;
    if !exists {
        return Ok(vec![]);
    }
    Ok(sqlx::query_as(&format!(
        "SELECT version, name, checksum FROM {}.{HISTORY_TABLE} ORDER BY version",
        quote_ident(SHARED_SCHEMA)
    ))
    .fetch_all(&mut *conn)
    .await?)
}

/// The migrations of `template` not yet applied to the shared schema (none
/// when the schema is ahead of it), as `migrate` would apply them.
pub async fn pending(pool: &PgPool, template: &Template) -> Result<Vec<String>, Error> {
    let history = applied(&mut *pool.acquire().await?).await?;
    Ok(pending_of(template, &history)?.0)
}

/// The migrations of `template` that `history` lacks, and whether the
/// history goes beyond the template (then nothing is pending). The
/// migrations both know must agree.
fn pending_of(
    template: &Template,
    history: &[(i32, String, String)],
) -> Result<(Vec<String>, bool), Error> {
    let latest = template.latest_version();
    let known: Vec<_> = history.iter().filter(|a| a.0 <= latest).cloned().collect();
    let pending = template.pending(&known, latest).map_err(|d| {
        Error::Template(TemplateError::Migration {
            schema: SHARED_SCHEMA.to_owned(),
            migration: Some(d.migration),
            message: d.message,
            diverged: true,
        })
    })?;
    let ahead = known.len() < history.len();
    let pending = if ahead {
        vec![]
    } else {
        pending.iter().map(ToString::to_string).collect()
    };
    Ok((pending, ahead))
}

/// The shared schema's version: its highest applied migration, 0 before
/// any (or before the schema exists).
pub async fn version(conn: &mut PgConnection) -> Result<i32, Error> {
    Ok(applied(conn).await?.iter().map(|a| a.0).max().unwrap_or(0))
}

/// SELECT on every shared table and view for the reader role, also on those
/// the admin creates later by hand; nothing on the migration history, which
/// is the admin's (and which every tenant schema has a table of the same
/// name for). EXECUTE on shared routines for the reader instead of PUBLIC:
/// PUBLIC may look names up in the schema (see `migrate`), and a routine
/// is executable by PUBLIC by default. A routine created by hand between
/// migrations is, until the next one; `doctor --audit` reports it.
async fn grant_reads(conn: &mut PgConnection, reader: &RoleName) -> Result<(), Error> {
    let schema = quote_ident(SHARED_SCHEMA);
    let r = reader.quoted();
    simple_query(
        conn,
        &format!(
            "GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {r}; \
             REVOKE ALL ON {schema}.{HISTORY_TABLE} FROM {r}; \
             ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} GRANT SELECT ON TABLES TO {r}; \
             REVOKE EXECUTE ON ALL ROUTINES IN SCHEMA {schema} FROM PUBLIC; \
             GRANT EXECUTE ON ALL ROUTINES IN SCHEMA {schema} TO {r}; \
             ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} GRANT EXECUTE ON ROUTINES TO {r}"
        ),
    )
    .await?;
    Ok(())
}

/// Makes every shared table not yet distributed a Citus reference table.
async fn make_reference_tables(conn: &mut PgConnection) -> Result<(), Error> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND c.relname <> $2 \
           AND NOT EXISTS (SELECT 1 FROM pg_dist_partition p WHERE p.logicalrelid = c.oid) \
         ORDER BY c.relname",
    )
    .bind(SHARED_SCHEMA)
    .bind(HISTORY_TABLE)
    .fetch_all(&mut *conn)
    .await?;
    for table in tables {
        sqlx::query("SELECT create_reference_table($1::regclass)")
            .bind(&table)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Checks that the shared version a tenant migration needs (its
/// `-- tenantry:requires-shared N` line) is at most `have`.
fn check_requirement(tenant: &Template, have: i32) -> Result<(), Error> {
    let Some((migration, required)) = tenant.shared_version_required(tenant.latest_version())
    else {
        return Ok(());
    };
    if have < required {
        return Err(Error::Template(TemplateError::Load(format!(
            "tenant migration {migration} requires shared version {required}, but the shared \
             schema is at version {have}: run `tenantry migrate` with a shared template that \
             has it (--shared-template-dir)"
        ))));
    }
    Ok(())
}

/// Refuses a tenant template with a relation or routine named like one in
/// the shared schema (migration histories aside), as the caller's
/// transaction sees it. The template is built in a scratch schema under a
/// savepoint that is always rolled back, so the check sees what its SQL
/// creates, whatever the spelling, and its migrations may read the shared
/// schema as migrated so far.
async fn check_no_shadowing(
    conn: &mut PgConnection,
    tenant: &Template,
    citus: bool,
) -> Result<(), Error> {
    const SCRATCH: &str = "tenantry_check_tenant";
    simple_query(&mut *conn, "SAVEPOINT tenantry_shadow_check").await?;
    let result = async {
        if citus {
            // the scratch schema stays on the coordinator
            simple_query(
                &mut *conn,
                "SET LOCAL citus.enable_schema_based_sharding = off; \
                 SET LOCAL citus.enable_ddl_propagation = off",
            )
            .await?;
        }
        simple_query(
            &mut *conn,
            &format!("CREATE SCHEMA {SCRATCH}; SET LOCAL search_path TO {SCRATCH}"),
        )
        .await?;
        for m in tenant.migrations() {
            send_statements(&mut *conn, &tenant.transactional_sql(m), citus)
                .await
                .map_err(|e| {
                    Error::Template(TemplateError::Migration {
                        schema: SCRATCH.to_owned(),
                        migration: Some(m.to_string()),
                        message: crate::base::error::chain(&e),
                        diverged: false,
                    })
                })?;
        }
        let clashes: Vec<String> = sqlx::query_scalar(
            "WITH names AS ( \
               SELECT n.nspname, c.relname::text AS name FROM pg_class c \
               JOIN pg_namespace n ON n.oid = c.relnamespace \
               WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S') AND c.relname <> $1 \
               UNION SELECT n.nspname, p.proname::text FROM pg_proc p \
               JOIN pg_namespace n ON n.oid = p.pronamespace) \
             SELECT DISTINCT t.name FROM names t JOIN names s ON s.name = t.name \
             WHERE t.nspname = $2 AND s.nspname = $3 ORDER BY 1",
        )
        .bind(HISTORY_TABLE)
        .bind(SCRATCH)
        .bind(SHARED_SCHEMA)
        .fetch_all(&mut *conn)
        .await?;
        Ok::<_, Error>(clashes)
    }
    .await;
    simple_query(
        &mut *conn,
        "ROLLBACK TO SAVEPOINT tenantry_shadow_check; RELEASE SAVEPOINT tenantry_shadow_check",
    )
    .await?;
    let clashes = result?;
    if clashes.is_empty() {
        Ok(())
    } else {
        Err(Error::Template(TemplateError::Load(format!(
            "the tenant template and the shared schema both name {}: a tenant transaction \
             searches its schema, then {SHARED_SCHEMA:?}, so one would hide the other; rename it",
            clashes.join(", ")
        ))))
    }
}
