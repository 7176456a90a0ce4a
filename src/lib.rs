//! Sluice: an IoT state broker. Devices post state over MQTT and
//! HTTP with scoped, attenuable tokens; accepted state is group-committed
//! into RocksDB before it is acknowledged. See ARCHITECTURE.md.
//!
//! Features: `server` (default) is the broker itself; `client` (default)
//! is the admin API client alone, which is all `loadtest` builds.

#[cfg(feature = "server")]
pub mod admin_token;
#[cfg(feature = "server")]
pub mod audit;
#[cfg(feature = "server")]
pub mod auth;
#[cfg(feature = "server")]
pub mod backup;
#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "server")]
pub mod cluster;
#[cfg(feature = "server")]
pub mod cluster_metrics;
#[cfg(feature = "server")]
pub mod composite;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod http;
#[cfg(feature = "server")]
pub mod ids;
#[cfg(feature = "server")]
pub mod ip_limit;
#[cfg(feature = "server")]
pub mod logging;
#[cfg(feature = "server")]
pub mod materialize;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod mqtt;
#[cfg(feature = "server")]
pub mod readiness;
#[cfg(feature = "server")]
pub mod reload;
#[cfg(feature = "server")]
pub mod secret;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod state;
#[cfg(feature = "server")]
pub mod store;
#[cfg(feature = "server")]
pub mod streams;
#[cfg(feature = "server")]
pub mod timefmt;
#[cfg(feature = "server")]
pub mod tls;
#[cfg(feature = "server")]
pub mod tokens;
#[cfg(feature = "server")]
pub mod writer;

#[cfg(feature = "server")]
pub use config::Config;
#[cfg(feature = "server")]
pub use server::{run, Listeners, ServeError};
