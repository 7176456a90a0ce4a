//! HTTP/2 on the device listener (issue 14, item 2): h2c with prior
//! knowledge on plain HTTP and ALPN `h2` over TLS, beside HTTP/1.1 on the
//! same port; the refusals every request gets; the stream and header
//! limits; idle HTTP/2 connections; the per-address refusal in HTTP/2;
//! draining at shutdown; and `http.http2 = false`.
//!
//! The client is hyper's own HTTP/2 client over a real socket; the limit
//! checks speak raw HTTP/2 frames, because a well-behaved client never
//! exceeds what the server advertises.

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::TcpStream as StdTcpStream;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::client::conn::http2::SendRequest;
use hyper::{Method, Request, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};

use crate::common::*;
use crate::tls::pki;

type Body = BoxBody<Bytes, Infallible>;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed()
}

/// An HTTP/2 connection with prior knowledge (h2c) and the task that drives
/// it (it ends when the server closes the connection).
async fn h2c(addr: &str) -> (SendRequest<Body>, tokio::task::JoinHandle<()>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, driver)
}

/// A state request; `None` leaves a header out.
fn request(
    path: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    method: Method,
    body: Body,
) -> Request<Body> {
    let mut b = Request::builder()
        .method(method)
        .uri(format!("http://localhost{path}"));
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    if let Some(c) = content_type {
        b = b.header("content-type", c);
    }
    b.body(body).unwrap()
}

/// Sends `req` and reads the whole answer: status, version, headers and
/// JSON body (`Value::Null` when the body is not JSON).
async fn exchange(
    send: &mut SendRequest<Body>,
    req: Request<Body>,
) -> Result<(u16, Version, hyper::HeaderMap, Value), hyper::Error> {
    send.ready().await?;
    let resp = send.send_request(req).await?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok((
        parts.status.as_u16(),
        parts.version,
        parts.headers,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    ))
}

async fn post(send: &mut SendRequest<Body>, token: &str, device: &str, body: &str) -> (u16, Value) {
    let req = request(
        &format!("/applications/app/devices/{device}/state"),
        Some(token),
        Some("application/json"),
        Method::POST,
        full(body.to_string()),
    );
    let (status, version, _, v) = exchange(send, req).await.unwrap();
    assert_eq!(version, Version::HTTP_2);
    (status, v)
}

