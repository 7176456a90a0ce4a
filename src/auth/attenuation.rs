//! The rule no peer has: a child token never exceeds the token that mints it.

use super::grant::{Devices, RateLimit};
use super::scope::Scopes;
use super::token::TokenEntry;

/// What a caller asked the new token to be. `None` means "not given".
#[derive(Clone, Debug)]
pub struct Requested {
    pub scopes: Scopes,
    pub devices: Option<Devices>,
    pub expires_at: Option<i64>,
    pub rate_limit: Option<RateLimit>,
}

/// The grant the child actually gets: the request with anything left open
/// filled in from the parent, never wider than it.
#[derive(Clone, Debug, PartialEq)]
pub struct Granted {
    pub scopes: Scopes,
    pub devices: Devices,
    pub expires_at: Option<i64>,
    pub rate_limit: Option<RateLimit>,
}

/// Which bound the request broke; shown to the caller as the 403 detail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Exceeds {
    #[error("the child must belong to the parent's application")]
    Application,
    #[error("every child scope must be implied by a parent scope")]
    Scope,
    #[error("the child's devices must be a subset of the parent's")]
    Devices,
    #[error("the child cannot expire later than the parent")]
    Expiration,
    #[error("the child's rate limit cannot exceed the parent's")]
    RateLimit,
}

/// Applies the attenuation rule. `minter` is the token making the request
/// (the root admin token mints without bounds). Devices, expiration and
/// rate limit left out are inherited from a bounded parent, so the child is
/// as wide as allowed but never wider.
pub fn attenuate(minter: &TokenEntry, app: &str, req: Requested) -> Result<Granted, Exceeds> {
    if minter.root {
        return Ok(Granted {
            scopes: req.scopes,
            devices: req.devices.unwrap_or(Devices::All),
            expires_at: req.expires_at,
            rate_limit: req.rate_limit,
        });
    }
    if *minter.app != *app {
        return Err(Exceeds::Application);
    }
    if !minter.scopes.implies(req.scopes) {
        return Err(Exceeds::Scope);
    }
    let devices = match req.devices {
        Some(d) if !d.within(&minter.devices) => return Err(Exceeds::Devices),
        Some(d) => d,
        None => minter.devices.clone(),
    };
    // The chain's earliest expiry bounds the child, not only the minter's
    // own, so the stored record states the real limit.
    let expires_at = match (req.expires_at, minter.chain_expiry()) {
        (Some(c), Some(p)) if c > p => return Err(Exceeds::Expiration),
        (Some(c), _) => Some(c),
        (None, p) => p,
    };
    let rate_limit = match (req.rate_limit, minter.rate_limit) {
        (Some(c), Some(p)) if !c.within(&p) => return Err(Exceeds::RateLimit),
        (Some(c), _) => Some(c),
        (None, p) => p,
    };
    Ok(Granted {
        scopes: req.scopes,
        devices,
        expires_at,
        rate_limit,
    })
}

#[cfg(test)]
mod tests {
    use super::super::scope::Scope;
    use super::super::status::Status;
    use super::*;
    use std::sync::Arc;

    fn minter(scopes: &[Scope], devices: Devices, exp: Option<i64>) -> Arc<TokenEntry> {
        Arc::new(TokenEntry::new(
            "m".into(),
            "app".into(),
            Scopes::of(scopes),
            devices,
            exp,
            Some(RateLimit {
                per_second: 10,
                burst: 20,
            }),
            None,
            Status::Active,
            0,
        ))
    }

    fn req(scopes: &[Scope]) -> Requested {
        Requested {
            scopes: Scopes::of(scopes),
            devices: None,
            expires_at: None,
            rate_limit: None,
        }
    }

    #[test]
    fn children_stay_within() {
        let m = minter(
            &[Scope::SendState, Scope::TokenCreate],
            Devices::only(["a".to_string(), "b".to_string()]),
            Some(1000),
        );
        let g = attenuate(&m, "app", req(&[Scope::SendState])).unwrap();
        assert_eq!(g.devices, m.devices);
        assert_eq!(g.expires_at, Some(1000));
        assert_eq!(g.rate_limit, m.rate_limit);

        assert_eq!(
            attenuate(&m, "other", req(&[Scope::SendState])),
            Err(Exceeds::Application)
        );
        assert_eq!(
            attenuate(&m, "app", req(&[Scope::GetState])),
            Err(Exceeds::Scope)
        );
        assert_eq!(
            attenuate(&m, "app", req(&[Scope::AllApplication])),
            Err(Exceeds::Scope)
        );
        let mut r = req(&[Scope::SendState]);
        r.devices = Some(Devices::All);
        assert_eq!(attenuate(&m, "app", r), Err(Exceeds::Devices));
        let mut r = req(&[Scope::SendState]);
        r.devices = Some(Devices::only(["c".to_string()]));
        assert_eq!(attenuate(&m, "app", r), Err(Exceeds::Devices));
        let mut r = req(&[Scope::SendState]);
        r.expires_at = Some(1001);
        assert_eq!(attenuate(&m, "app", r), Err(Exceeds::Expiration));
        let mut r = req(&[Scope::SendState]);
        r.rate_limit = Some(RateLimit {
            per_second: 11,
            burst: 1,
        });
        assert_eq!(attenuate(&m, "app", r), Err(Exceeds::RateLimit));
    }

    #[test]
    fn all_application_implies_everything_but_nothing_more() {
        let m = minter(&[Scope::AllApplication], Devices::All, None);
        let g = attenuate(&m, "app", req(&[Scope::AllApplication])).unwrap();
        assert_eq!(g.expires_at, None);
        assert_eq!(g.devices, Devices::All);
    }

    #[test]
    fn root_is_unbounded() {
        let root = TokenEntry::new_root();
        let mut r = req(&[Scope::AllApplication]);
        r.expires_at = Some(5);
        let g = attenuate(&root, "any", r).unwrap();
        assert_eq!(g.devices, Devices::All);
        assert_eq!(g.expires_at, Some(5));
    }
}
