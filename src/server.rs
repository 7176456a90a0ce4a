//! Wiring: open the store, load tokens, start the writer and the listeners,
//! announce the ports, and shut down in the order that loses nothing.

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin_token;
use crate::auth::Registry;
use crate::cluster_metrics::ClusterMetrics;
use crate::config::{Config, Open};
use crate::http::admin::{router, AdminApi};
use crate::http::device::{DeviceApi, DeviceService};
use crate::http::read::{router as read_router, ReadApi, WithPeer};
use crate::http::serve::{serve, Http2Limits, HttpLimits};
use crate::ip_limit::{IpConnections, IpLimiter};
use crate::materialize::applied::ReadModel;
use crate::materialize::status::IngestView;
use crate::materialize::{Materializer, MaterializerSpec};
use crate::metrics::Metrics;
use crate::mqtt;
use crate::readiness::{Readiness, TokenView};
use crate::store::{Store, StoreError, StoreOptions};
use crate::streams::sessions::{Sessions, SWEEP_EVERY};
use crate::streams::{Hub, StreamSlots};
use crate::tokens::{Plane, PlaneConfig, PlaneMetrics, TokenError, TokenLimits, TokenService};
use crate::writer::{Health, Writer, WriterConfig};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen for {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tokens(#[from] TokenError),
    #[error(transparent)]
    AdminToken(#[from] admin_token::AdminTokenError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    NodeId(#[from] crate::cluster::node_id::NodeIdError),
    #[error(transparent)]
    ClusterConnect(#[from] crate::cluster::connect::ConnectError),
    #[error("internal: {0}")]
    Internal(String),
    /// Cluster mode could not start: NATS, the ingest stream or the read
    /// model refused.
    #[error("cluster mode: {0}")]
    Cluster(String),
    /// The writer thread ended while serving: nothing would drain the
    /// queue, so the process exits (non-zero) rather than accept requests
    /// it can never answer.
    #[error("the writer thread stopped unexpectedly ({0}); exiting")]
    WriterDied(String),
}

/// The bound sockets. Binding is separate from running so a caller (a test)
/// can bind port 0 and learn the addresses first. A device listener the
/// configuration turns off (see `Config::mqtt_open` and friends) is `None`
/// and never bound.
pub struct Listeners {
    pub mqtt: Option<TcpListener>,
    /// HTTPS when TLS is configured.
    pub http: Option<TcpListener>,
    pub admin: TcpListener,
    /// MQTT over TLS.
    pub mqtts: Option<TcpListener>,
    /// Whether `http` serves HTTPS, so it is announced as what it is.
    https: bool,
}

impl Listeners {
    pub async fn bind(c: &Config) -> Result<Listeners, ServeError> {
        fn one(
            what: &'static str,
            addr: SocketAddr,
            backlog: u32,
        ) -> Result<TcpListener, ServeError> {
            let err = |source| ServeError::Bind { what, addr, source };
            let socket = match addr {
                SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
                SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
            }
            .map_err(err)?;
            socket.set_reuseaddr(true).map_err(err)?;
            socket.bind(addr).map_err(err)?;
            // The std/mio default of 128 drops SYNs when a fleet reconnects
            // at once; the kernel still caps this at net.core.somaxconn.
            socket.listen(backlog).map_err(err)
        }
        let device = |what: &'static str,
                      open: Open,
                      addr: SocketAddr,
                      backlog: u32|
         -> Result<Option<TcpListener>, ServeError> {
            match open {
                Open::Yes => one(what, addr, backlog).map(Some),
                Open::No(why) => {
                    tracing::info!(listener = what, reason = why, "listener off");
                    Ok(None)
                }
            }
        };
        let https = c.tls.enabled();
        let listeners = Listeners {
            mqtt: device("mqtt", c.mqtt_open(), c.mqtt.listen, c.mqtt.listen_backlog)?,
            http: device(
                if https { "https" } else { "http" },
                c.http_open(),
                c.http.listen,
                c.http.listen_backlog,
            )?,
            admin: one("admin", c.admin.listen, 128)?,
            mqtts: device(
                "mqtts",
                c.mqtts_open(),
                c.tls.mqtts_listen,
                c.mqtt.listen_backlog,
            )?,
            https,
        };
        if listeners.mqtt.is_none() && listeners.http.is_none() && listeners.mqtts.is_none() {
            tracing::warn!("every device listener is off: nothing can send state");
        }
        Ok(listeners)
    }

    /// What is open, in announcement order.
    fn addrs(&self) -> Vec<(&'static str, SocketAddr)> {
        let addr = |l: &TcpListener| {
            l.local_addr()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
        };
        let http = if self.https { "https" } else { "http" };
        [
            ("mqtt", self.mqtt.as_ref()),
            (http, self.http.as_ref()),
            ("admin", Some(&self.admin)),
            ("mqtts", self.mqtts.as_ref()),
        ]
        .into_iter()
        .filter_map(|(name, l)| l.map(|l| (name, addr(l))))
        .collect()
    }
}

/// Runs the broker until `shutdown` resolves, then drains: listeners stop
/// accepting, in-flight requests finish (up to `shutdown.grace`), the
/// writer commits and syncs what is queued, and `run` returns. Each
/// configuration sent on `reloads` (SIGHUP) is applied as far as a running
/// broker can (see `reload`).
pub async fn run(
    config: Config,
    listeners: Listeners,
    admin_token_env: Option<String>,
    shutdown: impl Future<Output = ()>,
    reloads: tokio::sync::watch::Receiver<Config>,
) -> Result<(), ServeError> {
    let data_dir = config.storage.data_dir.clone();
    std::fs::create_dir_all(&data_dir).map_err(|source| ServeError::DataDir {
        path: data_dir.clone(),
        source,
    })?;

    let tls = match config.tls.enabled() {
        true => Some(crate::tls::Acceptors::load(
            &config.tls.cert,
            &config.tls.key,
            config.http.http2,
        )?),
        false => None,
    };
    let (root_hash, source) = admin_token::bootstrap(&data_dir, admin_token_env.as_deref())?;
    match &source {
        admin_token::Source::Env => {
            tracing::info!("root admin token taken from SLUICE_ADMIN_TOKEN")
        }
        admin_token::Source::File(p) => {
            tracing::info!(path = %p.display(), "root admin token read from file")
        }
        admin_token::Source::Generated(p) => {
            tracing::info!(path = %p.display(), "root admin token generated and written (mode 0600)")
        }
    }

    let store = {
        let dir = data_dir.join("db");
        let options = StoreOptions::new(&config);
        tokio::task::spawn_blocking(move || Store::open_with(&dir, &options))
            .await
            .map_err(|e| ServeError::Internal(e.to_string()))??
    };
    let registry = Arc::new(Registry::new());
    registry.set_root(root_hash);
    let mut metrics = Metrics::new();
    let limits = TokenLimits::from(&config.tokens);
    // One NATS connection per broker, shared by the token plane and the
    // ingest log.
    let link = match config.cluster.enabled() {
        true => Some(ClusterLink::connect(&config, &data_dir).await?),
        false => None,
    };
    let tokens = Arc::new(match &link {
        None => TokenService::load(store.clone(), registry.clone(), limits)?,
        Some(link) => {
            cluster_tokens(&config, link, &store, &registry, limits, &mut metrics).await?
        }
    });
    tracing::info!(tokens = registry.len(), "token cache loaded");

    let mqtt_metrics = mqtt::MqttMetrics::register(metrics.registry_mut());
    let cluster_metrics = link
        .as_ref()
        .map(|_| ClusterMetrics::register(metrics.registry_mut()));
    let metrics = Arc::new(metrics);
    let health = Arc::new(Health::default());
    let hub = Arc::new(Hub::new(
        config.streams.live_buffer_bytes,
        metrics.stream_lags.clone(),
    ));
    let (writer, ingest) = match link.zip(cluster_metrics) {
        None => (
            Writer::start(
                store.clone(),
                WriterConfig::new(&config),
                metrics.clone(),
                health.clone(),
                hub.clone(),
            )?,
            None,
        ),
        Some((link, cm)) => {
            let (sink, ingest) = ClusterIngest::start(
                &config,
                link,
                &store,
                metrics.clone(),
                cm,
                health.clone(),
                hub.clone(),
            )
            .await?;
            let writer = Writer::start_clustered(
                store.clone(),
                WriterConfig::new(&config),
                metrics.clone(),
                health.clone(),
                hub.clone(),
                sink,
            )?;
            (writer, Some(ingest))
        }
    };
    let (read_model, ingest_view, materializer, control) = match ingest {
        None => (ReadModel::Local, None, None, None),
        Some(i) => (i.read_model, Some(i.view), i.materializer, Some(i.control)),
    };
    let queue = writer.queue();
    let writer_exited = writer.exited();

    let addrs = listeners.addrs();
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let grace = config.shutdown.grace;

    let mut readiness = Readiness::standalone(
        store.clone(),
        health.clone(),
        writer.exit_flag(),
        stop.clone(),
    );
    if config.cluster.enabled() {
        readiness.add(TokenView {
            registry: registry.clone(),
        });
    }
    let readiness = Arc::new(readiness);

    let sessions = {
        let (store, s) = (store.clone(), &config.streams);
        let (per_app, total, expiry) =
            (s.max_sessions_per_app, s.max_sessions, s.session_expiry_max);
        tokio::task::spawn_blocking(move || Sessions::load(store, per_app, total, expiry))
            .await
            .map_err(|e| ServeError::Internal(e.to_string()))?
            .map_err(|e| ServeError::Internal(format!("stored sessions: {e}")))?
    };
    tracing::info!(sessions = sessions.len(), "stored MQTT sessions loaded");

    let slots = StreamSlots::new(
        config.streams.max_streams_per_token,
        config.streams.max_streams_per_ip,
    );
    let read_api = |root_allowed| {
        Arc::new(ReadApi {
            registry: registry.clone(),
            store: store.clone(),
            hub: hub.clone(),
            metrics: metrics.clone(),
            root_allowed,
            max_response_bytes: config.admin.max_response_bytes,
            streams: config.streams.clone(),
            slots: slots.clone(),
            stop: stop.clone(),
            read_model: read_model.clone(),
        })
    };
    let device = Arc::new(DeviceApi {
        read: hyper_util::service::TowerToHyperService::new(read_router(read_api(false))),
        registry: registry.clone(),
        queue: queue.clone(),
        metrics: metrics.clone(),
        readiness: readiness.clone(),
        auth_failures: IpLimiter::new(
            config.http.auth_failure_rate_per_ip,
            config.http.auth_failure_burst_per_ip,
            config.http.ip_table_max,
        ),
        max_hold: config.http.header_read_timeout,
        max_body_bytes: config.http.max_body_bytes,
        body_read_timeout: config.http.body_read_timeout,
        body_budget: tokio::sync::Semaphore::new(config.http.max_buffered_body_bytes),
    });
    if let Some(l) = listeners.http {
        tasks.spawn(serve(
            l,
            tls.as_ref().map(|t| t.http.clone()),
            move |peer| DeviceService {
                api: device.clone(),
                peer,
            },
            HttpLimits {
                max_connections: config.http.max_connections,
                header_read_timeout: config.http.header_read_timeout,
                max_header_bytes: Some(config.http.max_header_bytes),
                http2: config.http.http2.then_some(Http2Limits {
                    max_concurrent_streams: config.http.h2_max_concurrent_streams,
                    // At most MAX_HEADER_BYTES (`Config::validate`).
                    max_header_list_bytes: config.http.max_header_bytes as u32,
                    window_bytes: config.http.h2_window_bytes,
                }),
                per_ip: IpConnections::new(config.http.max_connections_per_ip),
                refused: metrics.http_connections_refused.clone(),
            },
            stop.clone(),
            grace,
            "http",
        ));
    }

    let admin = hyper_util::service::TowerToHyperService::new(router(
        Arc::new(AdminApi {
            tokens: tokens.clone(),
            store: store.clone(),
            metrics: metrics.clone(),
            queue: queue.clone(),
            backups: crate::backup::Backups::new(store.clone(), &data_dir.join("db")),
            readiness,
            sessions: sessions.clone(),
            max_response_bytes: config.admin.max_response_bytes,
            audit_max_page: config.audit.max_page,
            read_model: read_model.clone(),
            ingest_view,
            control,
        }),
        read_api(true),
        config.admin.max_body_bytes,
    ));
    tasks.spawn(serve(
        listeners.admin,
        None,
        move |peer| WithPeer {
            inner: admin.clone(),
            peer,
        },
        HttpLimits {
            max_connections: config.admin.max_connections,
            header_read_timeout: config.http.header_read_timeout,
            // The admin listener keeps hyper's defaults and HTTP/1.1 only.
            max_header_bytes: None,
            http2: None,
            // The admin listener is the operator's (loopback by default):
            // no per-address limit.
            per_ip: IpConnections::new(0),
            refused: Default::default(),
        },
        stop.clone(),
        grace,
        "admin",
    ));

    let mqtt_ctx = Arc::new(mqtt::MqttContext::new(
        registry.clone(),
        queue.clone(),
        mqtt_metrics,
        metrics.clone(),
        config.mqtt.clone(),
        mqtt::Streams {
            hub: hub.clone(),
            store: store.clone(),
            sessions: sessions.clone(),
            config: config.streams.clone(),
            readable: !matches!(read_model, ReadModel::Absent),
        },
    ));
    if let Some(l) = listeners.mqtt {
        tasks.spawn(mqtt::serve(l, None, mqtt_ctx.clone(), stop.clone(), grace));
    }
    if let (Some(l), Some(t)) = (listeners.mqtts, &tls) {
        tasks.spawn(mqtt::serve(
            l,
            Some(t.mqtt.clone()),
            mqtt_ctx,
            stop.clone(),
            grace,
        ));
    }

    let flusher = {
        let tokens = tokens.clone();
        let stop = stop.clone();
        let every = config.tokens.last_used_flush;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(every) => {
                        if let Err(e) = tokens.flush_last_used().await {
                            tracing::warn!(error = %e, "lastUsedAt flush failed");
                        }
                    }
                }
            }
        })
    };

    let sweeper = {
        let stop = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(SWEEP_EVERY) => {
                        let s = sessions.clone();
                        match tokio::task::spawn_blocking(move || s.sweep()).await {
                            Ok(Ok(n)) if n > 0 => tracing::info!(sessions = n, "expired MQTT sessions deleted"),
                            Ok(Err(e)) => tracing::warn!(error = %e, "expired MQTT sessions not deleted"),
                            _ => {}
                        }
                    }
                }
            }
        })
    };

    tokio::spawn(crate::reload::watch(
        config.clone(),
        reloads,
        tls.clone(),
        stop.clone(),
    ));

    announce(&data_dir, &addrs)?;
    tracing::info!("serving");

    tokio::select! {
        _ = shutdown => {}
        _ = writer_exited => {
            stop.cancel();
            let why = match tokio::task::spawn_blocking(move || writer.stop()).await {
                Ok(Err(e)) => e.to_string(),
                Ok(Ok(())) => "it returned".to_string(),
                Err(e) => e.to_string(),
            };
            tracing::error!(error = %why, "the writer thread died; exiting");
            return Err(ServeError::WriterDied(why));
        }
    }
    tracing::info!("shutting down: draining connections");
    stop.cancel();
    tasks.close();
    tasks.wait().await;
    let _ = flusher.await;
    let _ = sweeper.await;
    tokens.leave().await;
    tracing::info!("committing the last batch");
    tokio::task::spawn_blocking(move || writer.stop())
        .await
        .map_err(|e| ServeError::Internal(e.to_string()))??;
    if let Some(m) = materializer {
        m.stop().await;
    }
    if let Err(e) = tokens.flush_last_used().await {
        tracing::warn!(error = %e, "final lastUsedAt flush failed");
    }
    let _ = std::fs::remove_file(data_dir.join("listening"));
    tracing::info!("stopped");
    Ok(())
}

