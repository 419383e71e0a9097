//! Citus-only behaviour, on a throwaway cluster (a coordinator and two
//! workers) started by the harness: where tenants and the registry live,
//! and moving tenants between workers. The rest of the suite runs on Citus
//! too (`TENANTRY_TEST_ENGINE=citus`, see `scripts/test`). Without the
//! Citus extension these tests say they were skipped, unless
//! `TENANTRY_REQUIRE_CITUS=1`, which makes that a failure.

mod common;

use std::collections::BTreeSet;

use common::TestDb;

/// Each tenant schema is a distributed schema on one worker, tenants land
/// on both workers, and the registry stays a local schema of the
/// coordinator.
#[tokio::test]
async fn tenants_spread_over_both_workers_and_the_registry_stays_local() {
    let Some(db) = TestDb::on_citus().await else {
        return;
    };
    let slugs = db.create_orgs("spread", 8).await;
    let placed: Vec<(String, i32)> = sqlx::query_as(
        "SELECT o.slug, min(s.nodeport) FROM tenantry.organizations o \
         JOIN citus_shards s ON s.citus_table_type = 'schema' \
           AND s.table_name::text LIKE o.schema_name || '.%' \
         GROUP BY o.slug ORDER BY o.slug",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        placed.iter().map(|p| p.0.clone()).collect::<Vec<_>>(),
        slugs,
        "every org has shards"
    );
    let workers: BTreeSet<i32> = placed.iter().map(|p| p.1).collect();
    let cluster = common::citus_cluster();
    assert_eq!(
        workers,
        cluster.workers.iter().map(|w| i32::from(*w)).collect(),
        "tenants on both workers: {placed:?}"
    );
    // every table of a tenant is on the same worker as the others
    let split: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT split_part(table_name::text, '.', 1) \
         FROM citus_shards WHERE citus_table_type = 'schema' \
         GROUP BY 1 HAVING count(DISTINCT nodeport) > 1) x",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(split, 0);
    let distributed_schemas: Vec<String> =
        sqlx::query_scalar("SELECT schema_name::text FROM citus_schemas ORDER BY 1")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(distributed_schemas.len(), 8);
    assert!(!distributed_schemas.iter().any(|s| s == "tenantry"));
    let registry_tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM citus_tables WHERE table_name::text LIKE 'tenantry.%'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        registry_tables, 0,
        "the registry is local to the coordinator"
    );
}

