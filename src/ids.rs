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

#[cfg(test)]
mod tests {
    use super::*;

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
