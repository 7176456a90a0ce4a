//! MQTT 3.1.1 and 5 against the real binary, with rumqttc (v4 and v5
//! clients), raw sockets, and Debian's mosquitto_pub.

use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5 as p5;
use serde_json::{json, Value};

use crate::common::*;
use crate::mqtt_raw::{varint, Connect, Raw};

const TOPIC: &str = "applications/app/devices/d1/state";

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

fn device_token(s: &Server, devices: Value) -> (String, String) {
    mint(
        s,
        ADMIN,
        "app",
        json!({"name": "dev", "scope": ["device.sendState", "device.getState"], "devices": devices}),
    )
}

// ---- rumqttc v4 (MQTT 3.1.1) helpers ------------------------------------

fn v4_opts(s: &Server, id: &str, token: &str) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port(&s.mqtt));
    o.set_credentials("ignored", token);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(100);
    o
}

/// Connects and waits for CONNACK; returns the refusal if any.
async fn v4_connect(
    o: rumqttc::MqttOptions,
) -> Result<(rumqttc::AsyncClient, rumqttc::EventLoop), rumqttc::ConnectionError> {
    let (c, mut ev) = rumqttc::AsyncClient::new(o, 1000);
    loop {
        match ev.poll().await? {
            rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) => return Ok((c, ev)),
            _ => continue,
        }
    }
}

/// Polls until `n` successful PUBACKs or an error; returns how many.
async fn v4_count_acks(
    ev: &mut rumqttc::EventLoop,
    n: usize,
) -> Result<usize, rumqttc::ConnectionError> {
    let mut acks = 0;
    while acks < n {
        if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = ev.poll().await? {
            acks += 1;
        }
    }
    Ok(acks)
}

// ---- rumqttc v5 helpers ---------------------------------------------------

fn v5_opts(s: &Server, id: &str, token: &str) -> rumqttc::v5::MqttOptions {
    let mut o = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", port(&s.mqtt));
    o.set_credentials("ignored", token);
    o.set_keep_alive(Duration::from_secs(30));
    o
}

async fn v5_connect(
    o: rumqttc::v5::MqttOptions,
) -> Result<(rumqttc::v5::AsyncClient, rumqttc::v5::EventLoop), rumqttc::v5::ConnectionError> {
    let (c, mut ev) = rumqttc::v5::AsyncClient::new(o, 1000);
    loop {
        match ev.poll().await? {
            rumqttc::v5::Event::Incoming(p5::Packet::ConnAck(_)) => return Ok((c, ev)),
            _ => continue,
        }
    }
}

/// The next packet the server sends (skipping outgoing events), or the
/// connection error.
async fn v5_next(
    ev: &mut rumqttc::v5::EventLoop,
) -> Result<p5::Packet, rumqttc::v5::ConnectionError> {
    loop {
        if let rumqttc::v5::Event::Incoming(p) = ev.poll().await? {
            return Ok(p);
        }
    }
}

/// Waits for the server's DISCONNECT and returns its reason code (rumqttc
/// reports it as an error of the event loop).
async fn v5_disconnect_reason(ev: &mut rumqttc::v5::EventLoop) -> Option<p5::DisconnectReasonCode> {
    loop {
        match ev.poll().await {
            Ok(rumqttc::v5::Event::Incoming(p5::Packet::Disconnect(d))) => {
                return Some(d.reason_code)
            }
            Ok(_) => continue,
            Err(rumqttc::v5::ConnectionError::MqttState(
                rumqttc::v5::StateError::ServerDisconnect { reason_code, .. },
            )) => return Some(reason_code),
            Err(_) => return None,
        }
    }
}

fn stored(s: &Server, device: &str) -> Vec<Value> {
    history_all(s, ADMIN, "app", device)
}

