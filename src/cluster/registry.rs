//! The node registry and the revocation barrier.
//!
//! Every broker reports the token-bucket revision it has applied:
//! - on every `heartbeat`, as a put of its entry in the `<prefix>_nodes`
//!   bucket (membership: a broker whose entry is older than the node TTL
//!   has left; the bucket is the durable list every broker reads at
//!   start);
//! - right after it applies a change, as a core-NATS message on
//!   `<prefix>.nodes.applied` (the fast path: a barrier completes as soon
//!   as the last broker's message arrives, without waiting for a
//!   heartbeat).
//!
//! `wait_applied(revision)` returns once every live broker has applied at
//! least `revision`. A broker counts as live until it has been silent for
//! the node TTL (`stale_after + heartbeat`): by then it has had no view of
//! the token bucket for `stale_after` and refuses all requests itself, so
//! dropping it cannot let a revoked token through. While this broker's own
//! view of the registry is lost, no barrier succeeds; and a barrier decides
//! only once that view has caught up with the registry bucket as it was
//! when the barrier started, so a broker that has just joined is not
//! missed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::connect::Nats;
use super::kv::{BucketSpec, Change, Kv, KvError};
use super::names::Names;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("node registry: {0}")]
    Kv(#[from] KvError),
    #[error("cannot subscribe to applied revisions: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
}

/// Why a barrier did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BarrierError {
    #[error("brokers that had not confirmed in time: {}", .0.join(", "))]
    NotConfirmed(Vec<String>),
    #[error("this broker has no live view of the node registry")]
    ViewLost,
}

#[derive(Debug, Clone)]
pub struct RegistrySpec {
    pub names: Names,
    pub node_id: String,
    pub replicas: usize,
    pub heartbeat: Duration,
    /// Silence after which a broker no longer counts (see the module doc).
    pub node_ttl: Duration,
}

/// One broker as this broker sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeInfo {
    pub node_id: String,
    pub applied: u64,
    /// Wall-clock time of its last heartbeat, Unix milliseconds.
    pub last_heartbeat_ms: i64,
    /// Silent for longer than the node TTL: not waited for.
    pub stale: bool,
}

/// What a heartbeat entry holds.
#[derive(Debug, Serialize, Deserialize)]
struct Beat {
    applied: u64,
}

/// What an applied-revision message holds.
#[derive(Debug, Serialize, Deserialize)]
struct Applied {
    node: String,
    applied: u64,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    applied: u64,
    /// Local time of the last sign of life.
    at: Instant,
}

struct Shared {
    spec: RegistrySpec,
    nodes: Mutex<HashMap<String, Seen>>,
    /// This broker's applied revision, sent with every heartbeat.
    applied: AtomicU64,
    /// Bumped on every change of `nodes` or of `live`; barriers wait on it.
    changed: watch::Sender<u64>,
    /// Whether the registry watch is live. Barriers fail while it is not.
    live: watch::Sender<bool>,
    /// The registry bucket's revision `nodes` reflects (see
    /// `Registry::wait_applied`).
    seen: AtomicU64,
}

impl Shared {
    fn record(&self, node: &str, applied: u64, at: Instant) {
        {
            let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
            let seen = nodes
                .entry(node.to_string())
                .or_insert(Seen { applied, at });
            seen.applied = seen.applied.max(applied);
            seen.at = seen.at.max(at);
        }
        self.changed.send_modify(|v| *v += 1);
    }

    fn forget(&self, node: &str) {
        self.nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(node);
        self.changed.send_modify(|v| *v += 1);
    }
}

pub struct Registry {
    shared: Arc<Shared>,
    kv: Kv,
    nats: Nats,
    /// Heartbeat and followers; aborted when the registry is dropped or
    /// leaves.
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Registry {
    fn drop(&mut self) {
        for t in self
            .tasks
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            t.abort();
        }
    }
}

