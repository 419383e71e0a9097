//! `jobs list | show | cancel | retry | stats`: an org's background jobs,
//! read and changed in the org's own transactions (as its role), and counts
//! over every org.

use sqlx::PgPool;
use uuid::Uuid;

use super::render::{print_json, print_table};
use super::JobsCommand;
use crate::base::ident::Slug;
use crate::jobs::manage::{self, Job, JobState};
use crate::serving::router::{RouterConfig, TenantRouter};

pub(super) enum Action {
    List {
        org: Slug,
        state: Option<JobState>,
        limit: i64,
        json: bool,
    },
    Show {
        org: Slug,
        id: Uuid,
        json: bool,
    },
    Cancel {
        org: Slug,
        id: Uuid,
    },
    Retry {
        org: Slug,
        id: Uuid,
    },
    Stats {
        org: Option<Slug>,
        json: bool,
    },
}

fn job_id(id: &str) -> anyhow::Result<Uuid> {
    Uuid::parse_str(id).map_err(|_| anyhow::anyhow!("invalid job id {id:?}: not a UUID"))
}

impl Action {
    pub(super) fn parse(cmd: JobsCommand) -> anyhow::Result<Self> {
        Ok(match cmd {
            JobsCommand::List {
                org,
                state,
                limit,
                json,
            } => Action::List {
                org: Slug::parse(&org)?,
                state: state.as_deref().map(JobState::parse).transpose()?,
                limit,
                json,
            },
            JobsCommand::Show { org, id, json } => Action::Show {
                org: Slug::parse(&org)?,
                id: job_id(&id)?,
                json,
            },
            JobsCommand::Cancel { org, id } => Action::Cancel {
                org: Slug::parse(&org)?,
                id: job_id(&id)?,
            },
            JobsCommand::Retry { org, id } => Action::Retry {
                org: Slug::parse(&org)?,
                id: job_id(&id)?,
            },
            JobsCommand::Stats { org, json } => Action::Stats {
                org: org.as_deref().map(Slug::parse).transpose()?,
                json,
            },
        })
    }

    pub(super) async fn run(self, pool: &PgPool, url: &str) -> anyhow::Result<()> {
        // the admin role is a member of every tenant role: its tenant
        // transactions run as the org's role, like a server's
        let router = TenantRouter::single(pool.clone(), url, &RouterConfig::default())?;
        match self {
            Action::List {
                org,
                state,
                limit,
                json,
            } => {
                let jobs = router
                    .with_tenant(&org, async move |tx| {
                        manage::list(tx, state, None, limit).await
                    })
                    .await?;
                if json {
                    return print_json(&jobs);
                }
                let rows: Vec<[String; 6]> = jobs.iter().map(row).collect();
                print_table(
                    &["ID", "KIND", "STATE", "ATTEMPT", "CREATED", "ERROR"],
                    &rows,
                );
            }
            Action::Show { org, id, json } => {
                let job = router
                    .with_tenant(&org, async move |tx| manage::get(tx, id).await)
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("job {id} not found in {org}"))?;
                if json {
                    return print_json(&job);
                }
                show(&job);
            }
            Action::Cancel { org, id } => {
                let job = router
                    .with_tenant(&org, async move |tx| manage::cancel(tx, id).await)
                    .await?;
                println!("job {} is {}", job.id, job.state.as_str());
            }
            Action::Retry { org, id } => {
                let job = router
                    .with_tenant(&org, async move |tx| manage::retry(tx, id).await)
                    .await?;
                println!("job {} is {} again", job.id, job.state.as_str());
            }
            Action::Stats {
                org: Some(org),
                json,
            } => {
                let counts = router
                    .with_tenant(&org, async |tx| manage::counts(tx).await)
                    .await?;
                let counts: Vec<(String, i64)> = counts
                    .into_iter()
                    .map(|(s, n)| (s.as_str().to_owned(), n))
                    .collect();
                stats(&counts, None, json)?;
            }
            Action::Stats { org: None, json } => {
                let engine = crate::pg::engine::Engine::detect(&mut *pool.acquire().await?).await?;
                let (counts, ready) = crate::jobs::queue::fleet_counts(pool, engine).await?;
                let counts: Vec<(String, i64)> = JobState::ALL
                    .iter()
                    .map(|s| {
                        let n = counts
                            .iter()
                            .find(|(c, _)| c == s.as_str())
                            .map_or(0, |c| c.1);
                        (s.as_str().to_owned(), n)
                    })
                    .collect();
                stats(&counts, Some(ready), json)?;
            }
        }
        router.tenant_pool().close().await;
        Ok(())
    }
}

fn row(job: &Job) -> [String; 6] {
    [
        job.id.to_string(),
        job.kind.clone(),
        job.state.as_str().to_owned(),
        format!("{}/{}", job.attempt, job.max_attempts),
        job.created_at.to_string(),
        job.error.clone().unwrap_or_default(),
    ]
}

fn show(job: &Job) {
    let opt = |t: Option<time::OffsetDateTime>| t.map_or("-".to_owned(), |t| t.to_string());
    println!("id:         {}", job.id);
    println!("kind:       {}", job.kind);
    println!("state:      {}", job.state.as_str());
    println!("attempt:    {}/{}", job.attempt, job.max_attempts);
    println!("unique key: {}", job.unique_key.as_deref().unwrap_or("-"));
    println!("schedule:   {}", job.schedule.as_deref().unwrap_or("-"));
    println!("run at:     {}", job.run_at);
    println!("created:    {}", job.created_at);
    println!("started:    {}", opt(job.started_at));
    println!("finished:   {}", opt(job.finished_at));
    println!(
        "progress:   {}",
        job.progress
            .as_ref()
            .map_or("-".to_owned(), |p| p.to_string())
    );
    println!("error:      {}", job.error.as_deref().unwrap_or("-"));
}

fn stats(counts: &[(String, i64)], ready: Option<i64>, json: bool) -> anyhow::Result<()> {
    if json {
        let mut value = serde_json::Map::new();
        for (state, n) in counts {
            value.insert(state.clone(), (*n).into());
        }
        if let Some(ready) = ready {
            value.insert("orgs_in_ready_index".into(), ready.into());
        }
        return print_json(&value);
    }
    let mut rows: Vec<[String; 2]> = counts
        .iter()
        .map(|(s, n)| [s.clone(), n.to_string()])
        .collect();
    if let Some(ready) = ready {
        rows.push(["(orgs in the ready index)".into(), ready.to_string()]);
    }
    print_table(&["STATE", "JOBS"], &rows);
    Ok(())
}
