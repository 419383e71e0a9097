//! Connections to PostgreSQL and the protocol-level work on them, with no
//! knowledge of orgs: pools and tenant-affine sub-pools, engine detection
//! (plain PostgreSQL or a Citus coordinator), the zero-config local
//! cluster, sending SQL text, and applying refinery migrations over sqlx.

pub mod embedded;
pub mod engine;
pub mod migrations;
pub mod pipeline;
pub mod pools;
pub mod statements;
