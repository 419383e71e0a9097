//! Applying migrations with refinery over sqlx. refinery has no sqlx driver,
//! so [`MigrationConn`] implements `refinery_core`'s async traits on a sqlx
//! connection that is already inside a transaction. Everything refinery runs
//! therefore joins the caller's transaction: provisioning can create the
//! registry row, the schema, the template and the seed data atomically.
//!
//! refinery pastes its history table name unquoted and unqualified into SQL,
//! so we never rename it: the table resolves through `search_path`, which we
//! set transaction-locally to exactly the target schema. The history of a
//! tenant thus lives inside that tenant's schema.

use std::future::Future;
use std::path::Path;

use refinery_core::traits::r#async::{AsyncMigrate, AsyncQuery, AsyncTransaction};
use refinery_core::{Migration, Runner, Target};
use sqlx::PgConnection;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::engine::Engine;
use crate::ident::{RoleName, SchemaName};

/// refinery's default history table name, created in the target schema.
pub const HISTORY_TABLE: &str = "refinery_schema_history";

mod embedded_template {
    refinery::embed_migrations!("tenant_template");
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("cannot load template migrations: {0}")]
    Load(String),
    #[error("template has no migrations")]
    Empty,
    #[error("migration failed in schema {schema}: {message}")]
    Migration {
        schema: String,
        /// The migration being applied when it failed, e.g. `V2__add_index`.
        migration: Option<String>,
        message: String,
        /// True when an applied migration differs from the template's file
        /// (checksum) or is missing from the template.
        diverged: bool,
    },
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// A sqlx connection, inside a transaction, seen by refinery as a migration
/// target.
pub(crate) struct MigrationConn<'c> {
    conn: &'c mut PgConnection,
}

impl<'c> MigrationConn<'c> {
    pub(crate) fn new(conn: &'c mut PgConnection) -> Self {
        MigrationConn { conn }
    }
}

impl AsyncTransaction for MigrationConn<'_> {
    type Error = sqlx::Error;

    fn execute<'a, T: Iterator<Item = &'a str> + Send + 'a>(
        &'a mut self,
        queries: T,
    ) -> impl Future<Output = Result<usize, Self::Error>> + Send + 'a {
        // One statement per message, on every engine: Citus refuses several
        // DDL statements in one message on a distributed schema, and one
        // code path is tested on both.
        let batch: Vec<&str> = queries.collect();
        async move {
            let mut affected = 0;
            for query in batch {
                affected += send_statements(self.conn, query, true).await?;
            }
            Ok(affected as usize)
        }
    }
}

impl AsyncQuery<Vec<Migration>> for MigrationConn<'_> {
    async fn query<'a>(&'a mut self, query: &'a str) -> Result<Vec<Migration>, Self::Error> {
        let rows = fetch_history(self.conn, query).await?;
        rows.into_iter().map(applied_migration).collect()
    }
}

impl AsyncMigrate for MigrationConn<'_> {}

type HistoryRow = (i32, Option<String>, Option<String>, Option<String>);

type SendFuture<'a, T> =
    std::pin::Pin<Box<dyn Future<Output = Result<T, sqlx::Error>> + Send + 'a>>;

/// Runs SQL text (one or several statements, no bind parameters) in one
/// round trip and returns the rows affected.
///
/// Both helpers here box their futures: with sqlx's `raw_sql` or inline in
/// `impl Future + Send` trait methods, the compiler's higher-ranked check of
/// sqlx's `Executor` impl for `&mut PgConnection` fails and callers' futures
/// stop being `Send`. Boxing proves `Send` here, where lifetimes are concrete.
pub(crate) fn simple_query<'a>(conn: &'a mut PgConnection, sql: &'a str) -> SendFuture<'a, u64> {
    // A plain &str has no bind arguments, so sqlx sends it with the simple
    // query protocol, which accepts several statements.
    Box::pin(async move { Ok(sqlx::Executor::execute(conn, sql).await?.rows_affected()) })
}

/// Sends SQL text: in one message, or one statement per message (for Citus,
/// see `engine`). Returns the rows affected.
pub(crate) fn send_statements<'a>(
    conn: &'a mut PgConnection,
    sql: &'a str,
    one_per_message: bool,
) -> SendFuture<'a, u64> {
    Box::pin(async move {
        if !one_per_message {
            return simple_query(conn, sql).await;
        }
        let mut affected = 0;
        for statement in crate::sql::statements(sql) {
            affected += simple_query(&mut *conn, statement).await?;
        }
        Ok(affected)
    })
}

/// Runs SQL text (one or several statements, no bind parameters) in one
/// round trip and returns the rows of all of them (boxed for `Send`, see
/// [`simple_query`]).
pub(crate) fn simple_rows<'a>(
    conn: &'a mut PgConnection,
    sql: &'a str,
) -> SendFuture<'a, Vec<sqlx::postgres::PgRow>> {
    Box::pin(async move { sqlx::Executor::fetch_all(conn, sql).await })
}

fn fetch_history<'a>(
    conn: &'a mut PgConnection,
    query: &'a str,
) -> SendFuture<'a, Vec<HistoryRow>> {
    Box::pin(async move {
        // Persistent: the text is the same for every schema, so each pooled
        // connection prepares it once (PostgreSQL re-plans it when the
        // search_path differs), saving a round trip per tenant.
        sqlx::query_as(query).fetch_all(conn).await
    })
}

