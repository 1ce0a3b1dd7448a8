//! Human-readable quantities on command lines and in configs: link rates,
//! byte sizes and durations.
//!
//! One parser for the whole project, so that `--bandwidth 40mbit` means the same
//! thing to the planner, the engine and the WAN emulator.
//!
//! - Rates are **bits per second**, with tc's decimal units: `40mbit`,
//!   `1.5gbit`, `800kbit`, `1000000bit`. tc's `mbps` means *bytes* per second and
//!   is an easy trap, so `*bps` spellings are refused with a hint; write
//!   `5MB/s` for bytes per second.
//! - Sizes are **bytes**: `4GiB`, `256MiB`, `64KiB`, `4096`; single-letter `K`,
//!   `M`, `G`, `T` are binary (as in QEMU's `-m 4G`); `KB`, `MB`, `GB`, `TB` are
//!   decimal.
//! - Durations: `5ms`, `250us`, `2s`, `1.5s`, `3m`; a bare `0` is zero.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A quantity that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {input:?}: {reason}")]
pub struct ParseQuantityError {
    /// What was being parsed ("rate", "size", "duration").
    pub what: &'static str,
    /// The text given.
    pub input: String,
    /// Why it was refused.
    pub reason: String,
}

fn err(what: &'static str, input: &str, reason: impl Into<String>) -> ParseQuantityError {
    ParseQuantityError {
        what,
        input: input.to_string(),
        reason: reason.into(),
    }
}

/// Splits `"40mbit"` into `(40.0, "mbit")`.
fn split_number(what: &'static str, s: &str) -> Result<(f64, String), ParseQuantityError> {
    let t = s.trim();
    let end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(end);
    if num.is_empty() {
        return Err(err(what, s, "expected a number first"));
    }
    let value: f64 = num.parse().map_err(|_| err(what, s, "malformed number"))?;
    if !value.is_finite() || value < 0.0 {
        return Err(err(what, s, "must be a finite, non-negative number"));
    }
    Ok((value, unit.trim().to_string()))
}

fn to_u64(what: &'static str, s: &str, v: f64) -> Result<u64, ParseQuantityError> {
    if v > u64::MAX as f64 {
        return Err(err(what, s, "too large"));
    }
    Ok(v.round() as u64)
}

/// A link rate in bits per second.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct Rate {
    bits_per_second: u64,
}

impl Rate {
    /// A rate of `bits_per_second`.
    pub const fn from_bits_per_second(bits_per_second: u64) -> Self {
        Rate { bits_per_second }
    }
    /// Bits per second.
    pub const fn bits_per_second(self) -> u64 {
        self.bits_per_second
    }
    /// Bytes per second (the unit the model computes in).
    pub fn bytes_per_second(self) -> f64 {
        self.bits_per_second as f64 / 8.0
    }
    /// Megabits per second, for reports.
    pub fn mbit(self) -> f64 {
        self.bits_per_second as f64 / 1e6
    }
}

impl FromStr for Rate {
    type Err = ParseQuantityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const W: &str = "rate";
        let (v, unit) = split_number(W, s)?;
        let lower = unit.to_ascii_lowercase();
        let mult = match lower.as_str() {
            "" | "bit" | "bit/s" => 1.0,
            "kbit" | "kbit/s" => 1e3,
            "mbit" | "mbit/s" => 1e6,
            "gbit" | "gbit/s" => 1e9,
            "tbit" | "tbit/s" => 1e12,
            "b/s" => 8.0,
            "kb/s" => 8e3,
            "mb/s" => 8e6,
            "gb/s" => 8e9,
            u if u.ends_with("bps") => {
                return Err(err(
                    W,
                    s,
                    "'bps' is ambiguous (tc reads it as bytes per second): \
                     write bits as '40mbit' or bytes as '5MB/s'",
                ));
            }
            _ => {
                return Err(err(
                    W,
                    s,
                    "unknown unit (use bit, kbit, mbit, gbit or MB/s)",
                ));
            }
        };
        let bits = to_u64(W, s, v * mult)?;
        if bits == 0 {
            return Err(err(W, s, "a link rate must be positive"));
        }
        Ok(Rate::from_bits_per_second(bits))
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.bits_per_second;
        for (unit, m) in [
            ("gbit", 1_000_000_000u64),
            ("mbit", 1_000_000),
            ("kbit", 1_000),
        ] {
            if b >= m && b % m == 0 {
                return write!(f, "{}{unit}", b / m);
            }
        }
        if b >= 1_000_000 {
            return write!(f, "{}mbit", b as f64 / 1e6);
        }
        write!(f, "{b}bit")
    }
}

