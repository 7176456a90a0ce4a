//! When each message is meant to be sent.
//!
//! A run is a list of steps (one for a plain run, several for `--ramp`).
//! In a paced step of total rate `R` over `N` connections, message `i` of
//! connection `c` is due at `step start + (c + i·N) / R`: the connections
//! interleave evenly and together make `R` msg/s. That intended time is what
//! latency is measured from; a connection that is behind (window full,
//! socket blocked) sends at once but keeps the intended time, so waiting in
//! the client is counted, not hidden (no coordinated omission). An unpaced
//! step (rate 0) sends whenever the window has room and measures from the
//! actual send.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::timer::Timer;

#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Total msg/s over all connections; 0 = unpaced.
    pub rate: f64,
    /// Offset of the step from the run's start.
    pub start: Duration,
    /// End offset; `None` for an open-ended last step (bounded by count).
    pub end: Option<Duration>,
}

/// The next message of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Due at this time (may be in the past), in this step.
    At(Instant, usize),
    /// Unpaced: send now.
    Now(usize),
    Done,
}

/// One connection's view of the plan.
pub struct ConnSchedule {
    conn: f64,
    conns: f64,
    start: Instant,
    steps: Arc<[Step]>,
    step: usize,
    /// Index of the next message within the current step.
    i: u64,
    /// Messages this connection may still send (`None`: unbounded).
    remaining: Option<u64>,
    stop: Arc<AtomicBool>,
    /// Made at the first paced wait (an unpaced run needs none).
    timer: Option<Timer>,
}

impl ConnSchedule {
    pub fn new(
        conn: u32,
        conns: u32,
        start: Instant,
        steps: Arc<[Step]>,
        quota: Option<u64>,
        stop: Arc<AtomicBool>,
    ) -> ConnSchedule {
        ConnSchedule {
            conn: f64::from(conn),
            conns: f64::from(conns),
            start,
            steps,
            step: 0,
            i: 0,
            remaining: quota,
            stop,
            timer: None,
        }
    }

    /// The next message's slot, without consuming it.
    pub fn peek(&mut self, now: Instant) -> Slot {
        loop {
            if self.remaining == Some(0)
                || self.step >= self.steps.len()
                || self.stop.load(Ordering::Relaxed)
            {
                return Slot::Done;
            }
            let st = &self.steps[self.step];
            if st.rate <= 0.0 {
                if st.end.is_some_and(|end| now >= self.start + end) {
                    self.next_step();
                    continue;
                }
                return Slot::Now(self.step);
            }
            let offset =
                st.start.as_secs_f64() + (self.conn + self.i as f64 * self.conns) / st.rate;
            if st.end.is_some_and(|end| offset >= end.as_secs_f64()) {
                self.next_step();
                continue;
            }
            return Slot::At(self.start + Duration::from_secs_f64(offset), self.step);
        }
    }

    /// Consumes the slot [`peek`](Self::peek) returned.
    pub fn advance(&mut self) {
        self.i += 1;
        if let Some(r) = self.remaining.as_mut() {
            *r = r.saturating_sub(1);
        }
    }

    /// Waits until the next message is due and takes its slot: its
    /// intended send time, its step, and (when paced) how late the client
    /// is in microseconds. `None` when the schedule is done.
    pub async fn next_due(&mut self) -> Option<(Instant, usize, Option<u64>)> {
        let now = Instant::now();
        let due = match self.peek(now) {
            Slot::Done => return None,
            Slot::At(t, s) => {
                if t > now {
                    let timer = self.timer.get_or_insert_with(|| Timer::new(t));
                    timer.reset(t);
                    timer.wait().await;
                }
                let lag = Instant::now().saturating_duration_since(t).as_micros() as u64;
                (t, s, Some(lag))
            }
            Slot::Now(s) => (now, s, None),
        };
        self.advance();
        Some(due)
    }

    fn next_step(&mut self) {
        self.step += 1;
        self.i = 0;
    }
}

