//! Property test of the attenuation and cascade rules ("Identifiers and
//! tokens" in the contract), the revocation authority and hierarchical
//! rate limits (issue 8, items 4 and 5): random token trees built by random
//! mint/deactivate/reactivate/delete/use/send sequences, checking that no
//! token ever does more than every one of its ancestors allows, that only a
//! deactivating token or one above it re-activates, and that no subtree
//! ever sends more than any limited ancestor's rate.
//!
//! It drives the real in-memory `Registry`, the pure `attenuate` and
//! `status_change` and `TokenEntry::admit` the way `TokenService` and the
//! listeners do (no IO), and compares every answer with a small,
//! independent model kept in plain structs below. The model does not reuse
//! the crate's scope bit set, device set, usability walk, authority rule or
//! rate bucket (it keeps a plain token bucket of nanosecond credit).

use std::sync::Arc;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;

use sluice::auth::{
    attenuate, status_change, Denied, Devices, Exceeds, Granted, RateLimit, Registry,
    RegistryError, Requested, Revoker, Scope, Scopes, Status, TokenEntry, TokenRecord,
};
use sluice::secret::TokenHash;

const APPS: [&str; 2] = ["a", "b"];
/// Tokens name devices among the first four; the fifth is never listed, so
/// only `["*"]` covers it.
const DEVICES: [&str; 5] = ["d1", "d2", "d3", "d4", "d5"];
const LISTED_DEVICES: usize = 4;
/// The model's own numbering of scopes (bit `i` is `SCOPES[i]`); index 0
/// is `all.Application`, which allows everything in its application.
const SCOPES: [Scope; 6] = [
    Scope::AllApplication,
    Scope::SendState,
    Scope::GetState,
    Scope::TokenCreate,
    Scope::TokenRead,
    Scope::TokenRevoke,
];
const ALL_APP_BIT: u8 = 1;
const START_MS: i64 = 1_700_000_000_000;
const ROOT_SECRET: &str = "root-admin-secret-for-props";

// ---------------------------------------------------------------- model --

/// Devices as the model sees them: every device, or a bit set over
/// `DEVICES[..LISTED_DEVICES]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MDevices {
    All,
    Only(u8),
}

impl MDevices {
    fn covers(self, device: usize) -> bool {
        match self {
            MDevices::All => true,
            MDevices::Only(m) => device < LISTED_DEVICES && m & (1 << device) != 0,
        }
    }

    /// Whether every device of `self` is a device of `outer`.
    fn inside(self, outer: MDevices) -> bool {
        match (self, outer) {
            (_, MDevices::All) => true,
            (MDevices::All, MDevices::Only(_)) => false,
            (MDevices::Only(c), MDevices::Only(p)) => c & !p == 0,
        }
    }
}

/// A grant in model terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MGrant {
    scopes: u8,
    devices: MDevices,
    expires_at: Option<i64>,
    /// (per second, burst)
    rate: Option<(u32, u32)>,
}

impl MGrant {
    fn scope_allows(&self, scope: usize) -> bool {
        self.scopes & ALL_APP_BIT != 0 || self.scopes & (1 << scope) != 0
    }

    fn scopes_imply(&self, child: u8) -> bool {
        self.scopes & ALL_APP_BIT != 0 || child & !self.scopes == 0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MStatus {
    Active,
    Inactive,
}

/// Who deactivated a token, in model terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MBy {
    Root,
    Token(usize),
}

/// A token bucket of nanosecond credit: `per_second` messages a second
/// means one message costs `1e9 / per_second` whole nanoseconds, and the
/// bucket holds `burst` messages' worth.
#[derive(Clone, Copy, Debug)]
struct MBucket {
    cost: u64,
    cap: u64,
    credit: u64,
    at: u64,
}

impl MBucket {
    fn new((per_second, burst): (u32, u32)) -> MBucket {
        let cost = 1_000_000_000 / u64::from(per_second);
        MBucket {
            cost,
            cap: cost * u64::from(burst),
            credit: cost * u64::from(burst),
            at: 0,
        }
    }

    fn refill(&mut self, now: u64) {
        self.credit = self.cap.min(self.credit + (now - self.at));
        self.at = now;
    }

    fn has(&self, n: u32) -> bool {
        self.credit >= self.cost * u64::from(n)
    }
}

/// An admitted send: when, how many messages, and the token's chain.
#[derive(Debug)]
struct Sent {
    at: u64,
    n: u32,
    chain: Vec<usize>,
}

#[derive(Debug)]
struct MToken {
    id: String,
    secret: String,
    app: &'static str,
    grant: MGrant,
    status: MStatus,
    /// Set while inactive.
    deactivated_by: Option<MBy>,
    /// Model index of the minter; `None` when the root minted it.
    parent: Option<usize>,
    deleted: bool,
    bucket: Option<MBucket>,
}

#[derive(Default)]
struct Model {
    tokens: Vec<MToken>,
    sent: Vec<Sent>,
}

impl Model {
    /// The token itself, then its parent, and so on up to (not including)
    /// the root.
    fn chain(&self, i: usize) -> Vec<usize> {
        let mut out = vec![i];
        let mut cur = self.tokens[i].parent;
        while let Some(p) = cur {
            out.push(p);
            cur = self.tokens[p].parent;
        }
        out
    }

