//! Calendar maths: the run key of a scheduled start is the month it fired for, in the job's time
//! zone (08:00 on 1 December in Tokyo is still 30 November in UTC).

use super::EngineError;

/// `YYYY-MM` of an epoch-milliseconds instant in the IANA time zone `tz`: a run key.
pub fn period_key(at_ms: i64, tz: &str) -> Result<String, EngineError> {
    let zone =
        jiff::tz::TimeZone::get(tz).map_err(|e| EngineError::State(format!("time zone `{tz}` is not known: {e}")))?;
    let at = jiff::Timestamp::from_millisecond(at_ms)
        .map_err(|e| EngineError::State(format!("time {at_ms} ms is out of range: {e}")))?;
    let local = zone.to_datetime(at);
    Ok(format!("{:04}-{:02}", local.year(), local.month()))
}

#[cfg(test)]
mod tests {
    use super::period_key;

    #[test]
    fn period_keys_in_the_jobs_time_zone() {
        assert_eq!(period_key(0, "UTC").unwrap(), "1970-01");
        assert_eq!(period_key(1_795_000_000_000, "UTC").unwrap(), "2026-11");
        assert_eq!(period_key(951_782_400_000, "UTC").unwrap(), "2000-02"); // 2000-02-29
        // 08:00 on 1 December in Tokyo is 23:00 UTC on 30 November.
        let fired: jiff::Timestamp = "2026-11-30T23:00:00Z".parse().unwrap();
        assert_eq!(period_key(fired.as_millisecond(), "Asia/Tokyo").unwrap(), "2026-12");
        assert_eq!(period_key(fired.as_millisecond(), "UTC").unwrap(), "2026-11");
        assert!(period_key(0, "Mars/Olympus").is_err());
    }
}
