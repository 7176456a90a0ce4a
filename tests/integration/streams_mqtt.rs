//! Live streams over MQTT: SUBSCRIBE to committed state with real clients
//! (rumqttc 3.1.1 and 5, Debian's mosquitto_sub): delivery after commit,
//! the filters served and refused, persistent sessions across reconnects
//! and broker restarts, QoS 1 redelivery, a stalled subscriber,
//! revocation.

use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5 as p5;
use rumqttc::v5::mqttbytes::QoS as Q5;
use serde_json::{json, Value};

use crate::common::*;

const WAIT: Duration = Duration::from_secs(20);
const ALL: &str = "applications/farm/devices/+/state";

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

/// A token of "farm" with `scope`, for `devices`.
fn token(s: &Server, scope: &[&str], devices: Value) -> String {
    mint(
        s,
        ADMIN,
        "farm",
        json!({"name": "t", "scope": scope, "devices": devices}),
    )
    .1
}

fn ingest(s: &Server) -> String {
    token(s, &["device.sendState"], json!(["*"]))
}

fn reader(s: &Server) -> String {
    token(s, &["device.getState"], json!(["*"]))
}

/// Posts states `first..first + n` (data `{"n": i}`) to `device`.
fn post(s: &Server, tok: &str, device: &str, first: u64, n: u64) {
    let body: Vec<Value> = (first..first + n)
        .map(|i| json!({"data": {"n": i}}))
        .collect();
    let (st, v) = post_state(s, tok, "farm", device, &Value::Array(body).to_string());
    assert_eq!(st, 200, "{v}");
}

/// Runs a blocking call (the test's HTTP client) from inside the async
/// part of a test.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn v5_opts(s: &Server, id: &str, tok: &str) -> rumqttc::v5::MqttOptions {
    let mut o = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", port(&s.mqtt));
    o.set_credentials("any", tok);
    o.set_keep_alive(Duration::from_secs(30));
    o
}

/// A persistent MQTT 5 session (Clean Start 0, an hour's expiry).
fn v5_keep(s: &Server, id: &str, tok: &str) -> rumqttc::v5::MqttOptions {
    let mut o = v5_opts(s, id, tok);
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(3600));
    o
}

async fn v5_connect(
    o: rumqttc::v5::MqttOptions,
) -> (
    rumqttc::v5::AsyncClient,
    rumqttc::v5::EventLoop,
    p5::ConnAck,
) {
    let (c, mut ev) = rumqttc::v5::AsyncClient::new(o, 1000);
    loop {
        match ev.poll().await.expect("connects") {
            rumqttc::v5::Event::Incoming(p5::Packet::ConnAck(a)) => return (c, ev, a),
            _ => continue,
        }
    }
}

/// The next packet from the server within `wait`.
async fn v5_next(ev: &mut rumqttc::v5::EventLoop, wait: Duration) -> p5::Packet {
    tokio::time::timeout(wait, async {
        loop {
            if let rumqttc::v5::Event::Incoming(p) = ev.poll().await.expect("connection lives") {
                return p;
            }
        }
    })
    .await
    .expect("a packet in time")
}

async fn v5_suback(ev: &mut rumqttc::v5::EventLoop) -> Vec<p5::SubscribeReasonCode> {
    loop {
        if let p5::Packet::SubAck(a) = v5_next(ev, WAIT).await {
            return a.return_codes;
        }
    }
}

/// The next `n` PUBLISH packets.
async fn v5_publishes(ev: &mut rumqttc::v5::EventLoop, n: usize) -> Vec<p5::Publish> {
    let mut out = Vec::new();
    while out.len() < n {
        if let p5::Packet::Publish(p) = v5_next(ev, WAIT).await {
            out.push(p);
        }
    }
    out
}

