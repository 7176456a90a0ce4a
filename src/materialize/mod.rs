//! The materializer: in cluster mode every broker (unless
//! `cluster.materialize = false`) follows the ingest stream with its own
//! durable consumer and applies it, in stream order, to its local RocksDB
//! (history and composite state): the broker's read model.
//!
//! States go through the same `Records::add` + `Records::commit` path as
//! the standalone writer's batches (history, composite state, device
//! statistics, the log index, then the live hub), each numbered by its
//! stream sequence, and
//! the last applied sequence is written in the same write batch: a
//! restarted broker resumes exactly after it, and every broker's read
//! model ends up with the same content. A state's time is the one the
//! accepting broker fixed: the message's own `time`, or the receive time
//! it carries in a header, never this broker's clock. No limit that
//! depends on this broker's view is applied here (the attribute limit is
//! checked at ingest), so brokers cannot diverge.
//!
//! Control messages (`cluster::control`: removals, retention overrides)
//! cut a batch: the states before one are committed, then it is applied on
//! its own with its sequence as the position, then the states after it.
//! A removal marker first purges the stream of what it covers (retried,
//! like a failed write, until it succeeds), then removes the same from the
//! read model; since states are applied in stream order, everything of the
//! device or application in the read model at that point came before the
//! marker, and states after it stay.
//!
//! RocksDB work runs on the blocking pool; the follower on a tokio task.

pub mod applied;
pub mod status;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cluster::control::{purge, Control};
use crate::cluster::follow::{Follower, FollowerSpec};
use crate::cluster::names::unescape_into;
use crate::cluster::publish::received_ms;
use crate::cluster::reader::Record;
use crate::cluster::{Names, Nats};
use crate::cluster_metrics::ClusterMetrics;
use crate::ids::is_valid_id;
use crate::metrics::Metrics;
use crate::state::{self, ParsedStates, Shape};
use crate::store::{DeviceKey, Retention, Store, StoreError};
use crate::streams::Hub;
use crate::writer::{Numbered, Records, Scratch, Size};

#[derive(Debug, thiserror::Error)]
pub enum MaterializeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Stream(#[from] crate::cluster::stream::StreamError),
    #[error(transparent)]
    Control(#[from] crate::cluster::control::ControlError),
    #[error("the data directory holds states of a standalone broker; cluster mode builds its read model from the ingest stream alone, so start it with an empty data directory (or cluster.materialize = false)")]
    Standalone,
    #[error("the data directory is the read model of stream {found}, not of {expected} (another cluster.prefix?); start with an empty data directory")]
    OtherStream { found: String, expected: String },
    #[error("the read model has applied stream {stream} up to sequence {applied}, but the stream ends at {last}: it was deleted and created again; start this broker with an empty data directory")]
    StreamRecreated {
        stream: String,
        applied: u64,
        last: u64,
    },
}

/// Checks that `store` is (or may become) the read model of the ingest
/// stream and returns the stream sequence to apply next. Called at start:
/// a data directory holding standalone states, or the read model of
/// another or a recreated stream, is refused rather than mixed.
pub async fn prepare(store: &Store, nats: &Nats, names: &Names) -> Result<u64, MaterializeError> {
    let stream = names.state_stream();
    let (marker, next) = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || {
            Ok::<_, StoreError>((store.read_model_of()?, store.load_seq()?))
        })
        .await
        .map_err(|e| StoreError::Thread(e.to_string()))??
    };
    match marker {
        None if next > 0 => return Err(MaterializeError::Standalone),
        None => {
            let store = store.clone();
            let name = stream.clone();
            tokio::task::spawn_blocking(move || store.set_read_model_of(&name))
                .await
                .map_err(|e| StoreError::Thread(e.to_string()))??;
        }
        Some(found) if found != stream => {
            return Err(MaterializeError::OtherStream {
                found,
                expected: stream,
            })
        }
        Some(_) => {}
    }
    let applied = next.saturating_sub(1);
    let last = crate::cluster::stream::last_seq(nats, names).await?;
    if last < applied {
        return Err(MaterializeError::StreamRecreated {
            stream,
            applied,
            last,
        });
    }
    Ok(next.max(1))
}

/// What the materializer needs.
#[derive(Clone)]
pub struct MaterializerSpec {
    pub names: Names,
    pub node_id: String,
    /// Most stream messages applied in one write batch (`cluster.follow_batch`).
    pub batch: usize,
    /// Idle heartbeat of the follower, and how often the lag is measured.
    pub heartbeat: Duration,
    /// Raised after a removal is applied, so the local writer forgets the
    /// attribute names it recorded (the removed devices' names are gone;
    /// see `writer::cluster::StreamSink::forget_attributes`).
    pub forget_attributes: Arc<AtomicBool>,
}

