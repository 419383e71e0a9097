//! Tenant schemas: the tenant template, building and removing an org's
//! schema and role (provisioning, the warm pool), moving an org's data in
//! and out (archives) and across Citus workers (placement), and operations
//! over every schema (fleet migrations, queries, doctor).
//!
//! Functions here change the registry and announce the change in the same
//! transaction; apps and shells reach the org changes through
//! `tenancy::Orgs` (the layer above), which also keeps the caller's caches current.

pub mod archive;
pub mod catalog;
pub mod fleet;
pub mod jobs;
pub mod placement;
pub mod provision;
pub mod shared;
pub mod template;
pub mod warm;

/// Readies a database for tenantry at startup: the registry's migrations,
/// then the shared schema's (this release's shared template), checked
/// against this release's tenant template (`shared::migrate`). Tenant
/// schemas are migrated by `tenantry migrate`, never at startup.
pub async fn migrate_database(
    pool: &sqlx::PgPool,
) -> Result<shared::SharedMigrated, crate::base::error::Error> {
    crate::registry::migrate(pool).await?;
    shared::migrate(
        pool,
        &shared::embedded_template(),
        &template::Template::embedded(),
    )
    .await
}
