//! The OpenAPI 3 document served at `/openapi.json`, generated from the
//! handlers' `#[utoipa::path]` annotations and the types' `ToSchema`.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Content, Ref, RefOr, Response, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use super::{admin, catalog, jobs, resources};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tenantry",
        description = "Schema-per-tenant router for PostgreSQL: org-scoped CRUD and administration. \
                       Every error is `{\"error\": {\"code\", \"message\", \"details\"?}}`. \
                       On a server with replicas, responses of `/v1/orgs/{slug}/...` carry \
                       `Tenantry-Position` (a WAL position such as `16/B374D848`); a request \
                       sending it back reads every write before it, on any server \
                       (malformed: 400 `invalid_position`)."
    ),
    paths(
        super::healthz,
        super::readyz,
        super::metrics_text,
        resources::statuses::list,
        resources::statuses::create,
        resources::statuses::get,
        resources::statuses::update,
        resources::statuses::delete,
        resources::behaviors::list,
        resources::behaviors::create,
        resources::behaviors::get,
        resources::behaviors::update,
        resources::behaviors::delete,
        resources::list_tests,
        resources::create_test,
        resources::get_test,
        resources::update_test,
        resources::delete_test,
        jobs::import_tests,
        jobs::list_jobs,
        jobs::get_job,
        jobs::cancel_job,
        jobs::retry_job,
        admin::create_org,
        admin::list_orgs,
        admin::get_org,
        admin::suspend_org,
        admin::resume_org,
        admin::rename_org,
        admin::move_org,
        admin::clone_org,
        admin::delete_org,
        admin::create_token,
        admin::revoke_token,
        admin::stats,
        catalog::admin_list,
        catalog::create,
        catalog::update,
        catalog::delete,
        catalog::org_list,
        catalog::adopt,
    ),
    modifiers(&BearerAuth, &StandardErrors),
    tags(
        (name = "statuses"), (name = "behaviors"), (name = "tests"),
        (name = "jobs", description = "an org's background jobs (e.g. imports): state, progress, cancel and retry"),
        (name = "catalog", description = "presets in the shared schema: every org reads and adopts them, superusers change them"),
        (name = "admin", description = "superuser tokens only"),
        (name = "health")
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("tny_<8 hex>_<64 hex>")
                    .build(),
            ),
        );
    }
}

/// The error statuses any operation of a kind can answer, added to every
/// operation that does not list them itself, so the document lists every
/// status the server really sends (a test walks each operation with bad
/// input and checks).
struct StandardErrors;

fn error_response(description: &str) -> RefOr<Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                Content::new(Some(RefOr::Ref(Ref::from_schema_name("ErrorBody")))),
            )
            .build(),
    )
}

impl Modify for StandardErrors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (path, item) in openapi.paths.paths.iter_mut() {
            let operations = [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ];
            for op in operations.into_iter().flatten() {
                let mut errors: Vec<(&str, &str)> = vec![];
                let database = !matches!(path.as_str(), "/healthz" | "/openapi.json");
                if op.security.is_some() {
                    errors.push((
                        "401",
                        "missing, malformed, unknown, revoked or expired token",
                    ));
                    errors.push(("403", "not allowed for this token (`forbidden`), or the organization is suspended (`org_suspended`)"));
                }
                if path.starts_with("/v1/orgs/{slug}") {
                    errors.push(("429", "the organization has its limit of requests in flight and none finished within the queue time (`tenant_busy`); see `Retry-After`"));
                }
                if path.contains("{slug}") {
                    errors.push(("404", "no such organization (also for an organization the token does not belong to)"));
                }
                if op.parameters.as_ref().is_some_and(|p| !p.is_empty()) {
                    errors.push(("400", "a path or query parameter is malformed"));
                }
                if op.request_body.is_some() {
                    errors.push(("400", "the body is not valid JSON"));
                    errors.push(("413", "the body is larger than 256 KiB"));
                    errors.push(("415", "the body is not application/json"));
                    errors.push(("422", "the body has the wrong shape or invalid values"));
                }
                if database {
                    errors.push(("503", "the database is unavailable (`unavailable`), the request timed out (`timeout`) or the organization's data is locked (`tenant_busy`); see `Retry-After`"));
                    errors.push(("500", "an internal error (logged)"));
                }
                for (code, why) in errors {
                    op.responses
                        .responses
                        .entry(code.to_owned())
                        .or_insert_with(|| error_response(why));
                }
            }
        }
    }
}
