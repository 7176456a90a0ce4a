//! Group-commit writer throughput for ~150-byte state messages, against raw
//! RocksDB write batches of the same records measured in the same run.
//!
//! Group `ingest` (every function on a fresh RocksDB in a tempdir,
//! `SyncMode::None`, WAL on):
//! - `raw_batch1000_state_composite`: one thread, batches of 1,000
//!   messages built by `writer::Records::add` (the writer's own code: one
//!   `put_state` per message, one `merge_composite` per device per batch
//!   with its operands concatenated, the sequence number) and `commit`:
//!   exactly the records the writer writes for a batch of that size, with
//!   no queue, thread hand-off, attribute limit or completion. The writer's
//!   own batch sizes are printed after each writer function.
//! - `raw_batch1000_no_log_index`: the same without the per-application
//!   log index records (what a batch wrote before live streams), so the
//!   paired rounds show what the index costs.
//! - `raw_batch1000_state_only`: the same without the composite merges.
//! - `writer_4prod_preparsed`: 4 producer threads, 256 requests in flight
//!   each, through `IngestQueue::try_enqueue` → writer thread (attribute
//!   limit check, records, commit) → oneshot completion. Bodies are parsed
//!   before timing; the timed loop builds each `WriteRequest` (clones the
//!   parse result, makes a oneshot), enqueues it and waits for its
//!   completion.
//! - `writer_4prod_preparsed_wait_half`: as above, but a producer with a
//!   full window waits for its oldest 128 requests at once (blocking on the
//!   128th), so it is woken about once per half window instead of once per
//!   completion it was waiting on: shows what wake-up ping-pong costs.
//! - `writer_4prod_parse_inline`: as above but producers parse each body
//!   in the timed loop, as the listeners do.
//!
//! Then, outside criterion, "statistics rounds": the records of
//! `Records::add` but the log index (history, composite state and one
//! device-statistics merge per device per batch) against the same records
//! without the statistics merge, built by hand
//! here the way `Records::add` built them before the device list existed
//! (1,000-message batches over 100 devices, 9 rounds of 200,000 messages,
//! alternating, fresh stores): the cost of the device list on the
//! writer's hot path, as a ratio of rates.
//!
//! Then "paired rounds": the raw baseline and the three
//! writer variants take turns (150,000 messages each, 9 rounds, rotating
//! order, each on its own fresh store) and the per-round writer/raw rate
//! ratios are printed with process CPU per message. On a shared 2-core
//! machine this is the ratio to read: criterion's functions run tens of
//! seconds apart and on stores of different sizes.
//!
//! Group `attribute_limit`: `AttributeLimit::admit` per request, with the
//! devices' names in memory and with every request reading its device's
//! stored value (a cache too small for any device).
//!
//! Group `parse`: `state::parse(body, Shape::One, now)` alone.

use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sluice::config::SyncMode;
use sluice::metrics::Metrics;
use sluice::state::{self, ParsedStates, Shape};
use sluice::store::{device_key, DeviceKey, DeviceStats, Position, Store};
use sluice::streams::Hub;
use sluice::writer::attributes::AttributeLimit;
use sluice::writer::{
    BatchPolicy, CommitError, Committed, Completion, EnqueueError, Health, IngestQueue, Records,
    Scratch, Size, WriteRequest, Writer, WriterConfig,
};
use tokio::sync::oneshot;

const DEVICES: usize = 100;
const POOL: usize = 10_000;
const BODY_LEN: usize = 150;
const NOW_MS: i64 = 1_700_000_000_000;
const RAW_BATCH: u64 = 1_000;
const PRODUCERS: usize = 4;
const WINDOW: usize = 256;

type Done = oneshot::Receiver<Result<Committed, CommitError>>;

struct Msg {
    device: DeviceKey,
    body: Bytes,
    parsed: ParsedStates,
}

