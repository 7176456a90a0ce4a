//! Live fan-out of committed states: after every successful commit the
//! committer (the writer thread, or the cluster materializer) hands each
//! application's new states to that application's [`Feed`], where every
//! live consumer of the application reads them.
//!
//! A feed is a ring of shared chunks (`Arc<Chunk>`; the data are slices of
//! the request bodies, never copied per consumer) bounded by bytes
//! (`streams.live_buffer_bytes` per application). The committer never
//! waits for a consumer: the oldest chunk is dropped when the bound is
//! reached, and a consumer that had not read it learns that it lagged and
//! reads from storage instead (see `cursor.rs`), so nothing is skipped.
//! An application without consumers has no feed, and the committer does
//! nothing for it beyond one atomic load per batch.
//!
//! tokio's broadcast channel does the same with a bound on the number of
//! messages; a batch can hold anything from one state to
//! `batch.max_bytes`, so the bound here is on bytes, which it cannot do.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{fence, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::Notify;

use crate::store::Chunk;

/// `Feed::state` of a feed that has been removed from the hub: consumers
/// arriving late make a new one.
const RETIRED: usize = usize::MAX;

/// Memory a chunk costs besides its data: the `Arc`, the entries' fixed
/// part is counted in `Chunk::bytes`' caller, and the ring slot.
const CHUNK_OVERHEAD: usize = 128;
/// Memory an entry costs besides its data and device id.
const ENTRY_OVERHEAD: usize = 40;

/// Every application's live feed.
pub struct Hub {
    /// Feeds of applications that have consumers. An entry is removed when
    /// its last consumer leaves, so this holds at most one feed per
    /// application being consumed.
    feeds: papaya::HashMap<Box<str>, Arc<Feed>>,
    /// Consumers over all applications: with none, publishing costs one
    /// load.
    consumers: AtomicUsize,
    /// Bound of each feed's ring (`streams.live_buffer_bytes`).
    max_bytes: usize,
    /// Counts consumers told they lagged (`sluice_stream_lags_total`).
    lags: Counter,
}

/// One application's live states.
pub struct Feed {
    /// Number of consumers, or [`RETIRED`].
    state: AtomicUsize,
    ring: Mutex<Ring>,
    /// Woken after each chunk is added.
    added: Notify,
}

#[derive(Default)]
struct Ring {
    /// Number of the oldest chunk in `chunks`.
    first: u64,
    /// Bounded by `Hub::max_bytes` (at least one chunk is kept, however
    /// large). When full, the oldest chunk is dropped: consumers that had
    /// not read it are told they lagged.
    chunks: VecDeque<Arc<Chunk>>,
    bytes: usize,
}

/// A consumer fell behind the ring: chunks it had not read were dropped.
/// It has been moved to the oldest chunk still held; what it missed is in
/// storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lagged;

fn cost(c: &Chunk) -> usize {
    c.bytes() + c.len() * ENTRY_OVERHEAD + CHUNK_OVERHEAD
}

impl Hub {
    pub fn new(max_bytes: usize, lags: Counter) -> Hub {
        Hub {
            feeds: papaya::HashMap::new(),
            consumers: AtomicUsize::new(0),
            max_bytes,
            lags,
        }
    }

    /// Whether any application has a consumer.
    pub fn has_consumers(&self) -> bool {
        self.consumers.load(Ordering::Acquire) > 0
    }

    /// Subscribes to `app`'s live states: chunks published from now on.
    /// A consumer that also reads storage must subscribe first: the
    /// committer publishes after its commit, so every state is then either
    /// in what it reads from storage or in what it receives here.
    pub fn subscribe(self: &Arc<Self>, app: &str) -> Live {
        let feeds = self.feeds.pin();
        let feed = loop {
            let feed = feeds.get_or_insert_with(app.into(), || {
                Arc::new(Feed {
                    state: AtomicUsize::new(0),
                    ring: Mutex::new(Ring::default()),
                    added: Notify::new(),
                })
            });
            let mut n = feed.state.load(Ordering::Acquire);
            let joined = loop {
                if n == RETIRED {
                    break false;
                }
                match feed
                    .state
                    .compare_exchange(n, n + 1, Ordering::SeqCst, Ordering::Acquire)
                {
                    Ok(_) => break true,
                    Err(now) => n = now,
                }
            };
            if joined {
                break feed.clone();
            }
            // Retired between lookup and join: its remover takes it out
            // of the map; try again with whatever is there then.
            let _ = feeds.remove_if(app, |_, f| Arc::ptr_eq(f, feed));
        };
        self.consumers.fetch_add(1, Ordering::SeqCst);
        // Pairs with the fence in `publisher`: either the committer sees
        // this consumer, or this consumer's storage read sees the commit.
        fence(Ordering::SeqCst);
        let next = {
            let ring = feed.lock();
            ring.first + ring.chunks.len() as u64
        };
        Live {
            hub: self.clone(),
            app: app.into(),
            feed,
            next,
        }
    }

