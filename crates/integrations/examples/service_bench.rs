//! The service benchmark recorded in BENCHMARKS.md (run through
//! `scripts/bench-service`):
//!
//! 1. `status(user_id)` for random users over 100,000 users x 3 integrations,
//!    64 callers, connection_limit 10: cache hit path and cache miss path.
//! 2. `batch_refresh` of 10,000 tokens at concurrency 50 against a local
//!    token endpoint that answers in 20 ms.
//!
//! `DATABASE_URL` names a database it may fill (tables are created by the
//! migrations; existing integrations rows are replaced).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/bench_tokens.rs"]
mod bench_tokens;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::post;
use axum::{Json, Router};
use db_pool::{Pool, PoolConfig};
use integrations::crypto::Keyring;
use integrations::domain::{AccountId, ProviderName, UserId};
use integrations::oauth::{ProviderRegistry, TokenClient, TokenClientConfig};
use integrations::service::{IntegrationsService, RefreshRequest, ServiceConfig};
use rand::{Rng, SeedableRng};

const USERS: i64 = 100_000;
const CALLERS: usize = 64;

fn arg(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let url = std::env::var("DATABASE_URL").expect("set DATABASE_URL");
    let duration = Duration::from_secs(arg("DURATION", 10));
    let tokens = arg("TOKENS", 10_000) as usize;
    let delay = Duration::from_millis(arg("DELAY_MS", 20));
    let concurrency = arg("CONCURRENCY", 50) as usize;

    let (fake_port, busy_us, answered) = fake_provider(delay).await;
    let keys = Keyring::generate_spec("bench");
    let service = |capacity: u64| {
        let sep = if url.contains('?') { '&' } else { '?' };
        let pool = Pool::new(PoolConfig::parse(&format!("{url}{sep}connection_limit=10")).unwrap())
            .unwrap();
        let toml = format!(
            "[bench]\nauthorize_url = \"http://127.0.0.1:{fake_port}/authorize\"\n\
             token_url = \"http://127.0.0.1:{fake_port}/token\"\nclient_id = \"c\"\n\
             client_secret_env = \"BENCH_SECRET\"\nclient_auth = \"post\"\n"
        );
        let env = |_: &str| Some("s".to_string());
        Arc::new(IntegrationsService::new(
            pool,
            Keyring::parse(&keys).unwrap(),
            ProviderRegistry::from_toml(&toml, "bench", &env).unwrap(),
            TokenClient::new(&TokenClientConfig::default()).unwrap(),
            ServiceConfig {
                status_cache_capacity: capacity,
                ..ServiceConfig::default()
            },
        ))
    };
    let cached = service(200_000);
    integrations::store::migrations::run(cached.pool())
        .await
        .unwrap();
    seed(&cached, &keys, tokens).await;

    let mode = std::env::var("MODE").unwrap_or_else(|_| "all".into());
    if mode == "all" || mode == "status" {
        // Warm every user into the cache, then measure hits.
        let warm = Instant::now();
        run_status(&cached, Duration::from_secs(3600), Some(USERS)).await;
        eprintln!(
            "warmed {} users in {:.1}s",
            cached.cache_stats().entries,
            warm.elapsed().as_secs_f64()
        );
        let before = cached.cache_stats();
        let (ops, secs) = run_status(&cached, duration, None).await;
        let after = cached.cache_stats();
        println!(
            "status cache hit:  {:.0} ops/s ({ops} calls, {} misses)",
            ops as f64 / secs,
            after.misses - before.misses
        );
        let uncached = service(0);
        let (ops, secs) = run_status(&uncached, duration, None).await;
        println!(
            "status cache miss: {:.0} ops/s ({ops} calls)",
            ops as f64 / secs
        );
    }
    if mode == "all" || mode == "batch" {
        let requests: Vec<RefreshRequest> = (0..tokens)
            .map(|i| RefreshRequest {
                provider: ProviderName::parse("bench").unwrap(),
                account_id: AccountId::parse(&format!("tok{i}")).unwrap(),
            })
            .collect();
        let started = Instant::now();
        let results = cached.batch_refresh(requests, concurrency).await;
        let took = started.elapsed().as_secs_f64();
        let ok = results.iter().filter(|r| r.is_ok()).count();
        let ideal = tokens as f64 * delay.as_secs_f64() / concurrency as f64;
        let answered = answered.load(Ordering::Relaxed).max(1);
        println!(
            "batch refresh: {tokens} tokens, concurrency {concurrency}, endpoint {} ms \
             (answered in {:.2} ms on average): {took:.2}s ({ok} ok), ideal {ideal:.2}s, ratio {:.3}",
            delay.as_millis(),
            busy_us.load(Ordering::Relaxed) as f64 / answered as f64 / 1000.0,
            took / ideal
        );
    }
}

