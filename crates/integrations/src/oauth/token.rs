//! Token responses: one strict-but-forgiving parser for what providers
//! return from their token endpoints, used by the token client and by the
//! HTTP API for token bodies the app posts as the provider returned them.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use secrecy::SecretString;
use serde_json::{Map, Value};

/// The longest lifetime accepted from `expires_in`/`expires_at`: 100 years.
/// Anything larger is a unit mistake (milliseconds) or garbage.
const MAX_LIFETIME_SECS: i64 = 100 * 365 * 24 * 3600;

/// Fields the parser consumes into typed fields, plus `id_token` (a
/// credential that is not kept); none of them is copied into
/// [`TokenSet::extra`].
const CONSUMED: &[&str] = &[
    "access_token",
    "refresh_token",
    "id_token",
    "expires_in",
    "expires_at",
    "scope",
    "scopes",
    "token_type",
];

/// What to assume when a token response says nothing about expiry: the
/// provider's policy from the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// The token expires this long after it was issued.
    Default(Duration),
    /// The token never expires (GitHub OAuth apps).
    Never,
}

/// An access token with what came with it. `Debug` redacts both tokens.
#[derive(Clone)]
pub struct TokenSet {
    /// The access token.
    pub access_token: SecretString,
    /// The refresh token, when the response carried one. After a refresh a
    /// `None` means the provider kept the old refresh token valid: the caller
    /// keeps the one it has.
    pub refresh_token: Option<SecretString>,
    /// When the access token expires; `None` when it never does.
    pub expires_at: Option<DateTime<Utc>>,
    /// Granted scopes; empty when the response did not list them (OAuth
    /// then means "as requested").
    pub scopes: Vec<String>,
    /// The token type, "Bearer" unless the response said otherwise.
    pub token_type: String,
    /// The response's other fields (e.g. TikTok's `open_id`), without the
    /// tokens, `id_token` and the fields parsed above.
    pub extra: Map<String, Value>,
}

impl fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSet")
            .field("access_token", &"[REDACTED]")
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "[REDACTED]"),
            )
            .field("expires_at", &self.expires_at)
            .field("scopes", &self.scopes)
            .field("token_type", &self.token_type)
            // Field names only: providers nest credentials in other fields
            // (Slack's `authed_user.access_token`).
            .field("extra", &self.extra.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Why a token response was not accepted. Messages name the field and what
/// is accepted; they never contain field values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The body is not a JSON object.
    #[error("a token response must be a JSON object, got {got}")]
    NotAnObject {
        /// The JSON type that was found.
        got: &'static str,
    },
    /// A required field is absent (or null).
    #[error("token response field '{field}' is missing; expected {expected}")]
    Missing {
        /// The field's name.
        field: &'static str,
        /// What the field must hold.
        expected: &'static str,
    },
    /// A field is present but unusable.
    #[error("token response field '{field}' is invalid ({problem}); expected {expected}")]
    Invalid {
        /// The field's name.
        field: &'static str,
        /// What is wrong with it, without its value.
        problem: String,
        /// What the field must hold.
        expected: &'static str,
    },
}

const EXPECT_ACCESS: &str = "a non-empty string";
const EXPECT_REFRESH: &str = "a string or null";
const EXPECT_EXPIRES_IN: &str = "a non-negative number of seconds, or such a number as a string";
const EXPECT_EXPIRES_AT: &str =
    "unix seconds (a number or numeric string) or an RFC 3339 timestamp string";
const EXPECT_SCOPE: &str = "a space- or comma-separated string, or a list of strings";
const EXPECT_TOKEN_TYPE: &str = "a non-empty string";

