//! The group-commit writer: a bounded queue in front of one thread that
//! commits whatever queued as one RocksDB write batch and then completes
//! every request of that batch. Nothing is acknowledged before its batch is
//! in the WAL, and a batch that could not be written is answered with an
//! error, request by request.
//!
//! source (HTTP, MQTT) → [`IngestQueue`] → writer thread → `Store::commit`
//! → completions (oneshot per HTTP request, a [`CommitSink`] per MQTT
//! session).
//!
//! In cluster mode the writer thread hands each batch to the stream
//! backend (`cluster.rs`) instead of the store: completions come when the
//! ingest stream has stored the batch.

pub mod attributes;
pub mod cluster;
pub mod health;
pub mod policy;
mod wal_sync;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{oneshot, watch, Notify};

use crate::auth::TokenEntry;
use crate::config::{Config, SyncMode};
use crate::metrics::Metrics;
use crate::state::ParsedStates;
use crate::store::{CommitBatch, DeviceKey, DeviceStats, LogBuilder, Position, Store, StoreError};
use crate::streams::Hub;
use attributes::{AttributeLimit, Verdict};
pub use health::{Failure, Health};
pub use policy::{BatchPolicy, Size};

/// While commits fail and nothing is queued, how often the writer tries an
/// empty commit, so health turns good again without waiting for traffic.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Why an accepted request was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    #[error("the storage write failed")]
    Storage,
    /// The request would give its device more distinct attribute names
    /// than `storage.max_attributes_per_device`.
    #[error("the device would have more than {limit} attributes")]
    TooManyAttributes { limit: usize },
    /// Cluster mode: the ingest stream did not store the batch (nor ever
    /// will).
    #[error("the cluster's ingest stream did not store the batch")]
    Stream,
    /// Cluster mode: whether the ingest stream stored the batch could not
    /// be learned in time (NATS went away mid-commit): it may be stored.
    /// Answered so that the client resends (HTTP 504 `unconfirmed`, MQTT a
    /// closed connection without PUBACK), never as a refusal.
    #[error("the cluster's ingest stream did not confirm whether it stored the batch")]
    StreamUnknown,
}

/// What a stored request is told.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Committed {
    /// Cluster mode: the ingest stream's sequence of the request's last
    /// state (a read with `minSeq` at or below it sees the request on any
    /// broker). `None` standalone.
    pub seq: Option<u64>,
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

/// Why a removal was not done.
#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    #[error("writer stopped")]
    Closed,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Data the writer removes in order with ingest: everything queued before
/// the removal is committed first (and so removed with the rest), and
/// anything queued after it is stored after it. The writer also forgets
/// the attribute names it remembers for what it removed.
#[derive(Debug)]
pub enum Removal {
    /// A device's history, composite state and statistics.
    Device { app: String, device: String },
    /// Everything of an application, and these tokens of it (see
    /// `Store::remove_application`).
    Application { app: String, tokens: Vec<String> },
}

/// How the writer reports the outcome of a request.
pub enum Completion {
    /// An HTTP request waiting for its response.
    Request(oneshot::Sender<Result<Committed, CommitError>>),
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
    /// When the request (HTTP) or publish (MQTT) was received, for
    /// `sluice_ack_latency_seconds`.
    pub received: Instant,
}

impl WriteRequest {
    pub fn size(&self) -> Size {
        Size {
            messages: self.parsed.states.len(),
            bytes: self.body.len() + self.parsed.composite.len(),
        }
    }

    fn complete(self, r: Result<Committed, CommitError>, wake: &mut Vec<Arc<dyn CommitSink>>) {
        if r.is_err() {
            // Not stored: the rate budget it was charged goes back.
            self.grant.refund(self.parsed.states.len() as u32);
        }
        match self.done {
            Completion::Request(tx) => {
                // The client may have gone away; nothing to tell then.
                let _ = tx.send(r);
            }
            Completion::Sink { sink, tag } => {
                if sink.record(tag, r.map(|_| ())) {
                    wake.push(sink);
                }
            }
            Completion::None => {}
        }
    }
}

