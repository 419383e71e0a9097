//! An org's background jobs over HTTP: the bulk import of tests (`POST
//! /v1/orgs/{slug}/tests/import`, answered 202 with the job) and the job
//! resource (list, one, cancel, retry). The import's handler is the job
//! kind [`IMPORT_TESTS`], registered by [`register_kinds`] in every worker
//! this crate starts.

use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::error::{ApiError, ErrorBody};
use super::extract::{ApiPath, ApiQuery, OrgScope};
use super::resources::{check_test, NewTestCase, Page};
use super::TenantApi;
use crate::jobs::manage::{self, Job, JobState};
use crate::jobs::{JobError, JobKinds, JobRun, NewJob};

/// The job kind of a bulk import of tests.
pub const IMPORT_TESTS: &str = "tests.import";
/// Most lines in one import.
pub const IMPORT_MAX_LINES: usize = 200_000;
/// Largest import body.
pub const IMPORT_BODY_LIMIT: usize = 48 * 1024 * 1024;
/// Lines reported when an import is refused.
const ERRORS_SHOWN: usize = 20;
/// Rows inserted per transaction (and progress checkpoint).
const IMPORT_BATCH: usize = 2_000;

pub fn router() -> Router<TenantApi> {
    Router::new()
        .route(
            "/v1/orgs/{slug}/tests/import",
            post(import_tests).layer(DefaultBodyLimit::max(IMPORT_BODY_LIMIT)),
        )
        .route("/v1/orgs/{slug}/jobs", get(list_jobs))
        .route("/v1/orgs/{slug}/jobs/{id}", get(get_job))
        .route("/v1/orgs/{slug}/jobs/{id}/cancel", post(cancel_job))
        .route("/v1/orgs/{slug}/jobs/{id}/retry", post(retry_job))
}

/// The kinds the HTTP API enqueues, for a worker to run.
pub fn register_kinds(kinds: &mut JobKinds) {
    kinds
        .register(IMPORT_TESTS, import_handler)
        .expect("a valid kind");
}

/// Every kind this crate's API needs, registered.
pub fn default_kinds() -> JobKinds {
    let mut kinds = JobKinds::new();
    register_kinds(&mut kinds);
    kinds
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct JobQuery {
    /// Page size, 1 to 200 (default 50).
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Only jobs in this state.
    pub state: Option<JobState>,
}

fn job_not_found(id: Uuid) -> ApiError {
    ApiError::not_found(format!("job {id} not found"))
}

#[utoipa::path(get, path = "/v1/orgs/{slug}/jobs", tag = "jobs",
    params(("slug" = String, Path, description = "Organization slug"), JobQuery),
    responses((status = 200, body = Page<Job>), (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_jobs(
    org: OrgScope,
    ApiQuery(q): ApiQuery<JobQuery>,
) -> Result<axum::Json<Page<Job>>, ApiError> {
    let (limit, cursor) = super::resources::PageQuery {
        limit: q.limit,
        cursor: q.cursor,
    }
    .parse()?;
    let state = q.state;
    let rows = org
        .read(async move |tx| manage::list(tx, state, cursor, limit + 1).await)
        .await?;
    Ok(axum::Json(super::resources::page(rows, limit, |j| j.id)))
}

#[utoipa::path(get, path = "/v1/orgs/{slug}/jobs/{id}", tag = "jobs",
    params(("slug" = String, Path, description = "Organization slug"), ("id" = Uuid, Path)),
    responses((status = 200, body = Job)),
    security(("bearer" = [])))]
pub async fn get_job(
    org: OrgScope,
    ApiPath((_, id)): ApiPath<(String, Uuid)>,
) -> Result<axum::Json<Job>, ApiError> {
    let job = org.read(async move |tx| manage::get(tx, id).await).await?;
    job.map(axum::Json).ok_or_else(|| job_not_found(id))
}

#[utoipa::path(post, path = "/v1/orgs/{slug}/jobs/{id}/cancel", tag = "jobs",
    params(("slug" = String, Path, description = "Organization slug"), ("id" = Uuid, Path)),
    responses((status = 200, body = Job, description = "cancelled: a running job's work rolls back at its next checkpoint or its end"),
        (status = 409, body = ErrorBody, description = "the job has finished")),
    security(("bearer" = [])))]
