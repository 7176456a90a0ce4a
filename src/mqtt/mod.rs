//! The MQTT listener (3.1.1 and 5): a tokio accept loop and one task per
//! connection. Sluice owns its connections so it can authorize every
//! publish, acknowledge only after commit, and cut revoked sessions.
//!
//! Sessions are ingest-only and never stored: CONNACK always says "no
//! session present", Will messages are ignored, SUBSCRIBE is refused.

mod acks;
mod proto;
mod session;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytestring::ByteString;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as PromRegistry;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Registry;
use crate::config::MqttConfig;
use crate::metrics::Metrics;
use crate::writer::IngestQueue;

use proto::Refusal;
pub use proto::{Codec, Incoming, ProtoError, Publish};
pub use session::{check_publish, PublishRefusal};

/// See `MqttContext::refusals`.
const MAX_REFUSALS_IN_FLIGHT: usize = 64;

/// Everything a session needs, shared by all of them.
pub struct MqttContext {
    pub registry: Arc<Registry>,
    pub queue: Arc<IngestQueue>,
    pub metrics: MqttMetrics,
    /// Broker-wide metrics (rate-limit refusals are counted per token there).
    pub shared_metrics: Arc<Metrics>,
    pub config: MqttConfig,
    pub takeover: Takeover,
    /// One permit per session, shared by the plain and TLS listeners: over
    /// `mqtt.max_connections` a connection is refused with CONNACK "server
    /// busy" and closed.
    permits: Arc<Semaphore>,
    /// Connections over the limit that may be waiting for their CONNECT so
    /// they can be told "server busy"; beyond this many they are closed at
    /// once, so a flood cannot grow memory.
    refusals: Arc<Semaphore>,
    /// New connections per address (`mqtt.connect_rate_per_ip`).
    connects: crate::ip_limit::IpLimiter,
    /// Failed authentications per address (`mqtt.auth_failure_rate_per_ip`).
    auth_failures: crate::ip_limit::IpLimiter,
    /// Open connections per address (`mqtt.max_connections_per_ip`).
    per_ip: Arc<crate::ip_limit::IpConnections>,
}

impl MqttContext {
    pub fn new(
        registry: Arc<Registry>,
        queue: Arc<IngestQueue>,
        metrics: MqttMetrics,
        shared_metrics: Arc<Metrics>,
        config: MqttConfig,
    ) -> MqttContext {
        MqttContext {
            registry,
            queue,
            metrics,
            shared_metrics,
            permits: Arc::new(Semaphore::new(config.max_connections)),
            refusals: Arc::new(Semaphore::new(MAX_REFUSALS_IN_FLIGHT)),
            connects: crate::ip_limit::IpLimiter::new(
                config.connect_rate_per_ip,
                config.connect_burst_per_ip,
                config.ip_table_max,
            ),
            auth_failures: crate::ip_limit::IpLimiter::new(
                config.auth_failure_rate_per_ip,
                config.auth_failure_burst_per_ip,
                config.ip_table_max,
            ),
            per_ip: crate::ip_limit::IpConnections::new(config.max_connections_per_ip),
            config,
            takeover: Takeover::default(),
        }
    }

    fn rate_limited(&self, token_id: &str) {
        self.shared_metrics.rate_limited(token_id);
    }

    fn next_serial(&self) -> u64 {
        self.takeover.serial.fetch_add(1, Ordering::Relaxed)
    }
}

/// Client ids of live sessions. MQTT requires that a new connection with
/// the id of a live one disconnects the old one ("session taken over");
/// that also frees half-open connections of devices that reconnected.
#[derive(Default)]
pub struct Takeover {
    live: papaya::HashMap<ByteString, (u64, Arc<Notify>)>,
    serial: AtomicU64,
}

impl Takeover {
    fn register(&self, client_id: &ByteString) -> (u64, Arc<Notify>) {
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        let kick = Arc::new(Notify::new());
        let map = self.live.pin();
        if let Some((_, old)) = map.insert(client_id.clone(), (serial, kick.clone())) {
            // notify_one stores a permit, so the old session sees it even
            // if it is busy right now.
            old.notify_one();
        }
        (serial, kick)
    }

    fn unregister(&self, client_id: &ByteString, serial: u64) {
        let _ = self
            .live
            .pin()
            .remove_if(client_id, |_, (s, _)| *s == serial);
    }
}

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
}

const CONNECT_OUTCOMES: [(ConnectOutcome, &str); 7] = [
    (ConnectOutcome::Accepted, "accepted"),
    (ConnectOutcome::NotAuthorized, "not_authorized"),
    (ConnectOutcome::ServerBusy, "server_busy"),
    (ConnectOutcome::BadClientId, "bad_client_id"),
    (ConnectOutcome::Malformed, "malformed"),
    (ConnectOutcome::Timeout, "timeout"),
    (ConnectOutcome::RateLimited, "rate_limited"),
];

/// Outcome of a PUBLISH, as counted in metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublishOutcome {
    Accepted,
    NotAuthorized,
    BadPayload,
    QuotaExceeded,
    QosUnsupported,
}

