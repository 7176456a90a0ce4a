//! The value types of a grant besides its scopes: the devices a token
//! covers and its rate limit. Their JSON forms are the same on the wire and
//! in the store, so they are defined here once, with the rules a valid value
//! follows.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ids::is_valid_id;

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

    /// How many devices are listed; `None` for every device.
    pub fn listed(&self) -> Option<usize> {
        match self {
            Devices::All => None,
            Devices::Only(l) => Some(l.len()),
        }
    }

    pub fn to_list(&self) -> Vec<String> {
        match self {
            Devices::All => vec!["*".to_string()],
            Devices::Only(l) => l.iter().map(|d| d.to_string()).collect(),
        }
    }
}

/// `["*"]` or a non-empty list of device ids.
impl Serialize for Devices {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Devices::All => ["*"].serialize(s),
            Devices::Only(l) => l.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Devices {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Devices, D::Error> {
        let list = Vec::<String>::deserialize(d)?;
        if list.is_empty() {
            return Err(D::Error::custom(
                "`devices` must not be empty (use [\"*\"] for every device)",
            ));
        }
        if list.len() == 1 && list[0] == "*" {
            return Ok(Devices::All);
        }
        if let Some(bad) = list.iter().find(|x| !is_valid_id(x)) {
            return Err(D::Error::custom(format_args!(
                "`devices`: {:?} is not a device id (1-64 of A-Z a-z 0-9 _ . -), and \"*\" must stand alone",
                bad.chars().take(64).collect::<String>()
            )));
        }
        Ok(Devices::only(list))
    }
}

/// Messages per second with a burst allowance; both at least 1.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", try_from = "RateLimitFields")]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
}

impl RateLimit {
    pub fn within(&self, parent: &RateLimit) -> bool {
        self.per_second <= parent.per_second && self.burst <= parent.burst
    }
}

/// The JSON fields of a [`RateLimit`], before the "at least 1" rule.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RateLimitFields {
    per_second: u32,
    burst: u32,
}

impl TryFrom<RateLimitFields> for RateLimit {
    type Error = &'static str;

    fn try_from(f: RateLimitFields) -> Result<RateLimit, &'static str> {
        if f.per_second == 0 || f.burst == 0 {
            return Err("`rateLimit.perSecond` and `rateLimit.burst` must be at least 1");
        }
        Ok(RateLimit {
            per_second: f.per_second,
            burst: f.burst,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(two.listed(), Some(2));
        assert_eq!(all.listed(), None);
    }

    #[test]
    fn devices_json() {
        let d: Devices = serde_json::from_str(r#"["b","a","b"]"#).unwrap();
        assert_eq!(serde_json::to_string(&d).unwrap(), r#"["a","b"]"#);
        let d: Devices = serde_json::from_str(r#"["*"]"#).unwrap();
        assert_eq!(
            (d.clone(), serde_json::to_string(&d).unwrap()),
            (Devices::All, r#"["*"]"#.into())
        );
        for (bad, want) in [
            ("[]", "must not be empty"),
            (r#"["*","a"]"#, "must stand alone"),
            (r#"["a/b"]"#, "not a device id"),
            (r#""a""#, "invalid type"),
        ] {
            let e = serde_json::from_str::<Devices>(bad)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn rate_limit_json() {
        let r: RateLimit = serde_json::from_str(r#"{"perSecond":5,"burst":10}"#).unwrap();
        assert_eq!(
            r,
            RateLimit {
                per_second: 5,
                burst: 10
            }
        );
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"perSecond":5,"burst":10}"#
        );
        for bad in [
            r#"{"perSecond":0,"burst":1}"#,
            r#"{"perSecond":1,"burst":0}"#,
            r#"{"perSecond":1}"#,
            r#"{"perSecond":1,"burst":1,"x":1}"#,
            r#"{"perSecond":-1,"burst":1}"#,
        ] {
            assert!(serde_json::from_str::<RateLimit>(bad).is_err(), "{bad}");
        }
    }
}