#[test]
fn connect_refusals_per_version() {
    let s = Server::start();
    let (_, t) = device_token(&s, json!(["*"]));
    let (_, reader) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "r", "scope": ["device.getState"]}),
    );
    rt().block_on(async {
        // The root admin token never travels over a device port.
        for bad in ["wrong", ADMIN] {
            match v4_connect(v4_opts(&s, "c1", bad)).await {
                Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                    assert_eq!(code, rumqttc::ConnectReturnCode::NotAuthorized)
                }
                Err(e) => panic!("v4 {bad}: unexpected {e:?}"),
                Ok(_) => panic!("v4 {bad}: connected"),
            }
            match v5_connect(v5_opts(&s, "c2", bad)).await {
                Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => {
                    assert_eq!(code, p5::ConnectReturnCode::NotAuthorized)
                }
                Err(e) => panic!("v5 {bad}: unexpected {e:?}"),
                Ok(_) => panic!("v5 {bad}: connected"),
            }
        }
        // A token that may only read connects (to subscribe), but may not
        // publish.
        let (c, mut ev) = v5_connect(v5_opts(&s, "r1", &reader)).await.unwrap();
        c.publish(
            TOPIC,
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            r#"{"data":{"x":1}}"#,
        )
        .await
        .unwrap();
        loop {
            if let p5::Packet::PubAck(a) = v5_next(&mut ev).await.unwrap() {
                assert_eq!(a.reason, p5::PubAckReason::NotAuthorized);
                break;
            }
        }
        // No password at all.
        let mut o = rumqttc::MqttOptions::new("c3", "127.0.0.1", port(&s.mqtt));
        o.set_keep_alive(Duration::from_secs(30));
        assert!(matches!(
            v4_connect(o).await,
            Err(rumqttc::ConnectionError::ConnectionRefused(
                rumqttc::ConnectReturnCode::NotAuthorized
            ))
        ));
        assert!(v4_connect(v4_opts(&s, "ok", &t)).await.is_ok());
    });
    let metrics = metrics_text(&s);
    assert!(
        metrics.contains(r#"sluice_mqtt_connects_total{outcome="not_authorized"} 5"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"sluice_mqtt_connects_total{outcome="accepted"} 2"#),
        "{metrics}"
    );
}

#[test]
fn qos0_and_qos1_are_stored_in_both_versions() {
    let s = Server::start();
    let (_, t) = device_token(&s, json!(["*"]));
    rt().block_on(async {
        let (c, mut ev) = v4_connect(v4_opts(&s, "v4", &t)).await.unwrap();
        c.publish(
            TOPIC,
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"data":{"v":"v4q1"},"time":1}"#,
        )
        .await
        .unwrap();
        assert_eq!(v4_count_acks(&mut ev, 1).await.unwrap(), 1);
        c.publish(
            TOPIC,
            rumqttc::QoS::AtMostOnce,
            false,
            r#"{"data":{"v":"v4q0"},"time":2}"#,
        )
        .await
        .unwrap();
        // A QoS 1 after it: its PUBACK means the QoS 0 before it is committed too.
        c.publish(
            TOPIC,
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"data":{"v":"v4q1b"},"time":3}"#,
        )
        .await
        .unwrap();
        assert_eq!(v4_count_acks(&mut ev, 1).await.unwrap(), 1);

        let (c, mut ev) = v5_connect(v5_opts(&s, "v5", &t)).await.unwrap();
        c.publish(
            TOPIC,
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            r#"{"data":{"v":"v5q1"},"time":4}"#,
        )
        .await
        .unwrap();
        loop {
            if let p5::Packet::PubAck(a) = v5_next(&mut ev).await.unwrap() {
                assert_eq!(a.reason, p5::PubAckReason::Success);
                break;
            }
        }
        c.publish(
            TOPIC,
            rumqttc::v5::mqttbytes::QoS::AtMostOnce,
            false,
            r#"{"data":{"v":"v5q0"},"time":5}"#,
        )
        .await
        .unwrap();
        c.disconnect().await.unwrap();
        // Drive the event loop until the client's DISCONNECT is out.
        while ev.poll().await.is_ok() {}
    });
    // The v5 QoS 0 may still be in the writer when DISCONNECT lands.
    let deadline = Instant::now() + Duration::from_secs(5);
    let values = loop {
        let v: Vec<Value> = stored(&s, "d1")
            .iter()
            .map(|i| i["data"]["v"].clone())
            .collect();
        if v.len() == 5 || Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        values,
        vec![
            json!("v4q1"),
            json!("v4q0"),
            json!("v4q1b"),
            json!("v5q1"),
            json!("v5q0")
        ]
    );
}

