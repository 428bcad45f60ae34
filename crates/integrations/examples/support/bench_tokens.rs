//! The benchmarks' refreshable integrations, shared by `service_bench` and
//! `webhook_bench`: `tokens` rows of the `bench` provider, encrypted like
//! the service does, expiring in a minute.

use db_pool::Transaction;
use integrations::crypto::Keyring;

/// Inserts `tok0..tok{tokens}` in `tx`.
pub async fn insert(tx: &mut Transaction<'_>, ring: &Keyring, tokens: usize) {
    for i in 0..tokens {
        let account = format!("tok{i}");
        let access = ring
            .encrypt(b"at", &format!("integration:bench:{account}:access"))
            .unwrap();
        let refresh = ring
            .encrypt(
                format!("rt{i}").as_bytes(),
                &format!("integration:bench:{account}:refresh"),
            )
            .unwrap();
        tx.execute(
            "INSERT INTO integrations (user_id, provider, account_id, access_token, refresh_token, key_id, expires_at) \
             VALUES ($1, 'bench', $2, $3, $4, 'bench', now() + interval '1 minute')",
            &[&format!("batch{}", i % 1000), &account, &access, &refresh],
        )
        .await
        .unwrap();
    }
}
