//! The tenant template: the versioned migrations of `tenant_template/`
//! (compiled in, or loaded from a directory) that every tenant schema is
//! built from and migrated with, refinery's rules for what is pending, and
//! building a new tenant schema in one round trip.

use std::path::Path;

use refinery_core::traits::r#async::AsyncMigrate;
use refinery_core::Migration;
use sqlx::PgConnection;

use crate::base::ident::{RoleName, SchemaName};
use crate::pg::engine::Engine;
use crate::pg::migrations::MigrationConn;
pub use crate::pg::migrations::{history_insert, Applied, TemplateError, HISTORY_TABLE};
use crate::pg::statements::{send_statements, set_local_search_path};

mod embedded_template {
    refinery::embed_migrations!("tenant_template");
}

/// The first-line marker of a migration that must run outside a
/// transaction (e.g. `CREATE INDEX CONCURRENTLY`).
pub const NO_TRANSACTION_MARKER: &str = "-- tenantry:no-transaction";

/// A comment line of a tenant migration that needs the shared schema at a
/// version or later: `-- tenantry:requires-shared 3`.
pub const REQUIRES_SHARED_MARKER: &str = "-- tenantry:requires-shared";

/// A set of versioned SQL migrations applied to one schema at a time.
#[derive(Debug, Clone)]
pub struct Template {
    migrations: Vec<Migration>,
    /// Versions of the migrations marked [`NO_TRANSACTION_MARKER`].
    no_transaction: std::collections::BTreeSet<i32>,
    /// The shared version each migration marked [`REQUIRES_SHARED_MARKER`]
    /// needs, by migration version.
    requires_shared: std::collections::BTreeMap<i32, i32>,
}

/// Why a template's history cannot be continued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Divergence {
    /// The applied migration that differs from (or is missing in) the
    /// template, e.g. `V1__initial`.
    pub migration: String,
    pub message: String,
}

impl Template {
    /// The tenant template compiled into this binary from `tenant_template/`.
    pub fn embedded() -> Self {
        Template::from_migrations(
            embedded_template::migrations::runner()
                .get_migrations()
                .clone(),
        )
        .expect("the embedded template has migrations")
    }

    /// Loads `V{n}__{name}.sql` files from a directory at run time.
    pub fn from_dir(dir: &Path) -> Result<Self, TemplateError> {
        if !dir.is_dir() {
            return Err(TemplateError::Load(format!(
                "{} is not a directory",
                dir.display()
            )));
        }
        let migrations = refinery_core::load_sql_migrations(dir)
            .map_err(|e| TemplateError::Load(e.to_string()))?;
        Template::from_migrations(migrations)
    }

    pub fn from_migrations(mut migrations: Vec<Migration>) -> Result<Self, TemplateError> {
        if migrations.is_empty() {
            return Err(TemplateError::Empty);
        }
        migrations.sort();
        let mut no_transaction = std::collections::BTreeSet::new();
        let mut requires_shared = std::collections::BTreeMap::new();
        for m in &migrations {
            let sql = m.sql().unwrap_or_default();
            for line in sql.lines() {
                let Some(rest) = line.trim().strip_prefix(REQUIRES_SHARED_MARKER) else {
                    continue;
                };
                let version = rest.trim().parse::<i32>().ok().filter(|v| *v > 0);
                let version = version.ok_or_else(|| {
                    TemplateError::Load(format!(
                        "{m}: {REQUIRES_SHARED_MARKER} must be followed by a shared version (a positive number), got {:?}",
                        rest.trim()
                    ))
                })?;
                requires_shared.insert(m.version(), version);
            }
            let marked = sql
                .lines()
                .next()
                .is_some_and(|first| first.trim() == NO_TRANSACTION_MARKER);
            if marked {
                let n = crate::base::sql::statements(sql).len();
                if n != 1 {
                    return Err(TemplateError::Load(format!(
                        "{m}: a no-transaction migration must contain exactly one statement (found {n})"
                    )));
                }
                no_transaction.insert(m.version());
            }
        }
        Ok(Template {
            migrations,
            no_transaction,
            requires_shared,
        })
    }

    /// The highest shared version the migrations up to `target` require,
    /// with the first migration that requires it.
    pub fn shared_version_required(&self, target: i32) -> Option<(String, i32)> {
        let (version, required) = self
            .requires_shared
            .range(..=target)
            .max_by_key(|(v, r)| (**r, -**v))?;
        let m = self.migrations.iter().find(|m| m.version() == *version)?;
        Some((m.to_string(), *required))
    }

    /// True for a migration marked [`NO_TRANSACTION_MARKER`].
    pub fn is_no_transaction(&self, m: &Migration) -> bool {
        self.no_transaction.contains(&m.version())
    }

    /// The SQL of `m` as it runs inside a transaction: a no-transaction
    /// migration loses its `CONCURRENTLY` (valid in a new, empty schema,
    /// which nothing else can be using).
    pub fn transactional_sql(&self, m: &Migration) -> String {
        let sql = m.sql().unwrap_or_default();
        if self.is_no_transaction(m) {
            crate::base::sql::remove_keyword(sql, "concurrently")
        } else {
            sql.to_owned()
        }
    }