pub async fn cancel_job(
    org: OrgScope,
    ApiPath((_, id)): ApiPath<(String, Uuid)>,
) -> Result<axum::Json<Job>, ApiError> {
    let mut tx = org.begin().await?;
    let job = manage::cancel(&mut tx, id).await?;
    tx.commit().await?;
    Ok(axum::Json(job))
}

#[utoipa::path(post, path = "/v1/orgs/{slug}/jobs/{id}/retry", tag = "jobs",
    params(("slug" = String, Path, description = "Organization slug"), ("id" = Uuid, Path)),
    responses((status = 200, body = Job, description = "queued again with all its attempts"),
        (status = 409, body = ErrorBody, description = "the job is not dead or cancelled, or another unfinished job has its unique key")),
    security(("bearer" = [])))]
pub async fn retry_job(
    org: OrgScope,
    ApiPath((_, id)): ApiPath<(String, Uuid)>,
) -> Result<axum::Json<Job>, ApiError> {
    let mut tx = org.begin().await?;
    let job = manage::retry(&mut tx, id).await?;
    tx.commit().await?;
    Ok(axum::Json(job))
}

/// The media types of JSON lines an import accepts.
const JSON_LINES: [&str; 4] = [
    "application/x-ndjson",
    "application/jsonl",
    "application/json-lines",
    "application/jsonlines",
];

/// What an import job records as it goes.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ImportProgress {
    /// Lines of the import.
    pub total: u64,
    /// Lines handled so far.
    pub done: u64,
    /// Tests created.
    pub inserted: u64,
    /// Lines whose behavior or status does not exist (nothing created).
    pub skipped: u64,
}

#[derive(Serialize, Deserialize)]
struct ImportPayload {
    by: Uuid,
    rows: Vec<serde_json::Value>,
}

/// Reads the body's lines, each a test as `POST /v1/orgs/{slug}/tests`
/// takes it; every line is checked before anything is queued.
fn parse_import(body: &[u8]) -> Result<Vec<serde_json::Value>, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::bad_request("malformed_json", "the body is not UTF-8"))?;
    let mut rows = vec![];
    let mut errors = vec![];
    let mut error_count = 0usize;
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let checked = serde_json::from_str::<NewTestCase>(line)
            .map_err(|e| e.to_string())
            .and_then(|t| {
                check_test(Some(&t.prompt), Some(&t.expected_outcome))
                    .map_err(|e| e.message.clone())?;
                Ok(t)
            });
        match checked {
            Ok(t) => rows.push(serde_json::json!({
                "prompt": t.prompt,
                "expected_outcome": t.expected_outcome,
                "behavior_id": t.behavior_id,
                "status_id": t.status_id,
            })),
            Err(message) => {
                error_count += 1;
                if errors.len() < ERRORS_SHOWN {
                    errors.push(serde_json::json!({"line": n + 1, "message": message}));
                }
            }
        }
        if rows.len() + error_count > IMPORT_MAX_LINES {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("an import has at most {IMPORT_MAX_LINES} lines"),
            ));
        }
    }
    if error_count > 0 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_lines",
            format!("{error_count} line(s) are not valid tests; nothing was imported"),
        )
        .with_details(serde_json::json!({ "lines": errors, "count": error_count })));
    }
    if rows.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "the import has no lines",
        ));
    }
    Ok(rows)
}

#[utoipa::path(post, path = "/v1/orgs/{slug}/tests/import", tag = "tests",
    request_body(content = String, content_type = "application/x-ndjson",
        description = "One test per line, each as `POST /v1/orgs/{slug}/tests` takes it; at most 200,000 lines and 48 MiB. Every line is checked first: one bad line refuses the whole import."),
    params(("slug" = String, Path, description = "Organization slug")),
    responses((status = 202, body = Job, description = "queued; follow it at `Location` (its `progress` is an ImportProgress)"),
        (status = 400, body = ErrorBody, description = "the body is not UTF-8"),
        (status = 413, body = ErrorBody, description = "more than 200,000 lines or 48 MiB"),
        (status = 415, body = ErrorBody, description = "the body is not JSON lines (application/x-ndjson)"),
        (status = 422, body = ErrorBody, description = "lines that are not valid tests (`invalid_lines`, with the first 20 in `details`), or no line")),
    security(("bearer" = [])))]