// Boxing the request would cost an allocation per request; the queue's
// slots are allocated once, so their size costs only memory
// (`batch.queue_capacity` × ~270 bytes).
#[allow(clippy::large_enum_variant)]
enum Item {
    Write(WriteRequest),
    /// An admin removal and the caller waiting for its commit.
    Remove(Removal, oneshot::Sender<Result<(), StoreError>>),
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

    /// Has the writer apply `r` after everything queued before it and
    /// waits until that is committed (fsynced). With the queue full it
    /// waits for room (on a blocking thread) rather than refuse an admin
    /// operation.
    pub async fn remove(&self, r: Removal) -> Result<(), RemoveError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(RemoveError::Closed);
        }
        let (done, outcome) = oneshot::channel();
        let tx = self.tx.clone();
        let sent = tokio::task::spawn_blocking(move || tx.send(Item::Remove(r, done)).is_ok())
            .await
            .map_err(|_| RemoveError::Closed)?;
        if !sent {
            return Err(RemoveError::Closed);
        }
        outcome
            .await
            .map_err(|_| RemoveError::Closed)?
            .map_err(RemoveError::Store)
    }

    pub fn depth(&self) -> usize {
        self.tx.len()
    }

    pub fn bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Relaxed)
    }
}

/// The writer's settings, from `[batch]` and `[storage]`.
#[derive(Clone, Copy, Debug)]
pub struct WriterConfig {
    pub policy: BatchPolicy,
    pub queue_capacity: usize,
    pub queue_max_bytes: usize,
    pub max_attributes_per_device: usize,
    pub attribute_cache_names: usize,
    /// With `storage.sync = "interval"`, how often the WAL is fsynced.
    pub sync_interval: Duration,
}

impl WriterConfig {
    pub fn new(c: &Config) -> WriterConfig {
        WriterConfig {
            policy: BatchPolicy {
                max_messages: c.batch.max_messages,
                max_bytes: c.batch.max_bytes,
            },
            queue_capacity: c.batch.queue_capacity,
            queue_max_bytes: c.batch.queue_max_bytes,
            max_attributes_per_device: c.storage.max_attributes_per_device,
            attribute_cache_names: c.storage.attribute_cache_names,
            sync_interval: Duration::from_millis(c.storage.sync_interval_ms),
        }
    }
}

/// The running writer thread (and, with `storage.sync = "interval"`, the
/// WAL sync thread beside it).
pub struct Writer {
    queue: Arc<IngestQueue>,
    thread: Option<JoinHandle<Result<(), StoreError>>>,
    wal_sync: Option<wal_sync::WalSyncer>,
    /// Becomes true when the writer thread ends, however it ends (return or
    /// panic); see [`Writer::exited`].
    exited: watch::Receiver<bool>,
}

/// Sets the writer's exit flag when dropped: on return and on unwinding.
struct ExitFlag(watch::Sender<bool>);

impl Drop for ExitFlag {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

impl Writer {
    /// Starts the writer of a standalone broker: batches go to `store`.
    pub fn start(
        store: Store,
        config: WriterConfig,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        hub: Arc<Hub>,
    ) -> Result<Writer, StoreError> {
        Self::start_to(store, config, metrics, health, hub, None)
    }

    /// Starts the writer of a cluster-mode broker: batches go to the ingest
    /// stream through `sink`, at most [`cluster::MAX_BATCH_MESSAGES`]
    /// states each whatever `batch.max_messages` says; `store` is only read
    /// (attribute names of the read model).
    pub fn start_clustered(
        store: Store,
        mut config: WriterConfig,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        hub: Arc<Hub>,
        sink: cluster::StreamSink,
    ) -> Result<Writer, StoreError> {
        config.policy.max_messages = config.policy.max_messages.min(cluster::MAX_BATCH_MESSAGES);
        Self::start_to(store, config, metrics, health, hub, Some(sink))
    }