    /// Strict ancestors of `i`, nearest first.
    fn ancestors(&self, i: usize) -> Vec<usize> {
        self.chain(i).split_off(1)
    }

    fn descends_from(&self, i: usize, ancestor: usize) -> bool {
        self.ancestors(i).contains(&ancestor)
    }

    /// `i` and everything below it.
    fn subtree(&self, i: usize) -> Vec<usize> {
        (0..self.tokens.len())
            .filter(|&j| j == i || self.descends_from(j, i))
            .collect()
    }

    fn chain_expiry(&self, i: usize) -> Option<i64> {
        self.chain(i)
            .into_iter()
            .filter_map(|j| self.tokens[j].grant.expires_at)
            .min()
    }

    fn own_ok(&self, j: usize, now: i64) -> bool {
        let t = &self.tokens[j];
        !t.deleted && t.status == MStatus::Active && t.grant.expires_at.is_none_or(|e| now < e)
    }

    fn usable(&self, i: usize, now: i64) -> bool {
        self.chain(i).into_iter().all(|j| self.own_ok(j, now))
    }

    fn permits(&self, j: usize, app: &str, device: Option<usize>, scope: usize) -> bool {
        let t = &self.tokens[j];
        t.app == app
            && t.grant.scope_allows(scope)
            && device.is_none_or(|d| t.grant.devices.covers(d))
    }

    /// What `authorize` must answer for token `i`.
    fn expected_use(
        &self,
        i: usize,
        app: &str,
        device: Option<usize>,
        scope: usize,
        now: i64,
    ) -> Result<(), Denied> {
        if !self.usable(i, now) {
            Err(Denied::Unauthorized)
        } else if !self.permits(i, app, device, scope) {
            Err(Denied::Forbidden)
        } else {
            Ok(())
        }
    }

    /// What `attenuate` must do for a minter (`None` = root): the grant,
    /// or every bound the request breaks.
    fn expected_mint(
        &self,
        minter: Option<usize>,
        app: &str,
        req: &MRequest,
    ) -> Result<MGrant, Vec<Exceeds>> {
        let Some(m) = minter else {
            return Ok(MGrant {
                scopes: req.scopes,
                devices: req.devices.unwrap_or(MDevices::All),
                expires_at: req.expires_at,
                rate: req.rate,
            });
        };
        let mt = &self.tokens[m];
        let mut broken = Vec::new();
        if mt.app != app {
            broken.push(Exceeds::Application);
        }
        if !mt.grant.scopes_imply(req.scopes) {
            broken.push(Exceeds::Scope);
        }
        let devices = match req.devices {
            Some(d) => {
                if !d.inside(mt.grant.devices) {
                    broken.push(Exceeds::Devices);
                }
                d
            }
            None => mt.grant.devices,
        };
        let bound = self.chain_expiry(m);
        let expires_at = match (req.expires_at, bound) {
            (Some(c), Some(p)) => {
                if c > p {
                    broken.push(Exceeds::Expiration);
                }
                Some(c)
            }
            (Some(c), None) => Some(c),
            (None, p) => p,
        };
        let rate = match (req.rate, mt.grant.rate) {
            (Some((cs, cb)), Some((ps, pb))) => {
                if cs > ps || cb > pb {
                    broken.push(Exceeds::RateLimit);
                }
                Some((cs, cb))
            }
            (Some(c), None) => Some(c),
            (None, p) => p,
        };
        if broken.is_empty() {
            Ok(MGrant {
                scopes: req.scopes,
                devices,
                expires_at,
                rate,
            })
        } else {
            Err(broken)
        }
    }
}

impl Model {
    /// Whether `caller` (`None`: the root) is the token that deactivated
    /// `i`, or above it.
    fn may_reactivate(&self, caller: Option<usize>, i: usize) -> bool {
        match (caller, self.tokens[i].deactivated_by) {
            (None, _) => true,
            (Some(c), Some(MBy::Token(d))) => c == d || self.descends_from(d, c),
            (Some(_), _) => false,
        }
    }

    /// What a status change by `caller` must do: `Err` when refused, else
    /// the deactivator afterwards.
    fn expected_status(
        &self,
        caller: Option<usize>,
        i: usize,
        active: bool,
    ) -> Result<Option<MBy>, ()> {
        let by = || caller.map_or(MBy::Root, MBy::Token);
        let t = &self.tokens[i];
        match (active, t.status) {
            (true, MStatus::Active) => Ok(None),
            (true, MStatus::Inactive) if self.may_reactivate(caller, i) => Ok(None),
            (true, MStatus::Inactive) => Err(()),
            (false, MStatus::Active) => Ok(Some(by())),
            (false, MStatus::Inactive) if self.may_reactivate(caller, i) => Ok(Some(by())),
            (false, MStatus::Inactive) => Ok(t.deactivated_by),
        }
    }