impl Registry {
    /// Opens the registry bucket, reads every broker in it, starts this
    /// broker's heartbeat (applied revision `applied`) and follows the
    /// others.
    pub async fn start(
        nats: &Nats,
        spec: RegistrySpec,
        applied: u64,
        deadline: Instant,
    ) -> Result<Registry, RegistryError> {
        let kv = Kv::open(
            nats,
            &BucketSpec {
                name: spec.names.nodes_bucket(),
                replicas: spec.replicas,
                // Entries of brokers gone for good disappear by themselves.
                max_age: (spec.node_ttl * 20).max(Duration::from_secs(60)),
                heartbeat: spec.heartbeat,
            },
            deadline,
        )
        .await?;
        let (changed, _) = watch::channel(0);
        let (live, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            spec: spec.clone(),
            nodes: Mutex::new(HashMap::new()),
            applied: AtomicU64::new(applied),
            changed,
            live,
            seen: AtomicU64::new(0),
        });
        let subscriber = nats.client.subscribe(spec.names.applied_subject()).await?;
        // This broker is a member from the start, before its first
        // heartbeat comes back through the watch.
        shared.record(&spec.node_id, applied, Instant::now());
        kv.put(&spec.node_id, beat(applied)).await?;
        let tasks = vec![
            tokio::spawn(follow_bucket(kv.clone(), shared.clone())),
            tokio::spawn(follow_applied(subscriber, shared.clone())),
            tokio::spawn(heartbeat(kv.clone(), shared.clone())),
        ];
        let mut ready = shared.live.subscribe();
        let _ = tokio::time::timeout_at(deadline, ready.wait_for(|l| *l)).await;
        Ok(Registry {
            shared,
            kv,
            nats: nats.clone(),
            tasks: Mutex::new(tasks),
        })
    }

    /// Reports that this broker has applied the token bucket up to
    /// `revision`: announced at once, and carried by every later heartbeat.
    pub async fn applied(&self, revision: u64) {
        let previous = self.shared.applied.fetch_max(revision, Ordering::AcqRel);
        if revision <= previous {
            return;
        }
        self.shared
            .record(&self.shared.spec.node_id, revision, Instant::now());
        let message = Applied {
            node: self.shared.spec.node_id.clone(),
            applied: revision,
        };
        if let Ok(body) = serde_json::to_vec(&message) {
            // Lost messages only delay a barrier until the next heartbeat.
            let _ = self
                .nats
                .client
                .publish(self.shared.spec.names.applied_subject(), body.into())
                .await;
        }
    }

    /// Every broker in the registry, stale ones included, by id.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        let now = Instant::now();
        let wall = unix_ms();
        let nodes = self.shared.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<NodeInfo> = nodes
            .iter()
            .map(|(id, seen)| {
                let age = now.saturating_duration_since(seen.at);
                NodeInfo {
                    node_id: id.clone(),
                    applied: seen.applied,
                    last_heartbeat_ms: wall - age.as_millis() as i64,
                    stale: age > self.shared.spec.node_ttl,
                }
            })
            .collect();
        out.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        out
    }

    /// Waits until every live broker has applied `revision`, at most
    /// `timeout`; otherwise names those that had not.
    ///
    /// It first reads the registry bucket's newest revision and decides
    /// only once this broker's view has reached it: a broker that joined
    /// (and was acknowledged in the bucket) before the caller stored
    /// `revision` is waited for even if this broker had not heard of it
    /// yet.
    pub async fn wait_applied(&self, revision: u64, timeout: Duration) -> Result<(), BarrierError> {
        let deadline = Instant::now() + timeout;
        let mut changed = self.shared.changed.subscribe();
        // Unknown while the bucket does not answer (NATS down, a leader
        // election): asked again on every turn.
        let mut members: Option<u64> = None;
        loop {
            if members.is_none() {
                members = match tokio::time::timeout_at(deadline, self.kv.revision()).await {
                    Ok(Ok(r)) => Some(r),
                    _ => None,
                };
            }
            let now = Instant::now();
            let live = *self.shared.live.borrow()
                && members.is_some_and(|m| self.shared.seen.load(Ordering::Acquire) >= m);
            let (laggards, next_expiry) = self.laggards(revision, now);
            if live && laggards.is_empty() {
                return Ok(());
            }
            if now >= deadline {
                return Err(if live {
                    BarrierError::NotConfirmed(laggards)
                } else {
                    BarrierError::ViewLost
                });
            }
            // Wake on news, when a laggard's TTL runs out, or at the end
            // (soon, to ask again, while the registry's revision is unknown).
            let mut wake = next_expiry.map_or(deadline, |t| t.min(deadline));
            if members.is_none() {
                wake = wake.min(now + Duration::from_millis(200));
            }
            changed.borrow_and_update();
            let _ = tokio::time::timeout_at(wake, changed.changed()).await;
        }
    }

    /// Live brokers below `revision`, and when the first of them expires.
    fn laggards(&self, revision: u64, now: Instant) -> (Vec<String>, Option<Instant>) {
        let ttl = self.shared.spec.node_ttl;
        let nodes = self.shared.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let mut names = Vec::new();
        let mut expiry: Option<Instant> = None;
        for (id, seen) in nodes.iter() {
            let expires = seen.at + ttl;
            if expires <= now || seen.applied >= revision {
                continue;
            }
            names.push(id.clone());
            expiry = Some(expiry.map_or(expires, |e: Instant| e.min(expires)));
        }
        names.sort();
        (names, expiry)
    }

    /// Leaves the cluster on a clean shutdown: stops heartbeating and
    /// removes this broker's entry, so barriers stop waiting for it at once.
    pub async fn leave(&self) -> Result<(), RegistryError> {
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            t.abort();
        }
        self.kv.remove(&self.shared.spec.node_id).await?;
        Ok(())
    }
}

