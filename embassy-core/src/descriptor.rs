//! Service descriptors: `<SERVICE>[<TAG>,..];<PORT>/<PROTO>[;key=value..]`.
//!
//! The parser is total: every input yields a descriptor or an error naming the part that is
//! wrong and the offending text. `Display` prints the canonical form, which parses back to an
//! equal descriptor.

use std::{collections::BTreeMap, fmt, str::FromStr};

use embassy_plugin_api::Protocol;
use thiserror::Error;

/// One service request, as a container or the command line states it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceDescriptor {
    /// An etcd key prefix (starts with `/`) or a Consul-style service name.
    pub service: String,
    /// Instances must carry every one of these.
    pub tags: Vec<String>,
    /// The local port the listener binds.
    pub port: u16,
    pub protocol: Protocol,
    /// `key=value` options, validated against [`KNOWN_OPTIONS`].
    pub options: BTreeMap<String, String>,
}

/// Options a descriptor may carry, with what each means.
pub const KNOWN_OPTIONS: &[(&str, &str)] = &[
    (
        "balancer",
        "name of the balancer plugin for this service (default: --balancer)",
    ),
    (
        "connect_timeout",
        "upstream connect timeout, e.g. 500ms or 3s",
    ),
    (
        "idle_timeout",
        "close a TCP connection after this long with no byte either way (default: --idle-timeout)",
    ),
    (
        "half_close_timeout",
        "close a TCP connection one side has finished after this long with no byte moving (default: --half-close-timeout)",
    ),
    (
        "queue_timeout",
        "how long a TCP connection accepted with no endpoint waits for one, then is reset (default: --queue-timeout)",
    ),
    (
        "max_connections",
        "most TCP connections open at once; more wait in the listen backlog (default: --max-connections)",
    ),
    ("udp_idle", "seconds a UDP session may stay idle"),
    ("udp_max_sessions", "most UDP sessions kept at once"),
];

/// What is wrong with a descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DescriptorError {
    #[error("descriptor is empty")]
    Empty,
    #[error("missing ';<PORT>/<PROTO>' after the service in {0:?}")]
    MissingPort(String),
    #[error("service name is empty")]
    EmptyService,
    #[error("service {service:?} contains {found:?}, which is not allowed in a service name")]
    InvalidServiceChar { service: String, found: char },
    #[error("tag list {0:?} is not closed with ']'")]
    UnclosedTags(String),
    #[error("unexpected {found:?} after the tag list in {text:?}")]
    TextAfterTags { text: String, found: String },
    #[error("tag list is empty: write no brackets for no tags")]
    EmptyTagList,
    #[error("tag list {0:?} has an empty tag")]
    EmptyTag(String),
    #[error("tag {tag:?} contains {found:?}, which is not allowed in a tag")]
    InvalidTagChar { tag: String, found: char },
    #[error("port is missing before '/{0}'")]
    EmptyPort(String),
    #[error("port {0:?} is not a number from 1 to 65535")]
    InvalidPort(String),
    #[error("protocol {0:?} is not 'tcp' or 'udp'")]
    InvalidProtocol(String),
    #[error("option {0:?} is not of the form key=value")]
    MalformedOption(String),
    #[error("unknown option {key:?} (known: {known})")]
    UnknownOption { key: String, known: String },
    #[error("option {0:?} is given twice")]
    DuplicateOption(String),
    #[error("option {key}={value:?} is invalid: {reason}")]
    InvalidOptionValue {
        key: String,
        value: String,
        reason: &'static str,
    },
}

impl ServiceDescriptor {
    /// A plain descriptor: no tags, no options.
    pub fn new(service: impl Into<String>, port: u16, protocol: Protocol) -> Self {
        ServiceDescriptor {
            service: service.into(),
            tags: Vec::new(),
            port,
            protocol,
            options: BTreeMap::new(),
        }
    }

    /// True when the service names an etcd-style key prefix rather than a service name.
    pub fn is_key_prefix(&self) -> bool {
        self.service.starts_with('/')
    }

