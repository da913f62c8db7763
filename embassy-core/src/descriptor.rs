//! Service descriptors: `<SERVICE>[<TAG>,..];<PORT>/<PROTO>[;key=value..]`.
//!
//! The parser is total: every input yields a descriptor or an error naming the part that is
//! wrong and the offending text. It is also strict: inside the descriptor there is no
//! whitespace, a port is plain decimal, the protocol is lowercase, a tag or option comes once,
//! and a UDP option needs a UDP service, since each leniency would let a typo pass unnoticed.
//! Only the ends of the whole string are trimmed. `Display` prints the canonical form, which
//! parses back to an equal descriptor.

use std::{collections::BTreeMap, fmt, str::FromStr};

use embassy_plugin_api::Protocol;

use crate::{check::CheckSpec, health::OnRemove};
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
    (
        "eject_after",
        "consecutive connect failures that take an endpoint out of rotation; 0 turns passive ejection off (default: --eject-after)",
    ),
    (
        "eject_time",
        "how long the first ejection lasts; each one in a row doubles it (default: --eject-time)",
    ),
    (
        "eject_max_time",
        "the longest an ejection lasts (default: --eject-max-time)",
    ),
    (
        "max_ejected",
        "most endpoints ejected at once, as a share such as 50% (one may always be) (default: --max-ejected)",
    ),
    (
        "panic_threshold",
        "below this share of fit endpoints, e.g. 50%, all are used; none fit always means all (default: --panic-threshold)",
    ),
    (
        "on_remove",
        "keep, drain or close: what happens to TCP connections to an endpoint discovery removed (default: --on-remove)",
    ),
    (
        "drain_timeout",
        "with on_remove=drain, how long those connections may run before they are reset (default: --drain-timeout)",
    ),
    (
        "remove_delay",
        "an endpoint discovery stops listing stays in rotation this long while healthy; 0: none (default: --remove-delay)",
    ),
    (
        "check",
        "active check: tcp, http:/PATH, send:TEXT,expect:TEXT or udp:send:TEXT,expect:TEXT (escapes \\r \\n \\t \\\\ \\xHH) (default: none)",
    ),
    (
        "check_interval",
        "between two checks of an endpoint, jittered (default: --check-interval)",
    ),
    (
        "check_timeout",
        "deadline of one check, connect and answer (default: --check-timeout)",
    ),
    (
        "check_rise",
        "passing checks in a row that bring a failing endpoint back (default: --check-rise)",
    ),
    (
        "check_fall",
        "failing checks in a row that take a passing endpoint out (default: --check-fall)",
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
    #[error("tag {tag:?} is given twice in {list:?}")]
    DuplicateTag { tag: String, list: String },
    #[error("port is missing in {0:?}: the part after the service is empty")]
    EmptyPortPart(String),
    #[error("port is missing in {text:?}: nothing before '/{protocol}'")]
    EmptyPort { text: String, protocol: String },
    #[error("port {0:?} is not a number from 1 to 65535")]
    InvalidPort(String),
    #[error("port {port:?} has {what}: write {meant}")]
    UnplainPort {
        port: String,
        what: &'static str,
        meant: u16,
    },
    #[error("protocol is missing after {0:?}")]
    EmptyProtocol(String),
    #[error("protocol {0:?} is not 'tcp' or 'udp'")]
    InvalidProtocol(String),
    #[error("protocol {found:?} {what}: write '{meant}'")]
    UnplainProtocol {
        found: String,
        what: &'static str,
        meant: Protocol,
    },
    #[error("option {0:?} is not of the form key=value")]
    MalformedOption(String),
    #[error("option {0:?} contains whitespace, which is not allowed in a descriptor")]
    OptionWhitespace(String),
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
    #[error("option check={value:?} is invalid: {error}")]
    InvalidCheck {
        value: String,
        error: crate::check::CheckSpecError,
    },
    #[error("option {key:?} applies to {applies} services only, and this one is {protocol}")]
    OptionOfOtherProtocol {
        key: String,
        applies: Protocol,
        protocol: Protocol,
    },
}

