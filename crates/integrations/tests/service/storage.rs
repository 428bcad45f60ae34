//! What is in the table: ciphertext only; indexed lookups; key rotation.

use db_pool::types::Type;
use integrations::crypto::Keyring;
use integrations::domain::Status;
use integrations::oauth::{ProviderRegistry, TokenClient, TokenClientConfig};
use integrations::service::{IntegrationsService, ServiceConfig};

use crate::common::{account_id, provider_name, secret_text, user_id, TestService, PROVIDERS};

#[tokio::test]
async fn the_table_holds_no_clear_text_token() {
    let t = TestService::start().await;
    let refresh = t.seed("u1", "good", "secret-acct", 3600).await;
    let client = t.db.connect().await;
    let rows = client
        .query(
            "SELECT encode(access_token, 'escape') LIKE '%at-seed%', \
                    position(convert_to($1, 'UTF8') in refresh_token) > 0, \
                    position('at-seed'::bytea in access_token) > 0, key_id \
             FROM integrations",
            &[&refresh],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert!(!rows[0].get::<_, bool>(0) && !rows[0].get::<_, bool>(1) && !rows[0].get::<_, bool>(2));
    assert_eq!(rows[0].get::<_, String>(3), "k1");
    // A dump of the whole table, as text, has no token in it.
    let dump: String = client
        .query_one("SELECT string_agg(i::text, ' ') FROM integrations i", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        !dump.contains("at-seed") && !dump.contains(&refresh),
        "{dump}"
    );

    // Tokens the provider issues on refresh are stored encrypted too.
    t.service
        .refresh(&provider_name("good"), &account_id("secret-acct"))
        .await
        .unwrap();
    let issued = t.fake.issued_tokens();
    assert_eq!(issued.len(), 2, "a new access and refresh token");
    let dump: String = client
        .query_one("SELECT string_agg(i::text, ' ') FROM integrations i", &[])
        .await
        .unwrap()
        .get(0);
    for token in issued {
        assert!(!dump.contains(&token), "{token} in clear in {dump}");
    }
}

/// EXPLAIN of one of the product's statements, with sample values for its
/// parameters (by the types the server inferred), under a plan cache mode
/// ("force_custom_plan" for the first executions of a prepared statement,
/// "force_generic_plan" for what the server may switch to later).
async fn explain(client: &db_pool::tokio_postgres::Client, sql: &str, mode: &str) -> String {
    use db_pool::types::ToSql;
    client
        .batch_execute(&format!("SET plan_cache_mode = {mode}"))
        .await
        .unwrap();
    let stmt = client.prepare(&format!("EXPLAIN {sql}")).await.unwrap();
    let params: Vec<Box<dyn ToSql + Sync>> = stmt
        .params()
        .iter()
        .map(|t| -> Box<dyn ToSql + Sync> {
            match *t {
                Type::TEXT => Box::new("user42".to_string()),
                Type::TEXT_ARRAY => Box::new(vec!["user42".to_string(), "user7".to_string()]),
                Type::FLOAT8 => Box::new(300.0f64),
                Type::INT8 => Box::new(100i64),
                Type::BYTEA => Box::new(vec![0u8; 4]),
                ref other => panic!("no sample value for {other} in {sql}"),
            }
        })
        .collect();
    let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|b| b.as_ref()).collect();
    let rows = client.query(&stmt, &refs).await.unwrap();
    rows.iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The product's own hot statements (not copies) use their indexes, under
/// custom and generic plans alike.
#[tokio::test]
async fn hot_queries_use_their_indexes() {
    use integrations::store::integrations as sql;
    let t = TestService::start().await;
    let client = t.db.connect().await;
    // Enough rows that a sequential scan would not be chosen on merit;
    // about 1 in 50 is due (expires within the 300 s margin).
    client
        .batch_execute(
            "INSERT INTO integrations (user_id, provider, account_id, access_token, refresh_token, key_id, expires_at) \
             SELECT 'user' || i, 'good', 'acct' || i, '\\x00', '\\x00', 'k1', now() + (i * 15 || ' seconds')::interval \
             FROM generate_series(1, 20000) i; ANALYZE integrations",
        )
        .await
        .unwrap();
    for mode in ["force_custom_plan", "force_generic_plan"] {
        let plan = |sql: &'static str| explain(&client, sql, mode);
        // The status read: `user_id = ANY($1)`, in (user, provider,
        // account) order from the index.
        let status = plan(sql::LIST_FOR_USERS).await;
        assert!(
            status.contains("integrations_user_provider_account") && !status.contains("Seq Scan"),
            "{mode}: {status}"
        );
        // Lookups by (provider, account): the unique key.
        for (name, stmt) in [
            ("TOKEN_ROW", sql::TOKEN_ROW),
            ("GET_STATUS", sql::GET_STATUS),
            ("OWNER", sql::OWNER),
            ("STORED_REFRESH", sql::STORED_REFRESH),
            ("CLAIM", sql::CLAIM),
            ("DELETE", sql::DELETE),
        ] {
            let p = plan(stmt).await;
            assert!(
                p.contains("integrations_provider_account_key") && !p.contains("Seq Scan"),
                "{mode} {name}: {p}"
            );
        }
        let many = plan(sql::CLAIM_MANY).await;
        assert!(
            many.contains("integrations_provider_account_key")
                && !many.contains("Seq Scan on integrations"),
            "{mode} CLAIM_MANY: {many}"
        );
        // The refresher's claim: the partial due index, `provider = ANY`,
        // the lease condition and SKIP LOCKED (a LockRows step).
        let due = plan(sql::CLAIM_DUE).await;
        assert!(
            due.contains("integrations_refresh_due")
                && due.contains("LockRows")
                && !due.contains("Seq Scan on integrations"),
            "{mode} CLAIM_DUE: {due}"
        );
        // rotate-keys pages by id: the primary key, no sort of the table.
        let rotate = plan(sql::TO_REENCRYPT).await;
        assert!(
            rotate.contains("integrations_pkey") && !rotate.contains("Sort"),
            "{mode} TO_REENCRYPT: {rotate}"
        );
        // The rewrite of one row: by id (or by the rare old key_id, when
        // the planner expects it to match fewer rows), never a scan.
        let reencrypt = plan(sql::REENCRYPT).await;
        assert!(
            (reencrypt.contains("integrations_pkey") || reencrypt.contains("integrations_key_id"))
                && !reencrypt.contains("Seq Scan"),
            "{mode} REENCRYPT: {reencrypt}"
        );
    }
}

/// The events statements (`GET /v1/events` with and without a type, the
/// retention purge) use their indexes, under custom and generic plans.
#[tokio::test]
async fn event_queries_use_their_indexes() {
    use integrations::store::events as sql;
    let t = TestService::start().await;
    let client = t.db.connect().await;
    // Enough events, of several transactions and types (the one filtered
    // on rare, as revocations are), that a sequential scan would not be
    // chosen on merit; their transactions spread below
    // the current one, as real events' are (all ended, so all pollable).
    client
        .batch_execute(
            "INSERT INTO events (txid, type, created_at, integration_id, user_id, provider, account_id, status, refresh_failures) \
             SELECT (3 + i * (cur - 4) / 20000)::text::xid8, \
                    CASE WHEN i % 100 = 0 THEN 'integration.revoked' \
                         ELSE (ARRAY['integration.connected', 'integration.refresh_failed'])[1 + i % 2] END, \
                    now() - (i || ' seconds')::interval, i, 'user' || i, 'good', 'acct' || i, 'connected', 0 \
             FROM generate_series(1, 20000) i, \
                  (SELECT pg_current_xact_id()::text::bigint AS cur) c; ANALYZE events",
        )
        .await
        .unwrap();
    for mode in ["force_custom_plan", "force_generic_plan"] {
        client
            .batch_execute(&format!("SET plan_cache_mode = {mode}"))
            .await
            .unwrap();
        let explain = |sql: &'static str, typed: bool| {
            let client = &client;
            async move {
                let stmt = client.prepare(&format!("EXPLAIN {sql}")).await.unwrap();
                let (txid, id, limit) = ("3".to_string(), 7i64, 100i64);
                let kind = "integration.revoked".to_string();
                let rows = if typed {
                    client.query(&stmt, &[&txid, &id, &limit, &kind]).await
                } else {
                    client.query(&stmt, &[&txid, &id, &limit]).await
                }
                .unwrap();
                rows.iter()
                    .map(|r| r.get::<_, String>(0))
                    .collect::<Vec<_>>()
                    .join("\n")
            }
        };
        let page = explain(sql::PAGE, false).await;
        assert!(
            page.contains("events_cursor") && !page.contains("Seq Scan"),
            "{mode} PAGE: {page}"
        );
        let typed = explain(sql::PAGE_OF_TYPE, true).await;
        assert!(
            typed.contains("events_type_cursor") && !typed.contains("Seq Scan"),
            "{mode} PAGE_OF_TYPE: {typed}"
        );
        let stmt = client
            .prepare(&format!("EXPLAIN {}", sql::PURGE))
            .await
            .unwrap();
        let purge: Vec<String> = client
            .query(&stmt, &[&604800.0f64, &1000i64])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let purge = purge.join("\n");
        assert!(
            purge.contains("events_created_at") && !purge.contains("Seq Scan"),
            "{mode} PURGE: {purge}"
        );
    }
}

