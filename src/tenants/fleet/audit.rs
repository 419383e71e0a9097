//! `doctor --audit`: every grant, membership, attribute or ownership that
//! breaks the confinement of tenants (invariant 7, `docs/invariants.md`),
//! read from PostgreSQL's catalogs, each with the SQL that repairs it. For
//! operators who change grants by hand: the audit is how they check that
//! PostgreSQL still keeps every tenant in its schema.
//!
//! A tenant role is named like its schema (`t_<org id>`), so "its schema"
//! is the schema of the same name. The rules:
//! - `tenant_right_outside_schema`: a tenant role holds a right on a
//!   schema, relation or routine other than its own schema's (another
//!   tenant's, the registry, `public`);
//! - `tenant_role_membership`: a tenant role is a member of another role
//!   than the database's shared reader role (and would inherit or could SET
//!   ROLE to its rights);
//! - `tenant_role_attribute`: a tenant role is a superuser or may create
//!   roles or databases, replicate or bypass row security; on plain
//!   PostgreSQL, it may log in (on Citus tenant roles log in to workers,
//!   see `pg::engine`);
//! - `foreign_owner`: a tenant schema, or an object in it, is owned by
//!   another role than the tenant's;
//! - `foreign_grant`: a tenant schema or relation grants a right to
//!   another role than its tenant's, PUBLIC included;
//! - `shared_reader_right`: the shared reader role (which every tenant role
//!   inherits from) holds more than USAGE on the shared schema and SELECT on
//!   its relations, is a member of a role, or has an attribute beyond
//!   `NOLOGIN`;
//! - `shared_owner`: the shared schema is owned by a tenant, serving or
//!   reader role, or an object in it by another role than the schema's
//!   owner;
//! - `shared_foreign_grant`: PUBLIC or a serving role holds a right on the
//!   shared schema, a relation or a routine in it (the reader's rights are
//!   the only ones tenants get), except PUBLIC's USAGE on the schema, which
//!   reads nothing and which tenantry grants (see `tenants::shared`);
//! - `serving_role_reads_registry`: a serving role (the login role of
//!   tenant connections) may read or change a registry table itself,
//!   rather than through the lookup functions;
//! - `serving_role_attribute`: a serving role is a superuser or inherits
//!   its tenant roles' rights (`INHERIT`).

use serde::Serialize;
use sqlx::PgPool;

use crate::base::error::Error;
use crate::base::ident::quote_ident;
use crate::pg::engine::Engine;
// this database's shared reader role
use crate::registry::roles::SHARED_READER_NAME as READER;

/// One break of confinement and how to repair it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Breach {
    /// The rule broken (see the module's documentation).
    pub rule: &'static str,
    /// The role that holds too much.
    pub role: String,
    /// What it concerns (a schema, a relation, a role).
    pub object: String,
    pub detail: String,
    /// SQL that repairs it, to run as the admin role.
    pub repair: String,
}

/// Tenant roles: `t_` roles of an org or of a warm schema.
const TENANT_ROLES: &str = "SELECT r.oid, r.rolname FROM pg_roles r \
     WHERE r.rolname IN (SELECT 't_' || replace(id::text, '-', '') FROM tenantry.organizations \
                         UNION SELECT 't_' || replace(org_id::text, '-', '') FROM tenantry.warm_schemas)";

/// The schemas of tenant roles (same name).
const TENANT_SCHEMAS: &str = "SELECT n.oid, n.nspname, n.nspowner, n.nspacl FROM pg_namespace n \
     WHERE n.nspname IN (SELECT rolname FROM tenant_roles)";

type Row = (String, String, String, String);

