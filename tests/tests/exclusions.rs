//! Discovery plugins explain every instance they leave out (contract 1.1
//! `update_explained`): the real plugin libraries, loaded by the host's loader, watching a
//! real etcd, the Consul simulator and a services file, with the test's own sink recording
//! the sets and exclusions they push (state, not log text).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use embassy_host::plugins::{DiscoveryBackend, PluginRegistry};
use embassy_plugin_api::{
    abi_stable::std_types::{RStr, RVec},
    BackendHealth, Endpoint, EndpointSink, Excluded, Protocol, WatchHandleBox, WatchRequest,
};
use embassy_tests::{
    artifacts,
    consul_sim::{ConsulSim, Health, Instance},
    etcd::Etcd,
    eventually, standard_plugin_dir, write_services,
};
use serde_json::json;

/// What a watch last pushed: `address*weight` per endpoint, `instance:reason` per exclusion
/// (sorted), and every report.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Seen>>);

#[derive(Default, Debug, Clone)]
struct Seen {
    sets: usize,
    endpoints: Vec<String>,
    excluded: Vec<String>,
    reports: Vec<String>,
}

impl EndpointSink for Recorder {
    fn update(&self, endpoints: RVec<Endpoint>) {
        self.update_explained(endpoints, RVec::new());
    }

    fn report(&self, health: BackendHealth, detail: RStr<'_>) {
        let mut seen = self.0.lock().expect("recorder");
        seen.reports.push(format!("{health:?}: {detail}"));
    }

    fn update_explained(&self, endpoints: RVec<Endpoint>, excluded: RVec<Excluded>) {
        let mut seen = self.0.lock().expect("recorder");
        seen.sets += 1;
        seen.endpoints = endpoints
            .iter()
            .map(|e| format!("{}*{}", e.address, e.weight))
            .collect();
        seen.excluded = excluded
            .iter()
            .map(|x| format!("{}:{}", x.instance, x.reason))
            .collect();
        seen.excluded.sort();
    }
}

impl Recorder {
    fn seen(&self) -> Seen {
        self.0.lock().expect("recorder").clone()
    }

    /// Waits (10 s at most) until the last set is `endpoints` with `excluded` (any order).
    fn wait_for(&self, endpoints: &[&str], excluded: &[&str]) {
        let mut excluded: Vec<String> = excluded.iter().map(|x| x.to_string()).collect();
        excluded.sort();
        let arrived = eventually(Duration::from_secs(10), || {
            let seen = self.seen();
            seen.endpoints == endpoints && seen.excluded == excluded
        });
        assert!(
            arrived,
            "waiting for {endpoints:?} excluding {excluded:?}; last: {:?}",
            self.seen()
        );
    }
}

/// The standard plugins and consul, loaded by the host's loader.
fn registry() -> (PluginRegistry, tempfile::TempDir) {
    let dir = standard_plugin_dir(&[artifacts().library("embassy-plugin-consul")]);
    let (registry, errors) = PluginRegistry::load_dir(dir.path()).expect("plugin dir");
    assert!(errors.is_empty(), "{errors:?}");
    (registry, dir)
}

/// Opens `uri` with the standard plugins and watches `service` with `tags` over `protocol`.
fn watch(
    uri: &str,
    options: &[(&str, &str)],
    service: &str,
    tags: &[&str],
    protocol: Protocol,
) -> (Recorder, WatchHandleBox, DiscoveryBackend, PluginRegistry) {
    let (registry, _dir) = registry();
    let options: Vec<(String, String)> = options
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let backend = registry
        .open_discovery(uri, &options)
        .unwrap_or_else(|error| panic!("open {uri}: {error}"));
    let recorder = Recorder::default();
    let handle = backend
        .watch(WatchRequest::new(service, tags, protocol), recorder.clone())
        .expect("watch");
    (recorder, handle, backend, registry)
}

fn registrar(port: u16, tags: &[&str], proto: &str) -> String {
    json!({"ipaddress": "127.0.0.1", "host_port": port.to_string(), "tags": tags, "proto": proto})
        .to_string()
}

