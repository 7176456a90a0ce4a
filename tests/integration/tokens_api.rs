//! Token management through the admin API: CRUD, attenuation, cascade.

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

const OK: &str = r#"{"data":{"x":1}}"#;

fn error_of(v: &Value) -> &str {
    v["error"].as_str().unwrap_or("")
}

#[test]
fn crud_and_secrets_shown_once() {
    let s = Server::start();
    let (st, created) = create_token(
        &s,
        ADMIN,
        "app",
        json!({"name": "gateway", "scope": ["device.sendState", "token.create"], "devices": ["d2", "d1"],
               "expirationDate": "2099-01-01T00:00:00Z", "rateLimit": {"perSecond": 10, "burst": 20}}),
    );
    assert_eq!(st, 201, "{created}");
    let id = created["id"].as_str().unwrap();
    let secret = created["token"].as_str().unwrap();
    assert!(secret.starts_with("sl_") && secret.len() == 46);
    assert_eq!(created["applicationId"], "app");
    assert_eq!(created["name"], "gateway");
    assert_eq!(
        created["scope"],
        json!(["device.sendState", "token.create"])
    );
    assert_eq!(created["devices"], json!(["d1", "d2"]));
    assert_eq!(created["expirationDate"], "2099-01-01T00:00:00.000Z");
    assert_eq!(created["status"], "active");
    assert_eq!(created["parentId"], Value::Null);
    assert_eq!(created["lastUsedAt"], Value::Null);
    assert_eq!(created["rateLimit"], json!({"perSecond": 10, "burst": 20}));

    let (st, one) = get_admin(&s, ADMIN, &format!("/applications/app/tokens/{id}"));
    assert_eq!(st, 200);
    assert!(one.get("token").is_none(), "secret shown again: {one}");
    let mut expected = created.clone();
    expected.as_object_mut().unwrap().remove("token");
    assert_eq!(one, expected);

    let (st, list) = get_admin(&s, ADMIN, "/applications/app/tokens");
    assert_eq!(st, 200);
    assert_eq!(list, json!([expected]));
    assert!(!list.to_string().contains(secret));
    // Other applications do not see it.
    assert_eq!(
        get_admin(&s, ADMIN, "/applications/other/tokens"),
        (200, json!([]))
    );
    assert_eq!(
        get_admin(&s, ADMIN, &format!("/applications/other/tokens/{id}")).0,
        404
    );

    let (st, renamed) = patch_token(&s, ADMIN, "app", id, json!({"name": "gw"}));
    assert_eq!((st, &renamed["name"]), (200, &json!("gw")));
    let (st, off) = patch_token(&s, ADMIN, "app", id, json!({"status": "inactive"}));
    assert_eq!((st, &off["status"]), (200, &json!("inactive")));
    let (st, bad) = patch_token(&s, ADMIN, "app", id, json!({"scope": ["all.Application"]}));
    assert_eq!((st, error_of(&bad)), (400, "bad_request"));

    assert_eq!(delete_token(&s, ADMIN, "app", id), 204);
    assert_eq!(delete_token(&s, ADMIN, "app", id), 404);
    assert_eq!(
        get_admin(&s, ADMIN, &format!("/applications/app/tokens/{id}")).0,
        404
    );

    // Admin API refusals.
    assert_eq!(get_admin(&s, "nope", "/applications/app/tokens").0, 401);
    let r = client()
        .get(s.admin_url("/applications/app/tokens"))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let (st, v) = create_token(&s, ADMIN, "app", json!({"name": "x", "scope": ["no.such"]}));
    assert_eq!((st, error_of(&v)), (400, "bad_request"));
    assert!(v["detail"].as_str().unwrap().contains("unknown scope"));
    assert_eq!(get_admin(&s, ADMIN, "/nope").0, 404);
    // Every admin error is JSON with a stable code, framework ones included.
    let r = client()
        .post(s.admin_url("/applications/app/tokens"))
        .bearer_auth(ADMIN)
        .body(vec![b'a'; 2 << 20])
        .send()
        .unwrap();
    assert_eq!(json_of(r), (413, json!({"error": "payload_too_large"})));
    let r = client()
        .put(s.admin_url("/applications/app/tokens"))
        .bearer_auth(ADMIN)
        .send()
        .unwrap();
    assert_eq!(json_of(r), (405, json!({"error": "method_not_allowed"})));
    let (st, v) = get_admin(&s, ADMIN, "/applications/a%FF/tokens");
    assert_eq!((st, error_of(&v)), (400, "bad_request"));
    assert_eq!(
        get_admin(&s, ADMIN, "/healthz"),
        (200, json!({"status": "ok"}))
    );
}

