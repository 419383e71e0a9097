//! Which PostgreSQL tenantry runs on: a plain server, or the coordinator of
//! a Citus cluster (the `citus` extension in this database), where each
//! tenant schema is a distributed schema placed on one worker.
//!
//! What differs on Citus, and why:
//! - the registry schema `tenantry` is created with
//!   `citus.enable_schema_based_sharding` off, so it stays local to the
//!   coordinator whatever the server's default; tenant schemas are created
//!   with it on, in the provisioning transaction;
//! - DDL is sent one statement per message (Citus forwards a whole message
//!   to the worker as one command and refuses several DDL statements in it);
//! - Citus runs a distributed statement on a connection to the worker that
//!   logs in as the current role. Tenant roles are therefore `LOGIN` roles
//!   there (without a password: they can log in only where the workers'
//!   `pg_hba.conf` lets the coordinator in without one, as Citus' own
//!   connections need), and the template is applied as the admin role and
//!   then handed to the tenant role, because a second connection cannot see
//!   the schema the admin's connection created in the same transaction.

use sqlx::PgConnection;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    Postgres,
    Citus,
}

impl Engine {
    /// Looks at the database `conn` is connected to.
    pub async fn detect(conn: &mut PgConnection) -> Result<Engine, sqlx::Error> {
        let citus: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus')",
        )
        .fetch_one(conn)
        .await?;
        Ok(if citus {
            Engine::Citus
        } else {
            Engine::Postgres
        })
    }

    pub fn is_citus(self) -> bool {
        self == Engine::Citus
    }

    /// Whether DDL must go one statement per message.
    pub fn one_statement_per_message(self) -> bool {
        self.is_citus()
    }
}
