//! Organization lifecycle: create (registry row + schema + template + initial
//! data in one transaction), suspend, resume, rename and delete. The CLI and
//! the admin API both call these functions.

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::base::error::sqlstate;
use crate::base::error::{Error, ResultExt};
use crate::base::ident::{SchemaName, Slug};
use crate::pg::engine::Engine;
use crate::pg::statements::simple_query;
use crate::registry::changes::{announce, Change, REGISTRY_CHANNEL};
use crate::registry::{self, org_columns, OrgRow, OrgStatus, Organization, User};
use crate::tenants::template::{Template, TemplateError};

/// Recorded as `created_by` for initial data of an org created without an
/// owner user.
pub const SYSTEM_USER_ID: Uuid = Uuid::nil();

#[derive(Debug, Clone)]
pub struct NewOrg {
    /// Chosen before provisioning: the schema (and role) names derive from
    /// it. An org created from a warm schema gets that schema's id instead
    /// (see `warm`); [`Created`] has the id it got.
    pub id: Uuid,
    pub slug: Slug,
    pub name: String,
    /// Normalised by [`registry::parse_email`].
    pub owner_email: Option<String>,
}

impl NewOrg {
    /// Checks raw input; every problem is reported as a typed error.
    pub fn parse(slug: &str, name: &str, owner_email: Option<&str>) -> Result<Self, Error> {
        let slug = Slug::parse(slug)?;
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 200 {
            return Err(Error::Validation {
                field: "name",
                message: "name must be 1 to 200 characters".into(),
            });
        }
        if name.chars().any(char::is_control) {
            return Err(Error::Validation {
                field: "name",
                message: "name must not contain control characters".into(),
            });
        }
        Ok(NewOrg {
            id: Uuid::new_v4(),
            slug,
            name: name.to_owned(),
            owner_email: owner_email.map(registry::parse_email).transpose()?,
        })
    }
}

#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Created {
    pub organization: Organization,
    pub owner: Option<User>,
    /// Its schema came from the warm pool (see `warm`).
    #[serde(skip)]
    pub from_warm_pool: bool,
}

const DUPLICATE_SCHEMA: &str = "42P06";

/// A schema that exists although no organization owns it is never adopted.
fn orphan_schema(schema: &SchemaName) -> Error {
    Error::Conflict(format!(
        "schema {schema} already exists but no organization owns it; run `tenantry doctor`"
    ))
}

/// A hook for tests: runs inside the provisioning transaction after the
/// template was applied and before the initial data, so a failure there can
/// be injected mid-provisioning.
pub type FaultHook = fn() -> Result<(), Error>;

/// Creates an organization atomically: registry row, owner user, role,
/// schema, tenant template and initial data in one transaction. Any failure leaves
/// nothing behind. A concurrent create of the same slug waits on the unique
/// index and then fails with [`Error::Conflict`].
#[tracing::instrument(skip(pool, template, new), fields(slug = %new.slug))]
pub async fn create_org(
    pool: &PgPool,
    template: &Template,
    new: &NewOrg,
) -> Result<Created, Error> {
    create_org_with_hook(pool, template, new, None).await
}

pub async fn create_org_with_hook(
    pool: &PgPool,
    template: &Template,
    new: &NewOrg,
    hook: Option<FaultHook>,
) -> Result<Created, Error> {
    let mut tx = pool.begin().await?;
    let made = async {
        match create_from_warm_in(&mut tx, template, new, hook).await? {
            Some(created) => Ok(created),
            None => create_org_in(&mut tx, template, new, hook, true).await,
        }
    }
    .await;
    let created = match made {
        Ok(made) => made,
        Err(e) => {
            // at once, not when the connection is next used: a warm schema
            // it took is locked until then, and the next signup would pass
            // it by
            let _ = tx.rollback().await;
            return Err(e);
        }
    };
    tx.commit().await?;
    let source = if created.from_warm_pool {
        "warm"
    } else {
        "cold"
    };
    metrics::counter!(crate::telemetry::ORG_CREATES, "schema" => source).increment(1);
    tracing::info!(slug = %created.organization.slug, schema = %created.organization.schema_name, source, "organization created");
    Ok(created)
}

