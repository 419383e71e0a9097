//! Superuser administration under `/v1/admin`: provisioning and lifecycle of
//! orgs, and API tokens. Calls the same library functions as the CLI, then
//! invalidates this process's router cache at once.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use uuid::Uuid;

use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath, ApiQuery, Superuser};
use super::resources::{page, Page};
use super::AppState;
use crate::base::ident::Slug;
use crate::registry::{self, IssuedToken, Organization, User};
use crate::tenants::fleet::OrgStats;
use crate::tenants::placement::PlacedOrg;
use crate::tenants::provision::{self, Created, NewOrg};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/admin/orgs", get(list_orgs).post(create_org))
        .route("/v1/admin/orgs/{slug}", get(get_org).delete(delete_org))
        .route("/v1/admin/orgs/{slug}/suspend", post(suspend_org))
        .route("/v1/admin/orgs/{slug}/resume", post(resume_org))
        .route("/v1/admin/orgs/{slug}/rename", post(rename_org))
        .route("/v1/admin/orgs/{slug}/move", post(move_org))
        .route("/v1/admin/orgs/{slug}/clone", post(clone_org))
        .route("/v1/admin/orgs/{slug}/tokens", post(create_token))
        .route("/v1/admin/tokens/{id}", delete(revoke_token))
        .route("/v1/admin/stats", get(stats))
}

/// `orgs` with their nodes (see `placement::placed`).
async fn with_nodes(app: &AppState, orgs: Vec<Organization>) -> Result<Vec<PlacedOrg>, ApiError> {
    let mut conn = app
        .tenancy
        .admin_pool()
        .acquire()
        .await
        .map_err(crate::Error::from)?;
    Ok(crate::tenants::placement::placed(&mut conn, orgs).await?)
}

