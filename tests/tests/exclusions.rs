//! Explain: for every instance a discovery backend holds under a service, the admin API
//! (`GET /v1/services/{id}`) says whether it serves and, when not, the plugin's own reason
//! (contract 1.1 `update_explained`). The real binary and plugin libraries against a real
//! etcd, the Consul simulator and a services file, each holding good and bad instances; the
//! good ones must be `serving` and take the traffic, the bad ones must be listed with their
//! reason and take none.

use std::{net::SocketAddr, time::Duration};

use embassy_host::plugins::PluginRegistry;
use embassy_tests::{
    consul_sim::{ConsulSim, Health, Instance},
    etcd::Etcd,
    *,
};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

/// `(instance, reason)` of each instance the view's explain lists, sorted; every one must
/// carry a detail for the operator.
fn explained(view: &Value) -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = view["excluded"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            assert!(
                e["detail"].as_str().is_some_and(|d| !d.is_empty()),
                "no detail: {e}"
            );
            let field = |k: &str| e[k].as_str().unwrap_or_default().to_string();
            (field("instance"), field("reason"))
        })
        .collect();
    found.sort();
    found
}

/// The view of `id` once it serves exactly `serving` and explains exactly `excluded`
/// (`(instance, reason)`, any order).
fn wait_for_explain(
    embassy: &Embassy,
    id: &str,
    serving_now: &[SocketAddr],
    excluded: &[(&str, &str)],
) -> Value {
    let mut expected_serving: Vec<String> = serving_now.iter().map(|a| a.to_string()).collect();
    expected_serving.sort();
    let mut expected: Vec<(String, String)> = excluded
        .iter()
        .map(|(i, r)| (i.to_string(), r.to_string()))
        .collect();
    expected.sort();
    embassy
        .wait_for_service(id, WAIT, |view| {
            serving(view) == expected_serving && explained(view) == expected
        })
        .unwrap_or_else(|error| {
            panic!("{id}: want {expected_serving:?} excluding {expected:?}: {error:#}")
        })
}

/// The detail the view gives for `instance`.
fn detail<'a>(view: &'a Value, instance: &str) -> &'a str {
    view["excluded"]
        .as_array()
        .and_then(|list| list.iter().find(|e| e["instance"] == instance))
        .and_then(|e| e["detail"].as_str())
        .unwrap_or_else(|| panic!("{instance} not explained in {view}"))
}

/// `n` connections to `port` land exactly on the upstreams named `names` (each reached), and
/// the upstreams of excluded instances in `idle` accept none of them.
fn traffic_reaches_only(port: u16, n: usize, names: &[&str], idle: &[&Upstream]) {
    let before: Vec<usize> = idle.iter().map(|u| u.accepted()).collect();
    let counts = distribution(port, n).expect("connections through the proxy");
    let mut landed: Vec<&str> = counts.keys().map(String::as_str).collect();
    landed.sort();
    let mut want = names.to_vec();
    want.sort();
    assert_eq!(landed, want, "{counts:?}");
    for (upstream, before) in idle.iter().zip(before) {
        assert_eq!(
            upstream.accepted(),
            before,
            "excluded {} got a connection",
            upstream.name
        );
    }
}

/// Weight the view gives the endpoint at `addr`.
fn weight(view: &Value, addr: SocketAddr) -> Option<u64> {
    view["endpoints"]
        .as_array()?
        .iter()
        .find(|e| e["address"] == addr.to_string())?["weight"]
        .as_u64()
}

/// service-registrar's document for `addr`.
fn registrar(addr: SocketAddr, tags: &[&str], proto: &str) -> String {
    json!({"ipaddress": addr.ip().to_string(), "host_port": addr.port().to_string(), "tags": tags, "proto": proto})
        .to_string()
}

