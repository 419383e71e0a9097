//! The command line's argument types (clap). Parsing only: what each command
//! does lives in the family modules.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "tenantry",
    version,
    about = "Schema-per-tenant router for PostgreSQL"
)]
pub struct Cli {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct DbArgs {
    /// PostgreSQL connection URL. Without it, a local cluster is run from the
    /// system's PostgreSQL binaries in --data-dir.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,
    /// Where the zero-config local cluster lives.
    #[arg(
        long,
        env = "TENANTRY_DATA_DIR",
        default_value = ".tenantry",
        global = true
    )]
    pub data_dir: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the HTTP API server (and, with --workers, background jobs).
    Serve(ServeArgs),
    /// Run background jobs without serving the API: takes serve's flags;
    /// --workers sets how many jobs run at once, --metrics-bind serves
    /// GET /metrics (--bind is not used).
    Work(ServeArgs),
    /// An org's background jobs: list, show, cancel, retry; counts.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Apply registry migrations, then the tenant template to every tenant.
    Migrate(MigrateArgs),
    /// Run a read-only query in every active tenant.
    Query(QueryArgs),
    /// Find (and with --repair, fix what is safe) registry/schema drift;
    /// with --audit, every grant, membership, attribute or ownership that
    /// breaks tenant confinement, with the SQL that repairs it.
    Doctor {
        #[arg(long, conflicts_with = "audit")]
        repair: bool,
        /// Check that PostgreSQL still confines every tenant (after grants
        /// changed by hand); exits non-zero when anything breaks it.
        #[arg(long)]
        audit: bool,
        #[arg(long)]
        json: bool,
    },
    /// Create, list, suspend, resume, rename and delete organizations.
    #[command(subcommand)]
    Orgs(OrgsCommand),
    /// Issue and revoke API tokens.
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// The warm pool: tenant schemas built ahead of signups (serve
    /// --warm-schemas keeps it full).
    #[command(subcommand)]
    Warm(WarmCommand),
    /// Citus: the worker nodes, with their tenant count and total size.
    Nodes {
        #[arg(long)]
        json: bool,
    },
    /// Citus: run the rebalancer (citus_rebalance_start) and print the moves.
    Rebalance {
        /// Print the moves it would make; move nothing.
        #[arg(long, visible_alias = "dry-run")]
        plan: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "TENANTRY_BIND", default_value = "127.0.0.1:8080")]
    pub bind: std::net::SocketAddr,
    /// URL of the role tenant connections log in as: not a superuser; made a
    /// serving role (NOINHERIT, member of every tenant role), and created
    /// with the URL's password if missing. Default: a `tenantry_app` role on
    /// the local cluster; with DATABASE_URL and no app URL, tenant
    /// connections log in as DATABASE_URL's role.
    #[arg(long, env = "TENANTRY_APP_DATABASE_URL", hide_env_values = true)]
    pub app_database_url: Option<String>,
    /// Database connections shared by all tenants, whatever their number.
    #[arg(long, env = "TENANTRY_POOL_SIZE", default_value_t = 16)]
    pub pool_size: u32,
    /// Sub-pools the tenant connections are split into; each tenant uses
    /// its home sub-pool (or a second choice when home is congested), so each
    /// connection serves a slice of the tenants. 0: one per connection;
    /// 1: every connection serves every tenant.
    #[arg(long, env = "TENANTRY_SUB_POOLS", default_value_t = crate::pg::pools::DEFAULT_SUB_POOLS)]
    pub sub_pools: u32,
    /// Transactions beyond its connections a tenant's home sub-pool may hold
    /// before the tenant's second choice takes the next one.
    #[arg(long, env = "TENANTRY_SPILL_MARGIN", default_value_t = crate::pg::pools::DEFAULT_SPILL_MARGIN)]
    pub spill_margin: u32,
    /// Seconds a pooled connection lives before it is replaced (bounds the
    /// catalog cache each backend accumulates per tenant).
    #[arg(long, env = "TENANTRY_CONN_MAX_LIFETIME", default_value_t = 900)]
    pub conn_max_lifetime: u64,
    /// Prepared statements kept per connection (tenant SQL is prepared once
    /// per tenant and connection).
    #[arg(long, env = "TENANTRY_STATEMENT_CACHE", default_value_t = 1024)]
    pub statement_cache: usize,
    /// Seconds a resolved org stays cached in this process (other processes'
    /// changes are also pushed through LISTEN/NOTIFY).
    #[arg(long, env = "TENANTRY_CACHE_TTL", default_value_t = 30)]
    pub cache_ttl: u64,
    /// Seconds a verified token stays cached in this process.
    #[arg(long, env = "TENANTRY_AUTH_TTL", default_value_t = 10)]
    pub auth_ttl: u64,
    /// statement_timeout of tenant transactions, milliseconds.
    #[arg(long, env = "TENANTRY_STATEMENT_TIMEOUT_MS", default_value_t = 10_000)]
    pub statement_timeout_ms: u64,
    /// lock_timeout of tenant transactions, milliseconds: a request waiting
    /// longer for a lock gets 503 tenant_busy instead of holding a connection.
    #[arg(long, env = "TENANTRY_LOCK_TIMEOUT_MS", default_value_t = 2_000)]
    pub lock_timeout_ms: u64,
    /// Transactions (requests) one org may have in flight at once; beyond
    /// it, requests queue for --tenant-queue-ms and then get 429
    /// tenant_busy. Default: a quarter of --pool-size (at least 2). 0: no
    /// limit.
    #[arg(long, env = "TENANTRY_TENANT_MAX_IN_FLIGHT")]
    pub tenant_max_in_flight: Option<u32>,
    /// Milliseconds a request over its org's limit waits for a place.
    #[arg(long, env = "TENANTRY_TENANT_QUEUE_MS", default_value_t = crate::serving::fairness::DEFAULT_QUEUE.as_millis() as u64)]
    pub tenant_queue_ms: u64,
    /// Seconds a request may run before it gets 503 timeout.
    #[arg(long, env = "TENANTRY_REQUEST_TIMEOUT", default_value_t = 30)]
    pub request_timeout: u64,
    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT.
    #[arg(long, env = "TENANTRY_SHUTDOWN_TIMEOUT", default_value_t = 30)]
    pub shutdown_timeout: u64,
    /// What sits between tenantry and PostgreSQL on the app URL: `none`
    /// (or a session pooler) or `transaction` (a transaction-pooling
    /// PgBouncer: unnamed statements, no session settings).
    #[arg(long, env = "TENANTRY_POOLER", value_enum, default_value_t = crate::pg::pools::Pooler::None)]
    pub pooler: crate::pg::pools::Pooler,
    /// A direct PostgreSQL URL (same role as the app URL) for LISTEN, which
    /// a transaction pooler cannot carry. Without it, behind one, other
    /// processes' changes arrive through the cache TTLs only.
    #[arg(long, env = "TENANTRY_LISTEN_URL", hide_env_values = true)]
    pub listen_url: Option<String>,
    /// Label the N orgs with the most transactions in /metrics
    /// (tenantry_top_tenant_transactions{org}); 0: no per-org label.
    #[arg(long, env = "TENANTRY_METRICS_TOP_TENANTS", default_value_t = 0,
          value_parser = clap::value_parser!(u16).range(0..=1000))]
    pub metrics_top_tenants: u16,
    /// Keep this many tenant schemas pre-built at the current template
    /// version, so that creating an org takes one instead of running DDL
    /// (see `tenantry warm`). 0: off.
    #[arg(long, env = "TENANTRY_WARM_SCHEMAS", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=crate::tenants::warm::MAX_WARM_SCHEMAS as i64))]
    pub warm_schemas: u32,
    /// Serve GET /metrics on this address (e.g. 127.0.0.1:9100) instead of
    /// the API's listener.
    #[arg(long, env = "TENANTRY_METRICS_BIND")]
    pub metrics_bind: Option<std::net::SocketAddr>,
    /// Background jobs run at once by this process (imports, an app's own
    /// kinds); 0: none here (run `tenantry work` elsewhere).
    #[arg(long, env = "TENANTRY_WORKERS", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(0..=256))]
    pub workers: u16,
    /// Seconds a job's attempt may run (or go between checkpoints) before
    /// another worker may take it.
    #[arg(long, env = "TENANTRY_JOB_LEASE", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub job_lease: u64,
    /// A streaming replica of the database, logging in as the app role
    /// (repeat for several; the env variable takes a comma-separated
    /// list). Orgs' reads go to a replica that has replayed their last
    /// write, otherwise to the primary (see the README's "Replicas").
    #[arg(
        long = "replica-url",
        env = "TENANTRY_REPLICA_URLS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub replica_urls: Vec<String>,
    /// A replica further behind the primary than this serves no read
    /// (e.g. 500ms, 5s, 1m; a bare number is seconds).
    #[arg(long, env = "TENANTRY_REPLICA_MAX_LAG", default_value = "5s",
          value_parser = parse_lag)]
    pub replica_max_lag: std::time::Duration,
    /// Streaming replicas of the local cluster to create (pg_basebackup, in
    /// the data directory) and read from: for trying replicas on one
    /// machine. Only without DATABASE_URL.
    #[arg(long, env = "TENANTRY_LOCAL_REPLICAS", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=8))]
    pub local_replicas: u32,
    #[arg(long, env = "TENANTRY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// KiB of log lines waiting for stderr at most. The log is written by
    /// a thread of its own, so a slow reader of stderr never holds up a
    /// request; beyond this, new lines are dropped and counted
    /// (tenantry_log_lines_dropped_total).
    #[arg(long, env = "TENANTRY_LOG_BUFFER_KIB",
          default_value_t = crate::telemetry::logging::DEFAULT_BUFFER_KIB as u32,
          value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    pub log_buffer_kib: u32,
}

