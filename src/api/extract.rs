//! Extractors: `Auth` (bearer token -> principal), `Superuser`, `OrgScope`
//! (the org in the path, authorized for the principal, with access to its
//! tenant transactions) and JSON/path/query wrappers whose rejections use
//! the API's error shape.

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRef, FromRequest, FromRequestParts, RawPathParams, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::base::error::Error;
use crate::base::ident::Slug;
use crate::base::lsn::Lsn;
use crate::registry::{OrgStatus, Principal};
use crate::serving::auth::Authenticator;
use crate::serving::router::{Tenant, TenantRouter, TenantTx};

/// The authenticated caller. Missing, malformed, unknown or revoked token: 401.
#[derive(Debug, Clone)]
pub struct Auth(pub Principal);

impl<S> FromRequestParts<S> for Auth
where
    S: Send + Sync,
    Authenticator: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        if let Some(Auth(p)) = parts.extensions.get::<Auth>() {
            return Ok(Auth(p.clone()));
        }
        let header = parts.headers.get(header::AUTHORIZATION).ok_or_else(|| {
            ApiError::unauthorized("missing Authorization: Bearer <token> header")
        })?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                ApiError::unauthorized("Authorization header must be 'Bearer <token>'")
            })?;
        let principal = Authenticator::from_ref(state)
            .authenticate(token)
            .await?
            .ok_or_else(|| ApiError::unauthorized("invalid or revoked token"))?;
        parts.extensions.insert(Auth(principal.clone()));
        Ok(Auth(principal))
    }
}

/// An authenticated platform superuser; anyone else gets 403.
#[derive(Debug, Clone)]
pub struct Superuser(pub Principal);

impl<S> FromRequestParts<S> for Superuser
where
    S: Send + Sync,
    Authenticator: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Auth(p) = Auth::from_request_parts(parts, state).await?;
        if !p.is_superuser {
            return Err(ApiError::forbidden("this endpoint needs a superuser token"));
        }
        Ok(Superuser(p))
    }
}

/// The organization named by `{slug}` in the path, resolved through the
/// router and authorized for the caller. A slug that does not exist, is not
/// valid, or belongs to another org (for a non-superuser) is 404 alike, so
/// tokens cannot probe which orgs exist. A suspended org is 403
/// `org_suspended`.
///
/// A `Tenantry-Position` header (a WAL position from an earlier response,
/// possibly another server's) makes its reads see every write committed
/// before that position; a malformed one is 400 `invalid_position`.
pub struct OrgScope {
    pub tenant: Arc<Tenant>,
    pub principal: Principal,
    router: TenantRouter,
    read_after: Option<Lsn>,
}

/// The header carrying a WAL position, both ways: on responses of orgs'
/// routes (with replicas), the position that includes every write of the
/// org through that server; on requests, a position their reads must see.
pub const POSITION: &str = "tenantry-position";

/// Set on the request by [`position_header`], filled by [`OrgScope`]: the
/// org the response's position is for.
#[derive(Clone, Default)]
struct PositionSlot(Arc<std::sync::OnceLock<uuid::Uuid>>);

/// Middleware of the orgs' routes on a server with replicas: the response
/// carries `Tenantry-Position`, the org's position after the request (at
/// least the one the request sent), for a client to send to another
/// server and read its writes there.
pub async fn position_header(
    axum::extract::State(router): axum::extract::State<TenantRouter>,
    mut req: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let slot = PositionSlot::default();
    req.extensions_mut().insert(slot.clone());
    let sent = req
        .headers()
        .get(POSITION)
        .and_then(|v| Lsn::parse(v.to_str().ok()?).ok());
    let mut response = next.run(req).await;
    let position = slot
        .0
        .get()
        .and_then(|org| router.position_of(org))
        .map(|known| known.max(sent.unwrap_or_default()));
    if let Some(position) = position {
        if let Ok(value) = header::HeaderValue::from_str(&position.to_string()) {
            response.headers_mut().insert(POSITION, value);
        }
    }
    response
}

