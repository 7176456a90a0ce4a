//! Cluster mode's ingest log with the real binary on a real 3-node NATS
//! cluster: acknowledgements after the stream stored the state, the stream
//! sequence in the answer, read-your-writes with `minSeq` (on one broker
//! and across brokers), identical read models, the original JSON on the
//! stream, ingest-only brokers, refusals while NATS is away (and nothing
//! refused stored later), live SSE streams across brokers, and the example
//! downstream consumer.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice::cluster::publish::{received_ms, token_id};
use sluice::cluster::Names;

use crate::common::*;
use crate::nats::NatsCluster;

/// A broker in cluster mode on `nats` with stream prefix `prefix`, with
/// short timings so failures show quickly.
pub fn cluster_env(nats: &NatsCluster, prefix: &str) -> Vec<(String, String)> {
    let urls: Vec<String> = nats.urls().iter().map(|u| format!("\"{u}\"")).collect();
    vec![
        (
            "SLUICE_CLUSTER__NATS_URLS".into(),
            format!("[{}]", urls.join(",")),
        ),
        ("SLUICE_CLUSTER__PREFIX".into(), prefix.into()),
        ("SLUICE_CLUSTER__CONNECT_TIMEOUT".into(), "30s".into()),
        ("SLUICE_CLUSTER__HEARTBEAT".into(), "250ms".into()),
        ("SLUICE_CLUSTER__STALE_AFTER".into(), "1s".into()),
        ("SLUICE_CLUSTER__PUBLISH_TIMEOUT".into(), "3s".into()),
        ("SLUICE_CLUSTER__PUBLISH_RETRY_AFTER".into(), "1s".into()),
        ("SLUICE_CLUSTER__MIN_SEQ_TIMEOUT".into(), "20s".into()),
    ]
}

pub fn start_broker(dir: &std::path::Path, env: &[(String, String)]) -> Server {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Server::start_in(dir, &env)
}

pub fn with(mut env: Vec<(String, String)>, k: &str, v: &str) -> Vec<(String, String)> {
    env.push((k.into(), v.into()));
    env
}

/// `GET /cluster/ingest` of a broker.
pub fn ingest_status(s: &Server) -> Value {
    let (st, v) = get_admin(s, ADMIN, "/cluster/ingest");
    assert_eq!(st, 200, "{v}");
    v
}

/// Every stream message (subject, payload, headers) from the start.
async fn stream_messages(
    nats: &NatsCluster,
    prefix: &str,
) -> Vec<(String, String, Option<i64>, Option<String>)> {
    let names = Names::new(prefix);
    let client = crate::nats::connect(nats.urls(), prefix, "test-reader").await;
    let stream = client.js.get_stream(names.state_stream()).await.unwrap();
    let last = stream.cached_info().state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        let Ok(m) = stream.get_raw_message(seq).await else {
            continue;
        };
        out.push((
            m.subject.to_string(),
            String::from_utf8(m.payload.to_vec()).unwrap(),
            received_ms(Some(&m.headers)),
            token_id(Some(&m.headers)).map(String::from),
        ));
    }
    out
}

fn seq_of(v: &Value) -> u64 {
    v["seq"].as_u64().unwrap_or_else(|| panic!("no seq in {v}"))
}