/// The statement that claims the slug: inserts the registry row (id and
/// schema from the CTE `src`) and the owner user (id `src.author_id`),
/// sets the transaction's `search_path` to the org's schema and announces
/// the org (routers elsewhere may remember its slug as unknown; listeners
/// hear of it at commit). A duplicate slug fails here, before any DDL.
macro_rules! claim_org_sql {
    ($src:expr) => {
        concat!(
            "WITH src AS (",
            $src,
            "), org AS (\
               INSERT INTO tenantry.organizations (id, slug, name, schema_name, status, template_version) \
               SELECT src.org_id, $2, $3, src.schema_name, 'active', $5 FROM src RETURNING ",
            org_columns!(),
            "), owner AS (\
               INSERT INTO tenantry.users (id, organization_id, email, display_name) \
               SELECT src.author_id, org.id, $7, $8 FROM org, src WHERE $7::text IS NOT NULL RETURNING id), \
             path AS (SELECT set_config('search_path', quote_ident(src.schema_name), true) AS search_path FROM src) \
             SELECT org.*, src.author_id, src.seed_current, path.search_path, pg_notify($9, $10)::text AS announced \
             FROM org LEFT JOIN owner ON true CROSS JOIN path CROSS JOIN src"
        )
    };
}

/// Where a new org's id and schema come from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SchemaSource {
    /// Built in the signup's transaction.
    Fresh,
    /// Taken from the warm pool.
    Warm,
}

impl SchemaSource {
    fn claim_sql(self) -> &'static str {
        match self {
            SchemaSource::Fresh => FRESH_SCHEMA,
            SchemaSource::Warm => WARM_SCHEMA,
        }
    }
}

/// A new org's id and schema: the ones chosen for it ($1, $4); its owner
/// gets id $6.
const FRESH_SCHEMA: &str =
    claim_org_sql!("SELECT $1::uuid AS org_id, $4::text AS schema_name, $6::uuid AS author_id, true AS seed_current");

/// A new org's id and schema: a warm one's at the template's version ($5),
/// whose schema exists, taken for good (see `warm`); its owner gets the id
/// its initial data was recorded with. None left: no row.
const WARM_SCHEMA: &str = claim_org_sql!(
    "DELETE FROM tenantry.warm_schemas WHERE org_id = \
       (SELECT w.org_id FROM tenantry.warm_schemas w \
        WHERE w.template_version = $5 \
          AND to_regnamespace(quote_ident(w.schema_name)) IS NOT NULL \
        ORDER BY w.created_at LIMIT 1 FOR UPDATE SKIP LOCKED) \
     RETURNING org_id, schema_name, author_id, \
               seed IS NOT DISTINCT FROM (SELECT initial_data_seed FROM tenantry.settings) AS seed_current"
);

/// Inserts the registry row and the owner user of `new`, with the id and
/// schema from `source`, and announces it; `None` when it had none (no
/// warm schema). Also returns the author id it chose, and whether the
/// schema's initial data is the catalog's as it is now.
async fn claim_org(
    tx: &mut PgConnection,
    template: &Template,
    new: &NewOrg,
    source: SchemaSource,
) -> Result<Option<(Created, Option<Uuid>, bool)>, Error> {
    let conflict = || {
        Error::Conflict(format!(
            "organization {:?} already exists",
            new.slug.as_str()
        ))
    };
    let owner = new.owner_email.as_ref().map(|email| User {
        id: Uuid::new_v4(),
        organization_id: None,
        email: email.clone(),
        display_name: registry::default_display_name(email),
        is_superuser: false,
    });
    let row: Option<sqlx::postgres::PgRow> = sqlx::query(source.claim_sql())
        .bind(new.id)
        .bind(new.slug.as_str())
        .bind(&new.name)
        .bind(SchemaName::for_org(&new.id).as_str())
        .bind(template.latest_version())
        .bind(owner.as_ref().map(|u| u.id))
        .bind(owner.as_ref().map(|u| u.email.as_str()))
        .bind(owner.as_ref().map(|u| u.display_name.as_str()))
        .bind(REGISTRY_CHANNEL)
        .bind(Change::Org(new.slug.clone()).payload())
        .fetch_optional(&mut *tx)
        .await
        .on_unique_violation(conflict)?;
    let Some(row) = row else {
        return Ok(None);
    };
    let author: Option<Uuid> = sqlx::Row::try_get(&row, "author_id")?;
    let seed_current: bool = sqlx::Row::try_get(&row, "seed_current")?;
    let organization = Organization::try_from(<OrgRow as sqlx::FromRow<_>>::from_row(&row)?)?;
    let owner = owner.map(|u| User {
        id: author.unwrap_or(u.id),
        organization_id: Some(organization.id),
        ..u
    });
    Ok(Some((
        Created {
            organization,
            owner,
            from_warm_pool: source == SchemaSource::Warm,
        },
        author,
        seed_current,
    )))
}

