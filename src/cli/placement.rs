//! `nodes` and `rebalance`: where tenants live on a Citus cluster.

use sqlx::PgPool;

use super::render::{print_json, print_table};

pub(super) enum Action {
    Nodes(bool),
    Rebalance { plan: bool, json: bool },
}

fn megabytes(bytes: i64) -> String {
    format!("{:.1}", bytes as f64 / 1e6)
}

impl Action {
    pub(super) async fn run(self, pool: &PgPool) -> anyhow::Result<()> {
        match self {
            Action::Nodes(json) => {
                let nodes = crate::tenants::placement::nodes(pool).await?;
                if json {
                    print_json(&nodes)?;
                } else {
                    let rows: Vec<[String; 3]> = nodes
                        .iter()
                        .map(|n| [n.node.clone(), n.tenants.to_string(), megabytes(n.bytes)])
                        .collect();
                    print_table(&["NODE", "TENANTS", "MB"], &rows);
                }
            }
            Action::Rebalance { plan, json } => {
                let moves = if plan {
                    crate::tenants::placement::rebalance_plan(pool).await?
                } else {
                    crate::tenants::placement::rebalance(pool, |state| {
                        if !json {
                            eprintln!("rebalance: {state}");
                        }
                    })
                    .await?
                };
                if json {
                    print_json(&moves)?;
                } else if moves.is_empty() {
                    println!("balanced: nothing to move");
                } else {
                    let rows: Vec<[String; 4]> = moves
                        .iter()
                        .map(|m| {
                            [
                                m.schema.clone(),
                                m.from.clone(),
                                m.to.clone(),
                                megabytes(m.bytes),
                            ]
                        })
                        .collect();
                    print_table(&["SCHEMA", "FROM", "TO", "MB"], &rows);
                    if plan {
                        println!(
                            "{} move(s) planned; run without --plan to make them",
                            moves.len()
                        );
                    } else {
                        println!("{} move(s) made", moves.len());
                    }
                }
            }
        }
        Ok(())
    }
}
