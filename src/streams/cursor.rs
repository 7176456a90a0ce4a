//! A consumer's position in one application's log, and the reading that
//! moves it: from storage while behind, then live, with no gap and no
//! repeat at the switch.
//!
//! The cursor subscribes to the application's live feed *before* it reads
//! storage. The committer publishes a batch only after its commit and
//! decides whom to tell only after it too, so every state is in storage by
//! the time the cursor reads it, or arrives live afterwards, or both; a
//! state that arrives both ways is recognised by its position (everything
//! below the cursor's position has been returned) and dropped. A consumer
//! that falls behind the live ring is told it lagged; the cursor then reads
//! storage again from its position until it has caught up, so a slow
//! consumer costs ingest nothing and is never skipped ahead.

use std::sync::Arc;

use crate::store::{Chunk, Store, StoreError};

use super::hub::{Hub, Live};

/// Where a consumer starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The oldest state still stored.
    Earliest,
    /// States committed from now on.
    Now,
    /// The states after position `p` (one the consumer was given).
    After(u64),
    /// From position `n` on, as already resolved (see [`resume_point`]).
    Next(u64),
}

/// How a cursor opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// At the requested place.
    AsAsked,
    /// The requested position is no longer stored (retention removed it
    /// and everything before): the cursor starts at the oldest state still
    /// stored.
    AgedOut,
}

/// Bounds of one read from storage (per consumer, so memory stays bounded
/// however many consumers replay at once).
#[derive(Debug, Clone, Copy)]
pub struct ReadBounds {
    pub max_entries: usize,
    pub max_bytes: usize,
}

/// A batch of states for the consumer: the entries of `chunk` from index
/// `from` on (earlier ones were returned before).
pub struct Batch {
    pub chunk: Arc<Chunk>,
    pub from: usize,
}

impl Batch {
    pub fn entries(&self) -> &[crate::store::ChunkEntry] {
        &self.chunk.entries()[self.from..]
    }
}

pub struct Cursor {
    app: Box<str>,
    store: Store,
    live: Live,
    /// The first position not yet returned.
    next: u64,
    /// Reading storage (behind the live feed) rather than the feed.
    behind: bool,
    bounds: ReadBounds,
}

/// Runs a blocking store call off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Thread(e.to_string()))?
}

impl Cursor {
    /// Opens a cursor on `app`'s log at `start`.
    pub async fn open(
        hub: &Arc<Hub>,
        store: &Store,
        app: &str,
        start: Start,
        bounds: ReadBounds,
    ) -> Result<(Cursor, Opened), StoreError> {
        // Live first: see the module's doc.
        let live = hub.subscribe(app);
        let (next, opened) = {
            let store = store.clone();
            let app: Box<str> = app.into();
            blocking(move || resolve(&store, &app, start)).await?
        };
        Ok((
            Cursor {
                app: app.into(),
                store: store.clone(),
                live,
                next,
                behind: true,
                bounds,
            },
            opened,
        ))
    }

    /// The first position not yet returned: where a consumer that has
    /// handled everything returned so far resumes (`Start::After(this -
    /// 1)`, or `Earliest` at 0).
    pub fn next_position(&self) -> u64 {
        self.next
    }

    /// The next states, waiting for them. An error is a failed storage
    /// read; the cursor can be asked again.
    pub async fn next(&mut self) -> Result<Batch, StoreError> {
        loop {
            if self.behind {
                let (store, app, from, b) =
                    (self.store.clone(), self.app.clone(), self.next, self.bounds);
                let page = blocking(move || store.read_log(&app, from, b.max_entries, b.max_bytes))
                    .await?;
                self.next = self.next.max(page.next);
                if page.done {
                    self.behind = false;
                }
                if !page.chunk.is_empty() {
                    return Ok(Batch {
                        chunk: Arc::new(page.chunk),
                        from: 0,
                    });
                }
                continue;
            }
            match self.live.recv().await {
                Ok(chunk) => {
                    if let Some(b) = self.take(chunk) {
                        return Ok(b);
                    }
                }
                Err(_lagged) => self.behind = true,
            }
        }
    }