#[test]
fn refusals_per_version_store_nothing() {
    let s = Server::start();
    let (_, t) = device_token(&s, json!(["d1"]));
    let q1 = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;
    let q0 = rumqttc::v5::mqttbytes::QoS::AtMostOnce;
    rt().block_on(async {
        // MQTT 5, QoS 1: PUBACK with the reason; the session continues, and
        // PUBACKs stay in publish order.
        let (c, mut ev) = v5_connect(v5_opts(&s, "a", &t)).await.unwrap();
        let cases = [
            (
                "applications/app/devices/d2/state",
                r#"{"data":{"x":1}}"#,
                p5::PubAckReason::NotAuthorized,
            ),
            (
                "applications/other/devices/d1/state",
                r#"{"data":{"x":1}}"#,
                p5::PubAckReason::NotAuthorized,
            ),
            (
                "applications/app/devices/d1/state/extra",
                r#"{"data":{"x":1}}"#,
                p5::PubAckReason::NotAuthorized,
            ),
            (TOPIC, "not json", p5::PubAckReason::PayloadFormatInvalid),
            (
                TOPIC,
                r#"[{"data":{"x":1}}]"#,
                p5::PubAckReason::PayloadFormatInvalid,
            ),
            (TOPIC, r#"{"data":{"x":1}}"#, p5::PubAckReason::Success),
        ];
        for (topic, payload, _) in &cases {
            c.publish(*topic, q1, false, *payload).await.unwrap();
        }
        let mut reasons = vec![];
        while reasons.len() < cases.len() {
            if let p5::Packet::PubAck(a) = v5_next(&mut ev).await.unwrap() {
                reasons.push(a.reason);
            }
        }
        assert_eq!(reasons, cases.iter().map(|c| c.2).collect::<Vec<_>>());

        // MQTT 5, QoS 0 refused: DISCONNECT 0x87 / 0x99.
        for (payload, topic, code) in [
            (
                r#"{"data":{"x":1}}"#,
                "applications/app/devices/d2/state",
                p5::DisconnectReasonCode::NotAuthorized,
            ),
            (
                "{bad",
                TOPIC,
                p5::DisconnectReasonCode::PayloadFormatInvalid,
            ),
        ] {
            let (c, mut ev) = v5_connect(v5_opts(&s, "b", &t)).await.unwrap();
            c.publish(topic, q0, false, payload).await.unwrap();
            assert_eq!(v5_disconnect_reason(&mut ev).await, Some(code));
        }

        // MQTT 3.1.1: the connection is closed, no PUBACK.
        for (topic, payload) in [
            ("applications/app/devices/d2/state", r#"{"data":{"x":1}}"#),
            (TOPIC, "not json"),
        ] {
            let (c, mut ev) = v4_connect(v4_opts(&s, "c", &t)).await.unwrap();
            c.publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
            let r = v4_count_acks(&mut ev, 1).await;
            assert!(r.is_err(), "{topic}: expected close, got {r:?}");
        }

        // QoS 2: MQTT 5 DISCONNECT 0x9B; 3.1.1 close.
        let (c, mut ev) = v5_connect(v5_opts(&s, "d", &t)).await.unwrap();
        c.publish(
            TOPIC,
            rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
            false,
            r#"{"data":{"x":2}}"#,
        )
        .await
        .unwrap();
        assert_eq!(
            v5_disconnect_reason(&mut ev).await,
            Some(p5::DisconnectReasonCode::QoSNotSupported)
        );
        let (c, mut ev) = v4_connect(v4_opts(&s, "e", &t)).await.unwrap();
        c.publish(
            TOPIC,
            rumqttc::QoS::ExactlyOnce,
            false,
            r#"{"data":{"x":2}}"#,
        )
        .await
        .unwrap();
        let closed = loop {
            match ev.poll().await {
                Err(_) => break true,
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubRec(_))) => break false,
                Ok(_) => {}
            }
        };
        assert!(closed);

        // SUBSCRIBE is refused, the session lives on.
        let (c, mut ev) = v4_connect(v4_opts(&s, "f", &t)).await.unwrap();
        c.subscribe("applications/#", rumqttc::QoS::AtLeastOnce)
            .await
            .unwrap();
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::SubAck(a)) = ev.poll().await.unwrap() {
                assert_eq!(a.return_codes, vec![rumqttc::SubscribeReasonCode::Failure]);
                break;
            }
        }
        let (c, mut ev) = v5_connect(v5_opts(&s, "g", &t)).await.unwrap();
        c.subscribe("applications/#", q1).await.unwrap();
        loop {
            if let p5::Packet::SubAck(a) = v5_next(&mut ev).await.unwrap() {
                assert_eq!(
                    a.return_codes,
                    vec![p5::SubscribeReasonCode::WildcardSubscriptionsNotSupported]
                );
                break;
            }
        }
    });
    // Only the one good publish is stored; nothing from any refusal.
    assert_eq!(stored(&s, "d1").len(), 1);
    assert!(stored(&s, "d2").is_empty());
    assert!(history_all(&s, ADMIN, "other", "d1").is_empty());
}