#[test]
fn last_used_is_recorded_and_persisted() {
    let s = Server::start_with(&[("SLUICE_TOKENS__LAST_USED_FLUSH", "100ms")]);
    let (id, t) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "d", "scope": ["device.sendState"]}),
    );
    assert_eq!(post_state(&s, &t, "app", "d", OK).0, 200);
    let (_, v) = get_admin(&s, ADMIN, &format!("/applications/app/tokens/{id}"));
    let used = v["lastUsedAt"]
        .as_str()
        .expect("lastUsedAt set")
        .to_string();
    std::thread::sleep(Duration::from_millis(400));
    let dir = s.dir.clone();
    let mut s = s;
    assert_eq!(s.stop(), Some(0));
    let s2 = Server::start_in(&dir, &[]);
    let (_, v) = get_admin(&s2, ADMIN, &format!("/applications/app/tokens/{id}"));
    assert_eq!(v["lastUsedAt"].as_str(), Some(used.as_str()));
}

#[test]
fn attenuation_refuses_anything_wider_than_the_minter() {
    let s = Server::start();
    let (_, minter) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "m", "scope": ["device.sendState", "token.create"], "devices": ["d1", "d2"],
               "expirationDate": "2090-01-01T00:00:00Z", "rateLimit": {"perSecond": 5, "burst": 5}}),
    );
    let refused = [
        // scope not held
        json!({"name": "c", "scope": ["device.getState"]}),
        json!({"name": "c", "scope": ["all.Application"]}),
        // devices outside the minter's
        json!({"name": "c", "scope": ["device.sendState"], "devices": ["d3"]}),
        json!({"name": "c", "scope": ["device.sendState"], "devices": ["*"]}),
        // later expiry
        json!({"name": "c", "scope": ["device.sendState"], "expirationDate": "2095-01-01T00:00:00Z"}),
        // higher rate limit
        json!({"name": "c", "scope": ["device.sendState"], "rateLimit": {"perSecond": 6, "burst": 5}}),
    ];
    for body in refused {
        let (st, v) = create_token(&s, &minter, "app", body.clone());
        assert_eq!((st, error_of(&v)), (403, "exceeds_parent"), "{body}: {v}");
    }
    // Another application.
    let (st, v) = create_token(
        &s,
        &minter,
        "other",
        json!({"name": "c", "scope": ["device.sendState"]}),
    );
    assert_eq!((st, error_of(&v)), (403, "exceeds_parent"), "{v}");

    // Within bounds; what is left open is inherited, never widened.
    let (st, child) = create_token(
        &s,
        &minter,
        "app",
        json!({"name": "c", "scope": ["device.sendState"], "devices": ["d1"]}),
    );
    assert_eq!(st, 201, "{child}");
    assert_eq!(child["expirationDate"], "2090-01-01T00:00:00.000Z");
    assert_eq!(child["rateLimit"], json!({"perSecond": 5, "burst": 5}));
    let child_secret = child["token"].as_str().unwrap();
    assert_eq!(post_state(&s, child_secret, "app", "d1", OK).0, 200);
    assert_eq!(post_state(&s, child_secret, "app", "d2", OK).0, 403);

    // The seed's story: a send-state-only token cannot mint at all.
    let (_, narrow) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "n", "scope": ["device.sendState"]}),
    );
    let (st, v) = create_token(
        &s,
        &narrow,
        "app",
        json!({"name": "c", "scope": ["device.sendState"]}),
    );
    assert_eq!((st, error_of(&v)), (403, "forbidden"));

    // A minter sees (token.read) only its own descendants.
    let (_, reader) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "r", "scope": ["token.create", "token.read", "device.sendState"]}),
    );
    let (mine, _) = mint(
        &s,
        &reader,
        "app",
        json!({"name": "mine", "scope": ["device.sendState"]}),
    );
    let (st, list) = get_admin(&s, &reader, "/applications/app/tokens");
    assert_eq!(st, 200);
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![mine.as_str()]);
    assert_eq!(list[0]["parentId"].as_str().unwrap().len(), 24);
    let child_id = child["id"].as_str().unwrap();
    assert_eq!(
        get_admin(&s, &reader, &format!("/applications/app/tokens/{child_id}")).0,
        404
    );
}

