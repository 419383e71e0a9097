//! `orgs` and `tokens`: organization lifecycle and API tokens. Every change
//! goes through the tenancy core's `Orgs`, as the HTTP API's do, which
//! announces it to running servers.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use time::format_description::well_known::Rfc3339;

use super::render::{
    print_issued, print_json, print_org, print_orgs, print_table, JsonArrayWriter, OrgTable,
};
use super::{OrgsCommand, TokensCommand};
use crate::base::ident::Slug;
use crate::registry;
use crate::tenancy::Orgs;
use crate::tenants::provision::{self, NewOrg};
use crate::tenants::template::Template;

/// An org or token command with its arguments already validated.
pub(super) enum Action {
    CreateOrg(NewOrg, bool),
    ListOrgs(Option<i64>, Option<Slug>, bool),
    Suspend(Slug, bool),
    Resume(Slug, bool),
    Rename(Slug, Slug, bool),
    Delete(Slug, bool),
    Move(Slug, String, bool),
    Export(Slug, String, crate::tenants::archive::RowFormat),
    Import(Slug, String, Option<String>, bool),
    Clone(Slug, Slug, Option<String>, bool),
    CreateToken(Slug, String, Option<String>, Option<Duration>, bool),
    SuperuserToken(String, Option<String>, Option<Duration>, bool),
    ListTokens(Option<Slug>, bool),
    RevokeToken(uuid::Uuid),
}

impl Action {
    pub(super) fn parse_orgs(cmd: OrgsCommand) -> anyhow::Result<Self> {
        Ok(match cmd {
            OrgsCommand::Create {
                slug,
                name,
                owner_email,
                json,
            } => Action::CreateOrg(NewOrg::parse(&slug, &name, owner_email.as_deref())?, json),
            OrgsCommand::List { limit, after, json } => {
                if limit.is_some_and(|l| l < 1) {
                    anyhow::bail!("--limit must be at least 1");
                }
                Action::ListOrgs(limit, after.as_deref().map(Slug::parse).transpose()?, json)
            }
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
            OrgsCommand::Move { slug, to, json } => Action::Move(Slug::parse(&slug)?, to, json),
            OrgsCommand::Export {
                slug,
                output,
                format,
            } => Action::Export(Slug::parse(&slug)?, output, format),
            OrgsCommand::Import {
                new_slug,
                input,
                name,
                json,
            } => Action::Import(Slug::parse(&new_slug)?, input, name, json),
            OrgsCommand::Clone {
                source,
                new_slug,
                name,
                json,
            } => Action::Clone(Slug::parse(&source)?, Slug::parse(&new_slug)?, name, json),
        })
    }

    pub(super) fn parse_tokens(cmd: TokensCommand) -> anyhow::Result<Self> {
        Ok(match cmd {
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
        })
    }

