//! What an etcd value says about one instance: the formats registrators write, parsed by a pure
//! function so every format and every kind of garbage is table-tested.

use std::net::IpAddr;

use embassy_plugin_api::{text::cut, Endpoint, Protocol};
use serde_json::{Map, Value};

/// One instance of a service, as one key's value describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// `host:port`, `[v6]:port` for IPv6 literals.
    pub address: String,
    pub tags: Vec<String>,
    /// `None`: the value does not say (TCP, by the support library's `/udp` rule).
    pub protocol: Option<Protocol>,
    pub weight: u32,
}

impl Instance {
    pub fn endpoint(&self) -> Endpoint {
        let mut endpoint = Endpoint::new(self.address.clone()).with_tags(self.tags.iter().cloned());
        endpoint.weight = self.weight;
        endpoint
    }
}

/// Why a value is not an instance. Parts of the value it quotes are cut
/// ([`cut`]), so a huge garbage value makes a short warning.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("the value is empty")]
    Empty,
    #[error("the value is not UTF-8")]
    NotUtf8,
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("a JSON object with neither \"ipaddress\"/\"host_port\" (service-registrar) nor \"host\"/\"port\" (SkyDNS)")]
    UnknownDocument,
    #[error("expected \"ip:port\" or a JSON object, found {0}")]
    UnexpectedJson(String),
    #[error("missing {0:?}")]
    Missing(&'static str),
    #[error("{field:?} must be {expected}, found {found}")]
    Field {
        field: &'static str,
        expected: &'static str,
        found: String,
    },
    #[error("address {0:?} is not host:port")]
    Address(String),
}

/// Parses the value stored at `key`.
///
/// Formats, tried in this order:
/// - service-registrar's JSON document: `ipaddress` + `host_port` (string or number), with
///   optional `tags` and `proto`;
/// - SkyDNS's JSON record: `host` + `port`, with optional `weight`;
/// - registrator's plain `ip:port` (also as a JSON string). Registrator marks UDP ports by
///   ending the service ID (the key's last segment) with `:udp`.
///
/// In a document, a `udp` tag stands for `"proto": "udp"` when `proto` is absent.
pub fn parse_instance(key: &str, value: &[u8]) -> Result<Instance, ValueError> {
    let text = std::str::from_utf8(value)
        .map_err(|_| ValueError::NotUtf8)?
        .trim();
    if text.is_empty() {
        return Err(ValueError::Empty);
    }
    if !text.starts_with(['{', '"']) {
        return plain(key, text);
    }
    let json: Value =
        serde_json::from_str(text).map_err(|error| ValueError::Json(error.to_string()))?;
    match json {
        Value::String(address) => plain(key, address.trim()),
        Value::Object(object)
            if object.contains_key("ipaddress") || object.contains_key("host_port") =>
        {
            registrar(&object)
        }
        Value::Object(object) if object.contains_key("host") => skydns(&object),
        Value::Object(_) => Err(ValueError::UnknownDocument),
        other => Err(ValueError::UnexpectedJson(shorten(&other))),
    }
}

fn plain(key: &str, text: &str) -> Result<Instance, ValueError> {
    let bad = || ValueError::Address(cut(text).into_owned());
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let last_segment = key.rsplit('/').next().unwrap_or(key);
    let protocol = last_segment.ends_with(":udp").then_some(Protocol::Udp);
    Ok(Instance {
        address: join(host, port).ok_or_else(bad)?,
        tags: Vec::new(),
        protocol,
        weight: 1,
    })
}

fn registrar(object: &Map<String, Value>) -> Result<Instance, ValueError> {
    let host = string_field(object, "ipaddress")?;
    let port = port_field(object, "host_port")?;
    let tags = tags_field(object)?;
    let protocol = match object.get("proto") {
        None | Some(Value::Null) => tags.iter().any(|t| t == "udp").then_some(Protocol::Udp),
        Some(Value::String(p)) if p.eq_ignore_ascii_case("tcp") => Some(Protocol::Tcp),
        Some(Value::String(p)) if p.eq_ignore_ascii_case("udp") => Some(Protocol::Udp),
        Some(other) => return Err(field_error("proto", "\"tcp\" or \"udp\"", other)),
    };
    let address = join(host, port)
        .ok_or_else(|| ValueError::Address(cut(&format!("{host}:{port}")).into_owned()))?;
    Ok(Instance {
        address,
        tags,
        protocol,
        weight: 1,
    })
}