/// Slugs in admin paths: invalid ones are simply not found.
fn path_slug(raw: &str) -> Result<Slug, ApiError> {
    Slug::parse(raw).map_err(|_| ApiError::not_found(format!("organization {raw:?} not found")))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOrg {
    pub slug: String,
    pub name: String,
    pub owner_email: Option<String>,
}

#[utoipa::path(post, path = "/v1/admin/orgs", tag = "admin", request_body = CreateOrg,
    responses((status = 201, body = Created), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_org(
    State(app): State<AppState>,
    _: Superuser,
    ApiJson(body): ApiJson<CreateOrg>,
) -> Result<impl IntoResponse, ApiError> {
    let new = NewOrg::parse(&body.slug, &body.name, body.owner_email.as_deref())?;
    let created = app.tenancy.orgs().create(&new).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct OrgPageQuery {
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

pub const DEFAULT_ORG_PAGE: i64 = 100;
pub const MAX_ORG_PAGE: i64 = 1000;

/// Organizations in slug order, a page at a time.
#[utoipa::path(get, path = "/v1/admin/orgs", tag = "admin", params(OrgPageQuery),
    responses((status = 200, body = Page<PlacedOrg>), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_orgs(
    State(app): State<AppState>,
    _: Superuser,
    ApiQuery(q): ApiQuery<OrgPageQuery>,
) -> Result<Json<Page<PlacedOrg>>, ApiError> {
    let limit = q.limit.unwrap_or(DEFAULT_ORG_PAGE);
    if !(1..=MAX_ORG_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("limit must be between 1 and {MAX_ORG_PAGE}"),
        ));
    }
    let after = match q.cursor.as_deref() {
        // a cursor is a slug; anything else was not given out by us
        Some(c) => Some(
            Slug::parse(c)
                .map_err(|_| ApiError::bad_request("invalid_query", "cursor is not valid"))?,
        ),
        None => None,
    };
    let rows = registry::list_orgs_page(
        app.tenancy.admin_pool(),
        after.as_ref().map(Slug::as_str),
        limit + 1,
    )
    .await?;
    let rows = with_nodes(&app, rows).await?;
    Ok(Json(page(rows, limit, |o| o.organization.slug.to_string())))
}

#[utoipa::path(get, path = "/v1/admin/orgs/{slug}", tag = "admin", params(("slug" = String, Path)),
    responses((status = 200, body = PlacedOrg), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_org(
    State(app): State<AppState>,
    _: Superuser,
    ApiPath(slug): ApiPath<String>,
) -> Result<Json<PlacedOrg>, ApiError> {
    let slug = path_slug(&slug)?;
    let mut conn = app
        .tenancy
        .admin_pool()
        .acquire()
        .await
        .map_err(crate::Error::from)?;
    let org = registry::get_org(&mut conn, &slug).await?;
    let placed = crate::tenants::placement::placed(&mut conn, vec![org])
        .await?
        .pop();
    Ok(Json(placed.expect("one org in, one out")))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloneOrg {
    /// The new org's slug.
    pub new_slug: String,
    /// The new org's name (default: the source's).
    pub name: Option<String>,
}

/// Copies an org's data into a new org (a consistent snapshot of the
/// source, which keeps serving; streamed inside the server). The copy's
/// users and tokens are its own: none are copied.
#[utoipa::path(post, path = "/v1/admin/orgs/{slug}/clone", tag = "admin", params(("slug" = String, Path)),
    request_body = CloneOrg,
    responses((status = 201, body = Created), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "the new slug is taken", body = ErrorBody),
        (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn clone_org(
    State(app): State<AppState>,
    _: Superuser,
    ApiPath(slug): ApiPath<String>,
    ApiJson(body): ApiJson<CloneOrg>,
) -> Result<impl IntoResponse, ApiError> {
    let slug = path_slug(&slug)?;
    let new_slug = Slug::parse(&body.new_slug)
        .map_err(|e| ApiError::invalid_field("new_slug", e.to_string()))?;
    let cloned = app
        .tenancy
        .orgs()
        .clone_org(&slug, &new_slug, body.name.as_deref())
        .await?;
    Ok((StatusCode::CREATED, Json(cloned.created)))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MoveOrg {
    /// The Citus worker to move the org's schema to, `host:port` as in
    /// `tenantry nodes`.
    pub to: String,
}

/// Moves an org's schema to another Citus worker (`citus_schema_move`,
/// `block_writes`): reads go on meanwhile, writes wait for the copy (a
/// write waiting longer than the lock timeout gets 503 `tenant_busy`).
/// Answers when the move is done.
#[utoipa::path(post, path = "/v1/admin/orgs/{slug}/move", tag = "admin", params(("slug" = String, Path)),
    request_body = MoveOrg,
    responses((status = 200, body = crate::tenants::placement::Moved), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "plain PostgreSQL (`citus_required`) or a move of this org is running (`move_in_progress`)", body = ErrorBody),
        (status = 422, description = "`to` is not host:port or not a node of the cluster", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn move_org(
    State(app): State<AppState>,
    _: Superuser,
    ApiPath(slug): ApiPath<String>,
    ApiJson(body): ApiJson<MoveOrg>,
) -> Result<Json<crate::tenants::placement::Moved>, ApiError> {
    let slug = path_slug(&slug)?;
    Ok(Json(
        app.tenancy.orgs().move_to(&slug, &body.to, |_| {}).await?,
    ))
}

#[utoipa::path(post, path = "/v1/admin/orgs/{slug}/suspend", tag = "admin", params(("slug" = String, Path)),
    responses((status = 200, body = Organization), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "not active", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn suspend_org(
    State(app): State<AppState>,
    _: Superuser,
    ApiPath(slug): ApiPath<String>,
) -> Result<Json<Organization>, ApiError> {
    let slug = path_slug(&slug)?;
    Ok(Json(app.tenancy.orgs().suspend(&slug).await?))
}

#[utoipa::path(post, path = "/v1/admin/orgs/{slug}/resume", tag = "admin", params(("slug" = String, Path)),
    responses((status = 200, body = Organization), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "not suspended", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn resume_org(
    State(app): State<AppState>,
    _: Superuser,
    ApiPath(slug): ApiPath<String>,
) -> Result<Json<Organization>, ApiError> {
    let slug = path_slug(&slug)?;
    Ok(Json(app.tenancy.orgs().resume(&slug).await?))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenameOrg {
    pub new_slug: String,
}

#[utoipa::path(post, path = "/v1/admin/orgs/{slug}/rename", tag = "admin", params(("slug" = String, Path)),
    request_body = RenameOrg,
    responses((status = 200, body = Organization), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn rename_org(
    State(app): State<AppState>,
    _: Superuser,
    ApiPath(slug): ApiPath<String>,
    ApiJson(body): ApiJson<RenameOrg>,
) -> Result<Json<Organization>, ApiError> {
    let slug = path_slug(&slug)?;
    let new_slug = Slug::parse(&body.new_slug)
        .map_err(|e| ApiError::invalid_field("new_slug", e.to_string()))?;
    Ok(Json(app.tenancy.orgs().rename(&slug, &new_slug).await?))
}

#[utoipa::path(delete, path = "/v1/admin/orgs/{slug}", tag = "admin", params(("slug" = String, Path)),
    responses((status = 204, description = "deleted with its schema"), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_org(
    State(app): State<AppState>,
    _: Superuser,
    ApiPath(slug): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let slug = path_slug(&slug)?;
    app.tenancy.orgs().delete(&slug).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// The user the token acts for; created in the org if new.
    pub email: String,
    /// A label for the token.
    pub name: Option<String>,
    /// Lifetime, e.g. `90d`, `12h`, `30m`, `3600s` (1 minute to 10 years);
    /// no expiry when absent.
    pub expires_in: Option<String>,
}

#[utoipa::path(post, path = "/v1/admin/orgs/{slug}/tokens", tag = "admin", params(("slug" = String, Path)),
    request_body = CreateToken,
    responses((status = 201, description = "the token; its secret is shown this once", body = UserToken),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_token(
    State(app): State<AppState>,
    _: Superuser,
    ApiPath(slug): ApiPath<String>,
    ApiJson(body): ApiJson<CreateToken>,
) -> Result<impl IntoResponse, ApiError> {
    let slug = path_slug(&slug)?;
    let expires_in = body
        .expires_in
        .as_deref()
        .map(provision::parse_lifetime)
        .transpose()?;
    let (user, token) = app
        .tenancy
        .orgs()
        .issue_org_token(&slug, &body.email, body.name.as_deref(), expires_in)
        .await?;
    Ok((StatusCode::CREATED, Json(UserToken { user, token })))
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct UserToken {
    pub user: User,
    pub token: IssuedToken,
}

#[utoipa::path(delete, path = "/v1/admin/tokens/{id}", tag = "admin", params(("id" = Uuid, Path)),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn revoke_token(
    State(app): State<AppState>,
    _: Superuser,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    if !app.tenancy.orgs().revoke_token(id).await? {
        return Err(ApiError::not_found(format!("no active token {id}")));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Per-org counts of tests, behaviors and statuses of every active org:
/// PostgreSQL's statistics (estimates, current to within about a second of
/// the last commit), from one catalog query; an org whose schema is missing
/// carries an `error` instead.
#[utoipa::path(get, path = "/v1/admin/stats", tag = "admin",
    responses((status = 200, body = Vec<OrgStats>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn stats(
    State(app): State<AppState>,
    _: Superuser,
) -> Result<Json<Vec<OrgStats>>, ApiError> {
    Ok(Json(
        crate::tenants::fleet::stats(app.tenancy.admin_pool()).await?,
    ))
}
