//! Where the writer reports a session's QoS 1 outcomes.

use std::sync::Mutex;

use tokio::sync::Notify;

use crate::writer::{CommitError, CommitSink};

/// Outcomes of one MQTT session's publishes, in commit order. The writer
/// records every outcome of a batch and then wakes the session once, so the
/// session sends all PUBACKs of one commit in one socket write. Bounded by
/// the session's receive maximum (it never has more publishes in flight).
#[derive(Default)]
pub struct AckSink {
    done: Mutex<Vec<(u16, Result<(), CommitError>)>>,
    pub notify: Notify,
}

impl AckSink {
    /// Moves the finished outcomes into `out` (which is cleared first).
    pub fn take_into(&self, out: &mut Vec<(u16, Result<(), CommitError>)>) {
        out.clear();
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::swap(&mut *done, out);
    }
}

impl CommitSink for AckSink {
    fn record(&self, tag: u16, r: Result<(), CommitError>) -> bool {
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        done.push((tag, r));
        done.len() == 1
    }

    fn wake(&self) {
        // notify_one stores a permit, so a session busy elsewhere still
        // sees the wake-up at its next select.
        self.notify.notify_one();
    }
}
