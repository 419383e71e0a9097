//! Command line: `tenantry migrate | orgs | tokens`. Configuration comes from
//! flags and the environment; without `DATABASE_URL` the commands use (and if
//! needed start) the zero-config local cluster in `--data-dir`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use std::time::Duration;

use std::io::IsTerminal;

use crate::auth::AuthConfig;
use crate::db::PoolConfig;
use crate::fleet;
use crate::router::RouterConfig;
use crate::server::{self, ServerConfig};
use sqlx::PgPool;
use time::format_description::well_known::Rfc3339;

use crate::embedded::{Durability, LocalPostgres};
use crate::ident::Slug;
use crate::provision::{self, NewOrg};
use crate::registry::{self, Organization};
use crate::template::Template;

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
    /// Run the HTTP API server.
    Serve(ServeArgs),
    /// Apply registry migrations, then the tenant template to every tenant.
    Migrate(MigrateArgs),
    /// Run a read-only query in every active tenant.
    Query(QueryArgs),
    /// Find (and with --repair, fix what is safe) registry/schema drift.
    Doctor {
        #[arg(long)]
        repair: bool,
        #[arg(long)]
        json: bool,
    },
    /// Create, list, suspend, resume, rename and delete organizations.
    #[command(subcommand)]
    Orgs(OrgsCommand),
    /// Issue and revoke API tokens.
    #[command(subcommand)]
    Tokens(TokensCommand),
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "TENANTRY_BIND", default_value = "127.0.0.1:8080")]
    pub bind: std::net::SocketAddr,
    /// Database connections shared by all tenants, whatever their number.
    #[arg(long, env = "TENANTRY_POOL_SIZE", default_value_t = 16)]
    pub pool_size: u32,
    /// Sub-pools the tenant connections are split into; each tenant uses
    /// its home sub-pool or a second choice, so each connection serves a
    /// slice of the tenants (1: every connection serves every tenant).
    #[arg(long, env = "TENANTRY_SUB_POOLS", default_value_t = crate::db::DEFAULT_SUB_POOLS)]
    pub sub_pools: u32,
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
    #[arg(long, env = "TENANTRY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
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
    /// Apply the migrations in this directory instead of the template built
    /// into this binary (V{n}__{name}.sql files).
    #[arg(long)]
    pub template_dir: Option<PathBuf>,
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
    /// List organizations.
    List {
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

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Serve(args) => init_tracing("info", args.log_format),
        _ => init_tracing("warn", LogFormat::Text),
    }
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", crate::error::chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

pub fn init_tracing(default_level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
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
        let pool = crate::db::connect(&url, pool_config)
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to PostgreSQL: {e}"))?;
        registry::migrate(&pool).await?;
        Ok(Database { pool, url, local })
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
    if let Command::Serve(args) = cli.command {
        return serve(&cli.db, args).await;
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
    let result = action.run(&db.pool).await;
    db.close().await?;
    result
}

/// Exit with a failure status after printing everything: some tenants failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PartialFailure(pub String);

async fn serve(db_args: &DbArgs, args: ServeArgs) -> anyhow::Result<()> {
    let pool_config = PoolConfig {
        max_connections: args.pool_size,
        sub_pools: args.sub_pools,
        max_lifetime: Duration::from_secs(args.conn_max_lifetime),
        statement_cache: args.statement_cache,
        ..PoolConfig::default()
    };
    let db = Database::connect(db_args, &server::small_pool_config(&pool_config)).await?;
    let config = ServerConfig {
        router: RouterConfig {
            ttl: Duration::from_secs(args.cache_ttl),
            ..RouterConfig::default()
        },
        auth: AuthConfig {
            ttl: Duration::from_secs(args.auth_ttl),
            ..AuthConfig::default()
        },
        ..ServerConfig::default()
    };
    if let Some(token) = server::bootstrap_superuser(&db.pool).await? {
        println!(
            "created superuser {} with API token (shown once, store it now):",
            server::BOOTSTRAP_SUPERUSER
        );
        println!("{}", token.token);
    }
    let listener = tokio::net::TcpListener::bind(args.bind)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.bind))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "listening");
    println!("tenantry listening on http://{addr}");
    let pools = server::Pools::connect_lazy(db.pool.clone(), &db.url, &pool_config)?;
    let state = server::state(pools, &config).await?;
    let served = server::serve(listener, state.clone(), &config, server::shutdown_signal()).await;
    state.tenancy.router().tenant_pool().close().await;
    state.tenancy.router().control_pool().close().await;
    db.close().await?;
    Ok(served?)
}

