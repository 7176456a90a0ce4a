//! The writer's cluster backend. In cluster mode a batch is not written to
//! RocksDB: the writer thread checks it (attribute limit) and hands it to
//! a task that publishes it to the ingest stream as one atomic batch (one
//! message per state, see `cluster::publish`), several batches in flight.
//! Requests are answered when the stream has acknowledged their batch.
//! Batches are written to the stream one after the other in hand-off order
//! (`Publisher` sends them whole, in order), while their acknowledgements
//! are awaited together and answered as they come: a batch whose outcome
//! takes long to learn holds back only its own requests, never the
//! refusal of the ones behind it. An MQTT session still sends its PUBACKs
//! in publish order (`mqtt::acks` matches outcomes by packet id and holds
//! back later ones). The broker's read model is built from the stream by
//! the materializer, like every other broker's.
//!
//! Outcomes (the caller rules of `Publisher::publish_batch`):
//! - stored: each request is told the stream sequence of its last state;
//! - not stored (refused, unreachable, or fenced after a timeout): every
//!   request is answered with an error, and nothing of it is ever stored;
//! - unknown (NATS stopped answering mid-publish and the fence could not
//!   be confirmed either): the batch is settled by its fence alone, never
//!   sent again, until the stream answers. If that takes longer than
//!   [`settle_window`] (about two publish timeouts; or the broker shuts
//!   down), its requests are answered with an error that says the batch
//!   may be stored (HTTP 503 with that detail); counted as `unsettled` and
//!   logged. Devices resend, so at worst a state is stored twice: never
//!   lost, and no request is held for longer than a device waits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{split_device_key, CommitError, CommitSink, Committed, Failure, Health, WriteRequest};
use crate::cluster::publish::{PublishError, Publisher, StateMessage, Stored};
use crate::cluster::Names;
use crate::cluster_metrics::ClusterMetrics;
use prometheus_client::metrics::histogram::Histogram;

/// Most messages in one atomic batch (`cluster::publish::MAX_BATCH`); the
/// writer's batch policy is capped at this in cluster mode.
pub const MAX_BATCH_MESSAGES: usize = crate::cluster::publish::MAX_BATCH;

/// While publishes fail, how often the stream is probed.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Longest wait for one probe's answer (a stream that takes longer is not
/// back in any useful sense).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// One batch on its way from the writer thread to the stream.
pub(super) struct Handoff {
    number: u64,
    requests: Vec<WriteRequest>,
    /// Per request, why it is refused whatever the stream does.
    refused: Vec<Option<CommitError>>,
    handed_at: Instant,
}

/// The writer thread's end of the backend.
pub struct StreamSink {
    /// Capacity 1: one batch waits while the publisher has its maximum in
    /// flight. When it is full the writer thread blocks, the ingest queue
    /// fills (HTTP 503, MQTT stops reading) and the next batch grows, up
    /// to the atomic batch limit: backpressure with bounded memory.
    tx: mpsc::Sender<Handoff>,
    /// Set by the publisher when a batch was not stored (the attribute
    /// names the writer recorded for it were never stored), and by the
    /// materializer when it applied a removal (the removed devices' names
    /// are gone): the writer forgets the names it recorded.
    forget_attributes: Arc<AtomicBool>,
    /// Resolves when the publisher task has answered every batch.
    finished: oneshot::Receiver<()>,
    /// Set at shutdown: a batch being settled gets one more fence, then
    /// its answer, so shutdown is not held up by an unreachable NATS.
    stopping: Arc<AtomicBool>,
    next_number: u64,
}

/// What the publisher task needs.
pub struct StreamSpec {
    pub names: Names,
    pub max_in_flight: usize,
    /// How long after its hand-off a batch with an unknown outcome is
    /// still settled by fences before it is answered with an error: about
    /// two publish timeouts, and always less than the stream's duplicate
    /// window by a publish timeout and a fence, so a settling fence is
    /// still recognised as a duplicate of the batch if the batch was stored
    /// (see [`settle_window`]).
    pub settle_window: Duration,
    /// `sluice_ack_latency_seconds`, observed once per stored batch as the
    /// standalone writer does once per commit.
    pub ack_latency: Histogram,
}

