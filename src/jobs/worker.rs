//! Workers: tasks that take orgs round robin from the ready index, claim
//! one due job of the org (a lease, committed), and run it through the
//! tenant router (as the org's role, under its in-flight limit) with the
//! job's success committed in the same transaction as its work. A failed
//! attempt is retried after an exponential backoff until the job's last
//! attempt, then the job is dead. Shutdown stops taking jobs, lets running
//! ones finish within a deadline and hands the rest back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use time::OffsetDateTime;
use tokio::sync::{watch, Notify};
use uuid::Uuid;

use super::queue::{self, Turn, JOBS_CHANNEL};
use super::{JobError, JobKinds, JobRun};
use crate::base::error::Error;
use crate::pg::engine::Engine;
use crate::registry::OrgStatus;
use crate::serving::router::{Tenant, TenantRouter};

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Jobs run at once by this process.
    pub concurrency: usize,
    /// How long a claimed job is its worker's: after that (a crashed
    /// worker), another may run it. An attempt running longer is failed.
    pub lease: Duration,
    /// The longest an idle worker waits before looking again when no
    /// notification comes (e.g. a job scheduled for later).
    pub idle_poll: Duration,
    /// The first retry's delay; each further one doubles, up to `retry_max`.
    pub retry_base: Duration,
    pub retry_max: Duration,
    /// How often this process looks through every org for jobs whose hint
    /// was lost (`queue::sweep`).
    pub sweep_interval: Duration,
    /// At shutdown, running jobs get this long to finish; the rest are
    /// handed back.
    pub shutdown_timeout: Duration,
    /// How long a suspended org's jobs wait before it is looked at again.
    pub suspended_recheck: Duration,
    /// How long one turn of an org may last: a worker claims as many of the
    /// org's due jobs at once as its recent jobs' run time fits in this
    /// (at most `max_batch`), and hands back what it has not started when
    /// the turn runs over. Short jobs cost one registry look and one claim
    /// per batch instead of per job; long ones are claimed one at a time,
    /// so no org holds jobs that other workers could run.
    pub turn: Duration,
    pub max_batch: usize,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            concurrency: 4,
            lease: Duration::from_secs(300),
            idle_poll: Duration::from_secs(2),
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(3600),
            sweep_interval: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(30),
            suspended_recheck: Duration::from_secs(5),
            turn: Duration::from_millis(20),
            max_batch: 16,
        }
    }
}

impl WorkerConfig {
    /// The delay before the attempt after `attempt` (1-based).
    pub fn backoff(&self, attempt: i32) -> Duration {
        let doublings = attempt.clamp(1, 31) as u32 - 1;
        self.retry_base
            .checked_mul(1u32 << doublings.min(20))
            .unwrap_or(self.retry_max)
            .min(self.retry_max)
    }
}

/// Running workers. [`Workers::shutdown`] stops them gracefully; dropping
/// them aborts the tasks (running jobs' transactions roll back, and their
/// leases run out).
pub struct Workers {
    stop: watch::Sender<Stop>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    background: Vec<tokio::task::JoinHandle<()>>,
    shutdown_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Running,
    /// Take no new job; finish the running one.
    Draining,
    /// Hand the running job back now.
    HandBack,
}

#[derive(Clone)]
struct Shared {
    router: TenantRouter,
    admin: PgPool,
    kinds: Arc<JobKinds>,
    /// The kinds this process runs, joined by ',' (one text parameter).
    names: Arc<str>,
    config: Arc<WorkerConfig>,
    wake: Arc<Notify>,
    /// Recent jobs' run time, in microseconds (a moving average over this
    /// process's workers), which sizes each claim.
    run_us: Arc<std::sync::atomic::AtomicU64>,
}

