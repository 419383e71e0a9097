//! The API's error type: one enum, one stable JSON shape
//! `{"error": {"code", "message", "details"?}}`. Internal errors are logged
//! with their cause and answered with a generic 500; client input never
//! produces one.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::base::error::{sqlstate, Error};

/// The error body every endpoint returns (for the OpenAPI document).
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `unauthorized`, `not_found`,
    /// `org_suspended`, `validation_failed`, `conflict`, ...
    pub code: String,
    pub message: String,
    /// For validation errors: `{"fields": {"<field>": "<problem>"}}`.
    #[schema(value_type = Option<Object>)]
    pub details: Option<Value>,
    /// The request's id (its `x-request-id`, or one the server generated),
    /// also in the response's `x-request-id` header and the server's log.
    pub request_id: Option<String>,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Option<Box<Value>>,
    /// Seconds after which a retry may succeed (`Retry-After`).
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            details: None,
            retry_after: None,
        }
    }

    /// A 503 worth retrying after a second: the database is restarting,
    /// busy or out of connections; the request did nothing.
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            retry_after: Some(1),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
        }
    }

    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(Box::new(details));
        self
    }

    pub fn not_found(what: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", what)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// A 422 naming the offending field.
    pub fn invalid_field(field: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            format!("{field}: {message}"),
        )
        .with_details(json!({ "fields": { field: message } }))
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// For deletes: a foreign-key violation means the row is still in use.
    /// PostgreSQL 18 reports a key that `ON DELETE RESTRICT` protects as
    /// `restrict_violation` (23001); earlier versions as
    /// `foreign_key_violation` (23503).
    pub fn still_referenced(e: sqlx::Error) -> Self {
        if matches!(sqlstate(&e).as_deref(), Some("23503" | "23001")) {
            return ApiError::conflict("the row is still referenced by other rows");
        }
        ApiError::from(e)
    }

    fn internal() -> Self {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal server error",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        metrics::counter!(crate::telemetry::HTTP_ERRORS, "code" => self.code).increment(1);
        let mut body = json!({ "code": self.code, "message": self.message });
        if let Some(details) = self.details {
            body["details"] = *details;
        }
        let mut response = (self.status, axum::Json(json!({ "error": body }))).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        response
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidSlug(e) => ApiError::invalid_field("slug", e.to_string()),
            Error::InvalidSchemaName(e) => ApiError::invalid_field("schema", e.to_string()),
            Error::Validation { field, message } => ApiError::invalid_field(field, message),
            Error::OrgNotFound(slug) => {
                ApiError::not_found(format!("organization {slug:?} not found"))
            }
            Error::NotFound(what) => ApiError::not_found(what),
            Error::Conflict(m) => ApiError::conflict(m),
            e @ Error::InvalidState { .. } => {
                ApiError::new(StatusCode::CONFLICT, "invalid_state", e.to_string())
            }
            Error::Database(db) => ApiError::from(db),
            e @ Error::NotCitus(_) => {
                ApiError::new(StatusCode::CONFLICT, "citus_required", e.to_string())
            }
            e @ Error::UnknownNode { .. } => ApiError::invalid_field("to", e.to_string()),
            e @ Error::MoveInProgress(_) => {
                ApiError::new(StatusCode::CONFLICT, "move_in_progress", e.to_string())
            }
            e @ Error::TenantBusy { .. } => ApiError {
                retry_after: Some(1),
                ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "tenant_busy", e.to_string())
            },
            Error::Shared(shared) => match &*shared {
                Error::Database(db) if crate::base::error::is_connection_error(db) => {
                    ApiError::unavailable("unavailable", "the database is unavailable, retry later")
                }
                other => {
                    tracing::error!(error = %crate::base::error::chain(other), "internal error");
                    ApiError::internal()
                }
            },
            other => {
                tracing::error!(error = %crate::base::error::chain(&other), "internal error");
                ApiError::internal()
            }
        }
    }
}