    /// The value of option `key`, if given.
    pub fn option(&self, key: &str) -> Option<&str> {
        self.options.get(key).map(String::as_str)
    }
}

impl FromStr for ServiceDescriptor {
    type Err = DescriptorError;

    fn from_str(input: &str) -> Result<Self, DescriptorError> {
        let text = input.trim();
        if text.is_empty() {
            return Err(DescriptorError::Empty);
        }
        let mut parts = text.split(';');
        // `split` always yields a first item.
        let head = parts.next().unwrap_or_default();
        let port_proto = parts
            .next()
            .ok_or_else(|| DescriptorError::MissingPort(text.to_string()))?;
        let (service, tags) = parse_head(head)?;
        let (port, protocol) = parse_port_proto(port_proto)?;
        let mut options = BTreeMap::new();
        for option in parts {
            let (key, value) = parse_option(option)?;
            if options.insert(key.clone(), value).is_some() {
                return Err(DescriptorError::DuplicateOption(key));
            }
        }
        Ok(ServiceDescriptor {
            service,
            tags,
            port,
            protocol,
            options,
        })
    }
}

impl fmt::Display for ServiceDescriptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.service)?;
        if !self.tags.is_empty() {
            write!(f, "[{}]", self.tags.join(","))?;
        }
        write!(f, ";{}/{}", self.port, self.protocol)?;
        for (key, value) in &self.options {
            write!(f, ";{key}={value}")?;
        }
        Ok(())
    }
}

/// Characters that would make a name ambiguous in the grammar or in a URL or key.
fn forbidden(c: char) -> bool {
    c.is_whitespace() || c.is_control() || matches!(c, '[' | ']' | ';' | ',' | '"' | '\'' | '=')
}

fn parse_head(head: &str) -> Result<(String, Vec<String>), DescriptorError> {
    let (service, tags) = match head.find('[') {
        None => (head, None),
        Some(open) => {
            let rest = &head[open + 1..];
            let close = rest
                .find(']')
                .ok_or_else(|| DescriptorError::UnclosedTags(head[open..].to_string()))?;
            let after = &rest[close + 1..];
            if !after.is_empty() {
                return Err(DescriptorError::TextAfterTags {
                    text: head.to_string(),
                    found: after.to_string(),
                });
            }
            (&head[..open], Some(&rest[..close]))
        }
    };
    if service.is_empty() {
        return Err(DescriptorError::EmptyService);
    }
    if let Some(found) = service.chars().find(|&c| forbidden(c)) {
        return Err(DescriptorError::InvalidServiceChar {
            service: service.to_string(),
            found,
        });
    }
    let tags = match tags {
        None => Vec::new(),
        Some("") => return Err(DescriptorError::EmptyTagList),
        Some(list) => list
            .split(',')
            .map(|tag| {
                let tag = tag.trim();
                if tag.is_empty() {
                    return Err(DescriptorError::EmptyTag(format!("[{list}]")));
                }
                if let Some(found) = tag.chars().find(|&c| forbidden(c)) {
                    return Err(DescriptorError::InvalidTagChar {
                        tag: tag.to_string(),
                        found,
                    });
                }
                Ok(tag.to_string())
            })
            .collect::<Result<_, _>>()?,
    };
    Ok((service.to_string(), tags))
}

fn parse_port_proto(text: &str) -> Result<(u16, Protocol), DescriptorError> {
    let (port, proto) = match text.split_once('/') {
        Some((port, proto)) => (port.trim(), proto.trim()),
        // Like `docker run -p`, a missing protocol means tcp.
        None => (text.trim(), "tcp"),
    };
    if port.is_empty() {
        return Err(DescriptorError::EmptyPort(proto.to_string()));
    }
    let port = match port.parse::<u16>() {
        Ok(0) | Err(_) => return Err(DescriptorError::InvalidPort(port.to_string())),
        Ok(port) => port,
    };
    let protocol = match proto.to_ascii_lowercase().as_str() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        _ => return Err(DescriptorError::InvalidProtocol(proto.to_string())),
    };
    Ok((port, protocol))
}

