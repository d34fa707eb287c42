//! Durations written the way Kubernetes and Go write them: `300ms`, `10s`, `5m`, `1h30m`.
//!
//! The syntax is Go's `time.ParseDuration` without the sign: one or more `<number><unit>`
//! pairs, where the number may have a decimal fraction (`1.5s`) and the unit is one of `ns`,
//! `us` (or `µs`), `ms`, `s`, `m`, `h`. A bare `0` is allowed. Negative durations are rejected.
//! Serialization writes Go's canonical form (`time.Duration.String()`): `1h30m0s`, `1.5s`,
//! `300ms`, `0s`.
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserialize, Serialize};

/// A [`Duration`] that reads and writes Go-style duration strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GoDuration(pub Duration);

impl GoDuration {
    pub fn get(self) -> Duration {
        self.0
    }

    pub fn is_zero(self) -> bool {
        self.0.is_zero()
    }

    /// Parses a Go-style duration such as `1h30m` or `1.5s`.
    pub fn parse(s: &str) -> Result<GoDuration, DurationError> {
        parse(s).map(GoDuration)
    }
}

impl From<Duration> for GoDuration {
    fn from(d: Duration) -> Self {
        GoDuration(d)
    }
}

impl From<GoDuration> for Duration {
    fn from(d: GoDuration) -> Self {
        d.0
    }
}

/// Why a duration string was rejected. The message quotes the input and shows examples.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DurationError {
    input: String,
    reason: Reason,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Reason {
    Syntax,
    MissingUnit,
    UnknownUnit(String),
    Negative,
    TooLarge,
}

const EXAMPLES: &str = "expected e.g. 300ms, 10s, 5m, 1h30m";

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid duration {:?}: ", self.input)?;
        match &self.reason {
            Reason::Syntax => f.write_str(EXAMPLES),
            Reason::MissingUnit => write!(f, "missing unit; {EXAMPLES}"),
            Reason::UnknownUnit(u) => write!(
                f,
                "unknown unit {u:?} (units are ns, us, ms, s, m, h); {EXAMPLES}"
            ),
            Reason::Negative => f.write_str("must not be negative"),
            Reason::TooLarge => f.write_str("too large (at most about 292 years)"),
        }
    }
}

impl std::error::Error for DurationError {}

/// Nanoseconds per unit.
fn unit_nanos(unit: &str) -> Option<u128> {
    Some(match unit {
        "ns" => 1,
        // U+00B5 micro sign and U+03BC Greek small letter mu, as Go accepts both.
        "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60 * 1_000_000_000,
        "h" => 3_600 * 1_000_000_000,
        _ => return None,
    })
}

/// Go's limit: an int64 count of nanoseconds.
const MAX_NANOS: u128 = i64::MAX as u128;

fn parse(input: &str) -> Result<Duration, DurationError> {
    let err = |reason| DurationError {
        input: input.to_string(),
        reason,
    };
    let mut s = input;
    if let Some(rest) = s.strip_prefix('-') {
        // "-0" is zero, but a sign on a duration that must be a length of time is a mistake.
        if rest.is_empty() || parse(rest).is_ok() {
            return Err(err(Reason::Negative));
        }
        return Err(err(Reason::Syntax));
    }
    if let Some(rest) = s.strip_prefix('+') {
        s = rest;
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(err(Reason::Syntax));
    }

    let mut total: u128 = 0;
    while !s.is_empty() {
        // Integer part.
        let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
        let (int_digits, rest) = s.split_at(int_len);
        s = rest;
        // Optional fraction.
        let mut frac_digits = "";
        if let Some(rest) = s.strip_prefix('.') {
            let frac_len = rest.bytes().take_while(u8::is_ascii_digit).count();
            let (digits, rest) = rest.split_at(frac_len);
            frac_digits = digits;
            s = rest;
        }
        if int_digits.is_empty() && frac_digits.is_empty() {
            return Err(err(Reason::Syntax));
        }
        // Unit: everything up to the next digit or dot.
        let unit_len = s
            .char_indices()
            .find(|(_, c)| c.is_ascii_digit() || *c == '.')
            .map_or(s.len(), |(i, _)| i);
        let (unit, rest) = s.split_at(unit_len);
        s = rest;
        if unit.is_empty() {
            return Err(err(Reason::MissingUnit));
        }
        let per = match unit_nanos(unit) {
            Some(per) => per,
            None if unit.chars().all(|c| c.is_alphabetic()) => {
                return Err(err(Reason::UnknownUnit(unit.to_string())))
            }
            None => return Err(err(Reason::Syntax)),
        };

        let mut int: u128 = 0;
        for b in int_digits.bytes() {
            int = int
                .checked_mul(10)
                .and_then(|v| v.checked_add(u128::from(b - b'0')))
                .filter(|v| *v <= MAX_NANOS)
                .ok_or_else(|| err(Reason::TooLarge))?;
        }
        let mut value = int.checked_mul(per).ok_or_else(|| err(Reason::TooLarge))?;
        if !frac_digits.is_empty() {
            // Digits beyond nanosecond precision of the largest unit cannot matter.
            let digits = &frac_digits[..frac_digits.len().min(24)];
            let mut frac: u128 = 0;
            let mut scale: u128 = 1;
            for b in digits.bytes() {
                frac = frac * 10 + u128::from(b - b'0');
                scale *= 10;
            }
            value += frac * per / scale;
        }
        total = total
            .checked_add(value)
            .filter(|v| *v <= MAX_NANOS)
            .ok_or_else(|| err(Reason::TooLarge))?;
    }
    let nanos = u64::try_from(total).map_err(|_| err(Reason::TooLarge))?;
    Ok(Duration::from_nanos(nanos))
}

