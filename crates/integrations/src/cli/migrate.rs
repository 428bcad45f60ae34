//! `integrations migrate`: applies the embedded schema migrations.

use std::process::ExitCode;

use clap::Args;
use db_pool::Pool;

use super::DatabaseArgs;
use crate::store::migrations;

/// Options of `integrations migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    db: DatabaseArgs,
}

/// Runs the command: 0 when the schema is up to date, 1 on failure, 2 on
/// invalid input.
pub fn run(args: MigrateArgs) -> ExitCode {
    let cfg = match super::pool_config(&args.db) {
        Ok(cfg) => cfg,
        Err(code) => return code,
    };
    super::block_on(async move {
        let result = async {
            let pool = Pool::new(cfg)?;
            let applied = migrations::run(&pool).await;
            pool.close(std::time::Duration::from_secs(5)).await;
            applied
        }
        .await;
        match result {
            Ok(applied) if applied.applied.is_empty() => {
                println!("schema up to date");
                ExitCode::SUCCESS
            }
            Ok(applied) => {
                for m in &applied.applied {
                    println!("applied {m}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => super::report_failure(&e),
        }
    })
}
