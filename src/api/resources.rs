//! Org-scoped CRUD: `statuses`, `behaviors` and `tests` under
//! `/v1/orgs/{slug}/...`. Handlers see only an [`OrgScope`] and its tenant
//! transaction: SQL names tables unqualified and never filters by org,
//! because the transaction can only see the org's schema.

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use serde::{Deserialize, Deserializer, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath, ApiQuery, OrgScope};
use super::TenantApi;

pub fn router() -> Router<TenantApi> {
    Router::new()
        .route(
            "/v1/orgs/{slug}/statuses",
            get(statuses::list).post(statuses::create),
        )
        .route(
            "/v1/orgs/{slug}/statuses/{id}",
            get(statuses::get)
                .patch(statuses::update)
                .delete(statuses::delete),
        )
        .route(
            "/v1/orgs/{slug}/behaviors",
            get(behaviors::list).post(behaviors::create),
        )
        .route(
            "/v1/orgs/{slug}/behaviors/{id}",
            get(behaviors::get)
                .patch(behaviors::update)
                .delete(behaviors::delete),
        )
        .route("/v1/orgs/{slug}/tests", get(list_tests).post(create_test))
        .route(
            "/v1/orgs/{slug}/tests/{id}",
            get(get_test).patch(update_test).delete(delete_test),
        )
}

pub const DEFAULT_PAGE: i64 = 50;
pub const MAX_PAGE: i64 = 200;
pub const NAME_MAX: usize = 100;
pub const DESCRIPTION_MAX: usize = 2_000;
pub const TEXT_MAX: usize = 100_000;

/// Checks a text field: length in characters within `min..=max`, and no
/// NUL or (for one-line fields) control characters.
fn check_text(
    field: &str,
    value: &str,
    min: usize,
    max: usize,
    one_line: bool,
) -> Result<(), ApiError> {
    let len = value.chars().count();
    if len < min || len > max {
        return Err(ApiError::invalid_field(
            field,
            format!("must be {min} to {max} characters (got {len})"),
        ));
    }
    if value.contains('\0') || (one_line && value.chars().any(char::is_control)) {
        return Err(ApiError::invalid_field(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// Distinguishes an absent field (leave unchanged) from `null` (clear it).
pub(crate) fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Page size, 1 to 200 (default 50).
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

impl PageQuery {
    pub(crate) fn parse(&self) -> Result<(i64, Option<Uuid>), ApiError> {
        let limit = self.limit.unwrap_or(DEFAULT_PAGE);
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("limit must be between 1 and {MAX_PAGE}"),
            ));
        }
        let cursor = self
            .cursor
            .as_deref()
            .map(|c| {
                Uuid::parse_str(c)
                    .map_err(|_| ApiError::bad_request("invalid_query", "cursor is not valid"))
            })
            .transpose()?;
        Ok((limit, cursor))
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass as `cursor` to get the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// Rows are fetched `limit + 1` at a time: the extra row only says whether
/// there is a next page. The cursor is the last row's key.
pub(crate) fn page<T, K: ToString>(mut rows: Vec<T>, limit: i64, key: impl Fn(&T) -> K) -> Page<T> {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next_cursor = if more {
        rows.last().map(|r| key(r).to_string())
    } else {
        None
    };
    Page {
        items: rows,
        next_cursor,
    }
}

// ---- statuses and behaviors: the same shape, different tables ----

/// A status or behavior.
#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Named {
    pub id: Uuid,
    pub name: String,
    pub description: Option<String>,
    pub created_by: Uuid,
    pub updated_by: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

crate::tenant_row!(Named {
    id,
    name,
    description,
    created_by,
    updated_by,
    created_at,
    updated_at
});

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewNamed {
    /// 1 to 100 characters, unique (case-insensitive) within the org.
    pub name: String,
    /// Up to 2,000 characters.
    pub description: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NamedPatch {
    pub name: Option<String>,
    /// `null` clears the description.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub description: Option<Option<String>>,
}

pub(crate) fn check_named(name: Option<&str>, description: Option<&str>) -> Result<(), ApiError> {
    if let Some(name) = name {
        if name.trim() != name {
            return Err(ApiError::invalid_field(
                "name",
                "must not start or end with whitespace",
            ));
        }
        check_text("name", name, 1, NAME_MAX, true)?;
    }
    if let Some(d) = description {
        check_text("description", d, 0, DESCRIPTION_MAX, false)?;
    }
    Ok(())
}

/// The SQL of one named-entity table. Table names are compile-time
/// constants, never input.
pub trait NamedTable: Send + Sync + 'static {
    const NOUN: &'static str;
    const LIST: &'static str;
    const GET: &'static str;
    const INSERT: &'static str;
    const UPDATE: &'static str;
    const DELETE: &'static str;
}

macro_rules! named_table {
    ($ty:ident, $table:literal, $noun:literal) => {
        pub struct $ty;
        impl NamedTable for $ty {
            const NOUN: &'static str = $noun;
            const LIST: &'static str = concat!(
                "SELECT id, name, description, created_by, updated_by, created_at, updated_at FROM ",
                $table,
                " WHERE ($1::uuid IS NULL OR id > $1) ORDER BY id LIMIT $2"
            );
            const GET: &'static str = concat!(
                "SELECT id, name, description, created_by, updated_by, created_at, updated_at FROM ",
                $table,
                " WHERE id = $1"
            );
            const INSERT: &'static str = concat!(
                "INSERT INTO ",
                $table,
                " (name, description, created_by, updated_by) VALUES ($1, $2, $3, $3) \
                 RETURNING id, name, description, created_by, updated_by, created_at, updated_at"
            );
            const UPDATE: &'static str = concat!(
                "UPDATE ",
                $table,
                " SET name = COALESCE($2, name), \
                      description = CASE WHEN $3 THEN $4 ELSE description END, \
                      updated_by = $5, updated_at = now() \
                 WHERE id = $1 \
                 RETURNING id, name, description, created_by, updated_by, created_at, updated_at"
            );
            const DELETE: &'static str = concat!("DELETE FROM ", $table, " WHERE id = $1");
        }
    };
}

