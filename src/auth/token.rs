//! One token as the hot path sees it: what it may do and whether it (and
//! every ancestor) is still usable.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::grant::{Devices, RateLimit};
use super::rate::Limiter;
use super::scope::{Scope, Scopes};
use super::status::Status;

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

/// Bumped after every status change of any token (deactivation,
/// re-activation, deletion): it tags each entry's cached chain verdict
/// (see [`TokenEntry::usable`]), so one change invalidates every cached
/// verdict at once. Status changes come at admin rate, checks at message
/// rate, so the verdict is almost always cached. One counter for the
/// process rather than per registry: a change elsewhere only costs a
/// recomputation, never a wrong verdict.
static STATUS_EPOCH: AtomicU64 = AtomicU64::new(1);

/// The immutable grant of a token plus its revocable status.
///
/// Laid out for the hot path: everything a check reads (the cached chain
/// verdict, the chain's expiry, last use, application, devices, status,
/// scopes) sits in the first cache line, which is the entry's own (the
/// `Arc` counts are in the line before it); the rest is read by admin
/// operations and rate limiting.
#[derive(Debug)]
#[repr(C, align(64))]
pub struct TokenEntry {
    /// `epoch << 1 | usable`: whether every ancestor (and this token) was
    /// active when [`STATUS_EPOCH`] was `epoch`. Tag 0 never matches.
    chain_verdict: AtomicU64,
    /// Earliest expiry along the chain (`i64::MAX`: none). Expiries never
    /// change, so it is computed once.
    chain_expires_at: i64,
    /// Last use, epoch ms, 0 for never. Written at most once a second per
    /// token and persisted in batches by the token service.
    last_used: AtomicI64,
    /// Application the token belongs to; empty for the root admin token.
    /// Shared by the application's tokens (the registry interns it), so
    /// comparing it reads a line every check of that application keeps hot.
    pub app: Arc<str>,
    pub devices: Devices,
    status: AtomicU8,
    /// The root admin token may do everything in every application.
    pub root: bool,
    pub scopes: Scopes,
    /// Set when `last_used` changed since the last flush, so each token is
    /// queued for flushing at most once per flush.
    dirty: AtomicBool,
    pub id: Box<str>,
    /// Epoch milliseconds after which the token is unusable.
    pub expires_at: Option<i64>,
    pub rate_limit: Option<RateLimit>,
    /// The bucket enforcing `rate_limit`, shared by every connection that
    /// uses this token.
    limiter: Option<Limiter>,
    /// The token that minted this one; its usability bounds ours.
    pub parent: Option<Arc<TokenEntry>>,
}

