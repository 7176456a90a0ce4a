//! Cancellation safety of the admin plane (issue 8, item 2): an admin change
//! runs to completion whatever its client does, and loading repairs what it
//! can instead of refusing to start.

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use serde_json::{json, Value};
use sluice::config::SyncMode;
use sluice::store::Store;

use crate::common::*;

/// Sends a whole `POST …/tokens` request over a fresh connection and closes
/// it without reading the answer, `linger` later, as a client on a flaky
/// network would.
fn create_and_hang_up(admin: &str, bearer: &str, name: &str, linger: Duration) {
    let body = json!({"name": name, "scope": ["device.sendState"]}).to_string();
    let req = format!(
        "POST /applications/app/tokens HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {bearer}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut s = TcpStream::connect(admin).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    std::thread::sleep(linger);
    let _ = s.shutdown(std::net::Shutdown::Both);
}

/// Every stored token record (the data dir must not be open elsewhere).
fn stored_records(dir: &std::path::Path) -> Vec<Value> {
    let store = Store::open(&dir.join("db"), SyncMode::None).unwrap();
    store
        .load_tokens()
        .unwrap()
        .into_iter()
        .map(|(rec, _)| serde_json::from_slice(&rec).unwrap())
        .collect()
}

fn ids_of(list: &Value) -> Vec<String> {
    let mut ids: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

fn token_gauge(s: &Server) -> usize {
    metrics_text(s)
        .lines()
        .find_map(|l| l.strip_prefix("sluice_token_cache_entries "))
        .and_then(|v| v.trim().parse().ok())
        .expect("sluice_token_cache_entries in /metrics")
}

#[test]
fn hung_up_creations_then_parent_delete_then_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start_in(dir.path(), &[]);
    let (parent_id, parent) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "parent", "scope": ["device.sendState", "token.create"]}),
    );
    let (keep_id, _) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "bystander", "scope": ["device.sendState"]}),
    );

    // 400 creations whose clients hang up right after sending (at once, or
    // within 3 ms so that some hang up mid-change), 8 at a time so that
    // handlers queue for the change lock.
    std::thread::scope(|sc| {
        for t in 0..8 {
            let (admin, parent) = (s.admin.clone(), parent.clone());
            sc.spawn(move || {
                for i in 0..50 {
                    let linger = Duration::from_millis(i % 4);
                    create_and_hang_up(&admin, &parent, &format!("orphan-{t}-{i}"), linger);
                }
            });
        }
    });
    // The hung-up requests finish on their own; wait until the count is
    // stable (each change is one fsync).
    let mut last = usize::MAX;
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(200));
        let n = get_admin(&s, ADMIN, "/applications/app/tokens")
            .1
            .as_array()
            .unwrap()
            .len();
        if n == last {
            break;
        }
        last = n;
    }
    let (_, before) = get_admin(&s, ADMIN, "/applications/app/tokens");
    let children = before
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["parentId"] == parent_id.as_str())
        .count();
    eprintln!("{children} of 400 hung-up creations were made");
    assert!(children > 0, "no creation went through at all");
    assert_eq!(token_gauge(&s), ids_of(&before).len());

    // What memory holds, the store holds: nothing was persisted and left
    // unapplied because its client went away.
    assert_eq!(s.stop(), Some(0));
    let stored: Vec<String> = {
        let mut v: Vec<String> = stored_records(dir.path())
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(stored, ids_of(&before), "store and memory disagree");

    let mut s = Server::start_in(dir.path(), &[]);
    assert_eq!(delete_token(&s, ADMIN, "app", &parent_id), 204);
    assert_eq!(
        post_state(&s, &parent, "app", "d", r#"{"data":{"x":1}}"#).0,
        401
    );
    let (_, after) = get_admin(&s, ADMIN, "/applications/app/tokens");
    assert_eq!(ids_of(&after), vec![keep_id.clone()]);
    assert_eq!(token_gauge(&s), 1);

    // Restart: the server starts and no orphan is left anywhere.
    assert_eq!(s.stop(), Some(0));
    let mut s = Server::start_in(dir.path(), &[]);
    let (_, listed) = get_admin(&s, ADMIN, "/applications/app/tokens");
    assert_eq!(ids_of(&listed), vec![keep_id.clone()]);
    assert_eq!(token_gauge(&s), 1);
    assert_eq!(s.stop(), Some(0));
    let stored = stored_records(dir.path());
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0]["id"], keep_id.as_str());
}

#[test]
fn stored_orphans_are_deleted_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start_in(dir.path(), &[]);
    let (keep_id, keep) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "keep", "scope": ["device.sendState", "token.create"]}),
    );
    let (child_id, child) = mint(
        &s,
        &keep,
        "app",
        json!({"name": "child", "scope": ["device.sendState"]}),
    );
    assert_eq!(s.stop(), Some(0));

    // An orphan (and its own child) written straight into the store, as an
    // older version could leave them: their parent has no record.
    {
        let mut rec = stored_records(dir.path())
            .into_iter()
            .find(|r| r["id"] == child_id.as_str())
            .unwrap();
        let store = Store::open(&dir.path().join("db"), SyncMode::None).unwrap();
        for (id, parent) in [
            ("0000000000000000000000aa", "0000000000000000000000ff"),
            ("0000000000000000000000bb", "0000000000000000000000aa"),
        ] {
            rec["id"] = json!(id);
            rec["parentId"] = json!(parent);
            rec["sha256"] = json!(sluice::secret::TokenHash::of(id.as_bytes()).to_hex());
            store
                .put_token(id, &serde_json::to_vec(&rec).unwrap())
                .unwrap();
        }
    }
    let mut s = Server::start_in(dir.path(), &[]);
    let (_, list) = get_admin(&s, ADMIN, "/applications/app/tokens");
    let mut want = vec![keep_id.clone(), child_id.clone()];
    want.sort();
    assert_eq!(ids_of(&list), want);
    assert_eq!(token_gauge(&s), 2);
    assert_eq!(
        post_state(&s, &child, "app", "d", r#"{"data":{"x":1}}"#).0,
        200
    );
    let log = s.stderr();
    for id in ["0000000000000000000000aa", "0000000000000000000000bb"] {
        assert!(log.contains(id), "orphan {id} not logged: {log}");
    }
    assert_eq!(s.stop(), Some(0));
    assert_eq!(stored_records(dir.path()).len(), 2);
}