/// A command with its arguments already validated.
enum Action {
    Migrate(MigrateArgs, Template, Vec<Slug>),
    MigrateStatus(bool),
    Query(QueryArgs),
    Doctor(bool, bool),
    CreateOrg(NewOrg, bool),
    ListOrgs(bool),
    Suspend(Slug, bool),
    Resume(Slug, bool),
    Rename(Slug, Slug, bool),
    Delete(Slug, bool),
    CreateToken(Slug, String, Option<String>, Option<Duration>, bool),
    SuperuserToken(String, Option<String>, Option<Duration>, bool),
    ListTokens(Option<Slug>, bool),
    RevokeToken(uuid::Uuid),
}

impl Action {
    fn parse(command: Command) -> anyhow::Result<Self> {
        Ok(match command {
            Command::Serve(_) => unreachable!("serve is handled before"),
            Command::Migrate(args) => match args.command {
                Some(MigrateCommand::Status { json }) => Action::MigrateStatus(json),
                None => {
                    let template = match &args.template_dir {
                        Some(dir) => Template::from_dir(dir)?,
                        None => Template::embedded(),
                    };
                    let only = args
                        .only
                        .iter()
                        .map(|s| Slug::parse(s))
                        .collect::<Result<Vec<_>, _>>()?;
                    Action::Migrate(args, template, only)
                }
            },
            Command::Query(args) => {
                crate::fleet::prepare_query(&args.sql)?;
                Action::Query(args)
            }
            Command::Doctor { repair, json } => Action::Doctor(repair, json),
            Command::Orgs(cmd) => match cmd {
                OrgsCommand::Create {
                    slug,
                    name,
                    owner_email,
                    json,
                } => Action::CreateOrg(NewOrg::parse(&slug, &name, owner_email.as_deref())?, json),
                OrgsCommand::List { json } => Action::ListOrgs(json),
                OrgsCommand::Suspend { slug, json } => Action::Suspend(Slug::parse(&slug)?, json),
                OrgsCommand::Resume { slug, json } => Action::Resume(Slug::parse(&slug)?, json),
                OrgsCommand::Rename {
                    slug,
                    new_slug,
                    json,
                } => Action::Rename(Slug::parse(&slug)?, Slug::parse(&new_slug)?, json),
                OrgsCommand::Delete { slug, yes, json } => {
                    let slug = Slug::parse(&slug)?;
                    if !yes {
                        anyhow::bail!(
                            "deleting {slug} drops its schema and all its data; pass --yes to confirm"
                        );
                    }
                    Action::Delete(slug, json)
                }
            },
            Command::Tokens(cmd) => match cmd {
                TokensCommand::Create {
                    slug,
                    email,
                    name,
                    expires_in,
                    json,
                } => {
                    let email = registry::parse_email(&email)?;
                    let expires_in = expires_in
                        .as_deref()
                        .map(provision::parse_lifetime)
                        .transpose()?;
                    Action::CreateToken(Slug::parse(&slug)?, email, name, expires_in, json)
                }
                TokensCommand::Superuser {
                    email,
                    name,
                    expires_in,
                    json,
                } => {
                    let expires_in = expires_in
                        .as_deref()
                        .map(provision::parse_lifetime)
                        .transpose()?;
                    Action::SuperuserToken(registry::parse_email(&email)?, name, expires_in, json)
                }
                TokensCommand::List { org, json } => {
                    Action::ListTokens(org.as_deref().map(Slug::parse).transpose()?, json)
                }
                TokensCommand::Revoke { id } => Action::RevokeToken(id),
            },
        })
    }

