//! The control-plane registry in schema `tenantry`: organizations (slug ->
//! schema), users and API tokens, plus its own refinery migrations from
//! `migrations/` with their history table inside `tenantry`. Beside it:
//! PostgreSQL roles (tenant and serving roles) and the change
//! notifications that keep every process's caches current.

pub mod changes;
pub mod roles;

use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::base::error::Error;
use crate::base::ident::{SchemaName, Slug};
use crate::base::secret::{token_hash, NewToken};
use crate::pg::engine::Engine;
use crate::pg::migrations::TemplateError;
use crate::pg::statements::simple_query;

pub const REGISTRY_SCHEMA: &str = "tenantry";

mod embedded_registry {
    refinery::embed_migrations!("migrations");
}

/// Serialises registry migrations between processes started at once.
const REGISTRY_MIGRATION_LOCK: i64 = 0x7465_6e61_6e74_7279; // "tenantry"

/// Creates schema `tenantry` if needed and applies the registry migrations,
/// in one transaction under an advisory lock.
#[tracing::instrument(skip(pool))]
pub async fn migrate(pool: &PgPool) -> Result<Vec<String>, Error> {
    let migrations = embedded_registry::migrations::runner()
        .get_migrations()
        .clone();
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(REGISTRY_MIGRATION_LOCK)
        .execute(&mut *tx)
        .await?;
    // On a Citus coordinator the registry, its functions included, stays
    // local to it, whatever the server's default for new schemas (see
    // `engine`).
    if Engine::detect(&mut tx).await?.is_citus() {
        simple_query(
            &mut tx,
            "SET LOCAL citus.enable_schema_based_sharding = off; \
             SET LOCAL citus.enable_ddl_propagation = off",
        )
        .await?;
    }
    simple_query(&mut tx, "CREATE SCHEMA IF NOT EXISTS tenantry").await?;
    simple_query(&mut tx, "SET LOCAL search_path TO tenantry").await?;
    let applied = crate::pg::migrations::run(&mut tx, &migrations, REGISTRY_SCHEMA, None, false)
        .await
        .map_err(|e| match e {
            TemplateError::Database(db) => Error::Database(db),
            other => Error::Template(other),
        })?;
    // The installation's token MAC key, made once, from the OS CSPRNG.
    sqlx::query("INSERT INTO tenantry.settings (token_key) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(crate::base::secret::random_bytes(32))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(applied.migrations)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, sqlx::Type, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum OrgStatus {
    Provisioning,
    Active,
    Suspended,
    Deleting,
}

impl OrgStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrgStatus::Provisioning => "provisioning",
            OrgStatus::Active => "active",
            OrgStatus::Suspended => "suspended",
            OrgStatus::Deleting => "deleting",
        }
    }
}