/// No PUBLISH arrives within `wait`.
async fn v5_quiet(ev: &mut rumqttc::v5::EventLoop, wait: Duration) {
    let r = tokio::time::timeout(wait, async {
        loop {
            if let rumqttc::v5::Event::Incoming(p5::Packet::Publish(p)) = ev.poll().await.unwrap() {
                return p;
            }
        }
    })
    .await;
    if let Ok(p) = r {
        panic!("unexpected {p:?}");
    }
}

/// The next `n` PUBLISH payloads' `n` (3.1.1).
async fn v4_publishes(ev: &mut rumqttc::EventLoop, n: usize) -> Vec<u64> {
    let mut got = vec![];
    while got.len() < n {
        let e = tokio::time::timeout(WAIT, ev.poll())
            .await
            .unwrap()
            .unwrap();
        if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = e {
            got.push(n_of(&p.payload));
        }
    }
    got
}

fn n_of(payload: &[u8]) -> u64 {
    let v: Value = serde_json::from_slice(payload).unwrap();
    v["data"]["n"].as_u64().unwrap()
}

fn ns(ps: &[p5::Publish]) -> Vec<u64> {
    ps.iter().map(|p| n_of(&p.payload)).collect()
}

fn position(p: &p5::Publish) -> u64 {
    p.properties
        .as_ref()
        .and_then(|pr| pr.user_properties.iter().find(|(k, _)| k == "position"))
        .map(|(_, v)| v.parse().unwrap())
        .expect("a position property")
}

#[test]
fn subscribers_receive_committed_states_in_both_versions() {
    let s = Server::start();
    let (w, r) = (ingest(&s), reader(&s));
    rt().block_on(async {
        let (c, mut ev, ack) = v5_connect(v5_opts(&s, "sub5", &r)).await;
        assert!(!ack.session_present);
        c.subscribe(ALL, Q5::AtLeastOnce).await.unwrap();
        c.subscribe("applications/farm/devices/pump-2/state", Q5::AtMostOnce)
            .await
            .unwrap();
        assert_eq!(
            v5_suback(&mut ev).await,
            vec![p5::SubscribeReasonCode::Success(Q5::AtLeastOnce)]
        );
        assert_eq!(
            v5_suback(&mut ev).await,
            vec![p5::SubscribeReasonCode::Success(Q5::AtMostOnce)]
        );

        let mut o4 = rumqttc::MqttOptions::new("sub4", "127.0.0.1", port(&s.mqtt));
        o4.set_credentials("any", &r);
        let (c4, mut ev4) = rumqttc::AsyncClient::new(o4, 100);
        c4.subscribe(
            "applications/farm/devices/pump-1/state",
            rumqttc::QoS::AtLeastOnce,
        )
        .await
        .unwrap();
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::SubAck(a)) = ev4.poll().await.unwrap()
            {
                assert_eq!(
                    a.return_codes,
                    vec![rumqttc::SubscribeReasonCode::Success(
                        rumqttc::QoS::AtLeastOnce
                    )]
                );
                break;
            }
        }

        blocking(|| post(&s, &w, "pump-1", 0, 3));
        blocking(|| post(&s, &w, "pump-2", 3, 2));
        // Committed before the subscription: nothing of it; after: all,
        // in commit order, once each (the overlap of `+` and pump-2 is
        // delivered once, with the higher QoS).
        let got = v5_publishes(&mut ev, 5).await;
        assert_eq!(ns(&got), vec![0, 1, 2, 3, 4]);
        assert_eq!(&got[0].topic[..], b"applications/farm/devices/pump-1/state");
        assert_eq!(&got[3].topic[..], b"applications/farm/devices/pump-2/state");
        assert!(got.iter().all(|p| p.qos == Q5::AtLeastOnce));
        let v: Value = serde_json::from_slice(&got[0].payload).unwrap();
        assert!(v["time"].as_u64().unwrap() > 1_600_000_000_000);
        assert_eq!(v["data"], json!({"n": 0}));
        let positions: Vec<u64> = got.iter().map(position).collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
        v5_quiet(&mut ev, Duration::from_millis(300)).await;

        // 3.1.1, one device.
        let mut got4 = vec![];
        while got4.len() < 3 {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = ev4.poll().await.unwrap()
            {
                assert_eq!(p.qos, rumqttc::QoS::AtLeastOnce);
                got4.push(n_of(&p.payload));
            }
        }
        assert_eq!(got4, vec![0, 1, 2]);
    });
}