#[test]
fn cascade_through_three_generations() {
    let s = Server::start();
    let all = [
        "device.sendState",
        "token.create",
        "token.revoke",
        "token.read",
    ];
    let (g1_id, g1) = mint(&s, ADMIN, "app", json!({"name": "g1", "scope": all}));
    let (g2_id, g2) = mint(&s, &g1, "app", json!({"name": "g2", "scope": all}));
    let (g3_id, g3) = mint(
        &s,
        &g2,
        "app",
        json!({"name": "g3", "scope": ["device.sendState"]}),
    );
    for t in [&g1, &g2, &g3] {
        assert_eq!(post_state(&s, t, "app", "d", OK).0, 200);
    }

    // Deactivating the grandparent stops the whole subtree at once.
    let (st, _) = patch_token(&s, ADMIN, "app", &g1_id, json!({"status": "inactive"}));
    assert_eq!(st, 200);
    for t in [&g1, &g2, &g3] {
        assert_eq!(post_state(&s, t, "app", "d", OK).0, 401);
    }
    // The grandchild's own record still says active: usability is derived.
    let (_, rec) = get_admin(&s, ADMIN, &format!("/applications/app/tokens/{g3_id}"));
    assert_eq!(rec["status"], "active");

    // Re-activating a child under an inactive parent does not bring it back.
    let (st, v) = patch_token(&s, ADMIN, "app", &g2_id, json!({"status": "active"}));
    assert_eq!(st, 200, "{v}");
    assert_eq!(post_state(&s, &g2, "app", "d", OK).0, 401);
    assert_eq!(post_state(&s, &g3, "app", "d", OK).0, 401);

    // g2 deactivated, then g1 re-activated: only g1 returns.
    patch_token(&s, ADMIN, "app", &g2_id, json!({"status": "inactive"}));
    patch_token(&s, ADMIN, "app", &g1_id, json!({"status": "active"}));
    assert_eq!(post_state(&s, &g1, "app", "d", OK).0, 200);
    assert_eq!(post_state(&s, &g2, "app", "d", OK).0, 401);
    assert_eq!(post_state(&s, &g3, "app", "d", OK).0, 401);
    // g1 cannot undo the root's revocation of g2...
    let (st, v) = patch_token(&s, &g1, "app", &g2_id, json!({"status": "active"}));
    assert_eq!((st, error_of(&v)), (403, "forbidden"), "{v}");
    // ...but it may revoke and restore its descendants itself.
    patch_token(&s, ADMIN, "app", &g2_id, json!({"status": "active"}));
    let (st, v) = patch_token(&s, &g1, "app", &g2_id, json!({"status": "inactive"}));
    assert_eq!((st, &v["deactivatedBy"]), (200, &json!(g1_id)));
    assert_eq!(post_state(&s, &g3, "app", "d", OK).0, 401);
    let (st, v) = patch_token(&s, &g1, "app", &g2_id, json!({"status": "active"}));
    assert_eq!((st, &v["deactivatedBy"]), (200, &Value::Null));
    assert_eq!(post_state(&s, &g3, "app", "d", OK).0, 200);
    // A minter may revoke its descendants, not its ancestors.
    let (st, _) = patch_token(&s, &g2, "app", &g1_id, json!({"status": "inactive"}));
    assert_eq!(st, 404);
    let (st, v) = patch_token(&s, &g3, "app", &g3_id, json!({"status": "inactive"}));
    assert_eq!((st, error_of(&v)), (403, "forbidden"));

    // Deleting the middle generation is permanent for its subtree.
    assert_eq!(delete_token(&s, &g1, "app", &g2_id), 204);
    assert_eq!(post_state(&s, &g1, "app", "d", OK).0, 200);
    assert_eq!(post_state(&s, &g2, "app", "d", OK).0, 401);
    assert_eq!(post_state(&s, &g3, "app", "d", OK).0, 401);
    assert_eq!(
        get_admin(&s, ADMIN, &format!("/applications/app/tokens/{g3_id}")).0,
        404
    );
    let (_, list) = get_admin(&s, ADMIN, "/applications/app/tokens");
    assert_eq!(list.as_array().unwrap().len(), 1);
}

#[test]
fn expiry_ends_a_token_and_its_children() {
    let s = Server::start();
    let exp = sluice::timefmt::format_rfc3339(sluice::timefmt::now_ms() + 1500);
    let (_, parent) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "p", "scope": ["device.sendState", "token.create"], "expirationDate": exp}),
    );
    let (_, child) = mint(
        &s,
        &parent,
        "app",
        json!({"name": "c", "scope": ["device.sendState"]}),
    );
    assert_eq!(post_state(&s, &child, "app", "d", OK).0, 200);
    std::thread::sleep(Duration::from_millis(1700));
    assert_eq!(post_state(&s, &parent, "app", "d", OK).0, 401);
    assert_eq!(post_state(&s, &child, "app", "d", OK).0, 401);
    let (st, _) = create_token(
        &s,
        &parent,
        "app",
        json!({"name": "late", "scope": ["device.sendState"]}),
    );
    assert_eq!(st, 401);
}

