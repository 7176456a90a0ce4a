//! Shared subscriptions (MQTT 5 `$share/{group}/{filter}`): one
//! dispatcher per group and filter reads the application's log once and
//! hands each wanted state to one member of the group.
//!
//! The member is chosen by device (rendezvous hashing over the members
//! that may read the device), and a device whose state is in flight to a
//! member stays with that member until it is acknowledged, so each
//! device's states reach the group in commit order even while members
//! come and go. A member that leaves with states unacknowledged has them
//! handed to the others first. The group's position is the first state
//! not yet finished with by its member; with a persistent member it is
//! stored (see `sessions`), so the group resumes there when it forms
//! again.
//!
//! A dispatcher waits for the member a state is for: a member that stops
//! reading holds the group back (never ingest; the cursor falls back to
//! storage).

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::cursor::{resume_point, Batch, Cursor, ReadBounds, Start};
use super::feed::Delivery;
use super::hub::Hub;
use super::sessions::{group_key, Sessions};
use crate::auth::{Scope, TokenEntry};
use crate::store::{Chunk, Store};
use crate::timefmt::now_ms;

/// Every running dispatcher.
pub struct Groups {
    hub: Arc<Hub>,
    store: Store,
    sessions: Arc<Sessions>,
    bounds: ReadBounds,
    /// How often a persistent group's advancing position is written.
    flush: Duration,
    tracker: tokio_util::task::TaskTracker,
    /// Group key → its dispatcher's id and control channel. A dispatcher
    /// removes itself (under this lock) when its last member has left, so
    /// one entry per group with members.
    running: Mutex<HashMap<Vec<u8>, Running>>,
    ids: AtomicU64,
}

/// A running dispatcher: its id and control channel.
type Running = (u64, mpsc::UnboundedSender<Ctl>);

/// What a session brings to a group.
pub struct MemberSpec {
    pub grant: Arc<TokenEntry>,
    pub qos: u8,
    /// The session's delivery channel.
    pub tx: mpsc::Sender<Delivery>,
    /// The session's id for this feed (in `Delivery::source`).
    pub source: u32,
    /// The session is persistent: the group's position is stored.
    pub persistent: bool,
}

/// A session's place in a group. Dropping it leaves the group; what the
/// session had not finished with goes to the other members.
pub struct Membership {
    id: u64,
    qos: u8,
    ctl: mpsc::UnboundedSender<Ctl>,
}

impl Membership {
    /// The QoS the member receives with.
    pub fn qos(&self) -> u8 {
        self.qos
    }

    /// The session is done with the state at `position`.
    pub fn finished(&self, position: u64) {
        let _ = self.ctl.send(Ctl::Ack {
            member: self.id,
            position,
        });
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        let _ = self.ctl.send(Ctl::Leave { member: self.id });
    }
}

/// Messages to a dispatcher. Unbounded: joins and leaves come from
/// SUBSCRIBE and UNSUBSCRIBE, acknowledgements one per state sent, and
/// the dispatcher sends no more than its members' windows.
enum Ctl {
    Join(Member),
    Ack { member: u64, position: u64 },
    Leave { member: u64 },
}

struct Member {
    id: u64,
    spec: MemberSpec,
    /// States sent and not yet finished with, in order, and whether
    /// finished.
    inflight: VecDeque<(Item, bool)>,
}

/// A state to hand to a member.
#[derive(Clone)]
struct Item {
    chunk: Arc<Chunk>,
    index: u32,
}

impl Item {
    fn position(&self) -> u64 {
        self.chunk.entries()[self.index as usize].position
    }

    fn device(&self) -> &str {
        self.chunk
            .device(&self.chunk.entries()[self.index as usize])
    }
}

impl Groups {
    pub fn new(
        hub: Arc<Hub>,
        store: Store,
        sessions: Arc<Sessions>,
        bounds: ReadBounds,
        flush: Duration,
        tracker: tokio_util::task::TaskTracker,
    ) -> Arc<Groups> {
        Arc::new(Groups {
            hub,
            store,
            sessions,
            bounds,
            flush,
            tracker,
            running: Mutex::new(HashMap::new()),
            ids: AtomicU64::new(1),
        })
    }

    /// Joins the group `group` of `filter` (`device`: what it names, `None`
    /// for `+`) in `app`, starting its dispatcher if it has none.
    pub fn join(
        self: &Arc<Self>,
        app: &str,
        group: &str,
        filter: &str,
        device: Option<&str>,
        spec: MemberSpec,
    ) -> Membership {
        let key = group_key(app, group, filter);
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let qos = spec.qos;
        let member = Member {
            id,
            spec,
            inflight: VecDeque::new(),
        };
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let member = match running.get(&key) {
            Some((_, ctl)) => match ctl.send(Ctl::Join(member)) {
                Ok(()) => {
                    return Membership {
                        id,
                        qos,
                        ctl: ctl.clone(),
                    }
                }
                Err(mpsc::error::SendError(Ctl::Join(m))) => m,
                Err(_) => unreachable!("a join comes back as sent"),
            },
            None => member,
        };
        let (ctl, rx) = mpsc::unbounded_channel();
        let dispatcher = self.ids.fetch_add(1, Ordering::Relaxed);
        running.insert(key.clone(), (dispatcher, ctl.clone()));
        let d = Dispatcher {
            groups: self.clone(),
            key,
            dispatcher,
            app: app.into(),
            device: device.map(Into::into),
            members: vec![member],
            redeliver: VecDeque::new(),
            sticky: HashMap::new(),
        };
        self.tracker.spawn(d.run(rx));
        Membership { id, qos, ctl }
    }
}