    /// Whether `n` messages from token `i` are admitted at `now`: only if
    /// every limited level of its chain has the credit. Charges all of
    /// them, or none.
    fn send(&mut self, i: usize, n: u32, now: u64) -> bool {
        let chain = self.chain(i);
        for &j in &chain {
            if let Some(b) = &mut self.tokens[j].bucket {
                b.refill(now);
            }
        }
        let fits = chain
            .iter()
            .all(|&j| self.tokens[j].bucket.is_none_or(|b| b.has(n)));
        if fits {
            for &j in &chain {
                if let Some(b) = &mut self.tokens[j].bucket {
                    b.credit -= b.cost * u64::from(n);
                }
            }
        }
        fits
    }
}

/// A mint request in model terms.
#[derive(Clone, Copy, Debug)]
struct MRequest {
    scopes: u8,
    devices: Option<MDevices>,
    expires_at: Option<i64>,
    rate: Option<(u32, u32)>,
}

// ------------------------------------------- model <-> crate conversions --

fn to_scopes(bits: u8) -> Scopes {
    let list: Vec<Scope> = (0..SCOPES.len())
        .filter(|i| bits & (1 << i) != 0)
        .map(|i| SCOPES[i])
        .collect();
    Scopes::of(&list)
}

fn from_scopes(s: Scopes) -> u8 {
    (0..SCOPES.len())
        .filter(|&i| s.contains(SCOPES[i]))
        .fold(0, |acc, i| acc | 1 << i)
}

fn to_devices(d: MDevices) -> Devices {
    match d {
        MDevices::All => Devices::All,
        MDevices::Only(m) => Devices::only(
            (0..LISTED_DEVICES)
                .filter(|i| m & (1 << i) != 0)
                .map(|i| DEVICES[i].to_string()),
        ),
    }
}

fn from_devices(d: &Devices) -> Result<MDevices, TestCaseError> {
    match d {
        Devices::All => Ok(MDevices::All),
        Devices::Only(list) => {
            let mut m = 0u8;
            for name in list.iter() {
                let i = DEVICES[..LISTED_DEVICES]
                    .iter()
                    .position(|d| **d == **name)
                    .ok_or_else(|| TestCaseError::fail(format!("granted unknown device {name}")))?;
                m |= 1 << i;
            }
            Ok(MDevices::Only(m))
        }
    }
}

fn to_rate(r: (u32, u32)) -> RateLimit {
    RateLimit {
        per_second: r.0,
        burst: r.1,
    }
}

fn from_granted(g: &Granted) -> Result<MGrant, TestCaseError> {
    Ok(MGrant {
        scopes: from_scopes(g.scopes),
        devices: from_devices(&g.devices)?,
        expires_at: g.expires_at,
        rate: g.rate_limit.map(|r| (r.per_second, r.burst)),
    })
}

fn from_entry(e: &TokenEntry) -> Result<MGrant, TestCaseError> {
    Ok(MGrant {
        scopes: from_scopes(e.scopes),
        devices: from_devices(&e.devices)?,
        expires_at: e.expires_at,
        rate: e.rate_limit.map(|r| (r.per_second, r.burst)),
    })
}

// ------------------------------------------------------------------ ops --

#[derive(Clone, Debug)]
enum Op {
    Mint {
        /// `None`: the root admin token mints.
        minter: Option<Index>,
        /// Pick the minter among the three newest tokens, to grow chains.
        recent: bool,
        app: usize,
        /// Non-empty set of model scope bits.
        scopes: u8,
        /// `None`: inherit; `Some(None)`: `["*"]`; `Some(Some(m))`: listed.
        devices: Option<Option<u8>>,
        /// Offset from the current clock.
        expires_in: Option<i64>,
        rate: Option<(u32, u32)>,
        /// Bits 0..5: narrow scopes / devices / expiry / rate limit to the
        /// minter's, and use the minter's application, so that plenty of
        /// mints succeed and trees get deep.
        fit: u8,
        active: bool,
    },
    SetStatus {
        target: Index,
        active: bool,
        /// `None`: the root; else one of the target's ancestors.
        caller: Option<Index>,
    },
    Send {
        target: Index,
        /// Pick the target among the four newest tokens, which are often
        /// parent, children and siblings: they share buckets.
        recent: bool,
        /// Messages in one request (an HTTP array costs its length).
        n: u32,
    },
    Delete {
        target: Index,
    },
    Use {
        /// `None`: a credential that was never issued.
        target: Option<Index>,
        /// `None`: the token's own application.
        app: Option<usize>,
        device: Option<usize>,
        scope: usize,
        /// Offset from the current clock (the check may run slightly
        /// before or after "now").
        skew: i64,
    },
    AdvanceClock {
        ms: i64,
    },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let mint = (
        (prop::option::weighted(0.9, any::<Index>()), any::<bool>()),
        0..APPS.len(),
        1u8..(1 << SCOPES.len()),
        prop::option::weighted(0.6, prop::option::weighted(0.7, 1u8..(1 << LISTED_DEVICES))),
        prop::option::weighted(0.5, -20i64..600),
        prop::option::weighted(0.5, (1u32..20, 1u32..20)),
        prop_oneof![1 => 0u8..32, 2 => Just(31u8)],
        prop::bool::weighted(0.85),
    )
        .prop_map(
            |((minter, recent), app, scopes, devices, expires_in, rate, fit, active)| Op::Mint {
                minter,
                recent,
                app,
                scopes,
                devices,
                expires_in,
                rate,
                fit,
                active,
            },
        );
    let set_status = (
        any::<Index>(),
        prop::bool::weighted(0.6),
        prop::option::weighted(0.7, any::<Index>()),
    )
        .prop_map(|(target, active, caller)| Op::SetStatus {
            target,
            active,
            caller,
        });
    let send = (any::<Index>(), any::<bool>(), 1u32..5).prop_map(|(target, recent, n)| Op::Send {
        target,
        recent,
        n,
    });
    let delete = any::<Index>().prop_map(|target| Op::Delete { target });
    let use_ = (
        prop::option::weighted(0.95, any::<Index>()),
        prop::option::weighted(0.3, 0..APPS.len()),
        prop::option::weighted(0.85, 0..DEVICES.len()),
        0..SCOPES.len(),
        -5i64..5,
    )
        .prop_map(|(target, app, device, scope, skew)| Op::Use {
            target,
            app,
            device,
            scope,
            skew,
        });
    let advance = (0i64..60).prop_map(|ms| Op::AdvanceClock { ms });
    prop_oneof![
        6 => mint,
        5 => set_status,
        1 => delete,
        6 => use_,
        6 => send,
        2 => advance,
    ]
}

// -------------------------------------------------------------- harness --

struct World {
    registry: Registry,
    root: Arc<TokenEntry>,
    model: Model,
    /// The registry's entry of each model token, kept after deletion the way
    /// a live session would keep it.
    entries: Vec<Arc<TokenEntry>>,
    clock: i64,
    next_id: u64,
    refusals: usize,
    /// Outcomes of `Use`: allowed, forbidden, unauthorized.
    uses: [usize; 3],
    /// Re-activations refused for lack of authority.
    status_refusals: usize,
    /// Outcomes of `Send`: admitted, refused by the token's own limit,
    /// refused only by an ancestor's.
    sends: [usize; 3],
}

impl World {
    fn new() -> World {
        let registry = Registry::new();
        registry.set_root(TokenHash::of(ROOT_SECRET.as_bytes()));
        World {
            registry,
            root: Arc::new(TokenEntry::new_root()),
            model: Model::default(),
            entries: Vec::new(),
            clock: START_MS,
            next_id: 0,
            refusals: 0,
            uses: [0; 3],
            status_refusals: 0,
            sends: [0; 3],
        }
    }