    /// The next states if some are at hand without waiting for storage or
    /// the feed (for consumers that batch their output).
    pub fn try_next(&mut self) -> Option<Batch> {
        if self.behind {
            return None;
        }
        loop {
            match self.live.try_recv()? {
                Ok(chunk) => {
                    if let Some(b) = self.take(chunk) {
                        return Some(b);
                    }
                }
                Err(_lagged) => {
                    self.behind = true;
                    return None;
                }
            }
        }
    }

    /// The part of a live chunk not yet returned, if any.
    fn take(&mut self, chunk: Arc<Chunk>) -> Option<Batch> {
        let from = chunk
            .entries()
            .iter()
            .position(|e| e.position >= self.next)?;
        self.next = chunk.last_position().map_or(self.next, |p| p + 1);
        Some(Batch { chunk, from })
    }
}

/// Where a consumer that stopped before position `next` (having finished
/// with everything before it) goes on: `next` itself, or the oldest stored
/// state if what it stopped at is no longer stored. Blocking.
pub fn resume_point(store: &Store, app: &str, next: u64) -> Result<(u64, Opened), StoreError> {
    match next.checked_sub(1) {
        None => Ok((0, Opened::AsAsked)),
        Some(p) => resolve(store, app, Start::After(p)),
    }
}

/// Where `app`'s log ends: the position the next state will have at the
/// earliest. Blocking.
pub fn end_of(store: &Store, app: &str) -> Result<u64, StoreError> {
    Ok(store.log_bounds(app)?.map_or(0, |(_, last)| last + 1))
}