impl std::fmt::Display for OrgStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Organization {
    pub id: Uuid,
    #[schema(value_type = String)]
    pub slug: Slug,
    pub name: String,
    #[schema(value_type = String)]
    pub schema_name: SchemaName,
    pub status: OrgStatus,
    pub template_version: i32,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

#[derive(sqlx::FromRow)]
pub(crate) struct OrgRow {
    id: Uuid,
    slug: String,
    name: String,
    schema_name: String,
    status: OrgStatus,
    template_version: i32,
    created_at: OffsetDateTime,
    updated_at: OffsetDateTime,
}

/// Re-parses a stored slug and schema name: a registry row edited by hand
/// into an unsafe identifier never reaches SQL text.
pub(crate) fn parse_stored(slug: &str, schema_name: &str) -> Result<(Slug, SchemaName), Error> {
    let slug =
        Slug::parse(slug).map_err(|e| Error::Corrupt(format!("registry slug {slug:?}: {e}")))?;
    let schema = SchemaName::parse(schema_name)
        .map_err(|e| Error::Corrupt(format!("registry schema_name {schema_name:?}: {e}")))?;
    Ok((slug, schema))
}

impl TryFrom<OrgRow> for Organization {
    type Error = Error;
    fn try_from(r: OrgRow) -> Result<Self, Error> {
        let (slug, schema_name) = parse_stored(&r.slug, &r.schema_name)?;
        Ok(Organization {
            id: r.id,
            slug,
            name: r.name,
            schema_name,
            status: r.status,
            template_version: r.template_version,
            created_at: r.created_at,
            updated_at: r.updated_at,
        })
    }
}

/// The columns of `tenantry.organizations` that [`OrgRow`] reads.
macro_rules! org_columns {
    () => {
        "id, slug, name, schema_name, status, template_version, created_at, updated_at"
    };
}
pub(crate) use org_columns;

#[tracing::instrument(skip(conn))]
pub async fn find_org(conn: &mut PgConnection, slug: &Slug) -> Result<Option<Organization>, Error> {
    find_org_sent(conn, slug, true).await
}

/// [`find_org`] with a named (`persistent`) or unnamed statement (see
/// `pg::pools::ServingConn`).
pub async fn find_org_sent(
    conn: &mut PgConnection,
    slug: &Slug,
    persistent: bool,
) -> Result<Option<Organization>, Error> {
    let row: Option<OrgRow> = sqlx::query_as(concat!(
        "SELECT ",
        org_columns!(),
        " FROM tenantry.serving_org_by_slug($1)"
    ))
    .bind(slug.as_str())
    .persistent(persistent)
    .fetch_optional(conn)
    .await?;
    row.map(Organization::try_from).transpose()
}

/// The org with id `id`, by a named (`persistent`) or unnamed statement.
pub async fn find_org_by_id_sent(
    conn: &mut PgConnection,
    id: Uuid,
    persistent: bool,
) -> Result<Option<Organization>, Error> {
    let row: Option<OrgRow> = sqlx::query_as(concat!(
        "SELECT ",
        org_columns!(),
        " FROM tenantry.serving_org_by_id($1)"
    ))
    .bind(id)
    .persistent(persistent)
    .fetch_optional(conn)
    .await?;
    row.map(Organization::try_from).transpose()
}

pub async fn get_org(conn: &mut PgConnection, slug: &Slug) -> Result<Organization, Error> {
    find_org(conn, slug)
        .await?
        .ok_or_else(|| Error::OrgNotFound(slug.to_string()))
}

/// Up to `limit` orgs in slug order, after the slug `after` (keyset
/// pagination: each page is one index range scan, however many orgs there
/// are, and an org that exists throughout a walk is seen exactly once).
#[tracing::instrument(skip(pool))]
pub async fn list_orgs_page(
    pool: &PgPool,
    after: Option<&str>,
    limit: i64,
) -> Result<Vec<Organization>, Error> {
    let rows: Vec<OrgRow> = sqlx::query_as(concat!(
        "SELECT ",
        org_columns!(),
        " FROM tenantry.organizations WHERE $1::text IS NULL OR slug > $1 ORDER BY slug LIMIT $2"
    ))
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(Organization::try_from).collect()
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct User {
    pub id: Uuid,
    pub organization_id: Option<Uuid>,
    pub email: String,
    pub display_name: String,
    pub is_superuser: bool,
}

/// Normalises and checks an email address: trimmed, lowercased, one `@`
/// with text on both sides, no whitespace or control characters.
pub fn parse_email(raw: &str) -> Result<String, Error> {
    let email = raw.trim().to_lowercase();
    let invalid = |why: &str| Error::Validation {
        field: "email",
        message: format!("{why}: {raw:?}"),
    };
    if email.len() < 3 || email.len() > 320 {
        return Err(invalid("email must be 3 to 320 characters"));
    }
    if email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid("email must not contain whitespace"));
    }
    match email.split_once('@') {
        Some((local, domain))
            if !local.is_empty() && !domain.is_empty() && !domain.contains('@') =>
        {
            Ok(email)
        }
        _ => Err(invalid("email must look like name@domain")),
    }
}

pub(crate) fn default_display_name(email: &str) -> String {
    email.split('@').next().unwrap_or(email).to_owned()
}