    fn revoker(&self, by: MBy) -> Revoker {
        match by {
            MBy::Root => Revoker::Root,
            MBy::Token(j) => Revoker::Token(self.model.tokens[j].id.as_str().into()),
        }
    }

    fn pick(&self, ix: &Index) -> Option<usize> {
        (!self.model.tokens.is_empty()).then(|| ix.index(self.model.tokens.len()))
    }

    /// Builds the request, narrowing the fields `fit` asks for to the
    /// minter's grant (never to an ancestor's: that is attenuate's job).
    #[allow(clippy::too_many_arguments)]
    fn request(
        &self,
        minter: Option<usize>,
        scopes: u8,
        devices: Option<Option<u8>>,
        expires_in: Option<i64>,
        rate: Option<(u32, u32)>,
        fit: u8,
    ) -> MRequest {
        let mut req = MRequest {
            scopes,
            devices: devices.map(|d| d.map_or(MDevices::All, MDevices::Only)),
            expires_at: expires_in.map(|d| self.clock + d),
            rate,
        };
        let Some(m) = minter else { return req };
        let g = self.model.tokens[m].grant;
        if fit & 1 != 0 && g.scopes & ALL_APP_BIT == 0 && req.scopes & g.scopes != 0 {
            req.scopes &= g.scopes;
        }
        if fit & 2 != 0 {
            if let (Some(d), MDevices::Only(p)) = (req.devices, g.devices) {
                let narrowed = match d {
                    MDevices::All => p,
                    MDevices::Only(c) => c & p,
                };
                if narrowed != 0 {
                    req.devices = Some(MDevices::Only(narrowed));
                }
            }
        }
        if fit & 4 != 0 {
            if let (Some(c), Some(p)) = (req.expires_at, g.expires_at) {
                req.expires_at = Some(c.min(p));
            }
        }
        if fit & 8 != 0 {
            if let (Some((cs, cb)), Some((ps, pb))) = (req.rate, g.rate) {
                req.rate = Some((cs.min(ps), cb.min(pb)));
            }
        }
        req
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Mint {
                minter,
                recent,
                app,
                scopes,
                devices,
                expires_in,
                rate,
                fit,
                active,
            } => {
                let n = self.model.tokens.len();
                let m = match minter {
                    Some(ix) if *recent && n > 0 => Some(n - 1 - ix.index(n.min(3))),
                    Some(ix) => self.pick(ix),
                    None => None,
                };
                let app = match m {
                    Some(m) if fit & 16 != 0 => self.model.tokens[m].app,
                    _ => APPS[*app],
                };
                let req = self.request(m, *scopes, *devices, *expires_in, *rate, *fit);
                self.mint(m, app, req, *active)
            }
            Op::SetStatus {
                target,
                active,
                caller,
            } => {
                // Re-activations aim at inactive tokens, where the
                // authority rule has something to decide.
                let inactive: Vec<usize> = (0..self.model.tokens.len())
                    .filter(|&j| {
                        let t = &self.model.tokens[j];
                        !t.deleted && t.status == MStatus::Inactive
                    })
                    .collect();
                let i = match (*active, inactive.is_empty()) {
                    (true, false) => inactive[target.index(inactive.len())],
                    _ => match self.pick(target) {
                        Some(i) => i,
                        None => return Ok(()),
                    },
                };
                let (status, mstatus) = if *active {
                    (Status::Active, MStatus::Active)
                } else {
                    (Status::Inactive, MStatus::Inactive)
                };
                let id = self.model.tokens[i].id.clone();
                if self.model.tokens[i].deleted {
                    prop_assert!(
                        self.registry.set_status(&id, status, None).is_none(),
                        "set_status revived deleted token {}",
                        i
                    );
                    return Ok(());
                }
                // The caller: the root, or one of the target's ancestors
                // (the only tokens the admin API lets see it).
                let ancestors = self.model.ancestors(i);
                // Re-activations come from low in the chain (the parent or
                // grandparent), deactivations from anywhere in it.
                let reach = if *active {
                    ancestors.len().min(2)
                } else {
                    ancestors.len()
                };
                let caller = match caller {
                    Some(ix) if reach > 0 => Some(ancestors[ix.index(reach)]),
                    _ => None,
                };
                let caller_entry =
                    caller.map_or_else(|| self.root.clone(), |c| self.entries[c].clone());
                // What `TokenService::update` does under its change lock.
                let record = self
                    .registry
                    .record(&id)
                    .ok_or_else(|| TestCaseError::fail("live token unknown"))?;
                let deactivator = match &record.deactivated_by {
                    Some(Revoker::Token(d)) => self.registry.entry(d),
                    _ => None,
                };
                let got = status_change(
                    &caller_entry,
                    record.status,
                    record.deactivated_by.as_ref(),
                    deactivator.as_deref(),
                    status,
                );
                let by = match (got, self.model.expected_status(caller, i, *active)) {
                    (Err(_), Err(())) => {
                        self.status_refusals += 1;
                        return Ok(());
                    }
                    (Ok(by), Ok(want)) => {
                        prop_assert_eq!(
                            &by,
                            &want.map(|w| self.revoker(w)),
                            "deactivator of {} after {:?} set it active={}",
                            i,
                            caller,
                            active
                        );
                        self.model.tokens[i].deactivated_by = want;
                        by
                    }
                    (got, want) => {
                        return Err(TestCaseError::fail(format!(
                            "token {i} (deactivated by {:?}) set active={active} by {caller:?}: \
                             got {got:?}, model {want:?}",
                            self.model.tokens[i].deactivated_by
                        )))
                    }
                };
                let view = self
                    .registry
                    .set_status(&id, status, by)
                    .ok_or_else(|| TestCaseError::fail("live token unknown"))?;
                prop_assert_eq!(view.status, status);
                self.model.tokens[i].status = mstatus;
                let now = self.clock;
                if !*active {
                    // The whole subtree stops at once.
                    for j in self.model.subtree(i) {
                        let got = self
                            .registry
                            .authenticate(self.model.tokens[j].secret.as_bytes(), now)
                            .map(|_| ());
                        prop_assert_eq!(
                            got,
                            Err(Denied::Unauthorized),
                            "token {} still usable after deactivating its ancestor {}",
                            j,
                            i
                        );
                    }
                } else {
                    // Re-activation restores exactly those descendants whose
                    // whole chain is active (and unexpired), no more.
                    for j in self.model.subtree(i) {
                        let got = self
                            .registry
                            .authenticate(self.model.tokens[j].secret.as_bytes(), now)
                            .is_ok();
                        prop_assert_eq!(
                            got,
                            self.model.usable(j, now),
                            "token {} after re-activating {}",
                            j,
                            i
                        );
                    }
                }
                Ok(())
            }
            Op::Delete { target } => {
                let Some(i) = self.pick(target) else {
                    return Ok(());
                };
                let expected: Vec<usize> = if self.model.tokens[i].deleted {
                    Vec::new()
                } else {
                    self.model
                        .subtree(i)
                        .into_iter()
                        .filter(|&j| !self.model.tokens[j].deleted)
                        .collect()
                };
                let mut removed = self.registry.remove_subtree(&self.model.tokens[i].id);
                removed.sort();
                let mut want: Vec<String> = expected
                    .iter()
                    .map(|&j| self.model.tokens[j].id.clone())
                    .collect();
                want.sort();
                prop_assert_eq!(removed, want, "remove_subtree({}) removed the wrong set", i);
                for &j in &expected {
                    self.model.tokens[j].deleted = true;
                    prop_assert_eq!(self.entries[j].status(), Status::Deleted);
                }
                Ok(())
            }
            Op::Use {
                target,
                app,
                device,
                scope,
                skew,
            } => {
                let now = self.clock + skew;
                let dev = device.map(|d| DEVICES[d]);
                let target = target.as_ref().and_then(|ix| self.pick(ix));
                let app = match (app, target) {
                    (Some(a), _) => APPS[*a],
                    (None, Some(i)) => self.model.tokens[i].app,
                    (None, None) => APPS[0],
                };
                let Some(i) = target else {
                    let got = self.registry.authorize(
                        b"sl_never-issued-credential",
                        app,
                        dev,
                        SCOPES[*scope],
                        now,
                    );
                    prop_assert_eq!(got, Err(Denied::Unauthorized));
                    return Ok(());
                };
                let got = self.registry.authorize(
                    self.model.tokens[i].secret.as_bytes(),
                    app,
                    dev,
                    SCOPES[*scope],
                    now,
                );
                let want = self.model.expected_use(i, app, *device, *scope, now);
                self.uses[match want {
                    Ok(()) => 0,
                    Err(Denied::Forbidden) => 1,
                    Err(Denied::Unauthorized) => 2,
                }] += 1;
                prop_assert_eq!(
                    got,
                    want,
                    "authorize(token {}, {}, {:?}, {:?}, now+{})",
                    i,
                    app,
                    dev,
                    SCOPES[*scope],
                    now - START_MS
                );
                if got.is_ok() {
                    // The headline property, stated on its own: whatever a
                    // token may do, every ancestor may do, and every
                    // ancestor is alive.
                    for a in self.model.chain(i) {
                        prop_assert!(
                            self.model.own_ok(a, now),
                            "token {} allowed while ancestor {} is unusable",
                            i,
                            a
                        );
                        prop_assert!(
                            self.model.permits(a, app, *device, *scope),
                            "token {} did more than its ancestor {} allows",
                            i,
                            a
                        );
                    }
                }
                // The root may do everything, always.
                prop_assert_eq!(
                    self.registry
                        .authorize(ROOT_SECRET.as_bytes(), app, dev, SCOPES[*scope], now),
                    Ok(())
                );
                Ok(())
            }
            Op::Send { target, recent, n } => {
                let len = self.model.tokens.len();
                let i = match len {
                    0 => return Ok(()),
                    _ if *recent => len - 1 - target.index(len.min(4)),
                    _ => target.index(len),
                };
                // The listeners charge only a usable token's messages.
                if !self.model.usable(i, self.clock) {
                    return Ok(());
                }
                let now = (self.clock - START_MS) as u64 * 1_000_000;
                let own_room = self.model.tokens[i].bucket.is_none_or(|mut b| {
                    b.refill(now);
                    b.has(*n)
                });
                let want = self.model.send(i, *n, now);
                let got = self.entries[i].admit(*n, now);
                prop_assert_eq!(
                    got.is_ok(),
                    want,
                    "admit({}) by token {} at {} ns",
                    n,
                    i,
                    now
                );
                if let Err(wait) = got {
                    prop_assert!(wait > std::time::Duration::ZERO);
                    self.sends[if own_room { 2 } else { 1 }] += 1;
                    return Ok(());
                }
                self.sends[0] += 1;
                // The headline property, stated on its own: over every
                // window ending now, no limited token's subtree has sent
                // more than its burst plus its rate for the window.
                let chain = self.model.chain(i);
                self.model.sent.push(Sent {
                    at: now,
                    n: *n,
                    chain: chain.clone(),
                });
                for &a in &chain {
                    let Some(b) = self.model.tokens[a].bucket else {
                        continue;
                    };
                    let sub: Vec<&Sent> = self
                        .model
                        .sent
                        .iter()
                        .filter(|s| s.chain.contains(&a))
                        .collect();
                    for (k, first) in sub.iter().enumerate() {
                        let total: u64 = sub[k..].iter().map(|s| u64::from(s.n)).sum();
                        prop_assert!(
                            total * b.cost <= b.cap + (now - first.at),
                            "the subtree of {} sent {} messages in {} ns",
                            a,
                            total,
                            now - first.at
                        );
                    }
                }
                Ok(())
            }
            Op::AdvanceClock { ms } => {
                self.clock += ms;
                Ok(())
            }
        }
    }