    fn start_to(
        store: Store,
        config: WriterConfig,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        hub: Arc<Hub>,
        stream: Option<cluster::StreamSink>,
    ) -> Result<Writer, StoreError> {
        let (tx, rx) = crossbeam_channel::bounded(config.queue_capacity);
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let space = Arc::new(Notify::new());
        let next_seq = store.load_seq()?;
        let wal_sync = match store.sync_mode() {
            SyncMode::Interval => Some(
                wal_sync::WalSyncer::start(store.clone(), config.sync_interval, health.clone())
                    .map_err(|e| StoreError::Thread(e.to_string()))?,
            ),
            SyncMode::None | SyncMode::Always => None,
        };
        let worker = Worker {
            rx,
            store,
            policy: config.policy,
            metrics,
            health,
            attributes: AttributeLimit::new(
                config.max_attributes_per_device,
                config.attribute_cache_names,
            ),
            queued_bytes: queued_bytes.clone(),
            space: space.clone(),
            next_seq,
            scratch: Scratch::default(),
            refused: Vec::new(),
            stream,
            hub,
        };
        let (exit_tx, exited) = watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("sluice-writer".into())
            .spawn(move || {
                let _flag = ExitFlag(exit_tx);
                worker.run()
            })
            .map_err(|e| StoreError::Thread(e.to_string()))?;
        Ok(Writer {
            queue: Arc::new(IngestQueue {
                tx,
                queued_bytes,
                max_bytes: config.queue_max_bytes,
                closed: AtomicBool::new(false),
                space,
            }),
            thread: Some(thread),
            wal_sync,
            exited,
        })
    }

    pub fn queue(&self) -> Arc<IngestQueue> {
        self.queue.clone()
    }

    /// True once the writer thread has ended, for readiness.
    pub fn exit_flag(&self) -> watch::Receiver<bool> {
        self.exited.clone()
    }

    /// Resolves when the writer thread has ended. Before [`Writer::stop`]
    /// that means it died: nothing will drain the queue again.
    pub fn exited(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.exited.clone();
        async move {
            let _ = rx.wait_for(|ended| *ended).await;
        }
    }

    /// Stops accepting, commits everything queued, syncs the WAL and joins
    /// the thread. Blocking: call from `spawn_blocking` or outside tokio.
    pub fn stop(mut self) -> Result<(), StoreError> {
        self.queue.closed.store(true, Ordering::Release);
        // A blocking send: the queue may be full, and Stop must not be lost.
        // It fails only if the writer is gone, which the join reports.
        let _ = self.queue.tx.send(Item::Stop);
        let result = match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(panic)) => Err(StoreError::Thread(format!(
                "the writer thread panicked: {}",
                panic_message(&panic)
            ))),
            None => Ok(()),
        };
        if let Some(s) = self.wal_sync.take() {
            s.stop();
        }
        result
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

struct Worker {
    rx: crossbeam_channel::Receiver<Item>,
    store: Store,
    policy: BatchPolicy,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    attributes: AttributeLimit,
    queued_bytes: Arc<AtomicUsize>,
    space: Arc<Notify>,
    next_seq: u64,
    /// Reused buffers for building each batch's records.
    scratch: Scratch,
    /// Per request of the current batch, why it is refused regardless of
    /// the commit (reused between batches).
    refused: Vec<Option<CommitError>>,
    /// Cluster mode: batches go to the ingest stream instead of `store`.
    stream: Option<cluster::StreamSink>,
    /// Live consumers, told about each batch after its commit (standalone;
    /// in cluster mode the materializer tells them).
    hub: Arc<Hub>,
}

impl Worker {
    fn run(mut self) -> Result<(), StoreError> {
        let mut carry: Option<Item> = None;
        let mut stopping = false;
        let mut batch: Vec<WriteRequest> = Vec::new();
        let mut wake: Vec<Arc<dyn CommitSink>> = Vec::new();
        loop {
            let next = match carry.take() {
                Some(item) => item,
                None if stopping => match self.rx.try_recv() {
                    Ok(item) => item,
                    Err(_) => break,
                },
                None if self.health.is_failing(Failure::Commit) => {
                    match self.rx.recv_timeout(PROBE_EVERY) {
                        Ok(item) => item,
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                            self.probe();
                            continue;
                        }
                        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
                    }
                }
                None => match self.rx.recv() {
                    Ok(item) => item,
                    Err(_) => break,
                },
            };
            let first = match next {
                Item::Write(r) => r,
                Item::Remove(r, done) => {
                    self.remove(r, done);
                    continue;
                }
                Item::Stop => {
                    stopping = true;
                    continue;
                }
            };
            let mut size = first.size();
            batch.push(first);
            while let Ok(item) = self.rx.try_recv() {
                match item {
                    Item::Write(r) => {
                        if !self.policy.admits(size, r.size()) {
                            carry = Some(Item::Write(r));
                            break;
                        }
                        size = size + r.size();
                        batch.push(r);
                    }
                    // What came before the removal is committed first.
                    Item::Remove(..) => {
                        carry = Some(item);
                        break;
                    }
                    Item::Stop => stopping = true,
                }
            }
            self.queued_bytes.fetch_sub(
                batch.iter().map(|r| r.size().bytes).sum::<usize>(),
                Ordering::AcqRel,
            );
            self.space.notify_waiters();
            if self.stream.is_some() {
                self.publish(&mut batch, &mut wake);
            } else {
                self.commit(&mut batch, size, &mut wake);
            }
        }
        if let Some(stream) = self.stream.take() {
            stream.finish();
        }
        self.store.sync_wal()
    }

