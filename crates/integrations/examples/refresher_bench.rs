//! The refresher benchmark recorded in BENCHMARKS.md (run through
//! `scripts/bench-refresher`): TOKENS integrations come due at once, a
//! token endpoint on 127.0.0.1 answers each refresh in DELAYS_MS (100 and
//! 500), and one or two real `serve` processes (SERVE_BIN) refresh them
//! with their background refreshers, default settings (`connection_limit=10`,
//! refresher concurrency 64) except the scan interval: 1 s instead of 30,
//! so every instance starts on the rows within a second of their commit.
//!
//! The endpoint rotates refresh tokens and refuses one used twice
//! (`invalid_grant`), so a double refresh shows as a refused request.
//! Reported per run: refreshes per second (first request to the last, at
//! the endpoint), requests (must equal the rows), refused requests, the
//! most requests in flight at the endpoint, database statements per
//! refresh (`pg_stat_database.xact_commit` of the database: every statement
//! outside a transaction commits once; the instances' other work included)
//! and result writes per refresh (`integrations_refresh_result_writes_total`),
//! and the backlog (rows not refreshed yet) every 5 seconds.
//!
//! The reference, in the same run: one instance with
//! `INTEGRATIONS_REFRESH_CONCURRENCY=5`, the refresher's fixed concurrency
//! before limits existed, on REFERENCE_TOKENS rows at the first delay.
//!
//! `DATABASE_URL` names a database it may fill (its tables are emptied).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/bench_tokens.rs"]
mod bench_tokens;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Form, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use db_pool::{Pool, PoolConfig};
use integrations::crypto::Keyring;
use serde_json::json;
use tokio::process::{Child, Command};

