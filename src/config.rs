//! Configuration: built-in defaults (equal to `config/sluice.toml`), then the
//! config file, then `SLUICE_<SECTION>__<KEY>` environment variables, then
//! command-line flags. Loading reports every problem at once, because an
//! operator fixing a config file one error per restart is a bad afternoon.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Value};
use figment::Figment;
use figment::Provider;
use serde::{Deserialize, Serialize};

/// The built-in defaults, byte-for-byte the file operators read.
pub const DEFAULT_TOML: &str = include_str!("../config/sluice.toml");

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub storage: StorageConfig,
    pub http: HttpConfig,
    pub mqtt: MqttConfig,
    pub admin: AdminConfig,
    pub audit: AuditConfig,
    pub batch: BatchConfig,
    pub streams: StreamsConfig,
    pub tokens: TokensConfig,
    pub shutdown: ShutdownConfig,
    pub log: LogConfig,
    pub tls: TlsConfig,
    pub cluster: ClusterConfig,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// Each batch is written to the WAL (the OS page cache) before it is
    /// acknowledged, never fsynced by the writer: survives a process crash;
    /// a machine crash loses what the OS had not yet written back.
    None,
    /// As `None`, and a separate thread fsyncs the WAL every
    /// `storage.sync_interval_ms`: a machine crash loses at most the
    /// acknowledgements of the last interval (plus one fsync's duration).
    Interval,
    /// Each batch is fsynced before it is acknowledged: survives a machine
    /// crash.
    Always,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    pub data_dir: PathBuf,
    pub sync: SyncMode,
    /// With `sync = "interval"`: milliseconds between WAL fsyncs.
    pub sync_interval_ms: u64,
    /// Distinct attribute names one device's composite state may hold.
    pub max_attributes_per_device: usize,
    /// Attribute names the writer keeps in memory (per device, most
    /// recently used devices first) to enforce the limit above without
    /// reading storage on every request.
    pub attribute_cache_names: usize,
    /// How long history is kept unless an application overrides it.
    pub retention: crate::store::Retention,
    /// With any finite retention, the longest before expired history's
    /// space is reclaimed.
    #[serde(with = "human_duration")]
    pub retention_reclaim_interval: Duration,
    pub compression: crate::store::Compression,
    pub block_cache_bytes: usize,
    pub write_buffer_bytes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// false: no device HTTP(S) listener at all.
    pub enabled: bool,
    pub listen: SocketAddr,
    pub listen_backlog: u32,
    pub max_body_bytes: usize,
    pub max_connections: usize,
    #[serde(with = "human_duration")]
    pub header_read_timeout: Duration,
    #[serde(with = "human_duration")]
    pub body_read_timeout: Duration,
    pub max_buffered_body_bytes: usize,
    pub max_connections_per_ip: usize,
    pub auth_failure_rate_per_ip: u32,
    pub auth_failure_burst_per_ip: u32,
    pub ip_table_max: usize,
    /// Largest request head: HTTP/1.1 request line and headers; HTTP/2
    /// header list as RFC 9113 counts it.
    pub max_header_bytes: usize,
    /// false: HTTP/1.1 only (no h2c, TLS offers only `http/1.1`).
    pub http2: bool,
    /// Streams one HTTP/2 connection may have open at once.
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2 flow-control window of a connection (and of each stream):
    /// the most request-body bytes one connection can have buffered that
    /// no handler has read yet.
    pub h2_window_bytes: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// false: no plain MQTT listener (MQTT over TLS is `tls.mqtts_enabled`).
    pub enabled: bool,
    /// With TLS configured, plain MQTT stays off unless this is true, so
    /// device tokens do not travel unencrypted next to the TLS port.
    pub plain_with_tls: bool,
    pub listen: SocketAddr,
    pub listen_backlog: u32,
    pub max_connections: usize,
    pub max_packet_bytes: u32,
    pub receive_maximum: u16,
    #[serde(with = "human_duration")]
    pub connect_timeout: Duration,
    pub read_buffer_bytes: usize,
    pub connect_rate_per_ip: u32,
    pub connect_burst_per_ip: u32,
    pub auth_failure_rate_per_ip: u32,
    pub auth_failure_burst_per_ip: u32,
    pub ip_table_max: usize,
    pub max_connect_bytes: u32,
    pub max_connections_per_ip: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub allow_public: bool,
    pub max_connections: usize,
    pub max_body_bytes: usize,
    pub max_response_bytes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// How long audit events are kept.
    pub retention: crate::store::Retention,
    /// Largest page of `GET /applications/{app}/audit`.
    pub max_page: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    pub max_messages: usize,
    pub max_bytes: usize,
    pub queue_capacity: usize,
    pub queue_max_bytes: usize,
}

