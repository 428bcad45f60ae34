//! Webhook endpoints and deliveries as the API shows them, and their
//! identifiers and filters, checked once at the edge.

use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use super::view::{rfc3339, rfc3339_opt};
use super::{EventType, InvalidInput};

/// An endpoint id: `wh_` and 24 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WebhookId(String);

impl WebhookId {
    /// The pattern, for the OpenAPI document.
    pub const PATTERN: &'static str = "^wh_[0-9a-f]{24}$";

    /// A new random id.
    pub fn generate() -> WebhookId {
        WebhookId(format!("wh_{:024x}", rand::random::<u128>() >> 32))
    }

    /// Parses the value of `field`.
    pub fn parse(field: &'static str, value: &str) -> Result<WebhookId, InvalidInput> {
        let ok = value.len() == 27
            && value.starts_with("wh_")
            && value[3..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if ok {
            Ok(WebhookId(value.to_string()))
        } else {
            Err(InvalidInput::new(
                field,
                format!(
                    "{:?} is not a webhook id; accepted: wh_ and 24 lowercase hex digits, as POST /v1/webhooks gave",
                    value.chars().take(64).collect::<String>()
                ),
            ))
        }
    }

    /// The id's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for WebhookId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The event types of an endpoint: each once, in the documentation's
/// order; all of them when the client gives none.
pub fn event_types(
    field: &'static str,
    given: Option<&[String]>,
) -> Result<Vec<EventType>, InvalidInput> {
    let Some(given) = given else {
        return Ok(EventType::ALL.to_vec());
    };
    if given.is_empty() {
        return Err(InvalidInput::new(
            field,
            format!(
                "it is empty; accepted: one or more of {}, or no {field} for all of them",
                EventType::ALL.map(EventType::as_str).join(", ")
            ),
        ));
    }
    let mut types = Vec::new();
    for t in given {
        types.push(EventType::parse(field, t)?);
    }
    Ok(EventType::ALL
        .into_iter()
        .filter(|t| types.contains(t))
        .collect())
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    /// Not delivered yet: due, being sent, or waiting for its next retry.
    Pending,
    /// A 2xx arrived.
    Succeeded,
    /// Every attempt of the schedule failed (`POST
    /// /v1/events/{id}/redeliver` sends it again).
    Failed,
}

impl DeliveryStatus {
    /// Every status.
    pub const ALL: [DeliveryStatus; 3] = [
        DeliveryStatus::Pending,
        DeliveryStatus::Succeeded,
        DeliveryStatus::Failed,
    ];

    /// The spelling in the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Succeeded => "succeeded",
            DeliveryStatus::Failed => "failed",
        }
    }

    /// Parses the value of `field`.
    pub fn parse(field: &'static str, value: &str) -> Result<DeliveryStatus, InvalidInput> {
        DeliveryStatus::ALL
            .into_iter()
            .find(|s| s.as_str() == value)
            .ok_or_else(|| {
                InvalidInput::new(
                    field,
                    format!(
                        "{:?} is not a delivery status; accepted: pending, succeeded, failed",
                        value.chars().take(64).collect::<String>()
                    ),
                )
            })
    }

    /// The database's spelling read back.
    pub fn from_db(s: &str) -> DeliveryStatus {
        DeliveryStatus::ALL
            .into_iter()
            .find(|d| d.as_str() == s)
            .unwrap_or(DeliveryStatus::Pending)
    }
}

/// A registered endpoint (never its secret).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Webhook {
    /// `wh_...`.
    pub id: String,
    /// Where deliveries are POSTed.
    pub url: String,
    /// The event types sent to it.
    pub event_types: Vec<EventType>,
    /// `enabled`, or `disabled` (after failing every attempt for
    /// INTEGRATIONS_WEBHOOK_DISABLE_AFTER; `POST .../enable` resumes it).
    #[schema(example = "enabled")]
    pub status: &'static str,
    /// When it was registered.
    #[serde(serialize_with = "rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: DateTime<Utc>,
    /// Since when every attempt has failed (null: the last one succeeded,
    /// or none was made).
    #[serde(serialize_with = "rfc3339_opt")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub failing_since: Option<DateTime<Utc>>,
    /// When it was disabled.
    #[serde(serialize_with = "rfc3339_opt")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub disabled_at: Option<DateTime<Utc>>,
    /// Why it was disabled.
    pub disabled_reason: Option<String>,
    /// Until when the secret before the last rotation still signs (null:
    /// no rotation overlaps now).
    #[serde(serialize_with = "rfc3339_opt")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub previous_secret_expires_at: Option<DateTime<Utc>>,
}

/// One event's delivery to one endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Delivery {
    /// The delivery's id (the `after` of the next page).
    pub id: i64,
    /// The event (its `webhook-id`).
    pub event_id: i64,
    /// The event's type.
    #[schema(value_type = String)]
    pub event_type: String,
    /// Where it stands.
    pub status: DeliveryStatus,
    /// Attempts made.
    pub attempts: i32,
    /// When the next attempt is due (pending only).
    #[serde(serialize_with = "rfc3339_opt")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// When the last attempt started.
    #[serde(serialize_with = "rfc3339_opt")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_attempt_at: Option<DateTime<Utc>>,
    /// The HTTP status the last attempt got (null: no answer).
    pub last_status: Option<i32>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// When the 2xx arrived.
    #[serde(serialize_with = "rfc3339_opt")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub delivered_at: Option<DateTime<Utc>>,
    /// When the event's transaction wrote it.
    #[serde(serialize_with = "rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_generated_and_parsed() {
        let id = WebhookId::generate();
        assert_eq!(WebhookId::parse("id", id.as_str()), Ok(id.clone()));
        assert_ne!(WebhookId::generate(), id);
        for bad in [
            "",
            "wh_",
            "wh_XYZ",
            "xx_000000000000000000000000",
            "wh_0000000000000000000000000",
        ] {
            let err = WebhookId::parse("id", bad).unwrap_err();
            assert!(err.reason.contains("24 lowercase hex"), "{err}");
        }
    }

    #[test]
    fn event_types_default_to_all_and_refuse_unknown_ones() {
        assert_eq!(event_types("event_types", None).unwrap(), EventType::ALL);
        let some = event_types(
            "event_types",
            Some(&[
                "integration.revoked".into(),
                "integration.error".into(),
                "integration.revoked".into(),
            ]),
        )
        .unwrap();
        assert_eq!(some, [EventType::Error, EventType::Revoked]);
        assert!(event_types("event_types", Some(&[])).is_err());
        let err = event_types("event_types", Some(&["revoked".into()])).unwrap_err();
        assert!(err.reason.contains("integration.revoked"), "{err}");
    }
}
