//! The HTTP driver: hyper's connection-level clients (`client::conn`, the
//! cheapest: no pool). HTTP/1.1: keep-alive, one request in flight per
//! connection. HTTP/2 (`--h2`, h2c with prior knowledge): `--streams`
//! senders share each connection, each with one request in flight, so a
//! connection carries that many concurrent streams. Success is `200`; any
//! other status is counted by status code and the sender goes on.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::mqtt::connect_error_kind;
use crate::run::{ConnOutcome, Shared};
use crate::schedule::ConnSchedule;
use crate::stats::Bits;

#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// `host:port` to connect to.
    pub addr: String,
    /// `Host` header value.
    pub host: HeaderValue,
    pub timeout: Duration,
    /// HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1.
    pub h2: bool,
    /// HTTP/2: senders (concurrent streams) per connection; 1 for HTTP/1.1.
    pub streams: u32,
}

impl HttpConfig {
    /// From `http://host:port[/]` or `host:port`.
    pub fn from_url(url: &str, timeout: Duration) -> anyhow::Result<HttpConfig> {
        let rest = if let Some(r) = url.strip_prefix("http://") {
            r
        } else if url.starts_with("https://") {
            anyhow::bail!("https is not supported by the load driver; use http://")
        } else {
            url
        };
        let authority = rest.split('/').next().unwrap_or_default();
        if authority.is_empty() {
            anyhow::bail!("no host:port in {url:?}");
        }
        let addr = if authority.contains(':') {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        Ok(HttpConfig {
            addr,
            host: HeaderValue::from_str(authority)?,
            timeout,
            h2: false,
            streams: 1,
        })
    }
}

/// What a connection sends to one device.
#[derive(Debug, Clone)]
pub struct Target {
    pub path: Uri,
    pub auth: Option<HeaderValue>,
}

/// An open connection.
pub enum Connected {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(H2Sender),
}

/// The handle of an HTTP/2 connection; the senders of one connection each
/// hold a clone.
pub type H2Sender = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

impl Connected {
    async fn ready(&mut self) -> Result<(), hyper::Error> {
        match self {
            Connected::Http1(s) => s.ready().await,
            Connected::Http2(s) => s.ready().await,
        }
    }

    async fn send(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<hyper::body::Incoming>, hyper::Error> {
        match self {
            Connected::Http1(s) => s.send_request(req).await,
            Connected::Http2(s) => s.send_request(req).await,
        }
    }
}

async fn tcp(cfg: &HttpConfig) -> Result<TokioIo<TcpStream>, String> {
    let stream = match tokio::time::timeout(cfg.timeout, TcpStream::connect(&cfg.addr)).await {
        Err(_) => return Err("connect_timeout".into()),
        Ok(Err(e)) => return Err(connect_error_kind(&e).into()),
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    Ok(TokioIo::new(stream))
}

/// Opens an HTTP/2 connection with prior knowledge.
pub async fn connect_h2(cfg: &HttpConfig) -> Result<H2Sender, String> {
    let io = tcp(cfg).await?;
    let handshake = hyper::client::conn::http2::handshake(TokioExecutor::new(), io);
    let (sender, conn) = match tokio::time::timeout(cfg.timeout, handshake).await {
        Err(_) => return Err("connect_timeout".into()),
        Ok(Err(_)) => return Err("connect_failed".into()),
        Ok(Ok(x)) => x,
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Opens an HTTP/1.1 connection.
pub async fn connect(cfg: &HttpConfig) -> Result<Connected, String> {
    let io = tcp(cfg).await?;
    let handshake = hyper::client::conn::http1::handshake(io);
    let (sender, conn) = match tokio::time::timeout(cfg.timeout, handshake).await {
        Err(_) => return Err("connect_timeout".into()),
        Ok(Err(_)) => return Err("connect_failed".into()),
        Ok(Ok(x)) => x,
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(Connected::Http1(sender))
}

fn error_kind(e: &hyper::Error) -> &'static str {
    let mut source = std::error::Error::source(e);
    let mut io = false;
    while let Some(s) = source {
        io |= s.is::<std::io::Error>();
        source = s.source();
    }
    if io || e.is_closed() || e.is_incomplete_message() || e.is_canceled() {
        "disconnected"
    } else if e.is_parse() {
        "protocol_error"
    } else {
        "http_transport_error"
    }
}

pub async fn run_conn(
    sh: &Shared,
    cfg: &HttpConfig,
    conn: u32,
    connected: Connected,
    mut sched: ConnSchedule,
    targets: &[Target],
) -> ConnOutcome {
    let mut sender = connected;
    let h2 = matches!(sender, Connected::Http2(_));
    let ctype = HeaderValue::from_static("application/json");
    let mut body = Vec::with_capacity(sh.payload_size + 64);
    let mut seq = 0u64;
    let mut acked = Bits::default();
    let per_conn = targets.len() as u64;
    let shard = conn as usize;
    loop {
        let Some((intended, step, lag)) = sched.next_due().await else {
            break;
        };
        if let Some(lag) = lag {
            sh.stats.lagged(conn as usize, &[lag]);
        }
        let target = &targets[(seq % per_conn) as usize];
        sh.payload.write(&mut body, conn, seq);
        let mut req = Request::new(Full::new(Bytes::copy_from_slice(&body)));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = target.path.clone();
        let h = req.headers_mut();
        // HTTP/2 names the host in `:authority`, from the URI.
        if !h2 {
            h.insert(HOST, cfg.host.clone());
        }
        h.insert(CONTENT_TYPE, ctype.clone());
        if let Some(a) = &target.auth {
            h.insert(AUTHORIZATION, a.clone());
        }
        let this = seq;
        seq += 1;
        // An idle keep-alive connection the server closed fails here, before
        // anything was sent.
        match tokio::time::timeout(cfg.timeout, sender.ready()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                sh.stats.error(error_kind(&e), 1);
                break;
            }
            Err(_) => {
                sh.stats.error("connection_timeout", 1);
                break;
            }
        }
        sh.stats.sent(step, 1);
        let sent_at = Instant::now();
        let exchange = async {
            let resp = sender.send(req).await?;
            let status = resp.status().as_u16();
            resp.into_body().collect().await?;
            Ok::<u16, hyper::Error>(status)
        };
        match tokio::time::timeout(cfg.timeout, exchange).await {
            Ok(Ok(200)) => {
                let now = Instant::now();
                let us = |d: Duration| d.as_micros().min(u128::from(u64::MAX)) as u64;
                sh.stats
                    .acked(step, shard, &[us(now.saturating_duration_since(intended))]);
                sh.stats
                    .served(shard, &[us(now.saturating_duration_since(sent_at))]);
                acked.set(this);
            }
            Ok(Ok(status)) => sh.stats.failed(step, &format!("http_{status}"), 1),
            Ok(Err(e)) => {
                sh.stats.error(error_kind(&e), 1);
                sh.stats.failed(step, "lost_in_flight", 1);
                break;
            }
            Err(_) => {
                sh.stats.failed(step, "response_timeout", 1);
                break;
            }
        }
    }
    ConnOutcome {
        conn,
        seqs: seq,
        acked,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = Duration::from_secs(1);
        let c = HttpConfig::from_url("http://127.0.0.1:8080/", t).unwrap();
        assert_eq!(c.addr, "127.0.0.1:8080");
        assert_eq!(c.host, "127.0.0.1:8080");
        assert_eq!(
            HttpConfig::from_url("localhost", t).unwrap().addr,
            "localhost:80"
        );
        assert!(HttpConfig::from_url("https://x:1", t).is_err());
    }
}
