//! The command line: one file per subcommand.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

pub mod activity;
pub mod api_key;
pub mod bench;
pub mod config;
pub mod doctor;
pub mod embedded;
pub mod encryption;
pub mod migrate;
pub mod progress;
pub mod serve;

/// Exit status for invalid input (a bad DATABASE_URL, a bad flag).
pub const EXIT_INVALID_INPUT: u8 = 2;

/// Integrations Management System: keeps users' third-party OAuth
/// integrations in PostgreSQL and their tokens fresh.
#[derive(Debug, Parser)]
#[command(name = "integrations", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the database is; shared by every command that needs it.
#[derive(Debug, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL with pool parameters, e.g.
    /// postgresql://user:password@host:5432/db?connection_limit=20&pool_timeout=30
    /// (read from DATABASE_URL, or from .env in the working directory).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// PostgreSQL URL that reaches the server itself, bypassing a pooler
    /// (Prisma's directUrl): migrations and serve's change listener use it.
    /// Required when DATABASE_URL has pgbouncer=true (read from DIRECT_URL).
    #[arg(long, env = "DIRECT_URL", hide_env_values = true)]
    pub direct_url: Option<String>,

    /// Profile supplying defaults the URL does not set: development,
    /// production or high-traffic (read from DATABASE_PROFILE).
    #[arg(long, env = "DATABASE_PROFILE", hide_env_values = true)]
    pub profile: Option<String>,

    /// Without DATABASE_URL: the embedded PostgreSQL's data directory.
    #[command(flatten)]
    pub embedded: embedded::EmbeddedArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the effective database settings and where each came from, without connecting.
    Config(config::ConfigArgs),
    /// Run one statement through the pool from many callers and report throughput, latency and pool waits.
    Bench(bench::BenchArgs),
    /// Show what the database's connections are doing (pg_stat_activity), in total and per application.
    Activity(activity::ActivityArgs),
    /// Check whether this configuration is safe for the server it points at, with what to do about each problem.
    Doctor(doctor::DoctorArgs),
    /// Apply the database schema migrations embedded in this binary.
    Migrate(migrate::MigrateArgs),
    /// Print a new encryption key for INTEGRATIONS_ENCRYPTION_KEYS.
    GenerateKey(encryption::GenerateKeyArgs),
    /// Re-encrypt every stored token with the first key of INTEGRATIONS_ENCRYPTION_KEYS, in batches; resumable.
    RotateKeys(encryption::RotateKeysArgs),
    /// Create, list or revoke API keys for the HTTP API.
    ApiKey(api_key::ApiKeyArgs),
    /// Run the HTTP API and the background refresher (with no DATABASE_URL, on an embedded PostgreSQL).
    Serve(serve::ServeArgs),
}

/// Parses the command line, runs the command, and returns its exit status.
pub fn run() -> ExitCode {
    if let Err(e) = crate::settings::load_dotenv() {
        eprintln!("error: {e}");
        return ExitCode::from(EXIT_INVALID_INPUT);
    }
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_)) {
        crate::telemetry::init_for_command();
    }
    match cli.command {
        Command::Config(args) => config::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Activity(args) => activity::run(args),
        Command::Doctor(args) => doctor::run(args),
        Command::Migrate(args) => migrate::run(args),
        Command::GenerateKey(args) => encryption::generate(args),
        Command::RotateKeys(args) => encryption::rotate(args),
        Command::ApiKey(args) => api_key::run(args),
        Command::Serve(args) => serve::run(args),
    }
}

/// The pool configuration from the command line and environment; on
/// invalid input prints the P1013 error and its hint and returns exit 2.
pub fn pool_config(db: &DatabaseArgs) -> Result<db_pool::PoolConfig, ExitCode> {
    let cfg = crate::settings::pool_config(db.database_url.as_deref(), db.profile.as_deref())
        .map_err(|e| invalid_config(&e))?;
    for p in &cfg.ignored_parameters {
        eprintln!("warning: unknown DATABASE_URL parameter '{p}' is ignored");
    }
    Ok(cfg)
}

