//! Background jobs that run in their org's transaction (see `docs/jobs.md`).
//!
//! A job is a row of its org's `tenantry_jobs` table, enqueued in a tenant
//! transaction ([`TenantTx::enqueue`]); the registry's `job_queues` table
//! says which orgs may have one due ([`queue`]); workers take orgs round
//! robin from it and run each job through the tenant router, as the org's
//! role in its schema, under the per-org in-flight limit ([`worker`]).
//! What a job does is its kind's [`JobHandler`], registered in [`JobKinds`].
//! [`manage`] lists, shows, cancels and retries jobs for the API and CLI.

pub mod manage;
pub mod queue;
pub mod worker;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use crate::base::error::Error;
pub use crate::serving::jobs::NewJob;
use crate::serving::router::{Tenant, TenantRouter, TenantTx};

/// A job's handler's future.
pub type JobFuture<'a> = Pin<Box<dyn Future<Output = Result<(), JobError>> + Send + 'a>>;

/// What runs the jobs of one kind. A function
/// `fn(run: &mut JobRun) -> JobFuture<'_> { Box::pin(async move { .. }) }`
/// is one (a closure cannot yet say that its future borrows `run`).
///
/// A job runs at least once: after a crash, or once its lease ends, it runs
/// again. Its writes through [`JobRun::tx`] commit together with its
/// success, so a job whose work fits in that transaction takes effect
/// exactly once; a job that commits along the way
/// ([`JobRun::checkpoint`]) must resume from its progress.
pub trait JobHandler: Send + Sync + 'static {
    fn run<'a>(&'a self, run: &'a mut JobRun) -> JobFuture<'a>;
}

impl<F> JobHandler for F
where
    F: for<'a> Fn(&'a mut JobRun) -> JobFuture<'a> + Send + Sync + 'static,
{
    fn run<'a>(&'a self, run: &'a mut JobRun) -> JobFuture<'a> {
        self(run)
    }
}

/// The handlers of the job kinds a worker runs. A job of a kind no worker
/// has a handler for waits (it is not failed: another release may have it).
#[derive(Clone, Default)]
pub struct JobKinds {
    handlers: HashMap<String, Arc<dyn JobHandler>>,
}

impl std::fmt::Debug for JobKinds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.kinds()).finish()
    }
}

impl JobKinds {
    pub fn new() -> Self {
        JobKinds::default()
    }

    /// Runs jobs of `kind` with `handler` (replacing any handler it had).
    pub fn register(&mut self, kind: &str, handler: impl JobHandler) -> Result<(), Error> {
        crate::serving::jobs::check_kind(kind)?;
        self.handlers.insert(kind.to_owned(), Arc::new(handler));
        Ok(())
    }

    pub fn get(&self, kind: &str) -> Option<&Arc<dyn JobHandler>> {
        self.handlers.get(kind)
    }

    pub fn kinds(&self) -> Vec<&str> {
        let mut kinds: Vec<&str> = self.handlers.keys().map(String::as_str).collect();
        kinds.sort_unstable();
        kinds
    }

    /// The kind as a metric label: registered kinds only, so that the
    /// label's values stay bounded whatever was enqueued.
    fn label(&self, kind: &str) -> String {
        if self.handlers.contains_key(kind) {
            kind.to_owned()
        } else {
            "unregistered".to_owned()
        }
    }
}

/// Why an attempt failed.
#[derive(Debug, Clone)]
pub struct JobError {
    pub message: String,
    /// Try again (after a backoff) while attempts are left; `false`: the
    /// job is dead at once.
    pub retry: bool,
}

impl JobError {
    /// A failure worth another attempt.
    pub fn retry(message: impl Into<String>) -> Self {
        JobError {
            message: message.into(),
            retry: true,
        }
    }

    /// A failure no attempt will fix (bad input): the job is dead.
    pub fn permanent(message: impl Into<String>) -> Self {
        JobError {
            message: message.into(),
            retry: false,
        }
    }
}

