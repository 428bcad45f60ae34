#![doc = include_str!("../README.md")]
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod config;
pub mod diagnostics;
pub mod error;
pub mod pool;
#[cfg(feature = "testing")]
pub mod testing;

pub use config::{ConfigError, Defaults, Host, PoolConfig, Profile, Source, SslAccept, SslMode};
pub use error::Error;
pub use pool::{
    describe_metrics, init_metrics, CloseReason, Conn, ListenEvent, Listener, Param, Pool,
    PoolStats, Transaction,
};
pub use tokio_postgres;
pub use tokio_postgres::{types, Row};
