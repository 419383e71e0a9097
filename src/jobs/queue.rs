//! The registry's ready index of orgs with jobs (`tenantry.job_queues`):
//! taking the org whose turn it is, rescheduling or dropping it after a
//! look at its jobs, and the sweep that finds jobs whose hint was lost.
//! Always on the admin pool: neither tenant nor serving roles read it.

use std::time::Duration;

use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::base::error::Error;
use crate::base::ident::quote_ident;
use crate::pg::engine::Engine;
use crate::tenants::jobs::JOBS_TABLE;

/// Channel a hint of new jobs is announced on.
pub const JOBS_CHANNEL: &str = "tenantry_jobs";

/// An org whose turn it is, and the hint count seen when it was taken.
#[derive(Debug, Clone, Copy)]
pub struct Turn {
    pub org: Uuid,
    pub seq: i64,
}

/// Takes the org that has waited longest among those with a job due, and
/// puts it behind every other (round robin): one index probe on
/// `turn_at`, whatever the number of orgs and jobs.
pub async fn take_turn(admin: &PgPool) -> Result<Option<Turn>, Error> {
    let row: Option<(Uuid, i64)> = sqlx::query_as(
        "UPDATE tenantry.job_queues SET turn_at = now() WHERE org_id = ( \
           SELECT org_id FROM tenantry.job_queues WHERE turn_at <= now() \
           ORDER BY turn_at LIMIT 1 FOR UPDATE SKIP LOCKED) \
         RETURNING org_id, seq",
    )
    .fetch_optional(admin)
    .await?;
    Ok(row.map(|(org, seq)| Turn { org, seq }))
}

/// After a look at the org's jobs: its next due time, or none left. The
/// row changes only if no job was announced since the turn was taken (a
/// hint lowers `turn_at` itself).
pub async fn after_look(
    admin: &PgPool,
    turn: Turn,
    next_due: Option<OffsetDateTime>,
) -> Result<(), Error> {
    match next_due {
        None => {
            sqlx::query("DELETE FROM tenantry.job_queues WHERE org_id = $1 AND seq = $2")
                .bind(turn.org)
                .bind(turn.seq)
                .execute(admin)
                .await?;
        }
        Some(at) => {
            sqlx::query(
                "UPDATE tenantry.job_queues SET turn_at = GREATEST($3, now()) \
                 WHERE org_id = $1 AND seq = $2",
            )
            .bind(turn.org)
            .bind(turn.seq)
            .bind(at)
            .execute(admin)
            .await?;
        }
    }
    Ok(())
}

/// Puts the org's turn off by `delay` (a suspended org, a busy one).
pub async fn postpone(admin: &PgPool, org: Uuid, delay: Duration) -> Result<(), Error> {
    sqlx::query(
        "UPDATE tenantry.job_queues SET turn_at = now() + make_interval(secs => $2) \
         WHERE org_id = $1",
    )
    .bind(org)
    .bind(delay.as_secs_f64())
    .execute(admin)
    .await?;
    Ok(())
}

/// Forgets an org that no longer exists.
pub async fn forget(admin: &PgPool, org: Uuid) -> Result<(), Error> {
    sqlx::query("DELETE FROM tenantry.job_queues WHERE org_id = $1")
        .bind(org)
        .execute(admin)
        .await?;
    Ok(())
}

/// Announces jobs of `org` due at `at` (what a tenant transaction's commit
/// does through the serving role), for admin code.
pub async fn announce(admin: &PgPool, org: Uuid, at: OffsetDateTime) -> Result<(), Error> {
    sqlx::query("SELECT tenantry.serving_jobs_due($1, $2)")
        .bind(org)
        .bind(at)
        .execute(admin)
        .await?;
    Ok(())
}

/// Orgs whose schemas are read per sweep query (one on Citus, where a
/// query spans one tenant's shard).
const SWEEP_BATCH: usize = 200;

