//! The pure half of a watch: what a descriptor's service asks of DNS, and what the records
//! answered make of the endpoint set.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
};

use embassy_plugin_api::{
    support::Selector, text::cut, Endpoint, Excluded, Exclusion, Protocol, WatchRequest,
};
use hickory_resolver::proto::rr::Name;

/// What one watch resolves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// `_service._proto.name`: targets, ports, priorities and weights from SRV records.
    Srv {
        name: String,
        /// `_tcp` / `_udp` in the name; `None` (another label) serves the watch's protocol.
        declared: Option<Protocol>,
    },
    /// `HOST:PORT`: every A/AAAA address of `host`, at `port`.
    Host { host: String, port: u16 },
}

impl Query {
    /// The name queried, for logs and reports.
    pub fn name(&self) -> &str {
        match self {
            Query::Srv { name, .. } | Query::Host { host: name, .. } => name,
        }
    }
}

/// Why a descriptor's service cannot be watched over DNS; each names the service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    #[error(
        "dns service {service:?}: DNS records carry no tags, so [{tags}] would leave every \
         endpoint out; drop the tags from the descriptor"
    )]
    Tags { service: String, tags: String },
    #[error(
        "dns service {0:?} is neither an SRV name (_service._proto.name) nor HOST:PORT: \
         add the port"
    )]
    NoPort(String),
    #[error(
        "dns service {service:?}: an SRV name takes its ports from its records; drop {port:?}"
    )]
    SrvWithPort { service: String, port: String },
    #[error("dns service {service:?}: port {port:?} must be a number from 1 to 65535")]
    BadPort { service: String, port: String },
    #[error("dns service {service:?}: {name:?} is not a domain name: {reason}")]
    BadName {
        service: String,
        name: String,
        reason: String,
    },
}

/// Reads a descriptor's service (and refuses tags: DNS has none to match).
pub fn parse_service<S: AsRef<str>>(service: &str, tags: &[S]) -> Result<Query, ServiceError> {
    if !tags.is_empty() {
        let tags: Vec<&str> = tags.iter().map(AsRef::as_ref).collect();
        return Err(ServiceError::Tags {
            service: service.to_string(),
            tags: tags.join(","),
        });
    }
    let bad_name = |name: &str, reason: String| ServiceError::BadName {
        service: service.to_string(),
        name: name.to_string(),
        reason,
    };
    if service.starts_with('_') {
        if let Some((_, port)) = service.rsplit_once(':') {
            return Err(ServiceError::SrvWithPort {
                service: service.to_string(),
                port: format!(":{port}"),
            });
        }
        check_name(service).map_err(|reason| bad_name(service, reason))?;
        let declared = match service.split('.').nth(1) {
            Some(label) if label.eq_ignore_ascii_case("_tcp") => Some(Protocol::Tcp),
            Some(label) if label.eq_ignore_ascii_case("_udp") => Some(Protocol::Udp),
            _ => None,
        };
        return Ok(Query::Srv {
            name: service.to_string(),
            declared,
        });
    }
    let (host, port) = match service.strip_prefix('[') {
        // `[IPv6]:PORT`
        Some(bracketed) => match bracketed.split_once("]:") {
            Some((ip, port)) => {
                let ip: std::net::Ipv6Addr = ip
                    .parse()
                    .map_err(|_| bad_name(ip, "not an IPv6 address".into()))?;
                (ip.to_string(), port)
            }
            None => return Err(ServiceError::NoPort(service.to_string())),
        },
        None => match service.rsplit_once(':') {
            Some((host, _)) if host.contains(':') => {
                return Err(bad_name(
                    service,
                    "write an IPv6 address in brackets: [ADDRESS]:PORT".into(),
                ))
            }
            Some((host, port)) => (host.to_string(), port),
            None => return Err(ServiceError::NoPort(service.to_string())),
        },
    };
    let port = match port.parse::<u16>() {
        Ok(number) if number > 0 && port.bytes().all(|b| b.is_ascii_digit()) => number,
        _ => {
            return Err(ServiceError::BadPort {
                service: service.to_string(),
                port: port.to_string(),
            })
        }
    };
    if host.parse::<IpAddr>().is_err() {
        check_name(&host).map_err(|reason| bad_name(&host, reason))?;
    }
    Ok(Query::Host { host, port })
}

/// A name DNS can carry: non-empty labels of at most 63 bytes, 255 in all.
fn check_name(name: &str) -> Result<(), String> {
    let bare = name.strip_suffix('.').unwrap_or(name);
    if bare.is_empty() || bare.split('.').any(str::is_empty) {
        return Err("empty label".into());
    }
    Name::from_utf8(name)
        .map(|_| ())
        .map_err(|error| cut(&error.to_string()).into_owned())
}

