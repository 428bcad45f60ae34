//! The service's types: identifiers that are valid by construction, and the
//! integration as callers see it (never with its tokens).

mod ids;
mod integration;
mod view;

pub use ids::{AccountId, InvalidInput, ProviderName, UserId};
pub use integration::{IntegrationStatus, Status};
pub use view::{IntegrationList, IntegrationView, Metadata, Scopes};
