//! The connection to NATS: options from `[cluster]` (URLs, credentials,
//! TLS, the node id as the client name) and the wait until the JetStream
//! cluster answers.
//!
//! One URL is enough: the client learns the other servers of the cluster
//! from the one it reaches and reconnects to any of them when that one
//! dies. While disconnected it keeps reconnecting forever; callers see
//! failed or timed-out requests, never a dead client.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream;
use tokio::time::Instant;

use crate::config::ClusterConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read NATS credentials {path}: {source}")]
    Credentials {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot connect to NATS: {0}")]
    Connect(#[source] async_nats::ConnectError),
    #[error("the NATS JetStream cluster did not answer within {0:?}: {1}")]
    NotReady(Duration, String),
}

/// A client and its JetStream context. Cloning is cheap (both are handles
/// to one connection).
#[derive(Clone)]
pub struct Nats {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
}

/// Timeout of one JetStream API request (stream info, consumer creation,
/// KV writes). Callers retry transient failures within their own bounds.
const API_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects and waits (up to `cluster.connect_timeout`) until JetStream
/// answers an account-info request, which needs an elected meta leader.
pub async fn connect(config: &ClusterConfig, node_id: &str) -> Result<Nats, ConnectError> {
    let mut options = if config.credentials.as_os_str().is_empty() {
        async_nats::ConnectOptions::new()
    } else {
        async_nats::ConnectOptions::with_credentials_file(&config.credentials)
            .await
            .map_err(|source| ConnectError::Credentials {
                path: config.credentials.clone(),
                source,
            })?
    };
    if !config.tls_ca.as_os_str().is_empty() {
        options = options
            .add_root_certificates(config.tls_ca.clone())
            .require_tls(true);
    }
    if !config.tls_cert.as_os_str().is_empty() {
        options = options.add_client_certificate(config.tls_cert.clone(), config.tls_key.clone());
    }
    let client = options
        .name(node_id)
        // Start even when no server answers yet: the readiness loop below
        // bounds the wait, and the client keeps reconnecting afterwards.
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(2))
        .connect(config.nats_urls.as_slice())
        .await
        .map_err(ConnectError::Connect)?;
    let mut js = jetstream::new(client.clone());
    js.set_timeout(API_TIMEOUT);
    let deadline = Instant::now() + config.connect_timeout;
    retry_until(deadline, || async { js.query_account().await }, |_| true)
        .await
        .map_err(|e| ConnectError::NotReady(config.connect_timeout, e.to_string()))?;
    Ok(Nats { client, js })
}

/// Runs `op` until it succeeds, fails with an error `transient` rejects, or
/// `deadline` passes (then the last error is returned). After a NATS
/// (re)start the first JetStream requests time out while leaders are
/// elected; this is how every set-up call rides that out.
pub(crate) async fn retry_until<T, E, F, Fut>(
    deadline: Instant,
    mut op: F,
    transient: impl Fn(&E) -> bool,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut pause = Duration::from_millis(50);
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if !transient(&e) || Instant::now() + pause >= deadline => return Err(e),
            Err(_) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
    }
}
