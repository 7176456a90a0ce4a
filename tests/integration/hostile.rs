//! Hostile clients: slowloris headers and bodies, connection floods on both
//! listeners. Each test opens the hostile connections, shows that a
//! well-behaved client is still served, and that memory stays bounded.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::*;

fn rss_kib(s: &Server) -> u64 {
    let pid = s.child.as_ref().unwrap().id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn sender(s: &Server) -> String {
    mint(
        s,
        ADMIN,
        "app",
        json!({"name": "ok", "scope": ["device.sendState"]}),
    )
    .1
}

/// Whether the server closed `sock` within `within`.
fn closed_within(sock: &mut TcpStream, within: Duration) -> bool {
    sock.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 512];
    loop {
        match sock.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn slowloris_headers_and_bodies_are_cut_and_others_served() {
    // All 400 hostile connections come from one address: lift its share.
    let s = Server::start_with(&[
        ("SLUICE_HTTP__HEADER_READ_TIMEOUT", "1s"),
        ("SLUICE_HTTP__BODY_READ_TIMEOUT", "1s"),
        ("SLUICE_HTTP__MAX_CONNECTIONS_PER_IP", "1000"),
    ]);
    let t = sender(&s);
    let before = rss_kib(&s);
    let mut slow_headers: Vec<TcpStream> = (0..300)
        .map(|_| {
            let mut c = TcpStream::connect(&s.http).unwrap();
            c.write_all(b"POST /applications/app/devices/d/state HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            c
        })
        .collect();
    let mut slow_bodies: Vec<TcpStream> = (0..100)
        .map(|_| {
            let mut c = TcpStream::connect(&s.http).unwrap();
            let head = format!(
                "POST /applications/app/devices/d/state HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nContent-Length: 100\r\n\r\n{{\"da"
            );
            c.write_all(head.as_bytes()).unwrap();
            c
        })
        .collect();
    // A well-behaved client is served meanwhile.
    assert_eq!(
        post_state(&s, &t, "app", "d", r#"{"data":{"ok":1}}"#).0,
        200
    );
    let during = rss_kib(&s);
    // Trickle one more header byte: still cut at the deadline.
    for c in slow_headers.iter_mut().take(10) {
        let _ = c.write_all(b"X");
    }
    for c in slow_headers.iter_mut() {
        assert!(
            closed_within(c, Duration::from_secs(3)),
            "slow header not cut"
        );
    }
    for c in slow_bodies.iter_mut() {
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut resp = String::new();
        let _ = c.read_to_string(&mut resp);
        assert!(resp.starts_with("HTTP/1.1 408"), "slow body got: {resp:?}");
        assert!(resp.contains(r#"{"error":"request_timeout"}"#));
    }
    eprintln!("slowloris: RSS {before} KiB before, {during} KiB with 400 hostile connections");
    assert!(
        during < before + 32 * 1024,
        "RSS grew from {before} to {during} KiB"
    );
    assert_eq!(history_all(&s, ADMIN, "app", "d").len(), 1);
}

#[test]
fn http_connection_limit_holds_and_idle_connections_are_reaped() {
    let s = Server::start_with(&[
        ("SLUICE_HTTP__MAX_CONNECTIONS", "20"),
        ("SLUICE_HTTP__HEADER_READ_TIMEOUT", "1s"),
    ]);
    let t = sender(&s);
    // Fill every slot with silent connections.
    let _hogs: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(&s.http).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    // The next client waits in the backlog (no slot, not refused) and is
    // served as soon as the idle hogs are reaped by the header timeout.
    let started = Instant::now();
    assert_eq!(
        post_state(&s, &t, "app", "d", r#"{"data":{"ok":1}}"#).0,
        200
    );
    let waited = started.elapsed();
    eprintln!("served after {waited:?} with all 20 slots held by idle connections");
    assert!(waited < Duration::from_secs(5));
}

#[test]
fn mqtt_silent_sockets_time_out_and_the_limit_holds() {
    let s = Server::start_with(&[
        ("SLUICE_MQTT__CONNECT_TIMEOUT", "1s"),
        ("SLUICE_MQTT__MAX_CONNECTIONS", "200"),
    ]);
    let t = sender(&s);
    let before = rss_kib(&s);
    let mut silent: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(&s.mqtt).unwrap())
        .collect();
    // Past the limit: refused promptly (the refusal is bounded too).
    let extra: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(&s.mqtt).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let during = rss_kib(&s);
    for c in silent.iter_mut() {
        assert!(
            closed_within(c, Duration::from_secs(3)),
            "silent MQTT socket not timed out"
        );
    }
    drop(extra);
    // Slots are free again: a real client connects and publishes.
    let port: u16 = s.mqtt.rsplit(':').next().unwrap().parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut o = rumqttc::MqttOptions::new("good", "127.0.0.1", port);
        o.set_credentials("u", &t);
        let (c, mut ev) = rumqttc::AsyncClient::new(o, 10);
        c.publish(
            "applications/app/devices/d/state",
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"data":{"ok":1}}"#,
        )
        .await
        .unwrap();
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = ev.poll().await.unwrap() {
                break;
            }
        }
    });
    eprintln!("mqtt flood: RSS {before} KiB before, {during} KiB with 500 silent sockets");
    assert!(
        during < before + 32 * 1024,
        "RSS grew from {before} to {during} KiB"
    );
    assert_eq!(history_all(&s, ADMIN, "app", "d").len(), 1);
}
