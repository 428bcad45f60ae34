//! `integrations api-key create|list|revoke`.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use db_pool::Pool;
use secrecy::ExposeSecret;

use super::embedded::Target;
use super::DatabaseArgs;
use crate::service::api_keys::{ApiKeySummary, ApiKeys, AuthError, Scope, DEFAULT_VERIFY_TTL};

/// Options of `integrations api-key`.
#[derive(Debug, Args)]
pub struct ApiKeyArgs {
    #[command(subcommand)]
    command: ApiKeyCommand,
}

#[derive(Debug, Subcommand)]
enum ApiKeyCommand {
    /// Create a key; it is printed once, alone on the last line of standard output, and cannot be shown again.
    Create(CreateArgs),
    /// List every key (active and revoked) with its id, name, prefix and scopes; never the key itself.
    List(ListArgs),
    /// Revoke an active key by id or name; running servers hear of it through their change feed and stop accepting it at once.
    Revoke(RevokeArgs),
}

/// Options of `integrations api-key create`.
#[derive(Debug, Args)]
struct CreateArgs {
    #[command(flatten)]
    db: DatabaseArgs,

    /// The key's name, unique among active keys: 1 to 64 letters, digits,
    /// '-', '_' or '.', not only digits (e.g. ci-deploy).
    #[arg(long, value_parser = parse_name)]
    name: String,

    /// What the key may do, comma-separated: read, write, credentials,
    /// admin (each is separate: admin does not imply read).
    #[arg(long, required = true, value_delimiter = ',', value_parser = parse_scope)]
    scopes: Vec<Scope>,
}

/// Options of `integrations api-key list`.
#[derive(Debug, Args)]
struct ListArgs {
    #[command(flatten)]
    db: DatabaseArgs,

    /// Print the keys as one JSON array instead of a table.
    #[arg(long)]
    json: bool,
}

/// Options of `integrations api-key revoke`.
#[derive(Debug, Args)]
struct RevokeArgs {
    #[command(flatten)]
    db: DatabaseArgs,

    /// The key to revoke: its id (as shown by `api-key list`) or its name.
    #[arg(value_name = "ID_OR_NAME")]
    key: String,
}

fn parse_name(name: &str) -> Result<String, AuthError> {
    crate::service::api_keys::validate_name(name).map(|()| name.to_string())
}

fn parse_scope(scope: &str) -> Result<Scope, crate::service::api_keys::UnknownScope> {
    scope.parse()
}

/// Runs the command: 0 on success, 1 on failure (including a duplicate name
/// and a revoke that matched no active key), 2 on invalid input.
pub fn run(args: ApiKeyArgs) -> ExitCode {
    let db = match &args.command {
        ApiKeyCommand::Create(a) => &a.db,
        ApiKeyCommand::List(a) => &a.db,
        ApiKeyCommand::Revoke(a) => &a.db,
    };
    // Without DATABASE_URL: the embedded database `serve` uses.
    let target = match Target::of(db) {
        Ok(target) => target,
        Err(code) => return code,
    };
    super::block_on(target.run(|cfg, started| async move {
        let pool = match Pool::new(cfg) {
            Ok(pool) => pool,
            Err(e) => return super::report_failure(&e.into()),
        };
        // `create` may be the first use of a database; so may any command
        // on an embedded database it started.
        if matches!(args.command, ApiKeyCommand::Create(_)) || started {
            if let Err(e) = crate::store::migrations::run(&pool).await {
                return super::report_failure(&e);
            }
        }
        let keys = ApiKeys::new(pool.clone(), DEFAULT_VERIFY_TTL);
        let code = match args.command {
            ApiKeyCommand::Create(a) => create(&keys, a).await,
            ApiKeyCommand::List(a) => list(&keys, a).await,
            ApiKeyCommand::Revoke(a) => revoke(&keys, a).await,
        };
        pool.close(Duration::from_secs(5)).await;
        code
    }))
}

async fn create(keys: &ApiKeys, args: CreateArgs) -> ExitCode {
    match keys.create(&args.name, &args.scopes).await {
        Ok((key, info)) => {
            let prefix = key
                .expose_secret()
                .get(..crate::service::api_keys::DISPLAY_PREFIX_LEN)
                .unwrap_or_default();
            eprintln!(
                "created API key '{}' (id {}, prefix {prefix}) with scopes {}; \
                 it is shown once, on the next line: store it now",
                info.name,
                info.id,
                scope_list(&info.scopes)
            );
            println!("{}", key.expose_secret());
            ExitCode::SUCCESS
        }
        Err(e) => failed(&e),
    }
}

async fn list(keys: &ApiKeys, args: ListArgs) -> ExitCode {
    let all = match keys.list().await {
        Ok(all) => all,
        Err(e) => return failed(&e),
    };
    if args.json {
        return match serde_json::to_string(&all) {
            Ok(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: cannot encode the keys: {e}");
                ExitCode::FAILURE
            }
        };
    }
    print!("{}", render(&all));
    if all.is_empty() {
        eprintln!("no API keys yet; create one with `integrations api-key create`");
    }
    ExitCode::SUCCESS
}

async fn revoke(keys: &ApiKeys, args: RevokeArgs) -> ExitCode {
    match keys.revoke(&args.key).await {
        Ok(0) => {
            eprintln!(
                "error: no active API key has the id or name '{}' (see `integrations api-key list`)",
                crate::service::api_keys::shown(&args.key)
            );
            ExitCode::FAILURE
        }
        Ok(_) => {
            println!(
                "revoked API key '{}'",
                crate::service::api_keys::shown(&args.key)
            );
            eprintln!(
                "servers that verified it recently accept it for at most {} s more",
                keys.verify_ttl().as_secs()
            );
            ExitCode::SUCCESS
        }
        Err(e) => failed(&e),
    }
}

/// Prints an error with what to do: exit 2 for invalid input, else 1.
fn failed(e: &AuthError) -> ExitCode {
    match e {
        AuthError::Db(db) => {
            eprintln!("error: {db}");
            if db.sqlstate() == Some("42P01") {
                eprintln!(
                    "hint: the api_keys table does not exist yet: run `integrations migrate`"
                );
            } else {
                eprintln!("hint: {}", db.hint());
            }
            ExitCode::FAILURE
        }
        e if e.is_invalid_input() => {
            eprintln!("error: {e}");
            ExitCode::from(super::EXIT_INVALID_INPUT)
        }
        e => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn scope_list(scopes: &[Scope]) -> String {
    scopes
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// The keys as a table.
fn render(keys: &[ApiKeySummary]) -> String {
    let time = |t: &chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%SZ").to_string();
    let rows: Vec<[String; 6]> = keys
        .iter()
        .map(|k| {
            [
                k.id.to_string(),
                k.name.clone(),
                k.prefix.clone(),
                scope_list(&k.scopes),
                time(&k.created_at),
                k.revoked_at.as_ref().map_or_else(|| "-".to_string(), time),
            ]
        })
        .collect();
    let header = ["ID", "NAME", "PREFIX", "SCOPES", "CREATED", "REVOKED"].map(String::from);
    let mut widths = [0usize; 6];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
