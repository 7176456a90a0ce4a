//! The group-commit writer: a bounded queue in front of one thread that
//! commits whatever queued as one RocksDB write batch and then completes
//! every request of that batch. Nothing is acknowledged before its batch is
//! in the WAL.
//!
//! source (HTTP, MQTT) → [`IngestQueue`] → writer thread → `Store::commit`
//! → completions (oneshot per HTTP request, a [`CommitSink`] per MQTT
//! session).

pub mod policy;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{oneshot, Notify};

use crate::auth::TokenEntry;
use crate::metrics::Metrics;
use crate::state::ParsedStates;
use crate::store::{DeviceKey, Position, Store, StoreError};
pub use policy::{BatchPolicy, Size};

/// Why an accepted request was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    #[error("the storage write failed")]
    Storage,
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// Why a request was not queued.
#[derive(thiserror::Error)]
pub enum EnqueueError {
    /// The queue is at its request or byte bound; the request comes back so
    /// a caller that can wait (MQTT) may retry it.
    #[error("write queue full")]
    Full(Box<WriteRequest>),
    #[error("writer stopped")]
    Closed,
    /// The request's token (or an ancestor) stopped being usable before the
    /// request could be queued: it is refused like an unknown token.
    #[error("token no longer usable")]
    Revoked,
}

/// How the writer reports the outcome of a request.
pub enum Completion {
    /// An HTTP request waiting for its response.
    Request(oneshot::Sender<Result<(), CommitError>>),
    /// A request of a connection that collects its outcomes itself (an
    /// MQTT session writing PUBACKs); `tag` identifies the request there.
    Sink { sink: Arc<dyn CommitSink>, tag: u16 },
    /// Nobody waits (MQTT QoS 0).
    None,
}

/// A connection that receives the outcomes of its requests in commit order
/// and is woken once per batch, not once per request.
pub trait CommitSink: Send + Sync {
    /// Records one outcome; returns true when the sink was empty before,
    /// i.e. when it must be woken after the batch.
    fn record(&self, tag: u16, r: Result<(), CommitError>) -> bool;
    /// Called once per batch for each sink that recorded something.
    fn wake(&self);
}

/// One request for the writer: the states of one HTTP request or one MQTT
/// publish, all for one device, committed together or not at all.
pub struct WriteRequest {
    /// The token the request was authorised with. It is checked again when
    /// the request is queued, so a request whose body arrived slowly is
    /// refused if its token was revoked meanwhile.
    pub grant: Arc<TokenEntry>,
    pub device: DeviceKey,
    /// The original body; `parsed` holds spans into it.
    pub body: Bytes,
    pub parsed: ParsedStates,
    pub done: Completion,
}

impl WriteRequest {
    pub fn size(&self) -> Size {
        Size {
            messages: self.parsed.states.len(),
            bytes: self.body.len() + self.parsed.composite.len(),
        }
    }

    fn complete(self, r: Result<(), CommitError>, wake: &mut Vec<Arc<dyn CommitSink>>) {
        match self.done {
            Completion::Request(tx) => {
                // The client may have gone away; nothing to tell then.
                let _ = tx.send(r);
            }
            Completion::Sink { sink, tag } => {
                if sink.record(tag, r) {
                    wake.push(sink);
                }
            }
            Completion::None => {}
        }
    }
}

enum Item {
    Write(WriteRequest),
    /// Sent once at shutdown, after the listeners have drained: commit
    /// what is queued and exit.
    Stop,
}

/// The producer side, shared by every listener.
pub struct IngestQueue {
    /// Bounded by `batch.queue_capacity` requests. When full, HTTP answers
    /// 503 and MQTT sessions stop reading their sockets until space frees.
    tx: crossbeam_channel::Sender<Item>,
    /// Payload bytes queued, bounded by `batch.queue_max_bytes`, so memory
    /// stays bounded even when every queued request is a maximal one.
    queued_bytes: Arc<AtomicUsize>,
    max_bytes: usize,
    closed: AtomicBool,
    /// Signalled by the writer whenever it takes requests off the queue.
    pub space: Arc<Notify>,
}

impl std::fmt::Debug for EnqueueError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EnqueueError::Full(_) => "Full",
            EnqueueError::Closed => "Closed",
            EnqueueError::Revoked => "Revoked",
        })
    }
}

