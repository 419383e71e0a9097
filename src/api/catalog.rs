//! The catalog of presets (`tenants::catalog`): superusers change it under
//! `/v1/admin/catalog/{kind}`; every org reads it and adopts presets into
//! its own statuses and behaviors under `/v1/orgs/{slug}/catalog/{kind}`.
//! The org routes read the shared tables in the org's own tenant
//! transaction, by their unqualified names: the shared schema is on the
//! search path, after the org's, and its role may only read it.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use serde::Deserialize;
use uuid::Uuid;

use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath, ApiQuery, OrgScope, Superuser};
use super::resources::{check_named, name_taken, page, present, Named, Page, PageQuery};
use super::{AppState, TenantApi};
use crate::tenants::catalog::{self, CatalogKind, Preset, PresetChange};

pub fn admin_router() -> Router<AppState> {
    Router::new()
        .route("/v1/admin/catalog/{kind}", get(admin_list).post(create))
        .route(
            "/v1/admin/catalog/{kind}/{id}",
            patch(update).delete(delete),
        )
}

pub fn org_router() -> Router<TenantApi> {
    Router::new()
        .route("/v1/orgs/{slug}/catalog/{kind}", get(org_list))
        .route("/v1/orgs/{slug}/catalog/{kind}/{id}/adopt", post(adopt))
}

/// Kinds in paths: any other is simply not found.
fn kind(raw: &str) -> Result<CatalogKind, ApiError> {
    CatalogKind::parse(raw).ok_or_else(|| ApiError::not_found("route not found"))
}