#[test]
fn filters_a_token_may_not_hold_are_refused() {
    let s = Server::start_with(&[("SLUICE_STREAMS__MAX_SUBSCRIPTIONS_PER_CONNECTION", "2")]);
    let narrow = token(&s, &["device.getState"], json!(["a"]));
    let both = token(&s, &["device.getState", "device.sendState"], json!(["*"]));
    let w = ingest(&s);
    use p5::SubscribeReasonCode as R;
    rt().block_on(async {
        let (c, mut ev, _) = v5_connect(v5_opts(&s, "n", &narrow)).await;
        let cases = [
            ("applications/other/devices/a/state", R::NotAuthorized),
            ("applications/farm/devices/b/state", R::NotAuthorized),
            ("applications/farm/#", R::WildcardSubscriptionsNotSupported),
            (
                "applications/+/devices/a/state",
                R::WildcardSubscriptionsNotSupported,
            ),
            ("some/other/topic", R::TopicFilterInvalid),
            (
                "applications/farm/devices/a/state",
                R::Success(Q5::AtLeastOnce),
            ),
            // `+` for a token limited to some devices: it gets those.
            (ALL, R::Success(Q5::AtMostOnce)),
            ("applications/farm/devices/a/state2", R::TopicFilterInvalid),
        ];
        for (f, want) in cases {
            let qos = match want {
                R::Success(q) => q,
                _ => Q5::AtLeastOnce,
            };
            c.subscribe(f, qos).await.unwrap();
            assert_eq!(v5_suback(&mut ev).await, vec![want], "{f}");
        }
        // Two subscriptions held: a third is over the limit, the same
        // filter again replaces its subscription.
        c.subscribe("applications/farm/devices/x/state", Q5::AtLeastOnce)
            .await
            .unwrap();
        assert_eq!(v5_suback(&mut ev).await, vec![R::NotAuthorized]);
        let (c2, mut ev2, _) = v5_connect(v5_opts(&s, "b", &both)).await;
        for f in ["applications/farm/devices/a/state", ALL] {
            c2.subscribe(f, Q5::AtLeastOnce).await.unwrap();
            assert_eq!(v5_suback(&mut ev2).await, vec![R::Success(Q5::AtLeastOnce)]);
        }
        c2.subscribe("applications/farm/devices/b/state", Q5::AtLeastOnce)
            .await
            .unwrap();
        assert_eq!(v5_suback(&mut ev2).await, vec![R::QuotaExceeded]);
        c2.subscribe(ALL, Q5::AtMostOnce).await.unwrap();
        assert_eq!(v5_suback(&mut ev2).await, vec![R::Success(Q5::AtMostOnce)]);

        // The narrow token receives only its device, whatever the filter.
        blocking(|| post(&s, &w, "b", 0, 1));
        blocking(|| post(&s, &w, "a", 1, 1));
        let got = v5_publishes(&mut ev, 1).await;
        assert_eq!(ns(&got), vec![1]);
        v5_quiet(&mut ev, Duration::from_millis(300)).await;

        // An ingest-only token may not subscribe at all.
        let (c3, mut ev3, _) = v5_connect(v5_opts(&s, "i", &w)).await;
        c3.subscribe(ALL, Q5::AtLeastOnce).await.unwrap();
        assert_eq!(v5_suback(&mut ev3).await, vec![R::NotAuthorized]);
        // UNSUBSCRIBE stops delivery.
        c.unsubscribe(ALL).await.unwrap();
        c.unsubscribe("applications/farm/devices/a/state")
            .await
            .unwrap();
        loop {
            if let p5::Packet::UnsubAck(_) = v5_next(&mut ev, WAIT).await {
                break;
            }
        }
        blocking(|| post(&s, &w, "a", 2, 1));
        v5_quiet(&mut ev, Duration::from_millis(500)).await;
    });
}

