//! The tool against a real Sluice on port 0: counts in the JSON summary,
//! `--verify` passing, errors (not a hang) when the server dies, the ramp,
//! and `--help` documenting every option.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{loadtest, loadtest_bin, mint_device_token, wait_with_limit, Server, ADMIN};

const LIMIT: Duration = Duration::from_secs(60);

/// A finished run that sent and acknowledged exactly `n`, without errors.
fn assert_clean(r: &common::Run, n: u64) {
    assert!(r.status.success(), "{}", r.show());
    assert_eq!(r.u("/messages/sent"), n, "{}", r.show());
    assert_eq!(r.u("/messages/acked"), n, "{}", r.show());
    assert_eq!(r.u("/messages/failed"), 0, "{}", r.show());
    assert_eq!(r.u("/errors/total"), 0, "{}", r.show());
    assert_eq!(r.u("/latency/count"), n, "{}", r.show());
    assert_eq!(r.json["ok"], true, "{}", r.show());
}

fn assert_verified(r: &common::Run, n: u64) {
    assert_eq!(r.u("/verify/acked"), n, "{}", r.show());
    assert_eq!(r.u("/verify/found"), n, "{}", r.show());
    for k in ["missing", "duplicates", "mismatched"] {
        assert_eq!(r.u(&format!("/verify/{k}")), 0, "{k}\n{}", r.show());
    }
    assert!(r.stdout.contains("verify "), "{}", r.show());
}

#[test]
fn mqtt_311_qos1_counts_and_verify() {
    let s = Server::start();
    let r = loadtest(
        &[
            "mqtt",
            &s.mqtt,
            "--admin",
            &s.admin,
            "--mqtt-version",
            "3.1.1",
            "-c",
            "4",
            "-n",
            "2000",
            "--verify",
        ],
        LIMIT,
    );
    assert_clean(&r, 2000);
    assert_verified(&r, 2000);
    assert_eq!(r.u("/connections/connected"), 4);
    assert!(r.json["credentials"]
        .as_str()
        .unwrap()
        .contains("provisioned 4 device-scoped tokens"));
}

#[test]
fn mqtt_procs_provision_once_and_verify_the_merged_run() {
    let s = Server::start();
    let pid = s.pid().to_string();
    let r = loadtest(
        &[
            "mqtt",
            &s.mqtt,
            "--admin",
            &s.admin,
            "-c",
            "4",
            "-n",
            "2000",
            "--rate",
            "4000",
            "--procs",
            "2",
            "--broker-pid",
            &pid,
            "--verify",
        ],
        LIMIT,
    );
    assert_clean(&r, 2000);
    assert_verified(&r, 2000);
    assert_eq!(r.u("/verify/devices"), 4);
    assert_eq!(r.u("/connections/connected"), 4);
    // The parent provisioned every connection's token; the children used
    // them.
    assert!(r.json["credentials"]
        .as_str()
        .unwrap()
        .contains("provisioned 4 device-scoped tokens"));
    assert_eq!(r.u("/send_lag/count"), 2000, "{}", r.show());
    assert_eq!(r.u("/server_latency/count"), 2000, "{}", r.show());
    assert_eq!(r.json["broker_cpu"]["per"], "acked", "{}", r.show());
}

#[test]
fn mqtt_5_paced_with_several_devices_per_connection_verifies() {
    let s = Server::start();
    let r = loadtest(
        &[
            "mqtt",
            &s.mqtt,
            "--admin",
            &s.admin,
            "--mqtt-version",
            "5",
            "-c",
            "3",
            "--devices-per-connection",
            "2",
            "-n",
            "1500",
            "--rate",
            "3000",
            "--inflight",
            "10",
            "--payload-size",
            "300",
            "--verify",
        ],
        LIMIT,
    );
    assert_clean(&r, 1500);
    assert_verified(&r, 1500);
    assert_eq!(r.u("/verify/devices"), 6);
    assert_eq!(r.u("/send_lag/count"), 1500, "paced runs measure send lag");
    assert_eq!(r.u("/server_latency/count"), 1500, "{}", r.show());
    // Paced at 3000/s, 1500 messages take about half a second.
    let secs = r.json["duration_seconds"].as_f64().unwrap();
    assert!((0.45..10.0).contains(&secs), "{secs}");
}

#[test]
fn http_counts_and_verify() {
    let s = Server::start();
    let r = loadtest(
        &[
            "http", &s.http, "--admin", &s.admin, "-c", "4", "-n", "1000", "--verify",
        ],
        LIMIT,
    );
    assert_clean(&r, 1000);
    assert_verified(&r, 1000);
    assert!(r.stdout.contains("latency ms   p50"), "{}", r.show());
}

