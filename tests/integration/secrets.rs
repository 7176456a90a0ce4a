//! Token secrets never leak: a full scenario at TRACE log level, then every
//! log line, every response body (but the one creation response that shows
//! a secret once), every RocksDB file and `Debug` output are searched for
//! every secret issued.

use std::time::Duration;

use serde_json::json;

use crate::common::*;

#[test]
fn no_secret_in_logs_bodies_store_or_debug() {
    scenario("text");
}

/// The same in `log.format = "json"`, where also every line of the log is
/// one JSON object with the fields log shippers index on.
#[test]
fn json_log_is_one_object_per_line_without_secrets() {
    let log = scenario("json");
    let mut messages = 0;
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        for key in ["timestamp", "level", "target"] {
            assert!(v[key].is_string(), "no {key}: {line}");
        }
        if v["message"].is_string() {
            messages += 1;
        }
    }
    assert!(
        log.lines().count() > 10 && messages == log.lines().count(),
        "every line has a message ({messages} of {})",
        log.lines().count()
    );
    // Fields sit at the top level beside the message.
    assert!(
        log.lines()
            .any(|l| l.contains(r#""message":"token cache loaded""#) && l.contains(r#""tokens":"#)),
        "{log}"
    );
}

/// Runs the scenario with the log in `format` and returns the log.
fn scenario(format: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start_in(
        dir.path(),
        &[
            ("RUST_LOG", "trace"),
            ("SLUICE_TOKENS__LAST_USED_FLUSH", "100ms"),
            ("SLUICE_LOG__FORMAT", format),
        ],
    );
    let mut secrets = vec![ADMIN.to_string()];
    let mut bodies: Vec<String> = vec![];

    let (p_id, parent) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "p", "scope": ["device.sendState", "device.getState", "token.create", "token.read", "token.revoke"]}),
    );
    let (_, child) = mint(
        &s,
        &parent,
        "app",
        json!({"name": "c", "scope": ["device.sendState"]}),
    );
    secrets.push(parent.clone());
    secrets.push(child.clone());

    let c = client();
    let mut record = |r: reqwest::blocking::Response| {
        let text = r.text().unwrap();
        bodies.push(text);
    };
    // Successes and failures of every kind, on both HTTP listeners.
    for (tok, body) in [
        (&child, r#"{"data":{"x":1}}"#),
        (&child, "not json"),
        (&parent, r#"{"data":{"x":2}}"#),
    ] {
        record(
            c.post(s.http_url("/applications/app/devices/d/state"))
                .bearer_auth(tok)
                .body(body)
                .send()
                .unwrap(),
        );
    }
    let near_miss = format!("{}X", &child[..child.len() - 1]);
    record(
        c.post(s.http_url("/applications/app/devices/d/state"))
            .bearer_auth(&near_miss)
            .body(r#"{"data":{"x":1}}"#)
            .send()
            .unwrap(),
    );
    record(
        c.get(s.admin_url("/applications/app/tokens"))
            .bearer_auth(&parent)
            .send()
            .unwrap(),
    );
    record(
        c.get(s.admin_url("/applications/app/devices/d/state"))
            .bearer_auth(&parent)
            .send()
            .unwrap(),
    );
    record(
        c.post(s.admin_url("/applications/app/tokens"))
            .bearer_auth(&child)
            .body(r#"{"name":"x","scope":["all.Application"]}"#)
            .send()
            .unwrap(),
    );
    record(c.get(s.admin_url("/metrics")).send().unwrap());

    // MQTT with the secret as password: success, refusals, revocation.
    let port: u16 = s.mqtt.rsplit(':').next().unwrap().parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        for tok in [child.as_str(), near_miss.as_str()] {
            let mut o = rumqttc::MqttOptions::new("sec", "127.0.0.1", port);
            o.set_credentials("user", tok);
            let (cl, mut ev) = rumqttc::AsyncClient::new(o, 10);
            cl.publish(
                "applications/app/devices/d/state",
                rumqttc::QoS::AtLeastOnce,
                false,
                r#"{"data":{"m":1}}"#,
            )
            .await
            .unwrap();
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                loop {
                    match ev.poll().await {
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) | Err(_) => break,
                        _ => {}
                    }
                }
            })
            .await;
        }
    });
    patch_token(&s, ADMIN, "app", &p_id, json!({"status": "inactive"}));
    assert_eq!(
        post_state(&s, &child, "app", "d", r#"{"data":{"x":3}}"#).0,
        401
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(s.stop(), Some(0));

    // The log is at TRACE and not empty.
    let log = std::fs::read_to_string(&s.stderr_path).unwrap();
    assert!(log.contains("TRACE"), "log level not trace");
    eprintln!("searched {} log lines", log.lines().count());
    for secret in &secrets {
        assert!(!log.contains(secret.as_str()), "secret in the log");
        // Also the base64 body alone, without the `sl_` prefix.
        let core = secret.strip_prefix("sl_").unwrap_or(secret);
        assert!(!log.contains(core), "secret body in the log");
        for b in &bodies {
            assert!(!b.contains(core), "secret in a response body: {b}");
        }
    }
    // Every file of the store (and the data dir), byte-wise.
    let mut files = 0;
    let mut stack = vec![dir.path().to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("stderr-")
            {
                continue;
            }
            files += 1;
            let bytes = std::fs::read(&path).unwrap();
            for secret in &secrets {
                let core = secret.strip_prefix("sl_").unwrap_or(secret).as_bytes();
                assert!(
                    !bytes.windows(core.len()).any(|w| w == core),
                    "secret found in {}",
                    path.display()
                );
            }
        }
    }
    assert!(files > 5, "store files were searched ({files})");

    // Debug output of the types that hold secrets.
    let generated =
        sluice::secret::TokenSecret::generate(&ring::rand::SystemRandom::new()).unwrap();
    let admin_client = sluice::client::AdminClient::new(
        "http://127.0.0.1:1",
        &child,
        std::time::Duration::from_secs(1),
    )
    .unwrap();
    let dbg = format!("{generated:?} {admin_client:?}");
    assert!(!dbg.contains(&generated.expose()[3..]));
    assert!(!dbg.contains(&child[3..]));
    log
}