impl TokenSet {
    /// Parses a token endpoint response.
    ///
    /// Accepts `access_token` (required, non-empty string), `refresh_token`
    /// (string; empty or null means none), `expires_in` (seconds, a number or
    /// a numeric string) or else `expires_at` (unix seconds, or RFC 3339),
    /// `scope` or `scopes` (a space/comma separated string or a list),
    /// `token_type` (default "Bearer"). Without either expiry field the
    /// `policy` decides: `Default(d)` expires at `now + d`, `Never` gives
    /// `None`. Every other field except `id_token` is kept in `extra`.
    pub fn from_response(
        json: &Value,
        now: DateTime<Utc>,
        policy: Expiry,
    ) -> Result<TokenSet, TokenError> {
        let obj = json.as_object().ok_or(TokenError::NotAnObject {
            got: json_type(json),
        })?;

        let access_token = match present(obj, "access_token") {
            None => {
                return Err(TokenError::Missing {
                    field: "access_token",
                    expected: EXPECT_ACCESS,
                })
            }
            Some(Value::String(s)) if !s.trim().is_empty() => SecretString::from(s.clone()),
            Some(Value::String(_)) => return Err(invalid("access_token", "empty", EXPECT_ACCESS)),
            Some(v) => return Err(invalid_type("access_token", v, EXPECT_ACCESS)),
        };

        let refresh_token = match present(obj, "refresh_token") {
            None => None,
            Some(Value::String(s)) if s.trim().is_empty() => None,
            Some(Value::String(s)) => Some(SecretString::from(s.clone())),
            Some(v) => return Err(invalid_type("refresh_token", v, EXPECT_REFRESH)),
        };

        let expires_at = if let Some(v) = present(obj, "expires_in") {
            let secs = seconds(v).map_err(|p| invalid("expires_in", p, EXPECT_EXPIRES_IN))?;
            Some(now + chrono::Duration::seconds(secs))
        } else if let Some(v) = present(obj, "expires_at") {
            Some(timestamp(v, now)?)
        } else {
            match policy {
                Expiry::Never => None,
                Expiry::Default(d) => {
                    let d = chrono::Duration::from_std(d)
                        .ok()
                        .filter(|d| d.num_seconds() <= MAX_LIFETIME_SECS)
                        .unwrap_or(chrono::Duration::seconds(MAX_LIFETIME_SECS));
                    Some(now + d)
                }
            }
        };

        let scopes = match present(obj, "scope")
            .map(|v| ("scope", v))
            .or_else(|| present(obj, "scopes").map(|v| ("scopes", v)))
        {
            None => Vec::new(),
            Some((field, v)) => {
                let scopes = scope_list(field, v)?;
                // PostgreSQL's text cannot hold NUL: refused here, not by
                // the statement that stores it (with others' results).
                if scopes.iter().any(|s| s.contains('\0')) {
                    return Err(invalid(field, "a NUL character", EXPECT_SCOPE));
                }
                scopes
            }
        };

        let token_type = match present(obj, "token_type") {
            None => "Bearer".to_string(),
            Some(Value::String(s)) if s.contains('\0') => {
                return Err(invalid("token_type", "a NUL character", EXPECT_TOKEN_TYPE))
            }
            Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
            Some(Value::String(_)) => {
                return Err(invalid("token_type", "empty", EXPECT_TOKEN_TYPE))
            }
            Some(v) => return Err(invalid_type("token_type", v, EXPECT_TOKEN_TYPE)),
        };

        let extra = obj
            .iter()
            .filter(|(k, _)| !CONSUMED.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();

        Ok(TokenSet {
            access_token,
            refresh_token,
            expires_at,
            scopes,
            token_type,
            extra,
        })
    }
}

/// The field's value unless it is absent or null.
fn present<'a>(obj: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    obj.get(field).filter(|v| !v.is_null())
}

fn invalid(field: &'static str, problem: impl Into<String>, expected: &'static str) -> TokenError {
    TokenError::Invalid {
        field,
        problem: problem.into(),
        expected,
    }
}

