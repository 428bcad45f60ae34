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
    let first_list = first.integrations().unwrap();
    assert_eq!(first_list.len(), 1);
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
    let after = t.service.status(&u).await.unwrap().integrations().unwrap();
    let s2 = t.service.cache_stats();
    assert_eq!(s2.misses - s1.misses, 1, "after a write: a miss");
    assert_eq!(after.len(), 2);

    // Refreshes and disconnects are writes too.
    t.service
        .refresh(&provider_name("good"), &account_id("a1"))
        .await
        .unwrap();
    let refreshed = t.service.status(&u).await.unwrap().integrations().unwrap();
    assert!(refreshed
        .iter()
        .any(|s| s.account_id == "a1" && s.last_refresh_at > first_list[0].last_refresh_at));
    assert!(t
        .service
        .disconnect(&u, &provider_name("good"), &account_id("a2"))
        .await
        .unwrap()
        .is_some());
    assert_eq!(
        t.service
            .status(&u)
            .await
            .unwrap()
            .integrations()
            .unwrap()
            .len(),
        1
    );
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
    assert!(results
        .iter()
        .all(|r| r.as_ref().unwrap().integrations().unwrap().len() == 1));
    assert_eq!(t.service.cache_stats().misses - before, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_share_a_failed_load_and_its_error() {
    let t = TestService::start_with(
        "connection_limit=1&pool_timeout=1",
        ServiceConfig::default(),
    )
    .await;
    t.seed("u1", "good", "a1", 3600).await;
    let u = user_id("u1");
    let held = t.service.pool().get().await.unwrap();
    let before = t.service.cache_stats().misses;
    let results = join_all((0..20).map(|_| t.service.status(&u))).await;
    for result in &results {
        match result {
            Err(integrations::service::ServiceError::Db(e)) => assert_eq!(e.code(), "P2024"),
            other => panic!("expected P2024, got {other:?}"),
        }
    }
    assert_eq!(
        t.service.cache_stats().misses - before,
        1,
        "one load, its error shared"
    );
    // Nothing failed is kept: with a connection free, the next read loads.
    drop(held);
    let list = t.service.status(&u).await.unwrap().integrations().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(t.service.cache_stats().misses - before, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_cache_off_a_read_after_a_write_sees_it_while_others_read() {
    let config = ServiceConfig {
        status_cache_capacity: 0,
        ..ServiceConfig::default()
    };
    let t = std::sync::Arc::new(TestService::start_with("connection_limit=4", config).await);
    t.seed("u1", "good", "a-0", 3600).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Other readers of the same user keep loads running, for the reads
    // after each write to join if they wrongly could.
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (t, stop) = (t.clone(), stop.clone());
            tokio::spawn(async move {
                let u = user_id("u1");
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    t.service.status(&u).await.unwrap();
                }
            })
        })
        .collect();
    let u = user_id("u1");
    for n in 1..=60 {
        let account = format!("a-{n}");
        t.seed("u1", "good", &account, 3600).await;
        let list = t.service.status(&u).await.unwrap().integrations().unwrap();
        assert!(
            list.iter().any(|s| s.account_id == account),
            "write {n} not seen by the read after it"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_joining_a_waiting_load_waits_its_own_pool_timeout() {
    let t = std::sync::Arc::new(
        TestService::start_with(
            "connection_limit=1&pool_timeout=3",
            ServiceConfig {
                status_cache_capacity: 0,
                ..ServiceConfig::default()
            },
        )
        .await,
    );
    t.seed("u1", "good", "a1", 3600).await;
    let held = t.service.pool().get().await.unwrap();
    let early = {
        let t = t.clone();
        tokio::spawn(async move { t.service.status(&user_id("u1")).await })
    };
    // The early caller's load is waiting for the connection; the late one
    // joins it 1.5 s later (the gap is the point: its own pool_timeout ends
    // 1.5 s after the early one's).
    for _ in 0..200 {
        if t.service.pool().stats().waiting == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(t.service.pool().stats().waiting, 1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let late = {
        let t = t.clone();
        tokio::spawn(async move { t.service.status(&user_id("u1")).await })
    };
    // The early caller gives up at 3 s; the connection comes back right
    // then, within the late caller's own 3 s (until 4.5 s).
    match early.await.unwrap() {
        Err(integrations::service::ServiceError::Db(e)) => assert_eq!(e.code(), "P2024"),
        other => panic!("expected P2024 for the early caller, got {other:?}"),
    }
    assert!(!late.is_finished(), "the late caller still waits");
    drop(held);
    let list = late.await.unwrap().unwrap().integrations().unwrap();
    assert_eq!(list.len(), 1, "the late caller was served");
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
    // Taken before the load: the entry is at most this old.
    let loaded = std::time::Instant::now();
    t.service.status(&u).await.unwrap();
    let before = t.service.cache_stats().misses;
    t.service.status(&u).await.unwrap();
    assert_eq!(
        t.service.cache_stats().misses,
        before,
        "a hit within the ttl"
    );
    // Read until the entry is gone: it goes, and not before its ttl.
    let mut expired_after = None;
    for _ in 0..300 {
        t.service.status(&u).await.unwrap();
        if t.service.cache_stats().misses > before {
            expired_after = Some(loaded.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let expired_after = expired_after.expect("the entry never expired");
    assert!(
        expired_after >= Duration::from_millis(300),
        "{expired_after:?}"
    );
    assert_eq!(t.service.cache_stats().misses - before, 1);
}

#[tokio::test]
async fn the_cached_rendering_shows_exactly_what_is_stored() {
    use chrono::Utc;
    use integrations::oauth::{Expiry, TokenSet};
    use serde_json::json;

    let t = TestService::start().await;
    let tokens = TokenSet::from_response(
        &json!({"access_token": "at-x", "refresh_token": "rt-x", "expires_in": 600,
                "scope": "read write:\"quoted\" ünï"}),
        Utc::now(),
        Expiry::Default(Duration::from_secs(3600)),
    )
    .unwrap();
    let metadata = json!({"team": "Ops \"east\"", "n": [1, 2.5, null], "nested": {"ok": true}});
    let u = user_id("u-render");
    for account in ["b-2", "a-1"] {
        t.service
            .connect(
                &u,
                &provider_name("good"),
                &account_id(account),
                &tokens,
                Some(&metadata),
            )
            .await
            .unwrap();
    }
    t.seed("u-render", "bad", "c-3", 3600).await;
    t.fake.set_mode("bad", crate::common::Mode::InvalidGrant);
    let _ = t
        .service
        .refresh(&provider_name("bad"), &account_id("c-3"))
        .await;

    // The list is rendered straight from the rows; each item must decode to
    // what the single-integration read (decoded into statuses) says.
    let status = t.service.status(&u).await.unwrap();
    let listed = status.integrations().unwrap();
    let mut stored = Vec::new();
    for (p, a) in [("bad", "c-3"), ("good", "a-1"), ("good", "b-2")] {
        stored.push(t.service.integration(p, a).await.unwrap());
    }
    assert_eq!(listed, stored, "by provider, then account");
    assert_eq!(listed[1].metadata, metadata);
    assert_eq!(listed[0].status, integrations::domain::Status::Revoked);
    assert!(listed[0].last_error.is_some());
    let body: serde_json::Value = serde_json::from_slice(status.json()).unwrap();
    assert_eq!(body["user_id"], "u-render");
    assert_eq!(body["integrations"][0]["healthy"], false);
    assert_eq!(body["integrations"][1]["healthy"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_share_round_trips_and_each_gets_its_own_user() {
    let config = ServiceConfig {
        status_cache_capacity: 0,
        ..ServiceConfig::default()
    };
    let t = TestService::start_with("connection_limit=2", config).await;
    // 40 users with 0, 1 or 2 integrations (seeded in reverse account
    // order); the first 10 asked twice in the same burst.
    let users: Vec<String> = (0..40).map(|i| format!("batch-user-{i}")).collect();
    for (i, u) in users.iter().enumerate() {
        for n in (0..i % 3).rev() {
            t.seed(u, "good", &format!("acct-{i}-{n}"), 3600).await;
        }
    }
    let asked: Vec<usize> = (0..40).chain(0..10).collect();
    let ids: Vec<_> = asked.iter().map(|&i| user_id(&users[i])).collect();
    // Both connections held: no load can be answered before every caller
    // has queued or joined (otherwise a fast loader may answer a user's
    // first ask before its second arrives, which then loads again).
    let held = (
        t.service.pool().get().await.unwrap(),
        t.service.pool().get().await.unwrap(),
    );
    let before = t.service.pool().stats().checkouts;
    let service = t.service.clone();
    let burst = tokio::spawn(async move { join_all(ids.iter().map(|u| service.status(u))).await });
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while t.service.cache_stats().misses < 40 && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(held);
    let results = burst.await.unwrap();
    let checkouts = t.service.pool().stats().checkouts - before;
    for (&i, result) in asked.iter().zip(results) {
        let status = result.unwrap();
        let body: serde_json::Value = serde_json::from_slice(status.json()).unwrap();
        assert_eq!(body["user_id"], users[i].as_str());
        let accounts: Vec<String> = status
            .integrations()
            .unwrap()
            .into_iter()
            .map(|s| s.account_id)
            .collect();
        let expected: Vec<String> = (0..i % 3).map(|n| format!("acct-{i}-{n}")).collect();
        assert_eq!(accounts, expected, "user {i}: its own, by account");
    }
    // 50 misses at once: the 10 users asked twice share a load (with the
    // cache off too), and the 40 loads are read in batches (up to 16 users
    // per statement), not one checkout each.
    assert_eq!(t.service.cache_stats().misses, 40);
    assert!(checkouts < 10, "{checkouts} checkouts for 40 loads");
}

/// `status_cache_capacity` bounds the users kept: reading many more users
/// than that keeps at most that many, and every read still answers.
#[tokio::test]
async fn the_status_cache_keeps_at_most_its_capacity() {
    let config = ServiceConfig {
        status_cache_capacity: 10,
        ..ServiceConfig::default()
    };
    let t = TestService::start_with("connection_limit=2", config).await;
    t.seed("u0", "good", "a0", 3600).await;
    for round in 0..2 {
        for i in 0..200 {
            let list = t.service.status(&user_id(&format!("u{i}"))).await.unwrap();
            let expected = usize::from(i == 0);
            assert_eq!(
                list.integrations().unwrap().len(),
                expected,
                "round {round}"
            );
            let entries = t.service.cache_stats().entries;
            assert!(entries <= 10, "{entries} users cached (capacity 10)");
        }
    }
    let s = t.service.cache_stats();
    assert!(s.entries > 0, "the cache is in use: {s:?}");
    // 400 reads of 200 users through 10 places: nearly all loads.
    assert!(s.misses >= 380, "{s:?}");
}
