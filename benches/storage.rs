//! Storage measurements behind the `[storage]` defaults (README "Storage
//! tuning" and "Retention"). Not criterion: each figure needs a store of
//! its own filled to a given state, so every experiment runs its variants
//! in rounds with a rotating order, each on a fresh store in a tempdir
//! beside the others (same machine, same background load), and prints the
//! median, min and max per variant, plus per-round ratios to the first.
//!
//! Ingest rates count the writer's work only (`Records::add` and
//! `commit`, write stalls included), not the making of the messages.
//!
//! `cargo bench --bench storage -- EXPERIMENT [ROUNDS]` with EXPERIMENT:
//! - `compression`: ingest rate of 1,000,000 ~150-byte states (batches of
//!   1,000 through `writer::Records::add`, 1,000 devices) and the bytes of
//!   table files per state after a full compaction, for `none`, `lz4`,
//!   `lz4hc`.
//! - `write_buffer`: ingest rate of 2,000,000 states with memtables of
//!   16, 64 and 128 MiB.
//! - `block_cache`: random history reads (the newest 10 states of a
//!   random device of 10,000, 2,000,000 states stored) per second with a
//!   block cache of 8, 64 and 256 MiB.
//! - `expiry`: ingest rate for 20 s on a store holding 3,000,000 states
//!   spread over 100 days, of which 90 % expire under a 10-day retention:
//!   with no expiry running (`none`), while the application's range is
//!   compacted through the expiry filter (`manual`, what a shorter
//!   retention triggers), and with periodic compaction picking up every
//!   file at once (`periodic`, what happens when a retention is first set
//!   on an old store). Prints how long the expiry took and the bytes
//!   before and after.
//!
//! Records are built exactly as the writer builds them (`Records::add`:
//! history, composite state and device statistics); the bench has no
//! queue or thread hand-off (benches/writer.rs measures those).

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice::state::{self, ParsedStates, Shape};
use sluice::store::{
    device_key, Compression, DeviceKey, HistoryQuery, Order, Retention, Store, StoreOptions,
};
use sluice::writer::{Records, Scratch, Size};

const APP: &str = "bench";
const BATCH: usize = 1000;
const DAY_MS: u64 = 86_400_000;

struct Msg {
    device: DeviceKey,
    body: Bytes,
    parsed: ParsedStates,
}

/// A ~150-byte state of device `i % devices` with time `time_ms`.
fn msg(i: usize, devices: usize, time_ms: u64) -> Msg {
    let body = format!(
        concat!(
            r#"{{"data":{{"temp":{:.1},"humidity":{:.1},"pressure":{:.2},"#,
            r#""status":"ok","battery":{},"rssi":-{},"fw":"1.4.2-build.{}"}},"time":{}}}"#
        ),
        15.0 + (i % 150) as f64 / 10.0,
        30.0 + (i % 400) as f64 / 10.0,
        990.0 + (i % 4000) as f64 / 100.0,
        50 + i % 50,
        40 + i % 60,
        i % 97,
        time_ms,
    );
    let body = Bytes::from(body);
    let parsed = state::parse(&body, Shape::One, time_ms as i64).unwrap();
    Msg {
        device: device_key(APP, &format!("dev-{:05}", i % devices)),
        body,
        parsed,
    }
}

fn now_ms() -> u64 {
    sluice::timefmt::now_ms() as u64
}

/// Writes `n` states (device `i % devices`, time from `time(i)`) in
/// batches of `BATCH`; returns states per second of the writer's work
/// (`Records::add` and `commit`, stalls included), not counting the
/// making of the messages.
fn ingest(
    store: &Store,
    seq: &mut u64,
    n: usize,
    devices: usize,
    time: impl Fn(usize) -> u64,
) -> f64 {
    let mut busy = Duration::ZERO;
    let mut scratch = Scratch::default();
    let mut i = 0;
    while i < n {
        let msgs: Vec<Msg> = (i..(i + BATCH).min(n))
            .map(|j| msg(j, devices, time(j)))
            .collect();
        i += msgs.len();
        let size = Size {
            messages: msgs.len(),
            bytes: msgs.iter().map(|m| m.body.len()).sum(),
        };
        let started = Instant::now();
        let mut b = store.batch(Records::capacity(size));
        let requests = msgs.iter().map(|m| (&m.device[..], &m.body, &m.parsed));
        let numbered = Records::numbered(*seq, now_ms(), requests);
        *seq += Records::add(store, &mut b, numbered, &mut scratch).unwrap() as u64;
        store.commit(b, *seq).unwrap();
        busy += started.elapsed();
    }
    n as f64 / busy.as_secs_f64()
}

