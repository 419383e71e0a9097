//! Where tenants live on a Citus cluster, read from Citus' own metadata
//! (never copied into the registry): the worker nodes, the node of each
//! org, moving an org to another node (`citus_schema_move`) and Citus'
//! rebalancer. On plain PostgreSQL every org is on the one server: nodes
//! are none, and moves and rebalancing are refused with
//! [`Error::NotCitus`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use crate::base::error::Error;
use crate::base::ident::{SchemaName, Slug};
use crate::pg::engine::Engine;

/// A worker node and what it holds.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Node {
    /// `host:port`, as Citus knows it.
    pub node: String,
    /// Tenant schemas placed on it.
    pub tenants: i64,
    /// Their total size, bytes.
    pub bytes: i64,
}

async fn require_citus(conn: &mut PgConnection, what: &'static str) -> Result<(), Error> {
    if Engine::detect(conn).await?.is_citus() {
        Ok(())
    } else {
        Err(Error::NotCitus(what))
    }
}

/// The nodes that may hold tenants, with their tenant count and size.
pub async fn nodes(pool: &PgPool) -> Result<Vec<Node>, Error> {
    let mut conn = pool.acquire().await?;
    require_citus(&mut conn, "node listings need a Citus cluster").await?;
    Ok(sqlx::query_as(
        "SELECT n.nodename || ':' || n.nodeport AS node, \
           count(DISTINCT s.colocation_id) AS tenants, \
           coalesce(sum(s.shard_size), 0)::bigint AS bytes \
         FROM pg_dist_node n \
         LEFT JOIN citus_shards s ON s.nodename = n.nodename AND s.nodeport = n.nodeport \
           AND s.citus_table_type = 'schema' \
         WHERE n.noderole = 'primary' AND n.isactive AND n.shouldhaveshards \
         GROUP BY n.nodename, n.nodeport ORDER BY n.nodename, n.nodeport",
    )
    .fetch_all(&mut *conn)
    .await?)
}

/// The node (`host:port`) of each of these schemas that Citus has placed;
/// empty on plain PostgreSQL.
pub async fn nodes_of(
    conn: &mut PgConnection,
    schemas: &[&str],
) -> Result<HashMap<String, String>, Error> {
    if schemas.is_empty() || !Engine::detect(conn).await?.is_citus() {
        return Ok(HashMap::new());
    }
    placements(conn, schemas).await
}

/// [`nodes_of`] on a database known to be a Citus coordinator.
async fn placements(
    conn: &mut PgConnection,
    schemas: &[&str],
) -> Result<HashMap<String, String>, Error> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT DISTINCT ON (ns.nspname) ns.nspname::text, s.nodename || ':' || s.nodeport \
         FROM citus_shards s JOIN pg_class c ON c.oid = s.table_name \
         JOIN pg_namespace ns ON ns.oid = c.relnamespace \
         WHERE s.citus_table_type = 'schema' AND ns.nspname = ANY($1) \
         ORDER BY ns.nspname",
    )
    .bind(schemas)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().collect())
}

/// An org with where it lives.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PlacedOrg {
    #[serde(flatten)]
    pub organization: crate::registry::Organization,
    /// `host:port` of the Citus worker that holds its schema (from Citus'
    /// metadata); null on plain PostgreSQL.
    pub node: Option<String>,
}

/// `orgs` with their nodes, looked up in one query.
pub async fn placed(
    conn: &mut PgConnection,
    orgs: Vec<crate::registry::Organization>,
) -> Result<Vec<PlacedOrg>, Error> {
    let schemas: Vec<&str> = orgs.iter().map(|o| o.schema_name.as_str()).collect();
    let mut nodes = nodes_of(conn, &schemas).await?;
    Ok(orgs
        .into_iter()
        .map(|o| PlacedOrg {
            node: nodes.remove(o.schema_name.as_str()),
            organization: o,
        })
        .collect())
}

/// A finished move.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Moved {
    pub slug: String,
    pub from: String,
    pub to: String,
    /// False when the org was on `to` already.
    pub moved: bool,
    pub seconds: f64,
}