#[test]
fn a_persistent_session_resumes_with_what_came_while_it_was_away() {
    let s = Server::start();
    let (w, r) = (ingest(&s), reader(&s));
    rt().block_on(async {
        // 3.1.1 CleanSession=0.
        let mut o = rumqttc::MqttOptions::new("keeper", "127.0.0.1", port(&s.mqtt));
        o.set_credentials("any", &r);
        o.set_clean_session(false);
        let connect = |o: rumqttc::MqttOptions| async move {
            let (c, mut ev) = rumqttc::AsyncClient::new(o, 100);
            loop {
                if let rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a)) =
                    ev.poll().await.unwrap()
                {
                    return (c, ev, a.session_present);
                }
            }
        };
        let (c, mut ev, present) = connect(o.clone()).await;
        assert!(!present);
        c.subscribe(ALL, rumqttc::QoS::AtLeastOnce).await.unwrap();
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) = ev.poll().await.unwrap() {
                break;
            }
        }
        blocking(|| post(&s, &w, "d", 0, 5));
        assert_eq!(v4_publishes(&mut ev, 5).await, vec![0, 1, 2, 3, 4]);
        // Let the PUBACKs out, then go away.
        for _ in 0..5 {
            let _ = tokio::time::timeout(Duration::from_millis(50), ev.poll()).await;
        }
        c.disconnect().await.unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(1), ev.poll()).await;
        drop(ev);
        blocking(|| post(&s, &w, "d", 5, 7));
        // Back: the session is present, its subscription with it.
        let (_c, mut ev, present) = connect(o.clone()).await;
        assert!(present);
        assert_eq!(
            v4_publishes(&mut ev, 7).await,
            (5..12).collect::<Vec<u64>>()
        );
        blocking(|| post(&s, &w, "d", 12, 1));
        assert_eq!(v4_publishes(&mut ev, 1).await, vec![12]);

        // A clean session discards it.
        let mut clean = o.clone();
        clean.set_clean_session(true);
        let (c, mut ev2, present) = connect(clean).await;
        assert!(!present);
        c.disconnect().await.unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(1), ev2.poll()).await;
        let (_c, _ev, present) = connect(o).await;
        assert!(!present);
    });
}

#[test]
fn a_persistent_session_survives_a_restart_of_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start_in(dir.path(), &[]);
    let (w, r) = (ingest(&s), reader(&s));
    let first = rt().block_on(async {
        let (c, mut ev, _) = v5_connect(v5_keep(&s, "k", &r)).await;
        c.subscribe(ALL, Q5::AtLeastOnce).await.unwrap();
        v5_suback(&mut ev).await;
        blocking(|| post(&s, &w, "d", 0, 4));
        let got = v5_publishes(&mut ev, 4).await;
        // The client dies without a DISCONNECT after its PUBACKs are out.
        for _ in 0..5 {
            let _ = tokio::time::timeout(Duration::from_millis(50), ev.poll()).await;
        }
        ns(&got)
    });
    assert_eq!(first, vec![0, 1, 2, 3]);
    // Committed while it is away, before and after the restart.
    post(&s, &w, "d", 4, 3);
    assert_eq!(s.stop(), Some(0));
    let s = Server::start_in(dir.path(), &[]);
    post(&s, &w, "d", 7, 3);
    rt().block_on(async {
        let (_c, mut ev, ack) = v5_connect(v5_keep(&s, "k", &r)).await;
        assert!(ack.session_present);
        let got = v5_publishes(&mut ev, 6).await;
        assert_eq!(ns(&got), (4..10).collect::<Vec<u64>>());
        v5_quiet(&mut ev, Duration::from_millis(300)).await;
    });
}

