//! History retention: how long each application's history is kept
//! (`storage.retention`, overridden per application through the admin
//! API), the cut-off every history read applies, and the compaction filter
//! that reclaims the space of expired history.
//!
//! Expiry has two halves. Reads apply the cut-off themselves, so expired
//! history is invisible the moment it expires (or the moment a shorter
//! retention is set). The space is reclaimed by RocksDB's own compactions
//! through [`ExpiryFilterFactory`]: every key of a history column family
//! carries its application (the key's first segment) and its time, so the
//! filter drops an expired record while compaction rewrites it anyway,
//! without a read, a delete or a tombstone of its own. Compactions run on
//! RocksDB's background threads at the priority RocksDB gives them, below
//! the flushes and level compactions ingest needs, so reclaiming never
//! stalls ingest (README "Retention" has the measurement). Periodic
//! compaction (`storage.retention_reclaim_interval`) makes sure every table
//! file passes through the filter within that interval, including files no
//! ingest compaction would touch again.

use std::collections::HashMap;
use std::ffi::CStr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rocksdb::compaction_filter::{CompactionFilter, Decision};
use rocksdb::compaction_filter_factory::{CompactionFilterContext, CompactionFilterFactory};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::timefmt::now_ms;

const MS_PER_DAY: u64 = 86_400_000;

/// How long history is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retention {
    /// Kept until deleted.
    Unlimited,
    /// States whose time is older than this many milliseconds are expired.
    Ms(u64),
}

impl Retention {
    /// Parses `"unlimited"` or a duration such as `"90d"`, `"12h"`, `"30m"`
    /// (at least one second, at most 1,000 years).
    pub fn parse(s: &str) -> Result<Retention, String> {
        if s == "unlimited" {
            return Ok(Retention::Unlimited);
        }
        let d = humantime::parse_duration(s).map_err(|e| {
            format!("{s:?} is neither \"unlimited\" nor a duration like \"90d\" ({e})")
        })?;
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        if ms < 1000 {
            return Err(format!("retention {s:?} is shorter than one second"));
        }
        if ms > 1000 * 365 * MS_PER_DAY {
            return Err(format!(
                "retention {s:?} is longer than 1000 years; use \"unlimited\""
            ));
        }
        Ok(Retention::Ms(ms))
    }

    /// The text `parse` reads back: `"unlimited"`, or the duration in the
    /// largest unit that divides it (`"90d"`, `"36h"`, `"1500ms"`).
    pub fn text(self) -> String {
        let Retention::Ms(ms) = self else {
            return "unlimited".into();
        };
        for (unit, name) in [
            (MS_PER_DAY, "d"),
            (3_600_000, "h"),
            (60_000, "m"),
            (1000, "s"),
        ] {
            if ms % unit == 0 {
                return format!("{}{name}", ms / unit);
            }
        }
        format!("{ms}ms")
    }

    /// The oldest time (epoch ms) still kept at `now_ms`; 0 when unlimited.
    pub fn cutoff(self, now_ms: u64) -> u64 {
        match self {
            Retention::Unlimited => 0,
            Retention::Ms(ms) => now_ms.saturating_sub(ms),
        }
    }

    /// Stored form of an override: the milliseconds, or `u64::MAX` for an
    /// explicit "unlimited" (which differs from no override at all).
    pub(super) fn to_bytes(self) -> [u8; 8] {
        match self {
            Retention::Unlimited => u64::MAX,
            Retention::Ms(ms) => ms,
        }
        .to_be_bytes()
    }

    pub(super) fn from_bytes(b: &[u8]) -> Option<Retention> {
        let ms = u64::from_be_bytes(b.try_into().ok()?);
        Some(match ms {
            u64::MAX => Retention::Unlimited,
            ms => Retention::Ms(ms),
        })
    }
}

impl Serialize for Retention {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text())
    }
}

impl<'de> Deserialize<'de> for Retention {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Retention, D::Error> {
        let s = String::deserialize(d)?;
        Retention::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// An application's retention as the admin API shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppRetention {
    /// What applies: the override if there is one, else the default.
    pub effective: Retention,
    /// The application's own setting, if any.
    pub own: Option<Retention>,
}

/// The retention in force: the default plus per-application overrides.
/// Read by history reads (admin path) and by each compaction as it starts,
/// never on the ingest path. Overrides change only after they are
/// persisted (see `Store::set_retention`).
pub struct Expiry {
    default: Retention,
    /// Application id → its override. Replaced whole on each change (rare),
    /// so readers take a snapshot without locking.
    overrides: ArcSwap<HashMap<Box<[u8]>, Retention>>,
}

impl Expiry {
    pub fn new(default: Retention) -> Expiry {
        Expiry {
            default,
            overrides: ArcSwap::from_pointee(HashMap::new()),
        }
    }

