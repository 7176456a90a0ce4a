//! Scopes as a bit set, so checking one on the hot path is a mask test.

use std::fmt;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Scopes(u8);

/// One scope, as a single bit.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum Scope {
    AllApplication = 1,
    SendState = 2,
    GetState = 4,
    TokenCreate = 8,
    TokenRead = 16,
    TokenRevoke = 32,
}

const ALL: [(Scope, &str); 6] = [
    (Scope::AllApplication, "all.Application"),
    (Scope::SendState, "device.sendState"),
    (Scope::GetState, "device.getState"),
    (Scope::TokenCreate, "token.create"),
    (Scope::TokenRead, "token.read"),
    (Scope::TokenRevoke, "token.revoke"),
];

impl Scope {
    pub fn parse(s: &str) -> Option<Scope> {
        ALL.iter().find(|(_, n)| *n == s).map(|(sc, _)| *sc)
    }

    pub fn name(self) -> &'static str {
        ALL.iter()
            .find(|(sc, _)| *sc == self)
            .map(|(_, n)| *n)
            .unwrap_or("?")
    }
}

impl Scopes {
    pub const EMPTY: Scopes = Scopes(0);

    pub fn of(list: &[Scope]) -> Scopes {
        Scopes(list.iter().fold(0, |acc, s| acc | *s as u8))
    }

    pub fn contains(self, s: Scope) -> bool {
        self.0 & s as u8 != 0
    }

    /// Whether these scopes permit an action that needs `s`:
    /// `all.Application` permits everything in the application.
    pub fn allows(self, s: Scope) -> bool {
        self.0 & (s as u8 | Scope::AllApplication as u8) != 0
    }

    /// Whether every scope in `child` is implied by one in `self`.
    pub fn implies(self, child: Scopes) -> bool {
        self.contains(Scope::AllApplication) || child.0 & !self.0 == 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The set as its bits, for the token table's slot (see `auth::hot`).
    pub(crate) fn bits(self) -> u8 {
        self.0
    }

    pub(crate) fn from_bits(bits: u8) -> Scopes {
        Scopes(bits)
    }

    pub fn iter(self) -> impl Iterator<Item = Scope> {
        ALL.into_iter()
            .map(|(s, _)| s)
            .filter(move |s| self.contains(*s))
    }

    pub fn names(self) -> Vec<&'static str> {
        self.iter().map(Scope::name).collect()
    }
}

impl fmt::Debug for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.iter().map(Scope::name))
            .finish()
    }
}

/// A list of scope names, in the order of the table in the contract.
impl Serialize for Scopes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter().map(Scope::name))
    }
}

/// A non-empty list of known scope names (a token without a scope could do
/// nothing, and is always a mistake).
impl<'de> Deserialize<'de> for Scopes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Scopes, D::Error> {
        let names = Vec::<String>::deserialize(d)?;
        if names.is_empty() {
            return Err(D::Error::custom("`scope` must list at least one scope"));
        }
        let mut list = Vec::with_capacity(names.len());
        for n in &names {
            list.push(Scope::parse(n).ok_or_else(|| {
                D::Error::custom(format_args!(
                    "unknown scope {:?}",
                    n.chars().take(64).collect::<String>()
                ))
            })?);
        }
        Ok(Scopes::of(&list))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn implication() {
        let all = Scopes::of(&[Scope::AllApplication]);
        let send = Scopes::of(&[Scope::SendState]);
        let mint = Scopes::of(&[Scope::SendState, Scope::TokenCreate]);
        assert!(all.implies(mint));
        assert!(all.implies(all));
        assert!(mint.implies(send));
        assert!(!send.implies(mint));
        assert!(!mint.implies(all));
        assert!(all.allows(Scope::TokenRevoke));
        assert!(!send.allows(Scope::GetState));
        assert_eq!(Scope::parse("device.getState"), Some(Scope::GetState));
        assert_eq!(Scope::parse("device.*"), None);
        assert_eq!(mint.names(), vec!["device.sendState", "token.create"]);
    }

    #[test]
    fn json_form() {
        let s: Scopes = serde_json::from_str(r#"["token.create","device.sendState"]"#).unwrap();
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"["device.sendState","token.create"]"#
        );
        for (bad, want) in [("[]", "at least one"), (r#"["root"]"#, "unknown scope")] {
            let e = serde_json::from_str::<Scopes>(bad).unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }
}