/// Reads the catalogs and lists every breach, most serious first.
#[tracing::instrument(skip(pool))]
pub async fn audit(pool: &PgPool) -> Result<Vec<Breach>, Error> {
    let citus = Engine::detect(&mut *pool.acquire().await?)
        .await?
        .is_citus();
    let mut breaches = vec![];
    let mut add = |rule: &'static str, rows: Vec<Row>, repair: &dyn Fn(&Row) -> String| {
        for row in rows {
            breaches.push(Breach {
                rule,
                repair: repair(&row),
                role: row.0,
                object: row.1,
                detail: row.3,
            });
        }
    };

    // Rights of tenant roles on schemas, relations and routines not theirs.
    let outside: Vec<Row> = sqlx::query_as(&format!(
        "WITH tenant_roles AS ({TENANT_ROLES}) \
         SELECT t.rolname::text, quote_ident(n.nspname), 'SCHEMA', 'holds ' || a.privilege_type || ' on schema ' || n.nspname \
         FROM pg_namespace n CROSS JOIN LATERAL aclexplode(n.nspacl) a JOIN tenant_roles t ON t.oid = a.grantee \
         WHERE n.nspname <> t.rolname \
         UNION ALL \
         SELECT t.rolname::text, quote_ident(n.nspname) || '.' || quote_ident(c.relname), 'TABLE', \
                'holds ' || a.privilege_type || ' on ' || n.nspname || '.' || c.relname \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         CROSS JOIN LATERAL aclexplode(c.relacl) a JOIN tenant_roles t ON t.oid = a.grantee \
         WHERE n.nspname <> t.rolname \
         UNION ALL \
         SELECT t.rolname::text, quote_ident(n.nspname) || '.' || quote_ident(p.proname) || '(' || pg_get_function_identity_arguments(p.oid) || ')', \
                'ROUTINE', 'holds ' || a.privilege_type || ' on ' || n.nspname || '.' || p.proname \
         FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
         CROSS JOIN LATERAL aclexplode(p.proacl) a JOIN tenant_roles t ON t.oid = a.grantee \
         WHERE n.nspname <> t.rolname \
         ORDER BY 1, 2"
    ))
    .fetch_all(pool)
    .await?;
    add("tenant_right_outside_schema", outside, &|(
        role,
        object,
        kind,
        _,
    )| {
        format!("REVOKE ALL ON {kind} {object} FROM {}", quote_ident(role))
    });

    // Memberships of tenant roles in other roles.
    let member: Vec<Row> = sqlx::query_as(&format!(
        "WITH tenant_roles AS ({TENANT_ROLES}) \
         SELECT t.rolname::text, quote_ident(g.rolname), '', 'is a member of role ' || g.rolname \
         FROM pg_auth_members m JOIN tenant_roles t ON t.oid = m.member JOIN pg_roles g ON g.oid = m.roleid \
         WHERE g.rolname IS DISTINCT FROM ({READER}) \
         ORDER BY 1, 2"
    ))
    .fetch_all(pool)
    .await?;
    add("tenant_role_membership", member, &|(role, object, _, _)| {
        format!("REVOKE {object} FROM {}", quote_ident(role))
    });

    // Attributes no tenant role needs.
    let login = if citus { "false" } else { "r.rolcanlogin" };
    let attributes: Vec<Row> = sqlx::query_as(&format!(
        "WITH tenant_roles AS ({TENANT_ROLES}) \
         SELECT r.rolname::text, quote_ident(r.rolname), attr, 'has ' || attr \
         FROM pg_roles r JOIN tenant_roles t ON t.oid = r.oid \
         CROSS JOIN LATERAL (VALUES ('SUPERUSER', r.rolsuper), ('CREATEROLE', r.rolcreaterole), \
             ('CREATEDB', r.rolcreatedb), ('REPLICATION', r.rolreplication), \
             ('BYPASSRLS', r.rolbypassrls), ('LOGIN', {login})) v (attr, has) \
         WHERE has ORDER BY 1, 3"
    ))
    .fetch_all(pool)
    .await?;
    add("tenant_role_attribute", attributes, &|(
        _,
        object,
        attr,
        _,
    )| {
        format!("ALTER ROLE {object} NO{attr}")
    });

    // Tenant schemas and their objects owned by another role.
    let owners: Vec<Row> = sqlx::query_as(&format!(
        "WITH tenant_roles AS ({TENANT_ROLES}), tenant_schemas AS ({TENANT_SCHEMAS}) \
         SELECT pg_get_userbyid(s.nspowner)::text, quote_ident(s.nspname), 'SCHEMA', \
                'owns schema ' || s.nspname || ' of ' || s.nspname \
         FROM tenant_schemas s WHERE pg_get_userbyid(s.nspowner) <> s.nspname \
         UNION ALL \
         SELECT pg_get_userbyid(c.relowner)::text, quote_ident(s.nspname) || '.' || quote_ident(c.relname), \
                CASE c.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW' \
                     WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'f' THEN 'FOREIGN TABLE' ELSE 'TABLE' END, \
                'owns ' || s.nspname || '.' || c.relname \
         FROM pg_class c JOIN tenant_schemas s ON s.oid = c.relnamespace \
         WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S') AND pg_get_userbyid(c.relowner) <> s.nspname \
           AND NOT (c.relkind = 'S' AND EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'a')) \
         UNION ALL \
         SELECT pg_get_userbyid(p.proowner)::text, \
                quote_ident(s.nspname) || '.' || quote_ident(p.proname) || '(' || pg_get_function_identity_arguments(p.oid) || ')', \
                'ROUTINE', 'owns ' || s.nspname || '.' || p.proname \
         FROM pg_proc p JOIN tenant_schemas s ON s.oid = p.pronamespace \
         WHERE pg_get_userbyid(p.proowner) <> s.nspname \
         ORDER BY 2"
    ))
    .fetch_all(pool)
    .await?;
    add("foreign_owner", owners, &|(_, object, kind, _)| {
        let schema = object.split('.').next().unwrap_or(object);
        format!("ALTER {kind} {object} OWNER TO {schema}")
    });

    // Rights on tenant schemas and relations granted to other roles.
    let grants: Vec<Row> = sqlx::query_as(&format!(
        "WITH tenant_roles AS ({TENANT_ROLES}), tenant_schemas AS ({TENANT_SCHEMAS}) \
         SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee)::text END, \
                quote_ident(s.nspname), 'SCHEMA', a.privilege_type || ' on schema ' || s.nspname \
         FROM tenant_schemas s CROSS JOIN LATERAL aclexplode(s.nspacl) a \
         WHERE a.grantee <> s.nspowner \
         UNION ALL \
         SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee)::text END, \
                quote_ident(s.nspname) || '.' || quote_ident(c.relname), 'TABLE', \
                a.privilege_type || ' on ' || s.nspname || '.' || c.relname \
         FROM pg_class c JOIN tenant_schemas s ON s.oid = c.relnamespace \
         CROSS JOIN LATERAL aclexplode(c.relacl) a WHERE a.grantee <> c.relowner \
         ORDER BY 2, 1"
    ))
    .fetch_all(pool)
    .await?;
    // a tenant role's rights on other tenants were reported above
    let tenant_grantee = |role: &str| role.starts_with(crate::base::ident::TENANT_SCHEMA_PREFIX);
    let grants = grants
        .into_iter()
        .filter(|r| !tenant_grantee(&r.0))
        .collect();
    add("foreign_grant", grants, &|(role, object, kind, _)| {
        let grantee = if role == "PUBLIC" {
            "PUBLIC".to_owned()
        } else {
            quote_ident(role)
        };
        format!("REVOKE ALL ON {kind} {object} FROM {grantee}")
    });

    shared_rules(pool, &mut add).await?;

    // Serving roles: the registry only through its functions.
    let serving: Vec<Row> = sqlx::query_as(
        "SELECT s.role, 'tenantry.' || t.name, '', \
                'may ' || string_agg(p.privilege, ', ' ORDER BY p.privilege) || ' tenantry.' || t.name \
         FROM tenantry.serving_roles s JOIN pg_roles r ON r.rolname = s.role \
         CROSS JOIN (VALUES ('organizations'), ('users'), ('api_tokens'), ('settings'), \
                            ('serving_roles'), ('warm_schemas'), ('job_queues')) t (name) \
         CROSS JOIN (VALUES ('SELECT'), ('INSERT'), ('UPDATE'), ('DELETE')) p (privilege) \
         WHERE NOT r.rolsuper \
           AND to_regclass('tenantry.' || t.name) IS NOT NULL \
           AND has_table_privilege(r.oid, ('tenantry.' || t.name)::regclass, p.privilege) \
         GROUP BY s.role, t.name ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await?;
    add("serving_role_reads_registry", serving, &|(
        role,
        object,
        _,
        _,
    )| {
        format!("REVOKE ALL ON TABLE {object} FROM {}", quote_ident(role))
    });
    let serving_attributes: Vec<Row> = sqlx::query_as(
        "SELECT s.role, quote_ident(s.role), attr, 'has ' || attr \
         FROM tenantry.serving_roles s JOIN pg_roles r ON r.rolname = s.role \
         CROSS JOIN LATERAL (VALUES ('SUPERUSER', r.rolsuper), ('INHERIT', r.rolinherit)) v (attr, has) \
         WHERE has ORDER BY 1, 3",
    )
    .fetch_all(pool)
    .await?;
    add("serving_role_attribute", serving_attributes, &|(
        _,
        object,
        attr,
        _,
    )| {
        format!("ALTER ROLE {object} NO{attr}")
    });
    Ok(breaches)
}