#[test]
fn revocation_cuts_live_sessions_within_a_second() {
    let s = Server::start();
    let (p_id, parent) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "p", "scope": ["device.sendState", "token.create"]}),
    );
    let (_, child) = mint(
        &s,
        &parent,
        "app",
        json!({"name": "c", "scope": ["device.sendState"]}),
    );
    let rt = rt();
    let (v5, v4) = rt.block_on(async {
        let v5 = v5_connect(v5_opts(&s, "five", &child)).await.unwrap();
        let v4 = v4_connect(v4_opts(&s, "four", &child)).await.unwrap();
        (v5, v4)
    });
    let (_c5, mut ev5) = v5;
    let (_c4, mut ev4) = v4;
    // Revoke the parent; the sessions authenticated with the child.
    let revoked_at = Instant::now();
    let (st, _) = patch_token(&s, ADMIN, "app", &p_id, json!({"status": "inactive"}));
    assert_eq!(st, 200);
    rt.block_on(async {
        let got =
            tokio::time::timeout(Duration::from_secs(1), v5_disconnect_reason(&mut ev5)).await;
        assert_eq!(
            got.ok().flatten(),
            Some(p5::DisconnectReasonCode::NotAuthorized),
            "v5 session not cut with 0x87"
        );
        let got = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                if ev4.poll().await.is_err() {
                    return;
                }
            }
        })
        .await;
        assert!(got.is_ok(), "v4 session still open");
    });
    assert!(revoked_at.elapsed() < Duration::from_secs(2));
    // And it cannot come back.
    rt.block_on(async {
        assert!(v4_connect(v4_opts(&s, "again", &child)).await.is_err());
    });
}

#[test]
fn expiry_cuts_a_live_session() {
    let s = Server::start();
    let exp = sluice::timefmt::format_rfc3339(sluice::timefmt::now_ms() + 1200);
    let (_, t) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "e", "scope": ["device.sendState"], "expirationDate": exp}),
    );
    rt().block_on(async {
        let (_c, mut ev) = v5_connect(v5_opts(&s, "exp", &t)).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(3), v5_disconnect_reason(&mut ev)).await;
        assert_eq!(
            got.ok().flatten(),
            Some(p5::DisconnectReasonCode::NotAuthorized)
        );
    });
}

#[test]
fn max_connections_refuses_cleanly() {
    let s = Server::start_with(&[("SLUICE_MQTT__MAX_CONNECTIONS", "2")]);
    let (_, t) = device_token(&s, json!(["*"]));
    rt().block_on(async {
        let a = v4_connect(v4_opts(&s, "a", &t)).await.unwrap();
        let b = v5_connect(v5_opts(&s, "b", &t)).await.unwrap();
        match v4_connect(v4_opts(&s, "c", &t)).await {
            Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                assert_eq!(code, rumqttc::ConnectReturnCode::ServiceUnavailable)
            }
            other => panic!("third connection: {:?}", other.err()),
        }
        match v5_connect(v5_opts(&s, "d", &t)).await {
            Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => {
                assert_eq!(code, p5::ConnectReturnCode::ServerBusy)
            }
            other => panic!("fourth connection: {:?}", other.err()),
        }
        // Freeing a slot admits the next one.
        drop(a);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if v4_connect(v4_opts(&s, "e", &t)).await.is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "slot never freed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(b);
    });
}

