//! Counters, latency histograms and errors, shared by every connection.
//!
//! Counters are atomics; latencies go into a few sharded HDR histograms
//! (microseconds, 3 significant digits) per step, each locked once per
//! batch of acknowledgements, not per message. Errors are rare and keyed by
//! kind in a map behind a mutex.
//!
//! With `--procs`, each child process exports its stats ([`StatsWire`]:
//! counters, errors, and every histogram in HDR's V2 serialization) and
//! the parent absorbs them into its own, so percentiles are of the merged
//! histograms, never averages of the children's percentiles.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Histograms per step; connections pick one by number.
const SHARDS: usize = 4;

pub fn new_histogram() -> Histogram<u64> {
    // Auto-resizing: starts small and grows to the largest value recorded.
    Histogram::new(3).expect("3 significant digits is valid")
}

#[derive(Debug)]
pub struct StepStats {
    /// Messages handed to the socket (HTTP: requests sent).
    pub sent: AtomicU64,
    /// Acknowledged: MQTT PUBACK with a success reason, HTTP 200.
    pub acked: AtomicU64,
    /// Sent and then refused, timed out or lost with their connection.
    pub failed: AtomicU64,
    hist: Vec<Mutex<Histogram<u64>>>,
}

impl StepStats {
    fn new() -> StepStats {
        StepStats {
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            hist: (0..SHARDS).map(|_| Mutex::new(new_histogram())).collect(),
        }
    }

    /// All latencies of this step so far (microseconds).
    pub fn histogram(&self) -> Histogram<u64> {
        let mut h = new_histogram();
        for s in &self.hist {
            h.add(&*s.lock().unwrap()).expect("auto-resizing histogram");
        }
        h
    }
}

#[derive(Debug)]
pub struct Stats {
    pub steps: Vec<StepStats>,
    pub connected: AtomicU64,
    pub connect_failed: AtomicU64,
    /// Paced messages only: how late the client handed each message to the
    /// socket after its scheduled time (µs). Large values mean the client
    /// (or a full in-flight window) held messages back.
    lag: Vec<Mutex<Histogram<u64>>>,
    /// Acknowledged messages: from the moment the client handed each to
    /// its connection to its acknowledgement (µs): the server and the
    /// network alone, without the client's own send lag.
    served: Vec<Mutex<Histogram<u64>>>,
    errors: Mutex<BTreeMap<String, u64>>,
    errors_total: AtomicU64,
}

impl Stats {
    pub fn new(steps: usize) -> Stats {
        Stats {
            steps: (0..steps.max(1)).map(|_| StepStats::new()).collect(),
            connected: AtomicU64::new(0),
            connect_failed: AtomicU64::new(0),
            lag: (0..SHARDS).map(|_| Mutex::new(new_histogram())).collect(),
            served: (0..SHARDS).map(|_| Mutex::new(new_histogram())).collect(),
            errors: Mutex::new(BTreeMap::new()),
            errors_total: AtomicU64::new(0),
        }
    }

    pub fn sent(&self, step: usize, n: u64) {
        self.steps[step].sent.fetch_add(n, Ordering::Relaxed);
    }

    /// `n` messages of `step` failed for reason `kind`.
    pub fn failed(&self, step: usize, kind: &str, n: u64) {
        if n == 0 {
            return;
        }
        self.steps[step].failed.fetch_add(n, Ordering::Relaxed);
        self.error(kind, n);
    }

    /// Counts an error of `kind` (a message or a connection event).
    pub fn error(&self, kind: &str, n: u64) {
        if n == 0 {
            return;
        }
        *self
            .errors
            .lock()
            .unwrap()
            .entry(kind.to_string())
            .or_insert(0) += n;
        self.errors_total.fetch_add(n, Ordering::Relaxed);
    }

    /// Records acknowledged messages of `step` with their latencies (µs).
    pub fn acked(&self, step: usize, shard: usize, latencies_us: &[u64]) {
        if latencies_us.is_empty() {
            return;
        }
        let st = &self.steps[step];
        st.acked
            .fetch_add(latencies_us.len() as u64, Ordering::Relaxed);
        record_all(&mut st.hist[shard % SHARDS].lock().unwrap(), latencies_us);
    }

    /// Records send lags (µs) of paced messages.
    pub fn lagged(&self, shard: usize, lags_us: &[u64]) {
        if !lags_us.is_empty() {
            record_all(&mut self.lag[shard % SHARDS].lock().unwrap(), lags_us);
        }
    }

    /// Records send → acknowledgement times (µs).
    pub fn served(&self, shard: usize, us: &[u64]) {
        if !us.is_empty() {
            record_all(&mut self.served[shard % SHARDS].lock().unwrap(), us);
        }
    }

