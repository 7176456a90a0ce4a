//! QoS 1 acknowledgements: where the writer reports a session's commit
//! outcomes ([`AckSink`]), and the order the PUBACKs go out in
//! ([`Pubacks`]): publish order, as MQTT requires ([MQTT-4.6.0-2]), one
//! socket write per commit.

use std::collections::VecDeque;
use std::num::NonZeroU16;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use tokio::sync::Notify;

use super::proto::{AckReason, Codec};
use crate::writer::{CommitError, CommitSink, Completion};

/// Outcomes of one MQTT session's publishes, in commit order. The writer
/// records every outcome of a batch and then wakes the session once, so the
/// session sends all PUBACKs of one commit in one socket write. Bounded by
/// the session's receive maximum (it never has more publishes in flight).
#[derive(Default)]
pub struct AckSink {
    done: Mutex<Vec<(u16, Result<(), CommitError>)>>,
    pub notify: Notify,
}

impl AckSink {
    /// Moves the finished outcomes into `out` (which is cleared first).
    fn take_into(&self, out: &mut Vec<(u16, Result<(), CommitError>)>) {
        out.clear();
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::swap(&mut *done, out);
    }
}

impl CommitSink for AckSink {
    fn record(&self, tag: u16, r: Result<(), CommitError>) -> bool {
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        done.push((tag, r));
        done.len() == 1
    }

    fn wake(&self) {
        // notify_one stores a permit, so a session busy elsewhere still
        // sees the wake-up at its next select.
        self.notify.notify_one();
    }
}

/// One QoS 1 publish waiting for its PUBACK, in arrival order.
struct PendingAck {
    packet_id: NonZeroU16,
    /// `None` until its commit finished; refusals are known at once.
    reason: Option<AckReason>,
}

/// The PUBACKs a session owes, in publish order. At most
/// `mqtt.receive_maximum` entries: the session stops reading at that many.
pub(super) struct Pubacks {
    sink: Arc<AckSink>,
    pending: VecDeque<PendingAck>,
    /// Publishes handed to the writer and not yet reported back.
    committing: usize,
    /// Reused for taking outcomes out of the sink.
    scratch: Vec<(u16, Result<(), CommitError>)>,
}

impl Pubacks {
    pub(super) fn new() -> Pubacks {
        Pubacks {
            sink: Arc::new(AckSink::default()),
            pending: VecDeque::new(),
            committing: 0,
            scratch: Vec::new(),
        }
    }

    /// Where the writer reports; the session waits on its `notify`.
    pub(super) fn sink(&self) -> &Arc<AckSink> {
        &self.sink
    }

    /// PUBACKs owed (the session's in-flight window).
    pub(super) fn len(&self) -> usize {
        self.pending.len()
    }

    /// Nothing owed and nothing in the writer.
    pub(super) fn is_settled(&self) -> bool {
        self.pending.is_empty() && self.committing == 0
    }

    /// A QoS 1 publish handed to the writer: its PUBACK waits for the
    /// commit, reported through the returned completion.
    pub(super) fn committing(&mut self, packet_id: NonZeroU16) -> Completion {
        self.pending.push_back(PendingAck {
            packet_id,
            reason: None,
        });
        self.committing += 1;
        Completion::Sink {
            sink: self.sink.clone(),
            tag: packet_id.get(),
        }
    }

    /// A QoS 1 publish refused before the writer (MQTT 5 only): its PUBACK
    /// goes out after those of earlier publishes.
    pub(super) fn refused(&mut self, packet_id: NonZeroU16, reason: AckReason) {
        self.pending.push_back(PendingAck {
            packet_id,
            reason: Some(reason),
        });
    }

    /// The newest publish, a QoS 1 one, could not be queued after all (the
    /// writer stopped): its PUBACK reports the failure.
    pub(super) fn fail_newest(&mut self) {
        self.committing = self.committing.saturating_sub(1);
        if let Some(a) = self.pending.back_mut() {
            a.reason = Some(AckReason::Failed);
        }
    }

    /// Takes the writer's outcomes. Commits complete in queue order, which
    /// is this session's publish order, so each outcome belongs to the
    /// oldest PUBACK still waiting for its commit.
    pub(super) fn collect(&mut self) {
        self.sink.take_into(&mut self.scratch);
        let mut outcomes = self.scratch.drain(..);
        for a in self.pending.iter_mut().filter(|a| a.reason.is_none()) {
            let Some((pkid, r)) = outcomes.next() else {
                break;
            };
            debug_assert_eq!(pkid, a.packet_id.get());
            self.committing = self.committing.saturating_sub(1);
            a.reason = Some(match r {
                Ok(()) => AckReason::Success,
                // A quota of the device's, not a failure of the broker's.
                Err(CommitError::TooManyAttributes { .. }) => AckReason::QuotaExceeded,
                Err(_) => AckReason::Failed,
            });
        }
    }

    /// Encodes every PUBACK that is now in order into `out`. Returns true
    /// when a 3.1.1 publish was not stored: 3.1.1 cannot report that, so
    /// the connection must close (the client resends after reconnecting).
    pub(super) fn write_ready(&mut self, codec: &mut Codec, out: &mut BytesMut) -> bool {
        let mut close = false;
        while let Some(a) = self.pending.front() {
            let Some(reason) = a.reason else { break };
            let id = a.packet_id;
            self.pending.pop_front();
            if reason != AckReason::Success && !codec.is_v5() {
                close = true;
                continue;
            }
            codec.puback(out, id, reason);
        }
        close
    }
}