    pub fn of(&self, app: &str) -> AppRetention {
        let own = self.overrides.load().get(app.as_bytes()).copied();
        AppRetention {
            effective: own.unwrap_or(self.default),
            own,
        }
    }

    /// The oldest time still visible for `app` at `now_ms` (0: everything).
    pub fn cutoff(&self, app: &[u8], now_ms: u64) -> u64 {
        self.overrides
            .load()
            .get(app)
            .copied()
            .unwrap_or(self.default)
            .cutoff(now_ms)
    }

    /// Whether anything can expire at all: without a finite retention the
    /// filter never drops anything and periodic compaction is wasted work.
    pub fn any(&self) -> bool {
        self.default != Retention::Unlimited
            || self
                .overrides
                .load()
                .values()
                .any(|r| *r != Retention::Unlimited)
    }

    pub(super) fn set(&self, app: &str, own: Option<Retention>) {
        self.overrides.rcu(|current| {
            let mut next = HashMap::clone(current);
            match own {
                Some(r) => next.insert(app.as_bytes().into(), r),
                None => next.remove(app.as_bytes()),
            };
            next
        });
    }

    fn snapshot(&self, now_ms: u64) -> Snapshot {
        Snapshot {
            default_cutoff: self.default.cutoff(now_ms),
            overrides: self.overrides.load_full(),
            now_ms,
        }
    }
}

/// The retention in force when one compaction starts.
struct Snapshot {
    default_cutoff: u64,
    overrides: Arc<HashMap<Box<[u8]>, Retention>>,
    now_ms: u64,
}

impl Snapshot {
    fn cutoff(&self, app: &[u8]) -> u64 {
        self.overrides
            .get(app)
            .map_or(self.default_cutoff, |r| r.cutoff(self.now_ms))
    }
}

/// Where a record of a history column family keeps its application and
/// time. Each such family has one.
#[derive(Clone, Copy, Debug)]
pub enum TimedKeys {
    /// `state`: `{app}/{device}/` ++ time (u64 BE) ++ seq (u64 BE).
    State,
    /// `audit`: `{app}/` ++ time (u64 BE) ++ seq (u64 BE).
    Audit,
    /// `log`: `{app}/` ++ first position (u64 BE), the value starting with
    /// the newest state time of the record (u64 BE): the record expires
    /// once every state it points at has.
    Log,
}

impl TimedKeys {
    /// The application and the time of the record `key` → `value`, or
    /// `None` for a record of another shape (kept).
    fn app_and_time<'k>(self, key: &'k [u8], value: &[u8]) -> Option<(&'k [u8], u64)> {
        match self {
            // Both end in 16 bytes of time and sequence after the
            // application's `/`.
            TimedKeys::State | TimedKeys::Audit => {
                let slash = key.iter().position(|&b| b == b'/')?;
                let suffix = key.len().checked_sub(16)?;
                if suffix <= slash {
                    return None;
                }
                let time = u64::from_be_bytes(key[suffix..suffix + 8].try_into().ok()?);
                Some((&key[..slash], time))
            }
            TimedKeys::Log => {
                let slash = key.len().checked_sub(9)?;
                if key[slash] != b'/' || slash == 0 {
                    return None;
                }
                let time = u64::from_be_bytes(value.get(..8)?.try_into().ok()?);
                Some((&key[..slash], time))
            }
        }
    }

    fn filter_name(self) -> &'static CStr {
        match self {
            TimedKeys::State => c"sluice.expiry.state",
            TimedKeys::Audit => c"sluice.expiry.audit",
            TimedKeys::Log => c"sluice.expiry.log",
        }
    }
}

/// Gives each compaction of a history column family a filter that drops
/// the records expired when the compaction started.
pub(super) struct ExpiryFilterFactory {
    pub expiry: Arc<Expiry>,
    pub keys: TimedKeys,
}

impl CompactionFilterFactory for ExpiryFilterFactory {
    type Filter = ExpiryFilter;

    fn create(&mut self, _: CompactionFilterContext) -> ExpiryFilter {
        ExpiryFilter {
            snapshot: self.expiry.snapshot(now_ms().max(0) as u64),
            keys: self.keys,
            last_app: Vec::new(),
            last_cutoff: 0,
        }
    }