impl FromStr for GoDuration {
    type Err = DurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        GoDuration::parse(s)
    }
}

/// Writes `int` (a count of `10^-prec` units) as a decimal without trailing zeros.
fn write_decimal(out: &mut String, value: u128, prec: u32) {
    let scale = 10u128.pow(prec);
    let int = value / scale;
    let frac = value % scale;
    out.push_str(&int.to_string());
    if frac != 0 {
        let digits = format!("{frac:0width$}", width = prec as usize);
        out.push('.');
        out.push_str(digits.trim_end_matches('0'));
    }
}

/// Go's canonical form, as `time.Duration.String()` writes it.
impl fmt::Display for GoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nanos = self.0.as_nanos();
        let mut out = String::new();
        if nanos == 0 {
            out.push_str("0s");
        } else if nanos < 1_000 {
            out.push_str(&nanos.to_string());
            out.push_str("ns");
        } else if nanos < 1_000_000 {
            write_decimal(&mut out, nanos, 3);
            out.push_str("\u{b5}s");
        } else if nanos < 1_000_000_000 {
            write_decimal(&mut out, nanos, 6);
            out.push_str("ms");
        } else {
            let hours = nanos / 3_600_000_000_000;
            let minutes = (nanos / 60_000_000_000) % 60;
            let sec_nanos = nanos % 60_000_000_000;
            if hours > 0 {
                out.push_str(&format!("{hours}h"));
            }
            if hours > 0 || minutes > 0 {
                out.push_str(&format!("{minutes}m"));
            }
            write_decimal(&mut out, sec_nanos, 9);
            out.push('s');
        }
        f.write_str(&out)
    }
}

impl Serialize for GoDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

struct GoDurationVisitor;

