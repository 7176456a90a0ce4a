//! Everything that touches RocksDB. No other module knows RocksDB exists.
//!
//! Column families and key layout:
//! - `state`: `{app}/{device}/` ++ time_ms (u64 BE) ++ seq (u64 BE) → the
//!   `data` object exactly as sent. Ids never contain `/`, so one device's
//!   history is one contiguous key range ordered by time, and "device D
//!   between t1 and t2, newest first" is a bounded reverse range scan.
//!   Expired history is dropped by compaction (see `retention`).
//! - `composite`: `{app}/{device}/` → merge value (see `composite`).
//! - `devices`: `{app}/{device}/` → first seen, last seen, states stored
//!   (merge value, see `devices`).
//! - `tokens`: `t/{id}` → token record (JSON, with the secret's SHA-256
//!   only); `u/{id}` → lastUsedAt (i64 BE), kept apart so the periodic
//!   flush rewrites 8 bytes, not the record.
//! - `audit`: `{app}/` ++ time_ms (u64 BE) ++ seq (u64 BE) → one audit
//!   event (JSON, see `audit`). Keyed by application but deliberately not
//!   removed with it: the trail of a removed application, the removal
//!   included, stays until `audit.retention` expires it.
//! - `meta`: `seq` → next state sequence number (u64 BE), written in every
//!   state batch so sequence numbers stay unique across restarts. In
//!   cluster mode states are numbered by the ingest stream and `seq` is
//!   the last applied stream sequence + 1, so a restarted materializer
//!   resumes exactly; `audit_seq` → next audit sequence number (u64 BE),
//!   written with every audit event; `read_model_of` → the name of that
//!   stream, so a data directory is never fed from two sources;
//!   `retention/{app}` → the application's retention override;
//!   `remove/{app}` → an application removal in progress (its token ids).
//! - `log`: `{app}/` ++ position (u64 BE) → each application's commit
//!   order, for live streams (`log.rs`). Positions are the writer's
//!   sequence numbers, in cluster mode the stream sequences.
//! - `sessions`: `{app}/{client}` → persistent MQTT sessions
//!   (`sessions.rs`).
//!
//! Every family keyed by `{app}/` is listed in `devices::app_keyed`, which
//! removing an application covers; a family holding history with a time
//! (or, for the log index, in its values) gets an expiry filter
//! (`retention::TimedKeys`).

pub mod audit;
mod db;
pub mod devices;
mod log;
mod reclaim;
pub mod retention;
mod sessions;

use std::path::Path;
use std::sync::Arc;

use rocksdb::{
    DBRawIteratorWithThreadMode, MergeOperands, ReadOptions, WriteBatch, WriteOptions, DB,
};

use crate::composite;
use crate::config::SyncMode;
use crate::timefmt::now_ms;
pub use db::{Compression, StoreOptions};
use db::{Db, Families};
pub use devices::{DeviceEntry, DevicePage, DeviceStats};
pub use log::{Chunk, ChunkEntry, LogBuilder, LogPage};
pub use retention::{AppRetention, Expiry, Retention};
pub use sessions::SessionRecord;

const SEQ_KEY: &[u8] = b"seq";
const READ_MODEL_KEY: &[u8] = b"read_model_of";
const RETENTION_PREFIX: &[u8] = b"retention/";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("storage: column family {0} is missing")]
    MissingColumnFamily(&'static str),
    #[error("storage: corrupt value under {0}")]
    Corrupt(String),
    #[error("storage: {0}")]
    Thread(String),
}

/// Shared handle to the database.
#[derive(Clone)]
pub struct Store {
    db: Arc<Db>,
    sync: SyncMode,
    /// The retention in force; the expiry filter holds the same.
    expiry: Arc<Expiry>,
    /// `storage.retention_reclaim_interval`.
    reclaim_interval: std::time::Duration,
    /// Applications whose space is being reclaimed now (see `reclaim`).
    reclaimer: Arc<reclaim::Reclaimer>,
    /// `audit.retention`; the audit family's expiry filter holds the same.
    audit_expiry: Arc<Expiry>,
    /// The next audit sequence number. Held while an event is written, so
    /// the persisted value only grows (audit events are rare: admin
    /// changes).
    audit_seq: Arc<std::sync::Mutex<u64>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.db().path())
            .finish()
    }
}

