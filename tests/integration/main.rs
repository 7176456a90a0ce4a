//! Integration tests: the real `sluice` binary on port 0 with a temp data
//! dir, driven by real HTTP (and MQTT) clients over loopback. One test
//! binary keeps link time down; each module is one area of the contract.

mod common;

mod admin_cancel;
mod audit;
mod backup;
mod bad_input;
mod cli;
mod cluster_ingest;
mod cluster_ingest_chaos;
mod cluster_removals;
mod cluster_tokens;
mod console;
mod crash;
mod deploy;
mod devices;
mod full_disk;
mod hostile;
mod http2;
mod http_ingest;
mod ingest_limits;
mod isolation;
mod lifecycle;
mod listeners;
mod mqtt;
mod mqtt_conformance;
mod mqtt_raw;
mod mqtt_sessions;
mod nats;
mod nats_kv;
mod nats_registry;
mod nats_stream;
mod openapi;
mod rate_limits;
mod readiness;
mod reload;
mod retention;
mod secrets;
mod streams_mqtt;
mod streams_sse;
mod tls;
mod token_props;
mod tokens_api;
