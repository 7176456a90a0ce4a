//! MQTT sessions over time: takeover (only within one application, the
//! newest connection always wins), and the server's own backpressure (a
//! stalled writer) neither killing healthy clients nor changing what is
//! stored. The stall is real: the broker's writer thread is stopped with
//! ptrace, as a disk that stops answering would stop it.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::*;
use crate::mqtt_raw::*;

const SEC: Duration = Duration::from_secs(5);

fn token(s: &Server, app: &str) -> String {
    mint(
        s,
        ADMIN,
        app,
        json!({"name": "dev", "scope": ["device.sendState"]}),
    )
    .1
}

fn connect(s: &Server, v5: bool, client_id: &str, token: &str, keep_alive: u16) -> Raw {
    let c = Connect {
        keep_alive,
        ..match v5 {
            true => Connect::v5(client_id, token),
            false => Connect::v311(client_id, token),
        }
    };
    let (r, code) = Raw::connack_code(&s.mqtt, &c.bytes());
    assert_eq!(code, 0, "CONNECT refused");
    r
}

/// Asserts that `r` is closed as a taken-over session: DISCONNECT 0x8E
/// first for MQTT 5, a plain close for 3.1.1.
fn assert_taken_over(r: &mut Raw, v5: bool, what: &str) {
    let got = r.until_closed(SEC);
    let reasons: Vec<_> = got.iter().map(Packet::disconnect).collect();
    match v5 {
        true => assert_eq!(reasons, vec![Some(0x8E)], "{what}"),
        false => assert!(got.is_empty(), "{what}: {got:?}"),
    }
}

#[test]
fn takeover_never_crosses_applications() {
    let s = Server::start();
    let ta = token(&s, "app");
    let tb = token(&s, "other");
    for (v5a, v5b) in [(false, false), (true, true), (true, false)] {
        let mut a = connect(&s, v5a, "sensor-1", &ta, 30);
        let mut b = connect(&s, v5b, "sensor-1", &tb, 30);
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            a.alive(),
            "another application's client id kicked a session"
        );
        assert!(b.alive());
        // Within one application, the newer connection takes over.
        let mut a2 = connect(&s, v5b, "sensor-1", &ta, 30);
        assert_taken_over(&mut a, v5a, "same application");
        assert!(a2.alive());
        assert!(
            b.alive(),
            "a takeover in one application ended another's session"
        );
        drop((a2, b));
    }
}

#[test]
fn rapid_takeovers_always_leave_the_newest_alive() {
    let s = Server::start();
    let t = token(&s, "app");
    let mut last: Option<(bool, Raw)> = None;
    for round in 0..60 {
        let (v5a, v5b) = (round % 2 == 0, round % 3 == 0);
        // B connects the moment A's CONNACK is in: the race of the issue.
        let mut a = connect(&s, v5a, "dup", &t, 30);
        let mut b = connect(&s, v5b, "dup", &t, 30);
        assert_taken_over(&mut a, v5a, &format!("round {round}: the older one"));
        assert!(b.alive(), "round {round}: the newest connection was closed");
        if let Some((v5, mut prev)) = last.take() {
            assert_taken_over(
                &mut prev,
                v5,
                &format!("round {round}: the previous round's"),
            );
        }
        last = Some((v5b, b));
    }
    std::thread::sleep(Duration::from_millis(300));
    let (_, mut newest) = last.unwrap();
    assert!(newest.alive());
    assert!(
        metrics_text(&s).contains("sluice_mqtt_connections 1\n"),
        "more than the newest session is open"
    );
}

/// Stops the broker's writer thread, and only it, until dropped: a disk
/// that stops answering. ptrace needs permission to trace a child process
/// (root, or Yama `ptrace_scope` ≤ 1); `None` when that is refused.
struct WriterStall {
    resume: Option<mpsc::Sender<()>>,
    tracer: Option<JoinHandle<()>>,
}

