//! Integrations Management System: users' third-party OAuth integrations kept
//! in PostgreSQL through the `db-pool` crate.
#![warn(missing_docs)]

pub mod cli;
pub mod crypto;
pub mod domain;
pub mod oauth;
pub mod service;
pub mod settings;
pub mod store;