fn invalid_type(field: &'static str, v: &Value, expected: &'static str) -> TokenError {
    invalid(field, format!("got {}", json_type(v)), expected)
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A non-negative count of seconds from a number or a numeric string;
/// fractions are dropped.
fn seconds(v: &Value) -> Result<i64, String> {
    let secs = match v {
        Value::Number(n) => n.as_f64().ok_or("not a finite number")?,
        Value::String(s) => s
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .ok_or("a string that is not a number")?,
        other => return Err(format!("got {}", json_type(other))),
    };
    if secs < 0.0 {
        return Err("negative".into());
    }
    if secs > MAX_LIFETIME_SECS as f64 {
        return Err("more than 100 years".into());
    }
    Ok(secs as i64)
}

fn timestamp(v: &Value, now: DateTime<Utc>) -> Result<DateTime<Utc>, TokenError> {
    let bad = |p: &str| invalid("expires_at", p, EXPECT_EXPIRES_AT);
    let unix = match v {
        Value::Number(n) => n.as_f64().ok_or_else(|| bad("not a finite number"))?,
        Value::String(s) => {
            let s = s.trim();
            if let Ok(f) = s.parse::<f64>() {
                f
            } else {
                return DateTime::parse_from_rfc3339(s)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|_| bad("a string that is neither a number nor RFC 3339"))
                    .and_then(|t| in_range(t, now).map_err(bad));
            }
        }
        other => return Err(bad(&format!("got {}", json_type(other)))),
    };
    if !unix.is_finite() || unix < 0.0 {
        return Err(bad("negative"));
    }
    let t = Utc
        .timestamp_opt(unix as i64, 0)
        .single()
        .ok_or_else(|| bad("out of range"))?;
    in_range(t, now).map_err(bad)
}

/// Rejects instants absurdly far from now (e.g. milliseconds sent as seconds).
fn in_range(t: DateTime<Utc>, now: DateTime<Utc>) -> Result<DateTime<Utc>, &'static str> {
    if (t - now).num_seconds() > MAX_LIFETIME_SECS {
        Err("more than 100 years ahead")
    } else {
        Ok(t)
    }
}

