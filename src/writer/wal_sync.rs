//! `storage.sync = "interval"`: a thread that fsyncs the WAL every
//! `storage.sync_interval_ms`, beside the writer rather than in it, so the
//! writer does not wait for the sync before acknowledging, and a machine
//! crash loses at most the acknowledgements of one interval (plus one
//! fsync).

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::health::{Failure, Health};
use crate::store::Store;

/// The running sync thread; stopped (after one last sync) by [`stop`].
///
/// [`stop`]: WalSyncer::stop
pub struct WalSyncer {
    /// Dropping the sender wakes the thread at once and ends it.
    stop: Option<crossbeam_channel::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl WalSyncer {
    pub fn start(store: Store, every: Duration, health: Arc<Health>) -> std::io::Result<Self> {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let thread = std::thread::Builder::new()
            .name("sluice-wal-sync".into())
            .spawn(move || {
                let syncing = std::panic::AssertUnwindSafe(|| loop {
                    let last = matches!(
                        stopped.recv_timeout(every),
                        Err(crossbeam_channel::RecvTimeoutError::Disconnected)
                    );
                    match store.sync_wal() {
                        Ok(()) => {
                            if health.recover(Failure::WalSync) {
                                tracing::warn!("WAL sync works again");
                            }
                        }
                        Err(e) => {
                            if health.fail(Failure::WalSync, &e) {
                                tracing::error!(error = %e, "WAL sync failed; acknowledged messages may not survive a machine crash");
                            }
                        }
                    }
                    if last {
                        break;
                    }
                });
                // Without this thread nothing syncs the WAL any more: that
                // must show, not pass silently.
                if std::panic::catch_unwind(syncing).is_err() {
                    health.fail(Failure::WalSync, &"the WAL sync thread panicked");
                    tracing::error!("the WAL sync thread panicked; the WAL is no longer synced");
                }
            })?;
        Ok(WalSyncer {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Syncs once more and joins the thread.
    pub fn stop(mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
