//! Per-tenant fairness, black-box over HTTP: one org sending ten times the
//! others' rate of slow requests gets 429 `tenant_busy` (never a 5xx),
//! while the other orgs' p99 stays within 2x of their p99 without it (in
//! the median round of alternating phases), also for a quiet org whose two
//! sub-pools are the noisy org's two. Its
//! own test binary: it measures latency, so no other test may run beside it.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::routing::get;
use tenantry::api::error::ApiError;
use tenantry::api::extract::OrgScope;
use tenantry::api::TenantApi;
use tenantry::pg::pools::PoolConfig;

/// A slow request of a tenant: 40 ms inside its transaction.
async fn slow(org: OrgScope) -> Result<&'static str, ApiError> {
    let mut tx = org.begin().await?;
    tx.query("SELECT pg_sleep(0.04)").execute().await?;
    tx.commit().await?;
    Ok("done")
}

const QUIET_ORGS: usize = 8;
/// Requests per second of each quiet org; the noisy org sends ten times as
/// many, each holding a connection for 40 ms: about 8 connections' worth.
const QUIET_RATE: u64 = 20;
const PHASE: Duration = Duration::from_millis(2500);
/// Phases with and without the noisy org alternate, so that the machine's
/// drift falls on both alike. Five rounds: a local run after the other
/// suites once had two of three rounds stalled (2.7x and 2.1x, then 1.04x),
/// which three rounds cannot outvote.
const ROUNDS: usize = 5;

struct Outcome {
    /// (index of the quiet org, latency in ms) of each quiet request
    quiet_ms: Vec<(usize, f64)>,
    noisy_statuses: Vec<u16>,
    bad_quiet: Vec<u16>,
}

