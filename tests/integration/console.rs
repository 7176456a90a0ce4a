//! The operator console's files on the admin listener, and `GET /whoami`,
//! the one endpoint the console added. The console's behaviour in a real
//! browser is tested in tests/browser/.

use serde_json::{json, Value};

use crate::common::*;

#[test]
fn console_is_served_embedded_with_a_strict_policy() {
    let s = Server::start();
    let no_redirect = reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = no_redirect.get(s.admin_url("/console")).send().unwrap();
    assert_eq!(r.status().as_u16(), 308);
    assert_eq!(r.headers()["location"], "/console/");

    let r = client().get(s.admin_url("/console/")).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["content-type"], "text/html; charset=utf-8");
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    for directive in [
        "default-src 'self'",
        "script-src 'self'",
        "connect-src 'self'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    assert_eq!(r.headers()["referrer-policy"], "no-referrer");
    let html = r.text().unwrap();
    assert!(html.contains(r#"<script type="module" src="app.js"></script>"#));
    assert!(!html.contains("<script>"), "no inline script");

    // Every embedded file is served byte-equal with its content type.
    for (name, content_type, body) in sluice::http::console::ASSETS {
        let r = client()
            .get(s.admin_url(&format!("/console/{name}")))
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{name}");
        assert_eq!(r.headers()["content-type"], *content_type, "{name}");
        assert_eq!(&r.bytes().unwrap()[..], *body, "{name}");
    }
    for missing in [
        "/console/nope.js",
        "/console/..%2FCargo.toml",
        "/console/app.js/x",
    ] {
        let (st, v) = json_of(client().get(s.admin_url(missing)).send().unwrap());
        assert_eq!((st, v), (404, json!({"error": "not_found"})), "{missing}");
    }
    // The device listener does not serve it.
    let r = client().get(s.http_url("/console/")).send().unwrap();
    assert_eq!(r.status().as_u16(), 404);
}

#[test]
fn whoami_returns_the_callers_own_record() {
    let s = Server::start();
    assert_eq!(
        get_admin(&s, ADMIN, "/whoami"),
        (200, json!({"root": true}))
    );

    let (parent_id, parent) = mint(
        &s,
        ADMIN,
        "farm",
        json!({"name": "gateway", "scope": ["device.sendState", "token.create"], "devices": ["p1", "p2"],
               "rateLimit": {"perSecond": 5, "burst": 10}}),
    );
    let (child_id, child) = mint(
        &s,
        &parent,
        "farm",
        json!({"name": "pump", "scope": ["device.sendState"], "devices": ["p1"]}),
    );

    let (st, me) = get_admin(&s, &child, "/whoami");
    assert_eq!(st, 200, "{me}");
    assert_eq!(me["root"], false);
    let (_, record) = get_admin(&s, ADMIN, &format!("/applications/farm/tokens/{child_id}"));
    let strip = |v: &Value| {
        let mut v = v.clone();
        v.as_object_mut().unwrap().remove("lastUsedAt");
        v
    };
    // The same record the token API shows (lastUsedAt moves with use).
    assert_eq!(strip(&me["token"]), strip(&record));
    assert_eq!(me["token"]["parentId"], parent_id.as_str());
    assert_eq!(me["token"]["applicationId"], "farm");
    assert_eq!(
        me["token"]["rateLimit"],
        json!({"perSecond": 5, "burst": 10})
    );
    assert!(me["token"].get("token").is_none());
    assert!(!me.to_string().contains(&child));

    // Without a usable token there is nothing to tell.
    let (st, v) = json_of(client().get(s.admin_url("/whoami")).send().unwrap());
    assert_eq!((st, v), (401, json!({"error": "unauthorized"})));
    assert_eq!(get_admin(&s, "sl_unknown", "/whoami").0, 401);
    assert_eq!(
        patch_token(&s, ADMIN, "farm", &parent_id, json!({"status": "inactive"})).0,
        200
    );
    assert_eq!(get_admin(&s, &child, "/whoami").0, 401);
    assert_eq!(get_admin(&s, &parent, "/whoami").0, 401);
    assert_eq!(
        patch_token(&s, ADMIN, "farm", &parent_id, json!({"status": "active"})).0,
        200
    );
    assert_eq!(get_admin(&s, &child, "/whoami").0, 200);
    assert_eq!(delete_token(&s, ADMIN, "farm", &parent_id), 204);
    assert_eq!(get_admin(&s, &child, "/whoami").0, 401);
}
