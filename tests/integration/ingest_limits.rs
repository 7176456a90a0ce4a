//! Issue 8 on the ingest side: revocation checked when a request is queued
//! (not only when it starts), and the limits that keep one client from
//! growing the broker's memory or storage: attributes per device, bytes per
//! history page, connections per address, failed authentications per
//! address. Each refusal is the documented one and stores nothing.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5 as p5;
use serde_json::{json, Value};

use crate::common::*;

fn sender(s: &Server, app: &str) -> (String, String) {
    mint(
        s,
        ADMIN,
        app,
        json!({"name": "dev", "scope": ["device.sendState", "device.getState"]}),
    )
}

fn port(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Reads an HTTP/1.1 response with a Content-Length body; returns the
/// status and the body.
fn read_response(sock: &mut TcpStream) -> (u16, String) {
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = sock.read(&mut chunk).unwrap_or(0);
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if body.len() >= len {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn a_body_sent_slowly_across_a_revoke_is_refused_and_nothing_stored() {
    let s = Server::start();
    let (id, token) = sender(&s, "app");
    // The token works before the revoke.
    assert_eq!(
        post_state(&s, &token, "app", "d", r#"{"data":{"before":1}}"#).0,
        200
    );
    let body = r#"{"data":{"after":1}}"#;
    let (first, rest) = body.split_at(10);
    let mut sock = TcpStream::connect(&s.http).unwrap();
    let head = format!(
        "POST /applications/app/devices/d/state HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{first}",
        body.len()
    );
    sock.write_all(head.as_bytes()).unwrap();
    // The token was checked when the headers arrived; give the server the
    // time to get there, then revoke while the body is still incomplete.
    std::thread::sleep(Duration::from_millis(200));
    let (st, v) = patch_token(&s, ADMIN, "app", &id, json!({"status": "inactive"}));
    assert_eq!(st, 200, "{v}");
    sock.write_all(rest.as_bytes()).unwrap();
    let (status, resp) = read_response(&mut sock);
    assert_eq!(
        (status, resp.as_str()),
        (401, r#"{"error":"unauthorized"}"#)
    );
    let items = history_all(&s, ADMIN, "app", "d");
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(items[0]["data"], json!({"before": 1}));
    assert_eq!(
        get_admin(&s, ADMIN, "/applications/app/devices/d/compositeState").1,
        json!({"before": {"value": 1, "time": items[0]["time"]}})
    );
}

fn composite_names(s: &Server, device: &str) -> Vec<String> {
    let (st, v) = get_admin(
        s,
        ADMIN,
        &format!("/applications/app/devices/{device}/compositeState"),
    );
    assert_eq!(st, 200);
    let mut names: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    names.sort();
    names
}

#[test]
fn attributes_per_device_are_limited_on_http_and_mqtt_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("SLUICE_STORAGE__MAX_ATTRIBUTES_PER_DEVICE", "3")];
    let mut s = Server::start_in(dir.path(), &env);
    let (_, t) = sender(&s, "app");

    assert_eq!(
        post_state(&s, &t, "app", "d", r#"{"data":{"a":1,"b":1}}"#).0,
        200
    );
    // Two new names would make 4: the whole array is refused, nothing of
    // it stored (not even its first state, whose name is known).
    let (st, v) = post_state(
        &s,
        &t,
        "app",
        "d",
        r#"[{"data":{"a":2}},{"data":{"c":1,"d":1}}]"#,
    );
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"], "bad_request");
    let detail = v["detail"].as_str().unwrap();
    assert!(
        detail.contains("3") && detail.contains("max_attributes_per_device"),
        "{detail}"
    );
    assert_eq!(history_all(&s, ADMIN, "app", "d").len(), 1);
    assert_eq!(composite_names(&s, "d"), vec!["a", "b"]);
    // One new name fits; then known names always update.
    assert_eq!(post_state(&s, &t, "app", "d", r#"{"data":{"c":1}}"#).0, 200);
    assert_eq!(
        post_state(&s, &t, "app", "d", r#"{"data":{"a":3,"b":3,"c":3}}"#).0,
        200
    );
    // Another device has its own budget.
    assert_eq!(
        post_state(&s, &t, "app", "e", r#"{"data":{"x":1,"y":1,"z":1}}"#).0,
        200
    );

    let topic = "applications/app/devices/d/state";
    rt().block_on(async {
        // MQTT 5: a publish with a new name gets a PUBACK with an error
        // reason; one with known names still succeeds.
        let mut o = rumqttc::v5::MqttOptions::new("v5", "127.0.0.1", port(&s.mqtt));
        o.set_credentials("u", &t);
        let (c, mut ev) = rumqttc::v5::AsyncClient::new(o, 10);
        let mut reasons = vec![];
        for payload in [r#"{"data":{"new":1}}"#, r#"{"data":{"a":4}}"#] {
            c.publish(
                topic,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .unwrap();
            loop {
                match ev.poll().await.unwrap() {
                    rumqttc::v5::Event::Incoming(p5::Packet::PubAck(a)) => {
                        reasons.push(a.reason);
                        break;
                    }
                    _ => continue,
                }
            }
        }
        assert_eq!(
            reasons,
            vec![p5::PubAckReason::QuotaExceeded, p5::PubAckReason::Success]
        );

        // MQTT 3.1.1 cannot refuse a publish: the connection is closed.
        let mut o = rumqttc::MqttOptions::new("v4", "127.0.0.1", port(&s.mqtt));
        o.set_credentials("u", &t);
        let (c, mut ev) = rumqttc::AsyncClient::new(o, 10);
        c.publish(
            topic,
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"data":{"new":2}}"#,
        )
        .await
        .unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match ev.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => return false,
                    Ok(_) => continue,
                    Err(_) => return true,
                }
            }
        })
        .await
        .unwrap();
        assert!(
            closed,
            "a 3.1.1 publish over the limit closes the connection"
        );
    });
    assert_eq!(composite_names(&s, "d"), vec!["a", "b", "c"]);
    let data: Vec<Value> = history_all(&s, ADMIN, "app", "d")
        .into_iter()
        .map(|i| i["data"].clone())
        .collect();
    assert!(
        !data.iter().any(|d| d.get("new").is_some()),
        "refused publishes stored: {data:?}"
    );
    let metrics = metrics_text(&s);
    assert!(
        metrics.contains("sluice_attribute_limit_refusals_total 3"),
        "{metrics}"
    );

    // After a restart the writer knows nothing in memory: it reads each
    // device's names back and the limit still holds.
    assert_eq!(s.stop(), Some(0));
    let s = Server::start_in(dir.path(), &env);
    assert_eq!(
        post_state(&s, &t, "app", "d", r#"{"data":{"late":1}}"#).0,
        400
    );
    assert_eq!(post_state(&s, &t, "app", "d", r#"{"data":{"b":9}}"#).0, 200);
    assert_eq!(composite_names(&s, "d"), vec!["a", "b", "c"]);
}

#[test]
fn history_pages_end_early_at_the_byte_bound_and_next_continues() {
    let s = Server::start_with(&[("SLUICE_ADMIN__MAX_RESPONSE_BYTES", "1000")]);
    let (_, t) = sender(&s, "app");
    let pad = "x".repeat(200);
    for i in 0..20 {
        let body = format!(
            r#"{{"data":{{"i":{i},"pad":"{pad}"}},"time":{}}}"#,
            1000 + i
        );
        assert_eq!(post_state(&s, &t, "app", "d", &body).0, 200);
    }
    // One item larger than the bound is still served, alone.
    let big = format!(
        r#"{{"data":{{"i":20,"pad":"{}"}},"time":2000}}"#,
        "y".repeat(3000)
    );
    assert_eq!(post_state(&s, &t, "app", "d", &big).0, 200);

    let mut seen = vec![];
    let mut path = "/applications/app/devices/d/state?order=asc&limit=10000".to_string();
    let mut pages = 0;
    loop {
        let r = client()
            .get(s.admin_url(&path))
            .bearer_auth(&t)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let text = r.text().unwrap();
        let page: Value = serde_json::from_str(&text).unwrap();
        let items = page["items"].as_array().unwrap();
        assert!(!items.is_empty());
        assert!(
            items.len() == 1 || text.len() <= 1000 + 64,
            "a page of {} items is {} bytes",
            items.len(),
            text.len()
        );
        seen.extend(items.iter().map(|i| i["data"]["i"].as_i64().unwrap()));
        pages += 1;
        match page["next"].as_str() {
            Some(c) => {
                path = format!("/applications/app/devices/d/state?order=asc&limit=10000&cursor={c}")
            }
            None => break,
        }
    }
    assert_eq!(seen, (0..=20).collect::<Vec<i64>>());
    assert!(pages >= 6, "{pages} pages");
}

/// A blocking TCP connection from `source` (another loopback address) to
/// `to`. std cannot bind a client socket, so tokio's socket connects.
fn connect_from(source: &str, to: &str) -> TcpStream {
    let source: std::net::IpAddr = source.parse().unwrap();
    let to: SocketAddr = to.parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(SocketAddr::new(source, 0)).unwrap();
        let stream = s.connect(to).await.unwrap();
        let std = stream.into_std().unwrap();
        std.set_nonblocking(false).unwrap();
        std
    })
}

fn post_on(sock: &mut TcpStream, token: &str, body: &str) -> (u16, String) {
    let req = format!(
        "POST /applications/app/devices/d/state HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(req.as_bytes()).unwrap();
    read_response(sock)
}

#[test]
fn connections_per_address_are_bounded_on_http_and_mqtt() {
    let s = Server::start_with(&[
        ("SLUICE_HTTP__MAX_CONNECTIONS_PER_IP", "3"),
        ("SLUICE_MQTT__MAX_CONNECTIONS_PER_IP", "2"),
    ]);
    let (_, t) = sender(&s, "app");
    let ok = r#"{"data":{"x":1}}"#;

    // HTTP: three connections from one address are served...
    let mut held: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(&s.http).unwrap())
        .collect();
    for c in held.iter_mut() {
        assert_eq!(post_on(c, &t, ok).0, 200);
    }
    // ...a fourth is told why and closed...
    let mut fourth = TcpStream::connect(&s.http).unwrap();
    let (st, body) = post_on(&mut fourth, &t, ok);
    assert_eq!(
        (st, body.as_str()),
        (429, r#"{"error":"too_many_connections"}"#)
    );
    let metrics = metrics_text(&s);
    assert!(
        metrics.contains("sluice_http_connections_refused_total 1"),
        "{metrics}"
    );
    // ...another address is not affected...
    let mut other = connect_from("127.0.0.2", &s.http);
    assert_eq!(post_on(&mut other, &t, ok).0, 200);
    // ...and closing one frees its place.
    drop(held.pop());
    std::thread::sleep(Duration::from_millis(200));
    let mut again = TcpStream::connect(&s.http).unwrap();
    assert_eq!(post_on(&mut again, &t, ok).0, 200);
    assert_eq!(history_all(&s, ADMIN, "app", "d").len(), 5);

    // MQTT: the third session from one address is refused ("server
    // unavailable" in 3.1.1) while two are open.
    rt().block_on(async {
        let connect = |id: &str| {
            let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port(&s.mqtt));
            o.set_credentials("u", &t);
            let (c, mut ev) = rumqttc::AsyncClient::new(o, 10);
            async move {
                loop {
                    match ev.poll().await {
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                            return Ok((c, ev))
                        }
                        Ok(_) => continue,
                        Err(e) => return Err(e),
                    }
                }
            }
        };
        let (c1, mut ev1) = connect("m1").await.unwrap();
        let (_c2, _ev2) = connect("m2").await.unwrap();
        match connect("m3").await {
            Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                assert_eq!(code, rumqttc::ConnectReturnCode::ServiceUnavailable)
            }
            Err(e) => panic!("unexpected error {e:?}"),
            Ok(_) => panic!("a third connection from one address was accepted"),
        }
        c1.disconnect().await.unwrap();
        while ev1.poll().await.is_ok() {}
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (_c4, _ev4) = connect("m4").await.unwrap();
    });
}

#[test]
fn bodies_being_read_at_once_are_bounded_in_bytes() {
    let s = Server::start_with(&[
        ("SLUICE_HTTP__MAX_BODY_BYTES", "1000"),
        ("SLUICE_HTTP__MAX_BUFFERED_BODY_BYTES", "2000"),
        ("SLUICE_BATCH__QUEUE_MAX_BYTES", "4096"),
    ]);
    let (_, t) = sender(&s, "app");
    let body = format!(r#"{{"data":{{"x":"{}"}}}}"#, "y".repeat(900));
    let (first, rest) = body.split_at(100);
    // Two uploads that declared 922 bytes each and are still sending hold
    // 1844 of the 2000 bytes...
    let mut slow: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut c = TcpStream::connect(&s.http).unwrap();
            let head = format!(
                "POST /applications/app/devices/d/state HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nContent-Length: {}\r\n\r\n{first}",
                body.len()
            );
            c.write_all(head.as_bytes()).unwrap();
            c
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // ...so a third is refused at once (and a small one still fits).
    let (st, v) = post_state(&s, &t, "app", "d", &body);
    assert_eq!((st, v), (503, json!({"error": "overloaded"})));
    assert_eq!(
        post_state(&s, &t, "app", "d", r#"{"data":{"small":1}}"#).0,
        200
    );
    // Finishing an upload gives its bytes back.
    slow[0].write_all(rest.as_bytes()).unwrap();
    assert_eq!(read_response(&mut slow[0]).0, 200);
    assert_eq!(post_state(&s, &t, "app", "d", &body).0, 200);
    assert_eq!(history_all(&s, ADMIN, "app", "d").len(), 3);
}

#[test]
fn failed_authentications_are_throttled_per_address_on_http() {
    let s = Server::start_with(&[
        ("SLUICE_HTTP__AUTH_FAILURE_RATE_PER_IP", "1"),
        ("SLUICE_HTTP__AUTH_FAILURE_BURST_PER_IP", "3"),
    ]);
    let (_, t) = sender(&s, "app");
    let bad = "sl_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let ok = r#"{"data":{"x":1}}"#;
    let mut sock = TcpStream::connect(&s.http).unwrap();
    for _ in 0..3 {
        assert_eq!(post_on(&mut sock, bad, ok).0, 401);
    }
    // The budget is spent: the next attempts from this address wait for it
    // to refill (1/s) before their token is even checked, so guessing
    // slows to the configured rate. A valid token is delayed, not refused.
    let started = Instant::now();
    assert_eq!(post_on(&mut sock, bad, ok).0, 401);
    assert_eq!(post_on(&mut sock, bad, ok).0, 401);
    let held = started.elapsed();
    assert!(held >= Duration::from_millis(1500), "held only {held:?}");
    assert_eq!(post_on(&mut sock, &t, ok).0, 200);
    // Another address is served as usual.
    let mut other = connect_from("127.0.0.3", &s.http);
    assert_eq!(post_on(&mut other, bad, ok).0, 401);
    assert_eq!(post_on(&mut other, &t, ok).0, 200);
    assert_eq!(history_all(&s, ADMIN, "app", "d").len(), 2);
}
