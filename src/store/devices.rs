//! Per-device statistics (`devices` column family) and the removal of a
//! device's or an application's data.
//!
//! Statistics: `{app}/{device}/` → first seen (u64 BE, epoch ms), last seen
//! (u64 BE), states stored (u64 BE). The writer adds one merge operand per
//! device per batch; the merge takes the minimum first, the maximum last
//! and the sum of the counts, so operands fold in any order and nothing is
//! read on the ingest path.
//!
//! Removal: a device's history, composite state and statistics go in one
//! atomic write batch (a range deletion over its history, point deletions
//! for the rest), so a crash leaves the device whole or gone. An
//! application is removed the same way over every family keyed by
//! application, together with its tokens and retention override; because
//! its tokens leave memory before that batch is written, an intent record
//! (`meta`: `remove/{app}` → the token ids) is written first and a removal
//! interrupted by a crash is finished when the store next opens.

use rocksdb::{MergeOperands, WriteBatch};

use super::{app_prefix, db::Families, device_key, Store, StoreError};

/// Encoded statistics: first, last, count.
const STATS_LEN: usize = 24;
/// Prefix of application-removal intents in `meta`.
const REMOVE_PREFIX: &[u8] = b"remove/";

/// What the store knows about one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceStats {
    /// Epoch ms of the first batch that stored a state of the device.
    pub first_seen_ms: u64,
    /// Epoch ms of the latest such batch.
    pub last_seen_ms: u64,
    /// States stored, ever (expiry does not lower it).
    pub messages: u64,
}

impl DeviceStats {
    pub(super) fn encode(self) -> [u8; STATS_LEN] {
        let mut b = [0u8; STATS_LEN];
        b[..8].copy_from_slice(&self.first_seen_ms.to_be_bytes());
        b[8..16].copy_from_slice(&self.last_seen_ms.to_be_bytes());
        b[16..].copy_from_slice(&self.messages.to_be_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<DeviceStats> {
        if b.len() != STATS_LEN {
            return None;
        }
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_be_bytes(w)
        };
        Some(DeviceStats {
            first_seen_ms: word(0),
            last_seen_ms: word(8),
            messages: word(16),
        })
    }

    fn fold(self, other: DeviceStats) -> DeviceStats {
        DeviceStats {
            first_seen_ms: self.first_seen_ms.min(other.first_seen_ms),
            last_seen_ms: self.last_seen_ms.max(other.last_seen_ms),
            messages: self.messages.saturating_add(other.messages),
        }
    }
}

/// The merge operator of the `devices` family. A malformed operand (never
/// written by this code) is skipped rather than failing the whole read.
pub(super) fn merge_stats(
    _key: &[u8],
    existing: Option<&[u8]>,
    ops: &MergeOperands,
) -> Option<Vec<u8>> {
    existing
        .into_iter()
        .chain(ops.iter())
        .filter_map(DeviceStats::decode)
        .reduce(DeviceStats::fold)
        .map(|s| s.encode().to_vec())
}

/// One device of a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceEntry {
    pub device: String,
    pub stats: DeviceStats,
}

/// A page of devices and the device the next page starts at.
#[derive(Debug, Default)]
pub struct DevicePage {
    pub items: Vec<DeviceEntry>,
    pub next: Option<String>,
}

/// The key just past every key starting with `prefix` (which ends in `/`):
/// the same bytes with the final `/` raised to `0`.
pub(super) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    if let Some(last) = end.last_mut() {
        *last = b'/' + 1;
    }
    end
}

fn remove_key(app: &str) -> Vec<u8> {
    let mut k = REMOVE_PREFIX.to_vec();
    k.extend_from_slice(app.as_bytes());
    k
}

