//! The per-application log index: the order in which an application's
//! states were committed, so a consumer can hold a position in it and read
//! on from there (the live streams of `streams`).
//!
//! Column family `log`: one record per application per commit batch,
//! keyed `{app}/` ++ first position (u64 BE), whose value is
//!
//! ```text
//! max_time_ms (u64 BE)          the newest state time inside
//! per state, in commit order:
//!   varint   position − the previous one (the first: − the key's)
//!   varint   time_ms − the previous one, zigzag (the first: itself)
//!   u8       device id length, 0 for the previous state's device
//!   [bytes]  device id, if its length is not 0
//! ```
//!
//! Deltas keep a state's entry to a few bytes (positions of one batch are
//! consecutive, times close), which the writer bench showed matters: the
//! fixed-width entry cost ~10 % of the raw write rate.
//!
//! A record only points at states: the data stays in the `state` column
//! family, found again from the device, the time and the position (the
//! history key is `{app}/{device}/` ++ time ++ position). One record per
//! application and batch, rather than one per state, keeps the index to one
//! small write per batch on the writer thread. `max_time_ms` leads the
//! value so retention can drop a record whose states have all expired
//! without decoding it; a state that retention removed while its record
//! stays is skipped when read.
//!
//! A position is the writer's sequence number of the state (standalone) or
//! the stream sequence that carried it (cluster mode): unique, strictly
//! increasing per application in commit order, never reused.

use bytes::{Bytes, BytesMut};
use rocksdb::{DBRawIteratorWithThreadMode, ReadOptions, DB};

use super::{CommitBatch, Store, StoreError};
use crate::timefmt::now_ms;

/// One application's record being built.
#[derive(Default)]
struct Building {
    app: Vec<u8>,
    first: u64,
    value: Vec<u8>,
    /// The previous entry's position, time and device.
    position: u64,
    time: u64,
    device: Vec<u8>,
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn get_varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut n = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at)?;
        *at += 1;
        n |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(n);
        }
    }
    None
}

fn zigzag(d: i64) -> u64 {
    ((d << 1) ^ (d >> 63)) as u64
}

fn unzigzag(n: u64) -> i64 {
    ((n >> 1) as i64) ^ -((n & 1) as i64)
}

/// Builds the log records of one batch: one buffer per application,
/// reused from batch to batch.
#[derive(Default)]
pub struct LogBuilder {
    /// One per application in the batch; only the first `used` are part of
    /// the current batch, the rest are spare buffers.
    records: Vec<Building>,
    used: usize,
    /// Application → index in `records`, for batches of many applications.
    index: std::collections::HashMap<Vec<u8>, usize>,
    /// The previous state's record: consecutive states are mostly of one
    /// application.
    last: usize,
}

impl LogBuilder {
    /// Starts a new batch.
    pub fn clear(&mut self) {
        self.used = 0;
        self.index.clear();
    }

    /// Records that the state at `position` (`time_ms`) of `device` in
    /// `app` is part of the batch. States must come in position order.
    pub fn push(&mut self, app: &[u8], device: &[u8], time_ms: u64, position: u64) {
        let known = match self.records[..self.used].get(self.last) {
            Some(r) if r.app == app => Some(self.last),
            _ => self.index.get(app).copied(),
        };
        let i = match known {
            Some(i) => i,
            None => {
                if self.used == self.records.len() {
                    self.records.push(Building::default());
                }
                let r = &mut self.records[self.used];
                r.app.clear();
                r.app.extend_from_slice(app);
                r.first = position;
                r.position = position;
                r.value.clear();
                r.value.extend_from_slice(&time_ms.to_be_bytes());
                r.time = 0;
                r.device.clear();
                self.index.insert(app.to_vec(), self.used);
                self.used += 1;
                self.used - 1
            }
        };
        self.last = i;
        let r = &mut self.records[i];
        let max = u64::from_be_bytes(r.value[..8].try_into().unwrap_or_default());
        if time_ms > max {
            r.value[..8].copy_from_slice(&time_ms.to_be_bytes());
        }
        put_varint(&mut r.value, position.wrapping_sub(r.position));
        put_varint(&mut r.value, zigzag(time_ms.wrapping_sub(r.time) as i64));
        r.position = position;
        r.time = time_ms;
        // Device ids are 1-64 bytes (`ids::MAX_ID_LEN`), so 0 is free to
        // mean "the same again".
        if r.device == device {
            r.value.push(0);
        } else {
            let d = &device[..device.len().min(255)];
            r.value.push(d.len() as u8);
            r.value.extend_from_slice(d);
            r.device.clear();
            r.device.extend_from_slice(d);
        }
    }

