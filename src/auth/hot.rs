//! The hot path's token table: SHA-256 → everything a check needs, laid out
//! so that a hit reads one 128-byte slot and nothing else that is not
//! already in cache.
//!
//! Why not a general concurrent map: with 100,000 tokens, a map of
//! `Arc<TokenEntry>` made a hit chase four pointers into memory that no
//! cache holds (the map's node, the entry, its device list, the chain's
//! verdict), and each costs a DRAM access: 150 ns on the machines this
//! runs on, against 90 ns for the SHA-256 the check starts from. Here the
//! hash, the chain's verdict and expiry, the scopes, the application and
//! a short device list sit in one slot of two cache lines that are fetched
//! together, so a hit costs the hash plus one memory access.
//!
//! Concurrency: readers take no lock. One writer at a time (the `writer`
//! mutex) fills a slot while it is empty and publishes it by storing its
//! state last; after that only the state word (live → tombstone, the
//! chain's verdict) and the last-use second change. Slots are never reused
//! within a table: removals leave tombstones, and when live entries plus
//! tombstones pass three quarters of the slots the writer copies the live
//! ones into a new table and swaps it in. Old tables are freed by
//! `crossbeam_epoch` once no reader can still hold them; a reader checks
//! after its probe that the table it read is still the current one, so a
//! change the writer made after a swap is never missed.

use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicI64, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_epoch::{self as epoch, Atomic, Guard, Owned};

use super::grant::{list_contains, Devices};
use super::scope::{Scope, Scopes};
use super::token::TokenEntry;
use crate::secret::TokenHash;

/// `Slot::state`: what the slot holds, and the verdict bits a check reads.
const KIND: u64 = 0b11;
const EMPTY: u64 = 0;
const LIVE: u64 = 1;
const TOMB: u64 = 2;
/// The token and every ancestor are active.
const ACTIVE: u64 = 1 << 2;
/// The root admin token: every scope in every application.
const ROOT: u64 = 1 << 3;
const SCOPES_SHIFT: u32 = 8;
/// Length of the application id (ids are at most 64 bytes).
const APP_LEN_SHIFT: u32 = 16;
/// How the device list is held: `DEV_ALL`, `DEV_INLINE` or `DEV_HEAP`.
const DEV_SHIFT: u32 = 24;
const DEV_ALL: u64 = 0;
const DEV_INLINE: u64 = 1;
const DEV_HEAP: u64 = 2;
/// Byte length of the device list's encoding (inline or on the heap).
const DEV_LEN_SHIFT: u32 = 32;

/// Device lists whose encoding fits here are copied into the slot: a token
/// for one device (the common case in a fleet) needs no second access.
const INLINE_BYTES: usize = 56;

/// The smallest table; also what an empty registry starts with.
const MIN_SLOTS: usize = 64;

/// One token, in two cache lines: the first has what every check reads,
/// the second the last-use second and the device list. Both are fetched at
/// once (see `prefetch`).
#[repr(C, align(128))]
#[derive(Default)]
struct Slot {
    state: AtomicU64,
    hash: [AtomicU64; 4],
    /// Earliest expiry along the chain, epoch ms (`i64::MAX`: none).
    expires_at: AtomicI64,
    /// One strong count of the token's entry, owned by the slot (released
    /// when the table is freed, tombstone or not).
    entry: AtomicPtr<TokenEntry>,
    /// The application id's bytes, owned by the entry (its interned
    /// `Arc<str>`, which the application's other tokens share, so it is
    /// usually in cache).
    app: AtomicPtr<u8>,
    /// Low 32 bits of the epoch ms of the last use this slot passed on to
    /// the entry, so a hit writes the entry's line at most once a second.
    used_ms: AtomicU32,
    /// The device list's encoding (see `DeviceList`): its bytes when they
    /// fit (`DEV_INLINE`), else its address in the entry (`DEV_HEAP`).
    devices: [AtomicU64; INLINE_BYTES / 8],
}

/// The words of a hash, in the order `Slot::hash` keeps them.
fn words(h: &TokenHash) -> [u64; 4] {
    let w = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h.0[8 * i..8 * i + 8]);
        u64::from_le_bytes(b)
    };
    [w(0), w(1), w(2), w(3)]
}

