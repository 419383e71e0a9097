//! PostgreSQL roles, so that PostgreSQL itself enforces the separation of
//! tenants (invariant 7, `docs/invariants.md`).
//!
//! - Every org has a `NOLOGIN` role (on Citus a `LOGIN` role without a
//!   password: see `engine`), named like its schema after the org's
//!   id, that owns its schema and everything in it and is granted nothing
//!   else. A tenant transaction runs as that role (`SET LOCAL ROLE` in its
//!   BEGIN message), so SQL that names the registry, `public` or another
//!   tenant's schema fails with a permission error whatever our code sends.
//! - Each database has a shared reader role (`tenantry_shared_<database
//!   oid>`, `NOLOGIN`): USAGE on the shared schema and SELECT on its tables
//!   (`tenants::shared`). Every tenant role is a member of it, and `INHERIT`
//!   so that its rights apply in tenant transactions; it is the only role a
//!   tenant role is a member of.
//! - Serving roles (the login role of the server's tenant connections) are
//!   recorded in `tenantry.serving_roles`; each is `NOINHERIT`, not a
//!   superuser, a member of every tenant role (so it may `SET ROLE` to them,
//!   but holds none of their privileges outside a tenant transaction) and
//!   may call the registry functions that authentication and routing need
//!   (one org by slug or id, one token by digest), but read no registry
//!   table: SQL that resets the role on a tenant connection lists nothing.
//! - The admin role (DATABASE_URL) creates and drops tenant roles, so it
//!   needs `CREATEROLE` or to be a superuser; when it is not a superuser it
//!   is made a member of each tenant role too, to manage their objects.
//!
//! What roles do not stop: SQL that itself runs `RESET ROLE` or `SET ROLE`
//! gets the login role's rights back. They guard against our own mistakes
//! (a schema-qualified name, a missing search path), not against arbitrary
//! SQL from an attacker, which never reaches tenant transactions.

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::base::error::{sqlstate, Error};
use crate::base::ident::{quote_ident, RoleName, SchemaName};
use crate::pg::statements::{hand_over_schema, simple_query};

const DUPLICATE_OBJECT: &str = "42710";

/// The registry functions a serving role may call, and all it may do in the
/// registry: it reads no registry table itself (migration V6), so neither
/// can SQL that leaves a tenant role on a tenant connection.
const SERVING_FUNCTIONS: &str = "tenantry.serving_org_by_slug(text), \
    tenantry.serving_org_by_id(uuid), tenantry.serving_principal(bytea), \
    tenantry.serving_record_token_use(uuid[]), tenantry.serving_token_key(), \
    tenantry.serving_legacy_token_prefixes(), tenantry.serving_jobs_due(uuid, timestamptz)";

/// The roles a new tenant role is granted to: every registered serving role
/// that exists, and the admin itself unless it is a superuser.
async fn grantees(conn: &mut PgConnection) -> Result<Vec<RoleName>, Error> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT s.role FROM tenantry.serving_roles s JOIN pg_roles r ON r.rolname = s.role \
         UNION SELECT current_user::text WHERE NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)",
    )
    .fetch_all(&mut *conn)
    .await?;
    names
        .iter()
        .map(|n| RoleName::parse(n).map_err(|e| Error::Corrupt(format!("serving role {n:?}: {e}"))))
        .collect()
}