/// `DIRECT_URL`'s pool configuration, if it is set; on invalid input
/// prints the P1013 error naming `DIRECT_URL` and returns exit 2.
pub fn direct_config(db: &DatabaseArgs) -> Result<Option<db_pool::PoolConfig>, ExitCode> {
    let Some(url) = db.direct_url.as_deref().filter(|u| !u.trim().is_empty()) else {
        return Ok(None);
    };
    let invalid = |what: String| {
        eprintln!("P1013: The provided database string is invalid. DIRECT_URL: {what}");
        eprintln!("hint: Fix DIRECT_URL: the URL of the PostgreSQL server itself, not of PgBouncer (see \"Running more than one instance\" in the README); `integrations config` shows the effective settings.");
        ExitCode::from(EXIT_INVALID_INPUT)
    };
    let cfg = match crate::settings::pool_config(Some(url), db.profile.as_deref()) {
        Ok(cfg) => cfg,
        Err(db_pool::ConfigError::InvalidUrl(what)) => return Err(invalid(what)),
        Err(e) => return Err(invalid(e.to_string())),
    };
    if cfg.pgbouncer {
        return Err(invalid(
            "it has pgbouncer=true; accepted: the server itself (LISTEN, advisory locks and migrations do not work through a transaction pooler)".to_string(),
        ));
    }
    for p in &cfg.ignored_parameters {
        eprintln!("warning: unknown DIRECT_URL parameter '{p}' is ignored");
    }
    Ok(Some(cfg))
}

/// The server itself for `what` (migrations, the change listener):
/// `DIRECT_URL` when set, else `main`, which must not go through PgBouncer
/// (`pgbouncer=true` without `DIRECT_URL`: the message says why, exit 2).
pub fn direct_or_main(
    main: &db_pool::PoolConfig,
    direct: Option<&db_pool::PoolConfig>,
    what: &str,
) -> Result<db_pool::PoolConfig, ExitCode> {
    match direct {
        Some(cfg) => Ok(cfg.clone()),
        None if main.pgbouncer => {
            eprintln!(
                "error: DATABASE_URL has pgbouncer=true and DIRECT_URL is not set: {what} need a session on the PostgreSQL server itself (LISTEN, advisory locks and DDL do not work through PgBouncer's transaction pooling)"
            );
            eprintln!("hint: set DIRECT_URL to the server's own URL, as Prisma's directUrl (see \"Running more than one instance\" in the README)");
            Err(ExitCode::from(EXIT_INVALID_INPUT))
        }
        None => Ok(main.clone()),
    }
}

/// Reports an invalid database setting with its hint: exit 2.
pub fn invalid_config(e: &db_pool::ConfigError) -> ExitCode {
    eprintln!("{e}");
    eprintln!(
        "hint: Fix DATABASE_URL (see the parameter table in the README); `integrations config` shows the effective settings without connecting."
    );
    ExitCode::from(EXIT_INVALID_INPUT)
}

/// Runs an async command on a multi-threaded runtime (one worker per core).
pub fn block_on<F: std::future::Future<Output = ExitCode>>(fut: F) -> ExitCode {
    block_on_threads(0, fut)
}

/// Runs an async command on a runtime with `threads` worker threads: 1 is a
/// single-threaded runtime, 0 one worker per core.
pub fn block_on_threads<F: std::future::Future<Output = ExitCode>>(
    threads: usize,
    fut: F,
) -> ExitCode {
    let mut builder = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if n > 1 {
                b.worker_threads(n);
            }
            b
        }
    };
    match builder.enable_all().build() {
        Ok(rt) => rt.block_on(fut),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Prints a command's failure with the pool's code and hint when there is
/// one, and returns exit status 1.
pub fn report_failure(e: &anyhow::Error) -> ExitCode {
    eprintln!("error: {e:#}");
    if let Some(db) = e.downcast_ref::<db_pool::Error>() {
        eprintln!("hint: {}", db.hint());
    }
    ExitCode::FAILURE
}
