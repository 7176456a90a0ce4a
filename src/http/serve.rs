//! The accept loop shared by the device and admin listeners: a semaphore
//! bounds concurrent connections, a per-address table bounds what one
//! address holds, hyper serves each connection (HTTP/1.1, and HTTP/2 where
//! the listener speaks it), and shutdown lets in-flight requests finish.
//!
//! HTTP/2 is chosen per connection: over TLS by ALPN (`h2`), on plain TCP
//! by the HTTP/2 connection preface a client with prior knowledge opens
//! with (h2c). Nothing else changes for the request: the same service, the
//! same limits per request.

use std::convert::Infallible;
use std::future::{ready, Future};
use std::net::IpAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::rt::{Read, Write};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ip_limit::IpConnections;

/// Limits of one HTTP listener.
#[derive(Clone)]
pub struct HttpLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    /// Largest HTTP/1.1 request line and headers (`http.max_header_bytes`);
    /// `None`: hyper's default.
    pub max_header_bytes: Option<usize>,
    /// `Some`: the listener speaks HTTP/2 beside HTTP/1.1.
    pub http2: Option<Http2Limits>,
    /// Open connections per address (`http.max_connections_per_ip`).
    pub per_ip: Arc<IpConnections>,
    /// Counts connections refused by `per_ip`.
    pub refused: Counter,
}

/// What one HTTP/2 connection may hold.
#[derive(Clone, Copy, Debug)]
pub struct Http2Limits {
    /// Streams open at once (`http.h2_max_concurrent_streams`).
    pub max_concurrent_streams: u32,
    /// Header list of one request (`http.max_header_bytes`).
    pub max_header_list_bytes: u32,
    /// Flow-control window of the connection and of each stream
    /// (`http.h2_window_bytes`): request-body bytes received but not yet
    /// read by a handler.
    pub window_bytes: u32,
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

/// Streams a refused HTTP/2 connection may open before its GOAWAY takes
/// effect; each is answered 429.
const REFUSAL_STREAMS: u32 = 8;

/// The answer to a connection over its address's limit.
const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 32\r\n\r\n{\"error\":\"too_many_connections\"}";
const TOO_MANY_CONNECTIONS_BODY: &str = r#"{"error":"too_many_connections"}"#;

/// What a client with prior knowledge of HTTP/2 sends first (RFC 9113,
/// section 3.4); no HTTP/1.1 request starts with it.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How often a connection that has sent part of the preface is looked at
/// again. Real clients send the preface in one segment; this only paces a
/// client that trickles it, until `header_read_timeout` ends the wait.
const PARTIAL_PREFACE_RECHECK: Duration = Duration::from_millis(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

/// What every connection of a listener is served with.
struct Protocols {
    http1: hyper::server::conn::http1::Builder,
    http2: Option<Http2Limits>,
    /// The longest a connection may wait before its first request, and an
    /// HTTP/2 connection with no open stream before it is closed.
    idle: Duration,
}

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
    // Every connection's task, so shutdown can wait for them.
    let connections = TaskTracker::new();
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    if let Some(n) = limits.max_header_bytes {
        http1.max_header_size(n);
    }
    let protocols = Arc::new(Protocols {
        http1,
        http2: limits.http2,
        idle: limits.header_read_timeout,
    });
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
                // A refusal holds a small task for at most twice LINGER;
                // beyond the bound, or over TLS (answering would need a
                // handshake), the connection is just closed.
                if let (None, Ok(r)) = (&tls, refusals.clone().try_acquire_owned()) {
                    let http2 = limits.http2.is_some();
                    tokio::spawn(async move {
                        refuse(stream, http2).await;
                        drop(r);
                    });
                }
                continue;
            }
        };
        let service = service(peer.ip());
        let protocols = protocols.clone();
        // Its own token: a connection's task polls it on every wake-up,
        // and a shared token would make all of them contend for one lock.
        let stop = stop.child_token();
        match &tls {
            None => {
                connections.spawn(async move {
                    let protocol = if protocols.http2.is_none() {
                        Protocol::Http1
                    } else {
                        let sniffed = tokio::select! {
                            _ = stop.cancelled() => return,
                            r = tokio::time::timeout(protocols.idle, sniff(&stream)) => r,
                        };
                        match sniffed {
                            Ok(Ok(p)) => p,
                            Ok(Err(e)) => {
                                tracing::debug!(listener = name, %peer, error = %e, "connection ended before its first request");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(listener = name, %peer, "no request within the header timeout");
                                return;
                            }
                        }
                    };
                    let res = serve_io(TokioIo::new(stream), protocol, service, &protocols, stop).await;
                    if let Err(e) = res {
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
                connections.spawn(async move {
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
                    // rustls only agrees on `h2` when the listener offers it.
                    let protocol = match stream.get_ref().1.alpn_protocol() {
                        Some(b"h2") => Protocol::Http2,
                        _ => Protocol::Http1,
                    };
                    let res = serve_io(TokioIo::new(stream), protocol, service, &protocols, stop).await;
                    if let Err(e) = res {
                        tracing::debug!(listener = name, %peer, error = %e, "connection ended with error");
                    }
                    drop((permit, ip_permit));
                });
            }
        }
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = name,
            "connections still open after the shutdown grace period"
        );
    }
}

/// Which protocol a plain connection speaks, from its first bytes (peeked,
/// so the server reads them again). End of stream counts as HTTP/1.1,
/// which then just closes.
async fn sniff(stream: &TcpStream) -> std::io::Result<Protocol> {
    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 || buf[..n] != H2_PREFACE[..n] {
            return Ok(Protocol::Http1);
        }
        if n == H2_PREFACE.len() {
            return Ok(Protocol::Http2);
        }
        // The socket stays readable while the partial preface sits in it,
        // so peeking again at once would spin.
        tokio::time::sleep(PARTIAL_PREFACE_RECHECK).await;
    }
}