impl From<Error> for JobError {
    fn from(e: Error) -> Self {
        let retry = !matches!(e, Error::Validation { .. } | Error::InvalidSlug(_));
        JobError {
            message: crate::base::error::chain(&e),
            retry,
        }
    }
}

impl From<sqlx::Error> for JobError {
    fn from(e: sqlx::Error) -> Self {
        JobError::from(Error::Database(e))
    }
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A claimed job, as its handler sees it: its input, and the org's
/// transaction its work runs in.
pub struct JobRun {
    id: Uuid,
    kind: String,
    payload: serde_json::Value,
    attempt: i32,
    progress: Option<serde_json::Value>,
    lease: Uuid,
    lease_for: Duration,
    router: TenantRouter,
    tenant: Arc<Tenant>,
    tx: Option<TenantTx>,
}

/// Fails (division by zero, SQLSTATE 22012) when the job is no longer its
/// worker's, so that the COMMIT sent with it rolls the work back.
const CHECKPOINT: &str = "WITH kept AS ( \
       UPDATE tenantry_jobs SET progress = $3::jsonb, \
           due_at = now() + make_interval(secs => $4), updated_at = now() \
       WHERE id = $1 AND lease = $2 AND state = 'running' RETURNING 1) \
     SELECT 1 / count(*)::int FROM kept";

/// SQLSTATE of a lease check that failed (see [`CHECKPOINT`]).
const LEASE_CHECK_FAILED: &str = "22012";

/// True when `e` is a lease check that failed.
fn lease_lost(e: &sqlx::Error) -> bool {
    crate::base::error::sqlstate(e).as_deref() == Some(LEASE_CHECK_FAILED)
}

impl JobRun {
    pub fn id(&self) -> Uuid {
        self.id
    }

    pub fn kind(&self) -> &str {
        &self.kind
    }

    pub fn payload(&self) -> &serde_json::Value {
        &self.payload
    }

    /// 1 on the first attempt.
    pub fn attempt(&self) -> i32 {
        self.attempt
    }

    /// What the last committed [`JobRun::checkpoint`] recorded (also after
    /// a crash and a new attempt).
    pub fn progress(&self) -> Option<&serde_json::Value> {
        self.progress.as_ref()
    }

    pub fn tenant(&self) -> &Tenant {
        &self.tenant
    }

    /// The org's transaction the job's work runs in (begun at the first
    /// call): it commits with the job's success, or at a checkpoint.
    pub async fn tx(&mut self) -> Result<&mut TenantTx, Error> {
        if self.tx.is_none() {
            self.tx = Some(self.router.begin(&self.tenant).await?);
        }
        Ok(self.tx.as_mut().expect("begun above"))
    }

    /// Commits the work so far with `progress` recorded in the job (shown
    /// to clients, and given back to a later attempt), and renews the
    /// lease. Fails, committing nothing, when the job was cancelled or its
    /// lease passed to another worker.
    pub async fn checkpoint(&mut self, progress: serde_json::Value) -> Result<(), JobError> {
        let text = progress.to_string();
        let (id, lease, secs) = (self.id, self.lease, self.lease_for.as_secs_f64());
        let tx = self.tx().await?;
        let kept = tx
            .query_as::<(i32,)>(CHECKPOINT)
            .bind(id)
            .bind(lease)
            .bind(text)
            .bind(secs)
            .and_commit()
            .fetch_one()
            .await;
        self.tx = None;
        match kept {
            Ok(_) => {
                self.progress = Some(progress);
                Ok(())
            }
            Err(e) if lease_lost(&e) => Err(JobError::permanent(LEASE_LOST)),
            Err(e) => Err(e.into()),
        }
    }
}

/// The error of a job whose lease is no longer its worker's.
const LEASE_LOST: &str = "the job was cancelled or its lease passed to another worker";
