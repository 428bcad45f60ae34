//! Runs the `integrations` binary as a user would: in an empty directory
//! (no stray `.env`), with the variables a test gives and none of the
//! database or key variables inherited from the environment.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Variables cleared unless the test sets them.
const CLEARED: [&str; 5] = [
    "DATABASE_URL",
    "DIRECT_URL",
    "NO_COLOR",
    "DATABASE_PROFILE",
    "INTEGRATIONS_ENCRYPTION_KEYS",
];

/// `integrations <args>` in `dir`, with `envs`.
pub fn command_in(dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_integrations"));
    cmd.current_dir(dir).args(args);
    for var in CLEARED {
        cmd.env_remove(var);
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd
}

/// `integrations <args>` in a fresh empty directory (kept while the
/// returned guard lives), with `envs`.
pub fn command(args: &[&str], envs: &[(&str, &str)]) -> (Command, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (command_in(dir.path(), args, envs), dir)
}

/// Runs `integrations <args>` in a fresh empty directory, with `envs`.
pub fn run(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let (mut cmd, _dir) = command(args, envs);
    cmd.output().unwrap()
}

/// `integrations <subcommand> <args>` against the database at `url`.
pub fn against(url: &str, subcommand: &str, args: &[&str]) -> (Command, tempfile::TempDir) {
    let args: Vec<&str> = std::iter::once(subcommand)
        .chain(args.iter().copied())
        .collect();
    command(&args, &[("DATABASE_URL", url)])
}

/// Runs `integrations <subcommand> <args>` against the database at `url`.
pub fn run_against(url: &str, subcommand: &str, args: &[&str]) -> Output {
    let (mut cmd, _dir) = against(url, subcommand, args);
    cmd.output().unwrap()
}

/// Standard output, as text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Standard error, as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