#[test]
fn removing_the_application_removes_its_sessions_and_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start_in(dir.path(), &[]);
    let (w, r) = (ingest(&s), reader(&s));
    rt().block_on(async {
        let (c, mut ev, _) = v5_connect(v5_keep(&s, "k", &r)).await;
        c.subscribe(ALL, Q5::AtLeastOnce).await.unwrap();
        v5_suback(&mut ev).await;
        blocking(|| post(&s, &w, "d", 0, 3));
        assert_eq!(ns(&v5_publishes(&mut ev, 3).await), vec![0, 1, 2]);
        // Connected while the application is removed: the revocation of
        // its tokens ends the connection, which writes nothing back.
        blocking(|| post(&s, &w, "d", 3, 2));
        let removed = blocking(|| {
            client()
                .delete(s.admin_url("/applications/farm"))
                .bearer_auth(ADMIN)
                .send()
                .unwrap()
                .status()
                .as_u16()
        });
        assert_eq!(removed, 204);
        let end = tokio::time::timeout(WAIT, async {
            loop {
                if ev.poll().await.is_err() {
                    return;
                }
            }
        })
        .await;
        assert!(end.is_ok(), "the subscriber's connection ends");
    });
    // After a restart too: the application, created again, has neither
    // the old session nor the old log.
    assert_eq!(s.stop(), Some(0));
    let s = Server::start_in(dir.path(), &[]);
    let (w, r) = (ingest(&s), reader(&s));
    let st = crate::streams_sse::Stream::open(
        &s.http,
        "/applications/farm/stream?from=earliest",
        &r,
        None,
    )
    .unwrap();
    st.quiet(Duration::from_millis(300));
    rt().block_on(async {
        let (_c, mut ev, ack) = v5_connect(v5_keep(&s, "k", &r)).await;
        assert!(!ack.session_present);
        v5_quiet(&mut ev, Duration::from_millis(300)).await;
    });
    post(&s, &w, "d", 100, 1);
    let got = st.events(1, WAIT);
    assert_eq!(got[0].json()["data"]["n"], 100);
}

#[test]
fn unacknowledged_qos1_states_come_again_on_the_next_connection() {
    let s = Server::start();
    let (w, r) = (ingest(&s), reader(&s));
    rt().block_on(async {
        let mut o = v5_keep(&s, "m", &r);
        o.set_manual_acks(true);
        let (c, mut ev, _) = v5_connect(o.clone()).await;
        c.subscribe(ALL, Q5::AtLeastOnce).await.unwrap();
        v5_suback(&mut ev).await;
        blocking(|| post(&s, &w, "d", 0, 6));
        let got = v5_publishes(&mut ev, 6).await;
        // Acknowledges the first three only.
        for p in &got[..3] {
            c.ack(p).await.unwrap();
        }
        for _ in 0..5 {
            let _ = tokio::time::timeout(Duration::from_millis(50), ev.poll()).await;
        }
        c.disconnect().await.unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(1), ev.poll()).await;
        drop(ev);
        let (c, mut ev, ack) = v5_connect(o).await;
        assert!(ack.session_present);
        let again = v5_publishes(&mut ev, 3).await;
        assert_eq!(ns(&again), vec![3, 4, 5]);
        assert_eq!(
            again.iter().map(position).collect::<Vec<_>>(),
            got[3..].iter().map(position).collect::<Vec<_>>(),
            "the same positions"
        );
        for p in &again {
            c.ack(p).await.unwrap();
        }
        v5_quiet(&mut ev, Duration::from_millis(300)).await;
    });
}

