//! The real `integrations serve` process on a random port, a fake OAuth
//! provider on 127.0.0.1, and an HTTP client that records every answer.
//!
//! The server's log lines (standard error) are kept for assertions; set
//! `TEST_LOG=1` to see them as they arrive.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
pub use db_pool::testing::with_params;
use db_pool::testing::TestDatabase;
use db_pool::{Pool, PoolConfig};
use integrations::crypto::Keyring;
use integrations::service::api_keys::{ApiKeys, Scope};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use reqwest::header::HeaderMap;
use reqwest::Method;
use secrecy::ExposeSecret;
use serde_json::{json, Value};

/// How long a server may take to log its address (an embedded PostgreSQL
/// runs `initdb` first; the machine may be busy).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a single HTTP request may take in these tests.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The providers in the registry file every server gets.
pub const PROVIDERS: &[&str] = &["good", "bad", "slow"];

/// The OAuth callback URL servers are configured with (only compared, never
/// fetched: the test plays the browser).
pub const CALLBACK_URL: &str = "http://127.0.0.1:9/v1/oauth/callback";

/// The application origins servers send users back to.
pub const REDIRECT_ORIGINS: &str = "https://app.example";

// ---------------------------------------------------------------------------
// The fake OAuth provider.

#[path = "../support/fake_provider.rs"]
mod fake_provider;
pub use fake_provider::{FakeProvider, Mode};

// ---------------------------------------------------------------------------
// The server process.

/// `integrations serve --listen 127.0.0.1:0` as a child process: its address
/// (from its log), its log lines, and SIGTERM. Dropping it stops it
/// (SIGTERM, then SIGKILL after 15 s).
pub struct ServerProcess {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub base_url: String,
    /// The port it listens on.
    pub port: u16,
    logs: Arc<Mutex<Vec<String>>>,
    _cwd: tempfile::TempDir,
}

/// Among a test server's arguments: run the background refresher (left
/// out by default: tests then decide when refreshes happen). Not passed on.
pub const RUN_REFRESHER: &str = "(run the refresher)";

impl ServerProcess {
    /// Starts `integrations serve --listen 127.0.0.1:0 --no-refresher
    /// <args>` (without `--no-refresher` when `args` has [`RUN_REFRESHER`]) with only the given service variables set (none inherited),
    /// and waits until it logs its address.
    ///
    /// # Panics
    ///
    /// When it exits or stays silent for [`STARTUP_TIMEOUT`]; the panic shows
    /// its log.
    pub async fn spawn(envs: &[(&str, &str)], args: &[&str]) -> ServerProcess {
        ServerProcess::spawn_wrapped(&[], envs, args).await
    }

    /// [`ServerProcess::spawn`] through a program that runs it (`wrapper`:
    /// the program and its arguments, e.g. `prlimit --nofile=128 --`); the
    /// wrapper must exec the server, so its process id is the server's.
    pub async fn spawn_wrapped(
        wrapper: &[&str],
        envs: &[(&str, &str)],
        args: &[&str],
    ) -> ServerProcess {
        // A fresh working directory: no `.env` is picked up.
        let cwd = tempfile::tempdir().unwrap();
        let binary = env!("CARGO_BIN_EXE_integrations");
        let mut cmd = match wrapper.split_first() {
            None => Command::new(binary),
            Some((program, wrapper_args)) => {
                let mut cmd = Command::new(program);
                cmd.args(wrapper_args).arg(binary);
                cmd
            }
        };
        cmd.current_dir(cwd.path())
            .args(["serve", "--listen", "127.0.0.1:0"]);
        if !args.contains(&RUN_REFRESHER) {
            cmd.arg("--no-refresher");
        }
        cmd.args(args.iter().filter(|a| **a != RUN_REFRESHER))
            .env("RUST_LOG", "info,tokio_postgres=warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (name, _) in std::env::vars() {
            if name.starts_with("INTEGRATIONS_")
                || name.starts_with("DATABASE_")
                || name == "TEST_DATABASE_URL"
            {
                cmd.env_remove(name);
            }
        }
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("starting the integrations binary");
        let logs = Arc::new(Mutex::new(Vec::new()));
        drain(child.stderr.take().unwrap(), logs.clone());
        drain(child.stdout.take().unwrap(), logs.clone());
        let mut server = ServerProcess {
            child,
            base_url: String::new(),
            port: 0,
            logs,
            _cwd: cwd,
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(addr) = server
                .logs()
                .iter()
                .find_map(|l| l.split("listening on http://").nth(1))
                .and_then(|rest| rest.split_whitespace().next())
                .map(str::to_string)
            {
                let addr: std::net::SocketAddr = addr.parse().unwrap();
                server.port = addr.port();
                server.base_url = format!("http://{addr}");
                return server;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                // Let the readers catch up with the last lines.
                tokio::time::sleep(Duration::from_millis(200)).await;
                panic!(
                    "integrations serve exited with {status} before listening:\n{}",
                    server.logs().join("\n")
                );
            }
            assert!(
                Instant::now() < deadline,
                "integrations serve did not log its address within {STARTUP_TIMEOUT:?}:\n{}",
                server.logs().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Its log lines so far (ANSI colours removed).
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Waits until a log line satisfies `pred`; returns it.
    pub async fn wait_for_log(
        &self,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.logs().into_iter().find(|l| pred(l)) {
                return Some(line);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The process id.
    pub fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).unwrap())
    }

    /// Whether the process has exited.
    pub fn has_exited(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        kill(self.pid(), Signal::SIGTERM).unwrap();
    }

    /// Waits for the process to exit.
    ///
    /// # Panics
    ///
    /// When it is still running after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the server did not exit within {timeout:?}:\n{}",
                self.logs().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SIGTERM first, so an embedded PostgreSQL is stopped cleanly.
        let _ = kill(self.pid(), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads a child's output line by line into `logs` on a thread.
fn drain(output: impl Read + Send + 'static, logs: Arc<Mutex<Vec<String>>>) {
    let echo = std::env::var_os("TEST_LOG").is_some();
    std::thread::spawn(move || {
        for line in BufReader::new(output).lines() {
            let Ok(line) = line else { break };
            let line = strip_ansi(&line);
            if echo {
                eprintln!("[server] {line}");
            }
            logs.lock().unwrap().push(line);
        }
    });
}

/// Removes ANSI escape sequences (colours, italics).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------------------
// HTTP answers.

/// One HTTP answer, read completely.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub text: String,
}

impl Reply {
    /// The body as JSON.
    ///
    /// # Panics
    ///
    /// When it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| {
            panic!(
                "{} answered a body that is not JSON ({e}): {:?}",
                self.status, self.text
            )
        })
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    }

