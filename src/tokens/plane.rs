//! The token plane in cluster mode: every token lives in one JetStream KV
//! bucket (`<prefix>_tokens`: key the token id, value its stored record)
//! that all brokers share, instead of the broker's own store.
//!
//! Reads never touch the bucket. Each broker loads the bucket at start
//! (`start`) and then follows its changes (`follow`) into the same
//! lock-free [`Registry`] the hot path reads in standalone mode; the hot
//! path neither changes nor waits on NATS. Writes (the admin changes in
//! `service`) go to the bucket with compare-and-set on the revision they
//! were validated against, and take effect on this broker, as on every
//! other, when the follower applies them: one path for everybody's
//! changes. An admin change waits for that ([`Plane::wait_applied`]);
//! a revoking one also waits until every live broker has applied it
//! ([`Plane::barrier`]).
//!
//! What a create guarantees: see `TokenService::create_in_bucket`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use super::load::{insert_in_order, parse_record, Ordered};
use super::metrics::PlaneMetrics;
use super::TokenError;
use crate::auth::{monotonic_ns, monotonic_ns_of, Registry, TokenRecord};
use crate::cluster::kv::{BucketSpec, Change, Entry, Kv, KvError};
use crate::cluster::registry::{
    BarrierError, NodeInfo, Registry as Nodes, RegistryError, RegistrySpec,
};
use crate::cluster::{Names, Nats};
use crate::config::ClusterConfig;
use crate::timefmt;

/// The settings of the plane, from `[cluster]`.
#[derive(Debug, Clone)]
pub struct PlaneConfig {
    pub node_id: String,
    pub names: Names,
    pub replicas: usize,
    pub heartbeat: Duration,
    pub stale_after: Duration,
    pub node_ttl: Duration,
    pub barrier_timeout: Duration,
    pub connect_timeout: Duration,
}

impl PlaneConfig {
    pub fn new(c: &ClusterConfig, node_id: String) -> PlaneConfig {
        PlaneConfig {
            node_id,
            names: Names::new(&c.prefix),
            replicas: c.replicas,
            heartbeat: c.heartbeat,
            stale_after: c.stale_after,
            node_ttl: c.node_ttl(),
            barrier_timeout: c.barrier_timeout,
            connect_timeout: c.connect_timeout,
        }
    }

    /// How the token bucket is created (or checked): file storage, the
    /// configured replicas, entries that never expire.
    pub fn bucket(&self) -> BucketSpec {
        BucketSpec {
            name: self.names.tokens_bucket(),
            replicas: self.replicas,
            max_age: Duration::ZERO,
            heartbeat: self.heartbeat,
        }
    }
}

/// What the follower keeps beside the registry: the bucket revision of
/// every resident token's record (the revision a compare-and-set write
/// expects), and what a delete this broker is making removed. One lock for
/// both, taken by the follower around each change it applies and by admin
/// changes to read a record and its revision together; never on the hot
/// path.
#[derive(Default)]
pub(super) struct Book {
    pub revisions: HashMap<Box<str>, u64>,
    /// The token this broker is deleting, and the descendants the follower
    /// removed from the registry with it (with their revisions): their
    /// records stay in the bucket under a deleted parent, unusable, until
    /// this broker deletes them too.
    pub own_delete: Option<(String, Vec<(String, u64)>)>,
}

