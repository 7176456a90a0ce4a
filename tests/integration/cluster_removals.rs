//! Removals and retention overrides in cluster mode, with the real binary
//! on a real 3-node NATS cluster: a removal made on one broker is a control
//! message on the ingest stream that every broker applies in stream order,
//! so it reaches every read model (a broker stopped meanwhile included)
//! and the stream itself, leaves states accepted after it and every other
//! application alone (ids that start with the removed one's included), is
//! refused and removes nothing while NATS is away, and an application's
//! retention override is the same on every broker.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice::cluster::reader::{Reader, Start};
use sluice::cluster::Names;

use crate::cluster_ingest::{cluster_env, ingest_status, start_broker, with};
use crate::common::*;
use crate::nats::NatsCluster;

fn seq_of(v: &Value) -> u64 {
    v["seq"].as_u64().unwrap_or_else(|| panic!("no seq in {v}"))
}

fn delete(s: &Server, path: &str) -> (u16, Value) {
    let r = client()
        .delete(s.admin_url(path))
        .bearer_auth(ADMIN)
        .send()
        .unwrap();
    let st = r.status().as_u16();
    (st, r.json().unwrap_or(Value::Null))
}

fn put_retention(s: &Server, token: &str, app: &str, body: Value) -> (u16, Value) {
    json_of(
        client()
            .put(s.admin_url(&format!("/applications/{app}/retention")))
            .bearer_auth(token)
            .json(&body)
            .send()
            .unwrap(),
    )
}

/// The data of every state of `app`/`device` a broker holds once it has
/// applied stream sequence `min_seq`, oldest first.
fn history(s: &Server, app: &str, device: &str, min_seq: u64) -> Vec<Value> {
    let (st, page) = get_admin(
        s,
        ADMIN,
        &format!("/applications/{app}/devices/{device}/state?order=asc&minSeq={min_seq}"),
    );
    assert_eq!(st, 200, "{app}/{device} on {}: {page}", s.admin);
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["data"].clone())
        .collect()
}

/// The devices of `app` a broker lists once it has applied `min_seq`.
fn devices(s: &Server, app: &str, min_seq: u64) -> Vec<String> {
    let (st, page) = get_admin(
        s,
        ADMIN,
        &format!("/applications/{app}/devices?minSeq={min_seq}"),
    );
    assert_eq!(st, 200, "{page}");
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["device"].as_str().unwrap().to_string())
        .collect()
}

/// The sequence a broker has applied (after a change it answered, at least
/// that change's marker).
fn applied(s: &Server) -> u64 {
    let v = ingest_status(s);
    v["applied"]
        .as_u64()
        .unwrap_or_else(|| panic!("no applied in {v}"))
}

/// `(subject, payload)` of every state on the stream, read with a consumer
/// from the start, as a downstream reader sees them.
fn stream_states(nats: &NatsCluster, prefix: &str) -> Vec<(String, String)> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let names = Names::new(prefix);
        let client = crate::nats::connect(nats.urls(), prefix, "test-reader").await;
        let last = client
            .js
            .get_stream(names.state_stream())
            .await
            .unwrap()
            .cached_info()
            .state
            .last_sequence;
        let mut reader = Reader::open(
            &client,
            &names.state_stream(),
            vec![names.state_subjects()],
            Start::First,
            Duration::from_millis(500),
        )
        .await
        .unwrap();
        let mut out = Vec::new();
        if reader.initial_pending() == 0 {
            return out;
        }
        loop {
            let r = reader.next().await.unwrap();
            out.push((
                r.subject.to_string(),
                String::from_utf8(r.payload.to_vec()).unwrap(),
            ));
            if r.pending == 0 || r.seq >= last {
                return out;
            }
        }
    })
}

fn post(s: &Server, t: &str, app: &str, device: &str, body: &str) -> u64 {
    let (st, v) = post_state(s, t, app, device, body);
    assert_eq!(st, 200, "{app}/{device}: {v}");
    seq_of(&v)
}

fn token_for(s: &Server, app: &str) -> String {
    mint(
        s,
        ADMIN,
        app,
        json!({"name": "t", "scope": ["device.sendState", "device.getState", "all.Application"]}),
    )
    .1
}