    fn mint(
        &mut self,
        minter: Option<usize>,
        app: &'static str,
        req: MRequest,
        active: bool,
    ) -> Result<(), TestCaseError> {
        let minter_entry = match minter {
            None => self.root.clone(),
            Some(m) => self.entries[m].clone(),
        };
        let requested = Requested {
            scopes: to_scopes(req.scopes),
            devices: req.devices.map(to_devices),
            expires_at: req.expires_at,
            rate_limit: req.rate.map(to_rate),
        };
        let got = attenuate(&minter_entry, app, requested);
        let want = self.model.expected_mint(minter, app, &req);
        let granted = match (got, want) {
            (Err(e), Err(broken)) => {
                prop_assert!(
                    broken.contains(&e),
                    "refused with {:?}, but the request broke {:?}",
                    e,
                    broken
                );
                self.refusals += 1;
                return Ok(());
            }
            (Ok(g), Err(broken)) => {
                return Err(TestCaseError::fail(format!(
                    "minter {minter:?} granted {g:?} although the request {req:?} for {app} \
                     broke {broken:?}"
                )))
            }
            (Err(e), Ok(g)) => {
                return Err(TestCaseError::fail(format!(
                    "minter {minter:?} refused ({e:?}) {req:?} for {app}, model grants {g:?}"
                )))
            }
            (Ok(g), Ok(want)) => {
                let have = from_granted(&g)?;
                prop_assert_eq!(have, want, "grant differs from the model's");
                g
            }
        };
        let grant = from_granted(&granted)?;

        // Within EVERY ancestor, not only the minter.
        if let Some(m) = minter {
            for a in self.model.chain(m) {
                let at = &self.model.tokens[a];
                prop_assert_eq!(at.app, app, "child of {} crosses applications", a);
                prop_assert!(
                    at.grant.scopes_imply(grant.scopes),
                    "child scopes {:#b} not implied by ancestor {}'s {:#b}",
                    grant.scopes,
                    a,
                    at.grant.scopes
                );
                prop_assert!(
                    grant.devices.inside(at.grant.devices),
                    "child devices {:?} outside ancestor {}'s {:?}",
                    grant.devices,
                    a,
                    at.grant.devices
                );
                if let Some(pe) = at.grant.expires_at {
                    prop_assert!(
                        grant.expires_at.is_some_and(|c| c <= pe),
                        "child expiry {:?} outlives ancestor {}'s {}",
                        grant.expires_at,
                        a,
                        pe
                    );
                }
                if let Some((ps, pb)) = at.grant.rate {
                    prop_assert!(
                        grant.rate.is_some_and(|(cs, cb)| cs <= ps && cb <= pb),
                        "child rate {:?} above ancestor {}'s {:?}",
                        grant.rate,
                        a,
                        at.grant.rate
                    );
                }
            }
        }

        self.next_id += 1;
        let id = format!("tok{:04}", self.next_id);
        let secret = format!("sl_props-secret-{:04}", self.next_id);
        let status = if active {
            Status::Active
        } else {
            Status::Inactive
        };
        let inserted = self.registry.insert(TokenRecord {
            id: id.clone(),
            app: app.to_string(),
            name: id.clone(),
            scopes: granted.scopes,
            devices: granted.devices.clone(),
            expires_at: granted.expires_at,
            status,
            // As `TokenService::create`: created inactive, by its minter.
            deactivated_by: (!active).then(|| Revoker::of(&minter_entry)),
            parent_id: minter.map(|m| self.model.tokens[m].id.clone()),
            created_at: self.clock,
            last_used: None,
            rate_limit: granted.rate_limit,
            hash: TokenHash::of(secret.as_bytes()),
        });
        if let Some(m) = minter.filter(|&m| self.model.tokens[m].deleted) {
            // A minter deleted under the caller's feet: the registry must
            // not accept an orphan.
            prop_assert_eq!(
                inserted.map(|_| ()),
                Err(RegistryError::MissingParent(
                    self.model.tokens[m].id.clone()
                ))
            );
            return Ok(());
        }
        let entry = inserted.map_err(|e| TestCaseError::fail(e.to_string()))?;
        self.entries.push(entry);
        self.model.tokens.push(MToken {
            id,
            secret,
            app,
            grant,
            status: if active {
                MStatus::Active
            } else {
                MStatus::Inactive
            },
            deactivated_by: (!active).then_some(minter.map_or(MBy::Root, MBy::Token)),
            parent: minter,
            deleted: false,
            bucket: grant.rate.map(MBucket::new),
        });
        Ok(())
    }

