//! End-to-end tests: the real `integrations serve` process on a random port,
//! a real PostgreSQL and a fake OAuth provider, driven over HTTP. One module
//! per behaviour.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

mod auth;
mod connections;
mod dashboard;
mod deadline;
mod deploy_metrics;
mod embedded;
mod endpoints;
mod errors;
mod events;
mod instances;
mod metrics_labels;
mod pool_timeout;
mod readiness;
mod request_id;
mod shutdown;
mod webhooks;
