//! The warm pool: tenant schemas built ahead of signups, so that creating
//! an org costs a few row writes instead of DDL.
//!
//! A warm schema is a whole tenant (role, schema, tables, refinery history
//! at the template version it was built with, initial data) for an org id
//! that no organization has yet, recorded in `tenantry.warm_schemas`. Its
//! names derive from that id like any org's, so taking one renames
//! nothing: the signup's transaction deletes the row (`FOR UPDATE SKIP
//! LOCKED`: two signups never take the same one) and inserts the
//! organization with that id and its owner user in the same statement
//! (`provision::create_org`). The initial data was recorded as written by
//! the id that owner then gets (`author_id`), so a signup writes nothing in
//! the tenant's schema; its rows carry the time the schema was built. The
//! initial data comes from the shared catalog's initial presets, whose
//! fingerprint the row records (`seed`): a signup that takes a schema built
//! before they changed reloads them (two more statements), so a catalog
//! change reaches every later signup. Rolled back, or cut
//! off by a crash, the transaction leaves the row and the schema in the
//! pool, and no organization.
//!
//! Only schemas at the taker's template version are taken. `migrate`
//! rebuilds the outdated ones ([`rebuild_outdated`]); `doctor` knows them
//! (never orphans) and finds rows whose schema went missing. `serve
//! --warm-schemas N` keeps N ready ([`spawn_refill`]); builders in every
//! process take one advisory lock, so several servers never overfill.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::base::error::Error;
use crate::base::ident::SchemaName;
use crate::pg::engine::Engine;
use crate::pg::statements::simple_query;
use crate::tenants::template::Template;

/// Serialises builders between processes ("warmpool").
const WARM_BUILD_LOCK: i64 = 0x7761_726d_706f_6f6c;

/// How often the refill task looks at the pool when no signup in this
/// process pokes it (signups through other processes take from it too).
pub const REFILL_INTERVAL: Duration = Duration::from_secs(5);

/// The most schemas `serve --warm-schemas` and `warm fill` keep.
pub const MAX_WARM_SCHEMAS: usize = 10_000;

/// Warm schemas by template version.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct WarmStatus {
    /// The version new orgs are created at (this binary's template).
    pub template_version: i32,
    /// Schemas at that version: what signups take.
    pub ready: i64,
    /// Schemas at an older version: `migrate` rebuilds them.
    pub outdated: i64,
    /// Schemas built by a newer binary: left alone.
    pub newer: i64,
}

pub async fn status(pool: &PgPool, template: &Template) -> Result<WarmStatus, Error> {
    let version = template.latest_version();
    let (ready, outdated, newer): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE template_version = $1), \
                count(*) FILTER (WHERE template_version < $1), \
                count(*) FILTER (WHERE template_version > $1) \
         FROM tenantry.warm_schemas",
    )
    .bind(version)
    .fetch_one(pool)
    .await?;
    Ok(WarmStatus {
        template_version: version,
        ready,
        outdated,
        newer,
    })
}

/// Builds warm schemas at the template's version until `target` are ready;
/// returns how many it built. Each is one transaction: a failure leaves
/// nothing of that schema behind and stops the fill.
#[tracing::instrument(skip(pool, template))]
pub async fn fill(pool: &PgPool, template: &Template, target: usize) -> Result<usize, Error> {
    let target = target.min(MAX_WARM_SCHEMAS) as i64;
    let version = template.latest_version();
    let engine = Engine::detect(&mut *pool.acquire().await?).await?;
    let mut built = 0;
    loop {
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(WARM_BUILD_LOCK)
            .execute(&mut *tx)
            .await?;
        let ready: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM tenantry.warm_schemas WHERE template_version = $1",
        )
        .bind(version)
        .fetch_one(&mut *tx)
        .await?;
        if ready >= target {
            tx.commit().await?;
            return Ok(built);
        }
        build_in(&mut tx, template, engine).await?;
        tx.commit().await?;
        built += 1;
    }
}

/// Builds one warm schema inside the caller's transaction.
async fn build_in(
    conn: &mut PgConnection,
    template: &Template,
    engine: Engine,
) -> Result<Uuid, Error> {
    let id = Uuid::new_v4();
    let schema = SchemaName::for_org(&id);
    let role = crate::registry::roles::create_tenant_role(&mut *conn, &id, engine).await?;
    template
        .apply_to_new_schema(&mut *conn, &schema, &role, engine)
        .await?;
    // the initial data too, as written by the owner the org will get, with
    // the fingerprint of the catalog it came from
    let author = Uuid::new_v4();
    crate::tenants::provision::seed_initial_data(&mut *conn, author).await?;
    // apply_to_new_schema leaves the transaction as the tenant role on
    // plain PostgreSQL; the registry row is the admin's to write.
    simple_query(conn, "RESET ROLE").await?;
    sqlx::query(
        "INSERT INTO tenantry.warm_schemas (org_id, schema_name, template_version, author_id, seed) \
         VALUES ($1, $2, $3, $4, (SELECT initial_data_seed FROM tenantry.settings))",
    )
    .bind(id)
    .bind(schema.as_str())
    .bind(template.latest_version())
    .bind(author)
    .execute(&mut *conn)
    .await?;
    Ok(id)
}

