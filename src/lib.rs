//! tenantry: a schema-per-tenant router for PostgreSQL.
//!
//! One database holds the registry (schema `tenantry`) and one schema per
//! organization. The modules are layers, each depending only on those
//! listed before it (see `docs/architecture.md`; `tests/architecture.rs`
//! keeps it so):
//!
//! - [`base`]: identifiers, the SQL lexer, secrets, errors;
//! - [`pg`]: connections, engine detection, the local cluster, statements
//!   and migrations over sqlx;
//! - [`registry`]: orgs, users, tokens, roles, change notifications;
//! - [`telemetry`]: metrics, which nothing above reaches into;
//! - [`tenants`]: tenant schemas: template, provisioning, warm pool,
//!   archives, placement, fleet operations;
//! - [`serving`]: the router, authentication, fairness;
//! - [`tenancy`]: the core: every org change, and a server's caches kept
//!   coherent with them;
//! - [`jobs`]: background jobs, run in their org's transaction by workers
//!   that take orgs round robin;
//! - [`api`], [`cli`] and [`server`]: thin shells (HTTP, command line, and
//!   the process that serves, with [`Tenantry`] for apps that embed it).

pub mod api;
pub mod base;
pub mod cli;
pub mod jobs;
pub mod pg;
pub mod registry;
pub mod server;
pub mod serving;
pub mod telemetry;
pub mod tenancy;
pub mod tenants;

pub use base::error::Error;
pub use server::Tenantry;

/// Compile-time check that the library's main futures are `Send`, so they
/// can be spawned and used in axum handlers. (sqlx's `Executor` impls make
/// this easy to lose without noticing until a caller spawns the future.)
#[allow(dead_code)]
fn futures_are_send(
    orgs: &tenancy::Orgs,
    new: &tenants::provision::NewOrg,
    slug: &base::ident::Slug,
    pool: &sqlx::PgPool,
) {
    fn is_send<T: Send>(_: T) {}
    is_send(orgs.create(new));
    is_send(orgs.rename(slug, slug));
    is_send(orgs.delete(slug));
    is_send(registry::migrate(pool));
    is_send(tenants::migrate_database(pool));
}
