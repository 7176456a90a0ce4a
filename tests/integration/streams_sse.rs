//! Live streams over Server-Sent Events (`GET /applications/{app}/stream`)
//! with a real HTTP client reading the event stream as it arrives: replay
//! then live, resumption by `Last-Event-ID` (across a broker restart too),
//! a consumer stalled while ingest runs, revocation, limits, and the read
//! routes on the device listener.

use std::io::{BufRead, BufReader};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;

/// One event as an SSE client sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

impl Event {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("{e}: {}", self.data))
    }
}

/// What the reader thread saw.
#[derive(Debug)]
pub enum Seen {
    Event(Event),
    Comment(String),
    /// The server ended the stream.
    End,
}

/// An open SSE stream read on its own thread. Dropping the receiver (or
/// the whole struct) does not close the socket until the thread's next
/// read; `close` shuts it at once.
pub struct Stream {
    pub rx: mpsc::Receiver<Seen>,
    socket: Option<std::net::TcpStream>,
    /// While set, the reader thread has not started reading the socket.
    gate: Option<mpsc::Sender<()>>,
}

impl Stream {
    /// Opens `path` on `addr` (plain HTTP/1.1 over a raw socket, so the
    /// test controls when it reads and when it hangs up). Returns the
    /// status and, on 200, the stream; otherwise the body.
    pub fn open(
        addr: &str,
        path: &str,
        token: &str,
        last_event_id: Option<&str>,
    ) -> Result<Stream, (u16, String)> {
        let mut st = Self::open_paused(addr, path, token, last_event_id)?;
        st.resume();
        Ok(st)
    }

    /// Starts reading the body (of a stream opened paused).
    pub fn resume(&mut self) {
        if let Some(g) = self.gate.take() {
            let _ = g.send(());
        }
    }

    /// As `open`, but nothing of the body is read until `resume`: a
    /// consumer that stalls (the socket's buffers fill, then the server's).
    pub fn open_paused(
        addr: &str,
        path: &str,
        token: &str,
        last_event_id: Option<&str>,
    ) -> Result<Stream, (u16, String)> {
        use std::io::{Read, Write};
        let mut socket = std::net::TcpStream::connect(addr).unwrap();
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\naccept: text/event-stream\r\n"
        );
        if let Some(id) = last_event_id {
            req.push_str(&format!("last-event-id: {id}\r\n"));
        }
        req.push_str("\r\n");
        socket.write_all(req.as_bytes()).unwrap();
        let mut reader = BufReader::new(socket.try_clone().unwrap());
        let mut status_line = String::new();
        reader.read_line(&mut status_line).unwrap();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let mut chunked = false;
        let mut length = None;
        let mut content_type = String::new();
        loop {
            let mut h = String::new();
            reader.read_line(&mut h).unwrap();
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap();
            let (k, v) = (k.to_ascii_lowercase(), v.trim().to_string());
            match k.as_str() {
                "transfer-encoding" => chunked = v.contains("chunked"),
                "content-length" => length = v.parse::<usize>().ok(),
                "content-type" => content_type = v,
                _ => {}
            }
        }
        if status != 200 {
            let mut body = vec![0u8; length.unwrap_or(0)];
            reader.read_exact(&mut body).unwrap();
            return Err((status, String::from_utf8_lossy(&body).into_owned()));
        }
        assert_eq!(content_type, "text/event-stream");
        assert!(chunked, "an event stream is chunked");
        let (tx, rx) = mpsc::channel();
        let (gate, gate_rx) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            let _ = gate_rx.recv();
            let mut body = BufReader::new(Dechunk {
                inner: reader,
                left: 0,
                done: false,
            });
            let mut ev = Event {
                id: None,
                event: None,
                data: String::new(),
            };
            let mut has_data = false;
            loop {
                let mut line = String::new();
                match body.read_line(&mut line) {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(Seen::End);
                        return;
                    }
                    Ok(_) => {}
                }
                let line = line.trim_end_matches('\n');
                if line.is_empty() {
                    if has_data {
                        let _ = tx.send(Seen::Event(ev.clone()));
                    }
                    ev = Event {
                        id: None,
                        event: None,
                        data: String::new(),
                    };
                    has_data = false;
                } else if let Some(c) = line.strip_prefix(':') {
                    let _ = tx.send(Seen::Comment(c.trim().to_string()));
                } else if let Some(v) = line.strip_prefix("id: ") {
                    ev.id = Some(v.to_string());
                } else if let Some(v) = line.strip_prefix("event: ") {
                    ev.event = Some(v.to_string());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    assert!(!has_data, "one data line per event");
                    ev.data = v.to_string();
                    has_data = true;
                } else {
                    panic!("unexpected line {line:?}");
                }
            }
        });
        Ok(Stream {
            rx,
            socket: Some(socket),
            gate: Some(gate),
        })
    }

    /// The next `n` events (comments skipped), failing after `wait`.
    pub fn events(&self, n: usize, wait: Duration) -> Vec<Event> {
        let deadline = Instant::now() + wait;
        let mut out = Vec::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(Seen::Event(e)) => out.push(e),
                Ok(Seen::Comment(_)) => {}
                Ok(Seen::End) => panic!("stream ended after {} of {n} events", out.len()),
                Err(_) => panic!("only {} of {n} events in {wait:?}", out.len()),
            }
        }
        out
    }

    /// Nothing more arrives within `wait` (comments aside).
    pub fn quiet(&self, wait: Duration) {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(Seen::Comment(_)) => {}
                Ok(other) => panic!("expected nothing, got {other:?}"),
                Err(_) => return,
            }
        }
    }

    /// Hangs up (as a consumer killed mid-stream).
    pub fn close(&mut self) {
        if let Some(s) = self.socket.take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.close();
    }
}

