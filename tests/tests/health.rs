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

/// A real HTTP/1.1 server on loopback: `GET /healthz` answers with the status the test sets,
/// any other path `200` with the server's name as the body. One connection per request.
struct HttpServer {
    addr: SocketAddr,
    health: std::sync::Arc<std::sync::atomic::AtomicU16>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl HttpServer {
    fn start(name: &str) -> HttpServer {
        use std::{
            io::{BufRead, BufReader, Write},
            sync::{
                atomic::{AtomicBool, AtomicU16, Ordering},
                Arc,
            },
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind http");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let health = Arc::new(AtomicU16::new(200));
        let stop = Arc::new(AtomicBool::new(false));
        let (status, stopped, name) = (Arc::clone(&health), Arc::clone(&stop), name.to_string());
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                let Ok((stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                };
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut reader = BufReader::new(stream);
                let mut request = String::new();
                if reader.read_line(&mut request).is_err() {
                    continue;
                }
                loop {
                    let mut header = String::new();
                    match reader.read_line(&mut header) {
                        Ok(0) | Err(_) => break,
                        Ok(_) if header == "\r\n" => break,
                        Ok(_) => {}
                    }
                }
                let (code, body) = if request.starts_with("GET /healthz ") {
                    (status.load(Ordering::Relaxed), "health".to_string())
                } else {
                    (200, name.clone())
                };
                let _ = write!(
                    reader.get_mut(),
                    "HTTP/1.1 {code} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        HttpServer { addr, health, stop }
    }

    fn set_health(&self, status: u16) {
        self.health
            .store(status, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Setup {
    /// `n` HTTP requests through the proxy, counted by the server that answered.
    fn http_load(&self, n: usize) -> std::collections::HashMap<String, usize> {
        let proxy: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let mut counts = std::collections::HashMap::new();
        for i in 0..n {
            let (status, body) = http_get_tcp(proxy, "/")
                .unwrap_or_else(|error| panic!("request {i} of {n} failed: {error:#}"));
            assert_eq!(status, 200);
            *counts.entry(body).or_insert(0) += 1;
        }
        counts
    }
}

const FAST_CHECKS: &str = ";check_interval=200ms;check_timeout=500ms;check_rise=2;check_fall=2";

#[test]
fn an_http_check_takes_out_an_endpoint_answering_503_and_brings_it_back_on_200() {
    let (x, y) = (HttpServer::start("x"), HttpServer::start("y"));
    let s = start(
        &[x.addr, y.addr],
        &format!(";check=http:/healthz{FAST_CHECKS}"),
    );
    s.wait_endpoint(y.addr, |e| e["state"] == "serving");
    assert_eq!(s.http_load(10).len(), 2, "both serve");

    y.set_health(503);
    let failing = s.wait_endpoint(y.addr, |e| e["state"] == "check_failing");
    assert_eq!(failing["in_rotation"], false);
    assert!(
        failing["reason"]
            .as_str()
            .is_some_and(|r| r.contains("503")),
        "the last check's error: {failing}"
    );
    assert_eq!(failing["check"]["state"], "failing", "{failing}");
    assert_eq!(failing["check"]["spec"], "http:/healthz");
    let metrics = s.proxy.embassy.metrics().expect("metrics");
    let failures = metrics
        .lines()
        .find(|l| {
            l.starts_with("embassy_endpoint_check_failures_total{")
                && l.contains(&format!("endpoint=\"{}\"", y.addr))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse::<f64>().ok());
    assert!(
        failures.is_some_and(|n| n >= 2.0),
        "check_fall=2 failures counted: {failures:?}"
    );
    let states = metrics
        .lines()
        .find(|l| l.starts_with("embassy_endpoints{") && l.contains("state=\"check_failing\""))
        .unwrap_or_default()
        .to_string();
    let failing_gauge = states
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse::<f64>().ok());
    assert_eq!(failing_gauge, Some(1.0), "{states}");
    let counts = s.http_load(20);
    assert_eq!(counts.get("y"), None, "{counts:?}");

    y.set_health(200);
    s.wait_endpoint(y.addr, |e| e["state"] == "serving");
    assert!(
        eventually(Duration::from_secs(5), || s.http_load(4).contains_key("y")),
        "y serves again"
    );
}

#[test]
fn an_upstream_that_accepts_but_never_answers_is_taken_out_by_its_check() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    // Connects succeed (the kernel completes them in the backlog), nothing ever answers.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let hung_addr = hung.local_addr().expect("addr");
    let s = start(
        &[a.addr, b.addr, hung_addr],
        &format!(";check=send:hello,expect:hello{FAST_CHECKS}"),
    );
    let out = s.wait_endpoint(hung_addr, |e| e["state"] == "check_failing");
    assert!(
        out["reason"]
            .as_str()
            .is_some_and(|r| r.contains("timed out")),
        "{out}"
    );
    s.wait_endpoint(a.addr, |e| e["state"] == "serving");
    s.wait_endpoint(b.addr, |e| e["state"] == "serving");
    let counts = s.load(30);
    assert_eq!(
        counts.values().sum::<usize>(),
        30,
        "every connection answered"
    );
    drop(hung);
}

#[test]
fn when_every_check_fails_traffic_still_flows_to_all_endpoints() {
    let servers: Vec<HttpServer> = ["x", "y", "z"].into_iter().map(HttpServer::start).collect();
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let s = start(&addrs, &format!(";check=http:/healthz{FAST_CHECKS}"));
    for server in &servers {
        server.set_health(503);
    }
    let view = s
        .proxy
        .embassy
        .wait_for_service(&s.id(), Duration::from_secs(10), |view| {
            view["panic"] == true
                && view["endpoints"]
                    .as_array()
                    .is_some_and(|e| e.iter().all(|e| e["state"] == "check_failing"))
        })
        .expect("all failing: panic");
    assert!(
        view["endpoints"]
            .as_array()
            .is_some_and(|e| e.iter().all(|e| e["in_rotation"] == true)),
        "all in rotation: {view}"
    );
    let counts = s.http_load(30);
    assert_eq!(counts.len(), 3, "traffic reaches all three: {counts:?}");
}

#[test]
fn a_udp_check_tells_an_echo_from_a_silent_socket() {
    let echo = UdpUpstream::start("echo");
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let plugins = standard_plugin_dir(&[]);
    let port = free_port();
    let mut args: Vec<String> = service_arg(format!(
        "dns;{port}/udp;check=udp:send:ping,expect:ping{FAST_CHECKS}"
    ))
    .into();
    args.extend(["--discovery-opt".into(), "poll_interval=100ms".into()]);
    let services = json!({ "dns": [
        { "address": echo.addr.to_string(), "proto": "udp" },
        { "address": silent_addr.to_string(), "proto": "udp" },
    ]});
    let proxy = FileBacked::start(&services, plugins.path(), &args);
    let id = format!("udp-{port}");
    let view = proxy
        .embassy
        .wait_for_service(&id, Duration::from_secs(10), |view| {
            endpoint(view, silent_addr).is_some_and(|e| e["state"] == "check_failing")
                && endpoint(view, echo.addr).is_some_and(|e| e["state"] == "serving")
        })
        .expect("the silent socket fails its check, the echo passes");
    assert!(echo.received() > 0, "checked with real datagrams: {view}");
    let mut client = UdpClient::new(port).expect("client");
    for _ in 0..5 {
        assert_eq!(client.whoami().expect("answer").upstream, "echo");
    }
    drop(silent);
}

#[test]
fn a_send_expect_check_follows_a_real_redis_behind_embassy() {
    let (r1, mut r2) = (Redis::start(), Redis::start());
    let s = start(
        &[r1.addr(), r2.addr()],
        &format!(";check=send:PING,expect:PONG{FAST_CHECKS}"),
    );
    s.wait_endpoint(r2.addr(), |e| e["state"] == "serving");
    r2.kill();
    let failing = s.wait_endpoint(r2.addr(), |e| e["state"] == "check_failing");
    assert_eq!(failing["in_rotation"], false, "{failing}");
    // A real client through Embassy: every command reaches the Redis that is up.
    for i in 0..10 {
        let output = std::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &s.port.to_string(), "PING"])
            .output()
            .expect("redis-cli (apt-get install redis-tools)");
        assert_eq!(
            String::from_utf8_lossy(&output.stdout).trim(),
            "PONG",
            "command {i}: {output:?}"
        );
    }
    r2.restart();
    s.wait_endpoint(r2.addr(), |e| e["state"] == "serving");
}