named_table!(Statuses, "statuses", "status");
named_table!(Behaviors, "behaviors", "behavior");

/// Concrete, OpenAPI-documented handlers for one named-entity table, over
/// the generic ones below.
macro_rules! named_handlers {
    ($module:ident, $table:ty, $tag:literal, $collection:literal, $item:literal) => {
        pub mod $module {
            use super::*;

            #[utoipa::path(get, path = $collection, tag = $tag,
                params(("slug" = String, Path, description = "Organization slug"), PageQuery),
                responses((status = 200, body = Page<Named>), (status = 400, body = ErrorBody),
                    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
                security(("bearer" = [])))]
            pub async fn list(org: OrgScope, q: ApiQuery<PageQuery>) -> Result<axum::Json<Page<Named>>, ApiError> {
                list_named::<$table>(org, q).await
            }

            #[utoipa::path(post, path = $collection, tag = $tag, request_body = NewNamed,
                params(("slug" = String, Path, description = "Organization slug")),
                responses((status = 201, body = Named), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
                    (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody),
                    (status = 415, body = ErrorBody), (status = 422, body = ErrorBody)),
                security(("bearer" = [])))]
            pub async fn create(org: OrgScope, body: ApiJson<NewNamed>) -> Result<impl IntoResponse, ApiError> {
                create_named::<$table>(org, body).await
            }

            #[utoipa::path(get, path = $item, tag = $tag,
                params(("slug" = String, Path, description = "Organization slug"), ("id" = Uuid, Path)),
                responses((status = 200, body = Named), (status = 400, body = ErrorBody),
                    (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
                security(("bearer" = [])))]
            pub async fn get(org: OrgScope, path: ApiPath<(String, Uuid)>) -> Result<axum::Json<Named>, ApiError> {
                get_named::<$table>(org, path).await
            }

            #[utoipa::path(patch, path = $item, tag = $tag, request_body = NamedPatch,
                params(("slug" = String, Path, description = "Organization slug"), ("id" = Uuid, Path)),
                responses((status = 200, body = Named), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
                    (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)),
                security(("bearer" = [])))]
            pub async fn update(
                org: OrgScope,
                path: ApiPath<(String, Uuid)>,
                body: ApiJson<NamedPatch>,
            ) -> Result<axum::Json<Named>, ApiError> {
                update_named::<$table>(org, path, body).await
            }

            #[utoipa::path(delete, path = $item, tag = $tag,
                params(("slug" = String, Path, description = "Organization slug"), ("id" = Uuid, Path)),
                responses((status = 204), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
                    (status = 409, description = "still used by tests", body = ErrorBody)),
                security(("bearer" = [])))]
            pub async fn delete(org: OrgScope, path: ApiPath<(String, Uuid)>) -> Result<StatusCode, ApiError> {
                delete_named::<$table>(org, path).await
            }
        }
    };
}

