//! Live-stream consumers during a load run (`--consumers N`), and the
//! replay of a stream (`loadtest replay`).
//!
//! Each consumer reads the whole application as a Sluice live stream
//! (Server-Sent Events from `GET /applications/{app}/stream`, or an MQTT
//! subscription to `applications/{app}/devices/+/state`), from the moment
//! before the timed phase starts. For every message of this run it
//! receives it notes which one it was (connection and sequence number, from
//! the body), so the report can say whether each consumer received every
//! acknowledged message exactly once, and — in a paced run — how long after
//! its scheduled send time it arrived: end-to-end delivery latency, to
//! compare with the acknowledgement latency of the same messages.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::{Bytes, BytesMut};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper::header::{HeaderValue, ACCEPT, AUTHORIZATION, HOST};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::cli::{ConsumerVia, ReplayArgs};
use crate::http::HttpConfig;
use crate::report::{fmt_ms, fmt_rate, Latency};
use crate::run::ConnOutcome;
use crate::stats::{new_histogram, Bits};

/// When each message of the run was meant to be sent: paced single-step
/// runs only (message `s` of connection `c` at `start + (c + s·N) / R`).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub start: Instant,
    pub conns: u32,
    pub rate: f64,
}

impl Clock {
    fn scheduled(&self, conn: u32, seq: u64) -> Instant {
        let offset = (f64::from(conn) + seq as f64 * f64::from(self.conns)) / self.rate;
        self.start + Duration::from_secs_f64(offset)
    }
}

/// How to reach the stream.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    pub via: ConsumerVia,
    /// SSE: the HTTP listener's `host:port`; MQTT: the broker's.
    pub addr: String,
    pub token: String,
    pub app: String,
    pub run: String,
    pub conns: u32,
    pub timeout: Duration,
}

/// What every consumer records into.
struct Tally {
    /// Per consumer, per connection: which sequence numbers arrived.
    seen: Vec<Mutex<Vec<Bits>>>,
    received: Vec<AtomicU64>,
    duplicates: Vec<AtomicU64>,
    latency: Mutex<Histogram<u64>>,
    /// Set once the timed phase starts (paced runs).
    clock: watch::Receiver<Option<Clock>>,
}

pub struct Consumers {
    spec: ConsumerSpec,
    tally: Arc<Tally>,
    tasks: Vec<tokio::task::JoinHandle<Result<()>>>,
    clock: watch::Sender<Option<Clock>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConsumersReport {
    pub consumers: usize,
    pub via: String,
    /// Messages of this run received, per consumer (duplicates included).
    pub received: Vec<u64>,
    /// Acknowledged messages some consumer never received (summed over
    /// consumers).
    pub missing: u64,
    /// Messages a consumer received more than once (summed).
    pub duplicates: u64,
    /// From each message's scheduled send time to its arrival at a
    /// consumer (paced runs).
    pub delivery_latency: Option<Latency>,
    pub errors: Vec<String>,
}

impl ConsumersReport {
    pub fn ok(&self) -> bool {
        self.missing == 0 && self.duplicates == 0 && self.errors.is_empty()
    }