    /// What the committer calls after a successful commit to hand over
    /// its states; `None` when nobody consumes anything.
    pub fn publisher<'a>(&self) -> Option<Publisher<'_, 'a>> {
        // Pairs with the fence in `subscribe` (see there).
        fence(Ordering::SeqCst);
        self.has_consumers().then(|| Publisher {
            hub: self,
            groups: Vec::new(),
            index: HashMap::new(),
            last: None,
        })
    }

    fn feed(&self, app: &str) -> Option<Arc<Feed>> {
        let feeds = self.feeds.pin();
        let feed = feeds.get(app)?;
        let n = feed.state.load(Ordering::Acquire);
        (n != 0 && n != RETIRED).then(|| feed.clone())
    }

    fn leave(&self, app: &str, feed: &Arc<Feed>) {
        self.consumers.fetch_sub(1, Ordering::AcqRel);
        if feed.state.fetch_sub(1, Ordering::AcqRel) == 1
            && feed
                .state
                .compare_exchange(0, RETIRED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            let _ = self.feeds.pin().remove_if(app, |_, f| Arc::ptr_eq(f, feed));
            // Nobody reads it any more: free the chunks now.
            let mut ring = feed.lock();
            ring.chunks.clear();
            ring.bytes = 0;
        }
    }
}

impl Feed {
    fn lock(&self) -> MutexGuard<'_, Ring> {
        // A panic while holding the lock leaves a ring whose every state
        // is consistent (each mutation is one step); keep serving.
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, chunk: Chunk, max_bytes: usize) {
        {
            let mut ring = self.lock();
            ring.bytes += cost(&chunk);
            ring.chunks.push_back(Arc::new(chunk));
            while ring.bytes > max_bytes && ring.chunks.len() > 1 {
                if let Some(old) = ring.chunks.pop_front() {
                    ring.bytes -= cost(&old);
                    ring.first += 1;
                }
            }
        }
        self.added.notify_waiters();
    }
}

/// Collects one commit's states per application and publishes them.
pub struct Publisher<'h, 'a> {
    hub: &'h Hub,
    /// Per application seen in the batch: its feed if it has consumers,
    /// and the chunk being built for it.
    groups: Vec<Option<(Arc<Feed>, Chunk)>>,
    /// Application → index in `groups`.
    index: HashMap<&'a str, usize>,
    /// The application of the previous state and its index: consecutive
    /// states are mostly of one application.
    last: Option<(&'a str, usize)>,
}

impl<'a> Publisher<'_, 'a> {
    /// Whether `app` has consumers; remembered for the rest of the batch.
    fn group(&mut self, app: &'a str) -> Option<&mut Chunk> {
        let i = match (self.last, self.index.get(app)) {
            (Some((last, i)), _) if last == app => i,
            (_, Some(&i)) => i,
            (_, None) => {
                let feed = self.hub.feed(app).map(|f| (f, Chunk::default()));
                self.groups.push(feed);
                self.index.insert(app, self.groups.len() - 1);
                self.groups.len() - 1
            }
        };
        self.last = Some((app, i));
        self.groups[i].as_mut().map(|(_, c)| c)
    }

    /// Adds a committed state; states come in position order.
    pub fn add(
        &mut self,
        app: &'a str,
        device: &str,
        position: u64,
        time_ms: u64,
        data: bytes::Bytes,
    ) {
        if let Some(c) = self.group(app) {
            c.push(position, time_ms, device, data);
        }
    }

    /// Hands every application's chunk to its consumers.
    pub fn publish(self) {
        for (feed, chunk) in self.groups.into_iter().flatten() {
            if !chunk.is_empty() {
                feed.push(chunk, self.hub.max_bytes);
            }
        }
    }
}

/// One consumer's subscription to an application's live states.
pub struct Live {
    hub: Arc<Hub>,
    app: Box<str>,
    feed: Arc<Feed>,
    /// Number of the next chunk to read.
    next: u64,
}