fn arg(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// The token endpoint's state.
#[derive(Default)]
struct Endpoint {
    delay: Mutex<Duration>,
    /// Refresh tokens it accepts (each once).
    valid: Mutex<HashSet<String>>,
    issued: AtomicUsize,
    requests: AtomicUsize,
    refused: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// First and last request.
    span: Mutex<Option<(Instant, Instant)>>,
}

impl Endpoint {
    fn reset(&self, delay: Duration, tokens: usize) {
        *self.delay.lock().unwrap() = delay;
        *self.valid.lock().unwrap() = (0..tokens).map(|i| format!("rt{i}")).collect();
        for c in [&self.requests, &self.refused, &self.max_in_flight] {
            c.store(0, Ordering::SeqCst);
        }
        *self.span.lock().unwrap() = None;
    }
}

async fn token(
    State(ep): State<Arc<Endpoint>>,
    Form(form): Form<std::collections::HashMap<String, String>>,
) -> Response {
    let now = Instant::now();
    ep.requests.fetch_add(1, Ordering::SeqCst);
    {
        let mut span = ep.span.lock().unwrap();
        *span = Some(span.map_or((now, now), |(first, _)| (first, now)));
    }
    let n = ep.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    ep.max_in_flight.fetch_max(n, Ordering::SeqCst);
    let delay = *ep.delay.lock().unwrap();
    tokio::time::sleep(delay).await;
    ep.in_flight.fetch_sub(1, Ordering::SeqCst);
    let presented = form.get("refresh_token").cloned().unwrap_or_default();
    let fresh = {
        let mut valid = ep.valid.lock().unwrap();
        if !valid.remove(&presented) {
            None
        } else {
            let n = ep.issued.fetch_add(1, Ordering::SeqCst);
            let next = format!("rt-next-{n}");
            valid.insert(next.clone());
            Some(next)
        }
    };
    match fresh {
        Some(next) => Json(json!({
            "access_token": "at-new", "refresh_token": next,
            "token_type": "Bearer", "expires_in": 3600,
        }))
        .into_response(),
        None => {
            ep.refused.fetch_add(1, Ordering::SeqCst);
            (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": "invalid_grant"})),
            )
                .into_response()
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Run<'a> {
    url: &'a str,
    bin: &'a str,
    keys: &'a str,
    providers: &'a str,
    pool: &'a Pool,
    ep: &'a Arc<Endpoint>,
}

/// One `serve` on a free port, ready.
async fn serve(run: &Run<'_>, extra: &[(&str, &str)]) -> (Child, u16) {
    let port = free_port();
    let sep = if run.url.contains('?') { '&' } else { '?' };
    let mut cmd = Command::new(run.bin);
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env(
            "DATABASE_URL",
            format!("{}{sep}connection_limit=10", run.url),
        )
        .env("INTEGRATIONS_ENCRYPTION_KEYS", run.keys)
        .env("INTEGRATIONS_PROVIDERS", run.providers)
        .env("BENCH_SECRET", "s")
        .env("INTEGRATIONS_REFRESH_INTERVAL", "1")
        .env("RUST_LOG", "warn")
        .envs(extra.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let child = cmd.spawn().expect("SERVE_BIN runs");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = client
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ready {
            return (child, port);
        }
        assert!(Instant::now() < deadline, "serve did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The sum of a counter over an instance's /metrics.
async fn counter(port: u16, name: &str, filter: &str) -> f64 {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn xact_commits(pool: &Pool) -> i64 {
    let mut conn = pool.get().await.unwrap();
    conn.query_one(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

async fn measure(
    run: &Run<'_>,
    label: &str,
    tokens: usize,
    delay: Duration,
    instances: usize,
    extra: &[(&str, &str)],
) {
    let mut children = Vec::new();
    for _ in 0..instances {
        children.push(serve(run, extra).await);
    }
    run.ep.reset(delay, tokens);
    let ring = Keyring::parse(run.keys).unwrap();
    {
        let mut conn = run.pool.get().await.unwrap();
        conn.batch_execute("TRUNCATE integrations, events, webhook_endpoints, webhook_deliveries")
            .await
            .unwrap();
        let mut tx = conn.transaction().await.unwrap();
        bench_tokens::insert(&mut tx, &ring, tokens).await;
        tx.commit().await.unwrap();
        conn.batch_execute("ANALYZE integrations").await.unwrap();
    }
    // Stats are flushed by each backend at most once a second: read them
    // after a pause on both sides.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let commits_before = xact_commits(run.pool).await;
    let started = Instant::now();
    let mut backlog = Vec::new();
    let mut conn = run.pool.get().await.unwrap();
    loop {
        let left: i64 = conn
            .query_one(
                "SELECT count(*) FROM integrations WHERE refresh_generation = 0",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        let t = started.elapsed().as_secs();
        if backlog.last().is_none_or(|(last, _)| t >= last + 5) {
            backlog.push((t, left));
        }
        if left == 0 || started.elapsed() > Duration::from_secs(900) {
            if backlog.last().is_some_and(|(_, l)| *l != left) {
                backlog.push((t, left));
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(conn);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let commits = xact_commits(run.pool).await - commits_before;
    let (mut writes, mut ok) = (0.0, 0.0);
    for (_, port) in &children {
        writes += counter(*port, "integrations_refresh_result_writes_total", "").await;
        ok += counter(*port, "integrations_refreshes_total", "outcome=\"ok\"").await;
    }
    drop(children);
    let requests = run.ep.requests.load(Ordering::SeqCst);
    let (first, last) = run.ep.span.lock().unwrap().unwrap();
    let secs = (last - first).as_secs_f64();
    println!(
        "{label}: {instances} instance(s), {tokens} due, endpoint {} ms: {:.0} refreshes/s ({:.1} s); \
         requests {requests} (refused {}), most in flight {}; \
         statements per refresh {:.3}, result writes per refresh {:.3} ({writes} for {ok})",
        delay.as_millis(),
        tokens as f64 / secs,
        secs,
        run.ep.refused.load(Ordering::SeqCst),
        run.ep.max_in_flight.load(Ordering::SeqCst),
        commits as f64 / tokens as f64,
        writes / ok.max(1.0),
    );
    let series: Vec<String> = backlog.iter().map(|(t, l)| format!("{t}s:{l}")).collect();
    println!("  backlog (rows not refreshed) {}", series.join(" "));
}

#[tokio::main]
async fn main() {
    let url = std::env::var("DATABASE_URL").expect("set DATABASE_URL");
    let bin = arg("SERVE_BIN", "target/release/integrations");
    let tokens: usize = arg("TOKENS", "20000").parse().unwrap();
    let reference_tokens: usize = arg("REFERENCE_TOKENS", "3000").parse().unwrap();
    let delays: Vec<u64> = arg("DELAYS_MS", "100,500")
        .split(',')
        .map(|d| d.trim().parse().unwrap())
        .collect();
    let instances: Vec<usize> = arg("INSTANCES", "1,2")
        .split(',')
        .map(|d| d.trim().parse().unwrap())
        .collect();

    let ep = Arc::new(Endpoint::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake_port = listener.local_addr().unwrap().port();
    let app = Router::new()
        .route("/token", post(token))
        .with_state(ep.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let dir = tempfile::tempdir().unwrap();
    let providers = dir.path().join("providers.toml").display().to_string();
    std::fs::write(
        &providers,
        format!(
            "[bench]\nauthorize_url = \"http://127.0.0.1:{fake_port}/authorize\"\n\
             token_url = \"http://127.0.0.1:{fake_port}/token\"\nclient_id = \"c\"\n\
             client_secret_env = \"BENCH_SECRET\"\nclient_auth = \"post\"\n"
        ),
    )
    .unwrap();
    // bench_tokens stores its rows under key id `bench`.
    let keys = Keyring::generate_spec("bench");
    let pool = Pool::new(PoolConfig::parse(&url).unwrap()).unwrap();
    let run = Run {
        url: &url,
        bin: &bin,
        keys: &keys,
        providers: &providers,
        pool: &pool,
        ep: &ep,
    };
    // The schema first (the first serve applies the migrations).
    drop(serve(&run, &[]).await);
    let first = Duration::from_millis(delays[0]);
    measure(
        &run,
        "reference (concurrency 5)",
        reference_tokens,
        first,
        1,
        &[("INTEGRATIONS_REFRESH_CONCURRENCY", "5")],
    )
    .await;
    for delay in &delays {
        for n in &instances {
            measure(
                &run,
                "default",
                tokens,
                Duration::from_millis(*delay),
                *n,
                &[],
            )
            .await;
        }
    }
}
