//! Events: what happened to an integration, as `GET /v1/events` shows it
//! (and, later, webhooks send it). Written by database triggers in the
//! same transaction as the change (migration V6); never a token, a client
//! secret or a key.

use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use super::view::{rfc3339, rfc3339_opt};
use super::{InvalidInput, Status};

/// What an event says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, ToSchema)]
pub enum EventType {
    /// First stored (the connect flow or PUT).
    #[serde(rename = "integration.connected")]
    Connected,
    /// Stored again by the application (PUT or the connect flow) while it
    /// was not healthy: expired, error, revoked, or with refresh failures
    /// counted.
    #[serde(rename = "integration.reconnected")]
    Reconnected,
    /// A refresh failed and counted a failure, the status unchanged.
    #[serde(rename = "integration.refresh_failed")]
    RefreshFailed,
    /// It reached status `error`.
    #[serde(rename = "integration.error")]
    Error,
    /// The provider no longer accepts the grant (status `revoked`).
    #[serde(rename = "integration.revoked")]
    Revoked,
    /// Back to `connected` with no failure counted, by a refresh, after a
    /// failure.
    #[serde(rename = "integration.recovered")]
    Recovered,
    /// Deleted.
    #[serde(rename = "integration.deleted")]
    Deleted,
}

impl EventType {
    /// Every type, in the documentation's order.
    pub const ALL: [EventType; 7] = [
        EventType::Connected,
        EventType::Reconnected,
        EventType::RefreshFailed,
        EventType::Error,
        EventType::Revoked,
        EventType::Recovered,
        EventType::Deleted,
    ];

    /// The spelling in payloads and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Connected => "integration.connected",
            EventType::Reconnected => "integration.reconnected",
            EventType::RefreshFailed => "integration.refresh_failed",
            EventType::Error => "integration.error",
            EventType::Revoked => "integration.revoked",
            EventType::Recovered => "integration.recovered",
            EventType::Deleted => "integration.deleted",
        }
    }

    /// Parses the spelling of `field` (`type`), naming the accepted ones.
    pub fn parse(field: &'static str, value: &str) -> Result<EventType, InvalidInput> {
        EventType::ALL
            .into_iter()
            .find(|t| t.as_str() == value)
            .ok_or_else(|| {
                InvalidInput::new(
                    field,
                    format!(
                        "{:?} is not an event type; accepted: {}",
                        truncated(value),
                        EventType::ALL.map(EventType::as_str).join(", ")
                    ),
                )
            })
    }

    /// The database's spelling read back (a type this version does not
    /// know: `None`; the CHECK constraint makes it unreachable).
    pub fn from_db(s: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// A client's value quoted in an error, cut to a readable length.
fn truncated(value: &str) -> String {
    value.chars().take(64).collect()
}

/// Where a poller stands in the event stream: after the event `id` of the
/// transaction `txid` (see `store/events.rs` for why both). Opaque to
/// clients: 16 bytes (txid, id, big-endian) in unpadded base64url.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct EventCursor {
    /// The writing transaction's id (`xid8`).
    pub txid: u64,
    /// The event's id within it.
    pub id: i64,
}

impl EventCursor {
    /// The start: before every event.
    pub const START: EventCursor = EventCursor { txid: 0, id: 0 };

    /// Parses a cursor an earlier answer gave, as the value of `field`.
    pub fn parse(field: &'static str, value: &str) -> Result<EventCursor, InvalidInput> {
        let bad = || {
            InvalidInput::new(
                field,
                format!(
                    "{:?} is not a cursor this API gave; accepted: the next_cursor of an earlier answer, \
                     or no {field} to start from the oldest event kept",
                    truncated(value)
                ),
            )
        };
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(value)
            .map_err(|_| bad())?;
        let bytes: [u8; 16] = bytes.try_into().map_err(|_| bad())?;
        let (txid, id) = bytes.split_at(8);
        let txid = u64::from_be_bytes(txid.try_into().map_err(|_| bad())?);
        // Any 16 bytes are a position (a negative id is before every
        // event of its transaction), so a cursor is refused only when it
        // is not 16 bytes of canonical base64url.
        let id = i64::from_be_bytes(id.try_into().map_err(|_| bad())?);
        Ok(EventCursor { txid, id })
    }

    /// What [`EventCursor::encode`] writes, as an anchored regular
    /// expression (for the OpenAPI document): 22 base64url characters, the
    /// last one carrying 2 bits and 4 zero bits.
    pub const PATTERN: &'static str = "^[A-Za-z0-9_-]{21}[AQgw]$";

    /// The opaque text form.
    pub fn encode(&self) -> String {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&self.txid.to_be_bytes());
        bytes[8..].copy_from_slice(&self.id.to_be_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }
}

/// Events per page of `GET /v1/events` when `limit` is not given.
pub const DEFAULT_EVENT_LIMIT: i64 = 100;

/// Most events per page.
pub const MAX_EVENT_LIMIT: i64 = 1000;