    /// Checks the error shape `{"error": {"code", "message", "hint"?}}`
    /// with this status and code, and a JSON content type; returns the
    /// message.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str) -> String {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text);
        assert!(
            self.header("content-type")
                .is_some_and(|c| c.starts_with("application/json")),
            "error answered with content type {:?}: {}",
            self.header("content-type"),
            self.text
        );
        let body = self.json();
        let object = body.as_object().expect("the body is an object");
        assert_eq!(object.keys().collect::<Vec<_>>(), ["error"], "{body}");
        let error = body["error"].as_object().expect("error is an object");
        assert!(
            error
                .keys()
                .all(|k| ["code", "message", "hint"].contains(&k.as_str())),
            "{body}"
        );
        assert_eq!(error["code"], code, "{body}");
        let message = error["message"].as_str().expect("message is a string");
        assert!(!message.is_empty());
        message.to_string()
    }
}

// ---------------------------------------------------------------------------
// The application under test.

/// Keys for the API, created through the library.
pub struct TestKeys {
    /// read, write, credentials and admin.
    pub all: String,
    /// read only.
    pub read: String,
}

/// A server on a fresh database with the fake provider's registry, two API
/// keys, and a client that records every answer.
pub struct TestApp {
    /// Declared first: stopped before the database is dropped.
    pub server: ServerProcess,
    pub http: reqwest::Client,
    pub fake: FakeProvider,
    pub keys: TestKeys,
    /// The encryption key spec given to the server.
    pub encryption_keys: String,
    /// Every answer: (method, path, reply).
    seen: Mutex<Vec<(Method, String, Reply)>>,
    /// Tokens sent in PUT bodies.
    sent_tokens: Mutex<Vec<String>>,
    pub db: Option<TestDatabase>,
    _dir: tempfile::TempDir,
}

/// A client that does not follow redirects and ignores proxy variables.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .unwrap()
}

/// Writes the fake provider's registry into `dir`; returns the file's path.
pub fn write_registry(dir: &Path, fake: &FakeProvider) -> String {
    let path = dir.join("providers.toml");
    std::fs::write(&path, fake.registry_toml(PROVIDERS)).unwrap();
    path.to_str().unwrap().to_string()
}

impl TestApp {
    /// A server on a fresh database (`connection_limit=5`).
    pub async fn spawn() -> TestApp {
        TestApp::spawn_with_params("connection_limit=5").await
    }

    /// A server on a fresh database with these pool parameters in its
    /// DATABASE_URL.
    pub async fn spawn_with_params(params: &str) -> TestApp {
        let db = TestDatabase::create().await;
        let url = with_params(&db.url, params);
        TestApp::spawn_on(&url, Some(db), &[]).await
    }

