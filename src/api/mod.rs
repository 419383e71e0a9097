//! The HTTP API (axum): org-scoped CRUD under `/v1/orgs/{slug}`, superuser
//! administration under `/v1/admin`, health checks and the OpenAPI document.
//!
//! Tenant routes are built on [`TenantApi`], a state that holds the router
//! and the authenticator but not the pool, so their handlers cannot reach
//! the database except through a tenant transaction (invariant 5).

pub mod admin;
pub mod catalog;
pub mod error;
pub mod extract;
pub mod jobs;
pub mod openapi;
pub mod request_id;
pub mod resources;

use std::time::Duration;

use axum::extract::{DefaultBodyLimit, FromRef, State};
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tower_http::trace::TraceLayer;
use tracing::field::Empty;

use crate::serving::auth::Authenticator;
use crate::serving::router::TenantRouter;
use crate::tenancy::Tenancy;
use error::ApiError;

/// Largest accepted request body.
pub const BODY_LIMIT: usize = 256 * 1024;

/// Everything the admin routes may use.
#[derive(Clone)]
pub struct AppState {
    pub tenancy: Tenancy,
    /// A request still running after this gets 503 `timeout` (its work is
    /// cancelled, and its transaction rolled back).
    pub request_timeout: Duration,
    /// `GET /metrics` on the API's listener (off when metrics have a
    /// listener of their own).
    pub metrics_on_api: bool,
}

/// What tenant routes may use: no pool.
#[derive(Clone)]
pub struct TenantApi {
    pub router: TenantRouter,
    pub auth: Authenticator,
}

impl FromRef<AppState> for Authenticator {
    fn from_ref(s: &AppState) -> Self {
        s.tenancy.auth().clone()
    }
}

impl FromRef<TenantApi> for Authenticator {
    fn from_ref(s: &TenantApi) -> Self {
        s.auth.clone()
    }
}

impl FromRef<TenantApi> for TenantRouter {
    fn from_ref(s: &TenantApi) -> Self {
        s.router.clone()
    }
}

impl TenantApi {
    pub fn of(tenancy: &Tenancy) -> Self {
        TenantApi {
            router: tenancy.router().clone(),
            auth: tenancy.auth().clone(),
        }
    }
}

/// The whole application.
pub fn app(state: AppState) -> Router {
    app_with(state, Router::new())
}

/// The whole application with an app's own tenant `routes` beside
/// tenantry's, under the same request handling.
pub fn app_with(state: AppState, routes: Router<TenantApi>) -> Router {
    let request_timeout = state.request_timeout;
    let tenant_api = TenantApi::of(&state.tenancy);
    let mut tenant_routes = resources::router()
        .merge(jobs::router())
        .merge(catalog::org_router())
        .merge(routes);
    if tenant_api.router.replicas().is_some() {
        tenant_routes = tenant_routes.layer(axum::middleware::from_fn_with_state(
            tenant_api.router.clone(),
            extract::position_header,
        ));
    }
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi_json))
        .route("/metrics", get(metrics_text))
        .merge(admin::router())
        .merge(catalog::admin_router())
        .with_state(state)
        .merge(tenant_routes.with_state(tenant_api))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(count_request))
        .layer(axum::middleware::from_fn(
            move |req: Request<axum::body::Body>, next: axum::middleware::Next| async move {
                match tokio::time::timeout(request_timeout, next.run(req)).await {
                    Ok(response) => response,
                    Err(_) => ApiError::unavailable("timeout", "the request took too long")
                        .into_response(),
                }
            },
        ))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request<_>| {
                    let id = req
                        .headers()
                        .get(request_id::REQUEST_ID)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    tracing::info_span!(
                        "request",
                        id,
                        method = %req.method(),
                        path = %req.uri().path(),
                        org = Empty,
                        status = Empty,
                        latency_ms = Empty,
                    )
                })
                .on_request(())
                .on_response(|res: &Response, latency: Duration, span: &tracing::Span| {
                    span.record("status", res.status().as_u16());
                    span.record("latency_ms", latency.as_secs_f64() * 1000.0);
                    tracing::info!("request done");
                })
                .on_failure(()),
        )
        // outermost: the span above records the id it sets
        .layer(axum::middleware::from_fn(request_id::layer))
}

/// Counts the request and its latency, labelled by route template.
async fn count_request(req: Request<axum::body::Body>, next: axum::middleware::Next) -> Response {
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let template = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .cloned();
    let response = next.run(req).await;
    let status = match response.status().as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    crate::telemetry::http_request(
        method.as_str(),
        template.as_ref().map(|t| t.as_str()),
        status,
        started.elapsed().as_secs_f64(),
    );
    response
}

/// Prometheus metrics (text format); 404 here when they are served on a
/// listener of their own (`--metrics-bind`).
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain"),
        (status = 404, body = error::ErrorBody)))]
async fn metrics_text(State(app): State<AppState>) -> Response {
    if !app.metrics_on_api {
        return ApiError::not_found("route not found").into_response();
    }
    metrics_response(&app.tenancy)
}

/// The body and content type of a metrics scrape.
pub fn metrics_response(tenancy: &Tenancy) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        tenancy.render_metrics(),
    )
        .into_response()
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "up")))]
async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// The database is reachable.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, description = "ready"), (status = 503, body = error::ErrorBody)))]
async fn readyz(State(app): State<AppState>) -> Response {
    // the simple protocol: no prepared statement, whatever the pooler
    match sqlx::raw_sql("SELECT 1")
        .execute(app.tenancy.router().control_pool())
        .await
    {
        Ok(_) => Json(serde_json::json!({ "status": "ready" })).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "database unreachable",
            )
            .into_response()
        }
    }
}

async fn openapi_json() -> Json<&'static utoipa::openapi::OpenApi> {
    static DOC: std::sync::LazyLock<utoipa::openapi::OpenApi> =
        std::sync::LazyLock::new(<openapi::ApiDoc as utoipa::OpenApi>::openapi);
    Json(&DOC)
}

async fn not_found() -> ApiError {
    ApiError::not_found("route not found")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}
