//! Persistent MQTT sessions: column family `sessions`, keys starting with
//! `{app}/` (the layout after it is `streams::sessions`'), so removing an
//! application removes them; values as `streams::sessions` encodes them.
//! Written through the WAL like state, so `storage.sync` applies.

use rocksdb::WriteBatch;

use super::{Store, StoreError};

/// A stored session: its key and its record.
pub type SessionRecord = (Vec<u8>, Vec<u8>);

impl Store {
    /// The stored record under `key`, if any. Blocking.
    pub fn session(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .db()
            .get_pinned_cf(self.cfs().sessions, key)?
            .map(|v| v.to_vec()))
    }

    /// Stores (or replaces) the record under `key`. Blocking.
    pub fn put_session(&self, key: &[u8], record: &[u8]) -> Result<(), StoreError> {
        let mut wb = WriteBatch::default();
        wb.put_cf(self.cfs().sessions, key, record);
        self.db().write_opt(wb, &self.write_opts())?;
        Ok(())
    }

    /// Removes the records under `keys`. Blocking.
    pub fn delete_sessions(&self, keys: &[Vec<u8>]) -> Result<(), StoreError> {
        let cf = self.cfs().sessions;
        let mut wb = WriteBatch::default();
        for k in keys {
            wb.delete_cf(cf, k);
        }
        self.db().write_opt(wb, &self.write_opts())?;
        Ok(())
    }

    /// Every stored session record, in key order. Blocking; the number of
    /// records is bounded by `streams.max_sessions`.
    pub fn sessions(&self) -> Result<Vec<SessionRecord>, StoreError> {
        let cf = self.cfs().sessions;
        let mut out = Vec::new();
        for item in self.db().iterator_cf(cf, rocksdb::IteratorMode::Start) {
            let (k, v) = item?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SyncMode;

    #[test]
    fn sessions_persist_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), SyncMode::None).unwrap();
            store.put_session(b"a/c1", b"one").unwrap();
            store.put_session(b"a/c2", b"two").unwrap();
            store.put_session(b"a/c1", b"uno").unwrap();
            store.delete_sessions(&[b"a/c2".to_vec()]).unwrap();
        }
        let store = Store::open(dir.path(), SyncMode::None).unwrap();
        assert_eq!(
            store.session(b"a/c1").unwrap().as_deref(),
            Some(&b"uno"[..])
        );
        assert_eq!(store.session(b"a/c2").unwrap(), None);
        assert_eq!(
            store.sessions().unwrap(),
            vec![(b"a/c1".to_vec(), b"uno".to_vec())]
        );
    }
}
