//! `--discovery consul://HOST:PORT` and its `--discovery-opt`s, checked once at open.

use std::time::Duration;

use embassy_plugin_api::{support::OptionReader, Options};

use crate::ConsulError;

/// Every `--discovery-opt` the plugin takes; any other is refused.
pub const OPTIONS: &[(&str, &str)] = &[
    (
        "token",
        "ACL token sent as X-Consul-Token (default $CONSUL_HTTP_TOKEN)",
    ),
    ("dc", "datacenter to query (default the agent's)"),
    (
        "ca_file",
        "PEM CA that signed the agent's certificate (consuls:// only)",
    ),
    (
        "wait",
        "longest hold of a blocking query (default 5m, at most 10m)",
    ),
    (
        "min_interval",
        "least time between the starts of two queries of one service (default 100ms)",
    ),
    (
        "backoff",
        "first retry delay after an error (default 200ms)",
    ),
    ("max_backoff", "longest retry delay (default 10s)"),
];

/// Consul caps `wait` at 10 minutes; asking for more is a mistake worth naming.
const MAX_WAIT: Duration = Duration::from_secs(600);

/// Everything a watch needs to know about the agent it talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsulConfig {
    /// `http://host:port` or `https://host:port`, no trailing slash.
    pub base_url: String,
    /// Sent as `X-Consul-Token`.
    pub token: Option<String>,
    /// Datacenter to query (`dc`); the agent's own when unset.
    pub datacenter: Option<String>,
    /// PEM file of the CA that signed the agent's certificate (`consuls://` only).
    pub ca_file: Option<String>,
    /// How long the agent may hold a blocking query.
    pub wait: Duration,
    /// Least time between the starts of two queries of one watch, so a misbehaving agent that
    /// answers at once cannot make us spin.
    pub min_interval: Duration,
    /// First retry delay after a failure; doubles (jittered) up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl ConsulConfig {
    /// Parses the URI and options; `env_token` is `CONSUL_HTTP_TOKEN`, used when no `token`
    /// option is given.
    pub fn parse(
        uri: &str,
        options: &Options,
        env_token: Option<String>,
    ) -> Result<Self, ConsulError> {
        let (scheme, rest, default_port) = if let Some(rest) = uri.strip_prefix("consul://") {
            ("http", rest, 8500)
        } else if let Some(rest) = uri.strip_prefix("consuls://") {
            ("https", rest, 8501)
        } else {
            return Err(ConsulError::Uri {
                uri: uri.into(),
                reason: "expected consul://HOST:PORT or consuls://HOST:PORT",
            });
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
            return Err(ConsulError::Uri {
                uri: uri.into(),
                reason: "expected only HOST or HOST:PORT after the scheme",
            });
        }
        let has_port = match authority.rsplit_once(':') {
            // `[::1]` alone: the colon is inside the brackets.
            Some((host, _)) if authority.starts_with('[') && !host.ends_with(']') => false,
            Some((host, port)) => {
                if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
                    return Err(ConsulError::Uri {
                        uri: uri.into(),
                        reason: "the port must be a number from 1 to 65535",
                    });
                }
                true
            }
            None => false,
        };
        let base_url = if has_port {
            format!("{scheme}://{authority}")
        } else {
            format!("{scheme}://{authority}:{default_port}")
        };

        let options = OptionReader::new("consul", OPTIONS, options)?;
        let token = options
            .non_empty("token")
            .map(str::to_string)
            .or(env_token.filter(|t| !t.is_empty()));
        let ca_file = options.non_empty("ca_file").map(str::to_string);
        if ca_file.is_some() && scheme == "http" {
            return Err(options
                .invalid("ca_file", "only applies to consuls:// (HTTPS)")
                .into());
        }
        let wait = options.duration("wait", Duration::from_secs(300))?;
        if wait > MAX_WAIT {
            return Err(options
                .invalid("wait", "consul caps blocking queries at 10m")
                .into());
        }
        let backoff = options.duration("backoff", Duration::from_millis(200))?;
        let max_backoff = options.duration("max_backoff", Duration::from_secs(10))?;
        Ok(ConsulConfig {
            base_url,
            token,
            datacenter: options.non_empty("dc").map(str::to_string),
            ca_file,
            wait,
            min_interval: options.duration("min_interval", Duration::from_millis(100))?,
            backoff,
            max_backoff: max_backoff.max(backoff),
        })
    }
}