fn applied_migration(
    (version, name, applied_on, checksum): HistoryRow,
) -> Result<Migration, sqlx::Error> {
    let bad = |what: &str| sqlx::Error::Decode(format!("history row {version}: bad {what}").into());
    let applied_on = OffsetDateTime::parse(applied_on.as_deref().unwrap_or_default(), &Rfc3339)
        .map_err(|_| bad("applied_on"))?;
    let checksum = checksum
        .as_deref()
        .unwrap_or_default()
        .parse::<u64>()
        .map_err(|_| bad("checksum"))?;
    Ok(Migration::applied(
        version,
        name.unwrap_or_default(),
        applied_on,
        checksum,
    ))
}

/// What applying a template did to one schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Names (`V2__add_index`) of the migrations applied by this call.
    pub migrations: Vec<String>,
    /// Their versions.
    pub versions: Vec<i32>,
}

/// The first-line marker of a migration that must run outside a
/// transaction (e.g. `CREATE INDEX CONCURRENTLY`).
pub const NO_TRANSACTION_MARKER: &str = "-- tenantry:no-transaction";

/// A set of versioned SQL migrations applied to one schema at a time.
#[derive(Debug, Clone)]
pub struct Template {
    migrations: Vec<Migration>,
    /// Versions of the migrations marked [`NO_TRANSACTION_MARKER`].
    no_transaction: std::collections::BTreeSet<i32>,
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
        for m in &migrations {
            let sql = m.sql().unwrap_or_default();
            let marked = sql
                .lines()
                .next()
                .is_some_and(|first| first.trim() == NO_TRANSACTION_MARKER);
            if marked {
                let n = crate::sql::statements(sql).len();
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
        })
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
            crate::sql::remove_keyword(sql, "concurrently")
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
        self.run(conn, schema.as_str(), target, grouped).await
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
        self.run(conn, schema.as_str(), target, grouped).await
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
        // "\n;\n" ends a trailing line comment before the separator.
        let result = send_statements(conn, &statements.join("\n;\n"), citus).await;
        result.map_err(|e| match crate::error::sqlstate(&e).as_deref() {
            // the schema exists: the caller reports it
            Some("42P06") => TemplateError::Database(e),
            _ => TemplateError::Migration {
                schema: schema.to_string(),
                migration: None,
                message: crate::error::chain(&e),
                diverged: false,
            },
        })?;
        if citus {
            crate::roles::hand_over_schema(conn, schema, owner, true)
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

    /// Applies these migrations to the registry schema `tenantry`.
    pub(crate) async fn apply_to_registry(
        &self,
        conn: &mut PgConnection,
    ) -> Result<Applied, TemplateError> {
        simple_query(conn, "SET LOCAL search_path TO tenantry").await?;
        self.run(conn, "tenantry", None, false).await
    }

    async fn run(
        &self,
        conn: &mut PgConnection,
        schema: &str,
        target: Option<i32>,
        grouped: bool,
    ) -> Result<Applied, TemplateError> {
        let runner = Runner::new(&self.migrations)
            .set_abort_divergent(true)
            .set_abort_missing(true)
            .set_grouped(grouped)
            .set_target(match target {
                Some(v) => Target::Version(v),
                None => Target::Latest,
            });
        let mut mc = MigrationConn::new(conn);
        match runner.run_async(&mut mc).await {
            Ok(report) => Ok(Applied {
                migrations: report
                    .applied_migrations()
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                versions: report
                    .applied_migrations()
                    .iter()
                    .map(|m| m.version())
                    .collect(),
            }),
            Err(e) => Err(migration_error(schema, e)),
        }
    }
}

/// `SET LOCAL search_path` to exactly one schema. Only a parsed, quoted
/// [`SchemaName`] reaches the SQL text.
pub(crate) async fn set_local_search_path(
    conn: &mut PgConnection,
    schema: &SchemaName,
) -> Result<(), sqlx::Error> {
    simple_query(
        conn,
        &format!("SET LOCAL search_path TO {}", schema.quoted()),
    )
    .await?;
    Ok(())
}

fn migration_error(schema: &str, e: refinery_core::Error) -> TemplateError {
    use refinery_core::error::Kind;
    let (migration, diverged) = match e.kind() {
        Kind::DivergentVersion(applied, _) | Kind::MissingVersion(applied) => {
            (Some(applied.to_string()), true)
        }
        // Ungrouped runs name the failing migration in the context message.
        Kind::Connection(context, _) => (
            context
                .strip_prefix("error applying migration ")
                .map(str::to_owned),
            false,
        ),
        _ => (None, false),
    };
    TemplateError::Migration {
        schema: schema.to_owned(),
        migration,
        message: crate::error::chain(&e),
        diverged,
    }
}

/// The history row refinery writes for `m`, applied now (its exact format:
/// refinery parses `applied_on` and `checksum` back).
pub fn history_insert(m: &Migration) -> String {
    format!(
        "INSERT INTO {HISTORY_TABLE} (version, name, applied_on, checksum) VALUES ({}, '{}', '{}', '{}')",
        m.version(),
        m.name().replace('\'', "''"),
        OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .expect("the current time formats as RFC 3339"),
        m.checksum()
    )
}