impl Store {
    /// Devices of `app` in id order, starting at `from` (inclusive), at most
    /// `limit` of them.
    pub fn devices(
        &self,
        app: &str,
        from: Option<&str>,
        limit: usize,
    ) -> Result<DevicePage, StoreError> {
        let prefix = app_prefix(app);
        let start = match from {
            Some(d) => device_key(app, d).to_vec(),
            None => prefix.clone(),
        };
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_upper_bound(prefix_end(&prefix));
        let mut it = self.db().raw_iterator_cf_opt(self.cfs().devices, ro);
        it.seek(&start);
        let mut page = DevicePage::default();
        while it.valid() {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            let device = k
                .strip_prefix(prefix.as_slice())
                .and_then(|d| d.strip_suffix(b"/"))
                .and_then(|d| std::str::from_utf8(d).ok())
                .ok_or_else(|| StoreError::Corrupt("devices key".into()))?;
            if page.items.len() == limit {
                page.next = Some(device.to_string());
                break;
            }
            let stats = DeviceStats::decode(v)
                .ok_or_else(|| StoreError::Corrupt("devices value".into()))?;
            page.items.push(DeviceEntry {
                device: device.to_string(),
                stats,
            });
            it.next();
        }
        it.status()?;
        Ok(page)
    }

    /// The statistics of the given devices of `app` that have any, in the
    /// order given.
    pub fn device_stats(
        &self,
        app: &str,
        devices: &[&str],
    ) -> Result<Vec<DeviceEntry>, StoreError> {
        let keys: Vec<_> = devices
            .iter()
            .map(|d| (self.cfs().devices, device_key(app, d).to_vec()))
            .collect();
        let mut out = Vec::new();
        for (d, v) in devices.iter().zip(self.db().multi_get_cf(keys)) {
            if let Some(v) = v? {
                let stats = DeviceStats::decode(&v)
                    .ok_or_else(|| StoreError::Corrupt("devices value".into()))?;
                out.push(DeviceEntry {
                    device: d.to_string(),
                    stats,
                });
            }
        }
        Ok(out)
    }

    /// Removes a device's history, composite state and statistics in one
    /// fsynced batch. Removing a device that has nothing is not an error.
    /// Called by the writer thread, in order with ingest.
    pub fn remove_device(&self, app: &str, device: &str) -> Result<(), StoreError> {
        self.remove_device_then(app, device, None)
    }

    /// Cluster mode's [`Store::remove_device`]: applied by the materializer
    /// at a removal marker, with `next_seq` (the marker's sequence + 1) as
    /// the read model's position in the same batch. Everything of the
    /// device in the read model was stored before the marker (states are
    /// applied in stream order), so this removes exactly what the marker
    /// covers.
    pub fn remove_device_at(
        &self,
        app: &str,
        device: &str,
        next_seq: u64,
    ) -> Result<(), StoreError> {
        self.remove_device_then(app, device, Some(next_seq))
    }

    fn remove_device_then(
        &self,
        app: &str,
        device: &str,
        next_seq: Option<u64>,
    ) -> Result<(), StoreError> {
        let key = device_key(app, device);
        let cfs = self.cfs();
        let mut wb = WriteBatch::default();
        wb.delete_range_cf(cfs.state, &key[..], &prefix_end(&key)[..]);
        wb.delete_cf(cfs.composite, &key[..]);
        wb.delete_cf(cfs.devices, &key[..]);
        if let Some(seq) = next_seq {
            super::put_seq(&mut wb, cfs, seq);
        }
        self.write_sync(wb)
    }

    /// Records, fsynced, that `app` is being removed with `tokens`, so the
    /// removal is finished at the next open if the process stops before
    /// [`Store::remove_application`] commits.
    pub fn begin_application_removal(
        &self,
        app: &str,
        tokens: &[String],
    ) -> Result<(), StoreError> {
        let ids = serde_json::to_vec(tokens).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut wb = WriteBatch::default();
        wb.put_cf(self.cfs().meta, remove_key(app), ids);
        self.write_sync(wb)
    }

    /// Removes everything of `app` (history, composite state, device
    /// statistics, its retention override, the given tokens) and its
    /// removal intent, in one fsynced batch, then forgets its retention
    /// override in memory and has its space reclaimed in the background.
    pub fn remove_application(&self, app: &str, tokens: &[String]) -> Result<(), StoreError> {
        self.remove_application_then(app, tokens, None)
    }

    /// Cluster mode's [`Store::remove_application`], applied at a removal
    /// marker with the read model's position (see
    /// [`Store::remove_device_at`]). No intent record is involved: the
    /// marker in the stream is the intent, applied again after a crash.
    pub fn remove_application_at(
        &self,
        app: &str,
        tokens: &[String],
        next_seq: u64,
    ) -> Result<(), StoreError> {
        self.remove_application_then(app, tokens, Some(next_seq))
    }

