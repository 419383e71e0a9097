//! The crate's error type. Library functions return [`Error`]; the HTTP layer
//! and the CLI map its variants to status codes and exit messages. Variants
//! are about what went wrong for the caller, not which library failed.

use crate::ident::{SchemaNameError, SlugError};
use crate::template::TemplateError;

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