fn quoted_list(roles: &[RoleName]) -> String {
    roles
        .iter()
        .map(RoleName::quoted)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Creates the role of org `org_id` inside the caller's transaction and
/// grants it to the serving roles: `NOLOGIN`, or on Citus `LOGIN` without a
/// password. A role of that name already existing is reported, never
/// adopted.
pub(crate) async fn create_tenant_role(
    conn: &mut PgConnection,
    org_id: &Uuid,
    engine: crate::pg::engine::Engine,
) -> Result<RoleName, Error> {
    let role = RoleName::for_org(org_id);
    let grantees = grantees(conn).await?;
    // Citus connects to the worker as the current role (see `engine`).
    let login = if engine.is_citus() {
        "LOGIN"
    } else {
        "NOLOGIN"
    };
    // INHERIT, for the shared reader role's rights, its one membership.
    let mut sql = format!("CREATE ROLE {} {login} INHERIT", role.quoted());
    if let Some(reader) = shared_reader(conn).await? {
        sql.push_str(&format!("; GRANT {} TO {}", reader.quoted(), role.quoted()));
    }
    if !grantees.is_empty() {
        sql.push_str(&format!(
            "; GRANT {} TO {}",
            role.quoted(),
            quoted_list(&grantees)
        ));
    }
    simple_query(conn, &sql)
        .await
        .map_err(|e| match sqlstate(&e).as_deref() {
            Some(DUPLICATE_OBJECT) => Error::Conflict(format!(
                "role {role} already exists but no organization owns it; run `tenantry doctor`"
            )),
            _ => Error::Database(e),
        })?;
    Ok(role)
}

/// The tenant roles that exist (orgs' and warm schemas'), as `r` joined
/// to `pg_roles`: the FROM clause of queries over every tenant role.
const TENANT_ROLES_FROM: &str =
    "(SELECT id FROM tenantry.organizations UNION ALL SELECT org_id FROM tenantry.warm_schemas) o \
     JOIN pg_roles r ON r.rolname = 't_' || replace(o.id::text, '-', '')";

/// The name of this database's shared reader role: per database, because
/// roles are cluster-wide and a tenant of one database must read no other
/// database's shared schema.
pub(crate) const SHARED_READER_NAME: &str =
    "SELECT 'tenantry_shared_' || d.oid::text FROM pg_database d \
     WHERE d.datname = current_database()";

/// This database's shared reader role, if it exists yet (the shared schema
/// is migrated at startup, before any org is created).
pub(crate) async fn shared_reader(conn: &mut PgConnection) -> Result<Option<RoleName>, Error> {
    let name: Option<String> = sqlx::query_scalar(&format!(
        "SELECT r.rolname::text FROM pg_roles r WHERE r.rolname = ({SHARED_READER_NAME})"
    ))
    .fetch_optional(&mut *conn)
    .await?;
    name.map(|n| RoleName::parse(&n).map_err(|e| Error::Corrupt(format!("role {n:?}: {e}"))))
        .transpose()
}

/// Creates this database's shared reader role (`NOLOGIN NOINHERIT`) if it
/// does not exist, inside the caller's transaction.
pub(crate) async fn ensure_shared_reader(conn: &mut PgConnection) -> Result<RoleName, Error> {
    if let Some(reader) = shared_reader(conn).await? {
        return Ok(reader);
    }
    let name: String = sqlx::query_scalar(SHARED_READER_NAME)
        .fetch_one(&mut *conn)
        .await?;
    let reader =
        RoleName::parse(&name).map_err(|e| Error::Corrupt(format!("role {name:?}: {e}")))?;
    simple_query(
        conn,
        &format!("CREATE ROLE {} NOLOGIN NOINHERIT", reader.quoted()),
    )
    .await?;
    Ok(reader)
}

/// Makes every tenant role (orgs' and warm schemas') that does not yet
/// have `reader`'s rights a member of it, and `INHERIT` (roles made by
/// releases before the shared schema were `NOINHERIT`); returns how many it
/// changed. The attribute comes first: from PostgreSQL 16 a grant records
/// whether it is inherited when it is made (from the member's attribute
/// then), and `WITH INHERIT TRUE` corrects a grant made without.
pub(crate) async fn make_tenant_roles_readers(
    conn: &mut PgConnection,
    reader: &RoleName,
) -> Result<usize, Error> {
    let (missing, per_grant): (Vec<String>, bool) = sqlx::query_as(&format!(
        "SELECT coalesce(array_agg(r.rolname::text ORDER BY r.rolname), '{{}}'), \
                current_setting('server_version_num')::int >= 160000 \
         FROM {TENANT_ROLES_FROM} \
         WHERE NOT pg_has_role(r.oid, (SELECT oid FROM pg_roles WHERE rolname = $1), 'USAGE')"
    ))
    .bind(reader.as_str())
    .fetch_one(&mut *conn)
    .await?;
    let inherit = if per_grant { " WITH INHERIT TRUE" } else { "" };
    for batch in missing.chunks(500) {
        let names: Vec<String> = batch.iter().map(|n| quote_ident(n)).collect();
        let mut sql = String::new();
        for name in &names {
            sql.push_str(&format!("ALTER ROLE {name} INHERIT; "));
        }
        sql.push_str(&format!(
            "GRANT {} TO {}{inherit}",
            reader.quoted(),
            names.join(", ")
        ));
        simple_query(&mut *conn, &sql).await?;
    }
    Ok(missing.len())
}

/// Drops the role of org `org_id` (after its schema), if it exists.
pub(crate) async fn drop_tenant_role(conn: &mut PgConnection, org_id: &Uuid) -> Result<(), Error> {
    let role = RoleName::for_org(org_id);
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
            .bind(role.as_str())
            .fetch_one(&mut *conn)
            .await?;
    if exists {
        let q = role.quoted();
        simple_query(conn, &format!("DROP OWNED BY {q}; DROP ROLE {q}")).await?;
    }
    Ok(())
}

/// Gives an org created before tenant roles its role, in one transaction:
/// creates the role, then makes it the owner of the schema and of every
/// object in it.
async fn adopt_schema(pool: &PgPool, org_id: &Uuid, schema: &SchemaName) -> Result<(), Error> {
    let mut tx = pool.begin().await?;
    let engine = crate::pg::engine::Engine::detect(&mut tx).await?;
    let role = create_tenant_role(&mut tx, org_id, engine).await?;
    hand_over_schema(&mut tx, schema, &role, engine.one_statement_per_message()).await?;
    tx.commit().await?;
    Ok(())
}

/// Orgs whose role does not exist yet (created by a version before tenant
/// roles): (slug, id, schema).
pub async fn orgs_without_roles(pool: &PgPool) -> Result<Vec<(String, Uuid, String)>, Error> {
    Ok(sqlx::query_as(
        "SELECT o.slug, o.id, o.schema_name FROM tenantry.organizations o \
         WHERE NOT EXISTS (SELECT 1 FROM pg_roles r \
                           WHERE r.rolname = 't_' || replace(o.id::text, '-', '')) \
           AND EXISTS (SELECT 1 FROM pg_namespace n WHERE n.nspname = o.schema_name) \
         ORDER BY o.slug",
    )
    .fetch_all(pool)
    .await?)
}

/// Gives every org that has none its role (see [`adopt_schema`]); returns
/// the slugs it upgraded. Idempotent; each org is one transaction.
pub async fn ensure_tenant_roles(pool: &PgPool) -> Result<Vec<String>, Error> {
    let mut done = vec![];
    for (slug, id, schema) in orgs_without_roles(pool).await? {
        let schema = SchemaName::parse(&schema)?;
        adopt_schema(pool, &id, &schema).await?;
        tracing::info!(slug = %slug, role = %RoleName::for_org(&id), "tenant role created");
        done.push(slug);
    }
    Ok(done)
}

/// Makes `role` a serving role: creates it (`LOGIN NOINHERIT`, with
/// `password`) if missing and a password is given, refuses a superuser,
/// makes it `NOINHERIT`, records it, lets it read what authentication and
/// routing need, and grants it every tenant role (warm schemas' included) it
/// is not yet a member of.
pub async fn ensure_serving_role(
    admin: &PgPool,
    role: &RoleName,
    password: Option<&str>,
) -> Result<(), Error> {
    let mut tx = admin.begin().await?;
    let found: Option<(bool, bool)> =
        sqlx::query_as("SELECT rolsuper, rolinherit FROM pg_roles WHERE rolname = $1")
            .bind(role.as_str())
            .fetch_optional(&mut *tx)
            .await?;
    let q = role.quoted();
    match found {
        Some((true, _)) => {
            return Err(Error::Validation {
                field: "serving role",
                message: format!(
                    "{role} is a superuser; tenant connections must log in as a role that is not"
                ),
            })
        }
        Some((false, true)) => simple_query(&mut tx, &format!("ALTER ROLE {q} NOINHERIT"))
            .await
            .map(|_| ())?,
        Some((false, false)) => {}
        None => {
            let password = password.ok_or_else(|| Error::Validation {
                field: "serving role",
                message: format!(
                    "role {role} does not exist and no password was given to create it"
                ),
            })?;
            if password.contains('\0') {
                return Err(Error::Validation {
                    field: "serving role",
                    message: "the password must not contain NUL".into(),
                });
            }
            // A utility statement takes no bind parameters: the password is an
            // escape-string literal (E'...'), whose escaping does not depend
            // on standard_conforming_strings.
            let literal = password.replace('\\', "\\\\").replace('\'', "\\'");
            simple_query(
                &mut tx,
                &format!("CREATE ROLE {q} LOGIN NOINHERIT PASSWORD E'{literal}'"),
            )
            .await?;
        }
    }
    sqlx::query("INSERT INTO tenantry.serving_roles (role) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(role.as_str())
        .execute(&mut *tx)
        .await?;
    simple_query(
        &mut tx,
        &format!(
            "GRANT USAGE ON SCHEMA tenantry TO {q}; \
             REVOKE ALL ON tenantry.organizations, tenantry.users, tenantry.api_tokens, \
                           tenantry.settings FROM {q}; \
             GRANT EXECUTE ON FUNCTION {SERVING_FUNCTIONS} TO {q}"
        ),
    )
    .await?;
    let missing: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT r.rolname::text FROM {TENANT_ROLES_FROM} WHERE NOT pg_has_role($1, r.oid, 'MEMBER')"
    ))
    .bind(role.as_str())
    .fetch_all(&mut *tx)
    .await?;
    for batch in missing.chunks(500) {
        let names: Vec<String> = batch.iter().map(|n| quote_ident(n)).collect();
        simple_query(&mut tx, &format!("GRANT {} TO {q}", names.join(", "))).await?;
    }
    tx.commit().await?;
    Ok(())
}
