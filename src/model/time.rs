//! Timestamps: the one place that turns build-system clocks into RFC 3339 strings.
//!
//! Every timestamp in a payload is an RFC 3339 string in UTC with millisecond
//! precision (`2026-11-21T10:56:18.674Z`), so text order equals time order.

use std::cell::RefCell;
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};

/// Milliseconds since the Unix epoch as RFC 3339, or `None` when out of range.
pub fn from_millis(ms: i64) -> Option<String> {
    shared(ms).map(|t| t.to_string())
}

/// [`from_millis`], shared: the last time formatted on each thread is kept, and most
/// messages of a build carry the same few times (the build's start stands in for events
/// that have none), so a payload's `timestamp` is usually one more reference to it.
pub fn shared(ms: i64) -> Option<Arc<str>> {
    thread_local! {
        static LAST: RefCell<(i64, Option<Arc<str>>)> = const { RefCell::new((i64::MIN, None)) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if last.0 != ms {
            let text = Utc
                .timestamp_millis_opt(ms)
                .single()?
                .to_rfc3339_opts(SecondsFormat::Millis, true);
            *last = (ms, Some(text.into()));
        }
        last.1.clone()
    })
}

/// Seconds (with fraction) since the Unix epoch, as BitBake's `time.time()` gives them.
pub fn from_secs_f64(secs: f64) -> Option<String> {
    if !secs.is_finite() {
        return None;
    }
    let ms = (secs * 1000.0).round();
    if ms.abs() > 1e15 {
        return None;
    }
    from_millis(ms as i64)
}

/// Seconds and nanoseconds, as a protobuf `Timestamp` carries them.
pub fn from_secs_nanos(secs: i64, nanos: i32) -> Option<String> {
    let ms = secs
        .checked_mul(1000)?
        .checked_add(i64::from(nanos) / 1_000_000)?;
    from_millis(ms)
}

/// The current time, for `_meta.sent`. Formatted at most once per millisecond per
/// thread and shared: a translator sends thousands of messages in one.
pub fn now() -> Arc<str> {
    thread_local! {
        static LAST: RefCell<(i64, Arc<str>)> = RefCell::new((i64::MIN, Arc::from("")));
    }
    let t = Utc::now();
    let ms = t.timestamp_millis();
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if last.0 != ms {
            *last = (ms, t.to_rfc3339_opts(SecondsFormat::Millis, true).into());
        }
        Arc::clone(&last.1)
    })
}

/// Parses an RFC 3339 timestamp back to milliseconds since the epoch.
pub fn to_millis(ts: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(ts)
        .ok()
        .map(|t| t.timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millis_round_trip() {
        let s = from_millis(1_795_258_578_674).unwrap();
        assert_eq!(s, "2026-11-21T10:56:18.674Z");
        assert_eq!(to_millis(&s), Some(1_795_258_578_674));
    }

    #[test]
    fn repeated_and_alternating_times_format_alike() {
        for ms in [0, 1_795_258_578_674, 0, 0, -1, 1_795_258_578_674] {
            let expected = Utc
                .timestamp_millis_opt(ms)
                .single()
                .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true));
            assert_eq!(from_millis(ms), expected);
        }
        assert_eq!(from_millis(-1).as_deref(), Some("1969-12-31T23:59:59.999Z"));
    }

    #[test]
    fn out_of_range_is_none() {
        assert_eq!(from_millis(i64::MAX), None);
        assert_eq!(from_secs_f64(f64::NAN), None);
        assert_eq!(from_secs_nanos(i64::MAX, 0), None);
    }
}
