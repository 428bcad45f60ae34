//! The integrations service against a real PostgreSQL and a real HTTP token
//! endpoint on 127.0.0.1, one module per behaviour.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

mod batch;
mod cache;
mod connect_flow;
mod dead_connections;
mod encryption;
mod events;
mod limits;
mod refresh;
mod refresher;
mod storage;
