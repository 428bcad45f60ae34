//! `integrations activity`: what the database's connections are doing, like
//! a small `top` over `pg_stat_activity`.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use db_pool::diagnostics::{self, Activity, Counts, Session};
use db_pool::Pool;

use super::embedded::Target;
use super::DatabaseArgs;

/// Options of `integrations activity`.
#[derive(Debug, Args)]
pub struct ActivityArgs {
    #[command(flatten)]
    db: DatabaseArgs,

    /// Print the sample as one JSON object (with --watch, one object per
    /// line per refresh) instead of a table.
    #[arg(long)]
    json: bool,

    /// Sample again every SECS seconds, redrawing the screen, until Ctrl-C.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    watch: Option<u64>,
}

/// ANSI: clear the screen and move the cursor home.
const CLEAR: &str = "\x1b[2J\x1b[H";

/// Runs the command: 0 after a sample (or after Ctrl-C with --watch), 1 when
/// the server cannot be reached or sampled, 2 on invalid input.
pub fn run(args: ActivityArgs) -> ExitCode {
    let target = match Target::of(&args.db) {
        Ok(target) => target,
        Err(code) => return code,
    };
    super::block_on(target.run(|cfg, _| async move {
        let database = cfg.database.clone();
        let pool = match Pool::new(diagnostics::diagnostic_config(&cfg)) {
            Ok(pool) => pool,
            Err(e) => return failed(&e),
        };
        let code = sample_loop(&pool, &database, &args).await;
        pool.close(Duration::from_secs(1)).await;
        code
    }))
}

fn failed(e: &db_pool::Error) -> ExitCode {
    eprintln!("{e}");
    eprintln!("hint: {}", e.hint());
    ExitCode::FAILURE
}

async fn sample(pool: &Pool, database: &str) -> Result<Activity, db_pool::Error> {
    let mut conn = pool.get().await?;
    diagnostics::activity(&mut conn, database).await
}

async fn sample_loop(pool: &Pool, database: &str, args: &ActivityArgs) -> ExitCode {
    let Some(every) = args.watch else {
        return match sample(pool, database).await {
            Ok(activity) => {
                show(&activity, args, None);
                ExitCode::SUCCESS
            }
            Err(e) => failed(&e),
        };
    };
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut first = true;
    loop {
        let result = tokio::select! {
            _ = &mut ctrl_c => return ExitCode::SUCCESS,
            result = sample(pool, database) => result,
        };
        match result {
            Ok(activity) => show(&activity, args, Some(every)),
            // Nothing to watch: the server is not there at all.
            Err(e) if first => return failed(&e),
            // It went away (restart, failover): say so and keep trying.
            Err(e) => {
                if !args.json {
                    print!("{CLEAR}");
                }
                eprintln!("{e}");
                eprintln!("hint: {}", e.hint());
            }
        }
        first = false;
        tokio::select! {
            _ = &mut ctrl_c => return ExitCode::SUCCESS,
            () = tokio::time::sleep(Duration::from_secs(every)) => {}
        }
    }
}

fn show(activity: &Activity, args: &ActivityArgs, watch: Option<u64>) {
    if args.json {
        match serde_json::to_string(activity) {
            Ok(json) => println!("{json}"),
            Err(e) => eprintln!("error: cannot encode the sample: {e}"),
        }
        return;
    }
    if let Some(every) = watch {
        print!("{CLEAR}");
        println!("every {every}s, Ctrl-C to stop");
    }
    print!("{}", render(activity));
}

/// Query text on one line, for the table.
fn one_line(query: &str) -> String {
    query.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn session_line(label: &str, s: &Session) -> String {
    format!(
        "{label}pid {} ({}), {}, {:.1} s: {}\n",
        s.pid,
        app_name(&s.application_name),
        s.state.as_deref().unwrap_or("state unknown"),
        s.duration_secs,
        one_line(&s.query)
    )
}

fn app_name(name: &str) -> &str {
    if name.is_empty() {
        "(none)"
    } else {
        name
    }
}

fn counts_line(c: &Counts) -> String {
    format!(
        "{} total, {} active, {} idle, {} idle in transaction, {} idle in transaction (aborted)",
        c.total, c.active, c.idle, c.idle_in_transaction, c.idle_in_transaction_aborted
    )
}

/// The text report: totals, a table per application, the longest
/// transaction and query, and who waits on whose locks.
fn render(a: &Activity) -> String {
    let mut out = format!("database {}  at {}\n", a.database, a.sampled_at);
    out.push_str(&format!("connections: {}\n", counts_line(&a.connections)));
    if !a.applications.is_empty() {
        let width = a
            .applications
            .iter()
            .map(|x| app_name(&x.application_name).len())
            .max()
            .unwrap_or(0)
            .max("application".len());
        out.push('\n');
        out.push_str(&format!(
            "{:<width$}  {:>5}  {:>6}  {:>5}  {:>10}  {:>7}\n",
            "application", "total", "active", "idle", "idle in tx", "aborted"
        ));
        for x in &a.applications {
            let c = &x.connections;
            out.push_str(&format!(
                "{:<width$}  {:>5}  {:>6}  {:>5}  {:>10}  {:>7}\n",
                app_name(&x.application_name),
                c.total,
                c.active,
                c.idle,
                c.idle_in_transaction,
                c.idle_in_transaction_aborted
            ));
        }
    }
    out.push('\n');
    match &a.longest_transaction {
        Some(s) => out.push_str(&session_line("longest transaction: ", s)),
        None => out.push_str("longest transaction: none open\n"),
    }
    match &a.longest_query {
        Some(s) => out.push_str(&session_line("longest query:       ", s)),
        None => out.push_str("longest query:       none running\n"),
    }
    out.push('\n');
    out.push_str(&format!("waiting on locks: {}\n", a.lock_waits.len()));
    for w in &a.lock_waits {
        let by: Vec<String> = w.blocked_by.iter().map(i32::to_string).collect();
        out.push_str(&format!(
            "  pid {} ({}) waiting {:.1} s, blocked by {}: {}\n",
            w.pid,
            app_name(&w.application_name),
            w.waiting_secs,
            if by.is_empty() {
                "(unknown)".to_string()
            } else {
                by.join(", ")
            },
            one_line(&w.query)
        ));
    }
    out
}