named_handlers!(
    statuses,
    Statuses,
    "statuses",
    "/v1/orgs/{slug}/statuses",
    "/v1/orgs/{slug}/statuses/{id}"
);
named_handlers!(
    behaviors,
    Behaviors,
    "behaviors",
    "/v1/orgs/{slug}/behaviors",
    "/v1/orgs/{slug}/behaviors/{id}"
);

fn not_found<T: NamedTable>(id: Uuid) -> ApiError {
    ApiError::not_found(format!("{} {id} not found", T::NOUN))
}

/// Duplicate names are a conflict on the `name` field.
pub(crate) fn name_taken(e: sqlx::Error) -> ApiError {
    let api = ApiError::from(e);
    if api.status == StatusCode::CONFLICT {
        ApiError::conflict("name is already taken in this organization")
            .with_details(serde_json::json!({ "fields": { "name": "already taken" } }))
    } else {
        api
    }
}

pub async fn list_named<T: NamedTable>(
    org: OrgScope,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<axum::Json<Page<Named>>, ApiError> {
    let (limit, cursor) = q.parse()?;
    let rows: Vec<Named> = org
        .read(async move |tx| {
            Ok(tx
                .query_as(T::LIST)
                .bind(cursor)
                .bind(limit + 1)
                .fetch_all()
                .await?)
        })
        .await?;
    Ok(axum::Json(page(rows, limit, |r| r.id)))
}

pub async fn get_named<T: NamedTable>(
    org: OrgScope,
    ApiPath((_, id)): ApiPath<(String, Uuid)>,
) -> Result<axum::Json<Named>, ApiError> {
    let row: Option<Named> = org
        .read(async move |tx| Ok(tx.query_as(T::GET).bind(id).fetch_optional().await?))
        .await?;
    row.map(axum::Json).ok_or_else(|| not_found::<T>(id))
}

pub async fn create_named<T: NamedTable>(
    org: OrgScope,
    ApiJson(body): ApiJson<NewNamed>,
) -> Result<impl IntoResponse, ApiError> {
    check_named(Some(&body.name), body.description.as_deref())?;
    let mut tx = org.begin().await?;
    let row: Named = tx
        .query_as(T::INSERT)
        .bind(&body.name)
        .bind(&body.description)
        .bind(org.user_id())
        .fetch_one()
        .await
        .map_err(name_taken)?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, axum::Json(row)))
}

pub async fn update_named<T: NamedTable>(
    org: OrgScope,
    ApiPath((_, id)): ApiPath<(String, Uuid)>,
    ApiJson(body): ApiJson<NamedPatch>,
) -> Result<axum::Json<Named>, ApiError> {
    check_named(
        body.name.as_deref(),
        body.description.as_ref().and_then(|d| d.as_deref()),
    )?;
    let mut tx = org.begin().await?;
    let row: Option<Named> = tx
        .query_as(T::UPDATE)
        .bind(id)
        .bind(&body.name)
        .bind(body.description.is_some())
        .bind(body.description.flatten())
        .bind(org.user_id())
        .fetch_optional()
        .await
        .map_err(name_taken)?;
    tx.commit().await?;
    row.map(axum::Json).ok_or_else(|| not_found::<T>(id))
}

