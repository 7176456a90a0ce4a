//! The writer cannot fail silently (issue 8, item 8): the broker's RocksDB
//! lives on a small tmpfs that the test fills. While writes fail, every
//! request is answered with an error (HTTP 503 `unavailable`, MQTT 5 PUBACK
//! 0x80), `/readyz` says so on both listeners (while `/healthz`, liveness,
//! stays 200: restarting would not free the disk), and nothing unstored is
//! acknowledged. Once space is freed, ingest recovers by itself (RocksDB
//! resumes once it has a write buffer's worth of space, `storage.write_buffer_bytes`, and the
//! writer's probe notices), and everything acknowledged survives a restart.
//!
//! Needs root (to mount a tmpfs); elsewhere it is skipped with the reason.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5 as p5;
use serde_json::{json, Value};

use crate::common::*;

/// A mounted tmpfs, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes 1 MiB chunks into `path` until the filesystem is full.
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0x5a; 1 << 20];
    while f.write_all(&chunk).is_ok() {}
    // The last partial chunk may have found a few pages; small writes take
    // whatever is left.
    while f.write_all(&chunk[..4096]).is_ok() {}
    let _ = f.sync_all();
}

fn health(url: &str) -> (u16, Value) {
    json_of(client().get(url).send().unwrap())
}

fn port(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// One MQTT 5 QoS 1 publish on a fresh connection; the PUBACK's reason.
fn mqtt5_publish(s: &Server, token: &str, payload: &str) -> p5::PubAckReason {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut o = rumqttc::v5::MqttOptions::new("disk", "127.0.0.1", port(&s.mqtt));
        o.set_credentials("u", token);
        let (c, mut ev) = rumqttc::v5::AsyncClient::new(o, 10);
        c.publish(
            "applications/app/devices/d/state",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            payload.to_string(),
        )
        .await
        .unwrap();
        let reason = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                if let rumqttc::v5::Event::Incoming(p5::Packet::PubAck(a)) =
                    ev.poll().await.unwrap()
                {
                    return a.reason;
                }
            }
        })
        .await
        .expect("a PUBACK");
        let _ = c.disconnect().await;
        reason
    })
}

fn stored_ids(s: &Server) -> Vec<String> {
    history_all(s, ADMIN, "app", "d")
        .iter()
        .map(|i| i["data"]["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_full_disk_is_answered_with_errors_and_ingest_recovers_by_itself() {
    let tmp = tempfile::tempdir().unwrap();
    // RocksDB lives in <data-dir>/db: only it goes on the small filesystem,
    // the token file and the server's log stay outside.
    let db = tmp.path().join("db");
    let _fs = match Tmpfs::mount(&db, "100m") {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("SKIPPED a_full_disk_is_answered_with_errors…: cannot mount a tmpfs ({why}); run as root");
            return;
        }
    };
    let mut s = Server::start_in(tmp.path(), &[]);
    let t = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "dev", "scope": ["device.sendState", "device.getState"]}),
    )
    .1;
    let mut acked = BTreeSet::new();
    let mut sent = BTreeSet::new();
    let post = |id: String, acked: &mut BTreeSet<String>, sent: &mut BTreeSet<String>| {
        let body = format!(
            r#"{{"data":{{"id":"{id}","pad":"{}"}}}}"#,
            "p".repeat(16 * 1024)
        );
        let (st, v) = post_state(&s, &t, "app", "d", &body);
        sent.insert(id.clone());
        match st {
            200 => {
                acked.insert(id);
            }
            503 => {}
            other => panic!("unexpected {other}: {v}"),
        }
        (st, v)
    };
    assert_eq!(post("before".into(), &mut acked, &mut sent).0, 200);
    assert_eq!(health(&s.http_url("/readyz")).0, 200);

    fill(&db.join("filler"));
    // Space RocksDB had reserved ahead (a preallocated WAL) may still take
    // a few writes; then every request fails, and none is acknowledged.
    let mut refused = None;
    for i in 0..2000 {
        let (st, v) = post(format!("full-{i}"), &mut acked, &mut sent);
        if st == 503 {
            refused = Some(v);
            break;
        }
    }
    let refused = refused.expect("writes kept succeeding on a full disk");
    assert_eq!(refused["error"], "unavailable", "{refused}");
    assert!(refused["detail"].as_str().is_some(), "{refused}");
    for i in 0..5 {
        assert_eq!(post(format!("down-{i}"), &mut acked, &mut sent).0, 503);
    }
    assert_eq!(
        mqtt5_publish(&s, &t, r#"{"data":{"id":"mqtt-down"}}"#),
        p5::PubAckReason::UnspecifiedError
    );
    sent.insert("mqtt-down".into());

    let storage_check = |v: &Value| {
        v["checks"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == "storage"))
            .cloned()
            .unwrap_or_else(|| panic!("no storage check: {v}"))
    };
    let (st, v) = health(&s.http_url("/readyz"));
    assert_eq!(st, 503, "{v}");
    assert_eq!(v["status"], "unready");
    let check = storage_check(&v);
    assert_eq!(check["ok"], false, "{v}");
    assert!(check["reason"].as_str().unwrap().contains("storage"), "{v}");
    assert!(
        check.get("detail").is_none(),
        "no machine details on the device port: {v}"
    );
    let (st, v) = health(&s.admin_url("/readyz"));
    assert_eq!(st, 503, "{v}");
    assert!(
        storage_check(&v)["detail"]
            .as_str()
            .unwrap()
            .contains("No space left"),
        "{v}"
    );
    // Liveness is not readiness: the process is fine, the disk is not.
    assert_eq!(health(&s.http_url("/healthz")).0, 200);
    assert_eq!(health(&s.admin_url("/healthz")).0, 200);
    let metrics = metrics_text(&s);
    assert!(
        !metrics.contains("sluice_commit_errors_total 0"),
        "{metrics}"
    );

    // Free the space: readiness recovers without any request (the writer
    // probes), then ingest works again on both listeners.
    std::fs::remove_file(db.join("filler")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while health(&s.admin_url("/readyz")).0 != 200 {
        assert!(
            Instant::now() < deadline,
            "not ready again 60 s after space was freed: {}",
            s.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(health(&s.http_url("/readyz")).0, 200);
    assert_eq!(post("after".into(), &mut acked, &mut sent).0, 200);
    assert_eq!(
        mqtt5_publish(&s, &t, r#"{"data":{"id":"mqtt-after"}}"#),
        p5::PubAckReason::Success
    );
    acked.insert("mqtt-after".into());
    sent.insert("mqtt-after".into());

    // Everything acknowledged is stored exactly once; nothing refused is.
    let check = |s: &Server| {
        let ids = stored_ids(s);
        let unique: BTreeSet<String> = ids.iter().cloned().collect();
        assert_eq!(unique.len(), ids.len(), "duplicates: {ids:?}");
        let missing: Vec<_> = acked.difference(&unique).collect();
        assert!(
            missing.is_empty(),
            "acknowledged but not stored: {missing:?}"
        );
        let unacked: Vec<_> = unique.difference(&acked).collect();
        assert!(unacked.is_empty(), "refused but stored: {unacked:?}");
        assert!(unique.is_subset(&sent));
    };
    check(&s);
    assert_eq!(s.stop(), Some(0));
    let s = Server::start_in(tmp.path(), &[]);
    check(&s);
}
