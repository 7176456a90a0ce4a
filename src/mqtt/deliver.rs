//! Sending committed states to a subscriber: the PUBLISH packets a
//! session writes from its feeds' deliveries, the QoS 1 window they wait
//! in, and the PUBACKs that close it (each reported back to the feed that
//! sent the state, which keeps the session's position).
//!
//! Within one connection every state is sent once, in commit order per
//! device; a QoS 1 state not acknowledged when the connection ends is sent
//! again to the next connection of a persistent session, as a new PUBLISH
//! read from the log (delivery is at least once across connections).

use std::collections::VecDeque;
use std::num::NonZeroU16;
use std::sync::Arc;

use bytestring::ByteString;
use tokio::sync::mpsc;

use super::session::Session;
use crate::streams::feed::{Delivery, Feed};
use crate::streams::group::Membership;
use crate::streams::sessions::Owner;

/// One subscription of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Sub {
    /// As the client wrote it (UNSUBSCRIBE names it the same way).
    pub filter: ByteString,
    /// The shared-subscription group (`$share/{group}/…`), if any.
    pub share: Option<Box<str>>,
    /// `None`: every device of the application (`+`).
    pub device: Option<Box<str>>,
    pub qos: u8,
}

/// What a session that may subscribe keeps about its (possibly stored)
/// session.
pub(super) struct Keep {
    pub owner: Arc<Owner>,
    /// The session is kept after the connection ends (3.1.1
    /// CleanSession=0, MQTT 5 Session Expiry > 0).
    pub persistent: bool,
    /// Seconds it is kept.
    pub expiry: u32,
    /// A record of it is stored (resumed, or written by a SUBSCRIBE).
    pub stored: bool,
    /// Where the feed of a resumed session starts.
    pub resume_at: Option<u64>,
}

/// A QoS 1 PUBLISH sent and not yet acknowledged.
struct Out {
    packet_id: NonZeroU16,
    source: u32,
    position: u64,
}

/// A session's subscriptions and what is in flight to it.
pub(super) struct Subscriber {
    pub subs: Vec<Sub>,
    /// Every feed of the session delivers here; holds at most `window`
    /// deliveries, then feeds wait (they never drop a state).
    pub tx: mpsc::Sender<Delivery>,
    /// Taken by the session loop, which reads it.
    pub rx: Option<mpsc::Receiver<Delivery>>,
    /// The feed of the session's subscriptions (source 0).
    pub own: Option<Feed>,
    /// The session's shared subscriptions: source id, filter, membership.
    pub groups: Vec<(u32, ByteString, Membership)>,
    /// The source id of the next group joined.
    next_source: u32,
    /// QoS 1 states sent and not yet acknowledged; at most `window`.
    outbound: VecDeque<Out>,
    next_packet_id: u16,
    /// The most QoS 1 states in flight: `streams.max_inflight`, or the
    /// client's smaller Receive Maximum.
    pub window: usize,
}

impl Subscriber {
    pub fn new(window: usize) -> Subscriber {
        let (tx, rx) = mpsc::channel(window.max(1));
        Subscriber {
            subs: Vec::new(),
            tx,
            rx: Some(rx),
            own: None,
            groups: Vec::new(),
            next_source: 1,
            outbound: VecDeque::new(),
            next_packet_id: 0,
            window: window.max(1),
        }
    }

    /// A packet id not in use by an unacknowledged PUBLISH.
    fn packet_id(&mut self) -> NonZeroU16 {
        loop {
            self.next_packet_id = self.next_packet_id.wrapping_add(1);
            if let Some(id) = NonZeroU16::new(self.next_packet_id) {
                if !self.outbound.iter().any(|o| o.packet_id == id) {
                    return id;
                }
            }
        }
    }

    /// A source id for a new group membership.
    pub fn new_source(&mut self) -> u32 {
        let s = self.next_source;
        self.next_source = self.next_source.wrapping_add(1).max(1);
        s
    }

    /// Whether `source` still feeds this session (deliveries of a feed or
    /// group the session has left are dropped, unsent: the group hands
    /// them to another member).
    fn active(&self, source: u32) -> bool {
        match source {
            0 => self.own.is_some(),
            s => self.groups.iter().any(|(g, _, _)| *g == s),
        }
    }

    /// Tells the feed that sent a state that the session is done with it.
    fn finished(&self, source: u32, position: u64) {
        match source {
            0 => {
                if let Some(f) = &self.own {
                    // A feed that has ended no longer needs to know.
                    let _ = f.acks.send(position);
                }
            }
            s => {
                if let Some((_, _, m)) = self.groups.iter().find(|(g, _, _)| *g == s) {
                    m.finished(position);
                }
            }
        }
    }

    /// Room for another delivery.
    pub fn has_room(&self) -> bool {
        self.outbound.len() < self.window
    }
}

impl Session<'_> {
    /// Whether the session takes another delivery now: a QoS 1 slot is
    /// free and the output waiting for the socket is under
    /// `streams.consumer_buffer_bytes`.
    pub(super) fn can_deliver(&self) -> bool {
        self.sub.as_ref().is_some_and(|s| s.has_room())
            && self.out.len() < self.ctx.streams.consumer_buffer_bytes
    }

    /// Writes one delivery, and as many more as are ready and fit.
    pub(super) fn deliver(&mut self, first: Delivery, rx: &mut mpsc::Receiver<Delivery>) {
        let mut sent = 0u64;
        let mut next = Some(first);
        while let Some(d) = next.take() {
            self.deliver_one(d);
            sent += 1;
            if self.can_deliver() {
                next = rx.try_recv().ok();
            }
        }
        self.ctx.shared_metrics.stream_states_sent.inc_by(sent);
    }

    fn deliver_one(&mut self, d: Delivery) {
        let Some(sub) = self.sub.as_mut() else {
            return;
        };
        if !sub.active(d.source) {
            return;
        }
        let e = d.entry();
        let position = e.position;
        let packet_id = (d.qos > 0).then(|| sub.packet_id());
        let written = self.codec.publish_state(
            &mut self.out,
            packet_id,
            &self.grant.app,
            d.device(),
            e.time_ms,
            &e.data,
            position,
        );
        match (written, packet_id) {
            (true, Some(packet_id)) => sub.outbound.push_back(Out {
                packet_id,
                source: d.source,
                position,
            }),
            // QoS 0 is done once written; a state larger than the client
            // accepts is skipped (it asked not to receive such packets).
            (false, _) | (true, None) => {
                if !written {
                    tracing::debug!(
                        position,
                        "state larger than the subscriber's maximum packet size; skipped"
                    );
                }
                sub.finished(d.source, position);
            }
        }
    }

    /// A PUBACK from the client for a state the session sent.
    pub(super) fn puback_in(&mut self, packet_id: NonZeroU16) {
        let Some(sub) = self.sub.as_mut() else {
            return;
        };
        if let Some(i) = sub.outbound.iter().position(|o| o.packet_id == packet_id) {
            if let Some(o) = sub.outbound.remove(i) {
                sub.finished(o.source, o.position);
            }
        }
    }
}