/// Parses `host:port`.
fn parse_node(raw: &str) -> Result<(String, i32), Error> {
    let invalid = || Error::Validation {
        field: "to",
        message: format!("{raw:?} is not host:port"),
    };
    let (host, port) = raw.rsplit_once(':').ok_or_else(invalid)?;
    let port: u16 = port.parse().map_err(|_| invalid())?;
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid());
    }
    Ok((host.to_owned(), i32::from(port)))
}

/// Key of the advisory lock a move of one org holds (its class, beside
/// the fleet's per-tenant locks).
const MOVE_LOCK_CLASS: i32 = 0x6d6f7665; // "move"

/// Moves org `slug` to the worker `to` (`host:port`) with
/// `citus_schema_move` in `block_writes` mode: reads of the org go on
/// throughout; its writes wait until the copy is done (and fail with 503
/// `tenant_busy` if that takes longer than the lock timeout), then go to
/// the new node. One move per org at a time, from any process: a second
/// one gets [`Error::MoveInProgress`].
///
/// Not Citus' default (`auto`, logical replication, writes paused only at
/// the switch-over): under a steady writer through tenantry, that mode
/// lost 1 to 5 acknowledged writes at the switch-over in about one move in
/// three here (Citus 13.2.2; they stayed in the old node's shard, which
/// Citus then drops). A write that waits is better than one that is lost.
#[tracing::instrument(skip(pool))]
pub async fn move_org(pool: &PgPool, slug: &Slug, to: &str) -> Result<Moved, Error> {
    move_org_reporting(pool, slug, to, |_| {}).await
}

/// How far a move has got: bytes of the org's tables on the target so far,
/// of their size on the source (from `get_rebalance_progress()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoveProgress {
    pub copied: i64,
    pub total: i64,
}

