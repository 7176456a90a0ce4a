//! SIGHUP: the TLS pair and the log level are re-read without a restart.
//! A connection made before the reload keeps certificate A and keeps
//! working, new connections (HTTPS and MQTTS alike) get certificate B, and
//! a broken file or configuration keeps what runs and says why in the log.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::common::*;
use crate::tls::{pki, Pki};

/// A TLS client trusting both certificates, so the test sees which one
/// the server presents instead of failing on the other.
fn connector(pairs: &[&Pki]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for p in pairs {
        roots.add(p.der.clone()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    // A resumed session presents no certificate (the client reports the
    // one it stored), so every connection here makes a full handshake.
    cfg.resumption = rustls::client::Resumption::disabled();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// Connects with TLS and returns the stream and the certificate it got.
async fn connect(tls: &tokio_rustls::TlsConnector, addr: &str) -> (TlsStream<TcpStream>, Vec<u8>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = tls.connect(name, tcp).await.unwrap();
    let cert = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    (stream, cert)
}

/// One POST on a kept-alive HTTPS connection; returns the status line.
async fn post(stream: &mut TlsStream<TcpStream>, token: &str, n: u32) -> String {
    let body = format!(r#"{{"data":{{"n":{n}}}}}"#);
    let req = format!(
        "POST /applications/app/devices/d/state HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "connection closed: {}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        let Some(end) = text.find("\r\n\r\n") else {
            continue;
        };
        let length: usize = text[..end]
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        if buf.len() >= end + 4 + length {
            return text.lines().next().unwrap().to_string();
        }
    }
}

/// Replaces a file the way deploy tools do: a new file renamed over it.
fn replace(path: &std::path::Path, from: &std::path::Path) {
    let tmp = path.with_extension("tmp");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Waits until the log holds `needle` `count` times.
fn wait_log(s: &Server, needle: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.stderr().matches(needle).count() < count {
        assert!(
            Instant::now() < deadline,
            "log never said {needle:?} {count} times:\n{}",
            s.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn hangup(s: &Server) {
    unsafe_kill(s.child.as_ref().unwrap().id(), "HUP");
}

#[test]
fn sighup_swaps_the_certificate_for_new_connections_only() {
    let (a, b) = (pki(), pki());
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    replace(&cert, &a.cert);
    replace(&key, &a.key);
    let config = dir.path().join("sluice.toml");
    std::fs::write(&config, "[log]\nlevel = \"warn\"\n").unwrap();
    let mut s = Server::start_args(
        dir.path(),
        &["--config", config.to_str().unwrap()],
        &[
            ("SLUICE_TLS__CERT", cert.to_str().unwrap()),
            ("SLUICE_TLS__KEY", key.to_str().unwrap()),
        ],
    );
    let (_, t) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "d", "scope": ["device.sendState"]}),
    );
    let mqtts = s.mqtts.clone().unwrap();
    let tls = connector(&[&a, &b]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (mut before, got) = rt.block_on(connect(&tls, &s.http));
    assert_eq!(got, a.der.to_vec(), "served A at start");
    assert_eq!(rt.block_on(post(&mut before, &t, 1)), "HTTP/1.1 200 OK");
    // At level warn the start-up INFO lines are not logged.
    assert!(!s.stderr().contains("serving"), "{}", s.stderr());

    // New pair and a new level, then SIGHUP.
    replace(&cert, &b.cert);
    replace(&key, &b.key);
    std::fs::write(&config, "[log]\nlevel = \"info\"\n").unwrap();
    hangup(&s);
    wait_log(&s, "TLS certificate reloaded", 1);
    assert!(s.stderr().contains("log level set"), "{}", s.stderr());

    for addr in [&s.http, &mqtts] {
        let (_, got) = rt.block_on(connect(&tls, addr));
        assert_eq!(got, b.der.to_vec(), "new connection to {addr} gets B");
    }
    // The connection made before the reload keeps its session and works.
    assert_eq!(rt.block_on(post(&mut before, &t, 2)), "HTTP/1.1 200 OK");
    let (mut after, _) = rt.block_on(connect(&tls, &s.http));
    assert_eq!(rt.block_on(post(&mut after, &t, 3)), "HTTP/1.1 200 OK");

    // A broken certificate file keeps B, says why, and the broker serves.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\ngarbage\n").unwrap();
    hangup(&s);
    wait_log(&s, "TLS certificate not reloaded", 1);
    let (mut broken, got) = rt.block_on(connect(&tls, &s.http));
    assert_eq!(got, b.der.to_vec(), "a broken file keeps B");
    assert_eq!(rt.block_on(post(&mut broken, &t, 4)), "HTTP/1.1 200 OK");

    // A key that does not match the certificate is refused the same way.
    replace(&cert, &a.cert);
    hangup(&s);
    wait_log(&s, "TLS certificate not reloaded", 2);
    let (_, got) = rt.block_on(connect(&tls, &mqtts));
    assert_eq!(got, b.der.to_vec(), "a mismatched pair keeps B");

    // A configuration that does not load changes nothing.
    std::fs::write(&config, "[log]\nlevel = \"info\"\nbogus = 1\n").unwrap();
    hangup(&s);
    wait_log(&s, "configuration not reloaded", 1);
    assert!(s.stderr().contains("log.bogus"), "{}", s.stderr());
    assert_eq!(rt.block_on(post(&mut before, &t, 5)), "HTTP/1.1 200 OK");

    let ns: Vec<i64> = history_all(&s, ADMIN, "app", "d")
        .iter()
        .map(|i| i["data"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(ns, [1, 2, 3, 4, 5]);
    drop(before);
    assert_eq!(s.stop(), Some(0));
}
