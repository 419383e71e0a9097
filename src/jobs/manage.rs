//! Jobs as their org sees them: listing, one job, cancelling, retrying and
//! counting, each in a tenant transaction (so only the org's own jobs are
//! in reach). The HTTP API and `tenantry jobs` call these.

use serde::Serialize;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::base::error::Error;
use crate::serving::router::TenantTx;

/// A job's state. `queued` includes jobs waiting for a retry (`attempt`
/// above 0, `error` set) or for their `run_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Dead,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 5] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Dead,
        JobState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Dead => "dead",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Result<Self, Error> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| Error::Validation {
                field: "state",
                message: format!("{s:?} is not one of queued, running, succeeded, dead, cancelled"),
            })
    }
}

/// A job, without its payload (which may be large).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Job {
    pub id: Uuid,
    pub kind: String,
    pub state: JobState,
    pub unique_key: Option<String>,
    /// The cron schedule it recurs on (UTC), if any.
    pub schedule: Option<String>,
    /// Attempts begun so far.
    pub attempt: i32,
    pub max_attempts: i32,
    /// Not run before this.
    #[serde(with = "time::serde::rfc3339")]
    pub run_at: OffsetDateTime,
    /// What its handler recorded at its last checkpoint (or at success).
    #[schema(value_type = Option<Object>)]
    pub progress: Option<serde_json::Value>,
    /// The last failure.
    pub error: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub started_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

struct JobRow {
    id: Uuid,
    kind: String,
    state: String,
    unique_key: Option<String>,
    schedule: Option<String>,
    attempt: i32,
    max_attempts: i32,
    run_at: OffsetDateTime,
    progress: Option<String>,
    error: Option<String>,
    created_at: OffsetDateTime,
    started_at: Option<OffsetDateTime>,
    finished_at: Option<OffsetDateTime>,
    updated_at: OffsetDateTime,
}

crate::tenant_row!(JobRow {
    id,
    kind,
    state,
    unique_key,
    schedule,
    attempt,
    max_attempts,
    run_at,
    progress,
    error,
    created_at,
    started_at,
    finished_at,
    updated_at
});

impl TryFrom<JobRow> for Job {
    type Error = Error;

    fn try_from(r: JobRow) -> Result<Self, Error> {
        let progress = r
            .progress
            .map(|p| serde_json::from_str(&p))
            .transpose()
            .map_err(|e| Error::Corrupt(format!("job {} progress: {e}", r.id)))?;
        Ok(Job {
            id: r.id,
            state: JobState::parse(&r.state)
                .map_err(|_| Error::Corrupt(format!("job {} state {:?}", r.id, r.state)))?,
            kind: r.kind,
            unique_key: r.unique_key,
            schedule: r.schedule,
            attempt: r.attempt,
            max_attempts: r.max_attempts,
            run_at: r.run_at,
            progress,
            error: r.error,
            created_at: r.created_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
            updated_at: r.updated_at,
        })
    }
}

fn jobs(rows: Vec<JobRow>) -> Result<Vec<Job>, Error> {
    rows.into_iter().map(Job::try_from).collect()
}

macro_rules! job_columns {
    () => {
        "id, kind, state, unique_key, schedule, attempt, max_attempts, run_at, \
         progress::text AS progress, \
         error, created_at, started_at, finished_at, updated_at"
    };
}

const LIST: &str = concat!(
    "SELECT ",
    job_columns!(),
    " FROM tenantry_jobs WHERE ($1::text IS NULL OR state = $1) \
       AND ($2::uuid IS NULL OR (created_at, id) < \
            (SELECT c.created_at, c.id FROM tenantry_jobs c WHERE c.id = $2)) \
     ORDER BY created_at DESC, id DESC LIMIT $3"
);

const GET: &str = concat!(
    "SELECT ",
    job_columns!(),
    " FROM tenantry_jobs WHERE id = $1"
);

const CANCEL: &str = concat!(
    "UPDATE tenantry_jobs SET state = 'cancelled', lease = NULL, finished_at = now(), \
         updated_at = now() \
     WHERE id = $1 AND state IN ('queued', 'running') RETURNING ",
    job_columns!()
);

const RETRY: &str = concat!(
    "UPDATE tenantry_jobs SET state = 'queued', attempt = 0, due_at = now(), lease = NULL, \
         finished_at = NULL, updated_at = now() \
     WHERE id = $1 AND state IN ('dead', 'cancelled') RETURNING ",
    job_columns!()
);

const COUNTS: &str = "SELECT state, count(*) FROM tenantry_jobs GROUP BY state";

/// The org's jobs, newest first: `limit` after the job `before` (a cursor),
/// in `state` if given.
pub async fn list(
    tx: &mut TenantTx,
    state: Option<JobState>,
    before: Option<Uuid>,
    limit: i64,
) -> Result<Vec<Job>, Error> {
    let rows: Vec<JobRow> = tx
        .query_as(LIST)
        .bind(state.map(JobState::as_str))
        .bind(before)
        .bind(limit)
        .fetch_all()
        .await?;
    jobs(rows)
}

pub async fn get(tx: &mut TenantTx, id: Uuid) -> Result<Option<Job>, Error> {
    let row: Option<JobRow> = tx.query_as(GET).bind(id).fetch_optional().await?;
    row.map(Job::try_from).transpose()
}

fn not_found(id: Uuid) -> Error {
    Error::NotFound(format!("job {id} not found"))
}

/// Cancels a queued or running job (a running one's work is rolled back at
/// its next checkpoint or at its end). A finished job is a conflict.
pub async fn cancel(tx: &mut TenantTx, id: Uuid) -> Result<Job, Error> {
    let row: Option<JobRow> = tx.query_as(CANCEL).bind(id).fetch_optional().await?;
    match row {
        Some(row) => Job::try_from(row),
        None => match get(tx, id).await? {
            Some(job) => Err(Error::Conflict(format!(
                "job {id} is {} and cannot be cancelled",
                job.state.as_str()
            ))),
            None => Err(not_found(id)),
        },
    }
}

/// Queues a dead or cancelled job again, with all its attempts. A queued,
/// running or succeeded job is a conflict, and so is one whose unique key
/// another unfinished job holds.
pub async fn retry(tx: &mut TenantTx, id: Uuid) -> Result<Job, Error> {
    let row: Result<Option<JobRow>, sqlx::Error> =
        tx.query_as(RETRY).bind(id).fetch_optional().await;
    let row = match row {
        Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
            return Err(Error::Conflict(format!(
                "another unfinished job of this org has job {id}'s unique key"
            )))
        }
        other => other?,
    };
    match row {
        Some(row) => {
            tx.note_job_due(OffsetDateTime::now_utc());
            Job::try_from(row)
        }
        None => match get(tx, id).await? {
            Some(job) => Err(Error::Conflict(format!(
                "job {id} is {}; only dead or cancelled jobs can be retried",
                job.state.as_str()
            ))),
            None => Err(not_found(id)),
        },
    }
}

/// The org's jobs by state (every state, zero included).
pub async fn counts(tx: &mut TenantTx) -> Result<Vec<(JobState, i64)>, Error> {
    let rows: Vec<(String, i64)> = tx.query_as(COUNTS).fetch_all().await?;
    let mut counts: Vec<(JobState, i64)> = JobState::ALL.iter().map(|s| (*s, 0)).collect();
    for (state, n) in rows {
        let state = JobState::parse(&state)?;
        if let Some(c) = counts.iter_mut().find(|(s, _)| *s == state) {
            c.1 = n;
        }
    }
    Ok(counts)
}