pub struct Plane {
    pub(super) kv: Kv,
    pub(super) nodes: Nodes,
    pub(super) registry: Arc<Registry>,
    pub(super) config: PlaneConfig,
    pub(super) book: Mutex<Book>,
    /// The bucket revision this broker has applied. Admin changes wait on
    /// it for their own writes; a watch channel holds only the latest
    /// value, so it never fills up.
    pub(super) applied: watch::Sender<u64>,
    /// Changes still to apply after the last one applied, as the server
    /// counted when it sent it.
    pub(super) pending: std::sync::atomic::AtomicU64,
    /// Wall-clock time the last change was applied here, Unix ms (0:
    /// none since start).
    pub(super) last_applied_ms: std::sync::atomic::AtomicI64,
    pub(super) metrics: PlaneMetrics,
    /// The follower task; aborted when the plane is dropped or leaves.
    follower: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Plane {
    fn drop(&mut self) {
        if let Some(t) = self.follower.get_mut().unwrap_or_else(|p| p.into_inner()) {
            t.abort();
        }
    }
}

/// This broker's view of the cluster, for `GET /cluster`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    pub node_id: String,
    /// The token-bucket revision this broker has applied.
    pub applied: u64,
    /// Changes it had still to apply when it applied the last one.
    pub pending_changes: u64,
    /// When it last applied a change (RFC 3339), if it has since start.
    pub last_applied_at: Option<String>,
    /// Whether it refuses requests because its view of the bucket is stale.
    pub stale: bool,
    pub nodes: Vec<NodeStatus>,
}

/// One broker in the node registry, as this broker sees it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub node_id: String,
    pub applied: u64,
    pub last_heartbeat: String,
    /// Silent for longer than the node TTL: revocations no longer wait
    /// for it (it refuses requests itself by then).
    pub stale: bool,
}

impl From<NodeInfo> for NodeStatus {
    fn from(n: NodeInfo) -> NodeStatus {
        NodeStatus {
            node_id: n.node_id,
            applied: n.applied,
            last_heartbeat: timefmt::format_rfc3339(n.last_heartbeat_ms),
            stale: n.stale,
        }
    }
}

impl Plane {
    /// Opens (or creates) the token bucket, loads every token into
    /// `registry` (parents before children; records whose parent is gone
    /// are left out and deleted from the bucket), joins the node registry
    /// and starts following the bucket. `last_used` is this broker's own
    /// record of when each token was last used here.
    pub async fn start(
        nats: &Nats,
        config: PlaneConfig,
        registry: Arc<Registry>,
        last_used: HashMap<String, i64>,
        metrics: PlaneMetrics,
    ) -> Result<Arc<Plane>, TokenError> {
        // Nothing is trusted until the bucket has been read.
        registry.trust_until(0);
        let deadline = Instant::now() + config.connect_timeout;
        let kv = Kv::open(nats, &config.bucket(), deadline)
            .await
            .map_err(bucket_error)?;
        let snapshot = crate::cluster::connect::retry_until(
            deadline,
            || kv.snapshot(),
            |e| matches!(e, KvError::Unavailable(_) | KvError::Watch(_)),
        )
        .await
        .map_err(bucket_error)?;
        let mut records = Vec::with_capacity(snapshot.entries.len());
        for (index, e) in snapshot.entries.iter().enumerate() {
            let mut r = parse_record(&e.value, index)?;
            if r.id != e.key {
                return Err(TokenError::Unreadable {
                    index,
                    reason: format!("key {:?} holds the record of token {:?}", e.key, r.id),
                });
            }
            r.last_used = last_used.get(&r.id).copied().filter(|ms| *ms > 0);
            records.push((r, e.revision));
        }
        let Ordered { inserted, orphans } = insert_in_order(records, &registry)?;
        tracing::info!(
            tokens = inserted.len(),
            revision = snapshot.revision,
            "token bucket loaded"
        );
        let revisions = inserted
            .into_iter()
            .map(|(id, rev)| (id.into_boxed_str(), rev))
            .collect();
        let nodes = Nodes::start(
            nats,
            RegistrySpec {
                names: config.names.clone(),
                node_id: config.node_id.clone(),
                replicas: config.replicas,
                heartbeat: config.heartbeat,
                node_ttl: config.node_ttl,
            },
            snapshot.revision,
            deadline,
        )
        .await
        .map_err(nodes_error)?;
        let watch = crate::cluster::connect::retry_until(
            deadline,
            || kv.watch_from(snapshot.revision.saturating_add(1)),
            |_| true,
        )
        .await
        .map_err(bucket_error)?;
        metrics.revision.set(snapshot.revision as i64);
        let plane = Arc::new(Plane {
            kv,
            nodes,
            registry,
            config,
            book: Mutex::new(Book {
                revisions,
                own_delete: None,
            }),
            applied: watch::Sender::new(snapshot.revision),
            pending: Default::default(),
            last_applied_ms: Default::default(),
            metrics,
            follower: Mutex::new(None),
        });
        if !orphans.is_empty() {
            let plane = plane.clone();
            tokio::spawn(async move { plane.delete_quietly(orphans).await });
        }
        // Trusted at once unless changes came in since the snapshot: then
        // the follower trusts the registry when it has applied them.
        if watch.initial_pending() == 0 {
            plane.renew(watch.last_heard());
        }
        let follower = tokio::spawn(super::follow::follow(plane.clone(), watch));
        *plane.follower.lock().unwrap_or_else(|p| p.into_inner()) = Some(follower);
        Ok(plane)
    }