/// Live streams and persistent MQTT sessions; every key is documented in
/// `config/sluice.toml`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StreamsConfig {
    pub live_buffer_bytes: usize,
    pub consumer_buffer_bytes: usize,
    #[serde(with = "human_duration")]
    pub sse_heartbeat: Duration,
    pub max_streams_per_token: usize,
    pub max_streams_per_ip: usize,
    pub max_subscriptions_per_connection: usize,
    pub max_inflight: u16,
    pub max_sessions_per_app: usize,
    pub max_sessions: usize,
    #[serde(with = "human_duration")]
    pub session_expiry_max: Duration,
    #[serde(with = "human_duration")]
    pub session_flush: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokensConfig {
    #[serde(with = "human_duration")]
    pub last_used_flush: Duration,
    pub max_devices_per_token: usize,
    pub max_per_application: usize,
    pub max_chain_depth: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    #[serde(with = "human_duration")]
    pub grace: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain; TLS is off while this and `key` are empty.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// false: no MQTT-over-TLS listener even with a certificate.
    pub mqtts_enabled: bool,
    pub mqtts_listen: SocketAddr,
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        !self.cert.as_os_str().is_empty()
    }
}

/// Whether a device listener is open, and if not, why: the reason is
/// logged at start-up so an operator sees what is closed and which key
/// opens it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    Yes,
    No(&'static str),
}

impl Config {
    /// The plain MQTT listener.
    pub fn mqtt_open(&self) -> Open {
        match (self.mqtt.enabled, self.tls.enabled(), self.mqtt.plain_with_tls) {
            (false, _, _) => Open::No("mqtt.enabled = false"),
            (true, true, false) => Open::No(
                "TLS is configured, so plain MQTT is off; set mqtt.plain_with_tls = true to keep it",
            ),
            _ => Open::Yes,
        }
    }

    /// The MQTT-over-TLS listener.
    pub fn mqtts_open(&self) -> Open {
        match (self.tls.enabled(), self.tls.mqtts_enabled) {
            (false, _) => Open::No("no TLS certificate (tls.cert, tls.key)"),
            (true, false) => Open::No("tls.mqtts_enabled = false"),
            (true, true) => Open::Yes,
        }
    }

    /// The device HTTP listener (HTTPS when TLS is configured).
    pub fn http_open(&self) -> Open {
        match self.http.enabled {
            false => Open::No("http.enabled = false"),
            true => Open::Yes,
        }
    }
}

/// Cluster mode on NATS JetStream; every key is documented in
/// `config/sluice.toml`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub nats_urls: Vec<String>,
    pub node_id: String,
    pub credentials: PathBuf,
    pub tls_ca: PathBuf,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub replicas: usize,
    pub prefix: String,
    #[serde(with = "human_duration")]
    pub connect_timeout: Duration,
    #[serde(with = "human_duration")]
    pub stale_after: Duration,
    #[serde(with = "human_duration")]
    pub heartbeat: Duration,
    #[serde(with = "human_duration")]
    pub barrier_timeout: Duration,
    pub materialize: bool,
    #[serde(with = "human_duration")]
    pub duplicate_window: Duration,
    #[serde(with = "human_duration")]
    pub max_age: Duration,
    #[serde(with = "human_duration")]
    pub publish_timeout: Duration,
    #[serde(with = "human_duration")]
    pub publish_retry_after: Duration,
    pub max_batches_in_flight: usize,
    pub follow_batch: usize,
    #[serde(with = "human_duration")]
    pub min_seq_timeout: Duration,
}