    fn name(&self) -> &CStr {
        self.keys.filter_name()
    }
}

pub(super) struct ExpiryFilter {
    snapshot: Snapshot,
    keys: TimedKeys,
    /// Keys arrive in order, so runs of one application are long: its
    /// cut-off is looked up once per run, not once per key.
    last_app: Vec<u8>,
    last_cutoff: u64,
}

impl ExpiryFilter {
    fn expired(&mut self, key: &[u8], value: &[u8]) -> bool {
        let Some((app, time)) = self.keys.app_and_time(key, value) else {
            return false;
        };
        if app != self.last_app.as_slice() {
            self.last_app.clear();
            self.last_app.extend_from_slice(app);
            self.last_cutoff = self.snapshot.cutoff(app);
        }
        time < self.last_cutoff
    }
}

impl CompactionFilter for ExpiryFilter {
    fn filter(&mut self, _level: u32, key: &[u8], value: &[u8]) -> Decision {
        if self.expired(key, value) {
            Decision::Remove
        } else {
            Decision::Keep
        }
    }

    fn name(&self) -> &CStr {
        self.keys.filter_name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_key(app: &str, device: &str, time: u64, seq: u64) -> Vec<u8> {
        let mut k = format!("{app}/{device}/").into_bytes();
        k.extend_from_slice(&time.to_be_bytes());
        k.extend_from_slice(&seq.to_be_bytes());
        k
    }

    #[test]
    fn parse_and_text_round_trip() {
        for (text, want) in [
            ("unlimited", Retention::Unlimited),
            ("90d", Retention::Ms(90 * MS_PER_DAY)),
            ("36h", Retention::Ms(36 * 3_600_000)),
            ("90m", Retention::Ms(90 * 60_000)),
            ("45s", Retention::Ms(45_000)),
            ("1500ms", Retention::Ms(1500)),
        ] {
            assert_eq!(Retention::parse(text), Ok(want), "{text}");
            assert_eq!(want.text(), text);
        }
        assert_eq!(Retention::parse("2w").unwrap().text(), "14d");
        for bad in ["", "0s", "999ms", "forever", "-1d", "2000y"] {
            assert!(Retention::parse(bad).is_err(), "{bad}");
        }
        for r in [Retention::Unlimited, Retention::Ms(5000)] {
            assert_eq!(Retention::from_bytes(&r.to_bytes()), Some(r));
        }
    }

    #[test]
    fn overrides_win_over_the_default() {
        let e = Expiry::new(Retention::Ms(10_000));
        assert!(e.any());
        assert_eq!(e.cutoff(b"a", 100_000), 90_000);
        e.set("a", Some(Retention::Unlimited));
        e.set("b", Some(Retention::Ms(1000)));
        assert_eq!(e.cutoff(b"a", 100_000), 0);
        assert_eq!(e.cutoff(b"b", 100_000), 99_000);
        assert_eq!(e.cutoff(b"c", 100_000), 90_000);
        assert_eq!(
            e.of("a"),
            AppRetention {
                effective: Retention::Unlimited,
                own: Some(Retention::Unlimited)
            }
        );
        e.set("b", None);
        assert_eq!(e.of("b").own, None);

        let none = Expiry::new(Retention::Unlimited);
        assert!(!none.any());
        none.set("a", Some(Retention::Unlimited));
        assert!(!none.any());
        none.set("a", Some(Retention::Ms(1000)));
        assert!(none.any());
    }

    #[test]
    fn the_filter_drops_only_expired_history() {
        let expiry = Arc::new(Expiry::new(Retention::Unlimited));
        expiry.set("short", Some(Retention::Ms(1000)));
        let mut factory = ExpiryFilterFactory {
            expiry,
            keys: TimedKeys::State,
        };
        let now = now_ms() as u64;
        let mut f = factory.create(CompactionFilterContext {
            is_full_compaction: false,
            is_manual_compaction: false,
        });
        assert!(f.expired(&state_key("short", "d", now - 5000, 1), b""));
        assert!(!f.expired(&state_key("short", "d", now + 5000, 2), b""));
        assert!(!f.expired(&state_key("keep", "d", 0, 3), b""));
        assert!(f.expired(&state_key("short", "e", 0, 4), b""));
        // Keys of another shape are never dropped.
        assert!(!f.expired(b"short/", b""));
        assert!(!f.expired(b"no-slash-at-all-but-long-enough", b""));
    }

    #[test]
    fn the_log_filter_drops_records_whose_newest_state_expired() {
        let expiry = Arc::new(Expiry::new(Retention::Unlimited));
        expiry.set("short", Some(Retention::Ms(1000)));
        let mut factory = ExpiryFilterFactory {
            expiry,
            keys: TimedKeys::Log,
        };
        let mut f = factory.create(CompactionFilterContext {
            is_full_compaction: false,
            is_manual_compaction: false,
        });
        let now = now_ms() as u64;
        let key = |app: &str, first: u64| {
            let mut k = format!("{app}/").into_bytes();
            k.extend_from_slice(&first.to_be_bytes());
            k
        };
        let newest = |t: u64| {
            let mut v = t.to_be_bytes().to_vec();
            v.extend_from_slice(&[1, 2, 0]);
            v
        };
        assert!(f.expired(&key("short", 7), &newest(now - 5000)));
        assert!(!f.expired(&key("short", 8), &newest(now + 5000)));
        assert!(!f.expired(&key("keep", 9), &newest(0)));
        // Records of another shape are never dropped.
        assert!(!f.expired(&key("short", 7), b"short"));
        assert!(!f.expired(b"short/", &newest(0)));
    }

    /// Every state key left in the history family, compacted or not.
    fn raw_state_times(store: &crate::store::Store) -> Vec<(String, u64)> {
        store
            .db()
            .iterator_cf(store.cfs().state, rocksdb::IteratorMode::Start)
            .map(|item| {
                let (k, _) = item.unwrap();
                let (app, time) = TimedKeys::State.app_and_time(&k, &[]).unwrap();
                (String::from_utf8(app.to_vec()).unwrap(), time)
            })
            .collect()
    }

    #[test]
    fn expired_history_is_invisible_at_once_and_compaction_drops_it() {
        use crate::store::{device_key, HistoryQuery, Order, Position, Store, StoreOptions};
        let dir = tempfile::tempdir().unwrap();
        let mut o = StoreOptions::new(&crate::Config::default());
        o.retention = Retention::Ms(3_600_000);
        let now = now_ms() as u64;
        let times = [now - 7_200_000, now - 60_000, now];
        {
            let store = Store::open_with(dir.path(), &o).unwrap();
            let mut b = store.batch(1024);
            for app in ["a", "b"] {
                for (i, t) in times.iter().enumerate() {
                    let at = Position {
                        time_ms: *t,
                        seq: i as u64,
                    };
                    store
                        .put_state(&mut b, &device_key(app, "d"), at, b"{}")
                        .unwrap();
                }
            }
            store.commit(b, 3).unwrap();
            // Shortening b's retention compacts b's range in the
            // background: what expired leaves the disk without waiting.
            store.set_retention("b", Some(Retention::Ms(1000))).unwrap();
            store.wait_reclaimed();
            let left = raw_state_times(&store);
            assert!(
                left.iter().all(|(app, t)| app == "a" || *t >= now - 1000),
                "{left:?}"
            );
            assert!(left.contains(&("a".into(), times[1])), "{left:?}");
        }
        // The override survives a restart.
        let store = Store::open_with(dir.path(), &o).unwrap();
        assert_eq!(store.retention("b").own, Some(Retention::Ms(1000)));
        let read = |app: &str| {
            let q = HistoryQuery {
                start_ms: 0,
                end_ms: u64::MAX - 1,
                limit: 100,
                order: Order::Asc,
                cursor: None,
            };
            let page = store
                .history(&device_key(app, "d"), &q, usize::MAX)
                .unwrap();
            page.items.iter().map(|i| i.at.time_ms).collect::<Vec<_>>()
        };
        assert_eq!(read("a"), times[1..].to_vec());
        assert!(
            read("b").iter().all(|t| *t >= now - 1000),
            "{:?}",
            read("b")
        );
        // A full compaction drops exactly the expired.
        let db = store.db();
        db.flush_cf(store.cfs().state).unwrap();
        db.compact_range_cf(store.cfs().state, None::<&[u8]>, None::<&[u8]>);
        let left = raw_state_times(&store);
        assert!(left.contains(&("a".into(), times[1])), "{left:?}");
        assert!(!left.iter().any(|(_, t)| *t == times[0]), "{left:?}");
        assert!(
            left.iter().all(|(app, t)| app == "a" || *t >= now - 1000),
            "{left:?}"
        );
        // Clearing the override brings the default back for reads.
        store.set_retention("b", None).unwrap();
        assert_eq!(store.retention("b").effective, Retention::Ms(3_600_000));
    }
}