/// Splits `total` messages over `conns` connections as evenly as possible.
pub fn quota(total: u64, conns: u32, conn: u32) -> u64 {
    let n = u64::from(conns);
    total / n + u64::from(u64::from(conn) < total % n)
}

/// Messages a paced step is planned to carry over all connections.
pub fn planned(step: &Step, conns: u32) -> Option<u64> {
    let end = step.end?;
    if step.rate <= 0.0 {
        return None;
    }
    let span = (end - step.start).as_secs_f64();
    // Connection c sends i with c + i·N < span·R.
    let limit = span * step.rate;
    let n = f64::from(conns);
    Some(
        (0..conns)
            .map(|c| {
                let c = f64::from(c);
                if c >= limit {
                    0
                } else {
                    ((limit - c) / n).ceil() as u64
                }
            })
            .sum(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(s: &mut ConnSchedule, now: Instant, max: usize) -> Vec<Slot> {
        let mut v = Vec::new();
        for _ in 0..max {
            let slot = s.peek(now);
            if slot == Slot::Done {
                break;
            }
            v.push(slot);
            s.advance();
        }
        v
    }

    #[test]
    fn paced_connections_interleave_at_the_total_rate() {
        let start = Instant::now();
        let steps: Arc<[Step]> = vec![Step {
            rate: 100.0,
            start: Duration::ZERO,
            end: Some(Duration::from_secs(1)),
        }]
        .into();
        let stop = Arc::new(AtomicBool::new(false));
        let mut all = Vec::new();
        for c in 0..4 {
            let mut s = ConnSchedule::new(c, 4, start, steps.clone(), None, stop.clone());
            for slot in collect(&mut s, start, 1000) {
                let Slot::At(t, 0) = slot else { panic!() };
                all.push(t - start);
            }
        }
        all.sort();
        assert_eq!(all.len(), 100);
        assert_eq!(planned(&steps[0], 4), Some(100));
        for (k, d) in all.iter().enumerate() {
            let want = k as f64 / 100.0;
            assert!((d.as_secs_f64() - want).abs() < 1e-6, "{k}: {d:?}");
        }
    }

    #[test]
    fn steps_follow_each_other_and_quota_stops() {
        let start = Instant::now();
        let steps: Arc<[Step]> = vec![
            Step {
                rate: 10.0,
                start: Duration::ZERO,
                end: Some(Duration::from_secs(1)),
            },
            Step {
                rate: 20.0,
                start: Duration::from_secs(1),
                end: Some(Duration::from_secs(2)),
            },
        ]
        .into();
        let stop = Arc::new(AtomicBool::new(false));
        let mut s = ConnSchedule::new(0, 1, start, steps.clone(), None, stop.clone());
        let v = collect(&mut s, start, 1000);
        assert_eq!(v.len(), 30);
        assert_eq!(
            v[10],
            Slot::At(start + Duration::from_secs(1), 1),
            "second step starts on time"
        );
        assert_eq!(planned(&steps[1], 1), Some(20));
        let mut s = ConnSchedule::new(0, 1, start, steps, Some(5), stop.clone());
        assert_eq!(collect(&mut s, start, 1000).len(), 5);
    }

    #[test]
    fn unpaced_runs_until_its_end_or_stop() {
        let start = Instant::now();
        let steps: Arc<[Step]> = vec![Step {
            rate: 0.0,
            start: Duration::ZERO,
            end: Some(Duration::from_secs(1)),
        }]
        .into();
        let stop = Arc::new(AtomicBool::new(false));
        let mut s = ConnSchedule::new(0, 1, start, steps, None, stop.clone());
        assert_eq!(s.peek(start), Slot::Now(0));
        assert_eq!(s.peek(start + Duration::from_secs(2)), Slot::Done);
        stop.store(true, Ordering::Relaxed);
        assert_eq!(s.peek(start), Slot::Done);
    }

    #[test]
    fn quotas_add_up() {
        for (total, conns) in [(10, 3), (0, 4), (7, 7), (1_000_001, 64)] {
            let sum: u64 = (0..conns).map(|c| quota(total, conns, c)).sum();
            assert_eq!(sum, total);
        }
    }
}