/// `tenantry nodes`, the node of each org (API and CLI), and moves between
/// workers through the API, with their errors.
#[tokio::test]
async fn nodes_placement_and_moves_through_the_api_and_cli() {
    let Some(db) = TestDb::on_citus().await else {
        return;
    };
    let slugs = db.create_orgs("placed", 4).await;
    let cli_db = TestDb {
        pool: db.pool.clone(),
        url: db.url.clone(),
        name: db.name.clone(),
    };
    let (ok, out, err) = cli_db.cli(&["nodes", "--json"]);
    assert!(ok, "{err}");
    let nodes: serde_json::Value = serde_json::from_str(&out).unwrap();
    let nodes = nodes.as_array().unwrap();
    assert_eq!(nodes.len(), 2, "{out}");
    assert_eq!(
        nodes
            .iter()
            .map(|n| n["tenants"].as_i64().unwrap())
            .sum::<i64>(),
        4
    );
    assert!(nodes.iter().all(|n| n["bytes"].as_i64().unwrap() >= 0));
    let names: Vec<String> = nodes
        .iter()
        .map(|n| n["node"].as_str().unwrap().to_owned())
        .collect();

    let app = common::spawn_app_on(db, tenantry::server::ServerConfig::default()).await;
    let slug = &slugs[0];
    let from = node_of(&app, slug).await;
    let to = names.iter().find(|n| **n != from).unwrap().clone();
    let (s, body) = move_org(&app, slug, &to).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["moved"], true);
    assert_eq!(body["from"], from.as_str());
    assert_eq!(body["to"], to.as_str());
    assert_eq!(node_of(&app, slug).await, to);
    // the list shows it too, from Citus' metadata
    let (s, page) = app
        .call(reqwest::Method::GET, "/v1/admin/orgs", &app.superuser, None)
        .await;
    assert_eq!(s, 200);
    let listed = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["slug"] == slug.as_str())
        .unwrap()
        .clone();
    assert_eq!(listed["node"], to.as_str());
    // and the org still serves, from its new node
    let token = app_token(&app, slug).await;
    let (s, _) = app
        .call(
            reqwest::Method::GET,
            &format!("/v1/orgs/{slug}/statuses"),
            &token,
            None,
        )
        .await;
    assert_eq!(s, 200);
    // moving it where it is changes nothing
    let (s, body) = move_org(&app, slug, &to).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["moved"], false);
    // unknown and malformed nodes are the caller's mistake
    for (to, needle) in [
        ("127.0.0.1:1", "is not a node of this Citus cluster"),
        ("nowhere", "is not host:port"),
    ] {
        let (s, body) = move_org(&app, slug, to).await;
        assert_eq!(s, 422, "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(needle),
            "{body}"
        );
    }
    // the CLI moves it back, and lists nodes per org
    let (ok, out, err) = app.db.cli(&["orgs", "move", slug, "--to", &from, "--json"]);
    assert!(ok, "{err}");
    let moved: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(moved["to"], from.as_str());
    let (ok, out, err) = app.db.cli(&["orgs", "list"]);
    assert!(ok, "{err}");
    assert!(out.lines().next().unwrap().contains("NODE"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with(slug.as_str()) && l.trim_end().ends_with(&from)),
        "{out}"
    );
    let (ok, _, err) = app.db.cli(&["rebalance", "--plan"]);
    assert!(ok, "{err}");
}

/// The node of org `slug`, as the admin API shows it.
async fn node_of(app: &common::TestApp, slug: &str) -> String {
    let (s, body) = app
        .call(
            reqwest::Method::GET,
            &format!("/v1/admin/orgs/{slug}"),
            &app.superuser,
            None,
        )
        .await;
    assert_eq!(s, 200, "{body}");
    body["node"].as_str().unwrap().to_owned()
}

async fn move_org(app: &common::TestApp, slug: &str, to: &str) -> (u16, serde_json::Value) {
    app.call(
        reqwest::Method::POST,
        &format!("/v1/admin/orgs/{slug}/move"),
        &app.superuser,
        Some(serde_json::json!({ "to": to })),
    )
    .await
}

async fn app_token(app: &common::TestApp, slug: &str) -> String {
    let (s, body) = app
        .call(
            reqwest::Method::POST,
            &format!("/v1/admin/orgs/{slug}/tokens"),
            &app.superuser,
            Some(serde_json::json!({"email": format!("member@{slug}.test")})),
        )
        .await;
    assert_eq!(s, 201, "{body}");
    body["token"]["token"].as_str().unwrap().to_owned()
}

/// On plain PostgreSQL, placement commands and the move endpoint say that
/// they need Citus, instead of failing obscurely.
#[tokio::test]
async fn placement_on_plain_postgresql_is_refused_clearly() {
    let app = common::spawn_app().await;
    app.org_with_token("plain").await;
    let (s, body) = app
        .call(
            reqwest::Method::POST,
            "/v1/admin/orgs/plain/move",
            &app.superuser,
            Some(serde_json::json!({ "to": "127.0.0.1:5432" })),
        )
        .await;
    assert_eq!(s, 409, "{body}");
    assert_eq!(body["error"]["code"], "citus_required");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("moves need a Citus cluster"),
        "{body}"
    );
    let (s, body) = app
        .call(
            reqwest::Method::GET,
            "/v1/admin/orgs/plain",
            &app.superuser,
            None,
        )
        .await;
    assert_eq!(s, 200);
    assert!(body["node"].is_null(), "{body}");
    for args in [
        &["nodes"][..],
        &["rebalance"][..],
        &["orgs", "move", "plain", "--to", "127.0.0.1:5432"][..],
    ] {
        let (ok, _, err) = app.db.cli(args);
        assert!(!ok, "{args:?}");
        assert!(
            err.contains("need a Citus cluster") || err.contains("needs a Citus cluster"),
            "{args:?}: {err}"
        );
    }
}