    pub fn text(&self) -> String {
        let min = self.received.iter().min().copied().unwrap_or(0);
        let max = self.received.iter().max().copied().unwrap_or(0);
        let mut s = format!(
            "  consumers    {} via {}: received {min}..{max} each, missing {}, duplicates {}{}\n",
            self.consumers,
            self.via,
            self.missing,
            self.duplicates,
            if self.ok() { ": OK" } else { "" }
        );
        if let Some(l) = &self.delivery_latency {
            s.push_str(&format!(
                "  delivery ms  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (n={}, from scheduled send to arrival)\n",
                fmt_ms(l.p50_ms),
                fmt_ms(l.p90_ms),
                fmt_ms(l.p99_ms),
                fmt_ms(l.p999_ms),
                fmt_ms(l.max_ms),
                l.count
            ));
        }
        for e in &self.errors {
            s.push_str(&format!("  consumer     error: {e}\n"));
        }
        s
    }
}

/// The numbers after `key` in `s` (e.g. `"c":` → 17).
fn number_after(s: &[u8], key: &[u8]) -> Option<(u64, usize)> {
    let at = s.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = s[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    let n = std::str::from_utf8(&s[at..at + digits])
        .ok()?
        .parse()
        .ok()?;
    Some((n, at + digits))
}

/// `(conn, seq)` of a message body of run `run` (the body's `data` object,
/// with or without what surrounds it).
fn message_of(text: &[u8], run: &str) -> Option<(u32, u64)> {
    let key = b"\"r\":\"";
    let at = text.windows(key.len()).position(|w| w == key)? + key.len();
    let rest = &text[at..];
    if !rest.starts_with(run.as_bytes()) || rest.get(run.len()) != Some(&b'"') {
        return None;
    }
    let (c, k) = number_after(rest, b"\"c\":")?;
    let (s, _) = number_after(&rest[k..], b"\"s\":")?;
    Some((u32::try_from(c).ok()?, s))
}

impl Tally {
    fn note(&self, consumer: usize, text: &[u8], run: &str) {
        let Some((conn, seq)) = message_of(text, run) else {
            return;
        };
        let now = Instant::now();
        self.received[consumer].fetch_add(1, Ordering::Relaxed);
        {
            let mut seen = self.seen[consumer].lock().unwrap();
            let Some(bits) = seen.get_mut(conn as usize) else {
                return;
            };
            if bits.get(seq) {
                self.duplicates[consumer].fetch_add(1, Ordering::Relaxed);
                return;
            }
            bits.set(seq);
        }
        if let Some(clock) = *self.clock.borrow() {
            let us = now
                .saturating_duration_since(clock.scheduled(conn, seq))
                .as_micros() as u64;
            let _ = self.latency.lock().unwrap().record(us.max(1));
        }
    }
}

impl Consumers {
    /// Opens `n` consumers and waits until each is reading the stream.
    pub async fn start(spec: ConsumerSpec, n: usize) -> Result<Consumers> {
        let (clock, clock_rx) = watch::channel(None);
        let tally = Arc::new(Tally {
            seen: (0..n)
                .map(|_| Mutex::new((0..spec.conns).map(|_| Bits::with_len(1024)).collect()))
                .collect(),
            received: (0..n).map(|_| AtomicU64::new(0)).collect(),
            duplicates: (0..n).map(|_| AtomicU64::new(0)).collect(),
            latency: Mutex::new(new_histogram()),
            clock: clock_rx,
        });
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            let (ready_tx, ready) = tokio::sync::oneshot::channel();
            let (mine, tally) = (spec.clone(), tally.clone());
            tasks.push(tokio::spawn(async move {
                match mine.via {
                    ConsumerVia::Sse => sse(&mine, i, &tally, ready_tx).await,
                    ConsumerVia::Mqtt => mqtt(&mine, i, &tally, ready_tx).await,
                }
            }));
            match tokio::time::timeout(spec.timeout, ready).await {
                Ok(Ok(())) => {}
                _ => bail!("consumer {i} could not open its stream"),
            }
        }
        // A subscription starts at the end of the log when it opens; give
        // the last ones a moment to be in place before the load starts.
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(Consumers {
            spec,
            tally,
            tasks,
            clock,
        })
    }

    /// The timed phase starts at `clock.start` (paced runs only).
    pub fn set_clock(&self, clock: Clock) {
        let _ = self.clock.send(Some(clock));
    }

    /// Waits until every consumer has every acknowledged message (or has
    /// received nothing new for `spec.timeout`), stops them and reports.
    pub async fn finish(self, outcomes: &[ConnOutcome]) -> ConsumersReport {
        let acked: u64 = outcomes.iter().map(|o| o.acked.count()).sum();
        let n = self.tasks.len();
        let mut last = (Instant::now(), 0u64);
        loop {
            let least = (0..n)
                .map(|i| {
                    self.tally.seen[i]
                        .lock()
                        .unwrap()
                        .iter()
                        .map(Bits::count)
                        .sum::<u64>()
                })
                .min()
                .unwrap_or(0);
            if least >= acked || self.tasks.iter().all(|t| t.is_finished()) {
                break;
            }
            if least > last.1 {
                last = (Instant::now(), least);
            } else if last.0.elapsed() > self.spec.timeout {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut errors = Vec::new();
        for t in self.tasks {
            if t.is_finished() {
                match t.await {
                    Ok(Err(e)) => errors.push(format!("{e:#}")),
                    Err(e) => errors.push(e.to_string()),
                    Ok(Ok(())) => {}
                }
            } else {
                t.abort();
            }
        }
        let mut missing = 0;
        for i in 0..n {
            let seen = self.tally.seen[i].lock().unwrap();
            for o in outcomes {
                let got = &seen[o.conn as usize];
                missing += o.acked.iter().filter(|s| !got.get(*s)).count() as u64;
            }
        }
        let latency = self.tally.latency.lock().unwrap();
        ConsumersReport {
            consumers: n,
            via: match self.spec.via {
                ConsumerVia::Sse => "SSE".into(),
                ConsumerVia::Mqtt => "MQTT (QoS 1)".into(),
            },
            received: self
                .tally
                .received
                .iter()
                .map(|r| r.load(Ordering::Relaxed))
                .collect(),
            missing,
            duplicates: self
                .tally
                .duplicates
                .iter()
                .map(|d| d.load(Ordering::Relaxed))
                .sum(),
            delivery_latency: Latency::from_histogram(&latency),
            errors,
        }
    }
}

/// Opens an SSE stream; returns the response body.
async fn open_sse(
    addr: &str,
    app: &str,
    token: &str,
    from: &str,
    timeout: Duration,
) -> Result<hyper::body::Incoming> {
    let cfg = HttpConfig::from_url(addr, timeout)?;
    let stream = tokio::time::timeout(timeout, TcpStream::connect(&cfg.addr))
        .await
        .context("connect timed out")?
        .with_context(|| format!("connecting to {}", cfg.addr))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::get(format!("/applications/{app}/stream?from={from}"))
        .header(HOST, cfg.host.clone())
        .header(
            AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}"))?,
        )
        .header(ACCEPT, "text/event-stream")
        .body(Empty::<Bytes>::new())?;
    let resp = tokio::time::timeout(timeout, sender.send_request(req))
        .await
        .context("no answer to the stream request")??;
    if resp.status() != 200 {
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        bail!(
            "stream refused: {status} {}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(resp.into_body())
}

/// Calls `each` with the data of every event of an SSE body, until the
/// body ends or `each` says stop.
async fn sse_events(
    mut body: hyper::body::Incoming,
    mut each: impl FnMut(&[u8], &[u8]) -> bool,
) -> Result<()> {
    let mut buf = BytesMut::with_capacity(1 << 16);
    while let Some(frame) = body.frame().await {
        let frame = frame.context("reading the stream")?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event = buf.split_to(end + 2);
            let mut id: &[u8] = b"";
            let mut payload: &[u8] = b"";
            for line in event[..end].split(|b| *b == b'\n') {
                if let Some(v) = line.strip_prefix(b"id: ") {
                    id = v;
                } else if let Some(v) = line.strip_prefix(b"data: ") {
                    payload = v;
                }
            }
            if !payload.is_empty() && !each(id, payload) {
                return Ok(());
            }
        }
    }
    Ok(())
}

async fn sse(
    spec: &ConsumerSpec,
    i: usize,
    tally: &Tally,
    ready: tokio::sync::oneshot::Sender<()>,
) -> Result<()> {
    let body = open_sse(&spec.addr, &spec.app, &spec.token, "now", spec.timeout).await?;
    let _ = ready.send(());
    sse_events(body, |_, data| {
        tally.note(i, data, &spec.run);
        true
    })
    .await
}

async fn mqtt(
    spec: &ConsumerSpec,
    i: usize,
    tally: &Tally,
    ready: tokio::sync::oneshot::Sender<()>,
) -> Result<()> {
    use rumqttc::{Event, MqttOptions, Packet, QoS};
    let addr = crate::mqtt::strip_scheme(&spec.addr);
    let (host, port) = addr
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
        .context("bad MQTT address for the consumers")?;
    let mut opts = MqttOptions::new(format!("loadtest-{}-consumer-{i}", spec.run), host, port);
    opts.set_credentials("loadtest", spec.token.as_str())
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut ev) = rumqttc::AsyncClient::new(opts, 1000);
    client
        .subscribe(
            format!("applications/{}/devices/+/state", spec.app),
            QoS::AtLeastOnce,
        )
        .await?;
    let mut ready = Some(ready);
    loop {
        match ev.poll().await? {
            Event::Incoming(Packet::SubAck(_)) => {
                if let Some(r) = ready.take() {
                    let _ = r.send(());
                }
            }
            Event::Incoming(Packet::Publish(p)) => tally.note(i, &p.payload, &spec.run),
            _ => {}
        }
    }
}

/// `loadtest replay`: how fast a consumer that was away reads what was
/// committed meanwhile.
pub async fn replay(args: ReplayArgs) -> Result<std::process::ExitCode> {
    let token = match (&args.token, &args.admin, &args.admin_token) {
        (Some(t), _, _) => t.clone(),
        (None, Some(url), Some(admin)) => {
            let a = sluice::client::AdminClient::new(url, admin, args.timeout)?;
            crate::fleet::reader_token(&a, &args.app, "loadtest-replay").await?
        }
        _ => bail!("give --token, or --admin with SLUICE_ADMIN_TOKEN to create one"),
    };
    let started = Instant::now();
    let body = open_sse(&args.url, &args.app, &token, &args.from, args.timeout).await?;
    let opened = started.elapsed();
    let mut n = 0u64;
    let mut bytes = 0u64;
    let mut first: Option<(Instant, Vec<u8>)> = None;
    let mut last_id = Vec::new();
    let count = args.count;
    let reading = sse_events(body, |id, data| {
        if first.is_none() {
            first = Some((Instant::now(), id.to_vec()));
        }
        n += 1;
        bytes += data.len() as u64;
        last_id.clear();
        last_id.extend_from_slice(id);
        n < count
    });
    match tokio::time::timeout(args.max_time, reading).await {
        Ok(r) => r?,
        Err(_) => eprintln!("replay: stopped after --max-time"),
    }
    let elapsed = started.elapsed();
    let Some((t_first, first_id)) = first else {
        bail!("the stream sent no state");
    };
    let reading = elapsed.saturating_sub(t_first.duration_since(started));
    let secs = elapsed.as_secs_f64();
    println!(
        "loadtest replay {} (app {}, from {})",
        args.url, args.app, args.from
    );
    println!(
        "  states       {n} (positions {} .. {}), {:.1} MB of data",
        String::from_utf8_lossy(&first_id),
        String::from_utf8_lossy(&last_id),
        bytes as f64 / 1e6
    );
    println!(
        "  time         {:.3} s from the request ({:.3} s to open, {:.3} s first to last state)",
        secs,
        opened.as_secs_f64(),
        reading.as_secs_f64()
    );
    println!(
        "  rate         {} states/s from the request, {} states/s first to last",
        fmt_rate(n as f64 / secs.max(1e-9)),
        fmt_rate(n.saturating_sub(1) as f64 / reading.as_secs_f64().max(1e-9))
    );
    Ok(if n >= count {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_recognised_in_events_and_publishes() {
        let run = "a1b2c3d4";
        let sse = br#"{"device":"lt-3","time":1700000000000,"data":{"r":"a1b2c3d4","c":3,"s":17,"p":"xx"}}"#;
        assert_eq!(message_of(sse, run), Some((3, 17)));
        let mqtt = br#"{"time":1700000000000,"data":{"r":"a1b2c3d4","c":0,"s":0,"p":""}}"#;
        assert_eq!(message_of(mqtt, run), Some((0, 0)));
        let other = br#"{"data":{"r":"a1b2c3d40","c":3,"s":17}}"#;
        assert_eq!(message_of(other, run), None);
        assert_eq!(message_of(b"{}", run), None);
    }

    #[test]
    fn the_clock_gives_scheduled_times() {
        let start = Instant::now();
        let c = Clock {
            start,
            conns: 4,
            rate: 1000.0,
        };
        // Message 2 of connection 1: (1 + 2·4) / 1000 s.
        assert_eq!(c.scheduled(1, 2) - start, Duration::from_millis(9));
    }
}
