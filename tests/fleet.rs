//! Fleet migrations, cross-tenant queries, stats and the doctor, against a
//! real PostgreSQL.

mod common;

use std::path::Path;
use std::time::Duration;

use common::TestDb;
use tenantry::base::ident::Slug;
use tenantry::tenants::fleet::{
    self, Finding, FleetReport, MigrateOptions, QueryOutcome, TenantOutcome,
};
use tenantry::tenants::provision::{self, NewOrg};
use tenantry::tenants::template::Template;

const V2_PRIORITY: &str = "ALTER TABLE tests ADD COLUMN priority integer NOT NULL DEFAULT 0;\n\
                           CREATE INDEX tests_priority_idx ON tests (priority);\n";

/// A template directory: the real V1 plus the given later migrations.
fn template_dir(later: &[(&str, &str)]) -> (tempfile::TempDir, Template) {
    let dir = tempfile::tempdir().unwrap();
    let v1 = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tenant_template/V1__initial.sql"),
    )
    .unwrap();
    std::fs::write(dir.path().join("V1__initial.sql"), v1).unwrap();
    for (name, sql) in later {
        std::fs::write(dir.path().join(name), sql).unwrap();
    }
    let template = Template::from_dir(dir.path()).unwrap();
    (dir, template)
}

async fn create_orgs(db: &TestDb, prefix: &str, n: usize) -> Vec<String> {
    db.create_orgs(prefix, n).await
}

/// The schema the registry records for `slug` (schemas are named after
/// org ids).
async fn schema(db: &TestDb, slug: &str) -> String {
    db.schema_of(slug).await
}

async fn has_priority(db: &TestDb, slug: &str) -> bool {
    db.count(&format!(
        "SELECT count(*) FROM information_schema.columns WHERE table_schema = '{}' AND table_name = 'tests' AND column_name = 'priority'",
        schema(db, slug).await
    ))
    .await
        == 1
}

async fn version_of(db: &TestDb, slug: &str) -> i64 {
    db.count(&format!(
        "SELECT template_version::int8 FROM tenantry.organizations WHERE slug = '{slug}'"
    ))
    .await
}

fn opts(jobs: usize) -> MigrateOptions {
    MigrateOptions {
        jobs,
        ..MigrateOptions::default()
    }
}

#[tokio::test]
async fn fifty_tenants_move_to_v2_and_a_noop_run_touches_no_schema() {
    let db = TestDb::new().await;
    let slugs = create_orgs(&db, "fifty", 50).await;
    let (_dir, v2) = template_dir(&[("V2__priority.sql", V2_PRIORITY)]);

    let plan = fleet::plan(&db.pool, &v2, &opts(4)).await.unwrap();
    assert_eq!(
        (plan.behind.len(), plan.up_to_date, plan.target),
        (50, 0, 2)
    );

    let report = fleet::migrate(&db.pool, &v2, &opts(4), |_| {})
        .await
        .unwrap();
    assert_eq!(
        (report.migrated, report.failed, report.skipped),
        (50, 0, 0),
        "{report:?}"
    );
    for s in &slugs {
        assert!(has_priority(&db, s).await, "{s}");
        assert_eq!(version_of(&db, s).await, 2);
        assert_eq!(
            db.count(&format!(
                "SELECT count(*) FROM {}.refinery_schema_history",
                schema(&db, s).await
            ))
            .await,
            2
        );
    }
    assert_eq!(
        db.count("SELECT count(*) FROM pg_indexes WHERE indexname = 'tests_priority_idx'")
            .await,
        50
    );

    // No-op: with every tenant schema moved out of reach, a run that touched
    // any of them would fail.
    for s in &slugs {
        sqlx::raw_sql(&format!(
            "ALTER SCHEMA {} RENAME TO {}_away",
            schema(&db, s).await,
            schema(&db, s).await
        ))
        .execute(&db.pool)
        .await
        .unwrap();
    }
    let noop = fleet::migrate(&db.pool, &v2, &opts(4), |_| {})
        .await
        .unwrap();
    assert_eq!(
        (noop.migrated, noop.failed, noop.skipped, noop.up_to_date),
        (0, 0, 0, 50),
        "{noop:?}"
    );
    let status = fleet::status(&db.pool).await.unwrap();
    assert_eq!(status.versions, [(2, 50)]);
    assert!(status.failed.is_empty());
}

