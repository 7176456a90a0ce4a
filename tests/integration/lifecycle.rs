//! Start-up, configuration, restart and shutdown of the real binary.

use std::process::Command;

use serde_json::json;

use crate::common::*;

#[test]
fn restart_reads_everything_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start_in(dir.path(), &[]);
    let (id, t) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "d", "scope": ["device.sendState", "device.getState"]}),
    );
    let mut sent = vec![];
    for i in 0..50 {
        let body = format!(r#"{{"data":{{"i":{i},"s":"x{i}"}},"time":{}}}"#, 1000 + i);
        assert_eq!(post_state(&s, &t, "app", "dev", &body).0, 200);
        sent.push(json!({"time": 1000 + i, "data": {"i": i, "s": format!("x{i}")}}));
    }
    let listening = std::fs::read_to_string(dir.path().join("listening")).unwrap();
    assert_eq!(
        listening,
        format!(
            "listening mqtt {}\nlistening http {}\nlistening admin {}\n",
            s.mqtt, s.http, s.admin
        )
    );
    assert_eq!(s.stop(), Some(0));

    let s2 = Server::start_in(dir.path(), &[]);
    assert_eq!(history_all(&s2, &t, "app", "dev"), sent);
    let (st, comp) = get_admin(&s2, &t, "/applications/app/devices/dev/compositeState");
    assert_eq!(st, 200);
    assert_eq!(
        comp,
        json!({"i": {"value": 49, "time": 1049}, "s": {"value": "x49", "time": 1049}})
    );
    // Tokens survive too, and still work.
    assert_eq!(
        get_admin(&s2, ADMIN, &format!("/applications/app/tokens/{id}")).0,
        200
    );
    assert_eq!(
        post_state(&s2, &t, "app", "dev", r#"{"data":{"i":50}}"#).0,
        200
    );
}

#[test]
fn revocation_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start_in(dir.path(), &[]);
    let (p_id, p) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "p", "scope": ["device.sendState", "token.create"]}),
    );
    let (_, c) = mint(
        &s,
        &p,
        "app",
        json!({"name": "c", "scope": ["device.sendState"]}),
    );
    patch_token(&s, ADMIN, "app", &p_id, json!({"status": "inactive"}));
    assert_eq!(s.stop(), Some(0));
    let s2 = Server::start_in(dir.path(), &[]);
    assert_eq!(
        post_state(&s2, &c, "app", "d", r#"{"data":{"x":1}}"#).0,
        401
    );
    patch_token(&s2, ADMIN, "app", &p_id, json!({"status": "active"}));
    assert_eq!(
        post_state(&s2, &c, "app", "d", r#"{"data":{"x":1}}"#).0,
        200
    );
}

#[test]
fn sigterm_drains_in_flight_requests() {
    let mut s = Server::start_with(&[("SLUICE_STORAGE__SYNC", "always")]);
    let (_, t) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "d", "scope": ["device.sendState", "device.getState"]}),
    );
    let url = s.http_url("/applications/app/devices/d/state");
    let dir = s.dir.clone();
    // Posters run while the signal arrives; every 200 must be stored.
    let (oks, code) = std::thread::scope(|sc| {
        let posters: Vec<_> = (0..8)
            .map(|p| {
                let url = url.clone();
                let t = t.clone();
                sc.spawn(move || {
                    let c = client();
                    let mut ok = vec![];
                    for i in 0..400 {
                        let body = format!(r#"{{"data":{{"p":{p},"i":{i}}}}}"#);
                        match c.post(&url).bearer_auth(&t).body(body).send() {
                            Ok(r) if r.status().as_u16() == 200 => ok.push((p, i)),
                            Ok(r) => assert_eq!(r.status().as_u16(), 503),
                            Err(_) => break,
                        }
                    }
                    ok
                })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(150));
        let code = s.stop();
        let oks: Vec<(i32, i32)> = posters
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        (oks, code)
    });
    assert_eq!(code, Some(0));
    assert!(!oks.is_empty());
    assert!(!dir.join("listening").exists());
    let s2 = Server::start_in(&dir, &[]);
    let stored: Vec<(i64, i64)> = history_all(&s2, &t, "app", "d")
        .iter()
        .map(|i| {
            (
                i["data"]["p"].as_i64().unwrap(),
                i["data"]["i"].as_i64().unwrap(),
            )
        })
        .collect();
    for (p, i) in &oks {
        assert!(
            stored.contains(&(*p as i64, *i as i64)),
            "acknowledged ({p},{i}) lost"
        );
    }
}

#[test]
fn bad_config_lists_every_problem_and_exits_nonzero() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "[http]\nlisten = \"not-an-address\"\n[batch]\nmax_messages = 0\n[nonsense]\nkey = 1\n",
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("SLUICE_STORAGE__SYNC", "sometimes")
        .env("SLUICE_ADMIN_TOKEN", ADMIN)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in ["http.listen", "nonsense.key", "storage.sync"] {
        assert!(err.contains(needle), "{needle} missing from: {err}");
    }
    assert!(out.stdout.is_empty());

    // A root token short enough to guess is a configuration error, listed
    // with the other problems.
    let out = Command::new(bin())
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("SLUICE_ADMIN_TOKEN", "only-twenty-six-characters")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in ["http.listen", "SLUICE_ADMIN_TOKEN must be 32-512"] {
        assert!(err.contains(needle), "{needle} missing from: {err}");
    }
    assert!(!err.contains("only-twenty-six-characters"), "{err}");

    // A public admin address needs the explicit flag.
    let out = Command::new(bin())
        .args(["serve", "--admin-listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin.allow_public"));
}

#[test]
fn generated_admin_token_is_private_and_works() {
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(bin())
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .args([
            "--http-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--mqtt-listen",
            "127.0.0.1:0",
        ])
        .env_remove("SLUICE_ADMIN_TOKEN")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let listening = dir.path().join("listening");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !listening.exists() {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let token_path = dir.path().join("admin.token");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&token_path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let secret = std::fs::read_to_string(&token_path)
        .unwrap()
        .trim()
        .to_string();
    let admin = std::fs::read_to_string(&listening)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("listening admin ").map(String::from))
        .unwrap();
    let r = client()
        .get(format!("http://{admin}/applications/a/tokens"))
        .bearer_auth(&secret)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    unsafe_kill(child.id(), "TERM");
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("admin.token"), "{log}");
    assert!(!log.contains(&secret), "secret logged");
}