    /// After every op: the registry and the model agree on every token.
    fn check_all(&self) -> Result<(), TestCaseError> {
        let now = self.clock;
        let live = self.model.tokens.iter().filter(|t| !t.deleted).count();
        prop_assert_eq!(self.registry.len(), live);
        for (i, t) in self.model.tokens.iter().enumerate() {
            let auth = self.registry.authenticate(t.secret.as_bytes(), now);
            prop_assert_eq!(
                auth.is_ok(),
                self.model.usable(i, now),
                "usability of token {} (chain {:?})",
                i,
                self.model.chain(i)
            );
            if let Err(e) = auth {
                prop_assert_eq!(e, Denied::Unauthorized);
            }
            if t.deleted {
                prop_assert!(self.registry.entry(&t.id).is_none(), "{} resident", i);
                prop_assert!(self.registry.record(&t.id).is_none());
                prop_assert_eq!(self.entries[i].status(), Status::Deleted);
                prop_assert!(!self.entries[i].usable(now));
                continue;
            }
            let e = self
                .registry
                .entry(&t.id)
                .ok_or_else(|| TestCaseError::fail(format!("live token {i} missing")))?;
            prop_assert!(Arc::ptr_eq(&e, &self.entries[i]));
            prop_assert_eq!(&*e.app, t.app);
            prop_assert_eq!(from_entry(&e)?, t.grant);
            let want_status = match t.status {
                MStatus::Active => Status::Active,
                MStatus::Inactive => Status::Inactive,
            };
            prop_assert_eq!(e.status(), want_status);
            let record = self
                .registry
                .record(&t.id)
                .ok_or_else(|| TestCaseError::fail(format!("live token {i} has no record")))?;
            prop_assert_eq!(record.status, want_status);
            prop_assert_eq!(
                record.deactivated_by,
                t.deactivated_by.map(|b| self.revoker(b)),
                "deactivator of {}",
                i
            );
            prop_assert_eq!(e.chain_expiry(), self.model.chain_expiry(i));
            prop_assert_eq!(
                e.parent.as_ref().map(|p| p.id.to_string()),
                t.parent.map(|p| self.model.tokens[p].id.clone())
            );
            let mut sub = self.registry.subtree(&t.id);
            sub.sort();
            let mut want: Vec<String> = self
                .model
                .subtree(i)
                .into_iter()
                .filter(|&j| !self.model.tokens[j].deleted)
                .map(|j| self.model.tokens[j].id.clone())
                .collect();
            want.sort();
            prop_assert_eq!(sub, want, "subtree of {}", i);
        }
        Ok(())
    }
}