#[tokio::test]
async fn failing_tenants_roll_back_alone_and_a_rerun_finishes_them() {
    let db = TestDb::new().await;
    let slugs = create_orgs(&db, "part", 50).await;
    let doomed = [&slugs[3], &slugs[17], &slugs[42]];
    for s in doomed {
        sqlx::raw_sql(&format!(
            "INSERT INTO {0}.tests (prompt, expected_outcome, behavior_id, status_id, created_by, updated_by) \
             SELECT 'forbidden', '', (SELECT id FROM {0}.behaviors LIMIT 1), (SELECT id FROM {0}.statuses LIMIT 1), \
                    gen_random_uuid(), gen_random_uuid()",
            schema(&db, s).await
        ))
        .execute(&db.pool)
        .await
        .unwrap();
    }
    let v2 = format!("{V2_PRIORITY}ALTER TABLE tests ADD CONSTRAINT no_forbidden CHECK (prompt <> 'forbidden');\n");
    let (dir, template) = template_dir(&[("V2__priority_and_check.sql", &v2)]);

    let dir_arg = dir.path().to_str().unwrap();
    let (ok, out, err) = db.cli(&["migrate", "--template-dir", dir_arg, "--jobs", "4"]);
    assert!(!ok, "exit status must be non-zero: {out}");
    assert!(
        out.contains("47 migrated") && out.contains("3 failed"),
        "{out}"
    );
    for s in doomed {
        assert!(out.contains(s.as_str()), "{out}");
    }
    assert!(out.contains("V2__priority_and_check"), "{out}");
    assert!(err.contains("3 tenant(s) failed"), "{err}");

    for s in &slugs {
        let failed = doomed.contains(&s);
        assert_eq!(has_priority(&db, s).await, !failed, "{s}");
        assert_eq!(version_of(&db, s).await, if failed { 1 } else { 2 }, "{s}");
        assert_eq!(
            db.count(&format!(
                "SELECT count(*) FROM {}.refinery_schema_history",
                schema(&db, s).await
            ))
            .await,
            if failed { 1 } else { 2 }
        );
    }
    let status = fleet::status(&db.pool).await.unwrap();
    assert_eq!(status.versions, [(1, 3), (2, 47)]);
    let failed: Vec<&str> = status.failed.iter().map(|f| f.slug.as_str()).collect();
    assert_eq!(failed, doomed.map(|s| s.as_str()));
    assert!(
        status.failed[0].error.contains("no_forbidden"),
        "{:?}",
        status.failed[0]
    );
    let (ok, out, _) = db.cli(&["migrate", "status"]);
    assert!(ok);
    assert!(out.contains(doomed[0].as_str()), "{out}");

    // fix the data, run again: only the three are touched
    for s in doomed {
        sqlx::raw_sql(&format!(
            "UPDATE {}.tests SET prompt = 'allowed'",
            schema(&db, s).await
        ))
        .execute(&db.pool)
        .await
        .unwrap();
    }
    let report = fleet::migrate(&db.pool, &template, &opts(4), |_| {})
        .await
        .unwrap();
    assert_eq!(
        (report.migrated, report.failed, report.up_to_date),
        (3, 0, 47),
        "{report:?}"
    );
    assert!(fleet::status(&db.pool).await.unwrap().failed.is_empty());
    assert_eq!(fleet::status(&db.pool).await.unwrap().versions, [(2, 50)]);
}

#[tokio::test]
async fn two_concurrent_runners_apply_each_migration_once() {
    let db = TestDb::new().await;
    let slugs = create_orgs(&db, "twin", 20).await;
    let (_dir, v2) = template_dir(&[("V2__priority.sql", V2_PRIORITY)]);
    let (a, b) = race_two_runners(&db, &v2).await;
    assert_eq!(a.failed + b.failed, 0, "{a:?} {b:?}");
    assert_eq!(a.migrated + b.migrated, 20, "{a:?} {b:?}");
    assert_eq!(a.migrated + a.skipped + a.up_to_date, 20);
    assert_eq!(b.migrated + b.skipped + b.up_to_date, 20);
    assert_v2_recorded_once(&db, &slugs).await;
}

/// Two runners of `template` started at once, 3 jobs each.
async fn race_two_runners(db: &TestDb, template: &Template) -> (FleetReport, FleetReport) {
    let three = opts(3);
    let (a, b) = tokio::join!(
        fleet::migrate(&db.pool, template, &three, |_| {}),
        fleet::migrate(&db.pool, template, &three, |_| {})
    );
    (a.unwrap(), b.unwrap())
}

/// Every tenant's history holds version 2 exactly once.
async fn assert_v2_recorded_once(db: &TestDb, slugs: &[String]) {
    for s in slugs {
        let rows = db
            .count(&format!(
                "SELECT count(*) FROM {}.refinery_schema_history WHERE version = 2",
                schema(db, s).await
            ))
            .await;
        assert_eq!(rows, 1, "{s}");
    }
}

/// The same with a no-transaction migration (a concurrent index build
/// without IF NOT EXISTS, which fails if run twice): the runner that waited
/// for a tenant's lock sees what the other recorded and leaves it alone.
#[tokio::test]
async fn two_concurrent_runners_build_a_concurrent_index_once() {
    let db = TestDb::new().await;
    let slugs = create_orgs(&db, "twincic", 12).await;
    let cic = "-- tenantry:no-transaction\nCREATE INDEX CONCURRENTLY tests_prompt_idx ON tests (prompt);\n";
    let (_dir, v2) = template_dir(&[("V2__prompt_index.sql", cic)]);
    let (a, b) = race_two_runners(&db, &v2).await;
    assert_eq!(a.failed + b.failed, 0, "{a:?} {b:?}");
    assert_eq!(a.migrated + b.migrated, 12, "{a:?} {b:?}");
    for s in &slugs {
        assert_eq!(version_of(&db, s).await, 2);
    }
    assert_v2_recorded_once(&db, &slugs).await;
}

