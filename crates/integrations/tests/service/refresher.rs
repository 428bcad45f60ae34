//! The background refresher: claims what expires soon; two instances never
//! refresh the same row.

use std::sync::atomic::Ordering;
use std::time::Duration;

use integrations::service::Refresher;
use tokio_util::sync::CancellationToken;

use crate::common::TestService;

fn scan() -> Refresher {
    Refresher {
        interval: Duration::from_millis(100),
        margin: Duration::from_secs(600),
        page: 7,
        concurrency: 5,
        ..Refresher::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn due_tokens_are_refreshed_and_others_left_alone() {
    let t = TestService::start().await;
    for i in 0..20 {
        t.seed("u1", "good", &format!("due{i}"), 120).await;
    }
    for i in 0..5 {
        t.seed("u1", "good", &format!("fresh{i}"), 7200).await;
    }
    let report = t
        .service
        .refresh_due(&scan(), &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!((report.attempted, report.refreshed), (20, 20));
    assert_eq!(t.fake.refreshes.load(Ordering::SeqCst), 20);
    // Nothing due any more.
    let report = t
        .service
        .refresh_due(&scan(), &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(report.attempted, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integrations_of_providers_no_longer_configured_are_not_claimed() {
    let t = TestService::start().await;
    t.seed("u1", "good", "due", 120).await;
    // A row left by a provider since removed from the configuration.
    let mut conn = t.service.pool().get().await.unwrap();
    conn.execute(
        "INSERT INTO integrations (user_id, provider, account_id, access_token, refresh_token, \
         key_id, expires_at, scopes) \
         SELECT user_id, 'removed', 'gone', access_token, refresh_token, key_id, expires_at, scopes \
         FROM integrations WHERE account_id = 'due'",
        &[],
    )
    .await
    .unwrap();
    for _ in 0..2 {
        let report = t
            .service
            .refresh_due(&scan(), &CancellationToken::new())
            .await
            .unwrap();
        assert!(report.attempted <= 1, "{report:?}");
    }
    let owner: Option<String> = conn
        .query_one(
            "SELECT refresh_lease_owner FROM integrations WHERE provider = 'removed'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, None, "never claimed");
    assert_eq!(
        t.fake.refreshes.load(Ordering::SeqCst),
        1,
        "the configured one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_refreshers_never_refresh_the_same_row() {
    let t = TestService::start().await;
    for i in 0..60 {
        t.seed("u1", "good", &format!("d{i}"), 60).await;
    }
    t.fake.set_delay("good", Duration::from_millis(20));
    let other = t.another_instance("connection_limit=5").await;
    let cancel = CancellationToken::new();
    let cfg = scan();
    let (a, b) = tokio::join!(
        t.service.refresh_due(&cfg, &cancel),
        other.refresh_due(&cfg, &cancel)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.attempted + b.attempted, 60, "{a:?} {b:?}");
    assert_eq!(
        t.fake.refreshes.load(Ordering::SeqCst),
        60,
        "each row refreshed exactly once"
    );
    // A rotating provider rejects a reused refresh token: no failures means no double refresh.
    assert_eq!(a.refreshed + b.refreshed, 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_refresher_stops_on_cancel() {
    let t = TestService::start().await;
    t.seed("u1", "good", "soon", 60).await;
    let cancel = CancellationToken::new();
    let task = tokio::spawn(t.service.clone().run_refresher(scan(), cancel.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while t.fake.refreshes.load(Ordering::SeqCst) == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(t.fake.refreshes.load(Ordering::SeqCst), 1);
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}

/// The backoff the next attempt waits, as the server computed it.
async fn backoff_secs(client: &db_pool::tokio_postgres::Client, account: &str) -> f64 {
    client
        .query_one(
            "SELECT extract(epoch FROM next_refresh_at - updated_at)::float8 \
             FROM integrations WHERE account_id = $1",
            &[&account],
        )
        .await
        .unwrap()
        .get(0)
}

/// Transient failures back off 30 s, doubling, at most 1 h; the refresher
/// skips a row while it backs off and takes it again once it is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_back_off_doubling_to_an_hour_and_the_refresher_skips_them() {
    use crate::common::{account_id, provider_name};
    let t = TestService::start().await;
    t.seed("u1", "bad", "flaky", 120).await;
    t.fake.set_mode("bad", crate::common::Mode::ServerError);
    let client = t.db.connect().await;
    let (p, a) = (provider_name("bad"), account_id("flaky"));

    let report = t
        .service
        .refresh_due(&scan(), &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!((report.attempted, report.refreshed), (1, 0));
    assert_eq!(backoff_secs(&client, "flaky").await, 30.0);
    // Backing off: the refresher leaves it alone.
    let report = t
        .service
        .refresh_due(&scan(), &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(report.attempted, 0, "a row backing off was claimed");
    assert_eq!(t.fake.refreshes.load(Ordering::SeqCst), 1);

    // The backoff over (moved into the past), the refresher tries again
    // and the next wait doubles.
    let over = "UPDATE integrations SET next_refresh_at = now() - interval '1 second' \
                WHERE account_id = 'flaky'";
    client.execute(over, &[]).await.unwrap();
    let report = t
        .service
        .refresh_due(&scan(), &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(report.attempted, 1);
    assert_eq!(backoff_secs(&client, "flaky").await, 60.0);
    client.execute(over, &[]).await.unwrap();
    assert!(t.service.refresh(&p, &a).await.is_err());
    assert_eq!(backoff_secs(&client, "flaky").await, 120.0);

    // Many failures on: capped at one hour.
    client
        .execute(
            "UPDATE integrations SET refresh_failures = 30, status = 'connected', \
             next_refresh_at = NULL WHERE account_id = 'flaky'",
            &[],
        )
        .await
        .unwrap();
    let _ = t.service.refresh(&p, &a).await;
    assert_eq!(backoff_secs(&client, "flaky").await, 3600.0);
}

/// An instance without the providers' client secret leaves due
/// integrations alone: nothing claimed, nothing sent, no failure counted;
/// an instance with it refreshes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integrations_of_unconfigured_providers_are_skipped_without_a_failure() {
    let t = TestService::start().await;
    t.seed("u1", "good", "due", 120).await;
    let unconfigured = t.without_client_secret().await;
    let report = unconfigured
        .refresh_due(&scan(), &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(report.attempted, 0);
    assert_eq!(t.fake.refreshes.load(Ordering::SeqCst), 0);
    let status = t.service.integration("good", "due").await.unwrap();
    assert_eq!(status.refresh_failures, 0);
    assert!(status.healthy());
    let report = t
        .service
        .refresh_due(&scan(), &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!((report.attempted, report.refreshed), (1, 1));
}
