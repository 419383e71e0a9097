//! Prometheus metrics: one process-wide recorder (the `metrics` facade with
//! the Prometheus exporter), the names of every family, and the rendering
//! of `GET /metrics`, which samples the pools' gauges first.
//!
//! Families have no per-tenant label: with thousands of tenants that would
//! make every scrape huge. Routes are labelled by their template
//! (`/v1/orgs/:slug/tests/:id`), never by the concrete path. The one
//! exception is opt-in and bounded: [`TOP_TENANTS`], the N orgs with the
//! most tenant transactions, chosen anew at each scrape.

pub mod logging;

use std::sync::OnceLock;
use std::time::Duration;

use dashmap::DashMap;
use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

/// `method`, `route`, `status` (`2xx`, `4xx`, ...): requests answered.
pub const HTTP_REQUESTS: &str = "tenantry_http_requests_total";
/// `method`, `route`: request latency.
pub const HTTP_DURATION: &str = "tenantry_http_request_duration_seconds";
/// `code`: error responses by their stable code.
pub const HTTP_ERRORS: &str = "tenantry_http_errors_total";
/// `result` (`hit`, `miss`, `negative_hit`): slug -> tenant cache lookups.
pub const RESOLVE: &str = "tenantry_tenant_resolve_total";
/// `result` (`hit`, `miss`, `negative_hit`, `rejected`): token lookups
/// (`rejected`: refused before any lookup, e.g. a failed checksum).
pub const AUTH: &str = "tenantry_auth_lookups_total";
/// Time to get a connection for a tenant transaction.
pub const POOL_ACQUIRE: &str = "tenantry_pool_acquire_seconds";
/// `pool` (`tenants`, `control`, `admin`, `replicas`), `state` (`open`,
/// `idle`, `max`).
pub const POOL_CONNECTIONS: &str = "tenantry_pool_connections";
/// `event` (`begun`, `committed`, `rolled_back`): tenant transactions.
pub const TENANT_TX: &str = "tenantry_tenant_transactions_total";

/// `result` (`queued`, `rejected`): tenant transactions beyond their
/// tenant's in-flight limit (see `fairness`).
pub const TENANT_LIMIT: &str = "tenantry_tenant_limit_total";

/// `schema` (`warm`, `cold`): organizations created, from a warm schema
/// (see `warm`) or by building one.
pub const ORG_CREATES: &str = "tenantry_org_creates_total";

/// `org`: tenant transactions since the server started, of the N orgs
/// with the most (`--metrics-top-tenants N`; off by default). A gauge: orgs
/// enter and leave the top N, and one that left disappears from the
/// output.
pub const TOP_TENANTS: &str = "tenantry_top_tenant_transactions";

/// Transactions that enqueued background jobs, counted at their commit.
pub const JOBS_ENQUEUED: &str = "tenantry_job_enqueueing_commits_total";
/// `kind` (registered kinds; `unregistered`), `outcome` (`succeeded`,
/// `retried`, `dead`, `lost`, `handed_back`): attempts of jobs ended.
pub const JOB_ATTEMPTS: &str = "tenantry_job_attempts_total";
/// `kind`: how long an attempt ran.
pub const JOB_RUN: &str = "tenantry_job_run_seconds";
/// From a job's due time to the start of its attempt.
pub const JOB_WAIT: &str = "tenantry_job_wait_seconds";
/// Orgs with queued or running jobs, counted at this process's last sweep
/// of every org's jobs (every minute by default).
pub const JOB_ORGS_PENDING: &str = "tenantry_job_orgs_pending";
/// `state` (`queued`, `running`): jobs in that state over every org, at the
/// same sweep.
pub const JOB_DEPTH: &str = "tenantry_job_queue_depth";

/// `target` (`primary`, `replica`): tenant reads by where they ran, counted
/// only when the server has replicas.
pub const READS: &str = "tenantry_tenant_reads_total";
/// `reason` (`error`: the read failed on the replica and ran again on the
/// primary): reads a replica was chosen for but the primary served.
pub const REPLICA_FALLBACKS: &str = "tenantry_replica_fallbacks_total";
/// `replica` (`host:port`): its lag behind the primary, seconds, as of the
/// last poll; absent while it is down.
pub const REPLICA_LAG: &str = "tenantry_replica_lag_seconds";
/// `replica`: 1 while it is up (answering, still a replica), else 0.
pub const REPLICA_UP: &str = "tenantry_replica_up";