/// Reads the data of a chunked body.
struct Dechunk<R> {
    inner: BufReader<R>,
    left: usize,
    done: bool,
}

impl<R: std::io::Read> std::io::Read for Dechunk<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        if self.left == 0 {
            let mut size = String::new();
            if self.inner.read_line(&mut size)? == 0 {
                return Ok(0);
            }
            self.left = usize::from_str_radix(size.trim(), 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size {size:?}")))?;
            if self.left == 0 {
                self.done = true;
                return Ok(0);
            }
        }
        let room = self.left.min(buf.len());
        let n = self.inner.read(&mut buf[..room])?;
        if n == 0 {
            return Ok(0);
        }
        self.left -= n;
        if self.left == 0 {
            // The CRLF after the chunk's data.
            let mut crlf = String::new();
            self.inner.read_line(&mut crlf)?;
        }
        Ok(n)
    }
}

const WAIT: Duration = Duration::from_secs(20);

fn stream_path(app: &str, query: &str) -> String {
    format!("/applications/{app}/stream{query}")
}

/// A token of `app` that may send and read every device.
fn backend(s: &Server, app: &str) -> String {
    mint(
        s,
        ADMIN,
        app,
        json!({"name": "backend", "scope": ["device.sendState", "device.getState"]}),
    )
    .1
}

/// Posts `n` states to `device` as one array, with data `{"n": first..}`.
fn post_n(s: &Server, token: &str, app: &str, device: &str, first: usize, n: usize) {
    post_padded(s, token, app, device, first, n, 0);
}

/// As `post_n`, each state's data padded with `pad` bytes.
fn post_padded(
    s: &Server,
    token: &str,
    app: &str,
    device: &str,
    first: usize,
    n: usize,
    pad: usize,
) {
    let body: Vec<Value> = (first..first + n)
        .map(|i| match pad {
            0 => json!({"data": {"n": i}}),
            _ => json!({"data": {"n": i, "pad": "x".repeat(pad)}}),
        })
        .collect();
    let (st, v) = post_state(s, token, app, device, &Value::Array(body).to_string());
    assert_eq!(st, 200, "{v}");
}

fn ns(events: &[Event]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e.json()["data"]["n"].as_u64().unwrap())
        .collect()
}

fn ids(events: &[Event]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e.id.as_deref().unwrap().parse().unwrap())
        .collect()
}