/// The user with `email` in `organization_id` (none: a platform
/// superuser), inserted if missing. Safe against a concurrent insert of the
/// same address: the loser of the race reads the winner's row.
pub(crate) async fn ensure_user(
    conn: &mut PgConnection,
    organization_id: Option<Uuid>,
    email: &str,
) -> Result<User, Error> {
    let inserted: Option<User> = sqlx::query_as(
        "INSERT INTO tenantry.users (id, organization_id, email, display_name, is_superuser) \
         VALUES ($1, $2, $3, $4, $2 IS NULL) ON CONFLICT DO NOTHING \
         RETURNING id, organization_id, email, display_name, is_superuser",
    )
    .bind(Uuid::new_v4())
    .bind(organization_id)
    .bind(email)
    .bind(default_display_name(email))
    .fetch_optional(&mut *conn)
    .await?;
    match inserted {
        Some(user) => Ok(user),
        None => find_user(conn, organization_id, email)
            .await?
            .ok_or_else(|| {
                Error::Conflict(format!("user {email} is being changed concurrently; retry"))
            }),
    }
}

pub async fn find_user(
    conn: &mut PgConnection,
    organization_id: Option<Uuid>,
    email: &str,
) -> Result<Option<User>, Error> {
    Ok(sqlx::query_as(
        "SELECT id, organization_id, email, display_name, is_superuser FROM tenantry.users \
         WHERE organization_id IS NOT DISTINCT FROM $1 AND email = $2",
    )
    .bind(organization_id)
    .bind(email)
    .fetch_optional(conn)
    .await?)
}

/// Metadata of a token; the secret itself is never stored.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct TokenInfo {
    pub id: Uuid,
    pub user_id: Uuid,
    pub organization_id: Option<Uuid>,
    pub prefix: String,
    pub name: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_used_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
}

/// The columns of `tenantry.api_tokens` that [`TokenInfo`] reads.
macro_rules! token_columns {
    () => {
        "id, user_id, organization_id, prefix, name, created_at, last_used_at, revoked_at, expires_at"
    };
}

/// The installation's token MAC key (see `secret::NewToken`).
pub async fn token_key(conn: &mut PgConnection) -> Result<Vec<u8>, Error> {
    token_key_sent(conn, true).await
}

/// [`token_key`] with a named (`persistent`) or unnamed statement.
pub async fn token_key_sent(conn: &mut PgConnection, persistent: bool) -> Result<Vec<u8>, Error> {
    Ok(sqlx::query_scalar("SELECT tenantry.serving_token_key()")
        .persistent(persistent)
        .fetch_one(conn)
        .await?)
}

/// A token just created: the plaintext secret is available this once.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct IssuedToken {
    pub token: String,
    #[serde(flatten)]
    pub info: TokenInfo,
}

/// Issues a token for `user`, acting for the user's organization (or for the
/// platform, for a superuser without one).
#[tracing::instrument(skip(conn, user), fields(user_id = %user.id))]
pub async fn issue_token(
    conn: &mut PgConnection,
    user: &User,
    name: Option<&str>,
    expires_in: Option<std::time::Duration>,
) -> Result<IssuedToken, Error> {
    let new = NewToken::generate(&token_key(&mut *conn).await?);
    let info: TokenInfo = sqlx::query_as(concat!(
        "INSERT INTO tenantry.api_tokens \
           (id, user_id, organization_id, secret_hash, prefix, name, expires_at, format) \
         VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7), 2) \
         RETURNING ",
        token_columns!()
    ))
    .bind(Uuid::new_v4())
    .bind(user.id)
    .bind(user.organization_id)
    .bind(&new.hash[..])
    .bind(&new.display_prefix)
    .bind(name)
    .bind(expires_in.map(|d| d.as_secs_f64()))
    .fetch_one(conn)
    .await?;
    Ok(IssuedToken {
        token: new.plaintext,
        info,
    })
}

/// Who a valid, unrevoked, unexpired token acts for.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Principal {
    pub token_id: Uuid,
    pub user_id: Uuid,
    pub organization_id: Option<Uuid>,
    pub is_superuser: bool,
    /// When the token stops working, if ever.
    pub expires_at: Option<OffsetDateTime>,
}

