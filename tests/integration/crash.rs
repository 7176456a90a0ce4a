//! Crash safety: under MQTT QoS 1 and HTTP load the real binary is killed
//! with SIGKILL at a random moment, restarted on the same data dir, and
//! every message acknowledged before the kill must be stored exactly once.
//!
//! The default suite runs a few rounds; the full run is
//! `cargo test --test integration crash_many -- --ignored --nocapture`
//! (20 rounds each with `storage.sync = "none"`, `"interval"` and
//! `"always"`). A process crash loses nothing acknowledged in any mode; what
//! a machine crash loses differs (README "Durability") and is not tested
//! here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use crate::common::*;

/// xorshift64*: reproducible kill points without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Round {
    pub acked: usize,
    pub found: usize,
    pub lost: usize,
    pub duplicated: usize,
}

fn crash_round(seed: u64, sync: &str) -> Round {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start_in(dir.path(), &[("SLUICE_STORAGE__SYNC", sync)]);
    let t = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "crash", "scope": ["device.sendState", "device.getState"]}),
    )
    .1;
    let stop = Arc::new(AtomicBool::new(false));
    // Acknowledged message ids, per device.
    let acked: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();

    let mut workers = vec![];
    for w in 0..2 {
        let (stop, acked, url, t) = (
            stop.clone(),
            acked.clone(),
            s.http_url(&format!("/applications/app/devices/http{w}/state")),
            t.clone(),
        );
        let batch = 1 + rng.below(5) as usize;
        workers.push(std::thread::spawn(move || {
            let c = client();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let ids: Vec<String> = (0..batch).map(|k| format!("h{w}-{i}-{k}")).collect();
                let body = format!(
                    "[{}]",
                    ids.iter()
                        .map(|id| format!(r#"{{"data":{{"id":"{id}"}}}}"#))
                        .collect::<Vec<_>>()
                        .join(",")
                );
                match c.post(&url).bearer_auth(&t).body(body).send() {
                    Ok(r) if r.status().as_u16() == 200 => {
                        acked
                            .lock()
                            .unwrap()
                            .entry(format!("http{w}"))
                            .or_default()
                            .extend(ids);
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
                i += 1;
            }
        }));
    }
    {
        let (stop, acked, t) = (stop.clone(), acked.clone(), t.clone());
        let port: u16 = s.mqtt.rsplit(':').next().unwrap().parse().unwrap();
        workers.push(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut o = rumqttc::MqttOptions::new("crash", "127.0.0.1", port);
                o.set_credentials("u", &t);
                o.set_inflight(50);
                let (c, mut ev) = rumqttc::AsyncClient::new(o, 100);
                let publisher = tokio::spawn(async move {
                    for i in 0.. {
                        let body = format!(r#"{{"data":{{"id":"m-{i}"}}}}"#);
                        if c.publish(
                            "applications/app/devices/mqtt/state",
                            rumqttc::QoS::AtLeastOnce,
                            false,
                            body,
                        )
                        .await
                        .is_err()
                        {
                            break;
                        }
                    }
                });
                // PUBACKs arrive in publish order: the first n are acked.
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    match ev.poll().await {
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                            acked
                                .lock()
                                .unwrap()
                                .entry("mqtt".into())
                                .or_default()
                                .push(format!("m-{n}"));
                            n += 1;
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                publisher.abort();
            });
        }));
    }
    std::thread::sleep(Duration::from_millis(150 + rng.below(600)));
    unsafe_kill(s.child.as_ref().unwrap().id(), "KILL");
    let _ = s.wait_exit();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }

    let s2 = Server::start_in(dir.path(), &[]);
    let acked = acked.lock().unwrap().clone();
    let mut round = Round::default();
    for dev in ["http0", "http1", "mqtt"] {
        let mut count: HashMap<String, usize> = HashMap::new();
        for item in history_all(&s2, ADMIN, "app", dev) {
            *count
                .entry(item["data"]["id"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
        round.found += count.len();
        round.duplicated += count.values().filter(|c| **c > 1).count();
        for id in acked.get(dev).map(Vec::as_slice).unwrap_or_default() {
            round.acked += 1;
            if !count.contains_key(id) {
                round.lost += 1;
            }
        }
    }
    round
}

fn run_rounds(rounds: u64, sync: &str) -> Round {
    let mut total = Round::default();
    for seed in 1..=rounds {
        let r = crash_round(seed, sync);
        eprintln!("sync={sync} seed={seed}: {r:?}");
        assert_eq!(r.lost, 0, "seed {seed}: acknowledged messages lost: {r:?}");
        assert_eq!(r.duplicated, 0, "seed {seed}: messages stored twice: {r:?}");
        assert!(
            r.acked > 0,
            "seed {seed}: nothing was acknowledged before the kill"
        );
        total.acked += r.acked;
        total.found += r.found;
    }
    eprintln!(
        "sync={sync}: {rounds} kill -9 rounds, {} acked, {} found, 0 lost",
        total.acked, total.found
    );
    total
}

#[test]
fn crash_few() {
    run_rounds(2, "none");
    run_rounds(1, "interval");
    run_rounds(1, "always");
}

#[test]
#[ignore = "long: 60 kill -9 rounds; run with --ignored"]
fn crash_many() {
    run_rounds(20, "none");
    run_rounds(20, "interval");
    run_rounds(20, "always");
}
