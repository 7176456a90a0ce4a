//! Persistent subscriber sessions: what an MQTT client that asked to keep
//! its session (CleanSession=0, or a Session Expiry) gets back when it
//! reconnects, after a disconnect or a restart of the broker.
//!
//! A session is its subscriptions and one position in its application's
//! log, not a queue of messages: whatever was committed while the client
//! was away is read from the log when it returns, bounded only by storage
//! retention. Two records per session in the store's `sessions` column
//! family: `{app}/r/{client id}` (subscriptions, expiry, when it ended:
//! written when they change and when the session ends) and
//! `{app}/p/{client id}` (the first position not yet acknowledged: written
//! at most every `streams.session_flush` while it advances, and when the
//! session ends).
//!
//! Only the newest connection of a client id writes: each claims the
//! session with the serial of its takeover registration, and writes of an
//! older connection still finishing are dropped.
//!
//! A shared-subscription group with a persistent member keeps its position
//! the same way, under `{app}/g/{group}/{filter}` (the position and when
//! the group last lost its last member), for `streams.session_expiry_max`.
//!
//! Every key starts with `{app}/`, so removing an application removes its
//! sessions with the rest of its data; `Sessions::forget_application`
//! first stops its connections still ending from writing theirs back.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError};
use crate::timefmt::now_ms;

/// What is stored of a session besides its position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Record {
    /// Topic filters and the QoS granted for each, as subscribed.
    pub subs: Vec<(String, u8)>,
    /// Seconds the session is kept after it ends.
    pub expiry: u32,
    /// When the session ended (epoch ms); `None` while a connection holds
    /// it.
    pub ended_at: Option<i64>,
}

/// A stored session a connection resumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resumed {
    pub record: Record,
    /// The first position not yet acknowledged (0: from the start).
    pub next: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Over `streams.max_sessions_per_app` or `streams.max_sessions`.
    #[error("too many stored sessions")]
    Quota,
    /// A newer connection with the same client id holds the session.
    #[error("the session was taken over")]
    TakenOver,
    #[error("corrupt session record: {0}")]
    Corrupt(String),
}

pub struct Sessions {
    store: Store,
    max_per_app: usize,
    max_total: usize,
    /// How long a group's position is kept after its last member left.
    group_expiry_ms: i64,
    /// When this process started: sessions that were live when the broker
    /// last stopped count as ended then.
    started_ms: i64,
    state: Mutex<State>,
    /// Woken when a connection lets go of its session, for the newer
    /// connection of the same client id that waits to take it over.
    released: tokio::sync::Notify,
}

/// How long a reconnecting client waits for its previous connection to
/// finish writing its session (its final position above all) before the
/// new one takes over regardless.
const TAKEOVER_WAIT: Duration = Duration::from_secs(2);

#[derive(Default)]
struct State {
    /// Client id (`{app}/{client}`) → serial of the newest connection that
    /// claimed it. One entry per open connection that may subscribe.
    owners: HashMap<Vec<u8>, u64>,
    /// Sessions with a stored record, bounded by `max_total`.
    stored: HashSet<Vec<u8>>,
    /// Stored sessions per application.
    per_app: HashMap<Box<str>, usize>,
    /// Applications removed while this process runs → the newest
    /// connection serial of the application at its removal: connections
    /// up to it may no longer write (their session went with the
    /// application), so nothing of a removed application is written back.
    removed: HashMap<Box<str>, u64>,
}

/// A connection's hold on its session: writes go through it, and only
/// while no newer connection has claimed the same client id. The claim
/// ends when the last clone (the session, its feed) is dropped.
/// Connections of tokens that may subscribe hold one, so `State::owners`
/// is bounded by the open connections.
pub struct Owner {
    sessions: Arc<Sessions>,
    key: Vec<u8>,
    app: Box<str>,
    serial: u64,
}