/// `Table::tags`: one byte per slot, so a probe reads a small array that
/// stays in cache and touches a slot only when its tag matches: a miss
/// (an unknown credential) then costs the hash and little else.
const TAG_EMPTY: u8 = 0;
const TAG_TOMB: u8 = 1;

/// A live slot's tag: eight bits of the hash not used for its position,
/// never one of the two markers.
fn tag_of(h: &[u64; 4]) -> u8 {
    ((h[1] >> 56) as u8).max(2)
}

struct Table {
    /// Written after the slot's state (`TAG_EMPTY` → tag, tag →
    /// `TAG_TOMB`), so a reader that sees a tag sees the slot it tags.
    tags: Box<[AtomicU8]>,
    slots: Box<[Slot]>,
}

impl Table {
    fn new(n: usize) -> Table {
        let n = n.max(MIN_SLOTS);
        // Zeroed memory is a valid table of empty slots; from the
        // allocator it is fresh pages, so they can still become huge pages.
        let slots = Box::<[Slot]>::new_zeroed_slice(n);
        // SAFETY: every field of `Slot` is an atomic integer or pointer,
        // for which all-zero bytes are a valid value.
        let slots = unsafe { slots.assume_init() };
        advise_huge_pages(&slots);
        let tags = (0..n).map(|_| AtomicU8::new(TAG_EMPTY)).collect();
        Table { tags, slots }
    }

    /// Where probing for `h` starts: the hash's first word scaled onto the
    /// slots (uniform, since SHA-256 output is).
    fn home(&self, w0: u64) -> usize {
        ((u128::from(w0) * self.slots.len() as u128) >> 64) as usize
    }

    fn next(&self, i: usize) -> usize {
        if i + 1 == self.slots.len() {
            0
        } else {
            i + 1
        }
    }

    /// The live slot holding `h`, if any, with its index and state.
    fn find(&self, h: &[u64; 4]) -> Option<(usize, &Slot, u64)> {
        let tag = tag_of(h);
        let mut i = self.home(h[0]);
        // Most hits are in their home slot: fetch it while the tag is read.
        prefetch(&self.slots[i]);
        loop {
            match self.tags[i].load(Ordering::Acquire) {
                TAG_EMPTY => return None,
                t if t == tag => {
                    let slot = &self.slots[i];
                    let state = slot.state.load(Ordering::Acquire);
                    if state & KIND == LIVE
                        && slot.hash[0].load(Ordering::Relaxed) == h[0]
                        && slot.hash[1].load(Ordering::Relaxed) == h[1]
                        && slot.hash[2].load(Ordering::Relaxed) == h[2]
                        && slot.hash[3].load(Ordering::Relaxed) == h[3]
                    {
                        return Some((i, slot, state));
                    }
                }
                _ => {}
            }
            i = self.next(i);
        }
    }

    /// Fills the first empty slot on `h`'s probe path. The caller is the
    /// writer and has made room.
    fn put(&self, h: &[u64; 4], fill: &Fill) {
        let mut i = self.home(h[0]);
        while self.tags[i].load(Ordering::Relaxed) != TAG_EMPTY {
            i = self.next(i);
        }
        let slot = &self.slots[i];
        for (w, v) in slot.hash.iter().zip(h) {
            w.store(*v, Ordering::Relaxed);
        }
        slot.expires_at.store(fill.expires_at, Ordering::Relaxed);
        slot.entry.store(fill.entry, Ordering::Relaxed);
        slot.app.store(fill.app.cast_mut(), Ordering::Relaxed);
        slot.used_ms.store(0, Ordering::Relaxed);
        for (w, v) in slot.devices.iter().zip(fill.devices) {
            w.store(v, Ordering::Relaxed);
        }
        // Publishes every field above to readers that see LIVE, and the
        // slot to readers that see its tag.
        slot.state.store(fill.state, Ordering::Release);
        self.tags[i].store(tag_of(h), Ordering::Release);
    }

    /// Turns the live slot `i` into a tombstone.
    fn bury(&self, i: usize, state: u64) {
        self.slots[i]
            .state
            .store((state & !KIND) | TOMB, Ordering::Release);
        self.tags[i].store(TAG_TOMB, Ordering::Release);
    }
}

