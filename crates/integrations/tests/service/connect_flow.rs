//! The OAuth connect flow: authorize URL with state and PKCE; the callback
//! exchanges the code once and keeps the answer pending; only the
//! application's confirmation (flow id from its session + the completion
//! code the browser brought back) stores the integration.

use std::time::Duration;

use integrations::crypto::Keyring;
use integrations::service::{AuthorizedConnect, ServiceConfig, ServiceError, StartedConnect};
use secrecy::ExposeSecret;

use crate::common::{provider_name, user_id, TestService};

fn config(ttl: Duration) -> ServiceConfig {
    ServiceConfig {
        callback_url: Some("https://integrations.example/v1/oauth/callback".into()),
        state_ttl: ttl,
        redirect_origins: integrations::service::RedirectOrigins::parse("https://app.example")
            .unwrap(),
        ..ServiceConfig::default()
    }
}

fn state_of(url: &str) -> (String, String) {
    let url = url::Url::parse(url).unwrap();
    let q: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
    assert_eq!(q["response_type"], "code");
    assert_eq!(q["client_id"], "client-good");
    assert_eq!(
        q["redirect_uri"],
        "https://integrations.example/v1/oauth/callback"
    );
    assert_eq!(q["code_challenge_method"], "S256");
    (q["state"].clone(), q["code_challenge"].clone())
}

async fn start(t: &TestService, user: &str) -> (StartedConnect, String) {
    let started = t
        .service
        .start_connect(
            &user_id(user),
            &provider_name("good"),
            "https://app.example/done",
        )
        .await
        .unwrap();
    let (state, _challenge) = state_of(&started.authorize_url);
    (started, state)
}

async fn connected(t: &TestService, user: &str) -> Vec<String> {
    let list = t.service.status(&user_id(user)).await.unwrap();
    list.integrations()
        .unwrap()
        .iter()
        .map(|i| i.account_id.clone())
        .collect()
}

