//! Times on the wire: RFC 3339 strings or epoch milliseconds in, epoch
//! milliseconds (history) or RFC 3339 with milliseconds (token records) out.

/// 9999-12-30T22:00:00.000Z: the last millisecond the time library can
/// both format and parse (its range stops ~26 hours short of year 10000),
/// so every accepted time reads back as it was written.
pub const MAX_TIME_MS: i64 = 253_402_207_200_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeError {
    #[error("{0:?} is not an RFC 3339 time or epoch milliseconds")]
    Syntax(String),
    #[error("time {0} is out of range (0 to {MAX_TIME_MS} epoch milliseconds)")]
    Range(i64),
}

/// Checks that epoch milliseconds lie in the storable range.
pub fn check_ms(ms: i64) -> Result<i64, TimeError> {
    if (0..=MAX_TIME_MS).contains(&ms) {
        Ok(ms)
    } else {
        Err(TimeError::Range(ms))
    }
}

/// Parses an RFC 3339 timestamp (with offset) to epoch milliseconds.
pub fn parse_rfc3339(s: &str) -> Result<i64, TimeError> {
    let ts: jiff::Timestamp = s.parse().map_err(|_| TimeError::Syntax(truncate(s)))?;
    check_ms(ts.as_millisecond())
}

/// Parses a query parameter: epoch milliseconds or RFC 3339.
pub fn parse_param(s: &str) -> Result<i64, TimeError> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let ms: i64 = s.parse().map_err(|_| TimeError::Syntax(truncate(s)))?;
        return check_ms(ms);
    }
    parse_rfc3339(s)
}

/// Formats epoch milliseconds as `2017-06-13T04:00:00.000Z`.
pub fn format_rfc3339(ms: i64) -> String {
    match jiff::Timestamp::from_millisecond(ms) {
        Ok(ts) => format!("{ts:.3}"),
        Err(_) => ms.to_string(),
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:01Z"), Ok(1000));
        assert_eq!(
            parse_rfc3339("2017-06-13T04:00:00.000Z"),
            Ok(1_497_326_400_000)
        );
        assert_eq!(
            parse_rfc3339("2017-06-13T06:00:00+02:00"),
            Ok(1_497_326_400_000)
        );
        assert_eq!(
            format_rfc3339(1_497_326_400_000),
            "2017-06-13T04:00:00.000Z"
        );
        assert_eq!(parse_param("1497326400000"), Ok(1_497_326_400_000));
        assert_eq!(parse_param("2017-06-13T04:00:00Z"), Ok(1_497_326_400_000));
        assert!(matches!(parse_param("-5"), Err(TimeError::Syntax(_))));
        assert!(matches!(
            parse_param("99999999999999999999"),
            Err(TimeError::Syntax(_))
        ));
        assert!(matches!(
            parse_rfc3339("1969-12-31T23:59:59Z"),
            Err(TimeError::Range(-1000))
        ));
        assert!(parse_rfc3339("yesterday").is_err());
        assert!(parse_rfc3339("2017-06-13").is_err());
        assert_eq!(check_ms(MAX_TIME_MS), Ok(MAX_TIME_MS));
        assert!(check_ms(MAX_TIME_MS + 1).is_err());
    }

    /// Found by fuzzing (fuzz/regressions/time_parse-*): the last day of
    /// year 9999 was accepted but could not be formatted or parsed back.
    #[test]
    fn every_accepted_time_round_trips() {
        for ms in [0, 1, 1_497_326_400_123, MAX_TIME_MS - 1, MAX_TIME_MS] {
            assert_eq!(parse_rfc3339(&format_rfc3339(ms)), Ok(ms), "{ms}");
            assert_eq!(parse_param(&format_rfc3339(ms)), Ok(ms), "{ms}");
        }
        assert!(matches!(
            parse_rfc3339("9999-12-31T23:59:59.999Z"),
            Err(TimeError::Range(_)) | Err(TimeError::Syntax(_))
        ));
        assert!(check_ms(253_402_207_200_001).is_err());
    }
}
