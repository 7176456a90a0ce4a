//! Retention (issue 12, item 1): `storage.retention` and per-application
//! overrides through the admin API; expired history is invisible at once,
//! composite state keeps every attribute's last value, and the space of
//! expired history is reclaimed in the background.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;

const HOUR: i64 = 3_600_000;

fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

fn put_retention(s: &Server, token: &str, app: &str, body: &str) -> (u16, Value) {
    json_of(
        client()
            .put(s.admin_url(&format!("/applications/{app}/retention")))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .unwrap(),
    )
}

fn times(s: &Server, token: &str, app: &str) -> Vec<i64> {
    history_all(s, token, app, "pump")
        .iter()
        .map(|i| i["time"].as_i64().unwrap())
        .collect()
}

#[test]
fn expired_history_is_invisible_and_each_application_may_override_retention() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("SLUICE_STORAGE__RETENTION", "1h")];
    let mut s = Server::start_in(dir.path(), &env);
    let owner = |s: &Server, app: &str| {
        mint(
            s,
            ADMIN,
            app,
            json!({"name": "o", "scope": ["all.Application"]}),
        )
        .1
    };
    let (farm, farm2) = (owner(&s, "farm"), owner(&s, "farm2"));
    let now = now_ms();
    let sent = [now - 2 * HOUR, now - HOUR / 2, now];
    let body = format!(
        r#"[{{"data":{{"old":1}},"time":{}}},{{"data":{{"x":1}},"time":{}}},{{"data":{{"x":2}},"time":{}}}]"#,
        sent[0], sent[1], sent[2]
    );
    for (t, app) in [(&farm, "farm"), (&farm2, "farm2")] {
        assert_eq!(post_state(&s, t, app, "pump", &body).0, 200);
    }
    // The default (1 h): the 2-hour-old state is expired on read already.
    assert_eq!(times(&s, &farm, "farm"), sent[1..].to_vec());
    let (st, v) = get_admin(&s, &farm, "/applications/farm/retention");
    assert_eq!(
        (st, v),
        (200, json!({"retention": null, "effective": "1h"}))
    );

    // Who may change it: all.Application over every device.
    let reader = mint(
        &s,
        &farm,
        "farm",
        json!({"name": "r", "scope": ["device.getState"]}),
    )
    .1;
    let narrow = mint(
        &s,
        &farm,
        "farm",
        json!({"name": "n", "scope": ["all.Application"], "devices": ["pump"]}),
    )
    .1;
    let ten_min = r#"{"retention":"10m"}"#;
    assert_eq!(put_retention(&s, &reader, "farm", ten_min).0, 403);
    assert_eq!(put_retention(&s, &narrow, "farm", ten_min).0, 403);
    assert_eq!(put_retention(&s, &farm2, "farm", ten_min).0, 403);
    assert_eq!(get_admin(&s, &farm2, "/applications/farm/retention").0, 403);
    assert_eq!(
        get_admin(&s, &reader, "/applications/farm/retention").0,
        200
    );
    for bad in [
        "{}",
        r#"{"retention":"0s"}"#,
        r#"{"retention":"soon"}"#,
        r#"{"retention":5}"#,
        r#"{"retention":"1d","extra":1}"#,
        "not json",
    ] {
        let (st, v) = put_retention(&s, &farm, "farm", bad);
        assert_eq!(
            (st, &v["error"]),
            (400, &json!("bad_request")),
            "{bad}: {v}"
        );
    }

    let (st, v) = put_retention(&s, &farm, "farm", ten_min);
    assert_eq!(
        (st, v),
        (200, json!({"retention": "10m", "effective": "10m"}))
    );
    // In force at once, for this application only.
    assert_eq!(times(&s, &reader, "farm"), sent[2..].to_vec());
    assert_eq!(times(&s, &farm2, "farm2"), sent[1..].to_vec());
    // A page asked for explicitly in the expired range is empty.
    let (_, v) = get_admin(
        &s,
        &farm,
        &format!("/applications/farm/devices/pump/state?end={}", now - HOUR),
    );
    assert_eq!(v, json!({"items": [], "next": null}));
    // Composite state keeps every attribute's last value regardless.
    let (_, comp) = get_admin(&s, &farm, "/applications/farm/devices/pump/compositeState");
    assert_eq!(comp["old"], json!({"value": 1, "time": sent[0]}));
    assert_eq!(comp["x"], json!({"value": 2, "time": sent[2]}));

    // Durable: the override survives a restart.
    assert_eq!(s.stop(), Some(0));
    let mut s = Server::start_in(dir.path(), &env);
    let (_, v) = get_admin(&s, &farm, "/applications/farm/retention");
    assert_eq!(v, json!({"retention": "10m", "effective": "10m"}));
    assert_eq!(times(&s, &farm, "farm"), sent[2..].to_vec());

    // null clears the override; "unlimited" is an override of its own.
    let (_, v) = put_retention(&s, &farm, "farm", r#"{"retention":null}"#);
    assert_eq!(v, json!({"retention": null, "effective": "1h"}));
    let (_, v) = put_retention(&s, &farm2, "farm2", r#"{"retention":"unlimited"}"#);
    assert_eq!(
        v,
        json!({"retention": "unlimited", "effective": "unlimited"})
    );
    s.stop();
}

/// Bytes of RocksDB table files under `db`.
fn table_bytes(db: &Path) -> u64 {
    std::fs::read_dir(db)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "sst"))
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum()
}

#[test]
fn the_space_of_expired_history_is_reclaimed_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start_in(dir.path(), &[]);
    let t = mint(
        &s,
        ADMIN,
        "farm",
        json!({"name": "o", "scope": ["all.Application"]}),
    )
    .1;
    // ~20 MB of two-day-old history that compression cannot shrink much
    // (pseudo-random hex), then a little current state.
    let old = now_ms() - 48 * HOUR;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for r in 0..100 {
        let states: Vec<String> = (0..20)
            .map(|i| {
                let pad: String = (0..10_000)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        char::from_digit((x % 16) as u32, 16).unwrap()
                    })
                    .collect();
                format!(
                    r#"{{"data":{{"pad":"{pad}"}},"time":{}}}"#,
                    old + r * 20 + i
                )
            })
            .collect();
        let body = format!("[{}]", states.join(","));
        assert_eq!(post_state(&s, &t, "farm", "pump", &body).0, 200);
    }
    assert_eq!(
        post_state(&s, &t, "farm", "pump", r#"{"data":{"now":1}}"#).0,
        200
    );
    // A restart writes what the memtables held into table files.
    assert_eq!(s.stop(), Some(0));
    let s = Server::start_in(dir.path(), &[]);
    let db = dir.path().join("db");
    let before = table_bytes(&db);
    assert!(
        before > 15_000_000,
        "history is in table files: {before} bytes"
    );

    let (st, v) = put_retention(&s, &t, "farm", r#"{"retention":"1d"}"#);
    assert_eq!(st, 200, "{v}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = table_bytes(&db);
        if now < before / 10 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "expired history still takes {now} of {before} bytes after 60 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // What is within the retention is still there.
    let items = history_all(&s, &t, "farm", "pump");
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["data"], json!({"now": 1}));
}
