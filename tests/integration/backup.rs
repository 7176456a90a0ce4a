//! Backup and restore: `sluice backup` under HTTP and MQTT QoS 1 load, then
//! `sluice restore` into a new data directory, and the restored broker
//! holds every state acknowledged before the backup call started, and the
//! tokens.

use std::collections::HashSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;

/// One acknowledged state: which device, its unique `n`, when the ack came.
type Acks = Arc<Mutex<Vec<(String, u64, Instant)>>>;

const HTTP_DEVICES: usize = 3;
const MQTT_DEVICES: usize = 2;
/// Bounds each load loop even if the stop flag never came.
const MAX_PER_DEVICE: u64 = 200_000;

type Load = std::thread::JoinHandle<()>;

fn http_load(s: &Server, token: String, device: String, stop: Arc<AtomicBool>, acks: Acks) -> Load {
    let url = s.http_url(&format!("/applications/farm/devices/{device}/state"));
    std::thread::spawn(move || {
        let c = client();
        for n in 0..MAX_PER_DEVICE {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let r = c
                .post(&url)
                .bearer_auth(&token)
                .header("content-type", "application/json")
                .body(format!(r#"{{"data":{{"n":{n}}}}}"#))
                .send()
                .unwrap();
            assert_eq!(r.status().as_u16(), 200);
            acks.lock()
                .unwrap()
                .push((device.clone(), n, Instant::now()));
        }
    })
}

/// Publishes QoS 1 one at a time, so each PUBACK belongs to the last
/// publish.
fn mqtt_load(s: &Server, token: String, device: String, stop: Arc<AtomicBool>, acks: Acks) -> Load {
    let port: u16 = s.mqtt.rsplit(':').next().unwrap().parse().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut o = rumqttc::MqttOptions::new(format!("backup-{device}"), "127.0.0.1", port);
            o.set_credentials("device", token);
            let (cl, mut ev) = rumqttc::AsyncClient::new(o, 10);
            let topic = format!("applications/farm/devices/{device}/state");
            for n in 0..MAX_PER_DEVICE {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                cl.publish(
                    &topic,
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    format!(r#"{{"data":{{"n":{n}}}}}"#),
                )
                .await
                .unwrap();
                while !matches!(
                    ev.poll().await.unwrap(),
                    rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))
                ) {}
                acks.lock()
                    .unwrap()
                    .push((device.clone(), n, Instant::now()));
            }
            let _ = cl.disconnect().await;
        });
    })
}

fn ns(s: &Server, device: &str) -> HashSet<u64> {
    history_all(s, ADMIN, "farm", device)
        .iter()
        .map(|i| i["data"]["n"].as_u64().unwrap())
        .collect()
}