impl ClusterConfig {
    /// Cluster mode is on when at least one NATS URL is given.
    pub fn enabled(&self) -> bool {
        !self.nats_urls.is_empty()
    }

    /// How long a broker may be silent before the revocation barrier stops
    /// waiting for it: one heartbeat longer than it takes that broker to
    /// fail closed on its own, so it is never dropped while still serving.
    pub fn node_ttl(&self) -> Duration {
        self.stale_after + self.heartbeat
    }

    fn problems(&self, p: &mut Vec<String>) {
        for url in &self.nats_urls {
            if url.parse::<async_nats::ServerAddr>().is_err() {
                p.push(format!(
                    "`cluster.nats_urls` entry {url:?} is not a NATS URL like \"nats://host:4222\""
                ));
            }
        }
        if !self.node_id.is_empty() && !crate::cluster::node_id::valid(&self.node_id) {
            p.push("`cluster.node_id` must be 1-64 of A-Z a-z 0-9 _ - (or empty)".into());
        }
        if !crate::cluster::names::valid_prefix(&self.prefix) {
            p.push("`cluster.prefix` must be 1-32 of a-z 0-9 _ -".into());
        }
        if !(1..=5).contains(&self.replicas) {
            p.push("`cluster.replicas` must be between 1 and 5".into());
        }
        if self.tls_cert.as_os_str().is_empty() != self.tls_key.as_os_str().is_empty() {
            p.push("`cluster.tls_cert` and `cluster.tls_key` must be set together".into());
        }
        for (name, d) in [
            ("cluster.connect_timeout", self.connect_timeout),
            ("cluster.heartbeat", self.heartbeat),
            ("cluster.barrier_timeout", self.barrier_timeout),
            ("cluster.publish_timeout", self.publish_timeout),
            ("cluster.publish_retry_after", self.publish_retry_after),
            ("cluster.min_seq_timeout", self.min_seq_timeout),
        ] {
            if d.is_zero() {
                p.push(format!("`{name}` must be greater than 0"));
            }
        }
        if self.stale_after < 2 * self.heartbeat {
            p.push("`cluster.stale_after` must be at least 2 x `cluster.heartbeat`".into());
        }
        if self.publish_retry_after > self.publish_timeout {
            p.push(
                "`cluster.publish_retry_after` must not exceed `cluster.publish_timeout`".into(),
            );
        }
        if self.duplicate_window <= 2 * self.publish_timeout {
            p.push(
                "`cluster.duplicate_window` must exceed 2 x `cluster.publish_timeout`, or a resent batch could be stored twice"
                    .into(),
            );
        }
        if !self.max_age.is_zero() && self.duplicate_window > self.max_age {
            p.push(
                "`cluster.duplicate_window` must not exceed `cluster.max_age` (NATS refuses such a stream)"
                    .into(),
            );
        }
        if !(1..=50).contains(&self.max_batches_in_flight) {
            p.push("`cluster.max_batches_in_flight` must be between 1 and 50".into());
        }
        if !(1..=10_000).contains(&self.follow_batch) {
            p.push("`cluster.follow_batch` must be between 1 and 10000".into());
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
}

/// How log lines are written on stderr.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// For people: one line per event, colours on a terminal.
    Text,
    /// For log shippers: one JSON object per line.
    Json,
}

/// The largest `http.max_header_bytes`: HTTP/1.1 heads are parsed in
/// hyper's read buffer, which holds at most this much (8 KiB plus 100
/// header lines of 4 KiB).
pub const MAX_HEADER_BYTES: usize = 8192 + 4096 * 100;

impl Default for Config {
    fn default() -> Self {
        toml_defaults()
    }
}

fn toml_defaults() -> Config {
    // The embedded file is checked by a unit test; a failure here is a build
    // defect, not an operator error.
    Figment::from(Toml::string(DEFAULT_TOML))
        .extract()
        .expect("config/sluice.toml parses into Config")
}

/// Values given on the command line; they win over file and environment.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub mqtt_listen: Option<String>,
    pub http_listen: Option<String>,
    pub admin_listen: Option<String>,
    pub mqtts_listen: Option<String>,
    pub data_dir: Option<String>,
    pub admin_allow_public: bool,
    /// `--cluster URL[,URL…]`: `cluster.nats_urls`.
    pub cluster: Option<Vec<String>>,
}