/// Drops the strong count each used slot holds.
impl Drop for Table {
    fn drop(&mut self) {
        for slot in self.slots.iter() {
            if slot.state.load(Ordering::Relaxed) & KIND != EMPTY {
                // SAFETY: a used slot's `entry` came from `Arc::into_raw`
                // (see `Fill::of`), and each table owns one count per used
                // slot, given up only here, once.
                unsafe { drop(Arc::from_raw(slot.entry.load(Ordering::Relaxed))) };
            }
        }
    }
}

/// What the writer stores in a slot besides the hash.
struct Fill {
    state: u64,
    expires_at: i64,
    entry: *mut TokenEntry,
    app: *const u8,
    devices: [u64; INLINE_BYTES / 8],
}

impl Fill {
    /// The slot for `entry`, taking one strong count of it.
    fn of(entry: &Arc<TokenEntry>, active: bool) -> Fill {
        let mut state = LIVE
            | u64::from(entry.scopes.bits()) << SCOPES_SHIFT
            | (entry.app.len() as u64) << APP_LEN_SHIFT;
        if active {
            state |= ACTIVE;
        }
        if entry.root {
            state |= ROOT;
        }
        let mut devices = [0u64; INLINE_BYTES / 8];
        match &entry.devices {
            Devices::All => state |= DEV_ALL << DEV_SHIFT,
            Devices::Only(list) => {
                let bytes = list.as_bytes();
                state |= (bytes.len() as u64) << DEV_LEN_SHIFT;
                if bytes.len() <= INLINE_BYTES {
                    state |= DEV_INLINE << DEV_SHIFT;
                    let mut buf = [0u8; INLINE_BYTES];
                    buf[..bytes.len()].copy_from_slice(bytes);
                    for (i, d) in devices.iter_mut().enumerate() {
                        let mut w = [0u8; 8];
                        w.copy_from_slice(&buf[8 * i..8 * i + 8]);
                        *d = u64::from_le_bytes(w);
                    }
                } else {
                    state |= DEV_HEAP << DEV_SHIFT;
                    devices[0] = bytes.as_ptr() as u64;
                }
            }
        }
        Fill {
            state,
            expires_at: entry.chain_expires_at(),
            app: entry.app.as_ptr(),
            entry: Arc::into_raw(entry.clone()).cast_mut(),
            devices,
        }
    }

    /// The same slot again, for a copy into a new table.
    fn copy(slot: &Slot) -> Fill {
        let entry = slot.entry.load(Ordering::Relaxed);
        // SAFETY: `entry` came from `Arc::into_raw` and the old table still
        // holds its count; the new table takes one of its own.
        unsafe { Arc::increment_strong_count(entry) };
        let mut devices = [0u64; INLINE_BYTES / 8];
        for (d, w) in devices.iter_mut().zip(&slot.devices) {
            *d = w.load(Ordering::Relaxed);
        }
        Fill {
            state: slot.state.load(Ordering::Relaxed),
            expires_at: slot.expires_at.load(Ordering::Relaxed),
            entry,
            app: slot.app.load(Ordering::Relaxed),
            devices,
        }
    }
}

/// Live entries and tombstones of the current table, kept by the writer.
#[derive(Default)]
struct Counts {
    live: usize,
    tombs: usize,
}

pub(crate) struct HotTable {
    current: Atomic<Table>,
    /// Serialises writers (admin operations and the root token's
    /// installation); readers never take it.
    writer: Mutex<Counts>,
}

impl HotTable {
    pub fn new() -> HotTable {
        HotTable {
            current: Atomic::new(Table::new(MIN_SLOTS)),
            writer: Mutex::new(Counts::default()),
        }
    }

