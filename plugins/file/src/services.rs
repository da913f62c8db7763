//! The services file's format, parsed with errors that point at the bad entry. What an error
//! quotes from the file is cut ([`cut`]), so a huge bad entry makes a short warning.

use std::collections::BTreeMap;

use embassy_plugin_api::{
    support::Selector, text::cut, Endpoint, Excluded, Protocol, WatchRequest,
};
use serde_json::Value;

/// One endpoint as the file lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    endpoint: Endpoint,
    /// `None`: the entry does not say (TCP, or UDP when tagged `udp`: the support rule).
    protocol: Option<Protocol>,
}

/// The parsed content of a services file.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ServicesFile {
    services: BTreeMap<String, Vec<Entry>>,
}

impl ServicesFile {
    pub fn len(&self) -> usize {
        self.services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    pub fn contains(&self, service: &str) -> bool {
        self.services.contains_key(service)
    }

    /// The services the file lists, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.services.keys().map(String::as_str)
    }

    /// The endpoints of `request.service` carrying every requested tag and serving its protocol.
    pub fn endpoints_for(&self, request: &WatchRequest) -> Vec<Endpoint> {
        self.select(request).0
    }

    /// The endpoints for `request`, and every entry of the service left out with the reason
    /// (protocol, tag, duplicate address). An entry is named `SERVICE #N`, N counting from 1.
    pub fn select(&self, request: &WatchRequest) -> (Vec<Endpoint>, Vec<Excluded>) {
        let mut selector = Selector::new(request);
        let service = request.service.as_str();
        for (index, entry) in self.services.get(service).into_iter().flatten().enumerate() {
            let name = format!("{service} #{}", index + 1);
            selector.offer(&name, entry.endpoint.clone(), entry.protocol);
        }
        selector.finish()
    }
}

/// Parses the whole file; any bad entry makes the file invalid (so the last good one stays).
pub fn parse_services(bytes: &[u8]) -> Result<ServicesFile, String> {
    let root: Value =
        serde_json::from_slice(bytes).map_err(|error| format!("invalid JSON: {error}"))?;
    let Value::Object(map) = root else {
        return Err("expected a JSON object mapping service names to endpoint lists".into());
    };
    let mut services = BTreeMap::new();
    for (name, list) in map {
        let Value::Array(items) = list else {
            return Err(format!(
                "service {:?}: expected a list of endpoints",
                cut(&name)
            ));
        };
        let entries = items
            .iter()
            .enumerate()
            .map(|(index, item)| {
                parse_entry(item).map_err(|error| {
                    format!("service {:?}, endpoint {}: {error}", cut(&name), index + 1)
                })
            })
            .collect::<Result<_, _>>()?;
        services.insert(name, entries);
    }
    Ok(ServicesFile { services })
}

fn parse_entry(item: &Value) -> Result<Entry, String> {
    let object = match item {
        Value::String(address) => {
            return Ok(Entry {
                endpoint: Endpoint::new(check_address(address)?),
                protocol: None,
            })
        }
        Value::Object(object) => object,
        other => {
            return Err(format!(
                "expected \"host:port\" or an object, found {}",
                quote(other)
            ))
        }
    };
    if let Some(unknown) = object
        .keys()
        .find(|k| !matches!(k.as_str(), "address" | "tags" | "weight" | "proto"))
    {
        return Err(format!(
            "unknown field {:?} (known: address, tags, weight, proto)",
            cut(unknown)
        ));
    }
    let address = match object.get("address") {
        Some(Value::String(address)) => check_address(address)?,
        Some(other) => {
            return Err(format!(
                "\"address\" must be a string, found {}",
                quote(other)
            ))
        }
        None => return Err("missing \"address\"".into()),
    };
    let tags = match object.get("tags") {
        None => Vec::new(),
        Some(Value::Array(tags)) => tags
            .iter()
            .map(|tag| {
                tag.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("tag {} is not a string", quote(tag)))
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(format!(
                "\"tags\" must be a list of strings, found {}",
                quote(other)
            ))
        }
    };
    let weight = match object.get("weight") {
        None => 1,
        Some(value) => value
            .as_u64()
            .and_then(|w| u32::try_from(w).ok())
            .filter(|&w| w > 0)
            .ok_or_else(|| {
                format!(
                    "\"weight\" must be a whole number from 1, found {}",
                    quote(value)
                )
            })?,
    };
    let protocol = match object.get("proto").map(|p| p.as_str()) {
        None => None,
        Some(Some("tcp")) => Some(Protocol::Tcp),
        Some(Some("udp")) => Some(Protocol::Udp),
        Some(_) => {
            return Err(format!(
                "\"proto\" must be \"tcp\" or \"udp\", found {}",
                quote(&object["proto"])
            ))
        }
    };
    let mut endpoint = Endpoint::new(address).with_tags(tags);
    endpoint.weight = weight;
    Ok(Entry { endpoint, protocol })
}