#[test]
fn a_stalled_subscriber_catches_up_with_nothing_missing_or_repeated() {
    let s = Server::start_with(&[
        ("SLUICE_STREAMS__LIVE_BUFFER_BYTES", "4096"),
        ("SLUICE_STREAMS__CONSUMER_BUFFER_BYTES", "16384"),
    ]);
    let (w, r) = (ingest(&s), reader(&s));
    let per = 200;
    rt().block_on(async {
        let (c, mut ev, _) = v5_connect(v5_opts(&s, "slow", &r)).await;
        c.subscribe(ALL, Q5::AtLeastOnce).await.unwrap();
        v5_suback(&mut ev).await;
        // The event loop is not polled while ingest runs: nothing is read
        // or acknowledged.
        let sw = &s;
        let w = &w;
        tokio::task::spawn_blocking({
            let (http, w) = (sw.http.clone(), w.clone());
            move || {
                std::thread::scope(|sc| {
                    for t in 0..4u64 {
                        let (http, w) = (&http, &w);
                        sc.spawn(move || {
                            for k in 0..10u64 {
                                let first = (t * 10 + k) * per;
                                let body: Vec<Value> = (first..first + per)
                                    .map(|i| json!({"data": {"n": i, "pad": "y".repeat(200)}}))
                                    .collect();
                                let r = client()
                                    .post(format!(
                                        "http://{http}/applications/farm/devices/d{t}/state"
                                    ))
                                    .bearer_auth(w)
                                    .header("content-type", "application/json")
                                    .body(Value::Array(body).to_string())
                                    .send()
                                    .unwrap();
                                assert_eq!(r.status().as_u16(), 200);
                            }
                        });
                    }
                });
            }
        })
        .await
        .unwrap();
        let total = (4 * 10 * per) as usize;
        let got = v5_publishes(&mut ev, total).await;
        let positions: Vec<u64> = got.iter().map(position).collect();
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "out of order or repeated"
        );
        let mut n = ns(&got);
        n.sort_unstable();
        assert_eq!(n, (0..total as u64).collect::<Vec<u64>>());
        v5_quiet(&mut ev, Duration::from_millis(300)).await;
    });
    let lags: u64 = metrics_text(&s)
        .lines()
        .find_map(|l| l.strip_prefix("sluice_stream_lags_total "))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(
        lags >= 1,
        "the subscriber never fell behind the live buffer"
    );
}

#[test]
fn revoking_the_token_ends_the_subscription() {
    let s = Server::start();
    let (id, r) = mint(
        &s,
        ADMIN,
        "farm",
        json!({"name": "r", "scope": ["device.getState"]}),
    );
    rt().block_on(async {
        let (c, mut ev, _) = v5_connect(v5_opts(&s, "rv", &r)).await;
        c.subscribe(ALL, Q5::AtLeastOnce).await.unwrap();
        v5_suback(&mut ev).await;
        let t0 = Instant::now();
        assert_eq!(blocking(|| delete_token(&s, ADMIN, "farm", &id)), 204);
        let code = loop {
            match tokio::time::timeout(WAIT, ev.poll()).await.unwrap() {
                Ok(rumqttc::v5::Event::Incoming(p5::Packet::Disconnect(d))) => break d.reason_code,
                Ok(_) => continue,
                Err(rumqttc::v5::ConnectionError::MqttState(
                    rumqttc::v5::StateError::ServerDisconnect { reason_code, .. },
                )) => break reason_code,
                Err(e) => panic!("{e:?}"),
            }
        };
        assert_eq!(code, p5::DisconnectReasonCode::NotAuthorized);
        assert!(t0.elapsed() < Duration::from_secs(2));
    });
}