impl WriterStall {
    fn start(s: &Server) -> Option<WriterStall> {
        let pid = s.child.as_ref().unwrap().id();
        let tid: libc::pid_t = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|e| e.ok())
            .find(|e| {
                std::fs::read_to_string(e.path().join("comm"))
                    .is_ok_and(|c| c.trim() == "sluice-writer")
            })
            .and_then(|e| e.file_name().to_str()?.parse().ok())
            .expect("the writer thread");
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let (resume_tx, resume_rx) = mpsc::channel::<()>();
        // Every ptrace call for a tracee must come from the one thread that
        // attached to it.
        let tracer = std::thread::spawn(move || {
            let null = std::ptr::null_mut::<libc::c_void>();
            // SAFETY: plain system calls on a thread id; no memory shared.
            unsafe {
                if libc::ptrace(libc::PTRACE_SEIZE, tid, null, null) != 0 {
                    let e = std::io::Error::last_os_error();
                    let _ = ready_tx.send(Err(format!("PTRACE_SEIZE: {e}")));
                    return;
                }
                libc::ptrace(libc::PTRACE_INTERRUPT, tid, null, null);
                let mut status = 0;
                libc::waitpid(tid, &mut status, libc::__WALL);
                if !libc::WIFSTOPPED(status) {
                    let _ = ready_tx.send(Err(format!("not stopped: {status:#x}")));
                    return;
                }
            }
            let _ = ready_tx.send(Ok(()));
            let _ = resume_rx.recv();
            // SAFETY: as above.
            unsafe {
                libc::ptrace(libc::PTRACE_DETACH, tid, null, null);
            }
        });
        match ready_rx.recv() {
            Ok(Ok(())) => Some(WriterStall {
                resume: Some(resume_tx),
                tracer: Some(tracer),
            }),
            Ok(Err(e)) => {
                eprintln!("SKIPPED: cannot stop the writer thread ({e})");
                let _ = tracer.join();
                None
            }
            Err(_) => None,
        }
    }
}

impl Drop for WriterStall {
    fn drop(&mut self) {
        drop(self.resume.take());
        if let Some(t) = self.tracer.take() {
            let _ = t.join();
        }
    }
}