struct Dispatcher {
    groups: Arc<Groups>,
    key: Vec<u8>,
    dispatcher: u64,
    app: Box<str>,
    /// The filter's device; `None`: every device.
    device: Option<Box<str>>,
    members: Vec<Member>,
    /// States a leaving member had not finished with, by position: sent
    /// before anything newer.
    redeliver: VecDeque<Item>,
    /// Device → the member its states are in flight to, and how many.
    sticky: HashMap<Box<str>, (u64, usize)>,
}

/// Rendezvous score of a member for a device.
fn score(member: u64, device: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    member.hash(&mut h);
    device.hash(&mut h);
    h.finish()
}

impl Dispatcher {
    fn persistent(&self) -> bool {
        self.members.iter().any(|m| m.spec.persistent)
    }

    /// The member a device's state goes to, if any may read it.
    fn target(&self, device: &str) -> Option<usize> {
        if let Some((id, _)) = self.sticky.get(device) {
            if let Some(i) = self.members.iter().position(|m| m.id == *id) {
                return Some(i);
            }
        }
        self.members
            .iter()
            .enumerate()
            .filter(|(_, m)| {
                m.spec
                    .grant
                    .permits(&self.app, Some(device), Scope::GetState)
            })
            .max_by_key(|(_, m)| score(m.id, device))
            .map(|(i, _)| i)
    }

    fn wants(&self, device: &str) -> bool {
        self.device.as_deref().is_none_or(|d| d == device)
            && self.members.iter().any(|m| {
                m.spec
                    .grant
                    .permits(&self.app, Some(device), Scope::GetState)
            })
    }

    /// The first position not finished with, given what was scanned.
    fn next(&self, scanned: u64) -> u64 {
        self.members
            .iter()
            .filter_map(|m| m.inflight.front().map(|(i, _)| i.position()))
            .chain(self.redeliver.front().map(Item::position))
            .fold(scanned, u64::min)
    }

    fn unstick(&mut self, device: &str) {
        if let Some((_, n)) = self.sticky.get_mut(device) {
            *n -= 1;
            if *n == 0 {
                self.sticky.remove(device);
            }
        }
    }

    fn control(&mut self, c: Ctl) {
        match c {
            Ctl::Join(m) => self.members.push(m),
            Ctl::Ack { member, position } => {
                let Some(m) = self.members.iter_mut().find(|m| m.id == member) else {
                    return;
                };
                let mut done = Vec::new();
                if let Some(a) = m
                    .inflight
                    .iter_mut()
                    .find(|(i, _)| i.position() == position)
                {
                    a.1 = true;
                }
                while m.inflight.front().is_some_and(|(_, acked)| *acked) {
                    if let Some((i, _)) = m.inflight.pop_front() {
                        done.push(i);
                    }
                }
                for i in done {
                    self.unstick(i.device());
                }
            }
            Ctl::Leave { member } => {
                let Some(at) = self.members.iter().position(|m| m.id == member) else {
                    return;
                };
                let m = self.members.remove(at);
                let mut left: Vec<Item> = Vec::new();
                for (i, acked) in m.inflight {
                    self.unstick(i.device());
                    if !acked {
                        left.push(i);
                    }
                }
                if !left.is_empty() {
                    left.extend(self.redeliver.drain(..));
                    left.sort_by_key(Item::position);
                    self.redeliver = left.into();
                }
            }
        }
    }

    async fn save(&self, next: u64, ended: bool) {
        let s = &self.groups.sessions;
        let r = match (self.persistent() || ended, ended) {
            (false, _) => return,
            (true, true) => s.save_group(self.key.clone(), next, Some(now_ms())).await,
            (true, false) => s.save_group(self.key.clone(), next, None).await,
        };
        if let Err(e) = r {
            tracing::debug!(error = %e, "shared subscription position not written");
        }
    }

