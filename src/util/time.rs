//! Timestamps as Kubernetes writes them (`metav1.Time`, `metav1.MicroTime`): RFC 3339 in UTC
//! with `Z`, to the second (`2026-11-26T15:04:05Z`) or to the microsecond
//! (`2026-11-26T15:04:05.123456Z`, truncated as Go truncates). Formatting and parsing are the
//! `time` crate's.

use std::fmt;
use std::time::SystemTime;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::format_description::well_known::Rfc3339;
use time::format_description::BorrowedFormatItem;
use time::macros::format_description;
use time::{OffsetDateTime, PrimitiveDateTime};

/// `metav1.MicroTime`'s text.
const MICRO: &[BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");

/// `metav1.MicroTime`'s text up to the seconds.
const MICRO_SECONDS: &[BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");

/// `metav1.Time`'s text.
const SECONDS: &[BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");

/// A timestamp that is not RFC 3339 as Kubernetes writes it.
#[derive(Debug, thiserror::Error)]
#[error("invalid RFC 3339 timestamp {text:?}")]
pub struct TimeError {
    text: String,
    /// Why `time` refused it; `None` when it was refused before (see [`parse_rfc3339`]).
    #[source]
    source: Option<time::error::Parse>,
}

/// `t` in UTC; times outside the years 1..9999 are taken as the nearest end of that range (a
/// `SystemTime` there comes from nothing but a bug or a forged value).
fn utc(t: SystemTime) -> OffsetDateTime {
    let nanos = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i128::try_from(d.as_nanos()).unwrap_or(i128::MAX),
        Err(e) => i128::try_from(e.duration().as_nanos()).map_or(i128::MIN, |n| -n),
    };
    OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap_or_else(|_| {
        if nanos < 0 {
            PrimitiveDateTime::MIN.assume_utc()
        } else {
            PrimitiveDateTime::MAX.assume_utc()
        }
    })
}

/// Appends `t` as `metav1.MicroTime` writes it: `2026-11-26T15:04:05.123456Z`.
///
/// Two of these go into every audit event, and the events of a second share its text up to the
/// seconds: each thread keeps the text of the last second it wrote and adds the microseconds.
pub fn write_micro(t: SystemTime, out: &mut Vec<u8>) {
    use std::cell::RefCell;
    /// The last second written: its Unix time and text (at most `-9999-12-31T23:59:59`).
    struct Second {
        unix: i64,
        text: [u8; 20],
        len: usize,
    }
    thread_local! {
        static LAST: RefCell<Second> = const {
            RefCell::new(Second { unix: i64::MIN, text: [0; 20], len: 0 })
        };
    }
    let (unix, micros) = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => (i64::try_from(d.as_secs()).ok(), d.subsec_micros()),
        Err(e) => {
            // Before 1970: the second below, and the microseconds from its start.
            let d = e.duration();
            let nanos = d.subsec_nanos();
            let secs = i64::try_from(d.as_secs()).ok();
            match nanos {
                0 => (secs.map(|s| -s), 0),
                n => (secs.map(|s| -s - 1), (1_000_000_000 - n) / 1_000),
            }
        }
    };
    let Some(second) = unix.and_then(|u| OffsetDateTime::from_unix_timestamp(u).ok()) else {
        // Outside the years `time` knows: the nearest end of its range, written in full.
        let _ = utc(t).format_into(out, MICRO);
        return;
    };
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if last.unix != second.unix_timestamp() || last.len == 0 {
            let mut text = Vec::with_capacity(20);
            // Writing to a Vec cannot fail, and the description only names what a
            // date-time has.
            let _ = second.format_into(&mut text, MICRO_SECONDS);
            let len = text.len().min(last.text.len());
            last.text[..len].copy_from_slice(&text[..len]);
            last.len = len;
            last.unix = second.unix_timestamp();
        }
        out.extend_from_slice(&last.text[..last.len]);
    });
    let mut digits = *b".000000Z";
    let mut v = micros;
    for d in digits[1..7].iter_mut().rev() {
        *d = b'0' + (v % 10) as u8;
        v /= 10;
    }
    out.extend_from_slice(&digits);
}