/// The longest device key: two ids of `MAX_ID_LEN` bytes and two `/`.
const MAX_DEVICE_KEY: usize = 2 * crate::ids::MAX_ID_LEN + 2;

/// The key prefix of one device: `{app}/{device}/`. Its inline capacity
/// holds the longest valid ids, so building one never allocates.
pub type DeviceKey = smallvec::SmallVec<[u8; MAX_DEVICE_KEY]>;

/// The key prefix of one application: `{app}/`.
fn app_prefix(app: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(app.len() + 1);
    k.extend_from_slice(app.as_bytes());
    k.push(b'/');
    k
}

pub fn device_key(app: &str, device: &str) -> DeviceKey {
    let mut k = DeviceKey::new();
    k.extend_from_slice(app.as_bytes());
    k.push(b'/');
    k.extend_from_slice(device.as_bytes());
    k.push(b'/');
    k
}

/// Newest-first or oldest-first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    Asc,
    Desc,
}

/// Position of one history entry; also the pagination cursor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub time_ms: u64,
    pub seq: u64,
}

impl Position {
    fn bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.time_ms.to_be_bytes());
        b[8..].copy_from_slice(&self.seq.to_be_bytes());
        b
    }

    fn from_suffix(b: &[u8]) -> Option<Position> {
        if b.len() != 16 {
            return None;
        }
        let mut t = [0u8; 8];
        let mut s = [0u8; 8];
        t.copy_from_slice(&b[..8]);
        s.copy_from_slice(&b[8..]);
        Some(Position {
            time_ms: u64::from_be_bytes(t),
            seq: u64::from_be_bytes(s),
        })
    }

    /// Cursor text: 32 lowercase hex digits.
    pub fn to_cursor(self) -> String {
        self.bytes().iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_cursor(s: &str) -> Option<Position> {
        if s.len() != 32 || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        let mut b = [0u8; 16];
        for (i, byte) in b.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Position::from_suffix(&b)
    }
}

/// What one history item adds to a response besides its data
/// (`{"time":<20 digits>,"data":},`), counted against a page's byte bound.
pub const ITEM_OVERHEAD: usize = 40;

/// A history read: inclusive time bounds, a page size and where to resume.
#[derive(Clone, Copy, Debug)]
pub struct HistoryQuery {
    pub start_ms: u64,
    pub end_ms: u64,
    pub limit: usize,
    pub order: Order,
    /// The first entry of this page (from the previous page's `next`).
    pub cursor: Option<Position>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryItem {
    pub at: Position,
    pub data: Vec<u8>,
}

/// A page of history and the cursor of the next page, if there is one.
#[derive(Debug, Default)]
pub struct HistoryPage {
    pub items: Vec<HistoryItem>,
    pub next: Option<Position>,
}

/// The writes of one group commit, built by the writer thread.
pub struct CommitBatch {
    wb: WriteBatch,
    /// Reused to build each history key.
    key: Vec<u8>,
}

/// Records the next stream sequence (cluster mode) or batch sequence
/// (standalone) in `wb`, so it commits with the data it follows.
fn put_seq(wb: &mut WriteBatch, cfs: &db::Families<'_>, next_seq: u64) {
    wb.put_cf(cfs.meta, SEQ_KEY, next_seq.to_be_bytes());
}

fn merge_composite(_key: &[u8], existing: Option<&[u8]>, ops: &MergeOperands) -> Option<Vec<u8>> {
    Some(composite::merge(existing.into_iter().chain(ops.iter())))
}

impl Store {
    /// Opens (or creates) the store in `dir` with the default options of
    /// `config/sluice.toml` but `sync`.
    pub fn open(dir: &Path, sync: SyncMode) -> Result<Store, StoreError> {
        let mut o = StoreOptions::new(&crate::Config::default());
        o.sync = sync;
        Store::open_with(dir, &o)
    }

    /// Opens (or creates) the store, loads the retention overrides, and
    /// finishes any application removal a crash interrupted.
    pub fn open_with(dir: &Path, o: &StoreOptions) -> Result<Store, StoreError> {
        let expiry = Arc::new(Expiry::new(o.retention));
        let audit_expiry = Arc::new(Expiry::new(o.audit_retention));
        let db = db::open(dir, o, expiry.clone(), audit_expiry.clone())?;
        let mut store = Store {
            db: Arc::new(db),
            sync: o.sync,
            expiry,
            reclaim_interval: o.reclaim_interval,
            reclaimer: Arc::default(),
            audit_expiry,
            audit_seq: Arc::default(),
        };
        store.audit_seq = Arc::new(std::sync::Mutex::new(store.load_audit_seq()?));
        for (app, r) in store.load_retention()? {
            store.expiry.set(&app, Some(r));
        }
        store.update_reclaim()?;
        for app in store.finish_removals()? {
            tracing::warn!(
                app,
                "finished removing an application interrupted by a stop"
            );
        }
        Ok(store)
    }