#[test]
fn malformed_bytes_harm_nothing_else() {
    let s = Server::start_with(&[("SLUICE_MQTT__CONNECT_TIMEOUT", "500ms")]);
    let (_, t) = device_token(&s, json!(["*"]));
    let rt = rt();
    let (c, mut ev) = rt.block_on(v4_connect(v4_opts(&s, "good", &t))).unwrap();

    let garbage: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        vec![0xff; 64],
        vec![0x10, 0xff, 0xff, 0xff, 0xff, 0x7f],
        vec![0x30, 0x05, 0x00, 0x01, b'a', b'{', b'}'],
        {
            // Valid CONNECT, then a PUBLISH whose topic length overruns it.
            let mut v = Connect::v311("m1", &t).bytes();
            v.extend_from_slice(&[0x32, 0x04, 0x00, 0x50, b'a', b'b']);
            v
        },
        {
            // Valid CONNECT, then a packet type the client may not send
            // (PUBREC: the server never sends QoS 2).
            let mut v = Connect::v311("m2", &t).bytes();
            v.extend_from_slice(&[0x50, 0x02, 0x00, 0x01]);
            v
        },
        {
            // Remaining length far beyond the maximum packet size.
            let mut v = Connect::v311("m3", &t).bytes();
            v.extend_from_slice(&[0x30, 0xff, 0xff, 0xff, 0x7f]);
            v
        },
    ];
    for g in &garbage {
        // Panics unless the server closes.
        Raw::connect(&s.mqtt, g).until_closed(Duration::from_secs(3));
    }
    // Silence after connecting: closed by the CONNECT timeout.
    Raw::open(&s.mqtt).until_closed(Duration::from_secs(3));

    // Keep-alive: 1 s promised, nothing sent: closed after 1.5 s.
    let sleepy = Connect {
        keep_alive: 1,
        ..Connect::v311("sleepy", &t)
    };
    let started = Instant::now();
    let got = Raw::connect(&s.mqtt, &sleepy.bytes()).until_closed(Duration::from_secs(4));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].connack(), Some((false, 0)), "CONNACK accepted first");
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        started.elapsed()
    );

    // The good client never noticed.
    rt.block_on(async {
        c.publish(
            TOPIC,
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"data":{"ok":true}}"#,
        )
        .await
        .unwrap();
        assert_eq!(v4_count_acks(&mut ev, 1).await.unwrap(), 1);
    });
    assert_eq!(stored(&s, "d1").len(), 1);
}

#[test]
fn every_acknowledged_publish_is_stored_exactly_once_byte_equal() {
    acked_means_stored(&[]);
}

#[test]
fn a_full_queue_stops_reading_and_loses_nothing() {
    // One request fits the queue and every batch is fsynced: sessions spend
    // most of the run blocked on the queue (TCP backpressure), and still
    // every publish is acknowledged and stored.
    acked_means_stored(&[
        ("SLUICE_BATCH__QUEUE_CAPACITY", "1"),
        ("SLUICE_STORAGE__SYNC", "always"),
    ]);
}

