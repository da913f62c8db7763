//! The `file` discovery plugin through the real host: edits reach new connections, open
//! connections survive, a broken file changes nothing.

use std::time::Duration;

use embassy_tests::*;
use serde_json::json;

struct Setup {
    proxy: FileBacked,
    port: u16,
}

fn start(initial: serde_json::Value, service: &str) -> Setup {
    let plugins = standard_plugin_dir(&[]);
    let port = free_port();
    let mut args: Vec<String> = service_arg(service.replace("PORT", &port.to_string())).into();
    args.extend([
        "--discovery-opt".to_string(),
        "poll_interval=100ms".to_string(),
    ]);
    Setup {
        proxy: FileBacked::start(&initial, plugins.path(), &args),
        port,
    }
}

impl Setup {
    /// The service's id in the admin API.
    fn id(&self) -> String {
        format!("tcp-{}", self.port)
    }
}

/// Opens connections until one lands on `name`, at most 5 s of trying.
fn reaches(port: u16, name: &str) -> bool {
    eventually(Duration::from_secs(5), || {
        Client::connect(port).is_ok_and(|c| c.upstream == name)
    })
}

#[test]
fn edits_add_and_remove_endpoints_for_new_connections_only() {
    let (a, b, c) = (
        Upstream::start("a"),
        Upstream::start("b"),
        Upstream::start("c"),
    );
    let s = start(
        json!({ "web": [a.addr.to_string(), b.addr.to_string()] }),
        "web;PORT/tcp",
    );
    let mut on_a = loop {
        let client = Client::connect(s.port).expect("connect");
        if client.upstream == "a" {
            break client;
        }
    };

    // Replace a by c.
    write_services(
        &s.proxy.services,
        &json!({ "web": [b.addr.to_string(), c.addr.to_string()] }),
    );
    assert!(
        reaches(s.port, "c"),
        "the added endpoint receives new connections"
    );
    s.proxy
        .embassy
        .wait_for_endpoints(&s.id(), &[b.addr, c.addr], Duration::from_secs(5))
        .expect("a removed");
    let counts = distribution(s.port, 20).expect("connections");
    assert_eq!(
        counts.get("a"),
        None,
        "the removed endpoint gets no new connection: {counts:?}"
    );
    assert_eq!(counts.values().sum::<usize>(), 20);

    // The connection opened before the edit is undisturbed.
    assert_eq!(
        on_a.echo(b"survived the edit").expect("echo"),
        b"survived the edit"
    );
}

#[test]
fn a_broken_file_keeps_the_last_good_endpoints() {
    let a = Upstream::start("a");
    let mut s = start(json!({ "web": [a.addr.to_string()] }), "web;PORT/tcp");
    std::fs::write(&s.proxy.services, "{ \"web\": [ \"127.0.0.1:1\", ").expect("write broken file");
    let line = s
        .proxy
        .embassy
        .wait_for_log("invalid JSON", Duration::from_secs(5))
        .expect("broken file reported");
    assert!(
        line.contains("services.json"),
        "the error names the file: {line}"
    );
    assert!(line.contains("keeping the last good endpoints"), "{line}");
    let view = s
        .proxy
        .embassy
        .wait_for_discovery(&s.id(), "invalid", Duration::from_secs(5))
        .expect("the API says why");
    assert!(discovery_detail(&view).contains("services.json"), "{view}");
    assert_eq!(
        serving(&view),
        [a.addr.to_string()],
        "the last good set stays"
    );
    let counts = distribution(s.port, 10).expect("still served");
    assert_eq!(counts.get("a"), Some(&10));

    // A bad entry is a broken file too, and it is named.
    write_services(
        &s.proxy.services,
        &json!({ "web": [a.addr.to_string(), {"adress": "x:1"}] }),
    );
    let line = s
        .proxy
        .embassy
        .wait_for_log("unknown field", Duration::from_secs(5))
        .expect("bad entry reported");
    assert!(
        line.contains("service \\\"web\\\", endpoint 2")
            || line.contains("service \"web\", endpoint 2"),
        "{line}"
    );

    // Fixed again: picked up.
    let b = Upstream::start("b");
    write_services(&s.proxy.services, &json!({ "web": [b.addr.to_string()] }));
    assert!(reaches(s.port, "b"));
    s.proxy
        .embassy
        .wait_for_discovery(&s.id(), "reachable", Duration::from_secs(5))
        .expect("a good file again");
}

#[test]
fn tags_select_instances() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let s = start(
        json!({ "web": [
            {"address": a.addr.to_string(), "tags": ["prod", "eu"]},
            {"address": b.addr.to_string(), "tags": ["staging", "eu"]},
        ]}),
        "web[prod,eu];PORT/tcp",
    );
    let counts = distribution(s.port, 10).expect("connections");
    assert_eq!(counts.get("a"), Some(&10), "{counts:?}");
}

#[test]
fn a_service_missing_from_the_file_refuses_until_it_appears() {
    let a = Upstream::start("a");
    let mut s = start(json!({ "other": [a.addr.to_string()] }), "web;PORT/tcp");
    let line = s
        .proxy
        .embassy
        .wait_for_log("service not in the services file", Duration::from_secs(5))
        .expect("warned");
    assert!(
        line.contains("plugin=\"file\""),
        "plugin logs reach the host's log under the plugin's name: {line}"
    );
    assert!(
        Client::connect(s.port).is_err(),
        "no endpoint: the connection is closed"
    );
    write_services(&s.proxy.services, &json!({ "web": [a.addr.to_string()] }));
    assert!(reaches(s.port, "a"));
}