/// Looks a presented token up by its SHA-256 digest. Revoked and expired
/// tokens, and tokens of users who no longer exist, are not found.
pub async fn authenticate(pool: &PgPool, presented: &str) -> Result<Option<Principal>, Error> {
    authenticate_hash(&mut *pool.acquire().await?, &token_hash(presented), true).await
}

/// Looks a token up by digest: a read, one round trip. Its use is recorded
/// separately and coalesced ([`record_token_use`]).
#[tracing::instrument(skip_all)]
pub async fn authenticate_hash(
    conn: &mut PgConnection,
    hash: &[u8; 32],
    persistent: bool,
) -> Result<Option<Principal>, Error> {
    Ok(sqlx::query_as(
        "SELECT token_id, user_id, organization_id, is_superuser, expires_at \
         FROM tenantry.serving_principal($1)",
    )
    .bind(&hash[..])
    .persistent(persistent)
    .fetch_optional(conn)
    .await?)
}

/// Sets `last_used_at` of these tokens to now, in one statement.
pub async fn record_token_use(
    conn: &mut PgConnection,
    token_ids: &[Uuid],
    persistent: bool,
) -> Result<(), Error> {
    sqlx::query("SELECT tenantry.serving_record_token_use($1)")
        .bind(token_ids)
        .persistent(persistent)
        .execute(conn)
        .await?;
    Ok(())
}

/// Display prefixes of the active tokens issued before format 2 (no MAC):
/// the only made-up-looking tokens worth a database lookup.
pub async fn legacy_token_prefixes(
    conn: &mut PgConnection,
    persistent: bool,
) -> Result<Vec<String>, Error> {
    Ok(
        sqlx::query_scalar("SELECT prefix FROM tenantry.serving_legacy_token_prefixes() AS prefix")
            .persistent(persistent)
            .fetch_all(conn)
            .await?,
    )
}

/// Revokes a token inside the caller's transaction; returns its digest, or
/// `None` when it did not exist or was revoked already.
pub async fn revoke_token(
    conn: &mut PgConnection,
    token_id: Uuid,
) -> Result<Option<Vec<u8>>, Error> {
    Ok(sqlx::query_scalar(
        "UPDATE tenantry.api_tokens SET revoked_at = now() \
         WHERE id = $1 AND revoked_at IS NULL RETURNING secret_hash",
    )
    .bind(token_id)
    .fetch_optional(conn)
    .await?)
}

/// A token with its user and org, for listings.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct TokenListing {
    #[serde(flatten)]
    #[sqlx(flatten)]
    pub info: TokenInfo,
    pub email: String,
    /// The org's slug; none for platform superusers.
    pub org: Option<String>,
    /// `active`, `revoked` or `expired`.
    pub state: String,
}

/// Tokens, newest first: of one org, or all (superusers' included).
pub async fn list_tokens(pool: &PgPool, org: Option<Uuid>) -> Result<Vec<TokenListing>, Error> {
    Ok(sqlx::query_as(
        "SELECT t.id, t.user_id, t.organization_id, t.prefix, t.name, t.created_at, t.last_used_at, \
                t.revoked_at, t.expires_at, u.email, o.slug AS org, \
                CASE WHEN t.revoked_at IS NOT NULL THEN 'revoked' \
                     WHEN t.expires_at <= now() THEN 'expired' ELSE 'active' END AS state \
         FROM tenantry.api_tokens t JOIN tenantry.users u ON u.id = t.user_id \
         LEFT JOIN tenantry.organizations o ON o.id = t.organization_id \
         WHERE $1::uuid IS NULL OR t.organization_id = $1 \
         ORDER BY t.created_at DESC, t.id",
    )
    .bind(org)
    .fetch_all(pool)
    .await?)
}

/// True when no platform superuser exists yet.
pub async fn has_superuser(pool: &PgPool) -> Result<bool, Error> {
    Ok(
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM tenantry.users WHERE is_superuser)")
            .fetch_one(pool)
            .await?,
    )
}