/// `{app}/{kind}/{rest}` from `{app}/{rest}`: every stored key starts
/// with its application, so removing an application (one range deletion
/// of `{app}/`) removes its sessions.
fn kind_key(kind: &[u8], key: &[u8]) -> Vec<u8> {
    let app = app_of(key).len();
    [&key[..app + 1], kind, &key[app + 1..]].concat()
}

fn record_key(key: &[u8]) -> Vec<u8> {
    kind_key(b"r/", key)
}

fn position_key(key: &[u8]) -> Vec<u8> {
    kind_key(b"p/", key)
}

/// The kind of a stored key (`r/`, `p/` or `g/`) and its key without it.
fn split_kind(stored: &[u8]) -> Option<(&[u8], Vec<u8>)> {
    let app = stored.iter().position(|b| *b == b'/')?;
    let kind = stored.get(app + 1..app + 3)?;
    Some((kind, [&stored[..app + 1], &stored[app + 3..]].concat()))
}

/// `{app}/{client}`: client ids are free-form but an application id never
/// holds `/`, so the split is unambiguous.
fn session_key(app: &str, client: &str) -> Vec<u8> {
    [app.as_bytes(), b"/", client.as_bytes()].concat()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SessionError> + Send + 'static,
) -> Result<T, SessionError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SessionError::Store(StoreError::Thread(e.to_string())))?
}

impl Record {
    fn expired(&self, now: i64, started_ms: i64) -> bool {
        let ended = self.ended_at.unwrap_or(started_ms);
        now.saturating_sub(ended) > i64::from(self.expiry) * 1000
    }
}

