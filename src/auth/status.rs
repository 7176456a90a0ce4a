//! A token's own status, who deactivated it, and who may change it back.
//!
//! Revocation has an authority: a token deactivated by an ancestor (or by
//! the root admin token) may be re-activated only by that same token or one
//! above it, never by a token lower in the chain. Otherwise the holder of a
//! child token with `token.revoke` could undo its parent's revocation of a
//! sibling subtree it was never meant to control again.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::token::TokenEntry;

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
    pub(crate) fn from_u8(v: u8) -> Status {
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

impl Serialize for Status {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// Only `"active"` and `"inactive"`: a deleted token has no record.
impl<'de> Deserialize<'de> for Status {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Status, D::Error> {
        let s = String::deserialize(d)?;
        match &*s {
            "active" => Ok(Status::Active),
            "inactive" => Ok(Status::Inactive),
            other => Err(D::Error::custom(format_args!(
                "`status` must be \"active\" or \"inactive\", not {:?}",
                other.chars().take(64).collect::<String>()
            ))),
        }
    }
}

/// Who deactivated a token. In JSON: the token's id, or `"root"` (token
/// ids are 24 hex digits, so the two never collide).
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Revoker {
    Root,
    Token(Box<str>),
}

impl Revoker {
    pub fn of(caller: &TokenEntry) -> Revoker {
        if caller.root {
            Revoker::Root
        } else {
            Revoker::Token(caller.id.clone())
        }
    }
}

impl Serialize for Revoker {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Revoker::Root => s.serialize_str("root"),
            Revoker::Token(id) => s.serialize_str(id),
        }
    }
}

impl<'de> Deserialize<'de> for Revoker {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Revoker, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match &*s {
            "root" => Revoker::Root,
            id => Revoker::Token(id.into()),
        })
    }
}

/// Why a status change was refused; shown to the caller as the 403 detail.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    #[error("the token was deactivated by the root admin token; only the root admin token can re-activate it")]
    DeactivatedByRoot,
    #[error("the token was deactivated by token {0}, which is above yours; only that token or one above it can re-activate it")]
    DeactivatedAbove(Box<str>),
}

/// The status-change rule. `caller` (already allowed to see the token: the
/// root, or one of its ancestors) sets a token's own status to `want`; the
/// token is now `current`, deactivated by `by`, whose entry `deactivator`
/// is (`None` for the root, or a token that no longer exists).
///
/// Returns who the token is deactivated by afterwards: the caller when it
/// deactivates an active token; when it deactivates an inactive one, the
/// higher of the two, so a lower token re-deactivating cannot take over an
/// ancestor's revocation; nobody once active again.
pub fn status_change(
    caller: &TokenEntry,
    current: Status,
    by: Option<&Revoker>,
    deactivator: Option<&TokenEntry>,
    want: Status,
) -> Result<Option<Revoker>, AuthorityError> {
    // Whether the caller is the deactivating token or above it. Every
    // deactivator is the root or an ancestor of the token, and so is the
    // caller: the two lie on one chain and "above" is well defined.
    let at_or_above = || -> Result<(), AuthorityError> {
        if caller.root {
            return Ok(());
        }
        match (by, deactivator) {
            (Some(Revoker::Token(id)), Some(d))
                if *d.id == **id && (*d.id == *caller.id || d.descends_from(caller)) =>
            {
                Ok(())
            }
            (Some(Revoker::Token(id)), _) => Err(AuthorityError::DeactivatedAbove(id.clone())),
            // An inactive token with no known deactivator is treated as
            // deactivated by the root: the safe reading of old records.
            (Some(Revoker::Root) | None, _) => Err(AuthorityError::DeactivatedByRoot),
        }
    };
    match (want, current) {
        (Status::Active, Status::Active) => Ok(None),
        (Status::Active, _) => at_or_above().map(|()| None),
        (_, Status::Active) => Ok(Some(Revoker::of(caller))),
        (_, _) => Ok(match at_or_above() {
            Ok(()) => Some(Revoker::of(caller)),
            Err(_) => by.cloned().or(Some(Revoker::Root)),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::grant::Devices;
    use super::super::scope::{Scope, Scopes};
    use super::*;

    fn tok(id: &str, parent: Option<Arc<TokenEntry>>) -> Arc<TokenEntry> {
        Arc::new(TokenEntry::new(
            id.into(),
            "app".into(),
            Scopes::of(&[Scope::TokenRevoke, Scope::TokenCreate]),
            Devices::All,
            None,
            None,
            parent,
            Status::Active,
            0,
        ))
    }

    #[test]
    fn only_the_deactivator_or_above_reactivates() {
        let root = TokenEntry::new_root();
        let a = tok("a", None);
        let b = tok("b", Some(a.clone()));
        let c = tok("c", Some(b.clone()));
        let by_a = Revoker::Token("a".into());
        let by_b = Revoker::Token("b".into());

        // a deactivates c: b (below a) may not undo it; a and root may.
        assert_eq!(
            status_change(&a, Status::Active, None, None, Status::Inactive),
            Ok(Some(by_a.clone()))
        );
        let (cur, by, d) = (Status::Inactive, Some(&by_a), Some(&*a));
        assert_eq!(
            status_change(&b, cur, by, d, Status::Active),
            Err(AuthorityError::DeactivatedAbove("a".into()))
        );
        assert_eq!(status_change(&a, cur, by, d, Status::Active), Ok(None));
        assert_eq!(status_change(&root, cur, by, d, Status::Active), Ok(None));
        // b re-deactivating does not take the revocation over; root does.
        assert_eq!(
            status_change(&b, cur, by, d, Status::Inactive),
            Ok(Some(by_a.clone()))
        );
        assert_eq!(
            status_change(&root, cur, by, d, Status::Inactive),
            Ok(Some(Revoker::Root))
        );

        // b deactivates c: a (above b) may re-activate it, b itself too.
        let (by, d) = (Some(&by_b), Some(&*b));
        assert_eq!(status_change(&a, cur, by, d, Status::Active), Ok(None));
        assert_eq!(status_change(&b, cur, by, d, Status::Active), Ok(None));
        assert_eq!(
            status_change(&a, cur, by, d, Status::Inactive),
            Ok(Some(by_a.clone()))
        );
        let _ = c;

        // Root's deactivation binds everyone but root; so does an unknown one.
        for by in [Some(&Revoker::Root), None] {
            assert_eq!(
                status_change(&a, cur, by, None, Status::Active),
                Err(AuthorityError::DeactivatedByRoot)
            );
            assert_eq!(
                status_change(&root, cur, by, None, Status::Active),
                Ok(None)
            );
        }
        // A deactivator that no longer exists: only the root.
        assert_eq!(
            status_change(&a, cur, Some(&by_b), None, Status::Active),
            Err(AuthorityError::DeactivatedAbove("b".into()))
        );
        // Active stays active with nobody recorded.
        assert_eq!(
            status_change(&b, Status::Active, None, None, Status::Active),
            Ok(None)
        );
    }

    #[test]
    fn json_forms() {
        assert_eq!(
            serde_json::to_string(&Status::Inactive).unwrap(),
            "\"inactive\""
        );
        assert_eq!(
            serde_json::from_str::<Status>("\"active\"").unwrap(),
            Status::Active
        );
        let e = serde_json::from_str::<Status>("\"deleted\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`status` must be"), "{e}");
        assert_eq!(serde_json::to_string(&Revoker::Root).unwrap(), "\"root\"");
        assert_eq!(
            serde_json::from_str::<Revoker>("\"0123\"").unwrap(),
            Revoker::Token("0123".into())
        );
    }
}