    pub(super) fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The bucket revision this broker has applied.
    pub fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    /// Trusts the registry until `stale_after` after `heard`, the last
    /// time the bucket's watch heard from its server (called only while
    /// the watch is live and caught up). So a broker whose view is lost
    /// refuses requests `stale_after` after it last heard from the bucket,
    /// never later; the node registry still counts it until then (see
    /// `ClusterConfig::node_ttl`), so no revocation barrier completes
    /// without it while it serves.
    pub(super) fn renew(&self, heard: Instant) {
        let until = monotonic_ns_of(heard.into_std())
            .saturating_add(self.config.stale_after.as_nanos() as u64);
        if until > self.registry.trusted_until() {
            self.registry.trust_until(until);
        }
    }

    /// Whether this broker refuses requests now because its view of the
    /// bucket is stale.
    pub fn stale(&self) -> bool {
        !self.registry.trusted(monotonic_ns())
    }

    /// A resident token's record and the revision it was applied at, read
    /// together (the follower cannot apply a change in between).
    pub(super) fn current(&self, id: &str) -> Option<(TokenRecord, u64)> {
        let book = self.book();
        let rev = *book.revisions.get(id)?;
        let record = self.registry.record(id)?;
        Some((record, rev))
    }

    /// Waits until this broker has applied every write the bucket had
    /// acknowledged when the call was made, so an admin change validates
    /// against the newest tokens (a token created a moment ago on another
    /// broker is found here).
    pub(super) async fn catch_up(&self) -> Result<(), TokenError> {
        if self.stale() {
            return Err(TokenError::Unavailable(
                "this broker's view of the cluster's tokens is stale".into(),
            ));
        }
        let revision = self.kv.revision().await.map_err(bucket_error)?;
        self.wait_applied(revision).await
    }

    /// Waits until this broker has applied `revision` (at most
    /// `cluster.barrier_timeout`).
    pub(super) async fn wait_applied(&self, revision: u64) -> Result<(), TokenError> {
        let mut applied = self.applied.subscribe();
        let reached = tokio::time::timeout(
            self.config.barrier_timeout,
            applied.wait_for(|a| *a >= revision),
        )
        .await;
        match reached {
            Ok(Ok(_)) => Ok(()),
            _ => Err(TokenError::Unavailable(format!(
                "this broker has not applied revision {revision} of the token bucket within {:?}",
                self.config.barrier_timeout
            ))),
        }
    }

    /// Stores a new token's record; its revision.
    pub(super) async fn create(&self, record: &TokenRecord) -> Result<u64, TokenError> {
        self.kv
            .create(&record.id, encode(record)?)
            .await
            .map_err(write_error)
    }

    /// Replaces a token's record if its revision is still `expected`.
    pub(super) async fn update(
        &self,
        record: &TokenRecord,
        expected: u64,
    ) -> Result<u64, TokenError> {
        self.kv
            .update(&record.id, encode(record)?, expected)
            .await
            .map_err(write_error)
    }