    async fn run(self, pool: &PgPool) -> anyhow::Result<()> {
        match self {
            Action::Migrate(args, template, only) => migrate(pool, args, template, only).await?,
            Action::MigrateStatus(json) => {
                let status = fleet::status(pool).await?;
                if json {
                    print_json(&status)?;
                } else {
                    let rows: Vec<[String; 2]> = status
                        .versions
                        .iter()
                        .map(|(v, n)| [v.to_string(), n.to_string()])
                        .collect();
                    print_table(&["TEMPLATE VERSION", "TENANTS"], &rows);
                    if !status.failed.is_empty() {
                        println!();
                        let rows: Vec<[String; 4]> = status
                            .failed
                            .iter()
                            .map(|f| {
                                [
                                    f.slug.clone(),
                                    format!("{} -> {}", f.from_version, f.target_version),
                                    f.migration.clone().unwrap_or_default(),
                                    f.error.clone(),
                                ]
                            })
                            .collect();
                        print_table(&["FAILED", "VERSIONS", "MIGRATION", "ERROR"], &rows);
                    }
                }
            }
            Action::Query(args) => query(pool, args).await?,
            Action::Doctor(repair, json) => {
                let report = fleet::doctor(pool, repair).await?;
                if json {
                    print_json(&report)?;
                } else {
                    if report.findings.is_empty() {
                        println!("no problems found");
                    }
                    for f in &report.findings {
                        println!("found: {}", serde_json::to_string(f)?);
                    }
                    for r in &report.repaired {
                        println!("repaired: {r}");
                    }
                    for l in &report.left {
                        println!("left for an operator: {l}");
                    }
                }
                if !report.left.is_empty() || (!repair && !report.findings.is_empty()) {
                    return Err(PartialFailure(format!(
                        "{} problem(s) found, {} repaired",
                        report.findings.len(),
                        report.repaired.len()
                    ))
                    .into());
                }
            }
            Action::CreateOrg(new, json) => {
                let created = provision::create_org(pool, &Template::embedded(), &new).await?;
                if json {
                    print_json(&created)?;
                } else {
                    print_orgs(std::slice::from_ref(&created.organization));
                    if let Some(owner) = created.owner {
                        println!("owner: {} ({})", owner.email, owner.id);
                    }
                }
            }
            Action::ListOrgs(json) => {
                let orgs = registry::list_orgs(pool).await?;
                if json {
                    print_json(&orgs)?;
                } else {
                    print_orgs(&orgs);
                }
            }
            Action::Suspend(slug, json) => {
                print_org(&provision::suspend_org(pool, &slug).await?, json)?
            }
            Action::Resume(slug, json) => {
                print_org(&provision::resume_org(pool, &slug).await?, json)?
            }
            Action::Rename(slug, new_slug, json) => {
                print_org(&provision::rename_org(pool, &slug, &new_slug).await?, json)?
            }
            Action::Delete(slug, json) => {
                let org = provision::delete_org(pool, &slug).await?;
                if json {
                    print_json(&org)?;
                } else {
                    println!("deleted {} (schema {} dropped)", org.slug, org.schema_name);
                }
            }
            Action::CreateToken(slug, email, name, expires_in, json) => {
                let (user, issued) =
                    provision::issue_org_token(pool, &slug, &email, name.as_deref(), expires_in)
                        .await?;
                print_issued(
                    &user,
                    &issued,
                    &format!("token for {} in {slug}", user.email),
                    json,
                )?;
            }
            Action::SuperuserToken(email, name, expires_in, json) => {
                let (user, issued) =
                    provision::issue_superuser_token(pool, &email, name.as_deref(), expires_in)
                        .await?;
                print_issued(
                    &user,
                    &issued,
                    &format!("superuser token for {}", user.email),
                    json,
                )?;
            }
            Action::ListTokens(org, json) => {
                let org_id = match &org {
                    Some(slug) => Some(
                        registry::get_org(&mut *pool.acquire().await?, slug)
                            .await?
                            .id,
                    ),
                    None => None,
                };
                let tokens = registry::list_tokens(pool, org_id).await?;
                if json {
                    print_json(&tokens)?;
                } else {
                    let rows: Vec<[String; 8]> = tokens
                        .iter()
                        .map(|t| {
                            let at = |v: Option<time::OffsetDateTime>| {
                                v.and_then(|v| v.format(&Rfc3339).ok()).unwrap_or_default()
                            };
                            [
                                t.info.id.to_string(),
                                t.info.prefix.clone(),
                                t.org.clone().unwrap_or_else(|| "(superuser)".into()),
                                t.email.clone(),
                                t.info.name.clone().unwrap_or_default(),
                                t.state.clone(),
                                at(t.info.last_used_at),
                                at(t.info.expires_at),
                            ]
                        })
                        .collect();
                    print_table(
                        &[
                            "ID",
                            "PREFIX",
                            "ORG",
                            "USER",
                            "NAME",
                            "STATE",
                            "LAST USED",
                            "EXPIRES",
                        ],
                        &rows,
                    );
                }
            }
            Action::RevokeToken(id) => {
                if provision::revoke_token(pool, id).await?.is_none() {
                    anyhow::bail!("no active token with id {id}");
                }
                println!("revoked {id}");
            }
        }
        Ok(())
    }
}