/// Bytes of table files in `dir`.
fn table_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "sst"))
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum()
}

fn options() -> StoreOptions {
    StoreOptions::new(&sluice::Config::default())
}

/// Runs `variants` (name, run returning named figures) in `rounds`
/// rotating rounds and prints each figure's median, min, max and the
/// per-round ratio to the first variant.
fn rounds<F: Fn(usize) -> Vec<(&'static str, f64)>>(
    title: &str,
    variants: &[&str],
    rounds: usize,
    run: F,
) {
    let mut figures: Vec<Vec<Vec<(&str, f64)>>> = vec![vec![]; variants.len()];
    for r in 0..rounds {
        for k in 0..variants.len() {
            let v = (r + k) % variants.len();
            let got = run(v);
            eprintln!("  round {r} {}: {got:?}", variants[v]);
            figures[v].push(got);
        }
    }
    println!("{title} ({rounds} rounds, rotating order):");
    let names: Vec<&str> = figures[0][0].iter().map(|(n, _)| *n).collect();
    for (f, name) in names.iter().enumerate() {
        for (v, variant) in variants.iter().enumerate() {
            let mut xs: Vec<f64> = figures[v].iter().map(|r| r[f].1).collect();
            let mut ratio: Vec<f64> = figures[v]
                .iter()
                .zip(&figures[0])
                .map(|(a, b)| a[f].1 / b[f].1)
                .collect();
            xs.sort_by(f64::total_cmp);
            ratio.sort_by(f64::total_cmp);
            println!(
                "  {name:<24} {variant:<10} median {:>12.1}  min {:>12.1}  max {:>12.1}  ratio median {:.3} ({:.3}-{:.3})",
                xs[xs.len() / 2],
                xs[0],
                xs[xs.len() - 1],
                ratio[ratio.len() / 2],
                ratio[0],
                ratio[ratio.len() - 1],
            );
        }
    }
}

fn compression(n_rounds: usize) {
    const N: usize = 1_000_000;
    let variants = [
        ("none", Compression::None),
        ("lz4", Compression::Lz4),
        ("lz4hc", Compression::Lz4hc),
    ];
    let names: Vec<&str> = variants.iter().map(|v| v.0).collect();
    rounds("compression", &names, n_rounds, |v| {
        let dir = tempfile::tempdir().unwrap();
        let mut o = options();
        o.compression = variants[v].1;
        let store = Store::open_with(dir.path(), &o).unwrap();
        let mut seq = 0;
        let base = now_ms();
        let rate = ingest(&store, &mut seq, N, 1000, |i| base + i as u64);
        let t = Instant::now();
        store.compact_application(APP);
        let compact_s = t.elapsed().as_secs_f64();
        let bytes = table_bytes(dir.path());
        vec![
            ("ingest states/s", rate),
            ("table bytes/state", bytes as f64 / N as f64),
            ("full compaction s", compact_s),
        ]
    });
}

fn write_buffer(n_rounds: usize) {
    const N: usize = 2_000_000;
    let sizes = [
        ("16MiB", 16usize << 20),
        ("64MiB", 64 << 20),
        ("128MiB", 128 << 20),
    ];
    let names: Vec<&str> = sizes.iter().map(|v| v.0).collect();
    rounds("write_buffer", &names, n_rounds, |v| {
        let dir = tempfile::tempdir().unwrap();
        let mut o = options();
        o.write_buffer_bytes = sizes[v].1;
        let store = Store::open_with(dir.path(), &o).unwrap();
        let mut seq = 0;
        let base = now_ms();
        vec![(
            "ingest states/s",
            ingest(&store, &mut seq, N, 1000, |i| base + i as u64),
        )]
    });
}