#[tokio::test]
async fn an_edited_applied_migration_is_reported_and_changes_nothing() {
    let db = TestDb::new().await;
    let slugs = create_orgs(&db, "drift", 4).await;
    let (dir, _) = template_dir(&[("V2__priority.sql", V2_PRIORITY)]);
    let v1 = dir.path().join("V1__initial.sql");
    let edited =
        std::fs::read_to_string(&v1).unwrap() + "\n-- edited after it was applied\nSELECT 1;\n";
    std::fs::write(&v1, edited).unwrap();
    let template = Template::from_dir(dir.path()).unwrap();
    let report = fleet::migrate(&db.pool, &template, &opts(2), |_| {})
        .await
        .unwrap();
    assert_eq!((report.migrated, report.failed), (0, 4), "{report:?}");
    for f in &report.failures {
        match f {
            TenantOutcome::Failed {
                diverged,
                migration,
                ..
            } => {
                assert!(diverged, "{f:?}");
                assert_eq!(migration.as_deref(), Some("V1__initial"), "{f:?}");
            }
            other => panic!("{other:?}"),
        }
    }
    for s in &slugs {
        assert!(!has_priority(&db, s).await);
        assert_eq!(version_of(&db, s).await, 1);
    }
}

#[tokio::test]
async fn only_and_target_stage_a_rollout() {
    let db = TestDb::new().await;
    let slugs = create_orgs(&db, "stage", 4).await;
    let (_dir, v3) = template_dir(&[
        ("V2__priority.sql", V2_PRIORITY),
        ("V3__notes.sql", "ALTER TABLE tests ADD COLUMN notes text;"),
    ]);
    let canary = MigrateOptions {
        jobs: 2,
        only: vec![
            Slug::parse(&slugs[0]).unwrap(),
            Slug::parse(&slugs[1]).unwrap(),
        ],
        target: Some(2),
        ..MigrateOptions::default()
    };
    let plan = fleet::plan(&db.pool, &v3, &canary).await.unwrap();
    assert_eq!(plan.behind.len(), 2);
    assert_eq!(fleet::pending(&v3, 1, plan.target), ["V2__priority"]);
    let r = fleet::migrate(&db.pool, &v3, &canary, |_| {})
        .await
        .unwrap();
    assert_eq!(r.migrated, 2);
    assert_eq!(
        [
            version_of(&db, &slugs[0]).await,
            version_of(&db, &slugs[1]).await,
            version_of(&db, &slugs[2]).await
        ],
        [2, 2, 1]
    );
    let bad = MigrateOptions {
        target: Some(9),
        ..opts(1)
    };
    assert!(fleet::migrate(&db.pool, &v3, &bad, |_| {})
        .await
        .unwrap_err()
        .to_string()
        .contains("no version 9"));
    let unknown = MigrateOptions {
        only: vec![Slug::parse("nobody").unwrap()],
        ..opts(1)
    };
    assert!(fleet::plan(&db.pool, &v3, &unknown).await.is_err());
    let rest = fleet::migrate(&db.pool, &v3, &opts(2), |_| {})
        .await
        .unwrap();
    assert_eq!((rest.migrated, rest.failed), (4, 0));
    for s in &slugs {
        assert_eq!(version_of(&db, s).await, 3);
    }
}

#[tokio::test]
async fn orgs_created_during_a_run_get_the_latest_template() {
    let db = TestDb::new().await;
    create_orgs(&db, "busy", 20).await;
    let (_dir, v2) = template_dir(&[("V2__priority.sql", V2_PRIORITY)]);
    let late = NewOrg::parse("late-comer", "Late", None).unwrap();
    let two = opts(2);
    let (run, created) = tokio::join!(
        fleet::migrate(&db.pool, &v2, &two, |_| {}),
        provision::create_org(&db.pool, &v2, &late)
    );
    assert_eq!(run.unwrap().failed, 0);
    assert_eq!(created.unwrap().organization.template_version, 2);
    assert!(has_priority(&db, "late-comer").await);
    assert_eq!(fleet::status(&db.pool).await.unwrap().versions, [(2, 21)]);
}