    /// A server on `database_url` (`db`: kept alive as long as the app).
    pub async fn spawn_on(database_url: &str, db: Option<TestDatabase>, args: &[&str]) -> TestApp {
        TestApp::spawn_full(database_url, db, args, &[], &[]).await
    }

    /// A server on a fresh database (`connection_limit=5`) with these
    /// extra variables and arguments.
    pub async fn spawn_args(envs: &[(&str, &str)], args: &[&str]) -> TestApp {
        let db = TestDatabase::create().await;
        let url = with_params(&db.url, "connection_limit=5");
        TestApp::spawn_full(&url, Some(db), args, envs, &[]).await
    }

    /// A server on a fresh database (`connection_limit=5`) with these
    /// extra variables, started through `wrapper` (see
    /// [`ServerProcess::spawn_wrapped`]; empty: none).
    pub async fn spawn_with(envs: &[(&str, &str)], wrapper: &[&str]) -> TestApp {
        let db = TestDatabase::create().await;
        let url = with_params(&db.url, "connection_limit=5");
        TestApp::spawn_full(&url, Some(db), &[], envs, wrapper).await
    }

    async fn spawn_full(
        database_url: &str,
        db: Option<TestDatabase>,
        args: &[&str],
        extra_envs: &[(&str, &str)],
        wrapper: &[&str],
    ) -> TestApp {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeProvider::start().await;
        let registry = write_registry(dir.path(), &fake);
        let encryption_keys = Keyring::generate_spec("k1");
        let mut envs = vec![
            ("DATABASE_URL", database_url),
            ("INTEGRATIONS_ENCRYPTION_KEYS", encryption_keys.as_str()),
            ("INTEGRATIONS_PROVIDERS", registry.as_str()),
            ("INTEGRATIONS_CALLBACK_URL", CALLBACK_URL),
            ("INTEGRATIONS_REDIRECT_ORIGINS", REDIRECT_ORIGINS),
            ("FAKE_SECRET", "fake-secret"),
        ];
        envs.extend_from_slice(extra_envs);
        let server = ServerProcess::spawn_wrapped(wrapper, &envs, args).await;
        // The server applied the migrations; the keys table exists.
        let keys = TestKeys {
            all: create_key(database_url, "all", &Scope::ALL).await,
            read: create_key(database_url, "reader", &[Scope::Read]).await,
        };
        TestApp {
            server,
            http: http_client(),
            fake,
            keys,
            encryption_keys,
            seen: Mutex::default(),
            sent_tokens: Mutex::default(),
            db,
            _dir: dir,
        }
    }

    /// A second instance beside this one: `database_url` (the same
    /// database, perhaps through PgBouncer or with other parameters), the
    /// same encryption and API keys and the same provider registry, with
    /// `envs` added and `args` given to `serve`.
    pub async fn spawn_beside(
        &self,
        database_url: &str,
        envs: &[(&str, &str)],
        args: &[&str],
    ) -> TestApp {
        let dir = tempfile::tempdir().unwrap();
        let registry = write_registry(dir.path(), &self.fake);
        let mut all_envs = vec![
            ("DATABASE_URL", database_url),
            (
                "INTEGRATIONS_ENCRYPTION_KEYS",
                self.encryption_keys.as_str(),
            ),
            ("INTEGRATIONS_PROVIDERS", registry.as_str()),
            ("INTEGRATIONS_CALLBACK_URL", CALLBACK_URL),
            ("INTEGRATIONS_REDIRECT_ORIGINS", REDIRECT_ORIGINS),
            ("FAKE_SECRET", "fake-secret"),
        ];
        all_envs.extend_from_slice(envs);
        let server = ServerProcess::spawn(&all_envs, args).await;
        TestApp {
            server,
            http: http_client(),
            // Its own, unused: the registry points at `self`'s.
            fake: FakeProvider::start().await,
            keys: TestKeys {
                all: self.keys.all.clone(),
                read: self.keys.read.clone(),
            },
            encryption_keys: self.encryption_keys.clone(),
            seen: Mutex::default(),
            sent_tokens: Mutex::default(),
            db: None,
            _dir: dir,
        }
    }