/// A state message padded (through a firmware string) to exactly `BODY_LEN`.
fn body(i: usize) -> Vec<u8> {
    let head = format!(
        concat!(
            r#"{{"data":{{"temp":{:.1},"humidity":{:.1},"pressure":{:.2},"#,
            r#""status":"ok","battery":{},"rssi":-{},"fw":""#
        ),
        15.0 + (i % 150) as f64 / 10.0,
        30.0 + (i % 400) as f64 / 10.0,
        990.0 + (i % 4000) as f64 / 100.0,
        50 + i % 50,
        40 + i % 60,
    );
    let tail = format!(r#""}},"time":{}}}"#, NOW_MS as u64 + i as u64 * 10);
    let pad = BODY_LEN - head.len() - tail.len();
    let fw: String = "1.4.2-build."
        .chars()
        .chain(std::iter::repeat('x'))
        .take(pad)
        .collect();
    let b = format!("{head}{fw}{tail}").into_bytes();
    assert_eq!(b.len(), BODY_LEN);
    b
}

fn pool() -> Vec<Msg> {
    (0..POOL)
        .map(|i| {
            let body = Bytes::from(body(i));
            let parsed = state::parse(&body, Shape::One, NOW_MS).unwrap();
            assert_eq!(parsed.states.len(), 1);
            Msg {
                device: device_key("app-bench", &format!("dev-{:03}", i % DEVICES)),
                body,
                parsed,
            }
        })
        .collect()
}

fn copy_parsed(p: &ParsedStates) -> ParsedStates {
    ParsedStates {
        states: p.states.clone(),
        composite: p.composite.clone(),
        names: p.names.clone(),
        received_ms: p.received_ms,
    }
}

/// How producers behave.
#[derive(Clone, Copy, Default)]
struct Mode {
    /// Parse each body in the timed loop instead of copying a parse result.
    parse_inline: bool,
    /// With a full window, wait for the oldest half at once rather than for
    /// the oldest request alone: fewer wake-ups of parked producers.
    wait_half: bool,
}

/// `iters` messages through the writer from `PRODUCERS` threads; wall time.
fn run_writer(queue: &IngestQueue, pool: &[Msg], iters: u64, mode: Mode) -> Duration {
    let start = Barrier::new(PRODUCERS + 1);
    thread::scope(|s| {
        for p in 0..PRODUCERS {
            let n = iters / PRODUCERS as u64 + u64::from((p as u64) < iters % PRODUCERS as u64);
            let start = &start;
            s.spawn(move || {
                // A device token, as the listeners hand the writer.
                let grant = std::sync::Arc::new(sluice::auth::TokenEntry::new_root());
                let mut inflight: VecDeque<Done> = VecDeque::with_capacity(WINDOW);
                let mut j = p * POOL / PRODUCERS;
                start.wait();
                for _ in 0..n {
                    if inflight.len() == WINDOW {
                        if mode.wait_half {
                            // Completions come in enqueue order: once the
                            // middle one is done, so is everything before it.
                            let mid = inflight.remove(WINDOW / 2 - 1).unwrap();
                            mid.blocking_recv().unwrap().unwrap();
                            for rx in inflight.drain(..WINDOW / 2 - 1) {
                                rx.blocking_recv().unwrap().unwrap();
                            }
                        } else {
                            let rx = inflight.pop_front().unwrap();
                            rx.blocking_recv().unwrap().unwrap();
                        }
                    }
                    j = (j + 1) % pool.len();
                    let m = &pool[j];
                    let parsed = if mode.parse_inline {
                        state::parse(&m.body, Shape::One, NOW_MS).unwrap()
                    } else {
                        copy_parsed(&m.parsed)
                    };
                    let (tx, rx) = oneshot::channel();
                    let mut req = WriteRequest {
                        grant: grant.clone(),
                        device: m.device.clone(),
                        body: m.body.clone(),
                        parsed,
                        done: Completion::Request(tx),
                        received: Instant::now(),
                    };
                    loop {
                        match queue.try_enqueue(req) {
                            Ok(()) => break,
                            Err(EnqueueError::Full(r)) => {
                                req = *r;
                                thread::yield_now();
                            }
                            Err(EnqueueError::Closed | EnqueueError::Revoked) => {
                                panic!("writer closed")
                            }
                        }
                    }
                    inflight.push_back(rx);
                }
                for rx in inflight {
                    rx.blocking_recv().unwrap().unwrap();
                }
            });
        }
        start.wait();
        let t0 = Instant::now();
        // The scope joins every producer before returning.
        t0
    })
    .elapsed()
}

/// What a raw batch writes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Raw {
    /// `Records::add`: states, composite merges, the log index.
    Records,
    /// The same without the log index (what `Records::add` wrote before
    /// it), to show what the index costs.
    NoLogIndex,
    /// States only.
    StateOnly,
}

