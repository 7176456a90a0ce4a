//! One token as the hot path sees it: what it may do and whether it (and
//! every ancestor) is still usable.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, Ordering};
use std::sync::Arc;

use std::time::Duration;

use super::rate::Limiter;
use super::scope::{Scope, Scopes};

/// Own status of a token. Usability is derived from the whole chain.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum Status {
    Active = 0,
    Inactive = 1,
    /// Deleted tokens are gone from every map; live holders of an `Arc`
    /// (an MQTT session, an in-flight request) see this and stop.
    Deleted = 2,
}

impl Status {
    fn from_u8(v: u8) -> Status {
        match v {
            0 => Status::Active,
            1 => Status::Inactive,
            _ => Status::Deleted,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::Inactive => "inactive",
            Status::Deleted => "deleted",
        }
    }
}

/// The devices a token covers.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Devices {
    /// `["*"]`: every device of the application.
    All,
    /// Sorted and de-duplicated, so membership is a binary search.
    Only(Box<[Box<str>]>),
}

impl Devices {
    pub fn only<I: IntoIterator<Item = String>>(ids: I) -> Devices {
        let mut v: Vec<Box<str>> = ids.into_iter().map(String::into_boxed_str).collect();
        v.sort_unstable();
        v.dedup();
        Devices::Only(v.into_boxed_slice())
    }

    pub fn contains(&self, device: &str) -> bool {
        match self {
            Devices::All => true,
            Devices::Only(list) => list.binary_search_by(|d| (**d).cmp(device)).is_ok(),
        }
    }

    /// Whether every device covered by `self` is covered by `parent`.
    pub fn within(&self, parent: &Devices) -> bool {
        match (self, parent) {
            (_, Devices::All) => true,
            (Devices::All, Devices::Only(_)) => false,
            (Devices::Only(c), Devices::Only(_)) => c.iter().all(|d| parent.contains(d)),
        }
    }

    pub fn to_list(&self) -> Vec<String> {
        match self {
            Devices::All => vec!["*".to_string()],
            Devices::Only(l) => l.iter().map(|d| d.to_string()).collect(),
        }
    }
}

/// Messages per second with a burst allowance.
#[derive(Clone, Copy, PartialEq, Eq, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
}

impl RateLimit {
    pub fn within(&self, parent: &RateLimit) -> bool {
        self.per_second <= parent.per_second && self.burst <= parent.burst
    }
}

/// Why a credential was refused.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum Denied {
    /// Unknown, expired or inactive token (or an ancestor is).
    #[error("unauthorized")]
    Unauthorized,
    /// A valid token without the scope, application or device needed.
    #[error("forbidden")]
    Forbidden,
}

/// The immutable grant of a token plus its revocable status.
#[derive(Debug)]
pub struct TokenEntry {
    pub id: Box<str>,
    /// Application the token belongs to; empty for the root admin token.
    pub app: Box<str>,
    /// The root admin token may do everything in every application.
    pub root: bool,
    pub scopes: Scopes,
    pub devices: Devices,
    /// Epoch milliseconds after which the token is unusable.
    pub expires_at: Option<i64>,
    pub rate_limit: Option<RateLimit>,
    /// The bucket enforcing `rate_limit`, shared by every connection that
    /// uses this token.
    limiter: Option<Limiter>,
    /// The token that minted this one; its usability bounds ours.
    pub parent: Option<Arc<TokenEntry>>,
    status: AtomicU8,
    /// Last use, epoch ms, 0 for never. Written at most once a second per
    /// token and persisted in batches by the token service.
    last_used: AtomicI64,
    /// Set when `last_used` changed since the last flush, so each token is
    /// queued for flushing at most once per flush.
    dirty: AtomicBool,
}

