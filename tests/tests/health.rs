//! Endpoint health through the real host, against real upstreams on loopback: passive
//! ejection, what happens on removal, hold-down, and state kept across discovery updates.

use std::{
    io::Read,
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use embassy_tests::*;
use serde_json::{json, Value};

struct Setup {
    proxy: FileBacked,
    port: u16,
    _plugins: tempfile::TempDir,
}

/// Embassy on the file plugin with one TCP service: `options` appended to its descriptor.
fn start(endpoints: &[SocketAddr], options: &str) -> Setup {
    let plugins = standard_plugin_dir(&[]);
    let port = free_port();
    let mut args: Vec<String> = service_arg(format!("web;{port}/tcp{options}")).into();
    args.extend(["--discovery-opt".into(), "poll_interval=100ms".into()]);
    let proxy = FileBacked::start(&services(endpoints), plugins.path(), &args);
    Setup {
        proxy,
        port,
        _plugins: plugins,
    }
}

fn services(endpoints: &[SocketAddr]) -> Value {
    json!({ "web": endpoints.iter().map(ToString::to_string).collect::<Vec<_>>() })
}

impl Setup {
    fn id(&self) -> String {
        format!("tcp-{}", self.port)
    }

    fn view(&self) -> Value {
        self.proxy
            .embassy
            .admin_get(&format!("/v1/services/{}", self.id()))
            .expect("service view")
            .1
    }

    /// The endpoint `addr` as the API shows it, once `ready` holds of it.
    fn wait_endpoint(&self, addr: SocketAddr, ready: impl Fn(&Value) -> bool) -> Value {
        let view = self
            .proxy
            .embassy
            .wait_for_service(&self.id(), Duration::from_secs(10), |view| {
                endpoint(view, addr).is_some_and(&ready)
            })
            .unwrap_or_else(|error| panic!("endpoint {addr}: {error:#}"));
        endpoint(&view, addr).expect("listed").clone()
    }

    fn rewrite(&self, endpoints: &[SocketAddr]) {
        write_services(&self.proxy.services, &services(endpoints));
    }

    /// `n` connections one after another; every one must reach an upstream and echo.
    fn load(&self, n: usize) -> std::collections::HashMap<String, usize> {
        let mut counts = std::collections::HashMap::new();
        for i in 0..n {
            let mut client = Client::connect(self.port)
                .unwrap_or_else(|error| panic!("connection {i} of {n} failed: {error:#}"));
            assert_eq!(client.echo(b"ping").expect("echo"), b"ping");
            *counts.entry(client.upstream).or_insert(0) += 1;
        }
        counts
    }
}

fn endpoint(view: &Value, addr: SocketAddr) -> Option<&Value> {
    view["endpoints"]
        .as_array()?
        .iter()
        .find(|e| e["address"] == addr.to_string())
}

/// Stops `upstream` and waits until its port refuses connections.
fn kill(upstream: Upstream) -> SocketAddr {
    let addr = upstream.addr;
    drop(upstream);
    assert!(
        eventually(Duration::from_secs(5), || TcpStream::connect(addr).is_err()),
        "{addr} still accepts"
    );
    addr
}

/// Waits until the connection's stream ends (reset or closed); how long that took.
fn wait_until_cut(client: &mut Client, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let stream = client.stream();
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut byte = [0u8; 1];
    while started.elapsed() < limit {
        match stream.read(&mut byte) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => panic!("unexpected byte from the upstream"),
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(started.elapsed()),
        }
    }
    None
}

#[test]
fn a_dead_upstream_is_ejected_after_eject_after_failures_and_returns_when_back() {
    let (a, b, c) = (
        Upstream::start("a"),
        Upstream::start("b"),
        Upstream::start("c"),
    );
    let s = start(&[a.addr, b.addr, c.addr], ";eject_after=3;eject_time=2s");
    let before = s.load(30);
    assert_eq!(before.len(), 3, "all three serve: {before:?}");

    let dead = kill(c);
    // Steady load through the failure: every client connection succeeds (failover).
    let during = s.load(60);
    assert_eq!(during.values().sum::<usize>(), 60);
    assert_eq!(during.get("c"), None);
    let ejected = s.wait_endpoint(dead, |e| e["state"] == "ejected");
    assert_eq!(ejected["in_rotation"], false);
    assert_eq!(ejected["ejections"], 1);
    let at_ejection = ejected["connect_failures"].as_u64().expect("count");
    assert!(
        (3..=4).contains(&at_ejection),
        "ejected after eject_after=3 failures (one more may be in flight): {ejected}"
    );
    assert!(
        ejected["reason"]
            .as_str()
            .is_some_and(|r| r.contains("connect failures in a row")),
        "{ejected}"
    );

    // Ejected: no further attempt at it, however many connections come.
    s.load(60);
    let still = endpoint(&s.view(), dead).expect("listed").clone();
    assert_eq!(
        still["connect_failures"], at_ejection,
        "no attempt while ejected: {still}"
    );

    // Back on the same port: after the ejection it serves again, and a success resets it.
    let c = Upstream::start_at("c", dead);
    let back = s.wait_endpoint(dead, |e| e["state"] != "ejected");
    assert_eq!(back["in_rotation"], true, "{back}");
    assert!(
        eventually(Duration::from_secs(10), || s.load(6).contains_key("c")),
        "c gets connections again"
    );
    let served = s.wait_endpoint(dead, |e| e["state"] == "serving");
    assert_eq!(
        served["ejections"], 0,
        "a success ends the run of ejections"
    );
    assert!(c.accepted() > 0);
}

