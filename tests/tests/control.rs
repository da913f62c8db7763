//! Changing a running Embassy (`embassy ctl` and the admin API's writes), against real
//! upstreams under load: a balancer swapped in place, endpoints drained, disabled and enabled,
//! and writes refused where the operator does not control who connects.

use std::{
    io::Read,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use embassy_tests::*;
use serde_json::{json, Value};

struct Setup {
    proxy: FileBacked,
    port: u16,
    _plugins: tempfile::TempDir,
}

fn start(endpoints: &[SocketAddr]) -> Setup {
    let plugins = standard_plugin_dir(&[]);
    let port = free_port();
    let mut args: Vec<String> = service_arg(format!("web;{port}/tcp")).into();
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

    fn admin(&self) -> String {
        format!(
            "unix:{}",
            self.proxy
                .embassy
                .admin_socket()
                .expect("admin socket")
                .display()
        )
    }

    /// `embassy ctl ARGS` against this instance: exit code, stdout, stderr.
    fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        let mut all = vec!["ctl", "--admin"];
        let admin = self.admin();
        all.push(&admin);
        all.extend_from_slice(args);
        run_embassy(all)
    }

    fn endpoint(&self, addr: SocketAddr) -> Value {
        let (_, view) = self
            .proxy
            .embassy
            .admin_get(&format!("/v1/services/{}", self.id()))
            .expect("view");
        view["endpoints"]
            .as_array()
            .and_then(|e| e.iter().find(|e| e["address"] == addr.to_string()))
            .cloned()
            .unwrap_or(Value::Null)
    }
}