/// [`StreamSpec::settle_window`] for a stream's duplicate window and the
/// publisher's timings: a publish timeout and a fence after the publish
/// itself timed out (a request is never held much longer than a device
/// waits for an answer), and in any case inside the duplicate window.
pub fn settle_window(
    duplicate_window: Duration,
    publish_timeout: Duration,
    retry_after: Duration,
) -> Duration {
    let fence = retry_after.max(Duration::from_secs(1));
    let recognised = duplicate_window
        .saturating_sub(publish_timeout)
        .saturating_sub(fence)
        .saturating_sub(Duration::from_secs(1));
    recognised.min(publish_timeout * 2 + fence)
}

impl StreamSink {
    /// Spawns the publisher task on the current tokio runtime.
    pub fn start(
        publisher: Publisher,
        spec: StreamSpec,
        metrics: ClusterMetrics,
        health: Arc<Health>,
    ) -> StreamSink {
        let (tx, rx) = mpsc::channel(1);
        let (done, finished) = oneshot::channel();
        let forget_attributes = Arc::new(AtomicBool::new(false));
        let stopping = Arc::new(AtomicBool::new(false));
        let task = PublishTask {
            publisher: Arc::new(publisher),
            names: spec.names,
            metrics,
            health,
            forget_attributes: forget_attributes.clone(),
            settle_window: spec.settle_window,
            stopping: stopping.clone(),
            ack_latency: spec.ack_latency,
        };
        tokio::spawn(task.run(rx, spec.max_in_flight, done));
        StreamSink {
            tx,
            forget_attributes,
            finished,
            stopping,
            next_number: 1,
        }
    }

    /// The flag that makes the writer forget the attribute names it
    /// recorded before its next batch; the materializer raises it when it
    /// applies a removal.
    pub fn forget_attributes(&self) -> Arc<AtomicBool> {
        self.forget_attributes.clone()
    }

    /// Whether a batch failed or a removal was applied since the last call
    /// (the writer then forgets the attribute names it recorded).
    pub(super) fn take_forget(&self) -> bool {
        self.forget_attributes.swap(false, Ordering::AcqRel)
    }

    /// Hands a checked batch to the publisher, blocking while it has its
    /// maximum in flight. Writer thread only (never on a tokio worker).
    pub(super) fn hand_off(
        &mut self,
        requests: Vec<WriteRequest>,
        refused: Vec<Option<CommitError>>,
    ) {
        let number = self.next_number;
        self.next_number += 1;
        let h = Handoff {
            number,
            requests,
            refused,
            handed_at: Instant::now(),
        };
        if let Err(mpsc::error::SendError(h)) = self.tx.blocking_send(h) {
            // The publisher task is gone (the runtime is shutting down):
            // nothing was sent, so refusing is safe.
            complete(h, Err(CommitError::Stream), None);
        }
    }

    /// Waits until every batch handed off has been answered.
    pub(super) fn finish(self) {
        self.stopping.store(true, Ordering::Release);
        drop(self.tx);
        let _ = self.finished.blocking_recv();
    }
}

struct PublishTask {
    publisher: Arc<Publisher>,
    names: Names,
    metrics: ClusterMetrics,
    health: Arc<Health>,
    forget_attributes: Arc<AtomicBool>,
    settle_window: Duration,
    stopping: Arc<AtomicBool>,
    ack_latency: Histogram,
}

/// A batch's outcome: where it was stored (`None`: nothing to publish).
type Outcome = Result<Option<Stored>, CommitError>;