#[tokio::test]
async fn query_all_tags_rows_and_refuses_writes() {
    let db = TestDb::new().await;
    let slugs = create_orgs(&db, "q", 3).await;
    for (i, s) in slugs.iter().enumerate() {
        sqlx::raw_sql(&format!(
            "INSERT INTO {0}.tests (prompt, expected_outcome, behavior_id, status_id, created_by, updated_by) \
             SELECT 'p' || g, '', (SELECT id FROM {0}.behaviors LIMIT 1), (SELECT id FROM {0}.statuses LIMIT 1), \
                    gen_random_uuid(), gen_random_uuid() FROM generate_series(1, {1}) g",
            schema(&db, s).await,
            i + 1
        ))
        .execute(&db.pool)
        .await
        .unwrap();
    }
    provision::suspend_org(&db.pool, &Slug::parse(&slugs[2]).unwrap())
        .await
        .unwrap();
    let mut seen = vec![];
    fleet::query_all(
        &db.pool,
        "SELECT count(*) AS n, 'x,y' AS label FROM tests;",
        2,
        Duration::from_secs(5),
        |o| match o {
            QueryOutcome::Rows { slug, rows } => seen.push((slug, rows[0]["n"].as_i64().unwrap())),
            QueryOutcome::Failed { slug, error } => panic!("{slug}: {error}"),
        },
    )
    .await
    .unwrap();
    seen.sort();
    // suspended orgs are not active: only the first two
    assert_eq!(seen, [(slugs[0].clone(), 1), (slugs[1].clone(), 2)]);

    // refused before running
    for write in [
        "UPDATE tests SET prompt = 'hacked'",
        "/* hi */ DELETE FROM tests",
        "  drop table tests",
        "",
    ] {
        let err = fleet::query_all(&db.pool, write, 2, Duration::from_secs(5), |o| {
            panic!("{o:?}")
        })
        .await
        .unwrap_err();
        assert!(err.to_string().contains("query"), "{err}");
    }
    // refused by PostgreSQL: the transaction is read-only, one statement only
    for write in [
        "WITH d AS (DELETE FROM tests RETURNING 1) SELECT count(*) FROM d",
        "SELECT 1) q; DELETE FROM tests; SELECT (1",
        "SELECT nextval('x')",
        "SELECT set_config('default_transaction_read_only', 'off', false); UPDATE tests SET prompt = 'hacked'",
    ] {
        let mut failures = 0;
        fleet::query_all(&db.pool, write, 2, Duration::from_secs(5), |o| match o {
            QueryOutcome::Failed { .. } => failures += 1,
            QueryOutcome::Rows { slug, .. } => panic!("{write:?} succeeded in {slug}"),
        })
        .await
        .unwrap();
        assert_eq!(failures, 2, "{write}");
    }
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM {}.tests WHERE prompt = 'hacked'",
            schema(&db, &slugs[0]).await
        ))
        .await,
        0
    );
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM {}.tests",
            schema(&db, &slugs[1]).await
        ))
        .await,
        2
    );

    let (ok, out, err) = db.cli(&["query", "--all", "UPDATE tests SET prompt = 'x'"]);
    assert!(!ok);
    assert!(err.contains("writes are refused"), "{err}");
    assert!(!out.contains("x"), "{out}");
    let (ok, out, err) = db.cli(&[
        "query",
        "--all",
        "--format",
        "csv",
        "SELECT count(*) AS n, 'x,y' AS label FROM tests",
    ]);
    assert!(ok, "{err}");
    let mut lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.remove(0), "org,n,label");
    lines.sort();
    assert_eq!(
        lines,
        [
            format!("{},1,\"x,y\"", slugs[0]),
            format!("{},2,\"x,y\"", slugs[1])
        ]
    );
    let (ok, out, _) = db.cli(&[
        "query",
        "--all",
        "--format",
        "json",
        "SELECT count(*) AS n FROM tests",
    ]);
    assert!(ok);
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        rows.iter()
            .any(|r| r["org"] == slugs[1].as_str() && r["n"] == 2),
        "{out}"
    );
    let (ok, out, _) = db.cli(&["query", "--all", "SELECT count(*) AS n FROM tests"]);
    assert!(ok);
    let table: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        table,
        [
            vec!["ORG", "n"],
            vec![slugs[0].as_str(), "1"],
            vec![slugs[1].as_str(), "2"]
        ]
    );
    let (ok, _, err) = db.cli(&["query", "SELECT 1"]);
    assert!(!ok && err.contains("--all"), "{err}");
}

#[tokio::test]
async fn stats_endpoint_counts_per_org() {
    let app = common::spawn_app().await;
    let token = app.org_with_token("stats-a").await;
    app.org_with_token("stats-b").await;
    let (s, _) = app
        .call(
            reqwest::Method::POST,
            "/v1/orgs/stats-a/statuses",
            &token,
            Some(serde_json::json!({"name": "Extra"})),
        )
        .await;
    assert_eq!(s, 201);
    // Statistics are PostgreSQL's, reported by each backend shortly after
    // its transactions commit: they converge within a few seconds.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let rows = loop {
        let (s, body) = app
            .call(
                reqwest::Method::GET,
                "/v1/admin/stats",
                &app.superuser,
                None,
            )
            .await;
        assert_eq!(s, 200, "{body}");
        let rows = body.as_array().unwrap().clone();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["slug"], "stats-a");
        let counts = |r: &serde_json::Value| {
            (
                r["statuses"].as_i64(),
                r["behaviors"].as_i64(),
                r["tests"].as_i64(),
            )
        };
        if counts(&rows[0]) == (Some(4), Some(3), Some(0))
            && counts(&rows[1]) == (Some(3), Some(3), Some(0))
        {
            break rows;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "statistics did not converge: {rows:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(rows.iter().all(|r| r["error"].is_null()));
    let (s, _) = app
        .call(reqwest::Method::GET, "/v1/admin/stats", &token, None)
        .await;
    assert_eq!(s, 403);
}

