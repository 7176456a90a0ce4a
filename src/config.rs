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
    pub batch: BatchConfig,
    pub tokens: TokensConfig,
    pub shutdown: ShutdownConfig,
    pub log: LogConfig,
    pub tls: TlsConfig,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// WAL written but not fsynced per batch: survives a process crash.
    None,
    /// WAL fsynced per batch: survives a machine crash.
    Always,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    pub data_dir: PathBuf,
    pub sync: SyncMode,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    pub listen_backlog: u32,
    pub max_body_bytes: usize,
    pub max_connections: usize,
    #[serde(with = "human_duration")]
    pub header_read_timeout: Duration,
    #[serde(with = "human_duration")]
    pub body_read_timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
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
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub allow_public: bool,
    pub max_connections: usize,
    pub max_body_bytes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    pub max_messages: usize,
    pub max_bytes: usize,
    pub queue_capacity: usize,
    pub queue_max_bytes: usize,
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
    pub mqtts_listen: SocketAddr,
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        !self.cert.as_os_str().is_empty()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub level: String,
}

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
        // bad value does not hide the next.
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
            if let Err(e) = one.extract::<Config>() {
                for e in e {
                    problems.push(format!("key `{path}` (from {source}): {}", e.kind));
                }
            }
        }
        if !problems.is_empty() {
            return Err(ConfigErrors(problems));
        }
        let config: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(user)
            .extract()
            .map_err(|e| ConfigErrors(e.into_iter().map(|e| e.to_string()).collect()))?;
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(problems))
        }
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
        positive("admin.max_connections", self.admin.max_connections);
        positive("admin.max_body_bytes", self.admin.max_body_bytes);
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
        if self.mqtt.max_packet_bytes > 268_435_455 {
            p.push("`mqtt.max_packet_bytes` must be at most 268435455 (the MQTT limit)".into());
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
        if self.storage.data_dir.as_os_str().is_empty() {
            p.push("`storage.data_dir` must not be empty".into());
        }
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
        assert_eq!(err.0.len(), 4, "{all}");

        // Semantic problems are all listed too once the types are right.
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
    fn public_admin_needs_the_flag() {
        let o = Overrides {
            admin_listen: Some("0.0.0.0:0".into()),
            admin_allow_public: true,
            ..Default::default()
        };
        assert!(Config::load(None, &[], &o).is_ok());
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