impl TokenEntry {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: Box<str>,
        app: Arc<str>,
        scopes: Scopes,
        devices: Devices,
        expires_at: Option<i64>,
        rate_limit: Option<RateLimit>,
        parent: Option<Arc<TokenEntry>>,
        status: Status,
        last_used: i64,
    ) -> TokenEntry {
        let own = expires_at.unwrap_or(i64::MAX);
        let chain_expires_at = parent.as_ref().map_or(own, |p| own.min(p.chain_expires_at));
        TokenEntry {
            chain_verdict: AtomicU64::new(0),
            chain_expires_at,
            last_used: AtomicI64::new(last_used),
            app,
            devices,
            status: AtomicU8::new(status as u8),
            root: false,
            scopes,
            dirty: AtomicBool::new(false),
            id,
            expires_at,
            rate_limit,
            limiter: rate_limit.map(Limiter::new),
            parent,
        }
    }

    pub fn new_root() -> TokenEntry {
        let mut root = TokenEntry::new(
            "root".into(),
            "".into(),
            Scopes::of(&[Scope::AllApplication]),
            Devices::All,
            None,
            None,
            None,
            Status::Active,
            0,
        );
        root.root = true;
        root
    }

    pub fn status(&self) -> Status {
        Status::from_u8(self.status.load(Ordering::Acquire))
    }

    /// Changes this token's own status; every cached chain verdict is
    /// stale from then on.
    pub(crate) fn set_status(&self, s: Status) {
        self.status.store(s as u8, Ordering::Release);
        STATUS_EPOCH.fetch_add(1, Ordering::AcqRel);
    }

    /// Usable only while this token and every ancestor are active and
    /// unexpired, derived on every check: the expiry from the precomputed
    /// chain expiry, the statuses from the chain walk's verdict cached for
    /// the current [`STATUS_EPOCH`]. A status change bumps the epoch after
    /// storing the status, and the epoch is read before the walk, so a
    /// verdict tagged with the current epoch saw every change before it:
    /// revoking a parent takes effect for its whole subtree at once.
    pub fn usable(&self, now_ms: i64) -> bool {
        if now_ms >= self.chain_expires_at {
            return false;
        }
        let epoch = STATUS_EPOCH.load(Ordering::Acquire);
        let cached = self.chain_verdict.load(Ordering::Relaxed);
        if cached >> 1 == epoch {
            return cached & 1 == 1;
        }
        let active = self.chain_active();
        self.chain_verdict
            .store(epoch << 1 | u64::from(active), Ordering::Relaxed);
        active
    }

    /// Whether this token and every ancestor are active now.
    pub(crate) fn chain_active(&self) -> bool {
        let mut t = self;
        loop {
            if t.status.load(Ordering::Acquire) != Status::Active as u8 {
                return false;
            }
            match &t.parent {
                Some(p) => t = p,
                None => return true,
            }
        }
    }

    /// Earliest expiry along the chain, epoch ms (`i64::MAX`: none).
    pub(crate) fn chain_expires_at(&self) -> i64 {
        self.chain_expires_at
    }

    /// Earliest expiry along the chain, for sessions that must end then.
    pub fn chain_expiry(&self) -> Option<i64> {
        (self.chain_expires_at != i64::MAX).then_some(self.chain_expires_at)
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

    /// Charges `n` messages to this token's rate limit and to that of every
    /// limited ancestor, so a subtree as a whole never exceeds any
    /// ancestor's limit however many children it mints. One atomic
    /// operation per limited level; when a level refuses, the levels below
    /// it that were already charged are refunded, so a refused request
    /// costs nothing. `Err` carries how long until the refusing level would
    /// admit them.
    pub fn admit(&self, n: u32, now_ns: u64) -> Result<(), Duration> {
        let mut level = Some(self);
        while let Some(t) = level {
            if let Some(l) = &t.limiter {
                if let Err(wait) = l.take(n, now_ns) {
                    self.refund_below(t, n);
                    return Err(wait);
                }
            }
            level = t.parent.as_deref();
        }
        Ok(())
    }

    /// Gives `n` messages back to every limited level from `self` up to,
    /// not including, `stop` (an ancestor, or `self` for none).
    /// Gives back `n` messages admitted by [`TokenEntry::admit`] to every
    /// limited level, for messages that were then not stored (the queue
    /// was full, the commit failed): a refusal must not spend the budget.
    pub fn refund(&self, n: u32) {
        let mut level = Some(self);
        while let Some(t) = level {
            if let Some(l) = &t.limiter {
                l.refund(n);
            }
            level = t.parent.as_deref();
        }
    }

    fn refund_below(&self, stop: &TokenEntry, n: u32) {
        let mut t = self;
        while !std::ptr::eq(t, stop) {
            if let Some(l) = &t.limiter {
                l.refund(n);
            }
            match &t.parent {
                Some(p) => t = p,
                None => return,
            }
        }
    }

    /// Tokens in the chain from the root admin token down to this one: 1
    /// for a token the root minted, 0 for the root itself.
    pub fn depth(&self) -> usize {
        if self.root {
            return 0;
        }
        let mut n = 1;
        let mut t = self.parent.as_deref();
        while let Some(p) = t {
            n += 1;
            t = p.parent.as_deref();
        }
        n
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

    /// Marks the token dirty again; true when it was clean, and the caller
    /// should queue it.
    pub(crate) fn mark_dirty(&self) -> bool {
        !self.dirty.swap(true, Ordering::AcqRel)
    }

    /// Called by the flusher before it reads `last_used`.
    pub(crate) fn clear_dirty(&self) {
        self.dirty.store(false, Ordering::Release);
    }
}

/// Unlinks the chain above iteratively: dropping the last holder of a deep
/// chain would otherwise recurse once per level and could overflow the
/// stack of whichever thread dropped it (a chain stored by a version that
/// did not bound `tokens.max_chain_depth`).
impl Drop for TokenEntry {
    fn drop(&mut self) {
        let mut next = self.parent.take();
        while let Some(p) = next {
            next = match Arc::try_unwrap(p) {
                Ok(mut parent) => parent.parent.take(),
                // Still held elsewhere: nothing more is freed here.
                Err(_) => None,
            };
        }
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
    fn a_cached_verdict_never_outlives_a_status_change() {
        let a = tok(None, None);
        let b = tok(Some(a.clone()), None);
        let c = tok(Some(b.clone()), None);
        let stop = Arc::new(AtomicBool::new(false));
        // Another reader keeps caching verdicts of `c` while it changes.
        let racer = {
            let (c, stop) = (c.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::hint::black_box(c.usable(0));
                }
            })
        };
        for round in 0..200 {
            assert!(c.usable(0), "round {round}: active again");
            let revoker = {
                let (b, a) = (b.clone(), a.clone());
                std::thread::spawn(move || {
                    if round % 2 == 0 {
                        b.set_status(Status::Inactive);
                    } else {
                        a.set_status(Status::Inactive);
                    }
                })
            };
            revoker.join().unwrap();
            // Whatever the racer cached, a check after the change sees it.
            assert!(!c.usable(0), "round {round}: revoked");
            assert!(!b.usable(0), "round {round}");
            b.set_status(Status::Active);
            a.set_status(Status::Active);
        }
        stop.store(true, Ordering::Relaxed);
        racer.join().unwrap();
        assert!(c.usable(0));
        // The chain's expiry needs no walk either.
        let d = tok(Some(c.clone()), Some(700));
        assert_eq!(d.chain_expiry(), Some(700));
        assert!(d.usable(699) && !d.usable(700));
        assert_eq!(c.chain_expiry(), None);
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

    fn limited(parent: Option<Arc<TokenEntry>>, per_second: u32, burst: u32) -> Arc<TokenEntry> {
        Arc::new(TokenEntry::new(
            "l".into(),
            "app".into(),
            Scopes::of(&[Scope::SendState]),
            Devices::All,
            None,
            Some(RateLimit { per_second, burst }),
            parent,
            Status::Active,
            0,
        ))
    }

    #[test]
    fn a_subtree_is_held_to_every_ancestors_limit() {
        const MS: u64 = 1_000_000;
        let t0 = 10_000 * MS;
        let root = limited(None, 50, 5);
        let p = tok(Some(root.clone()), None);
        let kids: Vec<_> = (0..3).map(|_| limited(Some(p.clone()), 10, 2)).collect();
        // Five messages across three children empty the grandparent's
        // bucket although no child's own bucket is empty; the unlimited
        // level in between is skipped.
        for k in [0, 0, 1, 1, 2] {
            assert_eq!(kids[k].admit(1, t0), Ok(()));
        }
        // Refusals at the top cost the child nothing, however many.
        for _ in 0..100 {
            assert_eq!(kids[2].admit(1, t0), Err(Duration::from_millis(20)));
        }
        assert_eq!(p.admit(1, t0), Err(Duration::from_millis(20)));
        // 20 ms later the grandparent has room for one again, and the
        // child still has the one message of its own burst it never spent.
        assert_eq!(kids[2].admit(1, t0 + 20 * MS), Ok(()));
        // Its own bucket now refuses first, and the grandparent is refunded.
        assert_eq!(
            kids[2].admit(1, t0 + 40 * MS),
            Err(Duration::from_millis(60))
        );
        assert_eq!(kids[0].admit(1, t0 + 100 * MS), Ok(()));
        // An unlimited chain admits anything.
        assert_eq!(tok(None, None).admit(u32::MAX, 0), Ok(()));
    }

    #[test]
    fn a_refund_gives_back_every_level() {
        const MS: u64 = 1_000_000;
        let t0 = 10_000 * MS;
        let root = limited(None, 10, 3);
        let kid = limited(Some(root.clone()), 10, 3);
        assert_eq!(kid.admit(3, t0), Ok(()));
        assert!(kid.admit(1, t0).is_err());
        assert!(root.admit(1, t0).is_err());
        // The three were not stored after all: both buckets get them back.
        kid.refund(3);
        assert_eq!(root.admit(1, t0), Ok(()));
        assert_eq!(kid.admit(2, t0), Ok(()));
        assert!(kid.admit(1, t0).is_err());
    }

    #[test]
    fn a_deep_chain_drops_without_recursion() {
        let mut t: Option<Arc<TokenEntry>> = None;
        for _ in 0..200_000 {
            t = Some(tok(t.take(), None));
        }
        let t = t.unwrap();
        assert_eq!(t.depth(), 200_000);
        assert!(t.usable(0));
        drop(t);
        let a = tok(None, None);
        let b = tok(Some(a.clone()), None);
        assert_eq!(
            (TokenEntry::new_root().depth(), a.depth(), b.depth()),
            (0, 1, 2)
        );
        drop(b);
        // The parent survives its child while held elsewhere.
        assert!(a.usable(0));
    }
}
