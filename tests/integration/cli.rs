//! `sluice token …` against a running server.

use std::process::Command;

use serde_json::Value;

use crate::common::*;

fn cli(s: &Server, args: &[&str], env_token: Option<&str>) -> (bool, Value, String) {
    let mut cmd = Command::new(bin());
    cmd.arg("token").args(args).arg("--data-dir").arg(&s.dir);
    match env_token {
        Some(t) => cmd.env("SLUICE_ADMIN_TOKEN", t),
        None => cmd.env_remove("SLUICE_ADMIN_TOKEN"),
    };
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let v = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (
        out.status.success(),
        v,
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn create_list_revoke() {
    let s = Server::start();
    // The admin URL comes from <data-dir>/listening, the token from the env.
    let (ok, created, err) = cli(
        &s,
        &[
            "create",
            "--app",
            "app",
            "--scope",
            "device.sendState",
            "--device",
            "d1",
            "--expires",
            "30d",
            "--name",
            "cli-made",
        ],
        Some(ADMIN),
    );
    assert!(ok, "{err}");
    let id = created["id"].as_str().unwrap().to_string();
    let secret = created["token"].as_str().unwrap().to_string();
    assert_eq!(created["devices"], serde_json::json!(["d1"]));
    let exp = created["expirationDate"].as_str().unwrap();
    let exp_ms = sluice::timefmt::parse_rfc3339(exp).unwrap();
    let in_30d = sluice::timefmt::now_ms() + 30 * 86_400_000;
    assert!((exp_ms - in_30d).abs() < 60_000, "{exp}");
    assert_eq!(
        post_state(&s, &secret, "app", "d1", r#"{"data":{"x":1}}"#).0,
        200
    );

    let (ok, list, err) = cli(&s, &["list", "--app", "app"], Some(ADMIN));
    assert!(ok, "{err}");
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["name"], "cli-made");
    assert!(list[0].get("token").is_none());

    let (ok, revoked, err) = cli(&s, &["revoke", "--app", "app", &id], Some(ADMIN));
    assert!(ok, "{err}");
    assert_eq!(revoked["status"], "inactive");
    assert_eq!(
        post_state(&s, &secret, "app", "d1", r#"{"data":{"x":1}}"#).0,
        401
    );

    let (ok, _, _) = cli(
        &s,
        &["revoke", "--app", "app", "--delete", &id],
        Some(ADMIN),
    );
    assert!(ok);
    let (_, list, _) = cli(&s, &["list", "--app", "app"], Some(ADMIN));
    assert_eq!(list, serde_json::json!([]));

    // Refusals come back as the API's JSON error and a failing exit code.
    let (ok, v, _) = cli(
        &s,
        &["create", "--app", "app", "--scope", "nope"],
        Some(ADMIN),
    );
    assert!(!ok);
    assert_eq!(v["error"], "bad_request");
    let (ok, v, _) = cli(&s, &["list", "--app", "app"], Some("wrong-token"));
    assert!(!ok);
    assert_eq!(v["error"], "unauthorized");
    // No token anywhere: a clear message, no request.
    let (ok, _, err) = cli(&s, &["list", "--app", "app"], None);
    assert!(!ok);
    assert!(err.contains("SLUICE_ADMIN_TOKEN"), "{err}");
}