/// Publishes `n` QoS 1 states with packet ids 1..=n to `device`.
fn publish_n(r: &mut Raw, v5: bool, device: &str, n: u16) {
    let topic = format!("applications/app/devices/{device}/state");
    for i in 1..=n {
        let body = format!(r#"{{"data":{{"i":{i}}}}}"#);
        r.send(&publish(v5, &topic, 1, i, false, &[], body.as_bytes()));
    }
}

#[test]
fn server_backpressure_does_not_count_against_keep_alive() {
    // Each client: MQTT 5 or not, how many QoS 1 publishes it sends into
    // the stall, and whether its PINGREQs can be answered during it (they
    // can unless a PUBLISH the session cannot take yet is ahead of them).
    type Client = (bool, u16, bool);
    let phases: [(&str, &str, &[Client]); 2] = [
        // A one-request write queue: sessions hold a publish waiting for space.
        (
            "SLUICE_BATCH__QUEUE_CAPACITY",
            "1",
            &[(true, 5, false), (false, 5, false), (true, 1, true)],
        ),
        // A two-publish PUBACK window: a conforming MQTT 5 client stops at
        // two and keeps pinging; a 3.1.1 client knows no window.
        (
            "SLUICE_MQTT__RECEIVE_MAXIMUM",
            "2",
            &[(true, 2, true), (false, 5, false)],
        ),
    ];
    for (key, value, spec) in phases {
        let s = Server::start_with(&[(key, value)]);
        let t = token(&s, "app");
        // Keep-alive 1 s: the server may close after 1.5 s of silence.
        let mut clients: Vec<Raw> = spec
            .iter()
            .enumerate()
            .map(|(i, (v5, _, _))| connect(&s, *v5, &format!("ka-{i}"), &t, 1))
            .collect();
        let Some(stall) = WriterStall::start(&s) else {
            return;
        };
        for (i, (r, (v5, n, _))) in clients.iter_mut().zip(spec).enumerate() {
            publish_n(r, *v5, &format!("dev-{i}"), *n);
        }
        // 4 s of stalled writer; the clients keep their side of keep-alive.
        let mut pongs = vec![0; spec.len()];
        for _ in 0..8 {
            std::thread::sleep(Duration::from_millis(500));
            for (i, (r, (_, _, answered))) in clients.iter_mut().zip(spec).enumerate() {
                r.send(&PINGREQ);
                if *answered {
                    let p = r.expect(Duration::from_secs(1));
                    assert_eq!(
                        p.first, 0xD0,
                        "{key}: client {i} got {p:?} during the stall"
                    );
                    pongs[i] += 1;
                }
            }
        }
        drop(stall);
        for (i, (r, (v5, n, _))) in clients.iter_mut().zip(spec).enumerate() {
            let mut acks = vec![];
            let deadline = Instant::now() + Duration::from_secs(10);
            while acks.len() < usize::from(*n) || pongs[i] < 8 {
                match r.next(deadline.saturating_duration_since(Instant::now())) {
                    Next::Packet(p) if p.first == 0xD0 => pongs[i] += 1,
                    Next::Packet(p) if p.puback().is_some() => acks.push(p.puback().unwrap()),
                    other => panic!(
                        "{key}: client {i} (v5 {v5}): {other:?} after {acks:?}, {} PINGRESP",
                        pongs[i]
                    ),
                }
            }
            assert_eq!(acks, (1..=*n).map(|i| (i, 0)).collect::<Vec<_>>());
            assert!(r.alive(), "{key}: client {i} ended");
            let stored = history_all(&s, ADMIN, "app", &format!("dev-{i}")).len();
            assert_eq!(stored, usize::from(*n));
        }
    }
}

#[test]
fn a_publish_waiting_for_queue_space_is_stored_however_its_session_ends() {
    let s = Server::start_with(&[("SLUICE_BATCH__QUEUE_CAPACITY", "1")]);
    let (p_id, parent) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "p", "scope": ["device.sendState", "token.create"]}),
    );
    let t = token(&s, "app");
    let child = mint(
        &s,
        &parent,
        "app",
        json!({"name": "c", "scope": ["device.sendState"]}),
    )
    .1;
    let stored = |device: &str| history_all(&s, ADMIN, "app", device).len();
    let wait_stored = |device: &str, n: usize| {
        let deadline = Instant::now() + SEC;
        while stored(device) < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        stored(device)
    };

    // Taken over while its second publish waits for space: the new session
    // does not undo what the old one accepted; both states are stored.
    let mut old = connect(&s, true, "dev", &t, 30);
    let Some(stall) = WriterStall::start(&s) else {
        return;
    };
    let topic = "applications/app/devices/kicked/state";
    for i in 0..2 {
        let body = format!(r#"{{"data":{{"i":{i}}}}}"#);
        old.send(&publish(true, topic, 0, 0, false, &[], body.as_bytes()));
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut new = connect(&s, true, "dev", &t, 30);
    assert_taken_over(&mut old, true, "the older session");
    drop(stall);
    assert_eq!(wait_stored("kicked", 2), 2);
    assert!(new.alive());

    // The client hangs up while its second publish waits: stored all the
    // same (its first is in the queue).
    let mut gone = connect(&s, false, "gone", &t, 30);
    let stall = WriterStall::start(&s).unwrap();
    let topic = "applications/app/devices/gone/state";
    for i in 0..2 {
        let body = format!(r#"{{"data":{{"i":{i}}}}}"#);
        gone.send(&publish(false, topic, 0, 0, false, &[], body.as_bytes()));
    }
    std::thread::sleep(Duration::from_millis(300));
    drop(gone);
    std::thread::sleep(Duration::from_millis(300));
    drop(stall);
    assert_eq!(wait_stored("gone", 2), 2);

    // Revoked while its publish waits: nothing of it is stored.
    let mut r = connect(&s, true, "rev", &child, 30);
    let stall = WriterStall::start(&s).unwrap();
    let topic = "applications/app/devices/revoked/state";
    for i in 0..2 {
        let body = format!(r#"{{"data":{{"i":{i}}}}}"#);
        r.send(&publish(true, topic, 0, 0, false, &[], body.as_bytes()));
    }
    std::thread::sleep(Duration::from_millis(300));
    let (st, _) = patch_token(&s, ADMIN, "app", &p_id, json!({"status": "inactive"}));
    assert_eq!(st, 200);
    assert_eq!(
        r.until_closed(SEC)
            .iter()
            .map(Packet::disconnect)
            .collect::<Vec<_>>(),
        vec![Some(0x87)]
    );
    drop(stall);
    // The first was queued before the revocation; the second waited and
    // is refused at enqueue.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(stored("revoked"), 1);
}
