//! The OAuth connect flow: authorize URL with state and PKCE; the callback
//! exchanges the code once.

use std::time::Duration;

use integrations::service::{ServiceConfig, ServiceError};

use crate::common::{provider_name, user_id, TestService};

fn config(ttl: Duration) -> ServiceConfig {
    ServiceConfig {
        callback_url: Some("https://integrations.example/v1/oauth/callback".into()),
        state_ttl: ttl,
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

#[tokio::test]
async fn connect_flow_stores_the_integration_and_refuses_a_replayed_state() {
    let t = TestService::start_with("connection_limit=3", config(Duration::from_secs(600))).await;
    let started = t
        .service
        .start_connect(
            &user_id("u1"),
            &provider_name("good"),
            "https://app.example/done",
        )
        .await
        .unwrap();
    let (state, _challenge) = state_of(&started.authorize_url);
    t.fake.accept_code("code-1", "gh-777");
    let done = t.service.finish_connect(&state, "code-1").await;
    assert_eq!(
        done.redirect_uri.as_deref(),
        Some("https://app.example/done")
    );
    let integration = done.result.unwrap();
    assert_eq!(
        (
            integration.provider.as_str(),
            integration.account_id.as_str()
        ),
        ("good", "gh-777")
    );
    let list = t.service.status(&user_id("u1")).await.unwrap();
    assert_eq!(list.integrations().unwrap().len(), 1);

    // The same state again: refused, and the provider is not asked.
    t.fake.accept_code("code-2", "gh-888");
    let again = t.service.finish_connect(&state, "code-2").await;
    assert!(matches!(
        again.result,
        Err(ServiceError::InvalidState("unknown or already used"))
    ));
    assert_eq!(again.redirect_uri, None);
    assert_eq!(
        t.fake.exchanges.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

#[tokio::test]
async fn forged_and_expired_states_are_refused() {
    let t = TestService::start_with("connection_limit=3", config(Duration::from_millis(200))).await;
    let forged = t.service.finish_connect("made-up-state", "code").await;
    assert!(matches!(forged.result, Err(ServiceError::InvalidState(_))));

    let started = t
        .service
        .start_connect(
            &user_id("u1"),
            &provider_name("good"),
            "https://app.example/done",
        )
        .await
        .unwrap();
    let (state, _) = state_of(&started.authorize_url);
    tokio::time::sleep(Duration::from_millis(400)).await;
    t.fake.accept_code("late", "gh-1");
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
