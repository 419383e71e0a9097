//! The request path below HTTP: authentication of bearer tokens (cached),
//! the slug -> tenant router with its tenant transactions, and per-org
//! fairness (the in-flight limit) in front of the connection pools, and
//! the choice between the primary and its replicas for reads.

pub mod auth;
pub mod fairness;
pub mod jobs;
pub mod replicas;
pub mod router;
