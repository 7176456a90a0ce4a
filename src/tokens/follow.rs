//! The follower: applies every change of the token bucket, in bucket order,
//! to this broker's registry, and keeps the registry trusted only while it
//! does.
//!
//! Its own admin changes reach the registry this way too, so there is one
//! path for everybody's. After each change it publishes the revision it
//! has applied (admin changes on this broker wait for their own) and
//! reports it to the node registry (revocation barriers on every broker
//! wait for it).
//!
//! A lost watch is never silent (`cluster::reader` ends it with an error):
//! the follower re-reads from the last revision it applied + 1, as often
//! as it takes. While the watch is live and caught up it pushes the
//! registry's trust forward (`Plane::renew`); once the watch has been lost
//! for `cluster.stale_after`, that trust runs out by itself and every
//! listener refuses new connections and requests until the follower has
//! caught up again.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};

use super::plane::Plane;
use crate::cluster::kv::{Change, Watch};
use crate::timefmt;

/// Most changes applied between two reports to the node registry while
/// catching up (it is told at once whenever the follower is caught up).
const REPORT_EVERY: u64 = 1000;

pub(super) async fn follow(plane: Arc<Plane>, mut watch: Watch) {
    let mut tick =
        tokio::time::interval((plane.config.heartbeat / 2).max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut stale = false;
    loop {
        let mut caught_up = watch.initial_pending() == 0;
        let mut since_report = 0u64;
        let mut last_turn = Instant::now();
        // Follow until the view is lost.
        let lost = loop {
            let event = tokio::select! {
                biased;
                r = watch.next() => Some(r),
                _ = tick.tick() => None,
            };
            // A follower that did not run for a while (a paused process, a
            // starved runtime) cannot tell when what its connection
            // buffered meanwhile was sent: a heartbeat read now may be
            // older than a revocation still unread. It reads everything
            // again from a new watch instead of trusting it.
            let gap = last_turn.elapsed();
            last_turn = Instant::now();
            if gap > plane.config.heartbeat * 2 {
                break format!("the follower did not run for {gap:?}");
            }
            match event {
                Some(Ok(change)) => {
                    let revision = change.revision();
                    apply(&plane, &change, watch.pending());
                    caught_up |= watch.pending() == 0;
                    since_report += 1;
                    if caught_up || since_report >= REPORT_EVERY {
                        since_report = 0;
                        plane.report_applied(revision).await;
                    }
                    if caught_up {
                        plane.renew(watch.last_heard());
                    }
                }
                Some(Err(e)) => break e.to_string(),
                None => {
                    if caught_up {
                        plane.renew(watch.last_heard());
                    }
                    observe(&plane, &mut stale);
                }
            }
        };
        plane.metrics.view_losses.inc();
        tracing::warn!(
            reason = %lost,
            applied = plane.applied(),
            "token bucket view lost; following it again from the next revision"
        );
        watch = reopen(&plane, &mut tick, &mut stale).await;
    }
}

/// Opens a new watch from the revision after the last one applied,
/// retrying (and noticing staleness) until it succeeds.
async fn reopen(plane: &Plane, tick: &mut tokio::time::Interval, stale: &mut bool) -> Watch {
    let mut pause = Duration::from_millis(50);
    loop {
        let from = plane.applied().saturating_add(1);
        let open = plane.kv.watch_from(from);
        tokio::pin!(open);
        let opened = loop {
            tokio::select! {
                r = &mut open => break r,
                _ = tick.tick() => observe(plane, stale),
            }
        };
        match opened {
            Ok(w) => {
                tracing::info!(from, "token bucket followed again");
                return w;
            }
            Err(e) => tracing::debug!(error = %e, from, "token bucket watch not reopened yet"),
        }
        let wait = tokio::time::sleep(pause);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                _ = &mut wait => break,
                _ = tick.tick() => observe(plane, stale),
            }
        }
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

fn apply(plane: &Plane, change: &Change, pending: u64) {
    let (revision, stored_ms) = match change {
        Change::Put(e) => (e.revision, e.stored_ms),
        Change::Delete {
            revision,
            stored_ms,
            ..
        } => (*revision, *stored_ms),
    };
    plane.apply(change);
    plane.applied.send_replace(revision);
    let now = timefmt::now_ms();
    plane.pending.store(pending, Ordering::Relaxed);
    plane.last_applied_ms.store(now, Ordering::Relaxed);
    let m = &plane.metrics;
    m.revision.set(revision as i64);
    m.pending.set(pending as i64);
    m.apply_delay_seconds
        .observe((now.saturating_sub(stored_ms)).max(0) as f64 / 1000.0);
}

/// Logs and exports the moments the registry stops and starts being
/// trusted.
fn observe(plane: &Plane, stale: &mut bool) {
    let now = plane.stale();
    if now != *stale {
        *stale = now;
        plane.metrics.stale.set(i64::from(now));
        if now {
            tracing::error!(
                stale_after = ?plane.config.stale_after,
                "no view of the token bucket: refusing connections and requests until it is back"
            );
        } else {
            tracing::info!(
                applied = plane.applied(),
                "token bucket view restored: serving again"
            );
        }
    }
}