/// Every problem found while loading, one line each.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigErrors(pub Vec<String>);

impl Config {
    /// Loads defaults ← file ← `SLUICE_*__*` environment ← flags, and
    /// validates the result. The environment is passed in so tests need not
    /// mutate the process environment.
    pub fn load(
        file: Option<&Path>,
        env: &[(String, String)],
        overrides: &Overrides,
    ) -> Result<Config, ConfigErrors> {
        let mut problems = Vec::new();
        let mut user = Figment::new();
        if let Some(path) = file {
            if !path.is_file() {
                problems.push(format!("config file {} does not exist", path.display()));
            } else {
                user = user.merge(Toml::file_exact(path));
            }
        }
        user = user.merge(env_provider(env));
        user = user.merge(overrides_provider(overrides));

        let user_data = match user.data() {
            Ok(mut by_profile) => by_profile
                .remove(&figment::Profile::Default)
                .unwrap_or_default(),
            Err(e) => {
                problems.extend(e.into_iter().map(|e| e.to_string()));
                return Err(ConfigErrors(problems));
            }
        };
        let known = flatten(
            &Figment::from(Serialized::defaults(Config::default()))
                .data()
                .map_or_else(
                    |_| Dict::new(),
                    |mut d| d.remove(&figment::Profile::Default).unwrap_or_default(),
                ),
        );
        let given = flatten(&user_data);

        // Check each given key on its own against the defaults, so that one
        // bad value does not hide the next. The keys that pass are kept, so
        // the semantic checks below run in the same pass.
        let mut valid = Figment::from(Serialized::defaults(Config::default()));
        for (path, value) in &given {
            let source = user
                .find_metadata(path)
                .map(|m| match &m.source {
                    Some(src) => format!("{} {src}", m.name),
                    None => m.name.to_string(),
                })
                .unwrap_or_else(|| "unknown source".into());
            if !known.contains_key(path) {
                problems.push(format!("unknown key `{path}` (from {source})"));
                continue;
            }
            let one = Figment::from(Serialized::defaults(Config::default()))
                .merge(Serialized::default(path, value.clone()));
            match one.extract::<Config>() {
                Ok(_) => valid = valid.merge(Serialized::default(path, value.clone())),
                Err(e) => {
                    for e in e {
                        problems.push(format!("key `{path}` (from {source}): {}", e.kind));
                    }
                }
            }
        }
        // Every key in `valid` extracts on its own, so together they do too;
        // should that ever fail, it is reported like any other problem.
        match valid.extract::<Config>() {
            Ok(config) => {
                problems.extend(config.validate());
                if problems.is_empty() {
                    return Ok(config);
                }
            }
            Err(e) => problems.extend(e.into_iter().map(|e| e.to_string())),
        }
        Err(ConfigErrors(problems))
    }