fn skydns(object: &Map<String, Value>) -> Result<Instance, ValueError> {
    let host = string_field(object, "host")?;
    let port = port_field(object, "port")?;
    let weight = match object.get("weight") {
        None | Some(Value::Null) => 1,
        Some(value) => value
            .as_u64()
            .and_then(|w| u32::try_from(w).ok())
            .filter(|&w| w > 0)
            .ok_or_else(|| field_error("weight", "a whole number from 1", value))?,
    };
    let address = join(host, port)
        .ok_or_else(|| ValueError::Address(cut(&format!("{host}:{port}")).into_owned()))?;
    Ok(Instance {
        address,
        tags: Vec::new(),
        protocol: None,
        weight,
    })
}

fn string_field<'a>(
    object: &'a Map<String, Value>,
    field: &'static str,
) -> Result<&'a str, ValueError> {
    match object.get(field) {
        None | Some(Value::Null) => Err(ValueError::Missing(field)),
        Some(Value::String(text)) if !text.trim().is_empty() => Ok(text.trim()),
        Some(other) => Err(field_error(field, "a non-empty string", other)),
    }
}

/// A port as a number or a string of digits (service-registrar writes `"host_port": "49161"`).
fn port_field(object: &Map<String, Value>, field: &'static str) -> Result<u16, ValueError> {
    let value = match object.get(field) {
        None | Some(Value::Null) => return Err(ValueError::Missing(field)),
        Some(value) => value,
    };
    let port = match value {
        Value::Number(n) => n.as_u64().and_then(|p| u16::try_from(p).ok()),
        Value::String(s) => s.trim().parse::<u16>().ok(),
        _ => None,
    };
    port.filter(|&p| p > 0)
        .ok_or_else(|| field_error(field, "a port from 1 to 65535", value))
}

fn tags_field(object: &Map<String, Value>) -> Result<Vec<String>, ValueError> {
    match object.get("tags") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                item.as_str().map(str::to_string).ok_or_else(|| {
                    field_error("tags", "a list of strings", &Value::Array(items.clone()))
                })
            })
            .collect(),
        Some(other) => Err(field_error("tags", "a list of strings", other)),
    }
}

fn field_error(field: &'static str, expected: &'static str, found: &Value) -> ValueError {
    ValueError::Field {
        field,
        expected,
        found: shorten(found),
    }
}

/// A JSON value for an error message, cut so a huge document cannot flood the log.
fn shorten(value: &Value) -> String {
    cut(&value.to_string()).into_owned()
}