    /// Cluster mode: applies the attribute limit and hands the batch to the
    /// stream backend, which answers its requests once the stream has
    /// stored it (or not).
    fn publish(&mut self, batch: &mut Vec<WriteRequest>, wake: &mut Vec<Arc<dyn CommitSink>>) {
        if self.stream.as_ref().is_some_and(|s| s.take_forget()) {
            self.attributes.forget();
        }
        if let Err(e) = self.check_attributes(batch) {
            // The read model could not be read: the batch is refused as a
            // standalone broker refuses a failed commit (health is the
            // stream's to report here; nothing was written).
            self.metrics.commit_errors.inc();
            self.attributes.forget();
            tracing::error!(error = %e, requests = batch.len(), "cannot read attribute names from the read model; refusing the batch");
            for (req, _) in batch.drain(..).zip(self.refused.drain(..)) {
                req.complete(Err(CommitError::Storage), wake);
            }
            for sink in wake.drain(..) {
                sink.wake();
            }
            return;
        }
        self.count_refusals();
        let requests = std::mem::take(batch);
        let refused = std::mem::take(&mut self.refused);
        if let Some(stream) = self.stream.as_mut() {
            stream.hand_off(requests, refused);
        }
    }

    fn count_refusals(&self) {
        let refused = self.refused.iter().filter(|r| r.is_some()).count();
        if refused > 0 {
            self.metrics.attribute_limit_refusals.inc_by(refused as u64);
        }
    }

    fn commit(
        &mut self,
        batch: &mut Vec<WriteRequest>,
        size: Size,
        wake: &mut Vec<Arc<dyn CommitSink>>,
    ) {
        let started = Instant::now();
        let result = self.check_and_write(batch, size);
        let elapsed = started.elapsed();
        self.count_refusals();
        // Ack latency is counted per batch: the longest of the batch, its
        // oldest request's, from receipt to the moment its acknowledgement
        // is released.
        let oldest = batch.iter().map(|r| r.received).min();
        let outcome = match result {
            Ok(stored) => {
                self.metrics.batches.inc();
                self.metrics.messages_stored.inc_by(stored as u64);
                self.metrics.batch_messages.observe(stored as f64);
                self.metrics.commit_seconds.observe(elapsed.as_secs_f64());
                self.recovered();
                Ok(Committed::default())
            }
            Err(e) => {
                self.failed(&e, batch.len());
                Err(CommitError::Storage)
            }
        };
        // Observed before the completions, so whoever holds an
        // acknowledgement also finds it counted.
        if let (Ok(_), Some(oldest)) = (outcome, oldest) {
            self.metrics
                .ack_latency_seconds
                .observe(oldest.elapsed().as_secs_f64());
        }
        for (req, refused) in batch.drain(..).zip(self.refused.drain(..)) {
            req.complete(refused.map_or(outcome, Err), wake);
        }
        for sink in wake.drain(..) {
            sink.wake();
        }
    }