#[tokio::test]
async fn doctor_finds_orphans_missing_schemas_and_version_drift() {
    let db = TestDb::new().await;
    let slugs = create_orgs(&db, "doc", 3).await;
    let clean = fleet::doctor(&db.pool, false).await.unwrap();
    assert!(clean.findings.is_empty(), "{clean:?}");

    sqlx::raw_sql("CREATE SCHEMA t_orphan; CREATE TABLE t_orphan.keep (v int); INSERT INTO t_orphan.keep VALUES (1);")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::raw_sql(&format!(
        "DROP SCHEMA {} CASCADE",
        schema(&db, &slugs[0]).await
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::raw_sql(&format!(
        "UPDATE tenantry.organizations SET template_version = 7 WHERE slug = '{}'",
        slugs[1]
    ))
    .execute(&db.pool)
    .await
    .unwrap();

    let found = fleet::doctor(&db.pool, false).await.unwrap();
    assert!(
        found.findings.contains(&Finding::OrphanSchema {
            schema: "t_orphan".into()
        }),
        "{found:?}"
    );
    assert!(found.findings.contains(&Finding::MissingSchema {
        slug: slugs[0].clone(),
        schema: schema(&db, &slugs[0]).await
    }));
    assert!(found.findings.contains(&Finding::VersionMismatch {
        slug: slugs[1].clone(),
        registry: 7,
        history: Some(1)
    }));
    assert_eq!(found.findings.len(), 3, "{found:?}");
    assert!(found.repaired.is_empty());

    let (ok, out, _) = db.cli(&["doctor"]);
    assert!(!ok, "problems must give a non-zero exit");
    assert!(out.contains("t_orphan"), "{out}");

    let repaired = fleet::doctor(&db.pool, true).await.unwrap();
    assert_eq!(repaired.repaired.len(), 1, "{repaired:?}");
    assert_eq!(version_of(&db, &slugs[1]).await, 1);
    // the orphan's data is never dropped automatically
    assert_eq!(db.count("SELECT count(*) FROM t_orphan.keep").await, 1);
    assert_eq!(repaired.left.len(), 2);
}

/// A tenant whose `tests` table is locked by a long transaction: the run
/// finishes every other tenant without waiting for it, retries it, and
/// reports it as `lock_timeout` (non-zero exit, named), leaving it at its
/// version; meanwhile that tenant's API reads keep answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_locked_tenant_times_out_is_retried_and_reported_while_reads_go_on() {
    let app = common::spawn_app().await;
    let mut tokens = vec![];
    for i in 0..6 {
        tokens.push(app.org_with_token(&format!("lk-{i}")).await);
    }
    let locked = "lk-3";
    let schema = app.db.schema_of(locked).await;
    // an open transaction that wrote to the tenant's tests table: it holds
    // a lock that ALTER TABLE must wait for
    let mut holder = app.db.pool.begin().await.unwrap();
    sqlx::raw_sql(&format!("LOCK TABLE {schema}.tests IN ROW EXCLUSIVE MODE"))
        .execute(&mut *holder)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let v1 = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tenant_template/V1__initial.sql"),
    )
    .unwrap();
    std::fs::write(dir.path().join("V1__initial.sql"), v1).unwrap();
    std::fs::write(dir.path().join("V2__priority.sql"), V2_PRIORITY).unwrap();

    // readers of the locked tenant, all through the run
    let reading = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let reader = {
        let (http, url, token, reading) = (
            app.http.clone(),
            app.url(&format!("/v1/orgs/{locked}/tests")),
            tokens[3].clone(),
            reading.clone(),
        );
        tokio::spawn(async move {
            let mut statuses = std::collections::BTreeMap::new();
            while reading.load(std::sync::atomic::Ordering::Relaxed) {
                let res = http.get(&url).bearer_auth(&token).send().await.unwrap();
                *statuses.entry(res.status().as_u16()).or_insert(0) += 1;
            }
            statuses
        })
    };
    let started = std::time::Instant::now();
    let db_url = app.db.url.clone();
    let dir_path = dir.path().to_owned();
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tenantry"))
            .args(["migrate", "--json", "--lock-retries", "2", "--template-dir"])
            .arg(&dir_path)
            .env("DATABASE_URL", db_url)
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap();
    let took = started.elapsed();
    reading.store(false, std::sync::atomic::Ordering::Relaxed);
    let reads = reader.await.unwrap();
    holder.rollback().await.unwrap();

    assert!(
        !ok,
        "a tenant that never got its locks must fail the run: {out}"
    );
    assert!(err.contains("lock"), "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["migrated"], 5, "{report}");
    assert_eq!(report["lock_timeouts"], 1, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    let f = &report["failures"][0];
    assert_eq!(f["outcome"], "lock_timeout");
    assert_eq!(f["slug"], locked);
    assert_eq!(f["attempts"], 3);
    assert_eq!(version_of(&app.db, locked).await, 1);
    assert!(!has_priority(&app.db, locked).await);
    for i in [0, 1, 2, 4, 5] {
        assert_eq!(version_of(&app.db, &format!("lk-{i}")).await, 2);
    }
    let status = fleet::status(&app.db.pool).await.unwrap();
    assert!(status
        .failed
        .iter()
        .any(|f| f.slug == locked && f.error.contains("lock_timeout")));
    // the readers were served throughout (queued behind a waiting migration
    // at most for its 1 s lock timeout, under the serving 2 s one)
    println!("run took {took:?}; reads of the locked tenant: {reads:?}");
    assert_eq!(
        reads.keys().copied().collect::<Vec<_>>(),
        [200],
        "{reads:?}"
    );
    assert!(reads[&200] > 5);
    // once the lock is gone, a rerun finishes it
    let v2 = Template::from_dir(dir.path()).unwrap();
    let rerun = fleet::migrate(&app.db.pool, &v2, &opts(2), |_| {})
        .await
        .unwrap();
    assert_eq!((rerun.migrated, rerun.lock_timeouts), (1, 0));
    assert!(fleet::status(&app.db.pool).await.unwrap().failed.is_empty());
}

/// A migration marked `-- tenantry:no-transaction` (CREATE INDEX
/// CONCURRENTLY) runs outside a transaction; killed during its build, it
/// leaves an invalid index, which the next run drops before building again:
/// the index ends valid and exists once. New orgs get it in their
/// provisioning transaction, without CONCURRENTLY.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_concurrent_index_build_survives_being_killed() {
    let db = TestDb::new().await;
    let slugs = create_orgs(&db, "cic", 3).await;
    let big = &slugs[0];
    let schema = schema(&db, big).await;
    let cic = "-- tenantry:no-transaction\nCREATE INDEX CONCURRENTLY IF NOT EXISTS tests_prompt_idx ON tests (prompt, expected_outcome);\n";
    let (_dir, v2) = template_dir(&[("V2__prompt_index.sql", cic)]);

    // A writer that stays open on the big tenant's table: the concurrent
    // build, once its (invalid) index exists, waits for it to end. It must
    // wait (no lock timeout fails it) and is killed while waiting.
    let mut writer = db.pool.begin().await.unwrap();
    sqlx::raw_sql(&format!(
        "INSERT INTO {schema}.tests (prompt, expected_outcome, behavior_id, status_id, created_by, updated_by) \
         SELECT 'p', 'o', (SELECT id FROM {schema}.behaviors LIMIT 1), \
                (SELECT id FROM {schema}.statuses LIMIT 1), gen_random_uuid(), gen_random_uuid()"
    ))
    .execute(&mut *writer)
    .await
    .unwrap();
    let killer = {
        let pool = db.pool.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            loop {
                // waiting longer than the 1 s lock timeout proves the build
                // runs without one
                let waiting: Option<(i32, f64)> = sqlx::query_as(
                    "SELECT pid, extract(epoch FROM now() - query_start)::float8 FROM pg_stat_activity \
                     WHERE query LIKE '%CREATE INDEX CONCURRENTLY%' AND wait_event_type = 'Lock' \
                       AND pid <> pg_backend_pid() LIMIT 1",
                )
                .fetch_optional(&pool)
                .await
                .unwrap();
                if let Some((pid, waited)) = waiting {
                    if waited > 1.5 {
                        sqlx::query("SELECT pg_terminate_backend($1)")
                            .bind(pid)
                            .execute(&pool)
                            .await
                            .unwrap();
                        return;
                    }
                }
                assert!(
                    started.elapsed() < std::time::Duration::from_secs(60),
                    "the build never waited"
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
    };
    let first = fleet::migrate(&db.pool, &v2, &opts(1), |_| {})
        .await
        .unwrap();
    killer.await.unwrap();
    writer.rollback().await.unwrap();
    assert_eq!(first.failed, 1, "{first:?}");
    assert!(
        matches!(&first.failures[0], TenantOutcome::Failed { slug, migration, .. }
        if slug == big && migration.as_deref() == Some("V2__prompt_index"))
    );
    let invalid = |db: &TestDb, schema: String| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_as::<_, (i64, i64)>(
                "SELECT count(*), count(*) FILTER (WHERE NOT i.indisvalid) FROM pg_index i \
                 JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = 'tests_prompt_idx'",
            )
            .bind(schema)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(
        invalid(&db, schema.clone()).await,
        (1, 1),
        "the killed build leaves an invalid index"
    );
    assert_eq!(version_of(&db, big).await, 1);
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM {schema}.refinery_schema_history WHERE version = 2"
        ))
        .await,
        0,
        "not recorded before it succeeded"
    );

    // the rerun drops the invalid index and builds it again
    let second = fleet::migrate(&db.pool, &v2, &opts(1), |_| {})
        .await
        .unwrap();
    assert_eq!((second.migrated, second.failed), (1, 0), "{second:?}");
    assert_eq!(invalid(&db, schema.clone()).await, (1, 0));
    for s in &slugs {
        assert_eq!(version_of(&db, s).await, 2);
        assert_eq!(
            invalid(&db, super_schema(&db, s).await).await,
            (1, 0),
            "{s}"
        );
    }
    // a new org gets the index in its provisioning transaction
    let created = provision::create_org(
        &db.pool,
        &v2,
        &NewOrg::parse("cic-new", "New", None).unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(created.organization.template_version, 2);
    assert_eq!(
        invalid(&db, created.organization.schema_name.to_string()).await,
        (1, 0)
    );
    // and a second no-transaction statement in one file is refused
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("V1__a.sql"), "CREATE TABLE a (x int);").unwrap();
    std::fs::write(
        dir.path().join("V2__b.sql"),
        "-- tenantry:no-transaction\nCREATE INDEX CONCURRENTLY a_x ON a (x);\nCREATE INDEX CONCURRENTLY a_y ON a (x);",
    )
    .unwrap();
    let err = Template::from_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("exactly one statement"), "{err}");
}