    /// The URL of a path on the server.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.base_url)
    }

    /// Sends a request with an optional API key and JSON body.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> Reply {
        let body = body.map(|b| ("application/json", b.to_string().into_bytes()));
        self.send_raw(method, path, key, body, &[]).await
    }

    /// Sends a request with an optional key, a raw body with its content
    /// type, and extra headers; records the answer.
    pub async fn send_raw(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<(&str, Vec<u8>)>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut req = self.http.request(method.clone(), self.url(path));
        if let Some(key) = key {
            req = req.header("authorization", format!("Bearer {key}"));
        }
        if let Some((content_type, bytes)) = body {
            req = req.header("content-type", content_type).body(bytes);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let response = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let reply = Reply {
            status: response.status(),
            headers: response.headers().clone(),
            text: response.text().await.unwrap(),
        };
        self.seen
            .lock()
            .unwrap()
            .push((method, path.to_string(), reply.clone()));
        reply
    }

    pub async fn get(&self, path: &str, key: Option<&str>) -> Reply {
        self.send(Method::GET, path, key, None).await
    }

    /// `PUT /v1/users/{user}/integrations/{provider}/{account}` with the
    /// all-scopes key; remembers the tokens in `body`; expects 200.
    pub async fn put_integration(
        &self,
        user: &str,
        provider: &str,
        account: &str,
        body: Value,
    ) -> Value {
        {
            let mut sent = self.sent_tokens.lock().unwrap();
            for field in ["access_token", "refresh_token"] {
                if let Some(t) = body[field].as_str() {
                    sent.push(t.to_string());
                }
            }
        }
        let path = format!("/v1/users/{user}/integrations/{provider}/{account}");
        let reply = self
            .send(Method::PUT, &path, Some(&self.keys.all), Some(body))
            .await;
        assert_eq!(reply.status, 200, "PUT {path}: {}", reply.text);
        reply.json()
    }

    /// Stores an integration whose refresh token the fake provider accepts
    /// and whose access token expires in `expires_in` seconds.
    pub async fn seed(&self, user: &str, provider: &str, account: &str, expires_in: i64) -> Value {
        let refresh = format!("rt-seed-{provider}-{account}");
        self.fake.accept_refresh(&refresh);
        self.put_integration(
            user,
            provider,
            account,
            json!({"access_token": format!("at-seed-{provider}-{account}"), "refresh_token": refresh,
                   "expires_in": expires_in, "scope": "read", "token_type": "Bearer"}),
        )
        .await
    }

    /// Every answer so far: no body carries a token (except an access token
    /// in a `GET .../token` answer), an API or encryption key, SQL, a
    /// database URL or a panic.
    #[track_caller]
    pub fn assert_no_leaks(&self) {
        let mut access = self.sent_tokens.lock().unwrap().clone();
        access.extend(self.fake.issued_tokens());
        let always = [
            self.keys.all.clone(),
            self.keys.read.clone(),
            self.encryption_keys.split(':').nth(1).unwrap().to_string(),
            // The provider's client secret.
            "fake-secret".to_string(),
        ];
        let forbidden_text = [
            "panicked",
            "SELECT ",
            "INSERT INTO",
            "UPDATE ",
            "DELETE FROM",
            "postgresql://",
            "password",
        ];
        for (method, path, reply) in self.seen.lock().unwrap().iter() {
            let token_answer =
                *method == Method::GET && path.ends_with("/token") && reply.status == 200;
            for secret in &always {
                assert!(
                    !reply.text.contains(secret.as_str()),
                    "{method} {path} leaks a key: {}",
                    reply.text
                );
            }
            for token in &access {
                if token.starts_with("at-") && token_answer {
                    continue;
                }
                assert!(
                    !reply.text.contains(token.as_str()),
                    "{method} {path} leaks token {token}: {}",
                    reply.text
                );
            }
            for text in forbidden_text {
                assert!(
                    !reply.text.contains(text),
                    "{method} {path} answered {text:?}: {}",
                    reply.text
                );
            }
            for (name, value) in &reply.headers {
                for secret in always.iter().chain(&access) {
                    assert!(
                        !String::from_utf8_lossy(value.as_bytes()).contains(secret.as_str()),
                        "{method} {path}: header {name} leaks a secret"
                    );
                }
            }
        }
        // Nor does any line the server logged, access tokens included.
        for line in self.server.logs() {
            for secret in always.iter().chain(&access) {
                assert!(
                    !line.contains(secret.as_str()),
                    "the server logged a secret: {line}"
                );
            }
        }
    }
}

/// Creates an API key through the library against `database_url`.
pub async fn create_key(database_url: &str, name: &str, scopes: &[Scope]) -> String {
    let base = database_url.split('?').next().unwrap();
    let cfg = PoolConfig::parse(&with_params(base, "connection_limit=1")).unwrap();
    let pool = Pool::new(cfg).unwrap();
    let keys = ApiKeys::new(pool.clone(), Duration::from_secs(30));
    let (key, _info) = keys.create(name, scopes).await.unwrap();
    pool.close(Duration::from_secs(5)).await;
    key.expose_secret().to_string()
}

/// Polls `check` every 50 ms until it returns `Some`, for at most `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of a sample line in `/metrics` (the first that starts with
/// `prefix`).
pub async fn metric(app: &TestApp, prefix: &str) -> Option<f64> {
    let text = app.get("/metrics", None).await.text;
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