/// The rules of the shared schema: what tenants read through the reader
/// role, nobody but its owner writes.
async fn shared_rules(
    pool: &PgPool,
    add: &mut impl FnMut(&'static str, Vec<Row>, &dyn Fn(&Row) -> String),
) -> Result<(), Error> {
    let shared = crate::tenants::shared::SHARED_SCHEMA;
    let reader: Vec<Row> = sqlx::query_as(&format!(
        "WITH reader AS (SELECT oid, rolname FROM pg_roles WHERE rolname = ({READER})) \
         SELECT r.rolname::text, 'SCHEMA ' || quote_ident(n.nspname), '', \
                'holds ' || a.privilege_type || ' on schema ' || n.nspname \
         FROM pg_namespace n CROSS JOIN LATERAL aclexplode(n.nspacl) a JOIN reader r ON r.oid = a.grantee \
         WHERE NOT (n.nspname = $1 AND a.privilege_type = 'USAGE') \
         UNION ALL \
         SELECT r.rolname::text, 'TABLE ' || quote_ident(n.nspname) || '.' || quote_ident(c.relname), '', \
                'holds ' || a.privilege_type || ' on ' || n.nspname || '.' || c.relname \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         CROSS JOIN LATERAL aclexplode(c.relacl) a JOIN reader r ON r.oid = a.grantee \
         WHERE NOT (n.nspname = $1 AND a.privilege_type = 'SELECT') \
         UNION ALL \
         SELECT r.rolname::text, quote_ident(g.rolname), 'member', 'is a member of role ' || g.rolname \
         FROM pg_auth_members m JOIN reader r ON r.oid = m.member JOIN pg_roles g ON g.oid = m.roleid \
         UNION ALL \
         SELECT r.rolname::text, quote_ident(r.rolname), attr, 'has ' || attr \
         FROM pg_roles p JOIN reader r ON r.oid = p.oid \
         CROSS JOIN LATERAL (VALUES ('SUPERUSER', p.rolsuper), ('CREATEROLE', p.rolcreaterole), \
             ('CREATEDB', p.rolcreatedb), ('REPLICATION', p.rolreplication), \
             ('BYPASSRLS', p.rolbypassrls), ('LOGIN', p.rolcanlogin)) v (attr, has) \
         WHERE has ORDER BY 2"
    ))
    .bind(shared)
    .fetch_all(pool)
    .await?;
    add(
        "shared_reader_right",
        reader,
        &|(role, object, kind, _)| match kind.as_str() {
            "" => format!("REVOKE ALL ON {object} FROM {}", quote_ident(role)),
            "member" => format!("REVOKE {object} FROM {}", quote_ident(role)),
            attr => format!("ALTER ROLE {object} NO{attr}"),
        },
    );

    // Owners: not a role tenants act as; one owner for the schema and all in it.
    let schema_owner: Option<String> = sqlx::query_scalar(
        "SELECT pg_get_userbyid(nspowner)::text FROM pg_namespace WHERE nspname = $1",
    )
    .bind(shared)
    .fetch_optional(pool)
    .await?;
    let schema_owner = schema_owner
        .map(|o| quote_ident(&o))
        .unwrap_or("CURRENT_USER".into());
    let owners: Vec<Row> = sqlx::query_as(&format!(
        "WITH s AS (SELECT oid, nspname, nspowner FROM pg_namespace WHERE nspname = $1), \
              bad AS (SELECT oid FROM pg_roles WHERE rolname = ({READER}) \
                      OR rolname IN (SELECT role FROM tenantry.serving_roles) \
                      OR rolname LIKE 't\\_%' AND rolname IN ( \
                         SELECT 't_' || replace(id::text, '-', '') FROM tenantry.organizations \
                         UNION SELECT 't_' || replace(org_id::text, '-', '') FROM tenantry.warm_schemas)) \
         SELECT pg_get_userbyid(s.nspowner)::text, quote_ident(s.nspname), 'SCHEMA', \
                'owns the shared schema ' || s.nspname \
         FROM s WHERE s.nspowner IN (SELECT oid FROM bad) \
         UNION ALL \
         SELECT pg_get_userbyid(c.relowner)::text, quote_ident(s.nspname) || '.' || quote_ident(c.relname), \
                CASE c.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW' \
                     WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'f' THEN 'FOREIGN TABLE' ELSE 'TABLE' END, \
                'owns ' || s.nspname || '.' || c.relname || ', not the schema''s owner' \
         FROM pg_class c JOIN s ON s.oid = c.relnamespace \
         WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S') AND c.relowner <> s.nspowner \
           AND NOT (c.relkind = 'S' AND EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'a')) \
         ORDER BY 2"
    ))
    .bind(shared)
    .fetch_all(pool)
    .await?;
    // a schema owned by a role tenants act as hands its objects to the admin
    let schema_owner = if owners.iter().any(|r| r.2 == "SCHEMA") {
        "CURRENT_USER".to_owned()
    } else {
        schema_owner
    };
    add("shared_owner", owners, &|(_, object, kind, _)| {
        if kind == "SCHEMA" {
            format!("ALTER SCHEMA {object} OWNER TO CURRENT_USER")
        } else {
            format!("ALTER {kind} {object} OWNER TO {schema_owner}")
        }
    });

    let grants: Vec<Row> = sqlx::query_as(
        "WITH s AS (SELECT oid, nspname, nspacl, nspowner FROM pg_namespace WHERE nspname = $1) \
         SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee)::text END, \
                'SCHEMA ' || quote_ident(s.nspname), a.privilege_type, a.privilege_type || ' on schema ' || s.nspname \
         FROM s CROSS JOIN LATERAL aclexplode(s.nspacl) a \
         WHERE (a.grantee = 0 AND a.privilege_type <> 'USAGE') \
            OR pg_get_userbyid(a.grantee) IN (SELECT role FROM tenantry.serving_roles) \
         UNION ALL \
         SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee)::text END, \
                'TABLE ' || quote_ident(s.nspname) || '.' || quote_ident(c.relname), a.privilege_type, \
                a.privilege_type || ' on ' || s.nspname || '.' || c.relname \
         FROM pg_class c JOIN s ON s.oid = c.relnamespace CROSS JOIN LATERAL aclexplode(c.relacl) a \
         WHERE a.grantee = 0 OR pg_get_userbyid(a.grantee) IN (SELECT role FROM tenantry.serving_roles) \
         UNION ALL \
         SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee)::text END, \
                'ROUTINE ' || r.name, a.privilege_type, a.privilege_type || ' on ' || r.name \
         FROM pg_proc p JOIN s ON s.oid = p.pronamespace \
         CROSS JOIN LATERAL (SELECT quote_ident(s.nspname) || '.' || quote_ident(p.proname) \
                             || '(' || pg_get_function_identity_arguments(p.oid) || ')' AS name) r \
         CROSS JOIN LATERAL aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a \
         WHERE a.grantee = 0 OR pg_get_userbyid(a.grantee) IN (SELECT role FROM tenantry.serving_roles) \
         ORDER BY 2, 1",
    )
    .bind(shared)
    .fetch_all(pool)
    .await?;
    // revokes the one right found, so that PUBLIC keeps its USAGE
    add("shared_foreign_grant", grants, &|(
        role,
        object,
        right,
        _,
    )| {
        let grantee = if role == "PUBLIC" {
            "PUBLIC".to_owned()
        } else {
            quote_ident(role)
        };
        format!("REVOKE {right} ON {object} FROM {grantee}")
    });
    Ok(())
}