/// The running materializer.
pub struct Materializer {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Materializer {
    /// Starts following the stream from sequence `next`. The returned
    /// receiver holds the last applied sequence.
    pub fn start(
        nats: &Nats,
        spec: MaterializerSpec,
        store: Store,
        hub: Arc<Hub>,
        next: u64,
        metrics: Arc<Metrics>,
        cluster_metrics: ClusterMetrics,
    ) -> (Materializer, watch::Receiver<u64>) {
        let applied_seq = next.saturating_sub(1);
        cluster_metrics.applied_seq.set(applied_seq as i64);
        let (applied, rx) = watch::channel(applied_seq);
        let stop = CancellationToken::new();
        let follower = Follower::new(
            nats,
            FollowerSpec {
                names: spec.names.clone(),
                node_id: spec.node_id.clone(),
                batch: spec.batch,
                heartbeat: spec.heartbeat,
            },
            next,
        );
        let apply = Apply {
            store,
            nats: nats.clone(),
            hub,
            names: spec.names.clone(),
            metrics,
            cluster_metrics: cluster_metrics.clone(),
            applied,
            scratch: Scratch::default(),
            forget_attributes: spec.forget_attributes.clone(),
        };
        let lag = lag_task(
            nats.clone(),
            spec.names,
            rx.clone(),
            cluster_metrics,
            spec.heartbeat.max(Duration::from_millis(250)),
            stop.clone(),
        );
        let tasks = vec![
            tokio::spawn(apply.run(follower, stop.clone())),
            tokio::spawn(lag),
        ];
        (Materializer { stop, tasks }, rx)
    }

    /// Stops following; a batch being applied is finished first.
    pub async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

struct Apply {
    store: Store,
    /// For the purge a removal marker makes.
    nats: Nats,
    /// Live consumers (SSE, MQTT subscriptions) on this broker, told about
    /// each applied batch after its commit, as the standalone writer does.
    hub: Arc<Hub>,
    names: Names,
    metrics: Arc<Metrics>,
    cluster_metrics: ClusterMetrics,
    applied: watch::Sender<u64>,
    /// Reused between batches by `Records::add`.
    scratch: Scratch,
    /// See [`MaterializerSpec::forget_attributes`].
    forget_attributes: Arc<AtomicBool>,
}

/// One applicable state of a batch.
struct Parsed {
    seq: u64,
    /// The accepting broker's receive time (device statistics).
    received_ms: u64,
    device: DeviceKey,
    record: usize,
    parsed: ParsedStates,
}

impl Apply {
    async fn run(mut self, mut follower: Follower, stop: CancellationToken) {
        let mut failing = false;
        loop {
            let batch = tokio::select! {
                _ = stop.cancelled() => break,
                b = follower.next_batch() => b,
            };
            let records = match batch {
                Ok(r) => r,
                Err(e) => {
                    // The follower recreates its consumer on the next call
                    // (after a growing pause), from where it stopped.
                    tracing::debug!(error = %e, "read-model follower interrupted");
                    continue;
                }
            };
            for piece in pieces(&self.names, records) {
                let last = piece.last_seq();
                let (this, result) = {
                    let this = self;
                    match this.apply_piece(piece).await {
                        Some(x) => x,
                        None => return,
                    }
                };
                self = this;
                match result {
                    Ok(()) => {
                        if failing {
                            tracing::warn!("the read model is written again");
                            failing = false;
                        }
                        self.applied.send_replace(last);
                        self.cluster_metrics.applied_seq.set(last as i64);
                    }
                    Err(e) => {
                        if !failing {
                            tracing::error!(error = %e, "cannot apply the stream to the read model; retrying from the same message");
                            failing = true;
                        }
                        if matches!(e, MaterializeError::Store(_)) {
                            self.metrics.commit_errors.inc();
                        }
                        follower.rewind(self.applied.borrow().saturating_add(1));
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                        break;
                    }
                }
            }
        }
    }

