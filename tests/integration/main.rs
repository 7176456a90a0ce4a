//! Integration tests: the real `sluice` binary on port 0 with a temp data
//! dir, driven by real HTTP (and MQTT) clients over loopback. One test
//! binary keeps link time down; each module is one area of the contract.

mod common;

mod admin_cancel;
mod bad_input;
mod cli;
mod crash;
mod hostile;
mod http_ingest;
mod lifecycle;
mod mqtt;
mod rate_limits;
mod secrets;
mod tls;
mod token_props;
mod tokens_api;