#[test]
fn h2c_and_http1_share_the_port_with_the_same_answers() {
    let s = Server::start();
    let (_, t) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "all", "scope": ["device.sendState"]}),
    );
    let (_, one) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "d0", "scope": ["device.sendState"], "devices": ["d0"]}),
    );
    rt().block_on(async {
        let (send, _driver) = h2c(&s.http).await;
        // 100 requests on one connection, up to 50 at once (streams).
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..100 {
            let mut send = send.clone();
            let t = t.clone();
            tasks.spawn(async move {
                let body = format!(r#"{{"data":{{"i":{i}}}}}"#);
                post(&mut send, &t, &format!("d{}", i % 5), &body).await
            });
            if tasks.len() == 50 {
                assert_eq!(
                    tasks.join_next().await.unwrap().unwrap(),
                    (200, json!({"accepted": 1}))
                );
            }
        }
        while let Some(r) = tasks.join_next().await {
            assert_eq!(r.unwrap(), (200, json!({"accepted": 1})));
        }

        // An array counts each state, as on HTTP/1.1.
        let mut send = send.clone();
        assert_eq!(
            post(
                &mut send,
                &t,
                "d0",
                r#"[{"data":{"a":1}},{"data":{"a":2}}]"#
            )
            .await,
            (200, json!({"accepted": 2}))
        );

        // Every refusal of the device listener, in HTTP/2.
        let path = "/applications/app/devices/d1/state";
        let ok = r#"{"data":{"x":1}}"#;
        let cases: Vec<(Request<Body>, u16, &str)> = vec![
            (
                request(path, None, Some("application/json"), Method::POST, full(ok)),
                401,
                "unauthorized",
            ),
            (
                request(path, Some("sl_wrong"), None, Method::POST, full(ok)),
                401,
                "unauthorized",
            ),
            (
                request(path, Some(&one), None, Method::POST, full(ok)),
                403,
                "forbidden",
            ),
            (
                request(path, Some(&t), Some("text/plain"), Method::POST, full(ok)),
                415,
                "unsupported_media_type",
            ),
            (
                request(path, Some(&t), None, Method::POST, full("{\"data\":")),
                400,
                "bad_request",
            ),
            (
                request(
                    path,
                    Some(&t),
                    None,
                    Method::POST,
                    full(vec![b' '; 300 * 1024]),
                ),
                413,
                "payload_too_large",
            ),
            (
                request(path, Some(&t), None, Method::PUT, full("")),
                405,
                "method_not_allowed",
            ),
            (
                request("/nowhere", Some(&t), None, Method::POST, full(ok)),
                404,
                "not_found",
            ),
        ];
        for (req, status, code) in cases {
            let (st, version, _, body) = exchange(&mut send, req).await.unwrap();
            assert_eq!((st, version), (status, Version::HTTP_2), "{code}");
            assert_eq!(body["error"], code);
        }
    });

    // HTTP/1.1 on the same port is unchanged.
    assert_eq!(
        post_state(&s, &t, "app", "d1", r#"{"data":{"via":"http1"}}"#),
        (200, json!({"accepted": 1}))
    );
    let stored: usize = (0..5)
        .map(|d| history_all(&s, ADMIN, "app", &format!("d{d}")).len())
        .sum();
    assert_eq!(stored, 100 + 2 + 1, "refused requests stored nothing");
}

/// A TLS client offering `alpn`; returns the negotiated protocol and the
/// stream.
async fn tls_connect(
    addr: &str,
    p: &crate::tls::Pki,
    alpn: &[&[u8]],
) -> (
    Option<Vec<u8>>,
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(p.der.clone()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    let proto = tls.get_ref().1.alpn_protocol().map(|p| p.to_vec());
    (proto, tls)
}

#[test]
fn h2_over_tls_by_alpn_with_http1_still_offered() {
    let p = pki();
    let cert = p.cert.to_str().unwrap().to_string();
    let key = p.key.to_str().unwrap().to_string();
    let s = Server::start_with(&[("SLUICE_TLS__CERT", &cert), ("SLUICE_TLS__KEY", &key)]);
    let (_, t) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "d", "scope": ["device.sendState"]}),
    );
    rt().block_on(async {
        // A client offering both gets HTTP/2.
        let (proto, tls) = tls_connect(&s.http, &p, &[b"h2", b"http/1.1"]).await;
        assert_eq!(proto.as_deref(), Some(&b"h2"[..]));
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        assert_eq!(
            post(&mut send, &t, "d", r#"{"data":{"via":"h2"}}"#).await,
            (200, json!({"accepted": 1}))
        );
        let (st, _, _, body) = exchange(
            &mut send,
            request(
                "/applications/app/devices/d/state",
                Some("sl_wrong"),
                None,
                Method::POST,
                full(r#"{"data":{"x":1}}"#),
            ),
        )
        .await
        .unwrap();
        assert_eq!((st, &body["error"]), (401, &json!("unauthorized")));

        // Offering only HTTP/1.1, or no ALPN at all, gets HTTP/1.1.
        for alpn in [&[&b"http/1.1"[..]][..], &[][..]] {
            let (proto, tls) = tls_connect(&s.http, &p, alpn).await;
            assert_eq!(proto.as_deref(), alpn.first().copied());
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .unwrap();
            tokio::spawn(conn);
            let req = request(
                "/applications/app/devices/d/state",
                Some(&t),
                None,
                Method::POST,
                full(r#"{"data":{"via":"http1"}}"#),
            );
            let resp = send.send_request(req).await.unwrap();
            assert_eq!(resp.version(), Version::HTTP_11);
            assert_eq!(resp.status().as_u16(), 200);
        }
    });
    assert_eq!(history_all(&s, ADMIN, "app", "d").len(), 3);
}

// --- raw HTTP/2 frames, for limits a real client would not cross -------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const REFUSED_STREAM: u32 = 0x7;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Reads one frame: (type, flags, stream, payload).
fn read_frame(sock: &mut StdTcpStream) -> (u8, u8, u32, Vec<u8>) {
    let mut head = [0u8; 9];
    sock.read_exact(&mut head).unwrap();
    let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    sock.read_exact(&mut payload).unwrap();
    (head[3], head[4], stream, payload)
}

/// An HPACK string literal (no Huffman coding), up to 126 bytes.
fn hpack_str(out: &mut Vec<u8>, s: &str) {
    assert!(s.len() < 127);
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

/// The header block of a state POST: `:method POST`, `:scheme http` and
/// `:path`, `:authority`, `authorization`, `content-type` as literals with
/// indexed names from the HPACK static table.
fn post_headers(device: &str, token: &str) -> Vec<u8> {
    let mut h = vec![0x83, 0x86];
    h.push(0x04);
    hpack_str(&mut h, &format!("/applications/app/devices/{device}/state"));
    h.push(0x01);
    hpack_str(&mut h, "localhost");
    h.extend_from_slice(&[0x0f, 23 - 15]);
    hpack_str(&mut h, &format!("Bearer {token}"));
    h.extend_from_slice(&[0x0f, 31 - 15]);
    hpack_str(&mut h, "application/json");
    h
}

/// The value of `id` in a SETTINGS payload.
fn setting(payload: &[u8], id: u16) -> Option<u32> {
    payload.chunks(6).find_map(|c| {
        (u16::from_be_bytes([c[0], c[1]]) == id)
            .then(|| u32::from_be_bytes([c[2], c[3], c[4], c[5]]))
    })
}

#[test]
fn stream_and_header_limits_are_advertised_and_enforced() {
    let s = Server::start_with(&[
        ("SLUICE_HTTP__H2_MAX_CONCURRENT_STREAMS", "2"),
        ("SLUICE_HTTP__MAX_HEADER_BYTES", "4096"),
    ]);
    let (_, t) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "d", "scope": ["device.sendState"]}),
    );
    let mut sock = StdTcpStream::connect(&s.http).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    sock.write_all(PREFACE).unwrap();
    sock.write_all(&frame(SETTINGS, 0, 0, &[])).unwrap();
    let (kind, flags, _, settings) = read_frame(&mut sock);
    assert_eq!(
        (kind, flags),
        (SETTINGS, 0),
        "the server's SETTINGS come first"
    );
    assert_eq!(setting(&settings, 0x3), Some(2), "MAX_CONCURRENT_STREAMS");
    assert_eq!(setting(&settings, 0x6), Some(4096), "MAX_HEADER_LIST_SIZE");
    sock.write_all(&frame(SETTINGS, ACK, 0, &[])).unwrap();

    // Streams 1 and 3 send their headers and hold their bodies back; the
    // third stream at once is one too many.
    for id in [1, 3, 5] {
        sock.write_all(&frame(HEADERS, END_HEADERS, id, &post_headers("d", &t)))
            .unwrap();
    }
    let refused = loop {
        let (kind, _, stream, payload) = read_frame(&mut sock);
        assert_ne!(kind, GOAWAY, "the connection itself must survive");
        if kind == RST_STREAM {
            break (stream, u32::from_be_bytes(payload[..4].try_into().unwrap()));
        }
    };
    assert_eq!(refused, (5, REFUSED_STREAM));

    // Finishing stream 1 answers it 200 (`:status 200` is static index 8)
    // and frees its slot: stream 7 is then accepted and served.
    let body = br#"{"data":{"n":1}}"#;
    sock.write_all(&frame(DATA, END_STREAM, 1, body)).unwrap();
    sock.write_all(&frame(HEADERS, END_HEADERS, 7, &post_headers("d", &t)))
        .unwrap();
    sock.write_all(&frame(DATA, END_STREAM, 7, body)).unwrap();
    let mut answered = Vec::new();
    while answered.len() < 2 {
        let (kind, _, stream, payload) = read_frame(&mut sock);
        assert!(kind != RST_STREAM && kind != GOAWAY, "{kind} on {stream}");
        if kind == HEADERS {
            assert_eq!(payload.first(), Some(&0x88), "stream {stream} not 200");
            answered.push(stream);
        }
    }
    answered.sort();
    assert_eq!(answered, [1, 7]);
    assert_eq!(history_all(&s, ADMIN, "app", "d").len(), 2);

    // A header list over http.max_header_bytes is answered 431 in both
    // protocols (HTTP/2 then resets the stream); nothing is stored.
    let big = "x".repeat(6000);
    rt().block_on(async {
        let (mut send, _driver) = h2c(&s.http).await;
        let mut req = request(
            "/applications/app/devices/d/state",
            Some(&t),
            None,
            Method::POST,
            full(r#"{"data":{"n":2}}"#),
        );
        req.headers_mut().insert("x-big", big.parse().unwrap());
        assert_eq!(exchange(&mut send, req).await.unwrap().0, 431);
    });
    let resp = client()
        .post(s.http_url("/applications/app/devices/d/state"))
        .bearer_auth(&t)
        .header("x-big", &big)
        .body(r#"{"data":{"n":3}}"#)
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 431);
    assert_eq!(history_all(&s, ADMIN, "app", "d").len(), 2);
}

#[test]
fn idle_h2_connections_are_closed_and_busy_ones_kept() {
    let s = Server::start_with(&[("SLUICE_HTTP__HEADER_READ_TIMEOUT", "1s")]);
    let (_, t) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "d", "scope": ["device.sendState"]}),
    );
    rt().block_on(async {
        // Busy: one request every 300 ms for 3.5 s keeps the connection.
        let (mut busy, busy_driver) = h2c(&s.http).await;
        // Idle after one request: closed after one to two timeouts.
        let (mut idle, idle_driver) = h2c(&s.http).await;
        assert_eq!(post(&mut idle, &t, "d", r#"{"data":{"i":0}}"#).await.0, 200);
        for i in 0..12 {
            assert_eq!(
                post(&mut busy, &t, "d", &format!(r#"{{"data":{{"b":{i}}}}}"#))
                    .await
                    .0,
                200
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        assert!(idle_driver.is_finished(), "idle connection still open");
        assert!(!busy_driver.is_finished(), "busy connection closed");
        // A connection that never finishes the preface is closed too.
        let mut half = tokio::net::TcpStream::connect(&s.http).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        half.write_all(&PREFACE[..10]).await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), half.read(&mut buf))
            .await
            .expect("half a preface not cut");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    });
}

#[test]
fn h2_connection_over_the_address_limit_is_answered_429() {
    let s = Server::start_with(&[("SLUICE_HTTP__MAX_CONNECTIONS_PER_IP", "1")]);
    let (_, t) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "d", "scope": ["device.sendState"]}),
    );
    rt().block_on(async {
        let (mut held, _d1) = h2c(&s.http).await;
        assert_eq!(post(&mut held, &t, "d", r#"{"data":{"i":0}}"#).await.0, 200);
        let (mut second, _d2) = h2c(&s.http).await;
        let req = request(
            "/applications/app/devices/d/state",
            Some(&t),
            None,
            Method::POST,
            full(r#"{"data":{"i":1}}"#),
        );
        let (status, version, headers, body) = exchange(&mut second, req).await.unwrap();
        assert_eq!((status, version), (429, Version::HTTP_2));
        assert_eq!(body, json!({"error": "too_many_connections"}));
        assert_eq!(headers["retry-after"], "1");
        // The held connection still works.
        assert_eq!(post(&mut held, &t, "d", r#"{"data":{"i":2}}"#).await.0, 200);
    });
    assert!(metrics_text(&s).contains("sluice_http_connections_refused_total 1"));
    assert_eq!(history_all(&s, ADMIN, "app", "d").len(), 2);
}

#[test]
fn sigterm_finishes_an_h2_request_in_flight() {
    let mut s = Server::start();
    let (_, t) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "d", "scope": ["device.sendState", "device.getState"]}),
    );
    let dir = s.dir.clone();
    let pid = s.child.as_ref().unwrap().id();
    let rt = rt();
    let (status, body) = rt.block_on(async {
        let (mut send, _driver) = h2c(&s.http).await;
        // The body comes in two parts; the signal arrives between them.
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(2);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
        });
        let req = request(
            "/applications/app/devices/d/state",
            Some(&t),
            Some("application/json"),
            Method::POST,
            StreamBody::new(stream).boxed(),
        );
        tx.send(Bytes::from_static(b"{\"data\":")).await.unwrap();
        let pending = tokio::spawn(async move { exchange(&mut send, req).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        unsafe_kill(pid, "TERM");
        tokio::time::sleep(Duration::from_millis(300)).await;
        tx.send(Bytes::from_static(b"{\"last\":true}}"))
            .await
            .unwrap();
        drop(tx);
        let (status, _, _, body) = pending.await.unwrap().unwrap();
        (status, body)
    });
    assert_eq!((status, body), (200, json!({"accepted": 1})));
    assert_eq!(s.wait_exit(), Some(0));
    let s2 = Server::start_in(&dir, &[]);
    let stored = history_all(&s2, &t, "app", "d");
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0]["data"], json!({"last": true}));
}

#[test]
fn http2_off_leaves_http1_only() {
    let s = Server::start_with(&[("SLUICE_HTTP__HTTP2", "false")]);
    let (_, t) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "d", "scope": ["device.sendState"]}),
    );
    rt().block_on(async {
        let tcp = tokio::net::TcpStream::connect(&s.http).await.unwrap();
        let handshake = hyper::client::conn::http2::handshake::<_, _, Body>(
            TokioExecutor::new(),
            TokioIo::new(tcp),
        )
        .await;
        // The handshake itself only writes; the request then fails because
        // the server answers in HTTP/1.1 and closes.
        if let Ok((mut send, conn)) = handshake {
            tokio::spawn(conn);
            let req = request(
                "/applications/app/devices/d/state",
                Some(&t),
                None,
                Method::POST,
                full(r#"{"data":{"x":1}}"#),
            );
            assert!(exchange(&mut send, req).await.is_err());
        }
    });
    assert_eq!(post_state(&s, &t, "app", "d", r#"{"data":{"x":2}}"#).0, 200);
    assert_eq!(history_all(&s, ADMIN, "app", "d").len(), 1);
}
