//! The accept loop shared by the device and admin listeners: a semaphore
//! bounds concurrent connections, a per-address table bounds what one
//! address holds, hyper serves each connection, and shutdown lets in-flight
//! requests finish.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::ip_limit::IpConnections;

/// Limits of one HTTP listener.
#[derive(Clone)]
pub struct HttpLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    /// Open connections per address (`http.max_connections_per_ip`).
    pub per_ip: Arc<IpConnections>,
    /// Counts connections refused by `per_ip`.
    pub refused: Counter,
}

/// Connections over their address's limit that may be waiting to be told
/// so; beyond this many they are closed at once, so a flood cannot grow
/// memory.
const MAX_REFUSALS_IN_FLIGHT: usize = 64;

/// After the refusal, how long and how much of the client's request is
/// read and dropped so the close does not turn into a reset that destroys
/// the response.
const LINGER: Duration = Duration::from_millis(500);
const LINGER_BYTES: usize = 64 * 1024;

/// The answer to a connection over its address's limit.
const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 32\r\n\r\n{\"error\":\"too_many_connections\"}";

/// Serves `listener` until `stop` is cancelled, then waits up to `grace`
/// for open connections to finish their in-flight requests. `service`
/// makes the service of one connection from its peer's address.
pub async fn serve<F, S, B>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    service: F,
    limits: HttpLimits,
    stop: CancellationToken,
    grace: Duration,
    name: &'static str,
) where
    F: Fn(IpAddr) -> S,
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // Bounds concurrent connections: at the limit we stop accepting and new
    // clients wait in the kernel's listen backlog instead of using memory.
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS_IN_FLIGHT));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let ip_permit = match limits.per_ip.try_open(peer.ip()) {
            Ok(p) => p,
            Err(_) => {
                limits.refused.inc();
                tracing::debug!(listener = name, %peer, "connection refused: too many from its address");
                // A refusal holds a small task for at most LINGER; beyond
                // the bound, or over TLS (answering would need a handshake),
                // the connection is just closed.
                if let (None, Ok(r)) = (&tls, refusals.clone().try_acquire_owned()) {
                    tokio::spawn(async move {
                        refuse(stream).await;
                        drop(r);
                    });
                }
                continue;
            }
        };
        let service = service(peer.ip());
        match &tls {
            None => {
                let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(listener = name, %peer, error = %e, "connection ended with error");
                    }
                    drop((permit, ip_permit));
                });
            }
            Some(acceptor) => {
                // The handshake counts against the header-read timeout, so a
                // client that stalls in it cannot hold a connection slot.
                let handshake =
                    tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream));
                let builder = builder.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let stream = match handshake.await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(listener = name, %peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(listener = name, %peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let conn =
                        watcher.watch(builder.serve_connection(TokioIo::new(stream), service));
                    if let Err(e) = conn.await {
                        tracing::debug!(listener = name, %peer, error = %e, "connection ended with error");
                    }
                    drop((permit, ip_permit));
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = name,
            "connections still open after the shutdown grace period"
        );
    }
}

/// Answers a connection over its address's limit with 429 and closes it.
async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(LINGER, async {
        stream.write_all(TOO_MANY_CONNECTIONS).await?;
        stream.shutdown().await?;
        let mut sink = vec![0u8; 4096];
        let mut budget = LINGER_BYTES;
        while budget > 0 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => budget = budget.saturating_sub(n),
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// A JSON response.
pub fn json(status: u16, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// `{"error":"<code>","detail":"<detail>"}` with the detail JSON-escaped.
pub fn error_with_detail(status: u16, code: &str, detail: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": code, "detail": detail }).to_string();
    json(status, body)
}
