//! Reading a plugin's options (`--discovery-opt KEY=VALUE`): the plugin declares the keys it
//! knows, an unknown one is refused, and every error has one format naming the key and the
//! value, so `--discovery-opt cafile=...` fails the same way whichever plugin reads it.

use std::time::Duration;

use crate::{support::duration::parse_duration, text::cut, Options};

/// A bad option, with the plugin's name (`etcd option ...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionError {
    /// A key the plugin does not know, with the ones it does.
    Unknown {
        plugin: &'static str,
        key: String,
        value: String,
        known: String,
    },
    /// A known key with a value it cannot take.
    Invalid {
        plugin: &'static str,
        key: String,
        value: String,
        reason: String,
    },
}

impl std::fmt::Display for OptionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OptionError::Unknown {
                plugin,
                key,
                value,
                known,
            } => write!(
                f,
                "unknown {plugin} option {key}={value:?} (known: {known})"
            ),
            OptionError::Invalid {
                plugin,
                key,
                value,
                reason,
            } => write!(f, "{plugin} option {key}={value:?}: {reason}"),
        }
    }
}

impl std::error::Error for OptionError {}

/// The options of one plugin instance, checked against the keys it declares.
#[derive(Debug, Clone)]
pub struct OptionReader {
    plugin: &'static str,
    /// `(key, one-line description)`.
    known: &'static [(&'static str, &'static str)],
    /// In the order given; the last of a key wins, as on a command line.
    pairs: Vec<(String, String)>,
}

impl OptionReader {
    /// Checks `options` against `known` (`(key, description)`), refusing the first unknown key.
    pub fn new(
        plugin: &'static str,
        known: &'static [(&'static str, &'static str)],
        options: &Options,
    ) -> Result<Self, OptionError> {
        Self::from_pairs(
            plugin,
            known,
            options
                .iter()
                .map(|pair| (pair.0.to_string(), pair.1.to_string())),
        )
    }

    /// As [`OptionReader::new`], from plain pairs (a URI's query string, then the options).
    pub fn from_pairs(
        plugin: &'static str,
        known: &'static [(&'static str, &'static str)],
        pairs: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, OptionError> {
        let pairs: Vec<(String, String)> = pairs.into_iter().collect();
        if let Some((key, value)) = pairs
            .iter()
            .find(|(key, _)| !known.iter().any(|(k, _)| k == key))
        {
            return Err(OptionError::Unknown {
                plugin,
                key: cut(key).into_owned(),
                value: cut(value).into_owned(),
                known: known.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", "),
            });
        }
        Ok(OptionReader {
            plugin,
            known,
            pairs,
        })
    }

    /// `key: description` lines, for a plugin's help or its documentation.
    pub fn describe(known: &[(&str, &str)]) -> String {
        known
            .iter()
            .map(|(key, help)| format!("{key}: {help}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The value of `key` as given (the last one wins), even if empty.
    pub fn str(&self, key: &str) -> Option<&str> {
        debug_assert!(
            self.known.iter().any(|(k, _)| *k == key),
            "{key} is not declared"
        );
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The value of `key`, `None` when absent or empty (`token=` means "no token").
    pub fn non_empty(&self, key: &str) -> Option<&str> {
        self.str(key).filter(|value| !value.is_empty())
    }

    /// `key` in the [duration grammar](crate::support::duration), or `default`.
    pub fn duration(&self, key: &str, default: Duration) -> Result<Duration, OptionError> {
        self.parsed(key, default, |text| {
            parse_duration(text).map_err(|error| error.to_string())
        })
    }

    /// `key` as a whole number of at least 1 (plain digits), or `default`.
    pub fn count(&self, key: &str, default: u64) -> Result<u64, OptionError> {
        self.parsed(key, default, |text| {
            text.bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| text.parse::<u64>().ok())
                .flatten()
                .filter(|&n| n > 0)
                .ok_or_else(|| "expected a whole number greater than 0".to_string())
        })
    }

    /// `key` as `true` or `false`, or `default`.
    pub fn bool(&self, key: &str, default: bool) -> Result<bool, OptionError> {
        self.parsed(key, default, |text| match text {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err("expected true or false".to_string()),
        })
    }

    /// The error for `key`'s value, with `reason`, for checks the plugin makes itself.
    pub fn invalid(&self, key: &str, reason: impl Into<String>) -> OptionError {
        OptionError::Invalid {
            plugin: self.plugin,
            key: key.to_string(),
            value: cut(self.str(key).unwrap_or_default()).into_owned(),
            reason: reason.into(),
        }
    }

    fn parsed<T>(
        &self,
        key: &str,
        default: T,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, OptionError> {
        match self.str(key) {
            None => Ok(default),
            Some(text) => parse(text).map_err(|reason| self.invalid(key, reason)),
        }
    }
}

/// Options from `KEY=VALUE` texts as a command line gives them (`KEY` alone: an empty value),
/// for a plugin's tests and tools.
pub fn options_from(pairs: &[&str]) -> Options {
    pairs
        .iter()
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            abi_stable::std_types::Tuple2(key.into(), value.into())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: &[(&str, &str)] = &[
        ("wait", "longest hold of a query"),
        ("retries", "attempts before giving up"),
        ("verbose", "log every answer"),
        ("token", "ACL token"),
    ];

    /// Reads `options` (`k=v`) and renders `wait retries verbose token`, or `error: ...`.
    fn check(options: &[&str], expected: &str) {
        let options = options_from(options);
        let read = || -> Result<String, OptionError> {
            let reader = OptionReader::new("test", KNOWN, &options)?;
            Ok(format!(
                "{:?} {} {} {}",
                reader.duration("wait", Duration::from_secs(5))?,
                reader.count("retries", 3)?,
                reader.bool("verbose", false)?,
                reader.non_empty("token").unwrap_or("-"),
            ))
        };
        let actual = read().unwrap_or_else(|error| format!("error: {error}"));
        assert_eq!(actual, expected, "{options:?}");
    }

    #[test]
    fn known_keys_typed() {
        check(&[], "5s 3 false -");
        check(
            &["wait=250ms", "retries=7", "verbose=true", "token=x"],
            "250ms 7 true x",
        );
        check(&["wait=1s", "wait=2s"], "2s 3 false -");
        check(&["token="], "5s 3 false -");
        check(&["wait=3"], "3s 3 false -");
    }

    #[test]
    fn errors_name_the_key_and_value() {
        check(
            &["wiat=1s"],
            "error: unknown test option wiat=\"1s\" (known: wait, retries, verbose, token)",
        );
        check(
            &["wait=1s", "Wait=2s"],
            "error: unknown test option Wait=\"2s\" (known: wait, retries, verbose, token)",
        );
        check(
            &["wait=soon"],
            "error: test option wait=\"soon\": expected a duration such as 500ms, 3s, 2m or 1h",
        );
        check(
            &["wait=0s"],
            "error: test option wait=\"0s\": a duration must be greater than 0",
        );
        check(
            &["retries=0"],
            "error: test option retries=\"0\": expected a whole number greater than 0",
        );
        check(
            &["retries=+3"],
            "error: test option retries=\"+3\": expected a whole number greater than 0",
        );
        check(
            &["verbose=yes"],
            "error: test option verbose=\"yes\": expected true or false",
        );
    }

    #[test]
    fn descriptions_list_every_key() {
        assert_eq!(
            OptionReader::describe(&KNOWN[..2]),
            "wait: longest hold of a query\nretries: attempts before giving up"
        );
    }
}