#[tokio::test]
async fn connect_flow_stores_the_integration_only_when_the_application_confirms() {
    let t = TestService::start_with("connection_limit=3", config(Duration::from_secs(600))).await;
    let (started, state) = start(&t, "u1").await;
    t.fake.authorize(&started.authorize_url, "code-1", "gh-777");
    let done = t.service.finish_connect(&state, "code-1").await;
    assert_eq!(
        done.redirect_uri.as_deref(),
        Some("https://app.example/done")
    );
    let authorized: AuthorizedConnect = done.result.unwrap();
    assert_eq!(
        (authorized.provider.as_str(), authorized.account_id.as_str()),
        ("good", "gh-777")
    );
    assert!(
        connected(&t, "u1").await.is_empty(),
        "nothing is connected before the application confirms"
    );

    let flow = started.flow_id.expose_secret();
    let code = authorized.completion_code.expose_secret();
    let integration = t
        .service
        .complete_connect(flow, code, Some(&user_id("u1")))
        .await
        .unwrap();
    assert_eq!(
        (
            integration.provider.as_str(),
            integration.account_id.as_str()
        ),
        ("good", "gh-777")
    );
    assert_eq!(connected(&t, "u1").await, ["gh-777"]);
    let token = t
        .service
        .access_token(&provider_name("good"), &crate::common::account_id("gh-777"))
        .await
        .unwrap();
    assert!(!token.token.expose_secret().is_empty());

    // Single use: the same confirmation again is refused.
    let again = t.service.complete_connect(flow, code, None).await;
    assert!(
        matches!(again, Err(ServiceError::InvalidFlow(_))),
        "{again:?}"
    );

    // The same state again: refused, and the provider is not asked.
    t.fake.authorize(&started.authorize_url, "code-2", "gh-888");
    let replay = t.service.finish_connect(&state, "code-2").await;
    assert!(matches!(
        replay.result,
        Err(ServiceError::InvalidState("unknown or already used"))
    ));
    assert_eq!(replay.redirect_uri, None);
    assert_eq!(
        t.fake.exchanges.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

/// The attack of issue 11: an attacker starts a flow for their own user
/// and has a victim open the authorize URL. The victim's account must not
/// end up linked to the attacker: the callback alone links nothing, the
/// attacker (holding the flow id) lacks the completion code the victim's
/// browser got, and a wrong code or another user leaves the flow intact.
#[tokio::test]
async fn a_victim_finishing_an_attackers_flow_links_nothing_to_the_attacker() {
    let t = TestService::start_with("connection_limit=3", config(Duration::from_secs(600))).await;
    let (attackers, state) = start(&t, "attacker").await;
    // The victim's browser follows the link; the provider authorises the
    // victim's account and sends the browser to the callback.
    t.fake
        .authorize(&attackers.authorize_url, "victim-code", "victim-acct");
    let done = t.service.finish_connect(&state, "victim-code").await;
    let victims_browser = done.result.unwrap();
    assert!(
        connected(&t, "attacker").await.is_empty(),
        "the callback must not link the victim's account"
    );

    // The attacker has the flow id but not the completion code.
    let flow = attackers.flow_id.expose_secret();
    for guess in ["", "guess", flow] {
        let r = t.service.complete_connect(flow, guess, None).await;
        assert!(matches!(r, Err(ServiceError::InvalidFlow(_))), "{r:?}");
    }
    // The right code presented for another user does not complete either
    // (and does not use the flow up).
    let code = victims_browser.completion_code.expose_secret();
    let r = t
        .service
        .complete_connect(flow, code, Some(&user_id("someone-else")))
        .await;
    assert!(matches!(r, Err(ServiceError::InvalidFlow(_))), "{r:?}");
    // A completion code is bound to its flow.
    let (other, _) = start(&t, "attacker").await;
    let r = t
        .service
        .complete_connect(other.flow_id.expose_secret(), code, None)
        .await;
    assert!(matches!(r, Err(ServiceError::InvalidFlow(_))), "{r:?}");
    assert!(connected(&t, "attacker").await.is_empty());
}

#[tokio::test]
async fn forged_and_expired_states_and_flows_are_refused() {
    let t = TestService::start_with("connection_limit=3", config(Duration::from_millis(300))).await;
    let forged = t.service.finish_connect("made-up-state", "code").await;
    assert!(matches!(forged.result, Err(ServiceError::InvalidState(_))));

    let (late_flow, state) = start(&t, "u1").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    t.fake.authorize(&late_flow.authorize_url, "late", "gh-1");
    let late = t.service.finish_connect(&state, "late").await;
    assert!(matches!(
        late.result,
        Err(ServiceError::InvalidState("expired"))
    ));
    assert_eq!(
        late.redirect_uri.as_deref(),
        Some("https://app.example/done"),
        "the app learns the outcome"
    );
    assert_eq!(
        t.fake.exchanges.load(std::sync::atomic::Ordering::SeqCst),
        0
    );

    // An answer the application does not confirm in time expires.
    let (started, state) = start(&t, "u2").await;
    t.fake.authorize(&started.authorize_url, "code-2", "gh-2");
    let done = t
        .service
        .finish_connect(&state, "code-2")
        .await
        .result
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = t
        .service
        .complete_connect(
            started.flow_id.expose_secret(),
            done.completion_code.expose_secret(),
            None,
        )
        .await;
    assert!(
        matches!(r, Err(ServiceError::InvalidFlow("expired"))),
        "{r:?}"
    );
    assert!(connected(&t, "u2").await.is_empty());
}

/// Issue 11, item 11: removing the old key after `rotate-keys` must not
/// break connect flows in progress (their PKCE verifier and pending answer
/// are encrypted too).
#[tokio::test]
async fn rotate_keys_carries_connect_flows_in_progress_to_the_new_key() {
    let t = TestService::start_with("connection_limit=3", config(Duration::from_secs(600))).await;
    // One flow waiting at the provider, one waiting for the application.
    let (waiting_provider, state_a) = start(&t, "u1").await;
    let (waiting_app, state_b) = start(&t, "u2").await;
    t.fake
        .authorize(&waiting_app.authorize_url, "code-b", "acct-b");
    let authorized_b = t
        .service
        .finish_connect(&state_b, "code-b")
        .await
        .result
        .unwrap();

    let new_spec = format!("{},{}", Keyring::generate_spec("k2"), t.keys);
    let rotated = t
        .with_keys(&new_spec, config(Duration::from_secs(600)))
        .await;
    let report = rotated.rotate_keys(10).await.unwrap();
    assert_eq!((report.flows_reencrypted, report.flows_dropped), (2, 0));

    // The old key is gone: both flows still finish.
    let only_new = new_spec.split(',').next().unwrap().to_string();
    let after = t
        .with_keys(&only_new, config(Duration::from_secs(600)))
        .await;
    t.fake
        .authorize(&waiting_provider.authorize_url, "code-a", "acct-a");
    let authorized_a = after
        .finish_connect(&state_a, "code-a")
        .await
        .result
        .unwrap();
    for (flow, authorized) in [
        (&waiting_provider, &authorized_a),
        (&waiting_app, &authorized_b),
    ] {
        after
            .complete_connect(
                flow.flow_id.expose_secret(),
                authorized.completion_code.expose_secret(),
                None,
            )
            .await
            .unwrap();
    }
    assert_eq!(connected(&t, "u1").await, ["acct-a"]);
    assert_eq!(connected(&t, "u2").await, ["acct-b"]);
}

/// Without rotate-keys, a flow under a removed key fails with a clear
/// error naming the cause, not an internal error.
#[tokio::test]
async fn a_flow_under_a_removed_key_fails_clearly() {
    let t = TestService::start_with("connection_limit=3", config(Duration::from_secs(600))).await;
    let (started, state) = start(&t, "u1").await;
    let other = t
        .with_keys(
            &Keyring::generate_spec("k9"),
            config(Duration::from_secs(600)),
        )
        .await;
    t.fake.authorize(&started.authorize_url, "code-1", "acct-1");
    let done = other.finish_connect(&state, "code-1").await;
    let err = done.result.unwrap_err();
    assert!(matches!(err, ServiceError::InvalidState(_)), "{err:?}");
    assert!(err.to_string().contains("no longer has"), "{err}");
}

#[tokio::test]
async fn bad_redirect_uris_and_missing_callback_are_refused() {
    let t = TestService::start_with("connection_limit=3", config(Duration::from_secs(60))).await;
    for bad in ["not a url", "javascript:alert(1)", "/relative/path"] {
        let err = t
            .service
            .start_connect(&user_id("u1"), &provider_name("good"), bad)
            .await
            .unwrap_err();
        assert!(
            err.to_string().starts_with("redirect_uri is invalid"),
            "{err}"
        );
    }
    let t = TestService::start().await; // no callback URL configured
    let err = t
        .service
        .start_connect(
            &user_id("u1"),
            &provider_name("good"),
            "https://app.example/done",
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("INTEGRATIONS_CALLBACK_URL"),
        "{err}"
    );
}

/// Code injection (RFC 7636's reason for PKCE): a code the provider issued
/// for one flow's authorize URL, brought to the callback with another
/// flow's state, is refused by the provider because the second flow's
/// verifier does not match the first flow's challenge; nothing is linked.
#[tokio::test]
async fn a_code_issued_for_another_flow_is_refused_by_its_pkce_verifier() {
    let t = TestService::start_with("connection_limit=3", config(Duration::from_secs(600))).await;
    let (attackers, _) = start(&t, "attacker").await;
    let (_, victims_state) = start(&t, "victim").await;
    t.fake
        .authorize(&attackers.authorize_url, "attackers-code", "attacker-acct");
    let done = t
        .service
        .finish_connect(&victims_state, "attackers-code")
        .await;
    assert!(done.result.is_err(), "{:?}", done.result.map(|_| ()));
    let refused = t.fake.refused.lock().unwrap().clone();
    assert_eq!(
        refused,
        ["good: code_verifier does not match the code_challenge"]
    );
    assert!(connected(&t, "victim").await.is_empty());
    assert!(t.fake.issued_tokens().is_empty());
}

/// Abandoned flows do not pile up: expired states (flows waiting at the
/// provider) and expired pending answers (waiting for the application) are
/// purged; live ones stay and still finish.
#[tokio::test]
async fn purging_removes_expired_states_and_pending_answers_only() {
    let t = TestService::start_with("connection_limit=3", config(Duration::from_millis(500))).await;
    let (_, _abandoned_state) = start(&t, "u1").await;
    let (unconfirmed, state) = start(&t, "u2").await;
    t.fake
        .authorize(&unconfirmed.authorize_url, "code-u2", "acct-u2");
    t.service
        .finish_connect(&state, "code-u2")
        .await
        .result
        .unwrap();
    let client = t.db.connect().await;
    let counts = || async {
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM oauth_states), (SELECT count(*) FROM oauth_pending), \
                        (SELECT count(*) FROM oauth_states WHERE expires_at >= now()) \
                      + (SELECT count(*) FROM oauth_pending WHERE expires_at >= now())",
                &[],
            )
            .await
            .unwrap();
        (
            row.get::<_, i64>(0),
            row.get::<_, i64>(1),
            row.get::<_, i64>(2),
        )
    };
    assert_eq!(counts().await, (1, 1, 2));
    // Nothing expired yet: nothing purged.
    assert_eq!(t.service.purge_expired_states().await.unwrap(), 0);
    // Once both have expired (as the server sees it), a fresh flow starts.
    let mut now = counts().await;
    for _ in 0..100 {
        if now.2 == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        now = counts().await;
    }
    assert_eq!(now, (1, 1, 0));
    let (live, live_state) = start(&t, "u3").await;
    assert_eq!(t.service.purge_expired_states().await.unwrap(), 2);
    assert_eq!(counts().await, (1, 0, 1), "only the live state is left");
    t.fake.authorize(&live.authorize_url, "code-u3", "acct-u3");
    let done = t.service.finish_connect(&live_state, "code-u3").await;
    assert!(done.result.is_ok(), "the live flow still finishes");
}