#[test]
fn etcd_explains_garbage_a_missing_tag_udp_for_tcp_and_a_duplicate() {
    let etcd = Etcd::start();
    let (a, b, c, d, f) = (
        Upstream::start("a"),
        Upstream::start("b"),
        Upstream::start("c"),
        Upstream::start("d"),
        Upstream::start("f"),
    );
    let prefix = "/services/ex/80";
    let key = |name: &str| format!("{prefix}/{name}");
    etcd.put(&key("a-good"), &registrar(a.addr, &["prod"], "tcp"));
    etcd.put(&key("b-bad"), "not an address");
    etcd.put(&key("c-dev"), &registrar(c.addr, &["dev"], "tcp"));
    etcd.put(&key("d-udp"), &registrar(d.addr, &["prod"], "udp"));
    etcd.put(&key("e-again"), &registrar(a.addr, &["prod"], "tcp"));
    // A SkyDNS record carries a weight but no tags.
    etcd.put(
        &key("f-skydns"),
        &json!({"host": "127.0.0.1", "port": f.addr.port(), "weight": 3}).to_string(),
    );
    let plugins = standard_plugin_dir(&[]);
    let (prod_port, all_port) = (free_port(), free_port());
    let embassy = Embassy::start([
        "--plugin-dir".to_string(),
        plugins.path().display().to_string(),
        "--discovery".to_string(),
        etcd.uri(),
        "--service".to_string(),
        format!("{prefix}[prod];{prod_port}/tcp"),
        "--service".to_string(),
        format!("{prefix};{all_port}/tcp"),
    ]);
    let (prod, all) = (format!("tcp-{prod_port}"), format!("tcp-{all_port}"));

    let view = wait_for_explain(
        &embassy,
        &prod,
        &[a.addr],
        &[
            ("/services/ex/80/b-bad", "unreadable"),
            ("/services/ex/80/c-dev", "tag"),
            ("/services/ex/80/d-udp", "protocol"),
            ("/services/ex/80/e-again", "duplicate"),
            ("/services/ex/80/f-skydns", "tag"),
        ],
    );
    assert!(
        detail(&view, "/services/ex/80/c-dev").contains("\"prod\""),
        "names the missing tag: {view}"
    );
    assert!(
        detail(&view, "/services/ex/80/d-udp").contains("udp"),
        "names the protocol: {view}"
    );
    assert!(
        detail(&view, "/services/ex/80/e-again").contains("a-good"),
        "names the instance that gave the address first: {view}"
    );
    assert_eq!(view["discovery"]["state"], "reachable", "{view}");
    traffic_reaches_only(prod_port, 6, &["a"], &[&c, &d, &f]);

    // Without tags only the protocol and the duplicate keep instances out; SkyDNS's weight
    // comes through.
    let view = wait_for_explain(
        &embassy,
        &all,
        &[a.addr, c.addr, f.addr],
        &[
            ("/services/ex/80/b-bad", "unreadable"),
            ("/services/ex/80/d-udp", "protocol"),
            ("/services/ex/80/e-again", "duplicate"),
        ],
    );
    assert_eq!(
        (weight(&view, a.addr), weight(&view, f.addr)),
        (Some(1), Some(3))
    );
    traffic_reaches_only(all_port, 10, &["a", "c", "f"], &[&d]);

    // Fixing the garbage moves it from the explain into the set, for both services.
    etcd.put(&key("b-bad"), &registrar(b.addr, &["prod"], "tcp"));
    wait_for_explain(
        &embassy,
        &prod,
        &[a.addr, b.addr],
        &[
            ("/services/ex/80/c-dev", "tag"),
            ("/services/ex/80/d-udp", "protocol"),
            ("/services/ex/80/e-again", "duplicate"),
            ("/services/ex/80/f-skydns", "tag"),
        ],
    );
    traffic_reaches_only(prod_port, 6, &["a", "b"], &[&c, &d, &f]);
    wait_for_explain(
        &embassy,
        &all,
        &[a.addr, b.addr, c.addr, f.addr],
        &[
            ("/services/ex/80/d-udp", "protocol"),
            ("/services/ex/80/e-again", "duplicate"),
        ],
    );
}

#[test]
fn consul_explains_not_passing_a_missing_tag_udp_a_duplicate_and_no_port() {
    let (a, b, c, d) = (
        Upstream::start("a"),
        Upstream::start("b"),
        Upstream::start("c"),
        Upstream::start("d"),
    );
    let sim = ConsulSim::start();
    sim.register(Instance::new("a", "web", a.addr).tags(&["prod"]).weight(3));
    sim.register(
        Instance::new("b", "web", b.addr)
            .tags(&["prod"])
            .health(Health::Critical),
    );
    sim.register(Instance::new("c", "web", c.addr).tags(&["dev"]));
    sim.register(Instance::new("d", "web", d.addr).tags(&["prod", "udp"]));
    sim.register(Instance::new("e", "web", a.addr).tags(&["prod"]));
    sim.register(Instance::new("f", "web", SocketAddr::from(([127, 0, 0, 1], 0))).tags(&["prod"]));
    let plugins = standard_plugin_dir(&[artifacts().library("embassy-plugin-consul")]);
    let port = free_port();
    let mut command = Embassy::command(
        &artifacts().embassy(),
        [
            "--plugin-dir".to_string(),
            plugins.path().display().to_string(),
            "--discovery".to_string(),
            sim.uri(),
            "--service".to_string(),
            format!("web[prod];{port}/tcp"),
        ],
    );
    // The simulator is on loopback: no proxy of the machine's may get in between.
    command.env("NO_PROXY", "*").env_remove("CONSUL_HTTP_TOKEN");
    let embassy = Embassy::spawn(&mut command);
    let id = format!("tcp-{port}");

    let view = wait_for_explain(
        &embassy,
        &id,
        &[a.addr],
        &[
            ("b", "not-passing"),
            ("c", "tag"),
            ("d", "protocol"),
            ("e", "duplicate"),
            ("f", "unreadable"),
        ],
    );
    assert!(
        detail(&view, "b").contains("critical"),
        "names the check's status: {view}"
    );
    assert!(detail(&view, "c").contains("\"prod\""), "{view}");
    assert_eq!(weight(&view, a.addr), Some(3), "{view}");
    traffic_reaches_only(port, 6, &["a"], &[&b, &c, &d]);

    // b passes: it serves; a warning on a takes a out, with its own reason.
    sim.set_health("b", Health::Passing);
    wait_for_explain(
        &embassy,
        &id,
        &[a.addr, b.addr],
        &[
            ("c", "tag"),
            ("d", "protocol"),
            ("e", "duplicate"),
            ("f", "unreadable"),
        ],
    );
    traffic_reaches_only(port, 6, &["a", "b"], &[&c, &d]);
    sim.set_health("a", Health::Warning);
    // e gives a's address too: with a out, e is the one that serves it.
    let view = wait_for_explain(
        &embassy,
        &id,
        &[a.addr, b.addr],
        &[
            ("a", "not-passing"),
            ("c", "tag"),
            ("d", "protocol"),
            ("f", "unreadable"),
        ],
    );
    assert!(detail(&view, "a").contains("warning"), "{view}");
}