impl TokenEntry {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: Box<str>,
        app: Box<str>,
        scopes: Scopes,
        devices: Devices,
        expires_at: Option<i64>,
        rate_limit: Option<RateLimit>,
        parent: Option<Arc<TokenEntry>>,
        status: Status,
        last_used: i64,
    ) -> TokenEntry {
        TokenEntry {
            id,
            app,
            root: false,
            scopes,
            devices,
            expires_at,
            rate_limit,
            limiter: rate_limit.map(Limiter::new),
            parent,
            status: AtomicU8::new(status as u8),
            last_used: AtomicI64::new(last_used),
            dirty: AtomicBool::new(false),
        }
    }

    pub fn new_root() -> TokenEntry {
        TokenEntry {
            root: true,
            ..TokenEntry::new(
                "root".into(),
                "".into(),
                Scopes::of(&[Scope::AllApplication]),
                Devices::All,
                None,
                None,
                None,
                Status::Active,
                0,
            )
        }
    }

    pub fn status(&self) -> Status {
        Status::from_u8(self.status.load(Ordering::Acquire))
    }

    pub(crate) fn set_status(&self, s: Status) {
        self.status.store(s as u8, Ordering::Release);
    }

    /// Usable only while this token and every ancestor are active and
    /// unexpired. Walking the chain (a few pointer hops) is what makes
    /// revoking a parent take effect for its whole subtree at once.
    pub fn usable(&self, now_ms: i64) -> bool {
        let mut t = self;
        loop {
            if t.status.load(Ordering::Acquire) != Status::Active as u8 {
                return false;
            }
            if matches!(t.expires_at, Some(exp) if now_ms >= exp) {
                return false;
            }
            match &t.parent {
                Some(p) => t = p,
                None => return true,
            }
        }
    }

    /// Earliest expiry along the chain, for sessions that must end then.
    pub fn chain_expiry(&self) -> Option<i64> {
        let mut t = self;
        let mut min: Option<i64> = None;
        loop {
            if let Some(e) = t.expires_at {
                min = Some(min.map_or(e, |m| m.min(e)));
            }
            match &t.parent {
                Some(p) => t = p,
                None => return min,
            }
        }
    }

    /// Whether the grant covers `scope` in `app` (and `device`, if given).
    pub fn permits(&self, app: &str, device: Option<&str>, scope: Scope) -> bool {
        if self.root {
            return true;
        }
        *self.app == *app
            && self.scopes.allows(scope)
            && device.is_none_or(|d| self.devices.contains(d))
    }

    /// The whole check: usable, then permitted.
    pub fn check(
        &self,
        app: &str,
        device: Option<&str>,
        scope: Scope,
        now_ms: i64,
    ) -> Result<(), Denied> {
        if !self.usable(now_ms) {
            return Err(Denied::Unauthorized);
        }
        if !self.permits(app, device, scope) {
            return Err(Denied::Forbidden);
        }
        Ok(())
    }

    /// Charges `n` messages to the token's rate limit, if it has one;
    /// `Err` carries how long until they would be admitted.
    pub fn admit(&self, n: u32, now_ns: u64) -> Result<(), Duration> {
        match &self.limiter {
            None => Ok(()),
            Some(l) => l.take(n, now_ns),
        }
    }

    /// Whether `self` is a strict descendant of `ancestor`.
    pub fn descends_from(&self, ancestor: &TokenEntry) -> bool {
        let mut t = self.parent.as_deref();
        while let Some(p) = t {
            if std::ptr::eq(p, ancestor) {
                return true;
            }
            t = p.parent.as_deref();
        }
        false
    }

    pub fn last_used(&self) -> i64 {
        self.last_used.load(Ordering::Relaxed)
    }

    /// Records a use. Returns true when the token just became dirty and the
    /// caller should queue it for the next lastUsedAt flush.
    pub(crate) fn touch(&self, now_ms: i64) -> bool {
        if self.root || now_ms - self.last_used.load(Ordering::Relaxed) < 1000 {
            return false;
        }
        self.last_used.store(now_ms, Ordering::Relaxed);
        !self.dirty.load(Ordering::Relaxed) && !self.dirty.swap(true, Ordering::AcqRel)
    }

    /// Called by the flusher before it reads `last_used`.
    pub(crate) fn clear_dirty(&self) {
        self.dirty.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(parent: Option<Arc<TokenEntry>>, exp: Option<i64>) -> Arc<TokenEntry> {
        Arc::new(TokenEntry::new(
            "t".into(),
            "app".into(),
            Scopes::of(&[Scope::SendState]),
            Devices::only(["d1".to_string(), "d2".to_string()]),
            exp,
            None,
            parent,
            Status::Active,
            0,
        ))
    }

    #[test]
    fn chain_usability() {
        let a = tok(None, Some(1000));
        let b = tok(Some(a.clone()), None);
        let c = tok(Some(b.clone()), Some(500));
        assert!(c.usable(0));
        assert!(!c.usable(500));
        assert!(!b.usable(1000));
        b.set_status(Status::Inactive);
        assert!(!c.usable(0));
        assert!(a.usable(0));
        b.set_status(Status::Active);
        assert!(c.usable(0));
        assert_eq!(c.chain_expiry(), Some(500));
        assert!(c.descends_from(&a));
        assert!(!a.descends_from(&c));
        assert!(!a.descends_from(&a));
    }

    #[test]
    fn permits_checks_app_device_scope() {
        let a = tok(None, None);
        assert!(a.permits("app", Some("d2"), Scope::SendState));
        assert!(!a.permits("app", Some("d3"), Scope::SendState));
        assert!(!a.permits("other", Some("d1"), Scope::SendState));
        assert!(!a.permits("app", Some("d1"), Scope::GetState));
        assert_eq!(
            a.check("app", Some("d3"), Scope::SendState, 0),
            Err(Denied::Forbidden)
        );
        let root = TokenEntry::new_root();
        assert!(root.permits("anything", Some("x"), Scope::TokenRevoke));
    }

    #[test]
    fn devices_subset() {
        let all = Devices::All;
        let two = Devices::only(["b".to_string(), "a".to_string(), "a".to_string()]);
        let one = Devices::only(["a".to_string()]);
        assert!(one.within(&two));
        assert!(!two.within(&one));
        assert!(two.within(&all));
        assert!(!all.within(&two));
        assert_eq!(two.to_list(), vec!["a", "b"]);
    }
}