#[test]
fn http2_streams_share_connections_verify_and_broker_cpu_is_reported() {
    let s = Server::start();
    let pid = s.pid().to_string();
    let r = loadtest(
        &[
            "http",
            &s.http,
            "--admin",
            &s.admin,
            "--h2",
            "-c",
            "2",
            "--streams",
            "4",
            "-n",
            "2000",
            "--verify",
            "--broker-pid",
            &pid,
        ],
        LIMIT,
    );
    assert_clean(&r, 2000);
    assert_verified(&r, 2000);
    // Two connections, four senders (streams) on each, a device each.
    assert_eq!(r.u("/connections/connected"), 2, "{}", r.show());
    assert_eq!(r.u("/streams_per_connection"), 4, "{}", r.show());
    assert_eq!(r.u("/devices"), 8, "{}", r.show());
    assert_eq!(r.u("/verify/devices"), 8, "{}", r.show());
    assert!(r.json["mode"].as_str().unwrap().contains("HTTP/2"));
    // The broker worked for it: its CPU over the run, per acked message.
    let cpu = &r.json["broker_cpu"];
    assert_eq!(
        cpu["pid"].as_u64(),
        Some(u64::from(s.pid())),
        "{}",
        r.show()
    );
    assert_eq!(cpu["per"], "acked", "{}", r.show());
    assert!(
        cpu["us_per_message"].as_f64().unwrap() > 0.0,
        "{}",
        r.show()
    );
    assert!(r.stdout.contains("broker cpu"), "{}", r.show());
    // Server latency (send → 200) is counted for every acknowledged
    // request and is never above the latency from the scheduled time.
    assert_eq!(r.u("/server_latency/count"), 2000, "{}", r.show());
    let (server, total) = (
        r.json["server_latency"]["max_ms"].as_f64().unwrap(),
        r.json["latency"]["max_ms"].as_f64().unwrap(),
    );
    assert!(server <= total, "{}", r.show());
}

#[test]
fn shared_token_tokens_file_and_qos0() {
    let s = Server::start();
    // A shared token without provisioning, on a plain topic template.
    let shared = mint_device_token(&s.admin, "bench");
    let r = loadtest(
        &[
            "mqtt",
            &s.mqtt,
            "--no-provision",
            "--token",
            &shared,
            "--app",
            "bench",
            "--topic",
            "applications/bench/devices/{device}/state",
            "-c",
            "2",
            "-n",
            "200",
            "--admin",
            &s.admin,
            "--verify",
        ],
        LIMIT,
    );
    assert_clean(&r, 200);
    assert_verified(&r, 200);

    // Devices and tokens from a file, over HTTP.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    let filed = mint_device_token(&s.admin, "filed");
    std::fs::write(&file, format!("# device token\nfa {filed}\nfb {filed}\n")).unwrap();
    let r = loadtest(
        &[
            "http",
            &s.http,
            "--tokens-file",
            file.to_str().unwrap(),
            "--app",
            "filed",
            "-c",
            "2",
            "-n",
            "100",
            "--admin",
            &s.admin,
            "--verify",
        ],
        LIMIT,
    );
    assert_clean(&r, 100);
    assert_verified(&r, 100);
    assert_eq!(r.u("/verify/devices"), 2);

    // QoS 0: sent, nothing acknowledged, no errors.
    let r = loadtest(
        &[
            "mqtt", &s.mqtt, "--admin", &s.admin, "--qos", "0", "-c", "2", "-n", "300",
        ],
        LIMIT,
    );
    assert!(r.status.success(), "{}", r.show());
    assert_eq!(r.u("/messages/sent"), 300);
    assert_eq!(r.u("/messages/acked"), 0);
    assert_eq!(r.u("/errors/total"), 0);
    assert!(r.json["latency"].is_null());
}

#[test]
fn refused_credentials_are_errors() {
    let s = Server::start();
    let r = loadtest(
        &[
            "mqtt", &s.mqtt, "--token", "sl_wrong", "-c", "2", "-n", "10",
        ],
        LIMIT,
    );
    assert_eq!(r.status.code(), Some(1), "{}", r.show());
    assert_eq!(r.u("/connections/failed"), 2);
    assert!(r.stdout.contains("connack_"), "{}", r.show());

    let r = loadtest(
        &["http", &s.http, "--token", "sl_wrong", "-c", "1", "-n", "5"],
        LIMIT,
    );
    assert_eq!(r.status.code(), Some(1), "{}", r.show());
    assert_eq!(r.json["errors"]["by_kind"]["http_401"], 5, "{}", r.show());
    // --max-errors tolerates them.
    let r = loadtest(
        &[
            "http",
            &s.http,
            "--token",
            "sl_wrong",
            "-c",
            "1",
            "-n",
            "5",
            "--max-errors",
            "5",
        ],
        LIMIT,
    );
    assert!(r.status.success(), "{}", r.show());
}