impl IngestQueue {
    /// Queues a request without blocking. This is the moment a request is
    /// authorised for commit: its token must still be usable now.
    pub fn try_enqueue(&self, req: WriteRequest) -> Result<(), EnqueueError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(EnqueueError::Closed);
        }
        if !req.grant.usable(crate::timefmt::now_ms()) {
            return Err(EnqueueError::Revoked);
        }
        let bytes = req.size().bytes;
        let before = self.queued_bytes.fetch_add(bytes, Ordering::AcqRel);
        // One request is always admitted into an empty queue, so a body of
        // any permitted size can be stored.
        if before > 0 && before + bytes > self.max_bytes {
            self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
            return Err(EnqueueError::Full(Box::new(req)));
        }
        match self.tx.try_send(Item::Write(req)) {
            Ok(()) => Ok(()),
            Err(crossbeam_channel::TrySendError::Full(Item::Write(req))) => {
                self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
                Err(EnqueueError::Full(Box::new(req)))
            }
            Err(_) => {
                self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
                Err(EnqueueError::Closed)
            }
        }
    }

    pub fn depth(&self) -> usize {
        self.tx.len()
    }

    pub fn bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Relaxed)
    }
}

/// The running writer thread.
pub struct Writer {
    queue: Arc<IngestQueue>,
    thread: Option<JoinHandle<Result<(), StoreError>>>,
}

impl Writer {
    pub fn start(
        store: Store,
        policy: BatchPolicy,
        capacity: usize,
        max_bytes: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Writer, StoreError> {
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let space = Arc::new(Notify::new());
        let next_seq = store.load_seq()?;
        let worker = Worker {
            rx,
            store,
            policy,
            metrics,
            queued_bytes: queued_bytes.clone(),
            space: space.clone(),
            next_seq,
            scratch: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("sluice-writer".into())
            .spawn(move || worker.run())
            .map_err(|e| StoreError::Corrupt(format!("cannot start writer thread: {e}")))?;
        Ok(Writer {
            queue: Arc::new(IngestQueue {
                tx,
                queued_bytes,
                max_bytes,
                closed: AtomicBool::new(false),
                space,
            }),
            thread: Some(thread),
        })
    }

    pub fn queue(&self) -> Arc<IngestQueue> {
        self.queue.clone()
    }

    /// Stops accepting, commits everything queued, syncs the WAL and joins
    /// the thread. Blocking: call from `spawn_blocking` or outside tokio.
    pub fn stop(mut self) -> Result<(), StoreError> {
        self.queue.closed.store(true, Ordering::Release);
        // A blocking send: the queue may be full, and Stop must not be lost.
        let _ = self.queue.tx.send(Item::Stop);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(StoreError::Corrupt("writer thread panicked".into())),
            None => Ok(()),
        }
    }
}

struct Worker {
    rx: crossbeam_channel::Receiver<Item>,
    store: Store,
    policy: BatchPolicy,
    metrics: Arc<Metrics>,
    queued_bytes: Arc<AtomicUsize>,
    space: Arc<Notify>,
    next_seq: u64,
    /// Reused buffer for concatenating a device's composite operands.
    scratch: Vec<u8>,
}

impl Worker {
    fn run(mut self) -> Result<(), StoreError> {
        let mut carry: Option<WriteRequest> = None;
        let mut stopping = false;
        let mut batch: Vec<WriteRequest> = Vec::new();
        let mut wake: Vec<Arc<dyn CommitSink>> = Vec::new();
        loop {
            let first = match carry.take() {
                Some(r) => r,
                None if stopping => match self.rx.try_recv() {
                    Ok(Item::Write(r)) => r,
                    _ => break,
                },
                None => match self.rx.recv() {
                    Ok(Item::Write(r)) => r,
                    Ok(Item::Stop) => {
                        stopping = true;
                        continue;
                    }
                    Err(_) => break,
                },
            };
            let mut size = first.size();
            batch.push(first);
            while let Ok(item) = self.rx.try_recv() {
                match item {
                    Item::Write(r) => {
                        if !self.policy.admits(size, r.size()) {
                            carry = Some(r);
                            break;
                        }
                        size = size + r.size();
                        batch.push(r);
                    }
                    Item::Stop => stopping = true,
                }
            }
            self.queued_bytes.fetch_sub(
                batch.iter().map(|r| r.size().bytes).sum::<usize>(),
                Ordering::AcqRel,
            );
            self.space.notify_waiters();
            self.commit(&mut batch, size, &mut wake);
        }
        self.store.sync_wal()
    }

