//! The one duration grammar of Embassy: descriptors, command-line flags and plugin options.
//!
//! `500ms`, `3s`, `2m`, `1h`, or a bare number of seconds (what descriptors have always
//! taken); whole numbers only, no spaces, never zero, and a value too large for a
//! [`Duration`] is an error rather than a wrap. `humantime` was considered and not used: it
//! refuses the bare seconds descriptors promise and accepts spaced forms (`1h 5m`) that the
//! descriptor grammar (where a space is an error) could never carry.

use std::time::Duration;

/// Why a text is not a duration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DurationError {
    /// Not digits followed by `ms`, `s`, `m`, `h` or nothing.
    Syntax,
    /// Zero: a timeout or interval of nothing is a mistake.
    Zero,
    /// More than a `Duration` holds.
    Overflow,
}

impl std::fmt::Display for DurationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DurationError::Syntax => "expected a duration such as 500ms, 3s, 2m or 1h",
            DurationError::Zero => "a duration must be greater than 0",
            DurationError::Overflow => "the duration is too large",
        })
    }
}

impl std::error::Error for DurationError {}

/// Parses `text` in the grammar above.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() {
        return Err(DurationError::Syntax);
    }
    let seconds_per = match unit {
        "ms" => None,
        "" | "s" => Some(1),
        "m" => Some(60),
        "h" => Some(3600),
        _ => return Err(DurationError::Syntax),
    };
    // Only digits: the one way `parse` fails is a number too large for u64.
    let number: u64 = digits.parse().map_err(|_| DurationError::Overflow)?;
    let duration = match seconds_per {
        None => Duration::from_millis(number),
        Some(factor) => {
            Duration::from_secs(number.checked_mul(factor).ok_or(DurationError::Overflow)?)
        }
    };
    if duration.is_zero() {
        return Err(DurationError::Zero);
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `text`: `{:?}` of the duration, or `error: ...`.
    fn check(text: &str, expected: &str) {
        let actual = match parse_duration(text) {
            Ok(duration) => format!("{duration:?}"),
            Err(error) => format!("error: {error}"),
        };
        assert_eq!(actual, expected, "{text:?}");
    }

    #[test]
    fn the_grammar() {
        check("500ms", "500ms");
        check("3s", "3s");
        check("3", "3s");
        check("2m", "120s");
        check("1h", "3600s");
        check("05s", "5s");
        check("18446744073709551615ms", "18446744073709551.615s");
        check("18446744073709551615", "18446744073709551615s");
    }

    #[test]
    fn refusals() {
        check("", "error: expected a duration such as 500ms, 3s, 2m or 1h");
        check(
            "s",
            "error: expected a duration such as 500ms, 3s, 2m or 1h",
        );
        check(
            "1.5s",
            "error: expected a duration such as 500ms, 3s, 2m or 1h",
        );
        check(
            "-1s",
            "error: expected a duration such as 500ms, 3s, 2m or 1h",
        );
        check(
            "1h 5m",
            "error: expected a duration such as 500ms, 3s, 2m or 1h",
        );
        check(
            "5 s",
            "error: expected a duration such as 500ms, 3s, 2m or 1h",
        );
        check(
            "3d",
            "error: expected a duration such as 500ms, 3s, 2m or 1h",
        );
        check(
            "1S",
            "error: expected a duration such as 500ms, 3s, 2m or 1h",
        );
        check("0", "error: a duration must be greater than 0");
        check("0ms", "error: a duration must be greater than 0");
        check("18446744073709551616", "error: the duration is too large");
        check("307445734561825861m", "error: the duration is too large");
        check("5124095576030432h", "error: the duration is too large");
    }
}
