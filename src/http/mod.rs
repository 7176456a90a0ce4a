//! HTTP listeners: the device-facing ingest endpoint and the admin API.

pub mod admin;
pub mod audit;
pub mod backup;
pub mod cluster;
pub mod console;
pub mod device;
pub mod devices;
pub mod openapi;
pub mod read;
pub mod retention;
pub mod serve;
pub mod stream;