/// [`move_org`], calling `progress` about once a second while Citus
/// copies.
pub async fn move_org_reporting(
    pool: &PgPool,
    slug: &Slug,
    to: &str,
    mut progress: impl FnMut(MoveProgress) + Send,
) -> Result<Moved, Error> {
    let started = Instant::now();
    let (host, port) = parse_node(to)?;
    let mut conn = pool.acquire().await?;
    require_citus(&mut conn, "moves need a Citus cluster").await?;
    let org = crate::registry::get_org(&mut conn, slug).await?;
    let known: Vec<String> = sqlx::query_scalar(
        "SELECT nodename || ':' || nodeport FROM pg_dist_node \
         WHERE noderole = 'primary' AND isactive AND shouldhaveshards ORDER BY 1",
    )
    .fetch_all(&mut *conn)
    .await?;
    let target = format!("{host}:{port}");
    if !known.contains(&target) {
        return Err(Error::UnknownNode {
            node: target,
            known,
        });
    }
    let schema = org.schema_name.clone();
    let from = placements(&mut conn, &[schema.as_str()])
        .await?
        .remove(schema.as_str())
        .ok_or_else(|| {
            Error::Conflict(format!("organization {slug:?} has no placement to move"))
        })?;
    let lock_key = lock_key(&org.id);
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
        .bind(MOVE_LOCK_CLASS)
        .bind(lock_key)
        .fetch_one(&mut *conn)
        .await?;
    if !locked {
        return Err(Error::MoveInProgress(slug.to_string()));
    }
    let result = if from == target {
        Ok(false)
    } else {
        let moving = move_schema(&mut conn, &schema, &host, port);
        tokio::pin!(moving);
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.tick().await;
        loop {
            tokio::select! {
                done = &mut moving => break done.map(|_| true),
                _ = every.tick() => {
                    // best effort: a progress query that fails shows nothing
                    if let Ok(p) = move_progress(pool, &schema).await {
                        progress(p);
                    }
                }
            }
        }
    };
    // the lock goes with the session if the connection broke
    let _ = sqlx::query("SELECT pg_advisory_unlock($1, $2)")
        .bind(MOVE_LOCK_CLASS)
        .bind(lock_key)
        .execute(&mut *conn)
        .await;
    let moved = result?;
    tracing::info!(slug = %slug, %from, to = %target, moved, "organization placed");
    Ok(Moved {
        slug: slug.to_string(),
        from,
        to: target,
        moved,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn lock_key(org_id: &uuid::Uuid) -> i32 {
    let (hi, _) = org_id.as_u64_pair();
    (hi >> 32) as i32
}

async fn move_schema(
    conn: &mut PgConnection,
    schema: &SchemaName,
    host: &str,
    port: i32,
) -> Result<(), Error> {
    sqlx::query(
        "SELECT citus_schema_move($1::regnamespace, $2, $3, shard_transfer_mode := 'block_writes')",
    )
    .bind(schema.as_str())
    .bind(host)
    .bind(port)
    .execute(conn)
    .await
    .map_err(|e| match crate::base::error::sqlstate(&e).as_deref() {
        // Citus' own guard against two moves of one placement
        Some("55P03") => Error::MoveInProgress(schema.to_string()),
        _ => Error::Database(e),
    })?;
    Ok(())
}

async fn move_progress(pool: &PgPool, schema: &SchemaName) -> Result<MoveProgress, sqlx::Error> {
    let (copied, total): (i64, i64) = sqlx::query_as(
        "SELECT coalesce(sum(p.target_shard_size), 0)::bigint, coalesce(sum(p.source_shard_size), 0)::bigint \
         FROM get_rebalance_progress() p JOIN pg_class c ON c.oid = p.table_name \
         JOIN pg_namespace ns ON ns.oid = c.relnamespace WHERE ns.nspname = $1",
    )
    .bind(schema.as_str())
    .fetch_one(pool)
    .await?;
    Ok(MoveProgress { copied, total })
}

/// A move the rebalancer plans.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct PlannedMove {
    /// The schema (tenant) moved with this shard group.
    pub schema: String,
    pub from: String,
    pub to: String,
    pub bytes: i64,
}

/// What Citus' rebalancer would move now, one row per tenant.
pub async fn rebalance_plan(pool: &PgPool) -> Result<Vec<PlannedMove>, Error> {
    let mut conn = pool.acquire().await?;
    require_citus(&mut conn, "rebalancing needs a Citus cluster").await?;
    Ok(sqlx::query_as(
        "SELECT DISTINCT ON (ns.nspname) ns.nspname::text AS schema, \
           p.sourcename || ':' || p.sourceport AS \"from\", \
           p.targetname || ':' || p.targetport AS \"to\", p.shard_size::bigint AS bytes \
         FROM get_rebalance_table_shards_plan() p \
         JOIN pg_class c ON c.oid = p.table_name JOIN pg_namespace ns ON ns.oid = c.relnamespace \
         ORDER BY ns.nspname",
    )
    .fetch_all(&mut *conn)
    .await?)
}

/// Runs Citus' rebalancer (`citus_rebalance_start`) and waits for it,
/// calling `progress` with each change of its state; returns the moves it
/// was planned to make.
pub async fn rebalance(
    pool: &PgPool,
    mut progress: impl FnMut(&str),
) -> Result<Vec<PlannedMove>, Error> {
    let plan = rebalance_plan(pool).await?;
    if plan.is_empty() {
        return Ok(plan);
    }
    let mut conn = pool.acquire().await?;
    let job: i64 = sqlx::query_scalar("SELECT citus_rebalance_start()")
        .fetch_one(&mut *conn)
        .await?;
    let mut last = String::new();
    loop {
        let (state, details): (String, Option<String>) = sqlx::query_as(
            "SELECT state::text, details::text FROM citus_rebalance_status() WHERE job_id = $1",
        )
        .bind(job)
        .fetch_one(&mut *conn)
        .await?;
        if state != last {
            progress(&state);
            last = state.clone();
        }
        match state.as_str() {
            "finished" => return Ok(plan),
            "failed" | "cancelled" => {
                return Err(Error::Internal(format!(
                    "the rebalance job {job} ended {state}: {}",
                    details.unwrap_or_default()
                )))
            }
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_node;

    #[test]
    fn nodes_are_host_and_port() {
        assert_eq!(
            parse_node("10.0.0.2:5432").unwrap(),
            ("10.0.0.2".into(), 5432)
        );
        assert_eq!(
            parse_node("worker-1.internal:6432").unwrap(),
            ("worker-1.internal".into(), 6432)
        );
        for bad in [
            "",
            "host",
            ":5432",
            "host:",
            "host:99999",
            "host:-1",
            "bad host:1",
        ] {
            assert!(parse_node(bad).is_err(), "{bad:?}");
        }
    }
}
