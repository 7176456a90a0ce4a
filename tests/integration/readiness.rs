//! Liveness and readiness (issue 12, item 6): `/healthz` says the process
//! answers, `/readyz` whether it should get traffic, with every check and
//! the reason of each failure. Storage failing is shown in `full_disk.rs`
//! (readiness 503 while liveness stays 200).

use serde_json::{json, Value};

use crate::common::*;

fn get(url: &str) -> (u16, Value) {
    json_of(client().get(url).send().unwrap())
}

#[test]
fn healthz_is_liveness_and_readyz_lists_every_check_on_both_listeners() {
    let mut s = Server::start();
    for url in [s.http_url("/healthz"), s.admin_url("/healthz")] {
        assert_eq!(get(&url), (200, json!({"status": "ok"})), "{url}");
    }
    for url in [s.http_url("/readyz"), s.admin_url("/readyz")] {
        let (st, v) = get(&url);
        assert_eq!((st, &v["status"]), (200, &json!("ready")), "{url}: {v}");
        let checks = v["checks"].as_array().unwrap();
        let names: Vec<&str> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(names, vec!["storage", "writer", "serving"], "{url}");
        assert!(checks.iter().all(|c| c["ok"] == true), "{url}: {v}");
    }
    // Neither needs a token, and neither is an application path.
    let (st, _) = json_of(
        client()
            .get(s.http_url("/readyz"))
            .bearer_auth("not-a-token")
            .send()
            .unwrap(),
    );
    assert_eq!(st, 200);
    assert_eq!(s.stop(), Some(0));
}