/// A name as records are compared: lowercase, without the root's dot.
pub fn normal_name(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// One SRV record of the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Srv {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    /// [`normal_name`]d; empty for the root (`.`: "not offered here").
    pub target: String,
}

/// What resolving one SRV target gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addresses {
    Found(Vec<IpAddr>),
    /// No A/AAAA record, with why (`NXDOMAIN`, `no A or AAAA record`).
    Missing(String),
}

/// The endpoints of a watch and every instance left out.
pub type Set = (Vec<Endpoint>, Vec<Excluded>);

/// The priorities of `records`, lowest first, each once: the order targets are tried in.
pub fn priorities(records: &[Srv]) -> Vec<u16> {
    let mut priorities: Vec<u16> = records.iter().map(|r| r.priority).collect();
    priorities.sort_unstable();
    priorities.dedup();
    priorities
}

/// The set from SRV `records` and the `addresses` of their targets.
///
/// The set is the records of the lowest priority with a target that has an address (RFC
/// 2782: a higher priority is a fallback, used only when every target of the lower ones
/// fails); records of higher priorities are left out as `not-passing` (standing by), targets
/// with no address as `unreadable`. Each address of a target is an endpoint at the record's
/// port with the record's weight (0 counts as 1). Records are taken sorted, so equal answers
/// give equal sets whatever order the server rotates them in.
pub fn srv_set(
    request: &WatchRequest,
    declared: Option<Protocol>,
    records: &[Srv],
    addresses: &HashMap<String, Addresses>,
) -> Set {
    let mut records = records.to_vec();
    records.sort_by(|a, b| {
        (a.priority, &a.target, a.port, a.weight).cmp(&(b.priority, &b.target, b.port, b.weight))
    });
    records.dedup();
    let found = |record: &Srv| matches!(addresses.get(&record.target), Some(Addresses::Found(ips)) if !ips.is_empty());
    let chosen = records
        .iter()
        .find(|record| found(record))
        .map(|record| record.priority);
    let mut selector = Selector::new(request);
    for record in &records {
        let instance = format!("{}:{}", display_target(&record.target), record.port);
        if let Some(chosen) = chosen.filter(|&chosen| record.priority > chosen) {
            let detail = format!(
                "priority {} stands by while priority {chosen} has targets",
                record.priority
            );
            selector.exclude(&instance, Exclusion::NOT_PASSING, detail);
            continue;
        }
        if record.target.is_empty() {
            let detail = "target \".\": the domain says the service is not offered";
            selector.exclude(&instance, Exclusion::UNREADABLE, detail);
            continue;
        }
        match addresses.get(&record.target) {
            Some(Addresses::Found(ips)) if !ips.is_empty() => {
                let mut ips = ips.clone();
                ips.sort_unstable();
                ips.dedup();
                for ip in ips {
                    let endpoint = Endpoint {
                        weight: u32::from(record.weight.max(1)),
                        ..Endpoint::new(SocketAddr::new(ip, record.port).to_string())
                    };
                    selector.offer(&instance, endpoint, declared.or(Some(request.protocol)));
                }
            }
            Some(Addresses::Missing(why)) => {
                let detail = format!("target {} has no address: {why}", cut(&record.target));
                selector.exclude(&instance, Exclusion::UNREADABLE, detail);
            }
            _ => {
                let detail = format!("target {} has no address", cut(&record.target));
                selector.exclude(&instance, Exclusion::UNREADABLE, detail);
            }
        }
    }
    selector.finish()
}

/// The set of `HOST:PORT`: every address of `host` at `port`, sorted.
pub fn host_set(request: &WatchRequest, host: &str, port: u16, ips: &[IpAddr]) -> Set {
    let mut ips = ips.to_vec();
    ips.sort_unstable();
    ips.dedup();
    let mut selector = Selector::new(request);
    for ip in ips {
        let endpoint = Endpoint::new(SocketAddr::new(ip, port).to_string());
        selector.offer(host, endpoint, Some(request.protocol));
    }
    selector.finish()
}