    /// The migrations still to apply to a schema whose history holds
    /// `applied` (version, name, checksum), up to `target`: refinery's rules,
    /// checked here so that the history of many tenants can be read in one
    /// query. An applied migration that is missing from the template or
    /// differs from it (name or checksum), or a template migration below the
    /// applied ones that was never applied, is a divergence.
    pub fn pending(
        &self,
        applied: &[(i32, String, String)],
        target: i32,
    ) -> Result<Vec<&Migration>, Divergence> {
        for (version, name, checksum) in applied {
            let label = format!("V{version}__{name}");
            match self.migrations.iter().find(|m| m.version() == *version) {
                None => {
                    return Err(Divergence {
                        migration: label,
                        message: format!(
                            "applied migration V{version}__{name} is missing from the template"
                        ),
                    })
                }
                Some(m) if m.name() != name || m.checksum().to_string() != *checksum => {
                    return Err(Divergence {
                        migration: label,
                        message: format!(
                            "applied migration V{version}__{name} differs from the template's {m}"
                        ),
                    })
                }
                Some(_) => {}
            }
        }
        let current = applied.iter().map(|a| a.0).max().unwrap_or(-1);
        let mut pending = vec![];
        for m in &self.migrations {
            if applied.iter().any(|a| a.0 == m.version()) {
                continue;
            }
            if m.version() <= current {
                return Err(Divergence {
                    migration: m.to_string(),
                    message: format!("{m} was never applied but later versions were"),
                });
            }
            if m.version() <= target {
                pending.push(m);
            }
        }
        Ok(pending)
    }

    /// The template's migrations up to `version`: what a schema at that
    /// version was built from. `None` when it has none of them.
    pub fn up_to(&self, version: i32) -> Option<Template> {
        let migrations: Vec<Migration> = self
            .migrations
            .iter()
            .filter(|m| m.version() <= version)
            .cloned()
            .collect();
        Template::from_migrations(migrations).ok()
    }

    /// The highest version in the template: what a fully migrated schema's
    /// `template_version` is.
    pub fn latest_version(&self) -> i32 {
        self.migrations.last().map(|m| m.version()).unwrap_or(0)
    }

    pub fn migrations(&self) -> &[Migration] {
        &self.migrations
    }

    /// Applies the template to `schema` inside the transaction `conn` is in.
    /// Sets `search_path` transaction-locally to exactly `schema`, creates the
    /// history table there if needed, refuses to run when an applied migration
    /// was edited or removed, and applies every pending migration up to
    /// `target` (all when `None`). On error the caller must roll back.
    ///
    /// `grouped` sends all pending migrations in one round trip (fast, used by
    /// provisioning); otherwise each migration is sent on its own, so an error
    /// names the migration that failed.
    #[tracing::instrument(skip(self, conn), fields(schema = %schema))]
    pub async fn apply(
        &self,
        conn: &mut PgConnection,
        schema: &SchemaName,
        target: Option<i32>,
        grouped: bool,
    ) -> Result<Applied, TemplateError> {
        set_local_search_path(conn, schema).await?;
        crate::pg::migrations::run(conn, &self.migrations, schema.as_str(), target, grouped).await
    }

    /// Like [`Template::apply`], for a transaction whose search path the
    /// caller already set to exactly `schema` (e.g. in its BEGIN message).
    pub async fn apply_in_search_path(
        &self,
        conn: &mut PgConnection,
        schema: &SchemaName,
        target: Option<i32>,
        grouped: bool,
    ) -> Result<Applied, TemplateError> {
        crate::pg::migrations::run(conn, &self.migrations, schema.as_str(), target, grouped).await
    }

    /// Creates `schema`, owned by `owner`, and applies the whole template to
    /// it with refinery's history rows. A schema that exists already fails
    /// with SQLSTATE 42P06 (as `TemplateError::Database`).
    ///
    /// On plain PostgreSQL everything runs as `owner`, in one round trip,
    /// and the transaction goes on as `owner`. On Citus the schema is
    /// created as a distributed schema, one statement per message, as the
    /// admin role (a connection of `owner` to the worker could not see the
    /// new schema), then handed to `owner`; the transaction goes on as the
    /// admin (see `engine`).
    pub async fn apply_to_new_schema(
        &self,
        conn: &mut PgConnection,
        schema: &SchemaName,
        owner: &RoleName,
        engine: Engine,
    ) -> Result<Applied, TemplateError> {
        // The schema belongs to the tenant's role, and so does everything
        // the template creates. The history is written as refinery writes
        // it, so refinery reads it back unchanged.
        let citus = engine.is_citus();
        let mut statements = vec![];
        if citus {
            statements.push("SET LOCAL citus.enable_schema_based_sharding = on".to_owned());
        }
        statements.push(format!(
            "CREATE SCHEMA {q} AUTHORIZATION {r}",
            q = schema.quoted(),
            r = owner.quoted()
        ));
        if !citus {
            statements.push(format!("SET LOCAL ROLE {}", owner.quoted()));
        }
        statements.push(format!("SET LOCAL search_path TO {}", schema.quoted()));
        statements
            .push(<MigrationConn as AsyncMigrate>::assert_migrations_table_query(HISTORY_TABLE));
        for m in &self.migrations {
            statements.push(self.transactional_sql(m));
            statements.push(history_insert(m));
        }
        statements.push(crate::tenants::jobs::JOBS_DDL.to_owned());
        // "\n;\n" ends a trailing line comment before the separator.
        let result = send_statements(conn, &statements.join("\n;\n"), citus).await;
        result.map_err(|e| match crate::base::error::sqlstate(&e).as_deref() {
            // the schema exists: the caller reports it
            Some("42P06") => TemplateError::Database(e),
            _ => TemplateError::Migration {
                schema: schema.to_string(),
                migration: None,
                message: crate::base::error::chain(&e),
                diverged: false,
            },
        })?;
        if citus {
            crate::pg::statements::hand_over_schema(conn, schema, owner, true)
                .await
                .map_err(|e| TemplateError::Migration {
                    schema: schema.to_string(),
                    migration: None,
                    message: e.to_string(),
                    diverged: false,
                })?;
        }
        Ok(Applied {
            migrations: self.migrations.iter().map(ToString::to_string).collect(),
            versions: self.migrations.iter().map(|m| m.version()).collect(),
        })
    }
}
