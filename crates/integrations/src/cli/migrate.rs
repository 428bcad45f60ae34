//! `integrations migrate`: applies the embedded schema migrations.

use std::process::ExitCode;

use clap::Args;

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
    // On DIRECT_URL when set: DDL and advisory locks need the server itself.
    let cfg = match super::pool_config(&args.db).and_then(|main| {
        let direct = super::direct_config(&args.db)?;
        super::direct_or_main(&main, direct.as_ref(), "migrations")
    }) {
        Ok(cfg) => cfg,
        Err(code) => return code,
    };
    super::block_on(async move {
        match migrations::run_on(&cfg).await {
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