#[test]
fn state_reads_need_get_state_for_that_device() {
    let s = Server::start();
    let (_, w) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "w", "scope": ["device.sendState"]}),
    );
    let (_, r1) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "r", "scope": ["device.getState"], "devices": ["d1"]}),
    );
    assert_eq!(post_state(&s, &w, "app", "d1", OK).0, 200);
    assert_eq!(post_state(&s, &w, "app", "d2", OK).0, 200);
    assert_eq!(
        get_admin(&s, &r1, "/applications/app/devices/d1/state").0,
        200
    );
    assert_eq!(
        get_admin(&s, &r1, "/applications/app/devices/d2/state").0,
        403
    );
    assert_eq!(
        get_admin(&s, &w, "/applications/app/devices/d1/state").0,
        403
    );
    assert_eq!(
        get_admin(&s, &r1, "/applications/app/devices/d1/compositeState").0,
        200
    );
    assert_eq!(
        get_admin(&s, &r1, "/applications/app/devices/d2/compositeState").0,
        403
    );
    for q in [
        "limit=0",
        "limit=10001",
        "order=sideways",
        "start=later",
        "cursor=abc",
        "start=5&end=4",
    ] {
        let (st, v) = get_admin(&s, &r1, &format!("/applications/app/devices/d1/state?{q}"));
        assert_eq!((st, error_of(&v)), (400, "bad_request"), "{q}: {v}");
    }
}

#[test]
fn only_the_deactivating_token_or_one_above_reactivates() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start_in(dir.path(), &[]);
    let all = [
        "device.sendState",
        "token.create",
        "token.revoke",
        "token.read",
    ];
    let (a_id, a) = mint(&s, ADMIN, "app", json!({"name": "a", "scope": all}));
    let (b_id, b) = mint(&s, &a, "app", json!({"name": "b", "scope": all}));
    let (c_id, c) = mint(
        &s,
        &b,
        "app",
        json!({"name": "c", "scope": ["device.sendState"]}),
    );
    let (d_id, _) = mint(
        &s,
        &b,
        "app",
        json!({"name": "d", "scope": ["device.sendState"]}),
    );
    let rec =
        |s: &Server, id: &str| get_admin(s, ADMIN, &format!("/applications/app/tokens/{id}")).1;
    assert_eq!(rec(&s, &c_id)["deactivatedBy"], Value::Null);

    // a deactivates c; b, below a, cannot undo it, not even by renaming and
    // re-activating in one call, and re-deactivating does not take it over.
    let (st, v) = patch_token(&s, &a, "app", &c_id, json!({"status": "inactive"}));
    assert_eq!((st, &v["deactivatedBy"]), (200, &json!(a_id)));
    let (st, v) = patch_token(
        &s,
        &b,
        "app",
        &c_id,
        json!({"status": "active", "name": "sneaky"}),
    );
    assert_eq!((st, error_of(&v)), (403, "forbidden"), "{v}");
    assert!(v["detail"].as_str().unwrap().contains(&a_id), "{v}");
    assert_eq!(
        patch_token(&s, &b, "app", &c_id, json!({"status": "inactive"})).0,
        200
    );
    let r = rec(&s, &c_id);
    assert_eq!(
        (&r["status"], &r["deactivatedBy"], &r["name"]),
        (&json!("inactive"), &json!(a_id), &json!("c"))
    );
    assert_eq!(post_state(&s, &c, "app", "dev", OK).0, 401);

    // It holds across a restart: the deactivator is stored.
    assert_eq!(s.stop(), Some(0));
    let mut s = Server::start_in(dir.path(), &[]);
    assert_eq!(
        patch_token(&s, &b, "app", &c_id, json!({"status": "active"})).0,
        403
    );
    let (st, v) = patch_token(&s, &a, "app", &c_id, json!({"status": "active"}));
    assert_eq!((st, &v["deactivatedBy"]), (200, &Value::Null));
    assert_eq!(post_state(&s, &c, "app", "dev", OK).0, 200);

    // The root's deactivation binds every application token.
    let (_, v) = patch_token(&s, ADMIN, "app", &d_id, json!({"status": "inactive"}));
    assert_eq!(v["deactivatedBy"], "root");
    for t in [&a, &b] {
        let (st, v) = patch_token(&s, t, "app", &d_id, json!({"status": "active"}));
        assert_eq!((st, error_of(&v)), (403, "forbidden"), "{v}");
        assert!(v["detail"].as_str().unwrap().contains("root"), "{v}");
    }
    assert_eq!(
        patch_token(&s, ADMIN, "app", &d_id, json!({"status": "active"})).0,
        200
    );

    // A token above the deactivator may re-activate; so may the root.
    let (_, v) = patch_token(&s, &b, "app", &d_id, json!({"status": "inactive"}));
    assert_eq!(v["deactivatedBy"], json!(b_id));
    assert_eq!(
        patch_token(&s, &a, "app", &d_id, json!({"status": "active"})).0,
        200
    );
    patch_token(&s, &b, "app", &d_id, json!({"status": "inactive"}));
    assert_eq!(
        patch_token(&s, ADMIN, "app", &d_id, json!({"status": "active"})).0,
        200
    );

    // Created inactive: deactivated by its minter, which may activate it.
    let (st, v) = create_token(
        &s,
        &b,
        "app",
        json!({"name": "later", "scope": ["device.sendState"], "status": "inactive"}),
    );
    assert_eq!((st, &v["deactivatedBy"]), (201, &json!(b_id)));
    let later = v["id"].as_str().unwrap();
    assert_eq!(
        patch_token(&s, &b, "app", later, json!({"status": "active"})).0,
        200
    );
    assert_eq!(s.stop(), Some(0));
}

