//! Live sessions by application and client id, for session takeover.
//!
//! MQTT requires that a new connection with the client id of a live one
//! ends the old one ([MQTT-3.1.4-2] in 3.1.1, [MQTT-3.1.4-3] in 5). Client
//! ids are chosen by devices, so they are unique only within one
//! application: the key holds the application of the token that
//! authenticated the connection, and a token of one application can never
//! end a session of another.
//!
//! "Newer" is the order of registration. A session registers after its
//! token is checked and before its CONNACK is written, so a client that
//! connects again after reading its CONNACK always registers later, and
//! always wins.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytestring::ByteString;
use tokio::sync::Notify;

/// The live sessions of every application.
#[derive(Default)]
pub struct Takeover {
    /// One entry per live session; bounded by `mqtt.max_connections`.
    live: papaya::HashMap<Key, Live>,
    serial: AtomicU64,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    app: Box<str>,
    client_id: ByteString,
}

struct Live {
    serial: u64,
    /// Notified once when a newer session takes this one's place.
    kick: Arc<Notify>,
}

impl Takeover {
    /// Makes this session the live one for `client_id` in `app`, and tells
    /// the previous one, if any, to end. The returned registration ends
    /// with the session (on drop).
    pub(super) fn register(&self, app: &str, client_id: ByteString) -> Registration<'_> {
        let key = Key {
            app: app.into(),
            client_id,
        };
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        let kick = Arc::new(Notify::new());
        let live = Live {
            serial,
            kick: kick.clone(),
        };
        if let Some(old) = self.live.pin().insert(key.clone(), live) {
            // notify_one stores a permit, so the old session sees it even
            // if it is busy right now (or has not started its loop yet).
            old.kick.notify_one();
        }
        Registration {
            takeover: self,
            key,
            serial,
            kick,
        }
    }

    /// Live sessions, for tests.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.live.len()
    }
}

/// A session's place in [`Takeover`]; removed when dropped, unless a newer
/// session has taken it.
pub(super) struct Registration<'a> {
    takeover: &'a Takeover,
    key: Key,
    serial: u64,
    kick: Arc<Notify>,
}

impl Registration<'_> {
    /// Notified when a newer session with the same application and client
    /// id has registered.
    pub(super) fn kicked(&self) -> &Notify {
        &self.kick
    }

    pub(super) fn client_id(&self) -> &ByteString {
        &self.key.client_id
    }

    /// Orders registrations of one client id: a higher serial is newer.
    pub(super) fn serial(&self) -> u64 {
        self.serial
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let serial = self.serial;
        let _ = self
            .takeover
            .live
            .pin()
            .remove_if(&self.key, |_, live| live.serial == serial);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kicked(r: &Registration<'_>) -> bool {
        // A stored permit makes `notified()` ready at once.
        let n = r.kicked().notified();
        tokio::pin!(n);
        n.as_mut().enable()
    }

    #[test]
    fn takeover_only_within_one_application() {
        let t = Takeover::default();
        let a = t.register("app-a", ByteString::from_static("sensor-1"));
        let b = t.register("app-b", ByteString::from_static("sensor-1"));
        assert!(!kicked(&a), "another application's session was kicked");
        assert!(!kicked(&b));
        let a2 = t.register("app-a", ByteString::from_static("sensor-1"));
        assert!(
            kicked(&a),
            "the older session of the same application lives on"
        );
        assert!(!kicked(&a2));
        assert!(!kicked(&b));
        // The older one ending does not remove the newer one's entry.
        drop(a);
        assert_eq!(t.len(), 2);
        let a3 = t.register("app-a", ByteString::from_static("sensor-1"));
        assert!(kicked(&a2));
        drop(a2);
        drop(a3);
        drop(b);
        assert_eq!(t.len(), 0);
    }
}