    /// Looks `h` up and runs `f` on what was found, while the table cannot
    /// be freed.
    pub fn with<R>(&self, h: &TokenHash, f: impl FnOnce(Option<Hit<'_>>) -> R) -> R {
        let w = words(h);
        let guard = epoch::pin();
        loop {
            let shared = self.current.load(Ordering::SeqCst, &guard);
            // SAFETY: `current` is never null, and the table it points to
            // is only freed after every guard pinned before its swap.
            let table = unsafe { shared.deref() };
            let found = table.find(&w);
            // A writer that swapped tables goes on changing only the new
            // one: read again if that happened during the probe.
            if self.current.load(Ordering::SeqCst, &guard) != shared {
                continue;
            }
            return f(found.map(|(_, slot, state)| Hit::new(slot, state, &guard)));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        // Every step leaves the table consistent; keep serving after a
        // panic elsewhere.
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `entry` under `h` (replacing a live slot with the same hash).
    pub fn insert(&self, h: &TokenHash, entry: &Arc<TokenEntry>, active: bool) {
        let mut counts = self.lock();
        let guard = epoch::pin();
        let w = words(h);
        if let Some((i, _, state)) = self.table(&guard).find(&w) {
            self.table(&guard).bury(i, state);
            counts.live -= 1;
            counts.tombs += 1;
        }
        let cap = self.table(&guard).slots.len();
        if (counts.live + counts.tombs + 1) * 4 > cap * 3 {
            let live = counts.live + 1;
            self.rebuild(&mut counts, live, &guard);
        }
        self.table(&guard).put(&w, &Fill::of(entry, active));
        counts.live += 1;
    }

    /// Marks `h`'s slot removed. The entry stays owned by the table until
    /// it is rebuilt, since a reader may still be using it.
    pub fn remove(&self, h: &TokenHash) {
        let mut counts = self.lock();
        let guard = epoch::pin();
        if let Some((i, _, state)) = self.table(&guard).find(&words(h)) {
            self.table(&guard).bury(i, state);
            counts.live -= 1;
            counts.tombs += 1;
            // Shrink once mostly tombstones, so removed entries are freed.
            let cap = self.table(&guard).slots.len();
            if cap > MIN_SLOTS && counts.tombs > cap / 4 && counts.tombs > counts.live {
                let live = counts.live;
                self.rebuild(&mut counts, live, &guard);
            }
        }
    }

    /// Records whether `h`'s token and all its ancestors are active.
    pub fn set_active(&self, h: &TokenHash, active: bool) {
        let _counts = self.lock();
        let guard = epoch::pin();
        if let Some((_, slot, state)) = self.table(&guard).find(&words(h)) {
            let next = if active {
                state | ACTIVE
            } else {
                state & !ACTIVE
            };
            slot.state.store(next, Ordering::Release);
        }
    }

    fn table<'g>(&self, guard: &'g Guard) -> &'g Table {
        // SAFETY: as in `with`; the writer lock is held, so the table is
        // not swapped while this reference is used.
        unsafe { self.current.load(Ordering::Acquire, guard).deref() }
    }

    /// Copies the live slots into a table sized for twice `live` entries
    /// and swaps it in.
    fn rebuild(&self, counts: &mut Counts, live: usize, guard: &Guard) {
        let old = self.table(guard);
        let new = Table::new(live * 2);
        for slot in old.slots.iter() {
            if slot.state.load(Ordering::Relaxed) & KIND == LIVE {
                let h = [0, 1, 2, 3].map(|i| slot.hash[i].load(Ordering::Relaxed));
                new.put(&h, &Fill::copy(slot));
            }
        }
        let old = self.current.swap(Owned::new(new), Ordering::SeqCst, guard);
        // SAFETY: `old` is no longer reachable from `current`; readers that
        // still hold it are pinned, and the collector waits for them.
        unsafe { guard.defer_destroy(old) };
        counts.tombs = 0;
    }

    /// Slots in the current table, for tests.
    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.table(&epoch::pin()).slots.len()
    }
}

impl Drop for HotTable {
    fn drop(&mut self) {
        // SAFETY: `&mut self`: no reader is left, and `current` is the
        // only pointer to the table.
        unsafe {
            let t = self.current.load(Ordering::Relaxed, epoch::unprotected());
            drop(t.into_owned());
        }
    }
}

/// A token found by [`HotTable::with`]: its verdict and grant read from
/// its slot, and its entry for callers that keep it.
pub struct Hit<'g> {
    slot: &'g Slot,
    state: u64,
    /// The slot's count of the entry, borrowed, never dropped here.
    entry: ManuallyDrop<Arc<TokenEntry>>,
}