/// The active and suspended orgs whose schema has a job table (id,
/// schema), in batches of as many as one query reads.
async fn orgs_with_jobs(admin: &PgPool, engine: Engine) -> Result<Vec<Vec<(Uuid, String)>>, Error> {
    let orgs: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT o.id, o.schema_name FROM tenantry.organizations o \
         WHERE o.status IN ('active', 'suspended') \
           AND to_regclass(quote_ident(o.schema_name) || '.' || quote_ident($1)) IS NOT NULL \
         ORDER BY o.id",
    )
    .bind(JOBS_TABLE)
    .fetch_all(admin)
    .await?;
    let batch = if engine.is_citus() { 1 } else { SWEEP_BATCH };
    Ok(orgs.chunks(batch).map(<[_]>::to_vec).collect())
}

/// What a sweep found: orgs with queued or running jobs, and those jobs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    pub orgs: usize,
    pub queued: u64,
    pub running: u64,
}

/// Reads every org's earliest unfinished job and gives each org with one
/// a row in the index (or an earlier `turn_at`): jobs whose hint was lost
/// (the process that committed them died first) are found here. Counts
/// the queued and running jobs on the way (through the same partial
/// index).
#[tracing::instrument(skip(admin))]
pub async fn sweep(admin: &PgPool, engine: Engine) -> Result<Swept, Error> {
    let mut swept = Swept::default();
    for chunk in orgs_with_jobs(admin, engine).await? {
        let parts: Vec<String> = chunk
            .iter()
            .map(|(id, schema)| {
                format!(
                    "SELECT '{id}'::uuid AS org, min(due_at) AS due, \
                       count(*) FILTER (WHERE state = 'queued') AS queued, \
                       count(*) FILTER (WHERE state = 'running') AS running \
                     FROM {}.{JOBS_TABLE} WHERE state IN ('queued', 'running')",
                    quote_ident(schema)
                )
            })
            .collect();
        let sql = format!(
            "SELECT org, due, queued, running FROM ({}) s WHERE due IS NOT NULL",
            parts.join(" UNION ALL ")
        );
        let rows: Vec<(Uuid, OffsetDateTime, i64, i64)> =
            sqlx::query_as(&sql).fetch_all(admin).await?;
        if rows.is_empty() {
            continue;
        }
        swept.orgs += rows.len();
        let mut due = Vec::with_capacity(rows.len());
        for (org, at, queued, running) in rows {
            swept.queued += queued as u64;
            swept.running += running as u64;
            due.push((org, at));
        }
        let (ids, ats): (Vec<Uuid>, Vec<OffsetDateTime>) = due.into_iter().unzip();
        sqlx::query(
            "INSERT INTO tenantry.job_queues AS q (org_id, turn_at) \
             SELECT u.org, u.at FROM unnest($1::uuid[], $2::timestamptz[]) AS u(org, at) \
             JOIN tenantry.organizations o ON o.id = u.org \
             ON CONFLICT (org_id) DO UPDATE SET turn_at = LEAST(q.turn_at, EXCLUDED.turn_at)",
        )
        .bind(&ids)
        .bind(&ats)
        .execute(admin)
        .await?;
    }
    Ok(swept)
}

/// Jobs by state over every org (read as the admin, batched like the
/// sweep), and the orgs in the ready index.
pub async fn fleet_counts(
    admin: &PgPool,
    engine: Engine,
) -> Result<(Vec<(String, i64)>, i64), Error> {
    let mut totals = std::collections::BTreeMap::<String, i64>::new();
    for chunk in orgs_with_jobs(admin, engine).await? {
        let parts: Vec<String> = chunk
            .iter()
            .map(|(_, schema)| {
                format!(
                    "SELECT state, count(*) AS n FROM {}.{JOBS_TABLE} GROUP BY state",
                    quote_ident(schema)
                )
            })
            .collect();
        let sql = format!(
            "SELECT state, sum(n)::bigint FROM ({}) s GROUP BY state",
            parts.join(" UNION ALL ")
        );
        let rows: Vec<(String, i64)> = sqlx::query_as(&sql).fetch_all(admin).await?;
        for (state, n) in rows {
            *totals.entry(state).or_default() += n;
        }
    }
    let ready: i64 = sqlx::query_scalar("SELECT count(*) FROM tenantry.job_queues")
        .fetch_one(admin)
        .await?;
    Ok((totals.into_iter().collect(), ready))
}
