//! `integrations migrate`: applies the embedded schema migrations.

use std::process::ExitCode;

use clap::Args;

use super::embedded::Target;
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
    let target = match Target::of(&args.db).and_then(|target| match target {
        Target::Url(main) => {
            let direct = super::direct_config(&args.db)?;
            super::direct_or_main(&main, direct.as_ref(), "migrations")
                .map(|cfg| Target::Url(Box::new(cfg)))
        }
        embedded => Ok(embedded),
    }) {
        Ok(target) => target,
        Err(code) => return code,
    };
    super::block_on(target.run(|cfg, _| async move {
        let spinner = super::progress::Progress::spinner("applying migrations");
        let applied = migrations::run_on(&cfg).await;
        spinner.finish();
        match applied {
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
    }))
}