/// Options that mean something for one protocol only: on a service of the other they would be
/// silently ignored.
const PROTOCOL_OPTIONS: &[(&str, Protocol)] = &[
    ("udp_idle", Protocol::Udp),
    ("udp_max_sessions", Protocol::Udp),
    ("idle_timeout", Protocol::Tcp),
    ("half_close_timeout", Protocol::Tcp),
    ("queue_timeout", Protocol::Tcp),
    ("max_connections", Protocol::Tcp),
    ("on_remove", Protocol::Tcp),
    ("drain_timeout", Protocol::Tcp),
];

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
    /// Whether `other` asks for the same service on the same port: what names a listener.
    /// Options are tunables (a balancer, timeouts, checks), not part of the identity.
    pub fn same_service(&self, other: &ServiceDescriptor) -> bool {
        self.service == other.service
            && self.tags == other.tags
            && self.port == other.port
            && self.protocol == other.protocol
    }

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
        let (port, protocol) = parse_port_proto(text, port_proto)?;
        let mut options = BTreeMap::new();
        for option in parts {
            let (key, value) = parse_option(option)?;
            if options.insert(key.clone(), value).is_some() {
                return Err(DescriptorError::DuplicateOption(key));
            }
        }
        if let Some((key, applies)) = PROTOCOL_OPTIONS
            .iter()
            .find(|(key, applies)| *applies != protocol && options.contains_key(*key))
        {
            return Err(DescriptorError::OptionOfOtherProtocol {
                key: key.to_string(),
                applies: *applies,
                protocol,
            });
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
        Some(list) => {
            let mut tags: Vec<String> = Vec::new();
            for tag in list.split(',') {
                if tag.is_empty() {
                    return Err(DescriptorError::EmptyTag(format!("[{list}]")));
                }
                if let Some(found) = tag.chars().find(|&c| forbidden(c)) {
                    return Err(DescriptorError::InvalidTagChar {
                        tag: tag.to_string(),
                        found,
                    });
                }
                if tags.iter().any(|t| t == tag) {
                    return Err(DescriptorError::DuplicateTag {
                        tag: tag.to_string(),
                        list: format!("[{list}]"),
                    });
                }
                tags.push(tag.to_string());
            }
            tags
        }
    };
    Ok((service.to_string(), tags))
}

/// `text` is the whole descriptor, for naming it when the port is missing.
fn parse_port_proto(text: &str, part: &str) -> Result<(u16, Protocol), DescriptorError> {
    let (port, proto) = match part.split_once('/') {
        Some((port, proto)) => (port, Some(proto)),
        // Like `docker run -p`, a missing protocol means tcp.
        None => (part, None),
    };
    if port.is_empty() {
        return Err(match proto {
            Some(protocol) => DescriptorError::EmptyPort {
                text: text.to_string(),
                protocol: protocol.to_string(),
            },
            None => DescriptorError::EmptyPortPart(text.to_string()),
        });
    }
    let port = parse_port(port)?;
    let protocol = match proto {
        None => Protocol::Tcp,
        Some(proto) => parse_protocol(port, proto)?,
    };
    Ok((port, protocol))
}

/// Plain decimal only: `+80`, `080` or ` 80` is refused (naming what to write instead), since
/// a port written oddly is more often a typo than a style.
fn parse_port(port: &str) -> Result<u16, DescriptorError> {
    let invalid = || DescriptorError::InvalidPort(port.to_string());
    let what = if port.contains(char::is_whitespace) {
        "whitespace"
    } else if port.starts_with('+') {
        "a sign"
    } else if port.len() > 1 && port.starts_with('0') {
        "a leading zero"
    } else if port.bytes().all(|b| b.is_ascii_digit()) {
        return match port.parse::<u16>() {
            Ok(0) | Err(_) => Err(invalid()),
            Ok(port) => Ok(port),
        };
    } else {
        return Err(invalid());
    };
    // What the operator most likely meant, if anything.
    let bare: String = port.chars().filter(|c| !c.is_whitespace()).collect();
    let bare = bare
        .strip_prefix('+')
        .unwrap_or(&bare)
        .trim_start_matches('0');
    match bare.parse::<u16>() {
        Ok(meant) if meant > 0 && bare.bytes().all(|b| b.is_ascii_digit()) => {
            Err(DescriptorError::UnplainPort {
                port: port.to_string(),
                what,
                meant,
            })
        }
        _ => Err(invalid()),
    }
}

