//! The operators' load tool for Sluice (and any MQTT or HTTP broker).
//!
//! One run is: resolve credentials (`fleet`: provision through the admin
//! API, a tokens file, one shared token or none), open every connection
//! (`mqtt` / `http`, bounded concurrency), then send on a common clock
//! (`schedule`: message *i* of a connection has an intended send time, and
//! latency is measured from it, so a stalled server cannot hide behind a
//! stalled client), count and histogram everything (`stats`), and print a
//! summary (`report`). `verify` reads the data back through the admin API
//! and checks every acknowledged message is stored exactly once, byte for
//! byte; `ramp` raises the rate step by step and `plot` draws the result.
//! `stream_probe` measures the JetStream engine behind cluster mode alone.
//! `fanout` adds live-stream consumers to a run (`--consumers`) and
//! measures a stream's replay (`loadtest replay`). `procs` splits one MQTT
//! run over several client processes (`--procs`) and merges their results.

pub mod cli;
pub mod fanout;
pub mod fleet;
pub mod http;
pub mod mqtt;
pub mod mqtt_rumqttc;
pub mod payload;
pub mod plot;
pub mod procs;
pub mod ramp;
pub mod report;
pub mod run;
pub mod schedule;
pub mod stats;
pub mod stream_probe;
pub mod timer;
pub mod verify;
