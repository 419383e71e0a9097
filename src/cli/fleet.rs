//! `migrate`, `migrate status`, `query --all` and `doctor`: the fleet
//! commands.

use std::io::IsTerminal;
use std::time::Duration;

use sqlx::PgPool;

use super::render::{cell_text, csv_field, print_json, print_table};
use super::{Command, MigrateArgs, MigrateCommand, PartialFailure, QueryArgs, QueryFormat};
use crate::base::ident::Slug;
use crate::tenants::fleet;
use crate::tenants::template::Template;

/// `migrate` with its templates loaded.
pub(super) struct MigrateJob {
    args: MigrateArgs,
    tenant: Template,
    shared: Template,
    only: Vec<Slug>,
}

/// A fleet command with its arguments already validated.
pub(super) enum Action {
    Migrate(Box<MigrateJob>),
    MigrateStatus(bool),
    Query(QueryArgs),
    Doctor(bool, bool),
    Audit(bool),
}

impl Action {
    pub(super) fn parse(command: Command) -> anyhow::Result<Self> {
        Ok(match command {
            Command::Migrate(args) => match args.command {
                Some(MigrateCommand::Status { json }) => Action::MigrateStatus(json),
                None => {
                    let template = match &args.template_dir {
                        Some(dir) => Template::from_dir(dir)?,
                        None => Template::embedded(),
                    };
                    let shared = match &args.shared_template_dir {
                        Some(dir) => Template::from_dir(dir)?,
                        None => crate::tenants::shared::embedded_template(),
                    };
                    let only = args
                        .only
                        .iter()
                        .map(|s| Slug::parse(s))
                        .collect::<Result<Vec<_>, _>>()?;
                    Action::Migrate(Box::new(MigrateJob {
                        args,
                        tenant: template,
                        shared,
                        only,
                    }))
                }
            },
            Command::Query(args) => {
                crate::tenants::fleet::prepare_query(&args.sql)?;
                Action::Query(args)
            }
            Command::Doctor {
                audit: true, json, ..
            } => Action::Audit(json),
            Command::Doctor { repair, json, .. } => Action::Doctor(repair, json),
            Command::Serve(_)
            | Command::Work(_)
            | Command::Jobs(_)
            | Command::Orgs(_)
            | Command::Tokens(_)
            | Command::Warm(_)
            | Command::Nodes { .. }
            | Command::Rebalance { .. } => {
                unreachable!("not a fleet command")
            }
        })
    }

    pub(super) async fn run(self, pool: &PgPool) -> anyhow::Result<()> {
        match self {
            Action::Migrate(job) => {
                let MigrateJob {
                    args,
                    tenant,
                    shared,
                    only,
                } = *job;
                migrate(pool, args, tenant, shared, only).await?
            }
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
                    println!("shared schema at version {}", status.shared_version);
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
            Action::Audit(json) => {
                let breaches = fleet::audit::audit(pool).await?;
                if json {
                    print_json(&breaches)?;
                } else if breaches.is_empty() {
                    println!(
                        "confinement holds: no grant, membership, attribute or owner breaks it"
                    );
                }
                if !json {
                    for b in &breaches {
                        println!("{}: {} {} ({})", b.rule, b.role, b.detail, b.object);
                        println!("  repair: {};", b.repair);
                    }
                }
                if !breaches.is_empty() {
                    return Err(PartialFailure(format!(
                        "{} breach(es) of tenant confinement",
                        breaches.len()
                    ))
                    .into());
                }
            }
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
        }
        Ok(())
    }
}

