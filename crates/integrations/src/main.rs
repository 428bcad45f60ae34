//! The `integrations` binary: parses the command line and dispatches.
use std::process::ExitCode;

fn main() -> ExitCode {
    integrations::cli::run()
}
