//! `GET /dashboard` in a real browser: headless Chromium driven over
//! WebDriver (chromedriver, started here on a free port; plain JSON over
//! HTTP, so no WebDriver crate). The page is asked for the admin key, shows
//! what `/v1/admin/pool` reports, turns red with the P2024 hint when the
//! pool is exhausted, and refuses a key without the admin scope.
//!
//! `DASHBOARD_SCREENSHOT=1` writes `docs/dashboard.png` (the exhausted
//! pool); `scripts/dashboard-screenshot` runs this with it set.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::{eventually, TestApp};

/// How long the page may take to show something (it polls every 2 s; the
/// machine may be busy).
const WAIT: Duration = Duration::from_secs(30);

/// `chromedriver` on a free port, in a process group of its own with the
/// browsers it starts: the whole group is killed on drop, so a failing test
/// leaves no Chromium behind.
struct Driver {
    child: Child,
    url: String,
    http: reqwest::Client,
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.wait();
    }
}

impl Driver {
    async fn start() -> Driver {
        for program in ["chromedriver", "chromium"] {
            assert!(
                Command::new("sh")
                    .args(["-c", &format!("command -v {program}")])
                    .stdout(Stdio::null())
                    .status()
                    .unwrap()
                    .success(),
                "{program} is missing: run scripts/install-deps --test"
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        let driver = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
        };
        let ready = eventually(WAIT, || async {
            let r = driver
                .http
                .get(format!("{}/status", driver.url))
                .send()
                .await
                .ok()?;
            let v: Value = r.json().await.ok()?;
            v["value"]["ready"].as_bool().unwrap_or(false).then_some(())
        })
        .await;
        assert!(ready.is_some(), "chromedriver did not become ready");
        driver
    }

    async fn session(&self) -> Session<'_> {
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1000,1700"],
            },
        }}});
        let v = self
            .call(reqwest::Method::POST, "/session", Some(caps))
            .await;
        let id = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_string();
        Session { driver: self, id }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(body) = body {
            req = req.json(&body);
        }
        let r = req.send().await.expect("WebDriver request");
        let status = r.status();
        let v: Value = r.json().await.expect("WebDriver answer");
        assert!(status.is_success(), "WebDriver {path}: {status} {v}");
        v["value"].clone()
    }
}

/// A browser session.
struct Session<'a> {
    driver: &'a Driver,
    id: String,
}

impl Session<'_> {
    async fn post(&self, path: &str, body: Value) -> Value {
        self.driver
            .call(
                reqwest::Method::POST,
                &format!("/session/{}{path}", self.id),
                Some(body),
            )
            .await
    }

    async fn goto(&self, url: &str) {
        self.post("/url", json!({ "url": url })).await;
    }

    async fn js(&self, script: &str) -> Value {
        self.post("/execute/sync", json!({ "script": script, "args": [] }))
            .await
    }

    /// Types `text` into the element `css` and presses its form's button.
    async fn submit(&self, css: &str, text: &str) {
        let el = self
            .post("/element", json!({"using": "css selector", "value": css}))
            .await;
        let el = el["element-6066-11e4-a52e-4f735466cecf"]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {el}"))
            .to_string();
        self.post(&format!("/element/{el}/clear"), json!({})).await;
        self.post(&format!("/element/{el}/value"), json!({ "text": text }))
            .await;
        self.js("document.getElementById('connect').click()").await;
    }

    /// The text of element `id` once it is shown (else `None`).
    async fn shown_text(&self, id: &str) -> Option<String> {
        let v = self
            .js(&format!(
                "const e = document.getElementById('{id}'); \
                 return e && e.offsetParent !== null ? e.textContent : null;"
            ))
            .await;
        v.as_str().map(str::to_string)
    }

    /// Waits until element `id` is shown with a text satisfying `pred`.
    async fn wait_text(&self, id: &str, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let found = eventually(WAIT, || async {
            self.shown_text(id).await.filter(|t| pred(t))
        })
        .await;
        match found {
            Some(t) => t,
            None => {
                let body = self.js("return document.body.innerText").await;
                panic!(
                    "#{id} never showed {what}; the page:\n{}",
                    body.as_str().unwrap_or("")
                )
            }
        }
    }

    async fn screenshot(&self) -> Vec<u8> {
        use base64::Engine;
        let v = self
            .driver
            .call(
                reqwest::Method::GET,
                &format!("/session/{}/screenshot", self.id),
                None,
            )
            .await;
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap()
    }

    async fn close(self) {
        let path = format!("/session/{}", self.id);
        self.driver.call(reqwest::Method::DELETE, &path, None).await;
    }
}

