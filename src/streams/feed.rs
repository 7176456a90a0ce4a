//! A subscriber's feed: a task that reads one application's log with a
//! [`Cursor`], picks the states its subscriber wants, and hands them over
//! one by one through the subscriber's bounded delivery channel; the
//! subscriber reports back each state it has finished with (a QoS 1 PUBACK,
//! a QoS 0 write). The feed keeps the subscriber's position — the first
//! position not yet finished with — and, for a persistent session, writes
//! it to the store every `streams.session_flush` while it advances and
//! once more when the subscriber goes away.
//!
//! The channel holds at most the subscriber's window of deliveries, so a
//! subscriber that does not read holds the feed back (and the cursor with
//! it: it falls behind the live buffer and later reads storage), never
//! ingest.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::cursor::{Batch, Cursor, ReadBounds, Start};
use super::hub::Hub;
use super::sessions::Owner;
use crate::auth::{Scope, TokenEntry};
use crate::store::{Chunk, ChunkEntry, Store};

/// Which devices of an application a subscriber wants, and the highest QoS
/// it asked for each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Interest {
    /// For every device (a `+` filter).
    any: Option<u8>,
    /// Per named device, sorted by device.
    devices: Vec<(Box<str>, u8)>,
}

impl Interest {
    /// Adds a subscription to `device` (`None`: every device).
    pub fn add(&mut self, device: Option<&str>, qos: u8) {
        match device {
            None => self.any = Some(self.any.map_or(qos, |q| q.max(qos))),
            Some(d) => match self.devices.binary_search_by(|(x, _)| (**x).cmp(d)) {
                Ok(i) => self.devices[i].1 = self.devices[i].1.max(qos),
                Err(i) => self.devices.insert(i, (d.into(), qos)),
            },
        }
    }

    /// The QoS to deliver `device`'s states with, if they are wanted.
    pub fn qos(&self, device: &str) -> Option<u8> {
        let named = self
            .devices
            .binary_search_by(|(x, _)| (**x).cmp(device))
            .ok()
            .map(|i| self.devices[i].1);
        match (self.any, named) {
            (Some(a), Some(n)) => Some(a.max(n)),
            (a, n) => a.or(n),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.any.is_none() && self.devices.is_empty()
    }
}

/// One state for a subscriber.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Which of the subscriber's feeds sent it (acknowledgements go back
    /// there).
    pub source: u32,
    pub qos: u8,
    pub chunk: Arc<Chunk>,
    pub index: u32,
}

impl Delivery {
    pub fn entry(&self) -> &ChunkEntry {
        &self.chunk.entries()[self.index as usize]
    }

    pub fn device(&self) -> &str {
        self.chunk.device(self.entry())
    }

    pub fn position(&self) -> u64 {
        self.entry().position
    }
}

/// The subscriber's handle on a running feed. Dropping it (with the
/// delivery channel's receiver) ends the feed, which then writes the final
/// position.
pub struct Feed {
    /// Positions the subscriber has finished with. Unbounded, but the feed
    /// reads it before sending more, and it never holds more than the
    /// deliveries sent, which the channel and window bound.
    pub acks: mpsc::UnboundedSender<u64>,
    interest: watch::Sender<Interest>,
}

impl Feed {
    /// Changes what the subscriber wants, from the next state on.
    pub fn set_interest(&self, interest: Interest) {
        self.interest.send_replace(interest);
    }
}

/// What a feed needs to start.
pub struct FeedSpec {
    pub hub: Arc<Hub>,
    pub store: Store,
    pub app: Box<str>,
    /// The subscriber's token: only devices it may read are delivered.
    pub grant: Arc<TokenEntry>,
    pub start: Start,
    pub bounds: ReadBounds,
    /// For a persistent session: where its position is written, and how
    /// often while it advances.
    pub persist: Option<(Arc<Owner>, Duration)>,
    pub source: u32,
}

/// Starts a feed on `tracker`, delivering into `tx`.
pub fn start(
    spec: FeedSpec,
    interest: Interest,
    tx: mpsc::Sender<Delivery>,
    tracker: &tokio_util::task::TaskTracker,
) -> Feed {
    let (acks_tx, acks) = mpsc::unbounded_channel();
    let (interest_tx, interest_rx) = watch::channel(interest);
    tracker.spawn(run(spec, interest_rx, tx, acks));
    Feed {
        acks: acks_tx,
        interest: interest_tx,
    }
}

/// The feed's own bookkeeping of its subscriber's position.
struct Position {
    /// Positions sent and not yet finished with, in order, and whether
    /// finished (acknowledgements may come out of order).
    inflight: VecDeque<(u64, bool)>,
    /// The first position not yet looked at.
    scanned: u64,
    /// What was last written to the store.
    saved: Option<u64>,
}

impl Position {
    /// The first position not yet finished with.
    fn next(&self) -> u64 {
        self.inflight.front().map_or(self.scanned, |f| f.0)
    }

    fn ack(&mut self, position: u64) {
        if let Some(a) = self.inflight.iter_mut().find(|a| a.0 == position) {
            a.1 = true;
        }
        while self.inflight.front().is_some_and(|a| a.1) {
            self.inflight.pop_front();
        }
    }
}