/// Connections one after another from a thread until stopped (at most 20,000 or 60 s),
/// counting successes and failures: the steady load a change must not disturb.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16) -> Load {
        let (stop, ok, failed) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let (s, o, f) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
        let thread = thread::spawn(move || {
            let started = std::time::Instant::now();
            for _ in 0..20_000 {
                if s.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(60) {
                    break;
                }
                let worked = Client::connect(port)
                    .and_then(|mut c| c.echo(b"x"))
                    .is_ok_and(|back| back == b"x");
                let counter = if worked { &o } else { &f };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
        Load {
            stop,
            ok,
            failed,
            thread: Some(thread),
        }
    }

    /// Stops the load: (succeeded, failed).
    fn finish(mut self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("load thread");
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// Where `n` short connections land, one after another.
fn landing(port: u16, n: usize) -> std::collections::HashMap<String, usize> {
    distribution(port, n).expect("connections")
}

#[test]
fn a_balancer_is_swapped_under_load_with_no_failed_connection() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let s = start(&[a.addr, b.addr]);
    // Three connections held open on a; round-robin still alternates the short ones.
    let mut held = Vec::new();
    for _ in 0..50 {
        let client = Client::connect(s.port).expect("connect");
        if client.upstream == "a" {
            held.push(client);
        }
        if held.len() == 3 {
            break;
        }
    }
    assert_eq!(held.len(), 3);
    let counts = landing(s.port, 10);
    assert_eq!(counts.len(), 2, "round-robin alternates: {counts:?}");

    // The swap happens under a steady load; picks are observed once it has stopped, so the
    // load's own connections do not blur least-conn's view.
    let load = Load::start(s.port);
    thread::sleep(Duration::from_millis(300));
    let (code, out, err) = s.ctl(&["balancer", &s.id(), "least-conn"]);
    thread::sleep(Duration::from_millis(300));
    let (ok, failed) = load.finish();
    assert_eq!(code, 0, "{out}{err}");
    assert!(ok > 0, "the load ran");
    assert_eq!(failed, 0, "{failed} of {} connections failed", ok + failed);
    let answer: Value = serde_json::from_str(&out).expect("json answer");
    assert_eq!(answer["balancer"]["before"], "round-robin", "{answer}");
    assert_eq!(answer["balancer"]["after"], "least-conn");
    // least-conn sees the held connections (their counter carried over): every short one
    // goes to the other upstream (which has at most the last one closing).
    let counts = landing(s.port, 10);
    assert_eq!(
        counts.get("b"),
        Some(&10),
        "least-conn avoids the busy one: {counts:?}"
    );

    let load = Load::start(s.port);
    thread::sleep(Duration::from_millis(300));
    let (code, out, err) = s.ctl(&["balancer", &s.id(), "round-robin"]);
    thread::sleep(Duration::from_millis(300));
    let (ok, failed) = load.finish();
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(failed, 0, "{failed} of {} connections failed", ok + failed);
    assert_eq!(landing(s.port, 10).len(), 2, "round-robin again");
    let (_, view) = s
        .proxy
        .embassy
        .admin_get(&format!("/v1/services/{}", s.id()))
        .expect("view");
    assert_eq!(view["balancer"], "round-robin");

    // A balancer no plugin provides: refused, nothing changed.
    let (code, _, err) = s.ctl(&["balancer", &s.id(), "no-such-balancer"]);
    assert_eq!(code, 1);
    assert!(err.contains("no-such-balancer"), "{err}");
    assert_eq!(landing(s.port, 10).len(), 2, "still round-robin");
    drop(held);
}

#[test]
fn drain_disable_and_enable_an_endpoint_across_discovery_updates() {
    let (a, b, c) = (
        Upstream::start("a"),
        Upstream::start("b"),
        Upstream::start("c"),
    );
    let s = start(&[a.addr, b.addr]);
    let mut on_b = loop {
        let client = Client::connect(s.port).expect("connect");
        if client.upstream == "b" {
            break client;
        }
    };
    let b_addr = b.addr.to_string();

    let (code, out, err) = s.ctl(&["drain", &s.id(), &b_addr]);
    assert_eq!(code, 0, "{out}{err}");
    let answer: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(answer["before"], "enable", "{answer}");
    assert_eq!(answer["connections_open"], 1);
    assert_eq!(s.endpoint(b.addr)["state"], "drained");
    assert_eq!(landing(s.port, 10).get("b"), None, "no new connection to b");
    assert_eq!(on_b.echo(b"still").expect("open one runs"), b"still");

    // A discovery update (c added) does not undo the drain.
    write_services(&s.proxy.services, &services(&[a.addr, b.addr, c.addr]));
    s.proxy
        .embassy
        .wait_for_service(&s.id(), Duration::from_secs(10), |view| {
            view["endpoints"]
                .as_array()
                .is_some_and(|e| e.iter().any(|e| e["address"] == c.addr.to_string()))
        })
        .expect("c added");
    assert_eq!(s.endpoint(b.addr)["state"], "drained");
    assert_eq!(landing(s.port, 12).get("b"), None);

    let (code, out, err) = s.ctl(&["disable", &s.id(), &b_addr]);
    assert_eq!(code, 0, "{out}{err}");
    let answer: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(answer["connections_reset"], 1, "{answer}");
    let stream = on_b.stream();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut byte = [0u8; 1];
    assert!(
        matches!(stream.read(&mut byte), Ok(0) | Err(_)),
        "the open connection is reset"
    );
    assert_eq!(s.endpoint(b.addr)["state"], "disabled");

    let (code, out, err) = s.ctl(&["enable", &s.id(), &b_addr]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(s.endpoint(b.addr)["state"], "serving");
    let counts = landing(s.port, 12);
    assert!(counts.contains_key("b"), "b serves again: {counts:?}");
    let mut fresh = loop {
        let client = Client::connect(s.port).expect("connect");
        if client.upstream == "b" {
            break client;
        }
    };
    thread::sleep(Duration::from_millis(1200)); // past a new connection's first look at its cut
    assert_eq!(
        fresh
            .echo(b"new")
            .expect("a connection after enable is not cut"),
        b"new"
    );

    let (code, _, err) = s.ctl(&["drain", &s.id(), "127.0.0.1:1"]);
    assert_eq!(code, 1);
    assert!(err.contains("no endpoint \"127.0.0.1:1\""), "{err}");
}

#[test]
fn writes_are_refused_on_tcp_admin_and_metrics_addresses() {
    let a = Upstream::start("a");
    let plugins = standard_plugin_dir(&[]);
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("services.json");
    write_services(&file, &services(&[a.addr]));
    let socket = dir.path().join("admin.sock");
    let (port, admin_port, metrics_port) = (free_port(), free_port(), free_port());
    let _embassy = Embassy::start([
        "--plugin-dir".to_string(),
        plugins.path().display().to_string(),
        "--discovery".into(),
        format!("file://{}", file.display()),
        "--service".into(),
        format!("web;{port}/tcp"),
        "--admin".into(),
        format!("unix:{}", socket.display()),
        "--admin".into(),
        format!("127.0.0.1:{admin_port}"),
        "--metrics".into(),
        format!("127.0.0.1:{metrics_port}"),
    ]);
    assert!(
        eventually(Duration::from_secs(20), || {
            http_get_unix(&socket, "/v1/services").is_ok()
                && http_get_tcp(([127, 0, 0, 1], metrics_port).into(), "/metrics").is_ok()
        }),
        "embassy serves its admin addresses"
    );
    let id = format!("tcp-{port}");
    let body = json!({ "address": a.addr.to_string(), "action": "disable" });
    let path = format!("/v1/services/{id}/endpoint");

    let (status, answer) =
        http_post_tcp(([127, 0, 0, 1], admin_port).into(), &path, &body).expect("answer");
    assert_eq!(status, 403, "{answer}");
    assert!(answer.contains("read-only"), "{answer}");
    let (status, _) =
        http_post_tcp(([127, 0, 0, 1], metrics_port).into(), &path, &body).expect("answer");
    assert!(
        status == 404 || status == 405,
        "the metrics address takes no write: {status}"
    );
    let (_, view) = http_get_unix(&socket, &format!("/v1/services/{id}")).expect("view");
    let view: Value = serde_json::from_str(&view).expect("json");
    assert_eq!(
        view["endpoints"][0]["state"], "serving",
        "nothing changed: {view}"
    );

    // The unix socket takes it.
    let (status, answer) = http_post_unix(&socket, &path, &body).expect("answer");
    assert_eq!(status, 200, "{answer}");
    let (_, view) = http_get_unix(&socket, &format!("/v1/services/{id}")).expect("view");
    let view: Value = serde_json::from_str(&view).expect("json");
    assert_eq!(view["endpoints"][0]["state"], "disabled", "{view}");
    let (status, answer) =
        http_post_unix(&socket, "/v1/services/tcp-1/endpoint", &body).expect("answer");
    assert_eq!(status, 404, "{answer}");
}
