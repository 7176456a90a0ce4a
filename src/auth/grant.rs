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
    Only(DeviceList),
}

impl Devices {
    pub fn only<I: IntoIterator<Item = String>>(ids: I) -> Devices {
        Devices::Only(DeviceList::new(ids))
    }

    pub fn contains(&self, device: &str) -> bool {
        match self {
            Devices::All => true,
            Devices::Only(list) => list.contains(device),
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
            Devices::Only(l) => l.iter().map(str::to_string).collect(),
        }
    }
}

/// Device ids, sorted and de-duplicated, in one allocation: the count, the
/// end offset of each id, then the ids' bytes back to back (all u32,
/// little-endian). The hot path's device check is a binary search that
/// touches this one block (a cache line or two for a few devices) instead
/// of one separately allocated string per probe.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceList(Box<[u8]>);

impl DeviceList {
    fn new<I: IntoIterator<Item = String>>(ids: I) -> DeviceList {
        let mut v: Vec<String> = ids.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        let bytes: usize = v.iter().map(String::len).sum();
        let mut buf = Vec::with_capacity(4 + 4 * v.len() + bytes);
        buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
        let mut end = 0u32;
        for id in &v {
            // Ids are at most 64 bytes and lists at most
            // `tokens.max_devices_per_token` long: far below u32::MAX.
            end = end.saturating_add(id.len() as u32);
            buf.extend_from_slice(&end.to_le_bytes());
        }
        for id in &v {
            buf.extend_from_slice(id.as_bytes());
        }
        DeviceList(buf.into_boxed_slice())
    }

    pub fn len(&self) -> usize {
        word(&self.0, 0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, device: &str) -> bool {
        list_contains(&self.0, device)
    }

    /// The encoding itself, which the hot path's token table copies when
    /// it is short (see `auth::hot`).
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The ids in order. Each was a `String` when the list was built, so
    /// the bytes are UTF-8.
    pub fn iter(&self) -> impl Iterator<Item = &str> + '_ {
        (0..self.len()).map(|i| std::str::from_utf8(id(&self.0, i)).unwrap_or_default())
    }
}

/// Word `i` of a `DeviceList` encoding (0 past its end).
fn word(list: &[u8], i: usize) -> usize {
    let at = 4 * i;
    list.get(at..at + 4)
        .map_or(0, |w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]) as usize)
}

/// The bytes of id `i` (`i < len`) of a `DeviceList` encoding.
fn id(list: &[u8], i: usize) -> &[u8] {
    let base = 4 + 4 * word(list, 0);
    let start = if i == 0 { 0 } else { word(list, i) };
    let end = word(list, i + 1);
    list.get(base + start..base + end).unwrap_or_default()
}

/// Binary search of a `DeviceList` encoding, wherever its bytes are kept
/// (the list itself, or a copy in the token table's slot).
pub(crate) fn list_contains(list: &[u8], device: &str) -> bool {
    let want = device.as_bytes();
    let (mut lo, mut hi) = (0, word(list, 0));
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match id(list, mid).cmp(want) {
            std::cmp::Ordering::Equal => return true,
            std::cmp::Ordering::Less => lo = mid + 1,
            std::cmp::Ordering::Greater => hi = mid,
        }
    }
    false
}

impl std::fmt::Debug for DeviceList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// `["*"]` or a non-empty list of device ids.
impl Serialize for Devices {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Devices::All => ["*"].serialize(s),
            Devices::Only(l) => s.collect_seq(l.iter()),
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
        assert_eq!(format!("{two:?}"), r#"Only(["a", "b"])"#);
    }

    #[test]
    fn device_list_membership_is_exact() {
        let ids: Vec<String> = (0..300).map(|i| format!("dev-{}", i * 7)).collect();
        let d = Devices::only(ids.iter().rev().cloned());
        assert_eq!(d.listed(), Some(300));
        for i in 0..2100 {
            let id = format!("dev-{i}");
            assert_eq!(d.contains(&id), i % 7 == 0, "{id}");
        }
        // Prefixes, extensions and the empty string are other ids.
        for other in ["", "dev-", "dev-7x", "dev-70 ", "dev-0070", "d"] {
            assert!(!d.contains(other), "{other:?}");
        }
        let one = Devices::only(["x".to_string()]);
        assert!(one.contains("x") && !one.contains("y") && !one.contains("xx"));
        assert_eq!(d.to_list().len(), 300);
        assert_eq!(Devices::only(ids.clone()), d, "order does not matter");
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
