//! Command line: `tenantry migrate | orgs | tokens`. Configuration comes from
//! flags and the environment; without `DATABASE_URL` the commands use (and if
//! needed start) the zero-config local cluster in `--data-dir`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use std::time::Duration;

use crate::db::PoolConfig;
use crate::router::RouterConfig;
use crate::server::{self, ServerConfig};
use sqlx::PgPool;

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
    /// Apply the registry migrations.
    Migrate,
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
    /// Database connections shared by all tenants.
    #[arg(long, env = "TENANTRY_POOL_SIZE", default_value_t = 16)]
    pub pool_size: u32,
    /// Seconds a pooled connection lives before it is replaced (bounds the
    /// catalog cache each backend accumulates per tenant).
    #[arg(long, env = "TENANTRY_CONN_MAX_LIFETIME", default_value_t = 900)]
    pub conn_max_lifetime: u64,
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
        #[arg(long)]
        json: bool,
    },
    /// Issue a token for a platform superuser (acts on every org).
    Superuser {
        #[arg(long)]
        email: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by id.
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
        Ok(Database { pool, local })
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
    let action = Action::parse(cli.command)?;
    let pool_config = PoolConfig {
        max_connections: 4,
        ..PoolConfig::default()
    };
    let db = Database::connect(&cli.db, &pool_config).await?;
    let result = action.run(&db.pool).await;
    db.close().await?;
    result
}

async fn serve(db_args: &DbArgs, args: ServeArgs) -> anyhow::Result<()> {
    let pool_config = PoolConfig {
        max_connections: args.pool_size,
        max_lifetime: Duration::from_secs(args.conn_max_lifetime),
        ..PoolConfig::default()
    };
    let db = Database::connect(db_args, &pool_config).await?;
    let config = ServerConfig {
        router: RouterConfig {
            ttl: Duration::from_secs(args.cache_ttl),
            ..RouterConfig::default()
        },
        auth_ttl: Duration::from_secs(args.auth_ttl),
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
    let state = server::state(db.pool.clone(), &config);
    let served = server::serve(listener, state, server::shutdown_signal()).await;
    db.close().await?;
    Ok(served?)
}

/// A command with its arguments already validated.
enum Action {
    Migrate,
    CreateOrg(NewOrg, bool),
    ListOrgs(bool),
    Suspend(Slug, bool),
    Resume(Slug, bool),
    Rename(Slug, Slug, bool),
    Delete(Slug, bool),
    CreateToken(Slug, String, Option<String>, bool),
    SuperuserToken(String, Option<String>, bool),
    RevokeToken(uuid::Uuid),
}

impl Action {
    fn parse(command: Command) -> anyhow::Result<Self> {
        Ok(match command {
            Command::Serve(_) => unreachable!("serve is handled before"),
            Command::Migrate => Action::Migrate,
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
                    json,
                } => {
                    let email = registry::parse_email(&email)?;
                    Action::CreateToken(Slug::parse(&slug)?, email, name, json)
                }
                TokensCommand::Superuser { email, name, json } => {
                    Action::SuperuserToken(registry::parse_email(&email)?, name, json)
                }
                TokensCommand::Revoke { id } => Action::RevokeToken(id),
            },
        })
    }

    async fn run(self, pool: &PgPool) -> anyhow::Result<()> {
        match self {
            Action::Migrate => {
                // Connecting already applied the registry migrations.
                println!("registry is up to date");
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
            Action::CreateToken(slug, email, name, json) => {
                let (user, issued) =
                    provision::issue_org_token(pool, &slug, &email, name.as_deref()).await?;
                if json {
                    print_json(&serde_json::json!({ "user": user, "token": issued }))?;
                } else {
                    println!(
                        "token for {} in {slug} (id {}):",
                        user.email, issued.info.id
                    );
                    println!("{}", issued.token);
                    println!("store it now: it is shown once and cannot be recovered");
                }
            }
            Action::SuperuserToken(email, name, json) => {
                let (user, issued) =
                    provision::issue_superuser_token(pool, &email, name.as_deref()).await?;
                if json {
                    print_json(&serde_json::json!({ "user": user, "token": issued }))?;
                } else {
                    println!(
                        "superuser token for {} (id {}):",
                        user.email, issued.info.id
                    );
                    println!("{}", issued.token);
                    println!("store it now: it is shown once and cannot be recovered");
                }
            }
            Action::RevokeToken(id) => {
                if registry::revoke_token(pool, id).await?.is_none() {
                    anyhow::bail!("no active token with id {id}");
                }
                println!("revoked {id}");
            }
        }
        Ok(())
    }
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
                o.created_at
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
            ]
        })
        .collect();
    print_table(&header, &rows);
}

/// Prints left-aligned columns separated by two spaces.
pub fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}