/// Serves one connection in `protocol` until it ends or `stop` has it
/// finish its in-flight requests.
async fn serve_io<I, S, B>(
    io: I,
    protocol: Protocol,
    service: S,
    protocols: &Protocols,
    stop: CancellationToken,
) -> Result<(), hyper::Error>
where
    I: Read + Write + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match (protocol, protocols.http2) {
        (Protocol::Http2, Some(limits)) => {
            let streams = Arc::new(Streams::default());
            let mut b = hyper::server::conn::http2::Builder::new(StreamExecutor(streams.clone()));
            b.timer(TokioTimer::new())
                .max_concurrent_streams(limits.max_concurrent_streams)
                .max_header_list_size(limits.max_header_list_bytes)
                .initial_connection_window_size(limits.window_bytes)
                .initial_stream_window_size(limits.window_bytes);
            let conn = b.serve_connection(io, service);
            drive(conn, stop, Some((protocols.idle, &streams))).await
        }
        _ => drive(protocols.http1.serve_connection(io, service), stop, None).await,
    }
}

/// Runs a connection to its end. When `stop` is cancelled it is asked to
/// finish what is in flight and close (HTTP/2: GOAWAY). With `idle`, an
/// HTTP/2 connection that had no stream open through a whole period is
/// closed the same way (after between one and two periods of idleness);
/// HTTP/1.1 has hyper's header-read timeout for that.
async fn drive<C>(
    conn: C,
    stop: CancellationToken,
    idle: Option<(Duration, &Streams)>,
) -> Result<(), hyper::Error>
where
    C: GracefulConnection<Error = hyper::Error>,
{
    let mut conn = pin!(conn);
    let period = idle.map_or(Duration::from_secs(3600), |(d, _)| d);
    let mut tick = pin!(tokio::time::sleep(period));
    let mut last_started = 0;
    let mut closing = false;
    loop {
        tokio::select! {
            biased;
            r = conn.as_mut() => return r,
            _ = stop.cancelled(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = tick.as_mut(), if idle.is_some() && !closing => {
                let Some((_, streams)) = idle else { continue };
                let started = streams.started.load(Ordering::Relaxed);
                if started == last_started && streams.open.load(Ordering::Relaxed) == 0 {
                    tracing::debug!(idle = ?period, "idle HTTP/2 connection closed");
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                } else {
                    last_started = started;
                    tick.as_mut().reset(tokio::time::Instant::now() + period);
                }
            }
        }
    }
}

/// The streams of one HTTP/2 connection, counted for its idle timeout.
#[derive(Default)]
struct Streams {
    started: AtomicU64,
    open: AtomicUsize,
}

/// Runs each HTTP/2 stream of a connection as its own task (hyper's model)
/// and counts it in the connection's [`Streams`] while it runs.
#[derive(Clone)]
struct StreamExecutor(Arc<Streams>);

/// Counts a stream as open until its task ends, however it ends.
struct OpenStream(Arc<Streams>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0.started.fetch_add(1, Ordering::Relaxed);
        self.0.open.fetch_add(1, Ordering::Relaxed);
        let open = OpenStream(self.0.clone());
        tokio::spawn(async move {
            fut.await;
            drop(open);
        });
    }
}

/// Answers a connection over its address's limit with 429 and closes it:
/// in HTTP/2 when it opens with the preface, else in HTTP/1.1.
async fn refuse(stream: TcpStream, http2: bool) {
    if http2 {
        if let Ok(Ok(Protocol::Http2)) = tokio::time::timeout(LINGER, sniff(&stream)).await {
            return refuse_h2(stream).await;
        }
    }
    refuse_h1(stream).await;
}

async fn refuse_h1(mut stream: TcpStream) {
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

/// HTTP/2: the first request is answered 429, and with it comes GOAWAY,
/// so the client opens no further stream (the few it may have sent
/// meanwhile are answered 429 too).
async fn refuse_h2(stream: TcpStream) {
    let answered = Arc::new(tokio::sync::Notify::new());
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.max_concurrent_streams(REFUSAL_STREAMS);
    let svc = hyper::service::service_fn({
        let answered = answered.clone();
        move |_req: Request<Incoming>| {
            answered.notify_one();
            let mut r = json(
                429,
                Bytes::from_static(TOO_MANY_CONNECTIONS_BODY.as_bytes()),
            );
            r.headers_mut().insert(
                hyper::header::RETRY_AFTER,
                hyper::header::HeaderValue::from_static("1"),
            );
            ready(Ok::<_, Infallible>(r))
        }
    });
    let mut conn = pin!(b.serve_connection(TokioIo::new(stream), svc));
    let _ = tokio::time::timeout(LINGER, async {
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = answered.notified() => conn.as_mut().graceful_shutdown(),
        }
        let _ = conn.await;
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