impl Sessions {
    /// Loads which sessions are stored, dropping those that expired while
    /// the broker was down. Blocking.
    pub fn load(
        store: Store,
        max_per_app: usize,
        max_total: usize,
        group_expiry: Duration,
    ) -> Result<Arc<Sessions>, SessionError> {
        let sessions = Arc::new(Sessions {
            store,
            max_per_app,
            max_total,
            group_expiry_ms: group_expiry.as_millis().min(i64::MAX as u128) as i64,
            started_ms: now_ms(),
            state: Mutex::new(State::default()),
            released: tokio::sync::Notify::new(),
        });
        {
            let mut st = sessions.lock();
            for (k, _) in sessions.store.sessions()? {
                if let Some((b"r/", key)) = split_kind(&k) {
                    *st.per_app.entry(app_of(&key).into()).or_insert(0) += 1;
                    st.stored.insert(key);
                }
            }
        }
        sessions.sweep()?;
        Ok(sessions)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stored sessions (for metrics and tests).
    pub fn len(&self) -> usize {
        self.lock().stored.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Deletes every stored session that has expired and that no
    /// connection holds. Blocking; run now and then.
    pub fn sweep(&self) -> Result<usize, SessionError> {
        let candidates: Vec<Vec<u8>> = {
            let st = self.lock();
            st.stored
                .iter()
                .filter(|k| !st.owners.contains_key(*k))
                .cloned()
                .collect()
        };
        let now = now_ms();
        let mut swept = 0;
        // Groups no member has held for `streams.session_expiry_max`.
        let mut gone = Vec::new();
        for (k, v) in self.store.sessions()? {
            if split_kind(&k).is_some_and(|(kind, _)| kind == b"g/") {
                let ended = group_value(&v).map_or(Some(0), |(_, e)| e);
                let ended = ended.unwrap_or(self.started_ms);
                if now.saturating_sub(ended) > self.group_expiry_ms {
                    gone.push(k);
                }
            }
        }
        if !gone.is_empty() {
            swept += gone.len();
            self.store.delete_sessions(&gone)?;
        }
        for key in candidates {
            let Some(raw) = self.store.session(&record_key(&key))? else {
                continue;
            };
            let expired = serde_json::from_slice::<Record>(&raw)
                .map(|r| r.expired(now, self.started_ms))
                .unwrap_or(true);
            let mut st = self.lock();
            if expired && !st.owners.contains_key(&key) {
                self.delete_locked(&mut st, &key)?;
                swept += 1;
            }
        }
        Ok(swept)
    }

    fn delete_locked(&self, st: &mut State, key: &[u8]) -> Result<(), SessionError> {
        self.store
            .delete_sessions(&[record_key(key), position_key(key)])?;
        if st.stored.remove(key) {
            let app = app_of(key);
            if let Some(n) = st.per_app.get_mut(app) {
                *n -= 1;
                if *n == 0 {
                    st.per_app.remove(app);
                }
            }
        }
        Ok(())
    }

    /// A connection of `client` in `app` (takeover registration `serial`)
    /// claims its session: `clean` discards a stored one; otherwise a
    /// stored, unexpired one is returned to resume.
    pub async fn claim(
        self: &Arc<Self>,
        app: &str,
        client: &str,
        serial: u64,
        clean: bool,
    ) -> Result<(Arc<Owner>, Option<Resumed>), SessionError> {
        let key = session_key(app, client);
        // An older connection of this client id still ending (it was just
        // taken over) writes its final position first, so nothing it had
        // acknowledged is sent again.
        let deadline = tokio::time::Instant::now() + TAKEOVER_WAIT;
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            let older = self.lock().owners.get(&key).is_some_and(|s| *s < serial);
            if !older || tokio::time::timeout_at(deadline, released).await.is_err() {
                break;
            }
        }
        let owner = Arc::new(Owner {
            sessions: self.clone(),
            key: key.clone(),
            app: app.into(),
            serial,
        });
        let this = self.clone();
        let resumed = blocking(move || {
            let mut st = this.lock();
            // A newer connection may have claimed it meanwhile.
            if st.owners.get(&key).is_some_and(|s| *s > serial) {
                return Err(SessionError::TakenOver);
            }
            st.owners.insert(key.clone(), serial);
            if !st.stored.contains(&key) {
                return Ok(None);
            }
            if clean {
                this.delete_locked(&mut st, &key)?;
                return Ok(None);
            }
            let raw = this.store.session(&record_key(&key))?;
            let record: Record = match raw {
                Some(r) => {
                    serde_json::from_slice(&r).map_err(|e| SessionError::Corrupt(e.to_string()))?
                }
                None => return Ok(None),
            };
            if record.expired(now_ms(), this.started_ms) {
                this.delete_locked(&mut st, &key)?;
                return Ok(None);
            }
            let next = match this.store.session(&position_key(&key))? {
                Some(v) => u64::from_be_bytes(
                    v.as_slice()
                        .try_into()
                        .map_err(|_| SessionError::Corrupt("position".into()))?,
                ),
                None => 0,
            };
            Ok(Some(Resumed { record, next }))
        })
        .await?;
        Ok((owner, resumed))
    }
}

/// The key of a shared-subscription group's position.
pub fn group_key(app: &str, group: &str, filter: &str) -> Vec<u8> {
    [
        app.as_bytes(),
        b"/g/",
        group.as_bytes(),
        b"/",
        filter.as_bytes(),
    ]
    .concat()
}

/// A group's stored position and when it last ended (`None`: live).
fn group_value(v: &[u8]) -> Option<(u64, Option<i64>)> {
    let next = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    let ended = i64::from_be_bytes(v.get(8..16)?.try_into().ok()?);
    Some((next, (ended >= 0).then_some(ended)))
}

impl Sessions {
    /// Where the group under `key` stopped, if it is stored.
    pub async fn group_position(
        self: &Arc<Self>,
        key: Vec<u8>,
    ) -> Result<Option<u64>, SessionError> {
        let me = self.clone();
        blocking(move || {
            Ok(me
                .store
                .session(&key)?
                .and_then(|v| group_value(&v))
                .map(|(next, _)| next))
        })
        .await
    }

