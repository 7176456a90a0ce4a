//! The limit on distinct attribute names per device
//! (`storage.max_attributes_per_device`).
//!
//! A device's composite state is one RocksDB merge value that grows by one
//! entry per new attribute name, so a device that keeps inventing names
//! would grow it forever. Reading that value before every write would cost
//! a RocksDB read (and a fold of its pending operands) per request, so the
//! writer thread, which alone writes composite state, remembers the names
//! of recently active devices in a bounded cache and reads a device's
//! stored value only when the device is not in it. Names are kept as their
//! `composite::name_hash` (keyed per process, so a client cannot craft
//! names that collide with ones a device already has), computed when the
//! request is parsed, off the writer thread.

use std::collections::HashSet;

use quick_cache::unsync::Cache;
use quick_cache::Weighter;

use crate::composite;
use crate::store::{Store, StoreError};

/// A device's attribute names, as keyed hashes.
type Names = HashSet<u64, rustc_hash::FxBuildHasher>;

/// Weighs a cached device by its names, plus one for the device itself.
#[derive(Clone, Copy)]
struct ByNames;

impl Weighter<Vec<u8>, Names> for ByNames {
    fn weight(&self, _device: &Vec<u8>, names: &Names) -> u64 {
        names.len() as u64 + 1
    }
}

/// Whether a request's attributes fit its device's limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Fits,
    /// The request would take the device past this many names.
    TooMany {
        limit: usize,
    },
}

/// The writer thread's view of each device's attribute names.
pub struct AttributeLimit {
    max: usize,
    /// Devices by their key prefix. Bounded by `storage.attribute_cache_names`
    /// in total names; when full, the least recently useful device is
    /// dropped and read again from storage when it next sends.
    cache: Cache<Vec<u8>, Names, ByNames>,
    /// Hashes of the names of the request being checked that its device
    /// does not have yet (reused between requests).
    fresh: Vec<u64>,
}

impl AttributeLimit {
    pub fn new(max: usize, cache_names: usize) -> AttributeLimit {
        let weight = cache_names.max(max + 1) as u64;
        AttributeLimit {
            max,
            cache: Cache::with_weighter((weight / 8).max(16) as usize, weight, ByNames),
            fresh: Vec::new(),
        }
    }

    /// Checks the attribute names of one request for `device` (their
    /// `composite::name_hash`es) and, if they fit, records them as the
    /// device's (the request is about to be written). Names the device
    /// already has always fit, so a device over the limit (say, after the
    /// limit was lowered) can still update them.
    pub fn admit(
        &mut self,
        store: &Store,
        device: &[u8],
        names: &[u64],
    ) -> Result<Verdict, StoreError> {
        if names.is_empty() {
            return Ok(Verdict::Fits);
        }
        let mut uncached;
        let mut cached = self.cache.get_mut(device);
        if cached.is_none() {
            drop(cached);
            let known = stored_names(store, device)?;
            self.cache.insert(device.to_vec(), known);
            cached = self.cache.get_mut(device);
        }
        let known: &mut Names = match cached.as_deref_mut() {
            Some(known) => known,
            // Not admitted by the cache (its bound is below one device's
            // names): check against storage, remembering nothing.
            None => {
                uncached = stored_names(store, device)?;
                &mut uncached
            }
        };
        self.fresh.clear();
        self.fresh
            .extend(names.iter().copied().filter(|h| !known.contains(h)));
        if !self.fresh.is_empty() && known.len() + self.fresh.len() > self.max {
            return Ok(Verdict::TooMany { limit: self.max });
        }
        known.extend(self.fresh.iter().copied());
        Ok(Verdict::Fits)
    }

    /// Forgets everything: after a failed commit the names recorded for its
    /// requests were never stored.
    pub fn forget(&mut self) {
        self.cache.clear();
    }

    /// Forgets one device, whose composite state was removed.
    pub fn forget_device(&mut self, device: &[u8]) {
        self.cache.remove(device);
    }

    /// Forgets every device of `app`, whose data was removed.
    pub fn forget_application(&mut self, app: &str) {
        self.cache.retain(|device, _| {
            !(device.starts_with(app.as_bytes()) && device.get(app.len()) == Some(&b'/'))
        });
    }
}

fn stored_names(store: &Store, device: &[u8]) -> Result<Names, StoreError> {
    let value = store.composite(device)?.unwrap_or_default();
    Ok(composite::entries(&value)
        .map(|e| composite::name_hash(e.name))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SyncMode;
    use crate::store::device_key;

    fn operand(names: &[&str]) -> Vec<u8> {
        let mut sorted = names.to_vec();
        sorted.sort();
        let mut v = Vec::new();
        for n in sorted {
            composite::encode_entry(&mut v, n.as_bytes(), 1, b"1");
        }
        v
    }

    fn hashes(names: &[&str]) -> Vec<u64> {
        names
            .iter()
            .map(|n| composite::name_hash(n.as_bytes()))
            .collect()
    }

    #[test]
    fn counts_new_names_only_and_reads_storage_on_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::None).unwrap();
        let d = device_key("a", "d");
        // Two names already stored before the writer started.
        let mut b = store.batch(64);
        store
            .merge_composite(&mut b, &d, &operand(&["x", "y"]))
            .unwrap();
        store.commit(b, 0).unwrap();

        let mut limit = AttributeLimit::new(3, 100);
        let fits = |l: &mut AttributeLimit, names: &[&str]| {
            l.admit(&store, &d, &hashes(names)).unwrap() == Verdict::Fits
        };
        assert!(fits(&mut limit, &["x", "y"]));
        assert!(!fits(&mut limit, &["z", "w"]), "two new names: 4 > 3");
        assert!(fits(&mut limit, &["x", "z"]), "one new name: 3");
        assert!(!fits(&mut limit, &["w"]));
        assert!(fits(&mut limit, &["x", "y", "z"]), "known names always fit");
        assert!(fits(&mut limit, &[]));
        // Another device has its own count.
        let other = device_key("a", "e");
        assert!(limit
            .admit(&store, &other, &hashes(&["p", "q", "r"]))
            .is_ok_and(|v| v == Verdict::Fits));

        // After `forget`, names are read from storage again: z was never
        // stored, so it counts as new once more.
        limit.forget();
        assert!(fits(&mut limit, &["z"]));
        assert!(!fits(&mut limit, &["w"]));
    }

    #[test]
    fn a_cache_smaller_than_the_devices_still_enforces_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::None).unwrap();
        let mut limit = AttributeLimit::new(2, 3);
        for round in 0..3 {
            for dev in 0..50 {
                let d = device_key("a", &format!("d{dev}"));
                let names = [format!("n{round}")];
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                let verdict = limit.admit(&store, &d, &hashes(&names)).unwrap();
                let fits = verdict == Verdict::Fits;
                if fits {
                    let mut b = store.batch(64);
                    store.merge_composite(&mut b, &d, &operand(&names)).unwrap();
                    store.commit(b, 0).unwrap();
                }
                assert_eq!(fits, round < 2, "device {dev} round {round}");
            }
        }
    }
}