/// An org moved between workers while a writer inserts through the API
/// and a reader reads: every read is answered, and every write the API
/// acknowledged is there afterwards, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_move_under_load_keeps_reads_and_every_acknowledged_write() {
    let Some(db) = TestDb::on_citus().await else {
        return;
    };
    let app = common::spawn_app_on(db, tenantry::server::ServerConfig::default()).await;
    let token = app.org_with_token("busy").await;
    let schema = app.db.schema_of("busy").await;
    // some data to copy
    sqlx::raw_sql(&format!(
        "INSERT INTO {schema}.tests (prompt, expected_outcome, behavior_id, status_id, created_by, updated_by) \
         SELECT 'seed ' || g, 'ok', (SELECT id FROM {schema}.behaviors LIMIT 1), (SELECT id FROM {schema}.statuses LIMIT 1), \
                '00000000-0000-0000-0000-000000000000', '00000000-0000-0000-0000-000000000000' \
         FROM generate_series(1, 20000) g"
    ))
    .execute(&app.db.pool)
    .await
    .unwrap();
    let first = |kind: &'static str| {
        let (app_url, http, token) = (
            app.url(&format!("/v1/orgs/busy/{kind}")),
            app.http.clone(),
            token.clone(),
        );
        async move {
            let body: serde_json::Value = http
                .get(app_url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            body["items"][0]["id"].as_str().unwrap().to_owned()
        }
    };
    let (behavior, status) = (first("behaviors").await, first("statuses").await);
    let (from, to) = {
        let from = node_of(&app, "busy").await;
        let workers = &common::citus_cluster().workers;
        let to = workers
            .iter()
            .map(|w| format!("127.0.0.1:{w}"))
            .find(|n| *n != from)
            .unwrap();
        (from, to)
    };

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (http, url, token, stop) = (
            app.http.clone(),
            app.url("/v1/orgs/busy/tests"),
            token.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let (mut acked, mut refused) = (vec![], vec![]);
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let prompt = format!("w-{n}");
                let res = http
                    .post(&url)
                    .bearer_auth(&token)
                    .json(
                        &serde_json::json!({"prompt": prompt, "expected_outcome": "ok",
                        "behavior_id": behavior, "status_id": status}),
                    )
                    .send()
                    .await
                    .unwrap();
                if res.status().is_success() {
                    acked.push(prompt);
                } else {
                    refused.push(res.status().as_u16());
                }
            }
            (acked, refused)
        })
    };
    let reader = {
        let (http, url, token, stop) = (
            app.http.clone(),
            app.url("/v1/orgs/busy/tests?limit=5"),
            token.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u64, vec![]);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let res = http.get(&url).bearer_auth(&token).send().await.unwrap();
                if res.status() == 200 {
                    ok += 1;
                } else {
                    failed.push(res.status().as_u16());
                }
            }
            (ok, failed)
        })
    };
    // let both run before, during and after the move
    let started = std::time::Instant::now();
    while writer_progress(&app, &schema).await < 50 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "the writer is not writing"
        );
        tokio::task::yield_now().await;
    }
    let (s, body) = move_org(&app, "busy", &to).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["moved"], true, "{body}");
    let after_move = writer_progress(&app, &schema).await;
    while writer_progress(&app, &schema).await < after_move + 50 {
        tokio::task::yield_now().await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acked, refused) = writer.await.unwrap();
    let (reads, failed_reads) = reader.await.unwrap();
    println!(
        "move {from} -> {to} in {:.2} s: {} writes acknowledged, {} refused {:?}; {reads} reads, {} failed",
        body["seconds"].as_f64().unwrap(),
        acked.len(),
        refused.len(),
        refused,
        failed_reads.len()
    );
    assert!(failed_reads.is_empty(), "reads failed: {failed_reads:?}");
    let stored: Vec<(String, i64)> = sqlx::query_as(&format!(
        "SELECT prompt, count(*) FROM {schema}.tests WHERE prompt LIKE 'w-%' GROUP BY prompt"
    ))
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    let stored: std::collections::HashMap<String, i64> = stored.into_iter().collect();
    let lost: Vec<&String> = acked.iter().filter(|p| !stored.contains_key(*p)).collect();
    let twice: Vec<(&String, &i64)> = stored.iter().filter(|(_, n)| **n > 1).collect();
    if !lost.is_empty() {
        // where did they go? every worker's copies of the table
        for w in &common::citus_cluster().workers {
            let url = common::citus_cluster().url(*w, &app.db.name);
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        sqlx::Executor::execute(
                            conn,
                            "SET citus.show_shards_for_app_name_prefixes = '*'",
                        )
                        .await?;
                        Ok(())
                    })
                })
                .connect(&url)
                .await
                .unwrap();
            let found: Vec<(String, String)> = sqlx::query_as(
                "SELECT n.nspname || '.' || c.relname, '' FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname LIKE 'tests_%' AND c.relkind = 'r'",
            )
            .bind(&schema)
            .fetch_all(&pool)
            .await
            .unwrap();
            for (table, _) in found {
                let n: i64 = sqlx::query_scalar(&format!(
                    "SELECT count(*) FROM {table} WHERE prompt = ANY($1)"
                ))
                .bind(&lost)
                .fetch_one(&pool)
                .await
                .unwrap();
                eprintln!("worker {w}: {table} holds {n} of the lost rows");
            }
        }
    }
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    assert!(twice.is_empty(), "writes stored twice: {twice:?}");
    assert_eq!(node_of(&app, "busy").await, to);
}

