//! The resident token set: a lock-free table from SHA-256 to grant for the
//! hot path (`auth::hot`), and the token tree for admin operations.
//!
//! Every token is resident, so a miss is a final answer: random credentials
//! cost one hash and one map probe, never a storage read.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use super::hot::{Hit, HotTable};
use super::record::TokenRecord;
use super::scope::Scope;
use super::status::{Revoker, Status};
use super::token::{Denied, TokenEntry};
use crate::secret::TokenHash;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error("token {0} already exists")]
    Duplicate(String),
    #[error("parent token {0} does not exist")]
    MissingParent(String),
}

/// What the admin side keeps beside the grant (the grant itself lives in
/// the entry, once).
struct Node {
    entry: Arc<TokenEntry>,
    name: String,
    created_at: i64,
    hash: TokenHash,
    deactivated_by: Option<Revoker>,
    children: Vec<Box<str>>,
}

#[derive(Default)]
struct Tree {
    nodes: HashMap<Box<str>, Node>,
    /// Tokens per application, for `tokens.max_per_application`. Its keys
    /// are also the one copy of each application id its tokens share.
    per_app: HashMap<Arc<str>, usize>,
}

pub struct Registry {
    /// Hot path: SHA-256 → grant and verdict. Reads take no lock. Every
    /// change of a token's status updates its whole subtree's slots here
    /// before the admin operation returns.
    hot: HotTable,
    /// Admin side: ids, names, children. Only admin operations lock it.
    tree: Mutex<Tree>,
    /// Per application, bumped whenever one of its tokens stops being
    /// usable by an admin action, so that application's long-lived sessions
    /// re-check their grants at once, and no other application's sessions
    /// are woken by it. A watch keeps only the latest value, so it can never
    /// fill up; entries without subscribers are swept (see
    /// `subscribe_revocations`), so the map is bounded by the applications
    /// with live sessions. Locked only on connect and on revocation.
    revocations: Mutex<HashMap<Box<str>, watch::Sender<u64>>>,
    /// Tokens whose lastUsedAt changed since the last flush. Each token is
    /// queued at most once per flush (see `TokenEntry::touch`), so this is
    /// bounded by the number of tokens.
    used_tx: crossbeam_channel::Sender<Arc<TokenEntry>>,
    used_rx: crossbeam_channel::Receiver<Arc<TokenEntry>>,
    /// Until when (in [`monotonic_ns`](super::monotonic_ns)) this set of
    /// tokens may be trusted. Standalone, forever. In cluster mode the
    /// token plane's follower keeps pushing it forward while it follows
    /// the token bucket (`tokens::follow`); once it has passed, the
    /// listeners refuse every new connection and request instead of
    /// trusting a cache that may have missed a revocation. A deadline
    /// rather than a flag, so a broker that stops running for a while (a
    /// paused VM) is stale the moment it runs again, before any of its
    /// timers fire. Not read by the token check itself.
    trusted_until: AtomicU64,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    pub fn new() -> Registry {
        let (used_tx, used_rx) = crossbeam_channel::unbounded();
        Registry {
            hot: HotTable::new(),
            tree: Mutex::new(Tree::default()),
            revocations: Mutex::new(HashMap::new()),
            used_tx,
            used_rx,
            trusted_until: AtomicU64::new(u64::MAX),
        }
    }

    /// Whether the resident tokens may be trusted at `now_ns` (on
    /// [`monotonic_ns`](super::monotonic_ns)); see `trusted_until`.
    pub fn trusted(&self, now_ns: u64) -> bool {
        now_ns < self.trusted_until.load(Ordering::Acquire)
    }

    /// Trusts the resident tokens until `until_ns`; 0 distrusts them at
    /// once.
    pub fn trust_until(&self, until_ns: u64) {
        self.trusted_until.store(until_ns, Ordering::Release);
    }

    /// Until when the resident tokens are trusted.
    pub fn trusted_until(&self) -> u64 {
        self.trusted_until.load(Ordering::Acquire)
    }

    fn tree(&self) -> MutexGuard<'_, Tree> {
        // A panic while holding the lock leaves the tree as consistent as
        // each single-step mutation made it; keep serving.
        self.tree.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Installs the root admin token (kept in memory only).
    pub fn set_root(&self, hash: TokenHash) {
        self.hot
            .insert(&hash, &Arc::new(TokenEntry::new_root()), true);
    }