/// `tcp` or `udp` exactly, as the canonical form writes them.
fn parse_protocol(port: u16, proto: &str) -> Result<Protocol, DescriptorError> {
    let known = |text: &str| match text {
        "tcp" => Some(Protocol::Tcp),
        "udp" => Some(Protocol::Udp),
        _ => None,
    };
    if let Some(protocol) = known(proto) {
        return Ok(protocol);
    }
    if proto.is_empty() {
        return Err(DescriptorError::EmptyProtocol(format!("{port}/")));
    }
    let (what, meant) = if proto.contains(char::is_whitespace) {
        ("has whitespace", known(&proto.trim().to_ascii_lowercase()))
    } else {
        ("must be lowercase", known(&proto.to_ascii_lowercase()))
    };
    Err(match meant {
        Some(meant) => DescriptorError::UnplainProtocol {
            found: proto.to_string(),
            what,
            meant,
        },
        None => DescriptorError::InvalidProtocol(proto.to_string()),
    })
}

fn parse_option(option: &str) -> Result<(String, String), DescriptorError> {
    if option.contains(char::is_whitespace) {
        return Err(DescriptorError::OptionWhitespace(option.to_string()));
    }
    let (key, value) = option
        .split_once('=')
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
        | "eject_time" | "eject_max_time" | "drain_timeout" | "check_interval"
        | "check_timeout"
            if parse_duration(value).is_none() =>
        {
            return Err(invalid("expected a duration such as 500ms or 3s"))
        }
        "udp_idle" | "udp_max_sessions" | "max_connections" | "check_rise" | "check_fall" if !matches!(plain_number(value), Some(n) if n > 0) => {
            return Err(invalid("expected a whole number greater than 0"))
        }
        "remove_delay" if value != "0" && parse_duration(value).is_none() => {
            return Err(invalid("expected a duration such as 500ms or 3s, or 0"))
        }
        "eject_after" if plain_number(value).is_none_or(|n| n > u64::from(u32::MAX)) => {
            return Err(invalid(
                "expected a whole number (0 turns passive ejection off)",
            ))
        }
        "max_ejected" | "panic_threshold" if parse_percent(value).is_none() => {
            return Err(invalid("expected a share from 0% to 100%"))
        }
        "check" => {
            if let Err(error) = value.parse::<CheckSpec>() {
                return Err(DescriptorError::InvalidCheck {
                    value: value.to_string(),
                    error,
                });
            }
        }
        "on_remove" if OnRemove::parse(value).is_none() => {
            return Err(invalid("expected keep, drain or close"))
        }
        _ => {}
    }
    Ok((key.to_string(), value.to_string()))
}

/// A number written as plain decimal digits (no sign, no leading zero), as options take them.
pub fn plain_number(text: &str) -> Option<u64> {
    let plain = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    plain.then(|| text.parse().ok()).flatten()
}

/// A share written `50%` (or `50`), from 0 to 100.
pub fn parse_percent(text: &str) -> Option<u32> {
    let digits = text.strip_suffix('%').unwrap_or(text);
    plain_number(digits)
        .filter(|&n| n <= 100)
        .and_then(|n| u32::try_from(n).ok())
}