async fn super_schema(db: &TestDb, slug: &str) -> String {
    schema(db, slug).await
}

/// Warm schemas built before a template upgrade: signups of the new
/// version never take them, and `migrate` replaces them by schemas at the
/// new version.
#[tokio::test]
async fn migrate_rebuilds_outdated_warm_schemas() {
    let db = TestDb::new().await;
    create_orgs(&db, "old", 2).await;
    let v1 = Template::embedded();
    tenantry::tenants::warm::fill(&db.pool, &v1, 2)
        .await
        .unwrap();
    let old_warm: Vec<String> = sqlx::query_scalar("SELECT schema_name FROM tenantry.warm_schemas")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let (_dir, v2) = template_dir(&[("V2__priority.sql", V2_PRIORITY)]);
    let status = tenantry::tenants::warm::status(&db.pool, &v2)
        .await
        .unwrap();
    assert_eq!((status.ready, status.outdated), (0, 2));
    // a signup at v2 builds its own schema rather than take a v1 one
    let created = provision::create_org(
        &db.pool,
        &v2,
        &NewOrg::parse("new-00", "New", None).unwrap(),
    )
    .await
    .unwrap();
    assert!(!old_warm.contains(&created.organization.schema_name.to_string()));
    assert!(has_priority(&db, "new-00").await);

    let report = fleet::migrate(&db.pool, &v2, &opts(2), |_| {})
        .await
        .unwrap();
    assert_eq!((report.migrated, report.warm_rebuilt), (2, 2), "{report:?}");
    let status = tenantry::tenants::warm::status(&db.pool, &v2)
        .await
        .unwrap();
    assert_eq!((status.ready, status.outdated), (2, 0));
    for schema in &old_warm {
        assert!(!db.schema_exists(schema).await, "{schema} left behind");
    }
    // what the next signup gets is at v2
    let created = provision::create_org(
        &db.pool,
        &v2,
        &NewOrg::parse("new-01", "New", None).unwrap(),
    )
    .await
    .unwrap();
    assert!(has_priority(&db, "new-01").await);
    assert_eq!(created.organization.template_version, 2);
    assert!(fleet::doctor(&db.pool, false)
        .await
        .unwrap()
        .findings
        .is_empty());
    let (ok, out, err) = db.cli(&["warm", "status"]);
    assert!(ok, "{err}");
    assert!(out.contains("OUTDATED"), "{out}");
}