    /// Deletes a token if its record's revision is still `expected`. The
    /// descendants the follower removes with it are kept for
    /// [`Plane::take_removed`].
    pub(super) async fn delete(&self, id: &str, expected: u64) -> Result<u64, TokenError> {
        self.book().own_delete = Some((id.to_string(), Vec::new()));
        let r = self.kv.delete(id, expected).await.map_err(write_error);
        if r.is_err() {
            self.book().own_delete = None;
        }
        r
    }

    /// The descendants removed with this broker's delete of `id`.
    pub(super) fn take_removed(&self, id: &str) -> Vec<(String, u64)> {
        match self.book().own_delete.take() {
            Some((deleted, removed)) if deleted == id => removed,
            _ => Vec::new(),
        }
    }

    /// Deletes a token created by this broker whose creation is refused
    /// after all. Its secret never left this broker, so nobody can have
    /// used it; a failure to delete leaves an unusable record behind.
    pub(super) async fn discard(&self, id: &str) {
        if let Err(e) = self.kv.remove(id).await {
            tracing::warn!(id, error = %e, "could not delete a refused token's record from the bucket; it stays, unusable");
        }
    }

    /// Deletes records left under a deleted parent, each if it is still at
    /// the revision given (a record changed since is somebody else's to
    /// handle). They are unusable already; this only reclaims the space,
    /// and whatever is left is deleted by the next broker that starts.
    pub(super) async fn delete_quietly(&self, records: Vec<(String, u64)>) {
        for (id, rev) in records {
            match self.kv.delete(&id, rev).await {
                Ok(_) | Err(KvError::RevisionChanged) => {}
                Err(e) => {
                    tracing::warn!(id = %id, error = %e, "could not delete the record of a token under a deleted parent; it stays, unusable");
                }
            }
        }
    }

    /// Waits until every live broker has applied `revision`, at most
    /// `cluster.barrier_timeout`; the brokers that had not (empty: all
    /// did).
    pub(super) async fn barrier(&self, revision: u64) -> Vec<String> {
        let started = Instant::now();
        let r = self
            .nodes
            .wait_applied(revision, self.config.barrier_timeout)
            .await;
        self.metrics
            .barrier_seconds
            .observe(started.elapsed().as_secs_f64());
        match r {
            Ok(()) => Vec::new(),
            Err(e) => {
                self.metrics.barrier_timeouts.inc();
                let laggards = match e {
                    BarrierError::NotConfirmed(n) => n,
                    // Without a view of the registry, every broker not
                    // known to have applied it is unconfirmed.
                    BarrierError::ViewLost => self
                        .nodes
                        .nodes()
                        .into_iter()
                        .filter(|n| !n.stale && n.applied < revision)
                        .map(|n| n.node_id)
                        .collect(),
                };
                tracing::warn!(
                    revision,
                    unconfirmed = ?laggards,
                    "revocation not confirmed by every broker in time"
                );
                laggards
            }
        }
    }