/// Calls `status` for random users from 64 callers. With `sweep`, each
/// caller walks its share of users once instead (to warm the cache).
async fn run_status(
    service: &Arc<IntegrationsService>,
    duration: Duration,
    sweep: Option<i64>,
) -> (u64, f64) {
    let ops = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..CALLERS)
        .map(|c| {
            let (service, ops) = (service.clone(), ops.clone());
            tokio::spawn(async move {
                let mut rng = rand::rngs::SmallRng::seed_from_u64(c as u64);
                let mut next = c as i64 + 1;
                loop {
                    let n = match sweep {
                        Some(total) => {
                            if next > total {
                                break;
                            }
                            let n = next;
                            next += CALLERS as i64;
                            n
                        }
                        None => {
                            if Instant::now() >= deadline {
                                break;
                            }
                            rng.gen_range(1..=USERS)
                        }
                    };
                    let user = UserId::parse(&format!("user{n}")).unwrap();
                    let list = service.status(&user).await.unwrap();
                    assert!(list.json().len() > 100, "three integrations rendered");
                    ops.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    (ops.load(Ordering::Relaxed), started.elapsed().as_secs_f64())
}

/// 100,000 users x 3 integrations (status bench) plus `tokens` refreshable
/// integrations of the `bench` provider, encrypted like the service does.
async fn seed(service: &IntegrationsService, keys: &str, tokens: usize) {
    let ring = Keyring::parse(keys).unwrap();
    let mut conn = service.pool().get().await.unwrap();
    conn.batch_execute("TRUNCATE integrations").await.unwrap();
    conn.batch_execute(&format!(
        "INSERT INTO integrations (user_id, provider, account_id, access_token, refresh_token, key_id, expires_at, scopes) \
         SELECT 'user' || u, p, p || '-' || u, '\\x00', '\\x00', 'bench', now() + interval '1 day', ARRAY['read'] \
         FROM generate_series(1, {USERS}) u, unnest(ARRAY['google', 'github', 'reddit']) p"
    ))
    .await
    .unwrap();
    let mut tx = conn.transaction().await.unwrap();
    bench_tokens::insert(&mut tx, &ring, tokens).await;
    tx.commit().await.unwrap();
    conn.batch_execute("ANALYZE integrations").await.unwrap();
}

/// A token endpoint answering every refresh after `delay`, and the mean
/// time it took to answer (in microseconds, summed over `answered`).
///
/// The wait is a thread sleep on the blocking pool, not `tokio::time::sleep`:
/// tokio's timer wheel rounds a deadline up to its next 1 ms tick, so a
/// 20 ms sleep answers in 20-21 ms, and the benchmark's ideal assumes an
/// endpoint answering in 20 ms.
async fn fake_provider(delay: Duration) -> (u16, Arc<AtomicU64>, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (busy_us, answered) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (b, n) = (busy_us.clone(), answered.clone());
    let app = Router::new().route(
        "/token",
        post(move || async move {
            let started = Instant::now();
            if !delay.is_zero() {
                tokio::task::spawn_blocking(move || std::thread::sleep(delay))
                    .await
                    .unwrap();
            }
            b.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            n.fetch_add(1, Ordering::Relaxed);
            Json(serde_json::json!({"access_token": "new", "refresh_token": "rotated", "expires_in": 3600}))
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, busy_us, answered)
}