#[test]
fn replays_then_follows_live_in_commit_order() {
    let s = Server::start();
    let tok = backend(&s, "farm");
    let other = backend(&s, "other");
    post_n(&s, &tok, "farm", "pump-1", 0, 3);
    post_n(&s, &other, "other", "pump-1", 100, 2);
    post_n(&s, &tok, "farm", "pump-2", 3, 2);
    let st = Stream::open(&s.http, &stream_path("farm", "?from=earliest"), &tok, None).unwrap();
    let first = st.events(5, WAIT);
    assert_eq!(ns(&first), vec![0, 1, 2, 3, 4]);
    let e = first[3].json();
    assert_eq!(e["device"], "pump-2");
    assert!(e["time"].as_u64().unwrap() > 1_600_000_000_000);
    let ids1 = ids(&first);
    assert!(ids1.windows(2).all(|w| w[0] < w[1]), "{ids1:?}");
    // Live: states committed while the consumer reads.
    for i in 0..20 {
        post_n(
            &s,
            &tok,
            "farm",
            if i % 2 == 0 { "pump-1" } else { "pump-3" },
            5 + i,
            1,
        );
    }
    let live = st.events(20, WAIT);
    assert_eq!(ns(&live), (5..25).collect::<Vec<u64>>());
    assert!(ids(&live)[0] > *ids1.last().unwrap());
    // Another application's states never show up.
    post_n(&s, &other, "other", "pump-1", 200, 1);
    st.quiet(Duration::from_millis(300));

    // `from=now` (the default) starts after what is stored.
    let now = Stream::open(&s.http, &stream_path("farm", ""), &tok, None).unwrap();
    now.quiet(Duration::from_millis(200));
    post_n(&s, &tok, "farm", "pump-1", 25, 1);
    assert_eq!(ns(&now.events(1, WAIT)), vec![25]);
    assert_eq!(ns(&st.events(1, WAIT)), vec![25]);
}

#[test]
fn devices_limit_what_a_stream_shows() {
    let s = Server::start();
    let tok = backend(&s, "farm");
    let narrow = mint(
        &s,
        ADMIN,
        "farm",
        json!({"name": "one", "scope": ["device.getState"], "devices": ["a", "b"]}),
    )
    .1;
    post_n(&s, &tok, "farm", "a", 0, 1);
    post_n(&s, &tok, "farm", "b", 1, 1);
    post_n(&s, &tok, "farm", "c", 2, 1);
    post_n(&s, &tok, "farm", "a", 3, 1);
    // The token's own devices bound what it sees...
    let st = Stream::open(
        &s.http,
        &stream_path("farm", "?from=earliest"),
        &narrow,
        None,
    )
    .unwrap();
    assert_eq!(ns(&st.events(3, WAIT)), vec![0, 1, 3]);
    // ...and `devices=` narrows further.
    let st = Stream::open(
        &s.admin,
        &stream_path("farm", "?from=earliest&devices=b,c"),
        &tok,
        None,
    )
    .unwrap();
    assert_eq!(ns(&st.events(2, WAIT)), vec![1, 2]);
    st.quiet(Duration::from_millis(200));
    // Asking for a device the token may not read is forbidden.
    let r = Stream::open(&s.http, &stream_path("farm", "?devices=c"), &narrow, None);
    assert_eq!(r.err().map(|e| e.0), Some(403));
}

#[test]
fn a_killed_consumer_resumes_by_last_event_id_without_gap_or_repeat() {
    let s = Server::start();
    let tok = backend(&s, "farm");
    post_n(&s, &tok, "farm", "d", 0, 50);
    let mut st = Stream::open(&s.http, &stream_path("farm", "?from=earliest"), &tok, None).unwrap();
    let got = st.events(30, WAIT);
    let last = got.last().unwrap().id.clone().unwrap();
    st.close();
    // Committed while it is away.
    post_n(&s, &tok, "farm", "d", 50, 25);
    // An EventSource reconnects with the same URL and Last-Event-ID.
    let st = Stream::open(
        &s.http,
        &stream_path("farm", "?from=earliest"),
        &tok,
        Some(&last),
    )
    .unwrap();
    let rest = st.events(45, WAIT);
    assert_eq!(ns(&rest), (30..75).collect::<Vec<u64>>());
    st.quiet(Duration::from_millis(200));
}

