//! `integrations serve` without DATABASE_URL: an embedded PostgreSQL in
//! `--data-dir`, a development encryption key beside it, and nothing lost
//! across a restart.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::common::{
    eventually, http_client, write_registry, FakeProvider, ServerProcess, CALLBACK_URL,
};

/// Starts the server on the data directory, with no DATABASE_URL and no
/// INTEGRATIONS_ENCRYPTION_KEYS.
async fn serve(data_dir: &Path, registry: &str) -> ServerProcess {
    ServerProcess::spawn(
        &[
            ("INTEGRATIONS_PROVIDERS", registry),
            ("INTEGRATIONS_CALLBACK_URL", CALLBACK_URL),
            ("FAKE_SECRET", "fake-secret"),
        ],
        &["--data-dir", data_dir.to_str().unwrap()],
    )
    .await
}

/// The embedded server's port, from the log line announcing it.
fn embedded_port(server: &ServerProcess) -> u16 {
    let logs = server.logs();
    let line = logs
        .iter()
        .find(|l| l.contains("embedded PostgreSQL") && l.contains("port="))
        .unwrap_or_else(|| panic!("no embedded PostgreSQL line:\n{}", logs.join("\n")));
    line.split("port=")
        .nth(1)
        .unwrap()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Processes whose command line names `dir` (a postmaster runs with
/// `-D <dir>/...`).
fn processes_using(dir: &Path) -> Vec<String> {
    let needle = dir.to_str().unwrap();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) && !cmdline.contains("integrations serve") {
            found.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    found
}

/// `integrations api-key <args> --data-dir <data_dir>`, with no DATABASE_URL.
fn api_key(data_dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_integrations"))
        .current_dir(data_dir.parent().unwrap())
        .arg("api-key")
        .args(args)
        .args(["--data-dir", data_dir.to_str().unwrap()])
        .env_remove("DATABASE_URL")
        .env_remove("INTEGRATIONS_ENCRYPTION_KEYS")
        .output()
        .unwrap()
}

/// The lines logged before the "listening" line.
fn startup_lines(server: &ServerProcess) -> Vec<String> {
    server
        .logs()
        .into_iter()
        .take_while(|l| !l.contains("listening on"))
        .collect()
}

#[tokio::test]
async fn embedded_mode_keeps_integrations_and_its_key_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    // The server runs PostgreSQL as another account when this is root: the
    // directory must be traversable.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data_dir = dir.path().join("data");
    let fake = FakeProvider::start().await;
    let registry = write_registry(dir.path(), &fake);
    let http = http_client();

    let mut first = serve(&data_dir, &registry).await;
    let startup = startup_lines(&first);
    assert!(
        startup.iter().any(|l| l.contains("embedded PostgreSQL")),
        "the first lines do not say the database is embedded:\n{}",
        startup.join("\n")
    );
    assert!(
        startup
            .iter()
            .any(|l| l.contains("created an encryption key")),
        "{}",
        startup.join("\n")
    );
    let key_file = data_dir.join("encryption.key");
    let key_bytes = std::fs::read(&key_file).expect("an encryption key file in the data dir");
    assert!(!key_bytes.is_empty());

    let ready = http
        .get(format!("{}/readyz", first.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);

    // An API key through the command line, with no DATABASE_URL: the
    // embedded database the server runs.
    let out = api_key(
        &data_dir,
        &[
            "create",
            "--name",
            "embedded",
            "--scopes",
            "read,write,credentials",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("(port {})", embedded_port(&first))),
        "not the server's database: {stderr}"
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let key = stdout.lines().last().unwrap().trim().to_string();
    assert!(key.starts_with("ik_"), "{stdout}");

    let put = http
        .request(
            Method::PUT,
            format!(
                "{}/v1/users/user-1/integrations/good/acct-1",
                first.base_url
            ),
        )
        .bearer_auth(&key)
        .json(
            &json!({"access_token": "at-embedded-1", "refresh_token": "rt-embedded-1",
                      "expires_in": 3600, "metadata": {"kept": true}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200, "{}", put.text().await.unwrap());

    first.terminate();
    let exit = first.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(exit.code(), Some(0), "{exit}:\n{}", first.logs().join("\n"));
    drop(first);

    // Again, on the same directory.
    let second = serve(&data_dir, &registry).await;
    let startup = startup_lines(&second);
    assert!(
        startup
            .iter()
            .any(|l| l.contains("using the encryption key stored beside")),
        "{}",
        startup.join("\n")
    );
    assert_eq!(
        std::fs::read(&key_file).unwrap(),
        key_bytes,
        "the key file was replaced"
    );

    let list = http
        .get(format!("{}/v1/users/user-1/integrations", second.base_url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(list.status(), 200);
    let list: serde_json::Value = list.json().await.unwrap();
    assert_eq!(list["integrations"][0]["account_id"], "acct-1", "{list}");
    assert_eq!(list["integrations"][0]["metadata"], json!({"kept": true}));
    // The token decrypts with the reused key.
    let token = http
        .get(format!(
            "{}/v1/integrations/good/acct-1/token",
            second.base_url
        ))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(token.status(), 200);
    let token: serde_json::Value = token.json().await.unwrap();
    assert_eq!(token["access_token"], "at-embedded-1");

    let mut second = second;
    second.terminate();
    let exit = second.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(
        exit.code(),
        Some(0),
        "{exit}:\n{}",
        second.logs().join("\n")
    );

    // With no server running, the command starts the embedded database for
    // itself, and stops it.
    let out = api_key(&data_dir, &["list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("embedded"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // No PostgreSQL left running on the data directory.
    let left = eventually(Duration::from_secs(10), || async {
        let found = processes_using(&data_dir);
        found.is_empty().then_some(())
    })
    .await;
    assert!(
        left.is_some(),
        "still running: {:?}",
        processes_using(&data_dir)
    );
    let pid_files: Vec<_> = walk(&data_dir)
        .into_iter()
        .filter(|p| p.ends_with("postmaster.pid"))
        .collect();
    assert!(pid_files.is_empty(), "{pid_files:?}");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