    fn remove_application_then(
        &self,
        app: &str,
        tokens: &[String],
        next_seq: Option<u64>,
    ) -> Result<(), StoreError> {
        let cfs = self.cfs();
        let prefix = app_prefix(app);
        let end = prefix_end(&prefix);
        let mut wb = WriteBatch::default();
        for cf in app_keyed(cfs) {
            wb.delete_range_cf(cf, &prefix, &end);
        }
        for id in tokens {
            wb.delete_cf(cfs.tokens, super::token_key(b't', id));
            wb.delete_cf(cfs.tokens, super::token_key(b'u', id));
        }
        wb.delete_cf(cfs.meta, super::retention_key(app));
        wb.delete_cf(cfs.meta, remove_key(app));
        if let Some(seq) = next_seq {
            super::put_seq(&mut wb, cfs, seq);
        }
        self.write_sync(wb)?;
        self.expiry.set(app, None);
        self.reclaim(app);
        Ok(())
    }

    /// Finishes every application removal a crash interrupted (called when
    /// the store opens, before anything reads tokens or history); returns
    /// the applications removed.
    pub(super) fn finish_removals(&self) -> Result<Vec<String>, StoreError> {
        let mut pending = Vec::new();
        for item in self.db().prefix_iterator_cf(self.cfs().meta, REMOVE_PREFIX) {
            let (k, v) = item?;
            let Some(app) = k.strip_prefix(REMOVE_PREFIX) else {
                break;
            };
            let app = String::from_utf8(app.to_vec())
                .map_err(|_| StoreError::Corrupt("removal intent key".into()))?;
            let tokens: Vec<String> = serde_json::from_slice(&v)
                .map_err(|_| StoreError::Corrupt("removal intent".into()))?;
            pending.push((app, tokens));
        }
        for (app, tokens) in &pending {
            self.remove_application(app, tokens)?;
        }
        Ok(pending.into_iter().map(|(app, _)| app).collect())
    }
}