fn not_found(kind: CatalogKind, id: Uuid) -> ApiError {
    ApiError::not_found(format!("{} {id} not found", kind.noun()))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPreset {
    /// 1 to 100 characters, unique (case-insensitive) within the catalog.
    pub name: String,
    /// Up to 2,000 characters.
    pub description: Option<String>,
    /// New orgs start with a copy of it (default false).
    #[serde(default)]
    pub initial: bool,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PresetPatch {
    pub name: Option<String>,
    /// `null` clears the description.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub description: Option<Option<String>>,
    pub initial: Option<bool>,
}

#[utoipa::path(get, path = "/v1/admin/catalog/{kind}", tag = "catalog",
    params(("kind" = String, Path, description = "`statuses` or `behaviors`"), PageQuery),
    responses((status = 200, body = Page<Preset>), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn admin_list(
    State(app): State<AppState>,
    _: Superuser,
    ApiPath(raw): ApiPath<String>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<Page<Preset>>, ApiError> {
    let kind = kind(&raw)?;
    let (limit, cursor) = q.parse()?;
    let rows = catalog::list(app.tenancy.admin_pool(), kind, cursor, limit + 1).await?;
    Ok(Json(page(rows, limit, |r| r.id)))
}

#[utoipa::path(post, path = "/v1/admin/catalog/{kind}", tag = "catalog", request_body = NewPreset,
    params(("kind" = String, Path, description = "`statuses` or `behaviors`")),
    responses((status = 201, body = Preset), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create(
    State(app): State<AppState>,
    _: Superuser,
    ApiPath(raw): ApiPath<String>,
    ApiJson(body): ApiJson<NewPreset>,
) -> Result<impl IntoResponse, ApiError> {
    let kind = kind(&raw)?;
    check_named(Some(&body.name), body.description.as_deref())?;
    let preset = catalog::create(
        app.tenancy.admin_pool(),
        kind,
        &body.name,
        body.description.as_deref(),
        body.initial,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(preset)))
}

#[utoipa::path(patch, path = "/v1/admin/catalog/{kind}/{id}", tag = "catalog", request_body = PresetPatch,
    params(("kind" = String, Path, description = "`statuses` or `behaviors`"), ("id" = Uuid, Path)),
    responses((status = 200, body = Preset), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn update(
    State(app): State<AppState>,
    _: Superuser,
    ApiPath((raw, id)): ApiPath<(String, Uuid)>,
    ApiJson(body): ApiJson<PresetPatch>,
) -> Result<Json<Preset>, ApiError> {
    let kind = kind(&raw)?;
    check_named(
        body.name.as_deref(),
        body.description.as_ref().and_then(|d| d.as_deref()),
    )?;
    let change = PresetChange {
        name: body.name,
        description: body.description,
        initial: body.initial,
    };
    catalog::update(app.tenancy.admin_pool(), kind, id, &change)
        .await?
        .map(Json)
        .ok_or_else(|| not_found(kind, id))
}

#[utoipa::path(delete, path = "/v1/admin/catalog/{kind}/{id}", tag = "catalog",
    params(("kind" = String, Path, description = "`statuses` or `behaviors`"), ("id" = Uuid, Path)),
    responses((status = 204, description = "removed; orgs keep the copies they adopted"),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete(
    State(app): State<AppState>,
    _: Superuser,
    ApiPath((raw, id)): ApiPath<(String, Uuid)>,
) -> Result<StatusCode, ApiError> {
    let kind = kind(&raw)?;
    if catalog::delete(app.tenancy.admin_pool(), kind, id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_found(kind, id))
    }
}

/// The statements of the org routes, unqualified (the search path finds
/// the shared tables): compile-time constants per kind.
struct OrgSql {
    list: &'static str,
    adopt: &'static str,
}

macro_rules! org_sql {
    ($catalog:literal, $own:literal) => {
        OrgSql {
            list: concat!(
                "SELECT id, name, description, initial, created_at, updated_at FROM ",
                $catalog,
                " WHERE ($1::uuid IS NULL OR id > $1) ORDER BY id LIMIT $2"
            ),
            adopt: concat!(
                "INSERT INTO ",
                $own,
                " (name, description, created_by, updated_by) SELECT name, description, $2, $2 FROM ",
                $catalog,
                " WHERE id = $1 \
                 RETURNING id, name, description, created_by, updated_by, created_at, updated_at"
            ),
        }
    };
}

fn org_sql(kind: CatalogKind) -> OrgSql {
    match kind {
        CatalogKind::Statuses => org_sql!("catalog_statuses", "statuses"),
        CatalogKind::Behaviors => org_sql!("catalog_behaviors", "behaviors"),
    }
}

#[utoipa::path(get, path = "/v1/orgs/{slug}/catalog/{kind}", tag = "catalog",
    params(("slug" = String, Path, description = "Organization slug"), ("kind" = String, Path, description = "`statuses` or `behaviors`"), PageQuery),
    responses((status = 200, body = Page<Preset>), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn org_list(
    org: OrgScope,
    ApiPath((_, raw)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<Page<Preset>>, ApiError> {
    let kind = kind(&raw)?;
    let (limit, cursor) = q.parse()?;
    // the closure takes the kind, not the &'static str: rustc cannot prove
    // a captured reference Send for every lifetime (see `OrgScope::read`)
    let rows: Vec<Preset> = org
        .read(async move |tx| {
            Ok(tx
                .query_as(org_sql(kind).list)
                .bind(cursor)
                .bind(limit + 1)
                .fetch_all()
                .await?)
        })
        .await?;
    Ok(Json(page(rows, limit, |r| r.id)))
}

/// Copies a preset into the org's own statuses or behaviors (a copy: later
/// changes to the preset do not reach it).
#[utoipa::path(post, path = "/v1/orgs/{slug}/catalog/{kind}/{id}/adopt", tag = "catalog",
    params(("slug" = String, Path, description = "Organization slug"), ("kind" = String, Path, description = "`statuses` or `behaviors`"), ("id" = Uuid, Path)),
    responses((status = 201, body = Named, description = "the org's new status or behavior"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "the org has one of that name", body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn adopt(
    org: OrgScope,
    ApiPath((_, raw, id)): ApiPath<(String, String, Uuid)>,
) -> Result<impl IntoResponse, ApiError> {
    let kind = kind(&raw)?;
    let mut tx = org.begin().await?;
    let row: Option<Named> = tx
        .query_as(org_sql(kind).adopt)
        .bind(id)
        .bind(org.user_id())
        .fetch_optional()
        .await
        .map_err(name_taken)?;
    tx.commit().await?;
    row.map(|r| (StatusCode::CREATED, Json(r)))
        .ok_or_else(|| not_found(kind, id))
}