impl Workers {
    /// Starts `config.concurrency` workers running `kinds`: tenant
    /// transactions through `router`, the ready index on `admin`, and LISTEN
    /// for new jobs on `listen` (a direct connection: a transaction pooler
    /// does not carry LISTEN); without it they poll every `idle_poll`.
    pub fn spawn(
        router: TenantRouter,
        admin: PgPool,
        listen: Option<PgPool>,
        kinds: JobKinds,
        config: WorkerConfig,
    ) -> Workers {
        let (stop, _) = watch::channel(Stop::Running);
        // kinds are a-z 0-9 _ . : - (checked at registration): ',' joins them
        let names = kinds.kinds().join(",");
        let shared = Shared {
            router,
            admin,
            kinds: Arc::new(kinds),
            names: names.into(),
            run_us: Arc::new(std::sync::atomic::AtomicU64::new(
                config.turn.as_micros() as u64
            )),
            config: Arc::new(config),
            wake: Arc::new(Notify::new()),
        };
        let tasks = (0..shared.config.concurrency.max(1))
            .map(|_| tokio::spawn(shared.clone().work(stop.subscribe())))
            .collect();
        let mut background = vec![tokio::spawn(shared.clone().sweep_every())];
        if let Some(pool) = listen {
            background.push(tokio::spawn(shared.clone().listen(pool)));
        }
        Workers {
            shutdown_timeout: shared.config.shutdown_timeout,
            stop,
            tasks,
            background,
        }
    }