fn run(ops: &[Op]) -> Result<World, TestCaseError> {
    let mut w = World::new();
    for (n, op) in ops.iter().enumerate() {
        w.apply(op)
            .map_err(|e| TestCaseError::fail(format!("op #{n} {op:?}: {e}")))?;
        w.check_all()
            .map_err(|e| TestCaseError::fail(format!("after op #{n} {op:?}: {e}")))?;
    }
    Ok(w)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        // Shrunk failures are printed; do not write regression files into
        // the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn no_token_does_more_than_any_ancestor(ops in prop::collection::vec(op_strategy(), 1..60)) {
        run(&ops)?;
    }
}

/// The generator must actually build trees: deep chains, refusals and
/// deletions all show up across a fixed-seed batch of sequences.
#[test]
fn generator_builds_deep_trees() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, TestRng, TestRunner};

    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha),
    );
    let strategy = prop::collection::vec(op_strategy(), 40..60);
    let (mut max_depth, mut refusals, mut deleted, mut minted) = (0, 0, 0, 0);
    let (mut uses, mut sends, mut status_refusals) = ([0; 3], [0; 3], 0);
    for _ in 0..64 {
        let ops = strategy.new_tree(&mut runner).unwrap().current();
        let w = run(&ops).unwrap();
        minted += w.model.tokens.len();
        refusals += w.refusals;
        for (u, n) in uses.iter_mut().zip(w.uses) {
            *u += n;
        }
        for (u, n) in sends.iter_mut().zip(w.sends) {
            *u += n;
        }
        status_refusals += w.status_refusals;
        deleted += w.model.tokens.iter().filter(|t| t.deleted).count();
        for i in 0..w.model.tokens.len() {
            max_depth = max_depth.max(w.model.chain(i).len());
        }
    }
    assert!(max_depth >= 4, "deepest chain {max_depth}");
    assert!(minted >= 200, "minted {minted}");
    assert!(refusals >= 50, "refusals {refusals}");
    assert!(deleted >= 20, "deleted {deleted}");
    assert!(
        uses.iter().all(|&n| n >= 50),
        "use outcomes (allowed, forbidden, unauthorized) {uses:?}"
    );
    assert!(
        sends[0] >= 100 && sends[1] >= 15 && sends[2] >= 10,
        "send outcomes (admitted, own limit, only an ancestor's limit) {sends:?}"
    );
    assert!(
        status_refusals >= 10,
        "authority refusals {status_refusals}"
    );
}