const JOB_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
];

/// How long a gauge not set again stays in the output: pool gauges and the
/// current top N are set at every scrape, so only orgs that left the top N
/// go.
const GAUGE_IDLE: Duration = Duration::from_secs(1);

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's recorder, installed on first use (tests and benchmarks
/// start several servers in one process: they share it).
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .idle_timeout(MetricKindMask::GAUGE, Some(GAUGE_IDLE))
            .set_buckets_for_metric(Matcher::Prefix("tenantry_job_".into()), JOB_BUCKETS)
            .expect("job buckets are not empty")
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .expect("latency buckets are not empty");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (an embedding app's);
        // then ours still renders what goes through it: nothing. Say so.
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
        }
        handle
    })
}

/// One connection pool's gauges at the moment of a scrape. Telemetry
/// knows no pool owner: the layer that holds the pools samples them and
/// hands them to [`render`].
#[derive(Debug, Clone, Copy)]
pub struct PoolSample {
    /// `tenants`, `control`, `admin`, `replicas` (the tenant pools of every
    /// replica together).
    pub pool: &'static str,
    pub open: usize,
    pub idle: usize,
    pub max: u32,
}

impl PoolSample {
    pub fn of(pool: &'static str, of: &sqlx::PgPool) -> Self {
        PoolSample {
            pool,
            open: of.size() as usize,
            idle: of.num_idle(),
            max: of.options().get_max_connections(),
        }
    }
}

/// The Prometheus text of every family, with `pools` and the top tenants
/// (when counted) set first.
pub fn render(pools: &[PoolSample], top: Option<&TopTenants>) -> String {
    let handle = handle();
    for sample in pools {
        let pool = sample.pool;
        metrics::gauge!(POOL_CONNECTIONS, "pool" => pool, "state" => "open")
            .set(sample.open as f64);
        metrics::gauge!(POOL_CONNECTIONS, "pool" => pool, "state" => "idle")
            .set(sample.idle as f64);
        metrics::gauge!(POOL_CONNECTIONS, "pool" => pool, "state" => "max").set(sample.max as f64);
    }
    if let Some(dropped) = logging::dropped_lines() {
        metrics::counter!(logging::LOG_LINES_DROPPED).absolute(dropped);
    }
    let [orgs, queued, running] = DEPTH
        .each_ref()
        .map(|n| n.load(std::sync::atomic::Ordering::Relaxed));
    if orgs >= 0 {
        metrics::gauge!(JOB_ORGS_PENDING).set(orgs as f64);
        metrics::gauge!(JOB_DEPTH, "state" => "queued").set(queued as f64);
        metrics::gauge!(JOB_DEPTH, "state" => "running").set(running as f64);
    }
    if let Some(top) = top {
        for (slug, n) in top.top() {
            metrics::gauge!(TOP_TENANTS, "org" => slug.to_string()).set(n as f64);
        }
    }
    handle.render()
}

/// How often histogram samples are folded into their buckets (the
/// exporter keeps raw samples until then).
pub const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Folds histogram samples into buckets every [`UPKEEP_EVERY`], so memory
/// stays flat between scrapes.
pub fn spawn_upkeep() -> tokio::task::JoinHandle<()> {
    tokio::spawn(async {
        let mut every = tokio::time::interval(UPKEEP_EVERY);
        loop {
            every.tick().await;
            handle().run_upkeep();
        }
    })
}

/// Handles of the label sets known in advance, registered once: the hot
/// path then costs an atomic add, not a registry lookup.
struct Handles {
    resolve: [Counter; 3],
    auth: [Counter; 4],
    tx: [Counter; 3],
    limit: [Counter; 2],
    acquire: Histogram,
}

