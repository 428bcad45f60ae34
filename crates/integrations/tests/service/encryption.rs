//! Tokens written by the previous release (AES-256-GCM, format v1) stay
//! readable, and `rotate-keys` moves them to the current format
//! (XChaCha20-Poly1305, v2) even under the same key.

use integrations::crypto::{Keyring, FORMAT_MARKER};
use integrations::oauth::{ProviderRegistry, TokenClient, TokenClientConfig};
use integrations::service::{IntegrationsService, ServiceConfig};

use crate::common::{account_id, provider_name, secret_text, TestService, PROVIDERS};

/// The key 0x42 * 32, and two values the previous release encrypted with it
/// for provider "good", account "acct-legacy".
const LEGACY_SPEC: &str = "legacy:QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=";
const LEGACY_ACCESS: &str = "7d08ce7bd9a4f474ed44f5a3c0ea1ae45df3d38c527177ed68371679417f4f15ef463553490e51861f5d8c4324d2dc";
const LEGACY_REFRESH: &str = "625761bf872cd6b16a9a67cd0a8a78b39d70cb87cceaa01a0a01427e6809b09d65f39ae4ac0d610f3cb4e02f299d2772";

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[tokio::test]
async fn old_format_tokens_are_read_and_rotate_keys_rewrites_them_in_the_new_format() {
    let t = TestService::start().await;
    let env = |name: &str| (name == "FAKE_SECRET").then(|| "fake-secret".to_string());
    let service = IntegrationsService::new(
        t.service.pool().clone(),
        Keyring::parse(LEGACY_SPEC).unwrap(),
        ProviderRegistry::from_toml(&t.fake.registry_toml(PROVIDERS), "test", &env).unwrap(),
        TokenClient::new(&TokenClientConfig::default()).unwrap(),
        ServiceConfig::default(),
    );
    let client = t.db.connect().await;
    client
        .execute(
            "INSERT INTO integrations (user_id, provider, account_id, access_token, refresh_token, key_id, expires_at) \
             VALUES ('u-legacy', 'good', 'acct-legacy', $1, $2, 'legacy', now() + interval '1 hour')",
            &[&unhex(LEGACY_ACCESS), &unhex(LEGACY_REFRESH)],
        )
        .await
        .unwrap();
    t.fake.accept_refresh("legacy-refresh-token");
    let (p, a) = (provider_name("good"), account_id("acct-legacy"));
    let tok = service.access_token(&p, &a).await.unwrap();
    assert_eq!(secret_text(&tok.token), "legacy-access-token");

    // Same key id, old format: rotate-keys rewrites the row, once.
    let report = service.rotate_keys(10).await.unwrap();
    assert_eq!(report.reencrypted, 1, "{report:?}");
    assert_eq!(service.rotate_keys(10).await.unwrap().reencrypted, 0);
    let row = client
        .query_one(
            "SELECT access_token, refresh_token, key_id FROM integrations WHERE account_id = 'acct-legacy'",
            &[],
        )
        .await
        .unwrap();
    let (access, refresh): (Vec<u8>, Vec<u8>) = (row.get(0), row.get(1));
    assert!(access.starts_with(FORMAT_MARKER) && refresh.starts_with(FORMAT_MARKER));
    assert_eq!(row.get::<_, String>(2), "legacy");

    // Still the same tokens.
    let tok = service.access_token(&p, &a).await.unwrap();
    assert_eq!(secret_text(&tok.token), "legacy-access-token");
    service.refresh(&p, &a).await.unwrap();
    let seen = t.fake.seen_refresh_tokens.lock().unwrap().clone();
    assert_eq!(seen, ["legacy-refresh-token"]);
}

#[tokio::test]
async fn new_tokens_are_written_in_the_current_format() {
    let t = TestService::start().await;
    t.seed("u1", "good", "a1", 3600).await;
    let row =
        t.db.connect()
            .await
            .query_one("SELECT access_token, refresh_token FROM integrations", &[])
            .await
            .unwrap();
    let (access, refresh): (Vec<u8>, Vec<u8>) = (row.get(0), row.get(1));
    assert!(access.starts_with(FORMAT_MARKER) && refresh.starts_with(FORMAT_MARKER));
    // 4-byte marker, 24-byte nonce, the token, a 16-byte tag.
    assert_eq!(access.len(), 4 + 24 + "at-seed-a1".len() + 16);
    assert_eq!(t.service.rotate_keys(10).await.unwrap().reencrypted, 0);
}
