//! Background jobs, on a real PostgreSQL (and through PgBouncer, and on
//! Citus, when the run says so): transactional enqueue, running in the
//! org's transaction as its role, retries and the dead state, unique keys,
//! schedules, cancellation, suspended and deleted orgs, two workers on one
//! queue, fairness beside a noisy org, shutdown, confinement, the import
//! API, and a worker process killed with SIGKILL in the middle of a job.

mod common;

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::*;
use tenantry::base::ident::Slug;
use tenantry::jobs::manage::{self, Job, JobState};
use tenantry::jobs::worker::{WorkerConfig, Workers};
use tenantry::jobs::{JobError, JobFuture, JobKinds, JobRun, NewJob};
use uuid::Uuid;

/// What the test kinds saw, by job id: runs begun, runs in progress, and
/// the role each ran as.
#[derive(Default)]
struct Seen {
    runs: HashMap<Uuid, u32>,
    running: HashMap<Uuid, u32>,
    overlaps: u32,
    roles: HashMap<Uuid, String>,
}

fn seen() -> &'static Mutex<Seen> {
    static SEEN: OnceLock<Mutex<Seen>> = OnceLock::new();
    SEEN.get_or_init(Default::default)
}

/// Records the run, holds it for a moment (so that a second worker running
/// the same job at the same time would overlap it), and writes a status
/// named after the job in the org's schema.
fn track(run: &mut JobRun) -> JobFuture<'_> {
    Box::pin(async move {
        let id = run.id();
        {
            let mut s = seen().lock().unwrap();
            *s.runs.entry(id).or_default() += 1;
            let n = s.running.entry(id).or_default();
            *n += 1;
            if *n > 1 {
                s.overlaps += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
        let tx = run.tx().await?;
        let (role,): (String,) = tx.query_as("SELECT current_user::text").fetch_one().await?;
        tx.query("INSERT INTO statuses (name, created_by, updated_by) VALUES ($1, $2, $2)")
            .bind(id.to_string())
            .bind(Uuid::nil())
            .execute()
            .await?;
        let mut s = seen().lock().unwrap();
        *s.running.get_mut(&id).unwrap() -= 1;
        s.roles.insert(id, role);
        Ok(())
    })
}

fn noop(_: &mut JobRun) -> JobFuture<'_> {
    Box::pin(async { Ok(()) })
}

fn fail(_: &mut JobRun) -> JobFuture<'_> {
    Box::pin(async { Err(JobError::retry("boom")) })
}

fn block(_: &mut JobRun) -> JobFuture<'_> {
    Box::pin(std::future::pending())
}

fn kinds() -> JobKinds {
    let mut kinds = tenantry::api::jobs::default_kinds();
    kinds.register("test.track", track).unwrap();
    kinds.register("test.noop", noop).unwrap();
    kinds.register("test.fail", fail).unwrap();
    kinds.register("test.block", block).unwrap();
    kinds
}

fn fast(concurrency: usize) -> WorkerConfig {
    WorkerConfig {
        concurrency,
        lease: Duration::from_secs(30),
        idle_poll: Duration::from_millis(200),
        retry_base: Duration::from_millis(20),
        retry_max: Duration::from_millis(100),
        sweep_interval: Duration::from_secs(3600),
        shutdown_timeout: Duration::from_millis(300),
        suspended_recheck: Duration::from_millis(100),
        ..WorkerConfig::default()
    }
}

fn workers(app: &TestApp, config: WorkerConfig) -> Workers {
    // the workers' warnings in a failed test's output
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("tenantry=warn")
        .try_init();
    let admin = app.state.tenancy.admin_pool().clone();
    Workers::spawn(
        app.state.tenancy.router().clone(),
        admin.clone(),
        Some(admin),
        kinds(),
        config,
    )
}

fn slug(s: &str) -> Slug {
    Slug::parse(s).unwrap()
}

async fn enqueue(app: &TestApp, org: &str, job: NewJob) -> Option<Uuid> {
    app.state
        .tenancy
        .router()
        .with_tenant(&slug(org), async move |tx| tx.enqueue(job).await)
        .await
        .unwrap()
}