/// [`create_org_in`] from a warm schema: claims one with the registry row
/// and the owner in one statement. The schema comes with its initial data,
/// recorded as written by the owner the signup gets (see `warm`); without
/// an owner it is handed to the nil system user. A schema built before the
/// catalog's initial presets last changed gets them reloaded. `None` (and
/// nothing done) when no warm schema is ready at the template's version.
async fn create_from_warm_in(
    tx: &mut PgConnection,
    template: &Template,
    new: &NewOrg,
    hook: Option<FaultHook>,
) -> Result<Option<Created>, Error> {
    let Some((created, author, seed_current)) =
        claim_org(tx, template, new, SchemaSource::Warm).await?
    else {
        return Ok(None);
    };
    if let Some(hook) = hook {
        hook()?;
    }
    // the claim set the search path
    if !seed_current {
        // no test refers to them yet: the schema was never served
        simple_query(&mut *tx, "DELETE FROM statuses; DELETE FROM behaviors").await?;
        let owner = created.owner.as_ref().map(|u| u.id);
        seed_initial_data(&mut *tx, owner.unwrap_or(SYSTEM_USER_ID)).await?;
    } else if created.owner.is_none() {
        sqlx::query(
            "WITH s AS (UPDATE statuses SET created_by = $2, updated_by = $2 WHERE created_by = $1) \
             UPDATE behaviors SET created_by = $2, updated_by = $2 WHERE created_by = $1",
        )
        .bind(author)
        .bind(SYSTEM_USER_ID)
        .execute(&mut *tx)
        .await?;
    }
    Ok(Some(created))
}

/// The work of [`create_org`] inside the caller's transaction, which the
/// caller commits (or rolls back: then nothing is left), building the
/// schema (no warm one). With `seed` false the org gets no initial
/// statuses and behaviors (e.g. an import brings its own). The
/// transaction's `search_path` is left at the new schema.
pub(crate) async fn create_org_in(
    tx: &mut PgConnection,
    template: &Template,
    new: &NewOrg,
    hook: Option<FaultHook>,
    seed: bool,
) -> Result<Created, Error> {
    let schema = SchemaName::for_org(&new.id);
    let (
        Created {
            organization,
            owner,
            ..
        },
        _,
        _,
    ) = claim_org(tx, template, new, SchemaSource::Fresh)
        .await?
        .ok_or_else(|| Error::Internal("the registry row was not inserted".into()))?;

    // A leftover schema of the same name (e.g. from a crash outside our
    // transaction) is reported, never adopted: CREATE SCHEMA without IF NOT
    // EXISTS fails with duplicate_schema.
    let engine = Engine::detect(&mut *tx).await?;
    let role =
        crate::registry::roles::create_tenant_role(&mut *tx, &organization.id, engine).await?;
    let applied = template
        .apply_to_new_schema(&mut *tx, &schema, &role, engine)
        .await
        .map_err(|e| match e {
            TemplateError::Database(db) if sqlstate(&db).as_deref() == Some(DUPLICATE_SCHEMA) => {
                orphan_schema(&schema)
            }
            other => Error::Template(other),
        })?;
    debug_assert_eq!(applied.migrations.len(), template.migrations().len());
    if let Some(hook) = hook {
        hook()?;
    }
    if seed {
        let author = owner.as_ref().map(|u| u.id).unwrap_or(SYSTEM_USER_ID);
        seed_initial_data(&mut *tx, author).await?;
    }
    Ok(Created {
        organization,
        owner,
        from_warm_pool: false,
    })
}

/// Loads the catalog's initial statuses and behaviors (see
/// `tenants::shared`), recorded as written by `author`, in one round trip.
/// Runs with search_path set to the new tenant's schema.
pub(crate) async fn seed_initial_data(conn: &mut PgConnection, author: Uuid) -> Result<(), Error> {
    sqlx::query(
        "WITH s AS (INSERT INTO statuses (name, description, created_by, updated_by) \
                    SELECT name, description, $1, $1 FROM shared.catalog_statuses \
                    WHERE initial ORDER BY created_at, name) \
         INSERT INTO behaviors (name, description, created_by, updated_by) \
         SELECT name, description, $1, $1 FROM shared.catalog_behaviors \
         WHERE initial ORDER BY created_at, name",
    )
    .bind(author)
    .execute(conn)
    .await?;
    Ok(())
}