    /// Stores a group's position; `ended_at` when its last member left.
    pub async fn save_group(
        self: &Arc<Self>,
        key: Vec<u8>,
        next: u64,
        ended_at: Option<i64>,
    ) -> Result<(), SessionError> {
        let me = self.clone();
        blocking(move || {
            let mut v = [0u8; 16];
            v[..8].copy_from_slice(&next.to_be_bytes());
            v[8..].copy_from_slice(&ended_at.unwrap_or(-1).to_be_bytes());
            // The lock orders this write with a removal of the application.
            let st = me.lock();
            let app = app_of(&key);
            if let Some(cut) = st.removed.get(app) {
                // A group of the removed application, unless the
                // application was created again and a newer member joined.
                let newer = st
                    .owners
                    .iter()
                    .any(|(k, serial)| app_of(k) == app && serial > cut);
                if !newer {
                    return Ok(());
                }
            }
            me.store.put_session(&key, &v)?;
            Ok(())
        })
        .await
    }

    /// Forgets a group's position.
    pub async fn delete_group(self: &Arc<Self>, key: Vec<u8>) -> Result<(), SessionError> {
        let me = self.clone();
        blocking(move || Ok(me.store.delete_sessions(&[key])?)).await
    }
}

fn app_of(key: &[u8]) -> &str {
    let end = key.iter().position(|b| *b == b'/').unwrap_or(key.len());
    std::str::from_utf8(&key[..end]).unwrap_or("")
}

impl Sessions {
    /// Forgets every session of `app`, which is being removed (its tokens
    /// are revoked already, and its stored records go with the rest of
    /// the application in one range deletion after this): the connections
    /// still ending may no longer write theirs. Call before the store's
    /// removal, so nothing is written back after it.
    pub fn forget_application(&self, app: &str) {
        let mut st = self.lock();
        let cut = st
            .owners
            .iter()
            .filter(|(k, _)| app_of(k) == app)
            .map(|(_, serial)| *serial)
            .max()
            .unwrap_or(0);
        let bound = st.removed.entry(app.into()).or_insert(0);
        *bound = (*bound).max(cut);
        st.owners.retain(|k, _| app_of(k) != app);
        st.stored.retain(|k| app_of(k) != app);
        st.per_app.remove(app);
    }
}

impl Owner {
    /// Runs `f` with the store while this connection holds the session.
    async fn write(
        self: &Arc<Self>,
        f: impl FnOnce(&Sessions, &mut State, &[u8]) -> Result<(), SessionError> + Send + 'static,
    ) -> Result<(), SessionError> {
        let me = self.clone();
        blocking(move || {
            let s = &me.sessions;
            let mut st = s.lock();
            if st.owners.get(&me.key).is_some_and(|s| *s > me.serial) {
                return Err(SessionError::TakenOver);
            }
            // The application was removed after this connection started.
            if st.removed.get(&me.app).is_some_and(|cut| me.serial <= *cut) {
                return Err(SessionError::TakenOver);
            }
            st.owners.insert(me.key.clone(), me.serial);
            f(s, &mut st, &me.key)
        })
        .await
    }

    /// Stores the session's record (and, for a new session, its starting
    /// position), counting it against the limits if it is new.
    pub async fn save(self: &Arc<Self>, record: Record, start: u64) -> Result<(), SessionError> {
        let app = self.app.clone();
        self.write(move |s, st, key| {
            let raw =
                serde_json::to_vec(&record).map_err(|e| SessionError::Corrupt(e.to_string()))?;
            if !st.stored.contains(key) {
                if st.stored.len() >= s.max_total
                    || st.per_app.get(&app).is_some_and(|n| *n >= s.max_per_app)
                {
                    return Err(SessionError::Quota);
                }
                s.store
                    .put_session(&position_key(key), &start.to_be_bytes())?;
                s.store.put_session(&record_key(key), &raw)?;
                st.stored.insert(key.to_vec());
                *st.per_app.entry(app).or_insert(0) += 1;
                return Ok(());
            }
            s.store.put_session(&record_key(key), &raw)?;
            Ok(())
        })
        .await
    }

