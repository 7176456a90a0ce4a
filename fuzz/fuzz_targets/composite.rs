//! `composite::entries` / `composite::merge` on arbitrary bytes: they read
//! RocksDB merge operands and folded values, which a corrupt or foreign
//! database could fill with anything.
//!
//! Input: byte 0 = number of parts (mod 4, +1); the rest is cut into that
//! many parts at positions taken from bytes 1..=3.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::composite::{encode_entry, entries, merge, Entry};

fn reencode(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries(v) {
        encode_entry(&mut out, e.name, e.time_ms, e.value);
    }
    out
}

/// A folded value: entries sorted by name, names unique, and every byte
/// part of a well-formed entry.
fn check_folded(v: &[u8]) {
    let es: Vec<Entry<'_>> = entries(v).collect();
    for w in es.windows(2) {
        assert!(w[0].name < w[1].name, "merge output not sorted/unique");
    }
    assert_eq!(reencode(v), v, "merge output does not decode losslessly");
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let n = (data[0] % 4) as usize + 1;
    let cuts = data.get(1..n).unwrap_or(&[]);
    let body = data.get(n..).unwrap_or(&[]);
    let mut parts: Vec<&[u8]> = Vec::with_capacity(n);
    let mut rest = body;
    for &c in cuts {
        let at = if rest.is_empty() { 0 } else { c as usize % (rest.len() + 1) };
        let (a, b) = rest.split_at(at);
        parts.push(a);
        rest = b;
    }
    parts.push(rest);

    // Decoding: never panics, every entry lies inside its part, and it
    // stops at the first malformed entry (so re-encoding gives a prefix).
    for p in &parts {
        let enc = reencode(p);
        assert!(p.starts_with(&enc), "entries() did not decode a prefix");
    }

    let m = merge(parts.iter().copied());
    check_folded(&m);
    // Folding a folded value alone, or again with itself, changes nothing.
    assert_eq!(merge([m.as_slice()]), m, "merge not idempotent");
    assert_eq!(merge([m.as_slice(), m.as_slice()]), m, "merge(m, m) != m");
    // Adding the fold after its parts changes nothing either.
    let mut again: Vec<&[u8]> = parts.clone();
    again.push(&m);
    assert_eq!(merge(again), m, "merge(parts ++ [m]) != m");
    // Associativity in write order: fold the first part with the fold of
    // the rest, and the fold of all but the last with the last.
    if parts.len() >= 2 {
        let tail = merge(parts[1..].iter().copied());
        assert_eq!(merge([parts[0], tail.as_slice()]), m, "right fold differs");
        let head = merge(parts[..parts.len() - 1].iter().copied());
        assert_eq!(
            merge([head.as_slice(), parts[parts.len() - 1]]),
            m,
            "left fold differs"
        );
    }
});