fn parse_option(option: &str) -> Result<(String, String), DescriptorError> {
    let (key, value) = option
        .split_once('=')
        .map(|(k, v)| (k.trim(), v.trim()))
        .filter(|(k, v)| !k.is_empty() && !v.is_empty())
        .ok_or_else(|| DescriptorError::MalformedOption(option.to_string()))?;
    if !KNOWN_OPTIONS.iter().any(|(known, _)| *known == key) {
        return Err(DescriptorError::UnknownOption {
            key: key.to_string(),
            known: KNOWN_OPTIONS
                .iter()
                .map(|(k, _)| *k)
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    let invalid = |reason| DescriptorError::InvalidOptionValue {
        key: key.to_string(),
        value: value.to_string(),
        reason,
    };
    match key {
        "balancer" if value.chars().any(forbidden) => {
            return Err(invalid(
                "a plugin name has no spaces or punctuation of the grammar",
            ))
        }
        "connect_timeout" | "idle_timeout" | "half_close_timeout" | "queue_timeout"
            if parse_duration(value).is_none() =>
        {
            return Err(invalid("expected a duration such as 500ms or 3s"))
        }
        "udp_idle" | "udp_max_sessions" | "max_connections" if !matches!(value.parse::<u64>(), Ok(n) if n > 0) => {
            return Err(invalid("expected a whole number greater than 0"))
        }
        _ => {}
    }
    Ok((key.to_string(), value.to_string()))
}

/// `500ms`, `3s`, `2m`, `1h` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let duration = match unit {
        "ms" => Duration::from_millis(number),
        "" | "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number.checked_mul(60)?),
        "h" => Duration::from_secs(number.checked_mul(3600)?),
        _ => return None,
    };
    (!duration.is_zero()).then_some(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `input` and compares with `expected`: the canonical form of a valid descriptor,
    /// or `error: <message>`.
    fn check(input: &str, expected: &str) {
        let actual = match input.parse::<ServiceDescriptor>() {
            Ok(descriptor) => {
                let canonical = descriptor.to_string();
                let reparsed: ServiceDescriptor = canonical.parse().expect("canonical form parses");
                assert_eq!(reparsed, descriptor, "round trip of {input:?}");
                canonical
            }
            Err(error) => format!("error: {error}"),
        };
        assert_eq!(actual, expected, "input {input:?}");
    }

    #[test]
    fn valid_descriptors_round_trip() {
        check(
            "/services/prod/app1/80[prod,app1];80/tcp",
            "/services/prod/app1/80[prod,app1];80/tcp",
        );
        check("redis.master[prod];6379/tcp", "redis.master[prod];6379/tcp");
        check(
            "redis.master[prod,stats];6379/tcp",
            "redis.master[prod,stats];6379/tcp",
        );
        check(
            "/services/prod/db/slaves/3306;3306/tcp",
            "/services/prod/db/slaves/3306;3306/tcp",
        );
        check("web;8080", "web;8080/tcp");
        check("  dns;53/UDP  ", "dns;53/udp");
        check("web[ a , b ];80/tcp", "web[a,b];80/tcp");
        check(
            "web;80/tcp;balancer=least-conn",
            "web;80/tcp;balancer=least-conn",
        );
        check(
            "web;80/tcp;connect_timeout=500ms;balancer=rr",
            "web;80/tcp;balancer=rr;connect_timeout=500ms",
        );
        check(
            "dns;53/udp;udp_idle=30;udp_max_sessions=1000",
            "dns;53/udp;udp_idle=30;udp_max_sessions=1000",
        );
        check("svc;65535/tcp", "svc;65535/tcp");
    }

    #[test]
    fn malformed_descriptors_say_what_is_wrong() {
        check("", "error: descriptor is empty");
        check("   ", "error: descriptor is empty");
        check(
            "web",
            "error: missing ';<PORT>/<PROTO>' after the service in \"web\"",
        );
        check(";80/tcp", "error: service name is empty");
        check("[prod];80/tcp", "error: service name is empty");
        check(
            "my web;80/tcp",
            "error: service \"my web\" contains ' ', which is not allowed in a service name",
        );
        check(
            "\"web\";80/tcp",
            "error: service \"\\\"web\\\"\" contains '\"', which is not allowed in a service name",
        );
        check(
            "web[prod;80/tcp",
            "error: tag list \"[prod\" is not closed with ']'",
        );
        check(
            "web[prod]x;80/tcp",
            "error: unexpected \"x\" after the tag list in \"web[prod]x\"",
        );
        check(
            "web[];80/tcp",
            "error: tag list is empty: write no brackets for no tags",
        );
        check(
            "web[prod,];80/tcp",
            "error: tag list \"[prod,]\" has an empty tag",
        );
        check(
            "web[pr=od];80/tcp",
            "error: tag \"pr=od\" contains '=', which is not allowed in a tag",
        );
        check("web;/tcp", "error: port is missing before '/tcp'");
        check(
            "web;http/tcp",
            "error: port \"http\" is not a number from 1 to 65535",
        );
        check(
            "web;0/tcp",
            "error: port \"0\" is not a number from 1 to 65535",
        );
        check(
            "web;65536/tcp",
            "error: port \"65536\" is not a number from 1 to 65535",
        );
        check(
            "web;-1/tcp",
            "error: port \"-1\" is not a number from 1 to 65535",
        );
        check(
            "web;80/sctp",
            "error: protocol \"sctp\" is not 'tcp' or 'udp'",
        );
        check("web;80/", "error: protocol \"\" is not 'tcp' or 'udp'");
        check(
            "web;80/tcp;balancer",
            "error: option \"balancer\" is not of the form key=value",
        );
        check(
            "web;80/tcp;=x",
            "error: option \"=x\" is not of the form key=value",
        );
        check(
            "web;80/tcp;",
            "error: option \"\" is not of the form key=value",
        );
        check(
            "web;80/tcp;colour=blue",
            "error: unknown option \"colour\" (known: balancer, connect_timeout, idle_timeout, half_close_timeout, queue_timeout, max_connections, udp_idle, udp_max_sessions)",
        );
        check(
            "web;80/tcp;balancer=a;balancer=b",
            "error: option \"balancer\" is given twice",
        );
        check(
            "web;80/tcp;connect_timeout=soon",
            "error: option connect_timeout=\"soon\" is invalid: expected a duration such as 500ms or 3s",
        );
        check(
            "web;80/tcp;idle_timeout=5m;half_close_timeout=10s;queue_timeout=500ms;max_connections=100",
            "web;80/tcp;half_close_timeout=10s;idle_timeout=5m;max_connections=100;queue_timeout=500ms",
        );
        check(
            "web;80/tcp;half_close_timeout=0s",
            "error: option half_close_timeout=\"0s\" is invalid: expected a duration such as 500ms or 3s",
        );
        check(
            "web;80/tcp;max_connections=-1",
            "error: option max_connections=\"-1\" is invalid: expected a whole number greater than 0",
        );
        check(
            "dns;53/udp;udp_idle=0",
            "error: option udp_idle=\"0\" is invalid: expected a whole number greater than 0",
        );
    }

    #[test]
    fn key_prefixes_are_told_from_service_names() {
        let etcd: ServiceDescriptor = "/services/prod/app1/80;80/tcp".parse().expect("valid");
        let consul: ServiceDescriptor = "redis.master;6379/tcp".parse().expect("valid");
        assert!(etcd.is_key_prefix());
        assert!(!consul.is_key_prefix());
    }

    #[test]
    fn durations() {
        use std::time::Duration;
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("0s"), None);
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("3d"), None);
        assert_eq!(parse_duration(""), None);
    }
}