    pub fn served_histogram(&self) -> Histogram<u64> {
        let mut h = new_histogram();
        for s in &self.served {
            h.add(&*s.lock().unwrap()).expect("auto-resizing histogram");
        }
        h
    }

    pub fn lag_histogram(&self) -> Histogram<u64> {
        let mut h = new_histogram();
        for s in &self.lag {
            h.add(&*s.lock().unwrap()).expect("auto-resizing histogram");
        }
        h
    }

    /// Acknowledged messages without latency (QoS 0 has none).
    pub fn acked_count(&self, step: usize, n: u64) {
        self.steps[step].acked.fetch_add(n, Ordering::Relaxed);
    }

    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.errors.lock().unwrap().clone()
    }

    pub fn errors_total(&self) -> u64 {
        self.errors_total.load(Ordering::Relaxed)
    }

    pub fn total_sent(&self) -> u64 {
        self.steps
            .iter()
            .map(|s| s.sent.load(Ordering::Relaxed))
            .sum()
    }

    pub fn total_acked(&self) -> u64 {
        self.steps
            .iter()
            .map(|s| s.acked.load(Ordering::Relaxed))
            .sum()
    }

    pub fn total_failed(&self) -> u64 {
        self.steps
            .iter()
            .map(|s| s.failed.load(Ordering::Relaxed))
            .sum()
    }

    /// Every latency recorded so far.
    pub fn histogram(&self) -> Histogram<u64> {
        let mut h = new_histogram();
        for s in &self.steps {
            h.add(s.histogram()).expect("auto-resizing histogram");
        }
        h
    }
}

/// One step's counters and latencies, as a child process sends them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepWire {
    pub sent: u64,
    pub acked: u64,
    pub failed: u64,
    /// The step's latency histogram ([`encode_histogram`]).
    pub latency: String,
}

/// Everything a [`Stats`] holds, as a child process sends it to the
/// parent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatsWire {
    pub steps: Vec<StepWire>,
    pub connected: u64,
    pub connect_failed: u64,
    pub lag: String,
    pub served: String,
    pub errors: BTreeMap<String, u64>,
}

impl Stats {
    /// Everything recorded so far, for the parent of a `--procs` run.
    pub fn export(&self) -> Result<StatsWire> {
        Ok(StatsWire {
            steps: self
                .steps
                .iter()
                .map(|st| {
                    Ok(StepWire {
                        sent: st.sent.load(Ordering::Relaxed),
                        acked: st.acked.load(Ordering::Relaxed),
                        failed: st.failed.load(Ordering::Relaxed),
                        latency: encode_histogram(&st.histogram())?,
                    })
                })
                .collect::<Result<_>>()?,
            connected: self.connected.load(Ordering::Relaxed),
            connect_failed: self.connect_failed.load(Ordering::Relaxed),
            lag: encode_histogram(&self.lag_histogram())?,
            served: encode_histogram(&self.served_histogram())?,
            errors: self.errors(),
        })
    }

    /// Adds a child's stats to these: counters add up and histograms are
    /// merged bucket by bucket.
    pub fn absorb(&self, w: &StatsWire) -> Result<()> {
        if w.steps.len() != self.steps.len() {
            bail!(
                "a child process reported {} steps, expected {}",
                w.steps.len(),
                self.steps.len()
            );
        }
        for (st, ws) in self.steps.iter().zip(&w.steps) {
            st.sent.fetch_add(ws.sent, Ordering::Relaxed);
            st.acked.fetch_add(ws.acked, Ordering::Relaxed);
            st.failed.fetch_add(ws.failed, Ordering::Relaxed);
            add_encoded(&st.hist[0], &ws.latency)?;
        }
        self.connected.fetch_add(w.connected, Ordering::Relaxed);
        self.connect_failed
            .fetch_add(w.connect_failed, Ordering::Relaxed);
        add_encoded(&self.lag[0], &w.lag)?;
        add_encoded(&self.served[0], &w.served)?;
        for (kind, n) in &w.errors {
            self.error(kind, *n);
        }
        Ok(())
    }
}

/// A histogram as text: HDR's V2 serialization (uncompressed: the pipe
/// is local, so compressing would only cost CPU) in base64.
pub fn encode_histogram(h: &Histogram<u64>) -> Result<String> {
    let mut bytes = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut bytes)
        .map_err(|e| anyhow::anyhow!("serializing a histogram: {e:?}"))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// The inverse of [`encode_histogram`].
pub fn decode_histogram(text: &str) -> Result<Histogram<u64>> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .context("a histogram's base64")?;
    Deserializer::new()
        .deserialize(&mut &bytes[..])
        .map_err(|e| anyhow::anyhow!("deserializing a histogram: {e:?}"))
}