fn acked_means_stored(env: &[(&str, &str)]) {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start_in(dir.path(), env);
    let (_, t) = device_token(&s, json!(["*"]));
    const CLIENTS: usize = 6;
    const PER_CLIENT: usize = 300;
    let rt = rt();
    let acked: usize = rt.block_on(async {
        let mut tasks = vec![];
        for k in 0..CLIENTS {
            let (v5, id) = (k % 2 == 0, format!("load{k}"));
            let t = t.clone();
            let sref = &s;
            if v5 {
                let (c, mut ev) = v5_connect(v5_opts(sref, &id, &t)).await.unwrap();
                tasks.push(tokio::spawn(async move {
                    for i in 0..PER_CLIENT {
                        let body = format!(
                            r#"{{"data":{{"k":{k},"i":{i},"pad":"{}"}}}}"#,
                            "p".repeat(i % 40)
                        );
                        c.publish(
                            format!("applications/app/devices/dev{k}/state"),
                            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                            false,
                            body,
                        )
                        .await
                        .unwrap();
                    }
                    let mut acks = 0;
                    while acks < PER_CLIENT {
                        if let p5::Packet::PubAck(a) = v5_next(&mut ev).await.unwrap() {
                            assert_eq!(a.reason, p5::PubAckReason::Success);
                            acks += 1;
                        }
                    }
                    acks
                }));
            } else {
                let (c, mut ev) = v4_connect(v4_opts(sref, &id, &t)).await.unwrap();
                tasks.push(tokio::spawn(async move {
                    for i in 0..PER_CLIENT {
                        let body = format!(
                            r#"{{"data":{{"k":{k},"i":{i},"pad":"{}"}}}}"#,
                            "p".repeat(i % 40)
                        );
                        c.publish(
                            format!("applications/app/devices/dev{k}/state"),
                            rumqttc::QoS::AtLeastOnce,
                            false,
                            body,
                        )
                        .await
                        .unwrap();
                    }
                    v4_count_acks(&mut ev, PER_CLIENT).await.unwrap()
                }));
            }
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        total
    });
    assert_eq!(acked, CLIENTS * PER_CLIENT);
    // Restart, then read back: exactly what was acked, byte-equal, once.
    assert_eq!(s.stop(), Some(0));
    let s2 = Server::start_in(dir.path(), &[]);
    for k in 0..CLIENTS {
        let raw = history_raw_data(&s2, ADMIN, "app", &format!("dev{k}"));
        assert_eq!(raw.len(), PER_CLIENT, "device {k}");
        for (i, data) in raw.iter().enumerate() {
            let expected = format!(r#"{{"k":{k},"i":{i},"pad":"{}"}}"#, "p".repeat(i % 40));
            assert_eq!(data, &expected);
        }
    }
}

#[test]
fn mosquitto_pub_both_versions() {
    let s = Server::start();
    let (_, t) = device_token(&s, json!(["*"]));
    for (version, value) in [("mqttv311", "from-311"), ("mqttv5", "from-5")] {
        let out = std::process::Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port(&s.mqtt).to_string()])
            .args(["-u", "x", "-P", &t, "-q", "1", "-V", version])
            .args(["-t", TOPIC, "-m"])
            .arg(format!(r#"{{"data":{{"src":"{value}"}}}}"#))
            .output()
            .expect("mosquitto_pub is installed by .ci/test (package mosquitto-clients)");
        assert!(
            out.status.success(),
            "{version}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let got: Vec<Value> = stored(&s, "d1")
        .iter()
        .map(|i| i["data"]["src"].clone())
        .collect();
    assert_eq!(got, vec![json!("from-311"), json!("from-5")]);
    // A wrong token is refused with "not authorized".
    let out = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port(&s.mqtt).to_string()])
        .args([
            "-u", "x", "-P", "wrong", "-q", "1", "-V", "mqttv311", "-t", TOPIC, "-m", "{}",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .to_lowercase()
            .contains("not authorised")
            || String::from_utf8_lossy(&out.stderr)
                .to_lowercase()
                .contains("not authorized"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn session_takeover_disconnects_the_older_connection() {
    let s = Server::start();
    let (_, t) = device_token(&s, json!(["*"]));
    rt().block_on(async {
        let (_c1, mut ev1) = v5_connect(v5_opts(&s, "same-id", &t)).await.unwrap();
        let (_c2, _ev2) = v5_connect(v5_opts(&s, "same-id", &t)).await.unwrap();
        let got =
            tokio::time::timeout(Duration::from_secs(2), v5_disconnect_reason(&mut ev1)).await;
        assert_eq!(
            got.ok().flatten(),
            Some(p5::DisconnectReasonCode::SessionTakenOver)
        );
    });
}

#[test]
fn shutdown_commits_and_acks_in_flight_publishes_first() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start_in(dir.path(), &[("SLUICE_STORAGE__SYNC", "always")]);
    let (_, t) = device_token(&s, json!(["*"]));
    let rt = rt();
    let (c, mut ev) = rt.block_on(v5_connect(v5_opts(&s, "drain", &t))).unwrap();
    let pid = s.child.as_ref().unwrap().id();
    // Publish continuously; SIGTERM arrives while QoS 1 publishes are in
    // flight. Every PUBACK received must correspond to a stored message.
    let (acked, farewell) = rt.block_on(async {
        let publisher = tokio::spawn(async move {
            for i in 0..20_000 {
                let body = format!(r#"{{"data":{{"i":{i}}}}}"#);
                if c.publish(TOPIC, rumqttc::v5::mqttbytes::QoS::AtLeastOnce, false, body)
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        let mut acked = 0usize;
        let farewell = loop {
            match ev.poll().await {
                Ok(rumqttc::v5::Event::Incoming(p5::Packet::PubAck(a))) => {
                    assert_eq!(a.reason, p5::PubAckReason::Success);
                    acked += 1;
                    if acked == 200 {
                        unsafe_kill(pid, "TERM");
                    }
                }
                Ok(_) => {}
                Err(rumqttc::v5::ConnectionError::MqttState(
                    rumqttc::v5::StateError::ServerDisconnect { reason_code, .. },
                )) => break Some(reason_code),
                Err(e) => {
                    eprintln!("connection ended: {e:?} after {acked} acks");
                    break None;
                }
            }
        };
        publisher.abort();
        (acked, farewell)
    });
    assert_eq!(farewell, Some(p5::DisconnectReasonCode::ServerShuttingDown));
    assert_eq!(s.wait_exit(), Some(0));
    let s2 = Server::start_in(dir.path(), &[]);
    let stored: Vec<i64> = stored(&s2, "d1")
        .iter()
        .map(|i| i["data"]["i"].as_i64().unwrap())
        .collect();
    // PUBACKs come in publish order, so the first `acked` publishes are the
    // acknowledged ones; each must be stored exactly once, in order.
    assert!(
        stored.len() >= acked,
        "{} stored < {acked} acked",
        stored.len()
    );
    assert_eq!(stored[..acked], (0..acked as i64).collect::<Vec<_>>()[..]);
}

#[test]
fn per_ip_connect_rate_and_failed_auth_budget() {
    let s = Server::start_with(&[
        ("SLUICE_MQTT__CONNECT_RATE_PER_IP", "1"),
        ("SLUICE_MQTT__CONNECT_BURST_PER_IP", "3"),
    ]);
    let (_, t) = device_token(&s, json!(["*"]));
    rt().block_on(async {
        let mut keep = vec![];
        for i in 0..3 {
            keep.push(v4_connect(v4_opts(&s, &format!("r{i}"), &t)).await.unwrap());
        }
        match v5_connect(v5_opts(&s, "r3", &t)).await {
            Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => {
                assert_eq!(code, p5::ConnectReturnCode::ConnectionRateExceeded)
            }
            other => panic!("fourth connect in a burst of 3: {:?}", other.err()),
        }
        match v4_connect(v4_opts(&s, "r4", &t)).await {
            Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                assert_eq!(code, rumqttc::ConnectReturnCode::ServiceUnavailable)
            }
            other => panic!("fifth connect: {:?}", other.err()),
        }
    });

    // Failed authentications: a budget of 2 refilled at 2/s. Ten wrong
    // tokens in a row take at least (10 - 2) / 2 = 4 s, yet a valid token
    // from the same address right after is admitted, at most delayed.
    let s = Server::start_with(&[
        ("SLUICE_MQTT__AUTH_FAILURE_RATE_PER_IP", "2"),
        ("SLUICE_MQTT__AUTH_FAILURE_BURST_PER_IP", "2"),
    ]);
    let (_, t) = device_token(&s, json!(["*"]));
    rt().block_on(async {
        let started = Instant::now();
        for i in 0..10 {
            assert!(v4_connect(v4_opts(&s, &format!("bad{i}"), "wrong"))
                .await
                .is_err());
        }
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(3500),
            "10 failures took only {took:?}"
        );
        let started = Instant::now();
        assert!(v4_connect(v4_opts(&s, "good", &t)).await.is_ok());
        assert!(started.elapsed() < Duration::from_millis(1500));
    });
}

#[test]
fn a_client_too_small_for_any_connack_is_closed_not_left_waiting() {
    let s = Server::start();
    let (_, t) = device_token(&s, json!(["*"]));
    // MQTT 5 CONNECT declaring a Maximum Packet Size of 8 bytes.
    let c = Connect {
        props: vec![0x27, 0, 0, 0, 8],
        ..Connect::v5("tiny", &t)
    };
    let got = Raw::connect(&s.mqtt, &c.bytes()).until_closed(Duration::from_secs(3));
    let sent: usize = got
        .iter()
        .map(|p| 1 + varint(p.body.len()).len() + p.body.len())
        .sum();
    assert!(sent <= 8, "a packet larger than the client allows: {got:?}");
}
