//! The pure half of a watch: what to ask `/v1/health/service/:service`, what its answer means,
//! and Consul's rules for blocking-query indexes. What an error or a skipped instance quotes
//! from the answer is cut ([`cut`]): serde's messages quote the offending string whole.

use std::net::Ipv6Addr;

use embassy_plugin_api::{
    support::Selector, text::cut, Endpoint, Excluded, Exclusion, WatchRequest,
};
use serde::Deserialize;

use crate::ConsulError;

/// One element of the health endpoint's answer; only the fields we use.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Entry {
    node: Node,
    service: Service,
    // Consul sends `null` for none.
    #[serde(default)]
    checks: Option<Vec<Check>>,
}

#[derive(Debug, Deserialize)]
struct Check {
    #[serde(rename = "CheckID", default)]
    id: String,
    #[serde(rename = "Status", default)]
    status: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Node {
    #[serde(default)]
    address: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Service {
    #[serde(rename = "ID", default)]
    id: String,
    #[serde(default)]
    address: String,
    port: u16,
    // Consul sends `null` for a service registered without tags.
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    weights: Option<Weights>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Weights {
    /// 0 or missing: weight 1.
    #[serde(default)]
    passing: u32,
}

/// What one answer gives a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The endpoints to serve, sorted, so equal answers compare equal.
    pub endpoints: Vec<Endpoint>,
    /// Every instance of the service left out, by service ID, and why.
    pub excluded: Vec<Excluded>,
}

/// Query parameters for one round: `dc`, `index`, `wait`. `index` 0 asks for an immediate
/// answer (first round, or a reset). No `passing` or `tag` filter: the plugin filters itself,
/// so that it can say which instances it left out and why.
pub fn query_params(
    datacenter: Option<&str>,
    index: u64,
    wait: &str,
) -> Vec<(&'static str, String)> {
    let mut params = Vec::new();
    if let Some(dc) = datacenter {
        params.push(("dc", dc.to_string()));
    }
    if index > 0 {
        params.push(("index", index.to_string()));
        params.push(("wait", wait.to_string()));
    }
    params
}

/// Turns the JSON answer into the endpoints for `request` (its tags and protocol) and the
/// instances left out.
///
/// An instance serves when every check of it and its node passes (a maintenance mode is a
/// critical check), it can be dialled (`Service.Address`, else `Node.Address`, and a port),
/// and the support library's selector keeps it: protocol (registrator's `udp` tag), every
/// tag, one endpoint per address (the lowest service ID wins). Endpoints come sorted by
/// address, exclusions by ID, so equal answers compare equal whatever the agent's order.
pub fn parse_answer(body: &[u8], request: &WatchRequest) -> Result<Answer, ConsulError> {
    let mut entries: Vec<Entry> = serde_json::from_slice(body)
        .map_err(|error| ConsulError::Malformed(cut(&error.to_string()).into_owned()))?;
    entries.sort_by(|a, b| a.service.id.cmp(&b.service.id));
    let mut selector = Selector::new(request);
    for entry in &entries {
        let service = &entry.service;
        let id = service.id.as_str();
        let failing = entry
            .checks
            .iter()
            .flatten()
            .find(|check| check.status != "passing");
        if let Some(check) = failing {
            let detail = format!("check {:?} is {}", cut(&check.id), cut(&check.status));
            selector.exclude(id, Exclusion::NOT_PASSING, detail);
            continue;
        }
        let host = if service.address.is_empty() {
            entry.node.address.as_str()
        } else {
            service.address.as_str()
        };
        if host.is_empty() {
            let detail = "neither Service.Address nor Node.Address is set";
            selector.exclude(id, Exclusion::UNREADABLE, detail);
            continue;
        }
        if service.port == 0 {
            selector.exclude(id, Exclusion::UNREADABLE, "registered without a port");
            continue;
        }
        let address = if host.parse::<Ipv6Addr>().is_ok() {
            format!("[{host}]:{}", service.port)
        } else {
            format!("{host}:{}", service.port)
        };
        let mut endpoint =
            Endpoint::new(address).with_tags(service.tags.clone().unwrap_or_default());
        endpoint.weight = service.weights.as_ref().map_or(1, |w| w.passing.max(1));
        selector.offer(id, endpoint, None);
    }
    let (mut endpoints, excluded) = selector.finish();
    endpoints.sort_by(|a, b| a.address.cmp(&b.address));
    Ok(Answer {
        endpoints,
        excluded,
    })
}

/// The `X-Consul-Index` header's value.
pub fn parse_index(header: Option<&[u8]>) -> Result<u64, ConsulError> {
    let header = header.ok_or(ConsulError::MissingIndex)?;
    std::str::from_utf8(header)
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .ok_or_else(|| ConsulError::BadIndex(cut(&String::from_utf8_lossy(header)).into_owned()))
}

/// The index to block on next, per Consul's blocking-query rules: an index that went
/// backwards (agent restarted, snapshot restored) or is 0 resets to 0, an immediate query,
/// so we never wait forever for an index the agent will not reach.
pub fn next_index(previous: u64, returned: u64) -> u64 {
    if returned < previous {
        0
    } else {
        returned
    }
}

#[cfg(test)]
mod tests {
    use embassy_plugin_api::Protocol;

    use super::*;

    /// Parses `json` for `protocol`: `addresses (weights) | excluded` or `error: ...`.
    fn check(json: &str, protocol: Protocol, expected: &str) {
        check_tags(json, &[], protocol, expected)
    }

    fn check_tags(json: &str, tags: &[&str], protocol: Protocol, expected: &str) {
        let request = WatchRequest::new("redis", tags, protocol);
        let actual = match parse_answer(json.as_bytes(), &request) {
            Ok(answer) => {
                let endpoints = answer
                    .endpoints
                    .iter()
                    .map(|e| {
                        if e.weight == 1 {
                            e.address.to_string()
                        } else {
                            format!("{}*{}", e.address, e.weight)
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(" ");
                if answer.excluded.is_empty() {
                    endpoints
                } else {
                    let excluded: Vec<String> = answer
                        .excluded
                        .iter()
                        .map(|x| format!("{}:{} ({})", x.instance, x.reason, x.detail))
                        .collect();
                    format!("{endpoints} | excluded {}", excluded.join("; "))
                }
            }
            Err(error) => format!("error: {error}"),
        };
        assert_eq!(actual, expected, "{json}");
    }

    fn entry(id: &str, node_address: &str, address: &str, port: u16, tags: &[&str]) -> String {
        entry_with(id, node_address, address, port, tags, "passing")
    }

    fn entry_with(
        id: &str,
        node_address: &str,
        address: &str,
        port: u16,
        tags: &[&str],
        status: &str,
    ) -> String {
        format!(
            r#"{{"Node":{{"Node":"n-{id}","Address":"{node_address}","Datacenter":"dc1"}},
                "Service":{{"ID":"{id}","Service":"redis","Tags":{tags:?},"Address":"{address}","Port":{port}}},
                "Checks":[{{"CheckID":"serfHealth","Status":"passing"}},{{"CheckID":"service:{id}","Status":"{status}"}}]}}"#
        )
    }

    fn answer(entries: &[String]) -> String {
        format!("[{}]", entries.join(","))
    }

    #[test]
    fn addresses_and_ports() {
        check("[]", Protocol::Tcp, "");
        check(
            &answer(&[
                entry("a", "10.0.0.1", "127.0.0.2", 6379, &[]),
                entry("b", "127.0.0.3", "", 6380, &["prod"]),
            ]),
            Protocol::Tcp,
            "127.0.0.2:6379 127.0.0.3:6380",
        );
        check(
            &answer(&[entry("a", "10.0.0.1", "::1", 80, &[])]),
            Protocol::Tcp,
            "[::1]:80",
        );
        check(
            &answer(&[entry("a", "10.0.0.1", "redis.local", 80, &[])]),
            Protocol::Tcp,
            "redis.local:80",
        );
        // Duplicates collapse (the lowest ID wins); the answer is sorted whatever the agent's
        // order.
        check(
            &answer(&[
                entry("b", "", "127.0.0.9", 2, &[]),
                entry("c", "", "127.0.0.1", 1, &[]),
                entry("a", "", "127.0.0.1", 1, &[]),
            ]),
            Protocol::Tcp,
            "127.0.0.1:1 127.0.0.9:2 | excluded c:duplicate (127.0.0.1:1 is already given by a)",
        );
        check(
            &answer(&[
                entry("a", "", "", 80, &[]),
                entry("b", "127.0.0.1", "", 0, &[]),
                entry("c", "127.0.0.1", "", 81, &[]),
            ]),
            Protocol::Tcp,
            "127.0.0.1:81 | excluded a:unreadable (neither Service.Address nor Node.Address is set); b:unreadable (registered without a port)",
        );
        check(
            r#"[{"Node":{"Address":"127.0.0.1"},"Service":{"ID":"w","Port":8,"Tags":null,"Weights":{"Passing":3,"Warning":1}},"Checks":[]}]"#,
            Protocol::Tcp,
            "127.0.0.1:8*3",
        );
        // Weight 0 or none means 1.
        check(
            r#"[{"Node":{"Address":"127.0.0.1"},"Service":{"ID":"w","Port":8,"Weights":{"Passing":0,"Warning":1}}},
                {"Node":{"Address":"127.0.0.2"},"Service":{"ID":"x","Port":8,"Weights":{"Warning":1}}}]"#,
            Protocol::Tcp,
            "127.0.0.1:8 127.0.0.2:8",
        );
    }

    /// Health and tags are filtered here, not by the agent, so each one left out is named.
    #[test]
    fn failing_and_untagged_instances_are_explained() {
        let answer = answer(&[
            entry_with("a", "", "127.0.0.1", 1, &["prod"], "passing"),
            entry_with("b", "", "127.0.0.2", 1, &["prod"], "critical"),
            entry_with("c", "", "127.0.0.3", 1, &["prod"], "warning"),
            entry_with("d", "", "127.0.0.4", 1, &["dev"], "passing"),
        ]);
        check_tags(
            &answer,
            &["prod"],
            Protocol::Tcp,
            "127.0.0.1:1 | excluded b:not-passing (check \"service:b\" is critical); \
             c:not-passing (check \"service:c\" is warning); d:tag (127.0.0.4:1 lacks tag \"prod\")",
        );
    }

    #[test]
    fn registrator_protocol_convention() {
        let both = answer(&[
            entry("t", "", "127.0.0.1", 53, &["dns"]),
            entry("u", "", "127.0.0.2", 53, &["dns", "udp"]),
        ]);
        check(
            &both,
            Protocol::Tcp,
            "127.0.0.1:53 | excluded u:protocol (127.0.0.2:53 serves udp, the watch is tcp)",
        );
        check(
            &both,
            Protocol::Udp,
            "127.0.0.2:53 | excluded t:protocol (127.0.0.1:53 serves tcp, the watch is udp)",
        );
        let udp_only = answer(&[entry("u", "", "127.0.0.2", 53, &["udp"])]);
        check(
            &udp_only,
            Protocol::Tcp,
            " | excluded u:protocol (127.0.0.2:53 serves udp, the watch is tcp)",
        );
        check(&udp_only, Protocol::Udp, "127.0.0.2:53");
    }

    #[test]
    fn malformed_answers_are_errors() {
        check(
            "<html>",
            Protocol::Tcp,
            "error: malformed answer from consul: expected value at line 1 column 1",
        );
        check(
            r#"{"Node":{}}"#,
            Protocol::Tcp,
            "error: malformed answer from consul: invalid type: map, expected a sequence at line 1 column 0",
        );
        check(
            r#"[{"Node":{"Address":"h"},"Service":{"ID":"a"}}]"#,
            Protocol::Tcp,
            "error: malformed answer from consul: missing field `Port` at line 1 column 45",
        );
        check(
            r#"[{"Node":{"Address":"h"},"Service":{"ID":"a","Port":70000}}]"#,
            Protocol::Tcp,
            "error: malformed answer from consul: invalid value: integer `70000`, expected u16 at line 1 column 57",
        );
    }

    /// serde quotes a bad string whole; a huge one makes a short error.
    #[test]
    fn huge_answers_are_cut_in_errors() {
        let junk = "x".repeat(1 << 20);
        let kept = "x".repeat(embassy_plugin_api::text::KEPT_CHARS - 22);
        check(
            &format!(r#"[{{"Node":{{}},"Service":{{"ID":"a","Port":"{junk}"}}]"#),
            Protocol::Tcp,
            &format!(
                "error: malformed answer from consul: invalid type: string \"{kept}… ({} bytes)",
                (1 << 20) + 62
            ),
        );
        check(
            &format!(r#"[{{"Node":{{}},"Service":{{"ID":"{junk}","Port":80}}}}]"#),
            Protocol::Tcp,
            &format!(
 " | excluded {}… (1048576 bytes):unreadable (neither Service.Address nor Node.Address is set)",
                "x".repeat(embassy_plugin_api::text::KEPT_CHARS)
            ),
        );
        check_index(
            5,
            Some(&junk),
            &format!(
                "error: consul answered with a bad X-Consul-Index \"{}… (1048576 bytes)\"",
                "x".repeat(embassy_plugin_api::text::KEPT_CHARS)
            ),
        );
    }

    /// `previous` index and the `returned` header give `expected` for the next round.
    fn check_index(previous: u64, returned: Option<&str>, expected: &str) {
        let actual = match parse_index(returned.map(str::as_bytes)) {
            Ok(returned) => next_index(previous, returned).to_string(),
            Err(error) => format!("error: {error}"),
        };
        assert_eq!(actual, expected, "{previous} -> {returned:?}");
    }

    #[test]
    fn blocking_index_rules() {
        check_index(0, Some("12"), "12");
        check_index(12, Some("12"), "12");
        check_index(12, Some("40"), "40");
        check_index(40, Some("7"), "0");
        check_index(40, Some("0"), "0");
        check_index(0, Some("0"), "0");
        check_index(
            5,
            None,
            "error: consul answered without an X-Consul-Index header",
        );
        check_index(
            5,
            Some("-1"),
            "error: consul answered with a bad X-Consul-Index \"-1\"",
        );
    }

    #[test]
    fn query_asks_for_every_instance() {
        let render = |params: Vec<(&str, String)>| {
            params
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("&")
        };
        assert_eq!(render(query_params(None, 0, "300s")), "");
        assert_eq!(
            render(query_params(Some("eu1"), 42, "300s")),
            "dc=eu1&index=42&wait=300s"
        );
    }
}

#[cfg(test)]
mod properties {
    use std::collections::BTreeSet;

    use embassy_plugin_api::Protocol;

    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    /// One registration as the agent reports it.
    #[derive(Debug, Clone)]
    struct Registration {
        id: String,
        node_address: String,
        address: String,
        port: u16,
        tags: Option<Vec<String>>,
        weight: Option<u32>,
    }

    fn registration() -> impl Strategy<Value = Registration> {
        let address = prop_oneof![
            Just(String::new()),
            any::<std::net::Ipv4Addr>().prop_map(|ip| ip.to_string()),
            any::<Ipv6Addr>().prop_map(|ip| ip.to_string()),
            "[a-z][a-z0-9.-]{0,10}",
        ];
        let tags = prop::option::of(prop::collection::vec(
            prop_oneof![Just("udp".to_string()), "[a-z]{1,4}"],
            0..3,
        ));
        (
            "[a-z0-9-]{1,8}",
            address.clone(),
            address,
            any::<u16>(),
            tags,
            prop::option::of(any::<u32>()),
        )
            .prop_map(
                |(id, node_address, address, port, tags, weight)| Registration {
                    id,
                    node_address,
                    address,
                    port,
                    tags,
                    weight,
                },
            )
    }

    fn to_json(r: &Registration) -> serde_json::Value {
        let mut service = json!({"ID": r.id, "Service": "redis", "Address": r.address, "Port": r.port, "Tags": r.tags});
        if let Some(weight) = r.weight {
            service["Weights"] = json!({"Passing": weight, "Warning": 1});
        }
        json!({"Node": {"Node": "n", "Address": r.node_address}, "Service": service, "Checks": []})
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_bytes_are_an_answer_or_an_error(body in prop::collection::vec(any::<u8>(), 0..256)) {
            for protocol in [Protocol::Tcp, Protocol::Udp] {
                if let Err(error) = parse_answer(&body, &WatchRequest::new("redis", &[] as &[&str], protocol)) {
                    prop_assert!(error.to_string().len() < 1024, "{}", error);
                }
            }
        }

        #[test]
        fn any_text_is_an_index_or_an_error(header in prop::collection::vec(any::<u8>(), 0..64)) {
            if let Err(error) = parse_index(Some(&header)) {
                prop_assert!(error.to_string().len() < 1024, "{}", error);
            }
        }

        #[test]
        fn indexes_read_back_and_never_go_backwards(previous in any::<u64>(), returned in any::<u64>()) {
            prop_assert_eq!(parse_index(Some(returned.to_string().as_bytes())).ok(), Some(returned));
            let next = next_index(previous, returned);
            prop_assert!(next == returned && returned >= previous || next == 0);
        }

        /// An answer serves each dialable registration of the protocol once, sorted; every
        /// other registration is excluded, once.
        #[test]
        fn answers_read_back(registrations in prop::collection::vec(registration(), 0..6)) {
            let body = serde_json::Value::Array(registrations.iter().map(to_json).collect()).to_string();
            for protocol in [Protocol::Tcp, Protocol::Udp] {
                let request = WatchRequest::new("redis", &[] as &[&str], protocol);
                let answer = parse_answer(body.as_bytes(), &request)
                    .map_err(|e| TestCaseError::fail(format!("{body}: {e}")))?;
                let mut expected = BTreeSet::new();
                for r in &registrations {
                    let tags = r.tags.clone().unwrap_or_default();
                    if !embassy_plugin_api::support::serves_protocol(None, &tags, protocol) {
                        continue;
                    }
                    let host = if r.address.is_empty() { &r.node_address } else { &r.address };
                    if host.is_empty() || r.port == 0 {
                        continue;
                    }
                    expected.insert(if host.contains(':') {
                        format!("[{host}]:{}", r.port)
                    } else {
                        format!("{host}:{}", r.port)
                    });
                }
                let served: Vec<String> = answer.endpoints.iter().map(|e| e.address.to_string()).collect();
                prop_assert_eq!(served, expected.into_iter().collect::<Vec<_>>());
                prop_assert_eq!(answer.endpoints.len() + answer.excluded.len(), registrations.len());
                prop_assert!(answer.endpoints.iter().all(|e| e.weight > 0));
            }
        }
    }
}