/// `t` as `metav1.MicroTime` writes it: `2026-11-26T15:04:05.123456Z`.
pub fn format_micro(t: SystemTime) -> String {
    let mut out = Vec::with_capacity(27);
    write_micro(t, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// `t` as `metav1.Time` writes it: `2026-11-26T15:04:05Z` (truncated to the second).
pub fn format_seconds(t: SystemTime) -> String {
    utc(t).format(SECONDS).unwrap_or_default()
}

/// Parses RFC 3339 as Kubernetes reads it: `T` between date and time, up to nine fractional
/// digits, `Z` or a numeric offset, no leap second.
pub fn parse_rfc3339(text: &str) -> Result<SystemTime, TimeError> {
    let refused = |source| TimeError {
        text: text.to_owned(),
        source,
    };
    // What `time` would take but Kubernetes does not: another separator than `T`, more than
    // nine fractional digits, a leap second.
    let b = text.as_bytes();
    let fraction_digits = b
        .get(20..)
        .filter(|_| b.get(19) == Some(&b'.'))
        .map_or(0, |f| f.iter().take_while(|c| c.is_ascii_digit()).count());
    if !matches!(b.get(10), Some(b'T' | b't'))
        || b.get(17..19) == Some(b"60")
        || fraction_digits > 9
    {
        return Err(refused(None));
    }
    let t = OffsetDateTime::parse(text, &Rfc3339).map_err(|e| refused(Some(e)))?;
    Ok(SystemTime::from(t))
}

/// `metav1.MicroTime`: a timestamp written as RFC 3339 UTC with microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MicroTime(pub SystemTime);

impl MicroTime {
    pub fn now() -> MicroTime {
        MicroTime(SystemTime::now())
    }

    /// `2026-11-26T15:04:05.123456Z` (truncated, not rounded, to microseconds, as Go does).
    pub fn to_rfc3339_micro(&self) -> String {
        format_micro(self.0)
    }

    /// Appends [`MicroTime::to_rfc3339_micro`]'s text to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        write_micro(self.0, out);
    }

    /// Parses RFC 3339 (see [`parse_rfc3339`]).
    pub fn parse(s: &str) -> Result<MicroTime, TimeError> {
        parse_rfc3339(s).map(MicroTime)
    }
}

impl From<SystemTime> for MicroTime {
    fn from(t: SystemTime) -> Self {
        MicroTime(t)
    }
}

impl fmt::Display for MicroTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339_micro())
    }
}

impl Serialize for MicroTime {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_rfc3339_micro())
    }
}

impl<'de> Deserialize<'de> for MicroTime {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = MicroTime;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an RFC 3339 timestamp")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<MicroTime, E> {
                MicroTime::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The text as the calendar says, written field by field.
    fn reference(t: SystemTime) -> String {
        let t = OffsetDateTime::from(t);
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.microsecond()
        )
    }

    #[test]
    fn micro_time_writes_what_the_calendar_says() {
        // day boundaries from 1970 to 2400 and times within days
        let mut secs: u64 = 0;
        let mut n = 0;
        while secs < 13_569_465_600 {
            for offset in [0, 1, 59, 3_599, 43_200, 86_399] {
                for nanos in [0, 999, 1_000, 123_456_789, 999_999_999] {
                    let t = SystemTime::UNIX_EPOCH + Duration::new(secs + offset, nanos);
                    assert_eq!(MicroTime(t).to_rfc3339_micro(), reference(t));
                    n += 1;
                }
            }
            secs += 86_400 * 7 + 86_400 / 3;
        }
        assert!(n > 100_000);
        let before = MicroTime(SystemTime::UNIX_EPOCH - Duration::from_micros(1));
        assert_eq!(before.to_rfc3339_micro(), "1969-12-31T23:59:59.999999Z");
        let t = MicroTime::parse("2024-02-29T23:59:59.999999Z").unwrap();
        assert_eq!(
            serde_json::to_string(&t).unwrap(),
            "\"2024-02-29T23:59:59.999999Z\""
        );
    }

    #[test]
    fn micro_time_format_and_parse() {
        let ts = |s: &str| MicroTime::parse(s).unwrap().0;
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_795_705_445, 123_456_789);
        assert_eq!(
            MicroTime(t).to_rfc3339_micro(),
            "2026-11-26T15:04:05.123456Z"
        );
        let zero = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_705_445);
        assert_eq!(
            MicroTime(zero).to_rfc3339_micro(),
            "2026-11-26T15:04:05.000000Z"
        );
        assert_eq!(format_seconds(t), "2026-11-26T15:04:05Z");
        assert_eq!(ts("2026-11-26T15:04:05Z"), zero);
        assert_eq!(ts("2026-11-26t15:04:05z"), zero);
        assert_eq!(ts("2026-11-26T16:04:05+01:00"), zero);
        assert_eq!(
            ts("2026-11-26T15:04:05.123456789Z"),
            SystemTime::UNIX_EPOCH + Duration::new(1_795_705_445, 123_456_789)
        );
        for bad in [
            "",
            "2026-11-26",
            "2026-11-26T15:04:05",
            "2026-13-01T00:00:00Z",
            "2026-11-26T15:04:05.Z",
            "2026-11-26 15:04:05Z",
            "2026-11-26T15:04:05.1234567891Z",
            "2026-12-31T23:59:60Z",
        ] {
            let e = MicroTime::parse(bad).unwrap_err();
            assert_eq!(e.to_string(), format!("invalid RFC 3339 timestamp {bad:?}"));
        }
    }

    #[test]
    fn times_out_of_range_are_written_as_the_range_ends() {
        let far = SystemTime::UNIX_EPOCH + Duration::from_secs(400_000_000_000);
        assert_eq!(format_micro(far), "9999-12-31T23:59:59.999999Z");
    }
}