    /// Applies one piece of a batch; `None` when the blocking task died
    /// (the materializer stops).
    async fn apply_piece(mut self, piece: Piece) -> Option<(Apply, Result<(), MaterializeError>)> {
        let control = match piece {
            Piece::States(records) => {
                let outcome = tokio::task::spawn_blocking(move || {
                    let r = self.apply(&records).map_err(MaterializeError::from);
                    (self, r)
                })
                .await;
                return match outcome {
                    Ok(x) => Some(x),
                    Err(e) => {
                        tracing::error!(error = %e, "the read-model apply task failed; the materializer stops");
                        None
                    }
                };
            }
            Piece::Control(r) => r,
        };
        let parsed = Control::parse(&control.payload).filter(valid_control);
        if let Some(c) = &parsed {
            // The stream first: until the purge succeeded the marker is not
            // applied, so a broker stopped in between purges again after
            // its restart. Idempotent, whichever broker got there first.
            match purge(&self.nats, &self.names, c, control.seq).await {
                Ok(n) if n > 0 => {
                    tracing::info!(
                        purged = n,
                        marker = control.seq,
                        app = c.app(),
                        "states removed from the ingest stream"
                    )
                }
                Ok(_) => {}
                Err(e) => return Some((self, Err(e.into()))),
            }
        }
        let outcome = tokio::task::spawn_blocking(move || {
            let r = self.apply_control(parsed, control.seq);
            (self, r)
        })
        .await;
        match outcome {
            Ok(x) => Some(x),
            Err(e) => {
                tracing::error!(error = %e, "the read-model apply task failed; the materializer stops");
                None
            }
        }
    }

    /// Applies a control message at stream sequence `seq` (or skips one
    /// that is not valid, alike on every broker), with `seq + 1` as the
    /// read model's position in the same write. Blocking.
    fn apply_control(
        &mut self,
        control: Option<Control>,
        seq: u64,
    ) -> Result<(), MaterializeError> {
        let next = seq.saturating_add(1);
        match control {
            None => {
                self.cluster_metrics.materialize_skipped.inc();
                tracing::warn!(seq, "a control message that is not valid was skipped");
                self.store.commit(self.store.batch(64), next)?;
            }
            Some(Control::RemoveDevice { app, device }) => {
                self.store.remove_device_at(&app, &device, next)?;
                self.forget_attributes.store(true, Ordering::Release);
                tracing::info!(
                    app,
                    device,
                    marker = seq,
                    "device removed from the read model"
                );
            }
            Some(Control::RemoveApplication { app, tokens }) => {
                self.store.remove_application_at(&app, &tokens, next)?;
                self.forget_attributes.store(true, Ordering::Release);
                tracing::info!(app, marker = seq, "application removed from the read model");
            }
            Some(Control::SetRetention { app, retention }) => {
                // Checked by `valid_control`.
                let own = retention.map(|r| Retention::parse(&r)).transpose();
                let own = own.map_err(StoreError::Corrupt)?;
                self.store.set_retention_at(&app, own, next)?;
                tracing::info!(app, marker = seq, "retention override applied");
            }
        }
        Ok(())
    }

    /// Applies `records` as one write batch, with the last one's sequence
    /// as the read model's position. Blocking.
    fn apply(&mut self, records: &[Record]) -> Result<(), StoreError> {
        let started = Instant::now();
        let Some(last) = records.last() else {
            return Ok(());
        };
        let mut states = Vec::with_capacity(records.len());
        let mut skipped = 0u64;
        for (i, r) in records.iter().enumerate() {
            match self.parse(i, r) {
                Some(p) => states.push(p),
                None => skipped += 1,
            }
        }
        let size = Size {
            messages: states.len(),
            bytes: records.iter().map(|r| r.payload.len()).sum(),
        };
        let mut cb = self.store.batch(Records::capacity(size));
        let requests = || {
            states.iter().map(|p| Numbered {
                seq: p.seq,
                seen_ms: p.received_ms,
                device: &p.device,
                body: &records[p.record].payload,
                parsed: &p.parsed,
            })
        };
        let added = Records::add(&self.store, &mut cb, requests(), &mut self.scratch)?;
        Records::commit(
            &self.store,
            &self.hub,
            cb,
            last.seq.saturating_add(1),
            requests(),
        )?;
        self.metrics.batches.inc();
        self.metrics.messages_stored.inc_by(added as u64);
        self.metrics.batch_messages.observe(added as f64);
        self.metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        self.cluster_metrics.materialized.inc_by(added as u64);
        if skipped > 0 {
            self.cluster_metrics.materialize_skipped.inc_by(skipped);
            tracing::warn!(
                skipped,
                last = last.seq,
                "stream messages that are not valid states were skipped"
            );
        }
        Ok(())
    }

