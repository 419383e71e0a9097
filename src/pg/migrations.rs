//! Applying refinery migrations over sqlx. refinery has no sqlx driver,
//! so [`MigrationConn`] implements `refinery_core`'s async traits on a sqlx
//! connection that is already inside a transaction. Everything refinery runs
//! therefore joins the caller's transaction: provisioning can create the
//! registry row, the schema, the template and the seed data atomically.
//!
//! refinery pastes its history table name unquoted and unqualified into SQL,
//! so we never rename it: the table resolves through `search_path`, which
//! the caller sets transaction-locally to exactly the target schema. The
//! history of a tenant thus lives inside that tenant's schema, the
//! registry's inside `tenantry`.

use std::future::Future;

use refinery_core::traits::r#async::{AsyncMigrate, AsyncQuery, AsyncTransaction};
use refinery_core::{Migration, Runner, Target};
use sqlx::PgConnection;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

pub use crate::base::error::TemplateError;
use crate::pg::statements::{send_statements, SendFuture};

/// refinery's default history table name, created in the target schema.
pub const HISTORY_TABLE: &str = "refinery_schema_history";

/// A sqlx connection, inside a transaction, seen by refinery as a migration
/// target.
pub struct MigrationConn<'c> {
    conn: &'c mut PgConnection,
}

impl<'c> MigrationConn<'c> {
    pub fn new(conn: &'c mut PgConnection) -> Self {
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

/// Applies `migrations` with refinery in the search path the caller set
/// (`schema` names it in errors), up to `target` (all when `None`);
/// `grouped` sends them in one round trip.
pub async fn run(
    conn: &mut PgConnection,
    migrations: &[Migration],
    schema: &str,
    target: Option<i32>,
    grouped: bool,
) -> Result<Applied, TemplateError> {
    let runner = Runner::new(migrations)
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
        message: crate::base::error::chain(&e),
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
