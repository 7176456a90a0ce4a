//! Prompt reclamation of one application's space: after its retention is
//! shortened or it is removed, a background thread compacts the
//! application's key range (one contiguous range in every family keyed by
//! application), so the expiry filter and the range deletions free the
//! space now rather than when compactions would reach those files anyway.
//!
//! The compaction is a manual one that does not exclude RocksDB's
//! automatic compactions, so the flushes and level compactions ingest
//! needs keep running beside it (README "Retention" has the measurement).
//! One thread works through the pending applications, one at a time; an
//! application asked for again while pending is compacted once.

use std::collections::BTreeSet;
use std::sync::Mutex;

use rocksdb::{BottommostLevelCompaction, CompactOptions};

use super::{app_prefix, devices::prefix_end, Store};

/// Applications waiting for a compaction, and whether the thread runs.
#[derive(Default)]
pub(super) struct Reclaimer {
    pending: Mutex<(BTreeSet<String>, bool)>,
}

impl Store {
    /// Queues a compaction of `app`'s key range on the reclaim thread
    /// (started if none runs). Never blocks on the compaction itself.
    pub(super) fn reclaim(&self, app: &str) {
        let mut p = self
            .reclaimer
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        p.0.insert(app.to_string());
        if p.1 {
            return;
        }
        p.1 = true;
        drop(p);
        let store = self.clone();
        let started = std::thread::Builder::new()
            .name("sluice-reclaim".into())
            .spawn(move || store.reclaim_pending());
        if let Err(e) = started {
            tracing::warn!(error = %e, "cannot start the reclaim thread; compactions will reclaim the space later");
            self.reclaimer
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .1 = false;
        }
    }

    fn reclaim_pending(&self) {
        loop {
            let app = {
                let mut p = self
                    .reclaimer
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                match p.0.pop_first() {
                    Some(app) => app,
                    None => {
                        p.1 = false;
                        return;
                    }
                }
            };
            let started = std::time::Instant::now();
            self.compact_application(&app);
            tracing::info!(
                app,
                seconds = started.elapsed().as_secs_f64(),
                "application's storage compacted"
            );
        }
    }

    /// Waits until no reclaim is pending or running.
    #[cfg(test)]
    pub(super) fn wait_reclaimed(&self) {
        while self
            .reclaimer
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Compacts `app`'s range in every family keyed by application,
    /// bottommost level included (where most expired history lies).
    /// Blocking; RocksDB reports no error from a manual compaction here
    /// (a failed one leaves the data for later compactions).
    pub fn compact_application(&self, app: &str) {
        let start = app_prefix(app);
        let end = prefix_end(&start);
        let mut o = CompactOptions::default();
        o.set_exclusive_manual_compaction(false);
        o.set_bottommost_level_compaction(BottommostLevelCompaction::Force);
        for cf in super::devices::app_keyed(self.cfs()) {
            self.db()
                .compact_range_cf_opt(cf, Some(&start), Some(&end), &o);
        }
    }
}