    /// Leaves the cluster on a clean shutdown: the follower stops and the
    /// node registry forgets this broker at once, so revocations stop
    /// waiting for it.
    pub async fn leave(&self) {
        if let Some(t) = self
            .follower
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            t.abort();
        }
        if let Err(e) = self.nodes.leave().await {
            tracing::warn!(error = %e, "could not leave the node registry; other brokers drop this one after its TTL");
        }
    }

    /// This broker's view of the cluster.
    pub fn status(&self) -> ClusterStatus {
        let last = self
            .last_applied_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        ClusterStatus {
            node_id: self.config.node_id.clone(),
            applied: self.applied(),
            pending_changes: self.pending.load(std::sync::atomic::Ordering::Relaxed),
            last_applied_at: (last > 0).then(|| timefmt::format_rfc3339(last)),
            stale: self.stale(),
            nodes: self
                .nodes
                .nodes()
                .into_iter()
                .map(NodeStatus::from)
                .collect(),
        }
    }

    /// Applies one change of the bucket to the registry (see `follow`).
    pub(super) fn apply(&self, change: &Change) {
        let mut book = self.book();
        match change {
            Change::Put(e) => self.apply_put(&mut book, e),
            Change::Delete { key, .. } => self.apply_delete(&mut book, key),
        }
    }

    fn apply_put(&self, book: &mut Book, e: &Entry) {
        let record = match parse_record(&e.value, 0) {
            Ok(r) if r.id == e.key => r,
            Ok(r) => {
                tracing::error!(key = %e.key, id = %r.id, revision = e.revision, "token record under another token's key: ignored, and the key's token is unusable here");
                self.remove(book, &e.key);
                return;
            }
            Err(err) => {
                tracing::error!(key = %e.key, revision = e.revision, error = %err, "unreadable token record: ignored, and the token is unusable here");
                self.remove(book, &e.key);
                return;
            }
        };
        let id = record.id.clone();
        match self.registry.record(&id) {
            Some(current) if same_grant(&current, &record) => {
                self.registry.set_name(&id, record.name);
                self.registry
                    .set_status(&id, record.status, record.deactivated_by);
                book.revisions.insert(id.into_boxed_str(), e.revision);
            }
            Some(_) => {
                // No API call changes a grant; a record replaced by other
                // means replaces the token, and its subtree is dropped
                // (unusable here until a restart loads it again).
                tracing::warn!(id = %id, revision = e.revision, "token record replaced with another grant: the token and its descendants are reloaded");
                self.remove(book, &id);
                self.insert(book, record, e.revision);
            }
            None => self.insert(book, record, e.revision),
        }
    }

    fn insert(&self, book: &mut Book, record: TokenRecord, revision: u64) {
        let id = record.id.clone();
        match self.registry.insert(record) {
            Ok(_) => {
                book.revisions.insert(id.into_boxed_str(), revision);
            }
            // Created under a parent deleted before it (in bucket order):
            // it can never be usable, and is never loaded. Its creator
            // deletes it, or failing that the next broker to start.
            Err(e) => tracing::debug!(id = %id, revision, error = %e, "token not loaded"),
        }
    }

    fn apply_delete(&self, book: &mut Book, key: &str) {
        let removed = self.remove(book, key);
        if let Some((deleting, kept)) = &mut book.own_delete {
            if deleting == key {
                kept.extend(removed.into_iter().filter(|(id, _)| id != key));
            }
        }
    }

    /// Removes `id` and its descendants from the registry; their ids and
    /// revisions.
    fn remove(&self, book: &mut Book, id: &str) -> Vec<(String, u64)> {
        self.registry
            .remove_subtree(id)
            .into_iter()
            .filter_map(|tid| {
                let rev = book.revisions.remove(tid.as_str())?;
                Some((tid, rev))
            })
            .collect()
    }

    /// Tells the node registry (and so every barrier) how far this broker
    /// has applied.
    pub(super) async fn report_applied(&self, revision: u64) {
        self.nodes.applied(revision).await;
    }
}

/// Whether two records of one token grant the same (only name, status and
/// who deactivated it may change).
fn same_grant(a: &TokenRecord, b: &TokenRecord) -> bool {
    a.app == b.app
        && a.hash == b.hash
        && a.parent_id == b.parent_id
        && a.scopes == b.scopes
        && a.devices == b.devices
        && a.expires_at == b.expires_at
        && a.rate_limit == b.rate_limit
}

fn encode(record: &TokenRecord) -> Result<Bytes, TokenError> {
    serde_json::to_vec(record)
        .map(Bytes::from)
        .map_err(|e| TokenError::Internal(e.to_string()))
}

pub(super) fn bucket_error(e: KvError) -> TokenError {
    match e {
        KvError::Unavailable(d) => TokenError::Unavailable(d),
        KvError::Watch(w) => TokenError::Unavailable(w.to_string()),
        other => TokenError::Cluster(other.to_string()),
    }
}

fn write_error(e: KvError) -> TokenError {
    match e {
        KvError::RevisionChanged | KvError::AlreadyExists => TokenError::Conflict,
        other => bucket_error(other),
    }
}

fn nodes_error(e: RegistryError) -> TokenError {
    match e {
        RegistryError::Kv(k) => bucket_error(k),
        other => TokenError::Cluster(other.to_string()),
    }
}