async fn migrate(
    pool: &PgPool,
    args: MigrateArgs,
    template: Template,
    only: Vec<Slug>,
) -> anyhow::Result<()> {
    let opts = fleet::MigrateOptions {
        jobs: args.jobs,
        only,
        target: args.target,
    };
    let started = std::time::Instant::now();
    let plan = fleet::plan(pool, &template, &opts).await?;
    if args.plan {
        let rows: Vec<[String; 3]> = plan
            .behind
            .iter()
            .map(|t| {
                [
                    t.slug.to_string(),
                    format!("{} -> {}", t.template_version, plan.target),
                    fleet::pending(&template, t.template_version, plan.target).join(", "),
                ]
            })
            .collect();
        if args.json {
            let behind: Vec<_> = plan
                .behind
                .iter()
                .map(|t| {
                    serde_json::json!({
                        "slug": t.slug.as_str(),
                        "from": t.template_version,
                        "to": plan.target,
                        "pending": fleet::pending(&template, t.template_version, plan.target),
                    })
                })
                .collect();
            print_json(&serde_json::json!({
                "target": plan.target, "up_to_date": plan.up_to_date, "behind": behind
            }))?;
        } else {
            println!(
                "{} tenant(s) behind version {}, {} up to date",
                plan.behind.len(),
                plan.target,
                plan.up_to_date
            );
            if !rows.is_empty() {
                print_table(&["ORG", "VERSIONS", "WOULD APPLY"], &rows);
            }
        }
        return Ok(());
    }
    let interactive = !args.json && std::io::stderr().is_terminal();
    let bar = interactive.then(|| {
        let bar = indicatif::ProgressBar::new(plan.behind.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} tenants {elapsed} {msg}")
                .expect("valid progress template"),
        );
        bar
    });
    let json = args.json;
    let report = fleet::migrate_planned(pool, &template, plan, opts.jobs, started, |outcome| {
        if let Some(bar) = &bar {
            bar.inc(1);
            if let fleet::TenantOutcome::Failed { slug, .. } = outcome {
                bar.println(format!("failed: {slug}"));
            }
        } else if !json {
            match outcome {
                fleet::TenantOutcome::Migrated {
                    slug, from, to, ms, ..
                } => {
                    println!("migrated {slug}: {from} -> {to} in {ms:.0} ms")
                }
                fleet::TenantOutcome::Skipped { slug, reason } => {
                    println!("skipped {slug}: {reason}")
                }
                fleet::TenantOutcome::Failed { slug, .. } => println!("failed {slug}"),
            }
        }
    })
    .await?;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    if json {
        print_json(&report)?;
    } else {
        println!(
            "version {}: {} migrated, {} skipped, {} failed, {} already up to date, in {:.2} s",
            report.target,
            report.migrated,
            report.skipped,
            report.failed,
            report.up_to_date,
            report.seconds
        );
        for f in &report.failures {
            if let fleet::TenantOutcome::Failed {
                slug,
                migration,
                error,
                diverged,
                ..
            } = f
            {
                let what = if *diverged {
                    "history differs from the template"
                } else {
                    "failed"
                };
                println!(
                    "  {slug}: {what} at {}: {error}",
                    migration.as_deref().unwrap_or("?")
                );
            }
        }
    }
    if report.failed > 0 {
        return Err(PartialFailure(format!(
            "{} tenant(s) failed and were rolled back; fix them and run migrate again",
            report.failed
        ))
        .into());
    }
    Ok(())
}