    /// A commit failed: every request of the batch is answered with an
    /// error, the attribute names recorded for them are forgotten (they
    /// were not stored), and health says so until a commit succeeds.
    fn failed(&mut self, e: &StoreError, requests: usize) {
        self.metrics.commit_errors.inc();
        self.attributes.forget();
        if self.health.fail(Failure::Commit, e) {
            tracing::error!(error = %e, requests, "group commit failed; answering its requests with errors until storage works again");
        } else {
            tracing::debug!(error = %e, requests, "group commit failed again");
        }
    }

    fn recovered(&self) {
        if self.health.recover(Failure::Commit) {
            tracing::warn!("group commits succeed again");
        }
    }

    /// Applies an admin removal between two batches and answers it.
    fn remove(&mut self, r: Removal, done: oneshot::Sender<Result<(), StoreError>>) {
        let result = match &r {
            Removal::Device { app, device } => {
                self.attributes
                    .forget_device(&crate::store::device_key(app, device));
                self.store.remove_device(app, device)
            }
            Removal::Application { app, tokens } => {
                self.attributes.forget_application(app);
                self.store.remove_application(app, tokens)
            }
        };
        if let Err(e) = &result {
            tracing::error!(error = %e, removal = ?r, "removal failed");
        }
        // The caller may have stopped waiting; the removal is done anyway.
        let _ = done.send(result);
    }

    /// While commits fail and no request comes, an empty commit (only the
    /// sequence number) tells when storage works again.
    fn probe(&mut self) {
        if self.stream.is_some() {
            // Cluster mode: the materializer owns the store's writes.
            return;
        }
        let cb = self.store.batch(64);
        match self.store.commit(cb, self.next_seq) {
            Ok(()) => self.recovered(),
            Err(e) => {
                let _ = self.health.fail(Failure::Commit, &e);
            }
        }
    }

    /// Applies the attribute limit to each request: fills `self.refused`
    /// with one entry per request (on an error, `None` for each, since the
    /// caller fails the batch as a whole).
    fn check_attributes(&mut self, batch: &[WriteRequest]) -> Result<(), StoreError> {
        self.refused.clear();
        for req in batch {
            let refused = match self
                .attributes
                .admit(&self.store, &req.device, &req.parsed.names)
            {
                Ok(Verdict::Fits) => None,
                Ok(Verdict::TooMany { limit }) => Some(CommitError::TooManyAttributes { limit }),
                Err(e) => {
                    self.refused.clear();
                    self.refused.resize(batch.len(), None);
                    return Err(e);
                }
            };
            self.refused.push(refused);
        }
        Ok(())
    }

    /// Applies the attribute limit to each request, writes the others as
    /// one batch, and returns how many states were stored. Fills
    /// `self.refused` with one entry per request.
    fn check_and_write(&mut self, batch: &[WriteRequest], size: Size) -> Result<usize, StoreError> {
        self.check_attributes(batch)?;
        let refused = &self.refused;
        let first = self.next_seq;
        let seen_ms = crate::timefmt::now_ms().max(0) as u64;
        let admitted = || {
            Records::numbered(
                first,
                seen_ms,
                batch
                    .iter()
                    .zip(refused)
                    .filter(|(_, r)| r.is_none())
                    .map(|(req, _)| (&req.device[..], &req.body, &req.parsed)),
            )
        };
        let mut cb = self.store.batch(Records::capacity(size));
        let stored = Records::add(&self.store, &mut cb, admitted(), &mut self.scratch)?;
        let next_seq = first + stored as u64;
        Records::commit(&self.store, &self.hub, cb, next_seq, admitted())?;
        self.next_seq = next_seq;
        Ok(stored)
    }
}