/// A warm schema dropped by hand: signups skip it, the doctor names it
/// (not as an orphan) and `--repair` removes it from the pool.
#[tokio::test]
async fn doctor_finds_a_lost_warm_schema_and_signups_skip_it() {
    let db = TestDb::new().await;
    let template = Template::embedded();
    tenantry::tenants::warm::fill(&db.pool, &template, 2)
        .await
        .unwrap();
    let (lost_id, lost): (uuid::Uuid, String) = sqlx::query_as(
        "SELECT org_id, schema_name FROM tenantry.warm_schemas ORDER BY created_at LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    sqlx::raw_sql(&format!("DROP SCHEMA {lost} CASCADE"))
        .execute(&db.pool)
        .await
        .unwrap();
    let found = fleet::doctor(&db.pool, false).await.unwrap();
    assert_eq!(
        found.findings,
        [Finding::MissingWarmSchema {
            schema: lost.clone()
        }]
    );
    let created = provision::create_org(
        &db.pool,
        &template,
        &NewOrg::parse("skip", "Skip", None).unwrap(),
    )
    .await
    .unwrap();
    assert_ne!(created.organization.id, lost_id);
    assert!(
        db.schema_exists(created.organization.schema_name.as_str())
            .await
    );

    let repaired = fleet::doctor(&db.pool, true).await.unwrap();
    assert_eq!(repaired.repaired.len(), 1, "{repaired:?}");
    assert_eq!(
        db.count("SELECT count(*) FROM tenantry.warm_schemas").await,
        0
    );
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) FROM pg_roles WHERE rolname = 't_{}'",
            lost_id.simple()
        ))
        .await,
        0
    );
    assert!(fleet::doctor(&db.pool, false)
        .await
        .unwrap()
        .findings
        .is_empty());
}