/// Cluster mode's connection to NATS, and this broker's name on it.
struct ClusterLink {
    node_id: String,
    nats: crate::cluster::Nats,
}

impl ClusterLink {
    async fn connect(config: &Config, data_dir: &Path) -> Result<ClusterLink, ServeError> {
        let node_id = crate::cluster::node_id::load_or_generate(data_dir, &config.cluster.node_id)?;
        tracing::info!(node = %node_id, urls = ?config.cluster.nats_urls, "cluster mode: connecting to NATS");
        let nats = crate::cluster::connect(&config.cluster, &node_id).await?;
        Ok(ClusterLink { node_id, nats })
    }
}

/// The token service of a broker in cluster mode: the tokens come from the
/// cluster's bucket; the local store keeps only this broker's lastUsedAt
/// (that of tokens no longer in the bucket is dropped).
async fn cluster_tokens(
    config: &Config,
    link: &ClusterLink,
    store: &Store,
    registry: &Arc<Registry>,
    limits: TokenLimits,
    metrics: &mut Metrics,
) -> Result<TokenService, ServeError> {
    let last_used: std::collections::HashMap<String, i64> =
        store.load_last_used()?.into_iter().collect();
    let plane = Plane::start(
        &link.nats,
        PlaneConfig::new(&config.cluster, link.node_id.clone()),
        registry.clone(),
        last_used.clone(),
        PlaneMetrics::register(metrics.registry_mut()),
    )
    .await?;
    let gone: Vec<String> = last_used
        .into_keys()
        .filter(|id| registry.entry(id).is_none())
        .collect();
    if !gone.is_empty() {
        store.delete_tokens(&gone)?;
    }
    Ok(TokenService::clustered(
        store.clone(),
        registry.clone(),
        limits,
        plane,
    ))
}

