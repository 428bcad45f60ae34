//! The service's types: identifiers that are valid by construction, and the
//! integration as callers see it (never with its tokens).

mod event;
mod ids;
mod integration;
mod view;
mod webhook;

pub use event::{
    event_limit, Event, EventCursor, EventData, EventError, EventType, DEFAULT_EVENT_LIMIT,
    MAX_EVENT_LIMIT,
};
pub use ids::{AccountId, InvalidInput, ProviderName, UserId};
pub use integration::{IntegrationStatus, Status};
pub(crate) use view::{rfc3339, rfc3339_opt};
pub use view::{IntegrationList, IntegrationView, Metadata, Scopes};
pub use webhook::{event_types, Delivery, DeliveryStatus, Webhook, WebhookId};