impl PublishTask {
    async fn run(
        self,
        mut rx: mpsc::Receiver<Handoff>,
        in_flight: usize,
        done: oneshot::Sender<()>,
    ) {
        let task = Arc::new(self);
        let batches = futures_util::stream::poll_fn(|cx| rx.poll_recv(cx));
        // Up to `in_flight` batches at once, each answered when it is done.
        // Their futures start in hand-off order and the publisher's slots
        // and send lock are FIFO, so they reach the stream in that order.
        let mut outcomes = batches
            .map(|h| {
                let task = task.clone();
                async move {
                    let (messages, ends) = task.messages(&h);
                    let outcome = task.publish(&h, &messages).await;
                    (h, ends, outcome)
                }
            })
            .buffer_unordered(in_flight.max(1));
        // The probe runs beside the batches, never between them: a probe
        // waits for NATS as long as a request to it may take, and answers
        // must not wait for that.
        let prober = tokio::spawn(task.clone().probe());
        while let Some((h, ends, outcome)) = outcomes.next().await {
            task.answer(h, &ends, outcome);
        }
        prober.abort();
        let _ = done.send(());
    }

    /// While publishes fail and no new batch comes to show otherwise, the
    /// stream is probed every [`PROBE_EVERY`], so health turns good again
    /// by itself (a load balancer that stopped sending on 503 would never
    /// send the batch that shows it). Each probe is bounded by
    /// [`PROBE_TIMEOUT`], so an unanswered one cannot hold back the next.
    async fn probe(self: Arc<Self>) {
        let mut tick = tokio::time::interval(PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !self.health.is_failing(Failure::Stream) {
                continue;
            }
            let reachable = tokio::time::timeout(PROBE_TIMEOUT, self.publisher.reachable())
                .await
                .unwrap_or(false);
            if reachable && self.health.recover(Failure::Stream) {
                tracing::warn!("the ingest stream answers again");
            }
        }
    }

    /// The stream messages of a batch's admitted requests and, per request,
    /// the index after its last message (`None` for a refused request).
    fn messages(&self, h: &Handoff) -> (Vec<StateMessage>, Vec<Option<usize>>) {
        let n: usize = h
            .requests
            .iter()
            .zip(&h.refused)
            .filter(|(_, r)| r.is_none())
            .map(|(req, _)| req.parsed.states.len())
            .sum();
        let mut messages = Vec::with_capacity(n);
        let mut ends = Vec::with_capacity(h.requests.len());
        for (req, refused) in h.requests.iter().zip(&h.refused) {
            if refused.is_some() {
                ends.push(None);
                continue;
            }
            match self.push_request(req, &mut messages) {
                true => ends.push(Some(messages.len())),
                false => ends.push(None),
            }
        }
        (messages, ends)
    }