#[test]
fn health_state_survives_a_discovery_update_that_keeps_the_endpoint() {
    let (a, b, c, d) = (
        Upstream::start("a"),
        Upstream::start("b"),
        Upstream::start("c"),
        Upstream::start("d"),
    );
    let s = start(&[a.addr, b.addr, c.addr], ";eject_after=2;eject_time=1m");
    let dead = kill(c);
    s.load(30);
    let ejected = s.wait_endpoint(dead, |e| e["state"] == "ejected");

    s.rewrite(&[a.addr, b.addr, dead, d.addr]);
    s.proxy
        .embassy
        .wait_for_service(&s.id(), Duration::from_secs(10), |view| {
            endpoint(view, d.addr).is_some()
        })
        .expect("d added");
    let kept = endpoint(&s.view(), dead).expect("listed").clone();
    assert_eq!(kept["state"], "ejected", "{kept}");
    assert_eq!(kept["since"], ejected["since"], "the same ejection");
    assert_eq!(kept["until"], ejected["until"]);
    let counts = s.load(40);
    assert_eq!(counts.get("c"), None, "{counts:?}");
    assert!(counts.contains_key("d"), "{counts:?}");
}

#[test]
fn on_remove_close_resets_the_removed_endpoints_connections_at_once() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let s = start(&[a.addr, b.addr], ";on_remove=close");
    let mut on_b = connection_to(&s, "b");
    let mut on_a = connection_to(&s, "a");
    s.rewrite(&[a.addr]);
    assert!(
        wait_until_cut(&mut on_b, Duration::from_secs(10)).is_some(),
        "the connection to the removed endpoint is reset"
    );
    assert_eq!(
        on_a.echo(b"still here").expect("a's connection lives"),
        b"still here"
    );
}

#[test]
fn on_remove_drain_lets_connections_run_until_the_drain_timeout() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let s = start(&[a.addr, b.addr], ";on_remove=drain;drain_timeout=2s");
    let mut on_b = connection_to(&s, "b");
    s.rewrite(&[a.addr]);
    let draining = s.wait_endpoint(b.addr, |e| e["state"] == "draining");
    let removed_at = Instant::now();
    assert_eq!(draining["in_rotation"], false);
    assert_eq!(draining["active"], 1, "{draining}");
    assert_eq!(
        on_b.echo(b"draining").expect("runs on while draining"),
        b"draining"
    );
    assert_eq!(s.load(10).get("b"), None, "no new connection to b");
    let cut = wait_until_cut(&mut on_b, Duration::from_secs(15));
    assert!(cut.is_some(), "reset at the drain timeout");
    assert!(
        removed_at.elapsed() >= Duration::from_millis(1500),
        "not before the drain timeout: {:?}",
        removed_at.elapsed()
    );
    s.proxy
        .embassy
        .wait_for_service(&s.id(), Duration::from_secs(10), |view| {
            endpoint(view, b.addr).is_none()
        })
        .expect("gone once drained");
}

#[test]
fn on_remove_keep_leaves_connections_alone() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let s = start(&[a.addr, b.addr], "");
    let mut on_b = connection_to(&s, "b");
    s.rewrite(&[a.addr]);
    s.proxy
        .embassy
        .wait_for_endpoints(&s.id(), &[a.addr], Duration::from_secs(10))
        .expect("b removed");
    std::thread::sleep(Duration::from_millis(1500)); // past the cut signal's first look
    assert_eq!(on_b.echo(b"kept").expect("kept"), b"kept");
}

#[test]
fn remove_delay_keeps_a_missing_endpoint_serving_then_removes_it() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let s = start(&[a.addr, b.addr], ";remove_delay=3s");
    s.rewrite(&[a.addr]);
    let held = s.wait_endpoint(b.addr, |e| e["state"] == "held_down");
    assert_eq!(held["in_rotation"], true, "{held}");
    let counts = s.load(20);
    assert!(
        counts.contains_key("b"),
        "held down while healthy: still in rotation {counts:?}"
    );
    s.proxy
        .embassy
        .wait_for_service(&s.id(), Duration::from_secs(15), |view| {
            endpoint(view, b.addr).is_none()
        })
        .expect("removed after remove_delay");
    assert_eq!(s.load(20).get("b"), None);

    // Listed again within the delay: nothing happens to it.
    s.rewrite(&[a.addr, b.addr]);
    s.wait_endpoint(b.addr, |e| e["state"] == "serving");
    s.rewrite(&[a.addr]);
    s.wait_endpoint(b.addr, |e| e["state"] == "held_down");
    s.rewrite(&[a.addr, b.addr]);
    let back = s.wait_endpoint(b.addr, |e| e["state"] == "serving");
    assert_eq!(back["in_rotation"], true);
}

/// A connection through the proxy that reached `name`.
fn connection_to(s: &Setup, name: &str) -> Client {
    for _ in 0..100 {
        let client = Client::connect(s.port).expect("connect");
        if client.upstream == name {
            return client;
        }
    }
    panic!("no connection reached {name} in 100 tries");
}
