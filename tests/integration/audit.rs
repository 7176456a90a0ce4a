//! The audit trail (issue 12, item 4): every admin change, refused ones
//! included, is recorded with who made it (a token id, never a secret),
//! what, when and the result; stored and logged on `sluice::audit`;
//! readable at `GET /applications/{app}/audit` by `token.read` holders of
//! that application only, paged like history; written whether or not the
//! client waits; kept when the application is removed.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;

fn send(s: &Server, method: &str, token: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let c = client();
    let mut req = match method {
        "PUT" => c.put(s.admin_url(path)),
        "DELETE" => c.delete(s.admin_url(path)),
        "POST" => c.post(s.admin_url(path)),
        _ => c.get(s.admin_url(path)),
    }
    .bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    json_of(req.send().unwrap())
}

/// Every event of `app`'s trail as `token` reads it, following `next`
/// with pages of `limit`, plus `extra` query parameters.
fn trail(s: &Server, token: &str, app: &str, limit: usize, extra: &str) -> Vec<Value> {
    let mut out = vec![];
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/applications/{app}/audit?limit={limit}{extra}");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let (st, v) = get_admin(s, token, &path);
        assert_eq!(st, 200, "{v}");
        let items = v["items"].as_array().unwrap();
        assert!(items.len() <= limit, "{v}");
        out.extend(items.iter().cloned());
        match v["next"].as_str() {
            Some(n) => cursor = Some(n.to_string()),
            None => return out,
        }
    }
}