/// Cluster mode's ingest: the NATS connection, the ingest stream (created
/// or checked), the writer's stream sink and, unless
/// `cluster.materialize = false`, the materializer building this broker's
/// read model from the stream.
struct ClusterIngest {
    read_model: ReadModel,
    view: IngestView,
    materializer: Option<Materializer>,
    control: crate::cluster::control::Controller,
}

impl ClusterIngest {
    async fn start(
        config: &Config,
        link: ClusterLink,
        store: &Store,
        metrics: Arc<Metrics>,
        cluster_metrics: ClusterMetrics,
        health: Arc<Health>,
        hub: Arc<Hub>,
    ) -> Result<(crate::writer::cluster::StreamSink, ClusterIngest), ServeError> {
        use crate::cluster::publish::{Publisher, PublisherSpec};
        use crate::cluster::stream::{ensure, StreamSpec};
        use crate::writer::cluster::{settle_window, StreamSink};
        let c = &config.cluster;
        let failed = |e: &dyn std::fmt::Display| ServeError::Cluster(e.to_string());
        let ClusterLink { node_id, nats } = link;
        let names = crate::cluster::Names::new(&c.prefix);
        let deadline = tokio::time::Instant::now() + c.connect_timeout;
        ensure(
            &nats,
            &StreamSpec {
                names: names.clone(),
                replicas: c.replicas,
                duplicate_window: c.duplicate_window,
                max_age: c.max_age,
            },
            deadline,
        )
        .await
        .map_err(|e| failed(&e))?;
        if config.batch.max_messages > crate::writer::cluster::MAX_BATCH_MESSAGES {
            tracing::info!(
                configured = config.batch.max_messages,
                used = crate::writer::cluster::MAX_BATCH_MESSAGES,
                "cluster mode: batch.max_messages clamped to the atomic batch limit"
            );
        }
        let publisher = Publisher::new(
            &nats,
            PublisherSpec {
                names: names.clone(),
                node_id: node_id.clone(),
                publish_timeout: c.publish_timeout,
                retry_after: c.publish_retry_after,
                max_in_flight: c.max_batches_in_flight,
            },
        )
        .map_err(|e| failed(&e))?;
        let sink = StreamSink::start(
            publisher,
            crate::writer::cluster::StreamSpec {
                names: names.clone(),
                max_in_flight: c.max_batches_in_flight,
                settle_window: settle_window(
                    c.duplicate_window,
                    c.publish_timeout,
                    c.publish_retry_after,
                ),
                ack_latency: metrics.ack_latency_seconds.clone(),
            },
            cluster_metrics.clone(),
            health,
        );
        let (read_model, materializer) = if c.materialize {
            let next = crate::materialize::prepare(store, &nats, &names)
                .await
                .map_err(|e| failed(&e))?;
            let (m, applied) = Materializer::start(
                &nats,
                MaterializerSpec {
                    names: names.clone(),
                    node_id: node_id.clone(),
                    batch: c.follow_batch,
                    heartbeat: c.heartbeat,
                    forget_attributes: sink.forget_attributes(),
                },
                store.clone(),
                hub,
                next,
                metrics,
                cluster_metrics,
            );
            tracing::info!(
                from = next,
                "cluster mode: read model follows the ingest stream"
            );
            (
                ReadModel::Materialized {
                    applied,
                    wait: c.min_seq_timeout,
                },
                Some(m),
            )
        } else {
            tracing::info!(
                "cluster mode: ingest only (cluster.materialize = false), no read model"
            );
            (ReadModel::Absent, None)
        };
        let control = crate::cluster::control::Controller::new(
            &nats,
            names.clone(),
            node_id.clone(),
            c.publish_timeout,
        );
        Ok((
            sink,
            ClusterIngest {
                control,
                read_model,
                view: IngestView {
                    nats,
                    names,
                    node_id,
                },
                materializer,
            },
        ))
    }
}

/// Prints `listening <name> <addr>` per listener and writes the same lines
/// to `<data-dir>/listening` (atomically, so a reader never sees half).
fn announce(data_dir: &Path, addrs: &[(&'static str, SocketAddr)]) -> Result<(), ServeError> {
    let mut text = String::new();
    for (name, addr) in addrs {
        text.push_str(&format!("listening {name} {addr}\n"));
    }
    let tmp = data_dir.join("listening.tmp");
    let io = |source| ServeError::DataDir {
        path: data_dir.to_path_buf(),
        source,
    };
    std::fs::write(&tmp, &text).map_err(io)?;
    std::fs::rename(&tmp, data_dir.join("listening")).map_err(io)?;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).map_err(io)?;
    out.flush().map_err(io)?;
    Ok(())
}