async fn set_status(
    pool: &PgPool,
    slug: &Slug,
    to: OrgStatus,
    from: OrgStatus,
    action: &'static str,
) -> Result<Organization, Error> {
    let mut tx = pool.begin().await?;
    let row: Option<OrgRow> = sqlx::query_as(concat!(
        "UPDATE tenantry.organizations SET status = $2, updated_at = now() \
         WHERE slug = $1 AND status = $3 RETURNING ",
        org_columns!()
    ))
    .bind(slug.as_str())
    .bind(to)
    .bind(from)
    .fetch_optional(&mut *tx)
    .await?;
    if row.is_some() {
        announce(&mut tx, &Change::Org(slug.clone())).await?;
    }
    tx.commit().await?;
    match row {
        Some(row) => Organization::try_from(row),
        None => {
            let current = registry::get_org(&mut *pool.acquire().await?, slug).await?;
            Err(Error::InvalidState {
                slug: slug.to_string(),
                status: current.status.to_string(),
                action,
                expected: from.as_str(),
            })
        }
    }
}

#[tracing::instrument(skip(pool))]
pub async fn suspend_org(pool: &PgPool, slug: &Slug) -> Result<Organization, Error> {
    set_status(
        pool,
        slug,
        OrgStatus::Suspended,
        OrgStatus::Active,
        "suspend",
    )
    .await
}

#[tracing::instrument(skip(pool))]
pub async fn resume_org(pool: &PgPool, slug: &Slug) -> Result<Organization, Error> {
    set_status(
        pool,
        slug,
        OrgStatus::Active,
        OrgStatus::Suspended,
        "resume",
    )
    .await
}

/// Renames an org's slug. Its schema (named after the org's id) stays as it
/// is: a schema belongs to one org for its whole life, so a router anywhere
/// that still maps the old slug to this org can only reach this org's data,
/// and a new org taking the old slug gets a schema of its own.
#[tracing::instrument(skip(pool))]
pub async fn rename_org(
    pool: &PgPool,
    slug: &Slug,
    new_slug: &Slug,
) -> Result<Organization, Error> {
    let mut tx = pool.begin().await?;
    let conflict = || {
        Error::Conflict(format!(
            "organization {:?} already exists",
            new_slug.as_str()
        ))
    };
    let row: Option<OrgRow> = sqlx::query_as(concat!(
        "UPDATE tenantry.organizations SET slug = $2, \
           updated_at = CASE WHEN slug = $2 THEN updated_at ELSE now() END \
         WHERE slug = $1 RETURNING ",
        org_columns!()
    ))
    .bind(slug.as_str())
    .bind(new_slug.as_str())
    .fetch_optional(&mut *tx)
    .await
    .on_unique_violation(conflict)?;
    let org = Organization::try_from(row.ok_or_else(|| Error::OrgNotFound(slug.to_string()))?)?;
    if slug != new_slug {
        announce(&mut tx, &Change::Org(slug.clone())).await?;
        announce(&mut tx, &Change::Org(new_slug.clone())).await?;
    }
    tx.commit().await?;
    Ok(org)
}

/// Deletes an org: its registry row (users and tokens cascade), its schema
/// with everything in it, and its role, in one transaction.
#[tracing::instrument(skip(pool))]
pub async fn delete_org(pool: &PgPool, slug: &Slug) -> Result<Organization, Error> {
    let mut tx = pool.begin().await?;
    let row: Option<OrgRow> = sqlx::query_as(concat!(
        "DELETE FROM tenantry.organizations WHERE slug = $1 RETURNING ",
        org_columns!()
    ))
    .bind(slug.as_str())
    .fetch_optional(&mut *tx)
    .await?;
    let org = Organization::try_from(row.ok_or_else(|| Error::OrgNotFound(slug.to_string()))?)?;
    let drop = format!("DROP SCHEMA IF EXISTS {} CASCADE", org.schema_name.quoted());
    simple_query(&mut tx, &drop).await?;
    crate::registry::roles::drop_tenant_role(&mut tx, &org.id).await?;
    announce(&mut tx, &Change::Org(slug.clone())).await?;
    tx.commit().await?;
    tracing::info!(slug = %org.slug, schema = %org.schema_name, "organization deleted");
    Ok(org)
}

