//! `integrations doctor`: is this configuration safe for the server it
//! points at? One line per check, with what to do about each problem.

use std::process::ExitCode;

use clap::Args;
use std::collections::HashMap;

use db_pool::diagnostics::{self, Check, DoctorOptions, DoctorReport, Status};
use db_pool::PoolConfig;

use super::embedded::Target;
use super::DatabaseArgs;
use crate::oauth::ProviderRegistry;

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
    let target = match Target::of(&args.db) {
        Ok(target) => target,
        Err(code) => return code,
    };
    let opts = DoctorOptions {
        instances: args.instances,
        server_cores: args.server_cores,
        spindles: args.spindles,
        // serve's change listener.
        outside_pool: 1,
    };
    let providers = crate::settings::ServiceSettings::from_env(&crate::settings::process_env)
        .map_err(|e| e.to_string())
        .and_then(|s| {
            s.providers(&crate::settings::process_env)
                .map_err(|e| e.to_string())
        });
    super::block_on(target.run(|cfg, _| async move {
        let mut report = diagnostics::doctor(&cfg, &opts).await;
        report.checks.push(providers_check(providers, &cfg).await);
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
    }))
}

/// Which providers lack their client id or secret (their refreshes and
/// connect flows answer 503 `provider_not_configured`): a warning when
/// integrations of such a provider are stored, since they will not be
/// refreshed.
async fn providers_check(registry: Result<ProviderRegistry, String>, cfg: &PoolConfig) -> Check {
    let check = |status, detail: String, hint: Option<String>| Check {
        name: "providers".into(),
        status,
        detail,
        hint,
    };
    let registry = match registry {
        Ok(r) => r,
        Err(e) => {
            return check(
                Status::Fail,
                e,
                Some("fix INTEGRATIONS_PROVIDERS or the variables it names".into()),
            )
        }
    };
    let stored = stored_per_provider(cfg).await.unwrap_or_default();
    let mut unconfigured = Vec::new();
    let mut stranded = Vec::new();
    for p in registry.iter() {
        let missing = p.missing_variables();
        if missing.is_empty() {
            continue;
        }
        let count = stored.get(p.name.as_str()).copied().unwrap_or(0);
        if count > 0 {
            stranded.push(format!("{} ({count} stored)", p.name));
        }
        unconfigured.push(format!("{} (set {})", p.name, missing.join(", ")));
    }
    let configured = registry.configured_names().join(", ");
    let configured = if configured.is_empty() {
        "none".to_string()
    } else {
        configured
    };
    let detail = if unconfigured.is_empty() {
        format!("all configured: {configured}")
    } else {
        format!(
            "configured: {configured}; not configured: {}",
            unconfigured.join(", ")
        )
    };
    if stranded.is_empty() {
        check(Status::Ok, detail, None)
    } else {
        check(
            Status::Warn,
            detail,
            Some(format!(
                "integrations of {} are not refreshed and answer 503 provider_not_configured: set the variables named above",
                stranded.join(", ")
            )),
        )
    }
}

/// How many integrations each provider has; `None` when the server or the
/// table cannot be read (the other checks say why).
async fn stored_per_provider(cfg: &PoolConfig) -> Option<HashMap<String, i64>> {
    let pool = db_pool::Pool::new(cfg.clone()).ok()?;
    let mut conn = pool.get().await.ok()?;
    let rows = conn
        .query(
            "SELECT provider, count(*) FROM integrations GROUP BY provider",
            &[],
        )
        .await
        .ok()?;
    rows.iter()
        .map(|r| {
            Some((
                r.try_get::<_, String>(0).ok()?,
                r.try_get::<_, i64>(1).ok()?,
            ))
        })
        .collect()
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
