//! `warm status | fill | drain`: the warm pool of tenant schemas.

use sqlx::PgPool;

use super::render::{print_json, print_table};
use super::WarmCommand;
use crate::tenants::template::Template;
use crate::tenants::warm;

pub(super) async fn run(command: WarmCommand, pool: &PgPool) -> anyhow::Result<()> {
    let template = Template::embedded();
    match command {
        WarmCommand::Status { json } => {
            let status = warm::status(pool, &template).await?;
            if json {
                print_json(&status)?;
            } else {
                print_table(
                    &["TEMPLATE VERSION", "READY", "OUTDATED", "NEWER"],
                    &[[
                        status.template_version.to_string(),
                        status.ready.to_string(),
                        status.outdated.to_string(),
                        status.newer.to_string(),
                    ]],
                );
            }
        }
        WarmCommand::Fill { count } => {
            let built = warm::fill(pool, &template, count as usize).await?;
            let status = warm::status(pool, &template).await?;
            println!(
                "built {built} warm schema(s); {} ready at version {}",
                status.ready, status.template_version
            );
        }
        WarmCommand::Drain { keep } => {
            let dropped = warm::drain(pool, keep as usize).await?;
            println!("dropped {dropped} warm schema(s)");
        }
    }
    Ok(())
}
