//! The per-publish hot path: PUBLISH → check (grant still usable, topic,
//! payload) → token view fresh (cluster mode) → rate limit → queue for the
//! writer. A QoS 1 publish gets its
//! PUBACK only after its commit (`acks.rs`); a refused one gets the
//! contract's answer at once.

use std::num::NonZeroU16;

use super::metrics::PublishOutcome;
use super::proto::{qos_of, AckReason, Goodbye, Publish};
use super::session::{End, Session};
use crate::auth::{monotonic_ns, Scope, TokenEntry};
use crate::ids::{is_valid_id, state_path};
use crate::state::{self, ParsedStates, Shape};
use crate::store::{device_key, DeviceKey};
use crate::timefmt::now_ms;
use crate::writer::{Completion, EnqueueError, WriteRequest};

/// Why a publish is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum PublishRefusal {
    /// The grant is no longer usable, or does not cover the topic's
    /// application and device, or the topic is not a state topic.
    NotAuthorized,
    BadPayload(state::BadState),
}

/// The per-publish check, shared with benches and fuzzing: the grant is
/// still usable (revocation), the topic is `applications/{app}/devices/
/// {device}/state` for ids the grant covers, and the payload is one valid
/// state message. Topic parsing borrows; the only lookup is the chain walk.
pub fn check_publish(
    grant: &TokenEntry,
    topic: &str,
    payload: &[u8],
    now_ms: i64,
) -> Result<(DeviceKey, ParsedStates), PublishRefusal> {
    let (app, dev) = state_path(topic).ok_or(PublishRefusal::NotAuthorized)?;
    if !grant.usable(now_ms)
        || !is_valid_id(app)
        || !is_valid_id(dev)
        || !grant.permits(app, Some(dev), Scope::SendState)
    {
        return Err(PublishRefusal::NotAuthorized);
    }
    let parsed = state::parse(payload, Shape::One, now_ms).map_err(PublishRefusal::BadPayload)?;
    Ok((device_key(app, dev), parsed))
}

impl Session<'_> {
    /// Handles one PUBLISH; `Some` ends the session.
    pub(super) fn publish(&mut self, p: Box<Publish>) -> Option<End> {
        let m = &self.ctx.metrics;
        let qos = qos_of(&p);
        if qos == 2 {
            // CONNACK advertised maximum QoS 1 (MQTT 5); 3.1.1 has no way
            // to refuse a QoS, so the connection is closed.
            m.publish(2, PublishOutcome::QosUnsupported);
            self.codec
                .disconnect(&mut self.out, Goodbye::QosNotSupported);
            return Some(End::Refused("QoS 2"));
        }
        let received = std::time::Instant::now();
        let now = now_ms();
        let (device, parsed) = match check_publish(&self.grant, &p.topic, &p.payload, now) {
            Ok(x) => x,
            Err(PublishRefusal::NotAuthorized) => {
                m.publish(qos, PublishOutcome::NotAuthorized);
                return self.refuse(
                    qos,
                    p.packet_id,
                    AckReason::NotAuthorized,
                    Goodbye::NotAuthorized,
                );
            }
            Err(PublishRefusal::BadPayload(e)) => {
                tracing::debug!(error = %e, "invalid state payload");
                m.publish(qos, PublishOutcome::BadPayload);
                return self.refuse(
                    qos,
                    p.packet_id,
                    AckReason::PayloadInvalid,
                    Goodbye::PayloadInvalid,
                );
            }
        };
        let mono = monotonic_ns();
        // Cluster mode: with a stale view of the cluster's tokens this
        // broker cannot know whether the grant was revoked meanwhile.
        if !self.ctx.registry.trusted(mono) {
            m.publish(qos, PublishOutcome::Unavailable);
            return self.refuse(qos, p.packet_id, AckReason::Failed, Goodbye::Unavailable);
        }
        if self.grant.admit(1, mono).is_err() {
            m.publish(qos, PublishOutcome::QuotaExceeded);
            self.ctx.shared_metrics.rate_limited(&self.grant.id);
            return self.refuse(
                qos,
                p.packet_id,
                AckReason::QuotaExceeded,
                Goodbye::RateTooHigh,
            );
        }
        self.ctx.registry.touch(&self.grant, now);
        let done = match (qos, p.packet_id) {
            (1, Some(id)) => self.acks.committing(id),
            _ => Completion::None,
        };
        m.publish(qos, PublishOutcome::Accepted);
        tracing::trace!(topic = %p.topic, qos, "publish accepted");
        let req = WriteRequest {
            grant: self.grant.clone(),
            device,
            body: p.payload,
            parsed,
            done,
            received,
        };
        self.enqueue(req)
    }

    /// Refuses a publish the contract's way: MQTT 5 QoS 1 gets a PUBACK
    /// with the reason, MQTT 5 QoS 0 a DISCONNECT, MQTT 3.1.1 a close.
    fn refuse(
        &mut self,
        qos: u8,
        packet_id: Option<NonZeroU16>,
        ack: AckReason,
        bye: Goodbye,
    ) -> Option<End> {
        match (self.codec.is_v5(), qos, packet_id) {
            (true, 1, Some(id)) => {
                self.acks.refused(id, ack);
                self.write_ready_acks();
                None
            }
            (true, _, _) => {
                self.codec.disconnect(&mut self.out, bye);
                Some(End::Refused("publish refused"))
            }
            (false, _, _) => Some(End::Refused("publish refused (3.1.1)")),
        }
    }

    fn enqueue(&mut self, req: WriteRequest) -> Option<End> {
        match self.ctx.queue.try_enqueue(req) {
            Ok(()) => None,
            Err(EnqueueError::Full(req)) => {
                self.blocked = Some(*req);
                None
            }
            Err(EnqueueError::Closed) => {
                // Shutting down: the publish cannot be stored. It was not
                // acknowledged, so the client will send it again elsewhere.
                self.codec.disconnect(&mut self.out, Goodbye::ShuttingDown);
                Some(End::Stopped)
            }
            Err(EnqueueError::Revoked) => Some(self.revoked_now()),
        }
    }

    /// The session's token was revoked or expired (or it was between the
    /// publish's check and its queueing, and nothing of that publish is
    /// stored): the session ends with "not authorized".
    pub(super) fn revoked_now(&mut self) -> End {
        self.codec.disconnect(&mut self.out, Goodbye::NotAuthorized);
        self.ctx.metrics.revoked.inc();
        End::Refused("token revoked or expired")
    }

    /// Queues the publish that waits for space as soon as the writer makes
    /// room. The wake-up is registered before each attempt, so none is lost
    /// between a full queue and the wait, and no timer polls.
    pub(super) async fn queue_blocked(&mut self) -> Option<End> {
        let queue = &self.ctx.queue;
        loop {
            let space = queue.space.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            let req = self.blocked.take()?;
            let qos1 = matches!(req.done, Completion::Sink { .. });
            match queue.try_enqueue(req) {
                Ok(()) => return None,
                Err(EnqueueError::Full(req)) => {
                    self.blocked = Some(*req);
                    space.await;
                }
                Err(EnqueueError::Revoked) => return Some(self.revoked_now()),
                Err(EnqueueError::Closed) => {
                    // The blocked publish is the newest one (reading stops
                    // while blocked); if QoS 1, its PUBACK says it failed.
                    if qos1 {
                        self.acks.fail_newest();
                        self.write_ready_acks();
                    }
                    return None;
                }
            }
        }
    }
}