/// Issues an API token for the user with `email` in org `slug`, creating the
/// user first if the org has none by that address.
#[tracing::instrument(skip(pool))]
pub async fn issue_org_token(
    pool: &PgPool,
    slug: &Slug,
    email: &str,
    name: Option<&str>,
    expires_in: Option<std::time::Duration>,
) -> Result<(User, registry::IssuedToken), Error> {
    let email = registry::parse_email(email)?;
    let mut tx = pool.begin().await?;
    let org = registry::get_org(&mut tx, slug).await?;
    let issued = issue_for_email(&mut tx, Some(org.id), &email, name, expires_in).await?;
    tx.commit().await?;
    Ok(issued)
}

/// Issues a token for a platform superuser (a user of no organization) with
/// `email`, creating the user if needed. Superuser tokens may act on any org.
#[tracing::instrument(skip(pool))]
pub async fn issue_superuser_token(
    pool: &PgPool,
    email: &str,
    name: Option<&str>,
    expires_in: Option<std::time::Duration>,
) -> Result<(User, registry::IssuedToken), Error> {
    let email = registry::parse_email(email)?;
    let mut tx = pool.begin().await?;
    let issued = issue_for_email(&mut tx, None, &email, name, expires_in).await?;
    tx.commit().await?;
    Ok(issued)
}

/// The user of `organization_id` (none: a platform superuser) with `email`,
/// created if missing, and a new token for them.
async fn issue_for_email(
    conn: &mut PgConnection,
    organization_id: Option<Uuid>,
    email: &str,
    name: Option<&str>,
    expires_in: Option<std::time::Duration>,
) -> Result<(User, registry::IssuedToken), Error> {
    if let Some(name) = name {
        if name.chars().count() > 200 || name.chars().any(char::is_control) {
            return Err(Error::Validation {
                field: "name",
                message: "a token name must be at most 200 characters, without control characters"
                    .into(),
            });
        }
    }
    if let Some(d) = expires_in {
        if d < std::time::Duration::from_secs(60) || d > MAX_TOKEN_LIFETIME {
            return Err(Error::Validation {
                field: "expires_in",
                message: "a token must live between 1 minute and 10 years".into(),
            });
        }
    }
    let user = registry::ensure_user(conn, organization_id, email).await?;
    let token = registry::issue_token(conn, &user, name, expires_in).await?;
    Ok((user, token))
}

/// The longest lifetime a token can be given.
pub const MAX_TOKEN_LIFETIME: std::time::Duration =
    std::time::Duration::from_secs(10 * 366 * 24 * 3600);

/// Revokes a token and announces it, in one transaction; returns its digest,
/// or `None` when there was no active token with that id.
#[tracing::instrument(skip(pool))]
pub async fn revoke_token(pool: &PgPool, token_id: Uuid) -> Result<Option<[u8; 32]>, Error> {
    let mut tx = pool.begin().await?;
    let Some(stored) = registry::revoke_token(&mut tx, token_id).await? else {
        return Ok(None);
    };
    let hash = <[u8; 32]>::try_from(stored.as_slice())
        .map_err(|_| Error::Corrupt(format!("token {token_id} has a malformed digest")))?;
    announce(&mut tx, &Change::TokenRevoked(hash)).await?;
    tx.commit().await?;
    Ok(Some(hash))
}

/// Reads a lifetime such as `90d`, `12h`, `30m`, `45s` or plain seconds.
pub fn parse_lifetime(raw: &str) -> Result<std::time::Duration, Error> {
    let invalid = || Error::Validation {
        field: "expires_in",
        message: format!("{raw:?} is not a lifetime like 90d, 12h, 30m or 3600s"),
    };
    let raw_trimmed = raw.trim();
    let (digits, unit) = match raw_trimmed.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => raw_trimmed.split_at(i),
        None => (raw_trimmed, "s"),
    };
    let n: u64 = digits.parse().map_err(|_| invalid())?;
    let secs = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        "d" => n.checked_mul(86_400),
        _ => None,
    }
    .ok_or_else(invalid)?;
    Ok(std::time::Duration::from_secs(secs))
}