impl Live {
    /// The next chunk if one is there.
    pub fn try_recv(&mut self) -> Option<Result<Arc<Chunk>, Lagged>> {
        let ring = self.feed.lock();
        if self.next < ring.first {
            self.next = ring.first;
            self.hub.lags.inc();
            return Some(Err(Lagged));
        }
        let i = (self.next - ring.first) as usize;
        let chunk = ring.chunks.get(i)?.clone();
        self.next += 1;
        Some(Ok(chunk))
    }

    /// The next chunk, waiting for one.
    pub async fn recv(&mut self) -> Result<Arc<Chunk>, Lagged> {
        let feed = self.feed.clone();
        loop {
            let added = feed.added.notified();
            tokio::pin!(added);
            // Registered before looking, so a chunk added in between wakes
            // this wait.
            added.as_mut().enable();
            if let Some(r) = self.try_recv() {
                return r;
            }
            added.await;
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.hub.leave(&self.app, &self.feed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn publish(hub: &Hub, app: &str, positions: std::ops::Range<u64>) {
        let mut p = hub.publisher().expect("consumers");
        for pos in positions {
            p.add(app, "d", pos, pos, Bytes::from_static(b"{\"x\":1}"));
        }
        p.publish();
    }

    fn positions(c: &Chunk) -> Vec<u64> {
        c.entries().iter().map(|e| e.position).collect()
    }

    #[tokio::test]
    async fn consumers_get_their_applications_chunks_in_order() {
        let hub = Arc::new(Hub::new(1 << 20, Counter::default()));
        assert!(hub.publisher().is_none(), "nobody consumes yet");
        let mut a = hub.subscribe("a");
        let mut a2 = hub.subscribe("a");
        let mut b = hub.subscribe("b");
        let mut p = hub.publisher().unwrap();
        p.add("a", "d1", 1, 10, Bytes::from_static(b"1"));
        p.add("c", "d1", 2, 10, Bytes::from_static(b"2"));
        p.add("b", "d1", 3, 10, Bytes::from_static(b"3"));
        p.add("a", "d2", 4, 10, Bytes::from_static(b"4"));
        p.publish();
        let c = a.recv().await.unwrap();
        assert_eq!(positions(&c), vec![1, 4]);
        assert_eq!(c.device(&c.entries()[1]), "d2");
        assert_eq!(positions(&a2.recv().await.unwrap()), vec![1, 4]);
        assert_eq!(positions(&b.recv().await.unwrap()), vec![3]);
        assert!(a.try_recv().is_none());
        // A waiting consumer is woken by the next publish.
        let waiter = tokio::spawn(async move { positions(&a.recv().await.unwrap()) });
        tokio::task::yield_now().await;
        publish(&hub, "a", 5..7);
        assert_eq!(waiter.await.unwrap(), vec![5, 6]);
    }

    #[tokio::test]
    async fn a_slow_consumer_is_told_it_lagged_and_the_ring_stays_bounded() {
        let hub = Arc::new(Hub::new(1000, Counter::default()));
        let mut slow = hub.subscribe("a");
        for i in 0..100 {
            publish(&hub, "a", i * 2..i * 2 + 2);
        }
        {
            let feed = hub.feed("a").unwrap();
            let ring = feed.lock();
            assert!(ring.bytes <= 1000, "{}", ring.bytes);
            assert!(ring.chunks.len() < 100);
        }
        assert!(matches!(slow.recv().await, Err(Lagged)));
        // After the lag it reads on from the oldest chunk still held, in
        // order, to the newest.
        let mut last = None;
        while let Some(r) = slow.try_recv() {
            let c = r.unwrap();
            if let Some(l) = last {
                assert_eq!(c.entries()[0].position, l + 1);
            }
            last = c.last_position();
        }
        assert_eq!(last, Some(199));
    }

    #[tokio::test]
    async fn the_last_consumer_leaving_removes_the_feed() {
        let hub = Arc::new(Hub::new(1 << 20, Counter::default()));
        let a = hub.subscribe("a");
        let a2 = hub.subscribe("a");
        drop(a);
        assert!(hub.feed("a").is_some());
        drop(a2);
        assert!(hub.feed("a").is_none());
        assert!(!hub.has_consumers());
        assert!(hub.publisher().is_none());
        // A new consumer gets a new feed and only what comes after.
        let mut a3 = hub.subscribe("a");
        publish(&hub, "a", 7..8);
        assert_eq!(positions(&a3.recv().await.unwrap()), vec![7]);
    }
}