async fn job(app: &TestApp, org: &str, id: Uuid) -> Job {
    app.state
        .tenancy
        .router()
        .with_tenant(&slug(org), async move |tx| manage::get(tx, id).await)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no job {id} in {org}"))
}

/// Polls (every 20 ms, for at most 60 s) until job `id` of `org` is in
/// `state`.
async fn until_state(app: &TestApp, org: &str, id: Uuid, state: JobState) -> Job {
    let started = Instant::now();
    loop {
        let j = job(app, org, id).await;
        if j.state == state {
            return j;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "job {id} is still {:?} (wanted {state:?}): {j:?}",
            j.state
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn ready_rows(app: &TestApp, org: &str) -> i64 {
    let id = app.tenant(org).await.id;
    sqlx::query_scalar("SELECT count(*) FROM tenantry.job_queues WHERE org_id = $1")
        .bind(id)
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
}

async fn org(app: &TestApp, slug: &str) {
    app.org_with_token(slug).await;
}

#[tokio::test]
async fn a_job_exists_only_if_its_transaction_commits() {
    let app = spawn_app().await;
    org(&app, "acme").await;
    let router = app.state.tenancy.router();
    let tenant = app.tenant("acme").await;
    let mut tx = router.begin(&tenant).await.unwrap();
    let id = tx
        .enqueue(NewJob::new("test.noop", serde_json::json!({"n": 1})))
        .await
        .unwrap()
        .unwrap();
    tx.rollback().await.unwrap();
    let schema = app.db.schema_of("acme").await;
    let count = |app: &TestApp, schema: String| {
        let pool = app.db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {schema}.tenantry_jobs"))
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        count(&app, schema.clone()).await,
        0,
        "rolled back: no job {id}"
    );
    assert_eq!(ready_rows(&app, "acme").await, 0, "and no hint");
    // dropped without commit: rolled back too
    {
        let mut tx = router.begin(&tenant).await.unwrap();
        tx.enqueue(NewJob::new("test.noop", serde_json::json!({})))
            .await
            .unwrap();
    }
    let id = enqueue(
        &app,
        "acme",
        NewJob::new("test.noop", serde_json::json!({})),
    )
    .await
    .unwrap();
    assert_eq!(count(&app, schema).await, 1);
    assert_eq!(ready_rows(&app, "acme").await, 1, "the commit announced it");
    let j = job(&app, "acme", id).await;
    assert_eq!(
        (j.state, j.attempt, j.max_attempts),
        (JobState::Queued, 0, 5)
    );
}

#[tokio::test]
async fn jobs_run_once_as_their_orgs_role_in_its_schema() {
    let app = spawn_app().await;
    org(&app, "one").await;
    org(&app, "two").await;
    // A running job keeps its org in the ready index until its lease ends
    // (so that a crashed worker's job is found again): short leases here.
    let w = workers(
        &app,
        WorkerConfig {
            lease: Duration::from_secs(1),
            ..fast(2)
        },
    );
    let mut ids = vec![];
    for org in ["one", "two"] {
        for _ in 0..5 {
            let id = enqueue(&app, org, NewJob::new("test.track", serde_json::json!({})))
                .await
                .unwrap();
            ids.push((org, id));
        }
    }
    for (org, id) in &ids {
        let j = until_state(&app, org, *id, JobState::Succeeded).await;
        assert_eq!(j.attempt, 1);
        assert!(j.finished_at.is_some() && j.error.is_none());
        let role = seen().lock().unwrap().roles[id].clone();
        assert_eq!(
            role,
            app.tenant(org).await.role.as_str(),
            "ran as the org's role"
        );
        let schema = app.db.schema_of(org).await;
        let n: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {schema}.statuses WHERE name = $1"
        ))
        .bind(id.to_string())
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
        assert_eq!(n, 1, "its write landed in its org's schema once");
    }
    // nothing left: once the leases have ended, the orgs leave the index
    let started = Instant::now();
    while ready_rows(&app, "one").await + ready_rows(&app, "two").await > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "still in the ready index"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    w.shutdown().await;
}

#[tokio::test]
async fn failures_retry_with_backoff_until_dead_and_retry_requeues() {
    let app = spawn_app().await;
    org(&app, "flaky").await;
    let w = workers(&app, fast(1));
    let id = enqueue(
        &app,
        "flaky",
        NewJob::new("test.fail", serde_json::json!({})).max_attempts(3),
    )
    .await
    .unwrap();
    let j = until_state(&app, "flaky", id, JobState::Dead).await;
    assert_eq!((j.attempt, j.error.as_deref()), (3, Some("boom")));
    assert!(j.finished_at.is_some());
    let again = app
        .state
        .tenancy
        .router()
        .with_tenant(&slug("flaky"), async move |tx| manage::retry(tx, id).await)
        .await
        .unwrap();
    assert_eq!((again.state, again.attempt), (JobState::Queued, 0));
    let j = until_state(&app, "flaky", id, JobState::Dead).await;
    assert_eq!(j.attempt, 3, "all its attempts again");
    // a dead job cannot be cancelled; a succeeded one cannot be retried
    let e = app
        .state
        .tenancy
        .router()
        .with_tenant(&slug("flaky"), async move |tx| manage::cancel(tx, id).await)
        .await
        .unwrap_err();
    assert!(matches!(e, tenantry::Error::Conflict(_)), "{e}");
    w.shutdown().await;
}

#[tokio::test]
async fn unique_keys_drop_duplicates_and_scheduled_jobs_wait_for_their_time() {
    let app = spawn_app().await;
    org(&app, "uniq").await;
    let job_with_key = || NewJob::new("test.noop", serde_json::json!({})).unique_key("nightly");
    let first = enqueue(&app, "uniq", job_with_key()).await.unwrap();
    assert_eq!(enqueue(&app, "uniq", job_with_key()).await, None, "dropped");
    let at = time::OffsetDateTime::now_utc() + time::Duration::milliseconds(1500);
    let later = enqueue(
        &app,
        "uniq",
        NewJob::new("test.noop", serde_json::json!({})).run_at(at),
    )
    .await
    .unwrap();
    let w = workers(&app, fast(2));
    until_state(&app, "uniq", first, JobState::Succeeded).await;
    let again = enqueue(&app, "uniq", job_with_key()).await;
    assert!(again.is_some(), "the key is free once its job finished");
    let j = until_state(&app, "uniq", later, JobState::Succeeded).await;
    assert!(
        j.started_at.unwrap() >= at,
        "{:?} ran before {at}",
        j.started_at
    );
    // bad jobs are refused before anything is sent
    let router = app.state.tenancy.router();
    for bad in [
        NewJob::new("Bad Kind", serde_json::json!({})),
        NewJob::new("k", serde_json::json!({})).max_attempts(0),
        NewJob::new("k", serde_json::json!({})).unique_key("x".repeat(201)),
    ] {
        let e = router
            .with_tenant(&slug("uniq"), async move |tx| tx.enqueue(bad).await)
            .await
            .unwrap_err();
        assert!(matches!(e, tenantry::Error::Validation { .. }), "{e}");
    }
    w.shutdown().await;
}

async fn jobs_in(app: &TestApp, org: &str, state: JobState) -> Vec<Job> {
    app.state
        .tenancy
        .router()
        .with_tenant(&slug(org), async move |tx| {
            manage::list(tx, Some(state), None, 200).await
        })
        .await
        .unwrap()
}

#[tokio::test]
async fn a_recurring_job_runs_on_its_schedule_until_its_pending_occurrence_is_cancelled() {
    let app = spawn_app().await;
    org(&app, "cron").await;
    let every_second = || NewJob::new("test.noop", serde_json::json!({})).cron("* * * * * *");
    enqueue(&app, "cron", every_second()).await.unwrap();
    assert_eq!(
        enqueue(&app, "cron", every_second()).await,
        None,
        "one pending occurrence per schedule"
    );
    let w = workers(&app, fast(2));
    let started = Instant::now();
    let done = loop {
        let done = jobs_in(&app, "cron", JobState::Succeeded).await;
        if done.len() >= 3 {
            break done;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{done:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut runs: Vec<i64> = done.iter().map(|j| j.run_at.unix_timestamp()).collect();
    runs.sort_unstable();
    runs.dedup();
    assert_eq!(
        runs.len(),
        done.len(),
        "one occurrence per second: {runs:?}"
    );
    for j in &done {
        assert_eq!(j.schedule.as_deref(), Some("* * * * * *"));
        assert_eq!(j.unique_key.as_deref(), Some("cron:test.noop"));
        assert_eq!(j.run_at.nanosecond(), 0, "on the second");
    }
    // cancelling the pending occurrence ends the schedule
    let pending = loop {
        let q = jobs_in(&app, "cron", JobState::Queued).await;
        if let [one] = &q[..] {
            break one.id;
        }
        assert!(q.len() <= 1, "{q:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // it may have been claimed meanwhile: then its run is rolled back
    let _ = app
        .state
        .tenancy
        .router()
        .with_tenant(&slug("cron"), async move |tx| {
            manage::cancel(tx, pending).await
        })
        .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(jobs_in(&app, "cron", JobState::Queued).await.is_empty());
    assert!(jobs_in(&app, "cron", JobState::Running).await.is_empty());
    w.shutdown().await;
}

#[tokio::test]
async fn a_cancelled_job_does_not_run_and_a_suspended_orgs_jobs_wait() {
    let app = spawn_app().await;
    org(&app, "pause").await;
    let cancelled = enqueue(
        &app,
        "pause",
        NewJob::new("test.noop", serde_json::json!({})),
    )
    .await
    .unwrap();
    let c = app
        .state
        .tenancy
        .router()
        .with_tenant(&slug("pause"), async move |tx| {
            manage::cancel(tx, cancelled).await
        })
        .await
        .unwrap();
    assert_eq!(c.state, JobState::Cancelled);
    app.state
        .tenancy
        .orgs()
        .suspend(&slug("pause"))
        .await
        .unwrap();
    let waiting = enqueue(
        &app,
        "pause",
        NewJob::new("test.noop", serde_json::json!({})),
    )
    .await
    .unwrap();
    let w = workers(&app, fast(2));
    // A suspended org is looked at every 100 ms and put off: for a second,
    // nothing of it runs.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(job(&app, "pause", waiting).await.state, JobState::Queued);
    // a rename changes nothing: jobs belong to the org's id and schema
    app.state
        .tenancy
        .orgs()
        .rename(&slug("pause"), &slug("paused"))
        .await
        .unwrap();
    app.state
        .tenancy
        .orgs()
        .resume(&slug("paused"))
        .await
        .unwrap();
    until_state(&app, "paused", waiting, JobState::Succeeded).await;
    let c = job(&app, "paused", cancelled).await;
    assert_eq!((c.state, c.attempt), (JobState::Cancelled, 0), "never ran");
    // a deleted org's jobs and its place in the ready index go with it
    enqueue(
        &app,
        "paused",
        NewJob::new("test.block", serde_json::json!({}))
            .run_at(time::OffsetDateTime::now_utc() + time::Duration::hours(1)),
    )
    .await
    .unwrap();
    let id = app.tenant("paused").await.id;
    w.shutdown().await;
    app.state
        .tenancy
        .orgs()
        .delete(&slug("paused"))
        .await
        .unwrap();
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tenantry.job_queues WHERE org_id = $1")
            .bind(id)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(left, 0);
}

#[tokio::test]
async fn two_workers_never_run_one_job_at_the_same_time() {
    let app = spawn_app().await;
    let orgs = ["pair-a", "pair-b", "pair-c"];
    for o in orgs {
        org(&app, o).await;
    }
    let mut ids = vec![];
    for i in 0..240 {
        let o = orgs[i % orgs.len()];
        let id = enqueue(&app, o, NewJob::new("test.track", serde_json::json!({})))
            .await
            .unwrap();
        ids.push((o, id));
    }
    let a = workers(&app, fast(4));
    let b = workers(&app, fast(4));
    for (o, id) in &ids {
        until_state(&app, o, *id, JobState::Succeeded).await;
    }
    a.shutdown().await;
    b.shutdown().await;
    let s = seen().lock().unwrap();
    for (_, id) in &ids {
        assert_eq!(s.runs[id], 1, "job {id} ran {} times", s.runs[id]);
    }
    assert_eq!(s.overlaps, 0);
}

#[tokio::test]
async fn shutdown_hands_running_jobs_back() {
    let app = spawn_app().await;
    org(&app, "slow").await;
    let w = workers(&app, fast(1));
    let id = enqueue(
        &app,
        "slow",
        NewJob::new("test.block", serde_json::json!({})),
    )
    .await
    .unwrap();
    let j = until_state(&app, "slow", id, JobState::Running).await;
    assert_eq!(j.attempt, 1);
    let started = Instant::now();
    w.shutdown().await;
    assert!(started.elapsed() < Duration::from_secs(10));
    let j = job(&app, "slow", id).await;
    assert_eq!(
        (j.state, j.attempt),
        (JobState::Queued, 0),
        "handed back whole"
    );
    let schema = app.db.schema_of("slow").await;
    let lease: Option<Uuid> = sqlx::query_scalar(&format!(
        "SELECT lease FROM {schema}.tenantry_jobs WHERE id = $1"
    ))
    .bind(id)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(lease, None);
}

#[tokio::test]
async fn a_noisy_org_with_10000_jobs_does_not_delay_a_quiet_orgs_jobs() {
    let app = spawn_app().await;
    org(&app, "noisy").await;
    org(&app, "quiet").await;
    let schema = app.db.schema_of("noisy").await;
    sqlx::query(&format!(
        "INSERT INTO {schema}.tenantry_jobs (kind) SELECT 'test.noop' FROM generate_series(1, 10000)"
    ))
    .execute(&app.db.pool)
    .await
    .unwrap();
    tenantry::jobs::queue::announce(
        &app.db.pool,
        app.tenant("noisy").await.id,
        time::OffsetDateTime::now_utc(),
    )
    .await
    .unwrap();
    let w = workers(&app, fast(4));
    let mut quiet = vec![];
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        quiet.push(
            enqueue(
                &app,
                "quiet",
                NewJob::new("test.noop", serde_json::json!({})),
            )
            .await
            .unwrap(),
        );
    }
    let mut waits = vec![];
    for id in quiet {
        let j = until_state(&app, "quiet", id, JobState::Succeeded).await;
        waits.push((j.started_at.unwrap() - j.run_at).as_seconds_f64());
    }
    w.shutdown().await;
    waits.sort_by(f64::total_cmp);
    let p99 = waits[waits.len() * 99 / 100];
    let left: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {schema}.tenantry_jobs WHERE state = 'queued'"
    ))
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    eprintln!(
        "quiet org's job wait: p50 {:.3} s, p99 {p99:.3} s; noisy jobs still queued: {left}",
        waits[waits.len() / 2]
    );
    assert!(
        left > 1000,
        "the noisy org stayed busy throughout ({left} left)"
    );
    assert!(p99 < 1.0, "the quiet org's p99 wait is {p99:.3} s");
}

#[tokio::test]
async fn a_tenant_role_cannot_reach_another_orgs_jobs_or_the_ready_index() {
    let app = spawn_app().await;
    org(&app, "mine").await;
    org(&app, "theirs").await;
    enqueue(
        &app,
        "theirs",
        NewJob::new("test.noop", serde_json::json!({})),
    )
    .await
    .unwrap();
    let other = app.db.schema_of("theirs").await;
    let theirs = app.tenant("theirs").await.id;
    let attempts: Vec<String> = vec![
        format!("SELECT count(*) FROM {other}.tenantry_jobs"),
        format!("UPDATE {other}.tenantry_jobs SET state = 'cancelled'"),
        format!("INSERT INTO {other}.tenantry_jobs (kind) VALUES ('x')"),
        "SELECT count(*) FROM tenantry.job_queues".into(),
        "DELETE FROM tenantry.job_queues".into(),
        format!("SELECT tenantry.serving_jobs_due('{theirs}', now())"),
    ];
    let tenant = app.tenant("mine").await;
    for sql in attempts {
        let sql: &'static str = Box::leak(sql.into_boxed_str());
        let mut tx = app.state.tenancy.router().begin(&tenant).await.unwrap();
        let e = tx.query(sql).execute().await.unwrap_err();
        assert_eq!(
            tenantry::base::error::sqlstate(&e).as_deref(),
            Some("42501"),
            "{sql}: {e}"
        );
    }
}

/// Lines of an import: tests of `behavior` and `status`, and one line
/// whose status does not exist.
fn import_lines(n: usize, behavior: &str, status: &str) -> String {
    let mut body = String::new();
    for i in 0..n {
        body.push_str(
            &serde_json::json!({
                "prompt": format!("prompt {i}"), "expected_outcome": "ok",
                "behavior_id": behavior, "status_id": status,
            })
            .to_string(),
        );
        body.push('\n');
    }
    body
}

async fn named(app: &TestApp, token: &str, org: &str, table: &str) -> String {
    let (s, b) = app
        .call(
            reqwest::Method::POST,
            &format!("/v1/orgs/{org}/{table}"),
            token,
            Some(serde_json::json!({"name": format!("{table} x")})),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    b["id"].as_str().unwrap().to_owned()
}

async fn post_import(
    app: &TestApp,
    token: &str,
    org: &str,
    body: String,
) -> (u16, serde_json::Value, Option<String>) {
    let res = app
        .req(
            reqwest::Method::POST,
            &format!("/v1/orgs/{org}/tests/import"),
            token,
        )
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    let location = res
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, res.json().await.unwrap(), location)
}

#[tokio::test]
async fn the_import_api_queues_a_job_whose_progress_and_tests_appear() {
    let app = spawn_app_with(tenantry::server::ServerConfig {
        workers: 2,
        jobs: fast(2),
        ..Default::default()
    })
    .await;
    let token = app.org_with_token("importer").await;
    let other = app.org_with_token("outsider").await;
    let behavior = named(&app, &token, "importer", "behaviors").await;
    let status = named(&app, &token, "importer", "statuses").await;
    let mut body = import_lines(4, &behavior, &status);
    body.push_str(&import_lines(1, &behavior, &Uuid::new_v4().to_string()));
    let (s, job, location) = post_import(&app, &token, "importer", body).await;
    assert_eq!(s, 202, "{job}");
    let id = job["id"].as_str().unwrap().to_owned();
    assert_eq!(
        location.as_deref(),
        Some(&*format!("/v1/orgs/importer/jobs/{id}"))
    );
    assert_eq!(job["kind"], "tests.import");
    let started = Instant::now();
    let done = loop {
        let (s, j) = app
            .call(
                reqwest::Method::GET,
                &location.clone().unwrap(),
                &token,
                None,
            )
            .await;
        assert_eq!(s, 200, "{j}");
        if j["state"] == "succeeded" {
            break j;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{j}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        done["progress"],
        serde_json::json!({"total": 5, "done": 5, "inserted": 4, "skipped": 1})
    );
    let (_, tests) = app
        .call(
            reqwest::Method::GET,
            "/v1/orgs/importer/tests",
            &token,
            None,
        )
        .await;
    assert_eq!(tests["items"].as_array().unwrap().len(), 4);
    let metrics = app.metrics().await;
    for family in [
        "tenantry_job_attempts_total{kind=\"tests.import\",outcome=\"succeeded\"}",
        "tenantry_job_run_seconds_bucket",
        "tenantry_job_wait_seconds_bucket",
        "tenantry_job_queue_depth{state=\"queued\"}",
        "tenantry_job_enqueueing_commits_total",
    ] {
        assert!(metrics.contains(family), "no {family} in /metrics");
    }
    let (s, list) = app
        .call(
            reqwest::Method::GET,
            "/v1/orgs/importer/jobs?state=succeeded",
            &token,
            None,
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(list["items"][0]["id"], id.as_str());
    // finished: no cancel
    let (s, e) = app
        .call(
            reqwest::Method::POST,
            &format!("/v1/orgs/importer/jobs/{id}/cancel"),
            &token,
            None,
        )
        .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (409, Some("conflict")),
        "{e}"
    );
    // another org's token sees no such org; an unknown job is 404
    let (s, _) = app
        .call(reqwest::Method::GET, &location.unwrap(), &other, None)
        .await;
    assert_eq!(s, 404);
    let (s, _) = app
        .call(
            reqwest::Method::GET,
            &format!("/v1/orgs/importer/jobs/{}", Uuid::new_v4()),
            &token,
            None,
        )
        .await;
    assert_eq!(s, 404);
    // every line is checked first: one bad line refuses all
    let bad = format!(
        "{}not json\n{{\"prompt\": \"\"}}\n",
        import_lines(1, &behavior, &status)
    );
    let (s, e, _) = post_import(&app, &token, "importer", bad).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (422, Some("invalid_lines")),
        "{e}"
    );
    assert_eq!(e["error"]["details"]["lines"][0]["line"], 2);
    assert_eq!(e["error"]["details"]["count"], 2);
    let (s, e, _) = post_import(&app, &token, "importer", String::new()).await;
    assert_eq!(s, 422, "{e}");
    let res = app
        .req(
            reqwest::Method::POST,
            "/v1/orgs/importer/tests/import",
            &token,
        )
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 415);
    let (s, _) = app
        .call(
            reqwest::Method::GET,
            "/v1/orgs/importer/jobs?state=nope",
            &token,
            None,
        )
        .await;
    assert_eq!(s, 400);
}

/// A `tenantry work` process on the test database, one job at a time.
fn work(app: &TestApp, lease_secs: u32) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_tenantry"))
        .args([
            "work",
            "--workers",
            "1",
            "--job-lease",
            &lease_secs.to_string(),
        ])
        .env("DATABASE_URL", &app.db.url)
        .env_remove("TENANTRY_APP_DATABASE_URL")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("tenantry work")
}

#[tokio::test]
async fn a_worker_killed_mid_job_runs_it_again_after_its_lease_and_it_takes_effect_once() {
    let app = spawn_app().await;
    let token = app.org_with_token("crash").await;
    let behavior = named(&app, &token, "crash", "behaviors").await;
    let status = named(&app, &token, "crash", "statuses").await;
    const LINES: usize = 40_000;
    let (s, job, _) = post_import(
        &app,
        &token,
        "crash",
        import_lines(LINES, &behavior, &status),
    )
    .await;
    assert_eq!(s, 202, "{job}");
    let id: Uuid = job["id"].as_str().unwrap().parse().unwrap();
    let mut first = work(&app, 3);
    // killed once it has committed part of the import, before the end
    let started = Instant::now();
    loop {
        let j = job_now(&app, id).await;
        let done = j
            .progress
            .as_ref()
            .map_or(0, |p| p["done"].as_u64().unwrap());
        if j.state == JobState::Running && done > 0 {
            assert!(done < LINES as u64, "the job ended before the kill");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "{j:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.start_kill().unwrap();
    first.wait().await.unwrap();
    let killed_at = Instant::now();
    let mut second = work(&app, 3);
    let j = until_state(&app, "crash", id, JobState::Succeeded).await;
    second.start_kill().unwrap();
    assert_eq!(j.attempt, 2, "run again: {j:?}");
    assert!(
        killed_at.elapsed() >= Duration::from_secs(2),
        "not before its lease ended"
    );
    assert_eq!(j.progress.as_ref().unwrap()["inserted"], LINES as u64);
    let schema = app.db.schema_of("crash").await;
    let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {schema}.tests"))
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(n, LINES as i64, "every line once");
}

async fn job_now(app: &TestApp, id: Uuid) -> Job {
    job(app, "crash", id).await
}

#[tokio::test]
async fn the_cli_lists_shows_cancels_retries_and_counts_jobs() {
    let app = spawn_app().await;
    org(&app, "cli-jobs").await;
    let id = enqueue(
        &app,
        "cli-jobs",
        NewJob::new("test.noop", serde_json::json!({})).unique_key("nightly"),
    )
    .await
    .unwrap()
    .to_string();
    let db = &app.db;
    let (ok, out, err) = db.cli(&["jobs", "list", "--org", "cli-jobs"]);
    assert!(ok, "{err}");
    assert!(out.contains(&id) && out.contains("queued"), "{out}");
    let (ok, out, err) = db.cli(&["jobs", "show", "--org", "cli-jobs", &id, "--json"]);
    assert!(ok, "{err}");
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (shown["kind"].as_str(), shown["unique_key"].as_str()),
        (Some("test.noop"), Some("nightly"))
    );
    let (ok, out, err) = db.cli(&["jobs", "cancel", "--org", "cli-jobs", &id]);
    assert!(ok && out.contains("cancelled"), "{out}{err}");
    let (ok, _, err) = db.cli(&["jobs", "cancel", "--org", "cli-jobs", &id]);
    assert!(!ok && err.contains("cannot be cancelled"), "{err}");
    let (ok, out, err) = db.cli(&["jobs", "retry", "--org", "cli-jobs", &id]);
    assert!(ok && out.contains("queued again"), "{out}{err}");
    let (ok, out, err) = db.cli(&["jobs", "stats", "--org", "cli-jobs", "--json"]);
    assert!(ok, "{err}");
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (stats["queued"].as_i64(), stats["cancelled"].as_i64()),
        (Some(1), Some(0))
    );
    let (ok, out, err) = db.cli(&["jobs", "stats", "--json"]);
    assert!(ok, "{err}");
    let all: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(all["queued"].as_i64(), Some(1));
    assert!(all["orgs_in_ready_index"].as_i64().unwrap() >= 1, "{all}");
    // bad input: a clear message and a failure status
    for (args, says) in [
        (
            vec!["jobs", "show", "--org", "cli-jobs", "not-a-uuid"],
            "not a UUID",
        ),
        (vec!["jobs", "list", "--org", "nobody-here"], "not found"),
        (
            vec!["jobs", "list", "--org", "cli-jobs", "--state", "done"],
            "not one of",
        ),
        (
            vec![
                "jobs",
                "show",
                "--org",
                "cli-jobs",
                &*Uuid::new_v4().to_string(),
            ],
            "not found",
        ),
    ] {
        let (ok, _, err) = db.cli(&args);
        assert!(!ok && err.contains(says), "{args:?}: {err}");
    }
}

#[tokio::test]
async fn migrate_gives_schemas_of_an_earlier_release_their_job_table() {
    let app = spawn_app().await;
    org(&app, "older").await;
    let schema = app.db.schema_of("older").await;
    // as an earlier release built it: no job table
    sqlx::query(&format!("DROP TABLE {schema}.tenantry_jobs"))
        .execute(&app.db.pool)
        .await
        .unwrap();
    let (ok, out, err) = app.db.cli(&["migrate"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("added the job table to 1 schema"), "{out}");
    let owner: String = sqlx::query_scalar(&format!(
        "SELECT tableowner::text FROM pg_tables WHERE schemaname = '{schema}' AND tablename = 'tenantry_jobs'"
    ))
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(
        owner,
        app.tenant("older").await.role.as_str(),
        "owned by the org's role"
    );
    assert!(enqueue(
        &app,
        "older",
        NewJob::new("test.noop", serde_json::json!({}))
    )
    .await
    .is_some());
    let (ok, out, _) = app.db.cli(&["migrate"]);
    assert!(ok && !out.contains("added the job table"), "once: {out}");
}