/// One release changing a shared table and a tenant table: `migrate`
/// applies the shared migration first, then the tenant one that needs it
/// (and copies from it); a tenant migration needing a shared version the
/// database lacks is refused before any tenant changes. `query --all` reads
/// the shared schema too.
#[tokio::test]
async fn a_release_changing_shared_and_tenant_tables_migrates_in_order() {
    let db = TestDb::new().await;
    let slugs = create_orgs(&db, "rel", 3).await;
    let shared_dir = tempfile::tempdir().unwrap();
    for m in tenantry::tenants::shared::embedded_template().migrations() {
        std::fs::write(shared_dir.path().join(format!("{m}.sql")), m.sql().unwrap()).unwrap();
    }
    std::fs::write(
        shared_dir.path().join("V2__severity.sql"),
        "ALTER TABLE catalog_behaviors ADD COLUMN severity integer NOT NULL DEFAULT 2;\n\
         UPDATE catalog_behaviors SET severity = 5 WHERE name = 'Compliance';\n",
    )
    .unwrap();
    let copy = "-- tenantry:requires-shared 2\n\
                ALTER TABLE behaviors ADD COLUMN severity integer NOT NULL DEFAULT 2;\n\
                UPDATE behaviors b SET severity = c.severity FROM shared.catalog_behaviors c \
                WHERE lower(c.name) = lower(b.name);\n";

    // first without the shared change: refused, nothing touched
    let (tenant_dir, _) = template_dir(&[("V2__severity.sql", copy)]);
    let (ok, out, err) = db.cli(&[
        "migrate",
        "--template-dir",
        tenant_dir.path().to_str().unwrap(),
    ]);
    assert!(!ok, "{out}");
    assert!(
        err.contains("V2__severity") && err.contains("requires shared version 2"),
        "{err}"
    );
    for s in &slugs {
        assert_eq!(version_of(&db, s).await, 1);
    }

    // this release's `migrate`, with `extra` flags
    let migrate = |extra: &[&str]| {
        let mut args = vec!["migrate", "--json"];
        args.extend_from_slice(extra);
        args.extend([
            "--template-dir",
            tenant_dir.path().to_str().unwrap(),
            "--shared-template-dir",
            shared_dir.path().to_str().unwrap(),
        ]);
        db.cli(&args)
    };
    // the plan names both, changes nothing
    let (ok, out, err) = migrate(&["--plan"]);
    assert!(ok, "{out}{err}");
    let plan: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(plan["shared_pending"], serde_json::json!(["V2__severity"]));
    assert_eq!(plan["behind"].as_array().unwrap().len(), 3);

    // then the whole release
    let (ok, out, err) = migrate(&[]);
    assert!(ok, "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        report["shared"]["applied"],
        serde_json::json!(["V2__severity"])
    );
    assert_eq!(report["shared"]["version"], 2);
    assert_eq!(report["migrated"], 3);
    for s in &slugs {
        assert_eq!(version_of(&db, s).await, 2);
        assert_eq!(
            db.count(&format!(
                "SELECT severity::bigint FROM {}.behaviors WHERE name = 'Compliance'",
                schema(&db, s).await
            ))
            .await,
            5
        );
    }
    let (ok, out, _) = db.cli(&["migrate", "status", "--json"]);
    assert!(ok);
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["shared_version"], 2, "{out}");
    // the tenant roles read the new shared column through query --all
    let (ok, out, err) = db.cli(&[
        "query",
        "--all",
        "SELECT max(severity) AS top FROM catalog_behaviors",
        "--format",
        "json",
    ]);
    assert!(ok, "{out}{err}");
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3, "{out}");
    assert!(rows.iter().all(|r| r["top"] == 5), "{out}");
    // and a server of this release (whose shared template is older) starts
    // on the newer database and leaves it as it is
    tenantry::tenants::migrate_database(&db.pool).await.unwrap();
    assert_eq!(
        db.count("SELECT max(version)::bigint FROM shared.refinery_schema_history")
            .await,
        2
    );
}
