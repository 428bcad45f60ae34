//! `integrations activity`: what the database's connections are doing.

use std::process::ExitCode;

use clap::Args;

use super::DatabaseArgs;

/// Options of `integrations activity`.
#[derive(Debug, Args)]
pub struct ActivityArgs {
    #[command(flatten)]
    db: DatabaseArgs,
}

/// Runs the command.
pub fn run(_args: ActivityArgs) -> ExitCode {
    ExitCode::FAILURE
}
