//! One refresh per token however many ask; rotation-safe; failures keep the
//! old token; a slow provider never exhausts the pool.

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::future::join_all;
use integrations::domain::Status;
use integrations::service::ServiceError;

use crate::common::{
    account_id, hostile_description, provider_name, secret_text, user_id, Mode, TestService,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_access_token_calls_cause_one_refresh() {
    let t = TestService::start().await;
    t.seed("u1", "good", "acct1", 60).await; // within the 5-minute margin
    let (p, a) = (provider_name("good"), account_id("acct1"));
    let results = join_all((0..100).map(|_| t.service.access_token(&p, &a))).await;
    let tokens: Vec<String> = results
        .into_iter()
        .map(|r| secret_text(&r.unwrap().token))
        .collect();
    assert_eq!(t.fake.refreshes.load(Ordering::SeqCst), 1);
    assert!(
        tokens.iter().all(|tok| tok == &tokens[0]),
        "everyone gets the winner's token"
    );
    assert_eq!(tokens[0], "at-good-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_refresh_a_token_once() {
    let t = TestService::start().await;
    t.seed("u1", "good", "acct1", 60).await;
    let other = t.another_instance("connection_limit=5").await;
    let (p, a) = (provider_name("good"), account_id("acct1"));
    t.fake.set_delay("good", Duration::from_millis(300));
    let calls = (0..100).map(|i| {
        let svc = if i % 2 == 0 {
            t.service.clone()
        } else {
            other.clone()
        };
        let (p, a) = (p.clone(), a.clone());
        tokio::spawn(async move {
            svc.access_token(&p, &a)
                .await
                .map(|t| secret_text(&t.token))
        })
    });
    let tokens: Vec<String> = join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .collect();
    assert_eq!(
        t.fake.refreshes.load(Ordering::SeqCst),
        1,
        "one refresh across both instances"
    );
    assert!(tokens.iter().all(|tok| tok == "at-good-1"), "{tokens:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_token_is_served_without_asking_the_provider() {
    let t = TestService::start().await;
    t.seed("u1", "good", "acct1", 3600).await;
    let tok = t
        .service
        .access_token(&provider_name("good"), &account_id("acct1"))
        .await
        .unwrap();
    assert_eq!(secret_text(&tok.token), "at-seed-acct1");
    assert_eq!(t.fake.refreshes.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn rotation_keeps_the_new_refresh_token_and_omission_keeps_the_old() {
    let t = TestService::start().await;
    t.seed("u1", "good", "rot", 3600).await;
    let (p, a) = (provider_name("good"), account_id("rot"));
    // Rotating provider: each refresh must present the token of the previous one.
    for _ in 0..3 {
        t.service.refresh(&p, &a).await.unwrap();
    }
    let seen = t.fake.seen_refresh_tokens.lock().unwrap().clone();
    assert_eq!(seen, vec!["rt-seed-good-rot", "rt-good-1", "rt-good-2"]);

    // Omitting provider: the refresh token we hold stays valid and is kept.
    t.seed("u1", "slow", "omit", 3600).await;
    t.fake.set_mode("slow", Mode::Omit);
    let (p, a) = (provider_name("slow"), account_id("omit"));
    for _ in 0..2 {
        let status = t.service.refresh(&p, &a).await.unwrap();
        assert_eq!(status.status, Status::Connected);
        // No expires_in: the provider's default lifetime (3600 s) applies.
        let left = status.expires_at.unwrap() - chrono::Utc::now();
        assert!(left > chrono::Duration::seconds(3500), "{left}");
    }
    let seen = t.fake.seen_refresh_tokens.lock().unwrap().clone();
    assert_eq!(&seen[3..], &["rt-seed-slow-omit", "rt-seed-slow-omit"]);
    let tok = t.service.access_token(&p, &a).await.unwrap();
    assert!(secret_text(&tok.token).starts_with("at-slow-"));
}

#[tokio::test]
async fn invalid_grant_marks_the_integration_revoked() {
    let t = TestService::start().await;
    t.seed("u1", "good", "gone", 60).await;
    t.fake.set_mode("good", Mode::InvalidGrant);
    let (p, a) = (provider_name("good"), account_id("gone"));
    let err = t.service.access_token(&p, &a).await.unwrap_err();
    assert!(
        matches!(
            err,
            ServiceError::NeedsReconnect {
                status: "revoked",
                ..
            }
        ),
        "{err}"
    );
    let status = t.service.integration("good", "gone").await.unwrap();
    assert_eq!(status.status, Status::Revoked);
    assert!(status.last_error.unwrap().contains("invalid_grant"));
    // Further calls do not ask the provider again.
    assert!(t.service.access_token(&p, &a).await.is_err());
    assert_eq!(t.fake.refreshes.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn server_errors_keep_the_old_token_and_end_in_error_status() {
    let config = integrations::service::ServiceConfig {
        max_failures: 3,
        failure_backoff: Duration::from_millis(1),
        ..Default::default()
    };
    let t = TestService::start_with("connection_limit=5", config).await;
    t.seed("u1", "bad", "flaky", 3600).await;
    t.fake.set_mode("bad", Mode::ServerError);
    let (p, a) = (provider_name("bad"), account_id("flaky"));
    for i in 1..=3 {
        let err = t.service.refresh(&p, &a).await.unwrap_err();
        assert!(matches!(err, ServiceError::RefreshFailed { .. }), "{err}");
        let s = t.service.integration("bad", "flaky").await.unwrap();
        assert_eq!(s.refresh_failures, i);
        assert_eq!(
            s.status,
            if i < 3 {
                Status::Connected
            } else {
                Status::Error
            }
        );
    }
    // The old tokens are intact: the provider recovers, the stored refresh token still works.
    t.fake.set_mode("bad", Mode::Rotate);
    let s = t.service.refresh(&p, &a).await.unwrap();
    assert_eq!((s.status, s.refresh_failures), (Status::Connected, 0));
    let seen = t.fake.seen_refresh_tokens.lock().unwrap().clone();
    assert!(seen.iter().all(|tok| tok == "rt-seed-bad-flaky"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_provider_never_exhausts_the_pool() {
    let t = TestService::start_with("connection_limit=2&pool_timeout=1", Default::default()).await;
    for i in 0..20 {
        t.seed("u1", "slow", &format!("s{i}"), 3600).await;
    }
    t.seed("u2", "good", "other", 3600).await;
    t.fake.hold("slow");
    let refreshes: Vec<_> = (0..20)
        .map(|i| {
            let svc = t.service.clone();
            tokio::spawn(async move {
                svc.refresh(&provider_name("slow"), &account_id(&format!("s{i}")))
                    .await
            })
        })
        .collect();
    // All 20 at the provider, held there.
    for _ in 0..200 {
        if t.fake.in_flight.load(Ordering::SeqCst) == 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(t.fake.in_flight.load(Ordering::SeqCst), 20);
    // While 20 refreshes wait on the provider, an unrelated read gets a
    // connection within pool_timeout=1s, every time.
    for _ in 0..10 {
        t.service.forget_status("u2");
        let list = t
            .service
            .status(&user_id("u2"))
            .await
            .unwrap_or_else(|e| panic!("status failed: {e}"));
        assert_eq!(list.integrations().unwrap().len(), 1);
    }
    assert_eq!(
        t.fake.in_flight.load(Ordering::SeqCst),
        20,
        "still all at the provider"
    );
    t.fake.release("slow");
    for r in join_all(refreshes).await {
        r.unwrap().unwrap();
    }
    assert_eq!(t.fake.refreshes.load(Ordering::SeqCst), 20);
    assert_eq!(t.service.pool().stats().checkout_timeouts, 0);
}

#[tokio::test]
async fn unknown_provider_and_integration_are_clear_errors() {
    let t = TestService::start().await;
    let err = t
        .service
        .access_token(&provider_name("myspace"), &account_id("x"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("'myspace'") && err.contains("bad, good, slow"),
        "{err}"
    );
    let err = t
        .service
        .refresh(&provider_name("good"), &account_id("nobody"))
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::NotFound { .. }), "{err}");
}

#[tokio::test]
async fn a_hostile_provider_error_reaches_neither_the_api_nor_last_error() {
    use axum::response::IntoResponse;
    let t = TestService::start().await;
    let rt = t.seed("u1", "bad", "hostile", 60).await;
    t.fake.set_mode("bad", Mode::Hostile);
    let (p, a) = (provider_name("bad"), account_id("hostile"));
    let err = t.service.refresh(&p, &a).await.unwrap_err();
    let response = integrations::http::ApiError::from(err).into_response();
    let api = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    let api = String::from_utf8(api.to_vec()).unwrap();
    // The same through access_token, which reports the stored last_error.
    let err = t
        .service
        .access_token(&p, &a)
        .await
        .unwrap_err()
        .to_string();
    let stored = t
        .service
        .integration("bad", "hostile")
        .await
        .unwrap()
        .last_error
        .unwrap();
    t.service.forget_status("u1");
    let view = t.service.status(&user_id("u1")).await.unwrap();
    let view = String::from_utf8(view.json().to_vec()).unwrap();

    let hostile = hostile_description(&rt);
    assert!(hostile.contains(&rt[..12]), "the provider quotes the token");
    for text in [&api, &err, &stored, &view] {
        for bad in [
            "<script",
            "alert",
            "555",
            "9999",
            "evil.example",
            "https://",
            "\u{202e}",
            &rt[..8],
        ] {
            assert!(!text.contains(bad), "{bad:?} in {text}");
        }
    }
    let body: serde_json::Value = serde_json::from_str(&api).unwrap();
    assert_eq!(body["error"]["code"], "refresh_failed");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("(provider_error)"), "{message}");
    assert!(
        message.contains("is blocked"),
        "what is harmless stays: {message}"
    );
    assert!(
        stored.contains("(provider_error)") && stored.contains("[number]"),
        "{stored}"
    );
}

/// The pid of a session of this database waiting on a lock, other than
/// `except`, once there is one (at most 10 s).
async fn blocked_session(client: &db_pool::tokio_postgres::Client, except: Option<i32>) -> i32 {
    for _ in 0..500 {
        let row = client
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock' AND pid <> pg_backend_pid() \
                 AND pid IS DISTINCT FROM $1 LIMIT 1",
                &[&except],
            )
            .await
            .unwrap();
        if let Some(row) = row {
            return row.get(0);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no session waits on the lock");
}

/// The provider has rotated the refresh token, so losing the answer would
/// lose the integration: when the write of the result fails transiently
/// (its connection killed mid-statement), it is retried on a fresh
/// connection and stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_result_whose_write_fails_transiently_is_retried_and_stored() {
    let t = TestService::start().await;
    t.seed("u1", "good", "kept", 60).await;
    let (p, a) = (provider_name("good"), account_id("kept"));
    // Another session holds the row: the result's UPDATE waits for it.
    let locker = t.db.connect().await;
    locker
        .batch_execute("BEGIN; SELECT 1 FROM integrations WHERE account_id = 'kept' FOR UPDATE")
        .await
        .unwrap();
    // (The lease claim is an UPDATE of the same row: claim first.)
    let refresh = {
        let svc = t.service.clone();
        let (p, a) = (p.clone(), a.clone());
        tokio::spawn(async move { svc.refresh(&p, &a).await })
    };
    let watcher = t.db.connect().await;
    // The claim waits on the lock: let it through, then take the lock again
    // before the provider answers.
    blocked_session(&watcher, None).await;
    t.fake.hold("good");
    locker.batch_execute("COMMIT").await.unwrap();
    for _ in 0..500 {
        if t.fake.in_flight.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(t.fake.in_flight.load(Ordering::SeqCst), 1);
    locker
        .batch_execute("BEGIN; SELECT 1 FROM integrations WHERE account_id = 'kept' FOR UPDATE")
        .await
        .unwrap();
    t.fake.release("good");
    // The first write waits on the lock; its connection is killed.
    let first = blocked_session(&watcher, None).await;
    watcher
        .execute("SELECT pg_terminate_backend($1, 5000)", &[&first])
        .await
        .unwrap();
    // The retry waits on the lock too, on another connection; let it go.
    let retry = blocked_session(&watcher, Some(first)).await;
    assert_ne!(retry, first);
    locker.batch_execute("COMMIT").await.unwrap();

    let status = refresh.await.unwrap().unwrap();
    assert_eq!(status.status, Status::Connected);
    let issued = t.fake.issued_tokens();
    let stored = t.service.access_token(&p, &a).await.unwrap();
    assert_eq!(
        secret_text(&stored.token),
        issued[0],
        "the new token was stored"
    );
    // The rotated refresh token was kept too: the next refresh works.
    t.service.refresh(&p, &a).await.unwrap();
}
