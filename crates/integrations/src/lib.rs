//! Integrations Management System: users' third-party OAuth integrations kept
//! in PostgreSQL through the `db-pool` crate.
#![warn(missing_docs)]

pub mod changes;
pub mod cli;
pub mod crypto;
pub mod domain;
pub mod http;
pub mod oauth;
pub mod service;
pub mod settings;
pub mod store;
pub mod telemetry;
pub mod webhooks;