fn check_address(address: &str) -> Result<&str, String> {
    match address.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            Ok(address)
        }
        _ => Err(format!("address {:?} is not host:port", cut(address))),
    }
}

/// A JSON value as the file has it, cut.
fn quote(value: &Value) -> String {
    cut(&value.to_string()).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(service: &str, tags: &[&str], protocol: Protocol) -> WatchRequest {
        WatchRequest::new(service, tags, protocol)
    }

    /// Parses `json` and lists the addresses (`*weight` unless 1) for `service`/`tags`/tcp,
    /// then `| instance:reason` per entry left out, or `error: ...`.
    fn check(json: &str, service: &str, tags: &[&str], expected: &str) {
        check_for(json, service, tags, Protocol::Tcp, expected)
    }

    fn check_for(json: &str, service: &str, tags: &[&str], protocol: Protocol, expected: &str) {
        let actual = match parse_services(json.as_bytes()) {
            Ok(file) => {
                let (endpoints, excluded) = file.select(&request(service, tags, protocol));
                let mut text = endpoints
                    .iter()
                    .map(|e| match e.weight {
                        1 => e.address.to_string(),
                        w => format!("{}*{w}", e.address),
                    })
                    .collect::<Vec<_>>()
                    .join(" ");
                for x in &excluded {
                    text.push_str(&format!(" | {}:{}", x.instance, x.reason));
                }
                text
            }
            Err(error) => format!("error: {error}"),
        };
        assert_eq!(actual, expected, "{json}");
    }

    #[test]
    fn formats_and_filters() {
        check(
            r#"{"web": ["127.0.0.1:1", "127.0.0.1:2"]}"#,
            "web",
            &[],
            "127.0.0.1:1 127.0.0.1:2",
        );
        check(r#"{"web": ["127.0.0.1:1"]}"#, "other", &[], "");
        check(
            r#"{"web": ["127.0.0.1:1", {"address": "127.0.0.1:2", "tags": ["prod", "a"]}, {"address": "127.0.0.1:3", "tags": ["prod"]}]}"#,
            "web",
            &["prod", "a"],
            "127.0.0.1:2 | web #1:tag | web #3:tag",
        );
        check(
            r#"{"dns": [{"address": "127.0.0.1:1", "proto": "udp"}, "127.0.0.1:2"]}"#,
            "dns",
            &[],
            "127.0.0.1:2 | dns #1:protocol",
        );
        check(
            r#"{"web": [{"address": "db.local:5432", "weight": 3}, "db.local:5433"]}"#,
            "web",
            &[],
            "db.local:5432*3 db.local:5433",
        );
        check(
            r#"{"web": ["127.0.0.1:1", {"address": "127.0.0.1:1", "weight": 2}]}"#,
            "web",
            &[],
            "127.0.0.1:1 | web #2:duplicate",
        );
    }

    /// The support library's `/udp` rule: an entry serves what its `proto` says, else UDP if
    /// tagged `udp`, else TCP.
    #[test]
    fn udp_takes_what_says_udp() {
        let file = r#"{"dns": ["127.0.0.1:1", {"address": "127.0.0.1:2", "proto": "udp"},
            {"address": "127.0.0.1:3", "tags": ["udp"]}, {"address": "127.0.0.1:4", "proto": "tcp", "tags": ["udp"]}]}"#;
        check_for(
            file,
            "dns",
            &[],
            Protocol::Udp,
            "127.0.0.1:2 127.0.0.1:3 | dns #1:protocol | dns #4:protocol",
        );
        check_for(
            file,
            "dns",
            &[],
            Protocol::Tcp,
            "127.0.0.1:1 127.0.0.1:4 | dns #2:protocol | dns #3:protocol",
        );
    }

    #[test]
    fn broken_files_name_the_entry() {
        check(
            "{",
            "web",
            &[],
            "error: invalid JSON: EOF while parsing an object at line 1 column 1",
        );
        check(
            "[]",
            "web",
            &[],
            "error: expected a JSON object mapping service names to endpoint lists",
        );
        check(
            r#"{"web": "127.0.0.1:1"}"#,
            "web",
            &[],
            "error: service \"web\": expected a list of endpoints",
        );
        check(
            r#"{"web": ["127.0.0.1"]}"#,
            "web",
            &[],
            "error: service \"web\", endpoint 1: address \"127.0.0.1\" is not host:port",
        );
        check(r#"{"web": ["127.0.0.1:1", {"adress": "x:1"}]}"#, "web", &[], "error: service \"web\", endpoint 2: unknown field \"adress\" (known: address, tags, weight, proto)");
        check(
            r#"{"web": [{"tags": []}]}"#,
            "web",
            &[],
            "error: service \"web\", endpoint 1: missing \"address\"",
        );
        check(
            r#"{"web": [{"address": "a:1", "weight": 0}]}"#,
            "web",
            &[],
            "error: service \"web\", endpoint 1: \"weight\" must be a whole number from 1, found 0",
        );
        check(r#"{"web": [{"address": "a:1", "proto": "sctp"}]}"#, "web", &[], "error: service \"web\", endpoint 1: \"proto\" must be \"tcp\" or \"udp\", found \"sctp\"");
        check(
            r#"{"web": [7]}"#,
            "web",
            &[],
            "error: service \"web\", endpoint 1: expected \"host:port\" or an object, found 7",
        );
    }

    /// A huge bad entry, service name or field makes an error of a few hundred bytes.
    #[test]
    fn huge_bad_entries_are_cut_in_errors() {
        let junk = "x".repeat(1 << 20);
        let kept = "x".repeat(embassy_plugin_api::text::KEPT_CHARS);
        let cut = |n: usize| format!("{kept}… ({n} bytes)");
        check(
            &format!(r#"{{"web": ["{junk}"]}}"#),
            "web",
            &[],
            &format!(
                "error: service \"web\", endpoint 1: address \"{}\" is not host:port",
                cut(1 << 20)
            ),
        );
        check(
            &format!(r#"{{"{junk}": 7}}"#),
            "web",
            &[],
            &format!(
                "error: service \"{}\": expected a list of endpoints",
                cut(1 << 20)
            ),
        );
        check(
            &format!(r#"{{"web": [{{"address": "a:1", "proto": "{junk}"}}]}}"#),
            "web",
            &[],
            &format!(
                "error: service \"web\", endpoint 1: \"proto\" must be \"tcp\" or \"udp\", found \"{}… ({} bytes)",
                "x".repeat(119),
                (1 << 20) + 2
            ),
        );
        check(
            &format!(r#"{{"web": [{{"{junk}": 1}}]}}"#),
            "web",
            &[],
            &format!(
                "error: service \"web\", endpoint 1: unknown field \"{}\" (known: address, tags, weight, proto)",
                cut(1 << 20)
            ),
        );
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    /// One endpoint as written in the file, and what it serves.
    #[derive(Debug, Clone)]
    struct Written {
        address: String,
        tags: Vec<String>,
        weight: u32,
        protocol: Option<Protocol>,
        /// Written as a bare string (no tags, weight 1, both protocols).
        bare: bool,
    }

    fn written() -> impl Strategy<Value = Written> {
        (
            "[a-z0-9.-]{1,12}",
            1u16..,
            prop::collection::vec("[a-z]{1,5}", 0..3),
            1u32..,
            prop::option::of(prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp)]),
            any::<bool>(),
        )
            .prop_map(|(host, port, tags, weight, protocol, bare)| Written {
                address: format!("{host}:{port}"),
                tags: if bare { Vec::new() } else { tags },
                weight: if bare { 1 } else { weight },
                protocol: if bare { None } else { protocol },
                bare,
            })
    }

    fn to_json(entry: &Written) -> Value {
        if entry.bare {
            return json!(entry.address);
        }
        let mut object =
            json!({"address": entry.address, "tags": entry.tags, "weight": entry.weight});
        if let Some(protocol) = entry.protocol {
            object["proto"] = json!(protocol.as_str());
        }
        object
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_bytes_are_a_file_or_an_error(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            if let Err(error) = parse_services(&bytes) {
                prop_assert!(error.len() < 1024, "{}", error);
            }
        }

        /// JSON shaped like a services file, with values of any type where an entry's fields go.
        #[test]
        fn any_entries_are_a_file_or_an_error(
            entries in prop::collection::vec(
                prop_oneof![
                    "[a-z0-9.:]{0,12}".prop_map(|s| json!(s)),
                    any::<i64>().prop_map(|n| json!(n)),
                    prop::collection::btree_map(
                        prop::sample::select(vec!["address", "tags", "weight", "proto", "other"]),
                        prop_oneof![
                            Just(json!(null)),
                            any::<i64>().prop_map(|n| json!(n)),
                            any::<f64>().prop_map(|n| json!(n)),
                            "[a-z0-9.:]{0,12}".prop_map(|s| json!(s)),
                            prop::collection::vec("[a-z]{0,4}", 0..3).prop_map(|v| json!(v)),
                            Just(json!([1])),
                        ],
                        0..5,
                    ).prop_map(|m| json!(m)),
                ],
                0..4,
            ),
        ) {
            let bytes = json!({"web": entries}).to_string();
            match parse_services(bytes.as_bytes()) {
                Ok(file) => {
                    for protocol in [Protocol::Tcp, Protocol::Udp] {
                        let request = WatchRequest::new("web", &[] as &[&str], protocol);
                        for endpoint in file.endpoints_for(&request) {
                            prop_assert!(check_address(&endpoint.address).is_ok());
                            prop_assert!(endpoint.weight > 0);
                        }
                    }
                }
                Err(error) => prop_assert!(error.len() < 1024, "{}", error),
            }
        }

        /// A file written from endpoints serves exactly those, per protocol and tag.
        #[test]
        fn written_files_read_back(
            services in prop::collection::btree_map("[a-z/]{1,8}", prop::collection::vec(written(), 0..4), 0..4),
            tag in "[a-z]{1,5}",
        ) {
            let document: serde_json::Map<String, Value> = services
                .iter()
                .map(|(name, entries)| (name.clone(), Value::Array(entries.iter().map(to_json).collect())))
                .collect();
            let file = parse_services(Value::Object(document).to_string().as_bytes())
                .map_err(TestCaseError::fail)?;
            prop_assert_eq!(file.names().collect::<Vec<_>>(), services.keys().map(String::as_str).collect::<Vec<_>>());
            for (name, entries) in &services {
                for protocol in [Protocol::Tcp, Protocol::Udp] {
                    for tags in [Vec::new(), vec![tag.clone()]] {
                        let mut seen = std::collections::HashSet::new();
                        let expected: Vec<(String, Vec<String>, u32)> = entries
                            .iter()
                            .filter(|e| embassy_plugin_api::support::serves_protocol(e.protocol, &e.tags, protocol))
                            .filter(|e| tags.iter().all(|t| e.tags.contains(t)))
                            .filter(|e| seen.insert(e.address.clone()))
                            .map(|e| (e.address.clone(), e.tags.clone(), e.weight))
                            .collect();
                        let served: Vec<(String, Vec<String>, u32)> = file
                            .endpoints_for(&WatchRequest::new(name, &tags, protocol))
                            .iter()
                            .map(|e| (
                                e.address.to_string(),
                                e.tags.iter().map(|t| t.to_string()).collect(),
                                e.weight,
                            ))
                            .collect();
                        prop_assert_eq!(served, expected);
                    }
                }
            }
        }
    }
}
