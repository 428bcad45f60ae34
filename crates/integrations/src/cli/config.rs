//! `integrations config`: the effective settings, without connecting (with
//! no `DATABASE_URL`, the embedded database's, joined or started to learn
//! where its socket is).

use std::process::ExitCode;

use clap::Args;

use db_pool::PoolConfig;

use super::embedded::Target;
use super::DatabaseArgs;

/// Options of `integrations config`.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    #[command(flatten)]
    db: DatabaseArgs,

    /// Print one JSON object (parameter names as keys; durations in seconds,
    /// null where disabled or unlimited) instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs the command: 0 when the configuration is valid, 2 when it is not.
pub fn run(args: ConfigArgs) -> ExitCode {
    let target = match Target::of(&args.db) {
        Ok(target) => target,
        Err(code) => return code,
    };
    let direct = match super::direct_config(&args.db) {
        Ok(direct) => direct,
        Err(code) => return code,
    };
    let embedded = target.is_embedded();
    super::block_on(
        target.run(|cfg, _| async move { print(&cfg, direct.as_ref(), embedded, args.json) }),
    )
}

fn print(cfg: &PoolConfig, direct: Option<&PoolConfig>, embedded: bool, json: bool) -> ExitCode {
    if json {
        println!("{}", cfg.to_json());
        return ExitCode::SUCCESS;
    }
    if embedded {
        println!(
            "DATABASE_URL  not set: the embedded PostgreSQL, {}",
            cfg.redacted_url()
        );
    } else {
        println!("DATABASE_URL  {}", cfg.redacted_url());
    }
    match direct {
        Some(d) => println!("DIRECT_URL    {} (migrations, serve's change listener)", d.redacted_url()),
        None if cfg.pgbouncer => println!("DIRECT_URL    not set: required with pgbouncer=true (migrate and serve refuse to start)"),
        None => println!("DIRECT_URL    not set: migrations and serve's change listener use DATABASE_URL"),
    }
    println!(
        "profile       {}",
        cfg.profile.map_or(
            "none (set DATABASE_PROFILE to development, production or high-traffic)".to_string(),
            |p| p.to_string()
        )
    );
    println!();
    let rows = cfg.describe();
    let width = rows.iter().map(|(k, _, _)| k.len()).max().unwrap_or(0);
    let vwidth = rows.iter().map(|(_, v, _)| v.len()).max().unwrap_or(0);
    println!("{:width$}  {:vwidth$}  source", "parameter", "value");
    for (name, value, source) in rows {
        println!("{name:width$}  {value:vwidth$}  {source}");
    }
    if !cfg.ignored_parameters.is_empty() {
        println!();
        println!("ignored parameters: {}", cfg.ignored_parameters.join(", "));
    }
    ExitCode::SUCCESS
}