    /// Adds the batch's records to `cb`.
    pub fn write(&self, store: &Store, cb: &mut CommitBatch) -> Result<(), StoreError> {
        let cf = store.cfs().log;
        for r in &self.records[..self.used] {
            cb.key.clear();
            cb.key.extend_from_slice(&r.app);
            cb.key.push(b'/');
            cb.key.extend_from_slice(&r.first.to_be_bytes());
            cb.wb.put_cf(cf, &cb.key, &r.value);
        }
        Ok(())
    }
}

/// States of one application in position order, as the log reads them
/// back and as the writer hands them to live consumers. The device ids
/// share one buffer, so a chunk costs a few allocations whatever its size.
#[derive(Debug, Default, Clone)]
pub struct Chunk {
    devices: String,
    entries: Vec<ChunkEntry>,
    /// Bytes of data and device ids held, for memory bounds.
    bytes: usize,
}

/// One state of a [`Chunk`].
#[derive(Debug, Clone)]
pub struct ChunkEntry {
    pub position: u64,
    pub time_ms: u64,
    device: (u32, u32),
    /// The `data` object exactly as stored (for live chunks, a slice of the
    /// request body: no copy).
    pub data: Bytes,
}

impl Chunk {
    pub fn with_capacity(entries: usize) -> Chunk {
        Chunk {
            devices: String::new(),
            entries: Vec::with_capacity(entries),
            bytes: 0,
        }
    }

    /// Appends a state; positions must increase.
    pub fn push(&mut self, position: u64, time_ms: u64, device: &str, data: Bytes) {
        let start = self.devices.len() as u32;
        self.devices.push_str(device);
        self.bytes += data.len() + device.len();
        self.entries.push(ChunkEntry {
            position,
            time_ms,
            device: (start, self.devices.len() as u32),
            data,
        });
    }

    pub fn entries(&self) -> &[ChunkEntry] {
        &self.entries
    }

    pub fn device(&self, e: &ChunkEntry) -> &str {
        self.devices
            .get(e.device.0 as usize..e.device.1 as usize)
            .unwrap_or("")
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Bytes of data and device ids held (what a memory bound counts).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The newest position held.
    pub fn last_position(&self) -> Option<u64> {
        self.entries.last().map(|e| e.position)
    }
}

/// What one read of the log returned.
#[derive(Debug, Default)]
pub struct LogPage {
    pub chunk: Chunk,
    /// The position to read from next.
    pub next: u64,
    /// Whether the read reached the newest record (rather than a bound).
    pub done: bool,
}

/// The entries of one record (`key`, `value`): `(position, time_ms,
/// device)`. A malformed record ends early.
fn entries<'a>(key: &[u8], value: &'a [u8]) -> impl Iterator<Item = (u64, u64, &'a [u8])> {
    let first = key
        .len()
        .checked_sub(8)
        .and_then(|at| key[at..].try_into().ok())
        .map_or(0, u64::from_be_bytes);
    let mut position = first;
    let mut time = 0u64;
    let mut device: &[u8] = &[];
    let mut at = 8;
    std::iter::from_fn(move || {
        position = position.wrapping_add(get_varint(value, &mut at)?);
        time = time.wrapping_add(unzigzag(get_varint(value, &mut at)?) as u64);
        let len = usize::from(*value.get(at)?);
        at += 1;
        if len > 0 {
            device = value.get(at..at + len)?;
            at += len;
        }
        Some((position, time, device))
    })
}

fn log_key(app: &str, position: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(app.len() + 9);
    k.extend_from_slice(app.as_bytes());
    k.push(b'/');
    k.extend_from_slice(&position.to_be_bytes());
    k
}