fn display_target(target: &str) -> &str {
    if target.is_empty() {
        "."
    } else {
        target
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `service` with `tags`: the query, or `error: ...`.
    fn check(service: &str, tags: &[&str], expected: &str) {
        let actual = match parse_service(service, tags) {
            Ok(Query::Srv { name, declared }) => format!("srv {name} {declared:?}"),
            Ok(Query::Host { host, port }) => format!("host {host} port {port}"),
            Err(error) => format!("error: {error}"),
        };
        assert_eq!(actual, expected, "{service:?} {tags:?}");
    }

    #[test]
    fn service_names() {
        check(
            "_redis._tcp.redis.service.consul",
            &[],
            "srv _redis._tcp.redis.service.consul Some(Tcp)",
        );
        check(
            "_dns._udp.example.org.",
            &[],
            "srv _dns._udp.example.org. Some(Udp)",
        );
        check(
            "_sip._TLS.example.org",
            &[],
            "srv _sip._TLS.example.org None",
        );
        check(
            "_x._TCP.example.org",
            &[],
            "srv _x._TCP.example.org Some(Tcp)",
        );
        check("db.example.org:5432", &[], "host db.example.org port 5432");
        check("db:5432", &[], "host db port 5432");
        check("127.0.0.1:80", &[], "host 127.0.0.1 port 80");
        check("[::1]:80", &[], "host ::1 port 80");
        check(
            "db.example.org.:5432",
            &[],
            "host db.example.org. port 5432",
        );
    }

    #[test]
    fn bad_service_names_say_what_to_write() {
        check(
            "redis.service.consul",
            &[],
            "error: dns service \"redis.service.consul\" is neither an SRV name (_service._proto.name) nor HOST:PORT: add the port",
        );
        check(
            "_redis._tcp.example.org:6379",
            &[],
            "error: dns service \"_redis._tcp.example.org:6379\": an SRV name takes its ports from its records; drop \":6379\"",
        );
        check(
            "db:0",
            &[],
            "error: dns service \"db:0\": port \"0\" must be a number from 1 to 65535",
        );
        check(
            "db:http",
            &[],
            "error: dns service \"db:http\": port \"http\" must be a number from 1 to 65535",
        );
        check(
            "db:",
            &[],
            "error: dns service \"db:\": port \"\" must be a number from 1 to 65535",
        );
        check(
            ":80",
            &[],
            "error: dns service \":80\": \"\" is not a domain name: empty label",
        );
        check(
            "a..b:80",
            &[],
            "error: dns service \"a..b:80\": \"a..b\" is not a domain name: empty label",
        );
        check(
            "/services/prod/redis",
            &[],
            "error: dns service \"/services/prod/redis\" is neither an SRV name (_service._proto.name) nor HOST:PORT: add the port",
        );
        check(
            "::1:80",
            &[],
            "error: dns service \"::1:80\": \"::1:80\" is not a domain name: write an IPv6 address in brackets: [ADDRESS]:PORT",
        );
        check(
            "[::1]",
            &[],
            "error: dns service \"[::1]\" is neither an SRV name (_service._proto.name) nor HOST:PORT: add the port",
        );
        let long = format!("{}.example.org:80", "a".repeat(64));
        let actual = parse_service(&long, &[] as &[&str]).map(|_| ());
        assert!(
            matches!(actual, Err(ServiceError::BadName { .. })),
            "{actual:?}"
        );
        check(
            "_redis._tcp.example.org",
            &["prod", "eu"],
            "error: dns service \"_redis._tcp.example.org\": DNS records carry no tags, so [prod,eu] would leave every endpoint out; drop the tags from the descriptor",
        );
    }

    fn srv(priority: u16, weight: u16, port: u16, target: &str) -> Srv {
        Srv {
            priority,
            weight,
            port,
            target: normal_name(target),
        }
    }

    /// Renders a set as `address*weight ... | instance:reason (detail); ...`.
    fn render((endpoints, excluded): Set) -> String {
        let kept: Vec<String> = endpoints
            .iter()
            .map(|e| format!("{}*{}", e.address, e.weight))
            .collect();
        let left: Vec<String> = excluded
            .iter()
            .map(|x| format!("{}:{} ({})", x.instance, x.reason, x.detail))
            .collect();
        format!("{} | {}", kept.join(" "), left.join("; "))
    }

    fn addresses(found: &[(&str, &[&str])], missing: &[&str]) -> HashMap<String, Addresses> {
        let mut map: HashMap<String, Addresses> = found
            .iter()
            .map(|(name, ips)| {
                let ips = ips.iter().map(|ip| ip.parse().expect("ip")).collect();
                (normal_name(name), Addresses::Found(ips))
            })
            .collect();
        for name in missing {
            map.insert(normal_name(name), Addresses::Missing("NXDOMAIN".into()));
        }
        map
    }

    #[test]
    fn srv_answers_make_sets() {
        let tcp = WatchRequest::new("_echo._tcp.svc", &[] as &[&str], Protocol::Tcp);
        let udp = WatchRequest::new("_echo._tcp.svc", &[] as &[&str], Protocol::Udp);
        let check = |request: &WatchRequest,
                     declared: Option<Protocol>,
                     records: &[Srv],
                     addresses: &HashMap<String, Addresses>,
                     expected: &str| {
            assert_eq!(
                render(srv_set(request, declared, records, addresses)),
                expected
            );
        };
        let tcp_declared = Some(Protocol::Tcp);
        // Several targets and ports, weights (0 counts as 1), the server's order ignored.
        check(
            &tcp,
            tcp_declared,
            &[
                srv(10, 0, 7002, "B.svc."),
                srv(10, 5, 7001, "a.svc"),
                srv(10, 1, 7003, "a.svc"),
            ],
            &addresses(
                &[("a.svc", &["127.0.0.3", "127.0.0.2"]), ("b.svc", &["::1"])],
                &[],
            ),
            "127.0.0.2:7001*5 127.0.0.3:7001*5 127.0.0.2:7003*1 127.0.0.3:7003*1 [::1]:7002*1 | ",
        );
        // Higher priorities stand by; a target without address is explained.
        check(
            &tcp,
            tcp_declared,
            &[
                srv(20, 1, 7003, "c.svc"),
                srv(10, 1, 7001, "a.svc"),
                srv(10, 1, 7002, "gone.svc"),
            ],
            &addresses(&[("a.svc", &["127.0.0.2"])], &["gone.svc"]),
            "127.0.0.2:7001*1 | gone.svc:7002:unreadable (target gone.svc has no address: NXDOMAIN); \
             c.svc:7003:not-passing (priority 20 stands by while priority 10 has targets)",
        );
        // Every target of the lowest priority gone: the next one serves.
        check(
            &tcp,
            tcp_declared,
            &[
                srv(10, 1, 7001, "gone.svc"),
                srv(20, 3, 7003, "c.svc"),
                srv(30, 1, 7004, "d.svc"),
            ],
            &addresses(&[("c.svc", &["127.0.0.4"])], &["gone.svc"]),
            "127.0.0.4:7003*3 | gone.svc:7001:unreadable (target gone.svc has no address: NXDOMAIN); \
             d.svc:7004:not-passing (priority 30 stands by while priority 20 has targets)",
        );
        // No target resolves: an empty set, every record explained.
        check(
            &tcp,
            tcp_declared,
            &[srv(10, 1, 7001, "gone.svc"), srv(0, 0, 0, ".")],
            &addresses(&[], &["gone.svc"]),
            " | .:0:unreadable (target \".\": the domain says the service is not offered); \
             gone.svc:7001:unreadable (target gone.svc has no address: NXDOMAIN)",
        );
        // Two records giving one address: one endpoint.
        check(
            &tcp,
            tcp_declared,
            &[srv(10, 1, 7001, "a.svc"), srv(10, 1, 7001, "alias.svc")],
            &addresses(&[("a.svc", &["127.0.0.2"]), ("alias.svc", &["127.0.0.2"])], &[]),
            "127.0.0.2:7001*1 | alias.svc:7001:duplicate (127.0.0.2:7001 is already given by a.svc:7001)",
        );
        // A `_tcp` name watched by a /udp descriptor serves nothing, and says why.
        check(
            &udp,
            tcp_declared,
            &[srv(10, 1, 7001, "a.svc")],
            &addresses(&[("a.svc", &["127.0.0.2"])], &[]),
            " | a.svc:7001:protocol (127.0.0.2:7001 serves tcp, the watch is udp)",
        );
        // A name of another protocol label serves the watch's protocol.
        check(
            &udp,
            None,
            &[srv(10, 1, 7001, "a.svc")],
            &addresses(&[("a.svc", &["127.0.0.2"])], &[]),
            "127.0.0.2:7001*1 | ",
        );
        check(&tcp, tcp_declared, &[], &addresses(&[], &[]), " | ");
    }

    #[test]
    fn host_answers_make_sets() {
        let udp = WatchRequest::new("db:53", &[] as &[&str], Protocol::Udp);
        let ips: Vec<IpAddr> = ["127.0.0.3", "::1", "127.0.0.2", "127.0.0.3"]
            .iter()
            .map(|ip| ip.parse().expect("ip"))
            .collect();
        assert_eq!(
            render(host_set(&udp, "db", 53, &ips)),
            "127.0.0.2:53*1 127.0.0.3:53*1 [::1]:53*1 | "
        );
        assert_eq!(render(host_set(&udp, "db", 53, &[])), " | ");
    }

    #[test]
    fn priorities_in_order() {
        let records = [srv(20, 1, 1, "a"), srv(10, 1, 1, "b"), srv(20, 1, 2, "c")];
        assert_eq!(priorities(&records), [10, 20]);
    }
}