fn handles() -> &'static Handles {
    static HANDLES: OnceLock<Handles> = OnceLock::new();
    HANDLES.get_or_init(|| {
        handle();
        Handles {
            resolve: RESOLVE_RESULTS.map(|r| metrics::counter!(RESOLVE, "result" => r)),
            auth: AUTH_RESULTS.map(|r| metrics::counter!(AUTH, "result" => r)),
            tx: ["begun", "committed", "rolled_back"]
                .map(|e| metrics::counter!(TENANT_TX, "event" => e)),
            limit: LIMIT_RESULTS.map(|r| metrics::counter!(TENANT_LIMIT, "result" => r)),
            acquire: metrics::histogram!(POOL_ACQUIRE),
        }
    })
}

const RESOLVE_RESULTS: [&str; 3] = ["hit", "miss", "negative_hit"];
const AUTH_RESULTS: [&str; 4] = ["hit", "miss", "negative_hit", "rejected"];
const LIMIT_RESULTS: [&str; 2] = ["queued", "rejected"];

fn count(counters: &[Counter], results: &[&str], result: &str) {
    if let Some(i) = results.iter().position(|r| *r == result) {
        counters[i].increment(1);
    }
}

/// A slug lookup: `hit`, `miss` or `negative_hit`.
pub fn resolve(result: &'static str) {
    count(&handles().resolve, &RESOLVE_RESULTS, result);
}

/// A token lookup: `hit`, `miss`, `negative_hit` or `rejected`.
pub fn auth(result: &'static str) {
    count(&handles().auth, &AUTH_RESULTS, result);
}

/// A tenant transaction over its tenant's limit: `queued` or `rejected`.
pub fn tenant_limit(result: &'static str) {
    count(&handles().limit, &LIMIT_RESULTS, result);
}

pub fn observe_acquire(waited: Duration) {
    handles().acquire.record(waited.as_secs_f64());
}

fn tenant_tx(event: usize) {
    handles().tx[event].increment(1);
}

/// A route template as a label: `/v1/orgs/:slug/tests` (braces inside
/// label values trip up simple exposition parsers).
fn route_label(template: &str) -> String {
    template.replace('{', ":").replace('}', "")
}

/// The `method` label of a request: the standard methods by name, and
/// every other method a client makes up as `other`, so junk requests
/// cannot add label sets without bound.
pub fn method_label(method: &str) -> &'static str {
    const STANDARD: &[&str] = &[
        "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT",
    ];
    STANDARD
        .iter()
        .find(|m| **m == method)
        .copied()
        .unwrap_or("other")
}

