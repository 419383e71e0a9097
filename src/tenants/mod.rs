//! Tenant schemas: the tenant template, building and removing an org's
//! schema and role (provisioning, the warm pool), moving an org's data in
//! and out (archives) and across Citus workers (placement), and operations
//! over every schema (fleet migrations, queries, doctor).
//!
//! Functions here change the registry and announce the change in the same
//! transaction; apps and shells reach the org changes through
//! `tenancy::Orgs` (the layer above), which also keeps the caller's caches current.

pub mod archive;
pub mod fleet;
pub mod placement;
pub mod provision;
pub mod template;
pub mod warm;
