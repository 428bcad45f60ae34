//! status(user_id): cached with the seed's TTL, invalidated by writes.

use std::time::Duration;

use futures_util::future::join_all;
use integrations::service::ServiceConfig;

use crate::common::{account_id, provider_name, user_id, TestService};

#[tokio::test]
async fn hit_after_a_read_miss_after_a_write() {
    let t = TestService::start().await;
    t.seed("u1", "good", "a1", 3600).await;
    let u = user_id("u1");
    let first = t.service.status(&u).await.unwrap();
    assert_eq!(first.len(), 1);
    let s0 = t.service.cache_stats();
    let again = t.service.status(&u).await.unwrap();
    let s1 = t.service.cache_stats();
    assert_eq!(
        (s1.hits - s0.hits, s1.misses - s0.misses),
        (1, 0),
        "read again: a hit"
    );
    assert_eq!(first, again);

    // A write for the user invalidates: the next read loads and sees it.
    t.seed("u1", "good", "a2", 3600).await;
    let after = t.service.status(&u).await.unwrap();
    let s2 = t.service.cache_stats();
    assert_eq!(s2.misses - s1.misses, 1, "after a write: a miss");
    assert_eq!(after.len(), 2);

    // Refreshes and disconnects are writes too.
    t.service
        .refresh(&provider_name("good"), &account_id("a1"))
        .await
        .unwrap();
    let refreshed = t.service.status(&u).await.unwrap();
    assert!(refreshed
        .iter()
        .any(|s| s.account_id == "a1" && s.last_refresh_at > first[0].last_refresh_at));
    assert!(t
        .service
        .disconnect(&u, &provider_name("good"), &account_id("a2"))
        .await
        .unwrap());
    assert_eq!(t.service.status(&u).await.unwrap().len(), 1);
    assert_eq!(
        t.fake.revocations.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "revoked at the provider"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_for_one_user_load_once() {
    let t = TestService::start().await;
    t.seed("u1", "good", "a1", 3600).await;
    let u = user_id("u1");
    let before = t.service.cache_stats().misses;
    let results = join_all((0..50).map(|_| t.service.status(&u))).await;
    assert!(results.iter().all(|r| r.as_ref().unwrap().len() == 1));
    assert_eq!(t.service.cache_stats().misses - before, 1);
}

#[tokio::test]
async fn entries_expire_after_the_ttl() {
    let config = ServiceConfig {
        status_cache_ttl: Duration::from_millis(300),
        ..ServiceConfig::default()
    };
    let t = TestService::start_with("connection_limit=2", config).await;
    t.seed("u1", "good", "a1", 3600).await;
    let u = user_id("u1");
    t.service.status(&u).await.unwrap();
    let before = t.service.cache_stats().misses;
    tokio::time::sleep(Duration::from_millis(500)).await;
    t.service.status(&u).await.unwrap();
    assert_eq!(t.service.cache_stats().misses - before, 1);
}