/// Starts a long run, SIGKILLs the server after a second and expects the
/// tool to end promptly with errors and a non-zero status.
fn killed_server(protocol: &str) {
    let mut s = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("out.json");
    let target = if protocol == "mqtt" {
        s.mqtt.clone()
    } else {
        s.http.clone()
    };
    let child = Command::new(loadtest_bin())
        .args([protocol, &target, "--admin", &s.admin])
        .args(["-c", "4", "-d", "60s", "-r", "1000", "--timeout", "5s"])
        .arg("--json")
        .arg(&json)
        .env("SLUICE_ADMIN_TOKEN", ADMIN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let killed_at = Instant::now();
    s.kill();
    let out = wait_with_limit(child, Duration::from_secs(30));
    let took = killed_at.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        took < Duration::from_secs(15),
        "took {took:?} after the kill"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(v["errors"]["total"].as_u64().unwrap() > 0, "{stdout}");
    assert!(
        v["errors"]["by_kind"]["disconnected"].as_u64().unwrap() > 0,
        "{stdout}"
    );
    assert!(v["messages"]["acked"].as_u64().unwrap() > 0, "{stdout}");
    assert!(stdout.contains("FAILED"), "{stdout}");
}

#[test]
fn mqtt_run_ends_with_errors_when_the_server_dies() {
    killed_server("mqtt");
}

#[test]
fn http_run_ends_with_errors_when_the_server_dies() {
    killed_server("http");
}

#[test]
fn ramp_reports_steps_and_plots() {
    let s = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("ramp.svg");
    let r = loadtest(
        &[
            "mqtt",
            &s.mqtt,
            "--admin",
            &s.admin,
            "-c",
            "4",
            "--ramp",
            "--ramp-start",
            "200",
            "--ramp-step",
            "200",
            "--ramp-max",
            "600",
            "--ramp-step-duration",
            "400ms",
            "--p99-max",
            "2s",
            "--plot",
            svg.to_str().unwrap(),
        ],
        LIMIT,
    );
    assert!(r.status.success(), "{}", r.show());
    let steps = r.json["ramp"]["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 3, "{}", r.show());
    assert_eq!(
        r.json["ramp"]["highest_passing_rate"],
        600.0,
        "{}",
        r.show()
    );
    for (k, st) in steps.iter().enumerate() {
        let planned = [80, 160, 240][k];
        assert_eq!(st["planned"], planned, "{st}");
        assert_eq!(st["acked"], planned, "{st}");
    }
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.starts_with("<svg") && plot.contains("p99 latency (ms)"));
    assert!(
        r.stdout.contains("highest passing rate 600 msg/s"),
        "{}",
        r.show()
    );
}

#[test]
fn help_documents_every_option() {
    let help = |args: &[&str]| {
        let out = Command::new(loadtest_bin()).args(args).output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let top = help(&["--help"]);
    assert!(top.contains("mqtt") && top.contains("http") && top.contains("coordinated omission"));
    let common = [
        "--connections",
        "--messages",
        "--duration",
        "--rate",
        "--payload-size",
        "--devices-per-connection",
        "--connect-concurrency",
        "--timeout",
        "--app",
        "--device-prefix",
        "--admin",
        "--admin-token",
        "--token",
        "--tokens-file",
        "--no-provision",
        "--json",
        "--max-errors",
        "--verify",
        "--verify-via",
        "--verify-timeout",
        "--no-progress",
        "--broker-pid",
        "--ramp",
        "--ramp-start",
        "--ramp-step",
        "--ramp-step-duration",
        "--ramp-max",
        "--p99-max",
        "--plot",
    ];
    let mqtt = help(&["mqtt", "--help"]);
    for opt in common.iter().chain(&[
        "--qos",
        "--mqtt-version",
        "--inflight",
        "--topic",
        "--username",
        "--client-id-prefix",
        "--keep-alive",
        "--mqtt-client",
        "--procs",
        "--pin-cpus",
    ]) {
        assert!(mqtt.contains(opt), "mqtt --help lacks {opt}");
    }
    let http = help(&["http", "--help"]);
    for opt in common.iter().chain(&["--path", "--h2", "--streams"]) {
        assert!(http.contains(opt), "http --help lacks {opt}");
    }
}
