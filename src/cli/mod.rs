//! Command line: `tenantry serve | work | jobs | migrate | query | doctor |
//! orgs | tokens | warm | nodes | rebalance`.
//! Configuration comes from flags and the environment; without
//! `DATABASE_URL` the commands use (and if needed start) the zero-config
//! local cluster in `--data-dir`. Arguments are checked before any database
//! is touched; each command family has its module, output rendering its own.

mod args;
mod fleet;
mod jobs;
mod orgs;
mod placement;
mod render;
mod serve;
mod warm;

use std::process::ExitCode;

use clap::Parser;
use sqlx::PgPool;

pub use args::*;
pub use render::print_table;

use crate::pg::embedded::{Durability, LocalPostgres};
use crate::pg::pools::PoolConfig;

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // dropping it writes out the buffered log
    let log = match &cli.command {
        Command::Serve(args) | Command::Work(args) => crate::telemetry::logging::init(
            "info",
            args.log_format == LogFormat::Json,
            args.log_buffer_kib as usize,
        ),
        _ => crate::telemetry::logging::init(
            "warn",
            false,
            crate::telemetry::logging::DEFAULT_BUFFER_KIB,
        ),
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let outcome = runtime.block_on(run(cli));
    drop(runtime);
    // the log first, so that the error below is the last line
    drop(log);
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", crate::base::error::chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// A database connection for one command, plus the local cluster when this
/// command had to start it (stopped again when the command ends).
pub struct Database {
    pub pool: PgPool,
    /// Where `pool` connects.
    pub url: String,
    local: Option<LocalPostgres>,
}

impl Database {
    pub async fn connect(args: &DbArgs, pool_config: &PoolConfig) -> anyhow::Result<Self> {
        let (url, local) = match &args.database_url {
            Some(url) => (url.clone(), None),
            None => {
                let dir = args.data_dir.clone();
                let pg = tokio::task::spawn_blocking(move || {
                    LocalPostgres::ensure_running(&dir, Durability::Durable)
                })
                .await??;
                (pg.url("postgres"), Some(pg))
            }
        };
        let pool = crate::pg::pools::connect(&url, pool_config)
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to PostgreSQL: {e}"))?;
        crate::tenants::migrate_database(&pool).await?;
        Ok(Database { pool, url, local })
    }

    /// The URL tenant connections use on the local cluster: its
    /// non-superuser serving role (see `roles`), created on first use.
    pub fn local_app_url(&self) -> anyhow::Result<Option<(String, String)>> {
        let Some(pg) = &self.local else {
            return Ok(None);
        };
        let password = pg.app_password()?;
        Ok(Some((
            pg.url_as(crate::pg::embedded::APP_ROLE, &password, "postgres"),
            password,
        )))
    }

    /// Streaming replicas 1..=`n` of the local cluster, made and started
    /// if need be (see [`LocalPostgres::ensure_replica`]).
    pub async fn start_local_replicas(&self, n: u32) -> anyhow::Result<Vec<LocalPostgres>> {
        let Some(pg) = &self.local else {
            anyhow::ensure!(
                n == 0,
                "--local-replicas needs the local cluster (no DATABASE_URL)"
            );
            return Ok(vec![]);
        };
        let mut replicas = vec![];
        for index in 1..=n {
            let primary = pg.clone();
            let replica = tokio::task::spawn_blocking(move || {
                primary.ensure_replica(index, Durability::Durable, None)
            })
            .await??;
            replicas.push(replica);
        }
        Ok(replicas)
    }

    /// Opens the pool again: making a local replica without `pg_basebackup`
    /// restarts the local cluster, which leaves the pool's connections
    /// dead.
    pub async fn reconnect(&mut self, pool_config: &PoolConfig) -> anyhow::Result<()> {
        self.pool.close().await;
        self.pool = crate::pg::pools::connect(&self.url, pool_config)
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to PostgreSQL: {e}"))?;
        Ok(())
    }

    /// The app role's URL on a local replica (roles replicate, passwords
    /// with them).
    pub fn local_app_url_on(&self, replica: &LocalPostgres) -> anyhow::Result<String> {
        let pg = self
            .local
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no local cluster"))?;
        let password = pg.app_password()?;
        Ok(replica.url_as(crate::pg::embedded::APP_ROLE, &password, "postgres"))
    }

    pub async fn close(self) -> anyhow::Result<()> {
        self.pool.close().await;
        if let Some(pg) = self.local.filter(LocalPostgres::started_here) {
            tokio::task::spawn_blocking(move || pg.stop()).await??;
        }
        Ok(())
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => return serve::serve(&cli.db, args, serve::Mode::Http).await,
        Command::Work(args) => return serve::serve(&cli.db, args, serve::Mode::Jobs).await,
        _ => {}
    }
    // Check arguments before touching (or starting) a database.
    let jobs = match &cli.command {
        Command::Migrate(a) => a.jobs,
        Command::Query(a) => a.jobs,
        _ => 3,
    };
    if jobs == 0 || jobs > 256 {
        anyhow::bail!("--jobs must be between 1 and 256");
    }
    let action = Action::parse(cli.command)?;
    let pool_config = PoolConfig {
        max_connections: jobs as u32 + 1,
        ..PoolConfig::default()
    };
    let db = Database::connect(&cli.db, &pool_config).await?;
    let result = action.run(&db.pool, &db.url).await;
    db.close().await?;
    result
}

/// Exit with a failure status after printing everything: some tenants failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PartialFailure(pub String);

/// A command with its arguments already validated.
enum Action {
    Fleet(fleet::Action),
    Orgs(orgs::Action),
    Placement(placement::Action),
    Warm(WarmCommand),
    Jobs(jobs::Action),
}

impl Action {
    fn parse(command: Command) -> anyhow::Result<Self> {
        Ok(match command {
            Command::Serve(_) | Command::Work(_) => {
                unreachable!("serve and work are handled before")
            }
            Command::Jobs(cmd) => Action::Jobs(jobs::Action::parse(cmd)?),
            Command::Orgs(cmd) => Action::Orgs(orgs::Action::parse_orgs(cmd)?),
            Command::Tokens(cmd) => Action::Orgs(orgs::Action::parse_tokens(cmd)?),
            Command::Warm(cmd) => Action::Warm(cmd),
            Command::Nodes { json } => Action::Placement(placement::Action::Nodes(json)),
            Command::Rebalance { plan, json } => {
                Action::Placement(placement::Action::Rebalance { plan, json })
            }
            other => Action::Fleet(fleet::Action::parse(other)?),
        })
    }

    async fn run(self, pool: &PgPool, db_url: &str) -> anyhow::Result<()> {
        match self {
            Action::Fleet(a) => a.run(pool).await,
            Action::Orgs(a) => a.run(pool).await,
            Action::Placement(a) => a.run(pool).await,
            Action::Warm(cmd) => warm::run(cmd, pool).await,
            Action::Jobs(a) => a.run(pool, db_url).await,
        }
    }
}
