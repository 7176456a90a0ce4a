//! Composite state: the last value and time of every attribute a device has
//! sent. It is kept as one RocksDB merge value per device, so ingest adds
//! one merge operand per device per batch and does not read the value
//! before writing it (the writer reads it only to learn the attribute
//! names of a device it has not seen recently, for the attribute limit);
//! RocksDB folds operands with [`merge`] on reads and compactions.
//!
//! Encoding (both operands and folded values): a sequence of entries
//! `name_len: u16 BE | name | time: u64 BE | value_len: u32 BE | value`,
//! sorted by name, names unique. Decoding never panics on corrupt bytes; it
//! stops at the first malformed entry.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::LazyLock;

/// The key of [`name_hash`]: random per process, so a client cannot craft
/// attribute names whose hashes collide.
static NAME_KEY: LazyLock<RandomState> = LazyLock::new(RandomState::new);

/// A keyed 64-bit hash (SipHash-1-3) of an attribute name: how the
/// attribute limit tells names apart without keeping them.
pub fn name_hash(name: &[u8]) -> u64 {
    NAME_KEY.hash_one(name)
}

/// Appends one entry.
pub fn encode_entry(out: &mut Vec<u8>, name: &[u8], time_ms: u64, value: &[u8]) {
    // Names are at most 255 chars (≤ 1020 bytes) and values at most a body,
    // so neither length can overflow its field; clamp rather than wrap if a
    // caller ever breaks that.
    let name = &name[..name.len().min(u16::MAX as usize)];
    let value = &value[..value.len().min(u32::MAX as usize)];
    out.extend_from_slice(&(name.len() as u16).to_be_bytes());
    out.extend_from_slice(name);
    out.extend_from_slice(&time_ms.to_be_bytes());
    out.extend_from_slice(&(value.len() as u32).to_be_bytes());
    out.extend_from_slice(value);
}

/// One decoded entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    pub name: &'a [u8],
    pub time_ms: u64,
    pub value: &'a [u8],
}

/// Iterates the entries of an encoded value.
pub fn entries(mut buf: &[u8]) -> impl Iterator<Item = Entry<'_>> {
    std::iter::from_fn(move || {
        let (name_len, rest) = split_u16(buf)?;
        let (name, rest) = split_at(rest, name_len as usize)?;
        let (time, rest) = split_u64(rest)?;
        let (value_len, rest) = split_u32(rest)?;
        let (value, rest) = split_at(rest, value_len as usize)?;
        buf = rest;
        Some(Entry {
            name,
            time_ms: time,
            value,
        })
    })
}

fn split_at(b: &[u8], n: usize) -> Option<(&[u8], &[u8])> {
    (b.len() >= n).then(|| b.split_at(n))
}

fn split_u16(b: &[u8]) -> Option<(u16, &[u8])> {
    let (h, t) = split_at(b, 2)?;
    Some((u16::from_be_bytes([h[0], h[1]]), t))
}

fn split_u32(b: &[u8]) -> Option<(u32, &[u8])> {
    let (h, t) = split_at(b, 4)?;
    Some((u32::from_be_bytes([h[0], h[1], h[2], h[3]]), t))
}

fn split_u64(b: &[u8]) -> Option<(u64, &[u8])> {
    let (h, t) = split_at(b, 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(h);
    Some((u64::from_be_bytes(a), t))
}

/// Folds encoded values in write order: per name the entry with the
/// greatest time wins, and on equal times the later write wins.
pub fn merge<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut latest: BTreeMap<&[u8], (u64, &[u8])> = BTreeMap::new();
    let mut size = 0usize;
    for part in parts {
        size += part.len();
        for e in entries(part) {
            match latest.get(e.name) {
                Some((t, _)) if *t > e.time_ms => {}
                _ => {
                    latest.insert(e.name, (e.time_ms, e.value));
                }
            }
        }
    }
    let mut out = Vec::with_capacity(size.min(1 << 20));
    for (name, (time, value)) in latest {
        encode_entry(&mut out, name, time, value);
    }
    out
}

/// Decoded entries as owned strings, for assertions in tests.
#[cfg(test)]
pub(crate) fn decoded(buf: &[u8]) -> Vec<(String, u64, String)> {
    entries(buf)
        .map(|e| {
            (
                String::from_utf8_lossy(e.name).into_owned(),
                e.time_ms,
                String::from_utf8_lossy(e.value).into_owned(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(items: &[(&str, u64, &str)]) -> Vec<u8> {
        let mut v = Vec::new();
        for (n, t, val) in items {
            encode_entry(&mut v, n.as_bytes(), *t, val.as_bytes());
        }
        v
    }

    #[test]
    fn latest_time_wins_and_ties_go_to_later_writes() {
        let a = enc(&[("temp", 10, "1"), ("hum", 10, "50")]);
        let b = enc(&[("temp", 5, "2"), ("hum", 10, "51"), ("x", 1, "true")]);
        let m = merge([a.as_slice(), b.as_slice()]);
        assert_eq!(
            decoded(&m),
            vec![
                ("hum".into(), 10, "51".into()),
                ("temp".into(), 10, "1".into()),
                ("x".into(), 1, "true".into())
            ]
        );
        // Folding is associative: merging the merge with nothing changes nothing.
        assert_eq!(merge([m.as_slice()]), m);
    }

    #[test]
    fn corrupt_bytes_do_not_panic() {
        let mut a = enc(&[("temp", 10, "1")]);
        a.truncate(a.len() - 1);
        assert_eq!(entries(&a).count(), 0);
        assert_eq!(merge([&[0xff, 0xff, 1][..], &a[..]]), Vec::<u8>::new());
    }
}