fn wait_acks(acks: &Acks, at_least: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while acks.lock().unwrap().len() < at_least {
        assert!(Instant::now() < deadline, "load produced no acks");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn backup_under_load_restores_everything_acknowledged_before_it() {
    let mut s = Server::start();
    let stop = Arc::new(AtomicBool::new(false));
    let acks: Acks = Arc::default();
    let mut tokens = Vec::new();
    let mut devices = Vec::new();
    let mut loads = Vec::new();
    for i in 0..HTTP_DEVICES + MQTT_DEVICES {
        let device = match i < HTTP_DEVICES {
            true => format!("h{i}"),
            false => format!("m{i}"),
        };
        let (_, t) = mint(
            &s,
            ADMIN,
            "farm",
            json!({"name": device, "scope": ["device.sendState"], "devices": [device]}),
        );
        loads.push(match i < HTTP_DEVICES {
            true => http_load(&s, t.clone(), device.clone(), stop.clone(), acks.clone()),
            false => mqtt_load(&s, t.clone(), device.clone(), stop.clone(), acks.clone()),
        });
        tokens.push(t);
        devices.push(device);
    }
    wait_acks(&acks, 500);

    // The backup, through the CLI as an operator runs it.
    let backup = tempfile::tempdir().unwrap();
    let to = backup.path().join("nightly");
    let started = Instant::now();
    let out = Command::new(bin())
        .args(["backup", "--to", to.to_str().unwrap()])
        .args(["--admin", &s.admin_url("")])
        .env("SLUICE_ADMIN_TOKEN", ADMIN)
        .output()
        .unwrap();
    let finished = Instant::now();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["path"], to.to_str().unwrap());
    assert!(summary["files"].as_u64().unwrap() > 0, "{summary}");
    // Ingest goes on after the backup too; then the load stops.
    let during = acks.lock().unwrap().len();
    wait_acks(&acks, during + 200);
    stop.store(true, Ordering::Relaxed);
    for l in loads {
        l.join().unwrap();
    }
    assert_eq!(s.stop(), Some(0));

    let acks = acks.lock().unwrap().clone();
    let before: Vec<_> = acks.iter().filter(|(_, _, at)| *at < started).collect();
    let while_running = acks
        .iter()
        .filter(|(_, _, at)| *at >= started && *at <= finished)
        .count();
    eprintln!(
        "backup took {:?}: {} acks before it started, {} while it ran, {} after",
        finished - started,
        before.len(),
        while_running,
        acks.len() - before.len() - while_running
    );

    // Restore into a new data directory and serve from it.
    let restored = tempfile::tempdir().unwrap();
    let data = restored.path().join("data");
    let out = Command::new(bin())
        .args(["restore", "--from", to.to_str().unwrap(), "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["tokens"], tokens.len(), "{report}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("SLUICE_ADMIN_TOKEN"));

    let r = Server::start_in(&data, &[]);
    for device in &devices {
        let stored = ns(&r, device);
        let sent: HashSet<u64> = acks
            .iter()
            .filter(|(d, _, _)| d == device)
            .map(|(_, n, _)| *n)
            .collect();
        let missing: Vec<u64> = before
            .iter()
            .filter(|(d, n, _)| d == device && !stored.contains(n))
            .map(|(_, n, _)| *n)
            .collect();
        assert!(
            missing.is_empty(),
            "{device}: acknowledged before the backup but not restored: {missing:?}"
        );
        // Whatever else the backup holds was acknowledged later.
        assert!(stored.is_subset(&sent), "{device}");
    }
    // The tokens came along: the devices' own tokens work on the restored
    // broker, over both protocols.
    assert_eq!(
        post_state(&r, &tokens[0], "farm", "h0", r#"{"data":{"n":999999999}}"#).0,
        200
    );
    let port = r.mqtt.rsplit(':').next().unwrap();
    let m = &devices[HTTP_DEVICES];
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", port, "-q", "1"])
        .args(["-u", "device", "-P", &tokens[HTTP_DEVICES]])
        .args(["-t", &format!("applications/farm/devices/{m}/state")])
        .args(["-m", r#"{"data":{"n":888888888}}"#])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(ns(&r, m).contains(&888888888));

    // Restore never overwrites: the data directory is in use now.
    let out = Command::new(bin())
        .args(["restore", "--from", to.to_str().unwrap(), "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not an empty directory"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn backup_api_refusals() {
    let s = Server::start();
    let (_, app) = mint(
        &s,
        ADMIN,
        "farm",
        json!({"name": "all", "scope": ["all.Application"]}),
    );
    let dir = tempfile::tempdir().unwrap();
    let post = |token: &str, body: Value| {
        json_of(
            client()
                .post(s.admin_url("/backup"))
                .bearer_auth(token)
                .json(&body)
                .send()
                .unwrap(),
        )
    };
    let target = dir.path().join("b");
    let to = json!({"to": target});
    // Only the root token: a backup holds every application's data.
    assert_eq!(post(&app, to.clone()).0, 403);
    assert_eq!(post("sl_nonsense", to.clone()).0, 401);
    let (st, v) = post(ADMIN, json!({"to": "relative/dir"}));
    assert_eq!((st, v["error"].as_str()), (400, Some("bad_request")));
    let (st, v) = post(ADMIN, json!({"to": s.dir.join("db/inside")}));
    assert_eq!((st, v["error"].as_str()), (400, Some("bad_request")), "{v}");
    assert!(!s.dir.join("db/inside").exists());
    let (st, v) = post(ADMIN, json!({"to": target, "extra": 1}));
    assert_eq!((st, v["error"].as_str()), (400, Some("bad_request")));
    let (st, v) = post(ADMIN, to.clone());
    assert_eq!(st, 200, "{v}");
    assert!(target.join("backup.json").is_file());
    let (st, v) = post(ADMIN, to);
    assert_eq!((st, v["error"].as_str()), (409, Some("target_not_empty")));
    // An empty existing directory is fine (e.g. a freshly mounted volume).
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert_eq!(post(ADMIN, json!({"to": empty})).0, 200);
}