async fn migrate(
    pool: &PgPool,
    args: MigrateArgs,
    template: Template,
    shared_template: Template,
    only: Vec<Slug>,
) -> anyhow::Result<()> {
    // The shared schema first: tenant migrations may read it. Its
    // transaction also checks the tenant template against it.
    let shared = if args.plan {
        None
    } else {
        let shared = crate::tenants::shared::migrate(pool, &shared_template, &template).await?;
        if !shared.applied.is_empty() && !args.json {
            println!(
                "shared schema: applied {} (now at version {})",
                shared.applied.join(", "),
                shared.version
            );
        }
        Some(shared)
    };
    let opts = fleet::MigrateOptions {
        jobs: args.jobs,
        only,
        target: args.target,
        lock_timeout: std::time::Duration::from_millis(args.lock_timeout_ms.max(1)),
        lock_retries: args.lock_retries,
    };
    let started = std::time::Instant::now();
    // Orgs created before tenant roles get theirs first: migrations run as
    // the tenant's role.
    if args.plan {
        let missing = crate::registry::roles::orgs_without_roles(pool).await?;
        if !missing.is_empty() && !args.json {
            println!(
                "{} organization(s) have no PostgreSQL role yet; migrate creates them first",
                missing.len()
            );
        }
    } else {
        let upgraded = crate::registry::roles::ensure_tenant_roles(pool).await?;
        if !upgraded.is_empty() && !args.json {
            println!(
                "created the PostgreSQL role of {} organization(s) made by an earlier version",
                upgraded.len()
            );
        }
        let engine = crate::pg::engine::Engine::detect(&mut *pool.acquire().await?).await?;
        let with_jobs = crate::tenants::jobs::add_to_existing_schemas(pool, engine).await?;
        if with_jobs > 0 && !args.json {
            println!("added the job table to {with_jobs} schema(s) built by an earlier version");
        }
    }
    let plan = fleet::plan(pool, &template, &opts).await?;
    if args.plan {
        let shared_pending = crate::tenants::shared::pending(pool, &shared_template).await?;
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
                "shared_pending": shared_pending,
                "target": plan.target, "up_to_date": plan.up_to_date, "behind": behind
            }))?;
        } else {
            if !shared_pending.is_empty() {
                println!("shared schema: would apply {}", shared_pending.join(", "));
            }
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
    let report = fleet::migrate_planned(pool, &template, plan, &opts, started, |outcome| {
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
                fleet::TenantOutcome::LockTimeout { slug, .. } => {
                    println!("lock timeout {slug}: left at its version")
                }
            }
        }
    })
    .await?;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    if json {
        let mut value = serde_json::to_value(&report)?;
        if let (Some(map), Some(shared)) = (value.as_object_mut(), &shared) {
            map.insert(
                "shared".into(),
                serde_json::json!({ "applied": shared.applied, "version": shared.version }),
            );
        }
        print_json(&value)?;
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
        if report.lock_timeouts > 0 {
            println!(
                "{} tenant(s) could not get their locks and were left at their version",
                report.lock_timeouts
            );
        }
        if report.warm_rebuilt > 0 {
            println!(
                "{} warm schema(s) rebuilt at version {}",
                report.warm_rebuilt, report.target
            );
        }
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
            } else if let fleet::TenantOutcome::LockTimeout {
                slug,
                from,
                attempts,
                ..
            } = f
            {
                println!("  {slug}: lock timeout at version {from} after {attempts} attempt(s)");
            }
        }
    }
    let mut problems = vec![];
    if report.failed > 0 {
        problems.push(format!(
            "{} tenant(s) failed and were rolled back; fix them and run migrate again",
            report.failed
        ));
    }
    if report.lock_timeouts > 0 {
        let names: Vec<&str> = report
            .failures
            .iter()
            .filter_map(|f| match f {
                fleet::TenantOutcome::LockTimeout { slug, .. } => Some(slug.as_str()),
                _ => None,
            })
            .collect();
        problems.push(format!(
            "{} tenant(s) could not take their locks within the lock timeout ({}); \
             they are unchanged: find the long transaction holding them (pg_stat_activity) \
             and run migrate again, or raise --lock-timeout-ms",
            report.lock_timeouts,
            names.join(", ")
        ));
    }
    if !problems.is_empty() {
        return Err(PartialFailure(problems.join("; ")).into());
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