/// One answered request, by method, route template (`None`: no route
/// matched, labelled `unmatched`) and status class: with [`method_label`]
/// the label sets are bounded by the routes, whatever clients send. The
/// handles of each combination are made once; later requests cost a map
/// lookup and two atomic updates.
pub fn http_request(method: &str, template: Option<&str>, status: &'static str, seconds: f64) {
    let method = method_label(method);
    /// Per route template: the handles of each (method, status class) seen.
    type Seen = Vec<(String, &'static str, Counter, Histogram)>;
    // sharded: every request looks its route up here
    static ROUTES: OnceLock<DashMap<String, Seen>> = OnceLock::new();
    let routes = ROUTES.get_or_init(Default::default);
    let template = template.unwrap_or("unmatched");
    let find = |seen: &Seen| {
        seen.iter()
            .find(|(m, s, _, _)| m == method && *s == status)
            .map(|(_, _, c, h)| (c.clone(), h.clone()))
    };
    let known = routes.get(template).and_then(|seen| find(&seen));
    let (count, latency) = known.unwrap_or_else(|| {
        handle();
        let route = route_label(template);
        let count = metrics::counter!(HTTP_REQUESTS,
            "method" => method.to_owned(), "route" => route.clone(), "status" => status);
        let latency =
            metrics::histogram!(HTTP_DURATION, "method" => method.to_owned(), "route" => route);
        let mut seen = routes.entry(template.to_owned()).or_default();
        if let Some(made) = find(&seen) {
            return made;
        }
        seen.push((method.to_owned(), status, count.clone(), latency.clone()));
        (count, latency)
    });
    count.increment(1);
    latency.record(seconds);
}

/// Counts a tenant transaction as rolled back when dropped unfinished.
#[derive(Debug)]
pub struct TxOutcome {
    committed: bool,
}

impl TxOutcome {
    pub fn begun() -> Self {
        tenant_tx(0);
        TxOutcome { committed: false }
    }

    pub fn committed(&mut self) {
        if !self.committed {
            tenant_tx(1);
        }
        self.committed = true;
    }
}

impl Drop for TxOutcome {
    fn drop(&mut self) {
        if !self.committed {
            tenant_tx(2);
        }
    }
}

/// Tenant transactions per org, for the top-N metric: one entry per org
/// that has had a transaction (so bounded by the registry), one shard's
/// lock per transaction. Only made when the top N is asked for.
pub struct TopTenants {
    n: usize,
    counts: DashMap<crate::base::ident::Slug, u64>,
}

impl TopTenants {
    /// Counting for a top `n`; `None` for 0 (off).
    pub fn new(n: usize) -> Option<std::sync::Arc<Self>> {
        (n > 0).then(|| {
            std::sync::Arc::new(TopTenants {
                n,
                counts: Default::default(),
            })
        })
    }

    pub fn count(&self, slug: &crate::base::ident::Slug) {
        match self.counts.get_mut(slug) {
            Some(mut n) => *n += 1,
            None => *self.counts.entry(slug.clone()).or_insert(0) += 1,
        }
    }

    /// The `n` orgs with the most transactions, most first (ties by slug).
    pub fn top(&self) -> Vec<(crate::base::ident::Slug, u64)> {
        let mut all: Vec<_> = self
            .counts
            .iter()
            .map(|e| (e.key().clone(), *e.value()))
            .collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(self.n);
        all
    }
}

/// A tenant read ran on `target` (`primary`, `replica`).
pub fn read_on(target: &'static str) {
    static HANDLES: OnceLock<[Counter; 2]> = OnceLock::new();
    let [primary, replica] = HANDLES.get_or_init(|| {
        [
            metrics::counter!(READS, "target" => "primary"),
            metrics::counter!(READS, "target" => "replica"),
        ]
    });
    match target {
        "replica" => replica.increment(1),
        _ => primary.increment(1),
    }
}

/// A read chosen for a replica failed there and ran on the primary.
pub fn replica_fallback() {
    metrics::counter!(REPLICA_FALLBACKS, "reason" => "error").increment(1);
}

/// A replica's state as of the poll that just ended (set at each poll, so
/// the gauges stay while the poller runs).
pub fn replica_state(replica: &str, up: bool, lag: Option<Duration>) {
    let label = replica.to_owned();
    metrics::gauge!(REPLICA_UP, "replica" => label.clone()).set(if up { 1.0 } else { 0.0 });
    if let Some(lag) = lag {
        metrics::gauge!(REPLICA_LAG, "replica" => label).set(lag.as_secs_f64());
    }
}

/// A transaction that enqueued jobs committed.
pub fn jobs_enqueued() {
    metrics::counter!(JOBS_ENQUEUED).increment(1);
}

/// A job's attempt ended with `outcome` after `ran`; `kind` is a
/// registered kind or `unregistered` (bounded by the caller).
pub fn job_attempt(kind: String, outcome: &'static str, ran: Duration) {
    metrics::counter!(JOB_ATTEMPTS, "kind" => kind.clone(), "outcome" => outcome).increment(1);
    metrics::histogram!(JOB_RUN, "kind" => kind).record(ran.as_secs_f64());
}

/// A job started `waited` after it was due.
pub fn job_waited(waited: Duration) {
    metrics::histogram!(JOB_WAIT).record(waited.as_secs_f64());
}

/// The last sweep's counts ([`job_depth`]): orgs, queued and running
/// jobs; -1: no sweep yet. Kept here and set at each scrape, like the pool
/// gauges.
static DEPTH: [std::sync::atomic::AtomicI64; 3] = [
    std::sync::atomic::AtomicI64::new(-1),
    std::sync::atomic::AtomicI64::new(-1),
    std::sync::atomic::AtomicI64::new(-1),
];

/// Orgs with queued or running jobs, and those jobs, as last counted.
pub fn job_depth(orgs: usize, queued: u64, running: u64) {
    for (slot, n) in DEPTH
        .iter()
        .zip([orgs as i64, queued as i64, running as i64])
    {
        slot.store(n, std::sync::atomic::Ordering::Relaxed);
    }
}