fn block_cache(n_rounds: usize) {
    const N: usize = 2_000_000;
    const DEVICES: usize = 10_000;
    const READS: usize = 50_000;
    let sizes = [
        ("8MiB", 8usize << 20),
        ("64MiB", 64 << 20),
        ("256MiB", 256 << 20),
    ];
    let names: Vec<&str> = sizes.iter().map(|v| v.0).collect();
    rounds("block_cache", &names, n_rounds, |v| {
        let dir = tempfile::tempdir().unwrap();
        let mut seq = 0;
        let base = now_ms();
        {
            let store = Store::open_with(dir.path(), &options()).unwrap();
            ingest(&store, &mut seq, N, DEVICES, |i| base + i as u64);
            store.compact_application(APP);
        }
        let mut o = options();
        o.block_cache_bytes = sizes[v].1;
        let store = Store::open_with(dir.path(), &o).unwrap();
        let q = HistoryQuery {
            start_ms: 0,
            end_ms: u64::MAX - 1,
            limit: 10,
            order: Order::Desc,
            cursor: None,
        };
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let started = Instant::now();
        for _ in 0..READS {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let d = device_key(APP, &format!("dev-{:05}", x as usize % DEVICES));
            let page = store.history(&d, &q, usize::MAX).unwrap();
            assert_eq!(page.items.len(), 10);
        }
        vec![(
            "history reads/s",
            READS as f64 / started.elapsed().as_secs_f64(),
        )]
    });
}

fn expiry(n_rounds: usize) {
    const FILL: usize = 3_000_000;
    const DEVICES: usize = 1000;
    const WINDOW: Duration = Duration::from_secs(20);
    let names = ["none", "manual", "periodic"];
    rounds("expiry", &names, n_rounds, |v| {
        let dir = tempfile::tempdir().unwrap();
        let mut o = options();
        // The retention that makes 90 % of the fill expire is set below;
        // until then nothing expires and nothing is compacted for it.
        o.reclaim_interval = Duration::from_secs(1);
        o.retention = Retention::Unlimited;
        let base = now_ms() - 100 * DAY_MS;
        let step = (100 * DAY_MS) / FILL as u64;
        let mut seq = 0;
        {
            let store = Store::open_with(dir.path(), &o).unwrap();
            ingest(&store, &mut seq, FILL, DEVICES, |i| base + i as u64 * step);
            store.compact_application(APP);
        }
        let before = table_bytes(dir.path());
        if names[v] != "none" {
            o.retention = Retention::Ms(10 * DAY_MS);
        }
        if names[v] == "manual" {
            // No periodic compaction within the window: only the manual
            // one, the same work the reclaim thread does after
            // `PUT .../retention`.
            o.reclaim_interval = Duration::from_secs(86_400);
        }
        let store = Store::open_with(dir.path(), &o).unwrap();
        let expiring = (names[v] == "manual").then(|| {
            let store = store.clone();
            std::thread::spawn(move || {
                let t = Instant::now();
                store.compact_application(APP);
                t.elapsed()
            })
        });
        // Let the periodic compactions get scheduled (they need a file
        // older than the interval and a new version of the tree).
        std::thread::sleep(Duration::from_millis(1100));
        let started = Instant::now();
        let (mut written, mut busy) = (0.0, 0.0);
        while started.elapsed() < WINDOW {
            let n = 20 * BATCH;
            let rate = ingest(&store, &mut seq, n, DEVICES, |_| now_ms());
            written += n as f64;
            busy += n as f64 / rate;
        }
        let rate = written / busy;
        let expiry_s = expiring.map_or(0.0, |h| h.join().unwrap().as_secs_f64());
        vec![
            ("ingest states/s", rate),
            ("expiry compaction s", expiry_s),
            ("table MB before", before as f64 / 1e6),
            ("table MB after", table_bytes(dir.path()) as f64 / 1e6),
        ]
    });
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let n_rounds = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(3);
    match args.first().map(String::as_str) {
        Some("compression") => compression(n_rounds),
        Some("write_buffer") => write_buffer(n_rounds),
        Some("block_cache") => block_cache(n_rounds),
        Some("expiry") => expiry(n_rounds),
        _ => eprintln!(
            "usage: cargo bench --bench storage -- compression|write_buffer|block_cache|expiry [ROUNDS]"
        ),
    }
}