#[test]
fn positions_survive_a_restart_of_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start_in(dir.path(), &[]);
    let tok = backend(&s, "farm");
    post_n(&s, &tok, "farm", "d", 0, 10);
    let got = Stream::open(&s.http, &stream_path("farm", "?from=earliest"), &tok, None)
        .unwrap()
        .events(10, WAIT);
    let last = got[6].id.clone().unwrap();
    assert_eq!(s.stop(), Some(0));
    let s = Server::start_in(dir.path(), &[]);
    post_n(&s, &tok, "farm", "d", 10, 5);
    let st = Stream::open(&s.http, &stream_path("farm", ""), &tok, Some(&last)).unwrap();
    let rest = st.events(8, WAIT);
    assert_eq!(ns(&rest), (7..15).collect::<Vec<u64>>());
    // Positions are the same after the restart.
    assert_eq!(ids(&rest)[..3], ids(&got)[7..]);
}

#[test]
fn a_stalled_consumer_catches_up_with_nothing_missing_or_repeated() {
    // A tiny live buffer: the stalled consumer falls far behind it and
    // must read from storage.
    let s = Server::start_with(&[
        ("SLUICE_STREAMS__LIVE_BUFFER_BYTES", "4096"),
        ("SLUICE_STREAMS__CONSUMER_BUFFER_BYTES", "16384"),
    ]);
    let tok = backend(&s, "farm");
    let mut st = Stream::open_paused(&s.http, &stream_path("farm", ""), &tok, None).unwrap();
    // The consumer reads nothing while ingest runs from four threads:
    // 24 MB of states, more than the socket buffers hold.
    let (per_thread, per_post) = (80, 50);
    let total = 4 * per_thread * per_post;
    std::thread::scope(|sc| {
        for t in 0..4 {
            let (s, tok) = (&s, &tok);
            sc.spawn(move || {
                for k in 0..per_thread {
                    let first = (t * per_thread + k) * per_post;
                    post_padded(s, tok, "farm", &format!("d{t}"), first, per_post, 1500);
                }
            });
        }
    });
    st.resume();
    let events = st.events(total, Duration::from_secs(120));
    let lags: u64 = metrics_text(&s)
        .lines()
        .find_map(|l| l.strip_prefix("sluice_stream_lags_total "))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(lags >= 1, "the consumer never fell behind the live buffer");
    let mut got = ns(&events);
    let positions = ids(&events);
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "out of order");
    // Per device, commit order is the order sent.
    for t in 0..4u64 {
        let dev: Vec<u64> = events
            .iter()
            .filter(|e| e.json()["device"] == format!("d{t}"))
            .map(|e| e.json()["data"]["n"].as_u64().unwrap())
            .collect();
        assert!(
            dev.windows(2).all(|w| w[0] < w[1]),
            "device d{t} out of order"
        );
    }
    got.sort_unstable();
    assert_eq!(got, (0..total as u64).collect::<Vec<u64>>());
    st.quiet(Duration::from_millis(300));
}

#[test]
fn revoking_the_token_ends_the_stream_at_once() {
    let s = Server::start();
    let parent = mint(
        &s,
        ADMIN,
        "farm",
        json!({"name": "p", "scope": ["device.getState", "token.create"]}),
    );
    let child = mint(
        &s,
        &parent.1,
        "farm",
        json!({"name": "c", "scope": ["device.getState"]}),
    );
    let st = Stream::open(&s.http, &stream_path("farm", ""), &child.1, None).unwrap();
    let st2 = Stream::open(&s.admin, &stream_path("farm", ""), &child.1, None).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    let (code, _) = patch_token(&s, ADMIN, "farm", &parent.0, json!({"status": "inactive"}));
    assert_eq!(code, 200);
    for st in [&st, &st2] {
        loop {
            match st.rx.recv_timeout(Duration::from_secs(5)) {
                Ok(Seen::End) => break,
                Ok(Seen::Comment(_)) => {}
                other => panic!("{other:?}"),
            }
        }
    }
    assert!(t0.elapsed() < Duration::from_secs(5));
    let r = Stream::open(&s.http, &stream_path("farm", ""), &child.1, None);
    assert_eq!(r.err().map(|e| e.0), Some(401));
}