/// Parses `limit` (`None`: [`DEFAULT_EVENT_LIMIT`]).
pub fn event_limit(field: &'static str, value: Option<&str>) -> Result<i64, InvalidInput> {
    let Some(value) = value else {
        return Ok(DEFAULT_EVENT_LIMIT);
    };
    value
        .parse::<i64>()
        .ok()
        .filter(|n| (1..=MAX_EVENT_LIMIT).contains(n))
        .ok_or_else(|| {
            InvalidInput::new(
                field,
                format!(
                    "{:?} is not accepted; accepted: a whole number from 1 to {MAX_EVENT_LIMIT} (default {DEFAULT_EVENT_LIMIT})",
                    truncated(value)
                ),
            )
        })
}

/// One event.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Event {
    /// Unique, increasing in the order events were written (not
    /// necessarily the order they committed: page with the cursor).
    pub id: i64,
    /// What happened.
    #[serde(rename = "type")]
    #[schema(value_type = EventType)]
    pub kind: EventType,
    /// When the change's transaction started.
    #[serde(serialize_with = "rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: DateTime<Utc>,
    /// The integration after the change.
    pub data: EventData,
}

/// The integration an event is about, after the change: never its tokens.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct EventData {
    /// The application's user.
    pub user_id: String,
    /// Provider name.
    pub provider: String,
    /// Account on the provider.
    pub account_id: String,
    /// `connected`, `expired`, `error` or `revoked` after the change; null
    /// for `integration.deleted`.
    #[schema(value_type = Option<String>, example = "revoked")]
    pub status: Option<Status>,
    /// The status before the change; null for `integration.connected`.
    #[schema(value_type = Option<String>, example = "connected")]
    pub previous_status: Option<Status>,
    /// Refresh failures in a row after the change.
    pub refresh_failures: i32,
    /// The last refresh error, when the integration has one after the
    /// change.
    pub error: Option<EventError>,
    /// When the access token expires; null when it never does.
    #[serde(serialize_with = "rfc3339_opt")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<DateTime<Utc>>,
}

/// A refresh error, as the integration's `last_error` keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct EventError {
    /// The provider's `error` code (`invalid_grant`, `invalid_client`,
    /// ..., or `provider_error` when it was not a plain code), or
    /// `temporary_failure` (network, timeout, 5xx, 429),
    /// `malformed_response`, `not_configured`.
    pub code: String,
    /// What failed, with the provider's description sanitised (never a
    /// token).
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_anything_else() {
        for c in [
            EventCursor::START,
            EventCursor { txid: 1, id: 2 },
            EventCursor {
                txid: u64::MAX,
                id: i64::MAX,
            },
        ] {
            assert_eq!(EventCursor::parse("after", &c.encode()), Ok(c));
        }
        for bad in [
            "",
            "x",
            "not a cursor",
            "AAAAAAAAAAAAAAAAAAAAAA==",
            "AAAAAAAAAAAAAAAAAAAA",
            &EventCursor { txid: 0, id: 0 }.encode().repeat(2),
            "AAAAAAAAAAAAAAAAAAAAAB",
            "AAAAAAAAAAAAAAAAAAAAA=",
        ] {
            let err = EventCursor::parse("after", bad).unwrap_err();
            assert_eq!(err.field, "after");
            assert!(err.reason.contains("next_cursor"), "{err}");
        }
        // The pattern the OpenAPI document gives matches every cursor, and
        // every text it matches parses.
        let pattern = |s: &str| {
            s.len() == 22
                && s[..21]
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                && s.ends_with(['A', 'Q', 'g', 'w'])
        };
        assert_eq!(EventCursor::PATTERN, "^[A-Za-z0-9_-]{21}[AQgw]$");
        for txid in [0, 1, 255, 1 << 40, u64::MAX] {
            for id in [0, 1, 3, 1 << 33, i64::MAX, -1] {
                let text = EventCursor { txid, id }.encode();
                assert!(pattern(&text), "{text}");
            }
        }
        for text in [
            "_____________________w",
            "AAAAAAAAAAAAAAAAAAAAAQ",
            "zzzzzzzzzzzzzzzzzzzzzg",
        ] {
            assert!(pattern(text));
            assert!(EventCursor::parse("after", text).is_ok(), "{text}");
        }
        assert!(
            EventCursor { txid: 1, id: 9 } < EventCursor { txid: 2, id: 1 },
            "ordered by transaction first"
        );
    }

    #[test]
    fn limits_default_and_are_bounded() {
        assert_eq!(event_limit("limit", None), Ok(100));
        assert_eq!(event_limit("limit", Some("1")), Ok(1));
        assert_eq!(event_limit("limit", Some("1000")), Ok(1000));
        for bad in ["0", "1001", "-1", "ten", "", "1.5"] {
            let err = event_limit("limit", Some(bad)).unwrap_err();
            assert!(err.reason.contains("1 to 1000"), "{err}");
        }
    }

    #[test]
    fn types_parse_their_spelling_only() {
        for t in EventType::ALL {
            assert_eq!(EventType::parse("type", t.as_str()), Ok(t));
            assert_eq!(EventType::from_db(t.as_str()), Some(t));
            assert_eq!(
                serde_json::to_value(t).unwrap(),
                serde_json::Value::from(t.as_str())
            );
        }
        let err = EventType::parse("type", "connected").unwrap_err();
        assert!(err.reason.contains("integration.recovered"), "{err}");
    }
}