/// `Records::add` without the per-application log index records (history,
/// composite merges and device statistics, as `Records::add` builds them).
fn add_without_log_index<'a>(
    store: &Store,
    b: &mut sluice::store::CommitBatch,
    seq: &mut u64,
    batch: impl Iterator<Item = &'a Msg>,
    scratch: &mut Vec<u8>,
) {
    type PerDevice<'a> = (Vec<&'a [u8]>, u64);
    let mut devices: std::collections::HashMap<&[u8], PerDevice<'_>> =
        std::collections::HashMap::new();
    for m in batch {
        for s in &m.parsed.states {
            let data = &m.body[s.data.start as usize..s.data.end as usize];
            let at = Position {
                time_ms: s.time_ms,
                seq: *seq,
            };
            store.put_state(b, &m.device, at, data).unwrap();
            *seq += 1;
        }
        let d = devices.entry(&m.device[..]).or_default();
        d.0.push(&m.parsed.composite[..]);
        d.1 += m.parsed.states.len() as u64;
    }
    for (device, (ops, states)) in devices {
        if let [one] = ops.as_slice() {
            store.merge_composite(b, device, one).unwrap();
        } else {
            scratch.clear();
            for op in ops {
                scratch.extend_from_slice(op);
            }
            store.merge_composite(b, device, scratch).unwrap();
        }
        let stats = DeviceStats {
            first_seen_ms: NOW_MS as u64,
            last_seen_ms: NOW_MS as u64,
            messages: states,
        };
        store.merge_device_stats(b, device, &stats).unwrap();
    }
}

/// `iters` messages as raw write batches of `RAW_BATCH`, one thread.
fn run_raw(store: &Store, pool: &[Msg], iters: u64, seq: &mut u64, raw: Raw) -> Duration {
    let mut scratch = Scratch::default();
    let mut plain = Vec::new();
    let t0 = Instant::now();
    let mut left = iters;
    let mut j = 0;
    while left > 0 {
        let n = left.min(RAW_BATCH) as usize;
        left -= n as u64;
        let size = Size {
            messages: n,
            bytes: n * (BODY_LEN + 100),
        };
        let mut b = store.batch(Records::capacity(size));
        let first = j;
        let batch = (0..n).map(move |k| &pool[(first + k + 1) % pool.len()]);
        j = (j + n) % pool.len();
        if raw == Raw::Records {
            let requests = batch.map(|m| (&m.device[..], &m.body, &m.parsed));
            let added = Records::add(
                store,
                &mut b,
                Records::numbered(*seq, NOW_MS as u64, requests),
                &mut scratch,
            )
            .unwrap();
            *seq += added as u64;
        } else if raw == Raw::NoLogIndex {
            add_without_log_index(store, &mut b, seq, batch, &mut plain);
        } else {
            for m in batch {
                for s in &m.parsed.states {
                    let data = &m.body[s.data.start as usize..s.data.end as usize];
                    let at = Position {
                        time_ms: s.time_ms,
                        seq: *seq,
                    };
                    store.put_state(&mut b, &m.device, at, data).unwrap();
                    *seq += 1;
                }
            }
        }
        store.commit(b, *seq).unwrap();
    }
    t0.elapsed()
}

/// The writer as the server starts it, with the bench's queue bounds.
fn start_writer(store: Store, metrics: Arc<Metrics>) -> Writer {
    let mut config = WriterConfig::new(&sluice::Config::default());
    config.policy = BatchPolicy {
        max_messages: 8192,
        max_bytes: 8 << 20,
    };
    config.queue_capacity = 16_384;
    config.queue_max_bytes = 64 << 20;
    Writer::start(
        store,
        config,
        metrics,
        Arc::new(Health::default()),
        Arc::new(Hub::new(1 << 20, Default::default())),
    )
    .unwrap()
}