impl<'g> Hit<'g> {
    fn new(slot: &'g Slot, state: u64, _guard: &'g Guard) -> Hit<'g> {
        // SAFETY: the slot owns a count of this entry until its table is
        // freed, which waits for `_guard`; `ManuallyDrop` never gives that
        // count back.
        let entry = unsafe { Arc::from_raw(slot.entry.load(Ordering::Relaxed)) };
        Hit {
            slot,
            state,
            entry: ManuallyDrop::new(entry),
        }
    }

    /// Whether the token and every ancestor are active and unexpired.
    pub fn usable(&self, now_ms: i64) -> bool {
        self.state & ACTIVE != 0 && now_ms < self.slot.expires_at.load(Ordering::Relaxed)
    }

    pub fn root(&self) -> bool {
        self.state & ROOT != 0
    }

    /// The same answer as [`TokenEntry::permits`], from the slot.
    pub fn permits(&self, app: &str, device: Option<&str>, scope: Scope) -> bool {
        if self.root() {
            return true;
        }
        let scopes = Scopes::from_bits((self.state >> SCOPES_SHIFT) as u8);
        let app_len = (self.state >> APP_LEN_SHIFT) as u8 as usize;
        // SAFETY: `app` points at `app_len` bytes of the entry's
        // application id, which the entry keeps alive (see `Hit::new`).
        let own_app =
            unsafe { std::slice::from_raw_parts(self.slot.app.load(Ordering::Relaxed), app_len) };
        own_app == app.as_bytes()
            && scopes.allows(scope)
            && device.is_none_or(|d| self.has_device(d))
    }

    fn has_device(&self, device: &str) -> bool {
        let len = (self.state >> DEV_LEN_SHIFT) as u32 as usize;
        match (self.state >> DEV_SHIFT) & 0xff {
            DEV_ALL => true,
            DEV_INLINE => {
                let mut buf = [0u8; INLINE_BYTES];
                for (i, w) in self.slot.devices.iter().enumerate() {
                    buf[8 * i..8 * i + 8].copy_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
                }
                list_contains(&buf[..len.min(INLINE_BYTES)], device)
            }
            _ => {
                let ptr = self.slot.devices[0].load(Ordering::Relaxed) as *const u8;
                // SAFETY: a `DEV_HEAP` slot holds the address and length of
                // the entry's device list, which the entry keeps alive and
                // never changes.
                let bytes = unsafe { std::slice::from_raw_parts(ptr, len) };
                // The search's steps depend on each other; ask for the
                // list's first lines at once instead of one after another.
                for line in bytes.chunks(64).take(4) {
                    prefetch_line(line.as_ptr());
                }
                list_contains(bytes, device)
            }
        }
    }

    /// Records a use at `now_ms`; true when a second has passed since the
    /// last use passed on, and the caller should pass this one on to the
    /// entry (whose own rule is the same). Wrapping arithmetic on the low
    /// bits: at worst, once in 49 days, a use is passed on a second late.
    pub fn pass_on_use(&self, now_ms: i64) -> bool {
        let now = now_ms as u32;
        if now.wrapping_sub(self.slot.used_ms.load(Ordering::Relaxed)) < 1000 {
            return false;
        }
        self.slot.used_ms.store(now, Ordering::Relaxed);
        true
    }

    pub fn entry(&self) -> &Arc<TokenEntry> {
        &self.entry
    }
}

/// Asks for both cache lines of `slot` at once, so the second (last use,
/// devices) arrives while the first is being compared.
#[inline(always)]
fn prefetch(slot: &Slot) {
    let p = std::ptr::from_ref(slot).cast::<u8>();
    prefetch_line(p);
    prefetch_line(p.wrapping_add(64));
}

