//! Webhooks end to end: real `serve` processes deliver to a receiver on
//! 127.0.0.1 that verifies every signature with the Standard Webhooks
//! reference library (Python, `tests/support/webhook_receiver.py`), not
//! with our code. Failing receivers, retries, order per integration, a
//! process killed with deliveries pending, two instances, secret rotation,
//! failed deliveries and redelivery, disabling, the address guard.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use integrations::webhooks::SigningKey;
use nix::sys::signal::{kill, Signal};
use reqwest::Method;
use secrecy::SecretString;
use serde_json::{json, Value};

use crate::common::{eventually, metric, Mode, TestApp};

/// The receiver process; stopped (its stdin closed, then killed) when
/// dropped.
struct Receiver {
    child: Child,
    port: u16,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Receiver {
    async fn start() -> Receiver {
        let dir = tempfile::tempdir().unwrap();
        let port_file = dir.path().join("port");
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/support/webhook_receiver.py"
        );
        let mut child = Command::new("python3")
            .arg(script)
            .arg("--port-file")
            .arg(&port_file)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 runs (scripts/install-deps --test installs standardwebhooks)");
        let port = eventually(Duration::from_secs(30), || {
            let text = std::fs::read_to_string(&port_file).ok();
            async move { text.and_then(|t| t.trim().parse::<u16>().ok()) }
        })
        .await;
        let Some(port) = port else {
            let _ = child.kill();
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("the webhook receiver did not start (is standardwebhooks installed?): {err}");
        };
        Receiver {
            child,
            port,
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn config(&self, config: Value) {
        let r = self
            .http
            .post(self.url("/_control/config"))
            .json(&config)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }

    /// Every delivery received so far, in arrival order.
    async fn received(&self) -> Vec<Value> {
        let body: Value = self
            .http
            .get(self.url("/_control/received"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["requests"].as_array().unwrap().clone()
    }

    /// The deliveries answered 200 (verified by the library).
    async fn accepted(&self) -> Vec<Value> {
        self.received()
            .await
            .into_iter()
            .filter(|r| r["status"] == 200)
            .collect()
    }

    /// Waits until `n` distinct webhook ids were accepted; all accepted.
    async fn wait_accepted(&self, n: usize, timeout: Duration) -> Vec<Value> {
        let got = eventually(timeout, || async {
            let accepted = self.accepted().await;
            let ids: HashSet<String> = accepted
                .iter()
                .map(|r| r["webhook_id"].as_str().unwrap().to_string())
                .collect();
            (ids.len() >= n).then_some(accepted)
        })
        .await;
        match got {
            Some(accepted) => accepted,
            None => panic!(
                "{n} webhook ids were not accepted in {timeout:?}; received: {:#?}",
                self.received()
                    .await
                    .iter()
                    .rev()
                    .take(5)
                    .collect::<Vec<_>>()
            ),
        }
    }

    /// What the reference library says of a delivery.
    async fn verify(
        &self,
        secret: &str,
        id: &str,
        timestamp: &str,
        signature: &str,
        body: &str,
    ) -> (bool, String) {
        let answer: Value = self
            .http
            .post(self.url("/_control/verify"))
            .json(&json!({
                "secret": secret,
                "headers": {"webhook-id": id, "webhook-timestamp": timestamp, "webhook-signature": signature},
                "body": body,
            }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (
            answer["ok"].as_bool().unwrap(),
            answer["error"].as_str().unwrap_or_default().to_string(),
        )
    }
}

/// Variables for servers that deliver to 127.0.0.1 quickly.
const FAST: &[(&str, &str)] = &[
    ("INTEGRATIONS_WEBHOOK_ALLOW_PRIVATE", "true"),
    ("INTEGRATIONS_WEBHOOK_TIMEOUT", "2"),
    (
        "INTEGRATIONS_WEBHOOK_RETRY_SCHEDULE",
        "1s,2s,4s,4s,4s,4s,4s,4s,4s,4s,4s,4s",
    ),
];

/// Registers an endpoint; (id, secret).
/// The first of an endpoint's deliveries with `status` (`pending`,
/// `succeeded`, `failed`) once `ready` holds of it: an outcome is counted,
/// then written, just after the receiver answers.
async fn first_delivery(
    app: &TestApp,
    id: &str,
    status: &str,
    ready: impl Fn(&Value) -> bool,
) -> Value {
    let path = format!("/v1/webhooks/{id}/deliveries?status={status}");
    eventually(Duration::from_secs(30), || async {
        let listed = app.get(&path, Some(&app.keys.all)).await.json();
        let first = listed["deliveries"][0].clone();
        ready(&first).then_some(first)
    })
    .await
    .unwrap_or_else(|| panic!("no {status} delivery of {id} as expected in 30 s"))
}

async fn register(app: &TestApp, url: &str, types: Option<&[&str]>) -> (String, String) {
    let mut body = json!({ "url": url });
    if let Some(types) = types {
        body["event_types"] = json!(types);
    }
    let reply = app
        .send(
            Method::POST,
            "/v1/webhooks",
            Some(&app.keys.all),
            Some(body),
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text);
    let created = reply.json();
    (
        created["id"].as_str().unwrap().to_string(),
        created["secret"].as_str().unwrap().to_string(),
    )
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn body_of(delivery: &Value) -> Value {
    serde_json::from_str(delivery["body"].as_str().unwrap()).unwrap()
}

#[tokio::test]
async fn deliveries_verify_with_the_reference_library_and_forgeries_do_not() {
    let app = TestApp::spawn_args(FAST, &[]).await;
    let receiver = Receiver::start().await;
    let (id, secret) = register(&app, &receiver.url("/hook"), None).await;
    assert!(secret.starts_with("whsec_"), "{secret}");
    receiver.config(json!({ "secrets": [secret] })).await;

    // The secret is shown once: never by GET, the list, or a read key.
    let one = app
        .get(&format!("/v1/webhooks/{id}"), Some(&app.keys.all))
        .await;
    assert_eq!(one.status, 200, "{}", one.text);
    assert!(!one.text.contains(&secret) && one.json().get("secret").is_none());
    assert_eq!(one.json()["status"], "enabled");
    let list = app.get("/v1/webhooks", Some(&app.keys.all)).await;
    assert!(!list.text.contains(&secret));
    assert_eq!(list.json()["webhooks"][0]["id"], id.as_str());
    app.get("/v1/webhooks", Some(&app.keys.read))
        .await
        .assert_error(403, "forbidden");

    app.seed("u1", "good", "acct", 3600).await;
    let accepted = receiver.wait_accepted(1, Duration::from_secs(30)).await;
    let delivery = &accepted[0];
    assert_eq!(delivery["verified"], true);
    // The body is the event as GET /v1/events gives it; webhook-id its id.
    let events = app.get("/v1/events", Some(&app.keys.read)).await.json();
    let event = &events["events"][0];
    assert_eq!(body_of(delivery), *event);
    assert_eq!(
        delivery["webhook_id"],
        event["id"].as_i64().unwrap().to_string()
    );
    assert_eq!(event["type"], "integration.connected");

    // The library refuses a tampered body, a wrong secret, and a correct
    // signature over a timestamp 10 minutes old.
    let (wid, ts, sig, body) = (
        delivery["webhook_id"].as_str().unwrap(),
        delivery["webhook_timestamp"].as_str().unwrap(),
        delivery["webhook_signature"].as_str().unwrap(),
        delivery["body"].as_str().unwrap(),
    );
    assert_eq!(
        receiver.verify(&secret, wid, ts, sig, body).await,
        (true, String::new())
    );
    let tampered = body.replace("connected", "revoked");
    let (ok, error) = receiver.verify(&secret, wid, ts, sig, &tampered).await;
    assert!(!ok && error.contains("No matching signature"), "{error}");
    let other = integrations::webhooks::new_secret();
    let other = secrecy::ExposeSecret::expose_secret(&other).to_string();
    let (ok, error) = receiver.verify(&other, wid, ts, sig, body).await;
    assert!(!ok && error.contains("No matching signature"), "{error}");
    let key = SigningKey::from_secret(&SecretString::from(secret.clone())).unwrap();
    let old = (now() as i64) - 600;
    let old_sig = key.sign(wid, old, body.as_bytes());
    let (ok, error) = receiver
        .verify(&secret, wid, &old.to_string(), &old_sig, body)
        .await;
    assert!(!ok && error.contains("too old"), "{error}");
    // The same signing with the current time passes: the refusal was the
    // timestamp's.
    let fresh = now() as i64;
    let fresh_sig = key.sign(wid, fresh, body.as_bytes());
    assert!(
        receiver
            .verify(&secret, wid, &fresh.to_string(), &fresh_sig, body)
            .await
            .0
    );

    // A test delivery, signed the same way.
    let test = app
        .send(
            Method::POST,
            &format!("/v1/webhooks/{id}/test"),
            Some(&app.keys.all),
            None,
        )
        .await;
    assert_eq!(test.status, 200, "{}", test.text);
    let test = test.json();
    assert_eq!(test["delivered"], true, "{test}");
    assert_eq!(test["status"], 200);
    let test_id = test["message_id"].as_str().unwrap().to_string();
    let accepted = receiver.wait_accepted(2, Duration::from_secs(10)).await;
    let tested = accepted
        .iter()
        .find(|r| r["webhook_id"] == test_id.as_str())
        .unwrap();
    assert_eq!(body_of(tested)["type"], "webhook.test");

    let succeeded = first_delivery(&app, &id, "succeeded", Value::is_object).await;
    assert_eq!(succeeded["attempts"], 1);
    assert_eq!(succeeded["last_status"], 200);
    // Counted before its row was written.
    assert_eq!(
        metric(
            &app,
            "integrations_webhook_deliveries_total{outcome=\"delivered\"}"
        )
        .await,
        Some(1.0)
    );
    app.assert_no_leaks();
    for line in app.server.logs() {
        assert!(
            !line.contains(&secret),
            "the server logged the secret: {line}"
        );
    }
}

#[tokio::test]
async fn refresh_outcomes_arrive_as_revoked_refresh_failed_error_and_recovered() {
    let app = TestApp::spawn_args(FAST, &[]).await;
    let receiver = Receiver::start().await;
    let (_, secret) = register(
        &app,
        &receiver.url("/hook"),
        Some(&[
            "integration.revoked",
            "integration.refresh_failed",
            "integration.error",
            "integration.recovered",
        ]),
    )
    .await;
    receiver.config(json!({ "secrets": [secret] })).await;
    app.seed("u1", "good", "gone", 3600).await;
    app.seed("u1", "bad", "flaky", 3600).await;
    let refresh = |account: &str| {
        let path = match account {
            "gone" => "/v1/integrations/good/gone/refresh".to_string(),
            _ => format!("/v1/integrations/bad/{account}/refresh"),
        };
        let app = &app;
        async move {
            app.send(Method::POST, &path, Some(&app.keys.all), None)
                .await
                .status
        }
    };
    app.fake.set_mode("good", Mode::InvalidGrant);
    refresh("gone").await;
    app.fake.set_mode("bad", Mode::ServerError);
    for _ in 0..5 {
        refresh("flaky").await;
    }
    app.fake.set_mode("bad", Mode::Rotate);
    assert_eq!(refresh("flaky").await, 200);

    // connected is not subscribed: 1 revoked + 4 refresh_failed + error +
    // recovered.
    let accepted = receiver.wait_accepted(7, Duration::from_secs(30)).await;
    let bodies: Vec<Value> = accepted.iter().map(body_of).collect();
    let gone: Vec<&Value> = bodies
        .iter()
        .filter(|b| b["data"]["account_id"] == "gone")
        .collect();
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0]["type"], "integration.revoked");
    assert_eq!(gone[0]["data"]["error"]["code"], "invalid_grant");
    let flaky: Vec<&str> = bodies
        .iter()
        .filter(|b| b["data"]["account_id"] == "flaky")
        .map(|b| b["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        flaky,
        [
            "integration.refresh_failed",
            "integration.refresh_failed",
            "integration.refresh_failed",
            "integration.refresh_failed",
            "integration.error",
            "integration.recovered"
        ]
    );
    let failed = bodies
        .iter()
        .find(|b| b["type"] == "integration.refresh_failed")
        .unwrap();
    assert_eq!(failed["data"]["error"]["code"], "temporary_failure");
    app.assert_no_leaks();
}

/// Events of `n` integrations, four each in order: connected,
/// refresh_failed, recovered, deleted.
async fn four_events_each(app: &TestApp, n: usize) {
    for i in 0..n {
        app.seed("u1", "bad", &format!("a{i}"), 3600).await;
    }
    app.fake.set_mode("bad", Mode::ServerError);
    for i in 0..n {
        let path = format!("/v1/integrations/bad/a{i}/refresh");
        app.send(Method::POST, &path, Some(&app.keys.all), None)
            .await;
    }
    app.fake.set_mode("bad", Mode::Rotate);
    for i in 0..n {
        let path = format!("/v1/integrations/bad/a{i}/refresh");
        let reply = app
            .send(Method::POST, &path, Some(&app.keys.all), None)
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        let path = format!("/v1/users/u1/integrations/bad/a{i}");
        let reply = app
            .send(Method::DELETE, &path, Some(&app.keys.all), None)
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
}

/// Each webhook id once among the accepted deliveries, and per integration
/// the events in the order they happened (their ids ascending).
fn assert_once_and_in_order(accepted: &[Value], want: usize) {
    let mut seen = HashSet::new();
    let mut per_account: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for d in accepted {
        let id = d["webhook_id"].as_str().unwrap().to_string();
        assert!(seen.insert(id.clone()), "webhook-id {id} accepted twice");
        let body = body_of(d);
        assert_eq!(body["id"].as_i64().unwrap().to_string(), id);
        per_account
            .entry(body["data"]["account_id"].as_str().unwrap().to_string())
            .or_default()
            .push(body["id"].as_i64().unwrap());
    }
    assert_eq!(seen.len(), want);
    for (account, ids) in per_account {
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        assert_eq!(ids, sorted, "{account}'s events arrived out of order");
    }
}

/// After a kill: `want` ids accepted in all, and those the new instance
/// sent (accepted from `since` on) once each and in order per integration.
/// An attempt the killed instance had sent may still have been accepted
/// (a request already on its way): sent again, it rightly arrives twice.
fn assert_once_since(accepted: &[Value], want: usize, since: f64) {
    let ids: HashSet<&str> = accepted
        .iter()
        .map(|d| d["webhook_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), want);
    let late: Vec<Value> = accepted
        .iter()
        .filter(|d| d["at"].as_f64().unwrap() >= since)
        .cloned()
        .collect();
    let late_ids: HashSet<&str> = late
        .iter()
        .map(|d| d["webhook_id"].as_str().unwrap())
        .collect();
    assert_once_and_in_order(&late, late_ids.len());
}

#[tokio::test]
async fn a_receiver_failing_for_30_seconds_gets_every_event_in_order_once() {
    let app = TestApp::spawn_args(FAST, &[]).await;
    let receiver = Receiver::start().await;
    let (_, secret) = register(&app, &receiver.url("/hook"), None).await;
    receiver
        .config(json!({ "secrets": [secret], "fail_until": now() + 30.0, "fail_status": 500 }))
        .await;
    four_events_each(&app, 5).await;
    let accepted = receiver.wait_accepted(20, Duration::from_secs(120)).await;
    assert_once_and_in_order(&accepted, 20);
    // The 500s were real attempts, retried.
    let refused = receiver
        .received()
        .await
        .iter()
        .filter(|r| r["status"] == 500)
        .count();
    assert!(refused >= 5, "{refused} attempts refused");
    assert!(
        metric(
            &app,
            "integrations_webhook_deliveries_total{outcome=\"retry\"}"
        )
        .await
            >= Some(5.0)
    );
}

#[tokio::test]
async fn a_server_killed_with_deliveries_pending_or_in_flight_delivers_them_after_a_restart() {
    let app = TestApp::spawn_args(FAST, &[]).await;
    let receiver = Receiver::start().await;
    let (_, secret) = register(&app, &receiver.url("/hook"), None).await;
    receiver
        .config(json!({ "secrets": [secret], "fail_until": now() + 3600.0 }))
        .await;
    four_events_each(&app, 3).await;
    // Attempts were made and refused; then the process dies at once.
    eventually(Duration::from_secs(30), || async {
        (receiver.received().await.len() >= 3).then_some(())
    })
    .await
    .expect("attempts reached the receiver");
    kill(app.server.pid(), Signal::SIGKILL).unwrap();
    // Attempts that reached the receiver before the kill are refused too
    // (were one accepted, its sender never learnt it: sent again, it would
    // rightly arrive twice).
    eventually(Duration::from_secs(30), || async {
        let all = receiver.received().await;
        all.iter().all(|r| !r["status"].is_null()).then_some(())
    })
    .await
    .expect("the attempts in flight were answered");
    receiver.config(json!({ "fail_until": null })).await;
    let url = app.db.as_ref().unwrap().url.clone();
    let url = crate::common::with_params(&url, "connection_limit=5");
    let since = now();
    let restarted = app.spawn_beside(&url, FAST, &[]).await;
    let accepted = receiver.wait_accepted(12, Duration::from_secs(60)).await;
    assert_once_since(&accepted, 12, since);

    // Killed while attempts are in flight (the receiver takes 1.5 s to
    // answer them, then refuses them, the sender gone): those are sent
    // again once their claim runs out.
    receiver
        .config(json!({ "delay_ms": 1500, "fail_until": now() + 3600.0 }))
        .await;
    let db = app.db.as_ref().unwrap().connect().await;
    db.execute(
        "INSERT INTO events (type, integration_id, user_id, provider, account_id, status, refresh_failures) \
         SELECT 'integration.refresh_failed', 1000 + g, 'u', 'good', 'late' || g, 'connected', 1 \
         FROM generate_series(1, 8) g",
        &[],
    )
    .await
    .unwrap();
    let in_flight = |r: &Value| r["status"].is_null();
    eventually(Duration::from_secs(30), || async {
        receiver
            .received()
            .await
            .iter()
            .any(in_flight)
            .then_some(())
    })
    .await
    .expect("attempts in flight");
    kill(restarted.server.pid(), Signal::SIGKILL).unwrap();
    // Their answers went nowhere; then the receiver accepts again.
    eventually(Duration::from_secs(30), || async {
        (!receiver.received().await.iter().any(in_flight)).then_some(())
    })
    .await
    .expect("the attempts in flight were answered");
    receiver
        .config(json!({ "delay_ms": 0, "fail_until": null }))
        .await;
    let since = now();
    let third = app.spawn_beside(&url, FAST, &[]).await;
    let accepted = receiver.wait_accepted(20, Duration::from_secs(60)).await;
    assert_once_since(&accepted, 20, since);
    drop(third);
}

#[tokio::test]
async fn two_instances_deliver_1000_events_each_once() {
    let app = TestApp::spawn_args(FAST, &[]).await;
    let url = app.db.as_ref().unwrap().url.clone();
    let url = crate::common::with_params(&url, "connection_limit=5");
    let second = app.spawn_beside(&url, FAST, &[]).await;
    let receiver = Receiver::start().await;
    let (_, secret) = register(&app, &receiver.url("/hook"), None).await;
    receiver.config(json!({ "secrets": [secret] })).await;
    // 1,000 events in 10 transactions, 100 integrations of 10 events each
    // (written straight into the outbox: the fan-out trigger is on it).
    let db = app.db.as_ref().unwrap().connect().await;
    for round in 0..10i32 {
        db.execute(
            "INSERT INTO events (type, integration_id, user_id, provider, account_id, status, refresh_failures) \
             SELECT 'integration.refresh_failed', g, 'u', 'good', 'a' || g, 'connected', $1 \
             FROM generate_series(1, 100) g",
            &[&round],
        )
        .await
        .unwrap();
    }
    let accepted = receiver.wait_accepted(1000, Duration::from_secs(120)).await;
    // Every request the receiver got was answered 200: a delivery sent by
    // both instances would show as a second request with its id.
    let all = receiver.received().await;
    assert_eq!(all.len(), accepted.len(), "every request was accepted");
    assert_once_and_in_order(&accepted, 1000);
    drop(second);
}

#[tokio::test]
async fn during_a_rotation_either_secret_verifies() {
    let app = TestApp::spawn_args(FAST, &[]).await;
    let receiver = Receiver::start().await;
    let (id, old) = register(&app, &receiver.url("/hook"), None).await;
    let reply = app
        .send(
            Method::POST,
            &format!("/v1/webhooks/{id}/rotate-secret"),
            Some(&app.keys.all),
            None,
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.header("cache-control").as_deref(), Some("no-store"));
    let new = reply.json()["secret"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    let shown = app
        .get(&format!("/v1/webhooks/{id}"), Some(&app.keys.all))
        .await
        .json();
    assert!(shown["previous_secret_expires_at"].is_string(), "{shown}");

    // A receiver that knows only the old secret, then one that knows only
    // the new one: both accept.
    receiver.config(json!({ "secrets": [old] })).await;
    app.seed("u1", "good", "one", 3600).await;
    let accepted = receiver.wait_accepted(1, Duration::from_secs(30)).await;
    assert_eq!(accepted[0]["verified_with"], 0);
    assert_eq!(
        accepted[0]["webhook_signature"]
            .as_str()
            .unwrap()
            .split(' ')
            .count(),
        2,
        "two signatures while the secrets overlap"
    );
    receiver.config(json!({ "secrets": [new] })).await;
    app.seed("u1", "good", "two", 3600).await;
    let accepted = receiver.wait_accepted(2, Duration::from_secs(30)).await;
    assert_eq!(accepted.len(), 2);
    app.assert_no_leaks();
}

#[tokio::test]
async fn failed_deliveries_are_listed_and_redelivered() {
    let app = TestApp::spawn_args(
        &[
            ("INTEGRATIONS_WEBHOOK_ALLOW_PRIVATE", "true"),
            ("INTEGRATIONS_WEBHOOK_TIMEOUT", "2"),
            ("INTEGRATIONS_WEBHOOK_RETRY_SCHEDULE", "200ms,200ms"),
        ],
        &[],
    )
    .await;
    let receiver = Receiver::start().await;
    let (id, secret) = register(&app, &receiver.url("/hook"), None).await;
    receiver
        .config(json!({ "secrets": [secret], "fail_until": now() + 3600.0, "fail_status": 503 }))
        .await;
    app.seed("u1", "good", "acct", 3600).await;
    // Failed after its schedule.
    let failed = first_delivery(&app, &id, "failed", Value::is_object).await;
    assert_eq!(failed["attempts"], 3, "{failed}");
    assert_eq!(failed["last_status"], 503);
    assert_eq!(failed["last_error"], "HTTP 503");
    assert_eq!(failed["event_type"], "integration.connected");
    assert!(
        metric(
            &app,
            "integrations_webhook_deliveries_total{outcome=\"failed\"}"
        )
        .await
            >= Some(1.0)
    );

    // Fixed: redelivered, and it arrives.
    receiver.config(json!({ "fail_until": null })).await;
    let event = failed["event_id"].as_i64().unwrap();
    let reply = app
        .send(
            Method::POST,
            &format!("/v1/events/{event}/redeliver"),
            Some(&app.keys.all),
            None,
        )
        .await;
    assert_eq!(reply.status, 202, "{}", reply.text);
    assert_eq!(reply.json()["queued"], 1);
    receiver.wait_accepted(1, Duration::from_secs(30)).await;
    app.send(
        Method::POST,
        "/v1/events/999999/redeliver",
        Some(&app.keys.all),
        None,
    )
    .await
    .assert_error(404, "not_found");
    app.send(
        Method::POST,
        "/v1/events/abc/redeliver",
        Some(&app.keys.all),
        None,
    )
    .await
    .assert_error(400, "invalid_request");
    let succeeded = first_delivery(&app, &id, "succeeded", |d| d["event_id"] == event).await;
    // Attempts are never reset: the 3 that failed, then the redelivery's.
    assert_eq!(succeeded["attempts"], 4);
}

#[tokio::test]
async fn an_endpoint_failing_every_attempt_for_long_enough_is_disabled_and_can_be_enabled() {
    let app = TestApp::spawn_args(
        &[
            ("INTEGRATIONS_WEBHOOK_ALLOW_PRIVATE", "true"),
            ("INTEGRATIONS_WEBHOOK_TIMEOUT", "2"),
            (
                "INTEGRATIONS_WEBHOOK_RETRY_SCHEDULE",
                "500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms",
            ),
            ("INTEGRATIONS_WEBHOOK_DISABLE_AFTER", "2"),
        ],
        &[],
    )
    .await;
    let receiver = Receiver::start().await;
    let (id, secret) = register(&app, &receiver.url("/hook"), None).await;
    receiver
        .config(json!({ "secrets": [secret], "fail_until": now() + 3600.0, "fail_status": 503 }))
        .await;
    app.seed("u1", "good", "acct", 3600).await;
    // Failing for longer than INTEGRATIONS_WEBHOOK_DISABLE_AFTER: disabled,
    // saying why.
    let shown = eventually(Duration::from_secs(30), || async {
        let w = app
            .get(&format!("/v1/webhooks/{id}"), Some(&app.keys.all))
            .await
            .json();
        (w["status"] == "disabled").then_some(w)
    })
    .await
    .expect("disabled");
    let reason = shown["disabled_reason"].as_str().unwrap();
    assert!(
        reason.contains("every attempt failed") && reason.contains("HTTP 503"),
        "{reason}"
    );
    assert!(app
        .server
        .logs()
        .iter()
        .any(|l| l.contains("webhook endpoint disabled")));
    assert!(shown["disabled_at"].is_string(), "{shown}");
    // The backlog shows in the gauges (refreshed every 5 s).
    let backlog = eventually(Duration::from_secs(20), || async {
        let pending = metric(&app, "integrations_webhook_pending ").await?;
        let oldest = metric(&app, "integrations_webhook_oldest_pending_seconds ").await?;
        (pending >= 1.0 && oldest > 0.0).then_some((pending, oldest))
    })
    .await;
    assert!(backlog.is_some(), "no backlog reported");
    // Enabled again, its pending delivery goes out.
    receiver.config(json!({ "fail_until": null })).await;
    let reply = app
        .send(
            Method::POST,
            &format!("/v1/webhooks/{id}/enable"),
            Some(&app.keys.all),
            None,
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json()["status"], "enabled");
    receiver.wait_accepted(1, Duration::from_secs(30)).await;
    let reply = app
        .send(
            Method::DELETE,
            &format!("/v1/webhooks/{id}"),
            Some(&app.keys.all),
            None,
        )
        .await;
    assert_eq!(reply.status, 204);
    app.get(&format!("/v1/webhooks/{id}"), Some(&app.keys.all))
        .await
        .assert_error(404, "not_found");
}

#[tokio::test]
async fn a_slow_endpoint_does_not_hold_back_the_others() {
    let app = TestApp::spawn_args(
        &[
            ("INTEGRATIONS_WEBHOOK_ALLOW_PRIVATE", "true"),
            ("INTEGRATIONS_WEBHOOK_TIMEOUT", "10"),
            ("INTEGRATIONS_WEBHOOK_CONCURRENCY", "2"),
        ],
        &[],
    )
    .await;
    let slow = Receiver::start().await;
    let fast = Receiver::start().await;
    let (_, slow_secret) = register(&app, &slow.url("/slow"), None).await;
    let (_, fast_secret) = register(&app, &fast.url("/fast"), None).await;
    slow.config(json!({ "secrets": [slow_secret], "delay_ms": 3000 }))
        .await;
    fast.config(json!({ "secrets": [fast_secret] })).await;
    for i in 0..20 {
        app.seed(&format!("u{i}"), "good", &format!("a{i}"), 3600)
            .await;
    }
    // The fast endpoint has all 20 while the slow one, 2 at a time and 3 s
    // each, is still far from done.
    fast.wait_accepted(20, Duration::from_secs(30)).await;
    let slow_done = slow.accepted().await.len();
    assert!(
        slow_done < 20,
        "the slow endpoint finished first ({slow_done})"
    );
    // The API answers meanwhile.
    assert_eq!(
        app.get("/v1/webhooks", Some(&app.keys.all)).await.status,
        200
    );
}

#[tokio::test]
async fn endpoints_are_checked_and_refused_naming_what_is_accepted() {
    // No INTEGRATIONS_WEBHOOK_ALLOW_PRIVATE: the address guard is on.
    let app = TestApp::spawn().await;
    let refused = [
        (json!({"url": "http://127.0.0.1:9/hook"}), "https"),
        (
            json!({"url": "https://127.0.0.1:9/hook"}),
            "loopback, private or link-local",
        ),
        (
            json!({"url": "https://localhost/hook"}),
            "loopback, private or link-local",
        ),
        (
            json!({"url": "https://169.254.169.254/latest/meta-data"}),
            "link-local",
        ),
        (json!({"url": "https://[::1]/hook"}), "loopback"),
        (json!({"url": "https://10.1.2.3/hook"}), "private"),
        (json!({"url": "not a url"}), "absolute URL"),
        (
            json!({"url": "https://example.com/x", "event_types": ["revoked"]}),
            "integration.revoked",
        ),
        (
            json!({"url": "https://example.com/x", "event_types": []}),
            "event_types",
        ),
        (
            json!({"url": "https://example.com/x", "secret": "mine"}),
            "secret",
        ),
        (json!({}), "url"),
    ];
    for (body, says) in refused {
        let reply = app
            .send(
                Method::POST,
                "/v1/webhooks",
                Some(&app.keys.all),
                Some(body.clone()),
            )
            .await;
        let message = reply.assert_error(400, "invalid_request");
        assert!(message.contains(says), "{body}: {message}");
    }
    let mut statuses = HashMap::new();
    for path in [
        "/v1/webhooks/nope",
        "/v1/webhooks/wh_0123456789abcdef01234567",
    ] {
        statuses.insert(path, app.get(path, Some(&app.keys.all)).await.status);
    }
    assert_eq!(statuses["/v1/webhooks/nope"], 400);
    assert_eq!(statuses["/v1/webhooks/wh_0123456789abcdef01234567"], 404);
    app.send(
        Method::POST,
        "/v1/webhooks",
        Some(&app.keys.read),
        Some(json!({"url": "https://example.com/"})),
    )
    .await
    .assert_error(403, "forbidden");
    app.assert_no_leaks();
}

#[tokio::test]
async fn idle_endpoints_are_not_claimed_for_on_every_delivery() {
    // Small slots: the dispatcher loops once per few attempts, as it does
    // under load.
    let app = TestApp::spawn_args(
        &[
            ("INTEGRATIONS_WEBHOOK_ALLOW_PRIVATE", "true"),
            ("INTEGRATIONS_WEBHOOK_CONCURRENCY", "2"),
        ],
        &[],
    )
    .await;
    let receiver = Receiver::start().await;
    let (_, secret) = register(&app, &receiver.url("/busy"), None).await;
    receiver.config(json!({ "secrets": [secret] })).await;
    // Twenty endpoints for an event this test never produces.
    for i in 0..20 {
        register(
            &app,
            &receiver.url(&format!("/idle{i}")),
            Some(&["integration.revoked"]),
        )
        .await;
    }
    let checkouts = || async {
        metric(&app, "db_pool_checkouts_total")
            .await
            .expect("db_pool_checkouts_total")
    };
    // Each event costs its write, its claim (at worst one per delivery)
    // and its outcome; the idle endpoints (and the endpoint list) are
    // looked at again only once per poll interval (1 s), since no delivery
    // is queued for them. Claiming for them on every loop, or on every
    // wake-up, costs 20 per delivery.
    let within = |used: f64, events: usize, started: std::time::Instant, phase: &str| {
        let polls = started.elapsed().as_secs_f64().ceil() + 1.0;
        let bound = 4.0 * events as f64 + 21.0 * polls;
        assert!(
            used <= bound,
            "{phase}: {used} checkouts for {events} deliveries in {polls} s (at most {bound}): idle endpoints claimed for"
        );
    };
    // A burst: the dispatcher loops on every attempt that ends.
    let (before, started) = (checkouts().await, std::time::Instant::now());
    let burst = 100;
    for i in 0..burst {
        app.seed(&format!("u{i}"), "good", &format!("a{i}"), 3600)
            .await;
    }
    receiver.wait_accepted(burst, Duration::from_secs(60)).await;
    within(checkouts().await - before, burst, started, "burst");
    // A trickle: every event's notification wakes the dispatcher, naming
    // the one endpoint that got a delivery.
    let (before, started) = (checkouts().await, std::time::Instant::now());
    let trickle = 30;
    for i in 0..trickle {
        app.seed(&format!("t{i}"), "good", &format!("t{i}"), 3600)
            .await;
        receiver
            .wait_accepted(burst + i + 1, Duration::from_secs(30))
            .await;
    }
    within(checkouts().await - before, trickle, started, "trickle");
}