fn bench_ingest(c: &mut Criterion) {
    let pool = pool();
    let avg_composite =
        pool.iter().map(|m| m.parsed.composite.len()).sum::<usize>() as f64 / pool.len() as f64;
    eprintln!(
        "messages: {BODY_LEN} B bodies, {:.0} B composite operand on average, {DEVICES} devices",
        avg_composite
    );

    let mut g = c.benchmark_group("ingest");
    g.throughput(Throughput::Elements(1));

    for (name, raw) in [
        ("raw_batch1000_state_composite", Raw::Records),
        ("raw_batch1000_no_log_index", Raw::NoLogIndex),
        ("raw_batch1000_state_only", Raw::StateOnly),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::None).unwrap();
        let mut seq = 0;
        g.bench_function(name, |b| {
            b.iter_custom(|iters| run_raw(&store, &pool, iters, &mut seq, raw))
        });
        eprintln!("  {name}: {seq} messages written");
    }

    for (name, mode) in [
        ("writer_4prod_preparsed", Mode::default()),
        (
            "writer_4prod_preparsed_wait_half",
            Mode {
                wait_half: true,
                ..Mode::default()
            },
        ),
        (
            "writer_4prod_parse_inline",
            Mode {
                parse_inline: true,
                ..Mode::default()
            },
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::None).unwrap();
        let metrics = Arc::new(Metrics::new());
        let w = start_writer(store, metrics.clone());
        let queue = w.queue();
        g.bench_function(name, |b| {
            b.iter_custom(|iters| run_writer(&queue, &pool, iters, mode))
        });
        w.stop().unwrap();
        let msgs = metrics.messages_stored.get();
        let batches = metrics.batches.get();
        eprintln!(
            "  {name}: {msgs} messages in {batches} batches, {:.0} messages per batch",
            msgs as f64 / batches.max(1) as f64
        );
    }
    g.finish();

    statistics_rounds(&pool);
    paired_rounds(&pool);

    // The attribute limit's share of the writer's per-request work: one
    // `admit` per request, with every device's names in memory (the
    // steady state of a fleet that fits the cache) and with a cache too
    // small for any device, so every request reads the device's stored
    // composite value (the worst case).
    let mut g = c.benchmark_group("attribute_limit");
    g.throughput(Throughput::Elements(1));
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), SyncMode::None).unwrap();
    let mut seq = 0;
    run_raw(&store, &pool, POOL as u64, &mut seq, Raw::Records);
    // Each message has 7 attributes; a limit of 7 with no cache to speak of
    // leaves room for one device, and requests cycle through 100.
    for (name, max, cache_names) in [
        ("admit_cached", 1000, 1_000_000),
        ("admit_read_on_miss", 7, 0),
    ] {
        let mut limit = AttributeLimit::new(max, cache_names);
        g.bench_function(name, |b| {
            let mut j = 0;
            b.iter(|| {
                j = (j + 1) % pool.len();
                let m = &pool[j];
                limit
                    .admit(&store, &m.device, black_box(&m.parsed.names))
                    .unwrap()
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Elements(1));
    g.bench_function("state_one_150B", |b| {
        let mut j = 0;
        b.iter(|| {
            j = (j + 1) % pool.len();
            state::parse(black_box(&pool[j].body), Shape::One, NOW_MS).unwrap()
        })
    });
    g.finish();
}

/// As `run_raw` with composite state, but without the device-statistics
/// merge: history and one composite merge per device per batch, exactly
/// as `Records::add` wrote them before the device list.
fn run_raw_without_stats(store: &Store, pool: &[Msg], iters: u64, seq: &mut u64) -> Duration {
    let mut scratch = Vec::new();
    let t0 = Instant::now();
    let mut left = iters;
    let mut j = 0;
    while left > 0 {
        let n = left.min(RAW_BATCH) as usize;
        left -= n as u64;
        let size = Size {
            messages: n,
            bytes: n * (BODY_LEN + 100),
        };
        let mut b = store.batch(Records::capacity(size));
        let mut composites: std::collections::HashMap<&[u8], Vec<&[u8]>> = Default::default();
        for k in 0..n {
            let m = &pool[(j + k + 1) % pool.len()];
            for s in &m.parsed.states {
                let data = &m.body[s.data.start as usize..s.data.end as usize];
                let at = Position {
                    time_ms: s.time_ms,
                    seq: *seq,
                };
                store.put_state(&mut b, &m.device, at, data).unwrap();
                *seq += 1;
            }
            composites
                .entry(&m.device[..])
                .or_default()
                .push(&m.parsed.composite);
        }
        j = (j + n) % pool.len();
        for (device, operands) in composites {
            if let [one] = operands.as_slice() {
                store.merge_composite(&mut b, device, one).unwrap();
            } else {
                scratch.clear();
                for op in operands {
                    scratch.extend_from_slice(op);
                }
                store.merge_composite(&mut b, device, &scratch).unwrap();
            }
        }
        store.commit(b, *seq).unwrap();
    }
    t0.elapsed()
}

/// `Records::add` with and without the device-statistics merge, in
/// alternating rounds on fresh stores; prints rates and the per-round
/// ratio.
fn statistics_rounds(pool: &[Msg]) {
    const ROUNDS: usize = 9;
    const PER_ROUND: u64 = 200_000;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let with = Store::open(dirs[0].path(), SyncMode::None).unwrap();
    let without = Store::open(dirs[1].path(), SyncMode::None).unwrap();
    let (mut seq_with, mut seq_without) = (0, 0);
    let (mut wall_with, mut wall_without) = (Duration::ZERO, Duration::ZERO);
    let mut ratios = vec![];
    for round in 0..ROUNDS {
        let mut run = |first: bool| {
            if first {
                let t = run_raw(&with, pool, PER_ROUND, &mut seq_with, Raw::NoLogIndex);
                wall_with += t;
                t
            } else {
                let t = run_raw_without_stats(&without, pool, PER_ROUND, &mut seq_without);
                wall_without += t;
                t
            }
        };
        let (a, b) = if round % 2 == 0 {
            let a = run(true);
            (a, run(false))
        } else {
            let b = run(false);
            (run(true), b)
        };
        // Same message count: the ratio of rates is the inverse ratio of times.
        ratios.push(b.as_secs_f64() / a.as_secs_f64());
    }
    let msgs = (ROUNDS as u64 * PER_ROUND) as f64;
    let shown: Vec<String> = ratios.iter().map(|x| format!("{x:.2}")).collect();
    ratios.sort_by(f64::total_cmp);
    eprintln!("statistics rounds ({ROUNDS} x {PER_ROUND} msgs each, alternating):");
    eprintln!(
        "  records without the log index, with device statistics {:>7.0} msgs/s; without {:>7.0} msgs/s",
        msgs / wall_with.as_secs_f64(),
        msgs / wall_without.as_secs_f64()
    );
    eprintln!(
        "  with / without rate per round: median {:.3}, min {:.3}, max {:.3} [{}]",
        ratios[ROUNDS / 2],
        ratios[0],
        ratios[ROUNDS - 1],
        shown.join(" ")
    );
}

/// Process CPU time (user + system, all threads) from `/proc/self/stat`.
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    // Fields after the command: state is field 3, utime 14, stime 15.
    let f: Vec<u64> = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    // USER_HZ is 100 on every Linux configuration we run on.
    Duration::from_millis(f.iter().sum::<u64>() * 10)
}

/// Raw batches and the writer measured in rotation on fresh stores, so all
/// see the same background load; prints per-round ratios of rates (and
/// process CPU per message) next to criterion's figures.
fn paired_rounds(pool: &[Msg]) {
    const ROUNDS: usize = 9;
    const PER_ROUND: u64 = 150_000;
    const NAMES: [&str; 5] = [
        "raw_batch1000_state_composite",
        "writer_4prod_preparsed",
        "writer_4prod_preparsed_wait_half",
        "writer_4prod_parse_inline",
        "raw_batch1000_no_log_index",
    ];
    const MODES: [Mode; 3] = [
        Mode {
            parse_inline: false,
            wait_half: false,
        },
        Mode {
            parse_inline: false,
            wait_half: true,
        },
        Mode {
            parse_inline: true,
            wait_half: false,
        },
    ];
    let dirs: Vec<_> = (0..NAMES.len())
        .map(|_| tempfile::tempdir().unwrap())
        .collect();
    let raw_store = Store::open(dirs[0].path(), SyncMode::None).unwrap();
    let no_log_store = Store::open(dirs[4].path(), SyncMode::None).unwrap();
    let writers: Vec<Writer> = dirs[1..4]
        .iter()
        .map(|d| {
            let store = Store::open(d.path(), SyncMode::None).unwrap();
            start_writer(store, Arc::new(Metrics::new()))
        })
        .collect();
    let queues: Vec<_> = writers.iter().map(Writer::queue).collect();
    let (mut seq, mut no_log_seq) = (0, 0);
    let mut wall = [Duration::ZERO; NAMES.len()];
    let mut cpu = [Duration::ZERO; NAMES.len()];
    let mut ratios: [Vec<f64>; MODES.len()] = Default::default();
    let mut index_cost = Vec::new();
    for round in 0..ROUNDS {
        let mut t = [Duration::ZERO; NAMES.len()];
        for k in 0..NAMES.len() {
            // Rotate who goes first.
            let i = (round + k) % NAMES.len();
            let c0 = process_cpu();
            t[i] = match i {
                0 => run_raw(&raw_store, pool, PER_ROUND, &mut seq, Raw::Records),
                4 => run_raw(
                    &no_log_store,
                    pool,
                    PER_ROUND,
                    &mut no_log_seq,
                    Raw::NoLogIndex,
                ),
                _ => run_writer(&queues[i - 1], pool, PER_ROUND, MODES[i - 1]),
            };
            cpu[i] += process_cpu() - c0;
            wall[i] += t[i];
        }
        // Same message count, so the ratio of rates is the inverse ratio of times.
        for (w, r) in ratios.iter_mut().enumerate() {
            r.push(t[0].as_secs_f64() / t[w + 1].as_secs_f64());
        }
        index_cost.push(t[4].as_secs_f64() / t[0].as_secs_f64());
    }
    for w in writers {
        w.stop().unwrap();
    }
    let msgs = (ROUNDS as u64 * PER_ROUND) as f64;
    eprintln!("paired rounds ({ROUNDS} x {PER_ROUND} msgs each, rotating order):");
    for ((name, wall), cpu) in NAMES.iter().zip(wall).zip(cpu) {
        eprintln!(
            "  {name:<34} {:>7.0} msgs/s, {:.2} us process CPU/msg",
            msgs / wall.as_secs_f64(),
            cpu.as_secs_f64() * 1e6 / msgs
        );
    }
    let shown: Vec<String> = index_cost.iter().map(|x| format!("{x:.2}")).collect();
    index_cost.sort_by(f64::total_cmp);
    eprintln!(
        "  raw rate with the log index / without, per round: median {:.2}, min {:.2}, max {:.2} [{}]",
        index_cost[ROUNDS / 2],
        index_cost[0],
        index_cost[ROUNDS - 1],
        shown.join(" ")
    );
    for (w, r) in ratios.iter_mut().enumerate() {
        let shown: Vec<String> = r.iter().map(|x| format!("{x:.2}")).collect();
        r.sort_by(f64::total_cmp);
        eprintln!(
            "  {} / raw rate per round: median {:.2}, min {:.2}, max {:.2} [{}]",
            NAMES[w + 1],
            r[ROUNDS / 2],
            r[0],
            r[ROUNDS - 1],
            shown.join(" ")
        );
    }
}

criterion_group! {
    name = writer;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(8));
    targets = bench_ingest
}
criterion_main!(writer);