pub async fn delete_named<T: NamedTable>(
    org: OrgScope,
    ApiPath((_, id)): ApiPath<(String, Uuid)>,
) -> Result<StatusCode, ApiError> {
    let mut tx = org.begin().await?;
    let done = tx
        .query(T::DELETE)
        .bind(id)
        .execute()
        .await
        .map_err(ApiError::still_referenced)?;
    tx.commit().await?;
    if done.rows_affected() == 0 {
        return Err(not_found::<T>(id));
    }
    Ok(StatusCode::NO_CONTENT)
}

// ---- tests ----

#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct TestCase {
    pub id: Uuid,
    pub prompt: String,
    pub expected_outcome: String,
    pub behavior_id: Uuid,
    pub status_id: Uuid,
    pub created_by: Uuid,
    pub updated_by: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

crate::tenant_row!(TestCase {
    id,
    prompt,
    expected_outcome,
    behavior_id,
    status_id,
    created_by,
    updated_by,
    created_at,
    updated_at
});

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTestCase {
    /// 1 to 100,000 characters.
    pub prompt: String,
    /// Up to 100,000 characters.
    pub expected_outcome: String,
    pub behavior_id: Uuid,
    pub status_id: Uuid,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TestCasePatch {
    pub prompt: Option<String>,
    pub expected_outcome: Option<String>,
    pub behavior_id: Option<Uuid>,
    pub status_id: Option<Uuid>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TestQuery {
    /// Page size, 1 to 200 (default 50).
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Only tests with this status.
    pub status_id: Option<Uuid>,
    /// Only tests of this behavior.
    pub behavior_id: Option<Uuid>,
}

macro_rules! test_columns {
    () => {
        "id, prompt, expected_outcome, behavior_id, status_id, created_by, updated_by, created_at, updated_at"
    };
}

const LIST_TESTS: &str = concat!(
    "SELECT ",
    test_columns!(),
    " FROM tests WHERE ($1::uuid IS NULL OR id > $1) \
       AND ($2::uuid IS NULL OR status_id = $2) \
       AND ($3::uuid IS NULL OR behavior_id = $3) \
     ORDER BY id LIMIT $4"
);

pub const GET_TEST: &str = concat!("SELECT ", test_columns!(), " FROM tests WHERE id = $1");

const INSERT_TEST: &str = concat!(
    "INSERT INTO tests (prompt, expected_outcome, behavior_id, status_id, created_by, updated_by) \
     VALUES ($1, $2, $3, $4, $5, $5) RETURNING ",
    test_columns!()
);

const UPDATE_TEST: &str = concat!(
    "UPDATE tests SET prompt = COALESCE($2, prompt), \
         expected_outcome = COALESCE($3, expected_outcome), \
         behavior_id = COALESCE($4, behavior_id), \
         status_id = COALESCE($5, status_id), \
         updated_by = $6, updated_at = now() \
     WHERE id = $1 RETURNING ",
    test_columns!()
);

pub(crate) fn check_test(prompt: Option<&str>, expected: Option<&str>) -> Result<(), ApiError> {
    if let Some(p) = prompt {
        check_text("prompt", p, 1, TEXT_MAX, false)?;
    }
    if let Some(e) = expected {
        check_text("expected_outcome", e, 0, TEXT_MAX, false)?;
    }
    Ok(())
}

fn test_not_found(id: Uuid) -> ApiError {
    ApiError::not_found(format!("test {id} not found"))
}

#[utoipa::path(get, path = "/v1/orgs/{slug}/tests", tag = "tests",
    params(("slug" = String, Path, description = "Organization slug"), TestQuery),
    responses((status = 200, body = Page<TestCase>), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_tests(
    org: OrgScope,
    ApiQuery(q): ApiQuery<TestQuery>,
) -> Result<axum::Json<Page<TestCase>>, ApiError> {
    let (limit, cursor) = PageQuery {
        limit: q.limit,
        cursor: q.cursor,
    }
    .parse()?;
    let (status_id, behavior_id) = (q.status_id, q.behavior_id);
    let rows: Vec<TestCase> = org
        .read(async move |tx| {
            Ok(tx
                .query_as(LIST_TESTS)
                .bind(cursor)
                .bind(status_id)
                .bind(behavior_id)
                .bind(limit + 1)
                .fetch_all()
                .await?)
        })
        .await?;
    Ok(axum::Json(page(rows, limit, |r| r.id)))
}

#[utoipa::path(get, path = "/v1/orgs/{slug}/tests/{id}", tag = "tests",
    params(("slug" = String, Path, description = "Organization slug"), ("id" = Uuid, Path)),
    responses((status = 200, body = TestCase), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_test(
    org: OrgScope,
    ApiPath((_, id)): ApiPath<(String, Uuid)>,
) -> Result<axum::Json<TestCase>, ApiError> {
    let row: Option<TestCase> = org
        .read(async move |tx| Ok(tx.query_as(GET_TEST).bind(id).fetch_optional().await?))
        .await?;
    row.map(axum::Json).ok_or_else(|| test_not_found(id))
}

#[utoipa::path(post, path = "/v1/orgs/{slug}/tests", tag = "tests", request_body = NewTestCase,
    params(("slug" = String, Path, description = "Organization slug")),
    responses((status = 201, body = TestCase), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 413, body = ErrorBody), (status = 415, body = ErrorBody),
        (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_test(
    org: OrgScope,
    ApiJson(body): ApiJson<NewTestCase>,
) -> Result<impl IntoResponse, ApiError> {
    check_test(Some(&body.prompt), Some(&body.expected_outcome))?;
    let mut tx = org.begin().await?;
    let row: TestCase = tx
        .query_as(INSERT_TEST)
        .bind(&body.prompt)
        .bind(&body.expected_outcome)
        .bind(body.behavior_id)
        .bind(body.status_id)
        .bind(org.user_id())
        .fetch_one()
        .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, axum::Json(row)))
}

#[utoipa::path(patch, path = "/v1/orgs/{slug}/tests/{id}", tag = "tests", request_body = TestCasePatch,
    params(("slug" = String, Path, description = "Organization slug"), ("id" = Uuid, Path)),
    responses((status = 200, body = TestCase), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn update_test(
    org: OrgScope,
    ApiPath((_, id)): ApiPath<(String, Uuid)>,
    ApiJson(body): ApiJson<TestCasePatch>,
) -> Result<axum::Json<TestCase>, ApiError> {
    check_test(body.prompt.as_deref(), body.expected_outcome.as_deref())?;
    let mut tx = org.begin().await?;
    let row: Option<TestCase> = tx
        .query_as(UPDATE_TEST)
        .bind(id)
        .bind(&body.prompt)
        .bind(&body.expected_outcome)
        .bind(body.behavior_id)
        .bind(body.status_id)
        .bind(org.user_id())
        .fetch_optional()
        .await?;
    tx.commit().await?;
    row.map(axum::Json).ok_or_else(|| test_not_found(id))
}

#[utoipa::path(delete, path = "/v1/orgs/{slug}/tests/{id}", tag = "tests",
    params(("slug" = String, Path, description = "Organization slug"), ("id" = Uuid, Path)),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_test(
    org: OrgScope,
    ApiPath((_, id)): ApiPath<(String, Uuid)>,
) -> Result<StatusCode, ApiError> {
    let mut tx = org.begin().await?;
    let done = tx
        .query("DELETE FROM tests WHERE id = $1")
        .bind(id)
        .execute()
        .await?;
    tx.commit().await?;
    if done.rows_affected() == 0 {
        return Err(test_not_found(id));
    }
    Ok(StatusCode::NO_CONTENT)
}