/// Every column family whose keys start with `{app}/` and that removing an
/// application empties. The `audit` family is keyed by application too but
/// is left out on purpose: an operator must still be able to read who
/// removed an application (and what was done to it before); its events
/// leave with `audit.retention`.
pub(super) fn app_keyed<'a>(cfs: &Families<'a>) -> [&'a rocksdb::ColumnFamily; 5] {
    [cfs.state, cfs.composite, cfs.devices, cfs.log, cfs.sessions]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_fold_in_any_order() {
        let a = DeviceStats {
            first_seen_ms: 10,
            last_seen_ms: 20,
            messages: 3,
        };
        let b = DeviceStats {
            first_seen_ms: 5,
            last_seen_ms: 15,
            messages: 4,
        };
        let want = DeviceStats {
            first_seen_ms: 5,
            last_seen_ms: 20,
            messages: 7,
        };
        assert_eq!(a.fold(b), want);
        assert_eq!(b.fold(a), want);
        assert_eq!(DeviceStats::decode(&want.encode()), Some(want));
        assert_eq!(DeviceStats::decode(b"short"), None);
    }

    #[test]
    fn prefix_end_bounds_exactly_the_prefix() {
        let end = prefix_end(b"app/");
        assert_eq!(end, b"app0");
        assert!(b"app/zzz".as_slice() < end.as_slice());
        assert!(b"app.x/".as_slice() < b"app/".as_slice());
        assert!(b"app0/".as_slice() >= end.as_slice());
    }

    fn stats(first: u64, last: u64, n: u64) -> DeviceStats {
        DeviceStats {
            first_seen_ms: first,
            last_seen_ms: last,
            messages: n,
        }
    }

    fn fill(store: &Store, app: &str, device: &str, seen: u64, n: u64) {
        let key = device_key(app, device);
        let mut b = store.batch(256);
        for i in 0..n {
            let at = super::super::Position {
                time_ms: seen,
                seq: seen * 100 + i,
            };
            store.put_state(&mut b, &key, at, b"{}").unwrap();
        }
        let mut op = Vec::new();
        crate::composite::encode_entry(&mut op, b"t", seen, b"1");
        store.merge_composite(&mut b, &key, &op).unwrap();
        store
            .merge_device_stats(&mut b, &key, &stats(seen, seen, n))
            .unwrap();
        store.commit(b, 0).unwrap();
    }

    fn history_len(store: &Store, app: &str, device: &str) -> usize {
        let q = super::super::HistoryQuery {
            start_ms: 0,
            end_ms: u64::MAX - 1,
            limit: 1000,
            order: super::super::Order::Asc,
            cursor: None,
        };
        store
            .history(&device_key(app, device), &q, usize::MAX)
            .unwrap()
            .items
            .len()
    }

    #[test]
    fn devices_are_listed_in_pages_with_their_statistics() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), crate::config::SyncMode::None).unwrap();
        fill(&store, "app", "d1", 10, 2);
        fill(&store, "app", "d1", 30, 1);
        fill(&store, "app", "d1", 20, 4);
        fill(&store, "app", "d2", 15, 1);
        fill(&store, "app", "d3", 16, 1);
        fill(&store, "app.x", "d0", 1, 1);
        fill(&store, "ap", "d0", 1, 1);
        let p1 = store.devices("app", None, 2).unwrap();
        assert_eq!(
            p1.items,
            vec![
                DeviceEntry {
                    device: "d1".into(),
                    stats: stats(10, 30, 7)
                },
                DeviceEntry {
                    device: "d2".into(),
                    stats: stats(15, 15, 1)
                },
            ]
        );
        assert_eq!(p1.next.as_deref(), Some("d3"));
        let p2 = store.devices("app", p1.next.as_deref(), 2).unwrap();
        assert_eq!(p2.items.len(), 1);
        assert_eq!((p2.items[0].device.as_str(), p2.next), ("d3", None));
        let some = store.device_stats("app", &["d3", "nope", "d1"]).unwrap();
        let names: Vec<&str> = some.iter().map(|e| e.device.as_str()).collect();
        assert_eq!(names, vec!["d3", "d1"]);
    }

    #[test]
    fn removing_a_device_leaves_its_neighbours() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), crate::config::SyncMode::None).unwrap();
        for d in ["d", "d.x", "d0", "e"] {
            fill(&store, "app", d, 5, 3);
        }
        store.remove_device("app", "d").unwrap();
        assert_eq!(history_len(&store, "app", "d"), 0);
        assert_eq!(store.composite(&device_key("app", "d")).unwrap(), None);
        let left: Vec<String> = store
            .devices("app", None, 10)
            .unwrap()
            .items
            .into_iter()
            .map(|e| e.device)
            .collect();
        assert_eq!(left, vec!["d.x", "d0", "e"]);
        for d in ["d.x", "d0", "e"] {
            assert_eq!(history_len(&store, "app", d), 3, "{d}");
        }
        // Idempotent.
        store.remove_device("app", "d").unwrap();
    }

    #[test]
    fn an_interrupted_application_removal_finishes_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), crate::config::SyncMode::None).unwrap();
            for app in ["app", "app.x", "app0", "ap"] {
                fill(&store, app, "d", 5, 2);
            }
            store.put_token("t1", b"{}").unwrap();
            store.put_token("t2", b"{}").unwrap();
            store.put_token("other", b"{}").unwrap();
            store
                .set_retention("app", Some(super::super::Retention::Ms(5000)))
                .unwrap();
            store.wait_reclaimed();
            store
                .begin_application_removal("app", &["t1".into(), "t2".into()])
                .unwrap();
            // The process stops here, before the removal batch.
        }
        let store = Store::open(dir.path(), crate::config::SyncMode::None).unwrap();
        assert_eq!(history_len(&store, "app", "d"), 0);
        assert!(store.devices("app", None, 10).unwrap().items.is_empty());
        assert_eq!(store.retention("app").own, None);
        assert_eq!(store.load_tokens().unwrap().len(), 1);
        for app in ["app.x", "app0", "ap"] {
            assert_eq!(history_len(&store, app, "d"), 2, "{app}");
            assert_eq!(store.devices(app, None, 10).unwrap().items.len(), 1);
        }
        assert!(store.finish_removals().unwrap().is_empty());
    }
}