async fn run(
    spec: FeedSpec,
    mut interest: watch::Receiver<Interest>,
    tx: mpsc::Sender<Delivery>,
    mut acks: mpsc::UnboundedReceiver<u64>,
) {
    let (mut cursor, _) = match Cursor::open(
        &spec.hub,
        &spec.store,
        &spec.app,
        spec.start,
        spec.bounds,
    )
    .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, app = %spec.app, "subscriber feed could not open the log");
            return;
        }
    };
    let mut pos = Position {
        inflight: VecDeque::new(),
        scanned: cursor.next_position(),
        saved: None,
    };
    let flush_every = spec.persist.as_ref().map(|p| p.1);
    let mut next_save = Instant::now();
    let mut pending: Option<(Batch, usize)> = None;
    let mut wanted = interest.borrow_and_update().clone();
    'feed: loop {
        if let (Some(every), true) = (flush_every, Instant::now() >= next_save) {
            if pos.saved != Some(pos.next()) {
                save(&spec, &mut pos).await;
                next_save = Instant::now() + every;
            }
        }
        // The next wanted state of the batch at hand, if any.
        let mut send = None;
        if let Some((batch, i)) = &mut pending {
            if interest.has_changed().unwrap_or(false) {
                wanted = interest.borrow_and_update().clone();
            }
            let entries = batch.entries();
            while *i < entries.len() {
                let e = &entries[*i];
                let device = batch.chunk.device(e);
                *i += 1;
                pos.scanned = e.position + 1;
                let qos = wanted
                    .qos(device)
                    .filter(|_| spec.grant.permits(&spec.app, Some(device), Scope::GetState));
                if let Some(qos) = qos {
                    send = Some(Delivery {
                        source: spec.source,
                        qos,
                        chunk: batch.chunk.clone(),
                        index: (batch.from + *i - 1) as u32,
                    });
                    break;
                }
            }
            if *i >= entries.len() {
                pending = None;
            }
        }
        let save_at = match (flush_every, pos.saved != Some(pos.next())) {
            (Some(_), true) => Some(next_save),
            _ => None,
        };
        match send {
            Some(d) => {
                let position = d.position();
                // Acknowledgements first: they free the subscriber's window.
                loop {
                    tokio::select! {
                        biased;
                        a = acks.recv() => match a {
                            Some(p) => pos.ack(p),
                            None => break 'feed,
                        },
                        permit = tx.reserve() => match permit {
                            Ok(permit) => {
                                permit.send(d);
                                pos.inflight.push_back((position, false));
                                break;
                            }
                            Err(_) => break 'feed,
                        },
                    }
                }
            }
            None if pending.is_some() => {}
            None => {
                tokio::select! {
                    biased;
                    a = acks.recv() => match a {
                        Some(p) => pos.ack(p),
                        None => break 'feed,
                    },
                    _ = tx.closed() => break 'feed,
                    _ = tokio::time::sleep_until(save_at.unwrap_or_else(Instant::now)), if save_at.is_some() => {}
                    // Cancel safe (see `Cursor::next`).
                    b = cursor.next() => match b {
                        Ok(b) => pending = Some((b, 0)),
                        Err(e) => {
                            tracing::warn!(error = %e, app = %spec.app, "subscriber feed ended: reading the log failed");
                            break 'feed;
                        }
                    },
                }
            }
        }
    }
    // The subscriber is gone: what it finished with is known once its
    // last acknowledgements are read.
    while let Ok(p) = acks.try_recv() {
        pos.ack(p);
    }
    if spec.persist.is_some() && pos.saved != Some(pos.next()) {
        save(&spec, &mut pos).await;
    }
}

async fn save(spec: &FeedSpec, pos: &mut Position) {
    let Some((owner, _)) = &spec.persist else {
        return;
    };
    let next = pos.next();
    match owner.save_position(next).await {
        Ok(()) => pos.saved = Some(next),
        Err(e) => {
            // Taken over (the newer connection writes from now on) or a
            // storage failure (the next write tries again; a reconnect
            // meanwhile receives again what it had acknowledged).
            tracing::debug!(error = %e, "session position not written");
            pos.saved = Some(next);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interest_takes_the_highest_qos_of_matching_filters() {
        let mut i = Interest::default();
        assert!(i.is_empty());
        i.add(Some("b"), 0);
        i.add(Some("a"), 1);
        assert_eq!(i.qos("a"), Some(1));
        assert_eq!(i.qos("b"), Some(0));
        assert_eq!(i.qos("c"), None);
        i.add(None, 0);
        assert_eq!(i.qos("c"), Some(0));
        assert_eq!(i.qos("a"), Some(1));
        i.add(Some("b"), 1);
        assert_eq!(i.qos("b"), Some(1));
    }

    #[test]
    fn the_position_is_the_first_not_finished_with() {
        let mut p = Position {
            inflight: VecDeque::new(),
            scanned: 10,
            saved: None,
        };
        assert_eq!(p.next(), 10);
        p.inflight.extend([(3, false), (5, false), (8, false)]);
        assert_eq!(p.next(), 3);
        p.ack(5);
        assert_eq!(p.next(), 3);
        p.ack(3);
        assert_eq!(p.next(), 8);
        p.ack(8);
        assert_eq!(p.next(), 10);
    }
}
