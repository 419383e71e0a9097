//! The OpenAPI 3 document served at `/openapi.json`, generated from the
//! handlers' `#[utoipa::path]` annotations and the types' `ToSchema`.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{admin, resources};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tenantry",
        description = "Schema-per-tenant router for PostgreSQL: org-scoped CRUD and administration. \
                       Every error is `{\"error\": {\"code\", \"message\", \"details\"?}}`."
    ),
    paths(
        super::healthz,
        super::readyz,
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
        admin::create_org,
        admin::list_orgs,
        admin::get_org,
        admin::suspend_org,
        admin::resume_org,
        admin::rename_org,
        admin::delete_org,
        admin::create_token,
        admin::revoke_token,
        admin::stats,
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "statuses"), (name = "behaviors"), (name = "tests"),
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