    fn db(&self) -> &DB {
        self.db.borrow_owner()
    }

    fn cfs(&self) -> &Families<'_> {
        self.db.borrow_dependent()
    }

    fn write_opts(&self) -> WriteOptions {
        let mut wo = WriteOptions::default();
        // "interval" syncs from its own thread (`sync_wal`), never here.
        wo.set_sync(self.sync == SyncMode::Always);
        wo
    }

    pub fn sync_mode(&self) -> SyncMode {
        self.sync
    }

    /// The next unused state sequence number.
    pub fn load_seq(&self) -> Result<u64, StoreError> {
        match self.db().get_pinned_cf(self.cfs().meta, SEQ_KEY)? {
            None => Ok(0),
            Some(v) => {
                let b: [u8; 8] = v
                    .as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("meta/seq".into()))?;
                Ok(u64::from_be_bytes(b))
            }
        }
    }

    /// Cluster mode: the ingest stream this store is a read model of, if it
    /// was ever one.
    pub fn read_model_of(&self) -> Result<Option<String>, StoreError> {
        match self.db().get_pinned_cf(self.cfs().meta, READ_MODEL_KEY)? {
            None => Ok(None),
            Some(v) => String::from_utf8(v.to_vec())
                .map(Some)
                .map_err(|_| StoreError::Corrupt("meta/read_model_of".into())),
        }
    }

    /// Records that this store is the read model of `stream` (fsynced).
    pub fn set_read_model_of(&self, stream: &str) -> Result<(), StoreError> {
        let mut wb = WriteBatch::default();
        wb.put_cf(self.cfs().meta, READ_MODEL_KEY, stream.as_bytes());
        self.write_sync(wb)
    }

    pub fn batch(&self, capacity_bytes: usize) -> CommitBatch {
        CommitBatch {
            wb: WriteBatch::with_capacity_bytes(capacity_bytes),
            key: Vec::with_capacity(MAX_DEVICE_KEY + 16),
        }
    }

    /// Adds one history entry.
    pub fn put_state(
        &self,
        b: &mut CommitBatch,
        device: &[u8],
        at: Position,
        data: &[u8],
    ) -> Result<(), StoreError> {
        b.key.clear();
        b.key.extend_from_slice(device);
        b.key.extend_from_slice(&at.bytes());
        b.wb.put_cf(self.cfs().state, &b.key, data);
        Ok(())
    }

    /// Adds one composite-state operand for a device.
    pub fn merge_composite(
        &self,
        b: &mut CommitBatch,
        device: &[u8],
        operand: &[u8],
    ) -> Result<(), StoreError> {
        b.wb.merge_cf(self.cfs().composite, device, operand);
        Ok(())
    }

    /// Adds one statistics operand for a device: `stats.messages` states
    /// stored in a batch, seen between its first and last times.
    pub fn merge_device_stats(
        &self,
        b: &mut CommitBatch,
        device: &[u8],
        stats: &DeviceStats,
    ) -> Result<(), StoreError> {
        b.wb.merge_cf(self.cfs().devices, device, stats.encode());
        Ok(())
    }

    /// Writes the batch atomically with its WAL record (fsynced before it
    /// returns only with `storage.sync = "always"`), recording `next_seq`.
    pub fn commit(&self, mut b: CommitBatch, next_seq: u64) -> Result<(), StoreError> {
        put_seq(&mut b.wb, self.cfs(), next_seq);
        self.db().write_opt(b.wb, &self.write_opts())?;
        Ok(())
    }

    /// Syncs the WAL: at shutdown so the last batch is on disk, and every
    /// `storage.sync_interval_ms` with `storage.sync = "interval"`. Safe to
    /// call while the writer writes.
    pub fn sync_wal(&self) -> Result<(), StoreError> {
        self.db().flush_wal(true)?;
        Ok(())
    }

    /// Writes a consistent point-in-time copy of the whole database (every
    /// column family: history, composite state, tokens, sequence) into
    /// `dir`, which must not exist, while writes go on. RocksDB flushes the
    /// memtables, so everything committed before the call is in it, and
    /// hard-links the immutable table files when `dir` is on the same
    /// filesystem (copies them otherwise). Blocking.
    pub fn checkpoint(&self, dir: &Path) -> Result<(), StoreError> {
        rocksdb::checkpoint::Checkpoint::new(self.db())?.create_checkpoint(dir)?;
        Ok(())
    }

    /// Reads one page of a device's history: at most `q.limit` items, and
    /// fewer if their data would exceed `max_bytes` (a page always holds at
    /// least one item, so every item can be read). `next` is set whenever
    /// items are left. History older than the application's retention is
    /// never returned, whether or not compaction has dropped it yet.
    pub fn history(
        &self,
        device: &[u8],
        q: &HistoryQuery,
        max_bytes: usize,
    ) -> Result<HistoryPage, StoreError> {
        let app = device.split(|&b| b == b'/').next().unwrap_or_default();
        let cutoff = self.expiry.cutoff(app, now_ms().max(0) as u64);
        self.timed_page(self.cfs().state, device, cutoff, q, max_bytes)
    }

    /// One page of a family keyed by `prefix` ++ time ++ seq (history,
    /// audit), nothing older than `cutoff` (see `history`).
    fn timed_page(
        &self,
        cf: &rocksdb::ColumnFamily,
        device: &[u8],
        cutoff: u64,
        q: &HistoryQuery,
        max_bytes: usize,
    ) -> Result<HistoryPage, StoreError> {
        let start_ms = q.start_ms.max(cutoff);
        if start_ms > q.end_ms {
            return Ok(HistoryPage::default());
        }
        let key_at = |p: Position| {
            let mut k = device.to_vec();
            k.extend_from_slice(&p.bytes());
            k
        };
        let lower = key_at(Position {
            time_ms: start_ms,
            seq: 0,
        });
        // Exclusive upper bound just past the last possible key at end_ms.
        let upper = match q.end_ms.checked_add(1) {
            Some(t) => key_at(Position { time_ms: t, seq: 0 }),
            None => {
                let mut k = device.to_vec();
                k.push(0xff);
                k
            }
        };
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(lower.clone());
        ro.set_iterate_upper_bound(upper);
        let mut it: DBRawIteratorWithThreadMode<'_, DB> = self.db().raw_iterator_cf_opt(cf, ro);
        match (q.order, q.cursor) {
            (Order::Asc, Some(c)) => it.seek(key_at(c)),
            (Order::Asc, None) => it.seek(&lower),
            (Order::Desc, Some(c)) => it.seek_for_prev(key_at(c)),
            (Order::Desc, None) => it.seek_to_last(),
        }
        let mut page = HistoryPage::default();
        let mut bytes = 0usize;
        while it.valid() {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            let at = k
                .strip_prefix(device)
                .and_then(Position::from_suffix)
                .ok_or_else(|| StoreError::Corrupt("timed key".into()))?;
            bytes = bytes.saturating_add(v.len() + ITEM_OVERHEAD);
            if page.items.len() == q.limit || (!page.items.is_empty() && bytes > max_bytes) {
                page.next = Some(at);
                break;
            }
            page.items.push(HistoryItem {
                at,
                data: v.to_vec(),
            });
            match q.order {
                Order::Asc => it.next(),
                Order::Desc => it.prev(),
            }
        }
        it.status()?;
        Ok(page)
    }

    /// The folded composite value of a device (see `composite`), if any.
    pub fn composite(&self, device: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .db()
            .get_pinned_cf(self.cfs().composite, device)?
            .map(|v| v.to_vec()))
    }

    /// Stores (or replaces) a token record.
    pub fn put_token(&self, id: &str, record: &[u8]) -> Result<(), StoreError> {
        let mut wb = WriteBatch::default();
        wb.put_cf(self.cfs().tokens, token_key(b't', id), record);
        self.write_sync(wb)
    }

    /// Deletes token records and their lastUsedAt in one atomic write.
    pub fn delete_tokens(&self, ids: &[String]) -> Result<(), StoreError> {
        let cf = self.cfs().tokens;
        let mut wb = WriteBatch::default();
        for id in ids {
            wb.delete_cf(cf, token_key(b't', id));
            wb.delete_cf(cf, token_key(b'u', id));
        }
        self.write_sync(wb)
    }

    /// Persists lastUsedAt values.
    pub fn put_last_used(&self, items: &[(String, i64)]) -> Result<(), StoreError> {
        let cf = self.cfs().tokens;
        let mut wb = WriteBatch::default();
        for (id, ms) in items {
            wb.put_cf(cf, token_key(b'u', id), ms.to_be_bytes());
        }
        self.db().write_opt(wb, &self.write_opts())?;
        Ok(())
    }

    /// All token records and their lastUsedAt (0 when never used).
    pub fn load_tokens(&self) -> Result<Vec<(Vec<u8>, i64)>, StoreError> {
        let cf = self.cfs().tokens;
        let mut records = Vec::new();
        let mut last_used = std::collections::HashMap::new();
        for item in self.db().iterator_cf(cf, rocksdb::IteratorMode::Start) {
            let (k, v) = item?;
            match k.split_first() {
                Some((b't', rest)) => records.push((rest.to_vec(), v.to_vec())),
                Some((b'u', rest)) => match <[u8; 8]>::try_from(v.as_ref()) {
                    Ok(b) => {
                        last_used.insert(rest.to_vec(), i64::from_be_bytes(b));
                    }
                    // lastUsedAt is advisory: a damaged one reads as
                    // "never used" rather than stopping the broker.
                    Err(_) => tracing::warn!(
                        token = %String::from_utf8_lossy(rest),
                        "damaged lastUsedAt ignored"
                    ),
                },
                _ => {}
            }
        }
        Ok(records
            .into_iter()
            .map(|(id, rec)| {
                let lu = last_used.get(&id).copied().unwrap_or(0);
                (rec, lu)
            })
            .collect())
    }

    /// Every stored lastUsedAt by token id, whether or not the token's
    /// record is here too (in cluster mode the records live in the
    /// cluster's bucket and only lastUsedAt, this broker's own, is local).
    pub fn load_last_used(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let cf = self.cfs().tokens;
        let mut out = Vec::new();
        for item in self.db().prefix_iterator_cf(cf, b"u/") {
            let (k, v) = item?;
            let Some(id) = k.strip_prefix(b"u/") else {
                break;
            };
            // lastUsedAt is advisory: a damaged one reads as "never used"
            // rather than stopping the broker (as in `load_tokens`).
            match (<[u8; 8]>::try_from(v.as_ref()), std::str::from_utf8(id)) {
                (Ok(b), Ok(id)) => out.push((id.to_string(), i64::from_be_bytes(b))),
                _ => tracing::warn!(
                    token = %String::from_utf8_lossy(id),
                    "damaged lastUsedAt ignored"
                ),
            }
        }
        Ok(out)
    }

    /// Token changes are rare and must survive a machine crash as soon as
    /// the admin call returns: always fsynced.
    fn write_sync(&self, wb: WriteBatch) -> Result<(), StoreError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db().write_opt(wb, &wo)?;
        Ok(())
    }

    /// The retention of `app`: its own and the one in force.
    pub fn retention(&self, app: &str) -> AppRetention {
        self.expiry.of(app)
    }

    /// Sets (`Some`) or clears (`None`: the default applies) the retention
    /// override of `app`: fsynced first, then in force for reads at once
    /// and for compactions starting from now on. With a finite retention
    /// the application's range is compacted in the background, so what
    /// just expired leaves the disk now rather than within
    /// `storage.retention_reclaim_interval`.
    pub fn set_retention(&self, app: &str, own: Option<Retention>) -> Result<(), StoreError> {
        self.set_retention_then(app, own, None)
    }

    /// Cluster mode's [`Store::set_retention`], applied by the materializer
    /// at the override's control message with the read model's position
    /// (`next_seq`) in the same batch.
    pub fn set_retention_at(
        &self,
        app: &str,
        own: Option<Retention>,
        next_seq: u64,
    ) -> Result<(), StoreError> {
        self.set_retention_then(app, own, Some(next_seq))
    }

    fn set_retention_then(
        &self,
        app: &str,
        own: Option<Retention>,
        next_seq: Option<u64>,
    ) -> Result<(), StoreError> {
        let mut wb = WriteBatch::default();
        match own {
            Some(r) => wb.put_cf(self.cfs().meta, retention_key(app), r.to_bytes()),
            None => wb.delete_cf(self.cfs().meta, retention_key(app)),
        }
        if let Some(seq) = next_seq {
            put_seq(&mut wb, self.cfs(), seq);
        }
        self.write_sync(wb)?;
        self.expiry.set(app, own);
        self.update_reclaim()?;
        if self.expiry.of(app).effective != Retention::Unlimited {
            self.reclaim(app);
        }
        Ok(())
    }

    fn load_retention(&self) -> Result<Vec<(String, Retention)>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db()
            .prefix_iterator_cf(self.cfs().meta, RETENTION_PREFIX)
        {
            let (k, v) = item?;
            let Some(app) = k.strip_prefix(RETENTION_PREFIX) else {
                break;
            };
            let corrupt = || StoreError::Corrupt("retention override".into());
            let app = String::from_utf8(app.to_vec()).map_err(|_| corrupt())?;
            out.push((app, Retention::from_bytes(&v).ok_or_else(corrupt)?));
        }
        Ok(out)
    }

    /// Turns periodic compaction of history on (every
    /// `reclaim_interval`) while anything can expire, and off otherwise:
    /// without a finite retention it would rewrite every file for nothing.
    fn update_reclaim(&self) -> Result<(), StoreError> {
        let secs = match self.expiry.any() {
            true => self.reclaim_interval.as_secs().max(1),
            false => 0,
        };
        for cf in [self.cfs().state, self.cfs().log] {
            self.db()
                .set_options_cf(cf, &[("periodic_compaction_seconds", &secs.to_string())])?;
        }
        Ok(())
    }

    /// Whether RocksDB has stopped accepting writes (too much unflushed or
    /// uncompacted data, or a background error), for readiness.
    pub fn writes_stopped(&self) -> Result<bool, StoreError> {
        Ok(self
            .db()
            .property_int_value(rocksdb::properties::IS_WRITE_STOPPED)?
            .is_some_and(|v| v != 0))
    }
}