    /// Semantic checks that types alone cannot express.
    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        let mut positive = |name: &str, v: usize| {
            if v == 0 {
                p.push(format!("`{name}` must be greater than 0"));
            }
        };
        positive("http.max_body_bytes", self.http.max_body_bytes);
        positive("http.listen_backlog", self.http.listen_backlog as usize);
        positive("mqtt.listen_backlog", self.mqtt.listen_backlog as usize);
        positive("http.max_connections", self.http.max_connections);
        positive("mqtt.max_connections", self.mqtt.max_connections);
        positive("mqtt.max_packet_bytes", self.mqtt.max_packet_bytes as usize);
        positive("mqtt.receive_maximum", self.mqtt.receive_maximum as usize);
        positive("mqtt.read_buffer_bytes", self.mqtt.read_buffer_bytes);
        positive("mqtt.ip_table_max", self.mqtt.ip_table_max);
        positive(
            "mqtt.max_connect_bytes",
            self.mqtt.max_connect_bytes as usize,
        );
        positive("admin.max_connections", self.admin.max_connections);
        positive("admin.max_body_bytes", self.admin.max_body_bytes);
        positive("admin.max_response_bytes", self.admin.max_response_bytes);
        positive(
            "storage.max_attributes_per_device",
            self.storage.max_attributes_per_device,
        );
        positive("http.ip_table_max", self.http.ip_table_max);
        positive(
            "http.h2_max_concurrent_streams",
            self.http.h2_max_concurrent_streams as usize,
        );
        positive(
            "storage.write_buffer_bytes",
            self.storage.write_buffer_bytes,
        );
        positive("audit.max_page", self.audit.max_page);
        positive("batch.max_messages", self.batch.max_messages);
        positive("batch.max_bytes", self.batch.max_bytes);
        positive("batch.queue_capacity", self.batch.queue_capacity);
        positive("batch.queue_max_bytes", self.batch.queue_max_bytes);
        positive(
            "tokens.max_devices_per_token",
            self.tokens.max_devices_per_token,
        );
        positive(
            "tokens.max_per_application",
            self.tokens.max_per_application,
        );
        positive("tokens.max_chain_depth", self.tokens.max_chain_depth);
        positive("streams.live_buffer_bytes", self.streams.live_buffer_bytes);
        positive(
            "streams.consumer_buffer_bytes",
            self.streams.consumer_buffer_bytes,
        );
        positive(
            "streams.max_subscriptions_per_connection",
            self.streams.max_subscriptions_per_connection,
        );
        positive("streams.max_inflight", self.streams.max_inflight as usize);
        positive(
            "streams.max_sessions_per_app",
            self.streams.max_sessions_per_app,
        );
        positive("streams.max_sessions", self.streams.max_sessions);
        for (name, d) in [
            ("streams.sse_heartbeat", self.streams.sse_heartbeat),
            ("streams.session_flush", self.streams.session_flush),
        ] {
            if d.is_zero() {
                p.push(format!("`{name}` must be greater than 0"));
            }
        }
        if self.streams.session_expiry_max.as_secs() > u64::from(u32::MAX) {
            p.push(
                "`streams.session_expiry_max` must be at most 4294967295s (the MQTT 5 limit)"
                    .into(),
            );
        }
        if self.storage.sync == SyncMode::Interval && self.storage.sync_interval_ms == 0 {
            p.push(
                "`storage.sync_interval_ms` must be greater than 0 with `storage.sync = \"interval\"`"
                    .into(),
            );
        }
        if self.mqtt.max_packet_bytes > 268_435_455 {
            p.push("`mqtt.max_packet_bytes` must be at most 268435455 (the MQTT limit)".into());
        }
        if self.http.max_body_bytes > u32::MAX as usize {
            p.push("`http.max_body_bytes` must be at most 4294967295".into());
        }
        if !(1024..=MAX_HEADER_BYTES).contains(&self.http.max_header_bytes) {
            p.push(format!(
                "`http.max_header_bytes` must be between 1024 and {MAX_HEADER_BYTES}"
            ));
        }
        if !(65_535..=2_147_483_647).contains(&self.http.h2_window_bytes) {
            p.push(
                "`http.h2_window_bytes` must be between 65535 and 2147483647 (the HTTP/2 limits)"
                    .into(),
            );
        }
        if self.http.max_buffered_body_bytes < self.http.max_body_bytes {
            p.push(
                "`http.max_buffered_body_bytes` must be at least `http.max_body_bytes`, or a maximal request could never be read"
                    .into(),
            );
        }
        if self.batch.queue_max_bytes < self.http.max_body_bytes {
            p.push(
                "`batch.queue_max_bytes` must be at least `http.max_body_bytes`, or a maximal request could never be queued"
                    .into(),
            );
        }
        if self.tokens.last_used_flush.is_zero() {
            p.push("`tokens.last_used_flush` must be greater than 0".into());
        }
        if !self.admin.listen.ip().is_loopback() && !self.admin.allow_public {
            p.push(format!(
                "`admin.listen` = {} is not a loopback address; set `admin.allow_public = true` (flag --admin-allow-public) to expose the admin API",
                self.admin.listen
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            p.push(format!(
                "`log.level` = {:?} is not a valid log filter",
                self.log.level
            ));
        }
        if self.tls.cert.as_os_str().is_empty() != self.tls.key.as_os_str().is_empty() {
            p.push("`tls.cert` and `tls.key` must be set together (or both left empty)".into());
        }
        if self.storage.retention_reclaim_interval < Duration::from_secs(60) {
            p.push("`storage.retention_reclaim_interval` must be at least 1m".into());
        }
        if self.audit.max_page > 10_000 {
            p.push("`audit.max_page` must be at most 10000".into());
        }
        if self.storage.data_dir.as_os_str().is_empty() {
            p.push("`storage.data_dir` must not be empty".into());
        }
        self.cluster.problems(&mut p);
        p
    }
}

/// A dictionary with a name, so problems can say where a value came from.
struct Named {
    name: &'static str,
    dict: Dict,
}

impl figment::Provider for Named {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named(self.name)
    }

