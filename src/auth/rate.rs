//! Per-token rate limits: a token bucket kept as one atomic (GCRA, the
//! "generic cell rate algorithm"), so checking it takes no lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::grant::RateLimit;

/// Nanoseconds on a monotonic clock (wall-clock jumps do not refill or
/// drain buckets).
pub fn monotonic_ns() -> u64 {
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// [`monotonic_ns`] of an earlier instant (0 for one before the clock's
/// start).
pub fn monotonic_ns_of(at: Instant) -> u64 {
    at.saturating_duration_since(*START.get_or_init(Instant::now))
        .as_nanos() as u64
}

static START: OnceLock<Instant> = OnceLock::new();

/// A bucket of `burst` messages refilled at `per_second`.
#[derive(Debug)]
pub struct Limiter {
    /// Theoretical arrival time of the next message, in `monotonic_ns`.
    tat: AtomicU64,
    /// Nanoseconds per message.
    interval: u64,
    /// How far ahead of now `tat` may run: `burst` messages' worth.
    tolerance: u64,
}

impl Limiter {
    pub fn new(limit: RateLimit) -> Limiter {
        let interval = (1_000_000_000 / u64::from(limit.per_second.max(1))).max(1);
        Limiter {
            tat: AtomicU64::new(0),
            interval,
            tolerance: interval.saturating_mul(u64::from(limit.burst.max(1))),
        }
    }

    /// Takes `n` messages at `now`, or says how long until they would fit.
    /// A request larger than the burst never fits; it is refused with the
    /// time a full bucket would need, so clients back off rather than spin.
    pub fn take(&self, n: u32, now: u64) -> Result<(), Duration> {
        let cost = self.interval.saturating_mul(u64::from(n));
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let next = tat.max(now).saturating_add(cost);
            let ahead = next - now;
            if ahead > self.tolerance {
                return Err(Duration::from_nanos(
                    (ahead - self.tolerance).min(self.tolerance.max(cost)),
                ));
            }
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(()),
                Err(actual) => tat = actual,
            }
        }
    }
}

impl Limiter {
    /// Gives back `n` messages taken by a [`Limiter::take`] that succeeded
    /// (a request refused further on). `tat` only grows by what takes add,
    /// so subtracting what one take added cannot wrap.
    pub fn refund(&self, n: u32) {
        self.tat
            .fetch_sub(self.interval.saturating_mul(u64::from(n)), Ordering::AcqRel);
    }

    /// How long until one more message would fit, without taking it.
    pub fn wait(&self, now: u64) -> Duration {
        let next = self
            .tat
            .load(Ordering::Acquire)
            .max(now)
            .saturating_add(self.interval);
        Duration::from_nanos((next - now).saturating_sub(self.tolerance))
    }

    /// Whether the bucket is full again (it has not been used for a while).
    pub fn is_idle(&self, now: u64) -> bool {
        self.tat.load(Ordering::Acquire) <= now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn burst_then_steady_rate() {
        let l = Limiter::new(RateLimit {
            per_second: 10,
            burst: 5,
        });
        let t0 = 10 * S;
        for _ in 0..5 {
            assert!(l.take(1, t0).is_ok());
        }
        let wait = l.take(1, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        // 100 ms later one more fits, not two.
        assert!(l.take(1, t0 + S / 10).is_ok());
        assert!(l.take(1, t0 + S / 10).is_err());
        // Idle for a long time: the bucket is full again, never fuller.
        let t1 = t0 + 60 * S;
        for _ in 0..5 {
            assert!(l.take(1, t1).is_ok());
        }
        assert!(l.take(1, t1).is_err());
    }

    #[test]
    fn batches_cost_their_size() {
        let l = Limiter::new(RateLimit {
            per_second: 100,
            burst: 10,
        });
        assert!(l.take(10, S).is_ok());
        assert!(l.take(1, S).is_err());
        assert!(
            l.take(11, 100 * S).is_err(),
            "larger than the burst never fits"
        );
        assert!(l.take(10, 100 * S).is_ok());
    }

    #[test]
    fn measured_rate_matches_configured() {
        let l = Limiter::new(RateLimit {
            per_second: 250,
            burst: 1,
        });
        let mut admitted = 0;
        // Offer one message every 100 µs for 10 simulated seconds.
        for i in 0..100_000u64 {
            if l.take(1, S + i * 100_000).is_ok() {
                admitted += 1;
            }
        }
        assert!((2499..=2501).contains(&admitted), "{admitted}");
    }
}
