//! The audit trail (`audit` column family): `{app}/` ++ time_ms (u64 BE)
//! ++ seq (u64 BE) → one event as JSON, without its id and time (the key
//! holds both; reads put them back). One application's trail is one key
//! range in time order, so reading it newest first, by time range and by
//! cursor is the history scan over another family.
//!
//! Events expire by `audit.retention` alone: on read at once, from disk
//! through the expiry filter (`retention::TimedKeys::Audit`). Removing an
//! application leaves its trail (see `devices::app_keyed`), so the removal
//! itself stays auditable.

use rocksdb::WriteBatch;

use super::{HistoryPage, HistoryQuery, Position, Store, StoreError};
use crate::timefmt::now_ms;

const AUDIT_SEQ_KEY: &[u8] = b"audit_seq";

fn audit_key(app: &str, at: Position) -> Vec<u8> {
    let mut k = Vec::with_capacity(app.len() + 17);
    k.extend_from_slice(app.as_bytes());
    k.push(b'/');
    k.extend_from_slice(&at.bytes());
    k
}

impl Store {
    pub(super) fn load_audit_seq(&self) -> Result<u64, StoreError> {
        match self.db().get_pinned_cf(self.cfs().meta, AUDIT_SEQ_KEY)? {
            None => Ok(0),
            Some(v) => {
                let b: [u8; 8] = v
                    .as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("meta/audit_seq".into()))?;
                Ok(u64::from_be_bytes(b))
            }
        }
    }

    /// Appends one event (a JSON object) to `app`'s trail, fsynced, and
    /// returns its position (time now, a sequence number unique across
    /// restarts). Blocking.
    pub fn put_audit(&self, app: &str, event: &[u8]) -> Result<Position, StoreError> {
        let mut next = self.audit_seq.lock().unwrap_or_else(|e| e.into_inner());
        let at = Position {
            time_ms: now_ms().max(0) as u64,
            seq: *next,
        };
        let mut wb = WriteBatch::default();
        wb.put_cf(self.cfs().audit, audit_key(app, at), event);
        wb.put_cf(self.cfs().meta, AUDIT_SEQ_KEY, (at.seq + 1).to_be_bytes());
        self.write_sync(wb)?;
        *next = at.seq + 1;
        Ok(at)
    }

    /// One page of `app`'s trail, as `history` pages a device's history;
    /// nothing older than `audit.retention`.
    pub fn audit(
        &self,
        app: &str,
        q: &HistoryQuery,
        max_bytes: usize,
    ) -> Result<HistoryPage, StoreError> {
        let prefix = super::app_prefix(app);
        let cutoff = self
            .audit_expiry
            .cutoff(app.as_bytes(), now_ms().max(0) as u64);
        self.timed_page(self.cfs().audit, &prefix, cutoff, q, max_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Order, Retention, StoreOptions};

    fn all(store: &Store, app: &str, order: Order) -> Vec<(u64, Vec<u8>)> {
        let q = HistoryQuery {
            start_ms: 0,
            end_ms: u64::MAX - 1,
            limit: 100,
            order,
            cursor: None,
        };
        store
            .audit(app, &q, usize::MAX)
            .unwrap()
            .items
            .into_iter()
            .map(|i| (i.at.seq, i.data))
            .collect()
    }

    #[test]
    fn events_are_per_application_ordered_and_survive_removal_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), crate::config::SyncMode::None).unwrap();
            store.put_audit("app", b"{\"n\":1}").unwrap();
            store.put_audit("app.x", b"{\"n\":2}").unwrap();
            store.put_audit("app", b"{\"n\":3}").unwrap();
            store.remove_application("app", &[]).unwrap();
            store.wait_reclaimed();
            assert_eq!(
                all(&store, "app", Order::Desc),
                vec![(2, b"{\"n\":3}".to_vec()), (0, b"{\"n\":1}".to_vec())]
            );
            assert_eq!(all(&store, "app.x", Order::Asc).len(), 1);
            assert!(all(&store, "ap", Order::Asc).is_empty());
        }
        // Sequence numbers stay unique across a restart.
        let store = Store::open(dir.path(), crate::config::SyncMode::None).unwrap();
        assert_eq!(store.put_audit("app", b"{}").unwrap().seq, 3);
        assert_eq!(all(&store, "app", Order::Asc).len(), 3);
    }

    #[test]
    fn expired_events_are_not_read_and_compaction_drops_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = StoreOptions::new(&crate::Config::default());
        o.audit_retention = Retention::Ms(1000);
        let store = Store::open_with(dir.path(), &o).unwrap();
        // An event written 10 s ago, as a key the writer would have made.
        let old = Position {
            time_ms: now_ms() as u64 - 10_000,
            seq: 99,
        };
        store
            .db()
            .put_cf(store.cfs().audit, audit_key("app", old), b"{}")
            .unwrap();
        store.put_audit("app", b"{\"new\":true}").unwrap();
        assert_eq!(
            all(&store, "app", Order::Asc),
            vec![(0, b"{\"new\":true}".to_vec())]
        );
        let db = store.db();
        db.flush_cf(store.cfs().audit).unwrap();
        db.compact_range_cf(store.cfs().audit, None::<&[u8]>, None::<&[u8]>);
        let raw = db
            .iterator_cf(store.cfs().audit, rocksdb::IteratorMode::Start)
            .count();
        assert_eq!(raw, 1);
    }
}