/// The first position to return for `start`, and whether a requested
/// position had aged out. Blocking.
fn resolve(store: &Store, app: &str, start: Start) -> Result<(u64, Opened), StoreError> {
    match start {
        Start::Earliest => Ok((0, Opened::AsAsked)),
        Start::Next(n) => Ok((n, Opened::AsAsked)),
        Start::Now => Ok((end_of(store, app)?, Opened::AsAsked)),
        Start::After(p) => {
            if store.log_contains(app, p)? {
                return Ok((p.saturating_add(1), Opened::AsAsked));
            }
            // Gone, or never this application's. Positions handed out are
            // this application's, so one below everything stored (or with
            // nothing stored at all) was removed by retention; otherwise
            // the next stored one is where to go on (a position ahead of
            // what this broker has applied, in cluster mode, waits).
            match store.log_bounds(app)? {
                Some((first, _)) if p < first => Ok((0, Opened::AgedOut)),
                None => Ok((0, Opened::AgedOut)),
                Some(_) => Ok((p.saturating_add(1), Opened::AsAsked)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SyncMode;
    use crate::state::{self, Shape};
    use crate::store::device_key;
    use crate::writer::{Records, Scratch};
    use bytes::Bytes;

    /// Commits one state per `(app, device)` through the writer's own
    /// record building and commit, with positions from `seq`.
    fn commit(store: &Store, hub: &Hub, seq: &mut u64, states: &[(&str, &str)]) {
        let bodies: Vec<(crate::store::DeviceKey, Bytes, state::ParsedStates)> = states
            .iter()
            .map(|(app, dev)| {
                let body = Bytes::from(format!("{{\"data\":{{\"n\":{}}},\"time\":5}}", *seq));
                let parsed = state::parse(&body, Shape::One, 0).unwrap();
                (device_key(app, dev), body, parsed)
            })
            .collect();
        let first = *seq;
        let requests =
            || Records::numbered(first, 0, bodies.iter().map(|(d, b, p)| (&d[..], b, p)));
        let mut cb = store.batch(1024);
        let mut scratch = Scratch::default();
        let next = first + Records::add(store, &mut cb, requests(), &mut scratch).unwrap() as u64;
        Records::commit(store, hub, cb, next, requests()).unwrap();
        *seq = next;
    }

    fn bounds() -> ReadBounds {
        ReadBounds {
            max_entries: 3,
            max_bytes: 1 << 20,
        }
    }

    async fn take(c: &mut Cursor, n: usize) -> Vec<u64> {
        let mut out = vec![];
        while out.len() < n {
            let b = tokio::time::timeout(std::time::Duration::from_secs(5), c.next())
                .await
                .expect("states arrive")
                .unwrap();
            out.extend(b.entries().iter().map(|e| e.position));
        }
        out
    }

    #[tokio::test]
    async fn replays_then_follows_live_without_gap_or_repeat() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::None).unwrap();
        let hub = Arc::new(Hub::new(1 << 20, Default::default()));
        let mut seq = 0;
        for _ in 0..4 {
            commit(
                &store,
                &hub,
                &mut seq,
                &[("a", "d1"), ("b", "d1"), ("a", "d2")],
            );
        }
        let (mut c, opened) = Cursor::open(&hub, &store, "a", Start::Earliest, bounds())
            .await
            .unwrap();
        assert_eq!(opened, Opened::AsAsked);
        let (mut now, _) = Cursor::open(&hub, &store, "a", Start::Now, bounds())
            .await
            .unwrap();
        // Committed after both opened: arrives live (and is in storage).
        commit(&store, &hub, &mut seq, &[("a", "d3"), ("b", "d1")]);
        let all = take(&mut c, 9).await;
        assert_eq!(all, vec![0, 2, 3, 5, 6, 8, 9, 11, 12]);
        assert_eq!(take(&mut now, 1).await, vec![12]);
        commit(&store, &hub, &mut seq, &[("a", "d1")]);
        assert_eq!(take(&mut c, 1).await, vec![14]);
        assert_eq!(c.next_position(), 15);
        // Resuming after a position given out goes on right after it.
        let (mut r, opened) = Cursor::open(&hub, &store, "a", Start::After(8), bounds())
            .await
            .unwrap();
        assert_eq!(opened, Opened::AsAsked);
        assert_eq!(take(&mut r, 4).await, vec![9, 11, 12, 14]);
    }

    #[tokio::test]
    async fn a_consumer_far_behind_the_ring_reads_storage_and_misses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::None).unwrap();
        // A ring of a few hundred bytes: a handful of chunks.
        let hub = Arc::new(Hub::new(600, Default::default()));
        let mut seq = 0;
        let (mut c, _) = Cursor::open(&hub, &store, "a", Start::Now, bounds())
            .await
            .unwrap();
        for _ in 0..200 {
            commit(&store, &hub, &mut seq, &[("a", "d1"), ("a", "d2")]);
        }
        let got = take(&mut c, 400).await;
        assert_eq!(got, (0..400).collect::<Vec<u64>>());
        // And it follows live again afterwards.
        commit(&store, &hub, &mut seq, &[("a", "d1")]);
        assert_eq!(take(&mut c, 1).await, vec![400]);
    }

    #[tokio::test]
    async fn positions_that_are_gone_are_told_so() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::None).unwrap();
        let hub = Arc::new(Hub::new(1 << 20, Default::default()));
        let mut seq = 10;
        commit(
            &store,
            &hub,
            &mut seq,
            &[("a", "d1"), ("b", "d1"), ("a", "d1")],
        );
        // Below everything stored: aged out, starts at the oldest.
        let (mut c, opened) = Cursor::open(&hub, &store, "a", Start::After(3), bounds())
            .await
            .unwrap();
        assert_eq!(opened, Opened::AgedOut);
        assert_eq!(take(&mut c, 2).await, vec![10, 12]);
        // Inside the range but not this application's: goes on after it.
        let (mut c, opened) = Cursor::open(&hub, &store, "a", Start::After(11), bounds())
            .await
            .unwrap();
        assert_eq!(opened, Opened::AsAsked);
        assert_eq!(take(&mut c, 1).await, vec![12]);
        // Ahead of everything: waits for what comes.
        let (mut c, opened) = Cursor::open(&hub, &store, "a", Start::After(20), bounds())
            .await
            .unwrap();
        assert_eq!(opened, Opened::AsAsked);
        seq = 21;
        commit(&store, &hub, &mut seq, &[("a", "d1")]);
        assert_eq!(take(&mut c, 1).await, vec![21]);
    }
}