/// A size in bytes.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = ParseQuantityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const W: &str = "size";
        let (v, unit) = split_number(W, s)?;
        let mult: f64 = match unit.as_str() {
            "" | "B" | "b" => 1.0,
            "K" | "k" | "KiB" | "kiB" => 1024.0,
            "M" | "MiB" => 1024.0 * 1024.0,
            "G" | "GiB" => 1024.0 * 1024.0 * 1024.0,
            "T" | "TiB" => 1024.0f64.powi(4),
            "P" | "PiB" => 1024.0f64.powi(5),
            "KB" | "kB" => 1e3,
            "MB" => 1e6,
            "GB" => 1e9,
            "TB" => 1e12,
            _ => {
                return Err(err(
                    W,
                    s,
                    "unknown unit (use KiB, MiB, GiB, TiB or a plain byte count)",
                ));
            }
        };
        let bytes = v * mult;
        if bytes.fract() != 0.0 {
            return Err(err(W, s, "not a whole number of bytes"));
        }
        Ok(ByteSize(to_u64(W, s, bytes)?))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
            let m = 1u64 << shift;
            if b >= m && b % m == 0 {
                return write!(f, "{}{unit}", b / m);
            }
        }
        write!(f, "{b}B")
    }
}

/// Parses a duration such as `5ms`, `250us`, `1.5s` or `0`.
pub fn parse_duration(s: &str) -> Result<Duration, ParseQuantityError> {
    const W: &str = "duration";
    let (v, unit) = split_number(W, s)?;
    let secs = match unit.as_str() {
        "" if v == 0.0 => 0.0,
        "ns" => v * 1e-9,
        "us" | "µs" => v * 1e-6,
        "ms" => v * 1e-3,
        "s" => v,
        "m" | "min" => v * 60.0,
        "h" => v * 3600.0,
        "" => return Err(err(W, s, "missing unit (use us, ms, s)")),
        _ => return Err(err(W, s, "unknown unit (use ns, us, ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| err(W, s, "out of range"))
}

/// Formats a duration compactly for reports and command lines (`5ms`, `2.5s`).
pub fn format_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns == 0 {
        "0".to_string()
    } else if ns % 1_000_000_000 == 0 {
        format!("{}s", ns / 1_000_000_000)
    } else if ns % 1_000_000 == 0 {
        format!("{}ms", ns / 1_000_000)
    } else if ns % 1_000 == 0 {
        format!("{}us", ns / 1_000)
    } else {
        format!("{ns}ns")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_bits_per_second_with_decimal_units() {
        assert_eq!(
            "40mbit".parse::<Rate>().unwrap().bits_per_second(),
            40_000_000
        );
        assert_eq!(
            "40Mbit".parse::<Rate>().unwrap().bits_per_second(),
            40_000_000
        );
        assert_eq!(
            "1.5gbit".parse::<Rate>().unwrap().bits_per_second(),
            1_500_000_000
        );
        assert_eq!(
            "800kbit".parse::<Rate>().unwrap().bits_per_second(),
            800_000
        );
        assert_eq!(
            "5MB/s".parse::<Rate>().unwrap().bits_per_second(),
            40_000_000
        );
        assert_eq!("40mbit".parse::<Rate>().unwrap().bytes_per_second(), 5e6);
        assert_eq!(Rate::from_bits_per_second(40_000_000).to_string(), "40mbit");
        assert_eq!(
            Rate::from_bits_per_second(2_500_000).to_string(),
            "2500kbit"
        );
    }

    #[test]
    fn ambiguous_or_bad_rates_are_refused() {
        let e = "40mbps".parse::<Rate>().unwrap_err();
        assert!(e.reason.contains("ambiguous"), "{e}");
        assert!("0mbit".parse::<Rate>().is_err());
        assert!("mbit".parse::<Rate>().is_err());
        assert!("-3mbit".parse::<Rate>().is_err());
        assert!("40 furlongs".parse::<Rate>().is_err());
    }

    #[test]
    fn sizes_are_binary_for_iec_and_single_letters() {
        assert_eq!("4GiB".parse::<ByteSize>().unwrap().bytes(), 4 << 30);
        assert_eq!("4G".parse::<ByteSize>().unwrap().bytes(), 4 << 30);
        assert_eq!("64KiB".parse::<ByteSize>().unwrap().bytes(), 64 << 10);
        assert_eq!("1TiB".parse::<ByteSize>().unwrap().bytes(), 1 << 40);
        assert_eq!("4096".parse::<ByteSize>().unwrap().bytes(), 4096);
        assert_eq!("1.5KiB".parse::<ByteSize>().unwrap().bytes(), 1536);
        assert_eq!("2MB".parse::<ByteSize>().unwrap().bytes(), 2_000_000);
        assert!("1.3B".parse::<ByteSize>().is_err());
        assert!("4Gb".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(256 << 20).to_string(), "256MiB");
        assert_eq!(ByteSize(1000).to_string(), "1000B");
    }

    #[test]
    fn durations_need_units_except_zero() {
        assert_eq!(parse_duration("5ms").unwrap(), Duration::from_millis(5));
        assert_eq!(parse_duration("250us").unwrap(), Duration::from_micros(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert_eq!(format_duration(Duration::from_millis(5)), "5ms");
        assert_eq!(format_duration(Duration::from_micros(2500)), "2500us");
    }
}
