//! MQTT metrics: sessions open, CONNECT and PUBLISH outcomes, revoked
//! sessions. Every counter is resolved at start-up, so counting is one
//! atomic add.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as PromRegistry;

/// Outcome of a CONNECT, as counted in metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectOutcome {
    Accepted,
    NotAuthorized,
    ServerBusy,
    BadClientId,
    Malformed,
    Timeout,
    RateLimited,
    /// A protocol level Sluice does not speak.
    UnsupportedVersion,
    /// A CONNECT over `mqtt.max_connect_bytes`.
    TooLarge,
    /// MQTT 5 features Sluice refuses at CONNECT: enhanced authentication,
    /// a Will of QoS 2, a retained Will.
    Unsupported,
    /// Cluster mode: this broker's view of the cluster's tokens is stale.
    Unavailable,
}

const CONNECT_OUTCOMES: [(ConnectOutcome, &str); 11] = [
    (ConnectOutcome::Accepted, "accepted"),
    (ConnectOutcome::NotAuthorized, "not_authorized"),
    (ConnectOutcome::ServerBusy, "server_busy"),
    (ConnectOutcome::BadClientId, "bad_client_id"),
    (ConnectOutcome::Malformed, "malformed"),
    (ConnectOutcome::Timeout, "timeout"),
    (ConnectOutcome::RateLimited, "rate_limited"),
    (ConnectOutcome::UnsupportedVersion, "unsupported_version"),
    (ConnectOutcome::TooLarge, "too_large"),
    (ConnectOutcome::Unsupported, "unsupported_feature"),
    (ConnectOutcome::Unavailable, "unavailable"),
];

/// Outcome of a PUBLISH, as counted in metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublishOutcome {
    Accepted,
    NotAuthorized,
    BadPayload,
    QuotaExceeded,
    QosUnsupported,
    /// Cluster mode: this broker's view of the cluster's tokens is stale.
    Unavailable,
}

const PUBLISH_OUTCOMES: [(PublishOutcome, &str); 6] = [
    (PublishOutcome::Accepted, "accepted"),
    (PublishOutcome::NotAuthorized, "not_authorized"),
    (PublishOutcome::BadPayload, "bad_payload"),
    (PublishOutcome::QuotaExceeded, "quota_exceeded"),
    (PublishOutcome::QosUnsupported, "qos_unsupported"),
    (PublishOutcome::Unavailable, "unavailable"),
];

/// MQTT metrics; every counter is resolved at start-up.
pub struct MqttMetrics {
    open: Gauge,
    connects: Vec<Counter>,
    /// Indexed by QoS (0..=2), then outcome.
    publishes: Vec<Vec<Counter>>,
    pub revoked: Counter,
}

type Labels = Vec<(String, String)>;

impl MqttMetrics {
    pub fn register(r: &mut PromRegistry) -> MqttMetrics {
        let open = Gauge::default();
        r.register(
            "sluice_mqtt_connections",
            "Open MQTT sessions",
            open.clone(),
        );
        let connects = Family::<Labels, Counter>::default();
        r.register(
            "sluice_mqtt_connects",
            "MQTT CONNECT attempts by outcome",
            connects.clone(),
        );
        let publishes = Family::<Labels, Counter>::default();
        r.register(
            "sluice_mqtt_publishes",
            "MQTT PUBLISH packets by QoS and outcome",
            publishes.clone(),
        );
        let revoked = Counter::default();
        r.register(
            "sluice_mqtt_sessions_revoked",
            "MQTT sessions closed because their token was revoked or expired",
            revoked.clone(),
        );
        let label = |k: &str, v: &str| (k.to_string(), v.to_string());
        MqttMetrics {
            open,
            connects: CONNECT_OUTCOMES
                .iter()
                .map(|(_, n)| connects.get_or_create_owned(&vec![label("outcome", n)]))
                .collect(),
            publishes: (0..3)
                .map(|q: u8| {
                    PUBLISH_OUTCOMES
                        .iter()
                        .map(|(_, n)| {
                            publishes.get_or_create_owned(&vec![
                                label("qos", &q.to_string()),
                                label("outcome", n),
                            ])
                        })
                        .collect()
                })
                .collect(),
            revoked,
        }
    }

    pub fn connect(&self, o: ConnectOutcome) {
        if let Some(i) = CONNECT_OUTCOMES.iter().position(|(x, _)| *x == o) {
            self.connects[i].inc();
        }
    }

    pub fn publish(&self, qos: u8, o: PublishOutcome) {
        if let (Some(per_qos), Some(i)) = (
            self.publishes.get(qos as usize),
            PUBLISH_OUTCOMES.iter().position(|(x, _)| *x == o),
        ) {
            per_qos[i].inc();
        }
    }

    pub(super) fn open_connection(&self) -> OpenConnection<'_> {
        self.open.inc();
        OpenConnection(&self.open)
    }
}

/// Decrements the open-connections gauge when a session ends, however.
pub(super) struct OpenConnection<'a>(&'a Gauge);

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}
