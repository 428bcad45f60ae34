//! Request ids: echoed or generated, and on the log lines of the request.

use std::time::Duration;

use reqwest::Method;

use crate::common::{Mode, TestApp};

#[tokio::test]
async fn a_request_id_is_echoed_or_generated_and_tags_the_request_log_lines() {
    let app = TestApp::spawn().await;

    // Given: echoed, on success and on failure.
    let ok = app
        .send_raw(
            Method::GET,
            "/healthz",
            None,
            None,
            &[("x-request-id", "test-123")],
        )
        .await;
    assert_eq!(ok.header("x-request-id").as_deref(), Some("test-123"));
    let denied = app
        .send_raw(
            Method::GET,
            "/v1/admin/pool",
            None,
            None,
            &[("x-request-id", "test-401")],
        )
        .await;
    denied.assert_error(401, "unauthorized");
    assert_eq!(denied.header("x-request-id").as_deref(), Some("test-401"));

    // Absent: generated, different each time (the format is the server's
    // business: printable, short, unique).
    let mut generated = std::collections::HashSet::new();
    for _ in 0..5 {
        let id = app
            .get("/healthz", None)
            .await
            .header("x-request-id")
            .expect("a generated request id");
        assert!(
            (8..=64).contains(&id.len()) && id.chars().all(|c| c.is_ascii_graphic()),
            "{id:?}"
        );
        assert!(generated.insert(id.clone()), "{id} generated twice");
    }

    // A request that logs: a refresh the provider fails with a 500.
    app.seed("user-1", "bad", "acct-1", 3600).await;
    app.fake.set_mode("bad", Mode::ServerError);
    let failed = app
        .send_raw(
            Method::POST,
            "/v1/integrations/bad/acct-1/refresh",
            Some(&app.keys.all),
            None,
            &[("x-request-id", "test-refresh-777")],
        )
        .await;
    failed.assert_error(502, "refresh_failed");
    assert_eq!(
        failed.header("x-request-id").as_deref(),
        Some("test-refresh-777")
    );
    assert!(failed.header("retry-after").is_some());
    let line = app
        .server
        .wait_for_log(
            |l| l.contains("token refresh failed"),
            Duration::from_secs(10),
        )
        .await
        .unwrap_or_else(|| {
            panic!(
                "no refresh failure logged:\n{}",
                app.server.logs().join("\n")
            )
        });
    assert!(line.contains("test-refresh-777"), "{line}");
    assert!(
        line.contains(r#"api_key="all""#),
        "the caller is on the line too: {line}"
    );

    // A generated id is on the log lines too.
    let failed = app
        .send(
            Method::POST,
            "/v1/integrations/bad/acct-1/refresh",
            Some(&app.keys.all),
            None,
        )
        .await;
    failed.assert_error(502, "refresh_failed");
    let generated = failed.header("x-request-id").unwrap();
    let line = app
        .server
        .wait_for_log(
            |l| l.contains("token refresh failed") && l.contains(&generated),
            Duration::from_secs(10),
        )
        .await;
    assert!(
        line.is_some(),
        "no log line with request id {generated}:\n{}",
        app.server.logs().join("\n")
    );
    // No line names a token.
    for l in app.server.logs() {
        assert!(
            !l.contains("rt-seed-bad-acct-1") && !l.contains("at-seed-bad-acct-1"),
            "{l}"
        );
    }
    app.assert_no_leaks();
}

#[tokio::test]
async fn a_hostile_request_id_is_replaced_and_never_reaches_the_log() {
    let app = TestApp::spawn().await;
    app.seed("user-1", "bad", "acct-1", 3600).await;
    app.fake.set_mode("bad", Mode::ServerError);

    // A value that forged a field and a line in text logs.
    let hostile = "1 api_key=k-admin}: FAKE LINE";
    let failed = app
        .send_raw(
            Method::POST,
            "/v1/integrations/bad/acct-1/refresh",
            Some(&app.keys.all),
            None,
            &[("x-request-id", hostile)],
        )
        .await;
    failed.assert_error(502, "refresh_failed");
    let generated = failed.header("x-request-id").expect("a request id");
    assert_ne!(generated, hostile);
    assert!(
        !generated.contains("FAKE") && generated.chars().all(|c| c.is_ascii_graphic()),
        "{generated}"
    );
    let line = app
        .server
        .wait_for_log(
            |l| l.contains("token refresh failed") && l.contains(&generated),
            Duration::from_secs(10),
        )
        .await
        .unwrap_or_else(|| {
            panic!(
                "no log line with the generated id {generated}:\n{}",
                app.server.logs().join("\n")
            )
        });
    assert!(line.contains(r#"api_key="all""#), "{line}");
    for l in app.server.logs() {
        assert!(
            !l.contains("FAKE LINE") && !l.contains("k-admin"),
            "a forged value reached the log: {l}"
        );
    }

    // Other refused values: too long, quotes, `=`, and two ids at once.
    let long = "a".repeat(129);
    for bad in [long.as_str(), "a\"b", "x=y", "tab\there"] {
        let reply = app
            .send_raw(
                Method::GET,
                "/healthz",
                None,
                None,
                &[("x-request-id", bad)],
            )
            .await;
        let id = reply.header("x-request-id").unwrap();
        assert_ne!(id, bad);
        assert!(
            id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "{id}"
        );
    }
    let two = app
        .http
        .get(app.url("/healthz"))
        .header("x-request-id", "first")
        .header("x-request-id", "second")
        .send()
        .await
        .unwrap();
    let ids: Vec<_> = two.headers().get_all("x-request-id").iter().collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert!(ids[0] != "first" && ids[0] != "second", "{ids:?}");

    // Accepted: 1 to 128 of A-Z a-z 0-9 . _ : -
    let longest = format!("Ab9._:-{}", "z".repeat(121));
    for good in ["a", "trace:span.1_2-3", longest.as_str()] {
        let reply = app
            .send_raw(
                Method::GET,
                "/healthz",
                None,
                None,
                &[("x-request-id", good)],
            )
            .await;
        assert_eq!(reply.header("x-request-id").as_deref(), Some(good));
    }
    app.assert_no_leaks();
}