const PUBLISH_OUTCOMES: [(PublishOutcome, &str); 5] = [
    (PublishOutcome::Accepted, "accepted"),
    (PublishOutcome::NotAuthorized, "not_authorized"),
    (PublishOutcome::BadPayload, "bad_payload"),
    (PublishOutcome::QuotaExceeded, "quota_exceeded"),
    (PublishOutcome::QosUnsupported, "qos_unsupported"),
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

    fn open_connection(&self) -> OpenConnection<'_> {
        self.open.inc();
        OpenConnection(&self.open)
    }
}

/// Decrements the open-connections gauge when a session ends, however.
struct OpenConnection<'a>(&'a Gauge);

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Accepts MQTT connections (over TLS when `tls` is given) until `stop`,
/// then lets sessions finish their in-flight QoS 1 publishes (up to
/// `grace`) before closing them.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    ctx: Arc<MqttContext>,
    stop: CancellationToken,
    grace: Duration,
) {
    let sessions = TaskTracker::new();
    let hard_stop = CancellationToken::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "MQTT accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let over_rate = ctx.connects.take(peer.ip()).is_err();
        // Over its address's share (`mqtt.max_connections_per_ip`) a
        // connection is refused as "server busy", like one over the limit.
        let ip_permit = match over_rate {
            true => None,
            false => ctx.per_ip.try_open(peer.ip()).ok(),
        };
        let permit = match ip_permit {
            None => None,
            Some(_) => ctx.permits.clone().try_acquire_owned().ok(),
        };
        let refusal = match permit {
            Some(_) => None,
            None => match ctx.refusals.clone().try_acquire_owned() {
                Ok(r) => Some(r),
                Err(_) => {
                    ctx.metrics.connect(match over_rate {
                        true => ConnectOutcome::RateLimited,
                        false => ConnectOutcome::ServerBusy,
                    });
                    continue;
                }
            },
        };
        let admit = match (permit.is_some(), over_rate) {
            (true, _) => Admit::Session(peer.ip()),
            (false, true) => Admit::Refuse(Refusal::RateLimited),
            (false, false) => Admit::Refuse(Refusal::ServerBusy),
        };
        let ctx = ctx.clone();
        let stop = stop.clone();
        let hard_stop = hard_stop.clone();
        let tls = tls.clone();
        sessions.spawn(async move {
            match tls {
                None => serve_one(stream, ctx, stop, hard_stop, admit).await,
                Some(acceptor) => {
                    // The handshake counts against the CONNECT timeout.
                    match tokio::time::timeout(ctx.config.connect_timeout, acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(s)) => serve_one(s, ctx, stop, hard_stop, admit).await,
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "MQTT TLS handshake failed");
                            ctx.metrics.connect(ConnectOutcome::Malformed);
                        }
                        Err(_) => ctx.metrics.connect(ConnectOutcome::Timeout),
                    }
                }
            }
            drop(permit);
            drop(ip_permit);
            drop(refusal);
        });
    }
    drop(listener);
    sessions.close();
    if tokio::time::timeout(grace, sessions.wait()).await.is_err() {
        tracing::warn!("MQTT sessions still open after the shutdown grace period; closing them");
        hard_stop.cancel();
        sessions.wait().await;
    }
}

/// What to do with an accepted connection.
#[derive(Clone, Copy)]
enum Admit {
    Session(std::net::IpAddr),
    Refuse(Refusal),
}

async fn serve_one<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    ctx: Arc<MqttContext>,
    stop: CancellationToken,
    hard_stop: CancellationToken,
    admit: Admit,
) {
    match admit {
        Admit::Session(ip) => session::run(stream, ip, ctx, stop, hard_stop).await,
        Admit::Refuse(why) => session::refuse(stream, ctx, why).await,
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    /// Idle sessions must stay small (the target is ≤ 16 KiB of RSS per
    /// idle connection): the session's future is most of what a connection
    /// costs besides its read buffer, so keep large arrays out of it.
    #[test]
    fn session_future_stays_small() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path(), crate::config::SyncMode::None).unwrap();
        let mut m = Metrics::new();
        let mm = MqttMetrics::register(m.registry_mut());
        let m = Arc::new(m);
        let w = crate::writer::Writer::start(
            store,
            crate::writer::WriterConfig::new(&crate::Config::default()),
            m.clone(),
            Arc::default(),
        )
        .unwrap();
        let size = rt.block_on(async {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let s = tokio::net::TcpStream::connect(l.local_addr().unwrap())
                .await
                .unwrap();
            let ctx = Arc::new(MqttContext::new(
                Arc::new(Registry::new()),
                w.queue(),
                mm,
                m,
                crate::Config::default().mqtt,
            ));
            let admit = Admit::Session("127.0.0.1".parse().unwrap());
            let f = serve_one(
                s,
                ctx,
                CancellationToken::new(),
                CancellationToken::new(),
                admit,
            );
            std::mem::size_of_val(&f)
        });
        w.stop().unwrap();
        assert!(size <= 3072, "session future is {size} bytes");
    }
}