    fn data(&self) -> Result<figment::value::Map<figment::Profile, Dict>, figment::Error> {
        Ok(figment::Profile::Default.collect(self.dict.clone()))
    }
}

fn env_provider(env: &[(String, String)]) -> Named {
    // Only `SLUICE_<SECTION>__<KEY>` names are config keys; other SLUICE_
    // variables (SLUICE_ADMIN_TOKEN above all) are not, and must never be
    // echoed back in an "unknown key" message.
    let mut dict = Dict::new();
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix("SLUICE_") else {
            continue;
        };
        let Some((section, key)) = rest.split_once("__") else {
            continue;
        };
        let path = format!(
            "{}.{}",
            section.to_ascii_lowercase(),
            key.to_ascii_lowercase()
        );
        let value: Value = raw.parse().unwrap_or_else(|_| Value::from(raw.clone()));
        insert_path(&mut dict, &path, value);
    }
    Named {
        name: "environment variable",
        dict,
    }
}

fn overrides_provider(o: &Overrides) -> Named {
    let mut dict = Dict::new();
    let pairs = [
        ("mqtt.listen", &o.mqtt_listen),
        ("http.listen", &o.http_listen),
        ("admin.listen", &o.admin_listen),
        ("tls.mqtts_listen", &o.mqtts_listen),
        ("storage.data_dir", &o.data_dir),
    ];
    for (path, v) in pairs {
        if let Some(v) = v {
            insert_path(&mut dict, path, Value::from(v.clone()));
        }
    }
    if o.admin_allow_public {
        insert_path(&mut dict, "admin.allow_public", Value::from(true));
    }
    if let Some(urls) = &o.cluster {
        insert_path(&mut dict, "cluster.nats_urls", Value::from(urls.clone()));
    }
    Named {
        name: "command-line flag",
        dict,
    }
}