fn ops(events: &[Value]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| {
            (
                e["operation"].as_str().unwrap().to_string(),
                e["result"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Every file under `dir` but the test's own stderr logs, byte-wise.
fn assert_absent_from_files(dir: &std::path::Path, secrets: &[String]) -> usize {
    let mut files = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with("stderr-") {
                continue;
            }
            files += 1;
            let bytes = std::fs::read(&path).unwrap();
            for secret in secrets {
                let core = secret.strip_prefix("sl_").unwrap_or(secret).as_bytes();
                assert!(
                    !bytes.windows(core.len()).any(|w| w == core),
                    "secret found in {}",
                    path.display()
                );
            }
        }
    }
    files
}

#[test]
fn every_kind_of_change_is_audited_with_its_actor_and_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    // Uncompressed tables, so searching the files for a secret means
    // something; JSON log lines, to find the audit target.
    let mut s = Server::start_in(
        dir.path(),
        &[
            ("SLUICE_STORAGE__COMPRESSION", "none"),
            ("SLUICE_LOG__FORMAT", "json"),
        ],
    );
    let (owner_id, owner) = mint(
        &s,
        ADMIN,
        "farm",
        json!({"name": "owner", "scope": ["all.Application"]}),
    );
    let (child_id, child) = mint(
        &s,
        &owner,
        "farm",
        json!({"name": "child", "scope": ["device.sendState"]}),
    );
    let (grand_id, grand) = mint(
        &s,
        &owner,
        "farm",
        json!({"name": "doomed", "scope": ["device.sendState"]}),
    );
    let secrets = vec![ADMIN.to_string(), owner.clone(), child.clone(), grand];
    let (st, _) = patch_token(
        &s,
        &owner,
        "farm",
        &child_id,
        json!({"status": "inactive", "name": "paused"}),
    );
    assert_eq!(st, 200);
    assert_eq!(delete_token(&s, &owner, "farm", &grand_id), 204);
    assert_eq!(
        post_state(&s, &owner, "farm", "pump", r#"{"data":{"x":1}}"#).0,
        200
    );
    assert_eq!(
        send(
            &s,
            "DELETE",
            &owner,
            "/applications/farm/devices/pump",
            None
        )
        .0,
        204
    );
    assert_eq!(
        send(
            &s,
            "PUT",
            &owner,
            "/applications/farm/retention",
            Some(json!({"retention": "30d"}))
        )
        .0,
        200
    );
    // Refused: a bad body, a token without the scope, a patch of a token
    // that does not exist.
    let (st, _) = send(
        &s,
        "PUT",
        &owner,
        "/applications/farm/retention",
        Some(json!({"retention": "soon"})),
    );
    assert_eq!(st, 400);
    let (_, reader) = mint(
        &s,
        &owner,
        "farm",
        json!({"name": "reader", "scope": ["token.read", "device.sendState"]}),
    );
    let (st, _) = create_token(
        &s,
        &reader,
        "farm",
        json!({"name": "x", "scope": ["device.sendState"]}),
    );
    assert_eq!(st, 403);
    let (st, _) = patch_token(&s, &owner, "farm", "0000", json!({"name": "n"}));
    assert_eq!(st, 404);

    let events = trail(&s, ADMIN, "farm", 100, "&order=asc");
    assert_eq!(
        ops(&events),
        [
            ("token.create", "ok"),
            ("token.create", "ok"),
            ("token.create", "ok"),
            ("token.update", "ok"),
            ("token.delete", "ok"),
            ("device.delete", "ok"),
            ("retention.set", "ok"),
            ("retention.set", "bad_request"),
            ("token.create", "ok"),
            ("token.create", "forbidden"),
            ("token.update", "not_found"),
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
    );
    // Who, what, result.
    assert_eq!(events[0]["actor"], json!({"root": true}));
    assert_eq!(events[0]["target"]["tokenId"], owner_id.as_str());
    assert_eq!(events[0]["status"], 201);
    assert_eq!(events[0]["change"]["scope"], json!(["all.Application"]));
    assert!(events[0]["change"].get("token").is_none(), "{}", events[0]);
    let by_owner = json!({"tokenId": owner_id, "applicationId": "farm"});
    assert_eq!(events[1]["actor"], by_owner);
    assert_eq!(events[1]["target"]["tokenId"], child_id.as_str());
    assert_eq!(events[3]["target"]["tokenId"], child_id.as_str());
    assert_eq!(
        events[3]["change"],
        json!({"status": "inactive", "name": "paused"})
    );
    assert_eq!(events[4]["target"]["removed"], json!([grand_id]));
    assert_eq!(events[4]["status"], 204);
    assert_eq!(events[5]["target"]["device"], "pump");
    assert_eq!(events[6]["change"], json!({"retention": "30d"}));
    assert_eq!(events[7]["status"], 400);
    assert!(events[7]["detail"].as_str().unwrap().contains("soon"));
    assert_eq!(events[9]["status"], 403);
    assert_eq!(events[9]["actor"]["applicationId"], "farm");
    assert_eq!(events[10]["target"]["tokenId"], "0000");
    // Ids are unique and times ordered.
    let mut ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    let times: Vec<i64> = events.iter().map(|e| e["time"].as_i64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    ids.dedup();
    assert_eq!(ids.len(), events.len());

    // Removing the application keeps its trail, the removal included.
    assert_eq!(send(&s, "DELETE", ADMIN, "/applications/farm", None).0, 204);
    let after = trail(&s, ADMIN, "farm", 100, "");
    assert_eq!(after.len(), events.len() + 1);
    assert_eq!(after[0]["operation"], "application.delete");
    assert_eq!(after[0]["result"], "ok");
    let removed = after[0]["target"]["removedTokens"].as_array().unwrap();
    assert_eq!(removed.len(), 3, "{}", after[0]);

    // The trail survives a restart; nothing holds a secret.
    assert_eq!(s.stop(), Some(0));
    let s = Server::start_in(dir.path(), &[("SLUICE_STORAGE__COMPRESSION", "none")]);
    assert_eq!(trail(&s, ADMIN, "farm", 5, "").len(), after.len());
    drop(s);
    assert!(assert_absent_from_files(dir.path(), &secrets) > 3);
    let mut log = String::new();
    for e in std::fs::read_dir(dir.path()).unwrap() {
        let p = e.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("stderr-")
        {
            log.push_str(&std::fs::read_to_string(p).unwrap());
        }
    }
    for secret in &secrets {
        let core = secret.strip_prefix("sl_").unwrap_or(secret);
        assert!(!log.contains(core), "secret in the log");
    }
    // Each change is logged on the audit target, as JSON.
    let audit_lines: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "sluice::audit")
        .collect();
    assert_eq!(audit_lines.len(), after.len(), "{log}");
    assert!(audit_lines
        .iter()
        .any(|v| v["operation"] == "token.create" && v["result"] == "forbidden"));
}

#[test]
fn the_trail_is_scoped_isolated_and_paged() {
    let s = Server::start_with(&[("SLUICE_AUDIT__MAX_PAGE", "5")]);
    let (_, a_admin) = mint(
        &s,
        ADMIN,
        "app-a",
        json!({"name": "a", "scope": ["all.Application"]}),
    );
    let (_, b_admin) = mint(
        &s,
        ADMIN,
        "app-b",
        json!({"name": "b", "scope": ["all.Application"]}),
    );
    let (_, a_sender) = mint(
        &s,
        &a_admin,
        "app-a",
        json!({"name": "s", "scope": ["device.sendState"]}),
    );
    let (_, a_reader) = mint(
        &s,
        &a_admin,
        "app-a",
        json!({"name": "r", "scope": ["token.read"]}),
    );
    for i in 0..8 {
        mint(
            &s,
            &a_admin,
            "app-a",
            json!({"name": format!("t{i}"), "scope": ["device.sendState"]}),
        );
    }
    // B's token tries to change A: refused, and recorded in B's trail,
    // never in A's.
    let (st, _) = create_token(
        &s,
        &b_admin,
        "app-a",
        json!({"name": "x", "scope": ["device.sendState"]}),
    );
    assert_eq!(st, 403);
    let (st, _) = send(
        &s,
        "PUT",
        &b_admin,
        "/applications/app-a/retention",
        Some(json!({"retention": "1d"})),
    );
    assert_eq!(st, 403);

    // Who may read: token.read of the application, and root.
    for (token, app, want) in [
        (&b_admin, "app-a", 403),
        (&a_sender, "app-a", 403),
        (&a_reader, "app-b", 403),
        (&a_reader, "app-a", 200),
        (&a_admin, "app-a", 200),
        (&b_admin, "app-b", 200),
    ] {
        let (st, v) = get_admin(&s, token, &format!("/applications/{app}/audit"));
        assert_eq!(st, want, "{app}: {v}");
    }
    let (st, _) = get_admin(&s, "sl_not-a-token", "/applications/app-a/audit");
    assert_eq!(st, 401);

    let a = trail(&s, ADMIN, "app-a", 3, "");
    // a, then 2 children and 8 more, newest first: 11 creates in A by A's
    // tokens and root; nothing of B.
    assert_eq!(a.len(), 11, "{a:?}");
    assert!(a
        .iter()
        .all(|e| e["operation"] == "token.create" && e["result"] == "ok"));
    assert!(a.iter().all(|e| e["actor"]["applicationId"] != "app-b"));
    assert!(a[0]["target"]["tokenId"].as_str().is_some());
    assert_eq!(a.last().unwrap()["actor"], json!({"root": true}));
    assert_eq!(trail(&s, &a_reader, "app-a", 5, ""), a);
    let asc = trail(&s, ADMIN, "app-a", 4, "&order=asc");
    assert_eq!(asc.iter().rev().cloned().collect::<Vec<_>>(), a);

    let b = trail(&s, &b_admin, "app-b", 5, "");
    assert_eq!(
        ops(&b),
        [
            ("retention.set", "forbidden"),
            ("token.create", "exceeds_parent"),
            ("token.create", "ok"),
        ]
        .map(|(x, y)| (x.to_string(), y.to_string()))
    );
    assert_eq!(b[0]["applicationId"], "app-a");

    // A time range, inclusive at both ends.
    let mid = a[5]["time"].as_i64().unwrap();
    let ranged = trail(&s, ADMIN, "app-a", 5, &format!("&start={mid}&end={mid}"));
    assert!(!ranged.is_empty());
    assert!(ranged.iter().all(|e| e["time"].as_i64() == Some(mid)));
    assert!(ranged.contains(&a[5]));

    // Limits follow `audit.max_page`; bad parameters are 400.
    for q in [
        "limit=6",
        "limit=0",
        "order=up",
        "cursor=zz",
        "from=1",
        "minSeq=1",
    ] {
        let (st, v) = get_admin(&s, ADMIN, &format!("/applications/app-a/audit?{q}"));
        assert_eq!(st, 400, "{q}: {v}");
        assert_eq!(v["error"], "bad_request");
    }
}

#[test]
fn a_change_is_audited_even_when_its_client_hangs_up() {
    let s = Server::start();
    let (_, owner) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "o", "scope": ["all.Application"]}),
    );
    for i in 0..10 {
        let body = json!({"name": format!("gone{i}"), "scope": ["device.sendState"]}).to_string();
        let req = format!(
            "POST /applications/app/tokens HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {owner}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            s.admin,
            body.len()
        );
        let mut c = TcpStream::connect(&s.admin).unwrap();
        c.write_all(req.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(3 * i));
        let _ = c.shutdown(std::net::Shutdown::Both);
    }
    // Whatever was created is audited, with its id.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, list) = get_admin(&s, &owner, "/applications/app/tokens");
        let created: Vec<String> = list
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["name"].as_str().unwrap().starts_with("gone"))
            .map(|t| t["id"].as_str().unwrap().to_string())
            .collect();
        let audited: Vec<String> = trail(&s, ADMIN, "app", 100, "")
            .iter()
            .filter(|e| {
                e["change"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("gone"))
            })
            .filter_map(|e| e["target"]["tokenId"].as_str().map(String::from))
            .collect();
        let all_audited = created.iter().all(|id| audited.contains(id));
        if all_audited && !created.is_empty() && created.len() == audited.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "created {created:?}, audited {audited:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
