//! `integrations doctor`: is this configuration safe for the server it
//! points at? One line per check, with what to do about each problem.

use std::process::ExitCode;

use clap::Args;
use db_pool::diagnostics::{self, DoctorOptions, DoctorReport, Status};
use db_pool::PoolConfig;

use super::DatabaseArgs;

/// Options of `integrations doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    db: DatabaseArgs,

    /// How many instances of the service run with this DATABASE_URL at once;
    /// each opens up to connection_limit connections, so the server must
    /// have room for connection_limit times this many.
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    instances: u32,

    /// The database server's CPU cores, for the formula
    /// (cores * 2) + spindles; needed when the doctor cannot read them from
    /// the server, and wins over what it reads (e.g. a container limited to
    /// fewer cores than its host).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    server_cores: Option<u32>,

    /// The formula's effective_spindle_count: disks the server reads from in
    /// parallel (1 for an SSD or a cloud volume, 0 when the data fits in memory).
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u32).range(0..=10_000))]
    spindles: u32,

    /// Print one JSON object, {"checks": [{"name", "status", "detail",
    /// "hint"}], "recommended_connection_limit": n}, instead of lines.
    #[arg(long)]
    json: bool,
}

/// Runs the command: 0 when no check fails (warnings allowed), 1 when one
/// does, 2 on invalid input.
pub fn run(args: DoctorArgs) -> ExitCode {
    let cfg = match super::pool_config(&args.db) {
        Ok(cfg) => cfg,
        Err(code) => return code,
    };
    let opts = DoctorOptions {
        instances: args.instances,
        server_cores: args.server_cores,
        spindles: args.spindles,
        // serve's change listener.
        outside_pool: 1,
    };
    super::block_on(async move {
        let report = diagnostics::doctor(&cfg, &opts).await;
        if args.json {
            match serde_json::to_string(&report) {
                Ok(json) => println!("{json}"),
                Err(e) => {
                    eprintln!("error: cannot encode the report: {e}");
                    return ExitCode::FAILURE;
                }
            }
        } else {
            print_report(&report, &cfg);
        }
        ExitCode::from(report.exit_code())
    })
}

fn print_report(report: &DoctorReport, cfg: &PoolConfig) {
    let width = report
        .checks
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(0);
    for check in &report.checks {
        println!(
            "{:<4} {:<width$}  {}",
            check.status.as_str(),
            check.name,
            check.detail
        );
        if let Some(hint) = &check.hint {
            println!("     -> {hint}");
        }
    }
    println!();
    match report.recommended_connection_limit {
        Some(n) => println!(
            "connection_limit: configured {}, recommended {n}",
            cfg.connection_limit
        ),
        None => println!(
            "connection_limit: configured {}, recommended unknown (pass --server-cores)",
            cfg.connection_limit
        ),
    }
    let count = |s: Status| report.checks.iter().filter(|c| c.status == s).count();
    println!(
        "result: {} fail, {} warn, {} ok",
        count(Status::Fail),
        count(Status::Warn),
        count(Status::Ok)
    );
}
