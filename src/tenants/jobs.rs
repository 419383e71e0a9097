//! The job table of each tenant schema (`tenantry_jobs`): its definition,
//! created with every new schema, and added to schemas built before it by
//! `tenantry migrate`. Jobs live in their org's schema so that enqueueing is
//! a write of the org's own transaction, as the org's role, and no role
//! can reach another org's jobs (invariant 7); `jobs` runs them.

use sqlx::PgPool;

use crate::base::error::Error;
use crate::base::ident::{quote_ident, RoleName, SchemaName};
use crate::pg::engine::Engine;
use crate::pg::statements::{hand_over_schema, send_statements};

/// The table's name in each tenant schema; tenant migrations must not
/// create a table of this name.
pub const JOBS_TABLE: &str = "tenantry_jobs";

/// The table and its indexes, for a transaction whose search path is the
/// tenant's schema. `due_at` is when a queued job may run, or when a
/// running job's lease ends; the partial index on it is all a worker reads
/// to take the next job. The unique key holds among unfinished jobs only.
pub const JOBS_DDL: &str = "\
CREATE TABLE IF NOT EXISTS tenantry_jobs (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    kind         text NOT NULL CHECK (length(kind) BETWEEN 1 AND 100),
    payload      jsonb NOT NULL DEFAULT '{}',
    state        text NOT NULL DEFAULT 'queued'
                 CHECK (state IN ('queued', 'running', 'succeeded', 'dead', 'cancelled')),
    unique_key   text CHECK (length(unique_key) BETWEEN 1 AND 200),
    schedule     text CHECK (length(schedule) BETWEEN 1 AND 100),
    attempt      integer NOT NULL DEFAULT 0,
    max_attempts integer NOT NULL DEFAULT 5 CHECK (max_attempts BETWEEN 1 AND 100),
    run_at       timestamptz NOT NULL DEFAULT now(),
    due_at       timestamptz NOT NULL DEFAULT now(),
    lease        uuid,
    progress     jsonb,
    error        text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    started_at   timestamptz,
    finished_at  timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS tenantry_jobs_due ON tenantry_jobs (due_at, id)
    WHERE state IN ('queued', 'running');
CREATE UNIQUE INDEX IF NOT EXISTS tenantry_jobs_unique_key ON tenantry_jobs (unique_key)
    WHERE state IN ('queued', 'running');
CREATE INDEX IF NOT EXISTS tenantry_jobs_created ON tenantry_jobs (created_at, id)";

/// Adds the job table to every active or suspended org's schema that lacks
/// it (schemas built before this release), as the org's role, one
/// transaction per schema. Returns how many got it.
#[tracing::instrument(skip(pool))]
pub async fn add_to_existing_schemas(pool: &PgPool, engine: Engine) -> Result<usize, Error> {
    let missing: Vec<(uuid::Uuid, String)> = sqlx::query_as(
        "SELECT o.id, o.schema_name FROM tenantry.organizations o \
         WHERE o.status IN ('active', 'suspended') \
           AND to_regclass(quote_ident(o.schema_name) || '.' || quote_ident($1)) IS NULL \
           AND EXISTS (SELECT 1 FROM pg_namespace n WHERE n.nspname = o.schema_name) \
         ORDER BY o.slug",
    )
    .bind(JOBS_TABLE)
    .fetch_all(pool)
    .await?;
    let citus = engine.is_citus();
    for (id, schema) in &missing {
        let schema = SchemaName::parse(schema)?;
        let role = RoleName::for_org(id);
        let mut tx = pool.begin().await?;
        let mut sql = format!("SET LOCAL search_path TO {}", quote_ident(schema.as_str()));
        if !citus {
            sql.push_str(&format!("; SET LOCAL ROLE {}", role.quoted()));
        }
        sql.push_str(";\n");
        sql.push_str(JOBS_DDL);
        send_statements(&mut tx, &sql, citus).await?;
        if citus {
            hand_over_schema(&mut tx, &schema, &role, true).await?;
        }
        tx.commit().await?;
    }
    Ok(missing.len())
}