impl Visitor<'_> for GoDurationVisitor {
    type Value = GoDuration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration such as 300ms, 10s, 5m or 1h30m")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<GoDuration, E> {
        GoDuration::parse(v).map_err(E::custom)
    }

    // YAML reads an unquoted `0` or `10` as a number: `0` is a valid duration, other numbers
    // lack a unit, which is reported the same way as for the string form.
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<GoDuration, E> {
        GoDuration::parse(&v.to_string()).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<GoDuration, E> {
        GoDuration::parse(&v.to_string()).map_err(E::custom)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<GoDuration, E> {
        GoDuration::parse(&v.to_string()).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(GoDurationVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Duration {
        GoDuration::parse(s)
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .0
    }

    fn e(s: &str) -> String {
        GoDuration::parse(s).unwrap_err().to_string()
    }

    #[test]
    fn parses_go_durations() {
        assert_eq!(p("0"), Duration::ZERO);
        assert_eq!(p("0s"), Duration::ZERO);
        assert_eq!(p("+5s"), Duration::from_secs(5));
        assert_eq!(p("300ms"), Duration::from_millis(300));
        assert_eq!(p("10s"), Duration::from_secs(10));
        assert_eq!(p("5m"), Duration::from_secs(300));
        assert_eq!(p("1h"), Duration::from_secs(3600));
        assert_eq!(p("1h30m"), Duration::from_secs(5400));
        assert_eq!(p("1h30m15s"), Duration::from_secs(5415));
        assert_eq!(p("1.5s"), Duration::from_millis(1500));
        assert_eq!(p(".5s"), Duration::from_millis(500));
        assert_eq!(p("1.s"), Duration::from_secs(1));
        assert_eq!(p("1.5h"), Duration::from_secs(5400));
        assert_eq!(p("2ns"), Duration::from_nanos(2));
        assert_eq!(p("3us"), Duration::from_micros(3));
        assert_eq!(p("3µs"), Duration::from_micros(3));
        assert_eq!(p("3\u{3bc}s"), Duration::from_micros(3));
        assert_eq!(p("1m0.000000001s"), Duration::new(60, 1));
        assert_eq!(
            p("0.3333333333333333333h"),
            Duration::from_secs(1200) - Duration::from_nanos(1)
        );
    }

    #[test]
    fn rejects_bad_durations_with_a_clear_message() {
        assert_eq!(
            e("5 minutes"),
            r#"invalid duration "5 minutes": expected e.g. 300ms, 10s, 5m, 1h30m"#
        );
        assert_eq!(
            e("10"),
            r#"invalid duration "10": missing unit; expected e.g. 300ms, 10s, 5m, 1h30m"#
        );
        assert!(e("5d").contains(r#"unknown unit "d""#), "{}", e("5d"));
        assert_eq!(e("-5s"), r#"invalid duration "-5s": must not be negative"#);
        assert!(e("-0").contains("must not be negative"));
        for bad in [
            "", "s", ".s", "1..5s", "1h 30m", " 1s", "1s ", "--1s", "1e3s",
        ] {
            assert!(GoDuration::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(e("3000000h").contains("too large"));
        assert!(e("99999999999999999999999999999999999999999s").contains("too large"));
    }

    #[test]
    fn formats_like_go() {
        let f = |d: Duration| GoDuration(d).to_string();
        assert_eq!(f(Duration::ZERO), "0s");
        assert_eq!(f(Duration::from_nanos(2)), "2ns");
        assert_eq!(f(Duration::from_nanos(1500)), "1.5µs");
        assert_eq!(f(Duration::from_millis(300)), "300ms");
        assert_eq!(f(Duration::from_micros(1500)), "1.5ms");
        assert_eq!(f(Duration::from_millis(1500)), "1.5s");
        assert_eq!(f(Duration::from_secs(10)), "10s");
        assert_eq!(f(Duration::from_secs(300)), "5m0s");
        assert_eq!(f(Duration::from_secs(3600)), "1h0m0s");
        assert_eq!(f(Duration::from_secs(5415)), "1h30m15s");
        assert_eq!(f(Duration::new(3661, 500_000_000)), "1h1m1.5s");
    }

    #[test]
    fn round_trips() {
        for s in [
            "0s",
            "1ns",
            "999ns",
            "1µs",
            "1.001ms",
            "59.999999999s",
            "1h0m0.1s",
            "100h0m0s",
        ] {
            let d = p(s);
            assert_eq!(GoDuration(d).to_string(), s);
            assert_eq!(p(&GoDuration(d).to_string()), d);
        }
    }

    #[test]
    fn serde_reads_strings_and_zero() {
        let d: GoDuration = serde_yaml_ng::from_str("1h30m").unwrap();
        assert_eq!(d.0, Duration::from_secs(5400));
        let d: GoDuration = serde_yaml_ng::from_str("0").unwrap();
        assert!(d.is_zero());
        let err = serde_yaml_ng::from_str::<GoDuration>("10").unwrap_err();
        assert!(err.to_string().contains("missing unit"), "{err}");
        let err = serde_yaml_ng::from_str::<GoDuration>("'5 minutes'").unwrap_err();
        assert!(err.to_string().contains(EXAMPLES), "{err}");
        let s = serde_json::to_string(&GoDuration(Duration::from_secs(90))).unwrap();
        assert_eq!(s, "\"1m30s\"");
    }
}
