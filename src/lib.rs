//! tenantry: a schema-per-tenant router for PostgreSQL.
//!
//! One database holds the registry (schema `tenantry`) and one schema per
//! organization. See `README.md` for the manual and `docs/` for benchmarks.

pub mod api;
pub mod archive;
pub mod auth;
pub mod cli;
pub mod db;
pub mod embedded;
pub mod engine;
pub mod error;
pub mod fairness;
pub mod fleet;
pub mod ident;
pub mod metrics;
pub mod placement;
pub mod provision;
pub mod registry;
pub mod roles;
pub mod router;
pub mod secret;
pub mod server;
pub mod sql;
pub mod template;
pub mod tenancy;
pub mod warm;

pub use error::Error;

/// Compile-time check that the library's main futures are `Send`, so they
/// can be spawned and used in axum handlers. (sqlx's `Executor` impls make
/// this easy to lose without noticing until a caller spawns the future.)
#[allow(dead_code)]
fn futures_are_send(
    pool: &sqlx::PgPool,
    template: &template::Template,
    new: &provision::NewOrg,
    slug: &ident::Slug,
) {
    fn is_send<T: Send>(_: T) {}
    is_send(provision::create_org(pool, template, new));
    is_send(provision::rename_org(pool, slug, slug));
    is_send(provision::delete_org(pool, slug));
    is_send(registry::migrate(pool));
}
