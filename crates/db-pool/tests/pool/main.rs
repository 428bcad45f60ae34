//! The pool against real PostgreSQL servers, one module per behaviour.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

mod cancellation;
mod close;
mod errors;
mod faults;
mod lifetimes;
mod limits;
mod pgbouncer;
mod pipeline;
mod recovery;
mod session;
mod statement_cache;
mod timeouts;
mod tls;