/// Rows the writer has stored so far.
async fn writer_progress(app: &common::TestApp, schema: &str) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {schema}.tests WHERE prompt LIKE 'w-%'"
    ))
    .fetch_one(&app.db.pool)
    .await
    .unwrap()
}

/// `tenantry rebalance` spreads tenants piled on one worker over both,
/// and prints the moves it made.
#[tokio::test]
async fn rebalance_spreads_tenants_piled_on_one_worker() {
    let Some(db) = TestDb::on_citus().await else {
        return;
    };
    let slugs = db.create_orgs("pile", 6).await;
    let workers = common::citus_cluster().workers.clone();
    let first = format!("127.0.0.1:{}", workers[0]);
    for slug in &slugs {
        let (ok, _, err) = db.cli(&["orgs", "move", slug, "--to", &first]);
        assert!(ok, "{err}");
    }
    let tenants_on = |out: &str| -> Vec<i64> {
        let nodes: serde_json::Value = serde_json::from_str(out).unwrap();
        nodes
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["tenants"].as_i64().unwrap())
            .collect()
    };
    let (ok, out, err) = db.cli(&["nodes", "--json"]);
    assert!(ok, "{err}");
    assert_eq!(tenants_on(&out).iter().max(), Some(&6), "{out}");
    let (ok, out, err) = db.cli(&["rebalance", "--plan", "--json"]);
    assert!(ok, "{err}");
    let planned: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(!planned.as_array().unwrap().is_empty(), "{out}");
    let (ok, out, err) = db.cli(&["rebalance"]);
    assert!(ok, "{err}");
    assert!(out.contains("move(s) made"), "{out}");
    let (ok, out, err) = db.cli(&["nodes", "--json"]);
    assert!(ok, "{err}");
    let after = tenants_on(&out);
    assert!(after.iter().all(|n| *n >= 2), "still piled up: {out}");
    // and now it is balanced
    let (ok, out, err) = db.cli(&["rebalance", "--plan"]);
    assert!(ok, "{err}");
    assert!(out.contains("balanced: nothing to move"), "{out}");
}
