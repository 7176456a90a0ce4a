//! Cluster-mode ingest under failures, driven by the real `loadtest
//! --verify` against real brokers on a real 3-node NATS cluster: the load
//! is spread over three brokers (one token plane: tokens minted on a
//! fourth work on all) while (a) the ingest stream's leader node is killed
//! with SIGKILL, (b) one of the loaded brokers is killed with SIGKILL and
//! restarted, (c) all of NATS is stopped and started again. In every round
//! nothing acknowledged is lost or stored twice (`loadtest --verify`, read
//! back with `minSeq` through the fourth broker, which accepted none of
//! the writes), and afterwards every broker's read model holds the same
//! content (a digest of each device's history).
//!
//! The default suite runs one round of each (about a minute); the long
//! run (5 rounds of each, about 5 minutes on 2 cores) is
//! `SLUICE_NEED_NATS=1 source .ci/prepare && cargo build -p loadtest &&
//! cargo test --test integration cluster_chaos_many -- --ignored --nocapture`.
//! `loadtest` must be built beside `sluice` (`cargo test --workspace` or
//! `cargo build -p loadtest` does it).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::cluster_ingest::{cluster_env, start_broker};
use crate::common::*;
use crate::nats::{leader_of, NatsCluster};

/// The `loadtest` binary next to `sluice`.
fn loadtest_bin() -> PathBuf {
    let bin = std::path::Path::new(bin()).with_file_name("loadtest");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p loadtest` (`cargo test --workspace` does)",
        bin.display()
    );
    bin
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chaos {
    /// SIGKILL the stream leader's NATS node, start it again.
    LeaderKill,
    /// SIGKILL the broker taking the load, start it again.
    BrokerKill,
    /// Stop every NATS node, start them again.
    NatsRestart,
}

/// Brokers on one NATS cluster: the first [`LOADED`] take the load, the
/// last one mints the tokens and verifies (it accepts no state itself).
struct Rig {
    nats: NatsCluster,
    prefix: String,
    dirs: Vec<tempfile::TempDir>,
    brokers: Vec<Server>,
}

impl Rig {
    fn start(prefix: &str, brokers: usize) -> Rig {
        let nats = NatsCluster::start(3);
        let dirs: Vec<_> = (0..brokers).map(|_| tempfile::tempdir().unwrap()).collect();
        let env = cluster_env(&nats, prefix);
        let brokers = dirs.iter().map(|d| start_broker(d.path(), &env)).collect();
        Rig {
            nats,
            prefix: prefix.into(),
            dirs,
            brokers,
        }
    }

    fn restart_broker(&mut self, i: usize) {
        let env = cluster_env(&self.nats, &self.prefix);
        self.brokers[i] = start_broker(self.dirs[i].path(), &env);
    }
}

/// Brokers taking the load; one more mints and verifies.
const LOADED: usize = 3;

/// Runs loadtest spread over the loaded brokers for `secs` seconds in a
/// thread, MQTT 5 QoS 1 in odd rounds and HTTP in even ones; the summary
/// JSON comes back from the join handle.
fn spawn_load(rig: &Rig, round: u32, secs: u64) -> std::thread::JoinHandle<Value> {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("summary.json");
    let loaded = &rig.brokers[..LOADED];
    let verifier = &rig.brokers[LOADED];
    let mut cmd = Command::new(loadtest_bin());
    if round % 2 == 1 {
        let addrs: Vec<&str> = loaded.iter().map(|s| s.mqtt.as_str()).collect();
        cmd.args(["mqtt", &addrs.join(","), "--inflight", "50"]);
    } else {
        let urls: Vec<String> = loaded.iter().map(|s| s.http_url("")).collect();
        cmd.args(["http", &urls.join(",")]);
    }
    cmd.args(["--admin", &verifier.admin_url("")])
        .args(["--verify-via", &verifier.admin_url("")])
        .args(["--verify", "--verify-timeout", "120s"])
        .args(["-c", "16", "-r", "2000", "-d", &format!("{secs}s")])
        .args(["-s", "150", "--timeout", "20s"])
        .args(["--device-prefix", &format!("r{round}-")])
        .args([
            "--app",
            "chaos",
            "--max-errors",
            "100000000",
            "--no-progress",
        ])
        .arg("--json")
        .arg(&json)
        .env("SLUICE_ADMIN_TOKEN", ADMIN);
    std::thread::spawn(move || {
        let out = cmd.output().expect("run loadtest");
        let text = std::fs::read_to_string(&json).unwrap_or_else(|_| {
            panic!(
                "loadtest wrote no summary:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        let _keep = dir;
        let v: Value = serde_json::from_str(&text).unwrap();
        eprintln!("{}", String::from_utf8_lossy(&out.stdout));
        v
    })
}

/// A digest of every device's history of round `round` on broker `s`,
/// read once its read model holds the stream's newest state.
fn digest(s: &Server, round: u32, devices: usize, stream_last: u64) -> String {
    let mut all = String::new();
    for d in 0..devices {
        let device = format!("r{round}-{d}");
        let mut cursor: Option<String> = None;
        loop {
            let mut path = format!(
                "/applications/chaos/devices/{device}/state?order=asc&limit=10000&minSeq={stream_last}"
            );
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            // A broker answers 503 while its token view is stale (the
            // test's stale_after is 1 s, shorter than some elections).
            let deadline = Instant::now() + Duration::from_secs(60);
            let page = loop {
                let (st, page) = get_admin(s, ADMIN, &path);
                if st == 200 {
                    break page;
                }
                assert!(st == 503 && Instant::now() < deadline, "{st} {page}");
                std::thread::sleep(Duration::from_millis(200));
            };
            for item in page["items"].as_array().unwrap() {
                all.push_str(&format!("{device} {} {}\n", item["time"], item["data"]));
            }
            match page["next"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => break,
            }
        }
    }
    all
}

/// The stream's newest state as a broker reads it, asked again while NATS
/// does not answer it yet.
fn stream_last(s: &Server) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (st, v) = get_admin(s, ADMIN, "/cluster/ingest");
        if st == 200 {
            return v["streamLast"].as_u64().unwrap();
        }
        assert!(st == 503 && Instant::now() < deadline, "{st} {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn chaos_round(rig: &mut Rig, round: u32, chaos: Chaos) {
    let load = spawn_load(rig, round, 8);
    std::thread::sleep(Duration::from_millis(2500 + u64::from(round % 4) * 300));
    match chaos {
        Chaos::LeaderKill => {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let stream = format!("{}_STATE", rig.prefix.to_uppercase());
            let leader = rt.block_on(async {
                let nats = crate::nats::connect(rig.nats.urls(), &rig.prefix, "chaos").await;
                leader_of(&nats, &stream).await
            });
            let i = rig.nats.index_of(&leader);
            rig.nats.kill(i);
            std::thread::sleep(Duration::from_secs(2));
            rig.nats.restart(i);
        }
        Chaos::BrokerKill => {
            unsafe_kill(rig.brokers[0].child.as_ref().unwrap().id(), "KILL");
            let _ = rig.brokers[0].wait_exit();
            std::thread::sleep(Duration::from_millis(500));
            rig.restart_broker(0);
        }
        Chaos::NatsRestart => {
            rig.nats.stop_all();
            std::thread::sleep(Duration::from_secs(2));
            rig.nats.start_all();
        }
    }
    let summary = load.join().unwrap();
    let v = &summary["verify"];
    assert!(
        v.is_object(),
        "{chaos:?} round {round}: no verification: {}",
        summary["verify_error"]
    );
    eprintln!(
        "{chaos:?} round {round}: messages {} verify {v}",
        summary["messages"]
    );
    assert!(v["acked"].as_u64().unwrap() > 0, "{chaos:?}: nothing acked");
    assert_eq!(
        v["missing"], 0,
        "{chaos:?} round {round}: acknowledged states lost: {v}"
    );
    assert_eq!(
        v["duplicates"], 0,
        "{chaos:?} round {round}: stored twice: {v}"
    );
    assert_eq!(v["mismatched"], 0, "{chaos:?} round {round}: altered: {v}");
    // Nothing refused is stored later: where every message not
    // acknowledged was refused (PUBACK 0x80, HTTP 503) rather than lost
    // with its connection or left unconfirmed (HTTP 504, MQTT a closed
    // connection), none of them may be in the read model.
    let kinds = summary["errors"]["by_kind"].as_object().unwrap();
    if kinds.keys().all(|k| k == "puback_0x80" || k == "http_503") {
        assert_eq!(
            v["unacked_stored"], 0,
            "{chaos:?} round {round}: refused states were stored: {v} {kinds:?}"
        );
    }

    // Every broker's read model holds the same content.
    let last = stream_last(&rig.brokers[LOADED]);
    let digests: Vec<String> = rig
        .brokers
        .iter()
        .map(|s| digest(s, round, 16, last))
        .collect();
    assert!(!digests[0].is_empty());
    for (i, d) in digests.iter().enumerate().skip(1) {
        assert!(
            d == &digests[0],
            "{chaos:?} round {round}: broker {i}'s read model differs from broker 0's"
        );
    }
}

fn run_chaos(rounds: u32) {
    let started = Instant::now();
    let mut rig = Rig::start("chaos", LOADED + 1);
    let mut round = 0;
    for chaos in [Chaos::LeaderKill, Chaos::BrokerKill, Chaos::NatsRestart] {
        for _ in 0..rounds {
            round += 1;
            chaos_round(&mut rig, round, chaos);
        }
    }
    eprintln!(
        "{} chaos rounds in {:.0} s",
        round,
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn cluster_chaos_few() {
    run_chaos(1);
}

#[test]
#[ignore = "long: 15 chaos rounds; run with --ignored"]
fn cluster_chaos_many() {
    run_chaos(5);
}
