//! The bottom layer: what every other layer speaks in. Identifiers that
//! reach SQL text (parse-don't-validate newtypes and quoting), a lexer for
//! SQL scripts, secrets and token hashing, WAL positions, and the crate's error type. It
//! depends on nothing else in the crate.

pub mod error;
pub mod ident;
pub mod lsn;
pub mod secret;
pub mod sql;