/// A device removed through broker A is gone from A at once (read your
/// writes), from B, from a broker that was stopped during the removal once
/// it is back, and from the stream; its states accepted after the removal
/// stay, and so do its neighbours: a device whose id starts with its id,
/// and an application whose id starts with its application's.
#[test]
fn a_device_removal_reaches_every_broker_and_the_stream() {
    let nats = NatsCluster::start(3);
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let env = cluster_env(&nats, "rmd");
    let a = start_broker(dirs[0].path(), &env);
    let b = start_broker(dirs[1].path(), &env);
    let mut c = start_broker(dirs[2].path(), &env);
    let t = token_for(&a, "a");
    let t2 = token_for(&a, "a.b");
    post(
        &a,
        &t,
        "a",
        "d",
        r#"[{"data":{"old":1}},{"data":{"old":2}}]"#,
    );
    post(&a, &t, "a", "d.x", r#"{"data":{"keep":"d.x"}}"#);
    post(&a, &t, "a", "d2", r#"{"data":{"keep":"d2"}}"#);
    let before = post(&a, &t2, "a.b", "d", r#"{"data":{"keep":"a.b"}}"#);
    assert_eq!(history(&c, "a", "d", before).len(), 2);
    c.stop();

    let (st, v) = delete(&a, "/applications/a/devices/d");
    assert_eq!(st, 204, "{v}");
    // Read your writes on the broker that answered, without minSeq.
    let (st, page) = get_admin(&a, ADMIN, "/applications/a/devices/d/state");
    assert_eq!((st, page["items"].as_array().unwrap().len()), (200, 0));
    let marker = applied(&a);
    assert!(marker > before, "{marker} {before}");

    let after = post(&b, &t, "a", "d", r#"{"data":{"new":1}}"#);
    for s in [&a, &b] {
        assert_eq!(history(s, "a", "d", after), [json!({"new": 1})]);
        assert_eq!(history(s, "a", "d.x", after), [json!({"keep": "d.x"})]);
        assert_eq!(history(s, "a", "d2", after), [json!({"keep": "d2"})]);
        assert_eq!(history(s, "a.b", "d", after), [json!({"keep": "a.b"})]);
        let (st, comp) = get_admin(
            s,
            ADMIN,
            &format!("/applications/a/devices/d/compositeState?minSeq={after}"),
        );
        assert_eq!(st, 200);
        assert!(comp.get("old").is_none(), "{comp}");
        assert_eq!(comp["new"]["value"], 1, "{comp}");
        let (_, list) = get_admin(s, ADMIN, &format!("/applications/a/devices?minSeq={after}"));
        let d = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["device"] == "d")
            .cloned()
            .unwrap_or_else(|| panic!("{list}"));
        assert_eq!(d["messages"], 1, "{list}");
    }

    // The stream holds only what a reader may still see.
    let states = stream_states(&nats, "rmd");
    let subjects: Vec<&str> = states.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(
        subjects,
        [
            "rmd.state.a.d%2Ex",
            "rmd.state.a.d2",
            "rmd.state.a%2Eb.d",
            "rmd.state.a.d"
        ],
        "{states:?}"
    );
    assert_eq!(states[3].1, r#"{"data":{"new":1}}"#);

    // The broker that was away applies the removal when it catches up.
    let c = start_broker(dirs[2].path(), &env);
    assert_eq!(history(&c, "a", "d", after), [json!({"new": 1})]);
    assert_eq!(history(&c, "a", "d.x", after), [json!({"keep": "d.x"})]);
    assert_eq!(history(&c, "a.b", "d", after), [json!({"keep": "a.b"})]);

    // Audited as in standalone.
    let (st, trail) = get_admin(&a, ADMIN, "/applications/a/audit");
    assert_eq!(st, 200, "{trail}");
    assert!(
        trail["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["operation"] == "device.delete" && e["status"] == 204),
        "{trail}"
    );
}

/// An application removed through broker B loses its tokens and its data
/// on every broker and on the stream; applications whose ids start with
/// its id keep theirs. An ingest-only broker takes a removal too (and
/// purges the stream itself).
#[test]
fn an_application_removal_reaches_every_broker_and_the_stream() {
    let nats = NatsCluster::start(3);
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let env = cluster_env(&nats, "rma");
    let a = start_broker(dirs[0].path(), &env);
    let b = start_broker(dirs[1].path(), &env);
    let edge = start_broker(
        dirs[2].path(),
        &with(env.clone(), "SLUICE_CLUSTER__MATERIALIZE", "false"),
    );
    let ta = token_for(&a, "a");
    let tab = token_for(&a, "a.b");
    let tab2 = token_for(&a, "ab");
    post(&a, &tab2, "ab", "gone", r#"{"data":{"x":0}}"#);
    post(&a, &ta, "a", "d1", r#"{"data":{"x":1}}"#);
    post(&a, &ta, "a", "d2", r#"{"data":{"x":2}}"#);
    post(&a, &tab, "a.b", "d1", r#"{"data":{"keep":"a.b"}}"#);
    let before = post(&a, &tab2, "ab", "d1", r#"{"data":{"keep":"ab"}}"#);
    assert_eq!(devices(&b, "a", before), ["d1", "d2"]);

    let (st, v) = delete(&b, "/applications/a");
    assert_eq!(st, 204, "{v}");
    assert_eq!(devices(&b, "a", 0), Vec::<String>::new());
    let marker = applied(&b);
    assert!(marker > before);
    for s in [&a, &b] {
        assert_eq!(devices(s, "a", marker), Vec::<String>::new());
        assert_eq!(history(s, "a.b", "d1", marker), [json!({"keep": "a.b"})]);
        assert_eq!(history(s, "ab", "d1", marker), [json!({"keep": "ab"})]);
    }
    // Its tokens are gone on every broker; the others' work.
    for s in [&a, &b] {
        let (st, v) = post_state(s, &ta, "a", "d1", r#"{"data":{"x":3}}"#);
        assert_eq!(st, 401, "{v}");
        let (st, v) = post_state(s, &tab, "a.b", "d1", r#"{"data":{"still":1}}"#);
        assert_eq!(st, 200, "{v}");
    }

    let (st, v) = delete(&edge, "/applications/ab/devices/gone");
    assert_eq!(st, 204, "{v}");
    // `streamLast` counts control messages: reading with it as `minSeq`
    // sees the removal.
    let last = ingest_status(&edge)["streamLast"].as_u64().unwrap();
    assert!(last > marker, "{last} {marker}");
    assert_eq!(devices(&a, "ab", last), ["d1"]);
    let (st, v) = put_retention(&edge, ADMIN, "ab", json!({"retention": "1d"}));
    assert_eq!(
        (st, v["error"].as_str()),
        (503, Some("no_read_model")),
        "{v}"
    );

    let states = stream_states(&nats, "rma");
    assert!(
        !states.iter().any(|(s, _)| s == "rma.state.ab.gone"),
        "{states:?}"
    );
    assert!(
        states
            .iter()
            .all(|(subject, _)| !subject.starts_with("rma.state.a.")),
        "{states:?}"
    );
    assert!(states.iter().any(|(s, _)| s == "rma.state.a%2Eb.d1"));
    assert!(states.iter().any(|(s, _)| s == "rma.state.ab.d1"));
}

/// A retention override set on broker A holds on broker B: B answers with
/// it and hides the same expired history; clearing it on B holds on A.
#[test]
fn a_retention_override_set_on_one_broker_applies_on_another() {
    let nats = NatsCluster::start(3);
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let env = cluster_env(&nats, "rmr");
    let a = start_broker(dirs[0].path(), &env);
    let b = start_broker(dirs[1].path(), &env);
    let t = token_for(&a, "farm");
    let other = token_for(&a, "farm.eu");
    let two_hours_ago = sluice::timefmt::now_ms() - 2 * 3_600_000;
    post(
        &a,
        &t,
        "farm",
        "d",
        &format!(r#"[{{"data":{{"old":1}},"time":{two_hours_ago}}},{{"data":{{"new":1}}}}]"#),
    );
    let last = post(
        &a,
        &other,
        "farm.eu",
        "d",
        &format!(r#"{{"data":{{"old":1}},"time":{two_hours_ago}}}"#),
    );
    assert_eq!(history(&b, "farm", "d", last).len(), 2);

    let (st, v) = put_retention(&a, &t, "farm", json!({"retention": "1h"}));
    assert_eq!(
        (st, v),
        (200, json!({"retention": "1h", "effective": "1h"}))
    );
    let marker = applied(&a);
    for s in [&a, &b] {
        assert_eq!(history(s, "farm", "d", marker), [json!({"new": 1})]);
        let (st, v) = get_admin(s, &t, "/applications/farm/retention");
        assert_eq!((st, v["retention"].as_str()), (200, Some("1h")), "{v}");
        // Another application, whose id starts with this one's, keeps its
        // own retention.
        assert_eq!(history(s, "farm.eu", "d", marker), [json!({"old": 1})]);
        let (_, v) = get_admin(s, &other, "/applications/farm.eu/retention");
        assert_eq!(v["retention"], Value::Null, "{v}");
    }

    let (st, v) = put_retention(&b, &t, "farm", json!({"retention": null}));
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["retention"], Value::Null);
    let marker = applied(&b);
    // Applied on A in the same write that moved its read model past the
    // marker (the history may or may not show the old state again: a
    // compaction may have dropped it meanwhile).
    history(&a, "farm", "d", marker);
    let (_, v) = get_admin(&a, &t, "/applications/farm/retention");
    assert_eq!(v["retention"], Value::Null, "{v}");
}

/// While NATS is away a removal is refused with 503 `unavailable` and
/// removes nothing, not then and not once NATS is back.
#[test]
fn a_removal_while_nats_is_away_is_refused_and_removes_nothing() {
    let mut nats = NatsCluster::start(3);
    let dir = tempfile::tempdir().unwrap();
    // The token view stays trusted through the outage, so the request
    // reaches the removal rather than being refused for a stale view.
    let env = with(
        cluster_env(&nats, "rmn"),
        "SLUICE_CLUSTER__STALE_AFTER",
        "300s",
    );
    let a = start_broker(dir.path(), &env);
    let t = token_for(&a, "a");
    let first = post(&a, &t, "a", "d", r#"{"data":{"tag":"before"}}"#);
    assert_eq!(history(&a, "a", "d", first).len(), 1);

    nats.stop_all();
    // The client notices the closed connections at once (as the ingest
    // refusal test relies on too).
    std::thread::sleep(Duration::from_millis(1000));
    let (st, v) = delete(&a, "/applications/a/devices/d");
    assert_eq!((st, v["error"].as_str()), (503, Some("unavailable")), "{v}");
    // Refused by the removal itself (not by a stale token view).
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("nothing was changed"),
        "{v}"
    );

    nats.start_all();
    let deadline = Instant::now() + Duration::from_secs(60);
    let second = loop {
        let (st, v) = post_state(&a, &t, "a", "d", r#"{"data":{"tag":"after"}}"#);
        if st == 200 {
            break seq_of(&v);
        }
        assert!(Instant::now() < deadline, "{v}");
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(
        history(&a, "a", "d", second),
        [json!({"tag": "before"}), json!({"tag": "after"})]
    );
}

/// With no broker that materializes, the ingest-only broker that takes a
/// removal purges the stream itself before it answers.
#[test]
fn an_ingest_only_broker_purges_the_stream_itself() {
    let nats = NatsCluster::start(3);
    let dir = tempfile::tempdir().unwrap();
    let edge = start_broker(
        dir.path(),
        &with(
            cluster_env(&nats, "rme"),
            "SLUICE_CLUSTER__MATERIALIZE",
            "false",
        ),
    );
    let t = token_for(&edge, "a");
    post(&edge, &t, "a", "d", r#"{"data":{"x":1}}"#);
    post(&edge, &t, "a", "d.x", r#"{"data":{"x":2}}"#);
    let (st, v) = delete(&edge, "/applications/a/devices/d");
    assert_eq!(st, 204, "{v}");
    let states = stream_states(&nats, "rme");
    assert_eq!(
        states,
        [(
            "rme.state.a.d%2Ex".to_string(),
            r#"{"data":{"x":2}}"#.to_string()
        )]
    );
}

/// A removed device starts afresh under `storage.max_attributes_per_device`
/// on every broker: the broker that accepts its states forgets the names it
/// had counted once it has applied a removal made through another broker.
#[test]
fn a_removed_device_starts_afresh_under_the_attribute_limit() {
    let nats = NatsCluster::start(3);
    let env = with(
        cluster_env(&nats, "rmattr"),
        "SLUICE_STORAGE__MAX_ATTRIBUTES_PER_DEVICE",
        "2",
    );
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_broker(da.path(), &env);
    let b = start_broker(db.path(), &env);
    let t = token_for(&a, "a");
    post(&b, &t, "a", "d", r#"{"data":{"x":1,"y":2}}"#);
    let (st, v) = post_state(&b, &t, "a", "d", r#"{"data":{"z":3}}"#);
    assert_eq!((st, v["error"].as_str()), (400, Some("bad_request")), "{v}");

    let (st, v) = delete(&a, "/applications/a/devices/d");
    assert_eq!(st, 204, "{v}");
    // B has applied the removal once it lists nothing for the device.
    assert!(history(&b, "a", "d", applied(&a)).is_empty());
    let seq = post(&b, &t, "a", "d", r#"{"data":{"z":3,"w":4}}"#);
    assert_eq!(history(&a, "a", "d", seq), [json!({"z":3,"w":4})]);
}
