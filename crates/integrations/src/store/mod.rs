//! SQL, one file per table. Each statement is a `const` next to the function
//! that runs it and selects only the columns it needs; every function takes
//! a pooled connection, so the caller decides how long to hold it (never
//! across a call to a provider).

pub mod api_keys;
pub mod events;
pub mod integrations;
pub mod migrations;
pub mod oauth_pending;
pub mod oauth_states;
pub mod webhooks;