/// `500ms`, `3s`, `2m`, `1h` or a bare number of seconds: the one grammar of
/// [`embassy_plugin_api::support::duration`], which plugin options share.
pub fn parse_duration(text: &str) -> Option<std::time::Duration> {
    embassy_plugin_api::support::parse_duration(text).ok()
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
        check("  dns;53/udp\n", "dns;53/udp");
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
        check(
            "web ;80/tcp",
            "error: service \"web \" contains ' ', which is not allowed in a service name",
        );
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
        check(
            "web[a,a];80/tcp",
            "error: tag \"a\" is given twice in \"[a,a]\"",
        );
        check(
            "web[a,b,a];80/tcp",
            "error: tag \"a\" is given twice in \"[a,b,a]\"",
        );
        check(
            "web[ a , b ];80/tcp",
            "error: tag \" a \" contains ' ', which is not allowed in a tag",
        );
        check(
            "web[a,\tb];80/tcp",
            "error: tag \"\\tb\" contains '\\t', which is not allowed in a tag",
        );
        check(
            "web;/tcp",
            "error: port is missing in \"web;/tcp\": nothing before '/tcp'",
        );
        check(
            "bad;;x",
            "error: port is missing in \"bad;;x\": the part after the service is empty",
        );
        check(
            "web;",
            "error: port is missing in \"web;\": the part after the service is empty",
        );
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
            "web; 80/tcp",
            "error: port \" 80\" has whitespace: write 80",
        );
        check(
            "web;80 /tcp",
            "error: port \"80 \" has whitespace: write 80",
        );
        check(
            "web;8 0/tcp",
            "error: port \"8 0\" has whitespace: write 80",
        );
        check("web;+80/tcp", "error: port \"+80\" has a sign: write 80");
        check(
            "web;080/tcp",
            "error: port \"080\" has a leading zero: write 80",
        );
        check(
            "web;000443",
            "error: port \"000443\" has a leading zero: write 443",
        );
        check(
            "web;00/tcp",
            "error: port \"00\" is not a number from 1 to 65535",
        );
        check(
            "web;+0/tcp",
            "error: port \"+0\" is not a number from 1 to 65535",
        );
        check(
            "web;++80/tcp",
            "error: port \"++80\" is not a number from 1 to 65535",
        );
        check(
            "web;+99999/tcp",
            "error: port \"+99999\" is not a number from 1 to 65535",
        );
        check(
            "web;80/sctp",
            "error: protocol \"sctp\" is not 'tcp' or 'udp'",
        );
        check("web;80/", "error: protocol is missing after \"80/\"");
        check(
            "web;80/TCP",
            "error: protocol \"TCP\" must be lowercase: write 'tcp'",
        );
        check(
            "dns;53/Udp",
            "error: protocol \"Udp\" must be lowercase: write 'udp'",
        );
        check(
            "web;80/tcp ;balancer=rr",
            "error: protocol \"tcp \" has whitespace: write 'tcp'",
        );
        check(
            "web;80/ TCP",
            "error: protocol \" TCP\" has whitespace: write 'tcp'",
        );
        check(
            "web;80/t cp",
            "error: protocol \"t cp\" is not 'tcp' or 'udp'",
        );
        check(
            "web;80/tcp/udp",
            "error: protocol \"tcp/udp\" is not 'tcp' or 'udp'",
        );
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
            "error: unknown option \"colour\" (known: balancer, connect_timeout, idle_timeout, half_close_timeout, queue_timeout, max_connections, eject_after, eject_time, eject_max_time, max_ejected, panic_threshold, on_remove, drain_timeout, remove_delay, check, check_interval, check_timeout, check_rise, check_fall, udp_idle, udp_max_sessions)",
        );
        check(
            "web;80/tcp;eject_after=0;eject_time=2s;eject_max_time=1m;max_ejected=30%;panic_threshold=0",
            "web;80/tcp;eject_after=0;eject_max_time=1m;eject_time=2s;max_ejected=30%;panic_threshold=0",
        );
        check(
            "web;80/tcp;on_remove=drain;drain_timeout=10s;remove_delay=5s",
            "web;80/tcp;drain_timeout=10s;on_remove=drain;remove_delay=5s",
        );
        check("web;80/tcp;remove_delay=0", "web;80/tcp;remove_delay=0");
        check(
            "redis;6379/tcp;check=send:PING,expect:PONG;check_interval=1s;check_timeout=500ms;check_rise=1;check_fall=2",
            "redis;6379/tcp;check=send:PING,expect:PONG;check_fall=2;check_interval=1s;check_rise=1;check_timeout=500ms",
        );
        check(
            "dns;53/udp;check=udp:send:x,expect:y",
            "dns;53/udp;check=udp:send:x,expect:y",
        );
        check(
            "web;80/tcp;check=http:healthz",
            "error: option check=\"http:healthz\" is invalid: http check path \"healthz\" does not start with '/'",
        );
        check(
            "web;80/tcp;check_rise=0",
            "error: option check_rise=\"0\" is invalid: expected a whole number greater than 0",
        );
        check(
            "web;80/tcp;remove_delay=0s",
            "error: option remove_delay=\"0s\" is invalid: expected a duration such as 500ms or 3s, or 0",
        );
        check(
            "web;80/tcp;eject_after=-1",
            "error: option eject_after=\"-1\" is invalid: expected a whole number (0 turns passive ejection off)",
        );
        check(
            "web;80/tcp;max_ejected=101%",
            "error: option max_ejected=\"101%\" is invalid: expected a share from 0% to 100%",
        );
        check(
            "web;80/tcp;panic_threshold=half",
            "error: option panic_threshold=\"half\" is invalid: expected a share from 0% to 100%",
        );
        check(
            "web;80/tcp;on_remove=drop",
            "error: option on_remove=\"drop\" is invalid: expected keep, drain or close",
        );
        check(
            "dns;53/udp;on_remove=close",
            "error: option \"on_remove\" applies to tcp services only, and this one is udp",
        );
        check(
            "web;80/tcp; balancer=rr",
            "error: option \" balancer=rr\" contains whitespace, which is not allowed in a descriptor",
        );
        check(
            "web;80/tcp;balancer = rr",
            "error: option \"balancer = rr\" contains whitespace, which is not allowed in a descriptor",
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
        check(
            "dns;53/udp;udp_idle=030",
            "error: option udp_idle=\"030\" is invalid: expected a whole number greater than 0",
        );
        check(
            "dns;53/udp;udp_max_sessions=+5",
            "error: option udp_max_sessions=\"+5\" is invalid: expected a whole number greater than 0",
        );
        check(
            "dns;53/udp;max_connections=100",
            "error: option \"max_connections\" applies to tcp services only, and this one is udp",
        );
        check(
            "dns;53/udp;idle_timeout=1m",
            "error: option \"idle_timeout\" applies to tcp services only, and this one is udp",
        );
        check(
            "web;80/tcp;udp_idle=30",
            "error: option \"udp_idle\" applies to udp services only, and this one is tcp",
        );
        check(
            "web;80;udp_max_sessions=10",
            "error: option \"udp_max_sessions\" applies to udp services only, and this one is tcp",
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

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    /// A name the grammar allows (service or tag): anything but whitespace, control characters
    /// and the grammar's punctuation.
    fn name() -> impl Strategy<Value = String> {
        "[^\\[\\];,\"'=\\s\\p{Cc}]{1,12}"
    }

    fn duration() -> impl Strategy<Value = String> {
        (
            1u64..100_000,
            prop::sample::select(vec!["ms", "s", "m", ""]),
        )
            .prop_map(|(n, unit)| format!("{n}{unit}"))
    }

    fn count() -> impl Strategy<Value = String> {
        (1u64..=u64::MAX).prop_map(|n| n.to_string())
    }

    /// Every descriptor the parser accepts, as a value (not as text).
    fn descriptor() -> impl Strategy<Value = ServiceDescriptor> {
        let tags = prop::collection::vec(name(), 0..4).prop_map(|mut tags| {
            let mut seen = std::collections::HashSet::new();
            tags.retain(|tag| seen.insert(tag.clone()));
            tags
        });
        let protocol = prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp)];
        (
            name(),
            tags,
            1u16..=65535,
            protocol,
            prop::option::of(name()),
            prop::option::of(duration()),
            prop::option::of(count()),
            prop::option::of(count()),
        )
            .prop_map(
                |(service, tags, port, protocol, balancer, timeout, idle, sessions)| {
                    let mut options = BTreeMap::new();
                    let mut set = |key: &str, value: Option<String>| {
                        if let Some(value) = value {
                            options.insert(key.to_string(), value);
                        }
                    };
                    set("balancer", balancer);
                    set("connect_timeout", timeout);
                    if protocol == Protocol::Udp {
                        set("udp_idle", idle);
                        set("udp_max_sessions", sessions);
                    }
                    ServiceDescriptor {
                        service,
                        tags,
                        port,
                        protocol,
                        options,
                    }
                },
            )
    }

    /// Text near the grammar, so that many cases get past the first checks.
    fn near_grammar() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9/\\[\\],;=+ \\t_.:-]{0,40}"
    }

    /// A parse that succeeds must print a canonical form that parses to the same value and
    /// prints the same again.
    fn assert_canonical(input: &str) -> Result<(), TestCaseError> {
        if let Ok(parsed) = input.parse::<ServiceDescriptor>() {
            let canonical = parsed.to_string();
            let again: ServiceDescriptor = canonical
                .parse()
                .map_err(|e| TestCaseError::fail(format!("{canonical:?}: {e}")))?;
            prop_assert_eq!(&again, &parsed, "{:?}", input);
            prop_assert_eq!(again.to_string(), canonical);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_text_is_a_descriptor_or_an_error(input in any::<String>()) {
            assert_canonical(&input)?;
        }

        #[test]
        fn text_near_the_grammar_is_a_descriptor_or_an_error(input in near_grammar()) {
            assert_canonical(&input)?;
        }

        #[test]
        fn valid_descriptors_round_trip(descriptor in descriptor()) {
            let text = descriptor.to_string();
            prop_assert_eq!(text.parse::<ServiceDescriptor>(), Ok(descriptor.clone()), "{}", text);
        }

        /// One character inserted or removed anywhere: still total, still canonical.
        #[test]
        fn edited_descriptors_are_a_descriptor_or_an_error(
            descriptor in descriptor(),
            at in any::<prop::sample::Index>(),
            insert in prop::option::of(any::<char>()),
        ) {
            let mut chars: Vec<char> = descriptor.to_string().chars().collect();
            let at = at.index(chars.len() + 1);
            match insert {
                Some(c) => chars.insert(at, c),
                None if at < chars.len() => {
                    chars.remove(at);
                }
                None => {}
            }
            assert_canonical(&chars.into_iter().collect::<String>())?;
        }

        /// Whitespace inside a descriptor is always refused; at its ends it is trimmed.
        #[test]
        fn whitespace_inside_is_refused(
            descriptor in descriptor(),
            at in any::<prop::sample::Index>(),
            space in prop::sample::select(vec![' ', '\t', '\n', '\u{a0}', '\u{3000}']),
        ) {
            let text = descriptor.to_string();
            let inner: Vec<usize> = text.char_indices().map(|(i, _)| i).skip(1).collect();
            let at = inner[at.index(inner.len())];
            let spaced = format!("{}{space}{}", &text[..at], &text[at..]);
            prop_assert!(spaced.parse::<ServiceDescriptor>().is_err(), "{:?} accepted", spaced);
            let padded = format!("{space}{text}{space}");
            prop_assert_eq!(padded.parse::<ServiceDescriptor>(), Ok(descriptor));
        }

        #[test]
        fn durations_read_as_written(n in any::<u64>(), unit in prop::sample::select(vec!["ms", "s", "m", ""])) {
            use std::time::Duration;
            let expected = match unit {
                "ms" => Some(Duration::from_millis(n)),
                "m" => n.checked_mul(60).map(Duration::from_secs),
                _ => Some(Duration::from_secs(n)),
            }
            .filter(|d| !d.is_zero());
            prop_assert_eq!(parse_duration(&format!("{n}{unit}")), expected);
        }

        #[test]
        fn any_text_is_a_duration_or_none(text in any::<String>()) {
            if let Some(duration) = parse_duration(&text) {
                prop_assert!(!duration.is_zero());
            }
        }
    }
}