fn scope_list(field: &'static str, v: &Value) -> Result<Vec<String>, TokenError> {
    match v {
        Value::String(s) => Ok(s
            .split([' ', ','])
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()),
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => Ok(s.trim().to_string()),
                other => Err(invalid(
                    field,
                    format!("a list holding {}", json_type(other)),
                    EXPECT_SCOPE,
                )),
            })
            .filter(|r| r.as_ref().map_or(true, |s| !s.is_empty()))
            .collect(),
        other => Err(invalid_type(field, other, EXPECT_SCOPE)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;
    use serde_json::json;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap()
    }

    const HOUR: Expiry = Expiry::Default(Duration::from_secs(3600));

    #[test]
    fn full_response_is_parsed_and_secrets_leave_extra() {
        let t = TokenSet::from_response(
            &json!({
                "access_token": "at", "refresh_token": "rt", "id_token": "jwt",
                "expires_in": 3599, "scope": "openid email", "token_type": "bearer",
                "open_id": "abc"
            }),
            now(),
            HOUR,
        )
        .unwrap();
        assert_eq!(t.access_token.expose_secret(), "at");
        assert_eq!(t.refresh_token.unwrap().expose_secret(), "rt");
        assert_eq!(t.expires_at, Some(now() + chrono::Duration::seconds(3599)));
        assert_eq!(t.scopes, ["openid", "email"]);
        assert_eq!(t.token_type, "bearer");
        assert_eq!(t.extra.len(), 1);
        assert_eq!(t.extra["open_id"], "abc");
    }

    #[test]
    fn expires_in_as_string_or_float() {
        for v in [json!("3600"), json!(" 3600 "), json!(3600.0)] {
            let t = TokenSet::from_response(
                &json!({"access_token": "a", "expires_in": v}),
                now(),
                Expiry::Never,
            )
            .unwrap();
            assert_eq!(t.expires_at, Some(now() + chrono::Duration::hours(1)));
        }
    }

    #[test]
    fn expires_at_as_unix_seconds_or_rfc3339() {
        let want = now() + chrono::Duration::hours(2);
        for v in [
            json!(want.timestamp()),
            json!(want.timestamp().to_string()),
            json!("2025-01-01T02:00:00Z"),
            json!("2025-01-01T03:00:00+01:00"),
        ] {
            let t = TokenSet::from_response(
                &json!({"access_token": "a", "expires_at": v}),
                now(),
                Expiry::Never,
            )
            .unwrap();
            assert_eq!(t.expires_at, Some(want));
        }
    }

    #[test]
    fn missing_expiry_follows_the_policy() {
        let body = json!({"access_token": "a"});
        let t = TokenSet::from_response(&body, now(), HOUR).unwrap();
        assert_eq!(t.expires_at, Some(now() + chrono::Duration::hours(1)));
        let t = TokenSet::from_response(&body, now(), Expiry::Never).unwrap();
        assert_eq!(t.expires_at, None);
        let t = TokenSet::from_response(
            &json!({"access_token": "a", "expires_in": null}),
            now(),
            Expiry::Never,
        )
        .unwrap();
        assert_eq!(t.expires_at, None);
    }

    #[test]
    fn defaults_for_optional_fields() {
        let t = TokenSet::from_response(
            &json!({"access_token": "a", "refresh_token": ""}),
            now(),
            HOUR,
        )
        .unwrap();
        assert!(t.refresh_token.is_none());
        assert_eq!(t.token_type, "Bearer");
        assert!(t.scopes.is_empty());
        assert!(t.extra.is_empty());
    }

    #[test]
    fn scopes_in_every_shape() {
        for body in [
            json!({"access_token": "a", "scope": "user.info.basic,video.list"}),
            json!({"access_token": "a", "scope": "user.info.basic video.list"}),
            json!({"access_token": "a", "scopes": ["user.info.basic", "video.list"]}),
            json!({"access_token": "a", "scope": ["user.info.basic", "video.list"]}),
        ] {
            let t = TokenSet::from_response(&body, now(), HOUR).unwrap();
            assert_eq!(t.scopes, ["user.info.basic", "video.list"]);
        }
    }

    #[test]
    fn errors_name_the_field_and_what_is_accepted_without_values() {
        let cases = [
            (json!([]), "JSON object"),
            (json!({}), "'access_token' is missing"),
            (
                json!({"access_token": ""}),
                "'access_token' is invalid (empty)",
            ),
            (
                json!({"access_token": 5}),
                "'access_token' is invalid (got a number)",
            ),
            (
                json!({"access_token": "a", "refresh_token": 7}),
                "'refresh_token'",
            ),
            (
                json!({"access_token": "a", "expires_in": "soon"}),
                "'expires_in'",
            ),
            (
                json!({"access_token": "a", "expires_in": -1}),
                "'expires_in' is invalid (negative)",
            ),
            (
                json!({"access_token": "a", "expires_in": 1.0e15}),
                "100 years",
            ),
            (
                json!({"access_token": "a", "expires_at": "tomorrow"}),
                "RFC 3339",
            ),
            (
                json!({"access_token": "a", "expires_at": 1.0e15}),
                "'expires_at'",
            ),
            (json!({"access_token": "a", "scope": 3}), "'scope'"),
            (json!({"access_token": "a", "scopes": [1]}), "'scopes'"),
            (
                json!({"access_token": "a", "token_type": false}),
                "'token_type'",
            ),
            // PostgreSQL's text cannot hold NUL.
            (
                json!({"access_token": "a", "token_type": "Bearer\u{0}"}),
                "'token_type'",
            ),
            (
                json!({"access_token": "a", "scope": ["read", "wr\u{0}ite"]}),
                "'scope'",
            ),
        ];
        for (body, want) in cases {
            let e = TokenSet::from_response(&body, now(), HOUR)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{body}: {e}");
            assert!(e.contains("expected") || e.contains("JSON object"), "{e}");
            assert!(!e.contains("soon") && !e.contains("tomorrow"), "{e}");
        }
    }

    #[test]
    fn debug_redacts_tokens() {
        let t = TokenSet::from_response(
            &json!({"access_token": "at-very-secret", "refresh_token": "rt-very-secret",
                    "authed_user": {"access_token": "xoxp-very-secret"}}),
            now(),
            HOUR,
        )
        .unwrap();
        let d = format!("{t:?}");
        assert!(!d.contains("very-secret"), "{d}");
        assert!(d.contains("[REDACTED]"));
        assert!(d.contains("authed_user"), "{d}");
    }
}
