//! `--ramp`: the rate goes up step by step on the same connections; each
//! step is judged on its own messages (those scheduled in it).
//!
//! A step passes when it had no errors and at most 1% of its planned
//! messages took longer than `--p99-max` — where a message not acknowledged
//! (or not even sent, because the client was stuck behind the server) counts
//! as slower than the bound. So a server that falls behind fails the step
//! even if the few messages it did answer were fast.
//!
//! The controller judges step k at `end of k + p99-max`: by then anything
//! of step k still unacknowledged is late for sure. The first failing step
//! stops the ramp.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cli::RampArgs;
use crate::report::{fmt_ms, fmt_rate};
use crate::run::Shared;
use crate::schedule::{planned, Step};
use crate::stats::{Stats, StepStats};

pub fn steps(r: &RampArgs) -> Vec<Step> {
    let mut v = Vec::new();
    let mut k = 0u32;
    loop {
        let rate = r.ramp_start + f64::from(k) * r.ramp_step;
        if rate > r.ramp_max * (1.0 + 1e-9) {
            break;
        }
        v.push(Step {
            rate,
            start: r.ramp_step_duration * k,
            end: Some(r.ramp_step_duration * (k + 1)),
        });
        k += 1;
    }
    v
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StepResult {
    pub rate: f64,
    pub planned: u64,
    pub sent: u64,
    pub acked: u64,
    pub failed: u64,
    /// Acked messages of this step per second of step.
    pub acked_per_sec: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    /// Planned messages slower than the bound, unacknowledged ones included.
    pub over_bound: u64,
    pub pass: bool,
}

/// Judges one step from what has been recorded so far.
pub fn judge(st: &StepStats, step: &Step, conns: u32, bound: Duration) -> StepResult {
    let planned = planned(step, conns).unwrap_or(0);
    let sent = st.sent.load(Ordering::Relaxed);
    let acked = st.acked.load(Ordering::Relaxed);
    let failed = st.failed.load(Ordering::Relaxed);
    let h = st.histogram();
    let bound_us = bound.as_micros() as u64;
    let slow: u64 = h
        .iter_recorded()
        .filter(|v| v.value_iterated_to() > bound_us)
        .map(|v| v.count_at_value())
        .sum();
    let over_bound = slow + planned.max(sent).saturating_sub(acked);
    let span = step
        .end
        .map(|e| (e - step.start).as_secs_f64())
        .unwrap_or(1.0);
    let q = |p: f64| (!h.is_empty()).then(|| h.value_at_quantile(p) as f64 / 1000.0);
    StepResult {
        rate: step.rate,
        planned,
        sent,
        acked,
        failed,
        acked_per_sec: acked as f64 / span,
        p50_ms: q(0.5),
        p99_ms: q(0.99),
        max_ms: (!h.is_empty()).then(|| h.max() as f64 / 1000.0),
        over_bound,
        pass: failed == 0 && planned > 0 && over_bound * 100 <= planned,
    }
}

/// Waits for each step to be judgeable, judges it, and stops the run after
/// the first failing (or last) step. Returns how many steps were judged.
/// `conns` is the number of connections the schedule spreads over (the
/// requested number: a connection that failed to open leaves its share
/// unsent, which counts against the step).
pub async fn control(
    sh: Arc<Shared>,
    steps: Arc<[Step]>,
    start: Instant,
    conns: u32,
    bound: Duration,
) -> usize {
    let grace = bound + Duration::from_millis(50);
    let mut judged = 0;
    for (k, step) in steps.iter().enumerate() {
        let end = step.end.unwrap_or_default();
        let at = start + end + grace;
        // Wake up early if the run is stopped from outside.
        while Instant::now() < at {
            if sh.stop.load(Ordering::Relaxed) {
                return judged;
            }
            let nap = at
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(100));
            tokio::time::sleep(nap).await;
        }
        judged = k + 1;
        if !judge(&sh.stats.steps[k], step, conns, bound).pass {
            break;
        }
    }
    sh.stop.store(true, Ordering::Relaxed);
    judged
}

