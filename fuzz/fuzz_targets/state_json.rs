//! The state message parser/validator shared by HTTP and MQTT:
//! `state::parse` with both shapes, plus invariants on success.
//!
//! Input: the body as sent (HTTP request body or MQTT payload).

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use sluice::composite::{encode_entry, entries, merge};
use sluice::state::{parse, ParsedStates, Shape, MAX_ATTR_NAME_CHARS, MAX_STATES_PER_REQUEST};
use sluice::timefmt::MAX_TIME_MS;

const NOW: i64 = 1_700_000_000_000;

fn check(body: &[u8], p: &ParsedStates, shape: Shape) {
    assert!(!p.states.is_empty());
    assert!(p.states.len() <= MAX_STATES_PER_REQUEST);
    if shape == Shape::One {
        assert_eq!(p.states.len(), 1);
    }
    let mut prev_end = 0usize;
    for s in &p.states {
        let (a, b) = (s.data.start as usize, s.data.end as usize);
        assert!(a < b && b <= body.len(), "span {a}..{b} outside body of {}", body.len());
        assert!(a >= prev_end, "spans overlap or are out of order");
        prev_end = b;
        let text = &body[a..b];
        assert_eq!(text[0], b'{');
        // Grammar only: `serde_json::Value` would also refuse numbers
        // beyond f64 (e.g. 1e999), which are valid JSON and stored as sent
        // (regressions/state_json-huge-exponent).
        let v: std::collections::BTreeMap<String, &RawValue> = serde_json::from_slice(text)
            .unwrap_or_else(|e| panic!("span is not a JSON object ({e}): {:?}", String::from_utf8_lossy(text)));
        assert!(!v.is_empty());
        assert!(s.time_ms <= MAX_TIME_MS as u64 || s.time_ms == NOW as u64);
    }

    // The composite operand decodes losslessly, sorted with unique names.
    let mut re = Vec::new();
    let mut prev: Option<&[u8]> = None;
    for e in entries(&p.composite) {
        if let Some(pn) = prev {
            assert!(pn < e.name, "composite names not sorted/unique");
        }
        prev = Some(e.name);
        let name = std::str::from_utf8(e.name).expect("attribute name not UTF-8");
        let n = name.chars().count();
        assert!((1..=MAX_ATTR_NAME_CHARS).contains(&n));
        assert!(!name.chars().any(char::is_control));
        let value = std::str::from_utf8(e.value).expect("value not UTF-8");
        assert!(
            serde_json::from_str::<&RawValue>(value).is_ok(),
            "composite value is not JSON: {value:?}"
        );
        assert!(p.states.iter().any(|s| s.time_ms == e.time_ms));
        encode_entry(&mut re, e.name, e.time_ms, e.value);
    }
    assert_eq!(re, p.composite, "composite operand does not decode losslessly");
    assert!(!p.composite.is_empty());

    // Merging is idempotent.
    let c = p.composite.as_slice();
    assert_eq!(merge([c]), c);
    assert_eq!(merge([c, c]), c);

    // What GET …/compositeState renders from it is valid JSON.
    let mut out = vec![b'{'];
    for (i, e) in entries(c).enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut out, &String::from_utf8_lossy(e.name)).unwrap();
        out.extend_from_slice(b":{\"value\":");
        out.extend_from_slice(e.value);
        out.extend_from_slice(b",\"time\":");
        out.extend_from_slice(e.time_ms.to_string().as_bytes());
        out.push(b'}');
    }
    out.push(b'}');
    assert!(
        serde_json::from_slice::<&RawValue>(&out).is_ok(),
        "rendered composite state is not JSON"
    );
}

fuzz_target!(|data: &[u8]| {
    let one = parse(data, Shape::One, NOW);
    let many = parse(data, Shape::OneOrArray, NOW);
    if let Ok(p) = &one {
        check(data, p, Shape::One);
        // A single state is accepted by HTTP exactly as by MQTT.
        let m = many.as_ref().expect("accepted as One but not as OneOrArray");
        assert_eq!(m.states, p.states);
        assert_eq!(m.composite, p.composite);
    }
    if let Ok(p) = &many {
        check(data, p, Shape::OneOrArray);
    }
    // A body that is a valid message is valid JSON.
    if one.is_ok() || many.is_ok() {
        assert!(serde_json::from_slice::<&RawValue>(data).is_ok());
    }
});