    /// Stores the first position not yet acknowledged (of a stored
    /// session; otherwise nothing is written).
    pub async fn save_position(self: &Arc<Self>, next: u64) -> Result<(), SessionError> {
        self.write(move |s, st, key| {
            if st.stored.contains(key) {
                s.store
                    .put_session(&position_key(key), &next.to_be_bytes())?;
            }
            Ok(())
        })
        .await
    }

    /// Deletes the stored session (if any).
    pub async fn delete(self: &Arc<Self>) -> Result<(), SessionError> {
        self.write(move |s, st, key| {
            if st.stored.contains(key) {
                s.delete_locked(st, key)?;
            }
            Ok(())
        })
        .await
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        let mut st = self.sessions.lock();
        if st.owners.get(&self.key) == Some(&self.serial) {
            st.owners.remove(&self.key);
            self.sessions.released.notify_waiters();
        }
    }
}

/// How often the sweeper looks for expired sessions.
pub const SWEEP_EVERY: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SyncMode;

    fn record(subs: &[&str], expiry: u32, ended_at: Option<i64>) -> Record {
        Record {
            subs: subs.iter().map(|s| (s.to_string(), 1)).collect(),
            expiry,
            ended_at,
        }
    }

    #[tokio::test]
    async fn sessions_are_stored_resumed_and_limited() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::None).unwrap();
        let s = Sessions::load(store.clone(), 2, 3, Duration::from_secs(60)).unwrap();
        let (o, resumed) = s.claim("a", "c1", 1, false).await.unwrap();
        assert_eq!(resumed, None);
        o.save(record(&["f1"], 60, None), 7).await.unwrap();
        o.save_position(9).await.unwrap();
        let (o2, _) = s.claim("a", "c2", 2, false).await.unwrap();
        o2.save(record(&["f2"], 60, None), 0).await.unwrap();
        // Two per application.
        let (o3, _) = s.claim("a", "c3", 3, false).await.unwrap();
        assert!(matches!(
            o3.save(record(&["f3"], 60, None), 0).await,
            Err(SessionError::Quota)
        ));
        let (b1, _) = s.claim("b", "c1", 4, false).await.unwrap();
        b1.save(record(&["f"], 60, None), 0).await.unwrap();
        // Three in all.
        let (b2, _) = s.claim("b", "c2", 5, false).await.unwrap();
        assert!(matches!(
            b2.save(record(&["f"], 60, None), 0).await,
            Err(SessionError::Quota)
        ));
        assert_eq!(s.len(), 3);
        o.save(record(&["f1", "g"], 60, Some(now_ms())), 0)
            .await
            .unwrap();
        drop((o, o2, o3, b1, b2));

        // After a restart: resumed with its subscriptions and position.
        let s = Sessions::load(store.clone(), 2, 3, Duration::from_secs(60)).unwrap();
        assert_eq!(s.len(), 3);
        let (_o, resumed) = s.claim("a", "c1", 1, false).await.unwrap();
        let r = resumed.unwrap();
        assert_eq!(r.next, 9);
        assert_eq!(r.record.subs.len(), 2);
        // Clean start discards it.
        let (o, resumed) = s.claim("a", "c2", 2, true).await.unwrap();
        assert_eq!(resumed, None);
        drop(o);
        let (_o, resumed) = s.claim("a", "c2", 3, false).await.unwrap();
        assert_eq!(resumed, None);
        assert_eq!(s.len(), 2);
    }

    #[tokio::test]
    async fn a_removed_application_s_sessions_are_not_written_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::None).unwrap();
        let s = Sessions::load(store.clone(), 5, 10, Duration::from_secs(60)).unwrap();
        let (gone, _) = s.claim("a", "c1", 1, false).await.unwrap();
        gone.save(record(&["f"], 60, None), 3).await.unwrap();
        let (kept, _) = s.claim("a.x", "c1", 2, false).await.unwrap();
        kept.save(record(&["f"], 60, None), 3).await.unwrap();
        s.save_group(group_key("a", "g", "f"), 5, None)
            .await
            .unwrap();
        // The removal: forgotten first, then the store's range deletion.
        s.forget_application("a");
        store.remove_application("a", &[]).unwrap();
        assert_eq!(s.len(), 1);
        // The connection still ending writes nothing back, nor its group.
        assert!(gone
            .save(record(&["f"], 60, Some(now_ms())), 0)
            .await
            .is_err());
        assert!(gone.save_position(9).await.is_err());
        s.save_group(group_key("a", "g", "f"), 9, Some(now_ms()))
            .await
            .unwrap();
        drop(gone);
        let keys: Vec<Vec<u8>> = store
            .sessions()
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, vec![b"a.x/p/c1".to_vec(), b"a.x/r/c1".to_vec()]);
        // The application created again: a new connection keeps a session.
        let (again, resumed) = s.claim("a", "c1", 3, false).await.unwrap();
        assert_eq!(resumed, None);
        again.save(record(&["f"], 60, None), 0).await.unwrap();
        assert_eq!(s.len(), 2);
        let s = Sessions::load(store.clone(), 5, 10, Duration::from_secs(60)).unwrap();
        assert_eq!(s.len(), 2);
    }

    #[tokio::test]
    async fn an_older_connection_cannot_write_over_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::None).unwrap();
        let s = Sessions::load(store, 10, 10, Duration::from_secs(60)).unwrap();
        let (old, _) = s.claim("a", "c", 1, false).await.unwrap();
        old.save(record(&["f"], 60, None), 5).await.unwrap();
        let (new, resumed) = s.claim("a", "c", 2, false).await.unwrap();
        assert_eq!(resumed.unwrap().next, 5);
        assert!(matches!(
            old.save_position(99).await,
            Err(SessionError::TakenOver)
        ));
        assert!(matches!(old.delete().await, Err(SessionError::TakenOver)));
        drop(old);
        new.save_position(6).await.unwrap();
        drop(new);
        let (_c, resumed) = s.claim("a", "c", 3, false).await.unwrap();
        assert_eq!(resumed.unwrap().next, 6);
    }

    #[tokio::test]
    async fn expired_sessions_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), SyncMode::None).unwrap();
        let s = Sessions::load(store.clone(), 10, 10, Duration::from_secs(60)).unwrap();
        let (o, _) = s.claim("a", "old", 1, false).await.unwrap();
        o.save(record(&["f"], 1, Some(now_ms() - 5_000)), 0)
            .await
            .unwrap();
        let (o2, _) = s.claim("a", "kept", 2, false).await.unwrap();
        o2.save(record(&["f"], 3600, Some(now_ms() - 5_000)), 0)
            .await
            .unwrap();
        // Held by a connection: never swept.
        assert_eq!(s.sweep().unwrap(), 0);
        drop((o, o2));
        // A group that ended long ago goes too; a live one stays.
        let g = group_key("a", "g", "f");
        s.save_group(g.clone(), 4, Some(now_ms() - 120_000))
            .await
            .unwrap();
        let live = group_key("a", "h", "f");
        s.save_group(live.clone(), 5, None).await.unwrap();
        assert_eq!(s.sweep().unwrap(), 2);
        assert_eq!(s.len(), 1);
        assert_eq!(s.group_position(g).await.unwrap(), None);
        assert_eq!(s.group_position(live).await.unwrap(), Some(5));
        let (_o, resumed) = s.claim("a", "old", 3, false).await.unwrap();
        assert_eq!(resumed, None);
        let (_o, resumed) = s.claim("a", "kept", 4, false).await.unwrap();
        assert!(resumed.is_some());
    }
}