#[test]
fn etcd_explains_unreadable_tag_protocol_and_duplicate() {
    let etcd = Etcd::start();
    let prefix = "/services/ex/80";
    etcd.put(
        &format!("{prefix}/a-good"),
        &registrar(1001, &["prod"], "tcp"),
    );
    etcd.put(&format!("{prefix}/b-bad"), "not an address");
    etcd.put(
        &format!("{prefix}/c-dev"),
        &registrar(1003, &["dev"], "tcp"),
    );
    etcd.put(
        &format!("{prefix}/d-udp"),
        &registrar(1004, &["prod"], "udp"),
    );
    etcd.put(
        &format!("{prefix}/e-again"),
        &registrar(1001, &["prod"], "tcp"),
    );
    etcd.put(
        &format!("{prefix}/f-skydns"),
        r#"{"host": "127.0.0.1", "port": 1006, "weight": 3}"#,
    );
    let (prod, _watch, _backend, _registry) =
        watch(&etcd.uri(), &[], prefix, &["prod"], Protocol::Tcp);
    prod.wait_for(
        &["127.0.0.1:1001*1"],
        &[
            "/services/ex/80/b-bad:unreadable",
            "/services/ex/80/c-dev:tag",
            "/services/ex/80/d-udp:protocol",
            "/services/ex/80/e-again:duplicate",
            "/services/ex/80/f-skydns:tag",
        ],
    );
    // Fixing the bad value moves it from the exclusions into the set.
    etcd.put(
        &format!("{prefix}/b-bad"),
        &registrar(1002, &["prod"], "tcp"),
    );
    prod.wait_for(
        &["127.0.0.1:1001*1", "127.0.0.1:1002*1"],
        &[
            "/services/ex/80/c-dev:tag",
            "/services/ex/80/d-udp:protocol",
            "/services/ex/80/e-again:duplicate",
            "/services/ex/80/f-skydns:tag",
        ],
    );
    // Without tags, SkyDNS's weight comes through.
    let (all, _watch, _backend, _registry) = watch(&etcd.uri(), &[], prefix, &[], Protocol::Tcp);
    all.wait_for(
        &[
            "127.0.0.1:1001*1",
            "127.0.0.1:1002*1",
            "127.0.0.1:1003*1",
            "127.0.0.1:1006*3",
        ],
        &[
            "/services/ex/80/d-udp:protocol",
            "/services/ex/80/e-again:duplicate",
        ],
    );
}

#[test]
fn consul_explains_not_passing_tag_protocol_duplicate_and_unreadable() {
    let sim = ConsulSim::start();
    let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    sim.register(
        Instance::new("a", "web", at(2001))
            .tags(&["prod"])
            .weight(3),
    );
    sim.register(
        Instance::new("b", "web", at(2002))
            .tags(&["prod"])
            .health(Health::Critical),
    );
    sim.register(Instance::new("c", "web", at(2003)).tags(&["dev"]));
    sim.register(Instance::new("d", "web", at(2004)).tags(&["prod", "udp"]));
    sim.register(Instance::new("e", "web", at(2001)).tags(&["prod"]));
    sim.register(Instance::new("f", "web", at(0)).tags(&["prod"]));
    let (recorder, _watch, _backend, _registry) =
        watch(&sim.uri(), &[], "web", &["prod"], Protocol::Tcp);
    recorder.wait_for(
        &["127.0.0.1:2001*3"],
        &[
            "b:not-passing",
            "c:tag",
            "d:protocol",
            "e:duplicate",
            "f:unreadable",
        ],
    );
    sim.set_health("b", Health::Passing);
    recorder.wait_for(
        &["127.0.0.1:2001*3", "127.0.0.1:2002*1"],
        &["c:tag", "d:protocol", "e:duplicate", "f:unreadable"],
    );
}

#[test]
fn file_explains_tag_protocol_and_duplicate_and_keeps_the_last_good_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("services.json");
    write_services(
        &path,
        &json!({"web": [
            {"address": "127.0.0.1:3001", "tags": ["prod"], "weight": 2},
            {"address": "127.0.0.1:3002", "tags": ["dev"]},
            {"address": "127.0.0.1:3003", "tags": ["prod"], "proto": "udp"},
            {"address": "127.0.0.1:3001", "tags": ["prod"]},
        ]}),
    );
    let uri = format!("file://{}", path.display());
    let (recorder, _watch, _backend, _registry) = watch(
        &uri,
        &[("poll_interval", "50ms")],
        "web",
        &["prod"],
        Protocol::Tcp,
    );
    recorder.wait_for(
        &["127.0.0.1:3001*2"],
        &["web #2:tag", "web #3:protocol", "web #4:duplicate"],
    );
    // A broken entry makes the file invalid as a whole: reported, and the set stays.
    let sets = recorder.seen().sets;
    write_services(&path, &json!({"web": [{"adress": "127.0.0.1:3009"}]}));
    assert!(
        eventually(Duration::from_secs(10), || recorder
            .seen()
            .reports
            .iter()
            .any(
                |r| r.starts_with("Invalid") && r.contains("unknown field \"adress\"")
            )),
        "{:?}",
        recorder.seen()
    );
    assert_eq!(
        recorder.seen().sets,
        sets,
        "no set pushed for a broken file"
    );
    write_services(&path, &json!({"web": ["127.0.0.1:3004"]}));
    recorder.wait_for(&[], &["web #1:tag"]);
}

#[test]
fn unknown_options_are_refused_by_every_discovery_plugin() {
    let (registry, dir) = registry();
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
