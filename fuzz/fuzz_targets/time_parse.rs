//! Time parsing: `timefmt::parse_rfc3339`, `parse_param`, `check_ms` and
//! `format_rfc3339`, with the round-trip property that every storable
//! epoch-ms value formats to a string that parses back to itself.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::timefmt::{check_ms, format_rfc3339, parse_param, parse_rfc3339, MAX_TIME_MS};

fn round_trip(ms: i64) {
    let s = format_rfc3339(ms);
    assert_eq!(parse_rfc3339(&s), Ok(ms), "format/parse round trip of {ms} via {s:?}");
    assert_eq!(parse_param(&s), Ok(ms), "parse_param of {s:?}");
    assert_eq!(parse_param(&ms.to_string()), Ok(ms), "parse_param of {ms}");
}

fuzz_target!(|data: &[u8]| {
    // Any 8 bytes as epoch ms.
    if data.len() >= 8 {
        let ms = i64::from_le_bytes(data[..8].try_into().unwrap());
        let _ = format_rfc3339(ms);
        match check_ms(ms) {
            Ok(v) => {
                assert_eq!(v, ms);
                round_trip(ms);
            }
            Err(_) => assert!(!(0..=MAX_TIME_MS).contains(&ms)),
        }
        // The same bits folded into the storable range.
        round_trip(ms.rem_euclid(MAX_TIME_MS + 1));
    }

    let s = String::from_utf8_lossy(data);
    for s in [&*s, s.trim()] {
        for r in [parse_rfc3339(s), parse_param(s)] {
            if let Ok(ms) = r {
                assert_eq!(check_ms(ms), Ok(ms), "parsed {s:?} to out-of-range {ms}");
                round_trip(ms);
            }
        }
    }
});
