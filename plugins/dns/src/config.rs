//! `--discovery dns://[SERVER[:PORT]]` and its `--discovery-opt`s, checked once at open.

use std::{net::SocketAddr, time::Duration};

use embassy_plugin_api::{support::OptionReader, Options};

use crate::DnsError;

/// Every `--discovery-opt` the plugin takes; any other is refused.
pub const OPTIONS: &[(&str, &str)] = &[
    (
        "min_ttl",
        "least time between two resolutions of a service, whatever the TTL (default 1s)",
    ),
    (
        "max_ttl",
        "longest time between two resolutions of a service, whatever the TTL (default 5m)",
    ),
    (
        "nxdomain_hold",
        "how long a name must stay missing (NXDOMAIN, no records) before its endpoints go (default 30s)",
    ),
    (
        "timeout",
        "deadline of one query (default 5s for a given server, else resolv.conf's)",
    ),
    (
        "attempts",
        "tries of one query before it fails, 1 to 10 (default 2 for a given server, else resolv.conf's)",
    ),
    (
        "backoff_max",
        "longest wait between retries after a failed resolution (default 30s)",
    ),
];

/// The first wait after a failed resolution; doubles (jittered) up to `backoff_max`.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// Where the queries go and how often, fixed at open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// `None`: the system resolver (`/etc/resolv.conf`).
    pub server: Option<SocketAddr>,
    pub timing: Timing,
    /// Per query; `None` keeps the resolver's own (resolv.conf's or hickory's).
    pub timeout: Option<Duration>,
    pub attempts: Option<usize>,
    pub backoff_max: Duration,
}

/// When a watch resolves again: the pure part of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    pub nxdomain_hold: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(300),
            nxdomain_hold: Duration::from_secs(30),
        }
    }
}

impl DnsConfig {
    pub fn parse(uri: &str, options: &Options) -> Result<Self, DnsError> {
        let bad = |reason: &'static str| DnsError::Uri {
            uri: uri.to_string(),
            reason,
        };
        let rest = uri
            .strip_prefix("dns://")
            .ok_or(bad("expected dns:// or dns://SERVER[:PORT]"))?;
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#', '@']) {
            return Err(bad("expected only SERVER or SERVER:PORT after dns://"));
        }
        let server = if authority.is_empty() {
            None
        } else {
            Some(parse_server(authority).map_err(bad)?)
        };

        let options = OptionReader::new("dns", OPTIONS, options)?;
        let defaults = Timing::default();
        let min_ttl = options.duration("min_ttl", defaults.min_ttl)?;
        let max_ttl = options.duration("max_ttl", defaults.max_ttl)?;
        if max_ttl < min_ttl {
            return Err(options
                .invalid("max_ttl", "must not be below min_ttl")
                .into());
        }
        let attempts = match options.str("attempts") {
            None => None,
            Some(_) => Some(
                usize::try_from(options.count("attempts", 1)?)
                    .ok()
                    .filter(|&n| n <= 10)
                    .ok_or_else(|| options.invalid("attempts", "at most 10"))?,
            ),
        };
        let timeout = match options.str("timeout") {
            None => None,
            Some(_) => Some(options.duration("timeout", Duration::from_secs(5))?),
        };
        Ok(DnsConfig {
            server,
            timing: Timing {
                min_ttl,
                max_ttl,
                nxdomain_hold: options.duration("nxdomain_hold", defaults.nxdomain_hold)?,
            },
            timeout,
            attempts,
            backoff_max: options
                .duration("backoff_max", Duration::from_secs(30))?
                .max(FIRST_BACKOFF),
        })
    }
}