#[test]
fn mosquitto_sub_receives_states() {
    let s = Server::start();
    let (w, r) = (ingest(&s), reader(&s));
    let child = std::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port(&s.mqtt).to_string()])
        .args([
            "-u", "any", "-P", &r, "-t", ALL, "-q", "1", "-C", "3", "-V", "mqttv5",
        ])
        .args(["-i", "mosq-sub", "-F", "%t %p"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_sub (Debian package mosquitto-clients)");
    // Its subscription is in place once it has connected; states sent
    // before then are not for it.
    let deadline = Instant::now() + WAIT;
    while !metrics_text(&s).contains(r#"sluice_mqtt_connects_total{outcome="accepted"} 1"#) {
        assert!(Instant::now() < deadline, "mosquitto_sub did not connect");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    post(&s, &w, "m", 0, 3);
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    for (i, l) in lines.iter().enumerate() {
        let (topic, payload) = l.split_once(' ').unwrap();
        assert_eq!(topic, "applications/farm/devices/m/state");
        assert_eq!(n_of(payload.as_bytes()), i as u64);
    }
}

const SHARED: &str = "$share/workers/applications/farm/devices/+/state";

/// (device, n) of each PUBLISH.
fn device_and_n(p: &p5::Publish) -> (String, u64) {
    let topic = std::str::from_utf8(&p.topic).unwrap();
    let device = topic.split('/').nth(3).unwrap().to_string();
    (device, n_of(&p.payload))
}

#[test]
fn a_shared_subscription_spreads_states_over_its_members_keeping_device_order() {
    let s = Server::start();
    let (w, r) = (ingest(&s), reader(&s));
    rt().block_on(async {
        let mut members = vec![];
        for i in 0..3 {
            let (c, mut ev, _) = v5_connect(v5_opts(&s, &format!("w{i}"), &r)).await;
            c.subscribe(SHARED, Q5::AtLeastOnce).await.unwrap();
            assert_eq!(
                v5_suback(&mut ev).await,
                vec![p5::SubscribeReasonCode::Success(Q5::AtLeastOnce)]
            );
            members.push((c, ev));
        }
        // A plain subscriber beside the group gets everything.
        let (c, mut all, _) = v5_connect(v5_opts(&s, "all", &r)).await;
        c.subscribe(ALL, Q5::AtLeastOnce).await.unwrap();
        v5_suback(&mut all).await;
        let devices = 24u64;
        let per = 5u64;
        blocking(|| {
            for k in 0..per {
                for d in 0..devices {
                    post(&s, &w, &format!("d{d}"), k * devices + d, 1);
                }
            }
        });
        let total = (devices * per) as usize;
        assert_eq!(v5_publishes(&mut all, total).await.len(), total);
        // Collect from every member until all states are in.
        let mut got: Vec<Vec<(String, u64)>> = vec![vec![]; 3];
        let deadline = Instant::now() + WAIT;
        while got.iter().map(Vec::len).sum::<usize>() < total {
            assert!(
                Instant::now() < deadline,
                "only {:?}",
                got.iter().map(Vec::len).collect::<Vec<_>>()
            );
            for (i, (_, ev)) in members.iter_mut().enumerate() {
                if let Ok(Ok(rumqttc::v5::Event::Incoming(p5::Packet::Publish(p)))) =
                    tokio::time::timeout(Duration::from_millis(20), ev.poll()).await
                {
                    got[i].push(device_and_n(&p));
                }
            }
        }
        // Exactly once across the group.
        let mut ns: Vec<u64> = got.iter().flatten().map(|(_, n)| *n).collect();
        ns.sort_unstable();
        assert_eq!(ns, (0..total as u64).collect::<Vec<_>>());
        // Spread: more than one member worked, and each device went to one
        // member, in commit order.
        assert!(got.iter().filter(|g| !g.is_empty()).count() >= 2, "{got:?}");
        for d in 0..devices {
            let name = format!("d{d}");
            let holders: Vec<usize> = (0..3)
                .filter(|i| got[*i].iter().any(|(dev, _)| *dev == name))
                .collect();
            assert_eq!(holders.len(), 1, "{name} went to {holders:?}");
            let order: Vec<u64> = got[holders[0]]
                .iter()
                .filter(|(dev, _)| *dev == name)
                .map(|(_, n)| *n)
                .collect();
            assert!(order.windows(2).all(|w| w[0] < w[1]), "{name}: {order:?}");
        }
    });
}

#[test]
fn a_member_leaving_hands_its_unacknowledged_states_to_the_others() {
    let s = Server::start();
    let (w, r) = (ingest(&s), reader(&s));
    rt().block_on(async {
        // The member that will leave acknowledges nothing.
        let mut o = v5_opts(&s, "quitter", &r);
        o.set_manual_acks(true);
        let (qc, mut quitter, _) = v5_connect(o).await;
        qc.subscribe(SHARED, Q5::AtLeastOnce).await.unwrap();
        v5_suback(&mut quitter).await;
        let (sc, mut stayer, _) = v5_connect(v5_opts(&s, "stayer", &r)).await;
        sc.subscribe(SHARED, Q5::AtLeastOnce).await.unwrap();
        v5_suback(&mut stayer).await;
        let devices = 16u64;
        blocking(|| {
            for d in 0..devices {
                post(&s, &w, &format!("d{d}"), d, 1);
            }
        });
        // Read what each got for a while.
        let mut q = vec![];
        let mut st = vec![];
        let deadline = Instant::now() + Duration::from_secs(3);
        while (q.len() + st.len()) < devices as usize && Instant::now() < deadline {
            if let Ok(Ok(rumqttc::v5::Event::Incoming(p5::Packet::Publish(p)))) =
                tokio::time::timeout(Duration::from_millis(20), quitter.poll()).await
            {
                q.push(n_of(&p.payload));
            }
            if let Ok(Ok(rumqttc::v5::Event::Incoming(p5::Packet::Publish(p)))) =
                tokio::time::timeout(Duration::from_millis(20), stayer.poll()).await
            {
                st.push(n_of(&p.payload));
            }
        }
        assert_eq!(q.len() + st.len(), devices as usize);
        assert!(!q.is_empty(), "the quitter got nothing to drop");
        // It goes away without acknowledging: the stayer gets its states.
        drop((qc, quitter));
        let again = v5_publishes(&mut stayer, q.len()).await;
        let mut again = ns(&again);
        again.sort_unstable();
        q.sort_unstable();
        assert_eq!(again, q);
        v5_quiet(&mut stayer, Duration::from_millis(300)).await;
    });
}

#[test]
fn stored_sessions_are_bounded_and_their_expiry_capped() {
    let s = Server::start_with(&[
        ("SLUICE_STREAMS__MAX_SESSIONS_PER_APP", "1"),
        ("SLUICE_STREAMS__SESSION_EXPIRY_MAX", "1h"),
    ]);
    let r = reader(&s);
    rt().block_on(async {
        let mut o = v5_keep(&s, "first", &r);
        o.set_session_expiry_interval(Some(7200));
        let (c, mut ev, ack) = v5_connect(o).await;
        // Asked for two hours, granted the one configured.
        let granted = ack.properties.and_then(|p| p.session_expiry_interval);
        assert_eq!(granted, Some(3600));
        c.subscribe(ALL, Q5::AtLeastOnce).await.unwrap();
        assert_eq!(
            v5_suback(&mut ev).await,
            vec![p5::SubscribeReasonCode::Success(Q5::AtLeastOnce)]
        );
        // A second persistent session of the application is one too many…
        let (c2, mut ev2, _) = v5_connect(v5_keep(&s, "second", &r)).await;
        c2.subscribe(ALL, Q5::AtLeastOnce).await.unwrap();
        assert_eq!(
            v5_suback(&mut ev2).await,
            vec![p5::SubscribeReasonCode::QuotaExceeded]
        );
        // …while a session that is not kept may subscribe.
        let (c3, mut ev3, _) = v5_connect(v5_opts(&s, "third", &r)).await;
        c3.subscribe(ALL, Q5::AtLeastOnce).await.unwrap();
        assert_eq!(
            v5_suback(&mut ev3).await,
            vec![p5::SubscribeReasonCode::Success(Q5::AtLeastOnce)]
        );
    });
}
