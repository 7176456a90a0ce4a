//! MQTT listener (work in progress: accepts and closes until the MQTT issue
//! lands).

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry as PromRegistry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::Registry;
use crate::config::MqttConfig;
use crate::writer::IngestQueue;

pub struct MqttMetrics {}

impl MqttMetrics {
    pub fn register(_r: &mut PromRegistry) -> MqttMetrics {
        MqttMetrics {}
    }
}

pub struct MqttContext {
    pub registry: Arc<Registry>,
    pub queue: Arc<IngestQueue>,
    pub metrics: MqttMetrics,
    pub config: MqttConfig,
}

pub async fn serve(
    listener: TcpListener,
    _ctx: Arc<MqttContext>,
    stop: CancellationToken,
    _grace: Duration,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => drop(r),
        }
    }
}