/// Drives the quiet orgs (and the noisy one, if given) open-loop for
/// `PHASE`: each request starts on its tick, whatever the others do.
async fn drive(
    http: &reqwest::Client,
    api: &str,
    slow_url: &str,
    quiet: &[(String, String)],
    noisy: Option<&(String, String)>,
) -> Outcome {
    let quiet_ms = Arc::new(Mutex::new(vec![]));
    let bad_quiet = Arc::new(Mutex::new(vec![]));
    let noisy_statuses = Arc::new(Mutex::new(vec![]));
    let mut tasks = vec![];
    let started = Instant::now();
    for (org, (slug, token)) in quiet.iter().enumerate() {
        let (http, url, token) = (
            http.clone(),
            format!("{api}/v1/orgs/{slug}/statuses"),
            token.clone(),
        );
        let (quiet_ms, bad_quiet) = (quiet_ms.clone(), bad_quiet.clone());
        tasks.push(tokio::spawn(async move {
            let mut requests = vec![];
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / QUIET_RATE));
            while started.elapsed() < PHASE {
                tick.tick().await;
                let (http, url, token) = (http.clone(), url.clone(), token.clone());
                let (quiet_ms, bad_quiet) = (quiet_ms.clone(), bad_quiet.clone());
                requests.push(tokio::spawn(async move {
                    let sent = Instant::now();
                    let res = http.get(&url).bearer_auth(&token).send().await.unwrap();
                    let status = res.status().as_u16();
                    res.bytes().await.unwrap();
                    if status == 200 {
                        quiet_ms
                            .lock()
                            .unwrap()
                            .push((org, sent.elapsed().as_secs_f64() * 1e3));
                    } else {
                        bad_quiet.lock().unwrap().push(status);
                    }
                }));
            }
            for r in requests {
                r.await.unwrap();
            }
        }));
    }
    if let Some((slug, token)) = noisy {
        let (http, url, token) = (
            http.clone(),
            format!("{slow_url}/v1/orgs/{slug}/slow"),
            token.clone(),
        );
        let statuses = noisy_statuses.clone();
        tasks.push(tokio::spawn(async move {
            let mut requests = vec![];
            let mut tick = tokio::time::interval(Duration::from_millis(100 / QUIET_RATE));
            while started.elapsed() < PHASE {
                tick.tick().await;
                let (http, url, token, statuses) =
                    (http.clone(), url.clone(), token.clone(), statuses.clone());
                requests.push(tokio::spawn(async move {
                    let res = http.get(&url).bearer_auth(&token).send().await.unwrap();
                    let status = res.status().as_u16();
                    if status == 429 {
                        assert_eq!(
                            res.headers()
                                .get("retry-after")
                                .and_then(|v| v.to_str().ok()),
                            Some("1")
                        );
                        let body: serde_json::Value = res.json().await.unwrap();
                        assert_eq!(body["error"]["code"], "tenant_busy", "{body}");
                    } else {
                        res.bytes().await.unwrap();
                    }
                    statuses.lock().unwrap().push(status);
                }));
            }
            for r in requests {
                r.await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    fn take<T>(m: Arc<Mutex<Vec<T>>>) -> Vec<T> {
        std::mem::take(&mut *m.lock().unwrap())
    }
    Outcome {
        quiet_ms: take(quiet_ms),
        noisy_statuses: take(noisy_statuses),
        bad_quiet: take(bad_quiet),
    }
}

fn p99(samples: &[(usize, f64)]) -> f64 {
    let mut s: Vec<f64> = samples.iter().map(|s| s.1).collect();
    s.sort_by(f64::total_cmp);
    s[(s.len() * 99 / 100).min(s.len() - 1)]
}

/// One run under `pool`: the quiet orgs alone and beside the noisy one, in
/// alternating phases.
async fn noisy_neighbour(pool: PoolConfig, what: &str) {
    let db = common::TestDb::new().await;
    let app =
        common::spawn_app_with_pool(db, &pool, tenantry::server::ServerConfig::default()).await;
    let limit = app.state.tenancy.router().fairness();
    assert!(limit.max_in_flight >= 2, "{limit:?}");
    // the slow route, built on tenantry's extractors like any embedding app
    let tenant_api = TenantApi {
        router: app.state.tenancy.router().clone(),
        auth: app.state.tenancy.auth().clone(),
    };
    let slow_app = axum::Router::new()
        .route("/v1/orgs/{slug}/slow", get(slow))
        .with_state(tenant_api);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let slow_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, slow_app).await.unwrap() });

    let noisy = ("noisy".to_owned(), app.org_with_token("noisy").await);
    // a quiet org whose two sub-pools are the noisy org's two
    let mut quiet: Vec<_> = app
        .org_sharing_sub_pools_with(&noisy.0, "twin")
        .await
        .into_iter()
        .collect();
    for i in quiet.len()..QUIET_ORGS {
        let slug = format!("quiet-{i}");
        let token = app.org_with_token(&slug).await;
        quiet.push((slug, token));
    }
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .build()
        .unwrap();
    let api = app.url("");
    // warm up caches and connections
    drive(&http, &api, &slow_url, &quiet, None).await;

    let (mut ratios, mut per_org, mut statuses) = (vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        let alone = drive(&http, &api, &slow_url, &quiet, None).await;
        let beside = drive(&http, &api, &slow_url, &quiet, Some(&noisy)).await;
        for o in [&alone, &beside] {
            assert!(o.bad_quiet.is_empty(), "quiet orgs got {:?}", o.bad_quiet);
        }
        ratios.push((p99(&alone.quiet_ms), p99(&beside.quiet_ms)));
        per_org.push(
            (0..quiet.len())
                .map(|org| {
                    let of = |o: &Outcome| {
                        let mine: Vec<_> =
                            o.quiet_ms.iter().filter(|s| s.0 == org).copied().collect();
                        p99(&mine)
                    };
                    (of(&alone), of(&beside))
                })
                .collect::<Vec<_>>(),
        );
        statuses.extend(beside.noisy_statuses);
    }
    println!("{what}: quiet p99 per round (alone ms, beside ms): {ratios:.2?}");
    let names: Vec<_> = quiet.iter().map(|q| q.0.as_str()).collect();
    println!("{what}: each quiet org's p99 per round (alone ms, beside ms), orgs {names:?}: {per_org:.1?}");
    // The round in the middle by ratio: one phase stalled by the machine
    // (a 100 ms hiccup on a shared 2-core host is enough to move a p99)
    // cannot decide the outcome, while a neighbour that really takes the
    // quiet orgs' connections slows every round.
    ratios.sort_by(|a, b| (a.1 / a.0).total_cmp(&(b.1 / b.0)));
    let (alone, beside) = ratios[ROUNDS / 2];
    let statuses = &statuses;
    let count = |s: u16| statuses.iter().filter(|x| **x == s).count();
    println!(
        "{what}: quiet p99 alone {alone:.2} ms, beside the noisy org {beside:.2} ms ({:.2}x); \
         noisy org: {} requests, {} ok, {} tenant_busy (limit {} in flight, queue {:?})",
        beside / alone,
        statuses.len(),
        count(200),
        count(429),
        limit.max_in_flight,
        limit.queue,
    );
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "the noisy org got {:?}",
        statuses
            .iter()
            .filter(|s| **s != 200 && **s != 429)
            .collect::<Vec<_>>()
    );
    assert!(count(429) > 0, "the noisy org was never refused");
    assert!(count(200) > 0, "the noisy org was refused everything");
    assert!(
        beside <= 2.0 * alone,
        "{what}: the quiet orgs' p99 went from {alone:.2} ms to {beside:.2} ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_noisy_org_gets_429s_and_its_neighbours_keep_their_latency() {
    // the default: tenant-affine sub-pools
    noisy_neighbour(PoolConfig::default(), "default sub-pools").await;
    // one pool shared by every tenant, where nothing but the limit stops
    // one org from taking every connection
    noisy_neighbour(
        PoolConfig {
            sub_pools: 1,
            ..PoolConfig::default()
        },
        "one shared pool",
    )
    .await;
}