/// A duration in the form Consul reads for `wait`.
pub fn format_wait(wait: Duration) -> String {
    if wait.subsec_millis() == 0 {
        format!("{}s", wait.as_secs())
    } else {
        format!("{}ms", wait.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    /// Parses `uri` with `options` (`k=v` pairs) and `env_token`; renders the fields that
    /// matter or `error: ...`.
    fn check(uri: &str, options: &[&str], env_token: Option<&str>, expected: &str) {
        let options = embassy_plugin_api::support::options::options_from(options);
        let actual = match ConsulConfig::parse(uri, &options, env_token.map(str::to_string)) {
            Ok(c) => format!(
                "{} token={} dc={} ca={} wait={:?} min={:?} backoff={:?}..{:?}",
                c.base_url,
                c.token.as_deref().unwrap_or("-"),
                c.datacenter.as_deref().unwrap_or("-"),
                c.ca_file.as_deref().unwrap_or("-"),
                c.wait,
                c.min_interval,
                c.backoff,
                c.max_backoff
            ),
            Err(error) => format!("error: {error}"),
        };
        assert_eq!(actual, expected, "{uri} {options:?}");
    }

    #[test]
    fn uris_and_options() {
        check(
            "consul://127.0.0.1:8500",
            &[],
            None,
            "http://127.0.0.1:8500 token=- dc=- ca=- wait=300s min=100ms backoff=200ms..10s",
        );
        check(
            "consul://consul.local/",
            &[],
            None,
            "http://consul.local:8500 token=- dc=- ca=- wait=300s min=100ms backoff=200ms..10s",
        );
        check(
            "consuls://[::1]",
            &["ca_file=/etc/ca.pem"],
            None,
            "https://[::1]:8501 token=- dc=- ca=/etc/ca.pem wait=300s min=100ms backoff=200ms..10s",
        );
        check(
            "consuls://[::1]:9000",
            &[],
            None,
            "https://[::1]:9000 token=- dc=- ca=- wait=300s min=100ms backoff=200ms..10s",
        );
        // The option beats the environment; an empty option falls back to it.
        check(
            "consul://h:1",
            &["token=opt", "dc=eu1"],
            Some("env"),
            "http://h:1 token=opt dc=eu1 ca=- wait=300s min=100ms backoff=200ms..10s",
        );
        check(
            "consul://h:1",
            &["token="],
            Some("env"),
            "http://h:1 token=env dc=- ca=- wait=300s min=100ms backoff=200ms..10s",
        );
        check(
            "consul://h:1",
            &[
                "wait=5m",
                "min_interval=20ms",
                "backoff=1s",
                "max_backoff=500ms",
            ],
            None,
            "http://h:1 token=- dc=- ca=- wait=300s min=20ms backoff=1s..1s",
        );
    }

    #[test]
    fn bad_uris_and_options_name_the_value() {
        check(
            "etcd://h:1",
            &[],
            None,
            "error: discovery uri \"etcd://h:1\": expected consul://HOST:PORT or consuls://HOST:PORT",
        );
        check(
            "consul://",
            &[],
            None,
            "error: discovery uri \"consul://\": expected only HOST or HOST:PORT after the scheme",
        );
        check(
            "consul://h:1/v1/health",
            &[],
            None,
            "error: discovery uri \"consul://h:1/v1/health\": expected only HOST or HOST:PORT after the scheme",
        );
        check(
            "consul://h:0",
            &[],
            None,
            "error: discovery uri \"consul://h:0\": the port must be a number from 1 to 65535",
        );
        check(
            "consul://h:http",
            &[],
            None,
            "error: discovery uri \"consul://h:http\": the port must be a number from 1 to 65535",
        );
        check(
            "consul://h:1",
            &["ca_file=/ca.pem"],
            None,
            "error: consul option ca_file=\"/ca.pem\": only applies to consuls:// (HTTPS)",
        );
        check(
            "consul://h:1",
            &["wait=11m"],
            None,
            "error: consul option wait=\"11m\": consul caps blocking queries at 10m",
        );
        check(
            "consul://h:1",
            &["wait=5 minutes"],
            None,
            "error: consul option wait=\"5 minutes\": expected a duration such as 500ms, 3s, 2m or 1h",
        );
        check(
            "consul://h:1",
            &["min_interval=1.5s"],
            None,
            "error: consul option min_interval=\"1.5s\": expected a duration such as 500ms, 3s, 2m or 1h",
        );
        check(
            "consul://h:1",
            &["wiat=1m"],
            None,
            "error: unknown consul option wiat=\"1m\" (known: token, dc, ca_file, wait, min_interval, backoff, max_backoff)",
        );
    }
}