async fn query(pool: &PgPool, args: QueryArgs) -> anyhow::Result<()> {
    let mut failed = 0;
    let mut table: Vec<(String, serde_json::Map<String, serde_json::Value>)> = vec![];
    let mut csv_header: Option<Vec<String>> = None;
    fleet::query_all(
        pool,
        &args.sql,
        args.jobs,
        Duration::from_millis(args.timeout_ms),
        |outcome| match outcome {
            fleet::QueryOutcome::Failed { slug, error } => {
                failed += 1;
                eprintln!("{slug}: {error}");
            }
            fleet::QueryOutcome::Rows { slug, rows } => {
                for row in rows {
                    match args.format {
                        QueryFormat::Json => {
                            let mut tagged = serde_json::Map::new();
                            tagged.insert("org".into(), slug.clone().into());
                            tagged.extend(row);
                            println!("{}", serde_json::Value::Object(tagged));
                        }
                        QueryFormat::Csv => {
                            let header = csv_header.get_or_insert_with(|| {
                                let cols: Vec<String> = row.keys().cloned().collect();
                                println!(
                                    "org,{}",
                                    cols.iter()
                                        .map(|c| csv_field(c))
                                        .collect::<Vec<_>>()
                                        .join(",")
                                );
                                cols
                            });
                            let cells: Vec<String> = header
                                .iter()
                                .map(|c| csv_field(&cell_text(row.get(c))))
                                .collect();
                            println!("{},{}", csv_field(&slug), cells.join(","));
                        }
                        QueryFormat::Table => table.push((slug.clone(), row)),
                    }
                }
            }
        },
    )
    .await?;
    if args.format == QueryFormat::Table {
        table.sort_by(|a, b| a.0.cmp(&b.0));
        let cols: Vec<String> = table
            .first()
            .map(|(_, r)| r.keys().cloned().collect())
            .unwrap_or_default();
        let header: Vec<&str> = std::iter::once("ORG")
            .chain(cols.iter().map(String::as_str))
            .collect();
        let rows: Vec<Vec<String>> = table
            .iter()
            .map(|(slug, row)| {
                std::iter::once(slug.clone())
                    .chain(cols.iter().map(|c| cell_text(row.get(c))))
                    .collect()
            })
            .collect();
        print_table(&header, &rows);
    }
    if failed > 0 {
        return Err(PartialFailure(format!("the query failed in {failed} tenant(s)")).into());
    }
    Ok(())
}

fn cell_text(v: Option<&serde_json::Value>) -> String {
    match v {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// Prints a new token; its secret is shown this once.
fn print_issued(
    user: &registry::User,
    issued: &registry::IssuedToken,
    label: &str,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        return print_json(&serde_json::json!({ "user": user, "token": issued }));
    }
    println!("{label} (id {}):", issued.info.id);
    println!("{}", issued.token);
    println!("store it now: it is shown once and cannot be recovered");
    Ok(())
}

fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn print_org(org: &Organization, json: bool) -> anyhow::Result<()> {
    if json {
        print_json(org)
    } else {
        print_orgs(std::slice::from_ref(org));
        Ok(())
    }
}

fn print_orgs(orgs: &[Organization]) {
    let header = ["SLUG", "NAME", "SCHEMA", "STATUS", "VERSION", "CREATED"];
    let rows: Vec<[String; 6]> = orgs
        .iter()
        .map(|o| {
            [
                o.slug.to_string(),
                o.name.clone(),
                o.schema_name.to_string(),
                o.status.to_string(),
                o.template_version.to_string(),
                o.created_at.format(&Rfc3339).unwrap_or_default(),
            ]
        })
        .collect();
    print_table(&header, &rows);
}

/// Prints left-aligned columns separated by two spaces.
pub fn print_table<R: AsRef<[String]>>(header: &[&str], rows: &[R]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row.as_ref()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.as_ref().iter().map(String::as_str).collect());
    }
}
