//! `/metrics` labels come from fixed sets and route templates, never from
//! what an anonymous client sends: random methods and unknown paths do not
//! grow the label sets.

use std::collections::BTreeSet;

use rand::distributions::{Alphanumeric, DistString};
use reqwest::Method;

use crate::common::TestApp;

/// The values of `label` on the lines of metric `name`.
fn label_values(metrics: &str, name: &str, label: &str) -> BTreeSet<String> {
    let key = format!("{label}=\"");
    metrics
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| {
            let rest = &l[l.find(&key)? + key.len()..];
            Some(rest[..rest.find('"')?].to_string())
        })
        .collect()
}

#[tokio::test]
async fn random_methods_and_unknown_paths_do_not_grow_the_metric_labels() {
    let app = TestApp::spawn().await;
    let mut rng = rand::thread_rng();
    let mut sent = Vec::new();
    for i in 0..200 {
        // Upper-case letters: a valid method token, and not a standard one.
        let len = if i % 10 == 0 { 2000 } else { 40 };
        let method = Alphanumeric
            .sample_string(&mut rng, len)
            .to_ascii_uppercase();
        let noise = Alphanumeric.sample_string(&mut rng, 24);
        let path = match i % 3 {
            0 => format!("/no-such-route-{noise}"),
            1 => format!("/v1/users/{noise}/integrations"),
            _ => "/healthz".to_string(),
        };
        let reply = app
            .send_raw(
                Method::from_bytes(method.as_bytes()).unwrap(),
                &path,
                None,
                None,
                &[],
            )
            .await;
        assert!(
            reply.status.is_client_error(),
            "{path}: {} {}",
            reply.status,
            reply.text
        );
        sent.push(method);
        sent.push(noise);
    }
    // And a few ordinary requests, so the known values are there too.
    assert_eq!(app.get("/healthz", None).await.status, 200);
    let deleted = app
        .send(
            Method::DELETE,
            "/v1/users/u/integrations/good/a",
            None,
            None,
        )
        .await;
    assert_eq!(deleted.status, 401);

    let metrics = app.get("/metrics", None).await;
    assert_eq!(metrics.status, 200);
    for sent in &sent {
        assert!(
            !metrics.text.contains(sent.as_str()),
            "a client's value became a label: {}...",
            &sent[..sent.len().min(40)]
        );
    }
    let fixed: BTreeSet<&str> = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other",
    ]
    .into_iter()
    .collect();
    let openapi = app.get("/openapi.json", None).await.json();
    let mut templates: BTreeSet<String> = openapi["paths"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    templates.insert("/openapi.json".into());
    templates.insert("unmatched".into());
    for name in ["http_requests_total", "http_request_duration_seconds"] {
        let methods = label_values(&metrics.text, name, "method");
        assert!(methods.contains("other"), "{name}: {methods:?}");
        assert!(
            methods.contains("GET") && methods.contains("DELETE"),
            "{name}: {methods:?}"
        );
        for m in &methods {
            assert!(fixed.contains(m.as_str()), "{name}: method label {m:?}");
        }
        let routes = label_values(&metrics.text, name, "route");
        assert!(routes.contains("unmatched"), "{name}: {routes:?}");
        assert!(
            routes.contains("/v1/users/{user_id}/integrations"),
            "{name}: {routes:?}"
        );
        for r in &routes {
            assert!(templates.contains(r), "{name}: route label {r:?}");
        }
    }
    // A bounded exposition: nowhere near one line per request.
    let http_lines = metrics
        .text
        .lines()
        .filter(|l| l.starts_with("http_"))
        .count();
    assert!(
        http_lines < 150,
        "{http_lines} http_ lines:\n{}",
        metrics.text
    );
}