#[inline(always)]
fn prefetch_line(p: *const u8) {
    // SAFETY: a prefetch is only a hint: it never faults, whatever the
    // address, and changes no memory.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch(p.cast::<i8>(), _MM_HINT_T0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Asks the kernel to back a large table with huge pages: probes land on
/// random slots, and with 4 KiB pages each would also miss the TLB.
fn advise_huge_pages(slots: &[Slot]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = slots.as_ptr() as usize;
        let end = start + std::mem::size_of_val(slots);
        let first = start.next_multiple_of(HUGE);
        if first < end && end - first >= HUGE {
            let len = (end - first) / HUGE * HUGE;
            // SAFETY: the range lies inside `slots`' allocation and only
            // changes how its pages are backed, not their contents.
            unsafe { libc::madvise(first as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = slots;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::status::Status;

    fn entry(app: &str, devices: Devices) -> Arc<TokenEntry> {
        Arc::new(TokenEntry::new(
            "t".into(),
            app.into(),
            Scopes::of(&[Scope::SendState]),
            devices,
            Some(5_000),
            None,
            None,
            Status::Active,
            0,
        ))
    }

    fn found(t: &HotTable, h: &TokenHash) -> bool {
        t.with(h, |hit| hit.is_some())
    }

    #[test]
    fn grows_shrinks_and_keeps_every_live_token() {
        let t = HotTable::new();
        let hashes: Vec<TokenHash> = (0..5_000u32)
            .map(|i| TokenHash::of(&i.to_le_bytes()))
            .collect();
        let e = entry("a", Devices::All);
        for h in &hashes {
            t.insert(h, &e, true);
        }
        assert!(t.capacity() >= 5_000 * 4 / 3);
        assert!(hashes.iter().all(|h| found(&t, h)));
        for h in &hashes[..4_900] {
            t.remove(h);
        }
        assert!(t.capacity() < 2_000, "capacity {}", t.capacity());
        assert!(hashes[..4_900].iter().all(|h| !found(&t, h)));
        assert!(hashes[4_900..].iter().all(|h| found(&t, h)));
        // Every table gives its counts back: the current one when dropped,
        // the old ones once the epoch collector frees them.
        drop(t);
        for _ in 0..1_000 {
            if Arc::strong_count(&e) == 1 {
                break;
            }
            epoch::pin().flush();
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(Arc::strong_count(&e), 1);
    }

    #[test]
    fn a_hit_answers_as_the_entry_does() {
        let t = HotTable::new();
        let short = entry("app", Devices::only(["d1".to_string(), "d2".to_string()]));
        let long = entry(
            "app",
            Devices::only((0..20).map(|i| format!("device-number-{i:03}"))),
        );
        let (hs, hl) = (TokenHash::of(b"short"), TokenHash::of(b"long"));
        t.insert(&hs, &short, true);
        t.insert(&hl, &long, true);
        for (h, e) in [(&hs, &short), (&hl, &long)] {
            t.with(h, |hit| {
                let hit = hit.unwrap();
                assert!(Arc::ptr_eq(hit.entry(), e));
                assert!(hit.usable(4_999) && !hit.usable(5_000));
                for (app, dev, scope) in [
                    ("app", Some("d1"), Scope::SendState),
                    ("app", Some("d3"), Scope::SendState),
                    ("app", Some("device-number-007"), Scope::SendState),
                    ("app", Some("device-number-020"), Scope::SendState),
                    ("app", None, Scope::SendState),
                    ("app", None, Scope::GetState),
                    ("ap", Some("d1"), Scope::SendState),
                    ("appx", None, Scope::SendState),
                ] {
                    assert_eq!(
                        hit.permits(app, dev, scope),
                        e.permits(app, dev, scope),
                        "{app} {dev:?} {scope:?}"
                    );
                }
            });
        }
        t.set_active(&hs, false);
        t.with(&hs, |hit| assert!(!hit.unwrap().usable(0)));
        t.set_active(&hs, true);
        t.with(&hs, |hit| assert!(hit.unwrap().usable(0)));
    }

    #[test]
    fn readers_see_every_token_while_the_writer_rebuilds() {
        let t = Arc::new(HotTable::new());
        let e = entry("a", Devices::All);
        let stable: Vec<TokenHash> = (0..200u32)
            .map(|i| TokenHash::of(&i.to_be_bytes()))
            .collect();
        for h in &stable {
            t.insert(h, &e, true);
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (t, stable, stop) = (t.clone(), stable.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut misses = 0;
                    while !stop.load(Ordering::Relaxed) {
                        for h in &stable {
                            misses += usize::from(!found(&t, h));
                        }
                    }
                    misses
                })
            })
            .collect();
        // Churn: many inserts and removals force rebuilds both ways.
        for round in 0..20u32 {
            let churn: Vec<TokenHash> = (0..2_000u32)
                .map(|i| TokenHash::of(format!("{round}-{i}").as_bytes()))
                .collect();
            for h in &churn {
                t.insert(h, &e, true);
            }
            for h in &churn {
                t.remove(h);
            }
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            assert_eq!(r.join().unwrap(), 0);
        }
    }
}
