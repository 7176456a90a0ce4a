//! Whether what the broker accepts can be stored right now. The writer
//! thread and the WAL sync thread report here; `/healthz` on the device and
//! admin listeners reads it, so a load balancer or orchestrator stops
//! sending devices to a broker whose disk is full.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// One way storage can fail; each is set and cleared by its own reporter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Group commits fail: every request of a failed batch gets an error.
    Commit,
    /// `storage.sync = "interval"` cannot fsync the WAL: acknowledged
    /// messages may not survive a machine crash.
    WalSync,
    /// Cluster mode: the ingest stream does not store batches; requests
    /// are refused.
    Stream,
}

impl Failure {
    /// What `/healthz` says; the same on every listener, with no paths or
    /// other details of the machine (those go to the log).
    pub fn reason(self) -> &'static str {
        match self {
            Failure::Commit => "storage writes are failing; nothing new is acknowledged",
            Failure::WalSync => "the write-ahead log cannot be synced to disk",
            Failure::Stream => {
                "the cluster's ingest stream is not storing batches; nothing new is acknowledged"
            }
        }
    }
}

/// The current failures, if any. Reads on the request path are one atomic
/// load; the mutex is only taken when a failure starts or ends.
#[derive(Default)]
pub struct Health {
    commit: AtomicBool,
    wal_sync: AtomicBool,
    stream: AtomicBool,
    /// The last error of each failure, for the admin listener and the log.
    detail: Mutex<[Option<String>; 3]>,
}

impl Health {
    fn flag(&self, f: Failure) -> &AtomicBool {
        match f {
            Failure::Commit => &self.commit,
            Failure::WalSync => &self.wal_sync,
            Failure::Stream => &self.stream,
        }
    }

    /// Records that `f` happened with `error`; returns true when it was not
    /// failing before (so the caller logs the start of an outage once).
    pub fn fail(&self, f: Failure, error: &dyn std::fmt::Display) -> bool {
        let mut detail = self.detail.lock().unwrap_or_else(|e| e.into_inner());
        detail[f as usize] = Some(error.to_string());
        !self.flag(f).swap(true, Ordering::AcqRel)
    }

    /// Records that `f` works again; returns true when it was failing.
    pub fn recover(&self, f: Failure) -> bool {
        if !self.flag(f).load(Ordering::Acquire) {
            return false;
        }
        let mut detail = self.detail.lock().unwrap_or_else(|e| e.into_inner());
        detail[f as usize] = None;
        self.flag(f).swap(false, Ordering::AcqRel)
    }

    pub fn is_failing(&self, f: Failure) -> bool {
        self.flag(f).load(Ordering::Acquire)
    }

    /// The first current failure, if any.
    pub fn failure(&self) -> Option<Failure> {
        [Failure::Commit, Failure::Stream, Failure::WalSync]
            .into_iter()
            .find(|f| self.is_failing(*f))
    }

    /// The last error behind `f`, while it lasts.
    pub fn detail(&self, f: Failure) -> Option<String> {
        self.detail.lock().unwrap_or_else(|e| e.into_inner())[f as usize].clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_start_and_end_once() {
        let h = Health::default();
        assert_eq!(h.failure(), None);
        assert!(h.fail(Failure::WalSync, &"EIO"));
        assert!(!h.fail(Failure::WalSync, &"EIO again"));
        assert!(h.fail(Failure::Commit, &"ENOSPC"));
        assert_eq!(h.failure(), Some(Failure::Commit));
        assert_eq!(h.detail(Failure::WalSync).as_deref(), Some("EIO again"));
        assert!(h.recover(Failure::Commit));
        assert!(!h.recover(Failure::Commit));
        assert_eq!(h.failure(), Some(Failure::WalSync));
        assert!(h.recover(Failure::WalSync));
        assert_eq!((h.failure(), h.detail(Failure::Commit)), (None, None));
    }
}
