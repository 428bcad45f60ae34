//! `integrations doctor`: is this configuration safe?

use std::process::ExitCode;

use clap::Args;

use super::DatabaseArgs;

/// Options of `integrations doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    db: DatabaseArgs,
}

/// Runs the command.
pub fn run(_args: DoctorArgs) -> ExitCode {
    ExitCode::FAILURE
}
