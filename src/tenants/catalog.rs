//! The catalog of presets in the shared schema (`shared_template/`): the
//! statuses and behaviors every org may adopt, and the initial ones every
//! new org starts with. Superusers change it here, through the admin pool;
//! orgs read it in their own tenant transactions (`api::catalog`), where
//! the shared schema is on the search path and read-only.

use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::base::error::{Error, ResultExt};

/// One of the catalog's tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatalogKind {
    Statuses,
    Behaviors,
}

impl CatalogKind {
    /// The kind named in a path (`statuses`, `behaviors`).
    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "statuses" => Some(CatalogKind::Statuses),
            "behaviors" => Some(CatalogKind::Behaviors),
            _ => None,
        }
    }

    /// The table, unqualified: tenant transactions find it on their search
    /// path. A compile-time constant, never input.
    pub fn table(self) -> &'static str {
        match self {
            CatalogKind::Statuses => "catalog_statuses",
            CatalogKind::Behaviors => "catalog_behaviors",
        }
    }

    pub fn noun(self) -> &'static str {
        match self {
            CatalogKind::Statuses => "status preset",
            CatalogKind::Behaviors => "behavior preset",
        }
    }
}

/// A preset.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Preset {
    pub id: Uuid,
    pub name: String,
    pub description: Option<String>,
    /// New orgs start with a copy of every initial preset.
    pub initial: bool,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

crate::tenant_row!(Preset {
    id,
    name,
    description,
    initial,
    created_at,
    updated_at
});

/// The columns of [`Preset`], in its order.
pub const PRESET_COLUMNS: &str = "id, name, description, initial, created_at, updated_at";

/// A change to a preset: `None` leaves a field as it is; a description of
/// `Some(None)` clears it.
#[derive(Debug, Clone, Default)]
pub struct PresetChange {
    pub name: Option<String>,
    pub description: Option<Option<String>>,
    pub initial: Option<bool>,
}

/// Stores the fingerprint of the initial data new orgs get now (the
/// initial presets), inside the caller's transaction: warm schemas built
/// with another one reload their initial data at signup (`warm`). Every
/// catalog change made through tenantry and every shared migration calls
/// it; a change made by hand in SQL is picked up by the next `tenantry
/// migrate` (or server start).
pub(crate) async fn refresh_initial_data_seed(conn: &mut PgConnection) -> Result<(), Error> {
    sqlx::query(
        "UPDATE tenantry.settings SET initial_data_seed = tenantry.initial_data_fingerprint()",
    )
    .execute(conn)
    .await?;
    Ok(())
}

fn taken(kind: CatalogKind) -> impl FnOnce() -> Error {
    move || Error::Conflict(format!("a {} of that name exists already", kind.noun()))
}

/// Adds a preset; a name taken (case-insensitively) is a conflict.
#[tracing::instrument(skip(admin))]
pub async fn create(
    admin: &PgPool,
    kind: CatalogKind,
    name: &str,
    description: Option<&str>,
    initial: bool,
) -> Result<Preset, Error> {
    let mut tx = admin.begin().await?;
    let preset = sqlx::query_as(&format!(
        "INSERT INTO shared.{} (name, description, initial) VALUES ($1, $2, $3) RETURNING {PRESET_COLUMNS}",
        kind.table()
    ))
    .bind(name)
    .bind(description)
    .bind(initial)
    .fetch_one(&mut *tx)
    .await
    .on_unique_violation(taken(kind))?;
    refresh_initial_data_seed(&mut tx).await?;
    tx.commit().await?;
    Ok(preset)
}

/// Changes a preset; `None` when there is none with that id. Orgs that
/// adopted it keep their copy as it was.
#[tracing::instrument(skip(admin))]
pub async fn update(
    admin: &PgPool,
    kind: CatalogKind,
    id: Uuid,
    change: &PresetChange,
) -> Result<Option<Preset>, Error> {
    let mut tx = admin.begin().await?;
    let preset = sqlx::query_as(&format!(
        "UPDATE shared.{} SET name = COALESCE($2, name), \
             description = CASE WHEN $3 THEN $4 ELSE description END, \
             initial = COALESCE($5, initial), updated_at = now() \
         WHERE id = $1 RETURNING {PRESET_COLUMNS}",
        kind.table()
    ))
    .bind(id)
    .bind(&change.name)
    .bind(change.description.is_some())
    .bind(change.description.clone().flatten())
    .bind(change.initial)
    .fetch_optional(&mut *tx)
    .await
    .on_unique_violation(taken(kind))?;
    refresh_initial_data_seed(&mut tx).await?;
    tx.commit().await?;
    Ok(preset)
}

/// Removes a preset; false when there was none. Orgs' copies stay.
#[tracing::instrument(skip(admin))]
pub async fn delete(admin: &PgPool, kind: CatalogKind, id: Uuid) -> Result<bool, Error> {
    let done = sqlx::query(&format!(
        "DELETE FROM shared.{} WHERE id = $1",
        kind.table()
    ))
    .bind(id)
    .execute(admin)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Presets ordered by id after `cursor`, at most `limit`.
pub async fn list(
    admin: &PgPool,
    kind: CatalogKind,
    cursor: Option<Uuid>,
    limit: i64,
) -> Result<Vec<Preset>, Error> {
    Ok(sqlx::query_as(&list_sql(kind, "shared."))
        .bind(cursor)
        .bind(limit)
        .fetch_all(admin)
        .await?)
}

/// The page query of a catalog table, `prefix` naming its schema (empty in
/// a tenant transaction, which finds it on its search path).
pub fn list_sql(kind: CatalogKind, prefix: &str) -> String {
    format!(
        "SELECT {PRESET_COLUMNS} FROM {prefix}{} WHERE ($1::uuid IS NULL OR id > $1) ORDER BY id LIMIT $2",
        kind.table()
    )
}
