//! The admin API's request parsing: token create/update JSON bodies
//! (`tokens::parse_create`, `tokens::parse_update`) and the history query
//! string (`http::admin::history_query`).
//!
//! Input: byte 0 picks the function (and `max_devices`), the rest is the
//! body, or the query string split on '&' and '='.

#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use sluice::http::read::{history_query, MAX_LIMIT};
use sluice::ids::is_valid_id;
use sluice::store::Position;
use sluice::timefmt::{check_ms, MAX_TIME_MS};
use sluice::tokens::{parse_create, parse_update, MAX_NAME_CHARS};

fn check_name(n: &str) {
    let c = n.chars().count();
    assert!((1..=MAX_NAME_CHARS).contains(&c), "name of {c} chars accepted");
    assert!(!n.chars().any(char::is_control));
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    match sel % 3 {
        0 => {
            let max_devices = if sel & 0x80 == 0 { 4 } else { 10_000 };
            if let Ok(c) = parse_create(body, max_devices) {
                check_name(&c.name);
                assert!(!c.scopes.is_empty());
                if let Some(sluice::auth::Devices::Only(list)) = &c.devices {
                    assert!(!list.is_empty() && list.len() <= max_devices);
                    assert!(list.iter().all(|d| is_valid_id(d)));
                    let ids: Vec<&str> = list.iter().collect();
                    assert!(ids.windows(2).all(|w| w[0] < w[1]));
                }
                if let Some(e) = c.expires_at {
                    assert_eq!(check_ms(e), Ok(e));
                }
                if let Some(rl) = c.rate_limit {
                    assert!(rl.per_second >= 1 && rl.burst >= 1);
                }
                assert_ne!(c.status, sluice::auth::Status::Deleted);
            }
        }
        1 => {
            if let Ok(u) = parse_update(body) {
                assert!(u.status.is_some() || u.name.is_some());
                if let Some(n) = &u.name {
                    check_name(n);
                }
                assert_ne!(u.status, Some(sluice::auth::Status::Deleted));
            }
        }
        _ => {
            let q = String::from_utf8_lossy(body);
            let mut params = HashMap::new();
            for pair in q.split('&') {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                params.insert(k.to_string(), v.to_string());
            }
            if let Ok(h) = history_query(&params) {
                assert!(h.start_ms <= h.end_ms && h.end_ms <= MAX_TIME_MS as u64);
                assert!((1..=MAX_LIMIT).contains(&h.limit));
                if let Some(c) = h.cursor {
                    let text = &params["cursor"];
                    assert_eq!(c.to_cursor(), text.to_ascii_lowercase());
                    assert_eq!(Position::from_cursor(&c.to_cursor()), Some(c));
                }
            }
            if let Some(c) = params.get("cursor") {
                if let Some(p) = Position::from_cursor(c) {
                    assert_eq!(Position::from_cursor(&p.to_cursor()), Some(p));
                }
            }
        }
    }
});
