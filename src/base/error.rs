//! The crate's error type. Library functions return [`Error`]; the HTTP layer
//! and the CLI map its variants to status codes and exit messages. Variants
//! are about what went wrong for the caller, not which library failed.

use crate::base::ident::{SchemaNameError, SlugError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid slug: {0}")]
    InvalidSlug(#[from] SlugError),
    #[error("invalid schema name: {0}")]
    InvalidSchemaName(#[from] SchemaNameError),
    #[error("invalid {field}: {message}")]
    Validation {
        field: &'static str,
        message: String,
    },
    #[error("organization {0:?} not found")]
    OrgNotFound(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("organization {slug:?} is {status}; {action} needs it to be {expected}")]
    InvalidState {
        slug: String,
        status: String,
        action: &'static str,
        expected: &'static str,
    },
    #[error("{0}")]
    Template(#[from] TemplateError),
    #[error("registry data is corrupt: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// An error shared by several waiters (e.g. coalesced cache loads).
    #[error("{0}")]
    Shared(std::sync::Arc<Error>),
    #[error("internal error: {0}")]
    Internal(String),
    /// The tenant already has this many transactions in flight and no place
    /// freed up within the queue time (see `fairness`).
    #[error("this organization has {max_in_flight} requests in flight already; retry shortly")]
    TenantBusy { max_in_flight: u32 },
    /// A placement operation on plain PostgreSQL (e.g. "moves need a Citus
    /// cluster").
    #[error("{0} (this database runs plain PostgreSQL)")]
    NotCitus(&'static str),
    #[error("{node} is not a node of this Citus cluster (nodes: {})", known.join(", "))]
    UnknownNode { node: String, known: Vec<String> },
    #[error("a move of organization {0:?} is already running")]
    MoveInProgress(String),
}

/// Maps database constraint violations to domain errors, as in
/// realworld-axum-sqlx's `on_constraint`.
pub trait ResultExt<T> {
    /// Turns a unique violation (SQLSTATE 23505) into `f()`.
    fn on_unique_violation(self, f: impl FnOnce() -> Error) -> Result<T, Error>;
}

impl<T, E: Into<Error>> ResultExt<T> for Result<T, E> {
    fn on_unique_violation(self, f: impl FnOnce() -> Error) -> Result<T, Error> {
        self.map_err(|e| match e.into() {
            Error::Database(sqlx::Error::Database(db)) if db.is_unique_violation() => f(),
            other => other,
        })
    }
}

/// The SQLSTATE of a database error, if it is one.
pub fn sqlstate(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// An error and its sources as one line, skipping sources whose text the
/// message already contains (thiserror's `{0}` formats often repeat them).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg
}

/// True for errors of the connection rather than of the statement: the
/// pool had no connection in time, the socket broke, or the server is
/// shutting down, restarting or refusing connections (SQLSTATE classes 08
/// and 57P0x). The statement did not run (or its transaction is lost), so
/// it is safe to report as 503 and, for reads, to retry on a fresh
/// connection.
pub fn is_connection_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            c.starts_with("08") || matches!(c.as_ref(), "57P01" | "57P02" | "57P03")
        }),
        _ => false,
    }
}

/// How long [`retry_dead_connections`] keeps trying once its quick
/// attempts are spent: faults can come in a row (a sweep of killed
/// backends, then a restart), each killing the connections the previous
/// retries took.
pub const DEAD_CONNECTION_RETRY_BUDGET: std::time::Duration = std::time::Duration::from_secs(3);

/// Runs `f` again while it fails because the connection it drew was dead
/// (a backend killed, the server restarted): such a connection is discarded
/// on failure, so each retry draws another one, and a new connection waits
/// out a restarting server. `attempts` runs follow at once (one fault kills
/// at most the pool's connections); further ones, 20 ms apart, until
/// [`DEAD_CONNECTION_RETRY_BUDGET`] has passed. Pool timeouts are not
/// retried (the pool already waited). Only for work that did nothing when
/// it failed this way (a read, or a BEGIN).
pub async fn retry_dead_connections<T, F, Fut>(attempts: usize, mut f: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let started = std::time::Instant::now();
    let mut attempt = 1;
    loop {
        match f().await {
            Err(Error::Database(e))
                if is_connection_error(&e)
                    && !matches!(e, sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed)
                    && (attempt < attempts || started.elapsed() < DEAD_CONNECTION_RETRY_BUDGET) =>
            {
                tracing::debug!(error = %e, attempt, "the connection was dead; retrying");
                if attempt >= attempts {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Why migrations (a tenant template, or the registry's own) could not
/// be loaded or applied.
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