/// Final results of the judged steps (everything acknowledged by now).
pub fn results(
    stats: &Stats,
    steps: &[Step],
    judged: usize,
    conns: u32,
    bound: Duration,
) -> Vec<StepResult> {
    steps
        .iter()
        .zip(&stats.steps)
        .take(judged)
        .map(|(step, st)| judge(st, step, conns, bound))
        .collect()
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RampReport {
    pub p99_bound_ms: f64,
    /// Rate of the last step of the passing run of steps from the first.
    pub highest_passing_rate: Option<f64>,
    pub steps: Vec<StepResult>,
}

pub fn summarize(steps: Vec<StepResult>, bound: Duration) -> RampReport {
    let highest_passing_rate = steps.iter().take_while(|s| s.pass).last().map(|s| s.rate);
    RampReport {
        p99_bound_ms: bound.as_secs_f64() * 1000.0,
        highest_passing_rate,
        steps,
    }
}

impl RampReport {
    pub fn text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "  ramp         p99 bound {} ms: highest passing rate {}",
            fmt_ms(self.p99_bound_ms),
            self.highest_passing_rate
                .map(|r| format!("{} msg/s", fmt_rate(r)))
                .unwrap_or_else(|| "none".into())
        );
        let _ = writeln!(
            s,
            "    {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}  pass",
            "rate/s", "acked/s", "p50 ms", "p99 ms", "max ms", "slow", "failed"
        );
        let opt = |v: Option<f64>| v.map(fmt_ms).unwrap_or_else(|| "-".into());
        for st in &self.steps {
            let _ = writeln!(
                s,
                "    {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}  {}",
                fmt_rate(st.rate),
                fmt_rate(st.acked_per_sec),
                opt(st.p50_ms),
                opt(st.p99_ms),
                opt(st.max_ms),
                st.over_bound,
                st.failed,
                if st.pass { "yes" } else { "NO" }
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> RampArgs {
        RampArgs {
            ramp: true,
            ramp_start: 100.0,
            ramp_step: 100.0,
            ramp_step_duration: Duration::from_secs(1),
            ramp_max: 300.0,
            p99_max: Duration::from_millis(10),
            plot: "x.svg".into(),
        }
    }

    #[test]
    fn steps_cover_start_to_max() {
        let s = steps(&args());
        let rates: Vec<f64> = s.iter().map(|s| s.rate).collect();
        assert_eq!(rates, [100.0, 200.0, 300.0]);
        assert_eq!(s[2].start, Duration::from_secs(2));
        assert_eq!(s[2].end, Some(Duration::from_secs(3)));
    }

    #[test]
    fn a_step_fails_on_slow_or_missing_acks() {
        let s = steps(&args());
        let stats = Stats::new(3);
        // Step 0: 100 planned, all acked fast.
        stats.sent(0, 100);
        stats.acked(0, 0, &[1000; 100]);
        // Step 1: 200 planned, 190 acked fast, 10 never acked (5%).
        stats.sent(1, 200);
        stats.acked(1, 0, &[1000; 190]);
        // Step 2: all acked but 3% slower than 10 ms.
        stats.sent(2, 300);
        stats.acked(2, 0, &[1000; 291]);
        stats.acked(2, 1, &[20_000; 9]);
        let bound = Duration::from_millis(10);
        let r = results(&stats, &s, 3, 1, bound);
        assert!(r[0].pass, "{:?}", r[0]);
        assert!(!r[1].pass && r[1].over_bound == 10, "{:?}", r[1]);
        assert!(!r[2].pass && r[2].over_bound == 9, "{:?}", r[2]);
        let rep = summarize(r, bound);
        assert_eq!(rep.highest_passing_rate, Some(100.0));
        assert!(rep.text().contains("highest passing rate 100 msg/s"));
    }
}