    /// The state a stream message holds, if it is one Sluice could have
    /// published: a state subject of valid ids and one valid state message.
    /// The same on every broker, so skipping never makes them diverge.
    fn parse(&self, record: usize, r: &Record) -> Option<Parsed> {
        let (app, device) = self.names.state_tokens(&r.subject)?;
        let mut key = DeviceKey::new();
        unescape_into(app, &mut key);
        let app_len = key.len();
        key.push(b'/');
        unescape_into(device, &mut key);
        let ids = std::str::from_utf8(&key).ok()?;
        if !is_valid_id(&ids[..app_len]) || !is_valid_id(&ids[app_len + 1..]) {
            return None;
        }
        key.push(b'/');
        // The accepting broker's receive time; the stream's own timestamp
        // (the same on every replica) for a message without one.
        let received = received_ms(r.headers.as_ref()).unwrap_or(r.stored_ms);
        let parsed = state::parse(&r.payload, Shape::One, received).ok()?;
        Some(Parsed {
            seq: r.seq,
            received_ms: received.max(0) as u64,
            device: key,
            record,
            parsed,
        })
    }
}

/// A run of states applied as one write batch, or one control message
/// applied on its own (so a removal covers exactly the states before it).
enum Piece {
    States(Vec<Record>),
    Control(Record),
}

impl Piece {
    fn last_seq(&self) -> u64 {
        match self {
            Piece::States(r) => r.last().map_or(0, |r| r.seq),
            Piece::Control(r) => r.seq,
        }
    }
}

/// `records` cut at every control message; a batch without any is one
/// piece, moved, not copied.
fn pieces(names: &Names, records: Vec<Record>) -> Vec<Piece> {
    if !records.iter().any(|r| names.is_control(&r.subject)) {
        return vec![Piece::States(records)];
    }
    let mut out = Vec::new();
    let mut run = Vec::new();
    for r in records {
        if names.is_control(&r.subject) {
            if !run.is_empty() {
                out.push(Piece::States(std::mem::take(&mut run)));
            }
            out.push(Piece::Control(r));
        } else {
            run.push(r);
        }
    }
    if !run.is_empty() {
        out.push(Piece::States(run));
    }
    out
}

/// Whether a control message is one Sluice could have published: valid
/// ids and, for an override, a valid retention.
fn valid_control(c: &Control) -> bool {
    is_valid_id(c.app())
        && match c {
            Control::RemoveDevice { device, .. } => is_valid_id(device),
            Control::RemoveApplication { .. } => true,
            Control::SetRetention { retention, .. } => retention
                .as_deref()
                .is_none_or(|r| Retention::parse(r).is_ok()),
        }
}

/// Measures how far the read model is behind the stream, every `every`.
async fn lag_task(
    nats: Nats,
    names: Names,
    applied: watch::Receiver<u64>,
    metrics: ClusterMetrics,
    every: Duration,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if let Ok(last) = crate::cluster::stream::last_applicable_seq(&nats, &names).await {
            let applied = *applied.borrow();
            metrics.lag.set(last.saturating_sub(applied) as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, subject: &str) -> Record {
        Record {
            seq,
            subject: subject.into(),
            payload: bytes::Bytes::new(),
            headers: None,
            pending: 0,
            stored_ms: 0,
        }
    }

    fn shape(pieces: &[Piece]) -> Vec<(char, Vec<u64>)> {
        pieces
            .iter()
            .map(|p| match p {
                Piece::States(r) => ('s', r.iter().map(|r| r.seq).collect()),
                Piece::Control(r) => ('c', vec![r.seq]),
            })
            .collect()
    }

    #[test]
    fn control_messages_cut_a_batch_where_they_stand() {
        let names = Names::new("p");
        let plain = vec![record(1, "p.state.a.d"), record(2, "p.state.a.e")];
        assert_eq!(
            shape(&pieces(&names, plain)),
            [('s', vec![1, 2])],
            "one piece without control messages"
        );
        let mixed = vec![
            record(3, "p.ctl.a"),
            record(4, "p.state.a.d"),
            record(5, "p.state.a.d"),
            record(6, "p.ctl.a"),
            record(7, "p.ctl.b"),
            record(8, "p.state.b.d"),
        ];
        assert_eq!(
            shape(&pieces(&names, mixed)),
            [
                ('c', vec![3]),
                ('s', vec![4, 5]),
                ('c', vec![6]),
                ('c', vec![7]),
                ('s', vec![8])
            ]
        );
        let ends_with_control = vec![record(9, "p.state.a.d"), record(10, "p.ctl.a")];
        let p = pieces(&names, ends_with_control);
        assert_eq!(p.last().map(Piece::last_seq), Some(10));
    }

    #[test]
    fn only_controls_sluice_could_publish_are_applied() {
        let ok = |c: Control| valid_control(&c);
        assert!(ok(Control::RemoveDevice {
            app: "a.b".into(),
            device: "d-1".into()
        }));
        assert!(!ok(Control::RemoveDevice {
            app: "a/b".into(),
            device: "d".into()
        }));
        assert!(!ok(Control::RemoveDevice {
            app: "a".into(),
            device: "".into()
        }));
        assert!(ok(Control::SetRetention {
            app: "a".into(),
            retention: None
        }));
        assert!(ok(Control::SetRetention {
            app: "a".into(),
            retention: Some("30d".into())
        }));
        assert!(!ok(Control::SetRetention {
            app: "a".into(),
            retention: Some("soon".into())
        }));
    }
}