#[derive(Subcommand, Debug, Clone)]
pub enum JobsCommand {
    /// An org's jobs, newest first.
    List {
        #[arg(long)]
        org: String,
        /// Only jobs in this state (queued, running, succeeded, dead,
        /// cancelled).
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..=10_000))]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// One job: state, attempts, progress, error.
    Show {
        #[arg(long)]
        org: String,
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a queued or running job.
    Cancel {
        #[arg(long)]
        org: String,
        id: String,
    },
    /// Queue a dead or cancelled job again, with all its attempts.
    Retry {
        #[arg(long)]
        org: String,
        id: String,
    },
    /// Jobs by state: of one org, or of every org (and the orgs in the
    /// ready index).
    Stats {
        #[arg(long)]
        org: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug, Clone)]
pub enum WarmCommand {
    /// How many warm schemas are ready at this binary's template version,
    /// outdated (migrate rebuilds them) or built by a newer version.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Build warm schemas until COUNT are ready at this binary's template
    /// version.
    Fill {
        #[arg(value_parser = clap::value_parser!(u32).range(0..=crate::tenants::warm::MAX_WARM_SCHEMAS as i64))]
        count: u32,
    },
    /// Drop warm schemas, oldest first, until at most --keep are left.
    Drain {
        #[arg(long, default_value_t = 0)]
        keep: u32,
    },
}