/// The records one batch writes, shared with the writer bench's raw
/// baseline so both write exactly the same (and, in cluster mode, with the
/// materializer that applies the stream).
pub struct Records;

/// One request as [`Records`] takes it: the device key (`{app}/{device}/`),
/// the body and the body's parse.
pub type Request<'a> = (&'a [u8], &'a Bytes, &'a ParsedStates);

/// Buffers reused from batch to batch while building records.
#[derive(Default)]
pub struct Scratch {
    /// A device's composite operands, concatenated.
    composite: Vec<u8>,
    /// The batch's log index records (one per application).
    log: LogBuilder,
}

/// Splits a device key `{app}/{device}/` into its ids. Keys are built from
/// validated ids (ASCII without `/`), so this only fails on a bug.
fn split_device_key(key: &[u8]) -> Option<(&str, &str)> {
    let key = std::str::from_utf8(key).ok()?;
    let (app, rest) = key.split_once('/')?;
    Some((app, rest.strip_suffix('/')?))
}

impl Records {
    /// A write-batch size hint for `size`: keys add ~80 bytes per message.
    pub fn capacity(size: Size) -> usize {
        size.bytes + size.messages * 80 + 64
    }

    /// Adds every state of `requests`, one composite merge and one
    /// statistics merge (states stored, seen at each request's `seen_ms`)
    /// per device and one log index record per application to `cb`;
    /// returns how many states it added. `scratch` holds reusable buffers.
    ///
    /// Each request names the position (sequence number) of its first
    /// state; the others follow it consecutively. The writer numbers a
    /// batch from its own counter ([`Records::numbered`]); the cluster
    /// materializer gives each state its stream sequence, which is not
    /// contiguous across requests. Positions must never repeat for a
    /// device at one time (they order states of the same millisecond), and
    /// they grow from batch to batch (the log index and live streams rely
    /// on it).
    ///
    /// Composite operands are concatenated per device, in request order.
    /// Concatenated operands fold exactly like separate ones (entries are
    /// applied in order, later wins on equal times), so each device gets
    /// one merge per batch instead of one per request: far fewer memtable
    /// inserts when devices stream. The statistics ride on the same
    /// per-device grouping, so the device list costs one small merge per
    /// device per batch and no read. The log index is one record per
    /// application for the same reason (see `store::log`).
    pub fn add<'a>(
        store: &Store,
        cb: &mut CommitBatch,
        requests: impl Iterator<Item = Numbered<'a>>,
        scratch: &mut Scratch,
    ) -> Result<usize, StoreError> {
        let mut devices: HashMap<&[u8], PerDevice<'_>> = HashMap::new();
        let mut added = 0;
        scratch.log.clear();
        for Numbered {
            seq,
            seen_ms,
            device,
            body,
            parsed,
        } in requests
        {
            let (app, dev) =
                split_device_key(device).ok_or_else(|| StoreError::Corrupt("device key".into()))?;
            for (i, s) in parsed.states.iter().enumerate() {
                let data = &body[s.data.start as usize..s.data.end as usize];
                let at = Position {
                    time_ms: s.time_ms,
                    seq: seq + i as u64,
                };
                store.put_state(cb, device, at, data)?;
                scratch
                    .log
                    .push(app.as_bytes(), dev.as_bytes(), s.time_ms, seq + i as u64);
            }
            added += parsed.states.len();
            let d = devices.entry(device).or_insert_with(PerDevice::new);
            d.stats.messages += parsed.states.len() as u64;
            d.stats.first_seen_ms = d.stats.first_seen_ms.min(seen_ms);
            d.stats.last_seen_ms = d.stats.last_seen_ms.max(seen_ms);
            if !parsed.composite.is_empty() {
                d.operands.push(&parsed.composite);
            }
        }
        for (device, d) in devices {
            match d.operands.as_slice() {
                [] => {}
                [one] => store.merge_composite(cb, device, one)?,
                more => {
                    scratch.composite.clear();
                    for op in more {
                        scratch.composite.extend_from_slice(op);
                    }
                    store.merge_composite(cb, device, &scratch.composite)?;
                }
            }
            if d.stats.messages > 0 {
                store.merge_device_stats(cb, device, &d.stats)?;
            }
        }
        scratch.log.write(store, cb)?;
        Ok(added)
    }

    /// Numbers `requests` consecutively from `first`, all seen at
    /// `seen_ms`, as the writer does.
    pub fn numbered<'a>(
        first: u64,
        seen_ms: u64,
        requests: impl Iterator<Item = Request<'a>>,
    ) -> impl Iterator<Item = Numbered<'a>> {
        requests.scan(first, move |next, (device, body, parsed)| {
            let seq = *next;
            *next += parsed.states.len() as u64;
            Some(Numbered {
                seq,
                seen_ms,
                device,
                body,
                parsed,
            })
        })
    }

    /// Commits `cb` (recording `next_seq`) and then hands its states to
    /// the live consumers: `requests` must be exactly what `add` was
    /// given. After the commit, so a consumer never sees a state that is
    /// not stored; and checked after it, so a consumer that subscribes
    /// meanwhile finds the batch in storage instead.
    pub fn commit<'a>(
        store: &Store,
        hub: &Hub,
        cb: CommitBatch,
        next_seq: u64,
        requests: impl Iterator<Item = Numbered<'a>>,
    ) -> Result<(), StoreError> {
        store.commit(cb, next_seq)?;
        let Some(mut live) = hub.publisher() else {
            return Ok(());
        };
        for Numbered {
            seq,
            device,
            body,
            parsed,
            ..
        } in requests
        {
            let Some((app, dev)) = split_device_key(device) else {
                continue;
            };
            for (i, s) in parsed.states.iter().enumerate() {
                let data = body.slice(s.data.start as usize..s.data.end as usize);
                live.add(app, dev, seq + i as u64, s.time_ms, data);
            }
        }
        live.publish();
        Ok(())
    }
}