/// The webhook claim reads an endpoint's due deliveries in order from its
/// partial index (no sort of the backlog) and checks each one's order by
/// the other (one integration's earlier deliveries looked up, not
/// filtered out of the endpoint's), under custom and generic plans, with
/// a large history of delivered ones beside the pending and statistics of
/// an empty queue.
#[tokio::test]
async fn the_webhook_claim_uses_its_indexes() {
    let t = TestService::start().await;
    let client = t.db.connect().await;
    client
        .batch_execute(
            // Statistics taken while the queue was empty, then a backlog:
            // a queue's statistics are often that stale (the plan must not
            // depend on them).
            "ANALYZE webhook_deliveries; \
             INSERT INTO webhook_endpoints (id, url, event_types, secret, secret_key_id) \
             VALUES ('wh_000000000000000000000001', 'https://example.com/', \
                     ARRAY['integration.connected'], '\\x00', 'k1'); \
             INSERT INTO events (type, integration_id, user_id, provider, account_id, status, refresh_failures) \
             SELECT 'integration.connected', i % 5000, 'user' || i, 'good', 'acct' || i, 'connected', 0 \
             FROM generate_series(1, 20000) i; \
             UPDATE webhook_deliveries SET status = 'succeeded' WHERE event_id % 4 = 0; \
             ANALYZE events",
        )
        .await
        .unwrap();
    for mode in ["force_custom_plan", "force_generic_plan"] {
        client
            .batch_execute(&format!("SET plan_cache_mode = {mode}"))
            .await
            .unwrap();
        let stmt = client
            .prepare(&format!("EXPLAIN {}", integrations::store::webhooks::CLAIM))
            .await
            .unwrap();
        let plan: Vec<String> = client
            .query(
                &stmt,
                &[&"wh_000000000000000000000001", &16i64, &15.0f64, &"bench"],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let plan = plan.join("\n");
        assert!(
            plan.contains("webhook_deliveries_due")
                && plan.contains("webhook_deliveries_order")
                && !plan.contains("Seq Scan")
                && !plan.contains("Sort")
                && !plan.contains("Join Filter"),
            "{mode} CLAIM: {plan}"
        );
    }
}

#[tokio::test]
async fn rotate_keys_reencrypts_every_row_and_is_resumable() {
    let t = TestService::start().await;
    for i in 0..25 {
        t.seed(&format!("u{i}"), "good", &format!("a{i}"), 3600)
            .await;
    }
    // New key first, old key kept for reading.
    let new_spec = format!("{},{}", Keyring::generate_spec("k2"), t.keys);
    let env = |name: &str| (name == "FAKE_SECRET").then(|| "fake-secret".to_string());
    let rotated = IntegrationsService::new(
        t.service.pool().clone(),
        Keyring::parse(&new_spec).unwrap(),
        ProviderRegistry::from_toml(&t.fake.registry_toml(PROVIDERS), "test", &env).unwrap(),
        TokenClient::new(&TokenClientConfig::default()).unwrap(),
        ServiceConfig::default(),
    );
    // A webhook endpoint's signing secret, under the old key.
    let webhook = t
        .service
        .create_webhook("https://no-such-host.invalid/hook", None)
        .await
        .unwrap()
        .webhook;
    let report = rotated.rotate_keys(10).await.unwrap();
    assert_eq!((report.reencrypted, report.batches), (25, 3));
    assert_eq!(
        (
            report.webhook_secrets_reencrypted,
            report.webhook_secrets_unreadable
        ),
        (1, 0)
    );
    assert_eq!(
        rotated.rotate_keys(10).await.unwrap().reencrypted,
        0,
        "nothing left: resumable"
    );
    let client = t.db.connect().await;
    let keys: i64 = client
        .query_one(
            "SELECT count(*) FROM integrations WHERE key_id <> 'k2'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(keys, 0);
    // Readable with only the new key.
    let only_new = IntegrationsService::new(
        t.service.pool().clone(),
        Keyring::parse(new_spec.split(',').next().unwrap()).unwrap(),
        ProviderRegistry::from_toml(&t.fake.registry_toml(PROVIDERS), "test", &env).unwrap(),
        TokenClient::new(&TokenClientConfig::default()).unwrap(),
        ServiceConfig::default(),
    );
    let tok = only_new
        .access_token(&provider_name("good"), &account_id("a7"))
        .await
        .unwrap();
    assert_eq!(secret_text(&tok.token), "at-seed-a7");
    // And the refresh token too.
    let s = only_new
        .refresh(&provider_name("good"), &account_id("a7"))
        .await
        .unwrap();
    assert_eq!(s.status, Status::Connected);
    // And the webhook secret: a test delivery is signed (then its host does
    // not resolve); under the old key alone it could not be.
    let id = integrations::domain::WebhookId::parse("id", &webhook.id).unwrap();
    let sent = only_new.test_webhook(&id).await;
    assert!(sent.is_ok(), "{sent:?}");
    assert!(!sent.unwrap().delivered);
}

#[tokio::test]
async fn rotation_never_overwrites_tokens_a_refresh_wrote_after_it_read_them() {
    let t = TestService::start().await;
    t.seed("u1", "good", "a1", 3600).await;
    let mut conn = t.service.pool().get().await.unwrap();
    let read = integrations::store::integrations::to_reencrypt(&mut conn, "k-new", 0, 10)
        .await
        .unwrap();
    // Meanwhile an instance still on the old keys refreshes: new tokens,
    // under the old key.
    t.service
        .refresh(&provider_name("good"), &account_id("a1"))
        .await
        .unwrap();
    let row = &read[0];
    let updated = conn
        .execute(
            integrations::store::integrations::REENCRYPT,
            &[
                &row.id,
                &row.key_id,
                &b"stale re-encrypted".as_slice(),
                &row.refresh_token,
                &"k-new",
                &row.access_token,
            ],
        )
        .await
        .unwrap();
    assert_eq!(updated, 0, "the refresh's tokens stay");
    drop(conn);
    let token = t
        .service
        .access_token(&provider_name("good"), &account_id("a1"))
        .await
        .unwrap();
    assert_ne!(
        secret_text(&token.token),
        "at-seed-a1",
        "the refreshed token"
    );
}

#[tokio::test]
async fn an_account_belongs_to_one_user() {
    let t = TestService::start().await;
    t.seed("u1", "good", "shared", 3600).await;
    let tokens = integrations::oauth::TokenSet::from_response(
        &serde_json::json!({"access_token": "x"}),
        chrono::Utc::now(),
        integrations::oauth::Expiry::Never,
    )
    .unwrap();
    let err = t
        .service
        .connect(
            &user_id("u2"),
            &provider_name("good"),
            &account_id("shared"),
            &tokens,
            None,
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("already connected to another user"),
        "{err}"
    );
    // The owner can reconnect; without a refresh token in the response the stored one is kept.
    t.service
        .connect(
            &user_id("u1"),
            &provider_name("good"),
            &account_id("shared"),
            &tokens,
            None,
        )
        .await
        .unwrap();
    t.service
        .refresh(&provider_name("good"), &account_id("shared"))
        .await
        .unwrap();
}

/// A reconnect that brings no refresh token (GitHub-style) while the
/// stored refresh token is under an older key: the stored one is kept,
/// re-encrypted under the current key (the re-encryption branch of
/// `connect`), so it still works once the old key is removed.
#[tokio::test]
async fn reconnecting_without_a_refresh_token_after_a_key_change_reencrypts_the_stored_one() {
    let t = TestService::start().await;
    let tokens = |json: serde_json::Value| {
        integrations::oauth::TokenSet::from_response(
            &json,
            chrono::Utc::now(),
            integrations::oauth::Expiry::Default(std::time::Duration::from_secs(3600)),
        )
        .unwrap()
    };
    let (u, p, a) = (user_id("u1"), provider_name("good"), account_id("keep-rt"));
    t.fake.accept_refresh("rt-1");
    t.service
        .connect(
            &u,
            &p,
            &a,
            &tokens(serde_json::json!({"access_token": "at-1", "refresh_token": "rt-1"})),
            None,
        )
        .await
        .unwrap();
    // A new current key; the row (and its refresh token) is under k1.
    let k2 = Keyring::generate_spec("k2");
    let env = |name: &str| (name == "FAKE_SECRET").then(|| "fake-secret".to_string());
    let with_keys = |spec: &str| {
        IntegrationsService::new(
            t.service.pool().clone(),
            Keyring::parse(spec).unwrap(),
            ProviderRegistry::from_toml(&t.fake.registry_toml(PROVIDERS), "test", &env).unwrap(),
            TokenClient::new(&TokenClientConfig::default()).unwrap(),
            ServiceConfig::default(),
        )
    };
    let rotated = with_keys(&format!("{k2},{}", t.keys));
    let stored = rotated
        .connect(
            &u,
            &p,
            &a,
            &tokens(serde_json::json!({"access_token": "at-2"})),
            None,
        )
        .await
        .unwrap();
    assert_eq!(stored.account_id, "keep-rt");
    let client = t.db.connect().await;
    let row = client
        .query_one(
            "SELECT key_id, refresh_token IS NOT NULL FROM integrations WHERE account_id = 'keep-rt'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, bool>(1)),
        ("k2".to_string(), true),
        "the kept refresh token is under the new key"
    );

    // Only k2 left: the new access token reads, and the kept refresh token
    // (re-encrypted, not lost) refreshes.
    let only_k2 = with_keys(&k2);
    let tok = only_k2.access_token(&p, &a).await.unwrap();
    assert_eq!(secret_text(&tok.token), "at-2");
    only_k2.refresh(&p, &a).await.unwrap();
    assert_eq!(*t.fake.seen_refresh_tokens.lock().unwrap(), ["rt-1"]);
}

/// `rotate-keys` while refreshes write, from an instance with the new key
/// first and from one that knows it but still writes under the old key (a
/// rolling change of the key list): no newer token is overwritten with an
/// older one and no row is left unreadable. Once a second pass has
/// caught the rows written meanwhile under the old key, a service with only
/// the new key reads and refreshes every integration (the rotating fake
/// provider would refuse a stale refresh token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_keys_while_refreshes_write_loses_no_token() {
    let t = TestService::start_with("connection_limit=8", ServiceConfig::default()).await;
    const N: usize = 30;
    for i in 0..N {
        t.seed("u1", "good", &format!("r{i}"), 3600).await;
    }
    t.fake
        .set_delay("good", std::time::Duration::from_millis(5));
    let k2 = Keyring::generate_spec("k2");
    let rotated = t
        .with_keys(&format!("{k2},{}", t.keys), ServiceConfig::default())
        .await;
    let new_first = t
        .with_keys(&format!("{k2},{}", t.keys), ServiceConfig::default())
        .await;
    let old_first = t
        .with_keys(&format!("{},{k2}", t.keys), ServiceConfig::default())
        .await;
    let refreshes = {
        tokio::spawn(async move {
            let mut ok = 0;
            for round in 0..3 {
                let requests = (0..N)
                    .map(|i| integrations::service::RefreshRequest {
                        provider: provider_name("good"),
                        account_id: account_id(&format!("r{i}")),
                    })
                    .collect();
                let svc = if round % 2 == 0 {
                    &new_first
                } else {
                    &old_first
                };
                let results = svc.batch_refresh(requests, 4).await;
                for r in &results {
                    assert!(r.is_ok(), "round {round}: {r:?}");
                }
                ok += results.len();
            }
            ok
        })
    };
    let mut passes = 0;
    while !refreshes.is_finished() {
        let report = rotated.rotate_keys(3).await.unwrap();
        assert_eq!(report.unreadable, 0, "{report:?}");
        passes += 1;
    }
    assert_eq!(refreshes.await.unwrap(), 3 * N);
    assert!(passes > 1, "rotation ran while refreshes wrote");
    // The rows the old instance wrote under k1 meanwhile.
    let report = rotated.rotate_keys(3).await.unwrap();
    assert_eq!(report.unreadable, 0, "{report:?}");

    let only_k2 = t.with_keys(&k2, ServiceConfig::default()).await;
    let client = t.db.connect().await;
    let keys: Vec<String> = client
        .query("SELECT DISTINCT key_id FROM integrations", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(keys, ["k2"]);
    for i in 0..N {
        let (p, a) = (provider_name("good"), account_id(&format!("r{i}")));
        only_k2.access_token(&p, &a).await.unwrap();
        let s = only_k2.refresh(&p, &a).await.unwrap();
        assert_eq!(s.status, Status::Connected, "r{i}");
    }
}
