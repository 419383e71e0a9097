//! Reads from streaming replicas with read-your-writes per org, against a
//! cluster of this binary's own with three replicas made as
//! `serve --local-replicas` makes them (`pg_basebackup -R`): one current,
//! one held 1.5 s behind on purpose (`recovery_min_apply_delay`), and one
//! that a test stops and starts again.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::{TestApp, TestDb};
use reqwest::Method;
use serde_json::json;
use tenantry::base::lsn::Lsn;
use tenantry::pg::embedded::{Durability, LocalPostgres};
use tenantry::server::ServerConfig;

const GET: Method = Method::GET;
const POST: Method = Method::POST;

/// How far behind the lagging replica is held.
const APPLY_DELAY: Duration = Duration::from_millis(1500);

struct Cluster {
    current: LocalPostgres,
    lagging: LocalPostgres,
    restartable: LocalPostgres,
}

fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("tenantry-test-replicas-")
            .tempdir()
            .expect("temp dir")
            .keep();
        let primary = LocalPostgres::ensure_running(&dir, Durability::Throwaway)
            .unwrap_or_else(|e| panic!("cannot start a test PostgreSQL: {e}"));
        primary
            .remove_when_process_exits(std::process::id())
            .expect("watchdog for the test cluster");
        let replica = |index, delay| {
            primary
                .ensure_replica(index, Durability::Throwaway, delay)
                .unwrap_or_else(|e| panic!("cannot make replica {index}: {e}"))
        };
        let cluster = Cluster {
            current: replica(1, None),
            lagging: replica(2, Some(APPLY_DELAY)),
            restartable: replica(3, None),
        };
        assert!(
            common::use_server(primary.url("postgres")),
            "this binary's tests use its replicated cluster only"
        );
        cluster
    })
}

/// `replica`'s URL for the test database `db`, as the primary's `url`
/// logs in.
fn on_replica(replica: &LocalPostgres, db: &TestDb) -> String {
    let mut url = url::Url::parse(&db.url).unwrap();
    url.set_port(Some(replica.port())).unwrap();
    url.to_string()
}

fn config_with(urls: Vec<String>) -> ServerConfig {
    ServerConfig {
        replica_urls: urls,
        // the lagging replica is 1.5 s behind while writes flow: still usable
        replicas: tenantry::serving::replicas::ReplicaConfig {
            max_lag: Duration::from_secs(30),
            ..Default::default()
        },
        ..Default::default()
    }
}

async fn app_reading_from(replicas: &[&LocalPostgres]) -> TestApp {
    cluster();
    let db = TestDb::new().await;
    let urls = replicas.iter().map(|r| on_replica(r, &db)).collect();
    common::spawn_app_on(db, config_with(urls)).await
}

fn replicas(app: &TestApp) -> &Arc<tenantry::serving::replicas::Replicas> {
    app.state
        .tenancy
        .router()
        .replicas()
        .expect("the app has replicas")
}