    pub(super) async fn run(self, pool: &PgPool) -> anyhow::Result<()> {
        let orgs = Orgs::new(pool.clone(), Arc::new(Template::embedded()));
        match self {
            Action::CreateOrg(new, json) => {
                let created = orgs.create(&new).await?;
                if json {
                    print_json(&created)?;
                } else {
                    print_orgs(std::slice::from_ref(&created.organization));
                    if let Some(owner) = created.owner {
                        println!("owner: {} ({})", owner.email, owner.id);
                    }
                }
            }
            Action::ListOrgs(limit, after, json) => {
                // A page at a time: memory stays flat however many orgs.
                const PAGE: i64 = 1000;
                let mut after = after.map(|s| s.to_string());
                let mut left = limit.unwrap_or(i64::MAX);
                let (mut table, mut array) = (OrgTable::default(), JsonArrayWriter::default());
                while left > 0 {
                    let orgs =
                        registry::list_orgs_page(pool, after.as_deref(), left.min(PAGE)).await?;
                    let orgs = crate::tenants::placement::placed(&mut *pool.acquire().await?, orgs)
                        .await?;
                    if json {
                        array.items(&orgs)?;
                    } else {
                        table.rows(&orgs);
                    }
                    left -= orgs.len() as i64;
                    match orgs.last() {
                        Some(last) if orgs.len() as i64 == PAGE => {
                            after = Some(last.organization.slug.to_string())
                        }
                        _ => break,
                    }
                }
                if json {
                    array.finish();
                }
            }
            Action::Suspend(slug, json) => print_org(&orgs.suspend(&slug).await?, json)?,
            Action::Resume(slug, json) => print_org(&orgs.resume(&slug).await?, json)?,
            Action::Rename(slug, new_slug, json) => {
                print_org(&orgs.rename(&slug, &new_slug).await?, json)?
            }
            Action::Delete(slug, json) => {
                let org = orgs.delete(&slug).await?;
                if json {
                    print_json(&org)?;
                } else {
                    println!("deleted {} (schema {} dropped)", org.slug, org.schema_name);
                }
            }
            Action::Move(slug, to, json) => {
                if !json {
                    println!(
                        "moving {slug} to {to}: reads go on, writes wait until Citus has copied its tables..."
                    );
                }
                let moved = orgs
                    .move_to(&slug, &to, |p| {
                        if !json && p.total > 0 {
                            eprintln!(
                                "  copied {:.1} of {:.1} MB",
                                p.copied as f64 / 1e6,
                                p.total as f64 / 1e6
                            );
                        }
                    })
                    .await?;
                if json {
                    print_json(&moved)?;
                } else if moved.moved {
                    println!(
                        "moved {} from {} to {} in {:.1} s",
                        moved.slug, moved.from, moved.to, moved.seconds
                    );
                } else {
                    println!("{} is on {} already; nothing moved", moved.slug, moved.to);
                }
            }
            Action::Export(slug, output, format) => {
                let exported = if output == "-" {
                    crate::tenants::archive::export_as(
                        pool,
                        &slug,
                        format,
                        &mut tokio::io::stdout(),
                    )
                    .await?
                } else {
                    // complete or absent: never a half-written archive
                    let partial = format!("{output}.partial");
                    let mut file = tokio::fs::File::create(&partial)
                        .await
                        .map_err(|e| anyhow::anyhow!("cannot create {partial}: {e}"))?;
                    match crate::tenants::archive::export_as(pool, &slug, format, &mut file).await {
                        Ok(exported) => {
                            file.sync_all().await?;
                            tokio::fs::rename(&partial, &output).await?;
                            exported
                        }
                        Err(e) => {
                            let _ = tokio::fs::remove_file(&partial).await;
                            return Err(e.into());
                        }
                    }
                };
                let rows: u64 = exported.header.tables.iter().map(|t| t.rows).sum();
                eprintln!(
                    "exported {slug}: {rows} rows in {} tables, {} bytes (template version {})",
                    exported.header.tables.len(),
                    exported.bytes,
                    exported.header.template_version
                );
            }
            Action::Import(new_slug, input, name, json) => {
                let imported = if input == "-" {
                    orgs.import(&new_slug, name.as_deref(), tokio::io::stdin())
                        .await?
                } else {
                    let file = tokio::fs::File::open(&input)
                        .await
                        .map_err(|e| anyhow::anyhow!("cannot open {input}: {e}"))?;
                    orgs.import(&new_slug, name.as_deref(), file).await?
                };
                if json {
                    print_json(&imported)?;
                } else {
                    print_orgs(std::slice::from_ref(&imported.created.organization));
                    println!(
                        "imported {} rows (archive at template version {}, now {})",
                        imported.rows,
                        imported.from_template_version,
                        imported.created.organization.template_version
                    );
                }
            }
            Action::Clone(source, new_slug, name, json) => {
                let started = std::time::Instant::now();
                let cloned = orgs.clone_org(&source, &new_slug, name.as_deref()).await?;
                if json {
                    print_json(&cloned)?;
                } else {
                    print_orgs(std::slice::from_ref(&cloned.created.organization));
                    println!(
                        "cloned {source} into {new_slug}: {} rows in {:.2} s",
                        cloned.rows,
                        started.elapsed().as_secs_f64()
                    );
                }
            }
            Action::CreateToken(slug, email, name, expires_in, json) => {
                let (user, issued) = orgs
                    .issue_org_token(&slug, &email, name.as_deref(), expires_in)
                    .await?;
                print_issued(
                    &user,
                    &issued,
                    &format!("token for {} in {slug}", user.email),
                    json,
                )?;
            }
            Action::SuperuserToken(email, name, expires_in, json) => {
                let (user, issued) = orgs
                    .issue_superuser_token(&email, name.as_deref(), expires_in)
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
                if !orgs.revoke_token(id).await? {
                    anyhow::bail!("no active token with id {id}");
                }
                println!("revoked {id}");
            }
        }
        Ok(())
    }
}