#[tokio::test]
async fn dashboard_shows_the_pool_turns_red_when_exhausted_and_needs_admin() {
    let app = TestApp::spawn_with_params("connection_limit=1&pool_timeout=1").await;

    // The page and its assets: no key needed, nothing inline allowed.
    // (Fetched around the recording client: the key field is
    // type="password", a word `assert_no_leaks` refuses in API answers.)
    for (path, kind) in [
        ("/dashboard", "text/html"),
        ("/dashboard/app.js", "text/javascript"),
        ("/dashboard/app.css", "text/css"),
    ] {
        let r = app.http.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let header = |name: &str| {
            r.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        assert!(header("content-type").starts_with(kind), "{path}");
        assert!(
            header("content-security-policy").starts_with("default-src 'self'"),
            "{path}: {:?}",
            r.headers()
        );
    }

    // One integration, so the overview has a provider row and an event.
    app.seed("user-a", "good", "acct-1", 3600).await;
    let report = app.get("/v1/admin/pool", Some(&app.keys.all)).await;
    assert_eq!(report.status, 200, "{}", report.text);
    let overview = &report.json()["overview"];
    assert_eq!(
        overview["integrations"][0]["provider"], "good",
        "{overview}"
    );
    assert_eq!(
        overview["latest_events"][0]["type"],
        "integration.connected"
    );
    let max = report.json()["pool"]["max"].as_u64().unwrap();
    assert_eq!(max, 1);

    let driver = Driver::start().await;
    let browser = driver.session().await;
    browser.goto(&app.url("/dashboard")).await;

    // Asked for a key; with the admin key, the pool as the API reports it.
    browser.wait_text("key", "the key field", |_| true).await;
    browser.submit("#key", &app.keys.all).await;
    browser
        .wait_text("pool-max", "the pool's max", |t| t == max.to_string())
        .await;
    browser
        .wait_text("pool-open", "open connections", |t| {
            t.parse::<u64>().is_ok()
        })
        .await;
    browser
        .wait_text("act-total", "the activity view", |t| {
            t.parse::<u64>().is_ok()
        })
        .await;
    browser
        .wait_text("cache-entries", "the status cache", |t| {
            t.parse::<u64>().is_ok()
        })
        .await;
    // The overview: integrations by provider and status, the next expiry,
    // the latest events; and from /metrics, the checkout wait and the
    // change listener.
    browser
        .wait_text("integrations", "the integrations by status", |t| {
            t.contains("good") && t.contains('1')
        })
        .await;
    browser
        .wait_text("events", "the latest events", |t| {
            t.contains("integration.connected") && t.contains("acct-1")
        })
        .await;
    browser
        .wait_text("next-expiry", "the next expiry", |t| t.starts_with("20"))
        .await;
    browser
        .wait_text("wait-p99", "the checkout wait", |t| {
            t.parse::<f64>().is_ok()
        })
        .await;
    browser
        .wait_text("listener", "the change listener", |t| t == "connected")
        .await;
    browser
        .wait_text("act-longest-transaction", "the longest transaction", |t| {
            t == "none" || t.parse::<f64>().is_ok()
        })
        .await;
    let url = browser.js("return location.href").await;
    assert!(!url.as_str().unwrap().contains(&app.keys.all), "{url}");
    assert_eq!(
        browser
            .js("return document.getElementById('alerts').children.length")
            .await,
        json!(0)
    );

    // Exhausted: another session locks the table, a status load holds the
    // pool's only connection waiting for it, and the page's next report
    // gets no connection (P2024).
    let db = app.db.as_ref().unwrap();
    let locker = db.connect().await;
    locker
        .batch_execute("BEGIN; LOCK TABLE integrations IN ACCESS EXCLUSIVE MODE;")
        .await
        .unwrap();
    let held = {
        let http = app.http.clone();
        let url = app.url("/v1/users/user-a/integrations");
        let key = app.keys.read.clone();
        tokio::spawn(async move {
            http.get(url)
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    let warning = browser
        .wait_text("alert-pool-exhausted", "the exhaustion warning", |t| {
            t.contains("pool exhausted") && t.contains("connection_limit")
        })
        .await;
    assert!(warning.contains("connection leaks"), "{warning}");
    let colour = browser
        .js("return getComputedStyle(document.getElementById('alert-pool-exhausted')).backgroundColor")
        .await;
    assert_eq!(colour, json!("rgb(176, 0, 32)"), "not red");
    if std::env::var_os("DASHBOARD_SCREENSHOT").is_some_and(|v| v == "1") {
        let png = browser.screenshot().await;
        assert!(png.starts_with(b"\x89PNG"));
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/dashboard.png");
        std::fs::create_dir_all(std::path::Path::new(path).parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }

    // Released: the held request completes and the page recovers.
    locker.batch_execute("ROLLBACK").await.unwrap();
    let status = tokio::time::timeout(WAIT, held).await.unwrap().unwrap();
    assert_eq!(status, 200);
    // The exhaustion warning goes; the P2024 count it left stays, in red.
    let cleared = eventually(WAIT, || async {
        let v = browser
            .js(
                "return [document.getElementById('alert-pool-exhausted') === null, \
                 document.getElementById('pool-p2024').textContent, \
                 document.getElementById('pool-p2024').classList.contains('bad'), \
                 document.getElementById('alert-p2024') !== null]",
            )
            .await;
        let count = v[1]
            .as_str()
            .and_then(|t| t.parse::<u64>().ok())
            .unwrap_or(0);
        (v[0] == json!(true) && count >= 1 && v[2] == json!(true) && v[3] == json!(true))
            .then_some(())
    })
    .await;
    assert!(
        cleared.is_some(),
        "after the pool recovered, expected no exhaustion warning and the P2024 count in red:\n{}",
        browser.js("return document.body.innerText").await
    );

    // The read-only key: refused, and asked again; an unknown key too.
    browser
        .js("document.getElementById('forget').click()")
        .await;
    browser.submit("#key", &app.keys.read).await;
    browser
        .wait_text("login-error", "the admin-scope refusal", |t| {
            t.contains("lacks the admin scope")
        })
        .await;
    assert_eq!(
        browser
            .js("return sessionStorage.getItem('integrations.adminKey')")
            .await,
        Value::Null
    );
    browser.submit("#key", "imk_not_a_real_key").await;
    browser
        .wait_text("login-error", "the invalid-key message", |t| {
            t.contains("invalid API key")
        })
        .await;
    browser.close().await;
    app.assert_no_leaks();
}