/// Drops warm schemas (oldest first) until at most `keep` are left, of any
/// version; returns how many it dropped. A schema being taken by a signup
/// right now is skipped, never dropped under it.
#[tracing::instrument(skip(pool))]
pub async fn drain(pool: &PgPool, keep: usize) -> Result<usize, Error> {
    let mut dropped = 0;
    loop {
        let mut tx = pool.begin().await?;
        let total: i64 = sqlx::query_scalar("SELECT count(*) FROM tenantry.warm_schemas")
            .fetch_one(&mut *tx)
            .await?;
        if total <= keep as i64 || !drop_one(&mut tx, None).await? {
            return Ok(dropped);
        }
        tx.commit().await?;
        dropped += 1;
    }
}

/// Deletes one warm row (of a version below `below`, when given) with its
/// schema and role, inside the caller's transaction; false when there was
/// none free to delete.
async fn drop_one(conn: &mut PgConnection, below: Option<i32>) -> Result<bool, Error> {
    let taken: Option<(Uuid, String)> = sqlx::query_as(
        "DELETE FROM tenantry.warm_schemas WHERE org_id = \
           (SELECT org_id FROM tenantry.warm_schemas \
            WHERE $1::int IS NULL OR template_version < $1 \
            ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED) \
         RETURNING org_id, schema_name",
    )
    .bind(below)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((id, schema)) = taken else {
        return Ok(false);
    };
    let schema = SchemaName::parse(&schema)?;
    simple_query(
        conn,
        &format!("DROP SCHEMA IF EXISTS {} CASCADE", schema.quoted()),
    )
    .await?;
    crate::registry::roles::drop_tenant_role(conn, &id).await?;
    Ok(true)
}

/// Removes the warm row of `schema` (and its role) if its schema is gone:
/// `doctor --repair` for a warm schema someone dropped by hand.
pub async fn forget_missing(pool: &PgPool, schema: &str) -> Result<(), Error> {
    let mut tx = pool.begin().await?;
    let id: Option<Uuid> = sqlx::query_scalar(
        "DELETE FROM tenantry.warm_schemas w WHERE w.schema_name = $1 \
           AND NOT EXISTS (SELECT 1 FROM pg_namespace n WHERE n.nspname = w.schema_name) \
         RETURNING w.org_id",
    )
    .bind(schema)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(id) = id {
        crate::registry::roles::drop_tenant_role(&mut tx, &id).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Replaces every warm schema built at an older template version by one at
/// the template's version (each swap one transaction); returns how many it
/// replaced. `migrate` runs it after the tenants.
#[tracing::instrument(skip(pool, template))]
pub async fn rebuild_outdated(pool: &PgPool, template: &Template) -> Result<usize, Error> {
    let engine = Engine::detect(&mut *pool.acquire().await?).await?;
    let mut rebuilt = 0;
    loop {
        let mut tx = pool.begin().await?;
        if !drop_one(&mut tx, Some(template.latest_version())).await? {
            return Ok(rebuilt);
        }
        build_in(&mut tx, template, engine).await?;
        tx.commit().await?;
        rebuilt += 1;
    }
}

/// Keeps `target` warm schemas ready: fills the pool at start, then again
/// whenever `poke` is notified (a signup here took one) or every
/// [`REFILL_INTERVAL`] (signups elsewhere). Outdated schemas are rebuilt
/// first. Errors are logged and retried at the next round.
pub fn spawn_refill(
    pool: PgPool,
    template: Arc<Template>,
    target: usize,
    poke: Arc<tokio::sync::Notify>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        match rebuild_outdated(&pool, &template).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(rebuilt = n, "outdated warm schemas rebuilt"),
            Err(e) => tracing::warn!(error = %e, "could not rebuild outdated warm schemas"),
        }
        loop {
            match fill(&pool, &template, target).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(built = n, "warm pool refilled"),
                Err(e) => tracing::warn!(error = %e, "could not refill the warm pool"),
            }
            tokio::select! {
                _ = poke.notified() => {}
                _ = tokio::time::sleep(REFILL_INTERVAL) => {}
            }
        }
    })
}
