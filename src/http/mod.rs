//! HTTP listeners: the device-facing ingest endpoint and the admin API.

pub mod admin;
pub mod backup;
pub mod console;
pub mod device;
pub mod read;
pub mod serve;
pub mod stream;