fn beat(applied: u64) -> Bytes {
    serde_json::to_vec(&Beat { applied })
        .map(Bytes::from)
        .unwrap_or_default()
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Local instant of a heartbeat stored at `stored_ms` (server clock).
fn instant_of(stored_ms: i64) -> Instant {
    let age = Duration::from_millis(unix_ms().saturating_sub(stored_ms).max(0) as u64);
    Instant::now().checked_sub(age).unwrap_or_else(Instant::now)
}

/// Keeps `shared.nodes` equal to the bucket: a snapshot, then its changes;
/// a lost watch marks the view lost and starts over.
async fn follow_bucket(kv: Kv, shared: Arc<Shared>) {
    let mut pause = Duration::from_millis(50);
    loop {
        if let Err(e) = follow_once(&kv, &shared).await {
            tracing::warn!(error = %e, "node registry view lost; re-reading it");
        }
        shared.live.send_replace(false);
        shared.changed.send_modify(|v| *v += 1);
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

async fn follow_once(kv: &Kv, shared: &Shared) -> Result<(), KvError> {
    let snapshot = kv.snapshot().await?;
    let mut watch = kv.watch_from(snapshot.revision.saturating_add(1)).await?;
    {
        let mut nodes = shared.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let own = shared.spec.node_id.as_str();
        nodes.retain(|id, _| id == own || snapshot.entries.iter().any(|e| e.key == *id));
        drop(nodes);
    }
    for e in &snapshot.entries {
        if let Ok(b) = serde_json::from_slice::<Beat>(&e.value) {
            shared.record(&e.key, b.applied, instant_of(e.stored_ms));
        }
    }
    shared.seen.store(snapshot.revision, Ordering::Release);
    shared.live.send_replace(true);
    shared.changed.send_modify(|v| *v += 1);
    loop {
        let change = watch.next().await?;
        shared.seen.store(change.revision(), Ordering::Release);
        match change {
            Change::Put(e) => {
                if let Ok(b) = serde_json::from_slice::<Beat>(&e.value) {
                    shared.record(&e.key, b.applied, Instant::now());
                }
            }
            Change::Delete { key, .. } => shared.forget(&key),
        }
    }
}

/// Applies applied-revision announcements; a sign of life too.
async fn follow_applied(mut subscriber: async_nats::Subscriber, shared: Arc<Shared>) {
    while let Some(m) = subscriber.next().await {
        if let Ok(a) = serde_json::from_slice::<Applied>(&m.payload) {
            shared.record(&a.node, a.applied, Instant::now());
        }
    }
}

async fn heartbeat(kv: Kv, shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.spec.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let applied = shared.applied.load(Ordering::Acquire);
        if let Err(e) = kv.put(&shared.spec.node_id, beat(applied)).await {
            tracing::warn!(error = %e, "registry heartbeat failed");
        }
    }
}