#[test]
fn requests_are_checked_and_streams_limited() {
    let s = Server::start_with(&[
        ("SLUICE_STREAMS__MAX_STREAMS_PER_TOKEN", "2"),
        ("SLUICE_STREAMS__SSE_HEARTBEAT", "200ms"),
    ]);
    let tok = backend(&s, "farm");
    let ingest = mint(
        &s,
        ADMIN,
        "farm",
        json!({"name": "i", "scope": ["device.sendState"]}),
    )
    .1;
    let open = |q: &str, t: &str, id: Option<&str>| {
        Stream::open(&s.http, &stream_path("farm", q), t, id).err()
    };
    assert_eq!(open("", &ingest, None).map(|e| e.0), Some(403));
    assert_eq!(open("", "sl_nope", None).map(|e| e.0), Some(401));
    // The root token is an admin-plane credential: not on the device
    // listener, but on the admin one.
    assert_eq!(open("", ADMIN, None).map(|e| e.0), Some(401));
    assert!(Stream::open(&s.admin, &stream_path("farm", ""), ADMIN, None).is_ok());
    for bad in [
        "?from=yesterday",
        "?from=-3",
        "?devices=a/b",
        "?devices=",
        "?x=1",
    ] {
        let e = open(bad, &tok, None).unwrap();
        assert_eq!(e.0, 400, "{bad}");
        assert!(e.1.contains("bad_request"), "{bad}: {}", e.1);
    }
    assert_eq!(open("", &tok, Some("abc")).map(|e| e.0), Some(400));
    // Two streams per token, on both listeners together.
    let a = Stream::open(&s.http, &stream_path("farm", ""), &tok, None).unwrap();
    let _b = Stream::open(&s.admin, &stream_path("farm", ""), &tok, None).unwrap();
    let e = open("", &tok, None).unwrap();
    assert_eq!(e.0, 429);
    assert!(e.1.contains("too_many_streams"), "{}", e.1);
    // An idle stream gets heartbeats.
    match a.rx.recv_timeout(Duration::from_secs(5)) {
        Ok(Seen::Comment(c)) => assert_eq!(c, "heartbeat"),
        other => panic!("{other:?}"),
    }
    drop(a);
    // Its place is free again once it is gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    while open("", &tok, None).is_some() {
        assert!(
            Instant::now() < deadline,
            "the closed stream's place was not freed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_device_listener_serves_history_and_composite_state() {
    let s = Server::start();
    let tok = backend(&s, "farm");
    post_n(&s, &tok, "farm", "d", 0, 3);
    let get = |base: &str, path: &str, t: &str| {
        json_of(
            client()
                .get(format!("http://{base}{path}"))
                .bearer_auth(t)
                .send()
                .unwrap(),
        )
    };
    let (st, h) = get(
        &s.http,
        "/applications/farm/devices/d/state?order=asc",
        &tok,
    );
    assert_eq!(st, 200, "{h}");
    assert_eq!(h["items"].as_array().unwrap().len(), 3);
    assert_eq!(
        h,
        get(
            &s.admin,
            "/applications/farm/devices/d/state?order=asc",
            &tok
        )
        .1
    );
    let (st, c) = get(&s.http, "/applications/farm/devices/d/compositeState", &tok);
    assert_eq!(st, 200);
    assert_eq!(c["n"]["value"], 2);
    // Same scopes: an ingest-only token may not read; the root token is
    // refused on the device listener.
    let ingest = mint(
        &s,
        ADMIN,
        "farm",
        json!({"name": "i", "scope": ["device.sendState"]}),
    )
    .1;
    assert_eq!(
        get(&s.http, "/applications/farm/devices/d/state", &ingest).0,
        403
    );
    assert_eq!(
        get(&s.http, "/applications/farm/devices/d/state", ADMIN).0,
        401
    );
    assert_eq!(
        get(&s.admin, "/applications/farm/devices/d/state", ADMIN).0,
        200
    );
}

#[test]
fn a_resume_position_no_longer_stored_is_told_and_starts_at_the_oldest() {
    let s = Server::start();
    let tok = backend(&s, "farm");
    let other = backend(&s, "other");
    // Positions 0..3 belong to another application; "farm" starts at 3,
    // so position 1 is below everything "farm" has stored, as a position
    // removed by retention would be.
    post_n(&s, &other, "other", "d", 0, 3);
    post_n(&s, &tok, "farm", "d", 10, 2);
    let st = Stream::open(&s.http, &stream_path("farm", ""), &tok, Some("1")).unwrap();
    let got = st.events(3, WAIT);
    assert_eq!(got[0].event.as_deref(), Some("aged_out"));
    assert_eq!(got[0].id, None);
    assert_eq!(ns(&got[1..]), vec![10, 11]);
}
