//! Refresh at scale: each provider's limits hold under a batch and across
//! two instances, a 429 pauses the provider without counting against any
//! integration, and due rows are spread over the margin.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use integrations::service::{RefreshRequest, Refresher, ServiceError};
use tokio_util::sync::CancellationToken;

use crate::common::{account_id, provider_name, TestService};

/// A provider limited to 2 requests in flight and 20 a second.
fn limited(fake_port_registry: &str) -> String {
    format!("{fake_port_registry}max_concurrent_refreshes = 2\nmax_refreshes_per_second = 20\n")
}

/// The most arrivals in any window of `window` (sorted times).
fn most_in_window(times: &mut [Instant], window: Duration) -> usize {
    times.sort();
    (0..times.len())
        .map(|i| {
            times[i..]
                .iter()
                .take_while(|t| **t < times[i] + window)
                .count()
        })
        .max()
        .unwrap_or(0)
}

fn arrivals(t: &TestService, provider: &str) -> Vec<Instant> {
    t.fake
        .arrivals
        .lock()
        .unwrap()
        .iter()
        .filter(|(p, _)| p == provider)
        .map(|(_, at)| *at)
        .collect()
}

async fn failures(t: &TestService, provider: &str) -> (i64, i64, i64) {
    let mut conn = t.service.pool().get().await.unwrap();
    let row = conn
        .query_one(
            "SELECT count(*) FILTER (WHERE refresh_failures > 0 OR last_error IS NOT NULL), \
                    count(*) FILTER (WHERE status <> 'connected'), \
                    (SELECT count(*) FROM events WHERE type = 'integration.refresh_failed') \
             FROM integrations WHERE provider = $1",
            &[&provider],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_provider_never_sees_more_than_its_limits_under_a_batch_of_200() {
    let t = TestService::start().await;
    let svc = t
        .instance_with_providers(
            &limited(&t.fake.registry_toml(&["limited"])),
            "connection_limit=5",
        )
        .await;
    let mut requests = Vec::new();
    for i in 0..200 {
        t.seed_via(&svc, "u1", "limited", &format!("a{i}"), 60)
            .await;
        requests.push(RefreshRequest {
            provider: provider_name("limited"),
            account_id: account_id(&format!("a{i}")),
        });
    }
    t.fake.set_delay("limited", Duration::from_millis(30));
    let results = svc.batch_refresh(requests, 64).await;
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(t.fake.refreshes.load(Ordering::SeqCst), 200);
    let most = t.fake.max_in_flight.load(Ordering::SeqCst);
    assert!(most <= 2, "{most} requests in flight at once");
    assert_rate(&mut arrivals(&t, "limited"), 20.0, 1);
}

/// Each of `senders` starts its requests `1 / rate` apart. Over the run
/// the provider sees at most `senders * rate` a second (each sender's
/// first request starts its count); within one second, one more per
/// sender at most: arrival times carry the scheduling jitter of two
/// processes on a busy machine (a request recorded late next to one
/// recorded early), which the sender cannot see. Without the limit, these
/// tests send several times the rate.
fn assert_rate(times: &mut [Instant], rate: f64, senders: usize) {
    let rate = rate * senders as f64;
    let most = most_in_window(times, Duration::from_secs(1));
    let span = times[times.len() - 1] - times[0];
    let average = (times.len() - senders) as f64 / span.as_secs_f64();
    assert!(
        average <= rate * 1.001 && most as f64 <= rate + senders as f64,
        "{average:.2} a second on average, {most} within one second, for a limit of {rate}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_pauses_the_provider_without_failing_any_integration() {
    let t = TestService::start().await;
    for i in 0..30 {
        t.seed("u1", "good", &format!("t{i}"), 60).await;
    }
    // 429 with Retry-After: 2 for the next 3 seconds: two pauses.
    t.fake.throttle("good", Duration::from_secs(3), 2);
    let cancel = CancellationToken::new();
    let cfg = Refresher {
        interval: Duration::from_millis(100),
        page: 10,
        ..Refresher::default()
    };
    let task = tokio::spawn(t.service.clone().run_refresher(cfg, cancel.clone()));
    let deadline = Instant::now() + Duration::from_secs(30);
    while t.fake.refreshes.load(Ordering::SeqCst) < 30 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cancel.cancel();
    task.await.unwrap();
    assert_eq!(
        t.fake.refreshes.load(Ordering::SeqCst),
        30,
        "all refreshed once the pauses end"
    );
    let throttled = t.fake.throttled_at.lock().unwrap().clone();
    assert!(!throttled.is_empty(), "the provider answered 429");
    // After each 429 nothing reaches the provider for its 2 seconds (the
    // first half second spared for requests already on their way).
    let times = arrivals(&t, "good");
    for at in &throttled {
        let during: Vec<_> = times
            .iter()
            .filter(|t| {
                **t > *at + Duration::from_millis(500) && **t < *at + Duration::from_secs(2)
            })
            .collect();
        assert!(
            during.is_empty(),
            "{} requests during a pause",
            during.len()
        );
    }
    assert_eq!(
        failures(&t, "good").await,
        (0, 0, 0),
        "(failing rows, unhealthy rows, refresh_failed events)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_asked_during_a_long_pause_is_refused_at_once_and_changes_nothing() {
    let t = TestService::start().await;
    t.seed("u1", "good", "a", 60).await;
    t.seed("u1", "good", "b", 60).await;
    t.fake.throttle("good", Duration::from_secs(60), 30);
    let first = t
        .service
        .refresh(&provider_name("good"), &account_id("a"))
        .await;
    assert!(
        matches!(
            first,
            Err(ServiceError::ProviderBusy {
                reason: "rate_limited",
                ..
            })
        ),
        "{first:?}"
    );
    let received = t.fake.received.load(Ordering::SeqCst);
    let started = Instant::now();
    let second = t
        .service
        .refresh(&provider_name("good"), &account_id("b"))
        .await;
    match second {
        Err(ServiceError::ProviderBusy { retry_after, .. }) => {
            assert!(retry_after > Duration::from_secs(20), "{retry_after:?}")
        }
        other => panic!("{other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "it did not wait for a pause it cannot outlast"
    );
    // Two callers of one integration: the second does not take the first's
    // unsent refresh for a result.
    let (good, a) = (provider_name("good"), account_id("a"));
    let (x, y) = tokio::join!(t.service.refresh(&good, &a), t.service.refresh(&good, &a));
    for r in [&x, &y] {
        assert!(
            matches!(r, Err(ServiceError::ProviderBusy { .. })),
            "{x:?} {y:?}"
        );
    }
    assert_eq!(
        t.fake.received.load(Ordering::SeqCst),
        received,
        "nothing sent while paused"
    );
    assert_eq!(failures(&t, "good").await, (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_keep_their_limits_and_never_refresh_a_row_twice() {
    let t = TestService::start().await;
    let registry = limited(&t.fake.registry_toml(&["limited"]));
    let a = t
        .instance_with_providers(&registry, "connection_limit=5")
        .await;
    let b = t
        .instance_with_providers(&registry, "connection_limit=5")
        .await;
    for i in 0..100 {
        t.seed_via(&a, "u1", "limited", &format!("r{i}"), 60).await;
    }
    t.fake.set_delay("limited", Duration::from_millis(20));
    let cfg = Refresher {
        page: 25,
        ..Refresher::default()
    };
    let cancel = CancellationToken::new();
    let (ra, rb) = tokio::join!(a.refresh_due(&cfg, &cancel), b.refresh_due(&cfg, &cancel));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra.refreshed + rb.refreshed, 100, "{ra:?} {rb:?}");
    assert!(
        ra.refreshed > 0 && rb.refreshed > 0,
        "both worked: {ra:?} {rb:?}"
    );
    assert_eq!(
        t.fake.refreshes.load(Ordering::SeqCst),
        100,
        "each row once"
    );
    let most = t.fake.max_in_flight.load(Ordering::SeqCst);
    assert!(most <= 4, "{most} in flight: 2 per instance at most");
    assert_rate(&mut arrivals(&t, "limited"), 20.0, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_expiring_together_come_due_spread_over_the_margin() {
    let t = TestService::start().await;
    // 200 tokens expiring at the same moment, 450 s from now; the margin is
    // 600 s: due points spread over 600..300 s before expiry, so about half
    // are due now, the rest over the next 150 s.
    for i in 0..200 {
        t.seed("u1", "good", &format!("s{i}"), 450).await;
    }
    let cfg = Refresher {
        margin: Duration::from_secs(600),
        ..Refresher::default()
    };
    let (due, _) = t.service.due_backlog(cfg.margin).await.unwrap();
    assert!((60..=140).contains(&due), "{due} of 200 due at once");
    let report = t
        .service
        .refresh_due(&cfg, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(report.attempted as i64, due);
    // Within the margin's last half everything is due.
    let all = Refresher {
        margin: Duration::from_secs(600),
        ..Refresher::default()
    };
    let mut conn = t.service.pool().get().await.unwrap();
    conn.execute(
        "UPDATE integrations SET expires_at = now() + interval '290 seconds' WHERE refresh_generation = 0",
        &[],
    )
    .await
    .unwrap();
    let report = t
        .service
        .refresh_due(&all, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(report.attempted as i64, 200 - due);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_held_back_by_its_limits_does_not_hold_back_another() {
    let t = TestService::start().await;
    // `slowpoke` allows 2 refreshes a second and has 40 due rows expiring
    // first; `good` has 40 due rows and no limit.
    let registry = format!(
        "{}max_refreshes_per_second = 2\n",
        t.fake.registry_toml(&["slowpoke"])
    );
    let svc = t
        .instance_with_providers(&registry, "connection_limit=5")
        .await;
    for i in 0..40 {
        t.seed_via(&svc, "u1", "slowpoke", &format!("s{i}"), 30)
            .await;
        t.seed_via(&svc, "u1", "good", &format!("g{i}"), 60).await;
    }
    let cfg = Refresher {
        interval: Duration::from_millis(100),
        page: 10,
        ..Refresher::default()
    };
    let cancel = CancellationToken::new();
    let task = tokio::spawn(svc.clone().run_refresher(cfg, cancel.clone()));
    let good_done = |t: &TestService| arrivals(t, "good").len() >= 40;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !good_done(&t) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let slow = arrivals(&t, "slowpoke").len();
    cancel.cancel();
    task.await.unwrap();
    assert!(good_done(&t), "good's rows were not all refreshed");
    assert!(
        slow < 40,
        "good's rows waited for all of slowpoke's ({slow} refreshed first)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_refused_during_a_pause_leaves_a_waiting_batch_its_lease() {
    let t = TestService::start().await;
    t.seed("u1", "good", "a", 60).await;
    let (good, a) = (provider_name("good"), account_id("a"));
    // The first refresh meets a 429: the provider is paused for 8 s.
    t.fake.throttle("good", Duration::from_secs(7), 8);
    let first = t.service.refresh(&good, &a).await;
    assert!(
        matches!(first, Err(ServiceError::ProviderBusy { .. })),
        "{first:?}"
    );
    // A batch claims the row ahead and waits at the gate for the pause...
    let svc = t.service.clone();
    let request = RefreshRequest {
        provider: good.clone(),
        account_id: a.clone(),
    };
    let batch = tokio::spawn(async move { svc.batch_refresh(vec![request], 5).await });
    let conn = t.service.pool().get().await.unwrap();
    let mut conn = conn;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let owner: Option<String> = conn
            .query_one("SELECT refresh_lease_owner FROM integrations", &[])
            .await
            .unwrap()
            .get(0);
        if owner.is_some() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(conn);
    // ...while a user's refresh of the same row cannot wait that long: it
    // must neither give the batch's lease back nor pass for a result.
    let user = t.service.refresh(&good, &a).await;
    assert!(
        matches!(user, Err(ServiceError::ProviderBusy { .. })),
        "{user:?}"
    );
    let results = batch.await.unwrap();
    let status = results[0].as_ref().expect("the batch refreshed");
    assert!(status.last_refresh_at.is_some(), "{status:?}");
    assert_eq!(
        t.fake.refreshes.load(Ordering::SeqCst),
        1,
        "sent once, after the pause"
    );
    // The rotated token was stored: the next refresh presents it.
    t.service
        .refresh(&good, &a)
        .await
        .expect("refreshes with the stored token");
}