/// `IP`, `IP:PORT`, `[IPv6]`, `[IPv6]:PORT`; port 53 by default. A name is refused: it would
/// need a resolver to find the resolver.
fn parse_server(authority: &str) -> Result<SocketAddr, &'static str> {
    const NOT_AN_IP: &str =
        "the server must be an IP address (dns://127.0.0.1:53, dns://[::1]:53), not a name";
    const BAD_PORT: &str = "the port must be a number from 1 to 65535";
    let port = |text: &str| match text.parse::<u16>() {
        Ok(port) if port > 0 && text.bytes().all(|b| b.is_ascii_digit()) => Ok(port),
        _ => Err(BAD_PORT),
    };
    if let Some(bracketed) = authority.strip_prefix('[') {
        let (ip, after) = bracketed.split_once(']').ok_or(NOT_AN_IP)?;
        let ip: std::net::Ipv6Addr = ip.parse().map_err(|_| NOT_AN_IP)?;
        let port = match after {
            "" => 53,
            _ => port(after.strip_prefix(':').ok_or(NOT_AN_IP)?)?,
        };
        return Ok(SocketAddr::new(ip.into(), port));
    }
    match authority.split_once(':') {
        None => Ok(SocketAddr::new(
            authority.parse().map_err(|_| NOT_AN_IP)?,
            53,
        )),
        Some((ip, text)) => {
            let ip: std::net::Ipv4Addr = ip.parse().map_err(|_| NOT_AN_IP)?;
            Ok(SocketAddr::new(ip.into(), port(text)?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `uri` with `options` (`k=v`); renders the fields or `error: ...`.
    fn check(uri: &str, options: &[&str], expected: &str) {
        let options = embassy_plugin_api::support::options::options_from(options);
        let actual = match DnsConfig::parse(uri, &options) {
            Ok(c) => format!(
                "{} ttl={:?}..{:?} hold={:?} timeout={:?} attempts={:?} backoff_max={:?}",
                c.server.map_or("system".to_string(), |s| s.to_string()),
                c.timing.min_ttl,
                c.timing.max_ttl,
                c.timing.nxdomain_hold,
                c.timeout,
                c.attempts,
                c.backoff_max,
            ),
            Err(error) => format!("error: {error}"),
        };
        assert_eq!(actual, expected, "{uri} {options:?}");
    }

    #[test]
    fn uris_and_options() {
        let defaults = "ttl=1s..300s hold=30s timeout=None attempts=None backoff_max=30s";
        check("dns://", &[], &format!("system {defaults}"));
        check("dns:///", &[], &format!("system {defaults}"));
        check("dns://127.0.0.1", &[], &format!("127.0.0.1:53 {defaults}"));
        check(
            "dns://127.0.0.1:5353",
            &[],
            &format!("127.0.0.1:5353 {defaults}"),
        );
        check("dns://[::1]", &[], &format!("[::1]:53 {defaults}"));
        check("dns://[::1]:5353/", &[], &format!("[::1]:5353 {defaults}"));
        check(
            "dns://10.0.0.2",
            &[
                "min_ttl=2s",
                "max_ttl=1m",
                "nxdomain_hold=2s",
                "timeout=500ms",
                "attempts=3",
                "backoff_max=5s",
            ],
            "10.0.0.2:53 ttl=2s..60s hold=2s timeout=Some(500ms) attempts=Some(3) backoff_max=5s",
        );
        // min_ttl = max_ttl: a fixed interval, whatever the records say.
        check(
            "dns://",
            &["min_ttl=10s", "max_ttl=10s", "backoff_max=100ms"],
            "system ttl=10s..10s hold=30s timeout=None attempts=None backoff_max=500ms",
        );
    }

    #[test]
    fn bad_uris_and_options_name_the_value() {
        check(
            "consul://h",
            &[],
            "error: discovery uri \"consul://h\": expected dns:// or dns://SERVER[:PORT]",
        );
        check(
            "dns://ns1.example.com",
            &[],
            "error: discovery uri \"dns://ns1.example.com\": the server must be an IP address (dns://127.0.0.1:53, dns://[::1]:53), not a name",
        );
        check(
            "dns://127.0.0.1:0",
            &[],
            "error: discovery uri \"dns://127.0.0.1:0\": the port must be a number from 1 to 65535",
        );
        check(
            "dns://127.0.0.1:+53",
            &[],
            "error: discovery uri \"dns://127.0.0.1:+53\": the port must be a number from 1 to 65535",
        );
        check(
            "dns://[::1]53",
            &[],
            "error: discovery uri \"dns://[::1]53\": the server must be an IP address (dns://127.0.0.1:53, dns://[::1]:53), not a name",
        );
        check(
            "dns://::1",
            &[],
            "error: discovery uri \"dns://::1\": the server must be an IP address (dns://127.0.0.1:53, dns://[::1]:53), not a name",
        );
        check(
            "dns://127.0.0.1/_redis._tcp",
            &[],
            "error: discovery uri \"dns://127.0.0.1/_redis._tcp\": expected only SERVER or SERVER:PORT after dns://",
        );
        check(
            "dns://",
            &["min_ttl=5s", "max_ttl=1s"],
            "error: dns option max_ttl=\"1s\": must not be below min_ttl",
        );
        check(
            "dns://",
            &["nxdomain_hold=soon"],
            "error: dns option nxdomain_hold=\"soon\": expected a duration such as 500ms, 3s, 2m or 1h",
        );
        check(
            "dns://",
            &["attempts=0"],
            "error: dns option attempts=\"0\": expected a whole number greater than 0",
        );
        check(
            "dns://",
            &["attempts=11"],
            "error: dns option attempts=\"11\": at most 10",
        );
        check(
            "dns://",
            &["ttl=5s"],
            "error: unknown dns option ttl=\"5s\" (known: min_ttl, max_ttl, nxdomain_hold, timeout, attempts, backoff_max)",
        );
    }
}
