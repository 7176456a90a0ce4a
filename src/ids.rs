//! Application and device identifiers: 1–64 characters of `[A-Za-z0-9_.-]`.
//! They become parts of RocksDB keys and URL paths, so `/` can never occur
//! in one, and the path-like names `.` and `..` are refused as well.

/// Longest application or device id.
pub const MAX_ID_LEN: usize = 64;

/// Whether `s` is a valid application or device id.
pub fn is_valid_id(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_ID_LEN
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
        && s != "."
        && s != ".."
}

/// Splits `applications/{app}/devices/{device}/state` (the MQTT topic, and
/// the HTTP path without its leading `/`) into its two ids, unchecked.
/// Anything else, including extra or missing levels, is `None`.
pub fn state_path(s: &str) -> Option<(&str, &str)> {
    let rest = s.strip_prefix("applications/")?;
    let (app, rest) = rest.split_once('/')?;
    let rest = rest.strip_prefix("devices/")?;
    let (device, rest) = rest.split_once('/')?;
    (rest == "state").then_some((app, device))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_paths() {
        assert_eq!(
            state_path("applications/a/devices/d/state"),
            Some(("a", "d"))
        );
        assert_eq!(state_path("applications/a/devices/d/state/x"), None);
        assert_eq!(state_path("applications/a/devices/d"), None);
        assert_eq!(state_path("applications/a/things/d/state"), None);
        assert_eq!(
            state_path("applications/a/devices/+/state"),
            Some(("a", "+"))
        );
        assert_eq!(state_path("/applications/a/devices/d/state"), None);
        assert_eq!(state_path("applications/a/b/devices/d/state"), None);
    }

    #[test]
    fn ids() {
        for ok in ["a", "device-1", "A.b_c-9", &"x".repeat(64)] {
            assert!(is_valid_id(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a b",
            "é",
            "a\0",
            "*",
            &"x".repeat(65),
        ] {
            assert!(!is_valid_id(bad), "{bad:?}");
        }
    }
}