#[test]
fn tokens_per_application_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("SLUICE_TOKENS__MAX_PER_APPLICATION", "3")];
    let mut s = Server::start_in(dir.path(), &env);
    let (m_id, m) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "m", "scope": ["device.sendState", "token.create"]}),
    );
    mint(
        &s,
        &m,
        "app",
        json!({"name": "c1", "scope": ["device.sendState"]}),
    );
    mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "c2", "scope": ["device.sendState"]}),
    );
    for caller in [ADMIN, m.as_str()] {
        let (st, v) = create_token(
            &s,
            caller,
            "app",
            json!({"name": "one-too-many", "scope": ["device.sendState"]}),
        );
        assert_eq!((st, error_of(&v)), (400, "bad_request"), "{v}");
        let detail = v["detail"].as_str().unwrap();
        assert!(
            detail.contains("tokens.max_per_application") && detail.contains('3'),
            "{detail}"
        );
    }
    // Another application has its own count.
    mint(
        &s,
        ADMIN,
        "other",
        json!({"name": "o", "scope": ["device.sendState"]}),
    );
    // Nothing of a refused create was stored, in memory or on disk.
    assert_eq!(
        get_admin(&s, ADMIN, "/applications/app/tokens")
            .1
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert_eq!(s.stop(), Some(0));
    let s = Server::start_in(dir.path(), &env);
    let (_, list) = get_admin(&s, ADMIN, "/applications/app/tokens");
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(!names.contains(&"one-too-many"));
    // Deleting makes room again (the minter's subtree is two tokens).
    assert_eq!(delete_token(&s, ADMIN, "app", &m_id), 204);
    mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "n1", "scope": ["device.sendState"]}),
    );
    mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "n2", "scope": ["device.sendState"]}),
    );
    assert_eq!(
        create_token(
            &s,
            ADMIN,
            "app",
            json!({"name": "n3", "scope": ["device.sendState"]})
        )
        .0,
        400
    );
}

#[test]
fn chains_of_minted_tokens_are_bounded() {
    let s = Server::start_with(&[("SLUICE_TOKENS__MAX_CHAIN_DEPTH", "3")]);
    let scope = json!(["device.sendState", "token.create"]);
    let (_, d1) = mint(&s, ADMIN, "app", json!({"name": "d1", "scope": scope}));
    let (_, d2) = mint(&s, &d1, "app", json!({"name": "d2", "scope": scope}));
    let (_, d3) = mint(&s, &d2, "app", json!({"name": "d3", "scope": scope}));
    let (st, v) = create_token(&s, &d3, "app", json!({"name": "d4", "scope": scope}));
    assert_eq!((st, error_of(&v)), (400, "bad_request"), "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("tokens.max_chain_depth"),
        "{v}"
    );
    assert_eq!(
        get_admin(&s, ADMIN, "/applications/app/tokens")
            .1
            .as_array()
            .unwrap()
            .len(),
        3
    );
    // Siblings higher up are still fine.
    mint(&s, &d2, "app", json!({"name": "d3b", "scope": scope}));
    assert_eq!(post_state(&s, &d3, "app", "dev", OK).0, 200);
}
