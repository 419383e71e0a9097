//! Background jobs of your own kind, in an app that embeds tenantry.
//!
//!     DATABASE_URL=postgres://... cargo run --example jobs
//!     curl -X POST -H "Authorization: Bearer tny_..." localhost:3000/v1/orgs/acme/stale-tests/sweep
//!     curl -H "Authorization: Bearer tny_..." localhost:3000/v1/orgs/acme/jobs/<id>
//!
//! The route enqueues a job in the org's transaction (it exists only if
//! that transaction commits); a worker of this process runs it in the same
//! org's transaction, as the org's role, with its schema as the search
//! path, and its writes commit together with its success. Jobs are listed,
//! followed, cancelled and retried through tenantry's `/v1/orgs/{slug}/jobs`
//! routes and `tenantry jobs`.

use axum::http::StatusCode;
use axum::routing::post;
use axum::Json;
use tenantry::api::error::ApiError;
use tenantry::api::extract::OrgScope;
use tenantry::jobs::{JobError, JobFuture, JobRun, NewJob};
use tenantry::Tenantry;

/// The kind's handler: moves the org's tests not updated for `days` days to
/// the status `status_id`, in one transaction with the job's success.
fn sweep_stale_tests(run: &mut JobRun) -> JobFuture<'_> {
    Box::pin(async move {
        let days = run.payload()["days"]
            .as_i64()
            .ok_or_else(|| JobError::permanent("payload.days must be a number"))?;
        let status: uuid::Uuid = run.payload()["status_id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| JobError::permanent("payload.status_id must be a UUID"))?;
        let tx = run.tx().await?;
        tx.query(
            "UPDATE tests SET status_id = $1, updated_at = now() \
             WHERE updated_at < now() - make_interval(days => $2) AND status_id <> $1",
        )
        .bind(status)
        .bind(days as i32)
        .execute()
        .await?;
        Ok(())
    })
}

#[derive(serde::Deserialize)]
struct Sweep {
    days: i64,
    status_id: uuid::Uuid,
}

/// `POST /v1/orgs/{slug}/stale-tests/sweep`: queues the sweep (at most one
/// queued or running per org, by its unique key) and answers 202.
async fn queue_sweep(
    org: OrgScope,
    Json(body): Json<Sweep>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let mut tx = org.begin().await?;
    let job = NewJob::new(
        "stale_tests.sweep",
        serde_json::json!({"days": body.days, "status_id": body.status_id}),
    )
    .unique_key("stale_tests.sweep");
    let id = tx.enqueue(job).await?;
    tx.commit().await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "job": id, "duplicate": id.is_none() })),
    ))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")?;
    let tenantry = Tenantry::builder(url)
        .workers(2)
        .job_kind("stale_tests.sweep", sweep_stale_tests)?
        .await?;
    let app = tenantry
        .app(axum::Router::new().route("/v1/orgs/{slug}/stale-tests/sweep", post(queue_sweep)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(tenantry::server::shutdown_signal())
        .await?;
    // running jobs get the shutdown timeout to finish; the rest go back
    tenantry.shutdown().await;
    Ok(())
}
