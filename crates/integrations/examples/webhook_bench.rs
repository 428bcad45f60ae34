//! The webhook benchmark recorded in BENCHMARKS.md (run through
//! `scripts/bench-webhooks`): 10,000 state changes, a batch refresh of
//! 10,000 tokens against a token endpoint that rejects every one
//! (`invalid_grant`, so each becomes `integration.revoked`), with one
//! webhook endpoint on 127.0.0.1 subscribed to that type.
//!
//! Measured, in one process like `serve` (the service, its change feed and
//! its dispatcher on one runtime):
//! 1. the batch refresh with no endpoint registered (events written, no
//!    delivery rows), and with one registered but no dispatcher running
//!    (the fan-out trigger's cost alone);
//! 2. the batch refresh with the dispatcher delivering meanwhile: events
//!    per second delivered (first event written to last 2xx), and the lag
//!    of each from its event's transaction start (`created_at`) to the
//!    receiver's answer, p50/p99;
//! 3. the same with a receiver that answers in RECEIVER_DELAY_MS (200);
//! 4. the lag when events come one at a time (TRICKLE refreshes, 10 ms
//!    apart), not in a burst: what the pipeline itself adds.
//!
//! `DATABASE_URL` names a database it may fill (its tables are emptied).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/bench_tokens.rs"]
mod bench_tokens;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::routing::post;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use db_pool::{Pool, PoolConfig};
use hdrhistogram::Histogram;
use integrations::changes::ChangeFeed;
use integrations::crypto::Keyring;
use integrations::domain::{AccountId, ProviderName};
use integrations::oauth::{ProviderRegistry, TokenClient, TokenClientConfig};
use integrations::service::api_keys::ApiKeys;
use integrations::service::{IntegrationsService, RefreshRequest, ServiceConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

fn arg(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What the receiver saw: (arrival, the event's created_at).
type Arrivals = Arc<Mutex<Vec<(DateTime<Utc>, DateTime<Utc>)>>>;

#[tokio::main]
async fn main() {
    let url = std::env::var("DATABASE_URL").expect("set DATABASE_URL");
    let tokens = arg("TOKENS", 10_000) as usize;
    let batch_concurrency = arg("CONCURRENCY", 50) as usize;
    let slow_ms = arg("RECEIVER_DELAY_MS", 200);
    let delivery_concurrency = arg("WEBHOOK_CONCURRENCY", 64) as usize;
    let slow_concurrency = arg("SLOW_WEBHOOK_CONCURRENCY", 256) as usize;

    let fake_port = rejecting_provider().await;
    let keys = Keyring::generate_spec("bench");
    let sep = if url.contains('?') { '&' } else { '?' };
    let pool_cfg = PoolConfig::parse(&format!("{url}{sep}connection_limit=10")).unwrap();
    let service = |concurrency: usize| {
        let pool = Pool::new(pool_cfg.clone()).unwrap();
        let toml = format!(
            "[bench]\nauthorize_url = \"http://127.0.0.1:{fake_port}/authorize\"\n\
             token_url = \"http://127.0.0.1:{fake_port}/token\"\nclient_id = \"c\"\n\
             client_secret_env = \"BENCH_SECRET\"\nclient_auth = \"post\"\n"
        );
        let env = |_: &str| Some("s".to_string());
        let mut config = ServiceConfig::default();
        config.webhooks.send.allow_private = true;
        config.webhooks.concurrency = concurrency;
        Arc::new(IntegrationsService::new(
            pool,
            Keyring::parse(&keys).unwrap(),
            ProviderRegistry::from_toml(&toml, "bench", &env).unwrap(),
            TokenClient::new(&TokenClientConfig::default()).unwrap(),
            config,
        ))
    };
    let plain = service(delivery_concurrency);
    integrations::store::migrations::run(plain.pool())
        .await
        .unwrap();
    let requests: Vec<RefreshRequest> = (0..tokens)
        .map(|i| RefreshRequest {
            provider: ProviderName::parse("bench").unwrap(),
            account_id: AccountId::parse(&format!("tok{i}")).unwrap(),
        })
        .collect();
    let batch = |service: Arc<IntegrationsService>| {
        let requests = requests.clone();
        async move {
            let started = Instant::now();
            let results = service.batch_refresh(requests, batch_concurrency).await;
            assert!(results.iter().all(|r| r.is_err()), "every refresh refused");
            started.elapsed().as_secs_f64()
        }
    };

    // 1. The outbox's cost.
    reset(&plain, &keys, tokens).await;
    let no_endpoint = batch(plain.clone()).await;
    let events = count(&plain, "events WHERE type = 'integration.revoked'").await;
    assert_eq!(events, tokens as i64);
    reset(&plain, &keys, tokens).await;
    let (fast_port, fast) = receiver(Duration::ZERO).await;
    plain
        .create_webhook(
            &format!("http://127.0.0.1:{fast_port}/hook"),
            Some(&["integration.revoked".to_string()]),
        )
        .await
        .unwrap();
    let queued_only = batch(plain.clone()).await;
    let queued = count(&plain, "webhook_deliveries").await;
    assert_eq!(queued, tokens as i64);
    println!(
        "batch refresh of {tokens} rejected tokens (concurrency {batch_concurrency}): \
         no endpoint {no_endpoint:.2}s, one endpoint queued (no dispatcher) {queued_only:.2}s ({:+.1}%)",
        (queued_only / no_endpoint - 1.0) * 100.0
    );

    // 2 and 3. Delivery while the batch runs.
    for (label, delay, concurrency) in [
        (
            "receiver answering at once",
            Duration::ZERO,
            delivery_concurrency,
        ),
        (
            "receiver answering in RECEIVER_DELAY_MS",
            Duration::from_millis(slow_ms),
            delivery_concurrency,
        ),
        (
            "receiver answering in RECEIVER_DELAY_MS",
            Duration::from_millis(slow_ms),
            slow_concurrency,
        ),
    ] {
        let service = service(concurrency);
        reset(&service, &keys, tokens).await;
        let (port, arrivals) = if delay.is_zero() {
            (fast_port, fast.clone())
        } else {
            receiver(delay).await
        };
        arrivals.lock().unwrap().clear();
        service
            .create_webhook(
                &format!("http://127.0.0.1:{port}/hook"),
                Some(&["integration.revoked".to_string()]),
            )
            .await
            .unwrap();
        let mut took = 0.0;
        let (lag, span, n) = delivering(&service, &pool_cfg, &arrivals, tokens, async {
            took = batch(service.clone()).await;
        })
        .await;
        println!(
            "{label} ({} ms), concurrency {concurrency}: batch {took:.2}s; delivered {n} of {tokens} in {span:.2}s = {:.0} events/s; \
             lag p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            delay.as_millis(),
            n as f64 / span,
            ms(&lag, 0.5),
            ms(&lag, 0.99),
            lag.max() as f64 / 1000.0,
        );
        service.pool().close(Duration::from_secs(5)).await;
    }

    // 4. One event at a time.
    let trickle = arg("TRICKLE", 500) as usize;
    let service = service(delivery_concurrency);
    reset(&service, &keys, tokens).await;
    fast.lock().unwrap().clear();
    service
        .create_webhook(
            &format!("http://127.0.0.1:{fast_port}/hook"),
            Some(&["integration.revoked".to_string()]),
        )
        .await
        .unwrap();
    let (lag, _, n) = delivering(&service, &pool_cfg, &fast, trickle, async {
        for one in requests.iter().take(trickle) {
            service.batch_refresh(vec![one.clone()], 1).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    println!(
        "one event at a time ({n} refreshes 10 ms apart), receiver answering at once: \
         lag p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms(&lag, 0.5),
        ms(&lag, 0.99),
        lag.max() as f64 / 1000.0,
    );
}

/// Runs a service with its change feed and dispatcher until `work` is done
/// and `want` events have arrived (or 600 s); the lags, and the span from
/// `work`'s start to the last arrival.
async fn delivering<F: std::future::Future<Output = ()>>(
    service: &Arc<IntegrationsService>,
    pool_cfg: &PoolConfig,
    arrivals: &Arrivals,
    want: usize,
    work: F,
) -> (Histogram<u64>, f64, usize) {
    let tasks = TaskTracker::new();
    let stop = CancellationToken::new();
    let feed_keys = Arc::new(ApiKeys::new(
        service.pool().clone(),
        Duration::from_secs(30),
    ));
    ChangeFeed::new(pool_cfg.clone(), service.clone(), feed_keys)
        .start(&tasks, stop.clone())
        .await;
    tasks.spawn(service.clone().run_webhook_dispatcher(stop.clone()));
    let started = Utc::now();
    work.await;
    let deadline = Instant::now() + Duration::from_secs(600);
    while arrivals.lock().unwrap().len() < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    tasks.close();
    tasks.wait().await;
    let arrivals = arrivals.lock().unwrap().clone();
    let mut lag = Histogram::<u64>::new(3).unwrap();
    let mut last = started;
    for (at, created) in &arrivals {
        lag.record((*at - *created).num_microseconds().unwrap_or(0).max(0) as u64)
            .unwrap();
        last = last.max(*at);
    }
    (lag, (last - started).as_seconds_f64(), arrivals.len())
}

fn ms(lag: &Histogram<u64>, q: f64) -> f64 {
    lag.value_at_quantile(q) as f64 / 1000.0
}

async fn count(service: &IntegrationsService, from: &str) -> i64 {
    let mut conn = service.pool().get().await.unwrap();
    conn.query_one(&format!("SELECT count(*) FROM {from}"), &[])
        .await
        .unwrap()
        .get(0)
}

/// Empties the tables and stores `tokens` refreshable integrations of the
/// `bench` provider, encrypted like the service does.
async fn reset(service: &IntegrationsService, keys: &str, tokens: usize) {
    let ring = Keyring::parse(keys).unwrap();
    let mut conn = service.pool().get().await.unwrap();
    conn.batch_execute("TRUNCATE integrations, events, webhook_endpoints, webhook_deliveries")
        .await
        .unwrap();
    let mut tx = conn.transaction().await.unwrap();
    bench_tokens::insert(&mut tx, &ring, tokens).await;
    tx.commit().await.unwrap();
    for sql in ["ANALYZE integrations", "VACUUM ANALYZE events"] {
        conn.batch_execute(sql).await.unwrap();
    }
}

/// A token endpoint refusing every refresh: `invalid_grant`.
async fn rejecting_provider() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = Router::new().route(
        "/token",
        post(|| async {
            (
                axum::http::StatusCode::BAD_REQUEST,
                Json(serde_json::json!({"error": "invalid_grant", "error_description": "revoked"})),
            )
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

/// A webhook receiver answering 204 after `delay`, recording when each
/// event arrived and when its transaction started.
async fn receiver(delay: Duration) -> (u16, Arrivals) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let arrivals: Arrivals = Arc::default();
    let seen = arrivals.clone();
    let app = Router::new().route(
        "/hook",
        post(move |body: Bytes| {
            let seen = seen.clone();
            async move {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let event: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let created: DateTime<Utc> = event["created_at"].as_str().unwrap().parse().unwrap();
                seen.lock().unwrap().push((Utc::now(), created));
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    // Answers go out at once (no Nagle delay), as a production server's do.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, arrivals)
}