    /// Adds one message per state of `req`; false (and nothing added) if
    /// the request cannot be split into its states, which `state::parse`
    /// makes impossible for a body it accepted.
    fn push_request(&self, req: &WriteRequest, out: &mut Vec<StateMessage>) -> bool {
        let Some((app, device)) = split_device_key(&req.device) else {
            return false;
        };
        let subject = self.names.state_subject(app, device);
        let token_id: Arc<str> = Arc::from(&*req.grant.id);
        let received_ms = req.parsed.received_ms;
        let message = |payload: bytes::Bytes| StateMessage {
            subject: subject.clone(),
            payload,
            received_ms,
            token_id: token_id.clone(),
        };
        let is_array = req
            .body
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|b| *b == b'[');
        if !is_array {
            out.push(message(req.body.clone()));
            return true;
        }
        match crate::state::array_elements(&req.body) {
            Some(elements) if elements.len() == req.parsed.states.len() => {
                out.extend(
                    elements
                        .iter()
                        .map(|r| message(req.body.slice(r.start as usize..r.end as usize))),
                );
                true
            }
            _ => {
                tracing::error!(
                    app,
                    device,
                    "an accepted array could not be split into its states; refused"
                );
                false
            }
        }
    }

    async fn publish(&self, h: &Handoff, messages: &[StateMessage]) -> Outcome {
        if messages.is_empty() {
            return Ok(None);
        }
        let n = messages.len() as u64;
        let result = match self.publisher.publish_batch(messages, h.number).await {
            Err(PublishError::Unknown(why)) => self.settle(h, n, why).await,
            other => other.map_err(|e| (e, false)),
        };
        match result {
            Ok(stored) => {
                self.metrics.batches_published.inc();
                self.metrics.messages_published.inc_by(n);
                self.metrics.batch_messages.observe(n as f64);
                self.metrics
                    .publish_seconds
                    .observe(h.handed_at.elapsed().as_secs_f64());
                if self.health.recover(Failure::Stream) {
                    tracing::warn!("the ingest stream acknowledges batches again");
                }
                Ok(Some(stored))
            }
            Err((e, unsettled)) => {
                self.forget_attributes.store(true, Ordering::Release);
                let requests = h.requests.len();
                if self.health.fail(Failure::Stream, &e) {
                    tracing::error!(error = %e, requests, "the ingest stream did not store a batch; refusing its requests until it does");
                } else {
                    tracing::debug!(error = %e, requests, "the ingest stream did not store a batch");
                }
                if unsettled {
                    self.metrics.publish_unsettled.inc();
                    tracing::error!(error = %e, batch = h.number, requests, "a batch's outcome stayed unknown past the duplicate window; its requests are answered with an error though it may be stored");
                    Err(CommitError::StreamUnknown)
                } else {
                    self.metrics.publish_not_stored.inc();
                    Err(CommitError::Stream)
                }
            }
        }
    }

    /// Settles an unknown outcome by fences alone until the settle window
    /// closes (or the broker stops); the flag says whether it stayed
    /// unknown.
    async fn settle(
        &self,
        h: &Handoff,
        n: u64,
        why: String,
    ) -> Result<Stored, (PublishError, bool)> {
        tracing::warn!(batch = h.number, error = %why, "batch outcome unknown; settling it");
        let until = h.handed_at + self.settle_window;
        loop {
            match self.publisher.settle(h.number, n).await {
                Ok(stored) => return Ok(stored),
                Err(e @ PublishError::Unknown(_)) => {
                    if Instant::now() >= until || self.stopping.load(Ordering::Acquire) {
                        return Err((e, true));
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err((e, false)),
            }
        }
    }

    fn answer(&self, h: Handoff, ends: &[Option<usize>], outcome: Outcome) {
        // The longest of the batch, before its acknowledgements are
        // released (as the standalone writer counts it).
        if let (Ok(Some(_)), Some(oldest)) = (&outcome, h.requests.iter().map(|r| r.received).min())
        {
            self.ack_latency.observe(oldest.elapsed().as_secs_f64());
        }
        complete(h, outcome, Some(ends));
    }
}

/// Answers every request of a batch. With `ends` (one per request, the
/// index after its last message) a stored batch tells each request its
/// last state's sequence; a request without an end was not published.
fn complete(h: Handoff, outcome: Outcome, ends: Option<&[Option<usize>]>) {
    let mut wake: Vec<Arc<dyn CommitSink>> = Vec::new();
    for (i, (req, refused)) in h.requests.into_iter().zip(h.refused).enumerate() {
        let end = ends.and_then(|e| e.get(i).copied().flatten());
        let r = match (refused, &outcome, end) {
            (Some(e), _, _) => Err(e),
            (None, Err(e), _) => Err(*e),
            (None, Ok(Some(stored)), Some(end)) => Ok(Committed {
                seq: Some(stored.first + end as u64 - 1),
            }),
            // Admitted but not publishable, or nothing published at all.
            (None, Ok(_), _) => Err(CommitError::Stream),
        };
        req.complete(r, &mut wake);
    }
    for sink in wake {
        sink.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settling_is_bounded_by_the_publish_timeout_and_the_duplicate_window() {
        let s = Duration::from_secs;
        assert_eq!(settle_window(s(120), s(5), s(1)), s(11));
        assert_eq!(settle_window(s(12), s(5), s(1)), s(5));
        assert_eq!(settle_window(s(120), s(3), s(2)), s(8));
    }

    #[test]
    fn device_keys_split_into_their_ids() {
        let k = crate::store::device_key("farm.eu", "pump-1");
        assert_eq!(split_device_key(&k), Some(("farm.eu", "pump-1")));
        assert_eq!(split_device_key(b"nope"), None);
    }
}