    async fn run(mut self, mut ctl: mpsc::UnboundedReceiver<Ctl>) {
        // On failure the members get nothing; their sessions keep their
        // subscriptions, and the next member to join starts a new
        // dispatcher (this one's channel is closed then).
        let start = match self.start().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "shared subscription could not start");
                return;
            }
        };
        let g = self.groups.clone();
        let (mut cursor, _) = match Cursor::open(&g.hub, &g.store, &self.app, start, g.bounds).await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "shared subscription could not open the log");
                return;
            }
        };
        let mut scanned = cursor.next_position();
        let mut pending: Option<(Batch, usize)> = None;
        let mut saved: Option<u64> = None;
        let mut next_save = Instant::now();
        let mut was_persistent = self.persistent();
        loop {
            if self.members.is_empty() {
                // Under the registry's lock, so no join is lost: one that
                // arrived meanwhile keeps the group going.
                while let Ok(c) = ctl.try_recv() {
                    self.control(c);
                }
                if self.members.is_empty() && self.retire(&mut ctl) {
                    break;
                }
                continue;
            }
            was_persistent |= self.persistent();
            let next = self.next(scanned);
            if self.persistent() && saved != Some(next) && Instant::now() >= next_save {
                self.save(next, false).await;
                saved = Some(next);
                next_save = Instant::now() + g.flush;
            }
            // The next state to hand over: redeliveries first.
            let item = match self.redeliver.pop_front() {
                Some(i) => Some(i),
                None => self.take(&mut pending, &mut scanned),
            };
            let Some(item) = item else {
                let save_at = (self.persistent() && saved != Some(next)).then_some(next_save);
                tokio::select! {
                    biased;
                    c = ctl.recv() => match c {
                        Some(c) => self.control(c),
                        None => break,
                    },
                    _ = tokio::time::sleep_until(save_at.unwrap_or_else(Instant::now)), if save_at.is_some() => {}
                    // Cancel safe (see `Cursor::next`).
                    b = cursor.next() => match b {
                        Ok(b) => pending = Some((b, 0)),
                        Err(e) => {
                            tracing::warn!(error = %e, "shared subscription ended: reading the log failed");
                            break;
                        }
                    },
                }
                continue;
            };
            let Some(t) = self.target(item.device()) else {
                // No member may read it (any more): nobody's to deliver.
                continue;
            };
            let tx = self.members[t].spec.tx.clone();
            tokio::select! {
                biased;
                c = ctl.recv() => {
                    // Membership may change: decide again.
                    self.redeliver.push_front(item);
                    match c {
                        Some(c) => self.control(c),
                        None => break,
                    }
                }
                permit = tx.reserve() => match permit {
                    Ok(permit) => {
                        let m = &mut self.members[t];
                        permit.send(Delivery {
                            source: m.spec.source,
                            qos: m.spec.qos,
                            chunk: item.chunk.clone(),
                            index: item.index,
                        });
                        let id = m.id;
                        m.inflight.push_back((item.clone(), false));
                        self.sticky
                            .entry(item.device().into())
                            .or_insert((id, 0))
                            .1 += 1;
                    }
                    // The member's session is gone (its leave is on the
                    // way): it has left.
                    Err(_) => {
                        self.redeliver.push_front(item);
                        let member = self.members[t].id;
                        self.control(Ctl::Leave { member });
                    }
                },
            }
        }
        let next = self.next(scanned);
        if was_persistent {
            self.save(next, true).await;
        } else if let Err(e) = g.sessions.delete_group(self.key.clone()).await {
            tracing::debug!(error = %e, "shared subscription position not deleted");
        }
    }

    /// The next wanted state of the batch at hand.
    fn take(&self, pending: &mut Option<(Batch, usize)>, scanned: &mut u64) -> Option<Item> {
        let (batch, i) = pending.as_mut()?;
        let entries = batch.entries();
        let mut found = None;
        while *i < entries.len() {
            let e = &entries[*i];
            *i += 1;
            *scanned = e.position + 1;
            if self.wants(batch.chunk.device(e)) {
                found = Some(Item {
                    chunk: batch.chunk.clone(),
                    index: (batch.from + *i - 1) as u32,
                });
                break;
            }
        }
        if *i >= entries.len() {
            *pending = None;
        }
        found
    }

    /// Where the group starts: where it stopped, if stored, else now.
    async fn start(&self) -> Result<Start, super::sessions::SessionError> {
        let g = &self.groups;
        match g.sessions.group_position(self.key.clone()).await? {
            None => Ok(Start::Now),
            Some(next) => {
                let (store, app) = (g.store.clone(), self.app.clone());
                let (at, _) = tokio::task::spawn_blocking(move || resume_point(&store, &app, next))
                    .await
                    .map_err(|e| crate::store::StoreError::Thread(e.to_string()))??;
                Ok(Start::Next(at))
            }
        }
    }

    /// Removes this dispatcher from the registry unless a member joined
    /// meanwhile; true when it is gone.
    fn retire(&mut self, ctl: &mut mpsc::UnboundedReceiver<Ctl>) -> bool {
        let groups = self.groups.clone();
        let mut running = groups.running.lock().unwrap_or_else(|e| e.into_inner());
        while let Ok(c) = ctl.try_recv() {
            self.control(c);
        }
        if !self.members.is_empty() {
            return false;
        }
        if running
            .get(&self.key)
            .is_some_and(|(id, _)| *id == self.dispatcher)
        {
            running.remove(&self.key);
        }
        true
    }
}