fn read_after(parts: &Parts) -> Result<Option<Lsn>, ApiError> {
    let Some(value) = parts.headers.get(POSITION) else {
        return Ok(None);
    };
    let bad = |e: String| {
        ApiError::bad_request(
            "invalid_position",
            format!("the {POSITION} header is not a WAL position: {e}"),
        )
    };
    let text = value.to_str().map_err(|e| bad(e.to_string()))?;
    Lsn::parse(text).map(Some).map_err(|e| bad(e.to_string()))
}

impl OrgScope {
    /// Opens a transaction in this org's schema.
    pub async fn begin(&self) -> Result<TenantTx, ApiError> {
        Ok(self.router.begin(&self.tenant).await?)
    }

    /// Runs read-only work in this org: each statement in a read-only
    /// transaction of its own, one round trip each, retried on another
    /// connection if its connection dies (see [`TenantRouter::read`]).
    /// `f` is an async closure: `org.read(async |tx| Ok(tx.query_as(..).fetch_all().await?))`.
    pub async fn read<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        F: AsyncFn(&mut TenantTx) -> Result<T, Error>,
    {
        Ok(self
            .router
            .read_after(&self.tenant, self.read_after, f)
            .await?)
    }

    /// The user on whose behalf rows are created and updated.
    pub fn user_id(&self) -> uuid::Uuid {
        self.principal.user_id
    }
}

impl<S> FromRequestParts<S> for OrgScope
where
    S: Send + Sync,
    Authenticator: FromRef<S>,
    TenantRouter: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Auth(principal) = Auth::from_request_parts(parts, state).await?;
        let read_after = read_after(parts)?;
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::not_found("route not found"))?;
        let raw = params
            .iter()
            .find(|(k, _)| *k == "slug")
            .map(|(_, v)| v.to_owned())
            .ok_or_else(|| ApiError::not_found("route not found"))?;
        tracing::Span::current().record("org", raw.as_str());
        let hidden = || ApiError::not_found(format!("organization {raw:?} not found"));
        let slug = Slug::parse(&raw).map_err(|_| hidden())?;
        let router = TenantRouter::from_ref(state);
        // authorized before resolved: another org's slug costs nothing
        let tenant = router
            .resolve_for(&principal, &slug)
            .await?
            .ok_or_else(hidden)?;
        match tenant.status {
            OrgStatus::Active => {}
            OrgStatus::Suspended => {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "org_suspended",
                    format!("organization {raw:?} is suspended"),
                ))
            }
            OrgStatus::Provisioning | OrgStatus::Deleting => return Err(hidden()),
        }
        if let Some(slot) = parts.extensions.get::<PositionSlot>() {
            let _ = slot.0.set(tenant.id);
        }
        Ok(OrgScope {
            tenant,
            principal,
            router,
            read_after,
        })
    }
}

/// `axum::Json` with API-shaped rejections: 415 without a JSON content type,
/// 400 for malformed JSON, 422 for JSON of the wrong shape, 413 when too big.
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    let status = r.status();
    let text = r.body_text();
    match r {
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "expected a request body with Content-Type: application/json",
        ),
        JsonRejection::JsonSyntaxError(_) => ApiError::bad_request("malformed_json", text),
        JsonRejection::JsonDataError(_) => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed", text)
        }
        _ if status == StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            status,
            "payload_too_large",
            "request body is larger than the limit",
        ),
        _ => ApiError::new(status, "bad_request", text),
    }
}

/// `axum::extract::Path` with a 400 `invalid_path` rejection (e.g. an id
/// that is not a UUID).
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|r: PathRejection| ApiError::bad_request("invalid_path", r.body_text()))
    }
}

/// `axum::extract::Query` with a 400 `invalid_query` rejection.
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|r: QueryRejection| ApiError::bad_request("invalid_query", r.body_text()))
    }
}
