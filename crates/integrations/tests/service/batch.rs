//! batch_refresh: a sliding window, results in order, failures isolated.

use std::sync::atomic::Ordering;
use std::time::Duration;

use integrations::service::{RefreshRequest, ServiceError, DEFAULT_BATCH_CONCURRENCY};

use crate::common::{account_id, provider_name, Mode, TestService};

fn req(p: &str, a: &str) -> RefreshRequest {
    RefreshRequest {
        provider: provider_name(p),
        account_id: account_id(a),
    }
}

#[tokio::test]
async fn one_failing_provider_does_not_fail_the_batch() {
    let t = TestService::start().await;
    for a in ["a1", "a2", "a3"] {
        t.seed("u1", "good", a, 3600).await;
    }
    t.seed("u1", "bad", "b1", 3600).await;
    t.fake.set_mode("bad", Mode::ServerError);
    let requests = vec![
        req("good", "a1"),
        req("bad", "b1"),
        req("good", "a2"),
        req("good", "missing"),
        req("myspace", "x"),
        req("good", "a3"),
    ];
    let results = t
        .service
        .batch_refresh(requests, DEFAULT_BATCH_CONCURRENCY)
        .await;
    assert_eq!(results.len(), 6, "one result per request");
    assert_eq!(results[0].as_ref().unwrap().account_id, "a1");
    assert!(matches!(
        results[1],
        Err(ServiceError::RefreshFailed {
            transient: true,
            ..
        })
    ));
    assert_eq!(results[2].as_ref().unwrap().account_id, "a2");
    assert!(matches!(results[3], Err(ServiceError::NotFound { .. })));
    assert!(matches!(results[4], Err(ServiceError::UnknownProvider(_))));
    assert_eq!(results[5].as_ref().unwrap().account_id, "a3");
}

#[tokio::test]
async fn a_request_repeated_in_a_batch_refreshes_once() {
    let t = TestService::start().await;
    t.seed("u1", "good", "dup", 3600).await;
    let results = t
        .service
        .batch_refresh(
            vec![req("good", "dup"), req("good", "dup"), req("good", "dup")],
            5,
        )
        .await;
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    assert_eq!(t.fake.refreshes.load(Ordering::SeqCst), 1);
}

/// A sliding window: with 2 at a time, a token whose provider does not
/// answer holds one slot while the 8 others pass through the other and are
/// stored. Fixed groups of 2 (the seed's Promise.all per batch) would not
/// start the second group until the slow one answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_token_does_not_hold_back_the_rest() {
    let t = TestService::start_with("connection_limit=10", Default::default()).await;
    t.seed("u1", "slow", "snail", 3600).await;
    for i in 0..8 {
        t.seed("u1", "good", &format!("g{i}"), 3600).await;
    }
    t.fake.hold("slow");
    let mut requests = vec![req("slow", "snail")];
    requests.extend((0..8).map(|i| req("good", &format!("g{i}"))));
    let batch = {
        let svc = t.service.clone();
        tokio::spawn(async move { svc.batch_refresh(requests, 2).await })
    };
    let client = t.db.connect().await;
    let refreshed = || async {
        let rows = client
            .query(
                "SELECT provider, count(*) FROM integrations \
                 WHERE refresh_generation > 0 GROUP BY provider ORDER BY provider",
                &[],
            )
            .await
            .unwrap();
        rows.iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
            .collect::<Vec<_>>()
    };
    let mut stored = Vec::new();
    for _ in 0..200 {
        stored = refreshed().await;
        if stored == [("good".to_string(), 8)] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        stored,
        [("good".to_string(), 8)],
        "the 8 fast tokens are stored while the slow one is still at its provider"
    );
    assert!(!batch.is_finished());
    assert_eq!(t.fake.in_flight.load(Ordering::SeqCst), 1, "only the snail");
    t.fake.release("slow");
    let results = batch.await.unwrap();
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    assert_eq!(t.fake.refreshes.load(Ordering::SeqCst), 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_window_keeps_exactly_concurrency_requests_at_the_provider() {
    let t = TestService::start_with("connection_limit=10", Default::default()).await;
    for i in 0..12 {
        t.seed("u1", "good", &format!("w{i}"), 3600).await;
    }
    t.fake.set_delay("good", Duration::from_millis(100));
    let requests = (0..12).map(|i| req("good", &format!("w{i}"))).collect();
    let results = t.service.batch_refresh(requests, 3).await;
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    assert_eq!(t.fake.refreshes.load(Ordering::SeqCst), 12);
    // Never more than 3 at the provider (storing a result frees the slot,
    // but the next request still waits for it), and the window filled.
    assert_eq!(t.fake.max_in_flight.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_expired_during_a_long_batch_is_renewed_not_trusted() {
    use integrations::service::ServiceConfig;
    use std::sync::Arc;

    let config = ServiceConfig {
        lease: Duration::from_secs(1),
        ..ServiceConfig::default()
    };
    let t = TestService::start_with("connection_limit=5", config).await;
    for a in ["l1", "l2", "l3"] {
        t.seed("u1", "slow", a, 3600).await;
    }
    t.fake.set_delay("slow", Duration::from_millis(700));
    let batch = {
        let svc = t.service.clone();
        tokio::spawn(async move {
            svc.batch_refresh(
                vec![req("slow", "l1"), req("slow", "l2"), req("slow", "l3")],
                1,
            )
            .await
        })
    };
    // Once the batch's lease on l3 has expired (as the server sees it),
    // another instance refreshes l3.
    let client = t.db.connect().await;
    let mut expired = false;
    for _ in 0..200 {
        expired = client
            .query_one(
                "SELECT coalesce(refresh_lease_until < now(), false) \
                 FROM integrations WHERE account_id = 'l3'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if expired {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(expired, "the batch's lease on l3 never expired");
    let other: Arc<_> = t.another_instance("connection_limit=2").await;
    other
        .refresh(&provider_name("slow"), &account_id("l3"))
        .await
        .unwrap();
    let results = batch.await.unwrap();
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    // l3's refresh token reached the provider once: the batch did not reuse
    // the token it read at claim time (a rotating provider would have
    // answered invalid_grant and the integration would read revoked).
    let seen = t.fake.seen_refresh_tokens.lock().unwrap().clone();
    let l3 = seen
        .iter()
        .filter(|tok| tok.as_str() == "rt-seed-slow-l3")
        .count();
    assert_eq!(l3, 1, "{seen:?}");
    assert_eq!(t.fake.refreshes.load(Ordering::SeqCst), 3);
}
