//! Sluice: an IoT state broker. Devices post state over MQTT and
//! HTTP with scoped, attenuable tokens; accepted state is group-committed
//! into RocksDB before it is acknowledged. See ARCHITECTURE.md.

pub mod admin_token;
pub mod auth;
pub mod backup;
pub mod client;
pub mod cluster;
pub mod cluster_metrics;
pub mod composite;
pub mod config;
pub mod http;
pub mod ids;
pub mod ip_limit;
pub mod logging;
pub mod materialize;
pub mod metrics;
pub mod mqtt;
pub mod reload;
pub mod secret;
pub mod server;
pub mod state;
pub mod store;
pub mod timefmt;
pub mod tls;
pub mod tokens;
pub mod writer;

pub use config::Config;
pub use server::{run, Listeners, ServeError};