/// Waits (up to 30 s) until `org`'s reads may go to a replica: it is up,
/// and has replayed the org's creation.
async fn until_replica_serves(app: &TestApp, slug: &str) {
    let tenant = app.tenant(slug).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while replicas(app).choose(&tenant.id, Lsn(0)).is_none() {
        assert!(
            Instant::now() < deadline,
            "no replica became usable for {slug}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Creates a behavior in `slug`'s org; returns its id and the response's
/// position header.
async fn write(app: &TestApp, slug: &str, token: &str, name: &str) -> (String, Option<String>) {
    let res = app
        .req(POST, &format!("/v1/orgs/{slug}/behaviors"), token)
        .json(&json!({"name": name}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let position = res
        .headers()
        .get("tenantry-position")
        .map(|v| v.to_str().unwrap().to_owned());
    let body: serde_json::Value = res.json().await.unwrap();
    (body["id"].as_str().unwrap().to_owned(), position)
}

/// Whether the behavior `id` exists on `replica` (read there directly).
async fn on_replica_now(replica: &LocalPostgres, db: &TestDb, schema: &str, id: &str) -> bool {
    let pool = sqlx::PgPool::connect(&on_replica(replica, db))
        .await
        .unwrap();
    let sql = format!("SELECT count(*) FROM \"{schema}\".behaviors WHERE id = $1::uuid");
    let n: i64 = sqlx::query_scalar(&sql)
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    n == 1
}

#[tokio::test]
async fn each_write_is_read_back_at_once_though_the_replica_lags() {
    let app = app_reading_from(&[&cluster().lagging]).await;
    let orgs = ["ryw-a", "ryw-b", "ryw-c", "ryw-d"];
    let mut tokens = vec![];
    for slug in orgs {
        tokens.push(app.org_with_token(slug).await);
    }
    let quiet = app.org_with_token("ryw-quiet").await;
    until_replica_serves(&app, "ryw-quiet").await;
    let replica = &replicas(&app).replicas()[0];

    // The replica really is behind: a write is missing there right after
    // it is acknowledged (so a read sent there would miss it).
    let schema_a = app.db.schema_of("ryw-a").await;
    let (first, _) = write(&app, "ryw-a", &tokens[0], "probe").await;
    assert!(
        !on_replica_now(&cluster().lagging, &app.db, &schema_a, &first).await,
        "the lagging replica had the write at once: the test proves nothing"
    );

    let before = replica.reads_served();
    let mut quiet_reads = 0;
    for i in 0..300 {
        let k = i % orgs.len();
        let (slug, token) = (orgs[k], &tokens[k]);
        let (id, position) = write(&app, slug, token, &format!("w{i}")).await;
        assert!(
            position.is_some(),
            "a write's response carries its position"
        );
        let (s, got) = app
            .call(GET, &format!("/v1/orgs/{slug}/behaviors/{id}"), token, None)
            .await;
        assert_eq!(
            s, 200,
            "pair {i}: the write of {slug} was not read back: {got}"
        );
        assert_eq!(got["id"], id.as_str());
        if i % 10 == 0 {
            let (s, _) = app
                .call(GET, "/v1/orgs/ryw-quiet/behaviors", &quiet, None)
                .await;
            assert_eq!(s, 200);
            quiet_reads += 1;
        }
    }
    // the org that did not write kept reading from the replica
    assert!(
        replica.reads_served() - before >= quiet_reads,
        "{} replica reads for {quiet_reads} reads of the quiet org",
        replica.reads_served() - before
    );
    assert_eq!(replicas(&app).fallbacks(), 0);
    let metrics = app.metrics().await;
    for family in [
        "tenantry_tenant_reads_total{target=\"replica\"}",
        "tenantry_tenant_reads_total{target=\"primary\"}",
        "tenantry_replica_lag_seconds{replica=",
        "pool=\"replicas\"",
    ] {
        assert!(metrics.contains(family), "{family} missing from /metrics");
    }
}

#[tokio::test]
async fn another_server_reads_a_write_given_its_position() {
    let a = app_reading_from(&[&cluster().lagging]).await;
    let db_b = TestDb {
        pool: a.db.pool.clone(),
        url: a.db.url.clone(),
        name: a.db.name.clone(),
    };
    let urls = vec![on_replica(&cluster().lagging, &db_b)];
    let b = common::spawn_app_on(db_b, config_with(urls)).await;
    let token = a.org_with_token("pos").await;
    until_replica_serves(&b, "pos").await;
    let b_replica = &replicas(&b).replicas()[0];
    let before = b_replica.reads_served();
    for i in 0..200 {
        let (id, position) = write(&a, "pos", &token, &format!("w{i}")).await;
        let position = position.expect("a position header");
        Lsn::parse(&position).expect("a WAL position");
        let res = b
            .req(GET, &format!("/v1/orgs/pos/behaviors/{id}"), &token)
            .header("tenantry-position", &position)
            .send()
            .await
            .unwrap();
        assert_eq!(
            res.status(),
            200,
            "pair {i}: b missed a's write at {position}"
        );
        // the position b answers with includes a's write
        let echoed = res.headers()["tenantry-position"].to_str().unwrap();
        assert!(Lsn::parse(echoed).unwrap() >= Lsn::parse(&position).unwrap());
    }
    // Without the position, b reads from its replica (it knows of no
    // write): the header is what made the difference.
    until_replica_serves(&b, "pos").await;
    let (s, _) = b.call(GET, "/v1/orgs/pos/behaviors", &token, None).await;
    assert_eq!(s, 200);
    assert!(b_replica.reads_served() > before);

    // a malformed position is the client's error
    for bad in ["", "12", "0/0/0", "zz/1", "123456789/0"] {
        let res = b
            .req(GET, "/v1/orgs/pos/behaviors", &token)
            .header("tenantry-position", bad)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 400, "{bad:?}");
        let body: serde_json::Value = res.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_position", "{body}");
    }
}

#[tokio::test]
async fn reads_never_fail_while_the_replica_stops_and_it_serves_again_once_back() {
    let replica_pg = &cluster().restartable;
    let app = Arc::new(app_reading_from(&[replica_pg]).await);
    let mut tokens = vec![];
    for i in 0..4 {
        tokens.push((
            format!("stop-{i}"),
            app.org_with_token(&format!("stop-{i}")).await,
        ));
    }
    until_replica_serves(&app, "stop-3").await;
    let failed = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = tokens
        .iter()
        .cloned()
        .map(|(slug, token)| {
            let (app, failed, done, stop) =
                (app.clone(), failed.clone(), done.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let (s, body) = app
                        .call(GET, &format!("/v1/orgs/{slug}/behaviors"), &token, None)
                        .await;
                    if s != 200 {
                        eprintln!("read failed: {s} {body}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let replica = &replicas(&app).replicas()[0];
    wait_for("reads on the replica", || replica.reads_served() > 50).await;

    let stopping = replica_pg.clone();
    tokio::task::spawn_blocking(move || stopping.stop())
        .await
        .unwrap()
        .expect("stop the replica");
    let after_stop = done.load(Ordering::Relaxed);
    wait_for("the replica marked down", || !replica.is_up()).await;
    wait_for("reads while it is down", || {
        done.load(Ordering::Relaxed) > after_stop + 200
    })
    .await;
    let served_while_down = replica.reads_served();

    let starting = replica_pg.clone();
    tokio::task::spawn_blocking(move || starting.start_again(Durability::Throwaway))
        .await
        .unwrap()
        .expect("start the replica again");
    wait_for("the replica back in use", || {
        replica.reads_served() > served_while_down + 50
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "reads failed");
    eprintln!(
        "{} reads, {} on the replica, {} fell back to the primary",
        done.load(Ordering::Relaxed),
        replica.reads_served(),
        replicas(&app).fallbacks()
    );
}

/// Waits (up to 30 s, checking every 20 ms) until `check` holds.
async fn wait_for(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn replica_reads_run_as_the_orgs_role_in_its_schema_only() {
    cluster();
    let db = TestDb::new().await;
    let role = format!("reader_{}", &db.name[14..30]);
    let password = "replica-reader-pw";
    let replica_url = common::with_user(&on_replica(&cluster().current, &db), &role, password);
    let app =
        common::spawn_app_serving_as_with(db, &role, password, config_with(vec![replica_url]))
            .await;
    app.org_with_token("role-a").await;
    app.org_with_token("role-b").await;
    until_replica_serves(&app, "role-a").await;
    until_replica_serves(&app, "role-b").await;
    let router = app.state.tenancy.router();
    let a = app.tenant("role-a").await;
    let b = app.tenant("role-b").await;
    let replica = &replicas(&app).replicas()[0];
    // the replica's tenant pool is shaped like the primary's: tenant-affine
    // sub-pools of the same number and size
    assert_eq!(
        replica.tenant_pool().sub_pool_count(),
        router.tenant_pool().sub_pool_count()
    );
    assert_eq!(
        replica.tenant_pool().max_connections(),
        router.tenant_pool().max_connections()
    );
    assert_eq!(
        replica.tenant_pool().candidates(&a.id),
        router.tenant_pool().candidates(&a.id)
    );

    let before = replica.reads_served();
    let (user, path, in_recovery): (String, String, bool) = router
        .read(&a, async |tx| {
            Ok(tx
                .query_as(
                    "SELECT current_user::text, current_setting('search_path'), pg_is_in_recovery()",
                )
                .fetch_one()
                .await?)
        })
        .await
        .unwrap();
    assert_eq!(
        replica.reads_served(),
        before + 1,
        "the read ran on the replica"
    );
    assert!(in_recovery, "the replica is a replica");
    assert_eq!(user, a.role.as_str());
    assert!(
        path.starts_with(&format!("\"{}\"", a.schema)) || path.starts_with(a.schema.as_str()),
        "{path}"
    );

    // Another org's schema, the registry and public are refused there too
    // (and again on the primary, where the failed read is retried).
    let others: Vec<&'static str> = vec![
        Box::leak(format!("SELECT count(*) FROM \"{}\".behaviors", b.schema).into_boxed_str()),
        "SELECT count(*) FROM tenantry.organizations",
    ];
    for sql in others {
        let err = router
            .read(&a, async move |tx| {
                Ok(tx.query_as::<(i64,)>(sql).fetch_one().await?)
            })
            .await
            .expect_err(sql);
        let text = err.to_string();
        assert!(
            text.contains("permission denied") || text.contains("does not exist"),
            "{sql}: {text}"
        );
    }

    // Invariant 2 on the replica: after those reads (and failed ones),
    // every pooled replica connection is back to the serving role, outside
    // any transaction, with no tenant schema in its search path.
    for sub in replica.tenant_pool().sub_pools() {
        let conn = sub.get().await.unwrap();
        let client = conn.probe_client();
        let answer = client
            .simple_query("SELECT current_setting('search_path'), current_user::text")
            .await
            .expect("no transaction left open");
        let (path, user) = answer
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => Some((
                    row.get(0).unwrap().to_owned(),
                    row.get(1).unwrap().to_owned(),
                )),
                _ => None,
            })
            .unwrap();
        let in_tx = client.batch_execute("SAVEPOINT leak_probe").await.is_ok();
        assert!(
            !in_tx && user == role && !path.contains(a.schema.as_str()),
            "search_path={path} user={user} in_transaction={in_tx}"
        );
    }
}

#[tokio::test]
async fn serve_with_local_replicas_makes_one_reads_from_it_and_stops_it() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("tenantry");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tenantry"))
        .args(["serve", "--local-replicas", "1", "--bind", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(&dir)
        .env_remove("DATABASE_URL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (addr, printed) = common::until_listening(&mut child).await;
    assert!(
        printed
            .iter()
            .any(|l| l.starts_with("reading from a local replica on port")),
        "{printed:?}"
    );
    let token = common::bootstrap_token(&printed);
    let http = reqwest::Client::new();
    let url = |path: &str| format!("{addr}{path}");
    let res = http
        .post(url("/v1/admin/orgs"))
        .bearer_auth(&token)
        .json(&json!({"slug": "local", "name": "Local", "owner_email": "o@local.test"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);

    // the org's reads reach the replica once it has replayed the org
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let res = http
            .get(url("/v1/orgs/local/behaviors"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let metrics = http
            .get(url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let on_replica = metrics
            .lines()
            .find(|l| l.starts_with("tenantry_tenant_reads_total{target=\"replica\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        if on_replica >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no read reached the local replica"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // and a write is read back at once
    let res = http
        .post(url("/v1/orgs/local/behaviors"))
        .bearer_auth(&token)
        .json(&json!({"name": "written"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert!(res.headers().contains_key("tenantry-position"));
    let id = res.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let res = http
        .get(url(&format!("/v1/orgs/local/behaviors/{id}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    common::terminate(child).await;
    for cluster in ["pgdata", "replicas/1/pgdata"] {
        assert!(
            !dir.join(cluster).join("postmaster.pid").exists(),
            "{cluster} still running after serve stopped"
        );
    }
}