/// The violated constraint's name: PostgreSQL's field, or (for errors a
/// Citus worker raised, relayed without that field) the name quoted after
/// `constraint` in the message.
fn constraint_of(db: &dyn sqlx::error::DatabaseError) -> &str {
    if let Some(name) = db.constraint() {
        return name;
    }
    db.message()
        .rsplit_once("constraint \"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map_or("", |(name, _)| name)
}

/// A constraint's name as the template declares it: Citus reports the
/// shard's copy, with `_<shard id>` appended (`tests_status_id_fkey_102008`).
fn logical_constraint(name: &str) -> &str {
    match name.rsplit_once('_') {
        Some((base, shard))
            if !shard.is_empty()
                && shard.bytes().all(|b| b.is_ascii_digit())
                && (base.ends_with("_fkey")
                    || base.ends_with("_key")
                    || base.ends_with("_pkey")
                    || base.ends_with("_check")) =>
        {
            base
        }
        _ => name,
    }
}

impl From<sqlx::Error> for ApiError {
    /// Maps constraint violations caused by client data to 4xx; anything
    /// else is internal.
    fn from(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &e {
            let constraint = logical_constraint(constraint_of(db.as_ref())).to_owned();
            match sqlstate(&e).as_deref() {
                Some("23505") => {
                    return ApiError::conflict(format!(
                        "a row with the same unique value exists ({constraint})"
                    ))
                    .with_details(json!({ "constraint": constraint }))
                }
                Some("23503") => {
                    // Inserting or updating a row that points nowhere: bad
                    // input on that column. (Deletes of referenced rows map
                    // to a conflict with `ApiError::still_referenced`.)
                    let column = constraint
                        .split_once('_')
                        .and_then(|(_, rest)| rest.strip_suffix("_fkey"))
                        .unwrap_or("reference");
                    return ApiError::invalid_field(column, "refers to a row that does not exist");
                }
                Some("23514") | Some("23502") => {
                    return ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "validation_failed",
                        format!("value violates a constraint ({constraint})"),
                    )
                    .with_details(json!({ "constraint": constraint }))
                }
                Some(code) if code.starts_with("22") => {
                    return ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "validation_failed",
                        "a value is out of range or malformed",
                    )
                }
                // Our SQL names only template tables; if they are missing, the
                // tenant's schema vanished or is broken. Never fall through.
                Some("42P01") | Some("3F000") => {
                    tracing::error!(error = %e, "tenant schema is missing or incomplete");
                    return ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "tenant_unavailable",
                        "this organization's data is unavailable; an operator has been alerted",
                    );
                }
                // statement_timeout
                Some("57014") => {
                    return ApiError::unavailable("timeout", "the database query took too long")
                }
                // lock_timeout: another transaction holds what this one
                // needs; the connection was given back instead of waiting
                Some("55P03") => {
                    return ApiError::unavailable(
                        "tenant_busy",
                        "this organization's data is locked by other work; retry shortly",
                    )
                }
                _ => {}
            }
        }
        if crate::base::error::is_connection_error(&e) {
            tracing::warn!(error = %crate::base::error::chain(&e), "database unavailable");
            return ApiError::unavailable(
                "unavailable",
                "the database is unavailable, retry later",
            );
        }
        tracing::error!(error = %crate::base::error::chain(&e), "database error");
        ApiError::internal()
    }
}

#[cfg(test)]
mod tests {
    use super::logical_constraint;

    #[test]
    fn shard_suffixes_of_citus_are_dropped_from_constraint_names() {
        assert_eq!(
            logical_constraint("tests_status_id_fkey_102008"),
            "tests_status_id_fkey"
        );
        assert_eq!(
            logical_constraint("statuses_name_key_102010"),
            "statuses_name_key"
        );
        assert_eq!(
            logical_constraint("tests_status_id_fkey"),
            "tests_status_id_fkey"
        );
        // a name that merely ends in digits is left alone
        assert_eq!(logical_constraint("limit_2"), "limit_2");
        assert_eq!(logical_constraint(""), "");
    }
}
