//! Which device listeners are open: with TLS configured plain MQTT is off
//! unless kept explicitly, any device listener can be turned off, and the
//! `listening` lines say exactly what is open.

use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::*;
use crate::tls::pki;

/// Whether nothing listens on `port` of loopback: a connection is refused.
fn refused(port: u16) -> bool {
    TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_secs(2),
    )
    .is_err()
}

/// Runs `sluice serve` on fixed device ports and returns the `listening`
/// file's lines once it is up, and the log; the server is stopped.
fn open_listeners(mqtt: u16, http: u16, mqtts: u16, env: &[(&str, &str)]) -> (Vec<String>, String) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.log");
    let mut cmd = Command::new(bin());
    cmd.args(["serve", "--data-dir"])
        .arg(dir.path())
        .args(["--admin-listen", "127.0.0.1:0"])
        .args(["--mqtt-listen", &format!("127.0.0.1:{mqtt}")])
        .args(["--http-listen", &format!("127.0.0.1:{http}")])
        .args(["--mqtts-listen", &format!("127.0.0.1:{mqtts}")])
        .env("SLUICE_ADMIN_TOKEN", ADMIN)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let file = dir.path().join("listening");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !file.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "server exited: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let lines: Vec<String> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    // What is not announced must not be reachable either.
    for (name, port) in [("mqtt", mqtt), ("mqtts", mqtts)] {
        let announced = lines
            .iter()
            .any(|l| l.starts_with(&format!("listening {name} ")));
        assert_eq!(!announced, refused(port), "{name} on {port}: {lines:?}");
    }
    let http_announced = lines
        .iter()
        .any(|l| l.starts_with("listening http ") || l.starts_with("listening https "));
    assert_eq!(!http_announced, refused(http), "http on {http}: {lines:?}");
    unsafe_kill(child.id(), "TERM");
    assert_eq!(child.wait().unwrap().code(), Some(0));
    (lines, std::fs::read_to_string(&log).unwrap())
}

fn kinds(lines: &[String]) -> Vec<&str> {
    lines.iter().map(|l| l.split(' ').nth(1).unwrap()).collect()
}

#[test]
fn tls_turns_plain_mqtt_off_unless_kept() {
    let p = pki();
    let (cert, key) = (p.cert.to_str().unwrap(), p.key.to_str().unwrap());
    let tls = [("SLUICE_TLS__CERT", cert), ("SLUICE_TLS__KEY", key)];

    let (mqtt, http, mqtts) = three_free_ports();
    let (lines, log) = open_listeners(mqtt, http, mqtts, &tls);
    assert_eq!(kinds(&lines), ["https", "admin", "mqtts"], "{lines:?}");
    assert!(
        log.contains("mqtt.plain_with_tls = true"),
        "the log says why plain MQTT is off and how to keep it: {log}"
    );

    let kept = [tls[0], tls[1], ("SLUICE_MQTT__PLAIN_WITH_TLS", "true")];
    let (mqtt, http, mqtts) = three_free_ports();
    let (lines, _) = open_listeners(mqtt, http, mqtts, &kept);
    assert_eq!(kinds(&lines), ["mqtt", "https", "admin", "mqtts"]);

    let no_mqtts = [tls[0], tls[1], ("SLUICE_TLS__MQTTS_ENABLED", "false")];
    let (mqtt, http, mqtts) = three_free_ports();
    let (lines, log) = open_listeners(mqtt, http, mqtts, &no_mqtts);
    assert_eq!(kinds(&lines), ["https", "admin"]);
    assert!(log.contains("tls.mqtts_enabled = false"), "{log}");
}

#[test]
fn any_device_listener_can_be_turned_off() {
    let (mqtt, http, mqtts) = three_free_ports();
    let (lines, _) = open_listeners(mqtt, http, mqtts, &[]);
    assert_eq!(kinds(&lines), ["mqtt", "http", "admin"]);

    let (mqtt, http, mqtts) = three_free_ports();
    let (lines, log) = open_listeners(
        mqtt,
        http,
        mqtts,
        &[
            ("SLUICE_MQTT__ENABLED", "false"),
            ("SLUICE_HTTP__ENABLED", "false"),
        ],
    );
    assert_eq!(kinds(&lines), ["admin"]);
    assert!(log.contains("every device listener is off"), "{log}");

    let (mqtt, http, mqtts) = three_free_ports();
    let (lines, _) = open_listeners(mqtt, http, mqtts, &[("SLUICE_HTTP__ENABLED", "false")]);
    assert_eq!(kinds(&lines), ["mqtt", "admin"]);
}

/// With TLS and plain MQTT kept on purpose, both carry state; the plain
/// listener is the operator's explicit choice.
#[test]
fn plain_mqtt_kept_beside_tls_stores_state() {
    let p = pki();
    let (cert, key) = (p.cert.to_str().unwrap(), p.key.to_str().unwrap());
    let s = Server::start_with(&[
        ("SLUICE_TLS__CERT", cert),
        ("SLUICE_TLS__KEY", key),
        ("SLUICE_MQTT__PLAIN_WITH_TLS", "true"),
    ]);
    let (_, t) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "d", "scope": ["device.sendState"]}),
    );
    let port = s.mqtt.rsplit(':').next().unwrap();
    let out = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            port,
            "-u",
            "x",
            "-P",
            &t,
            "-q",
            "1",
        ])
        .args(["-t", "applications/app/devices/d/state"])
        .args(["-m", r#"{"data":{"via":"plain"}}"#])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = history_all(&s, ADMIN, "app", "d");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["data"]["via"], "plain");
}