#[test]
fn states_go_through_the_stream_and_read_back_with_min_seq() {
    let nats = NatsCluster::start(3);
    let dir = tempfile::tempdir().unwrap();
    let s = start_broker(dir.path(), &cluster_env(&nats, "rt"));
    let (tid, t) = mint(
        &s,
        ADMIN,
        "farm.eu",
        json!({"name": "b", "scope": ["device.sendState", "device.getState"]}),
    );

    let before = sluice::timefmt::now_ms();
    let (st, one) = post_state(&s, &t, "farm.eu", "pump.1", r#"{"data":{"flow":1.5}}"#);
    assert_eq!(st, 200, "{one}");
    assert_eq!(one["accepted"], 1);
    let array = " [ {\"data\":{\"flow\":2},\"time\":1000} ,\n{ \"data\" : {\"on\":true} } ] ";
    let (st, two) = post_state(&s, &t, "farm.eu", "pump.1", array);
    assert_eq!(st, 200, "{two}");
    assert_eq!(two["accepted"], 2);
    let (s1, s2) = (seq_of(&one), seq_of(&two));
    assert!(
        s2 >= s1 + 2,
        "the array's last state comes after: {s1} {s2}"
    );

    // Read-your-writes: with minSeq the read waits for the read model.
    let (st, page) = get_admin(
        &s,
        &t,
        &format!("/applications/farm.eu/devices/pump.1/state?order=asc&minSeq={s2}"),
    );
    assert_eq!(st, 200, "{page}");
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 3, "{page}");
    assert_eq!(items[0]["time"], 1000);
    assert_eq!(items[0]["data"], json!({"flow": 2}));
    // A state without a time got its receive time on the accepting broker.
    let t1 = items[1]["time"].as_i64().unwrap();
    assert!(t1 >= before && t1 <= sluice::timefmt::now_ms(), "{t1}");
    assert_eq!(history_raw_data(&s, &t, "farm.eu", "pump.1").len(), 3);
    let (st, comp) = get_admin(
        &s,
        &t,
        &format!("/applications/farm.eu/devices/pump.1/compositeState?minSeq={s2}"),
    );
    assert_eq!(st, 200);
    assert_eq!(comp["flow"]["value"], 1.5);
    assert_eq!(comp["on"]["value"], true);

    // On the stream: one message per state, the exact text the device
    // sent for it, the receive time and the token id in headers, ids with
    // dots escaped in the subject.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let messages = rt.block_on(stream_messages(&nats, "rt"));
    let states: Vec<_> = messages
        .iter()
        .filter(|m| m.0.starts_with("rt.state."))
        .collect();
    assert_eq!(states.len(), 3, "{messages:?}");
    for m in &states {
        assert_eq!(m.0, "rt.state.farm%2Eeu.pump%2E1");
        assert_eq!(m.3.as_deref(), Some(tid.as_str()));
        let rx = m.2.expect("receive time header");
        assert!(rx >= before, "{rx}");
    }
    assert_eq!(states[0].1, r#"{"data":{"flow":1.5}}"#);
    assert_eq!(states[1].1, r#"{"data":{"flow":2},"time":1000}"#);
    assert_eq!(states[2].1, r#"{ "data" : {"on":true} }"#);
    // States without a time read back with the receive time they carry.
    assert_eq!(
        Some(t1),
        states[0].2,
        "the read model uses the header's time"
    );
    assert_eq!(items[2]["time"].as_i64(), states[2].2);
    assert_eq!(items[2]["data"], json!({"on": true}));

    // MQTT: the PUBACK comes after the stream stored it; the read model
    // catches up to the stream's newest state.
    let opts = {
        let mut o = rumqttc::MqttOptions::new(
            "c1",
            s.mqtt.split(':').next().unwrap(),
            s.mqtt.rsplit(':').next().unwrap().parse().unwrap(),
        );
        o.set_credentials("u", t.clone());
        o
    };
    let (client, mut conn) = rumqttc::Client::new(opts, 10);
    client
        .publish(
            "applications/farm.eu/devices/pump.2/state",
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"data":{"x":7}}"#,
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    for ev in conn.iter() {
        assert!(Instant::now() < deadline, "no PUBACK");
        if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) = ev {
            break;
        }
    }
    let status = ingest_status(&s);
    let last = status["streamLast"].as_u64().unwrap();
    assert!(last > s2, "{status}");
    let (st, page) = get_admin(
        &s,
        &t,
        &format!("/applications/farm.eu/devices/pump.2/state?minSeq={last}"),
    );
    assert_eq!(st, 200);
    assert_eq!(page["items"][0]["data"], json!({"x": 7}));
    let status = ingest_status(&s);
    assert_eq!(status["applied"], last, "{status}");
    assert_eq!(status["lag"], 0, "{status}");
    assert_eq!(status["materialize"], true);

    // minSeq beyond anything stored: a bounded wait, then a clear answer.
    let (st, v) = get_admin(
        &s,
        &t,
        &format!(
            "/applications/farm.eu/devices/pump.2/state?minSeq={}",
            last + 1000
        ),
    );
    assert_eq!(
        (st, v["error"].as_str()),
        (503, Some("not_caught_up")),
        "{v}"
    );
    assert_eq!(v["applied"], last);
    let (st, _) = get_admin(
        &s,
        &t,
        "/applications/farm.eu/devices/pump.2/state?minSeq=x",
    );
    assert_eq!(st, 400);
    let metrics = metrics_text(&s);
    for name in [
        "sluice_cluster_messages_published_total 4",
        "sluice_cluster_materialized_messages_total 4",
        "sluice_cluster_materialize_lag_messages 0",
    ] {
        assert!(metrics.contains(name), "{name} in\n{metrics}");
    }
}

#[test]
fn an_ingest_only_broker_acknowledges_but_keeps_no_read_model() {
    let nats = NatsCluster::start(3);
    let dir = tempfile::tempdir().unwrap();
    let s = start_broker(
        dir.path(),
        &with(
            cluster_env(&nats, "edge"),
            "SLUICE_CLUSTER__MATERIALIZE",
            "false",
        ),
    );
    let (_, t) = mint(
        &s,
        ADMIN,
        "a",
        json!({"name": "b", "scope": ["device.sendState", "device.getState"]}),
    );
    let (st, v) = post_state(&s, &t, "a", "d", r#"{"data":{"x":1}}"#);
    assert_eq!(st, 200, "{v}");
    let seq = seq_of(&v);
    for path in ["state", "compositeState"] {
        let (st, v) = get_admin(&s, &t, &format!("/applications/a/devices/d/{path}"));
        assert_eq!(
            (st, v["error"].as_str()),
            (503, Some("no_read_model")),
            "{v}"
        );
    }
    let status = ingest_status(&s);
    assert_eq!(status["materialize"], false);
    assert_eq!(status["streamLast"], seq);
    assert!(status.get("applied").is_none(), "{status}");

    // No log to deliver from: an MQTT subscription is refused (0x80).
    let mut o = rumqttc::MqttOptions::new(
        "sub",
        s.mqtt.split(':').next().unwrap(),
        s.mqtt.rsplit(':').next().unwrap().parse().unwrap(),
    );
    o.set_credentials("u", t.clone());
    let (client, mut conn) = rumqttc::Client::new(o, 10);
    client
        .subscribe("applications/a/devices/+/state", rumqttc::QoS::AtLeastOnce)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    for ev in conn.iter() {
        assert!(Instant::now() < deadline, "no SUBACK");
        if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(a))) = ev {
            assert_eq!(a.return_codes, [rumqttc::SubscribeReasonCode::Failure]);
            break;
        }
    }
}

/// The answer's retry for a token just minted on another broker: its
/// creation reaches every broker's token view within moments.
fn post_until_known(s: &Server, t: &str, app: &str, device: &str, body: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (st, v) = post_state(s, t, app, device, body);
        if st == 200 {
            return v;
        }
        assert_eq!(st, 401, "{v}");
        assert!(
            Instant::now() < deadline,
            "the token never reached {}",
            s.http
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Three brokers on one NATS cluster, one of them ingest-only: a state
/// accepted by any broker is read on any other that materializes, at once
/// with `minSeq` (read-your-writes across brokers), and every read model
/// holds the same history, composite state and device statistics.
#[test]
fn read_your_writes_across_brokers() {
    let nats = NatsCluster::start(3);
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let env = cluster_env(&nats, "ryw");
    let a = start_broker(dirs[0].path(), &env);
    let b = start_broker(dirs[1].path(), &env);
    let edge = start_broker(
        dirs[2].path(),
        &with(env.clone(), "SLUICE_CLUSTER__MATERIALIZE", "false"),
    );
    let (_, t) = mint(
        &a,
        ADMIN,
        "farm",
        json!({"name": "b", "scope": ["device.sendState", "device.getState", "all.Application"]}),
    );
    let s1 = seq_of(&post_until_known(
        &edge,
        &t,
        "farm",
        "d1",
        r#"{"data":{"at":"edge"}}"#,
    ));
    let s2 = seq_of(&post_until_known(
        &b,
        &t,
        "farm",
        "d1",
        r#"[{"data":{"at":"b"}},{"data":{"n":2}}]"#,
    ));
    let s3 = seq_of(&post_until_known(
        &a,
        &t,
        "farm",
        "d2",
        r#"{"data":{"at":"a"}}"#,
    ));
    assert!(s1 < s2 && s2 < s3, "{s1} {s2} {s3}");

    // A reads what the edge broker and B accepted, B what A accepted.
    let (st, page) = get_admin(
        &a,
        &t,
        &format!("/applications/farm/devices/d1/state?order=asc&minSeq={s2}"),
    );
    assert_eq!(st, 200, "{page}");
    let data: Vec<Value> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["data"].clone())
        .collect();
    assert_eq!(
        data,
        [json!({"at": "edge"}), json!({"at": "b"}), json!({"n": 2})]
    );
    let (st, page) = get_admin(
        &b,
        &t,
        &format!("/applications/farm/devices/d2/state?minSeq={s3}"),
    );
    assert_eq!((st, &page["items"][0]["data"]), (200, &json!({"at": "a"})));

    // Every materializing broker holds the same content, device list
    // statistics included (the accepting broker's receive times).
    let view = |s: &Server| {
        let mut v = vec![];
        for d in ["d1", "d2"] {
            for path in ["state?order=asc", "compositeState?"] {
                let (st, body) = get_admin(
                    s,
                    &t,
                    &format!("/applications/farm/devices/{d}/{path}&minSeq={s3}"),
                );
                assert_eq!(st, 200, "{body}");
                v.push(body);
            }
        }
        let (st, list) = get_admin(s, &t, &format!("/applications/farm/devices?minSeq={s3}"));
        assert_eq!(st, 200, "{list}");
        assert_eq!(list["items"].as_array().unwrap().len(), 2, "{list}");
        v.push(list);
        v
    };
    assert_eq!(view(&a), view(&b));
    let (st, list) = get_admin(&edge, &t, "/applications/farm/devices");
    assert_eq!((st, list["error"].as_str()), (503, Some("no_read_model")));

    // The operator's view shows the ingest log.
    let (st, cluster) = get_admin(&a, ADMIN, "/cluster");
    assert_eq!(st, 200, "{cluster}");
    assert_eq!(cluster["ingest"]["materialize"], true, "{cluster}");
    assert!(
        cluster["ingest"]["applied"].as_u64().unwrap() >= s3,
        "{cluster}"
    );
}

/// Live streams in cluster mode: an SSE consumer on broker B sees, in
/// stream order, the states broker A and an ingest-only broker accepted;
/// positions are stream sequences, the same on every broker, so a
/// consumer resumes on another broker by `Last-Event-ID` with nothing
/// missing or repeated.
#[test]
fn an_sse_consumer_on_one_broker_sees_states_accepted_by_another() {
    use crate::streams_sse::Stream;
    let wait = Duration::from_secs(30);
    let nats = NatsCluster::start(3);
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let env = cluster_env(&nats, "live");
    let a = start_broker(dirs[0].path(), &env);
    let b = start_broker(dirs[1].path(), &env);
    let edge = start_broker(
        dirs[2].path(),
        &with(env.clone(), "SLUICE_CLUSTER__MATERIALIZE", "false"),
    );
    let (_, t) = mint(
        &a,
        ADMIN,
        "farm",
        json!({"name": "b", "scope": ["device.sendState", "device.getState"]}),
    );
    let n = |events: &[crate::streams_sse::Event]| -> Vec<u64> {
        events
            .iter()
            .map(|e| e.json()["data"]["n"].as_u64().unwrap())
            .collect()
    };
    let id = |e: &crate::streams_sse::Event| -> u64 { e.id.as_deref().unwrap().parse().unwrap() };

    let s1 = seq_of(&post_until_known(
        &a,
        &t,
        "farm",
        "d1",
        r#"[{"data":{"n":0}},{"data":{"n":1}},{"data":{"n":2}}]"#,
    ));
    let open = |s: &Server, last: Option<&str>| {
        let deadline = Instant::now() + wait;
        loop {
            // B may not know the token yet (401) right after it was minted.
            match Stream::open(&s.http, "/applications/farm/stream?from=earliest", &t, last) {
                Ok(st) => return st,
                Err((401, _)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => panic!("{e:?}"),
            }
        }
    };
    let st = open(&b, None);
    let first = st.events(3, wait);
    assert_eq!(n(&first), [0, 1, 2]);
    assert_eq!(id(&first[2]), s1, "positions are stream sequences");
    assert_eq!(first[0].json()["device"], "d1");

    // Live: accepted by the ingest-only broker, seen on B.
    let s2 = seq_of(&post_until_known(
        &edge,
        &t,
        "farm",
        "d2",
        r#"[{"data":{"n":3}},{"data":{"n":4}}]"#,
    ));
    let live = st.events(2, wait);
    assert_eq!(n(&live), [3, 4]);
    assert_eq!(id(&live[1]), s2);
    st.quiet(Duration::from_millis(300));

    // The same position on another broker: resume on A after n=3.
    let resumed = open(&a, Some(&live[0].id.clone().unwrap()));
    let rest = resumed.events(1, wait);
    assert_eq!(n(&rest), [4]);
    resumed.quiet(Duration::from_millis(300));

    // An ingest-only broker has no log to stream from.
    match Stream::open(&edge.http, "/applications/farm/stream", &t, None) {
        Err((503, body)) => assert!(body.contains("no_read_model"), "{body}"),
        Err(e) => panic!("{e:?}"),
        Ok(_) => panic!("an ingest-only broker opened a stream"),
    }
}

/// One MQTT session publishing fast, so its publishes span several
/// batches in flight at once: the stream (and so every read model) holds
/// them in publish order, and every PUBACK comes back.
#[test]
fn a_sessions_states_keep_their_order_across_batches_in_flight() {
    let nats = NatsCluster::start(3);
    let dir = tempfile::tempdir().unwrap();
    let s = start_broker(dir.path(), &cluster_env(&nats, "ord"));
    let (_, t) = mint(
        &s,
        ADMIN,
        "a",
        json!({"name": "b", "scope": ["device.sendState", "device.getState"]}),
    );
    const N: usize = 3000;
    let port: u16 = s.mqtt.rsplit(':').next().unwrap().parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let acked = rt.block_on(async {
        let mut o = rumqttc::MqttOptions::new("ord", "127.0.0.1", port);
        o.set_credentials("u", &t);
        o.set_inflight(100);
        let (c, mut ev) = rumqttc::AsyncClient::new(o, 200);
        tokio::spawn(async move {
            for i in 0..N {
                c.publish(
                    "applications/a/devices/d/state",
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    format!(r#"{{"data":{{"i":{i}}}}}"#),
                )
                .await
                .unwrap();
            }
        });
        let mut acked = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while acked < N {
            match tokio::time::timeout_at(deadline, ev.poll()).await {
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => acked += 1,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("connection failed: {e}"),
                Err(_) => panic!("only {acked} PUBACKs"),
            }
        }
        acked
    });
    assert_eq!(acked, N);
    let messages = rt.block_on(stream_messages(&nats, "ord"));
    let order: Vec<u64> = messages
        .iter()
        .map(|m| {
            serde_json::from_str::<Value>(&m.1).unwrap()["data"]["i"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(order, (0..N as u64).collect::<Vec<_>>(), "stream order");
    let last = ingest_status(&s)["streamLast"].as_u64().unwrap();
    let (st, _) = get_admin(
        &s,
        ADMIN,
        &format!("/applications/a/devices/d/state?minSeq={last}&limit=1"),
    );
    assert_eq!(st, 200);
    let read: Vec<u64> = history_all(&s, ADMIN, "a", "d")
        .iter()
        .map(|i| i["data"]["i"].as_u64().unwrap())
        .collect();
    assert_eq!(read, (0..N as u64).collect::<Vec<_>>(), "read-model order");
    let batches = metrics_text(&s)
        .lines()
        .find_map(|l| l.strip_prefix("sluice_cluster_batches_published_total "))
        .unwrap()
        .parse::<u64>()
        .unwrap();
    assert!(batches > 1, "one batch only: the test shows nothing");
}

/// With every NATS node down, requests are refused (503) rather than held,
/// health says why, and nothing refused shows up once NATS is back.
#[test]
fn refused_while_nats_is_away_and_never_stored_later() {
    let mut nats = NatsCluster::start(3);
    let dir = tempfile::tempdir().unwrap();
    let s = start_broker(dir.path(), &cluster_env(&nats, "away"));
    let (_, t) = mint(
        &s,
        ADMIN,
        "a",
        json!({"name": "b", "scope": ["device.sendState", "device.getState"]}),
    );
    let (st, v) = post_state(&s, &t, "a", "d", r#"{"data":{"tag":"before"}}"#);
    assert_eq!(st, 200, "{v}");

    nats.stop_all();
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..5 {
        let (st, v) = post_state(
            &s,
            &t,
            "a",
            "d",
            &format!(r#"{{"data":{{"tag":"down-{i}"}}}}"#),
        );
        assert_eq!((st, v["error"].as_str()), (503, Some("unavailable")), "{v}");
    }
    let health = client().get(s.http_url("/readyz")).send().unwrap();
    assert_eq!(health.status().as_u16(), 503);
    assert!(health.text().unwrap().contains("ingest stream"));

    nats.start_all();
    // Health turns good by itself, with no request to show it.
    let deadline = Instant::now() + Duration::from_secs(90);
    while client()
        .get(s.http_url("/readyz"))
        .send()
        .unwrap()
        .status()
        .as_u16()
        != 200
    {
        assert!(Instant::now() < deadline, "health stayed 503");
        std::thread::sleep(Duration::from_millis(250));
    }
    let seq = loop {
        assert!(Instant::now() < deadline, "ingest did not resume");
        let (st, v) = post_state(&s, &t, "a", "d", r#"{"data":{"tag":"after"}}"#);
        if st == 200 {
            break seq_of(&v);
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let (st, page) = get_admin(
        &s,
        &t,
        &format!("/applications/a/devices/d/state?order=asc&minSeq={seq}"),
    );
    assert_eq!(st, 200);
    let tags: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["data"]["tag"].as_str().unwrap())
        .collect();
    assert_eq!(tags.first(), Some(&"before"));
    assert_eq!(tags.last(), Some(&"after"));
    assert!(!tags.iter().any(|t| t.starts_with("down")), "{tags:?}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let messages = rt.block_on(stream_messages(&nats, "away"));
    assert!(
        !messages.iter().any(|m| m.1.contains("down-")),
        "{messages:?}"
    );
    let health = client().get(s.http_url("/readyz")).send().unwrap();
    assert_eq!(health.status().as_u16(), 200);
}

/// `examples/consumer.rs`, the documented downstream consumer: reads one
/// application's states with a durable consumer, resumes after a restart
/// right after what it acknowledged, and sees only its application.
#[test]
fn the_example_consumer_reads_one_application_and_resumes() {
    let consumer = std::path::Path::new(bin())
        .parent()
        .unwrap()
        .join("examples/consumer");
    assert!(
        consumer.exists(),
        "{} is missing: `cargo test` builds the examples (or `cargo build --example consumer`)",
        consumer.display()
    );
    let nats = NatsCluster::start(3);
    let dir = tempfile::tempdir().unwrap();
    let s = start_broker(dir.path(), &cluster_env(&nats, "down"));
    let mut tokens = std::collections::HashMap::new();
    for app in ["farm.eu", "other"] {
        let (_, t) = mint(
            &s,
            ADMIN,
            app,
            json!({"name": "b", "scope": ["device.sendState"]}),
        );
        tokens.insert(app, t);
    }
    let post = |app: &str, i: usize| {
        let (st, v) = post_state(
            &s,
            &tokens[app],
            app,
            "pump.1",
            &format!(r#"{{"data":{{"i":{i}}}}}"#),
        );
        assert_eq!(st, 200, "{v}");
    };
    for i in 0..5 {
        post("farm.eu", i);
        post("other", i);
    }
    let run = |max: u64| -> Vec<Value> {
        let out = std::process::Command::new(&consumer)
            .args([
                "--nats",
                &nats.url(1),
                "--prefix",
                "down",
                "--app",
                "farm.eu",
            ])
            .args(["--durable", "export", "--max", &max.to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let i = |v: &Value| v["state"]["data"]["i"].as_u64().unwrap();
    let first = run(3);
    assert_eq!(first.iter().map(i).collect::<Vec<_>>(), [0, 1, 2]);
    assert_eq!(first[0]["app"], "farm.eu");
    assert_eq!(first[0]["device"], "pump.1");
    assert_eq!(first[0]["state"], json!({"data": {"i": 0}}));
    assert!(first[0]["receivedMs"].as_i64().unwrap() > 0);
    // Restarted: it goes on after what it acknowledged.
    let second = run(2);
    assert_eq!(second.iter().map(i).collect::<Vec<_>>(), [3, 4]);
    post("farm.eu", 5);
    let third = run(1);
    assert_eq!(third.iter().map(i).collect::<Vec<_>>(), [5]);
    assert!(third[0]["seq"].as_u64() > second[1]["seq"].as_u64());
}
