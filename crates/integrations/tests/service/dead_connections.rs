//! Issue 12, item 4: a connection that turns out dead (its backend
//! terminated) fails no read: the status and token reads are tried once
//! more on another connection.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use integrations::service::ServiceConfig;

use crate::common::{account_id, provider_name, user_id, TestService};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_every_backend_under_load_fails_no_status_or_token_read() {
    let t = TestService::start_with(
        "connection_limit=4&application_name=victims",
        ServiceConfig {
            status_cache_ttl: Duration::ZERO,
            ..ServiceConfig::default()
        },
    )
    .await;
    for i in 0..8 {
        t.seed(&format!("u{i}"), "good", &format!("a{i}"), 3600)
            .await;
    }
    let admin = t.db.connect().await;
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..16)
        .map(|n| {
            let service = t.service.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut reads, mut errors) = (0u32, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    let i = reads % 8;
                    let result = if n % 2 == 0 {
                        service.status(&user_id(&format!("u{i}"))).await.map(drop)
                    } else {
                        service
                            .access_token(&provider_name("good"), &account_id(&format!("a{i}")))
                            .await
                            .map(drop)
                    };
                    if let Err(e) = result {
                        errors.push(e.to_string());
                    }
                    reads += 1;
                }
                (reads, errors)
            })
        })
        .collect();
    let mut kills = 0;
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let killed: i64 = admin
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'victims'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        kills += killed;
    }
    stop.store(true, Ordering::Relaxed);
    let (mut reads, mut errors) = (0, Vec::new());
    for r in readers {
        let (n, e) = r.await.unwrap();
        reads += n;
        errors.extend(e);
    }
    assert!(kills >= 15, "backends were terminated ({kills})");
    assert!(reads > 500, "the readers did read ({reads})");
    assert!(
        errors.is_empty(),
        "{} of {reads} reads failed, first: {:?}",
        errors.len(),
        errors.first()
    );
}