fn insert_path(dict: &mut Dict, path: &str, value: Value) {
    match path.split_once('.') {
        None => {
            dict.insert(path.to_string(), value);
        }
        Some((head, tail)) => {
            let entry = dict
                .entry(head.to_string())
                .or_insert_with(|| Value::from(Dict::new()));
            if !matches!(entry, Value::Dict(..)) {
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = entry {
                insert_path(inner, tail, value);
            }
        }
    }
}

fn flatten(dict: &Dict) -> BTreeMap<String, Value> {
    fn walk(prefix: &str, dict: &Dict, out: &mut BTreeMap<String, Value>) {
        for (k, v) in dict {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                Value::Dict(_, inner) => walk(&path, inner, out),
                other => {
                    out.insert(path, other.clone());
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", dict, &mut out);
    out
}

/// Durations in config are written the way operators say them: "10s",
/// "500ms", "2m".
mod human_duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!("{s:?} is not a duration like \"10s\" ({e})"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn embedded_defaults_are_the_documented_file() {
        let c = Config::default();
        assert_eq!(c.http.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.mqtt.listen.to_string(), "0.0.0.0:1883");
        assert_eq!(c.admin.listen.to_string(), "127.0.0.1:9090");
        assert_eq!(c.storage.data_dir, PathBuf::from("./data"));
        assert_eq!(c.storage.sync, SyncMode::None);
        assert_eq!(c.http.max_body_bytes, 256 * 1024);
        assert_eq!(c.storage.sync_interval_ms, 100);
        assert!(c.validate().is_empty());
        let loaded = Config::load(None, &[], &Overrides::default()).unwrap();
        assert_eq!(loaded, c);
    }

    #[test]
    fn env_and_flags_override_in_order() {
        let o = Overrides {
            admin_listen: Some("127.0.0.1:0".into()),
            ..Default::default()
        };
        let c = Config::load(
            None,
            &env(&[
                ("SLUICE_HTTP__LISTEN", "127.0.0.1:0"),
                ("SLUICE_ADMIN__LISTEN", "127.0.0.1:7"),
                ("SLUICE_STORAGE__SYNC", "always"),
                ("SLUICE_BATCH__MAX_MESSAGES", "7"),
                ("SLUICE_ADMIN_TOKEN", "not-a-config-key"),
                ("OTHER", "x"),
            ]),
            &o,
        )
        .unwrap();
        assert_eq!(c.http.listen.to_string(), "127.0.0.1:0");
        assert_eq!(c.admin.listen.to_string(), "127.0.0.1:0");
        assert_eq!(c.storage.sync, SyncMode::Always);
        assert_eq!(c.batch.max_messages, 7);
    }

    #[test]
    fn every_problem_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.toml");
        std::fs::write(
            &file,
            "[http]\nlisten = \"nope\"\nmax_body_bytes = -3\n[batch]\nmax_messages = 0\n[bogus]\nx = 1\n",
        )
        .unwrap();
        let err = Config::load(
            Some(&file),
            &env(&[("SLUICE_STORAGE__SYNC", "sometimes")]),
            &Overrides::default(),
        )
        .unwrap_err();
        let all = err.0.join("\n");
        assert!(all.contains("http.listen"), "{all}");
        assert!(all.contains("http.max_body_bytes"), "{all}");
        assert!(all.contains("bogus.x"), "{all}");
        assert!(all.contains("storage.sync"), "{all}");
        // The semantic problem is reported in the same pass as the type
        // problems, not after they are fixed.
        assert!(
            all.contains("`batch.max_messages` must be greater than 0"),
            "{all}"
        );
        assert_eq!(err.0.len(), 5, "{all}");

        // Only semantic problems: all of them are listed.
        let err = Config::load(
            None,
            &env(&[
                ("SLUICE_BATCH__MAX_MESSAGES", "0"),
                ("SLUICE_ADMIN__LISTEN", "0.0.0.0:9090"),
            ]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert_eq!(err.0.len(), 2, "{:?}", err.0);
    }

    #[test]
    fn http_head_and_http2_limits_are_checked() {
        let c = Config::default();
        assert!(c.http.http2);
        assert_eq!(
            (c.http.max_header_bytes, c.http.h2_max_concurrent_streams),
            (16384, 100)
        );
        let err = Config::load(
            None,
            &env(&[
                ("SLUICE_HTTP__MAX_HEADER_BYTES", "1023"),
                ("SLUICE_HTTP__H2_MAX_CONCURRENT_STREAMS", "0"),
                ("SLUICE_HTTP__H2_WINDOW_BYTES", "65534"),
            ]),
            &Overrides::default(),
        )
        .unwrap_err();
        let all = err.0.join("\n");
        assert_eq!(err.0.len(), 3, "{all}");
        for key in [
            "http.max_header_bytes",
            "http.h2_max_concurrent_streams",
            "http.h2_window_bytes",
        ] {
            assert!(all.contains(key), "{all}");
        }
        let err = Config::load(
            None,
            &env(&[("SLUICE_HTTP__MAX_HEADER_BYTES", "417793")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(err.0[0].contains("between 1024 and 417792"), "{:?}", err.0);
    }

    #[test]
    fn interval_sync_needs_an_interval() {
        let c = Config::load(
            None,
            &env(&[
                ("SLUICE_STORAGE__SYNC", "interval"),
                ("SLUICE_STORAGE__SYNC_INTERVAL_MS", "250"),
            ]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(
            (c.storage.sync, c.storage.sync_interval_ms),
            (SyncMode::Interval, 250)
        );
        let err = Config::load(
            None,
            &env(&[
                ("SLUICE_STORAGE__SYNC", "interval"),
                ("SLUICE_STORAGE__SYNC_INTERVAL_MS", "0"),
            ]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(err.0[0].contains("sync_interval_ms"), "{:?}", err.0);
    }

    #[test]
    fn public_admin_needs_the_flag() {
        let o = Overrides {
            admin_listen: Some("0.0.0.0:0".into()),
            admin_allow_public: true,
            ..Default::default()
        };
        assert!(Config::load(None, &[], &o).is_ok());
    }

    #[test]
    fn cluster_is_off_by_default_and_checked_when_set() {
        let c = Config::default();
        assert!(!c.cluster.enabled());
        assert_eq!(c.cluster.replicas, 3);
        assert_eq!(c.cluster.prefix, "sluice");
        assert_eq!(
            c.cluster.node_ttl(),
            c.cluster.stale_after + c.cluster.heartbeat
        );
        let ok = Config::load(
            None,
            &env(&[("SLUICE_CLUSTER__NATS_URLS", "[\"nats://127.0.0.1:4222\"]")]),
            &Overrides::default(),
        )
        .unwrap();
        assert!(ok.cluster.enabled());
        // --cluster wins over the environment.
        let flagged = Config::load(
            None,
            &env(&[("SLUICE_CLUSTER__NATS_URLS", "[\"nats://127.0.0.1:4222\"]")]),
            &Overrides {
                cluster: Some(vec!["nats://a:1".into(), "nats://b:2".into()]),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(flagged.cluster.nats_urls, ["nats://a:1", "nats://b:2"]);
        let err = Config::load(
            None,
            &env(&[
                ("SLUICE_CLUSTER__NATS_URLS", "[\"nats://[bad\"]"),
                ("SLUICE_CLUSTER__NODE_ID", "has space"),
                ("SLUICE_CLUSTER__PREFIX", "Upper"),
                ("SLUICE_CLUSTER__REPLICAS", "7"),
                ("SLUICE_CLUSTER__TLS_CERT", "/c.pem"),
                ("SLUICE_CLUSTER__STALE_AFTER", "1s"),
                ("SLUICE_CLUSTER__DUPLICATE_WINDOW", "10s"),
                ("SLUICE_CLUSTER__MAX_BATCHES_IN_FLIGHT", "51"),
                ("SLUICE_CLUSTER__MAX_AGE", "5s"),
            ]),
            &Overrides::default(),
        )
        .unwrap_err();
        let all = err.0.join("\n");
        for key in [
            "nats_urls",
            "node_id",
            "prefix",
            "replicas",
            "tls_cert",
            "stale_after",
            "duplicate_window",
            "max_batches_in_flight",
            "max_age",
        ] {
            assert!(all.contains(&format!("cluster.{key}")), "{key}: {all}");
        }
    }

    #[test]
    fn missing_file_is_an_error() {
        let err = Config::load(
            Some(Path::new("/nonexistent/sluice.toml")),
            &[],
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(err.0[0].contains("does not exist"));
    }
}