pub async fn import_tests(
    org: OrgScope,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let media = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase());
    if !media.as_deref().is_some_and(|m| JSON_LINES.contains(&m)) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "expected a body of JSON lines with Content-Type: application/x-ndjson",
        ));
    }
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("an import body is at most {} MiB", IMPORT_BODY_LIMIT >> 20),
            )
        } else {
            ApiError::new(r.status(), "bad_request", r.body_text())
        }
    })?;
    let rows = parse_import(&body)?;
    let payload = serde_json::to_value(ImportPayload {
        by: org.user_id(),
        rows,
    })
    .map_err(|e| ApiError::from(crate::Error::Internal(e.to_string())))?;
    let mut tx = org.begin().await?;
    let id = tx
        .enqueue(NewJob::new(IMPORT_TESTS, payload).max_attempts(10))
        .await?
        .ok_or_else(|| {
            ApiError::from(crate::Error::Internal("an import has no unique key".into()))
        })?;
    let job = manage::get(&mut tx, id)
        .await?
        .ok_or_else(|| job_not_found(id))?;
    tx.commit().await?;
    let location = format!("/v1/orgs/{}/jobs/{id}", org.tenant.slug);
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        axum::Json(job),
    ))
}

// Ids are derived from the job and the line, so a batch run twice (an
// attempt after a crash) creates nothing twice; lines whose behavior or
// status is missing are counted, not failed.
const IMPORT_ROWS: &str = "WITH rows AS ( \
       SELECT md5($1::uuid::text || ':' || ($2::bigint + e.ord))::uuid AS id, \
              e.r->>'prompt' AS prompt, e.r->>'expected_outcome' AS expected_outcome, \
              (e.r->>'behavior_id')::uuid AS behavior_id, (e.r->>'status_id')::uuid AS status_id \
       FROM jsonb_array_elements($3::jsonb) WITH ORDINALITY AS e(r, ord)), \
     known AS ( \
       SELECT * FROM rows WHERE EXISTS (SELECT 1 FROM behaviors b WHERE b.id = rows.behavior_id) \
         AND EXISTS (SELECT 1 FROM statuses s WHERE s.id = rows.status_id)), \
     inserted AS ( \
       INSERT INTO tests (id, prompt, expected_outcome, behavior_id, status_id, created_by, updated_by) \
       SELECT id, prompt, expected_outcome, behavior_id, status_id, $4, $4 FROM known \
       ON CONFLICT (id) DO NOTHING RETURNING 1) \
     SELECT (SELECT count(*) FROM known), (SELECT count(*) FROM inserted)";

fn import_handler(run: &mut JobRun) -> crate::jobs::JobFuture<'_> {
    Box::pin(run_import(run))
}

async fn run_import(run: &mut JobRun) -> Result<(), JobError> {
    let payload: ImportPayload = serde_json::from_value(run.payload().clone())
        .map_err(|e| JobError::permanent(format!("not an import: {e}")))?;
    let mut progress: ImportProgress = run
        .progress()
        .and_then(|p| serde_json::from_value(p.clone()).ok())
        .unwrap_or_default();
    progress.total = payload.rows.len() as u64;
    let id = run.id();
    while (progress.done as usize) < payload.rows.len() {
        let start = progress.done as usize;
        let batch = &payload.rows[start..(start + IMPORT_BATCH).min(payload.rows.len())];
        let text = serde_json::Value::from(batch.to_vec()).to_string();
        let tx = run.tx().await?;
        let (known, inserted): (i64, i64) = tx
            .query_as(IMPORT_ROWS)
            .bind(id)
            .bind(start as i64)
            .bind(text)
            .bind(payload.by)
            .fetch_one()
            .await?;
        progress.done += batch.len() as u64;
        progress.inserted += inserted as u64;
        progress.skipped += batch.len() as u64 - known as u64;
        let value = serde_json::to_value(&progress).expect("progress serializes");
        run.checkpoint(value).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_lines_are_all_checked_before_anything_is_queued() {
        let ok = r#"{"prompt":"p","expected_outcome":"e","behavior_id":"00000000-0000-0000-0000-000000000001","status_id":"00000000-0000-0000-0000-000000000002"}"#;
        assert_eq!(
            parse_import(format!("{ok}\n\n{ok}\n").as_bytes())
                .unwrap()
                .len(),
            2
        );
        let bad = format!("{ok}\nnot json\n{}\n", ok.replace("\"p\"", "\"\""));
        let e = parse_import(bad.as_bytes()).unwrap_err();
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(parse_import(b"\n \n").is_err());
        assert_eq!(
            parse_import(b"\xff").unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }
}
