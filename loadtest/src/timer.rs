//! A resettable sleep precise to microseconds, for pacing.
//!
//! tokio's timer rounds every deadline up to its next millisecond tick, so
//! a paced message leaves 0–1 ms after its scheduled time (uniformly): the
//! client's own send lag would reach 1 ms at p99 before the server did
//! anything. On Linux each connection instead arms its own timerfd, which
//! the runtime's reactor watches like a socket: the kernel wakes the task
//! at the deadline itself (an hrtimer, no timer slack), at the cost of one
//! `timerfd_settime` and one `read` per wake. Elsewhere, or should the
//! timerfd not be created, tokio's sleep is used.

use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::time::{Duration, Instant};

use rustix::time::{
    timerfd_create, timerfd_settime, Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags,
    Timespec,
};
use tokio::io::unix::AsyncFd;

pub enum Timer {
    Precise {
        fd: AsyncFd<OwnedFd>,
        /// The deadline the timerfd is armed for (not re-armed when equal).
        armed: Option<Instant>,
    },
    Coarse(Pin<Box<tokio::time::Sleep>>),
}

impl Timer {
    /// A timer armed for `deadline`.
    pub fn new(deadline: Instant) -> Timer {
        let fd = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )
        .ok()
        // SAFETY: `register` needs the descriptor to stay open while it is
        // registered; the AsyncFd owns it (an `OwnedFd`, closed only when
        // the AsyncFd is dropped) and nothing else can close it.
        .and_then(|fd| unsafe { AsyncFd::register(fd) }.ok());
        let mut t = match fd {
            Some(fd) => Timer::Precise { fd, armed: None },
            None => Timer::Coarse(Box::pin(tokio::time::sleep_until(deadline.into()))),
        };
        t.reset(deadline);
        t
    }

    /// Moves the deadline (earlier or later).
    pub fn reset(&mut self, deadline: Instant) {
        match self {
            Timer::Precise { fd, armed } => {
                if *armed == Some(deadline) {
                    return;
                }
                // A relative timer: `Instant` is CLOCK_MONOTONIC, but its
                // raw value is not exposed. At least 1 ns, since 0 disarms.
                let wait = deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_nanos(1));
                let spec = Itimerspec {
                    it_interval: Timespec {
                        tv_sec: 0,
                        tv_nsec: 0,
                    },
                    it_value: Timespec {
                        tv_sec: wait.as_secs().min(i64::MAX as u64) as i64,
                        tv_nsec: i64::from(wait.subsec_nanos()),
                    },
                };
                if timerfd_settime(fd.get_ref(), TimerfdTimerFlags::empty(), &spec).is_ok() {
                    *armed = Some(deadline);
                }
            }
            Timer::Coarse(s) => s.as_mut().reset(deadline.into()),
        }
    }

    /// Waits for the deadline. Cancel-safe: dropped before it completes,
    /// the next call waits for the same (or a reset) deadline.
    pub async fn wait(&mut self) {
        match self {
            Timer::Precise { fd, armed } => loop {
                let Ok(mut guard) = fd.readable().await else {
                    // The reactor is gone (runtime shutting down).
                    return std::future::pending().await;
                };
                let mut buf = [0u8; 8];
                match rustix::io::read(fd.get_ref(), &mut buf) {
                    Ok(_) => {
                        *armed = None;
                        return;
                    }
                    Err(rustix::io::Errno::AGAIN) => guard.clear_ready(),
                    Err(_) => return std::future::pending().await,
                }
            },
            Timer::Coarse(s) => s.as_mut().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fires_at_the_deadline_and_can_be_moved() {
        let start = Instant::now();
        let mut t = Timer::new(start + Duration::from_secs(60));
        assert!(matches!(t, Timer::Precise { .. }), "timerfd available");
        // Moved earlier: fires then, not after 60 s, and not before.
        let at = start + Duration::from_millis(20);
        t.reset(at);
        t.wait().await;
        assert!(Instant::now() >= at);
        // A deadline in the past fires at once; a later one is waited for.
        t.reset(start);
        tokio::time::timeout(Duration::from_secs(5), t.wait())
            .await
            .expect("past deadline fires");
        let later = Instant::now() + Duration::from_millis(30);
        t.reset(later);
        let early = tokio::time::timeout(Duration::from_millis(5), t.wait()).await;
        assert!(early.is_err(), "fired 25 ms early");
        t.wait().await;
        assert!(Instant::now() >= later);
    }
}