    fn commit(
        &mut self,
        batch: &mut Vec<WriteRequest>,
        size: Size,
        wake: &mut Vec<Arc<dyn CommitSink>>,
    ) {
        let started = Instant::now();
        let result = self.build_and_write(batch, size);
        let elapsed = started.elapsed();
        let outcome = match &result {
            Ok(()) => {
                self.metrics.batches.inc();
                self.metrics.messages_stored.inc_by(size.messages as u64);
                self.metrics.batch_messages.observe(size.messages as f64);
                self.metrics.commit_seconds.observe(elapsed.as_secs_f64());
                Ok(())
            }
            Err(e) => {
                self.metrics.commit_errors.inc();
                tracing::error!(error = %e, requests = batch.len(), "group commit failed");
                Err(CommitError::Storage)
            }
        };
        for req in batch.drain(..) {
            req.complete(outcome, wake);
        }
        for sink in wake.drain(..) {
            sink.wake();
        }
    }

    fn build_and_write(&mut self, batch: &[WriteRequest], size: Size) -> Result<(), StoreError> {
        // Keys add ~80 bytes per message on top of the payloads.
        let mut cb = self.store.batch(size.bytes + size.messages * 80 + 64);
        let mut seq = self.next_seq;
        // Composite operands per device, in request order. Concatenated
        // operands fold exactly like separate ones (entries are applied in
        // order, later wins on equal times), so each device gets one merge
        // per batch instead of one per request: far fewer memtable inserts
        // when devices stream.
        let mut composites: HashMap<&[u8], Vec<&[u8]>> = HashMap::new();
        for req in batch {
            for s in &req.parsed.states {
                let data = &req.body[s.data.start as usize..s.data.end as usize];
                let at = Position {
                    time_ms: s.time_ms,
                    seq,
                };
                self.store.put_state(&mut cb, &req.device, at, data)?;
                seq += 1;
            }
            if !req.parsed.composite.is_empty() {
                composites
                    .entry(&req.device)
                    .or_default()
                    .push(&req.parsed.composite);
            }
        }
        for (device, operands) in composites {
            if let [one] = operands.as_slice() {
                self.store.merge_composite(&mut cb, device, one)?;
            } else {
                self.scratch.clear();
                for op in operands {
                    self.scratch.extend_from_slice(op);
                }
                self.store.merge_composite(&mut cb, device, &self.scratch)?;
            }
        }
        self.store.commit(cb, seq)?;
        self.next_seq = seq;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SyncMode;
    use crate::state::{self, Shape};
    use crate::store::{device_key, HistoryQuery, Order};

    fn grant() -> Arc<TokenEntry> {
        Arc::new(TokenEntry::new_root())
    }

    fn request(body: &'static str, done: Completion) -> WriteRequest {
        let body = Bytes::from_static(body.as_bytes());
        let parsed = state::parse(&body, Shape::OneOrArray, 1).unwrap();
        WriteRequest {
            grant: grant(),
            device: device_key("a", "d"),
            body,
            parsed,
            done,
        }
    }

    #[derive(Default)]
    struct Recorded(std::sync::Mutex<Vec<(u16, Result<(), CommitError>)>>);

    impl CommitSink for Recorded {
        fn record(&self, tag: u16, r: Result<(), CommitError>) -> bool {
            let mut v = self.0.lock().unwrap();
            v.push((tag, r));
            v.len() == 1
        }
        fn wake(&self) {}
    }

    #[test]
    fn revoked_grant_is_refused_at_enqueue() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::None).unwrap();
        let policy = BatchPolicy {
            max_messages: 10,
            max_bytes: 1 << 20,
        };
        let w = Writer::start(store, policy, 16, 1 << 20, Arc::new(Metrics::new())).unwrap();
        let q = w.queue();
        let token = Arc::new(TokenEntry::new(
            "t".into(),
            "a".into(),
            crate::auth::Scopes::of(&[crate::auth::Scope::SendState]),
            crate::auth::Devices::All,
            None,
            None,
            None,
            crate::auth::Status::Active,
            0,
        ));
        let mut req = request(r#"{"data":{"x":1}}"#, Completion::None);
        req.grant = token.clone();
        assert!(q.try_enqueue(req).is_ok());
        token.set_status(crate::auth::Status::Inactive);
        let mut req = request(r#"{"data":{"x":1}}"#, Completion::None);
        req.grant = token;
        assert!(matches!(q.try_enqueue(req), Err(EnqueueError::Revoked)));
        w.stop().unwrap();
    }

    #[test]
    fn commits_then_completes_and_survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let store = Store::open(dir.path(), SyncMode::None).unwrap();
        let policy = BatchPolicy {
            max_messages: 2,
            max_bytes: 1 << 20,
        };
        let w = Writer::start(store.clone(), policy, 16, 1 << 20, metrics.clone()).unwrap();
        let q = w.queue();
        let mut rxs = vec![];
        for body in [
            r#"{"data":{"x":1},"time":5}"#,
            r#"[{"data":{"x":2},"time":6},{"data":{"x":3},"time":7},{"data":{"x":4},"time":8}]"#,
        ] {
            let (tx, rx) = oneshot::channel();
            q.try_enqueue(request(body, Completion::Request(tx)))
                .unwrap();
            rxs.push(rx);
        }
        for rx in rxs {
            assert_eq!(rx.blocking_recv().unwrap(), Ok(()));
        }
        let sink = Arc::new(Recorded::default());
        q.try_enqueue(request(
            r#"{"data":{"x":5},"time":9}"#,
            Completion::Sink {
                sink: sink.clone(),
                tag: 7,
            },
        ))
        .unwrap();
        w.stop().unwrap();
        assert_eq!(*sink.0.lock().unwrap(), vec![(7, Ok(()))]);
        assert!(matches!(
            q.try_enqueue(request(r#"{"data":{"x":1}}"#, Completion::None)),
            Err(EnqueueError::Closed)
        ));
        drop(store);

        let store = Store::open(dir.path(), SyncMode::None).unwrap();
        let page = store
            .history(
                &device_key("a", "d"),
                &HistoryQuery {
                    start_ms: 0,
                    end_ms: 100,
                    limit: 10,
                    order: Order::Asc,
                    cursor: None,
                },
            )
            .unwrap();
        let data: Vec<_> = page
            .items
            .iter()
            .map(|i| String::from_utf8(i.data.clone()).unwrap())
            .collect();
        assert_eq!(
            data,
            vec![
                r#"{"x":1}"#,
                r#"{"x":2}"#,
                r#"{"x":3}"#,
                r#"{"x":4}"#,
                r#"{"x":5}"#
            ]
        );
        assert_eq!(store.load_seq().unwrap(), 5);
        assert_eq!(metrics.messages_stored.get(), 5);
    }

    #[test]
    fn composite_operands_coalesced_per_device_fold_like_separate_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::None).unwrap();
        let policy = BatchPolicy {
            max_messages: 1000,
            max_bytes: 1 << 20,
        };
        let w =
            Writer::start(store.clone(), policy, 64, 1 << 20, Arc::new(Metrics::new())).unwrap();
        let q = w.queue();
        // Out-of-order times and a tie: the newest time wins, the later
        // write wins a tie, whatever batches the writer happens to form.
        for body in [
            r#"{"data":{"a":1,"b":1},"time":50}"#,
            r#"{"data":{"a":2},"time":10}"#,
            r#"{"data":{"b":2,"c":1},"time":50}"#,
            r#"{"data":{"c":2},"time":40}"#,
        ] {
            q.try_enqueue(request(body, Completion::None)).unwrap();
        }
        w.stop().unwrap();
        let v = store.composite(&device_key("a", "d")).unwrap().unwrap();
        assert_eq!(
            crate::composite::decoded(&v),
            vec![
                ("a".into(), 50, "1".into()),
                ("b".into(), 50, "2".into()),
                ("c".into(), 50, "1".into())
            ]
        );
    }

    #[test]
    fn byte_bound_rejects_but_never_starves_one_request() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::None).unwrap();
        let metrics = Arc::new(Metrics::new());
        let policy = BatchPolicy {
            max_messages: 100,
            max_bytes: 1 << 20,
        };
        // A tiny byte bound: the first request always fits, the second
        // only once the writer has taken the first.
        let w = Writer::start(store, policy, 16, 10, metrics).unwrap();
        let q = w.queue();
        let big = r#"{"data":{"x":"0123456789"}}"#;
        q.try_enqueue(request(big, Completion::None)).unwrap();
        // Either full (writer not yet drained) or accepted (drained): both
        // are correct; what must never happen is a lost request.
        let _ = q.try_enqueue(request(big, Completion::None));
        w.stop().unwrap();
        assert_eq!(q.bytes(), 0);
    }
}
