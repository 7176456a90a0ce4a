//! Logging on stderr, as text for people or one JSON object per line for
//! log shippers (`log.format`), behind a level filter that SIGHUP can
//! replace without a restart.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

use crate::config::{LogConfig, LogFormat};

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log filter {filter:?}: {reason}")]
    Filter { filter: String, reason: String },
    #[error("logging: {0}")]
    Subscriber(String),
}

/// The running subscriber's level filter.
#[derive(Clone)]
pub struct LogLevel {
    handle: reload::Handle<EnvFilter, Registry>,
    /// Set when RUST_LOG chose the filter at start-up: it wins over
    /// `log.level`, on reload as at start.
    from_env: bool,
}

fn filter(text: &str) -> Result<EnvFilter, LogError> {
    EnvFilter::try_new(text).map_err(|e| LogError::Filter {
        filter: text.to_string(),
        reason: e.to_string(),
    })
}

impl LogLevel {
    /// Applies `log.level` from a re-read configuration; returns false
    /// when RUST_LOG pins the filter and nothing changed.
    pub fn set(&self, level: &str) -> Result<bool, LogError> {
        if self.from_env {
            return Ok(false);
        }
        let new = filter(level)?;
        self.handle
            .reload(new)
            .map_err(|e| LogError::Subscriber(e.to_string()))?;
        Ok(true)
    }
}

/// Installs the global subscriber. `rust_log` (the RUST_LOG variable), when
/// set, replaces `log.level`.
pub fn init(config: &LogConfig, rust_log: Option<&str>) -> Result<LogLevel, LogError> {
    let (level, handle) = reload::Layer::new(filter(rust_log.unwrap_or(&config.level))?);
    let out = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let out = match config.format {
        LogFormat::Text => out
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
        // Fields sit beside timestamp, level, target and message at the
        // top level, which is what Vector, Loki and Elasticsearch ingest
        // without a remapping step.
        LogFormat::Json => out.json().flatten_event(true).with_ansi(false).boxed(),
    };
    tracing_subscriber::registry()
        .with(level)
        .with(out)
        .try_init()
        .map_err(|e| LogError::Subscriber(e.to_string()))?;
    Ok(LogLevel {
        handle,
        from_env: rust_log.is_some(),
    })
}