#[derive(Args, Debug, Clone)]
pub struct MigrateArgs {
    #[command(subcommand)]
    pub command: Option<MigrateCommand>,
    /// List the tenants that are behind and what would be applied; change nothing.
    #[arg(long, visible_alias = "dry-run")]
    pub plan: bool,
    /// Only these orgs.
    #[arg(long, num_args = 1..)]
    pub only: Vec<String>,
    /// Migrate up to this template version (default: the latest).
    #[arg(long)]
    pub target: Option<i32>,
    /// Tenants migrated at once (default: 4).
    #[arg(long, default_value_t = 4)]
    pub jobs: usize,
    /// lock_timeout of each tenant's migration, milliseconds (keep it below
    /// the servers' --lock-timeout-ms, so their requests queued behind a
    /// waiting migration do not time out).
    #[arg(long, default_value_t = 1000)]
    pub lock_timeout_ms: u64,
    /// Further attempts, after the other tenants and with backoff, for a
    /// tenant whose locks timed out; then it is reported as lock_timeout.
    #[arg(long, default_value_t = 3)]
    pub lock_retries: u32,
    /// Apply the migrations in this directory instead of the template built
    /// into this binary (V{n}__{name}.sql files).
    #[arg(long)]
    pub template_dir: Option<PathBuf>,
    /// Apply the shared schema's migrations from this directory instead of
    /// the shared template built into this binary. They run first.
    #[arg(long)]
    pub shared_template_dir: Option<PathBuf>,
    /// Print a JSON summary instead of progress and a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug, Clone)]
pub enum MigrateCommand {
    /// How many tenants are at each template version, and which failed.
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug, Clone)]
pub struct QueryArgs {
    /// Run in every active tenant (required: the scope is explicit).
    #[arg(long, required = true)]
    pub all: bool,
    /// One SELECT statement, run with search_path set to each tenant.
    pub sql: String,
    #[arg(long, value_enum, default_value_t = QueryFormat::Table)]
    pub format: QueryFormat,
    /// Tenants queried at once.
    #[arg(long, default_value_t = 4)]
    pub jobs: usize,
    /// Per-tenant statement timeout, milliseconds.
    #[arg(long, default_value_t = 30_000)]
    pub timeout_ms: u64,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryFormat {
    Table,
    Json,
    Csv,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum OrgsCommand {
    /// Create an organization: schema, tenant template and initial data.
    Create {
        slug: String,
        #[arg(long)]
        name: String,
        /// Creates this user as the org's owner; initial data is recorded as
        /// created by them.
        #[arg(long)]
        owner_email: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List organizations in slug order (all of them, read a page at a
    /// time, or one page with --limit).
    List {
        /// At most this many.
        #[arg(long)]
        limit: Option<i64>,
        /// Only slugs after this one (the last slug of the previous page).
        #[arg(long)]
        after: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Suspend an active organization: its API requests get 403.
    Suspend {
        slug: String,
        #[arg(long)]
        json: bool,
    },
    /// Resume a suspended organization.
    Resume {
        slug: String,
        #[arg(long)]
        json: bool,
    },
    /// Change an organization's slug (its schema is renamed with it).
    Rename {
        slug: String,
        new_slug: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete an organization and drop its schema with all its data.
    Delete {
        slug: String,
        /// Confirms that the org's schema and data are to be dropped.
        #[arg(long)]
        yes: bool,
        #[arg(long)]
        json: bool,
    },
    /// Write one organization's data as an archive (see the README's
    /// "Export and import"): a consistent snapshot, streamed.
    Export {
        slug: String,
        /// A file (written as FILE.partial, renamed when complete), or -
        /// for standard output.
        #[arg(long, default_value = "-")]
        output: String,
        /// How rows are written: `binary` (archive format 2: faster,
        /// smaller) or `text` (format 1: readable, portable to any
        /// PostgreSQL version). Import reads both.
        #[arg(long, value_enum, default_value_t = crate::tenants::archive::RowFormat::Binary)]
        format: crate::tenants::archive::RowFormat,
    },
    /// Create a new organization from an archive, in one transaction.
    Import {
        new_slug: String,
        /// A file, or - for standard input.
        #[arg(long, default_value = "-")]
        input: String,
        /// The new org's name (default: the archived org's name).
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Copy an organization's data into a new organization (export
    /// streamed into import, no file in between).
    Clone {
        source: String,
        new_slug: String,
        /// The new org's name (default: the source's).
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Citus: move an organization's schema to another worker
    /// (citus_schema_move); reads go on, writes wait for the copy.
    Move {
        slug: String,
        /// The target worker, host:port as `tenantry nodes` shows it.
        #[arg(long)]
        to: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokensCommand {
    /// Issue a token for a user of an org (the user is created if missing).
    /// The secret is printed once and never stored.
    Create {
        slug: String,
        #[arg(long)]
        email: String,
        /// A label for the token.
        #[arg(long)]
        name: Option<String>,
        /// Lifetime: 90d, 12h, 30m, 3600s (default: no expiry).
        #[arg(long)]
        expires_in: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Issue a token for a platform superuser (acts on every org).
    Superuser {
        #[arg(long)]
        email: String,
        #[arg(long)]
        name: Option<String>,
        /// Lifetime: 90d, 12h, 30m, 3600s (default: no expiry).
        #[arg(long)]
        expires_in: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List tokens (never their secrets): all, or one org's.
    List {
        #[arg(long)]
        org: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by id; running servers stop accepting it at once.
    Revoke { id: uuid::Uuid },
}

/// A lag bound: `500ms`, `5s`, `1m` or a bare number of seconds, from 1 ms
/// to an hour.
fn parse_lag(text: &str) -> Result<std::time::Duration, String> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a number with ms, s or m (e.g. 5s)"))?;
    let lag = match unit {
        "ms" => std::time::Duration::from_millis(n),
        "s" => std::time::Duration::from_secs(n),
        "m" => std::time::Duration::from_secs(n.saturating_mul(60)),
        _ => return Err(format!("{text:?}: the unit must be ms, s or m (e.g. 5s)")),
    };
    if lag.is_zero() || lag > std::time::Duration::from_secs(3600) {
        return Err(format!("{text:?}: between 1ms and 60m"));
    }
    Ok(lag)
}

#[cfg(test)]
mod tests {
    use super::parse_lag;
    use std::time::Duration;

    #[test]
    fn a_lag_bound_has_a_unit_and_stays_between_a_millisecond_and_an_hour() {
        assert_eq!(parse_lag("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_lag("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_lag("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_lag("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_lag("60m"), Ok(Duration::from_secs(3600)));
        for bad in [
            "",
            "0",
            "0ms",
            "61m",
            "5h",
            "-1s",
            "1.5s",
            "s",
            "ms",
            "99999999999999999999s",
        ] {
            assert!(parse_lag(bad).is_err(), "{bad:?}");
        }
    }
}
