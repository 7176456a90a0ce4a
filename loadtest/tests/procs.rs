//! `loadtest mqtt --procs 2` against a tiny MQTT 3.1.1 endpoint in the
//! test itself (it acknowledges every QoS 1 publish and counts them), so
//! no broker needs building: the merged report must count what both
//! children sent and had acknowledged, and its histograms must hold one
//! latency per acknowledged message.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::loadtest;

const LIMIT: Duration = Duration::from_secs(60);

/// What the endpoint saw.
#[derive(Default)]
struct Seen {
    client_ids: BTreeSet<String>,
    publishes: u64,
}

/// Listens on a free loopback port; returns its address. Connections are
/// served on their own threads until the test process ends.
fn endpoint(seen: Arc<Mutex<Seen>>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let seen = seen.clone();
            std::thread::spawn(move || {
                let _ = serve(stream, &seen);
            });
        }
    });
    addr
}

/// Reads one packet: its first byte and its body.
fn packet(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    let kind = b[0];
    let (mut len, mut shift) = (0usize, 0);
    loop {
        s.read_exact(&mut b)?;
        len |= usize::from(b[0] & 0x7f) << shift;
        if b[0] & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok((kind, body))
}

fn serve(mut s: TcpStream, seen: &Mutex<Seen>) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let (kind, body) = packet(&mut s)?;
    assert_eq!(kind >> 4, 1, "CONNECT first");
    // Variable header of 3.1.1: protocol name (2 + 4), level, flags, keep
    // alive (2); the payload starts with the client id.
    let id_len = usize::from(u16::from_be_bytes([body[10], body[11]]));
    let id = String::from_utf8_lossy(&body[12..12 + id_len]).into_owned();
    seen.lock().unwrap().client_ids.insert(id);
    s.write_all(&[0x20, 0x02, 0x00, 0x00])?;
    loop {
        let (kind, body) = packet(&mut s)?;
        match kind >> 4 {
            3 => {
                let qos = (kind >> 1) & 3;
                seen.lock().unwrap().publishes += 1;
                if qos == 1 {
                    let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
                    let id = &body[2 + topic_len..4 + topic_len];
                    s.write_all(&[0x40, 0x02, id[0], id[1]])?;
                }
            }
            12 => s.write_all(&[0xD0, 0x00])?,
            14 => return Ok(()),
            other => panic!("unexpected packet type {other}"),
        }
    }
}

#[test]
fn two_processes_report_as_one_run() {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let addr = endpoint(seen.clone());
    let r = loadtest(
        &[
            "mqtt",
            &addr,
            "--no-provision",
            "--topic",
            "bench/{device}",
            "--mqtt-version",
            "3.1.1",
            "-c",
            "4",
            "-n",
            "2000",
            "--rate",
            "4000",
            "--inflight",
            "10",
            "--procs",
            "2",
        ],
        LIMIT,
    );
    assert!(r.status.success(), "{}", r.show());
    let seen = seen.lock().unwrap();
    // Both children connected (connection c runs in child c mod 2), with
    // the one run's client ids.
    assert_eq!(seen.client_ids.len(), 4, "{:?}", seen.client_ids);
    let run = r.json["run"].as_str().unwrap();
    for c in 0..4 {
        let id = format!("loadtest-{run}-{c}");
        assert!(
            seen.client_ids.contains(&id),
            "{id} in {:?}",
            seen.client_ids
        );
    }
    assert_eq!(r.u("/connections/connected"), 4, "{}", r.show());
    // The report counts both children's messages, as the endpoint did.
    assert_eq!(seen.publishes, 2000, "{}", r.show());
    assert_eq!(r.u("/messages/planned"), 2000, "{}", r.show());
    assert_eq!(r.u("/messages/sent"), 2000, "{}", r.show());
    assert_eq!(r.u("/messages/acked"), 2000, "{}", r.show());
    assert_eq!(r.u("/errors/total"), 0, "{}", r.show());
    // One latency per acknowledged message, from the merged histograms;
    // every paced message has its send lag.
    assert_eq!(r.u("/latency/count"), 2000, "{}", r.show());
    assert_eq!(r.u("/server_latency/count"), 2000, "{}", r.show());
    assert_eq!(r.u("/send_lag/count"), 2000, "{}", r.show());
    assert!(
        r.json["mode"]
            .as_str()
            .unwrap()
            .contains("2 client processes"),
        "{}",
        r.show()
    );
    assert!(r.json["client_cpu"].is_object(), "{}", r.show());
}

#[test]
fn procs_beyond_the_connections_are_refused() {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let addr = endpoint(seen);
    let r = loadtest(
        &[
            "mqtt",
            &addr,
            "--no-provision",
            "-c",
            "2",
            "-n",
            "10",
            "--procs",
            "3",
        ],
        LIMIT,
    );
    assert_eq!(r.status.code(), Some(2), "{}", r.show());
    assert!(r.stderr.contains("--procs 3"), "{}", r.show());
}