impl Store {
    /// An iterator over `app`'s log records only.
    fn log_iter(&self, app: &str) -> Result<DBRawIteratorWithThreadMode<'_, DB>, StoreError> {
        let cf = self.cfs().log;
        let mut lower = Vec::with_capacity(app.len() + 1);
        lower.extend_from_slice(app.as_bytes());
        lower.push(b'/');
        // '0' is the byte after '/': the end of this application's keys.
        let mut upper = lower.clone();
        if let Some(last) = upper.last_mut() {
            *last = b'0';
        }
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(lower);
        ro.set_iterate_upper_bound(upper);
        Ok(self.db().raw_iterator_cf_opt(cf, ro))
    }

    /// The oldest and the newest position in `app`'s log, if it has any.
    pub fn log_bounds(&self, app: &str) -> Result<Option<(u64, u64)>, StoreError> {
        let mut it = self.log_iter(app)?;
        it.seek_to_first();
        let first = it
            .item()
            .and_then(|(k, v)| entries(k, v).next())
            .map(|e| e.0);
        it.seek_to_last();
        let last = it
            .item()
            .and_then(|(k, v)| entries(k, v).last())
            .map(|e| e.0);
        it.status()?;
        Ok(first.zip(last))
    }

    /// Whether `position` is in `app`'s log.
    pub fn log_contains(&self, app: &str, position: u64) -> Result<bool, StoreError> {
        let mut it = self.log_iter(app)?;
        it.seek_for_prev(log_key(app, position));
        let found = it
            .item()
            .is_some_and(|(k, v)| entries(k, v).any(|e| e.0 == position));
        it.status()?;
        Ok(found)
    }

    /// Reads `app`'s states from position `from` on (inclusive), in
    /// position order: at most `max_entries`, and no more once their data
    /// exceeds `max_bytes` (at least one is always returned if there is
    /// one). States retention or a removal has removed are skipped.
    /// Blocking.
    pub fn read_log(
        &self,
        app: &str,
        from: u64,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<LogPage, StoreError> {
        // States past the application's retention are invisible, as in
        // `history`, whether or not compaction has dropped them yet.
        let cutoff = self.expiry.cutoff(app.as_bytes(), now_ms().max(0) as u64);
        let mut it = self.log_iter(app)?;
        it.seek_for_prev(log_key(app, from));
        if !it.valid() {
            it.seek_to_first();
        }
        // (position, time, device) of the states wanted, in order.
        let mut wanted: Vec<(u64, u64, Box<str>)> = Vec::new();
        let mut done = true;
        let mut approx_bytes = 0usize;
        // Just past the last state looked at (read or expired).
        let mut scanned = from;
        'records: while let Some((k, v)) = it.item() {
            for (position, time, device) in entries(k, v) {
                if position < from {
                    continue;
                }
                if time < cutoff {
                    scanned = position + 1;
                    continue;
                }
                if wanted.len() == max_entries || (approx_bytes > max_bytes && !wanted.is_empty()) {
                    done = false;
                    break 'records;
                }
                let device = std::str::from_utf8(device)
                    .map_err(|_| StoreError::Corrupt("log entry device".into()))?;
                wanted.push((position, time, device.into()));
                scanned = position + 1;
                // Until the data is read, count the key as a lower bound.
                approx_bytes += 64;
            }
            it.next();
        }
        it.status()?;
        drop(it);
        let next = scanned;
        let keys: Vec<Vec<u8>> = wanted
            .iter()
            .map(|(position, time, device)| {
                let mut k = Vec::with_capacity(app.len() + device.len() + 18);
                k.extend_from_slice(app.as_bytes());
                k.push(b'/');
                k.extend_from_slice(device.as_bytes());
                k.push(b'/');
                k.extend_from_slice(&time.to_be_bytes());
                k.extend_from_slice(&position.to_be_bytes());
                k
            })
            .collect();
        let values = self
            .db()
            .batched_multi_get_cf(self.cfs().state, &keys, false);
        let mut arena = BytesMut::new();
        let mut spans = Vec::with_capacity(values.len());
        let mut bytes = 0usize;
        let mut cut = None;
        for (i, v) in values.into_iter().enumerate() {
            let v = v?;
            if let Some(v) = v {
                if bytes > 0 && bytes + v.len() > max_bytes {
                    cut = Some(i);
                    break;
                }
                bytes += v.len();
                let start = arena.len();
                arena.extend_from_slice(&v);
                spans.push((i, start, arena.len()));
            }
        }
        let arena = arena.freeze();
        let (next, done) = match cut {
            // The data bound stopped the page early: go on from there.
            Some(i) => (wanted[i].0, false),
            None => (next, done),
        };
        let mut chunk = Chunk::with_capacity(spans.len());
        for (i, start, end) in spans {
            let (position, time_ms, device) = &wanted[i];
            chunk.push(*position, *time_ms, device, arena.slice(start..end));
        }
        Ok(LogPage { chunk, next, done })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SyncMode;
    use crate::store::{device_key, Position};

    /// Commits states `(app, device, time, position)` as one batch, the
    /// way the writer does: history entries plus the log records.
    fn commit(store: &Store, states: &[(&str, &str, u64, u64)]) {
        let mut cb = store.batch(1024);
        let mut log = LogBuilder::default();
        for (app, device, time, position) in states {
            let data = format!("{{\"p\":{position}}}");
            let at = Position {
                time_ms: *time,
                seq: *position,
            };
            store
                .put_state(&mut cb, &device_key(app, device), at, data.as_bytes())
                .unwrap();
            log.push(app.as_bytes(), device.as_bytes(), *time, *position);
        }
        log.write(store, &mut cb).unwrap();
        let next = states.iter().map(|s| s.3 + 1).max().unwrap_or(0);
        store.commit(cb, next).unwrap();
    }

    fn positions(page: &LogPage) -> Vec<u64> {
        page.chunk.entries().iter().map(|e| e.position).collect()
    }

    /// Every log record key of `app` left in the family, compacted or not.
    fn raw_log_keys(store: &Store, app: &str) -> usize {
        let mut it = store.log_iter(app).unwrap();
        it.seek_to_first();
        let mut n = 0;
        while it.valid() {
            n += 1;
            it.next();
        }
        n
    }

    #[test]
    fn retention_hides_expired_states_and_compaction_drops_their_records() {
        use crate::store::Retention;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::None).unwrap();
        let now = now_ms() as u64;
        // One record of old states, one mixing old and new, one new.
        commit(&store, &[("a", "d", now - 7_200_000, 0), ("b", "d", 5, 1)]);
        commit(
            &store,
            &[("a", "d", now - 7_200_000, 2), ("a", "e", now, 3)],
        );
        commit(&store, &[("a", "d", now, 4)]);
        store
            .set_retention("a", Some(Retention::Ms(3_600_000)))
            .unwrap();
        // Invisible at once, before any compaction.
        let page = store.read_log("a", 0, 100, 1 << 20).unwrap();
        assert_eq!(positions(&page), vec![3, 4]);
        assert_eq!(page.next, 5);
        // The reclaim compaction drops the record whose states all expired
        // and keeps the one that still points at a live state.
        store.wait_reclaimed();
        assert_eq!(raw_log_keys(&store, "a"), 2);
        assert_eq!(store.log_bounds("a").unwrap(), Some((2, 4)));
        // Another application's log is untouched.
        assert_eq!(
            positions(&store.read_log("b", 0, 100, 1 << 20).unwrap()),
            vec![1]
        );
    }

    #[test]
    fn removing_an_application_removes_its_log_and_sessions() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::None).unwrap();
        commit(
            &store,
            &[("a", "d", 1, 0), ("a.x", "d", 1, 1), ("a0", "d", 1, 2)],
        );
        for app in ["a", "a.x", "a0"] {
            store
                .put_session(format!("{app}/r/client").as_bytes(), b"{}")
                .unwrap();
            store
                .put_session(format!("{app}/g/group/f").as_bytes(), b"{}")
                .unwrap();
        }
        store.remove_application("a", &[]).unwrap();
        assert_eq!(store.log_bounds("a").unwrap(), None);
        assert_eq!(raw_log_keys(&store, "a"), 0);
        assert_eq!(store.log_bounds("a.x").unwrap(), Some((1, 1)));
        assert_eq!(store.log_bounds("a0").unwrap(), Some((2, 2)));
        let left: Vec<Vec<u8>> = store
            .sessions()
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            left,
            vec![
                b"a.x/g/group/f".to_vec(),
                b"a.x/r/client".to_vec(),
                b"a0/g/group/f".to_vec(),
                b"a0/r/client".to_vec(),
            ]
        );
    }

    #[test]
    fn reads_an_application_in_position_order_from_anywhere() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::None).unwrap();
        assert_eq!(store.log_bounds("a").unwrap(), None);
        // Two batches interleaving two applications (and "a-b", whose keys
        // sort right after "a/"... only if the bound were wrong).
        commit(
            &store,
            &[
                ("a", "d1", 50, 0),
                ("b", "d1", 10, 1),
                ("a", "d2", 20, 2),
                ("a-b", "x", 1, 3),
            ],
        );
        commit(
            &store,
            &[("b", "d1", 11, 4), ("a", "d1", 5, 5), ("a", "d1", 6, 6)],
        );
        assert_eq!(store.log_bounds("a").unwrap(), Some((0, 6)));
        assert_eq!(store.log_bounds("b").unwrap(), Some((1, 4)));
        for from in 0..8 {
            let page = store.read_log("a", from, 100, usize::MAX).unwrap();
            let want: Vec<u64> = [0, 2, 5, 6].into_iter().filter(|p| *p >= from).collect();
            assert_eq!(positions(&page), want, "from {from}");
            assert!(page.done);
            assert_eq!(page.next, want.last().map_or(from, |p| p + 1));
        }
        let page = store.read_log("a", 0, 100, usize::MAX).unwrap();
        let e = &page.chunk.entries()[1];
        assert_eq!(
            (page.chunk.device(e), e.time_ms, &e.data[..]),
            ("d2", 20, &b"{\"p\":2}"[..])
        );
        assert!(store.log_contains("a", 5).unwrap());
        assert!(!store.log_contains("a", 4).unwrap());
        assert!(!store.log_contains("a", 99).unwrap());
    }

    #[test]
    fn entries_round_trip_through_the_compact_encoding() {
        let states: Vec<(u64, u64, &[u8])> = vec![
            (100, 5_000, b"a"),
            (101, 4_000, b"a"),
            (109, u64::MAX / 2, b"bb"),
            (1 << 40, 0, b"bb"),
            ((1 << 40) + 1, 7, b"a"),
        ];
        let mut b = LogBuilder::default();
        for (p, t, d) in &states {
            b.push(b"app", d, *t, *p);
        }
        let r = &b.records[0];
        let mut key = b"app/".to_vec();
        key.extend_from_slice(&r.first.to_be_bytes());
        let got: Vec<(u64, u64, &[u8])> = entries(&key, &r.value).collect();
        assert_eq!(got, states);
        assert_eq!(
            &r.value[..8],
            &(u64::MAX / 2).to_be_bytes(),
            "max time leads"
        );
        // A truncated record ends early instead of failing.
        assert_eq!(entries(&key, &r.value[..r.value.len() - 1]).count(), 4);
        // A batch of consecutive positions of a few devices: a few bytes each.
        let mut b = LogBuilder::default();
        for i in 0..1000u64 {
            b.push(
                b"app",
                format!("dev-{:03}", i % 100).as_bytes(),
                1_700_000_000_000 + i,
                i,
            );
        }
        assert!(
            b.records[0].value.len() < 1000 * 12,
            "{}",
            b.records[0].value.len()
        );
    }

    #[test]
    fn bounded_pages_continue_where_they_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::None).unwrap();
        let states: Vec<(&str, &str, u64, u64)> =
            (0..50).map(|p| ("a", "d", 1000 - p, p * 2)).collect();
        for chunk in states.chunks(7) {
            commit(&store, chunk);
        }
        for (max_entries, max_bytes) in [(1, usize::MAX), (3, usize::MAX), (100, 20), (100, 0)] {
            let mut from = 0;
            let mut seen = vec![];
            loop {
                let page = store.read_log("a", from, max_entries, max_bytes).unwrap();
                assert!(page.chunk.len() <= max_entries);
                seen.extend(positions(&page));
                from = page.next;
                if page.done {
                    break;
                }
                assert!(!page.chunk.is_empty());
            }
            let want: Vec<u64> = (0..50).map(|p| p * 2).collect();
            assert_eq!(seen, want, "{max_entries} {max_bytes}");
        }
    }
}
