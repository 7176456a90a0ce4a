//! The MQTT listener (3.1.1 and 5): a tokio accept loop and one task per
//! connection. Sluice owns its connections so it can authorize every
//! publish, acknowledge only after commit, and cut revoked sessions.
//!
//! Devices publish state; tokens with `device.getState` may subscribe to
//! their application's committed states (`subscribe.rs`, `deliver.rs`, fed
//! by `streams`), and their sessions may persist (`streams::sessions`).
//! Will messages are never published.
//!
//! A connection goes through `connect.rs` (CONNECT, token, stored session,
//! CONNACK), then `session.rs` (the event loop), which hands each PUBLISH
//! to `publish.rs` (the per-publish hot path) and owes PUBACKs in the
//! order `acks.rs` keeps. `takeover.rs` maps live sessions by application
//! and client id; `proto.rs` is the only file that knows the codec.

mod acks;
mod connect;
mod deliver;
mod metrics;
mod proto;
mod publish;
mod session;
mod subscribe;
mod takeover;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use ring::rand::SystemRandom;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Registry;
use crate::config::{MqttConfig, StreamsConfig};
use crate::metrics::Metrics;
use crate::store::Store;
use crate::streams::group::Groups;
use crate::streams::sessions::Sessions;
use crate::streams::{Hub, ReadBounds};
use crate::writer::IngestQueue;

pub use metrics::{ConnectOutcome, MqttMetrics, PublishOutcome};
pub use proto::{Codec, Goodbye, Incoming, ProtoError, Publish, Refusal, SubAck, UnsubAck};
pub use publish::{check_publish, PublishRefusal};
use takeover::Takeover;

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
    /// Subscriptions read committed states through these.
    pub hub: Arc<Hub>,
    pub store: Store,
    /// Stored (persistent) sessions.
    pub sessions: Arc<Sessions>,
    pub streams: StreamsConfig,
    /// See [`Streams::readable`].
    pub readable: bool,
    /// Subscribers' feeds and shared-subscription dispatchers. A feed
    /// outlives its session by the moment it takes to write its final
    /// position; shutdown waits for them.
    pub feeds: TaskTracker,
    /// Shared subscriptions.
    pub groups: Arc<Groups>,
    /// Live sessions by application and client id (session takeover).
    takeover: Takeover,
    /// For client ids assigned to clients that send none.
    rng: SystemRandom,
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

/// What subscriptions need, for [`MqttContext::new`].
pub struct Streams {
    pub hub: Arc<Hub>,
    pub store: Store,
    pub sessions: Arc<Sessions>,
    pub config: StreamsConfig,
    /// False on an ingest-only broker (cluster mode, `cluster.materialize
    /// = false`): it keeps no log, so SUBSCRIBE is refused.
    pub readable: bool,
}

impl MqttContext {
    pub fn new(
        registry: Arc<Registry>,
        queue: Arc<IngestQueue>,
        metrics: MqttMetrics,
        shared_metrics: Arc<Metrics>,
        config: MqttConfig,
        streams: Streams,
    ) -> MqttContext {
        let feeds = TaskTracker::new();
        let groups = Groups::new(
            streams.hub.clone(),
            streams.store.clone(),
            streams.sessions.clone(),
            ReadBounds {
                max_entries: subscribe::REPLAY_PAGE_STATES,
                max_bytes: streams.config.consumer_buffer_bytes,
            },
            streams.config.session_flush,
            feeds.clone(),
        );
        MqttContext {
            registry,
            queue,
            metrics,
            shared_metrics,
            hub: streams.hub,
            store: streams.store,
            sessions: streams.sessions,
            streams: streams.config,
            readable: streams.readable,
            feeds,
            groups,
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
            rng: SystemRandom::new(),
        }
    }

    /// The most of a CONNECT that is buffered before the client has
    /// authenticated: `mqtt.max_connect_bytes`, and never more than any
    /// packet may be.
    fn connect_limit(&self) -> u32 {
        self.config
            .max_connect_bytes
            .min(self.config.max_packet_bytes)
    }

    /// `streams.session_expiry_max` in seconds (validated to fit).
    fn session_expiry_max(&self) -> u32 {
        self.streams
            .session_expiry_max
            .as_secs()
            .min(u64::from(u32::MAX)) as u32
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
                // On the heap: a TLS stream and its session are several
                // times the size of a plain one, and every task is as large
                // as its largest variant.
                Some(acceptor) => {
                    Box::pin(async {
                        // The handshake counts against the CONNECT timeout.
                        match tokio::time::timeout(
                            ctx.config.connect_timeout,
                            acceptor.accept(stream),
                        )
                        .await
                        {
                            Ok(Ok(s)) => serve_one(s, ctx, stop, hard_stop, admit).await,
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, "MQTT TLS handshake failed");
                                ctx.metrics.connect(ConnectOutcome::Malformed);
                            }
                            Err(_) => ctx.metrics.connect(ConnectOutcome::Timeout),
                        }
                    })
                    .await
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
    // Every session has ended, so every feed is ending: let them write
    // their subscribers' positions. Both listeners share the tracker; the
    // second to get here finds it empty.
    ctx.feeds.close();
    ctx.feeds.wait().await;
}

/// What to do with an accepted connection.
#[derive(Clone, Copy)]
enum Admit {
    Session(std::net::IpAddr),
    Refuse(Refusal),
}

async fn serve_one<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    ctx: Arc<MqttContext>,
    stop: CancellationToken,
    hard_stop: CancellationToken,
    admit: Admit,
) {
    match admit {
        Admit::Session(ip) => {
            // Before CONNECT succeeds, no more than the CONNECT limit is
            // buffered (see `connect::read_connect`).
            let cfg = &ctx.config;
            let initial = cfg.read_buffer_bytes.min(ctx.connect_limit() as usize);
            let mut buf = BytesMut::with_capacity(initial);
            // A handshake can take up to twice `mqtt.connect_timeout` (the
            // CONNECT, then a failed-auth hold); past the shutdown grace
            // period it is cut like a session.
            let accepted = tokio::select! {
                a = connect::handshake(&mut stream, &mut buf, ip, &ctx) => a,
                _ = hard_stop.cancelled() => None,
            };
            if let Some(accepted) = accepted {
                session::run(stream, buf, accepted, &ctx, &stop, &hard_stop).await;
            }
        }
        Admit::Refuse(why) => connect::refuse(stream, ctx, why).await,
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
        let hub = Arc::new(crate::streams::Hub::new(1 << 20, Default::default()));
        let w = crate::writer::Writer::start(
            store.clone(),
            crate::writer::WriterConfig::new(&crate::Config::default()),
            m.clone(),
            Arc::default(),
            hub.clone(),
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
                Streams {
                    hub: hub.clone(),
                    store: store.clone(),
                    sessions: Sessions::load(store.clone(), 1, 1, Duration::from_secs(1)).unwrap(),
                    config: crate::Config::default().streams,
                    readable: true,
                },
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