    /// Stops taking jobs, gives running ones the shutdown timeout to
    /// finish, then hands the rest back (queued again, at once, without
    /// losing an attempt) and returns when every worker has stopped.
    pub async fn shutdown(mut self) {
        self.stop.send_replace(Stop::Draining);
        let tasks = std::mem::take(&mut self.tasks);
        let mut all = Box::pin(futures_util::future::join_all(tasks));
        if tokio::time::timeout(self.shutdown_timeout, &mut all)
            .await
            .is_err()
        {
            tracing::warn!("jobs still running at the shutdown deadline are handed back");
            self.stop.send_replace(Stop::HandBack);
            all.await;
        }
        for task in self.background.drain(..) {
            task.abort();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for task in self.tasks.iter().chain(&self.background) {
            task.abort();
        }
    }
}

/// What a claim found in an org.
enum Claim {
    /// In the order to run them, all under one lease.
    Jobs(Vec<Claimed>, Uuid),
    /// Nothing due for these kinds: when the next one is, if any.
    Nothing { next_due: Option<OffsetDateTime> },
}

struct Claimed {
    id: Uuid,
    kind: String,
    payload: serde_json::Value,
    attempt: i32,
    progress: Option<serde_json::Value>,
    due_at: OffsetDateTime,
    schedule: Option<String>,
}

// Up to $4 due jobs claimed under one lease (a job whose lease ran out on
// its last attempt is made dead, not run again), or, when none is due, one
// row of NULLs with the next due time. The lease commits in the same write.
// (Citus refuses now() inside CASE or COALESCE of an UPDATE: the time comes
// from the FROM list.)
const CLAIM_OR_NEXT: &str = "WITH claimed AS ( \
       UPDATE tenantry_jobs j SET \
         state = CASE WHEN j.state = 'running' AND j.attempt >= j.max_attempts THEN 'dead' ELSE 'running' END, \
         attempt = CASE WHEN j.state = 'running' AND j.attempt >= j.max_attempts THEN j.attempt ELSE j.attempt + 1 END, \
         lease = CASE WHEN j.state = 'running' AND j.attempt >= j.max_attempts THEN NULL ELSE $1 END, \
         error = CASE WHEN j.state = 'running' AND j.attempt >= j.max_attempts \
                      THEN 'its worker stopped or ran past its lease on the last attempt' ELSE j.error END, \
         finished_at = CASE WHEN j.state = 'running' AND j.attempt >= j.max_attempts THEN due.now END, \
         due_at = now() + make_interval(secs => $2), \
         started_at = COALESCE(j.started_at, due.now), updated_at = now() \
       FROM (SELECT id, due_at, now() AS now FROM tenantry_jobs \
             WHERE state IN ('queued', 'running') AND due_at <= now() \
               AND kind = ANY(string_to_array($3, ',')) \
             ORDER BY due_at, id LIMIT $4 FOR UPDATE SKIP LOCKED) due \
       WHERE j.id = due.id \
       RETURNING j.id, j.kind, j.state, j.payload::text AS payload, j.attempt, \
                 j.progress::text AS progress, due.due_at, j.schedule) \
     SELECT id, kind, state, payload, attempt, progress, due_at, schedule FROM claimed \
     UNION ALL \
     SELECT NULL::uuid, NULL::text, NULL::text, NULL::text, NULL::int, NULL::text, \
            (SELECT min(due_at) FROM tenantry_jobs WHERE state IN ('queued', 'running') \
               AND kind = ANY(string_to_array($3, ','))), NULL::text \
     WHERE NOT EXISTS (SELECT 1 FROM claimed)";

/// The next occurrence of a recurring job that just finished (the rows of
/// the CTE `$from`, with its schedule), due at the parameter `$at` (NULL:
/// none). It selects from the CTE that finished the job, so it runs after
/// that update, and the finished row no longer holds the unique key.
macro_rules! next_occurrence {
    ($from:literal, $at:literal) => {
        concat!(
            "INSERT INTO tenantry_jobs (kind, payload, unique_key, max_attempts, schedule, run_at, due_at) \
             SELECT kind, payload, unique_key, max_attempts, schedule, ", $at, "::timestamptz, ", $at, "::timestamptz \
             FROM ", $from, " WHERE schedule IS NOT NULL AND ", $at, "::timestamptz IS NOT NULL \
             ON CONFLICT (unique_key) WHERE state IN ('queued', 'running') DO NOTHING RETURNING 1"
        )
    };
}

/// Fails when the job is no longer its worker's (see `CHECKPOINT`), so
/// that the COMMIT sent with it rolls the attempt's work back. A recurring
/// job's next occurrence ($3) is queued in the same statement.
const SUCCEED: &str = concat!(
    "WITH done AS ( \
       UPDATE tenantry_jobs SET state = 'succeeded', lease = NULL, error = NULL, \
           finished_at = now(), updated_at = now() \
       WHERE id = $1 AND lease = $2 AND state = 'running' \
       RETURNING kind, payload, unique_key, max_attempts, schedule), \
     next AS (",
    next_occurrence!("done", "$3"),
    ") SELECT 1 / count(*)::int FROM done"
);

/// A failed attempt: queued again after the backoff, or dead (then a
/// recurring job's next occurrence, $6, is queued).
const FAIL: &str = concat!(
    "WITH failed AS ( \
       UPDATE tenantry_jobs SET \
         state = CASE WHEN $4 OR attempt >= max_attempts THEN 'dead' ELSE 'queued' END, \
         finished_at = CASE WHEN $4 OR attempt >= max_attempts THEN at.now END, \
         due_at = now() + make_interval(secs => $5), lease = NULL, error = $3, updated_at = now() \
       FROM (SELECT now() AS now) at \
       WHERE id = $1 AND lease = $2 AND state = 'running' \
       RETURNING state, due_at, kind, payload, unique_key, max_attempts, schedule), \
     dead AS (SELECT * FROM failed WHERE state = 'dead'), \
     next AS (",
    next_occurrence!("dead", "$6"),
    ") SELECT state, due_at FROM failed"
);

/// The next occurrence of recurring job $1, which a claim found dead (its
/// lease ran out on its last attempt).
const NEXT_AFTER_DEAD: &str = concat!(
    "WITH dead AS (SELECT * FROM tenantry_jobs WHERE id = $1 AND state = 'dead'), next AS (",
    next_occurrence!("dead", "$2"),
    ") SELECT count(*) FROM next"
);

// Every job still held under the lease: the one cut off and those of the
// batch not started.
const HAND_BACK: &str = "UPDATE tenantry_jobs SET state = 'queued', lease = NULL, due_at = now(), \
       attempt = greatest(attempt - 1, 0), updated_at = now() \
     WHERE lease = $1 AND state = 'running'";

/// Jobs of a batch whose handler succeeded without opening the org's
/// transaction: they wrote nothing there, so their success needs no
/// transaction of its own, and one statement marks them all at the end of
/// the batch (at most a turn later; a crash before it runs them again, as
/// at-least-once allows). A job that wrote commits its success with its
/// work, at once.
#[derive(Default)]
struct Done {
    ids: Vec<String>,
    attempts: Vec<(String, Duration)>,
}

const MARK_SUCCEEDED: &str = "UPDATE tenantry_jobs SET state = 'succeeded', lease = NULL, \
       error = NULL, finished_at = now(), updated_at = now() \
     WHERE lease = $1 AND state = 'running' AND id = ANY(string_to_array($2, ',')::uuid[])";

/// The next occurrence of a job's schedule after now, if it has one (a
/// schedule that no longer parses, or has no next occurrence, ends: said
/// in the log).
fn next_occurrence(schedule: Option<&str>, job: Uuid) -> Option<OffsetDateTime> {
    let schedule = schedule?;
    crate::serving::jobs::next_occurrence(schedule, OffsetDateTime::now_utc())
        .inspect_err(|e| tracing::warn!(error = %e, %job, "a recurring job's schedule ends"))
        .ok()
}

/// Longest error text kept in a job.
const ERROR_MAX: usize = 2_000;

impl Shared {
    async fn work(self, mut stop: watch::Receiver<Stop>) {
        while *stop.borrow() == Stop::Running {
            let wake = self.wake.clone();
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let idle = match queue::take_turn(&self.admin).await {
                Ok(Some(turn)) => {
                    if let Err(e) = self.serve(turn, &mut stop).await {
                        tracing::warn!(error = %e, org = %turn.org, "a job turn failed");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    false
                }
                Ok(None) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the job ready index");
                    true
                }
            };
            if idle {
                tokio::select! {
                    _ = &mut notified => {}
                    _ = tokio::time::sleep(self.config.idle_poll) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }

    /// One turn of an org: at most one job.
    async fn serve(&self, turn: Turn, stop: &mut watch::Receiver<Stop>) -> Result<(), Error> {
        let Some(tenant) = self.router.resolve_id(turn.org).await? else {
            return queue::forget(&self.admin, turn.org).await;
        };
        match tenant.status {
            OrgStatus::Active => {}
            OrgStatus::Suspended | OrgStatus::Provisioning => {
                return queue::postpone(&self.admin, turn.org, self.config.suspended_recheck).await
            }
            OrgStatus::Deleting => return queue::forget(&self.admin, turn.org).await,
        }
        let claim = match self.claim(&tenant).await {
            Ok(claim) => claim,
            Err(Error::TenantBusy { .. }) => {
                // its in-flight limit is full: its turn comes again later
                return queue::postpone(&self.admin, turn.org, Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        };
        let (jobs, lease) = match claim {
            Claim::Nothing { next_due } => {
                return queue::after_look(&self.admin, turn, next_due).await
            }
            Claim::Jobs(jobs, lease) => (jobs, lease),
        };
        let started = Instant::now();
        let count = jobs.len();
        let mut done = Done::default();
        for (i, job) in jobs.into_iter().enumerate() {
            let over = i > 0 && started.elapsed() > self.config.turn;
            if over || *stop.borrow() != Stop::Running {
                // the rest go back for other workers (or another process)
                self.mark_succeeded(&tenant, lease, &mut done).await;
                self.hand_back(&tenant, lease, count - i).await;
                return Ok(());
            }
            if !self.run(&tenant, job, lease, stop, &mut done).await {
                break;
            }
        }
        self.mark_succeeded(&tenant, lease, &mut done).await;
        Ok(())
    }

    /// Marks the batch's jobs that succeeded without a transaction of their
    /// own in one statement (see [`Done`]).
    async fn mark_succeeded(&self, tenant: &Arc<Tenant>, lease: Uuid, done: &mut Done) {
        if done.ids.is_empty() {
            return;
        }
        let ids = done.ids.join(",");
        let marked = async {
            let mut tx = self.router.begin(tenant).await?;
            let n = tx
                .query(MARK_SUCCEEDED)
                .bind(lease)
                .bind(ids)
                .and_commit()
                .execute()
                .await?
                .rows_affected();
            Ok::<_, Error>(n as usize)
        };
        let marked = marked.await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, org = %tenant.slug,
                "could not record jobs' success; they run again after their lease");
            0
        });
        for (i, (label, ran)) in done.attempts.drain(..).enumerate() {
            // which ones were cancelled meanwhile is not told: the count is
            let outcome = if i < marked { "succeeded" } else { "lost" };
            crate::telemetry::job_attempt(label, outcome, ran);
        }
        done.ids.clear();
    }

    /// How many jobs a claim takes: as many as recent run times fit in a
    /// turn.
    fn batch(&self) -> i32 {
        let run_us = self
            .run_us
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(1);
        let fits = self.config.turn.as_micros() as u64 / run_us;
        fits.clamp(1, self.config.max_batch.max(1) as u64) as i32
    }

    fn note_run_time(&self, ran: Duration) {
        let us = ran.as_micros().min(u64::MAX as u128) as u64;
        let old = self.run_us.load(std::sync::atomic::Ordering::Relaxed);
        // a moving average over about eight jobs
        let new = old - old / 8 + us / 8;
        self.run_us.store(new, std::sync::atomic::Ordering::Relaxed);
    }

    async fn claim(&self, tenant: &Arc<Tenant>) -> Result<Claim, Error> {
        let lease = Uuid::new_v4();
        let mut tx = self.router.begin(tenant).await?;
        type Row = (
            Option<Uuid>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<i32>,
            Option<String>,
            Option<OffsetDateTime>,
            Option<String>,
        );
        let rows: Vec<Row> = tx
            .query_as(CLAIM_OR_NEXT)
            .bind(lease)
            .bind(self.config.lease.as_secs_f64())
            .bind(&*self.names)
            .bind(self.batch())
            .and_commit()
            .fetch_all()
            .await?;
        let mut jobs = vec![];
        let mut next_due = None;
        for row in rows {
            let (
                Some(id),
                Some(kind),
                Some(state),
                Some(payload),
                Some(attempt),
                progress,
                Some(due_at),
                schedule,
            ) = row
            else {
                next_due = row.6;
                continue;
            };
            if state != "running" {
                tracing::warn!(job = %id, org = %tenant.slug, "a job's lease ran out on its last attempt: dead");
                crate::telemetry::job_attempt(self.kinds.label(&kind), "dead", Duration::ZERO);
                if let Some(at) = next_occurrence(schedule.as_deref(), id) {
                    self.schedule_after_dead(tenant, id, at).await;
                }
                next_due = Some(OffsetDateTime::now_utc());
                continue;
            }
            let json = |text: &str| {
                serde_json::from_str(text)
                    .map_err(|e| Error::Corrupt(format!("job {id} of {}: {e}", tenant.slug)))
            };
            jobs.push(Claimed {
                payload: json(&payload)?,
                progress: progress.as_deref().map(json).transpose()?,
                id,
                kind,
                attempt,
                due_at,
                schedule,
            });
        }
        if jobs.is_empty() {
            return Ok(Claim::Nothing { next_due });
        }
        jobs.sort_by_key(|j| (j.due_at, j.id));
        Ok(Claim::Jobs(jobs, lease))
    }

    /// Runs one claimed job to its outcome (a success without a
    /// transaction is noted in `done`, to be marked with the batch's
    /// others). False when it was handed back (shutdown): the batch's rest
    /// went back with it.
    async fn run(
        &self,
        tenant: &Arc<Tenant>,
        job: Claimed,
        lease: Uuid,
        stop: &mut watch::Receiver<Stop>,
        done: &mut Done,
    ) -> bool {
        let started = Instant::now();
        let waited = OffsetDateTime::now_utc() - job.due_at;
        crate::telemetry::job_waited(waited.try_into().unwrap_or_default());
        let label = self.kinds.label(&job.kind);
        let next = next_occurrence(job.schedule.as_deref(), job.id);
        let Some(handler) = self.kinds.get(&job.kind).cloned() else {
            // claimed only kinds this worker has: unreachable in practice
            self.mark_succeeded(tenant, lease, done).await;
            self.hand_back(tenant, lease, 1).await;
            return false;
        };
        let mut run = JobRun {
            id: job.id,
            kind: job.kind,
            payload: job.payload,
            attempt: job.attempt,
            progress: job.progress,
            lease,
            lease_for: self.config.lease,
            router: self.router.clone(),
            tenant: tenant.clone(),
            tx: None,
        };
        let outcome = {
            let attempt = tokio::time::timeout(self.config.lease, handler.run(&mut run));
            tokio::select! {
                r = attempt => Some(r.unwrap_or_else(|_| Err(JobError::retry(
                    "the attempt ran past its lease"
                )))),
                _ = stop.wait_for(|s| *s == Stop::HandBack) => None,
            }
        };
        let id = run.id;
        let outcome = match outcome {
            None => {
                drop(run);
                self.mark_succeeded(tenant, lease, done).await;
                self.hand_back(tenant, lease, 1).await;
                crate::telemetry::job_attempt(label, "handed_back", started.elapsed());
                return false;
            }
            Some(Ok(())) if run.tx.is_none() && next.is_none() => {
                let ran = started.elapsed();
                self.note_run_time(ran);
                done.ids.push(id.to_string());
                done.attempts.push((label, ran));
                return true;
            }
            Some(Ok(())) => self.succeed(&mut run, next).await,
            Some(Err(e)) => {
                // whatever the attempt wrote rolls back
                run.tx = None;
                self.fail(tenant, &run, e, next).await
            }
        };
        let outcome = outcome.unwrap_or_else(|e| {
            tracing::warn!(error = %e, job = %id, org = %tenant.slug,
                "could not record a job's outcome; it runs again after its lease");
            "lost"
        });
        let ran = started.elapsed();
        self.note_run_time(ran);
        crate::telemetry::job_attempt(label, outcome, ran);
        true
    }

    /// Marks the job succeeded in its own transaction, with its work, and
    /// queues a recurring job's `next` occurrence there too.
    async fn succeed(
        &self,
        run: &mut JobRun,
        next: Option<OffsetDateTime>,
    ) -> Result<&'static str, Error> {
        let (id, lease) = (run.id, run.lease);
        let tx = run.tx().await?;
        if let Some(at) = next {
            tx.note_job_due(at);
        }
        let done = tx
            .query_as::<(i32,)>(SUCCEED)
            .bind(id)
            .bind(lease)
            .bind(next)
            .and_commit()
            .fetch_one()
            .await;
        run.tx = None;
        match done {
            Ok(_) => Ok("succeeded"),
            // cancelled, or the lease passed on: its work rolled back
            Err(e) if super::lease_lost(&e) => Ok("lost"),
            Err(e) => Err(e.into()),
        }
    }

    async fn fail(
        &self,
        tenant: &Arc<Tenant>,
        run: &JobRun,
        e: JobError,
        next: Option<OffsetDateTime>,
    ) -> Result<&'static str, Error> {
        let mut message = e.message;
        if message.len() > ERROR_MAX {
            let mut end = ERROR_MAX;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        let backoff = self.config.backoff(run.attempt);
        let mut tx = self.router.begin(tenant).await?;
        // the hint may come early (a dead job, a later due time): a worker
        // then finds nothing due yet
        tx.note_job_due(OffsetDateTime::now_utc() + backoff);
        if let Some(at) = next {
            tx.note_job_due(at);
        }
        let row: Option<(String, OffsetDateTime)> = tx
            .query_as(FAIL)
            .bind(run.id)
            .bind(run.lease)
            .bind(message)
            .bind(!e.retry)
            .bind(backoff.as_secs_f64())
            .bind(next)
            .and_commit()
            .fetch_optional()
            .await?;
        Ok(match row {
            None => "lost",
            Some((state, _)) if state == "dead" => "dead",
            Some(_) => "retried",
        })
    }

    /// Queues the next occurrence of recurring job `id`, which a claim found
    /// dead.
    async fn schedule_after_dead(&self, tenant: &Arc<Tenant>, id: Uuid, at: OffsetDateTime) {
        let queued = async {
            let mut tx = self.router.begin(tenant).await?;
            tx.note_job_due(at);
            tx.query(NEXT_AFTER_DEAD)
                .bind(id)
                .bind(at)
                .and_commit()
                .execute()
                .await?;
            Ok::<_, Error>(())
        };
        if let Err(e) = queued.await {
            tracing::warn!(error = %e, job = %id, org = %tenant.slug,
                "could not queue a recurring job's next occurrence");
        }
    }

    /// Hands back every job still held under `lease` (`n` of them, for
    /// the log): queued again at once, without losing an attempt.
    async fn hand_back(&self, tenant: &Arc<Tenant>, lease: Uuid, n: usize) {
        let handed = async {
            let mut tx = self.router.begin(tenant).await?;
            tx.note_job_due(OffsetDateTime::now_utc());
            tx.query(HAND_BACK)
                .bind(lease)
                .and_commit()
                .execute()
                .await?;
            Ok::<_, Error>(())
        };
        if let Err(e) = handed.await {
            tracing::warn!(error = %e, jobs = n, org = %tenant.slug,
                "could not hand jobs back; they run again after their lease");
        }
    }

    /// Sweeps at start and every `sweep_interval`.
    async fn sweep_every(self) {
        let engine = loop {
            match self.admin.acquire().await {
                Ok(mut conn) => match Engine::detect(&mut conn).await {
                    Ok(engine) => break engine,
                    Err(e) => tracing::warn!(error = %e, "cannot detect the database engine"),
                },
                Err(e) => tracing::warn!(error = %e, "cannot connect for the job sweep"),
            }
            tokio::time::sleep(self.config.idle_poll).await;
        };
        loop {
            match queue::sweep(&self.admin, engine).await {
                Ok(swept) => {
                    crate::telemetry::job_depth(swept.orgs, swept.queued, swept.running);
                    if swept.orgs > 0 {
                        self.wake.notify_waiters();
                    }
                }
                Err(e) => tracing::warn!(error = %e, "the job sweep failed"),
            }
            tokio::time::sleep(self.config.sweep_interval).await;
        }
    }

    /// Wakes idle workers at each announced job.
    async fn listen(self, pool: PgPool) {
        loop {
            let Err(e) = self.listen_once(&pool).await;
            tracing::warn!(error = %e, "the job listener failed; retrying");
            tokio::time::sleep(self.config.idle_poll).await;
        }
    }

    async fn listen_once(&self, pool: &PgPool) -> Result<std::convert::Infallible, sqlx::Error> {
        let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
        listener.listen(JOBS_CHANNEL).await?;
        // anything announced before LISTEN took effect
        self.wake.notify_waiters();
        loop {
            listener.recv().await?;
            self.wake.notify_waiters();
        }
    }
}