fn add_encoded(into: &Mutex<Histogram<u64>>, text: &str) -> Result<()> {
    let h = decode_histogram(text)?;
    into.lock()
        .unwrap()
        .add(&h)
        .map_err(|e| anyhow::anyhow!("merging a histogram: {e:?}"))
}

fn record_all(h: &mut Histogram<u64>, values: &[u64]) {
    for &v in values {
        // Auto-resizing: `record` grows the histogram (saturating_record
        // would clamp to the current range instead).
        if h.record(v.max(1)).is_err() {
            h.saturating_record(v.max(1));
        }
    }
}

/// A growable bit set over sequence numbers (which messages were acked).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bits(Vec<u64>);

impl Bits {
    pub fn with_len(n: u64) -> Bits {
        Bits(vec![0; n.div_ceil(64) as usize])
    }

    pub fn set(&mut self, i: u64) {
        let w = (i / 64) as usize;
        if w >= self.0.len() {
            self.0.resize((w + 1).next_power_of_two(), 0);
        }
        self.0[w] |= 1 << (i % 64);
    }

    pub fn get(&self, i: u64) -> bool {
        self.0
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    pub fn count(&self) -> u64 {
        self.0.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Indexes of set bits, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().enumerate().flat_map(|(k, &w)| {
            (0..64)
                .filter(move |b| w & (1 << b) != 0)
                .map(move |b| k as u64 * 64 + b)
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn bits() {
        let mut b = Bits::default();
        for i in [0, 63, 64, 1000, 5] {
            b.set(i);
        }
        b.set(5);
        assert_eq!(b.count(), 5);
        assert!(b.get(1000) && b.get(0) && !b.get(1) && !b.get(100_000));
        assert_eq!(b.iter().collect::<Vec<_>>(), [0, 5, 63, 64, 1000]);
    }

    use super::*;

    #[test]
    fn counts_and_percentiles() {
        let s = Stats::new(2);
        let lats: Vec<u64> = (1..=1000).collect();
        s.sent(0, 1000);
        s.acked(0, 0, &lats[..500]);
        s.acked(0, 3, &lats[500..]);
        s.sent(1, 10);
        s.failed(1, "timeout", 10);
        s.error("disconnected", 1);
        assert_eq!(s.total_sent(), 1010);
        assert_eq!(s.total_acked(), 1000);
        assert_eq!(s.total_failed(), 10);
        assert_eq!(s.errors_total(), 11);
        assert_eq!(s.errors()["timeout"], 10);
        let h = s.histogram();
        assert_eq!(h.len(), 1000);
        let p99 = h.value_at_quantile(0.99);
        assert!((985..=995).contains(&p99), "{p99}");
        assert_eq!(s.steps[1].histogram().len(), 0);
    }

    #[test]
    fn absorbed_children_add_up_and_merge_histograms() {
        let a = Stats::new(1);
        let b = Stats::new(1);
        a.sent(0, 600);
        a.acked(0, 1, &(1..=600).collect::<Vec<_>>());
        a.lagged(0, &[5, 7]);
        a.served(2, &[100]);
        a.connected.fetch_add(2, Ordering::Relaxed);
        b.sent(0, 400);
        b.acked(0, 0, &(100_001..=100_400).collect::<Vec<_>>());
        b.failed(0, "timeout", 3);
        b.connect_failed.fetch_add(1, Ordering::Relaxed);
        let parent = Stats::new(1);
        parent.absorb(&a.export().unwrap()).unwrap();
        parent.absorb(&b.export().unwrap()).unwrap();
        assert_eq!(parent.total_sent(), 1000);
        assert_eq!(parent.total_acked(), 1000);
        assert_eq!(parent.total_failed(), 3);
        assert_eq!(parent.errors()["timeout"], 3);
        assert_eq!(parent.errors_total(), 3);
        assert_eq!(parent.connected.load(Ordering::Relaxed), 2);
        assert_eq!(parent.connect_failed.load(Ordering::Relaxed), 1);
        // The merged p50 lies in the first child's values and the p99 in
        // the second's: a percentile of the whole, not of either part.
        let h = parent.histogram();
        assert_eq!(h.len(), 1000);
        assert!((499..=501).contains(&h.value_at_quantile(0.5)));
        let p99 = h.value_at_quantile(0.99);
        assert!((100_300..=100_500).contains(&p99), "{p99}");
        assert_eq!(parent.lag_histogram().len(), 2);
        assert_eq!(parent.served_histogram().len(), 1);
        assert!(Stats::new(2).absorb(&a.export().unwrap()).is_err());
    }
}
