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

    /// Takes the writer's outcomes. Each belongs to the oldest publish with
    /// its packet id still waiting for its commit: the standalone writer
    /// reports in publish order, while in cluster mode batches can finish
    /// out of order; `write_ready` puts the PUBACKs back in publish order.
    pub(super) fn collect(&mut self) {
        self.sink.take_into(&mut self.scratch);
        for (pkid, r) in self.scratch.drain(..) {
            let Some(a) = self
                .pending
                .iter_mut()
                .find(|a| a.reason.is_none() && a.packet_id.get() == pkid)
            else {
                continue;
            };
            self.committing = self.committing.saturating_sub(1);
            a.reason = Some(match r {
                Ok(()) => AckReason::Success,
                // A quota of the device's, not a failure of the broker's.
                Err(CommitError::TooManyAttributes { .. }) => AckReason::QuotaExceeded,
                Err(CommitError::StreamUnknown) => AckReason::Unconfirmed,
                Err(_) => AckReason::Failed,
            });
        }
    }

    /// Encodes every PUBACK that is now in order into `out`. Returns true
    /// when a 3.1.1 publish was not stored (3.1.1 cannot report that), or
    /// when any publish's outcome is unconfirmed (a refusal would claim
    /// more than is known): the connection must close, and the client
    /// resends after reconnecting.
    pub(super) fn write_ready(&mut self, codec: &mut Codec, out: &mut BytesMut) -> bool {
        let mut close = false;
        while let Some(a) = self.pending.front() {
            let Some(reason) = a.reason else { break };
            let id = a.packet_id;
            self.pending.pop_front();
            if reason == AckReason::Unconfirmed || (reason != AckReason::Success && !codec.is_v5())
            {
                close = true;
                continue;
            }
            codec.puback(out, id, reason);
        }
        close
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v311() -> Codec {
        // CONNECT, MQTT 3.1.1, clean session, keep-alive 60, empty client id.
        let mut connect = BytesMut::from(&b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00"[..]);
        Codec::detect(&mut connect, 1024).unwrap().unwrap()
    }

    fn id(n: u16) -> NonZeroU16 {
        NonZeroU16::new(n).unwrap()
    }

    #[test]
    fn outcomes_out_of_order_go_out_in_publish_order() {
        let mut codec = v311();
        let mut acks = Pubacks::new();
        for n in 1..=3 {
            let _ = acks.committing(id(n));
        }
        // Batches of 2 and 3 finished before the one holding 1.
        assert!(acks.sink().record(3, Ok(())));
        acks.sink().record(2, Ok(()));
        acks.collect();
        let mut out = BytesMut::new();
        assert!(!acks.write_ready(&mut codec, &mut out));
        assert!(out.is_empty(), "nothing before publish 1's outcome");
        acks.sink().record(1, Ok(()));
        acks.collect();
        assert!(!acks.write_ready(&mut codec, &mut out));
        assert_eq!(
            &out[..],
            b"\x40\x02\x00\x01\x40\x02\x00\x02\x40\x02\x00\x03"
        );
        assert!(acks.is_settled());
    }

    fn v5() -> Codec {
        // CONNECT, MQTT 5, clean start, keep-alive 60, no properties,
        // empty client id.
        let mut connect = BytesMut::from(&b"\x10\x0d\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x00"[..]);
        Codec::detect(&mut connect, 1024).unwrap().unwrap()
    }

    #[test]
    fn an_unconfirmed_outcome_closes_without_a_puback_in_both_versions() {
        for mut codec in [v311(), v5()] {
            let mut acks = Pubacks::new();
            for n in 1..=2 {
                let _ = acks.committing(id(n));
            }
            acks.sink().record(1, Ok(()));
            acks.sink().record(2, Err(CommitError::StreamUnknown));
            acks.collect();
            let mut out = BytesMut::new();
            assert!(acks.write_ready(&mut codec, &mut out), "must close");
            // Publish 1's PUBACK only.
            let mut expected = BytesMut::new();
            codec.puback(&mut expected, id(1), AckReason::Success);
            assert_eq!(out, expected);
        }
    }
}