/// `host:port`, bracketing IPv6 literals; `None` for a host that is neither an IP literal nor a
/// plausible DNS name.
fn join(host: &str, port: u16) -> Option<String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Some(match ip {
            IpAddr::V4(v4) => format!("{v4}:{port}"),
            IpAddr::V6(v6) => format!("[{v6}]:{port}"),
        });
    }
    let plausible = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    plausible.then(|| format!("{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `value` stored at `key`; renders the instance as `address tags proto weight`
    /// (`-` for none) or `error: ...`.
    fn check(key: &str, value: &str, expected: &str) {
        let actual = match parse_instance(key, value.as_bytes()) {
            Ok(i) => format!(
                "{} [{}] {} {}",
                i.address,
                i.tags.join(","),
                i.protocol.map_or("-", Protocol::as_str),
                i.weight
            ),
            Err(error) => format!("error: {error}"),
        };
        assert_eq!(actual, expected, "{key} = {value}");
    }

    const KEY: &str = "/services/prod/apache/80/49177/6b06da408f97";

    #[test]
    fn service_registrar_documents() {
        // The original README's document, pointed at loopback.
        check(
            KEY,
            r#"{"id": "1353", "host": "fury", "ipaddress": "127.0.0.1",
                "env": {"ENVIRONMENT": "prod"}, "tags": [], "name": "/trusting_shockley",
                "image": "eboraas/apache", "hostname": "13532987eae2", "host_port": "49161",
                "proto": "tcp", "port": "80", "path": "/services/prod/apache/80/49161/13532987eae2"}"#,
            "127.0.0.1:49161 [] tcp 1",
        );
        check(
            KEY,
            r#"{"ipaddress": "127.0.0.1", "host_port": 8080, "tags": ["prod", "app1"]}"#,
            "127.0.0.1:8080 [prod,app1] - 1",
        );
        check(
            KEY,
            r#"{"ipaddress": "127.0.0.1", "host_port": "53", "proto": "UDP"}"#,
            "127.0.0.1:53 [] udp 1",
        );
        check(
            KEY,
            r#"{"ipaddress": "127.0.0.1", "host_port": "53", "tags": ["udp"]}"#,
            "127.0.0.1:53 [udp] udp 1",
        );
        check(
            KEY,
            r#"{"ipaddress": "::1", "host_port": "80"}"#,
            "[::1]:80 [] - 1",
        );
        check(
            KEY,
            r#"{"ipaddress": "db.local", "host_port": "5432"}"#,
            "db.local:5432 [] - 1",
        );
    }

    #[test]
    fn registrator_and_skydns_values() {
        check(
            "/services/web/h:web1:80",
            "127.0.0.1:8080",
            "127.0.0.1:8080 [] - 1",
        );
        check(
            "/services/web/h:web1:80",
            " 127.0.0.1:8080\n",
            "127.0.0.1:8080 [] - 1",
        );
        check(
            "/services/dns/h:dns1:53:udp",
            "127.0.0.1:53",
            "127.0.0.1:53 [] udp 1",
        );
        check(
            "/services/web/x",
            r#""127.0.0.1:8080""#,
            "127.0.0.1:8080 [] - 1",
        );
        check("/services/web/x", "[::1]:8080", "[::1]:8080 [] - 1");
        check(
            "/skydns/local/web/x",
            r#"{"host": "127.0.0.1", "port": 8080}"#,
            "127.0.0.1:8080 [] - 1",
        );
        check(
            "/skydns/local/web/x",
            r#"{"host": "127.0.0.2", "port": "81", "priority": 10, "weight": 3, "ttl": 60}"#,
            "127.0.0.2:81 [] - 3",
        );
    }

    #[test]
    fn garbage_is_an_error_that_says_what_is_wrong() {
        check(KEY, "", "error: the value is empty");
        check(KEY, "hello", "error: address \"hello\" is not host:port");
        check(
            KEY,
            "127.0.0.1:0",
            "error: address \"127.0.0.1:0\" is not host:port",
        );
        check(
            KEY,
            "127.0.0.1:70000",
            "error: address \"127.0.0.1:70000\" is not host:port",
        );
        check(
            KEY,
            "bad host:80",
            "error: address \"bad host:80\" is not host:port",
        );
        check(
            KEY,
            "{\"ipaddress\": ",
            "error: invalid JSON: EOF while parsing a value at line 1 column 13",
        );
        check(KEY, "[1, 2]", "error: address \"[1, 2]\" is not host:port");
        check(
            KEY,
            r#"{"name": "x"}"#,
            "error: a JSON object with neither \"ipaddress\"/\"host_port\" (service-registrar) nor \"host\"/\"port\" (SkyDNS)",
        );
        check(
            KEY,
            r#"{"ipaddress": "127.0.0.1"}"#,
            "error: missing \"host_port\"",
        );
        check(
            KEY,
            r#"{"host_port": "80"}"#,
            "error: missing \"ipaddress\"",
        );
        check(
            KEY,
            r#"{"ipaddress": "127.0.0.1", "host_port": "http"}"#,
            "error: \"host_port\" must be a port from 1 to 65535, found \"http\"",
        );
        check(
            KEY,
            r#"{"ipaddress": 7, "host_port": "80"}"#,
            "error: \"ipaddress\" must be a non-empty string, found 7",
        );
        check(
            KEY,
            r#"{"ipaddress": "127.0.0.1", "host_port": "80", "proto": "sctp"}"#,
            "error: \"proto\" must be \"tcp\" or \"udp\", found \"sctp\"",
        );
        check(
            KEY,
            r#"{"ipaddress": "127.0.0.1", "host_port": "80", "tags": "prod"}"#,
            "error: \"tags\" must be a list of strings, found \"prod\"",
        );
        check(KEY, r#"{"host": "127.0.0.1"}"#, "error: missing \"port\"");
        check(
            KEY,
            r#"{"host": "127.0.0.1", "port": 80, "weight": 0}"#,
            "error: \"weight\" must be a whole number from 1, found 0",
        );
        assert_eq!(parse_instance(KEY, &[0xff, 0xfe]), Err(ValueError::NotUtf8));
    }

    /// A 1 MB garbage value makes a warning of a few hundred bytes, whatever part is garbage.
    #[test]
    fn huge_values_are_cut_in_errors() {
        let junk = "x".repeat(1 << 20);
        let kept = "x".repeat(embassy_plugin_api::text::KEPT_CHARS);
        check(
            KEY,
            &junk,
            &format!("error: address \"{kept}… (1048576 bytes)\" is not host:port"),
        );
        check(
            KEY,
            &format!("{junk}:80"),
            &format!("error: address \"{kept}… (1048579 bytes)\" is not host:port"),
        );
        check(
            KEY,
            &format!(r#"{{"ipaddress": "{junk}", "host_port": 80}}"#),
            &format!("error: address \"{kept}… (1048579 bytes)\" is not host:port"),
        );
        let quoted = format!("\"{}", "x".repeat(119));
        check(
            KEY,
            &format!(r#"{{"ipaddress": "127.0.0.1", "host_port": "{junk}"}}"#),
            &format!("error: \"host_port\" must be a port from 1 to 65535, found {quoted}… (1048578 bytes)"),
        );
    }

    /// What a watch keeps of parsed instances goes through the support library's selector.
    #[test]
    fn tags_and_protocol_filter() {
        let serves = |value: &str, tags: &[&str], protocol: Protocol| {
            let instance = parse_instance(KEY, value.as_bytes()).expect("instance");
            let request = embassy_plugin_api::WatchRequest::new("svc", tags, protocol);
            let mut selector = embassy_plugin_api::support::Selector::new(&request);
            selector.offer(KEY, instance.endpoint(), instance.protocol)
        };
        let tagged =
            r#"{"ipaddress": "127.0.0.1", "host_port": 1, "tags": ["prod", "app1", "eu"]}"#;
        assert!(serves(tagged, &["prod", "app1"], Protocol::Tcp));
        assert!(serves(tagged, &[], Protocol::Tcp));
        assert!(!serves(tagged, &["prod", "us"], Protocol::Tcp));
        assert!(!serves(tagged, &[], Protocol::Udp), "no proto is TCP");
        assert!(
            !serves("127.0.0.1:1", &["prod"], Protocol::Tcp),
            "no tags carried"
        );
        let udp = r#"{"ipaddress": "127.0.0.1", "host_port": 1, "proto": "udp"}"#;
        assert!(serves(udp, &[], Protocol::Udp));
        assert!(!serves(udp, &[], Protocol::Tcp));
    }
}

#[cfg(test)]
mod properties {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    /// A host as registrators write it, and the address Embassy dials for it with `port`.
    fn host() -> impl Strategy<Value = (String, fn(&str, u16) -> String)> {
        fn v4(host: &str, port: u16) -> String {
            format!("{host}:{port}")
        }
        fn v6(host: &str, port: u16) -> String {
            format!("[{host}]:{port}")
        }
        prop_oneof![
            any::<Ipv4Addr>().prop_map(|ip| (ip.to_string(), v4 as fn(&str, u16) -> String)),
            any::<Ipv6Addr>().prop_map(|ip| (ip.to_string(), v6 as fn(&str, u16) -> String)),
            "[a-z0-9][a-z0-9.-]{0,30}"
                .prop_filter("not an IP literal", |h| h.parse::<IpAddr>().is_err())
                .prop_map(|h| (h, v4 as fn(&str, u16) -> String)),
        ]
    }

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::from("/services/web/80/x")),
            Just(String::from("/services/dns/h:dns:53:udp")),
            any::<String>(),
        ]
    }

    /// Every error names what is wrong in a bounded message, whatever the value's size.
    fn assert_total(key: &str, value: &[u8]) -> Result<(), TestCaseError> {
        match parse_instance(key, value) {
            Ok(instance) => {
                let (host, port) = instance.address.rsplit_once(':').ok_or_else(|| {
                    TestCaseError::fail(format!("no port in {:?}", instance.address))
                })?;
                prop_assert!(!host.is_empty());
                prop_assert!(port.parse::<u16>().is_ok_and(|p| p > 0), "{:?}", instance);
                prop_assert!(instance.weight > 0);
            }
            Err(error) => {
                prop_assert!(error.to_string().len() < 1024, "{}", error);
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_bytes_are_an_instance_or_an_error(key in key(), value in prop::collection::vec(any::<u8>(), 0..256)) {
            assert_total(&key, &value)?;
        }

        #[test]
        fn any_text_is_an_instance_or_an_error(key in key(), value in any::<String>()) {
            assert_total(&key, value.as_bytes())?;
        }

        /// JSON documents with the formats' field names and values of any type.
        #[test]
        fn any_document_is_an_instance_or_an_error(
            fields in prop::collection::btree_map(
                prop::sample::select(vec!["ipaddress", "host_port", "host", "port", "tags", "proto", "weight"]),
                prop_oneof![
                    Just(json!(null)),
                    any::<bool>().prop_map(|b| json!(b)),
                    any::<i64>().prop_map(|n| json!(n)),
                    any::<f64>().prop_map(|n| json!(n)),
                    "[a-z0-9.:\\[\\] ]{0,12}".prop_map(|s| json!(s)),
                    prop::collection::vec("[a-z]{0,4}", 0..3).prop_map(|v| json!(v)),
                    Just(json!([1, {"a": 2}])),
                ],
                0..6,
            ),
        ) {
            let document = serde_json::to_vec(&fields).expect("a map serializes");
            assert_total("/services/web/80/x", &document)?;
        }

        #[test]
        fn registrar_documents_read_back(
            (host, address) in host(),
            port in 1u16..,
            port_as_text in any::<bool>(),
            tags in prop::collection::vec("[a-z0-9-]{1,8}", 0..4),
            proto in prop::option::of(prop::sample::select(vec!["tcp", "udp", "TCP", "Udp"])),
        ) {
            let mut document = json!({"ipaddress": host, "tags": tags});
            document["host_port"] = if port_as_text { json!(port.to_string()) } else { json!(port) };
            if let Some(proto) = proto {
                document["proto"] = json!(proto);
            }
            let instance = parse_instance("/services/web/80/x", document.to_string().as_bytes())
                .map_err(|e| TestCaseError::fail(format!("{document}: {e}")))?;
            let protocol = match proto {
                Some(p) if p.eq_ignore_ascii_case("udp") => Some(Protocol::Udp),
                Some(_) => Some(Protocol::Tcp),
                None => tags.iter().any(|t| t == "udp").then_some(Protocol::Udp),
            };
            prop_assert_eq!(instance, Instance { address: address(&host, port), tags, protocol, weight: 1 });
        }

        #[test]
        fn skydns_records_read_back((host, address) in host(), port in 1u16.., weight in prop::option::of(1u32..)) {
            let mut document = json!({"host": host, "port": port, "priority": 10});
            if let Some(weight) = weight {
                document["weight"] = json!(weight);
            }
            let instance = parse_instance("/skydns/local/web/x", document.to_string().as_bytes())
                .map_err(|e| TestCaseError::fail(format!("{document}: {e}")))?;
            prop_assert_eq!(instance, Instance {
                address: address(&host, port),
                tags: Vec::new(),
                protocol: None,
                weight: weight.unwrap_or(1),
            });
        }

        /// `ip:port` as registrator writes it, bare or as a JSON string; the address read is the
        /// canonical `host:port` and reads back to itself.
        #[test]
        fn plain_addresses_read_back((host, address) in host(), port in 1u16.., as_json in any::<bool>(), udp in any::<bool>()) {
            let written = address(&host, port);
            let value = if as_json { json!(written).to_string() } else { written.clone() };
            let key = if udp { "/services/dns/h:dns:53:udp" } else { "/services/dns/h:dns:53" };
            let instance = parse_instance(key, value.as_bytes())
                .map_err(|e| TestCaseError::fail(format!("{value}: {e}")))?;
            prop_assert_eq!(&instance.address, &written);
            prop_assert_eq!(instance.protocol, udp.then_some(Protocol::Udp));
            let again = parse_instance(key, instance.address.as_bytes()).expect("canonical reads");
            prop_assert_eq!(again, instance);
        }
    }
}
