//! Per-address limits shared by the device listeners: how many connections
//! one address may hold open, how fast it may open them, and how many
//! failed authentications it may make before its next attempts are held
//! back. IPv6 addresses are grouped by /64, the unit a single host or site
//! usually gets, so an attacker cannot escape by rotating addresses.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::auth::{monotonic_ns, Limiter, RateLimit};

/// Buckets per address, bounded: idle buckets (full again) are swept out,
/// and when the table is still full a new address is not tracked at all
/// (fail open) rather than growing memory under a flood of sources.
pub struct IpLimiter {
    limit: Option<RateLimit>,
    buckets: papaya::HashMap<IpAddr, Limiter>,
    max_entries: usize,
}

/// The key for an address: itself for IPv4, its /64 for IPv6.
fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl IpLimiter {
    /// `per_second == 0` disables the limit.
    pub fn new(per_second: u32, burst: u32, max_entries: usize) -> IpLimiter {
        IpLimiter {
            limit: (per_second > 0).then(|| RateLimit {
                per_second,
                burst: burst.max(1),
            }),
            buckets: papaya::HashMap::new(),
            max_entries,
        }
    }

    /// Charges one event to `ip`; `Err` says how long until it would fit.
    pub fn take(&self, ip: IpAddr) -> Result<(), Duration> {
        let Some(limit) = self.limit else {
            return Ok(());
        };
        let now = monotonic_ns();
        let map = self.buckets.pin();
        let k = key(ip);
        if let Some(b) = map.get(&k) {
            return b.take(1, now);
        }
        if map.len() >= self.max_entries {
            self.sweep(now);
            if map.len() >= self.max_entries {
                return Ok(());
            }
        }
        map.get_or_insert_with(k, || Limiter::new(limit))
            .take(1, now)
    }

    /// How long `ip` must wait before its budget has room again (zero when
    /// it has room now), without charging it.
    pub fn wait(&self, ip: IpAddr) -> Duration {
        match self.buckets.pin().get(&key(ip)) {
            Some(b) => b.wait(monotonic_ns()),
            None => Duration::ZERO,
        }
    }

    /// Drops buckets that are full again; they hold no information.
    pub fn sweep(&self, now: u64) {
        self.buckets.pin().retain(|_, b| !b.is_idle(now));
    }
}

/// Open connections per address. Only addresses with an open connection
/// have an entry, so the table is bounded by the listener's connection
/// limit. It is touched once when a connection opens and once when it
/// closes, never per message, so a plain mutex serves.
pub struct IpConnections {
    max_per_ip: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One open connection of an address; closing it (dropping this) frees
/// its place.
pub struct IpPermit {
    /// `None` while the limit is disabled: nothing to free.
    table: Option<Arc<IpConnections>>,
    key: IpAddr,
}

/// The address already holds as many connections as it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many connections from one address")]
pub struct TooManyConnections;

impl IpConnections {
    /// `max_per_ip == 0` disables the limit.
    pub fn new(max_per_ip: usize) -> Arc<IpConnections> {
        Arc::new(IpConnections {
            max_per_ip,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A place for one more connection from `ip`, unless the address
    /// already holds `max_per_ip`.
    pub fn try_open(self: &Arc<Self>, ip: IpAddr) -> Result<IpPermit, TooManyConnections> {
        let key = key(ip);
        if self.max_per_ip == 0 {
            return Ok(IpPermit { table: None, key });
        }
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= self.max_per_ip {
            return Err(TooManyConnections);
        }
        *n += 1;
        Ok(IpPermit {
            table: Some(self.clone()),
            key,
        })
    }
}

impl Drop for IpPermit {
    fn drop(&mut self) {
        let Some(table) = &self.table else {
            return;
        };
        let mut open = table.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_connections_are_counted_per_address_and_freed() {
        let t = IpConnections::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let a1 = t.try_open(a).unwrap();
        let a2 = t.try_open(a).unwrap();
        assert_eq!(t.try_open(a).err(), Some(TooManyConnections));
        assert!(t.try_open("10.0.0.2".parse().unwrap()).is_ok());
        // Same /64: one budget.
        let v6: Vec<_> = ["2001:db8::1", "2001:db8::2"]
            .iter()
            .map(|s| t.try_open(s.parse().unwrap()).unwrap())
            .collect();
        assert!(t.try_open("2001:db8::3".parse().unwrap()).is_err());
        drop(a1);
        let a3 = t.try_open(a).unwrap();
        drop((a2, a3, v6));
        assert!(
            t.open.lock().unwrap().is_empty(),
            "closed addresses leave no entry"
        );
        let unlimited = IpConnections::new(0);
        let held: Vec<_> = (0..10).map(|_| unlimited.try_open(a).unwrap()).collect();
        assert_eq!(held.len(), 10);
        assert!(unlimited.open.lock().unwrap().is_empty());
    }

    #[test]
    fn limits_per_address_and_groups_ipv6_by_64() {
        let l = IpLimiter::new(1, 2, 100);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(l.take(a).is_ok());
        assert!(l.take(a).is_ok());
        assert!(l.take(a).is_err());
        assert!(l.wait(a) > Duration::ZERO);
        assert!(l.take(b).is_ok());
        let v6a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert!(l.take(v6a).is_ok());
        assert!(l.take(v6b).is_ok());
        assert!(l.take(v6a).is_err(), "same /64 shares a bucket");
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert!(l.take(mapped).is_err(), "v4-mapped is the v4 address");
    }

    #[test]
    fn bounded_table_fails_open() {
        let l = IpLimiter::new(1, 1, 3);
        for i in 0..10u8 {
            let ip = IpAddr::from([10, 0, 0, i]);
            assert!(l.take(ip).is_ok());
        }
        assert!(l.buckets.len() <= 3);
        assert!(IpLimiter::new(0, 0, 1)
            .take(IpAddr::from([1, 1, 1, 1]))
            .is_ok());
    }
}