/// One request for [`Records::add`]: its states are numbered `seq`,
/// `seq + 1`, ...
pub struct Numbered<'a> {
    pub seq: u64,
    /// When the request was received (epoch ms), for the device list's
    /// statistics: the writer's commit time, or in cluster mode the
    /// accepting broker's receive time, so every read model agrees.
    pub seen_ms: u64,
    /// The device's key prefix (`store::device_key`).
    pub device: &'a [u8],
    /// The body `parsed` holds spans into.
    pub body: &'a Bytes,
    pub parsed: &'a ParsedStates,
}

/// What one batch holds for one device.
struct PerDevice<'a> {
    /// Composite operands, in request order.
    operands: Vec<&'a [u8]>,
    /// States stored and the span of their `seen_ms`.
    stats: DeviceStats,
}

impl PerDevice<'_> {
    fn new() -> Self {
        PerDevice {
            operands: Vec::new(),
            stats: DeviceStats {
                first_seen_ms: u64::MAX,
                last_seen_ms: 0,
                messages: 0,
            },
        }
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

    fn start(
        store: Store,
        policy: BatchPolicy,
        queue_capacity: usize,
        queue_max_bytes: usize,
        metrics: Arc<Metrics>,
    ) -> Writer {
        let config = WriterConfig {
            policy,
            queue_capacity,
            queue_max_bytes,
            max_attributes_per_device: 3,
            attribute_cache_names: 100,
            sync_interval: Duration::from_millis(10),
        };
        Writer::start(
            store,
            config,
            metrics,
            Arc::new(Health::default()),
            Arc::new(Hub::new(1 << 20, Default::default())),
        )
        .unwrap()
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
            received: Instant::now(),
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
        let w = start(store, policy, 16, 1 << 20, Arc::new(Metrics::new()));
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
        let w = start(store.clone(), policy, 16, 1 << 20, metrics.clone());
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
            assert_eq!(rx.blocking_recv().unwrap(), Ok(Committed::default()));
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
                usize::MAX,
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
        let w = start(store.clone(), policy, 64, 1 << 20, Arc::new(Metrics::new()));
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

    /// A sink whose `record` panics: a bug that kills the writer thread.
    struct Panics;

    impl CommitSink for Panics {
        fn record(&self, _: u16, _: Result<(), CommitError>) -> bool {
            panic!("a bug in a sink")
        }
        fn wake(&self) {}
    }

    #[test]
    fn a_dead_writer_is_noticed_and_its_queue_closes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::None).unwrap();
        let policy = BatchPolicy {
            max_messages: 1,
            max_bytes: 1 << 20,
        };
        let w = start(store, policy, 16, 1 << 20, Arc::new(Metrics::new()));
        let q = w.queue();
        let exited = w.exited();
        q.try_enqueue(request(
            r#"{"data":{"x":1}}"#,
            Completion::Sink {
                sink: Arc::new(Panics),
                tag: 1,
            },
        ))
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), exited).await })
            .expect("the writer's death is signalled");
        // Nobody drains the queue any more: requests are refused, not held.
        assert!(matches!(
            q.try_enqueue(request(r#"{"data":{"x":2}}"#, Completion::None)),
            Err(EnqueueError::Closed)
        ));
        let err = w.stop().unwrap_err().to_string();
        assert!(err.contains("a bug in a sink"), "{err}");
    }

    #[test]
    fn attribute_limit_refuses_whole_requests_and_stores_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::None).unwrap();
        let metrics = Arc::new(Metrics::new());
        let policy = BatchPolicy {
            max_messages: 1000,
            max_bytes: 1 << 20,
        };
        // At most 3 attribute names per device (see `start`).
        let w = start(store.clone(), policy, 64, 1 << 20, metrics.clone());
        let q = w.queue();
        let mut rxs = vec![];
        for body in [
            r#"{"data":{"a":1,"b":1},"time":1}"#,
            r#"[{"data":{"c":1},"time":2},{"data":{"d":1},"time":3}]"#,
            r#"{"data":{"c":2},"time":4}"#,
            r#"{"data":{"a":3,"b":3,"c":3},"time":5}"#,
            r#"{"data":{"e":1},"time":6}"#,
        ] {
            let (tx, rx) = oneshot::channel();
            q.try_enqueue(request(body, Completion::Request(tx)))
                .unwrap();
            rxs.push(rx);
        }
        let outcomes: Vec<_> = rxs
            .into_iter()
            .map(|rx| rx.blocking_recv().unwrap())
            .collect();
        let too_many = Err(CommitError::TooManyAttributes { limit: 3 });
        let ok = Ok(Committed::default());
        assert_eq!(outcomes, vec![ok, too_many, ok, ok, too_many]);
        w.stop().unwrap();
        let v = store.composite(&device_key("a", "d")).unwrap().unwrap();
        assert_eq!(
            crate::composite::decoded(&v),
            vec![
                ("a".into(), 5, "3".into()),
                ("b".into(), 5, "3".into()),
                ("c".into(), 5, "3".into())
            ]
        );
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
                usize::MAX,
            )
            .unwrap();
        let times: Vec<u64> = page.items.iter().map(|i| i.at.time_ms).collect();
        assert_eq!(times, vec![1, 4, 5], "nothing of a refused request stored");
        assert_eq!(metrics.messages_stored.get(), 3);
        assert_eq!(metrics.attribute_limit_refusals.get(), 2);
    }

    #[test]
    fn interval_sync_runs_beside_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::Interval).unwrap();
        let policy = BatchPolicy {
            max_messages: 10,
            max_bytes: 1 << 20,
        };
        let w = start(store.clone(), policy, 16, 1 << 20, Arc::new(Metrics::new()));
        let (tx, rx) = oneshot::channel();
        w.queue()
            .try_enqueue(request(r#"{"data":{"x":1}}"#, Completion::Request(tx)))
            .unwrap();
        assert_eq!(rx.blocking_recv().unwrap(), Ok(Committed::default()));
        std::thread::sleep(Duration::from_millis(50));
        w.stop().unwrap();
        assert_eq!(store.load_seq().unwrap(), 1);
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
        let w = start(store, policy, 16, 10, metrics);
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