#[test]
fn file_explains_a_missing_tag_udp_and_a_duplicate_and_keeps_the_last_good_file() {
    let (a, b, c, d) = (
        Upstream::start("a"),
        Upstream::start("b"),
        Upstream::start("c"),
        Upstream::start("d"),
    );
    let plugins = standard_plugin_dir(&[]);
    let port = free_port();
    let mut args: Vec<String> = service_arg(format!("web[prod];{port}/tcp")).into();
    args.extend([
        "--discovery-opt".to_string(),
        "poll_interval=50ms".to_string(),
    ]);
    let proxy = FileBacked::start(
        &json!({"web": [
            {"address": a.addr.to_string(), "tags": ["prod"], "weight": 2},
            {"address": c.addr.to_string(), "tags": ["dev"]},
            {"address": d.addr.to_string(), "tags": ["prod"], "proto": "udp"},
            {"address": a.addr.to_string(), "tags": ["prod"]},
        ]}),
        plugins.path(),
        &args,
    );
    let embassy = &proxy.embassy;
    let id = format!("tcp-{port}");
    let view = wait_for_explain(
        embassy,
        &id,
        &[a.addr],
        &[
            ("web #2", "tag"),
            ("web #3", "protocol"),
            ("web #4", "duplicate"),
        ],
    );
    assert!(
        detail(&view, "web #2").contains(&c.addr.to_string()),
        "{view}"
    );
    assert!(detail(&view, "web #4").contains("web #1"), "{view}");
    assert_eq!(weight(&view, a.addr), Some(2), "{view}");
    traffic_reaches_only(port, 6, &["a"], &[&c, &d]);

    // A broken entry makes the file invalid as a whole: the API says why, and the set and its
    // explain stay as they were.
    let sets = view["discovery"]["updates"].as_u64();
    write_services(
        &proxy.services,
        &json!({"web": [{"adress": b.addr.to_string()}]}),
    );
    let view = embassy
        .wait_for_discovery(&id, "invalid", WAIT)
        .expect("the broken file reported");
    assert!(
        discovery_detail(&view).contains("unknown field \"adress\""),
        "names the entry's bad field: {view}"
    );
    assert_eq!(view["discovery"]["updates"].as_u64(), sets, "no set pushed");
    assert_eq!(serving(&view), [a.addr.to_string()]);
    assert_eq!(explained(&view).len(), 3, "{view}");
    traffic_reaches_only(port, 4, &["a"], &[&b, &c, &d]);

    write_services(
        &proxy.services,
        &json!({"web": [
            {"address": b.addr.to_string(), "tags": ["prod"]},
            c.addr.to_string(),
        ]}),
    );
    wait_for_explain(embassy, &id, &[b.addr], &[("web #2", "tag")]);
    traffic_reaches_only(port, 4, &["b"], &[&a, &c]);
}

#[test]
fn unknown_options_are_refused_by_every_discovery_plugin() {
    let dir = standard_plugin_dir(&[artifacts().library("embassy-plugin-consul")]);
    let (registry, errors) = PluginRegistry::load_dir(dir.path()).expect("plugin dir");
    assert!(errors.is_empty(), "{errors:?}");
    let services = dir.path().join("services.json");
    write_services(&services, &json!({}));
    let file = format!("file://{}", services.display());
    for (uri, expected) in [
        (
            file.as_str(),
            "unknown file option colour=\"blue\" (known: poll_interval)",
        ),
        (
            "etcd://127.0.0.1:1",
            "unknown etcd option colour=\"blue\" (known: ca, ",
        ),
        (
            "consul://127.0.0.1:1",
            "unknown consul option colour=\"blue\" (known: token, ",
        ),
    ] {
        let options = [("colour".to_string(), "blue".to_string())];
        let error = match registry.open_discovery(uri, &options) {
            Ok(_) => panic!("{uri}: an unknown option was accepted"),
            Err(error) => error.to_string(),
        };
        assert!(error.contains(expected), "{uri}: {error}");
    }
}
