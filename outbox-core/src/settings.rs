//! The grammar the settings share, so that every broker crate reads a value
//! the same way and says the same thing about a bad one.

use std::time::Duration;

/// Why a duration setting was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DurationError {
    /// Not a whole number followed by a unit (`ms`, `s`, `m` or `min`, `h`).
    Invalid,
    /// A number that fits, but is too large once in milliseconds.
    TooLarge,
}

/// Parses a duration written as a whole number with a unit: `ms`, `s`, `m`
/// (or `min`) or `h`, with optional spaces around (`500ms`, `10s`, `2m`,
/// `1h`). The broker crates' `parse_duration` turn an error into one that
/// names the setting.
///
/// ```
/// use std::time::Duration;
/// use outbox::settings::{parse_duration, DurationError};
/// assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
/// assert_eq!(parse_duration(" 2m "), Ok(Duration::from_secs(120)));
/// assert_eq!(parse_duration("10"), Err(DurationError::Invalid));
/// assert_eq!(parse_duration("ms"), Err(DurationError::Invalid));
/// assert_eq!(parse_duration("99999999999999999h"), Err(DurationError::TooLarge));
/// assert_eq!(parse_duration("99999999999999999999h"), Err(DurationError::Invalid));
/// ```
pub fn parse_duration(value: &str) -> Result<Duration, DurationError> {
    let v = value.trim();
    let split = v
        .find(|c: char| !c.is_ascii_digit())
        .ok_or(DurationError::Invalid)?;
    let (digits, unit) = v.split_at(split);
    if digits.is_empty() {
        return Err(DurationError::Invalid);
    }
    let ms_per_unit: u64 = match unit.trim() {
        "ms" => 1,
        "s" => 1000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        _ => return Err(DurationError::Invalid),
    };
    let n: u64 = digits.parse().map_err(|_| DurationError::Invalid)?;
    n.checked_mul(ms_per_unit)
        .map(Duration::from_millis)
        .ok_or(DurationError::TooLarge)
}