fn retention_key(app: &str) -> Vec<u8> {
    let mut k = RETENTION_PREFIX.to_vec();
    k.extend_from_slice(app.as_bytes());
    k
}

fn token_key(kind: u8, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + id.len());
    k.push(kind);
    k.push(b'/');
    k.extend_from_slice(id.as_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(t: u64, s: u64) -> Position {
        Position { time_ms: t, seq: s }
    }

    #[test]
    fn cursor_roundtrip() {
        let p = pos(1_700_000_000_000, 42);
        assert_eq!(Position::from_cursor(&p.to_cursor()), Some(p));
        assert_eq!(Position::from_cursor("xyz"), None);
        assert_eq!(Position::from_cursor(&"g".repeat(32)), None);
    }

    #[test]
    fn history_ranges_pages_and_orders() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::None).unwrap();
        let d = device_key("app", "dev");
        let other = device_key("app", "dev2");
        let mut b = store.batch(1024);
        for (i, t) in [10u64, 20, 20, 30, 40].iter().enumerate() {
            store
                .put_state(
                    &mut b,
                    &d,
                    pos(*t, i as u64),
                    format!("{{\"i\":{i}}}").as_bytes(),
                )
                .unwrap();
        }
        store.put_state(&mut b, &other, pos(25, 9), b"{}").unwrap();
        store.commit(b, 10).unwrap();
        assert_eq!(store.load_seq().unwrap(), 10);

        let q = |start, end, limit, order, cursor| HistoryQuery {
            start_ms: start,
            end_ms: end,
            limit,
            order,
            cursor,
        };
        let all = store
            .history(&d, &q(0, u64::MAX, 100, Order::Desc, None), usize::MAX)
            .unwrap();
        let seqs: Vec<u64> = all.items.iter().map(|i| i.at.seq).collect();
        assert_eq!(seqs, vec![4, 3, 2, 1, 0]);
        assert_eq!(all.next, None);

        let mid = store
            .history(&d, &q(20, 30, 100, Order::Asc, None), usize::MAX)
            .unwrap();
        let seqs: Vec<u64> = mid.items.iter().map(|i| i.at.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3]);

        // Paging through ties at the same millisecond loses nothing.
        let p1 = store
            .history(&d, &q(0, 100, 2, Order::Desc, None), usize::MAX)
            .unwrap();
        assert_eq!(p1.items.len(), 2);
        let p2 = store
            .history(&d, &q(0, 100, 2, Order::Desc, p1.next), usize::MAX)
            .unwrap();
        let p3 = store
            .history(&d, &q(0, 100, 2, Order::Desc, p2.next), usize::MAX)
            .unwrap();
        let seqs: Vec<u64> = p1
            .items
            .iter()
            .chain(&p2.items)
            .chain(&p3.items)
            .map(|i| i.at.seq)
            .collect();
        assert_eq!(seqs, vec![4, 3, 2, 1, 0]);
        assert_eq!(p3.next, None);
        assert_eq!(p1.items[0].data, b"{\"i\":4}");

        // A byte bound ends pages early; following `next` still visits
        // every item once, and a bound below one item still yields one.
        for max_bytes in [0, 60, 100] {
            let mut seen = vec![];
            let mut cursor = None;
            loop {
                let p = store
                    .history(&d, &q(0, 100, 100, Order::Asc, cursor), max_bytes)
                    .unwrap();
                assert!(!p.items.is_empty());
                let bytes: usize = p.items.iter().map(|i| i.data.len() + ITEM_OVERHEAD).sum();
                assert!(p.items.len() == 1 || bytes <= max_bytes, "{max_bytes}");
                seen.extend(p.items.iter().map(|i| i.at.seq));
                match p.next {
                    Some(n) => cursor = Some(n),
                    None => break,
                }
            }
            assert_eq!(seen, vec![0, 1, 2, 3, 4], "{max_bytes}");
        }
    }

    #[test]
    fn composite_merges_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::Always).unwrap();
        let d = device_key("app", "dev");
        let mut op1 = Vec::new();
        composite::encode_entry(&mut op1, b"t", 5, b"1");
        let mut op2 = Vec::new();
        composite::encode_entry(&mut op2, b"t", 4, b"2");
        composite::encode_entry(&mut op2, b"h", 4, b"3");
        let mut b = store.batch(64);
        store.merge_composite(&mut b, &d, &op1).unwrap();
        store.merge_composite(&mut b, &d, &op2).unwrap();
        store.commit(b, 0).unwrap();
        let v = store.composite(&d).unwrap().unwrap();
        assert_eq!(
            composite::decoded(&v),
            vec![("h".into(), 4, "3".into()), ("t".into(), 5, "1".into())]
        );
        assert_eq!(store.composite(&device_key("app", "x")).unwrap(), None);
    }

    #[test]
    fn read_model_marker_persists() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), SyncMode::None).unwrap();
            assert_eq!(store.read_model_of().unwrap(), None);
            store.set_read_model_of("SLUICE_STATE").unwrap();
        }
        let store = Store::open(dir.path(), SyncMode::None).unwrap();
        assert_eq!(
            store.read_model_of().unwrap().as_deref(),
            Some("SLUICE_STATE")
        );
    }

    #[test]
    fn tokens_persist() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), SyncMode::None).unwrap();
            store.put_token("a", b"{\"id\":\"a\"}").unwrap();
            store.put_token("b", b"{\"id\":\"b\"}").unwrap();
            store.put_last_used(&[("a".into(), 77)]).unwrap();
            store.delete_tokens(&["b".into()]).unwrap();
        }
        let store = Store::open(dir.path(), SyncMode::None).unwrap();
        assert_eq!(
            store.load_tokens().unwrap(),
            vec![(b"{\"id\":\"a\"}".to_vec(), 77)]
        );
        // A damaged lastUsedAt reads as never used instead of failing.
        let cf = store.cfs().tokens;
        store.db().put_cf(cf, token_key(b'u', "a"), b"bad").unwrap();
        assert_eq!(
            store.load_tokens().unwrap(),
            vec![(b"{\"id\":\"a\"}".to_vec(), 0)]
        );
    }

    #[test]
    fn last_used_alone_loads_without_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::None).unwrap();
        // Cluster mode: lastUsedAt here, records elsewhere.
        store
            .put_last_used(&[("b".into(), 9), ("a".into(), 7)])
            .unwrap();
        store.put_token("z", b"{}").unwrap();
        let cf = store.cfs().tokens;
        store.db().put_cf(cf, token_key(b'u', "c"), b"bad").unwrap();
        assert_eq!(
            store.load_last_used().unwrap(),
            vec![("a".to_string(), 7), ("b".to_string(), 9)]
        );
    }
}