    /// The hot-path check: hash, probe, test the slot's verdict and grant.
    /// No lock, no allocation, no IO.
    pub fn authorize(
        &self,
        credential: &[u8],
        app: &str,
        device: Option<&str>,
        scope: Scope,
        now_ms: i64,
    ) -> Result<(), Denied> {
        self.with_grant(credential, now_ms, |hit| {
            if hit.permits(app, device, scope) {
                Ok(())
            } else {
                Err(Denied::Forbidden)
            }
        })?
    }

    /// Runs `f` with the grant of a usable credential, without cloning its
    /// entry; for callers that need to check more than one thing in
    /// between.
    pub fn with_grant<R>(
        &self,
        credential: &[u8],
        now_ms: i64,
        f: impl FnOnce(&Hit<'_>) -> R,
    ) -> Result<R, Denied> {
        let hash = TokenHash::of(credential);
        self.hot.with(&hash, |hit| {
            let hit = hit.ok_or(Denied::Unauthorized)?;
            if !hit.usable(now_ms) {
                return Err(Denied::Unauthorized);
            }
            if hit.pass_on_use(now_ms) {
                self.touch(hit.entry(), now_ms);
            }
            Ok(f(&hit))
        })
    }

    /// Resolves a credential to its grant if it is usable now; for sessions
    /// and admin calls that keep the grant.
    pub fn authenticate(&self, credential: &[u8], now_ms: i64) -> Result<Arc<TokenEntry>, Denied> {
        self.with_grant(credential, now_ms, |hit| hit.entry().clone())
    }

    /// Records a use of a token already held (e.g. by an MQTT session).
    pub fn touch(&self, entry: &Arc<TokenEntry>, now_ms: i64) {
        if entry.touch(now_ms) {
            // Unbounded but at most one entry per token; never blocks.
            let _ = self.used_tx.send(entry.clone());
        }
    }

    /// Tokens used since the last call, for persisting lastUsedAt.
    pub fn take_used(&self) -> Vec<Arc<TokenEntry>> {
        let used: Vec<_> = self.used_rx.try_iter().collect();
        for e in &used {
            e.clear_dirty();
        }
        used
    }

    /// Puts back tokens taken by [`Registry::take_used`] whose lastUsedAt
    /// could not be persisted, so the next flush writes them (unless a use
    /// in between queued them already).
    pub fn requeue_used(&self, used: Vec<Arc<TokenEntry>>) {
        for e in used {
            if e.mark_dirty() {
                let _ = self.used_tx.send(e);
            }
        }
    }

    /// Changes whenever a token of `app` stops being usable.
    pub fn subscribe_revocations(&self, app: &str) -> watch::Receiver<u64> {
        let mut map = self.revocations.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = map.get(app) {
            return tx.subscribe();
        }
        // Amortised sweep: each time the map reaches a power of two, drop
        // the applications nobody listens to any more.
        if map.len() >= 64 && map.len().is_power_of_two() {
            map.retain(|_, tx| tx.receiver_count() > 0);
        }
        let (tx, rx) = watch::channel(0);
        map.insert(app.into(), tx);
        rx
    }

    fn revoked_in(&self, app: &str) {
        let mut map = self.revocations.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = map.get(app) {
            if tx.receiver_count() == 0 {
                map.remove(app);
            } else {
                tx.send_modify(|v| *v += 1);
            }
        }
    }

    /// Number of application tokens resident (the root is not counted).
    pub fn len(&self) -> usize {
        self.tree().nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of tokens resident in `app`.
    pub fn count(&self, app: &str) -> usize {
        self.tree().per_app.get(app).copied().unwrap_or(0)
    }

    /// Adds a token (after it has been persisted). Its parent must be
    /// resident: the registry never holds an orphan.
    pub fn insert(&self, t: TokenRecord) -> Result<Arc<TokenEntry>, RegistryError> {
        let mut tree = self.tree();
        if tree.nodes.contains_key(t.id.as_str()) {
            return Err(RegistryError::Duplicate(t.id));
        }
        let parent = match &t.parent_id {
            Some(pid) => Some(
                tree.nodes
                    .get(pid.as_str())
                    .ok_or_else(|| RegistryError::MissingParent(pid.clone()))?
                    .entry
                    .clone(),
            ),
            None => None,
        };
        let id: Box<str> = t.id.into_boxed_str();
        let app: Arc<str> = match tree.per_app.get_key_value(t.app.as_str()) {
            Some((app, _)) => app.clone(),
            None => t.app.into(),
        };
        let entry = Arc::new(TokenEntry::new(
            id.clone(),
            app,
            t.scopes,
            t.devices,
            t.expires_at,
            t.rate_limit,
            parent,
            t.status,
            t.last_used.unwrap_or(0),
        ));
        if let Some(pid) = &t.parent_id {
            if let Some(p) = tree.nodes.get_mut(pid.as_str()) {
                p.children.push(id.clone());
            }
        }
        *tree.per_app.entry(entry.app.clone()).or_insert(0) += 1;
        tree.nodes.insert(
            id,
            Node {
                entry: entry.clone(),
                name: t.name,
                created_at: t.created_at,
                hash: t.hash,
                deactivated_by: t.deactivated_by,
                children: Vec::new(),
            },
        );
        self.hot.insert(&t.hash, &entry, entry.chain_active());
        Ok(entry)
    }

    pub fn entry(&self, id: &str) -> Option<Arc<TokenEntry>> {
        self.tree().nodes.get(id).map(|n| n.entry.clone())
    }

    pub fn record(&self, id: &str) -> Option<TokenRecord> {
        let tree = self.tree();
        tree.nodes.get(id).map(record_of)
    }

    /// Tokens of `app`, oldest first; for a non-root caller only its
    /// descendants.
    pub fn list(&self, app: &str, caller: &TokenEntry) -> Vec<TokenRecord> {
        let tree = self.tree();
        let mut out: Vec<TokenRecord> = tree
            .nodes
            .values()
            .filter(|n| *n.entry.app == *app && (caller.root || n.entry.descends_from(caller)))
            .map(record_of)
            .collect();
        out.sort_by(|a, b| {
            a.created_at
                .cmp(&b.created_at)
                .then_with(|| a.id.cmp(&b.id))
        });
        out
    }

    /// Changes a token's own status and records who deactivated it (see
    /// `auth::status_change` for who may). Deactivation takes effect for
    /// the whole subtree at once because usability is derived along the
    /// chain. Deletion is not a status change: use
    /// [`Registry::remove_subtree`].
    pub fn set_status(
        &self,
        id: &str,
        status: Status,
        deactivated_by: Option<Revoker>,
    ) -> Option<TokenRecord> {
        if status == Status::Deleted {
            return None;
        }
        let mut tree = self.tree();
        let node = tree.nodes.get_mut(id)?;
        node.entry.set_status(status);
        node.deactivated_by = deactivated_by;
        let view = record_of(node);
        for tid in subtree_ids(&tree, id) {
            if let Some(n) = tree.nodes.get(tid.as_str()) {
                self.hot.set_active(&n.hash, n.entry.chain_active());
            }
        }
        drop(tree);
        if status != Status::Active {
            self.revoked_in(&view.app);
        }
        Some(view)
    }

    pub fn set_name(&self, id: &str, name: String) -> Option<TokenRecord> {
        let mut tree = self.tree();
        let node = tree.nodes.get_mut(id)?;
        node.name = name;
        Some(record_of(node))
    }

    /// Ids of `id` and all its descendants, parents before children.
    pub fn subtree(&self, id: &str) -> Vec<String> {
        let tree = self.tree();
        subtree_ids(&tree, id)
    }

    /// Removes `id` and its descendants. Each is marked deleted first, so a
    /// session holding one stops at its next check.
    pub fn remove_subtree(&self, id: &str) -> Vec<String> {
        let mut tree = self.tree();
        let ids = subtree_ids(&tree, id);
        let app = tree.nodes.get(id).map(|n| n.entry.app.clone());
        for tid in &ids {
            if let Some(node) = tree.nodes.remove(tid.as_str()) {
                node.entry.set_status(Status::Deleted);
                self.hot.remove(&node.hash);
                if let Some(n) = tree.per_app.get_mut(&node.entry.app) {
                    *n -= 1;
                    if *n == 0 {
                        tree.per_app.remove(&node.entry.app);
                    }
                }
                if let Some(p) = &node.entry.parent {
                    if let Some(pn) = tree.nodes.get_mut(&*p.id) {
                        pn.children.retain(|c| **c != **tid);
                    }
                }
            }
        }
        drop(tree);
        if let Some(app) = app {
            self.revoked_in(&app);
        }
        ids
    }
}

fn subtree_ids(tree: &Tree, id: &str) -> Vec<String> {
    let mut out = Vec::new();
    if !tree.nodes.contains_key(id) {
        return out;
    }
    let mut stack = vec![id.to_string()];
    while let Some(cur) = stack.pop() {
        if let Some(n) = tree.nodes.get(cur.as_str()) {
            stack.extend(n.children.iter().map(|c| c.to_string()));
        }
        out.push(cur);
    }
    out
}

fn record_of(n: &Node) -> TokenRecord {
    let e = &n.entry;
    let last = e.last_used();
    TokenRecord {
        id: e.id.to_string(),
        app: e.app.to_string(),
        name: n.name.clone(),
        scopes: e.scopes,
        devices: e.devices.clone(),
        expires_at: e.expires_at,
        status: e.status(),
        deactivated_by: n.deactivated_by.clone(),
        parent_id: e.parent.as_ref().map(|p| p.id.to_string()),
        created_at: n.created_at,
        rate_limit: e.rate_limit,
        hash: n.hash,
        last_used: (last > 0).then_some(last),
    }
}

#[cfg(test)]
mod tests {
    use super::super::grant::Devices;
    use super::super::scope::Scopes;
    use super::*;
    use crate::auth::monotonic_ns_of;

    fn record(id: &str, app: &str) -> TokenRecord {
        TokenRecord {
            id: id.into(),
            app: app.into(),
            name: "n".into(),
            scopes: Scopes::of(&[Scope::SendState]),
            devices: Devices::All,
            expires_at: None,
            status: Status::Active,
            deactivated_by: None,
            parent_id: None,
            created_at: 0,
            rate_limit: None,
            hash: TokenHash::of(id.as_bytes()),
            last_used: None,
        }
    }

    #[test]
    fn a_revocation_wakes_only_its_own_application() {
        let r = Registry::new();
        r.insert(record("a1", "a")).unwrap();
        r.insert(record("a2", "a")).unwrap();
        r.insert(record("b1", "b")).unwrap();
        r.insert(record("b2", "b")).unwrap();
        let mut in_a = r.subscribe_revocations("a");
        let mut in_b = r.subscribe_revocations("b");
        r.set_status("a1", Status::Inactive, Some(Revoker::Root));
        assert!(in_a.has_changed().unwrap());
        assert!(!in_b.has_changed().unwrap());
        in_a.mark_unchanged();
        r.remove_subtree("b1");
        assert!(!in_a.has_changed().unwrap());
        assert!(in_b.has_changed().unwrap());
        // Re-activation is not a revocation.
        in_b.mark_unchanged();
        r.set_status("a1", Status::Active, None);
        assert!(!in_a.has_changed().unwrap());
        // An application nobody listens to any more is forgotten at its
        // next revocation.
        drop(in_b);
        r.set_status("b2", Status::Inactive, Some(Revoker::Root));
        let apps = r.revocations.lock().unwrap().len();
        assert_eq!(apps, 1);
        assert!(!in_a.has_changed().unwrap());
    }

    #[test]
    fn trust_is_a_deadline() {
        let r = Registry::new();
        // Standalone: trusted for ever.
        assert!(r.trusted(u64::MAX - 1));
        r.trust_until(0);
        assert!(!r.trusted(0));
        r.trust_until(1_000);
        assert!(r.trusted(999));
        assert!(!r.trusted(1_000));
        assert_eq!(r.trusted_until(), 1_000);
    }

    #[test]
    fn monotonic_instants_map_onto_the_clock() {
        // The clock starts at its first reading.
        crate::auth::monotonic_ns();
        let before = std::time::Instant::now();
        let now = crate::auth::monotonic_ns();
        let later = before + std::time::Duration::from_millis(5);
        assert!(monotonic_ns_of(before) <= now);
        assert!(monotonic_ns_of(later) > monotonic_ns_of(before));
        assert_eq!(monotonic_ns_of(later) - monotonic_ns_of(before), 5_000_000);
    }
}
