//! The service's types: identifiers that are valid by construction, and the
//! integration as callers see it (never with its tokens).

mod ids;
mod integration;

pub use ids::{AccountId, InvalidInput, ProviderName, UserId};
pub use integration::{IntegrationStatus, Status};
