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

/// An instance with its admin API on a unix socket of the test's choosing and on a TCP
/// address (the harness's own socket would be replaced by `--admin`), serving `endpoints` as
/// the service `web`; `extra` arguments are added.
struct TwoAdmins {
    embassy: Embassy,
    socket: std::path::PathBuf,
    port: u16,
    admin_port: u16,
    _dir: tempfile::TempDir,
    _plugins: tempfile::TempDir,
}

impl TwoAdmins {
    fn start(endpoints: &[SocketAddr], extra: &[String]) -> TwoAdmins {
        let plugins = standard_plugin_dir(&[]);
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("services.json");
        write_services(&file, &services(endpoints));
        let socket = dir.path().join("admin.sock");
        let (port, admin_port) = (free_port(), free_port());
        let mut args = vec![
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
        ];
        args.extend_from_slice(extra);
        TwoAdmins {
            embassy: Embassy::start(args),
            socket,
            port,
            admin_port,
            _dir: dir,
            _plugins: plugins,
        }
    }

    /// The service's view, through the unix socket.
    fn view(&self) -> Option<Value> {
        let path = format!("/v1/services/tcp-{}", self.port);
        let (_, text) = http_get_unix(&self.socket, &path).ok()?;
        serde_json::from_str(&text).ok()
    }
}

#[test]
fn writes_are_refused_on_tcp_admin_and_metrics_addresses() {
    let a = Upstream::start("a");
    let metrics_port = free_port();
    let two = TwoAdmins::start(
        &[a.addr],
        &["--metrics".into(), format!("127.0.0.1:{metrics_port}")],
    );
    let (socket, port, admin_port) = (&two.socket, two.port, two.admin_port);
    assert!(
        eventually(Duration::from_secs(20), || {
            http_get_unix(socket, "/v1/services").is_ok()
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
    let (_, view) = http_get_unix(socket, &format!("/v1/services/{id}")).expect("view");
    let view: Value = serde_json::from_str(&view).expect("json");
    assert_eq!(
        view["endpoints"][0]["state"], "serving",
        "nothing changed: {view}"
    );

    // The unix socket takes it.
    let (status, answer) = http_post_unix(socket, &path, &body).expect("answer");
    assert_eq!(status, 200, "{answer}");
    let (_, view) = http_get_unix(socket, &format!("/v1/services/{id}")).expect("view");
    let view: Value = serde_json::from_str(&view).expect("json");
    assert_eq!(view["endpoints"][0]["state"], "disabled", "{view}");
    let (status, answer) =
        http_post_unix(socket, "/v1/services/tcp-1/endpoint", &body).expect("answer");
    assert_eq!(status, 404, "{answer}");
}

/// The upstream every one of `n` connections lands on (panics if they spread).
fn pinned_to(port: u16, n: usize) -> String {
    let counts = landing(port, n);
    assert_eq!(counts.len(), 1, "one upstream takes every pick: {counts:?}");
    counts.into_keys().next().expect("one upstream")
}

/// `embassy ctl`'s JSON answer, after checking it succeeded.
fn answered(result: (i32, String, String)) -> Value {
    let (code, out, err) = result;
    assert_eq!(code, 0, "{out}{err}");
    serde_json::from_str(&out).expect("json answer")
}

/// The reasons a reload's answer gives for the files it refused.
fn refusals(answer: &Value) -> Vec<String> {
    answer["refused"]
        .as_array()
        .expect("refused")
        .iter()
        .map(|r| r.as_str().unwrap_or("").to_string())
        .collect()
}

/// The versions of plugin `name` the admin API lists, with whether each serves new instances.
fn versions(s: &Setup, name: &str) -> Vec<(String, bool)> {
    let (_, plugins) = s.proxy.embassy.admin_get("/v1/plugins").expect("plugins");
    let mut found: Vec<(String, bool)> = plugins
        .as_array()
        .expect("list")
        .iter()
        .filter(|p| p["name"] == name)
        .map(|p| {
            (
                p["version"].as_str().unwrap_or("?").to_string(),
                p["serving"] == true,
            )
        })
        .collect();
    found.sort();
    found
}

#[test]
fn a_library_dropped_in_is_loaded_on_reload_and_a_newer_version_serves_new_instances() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let s = start(&[a.addr, b.addr]);
    let dir = s._plugins.path().to_path_buf();
    let fixtures = artifacts();
    let v1 = fixtures.fixture_library("embassy-fixture-pinned-balancer");
    let v2 = fixtures.fixture_library("embassy-fixture-pinned-balancer-v2");
    let installed = dir.join("libpinned.so");
    let plugins_before = s.proxy.embassy.admin_get("/v1/plugins").expect("plugins").1;

    // A broken library and one built against another contract: each refused, nothing else
    // changes.
    std::fs::write(dir.join("libbroken.so"), b"not an ELF file").expect("write");
    std::fs::copy(
        fixtures.fixture_library("changed-contract-plugin"),
        dir.join("libchanged.so"),
    )
    .expect("copy");
    let answer = answered(s.ctl(&["reload"]));
    let refused = refusals(&answer);
    assert_eq!(refused.len(), 2, "{answer}");
    assert!(
        refused.iter().any(|r| r.contains("libbroken.so")),
        "{answer}"
    );
    assert!(
        refused
            .iter()
            .any(|r| r.contains("libchanged.so: incompatible plugin")),
        "{answer}"
    );
    assert_eq!(answer["loaded"], json!([]), "{answer}");
    // The standard plugins the directory started with, none opened again.
    assert_eq!(answer["unchanged"], STANDARD_PLUGINS.len(), "{answer}");
    assert_eq!(
        s.proxy.embassy.admin_get("/v1/plugins").expect("plugins").1,
        plugins_before,
        "nothing else changed"
    );
    assert_eq!(landing(s.port, 10).len(), 2, "still round-robin");

    // A freshly built balancer copied in, loaded, and set on the service under load.
    std::fs::copy(&v1, &installed).expect("copy");
    let load = Load::start(s.port);
    thread::sleep(Duration::from_millis(200));
    let answer = answered(s.ctl(&["reload"]));
    assert_eq!(answer["loaded"][0]["name"], "pinned", "{answer}");
    assert_eq!(answer["loaded"][0]["version"], "0.1.0", "{answer}");
    let answer = answered(s.ctl(&["balancer", &s.id(), "pinned"]));
    thread::sleep(Duration::from_millis(300));
    let (ok, failed) = load.finish();
    assert!(ok > 0, "the load ran");
    assert_eq!(failed, 0, "{failed} of {} connections failed", ok + failed);
    assert_eq!(answer["balancer"]["version"], "0.1.0", "{answer}");
    let first = pinned_to(s.port, 10);

    // The upgrade a package manager does: the new version renamed into place at the same
    // path, then SIGHUP. It serves new instances; the service's instance is still 0.1's.
    let staging = dir.join("libpinned.so.new");
    std::fs::copy(&v2, &staging).expect("copy");
    std::fs::rename(&staging, &installed).expect("rename");
    s.proxy.embassy.signal(libc::SIGHUP);
    assert!(
        eventually(Duration::from_secs(10), || versions(&s, "pinned").len()
            == 2),
        "the reload loads the new version: {:?}",
        versions(&s, "pinned")
    );
    assert_eq!(
        versions(&s, "pinned"),
        [("0.1.0".to_string(), false), ("0.2.0".to_string(), true)]
    );
    assert_eq!(
        pinned_to(s.port, 10),
        first,
        "the old instance keeps serving"
    );
    let answer = answered(s.ctl(&["balancer", &s.id(), "pinned"]));
    assert_eq!(answer["balancer"]["version"], "0.2.0", "{answer}");
    let last = pinned_to(s.port, 10);
    assert_ne!(
        last, first,
        "the new version picks the other end of the set"
    );

    // Reloading again changes nothing: every library is loaded and unchanged, the bad ones
    // are reported again.
    let answer = answered(s.ctl(&["reload"]));
    assert_eq!(answer["loaded"], json!([]), "{answer}");
    let refused = refusals(&answer);
    assert_eq!(refused.len(), 2, "{answer}");
    assert!(
        refused
            .iter()
            .all(|r| r.contains("unchanged since it was refused")),
        "a file refused and unchanged is not opened again: {answer}"
    );
}

#[test]
fn a_resync_replaces_the_set_with_what_discovery_holds_now() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let plugins = standard_plugin_dir(&[]);
    let port = free_port();
    let mut args: Vec<String> = service_arg(format!("web;{port}/tcp")).into();
    // The file is read once an hour: only a resync sees the change before that.
    args.extend(["--discovery-opt".into(), "poll_interval=1h".into()]);
    let proxy = FileBacked::start(&services(&[a.addr]), plugins.path(), &args);
    let s = Setup {
        proxy,
        port,
        _plugins: plugins,
    };
    write_services(&s.proxy.services, &services(&[b.addr]));
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        pinned_to(s.port, 4),
        "a",
        "the watch has not seen the change"
    );

    let load = Load::start(s.port);
    let answer = answered(s.ctl(&["resync", &s.id()]));
    thread::sleep(Duration::from_millis(200));
    let (ok, failed) = load.finish();
    assert_eq!(failed, 0, "{failed} of {} connections failed", ok + failed);
    assert_eq!(answer["watch"], "restarted", "{answer}");
    assert_eq!(answer["answered"], true, "{answer}");
    assert_eq!(answer["added"], json!([b.addr.to_string()]), "{answer}");
    assert_eq!(answer["removed"], json!([a.addr.to_string()]), "{answer}");
    assert_eq!(pinned_to(s.port, 4), "b");

    let (code, _, err) = s.ctl(&["resync", "tcp-1"]);
    assert_eq!(code, 1);
    assert!(err.contains("404") && err.contains("tcp-1"), "{err}");
}

#[test]
fn a_tcp_admin_address_takes_writes_with_the_bearer_token_only() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let secrets = tempfile::tempdir().expect("dir");
    let token_file = secrets.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").expect("write");
    let wrong_file = secrets.path().join("wrong");
    std::fs::write(&wrong_file, "s3cret-tokem\n").expect("write");
    let two = TwoAdmins::start(
        &[a.addr, b.addr],
        &[
            "--admin-token-file".into(),
            token_file.display().to_string(),
        ],
    );
    let (id, admin_port) = (format!("tcp-{}", two.port), two.admin_port);
    let view = || two.view();
    assert!(
        eventually(Duration::from_secs(20), || view()
            .is_some_and(|v| v["endpoints"]
                .as_array()
                .is_some_and(|e| e.len() == 2))),
        "embassy serves the service"
    );
    let tcp = format!("127.0.0.1:{admin_port}");
    let ctl = |token: Option<&std::path::Path>, args: &[&str]| {
        let mut all = vec!["ctl".to_string(), "--admin".into(), tcp.clone()];
        if let Some(token) = token {
            all.extend(["--token-file".into(), token.display().to_string()]);
        }
        all.extend(args.iter().map(|a| a.to_string()));
        run_embassy(all)
    };
    let state = |addr: SocketAddr| {
        view()
            .and_then(|v| {
                v["endpoints"]
                    .as_array()
                    .and_then(|e| e.iter().find(|e| e["address"] == addr.to_string()))
                    .map(|e| e["state"].clone())
            })
            .unwrap_or(Value::Null)
    };
    let b_addr = b.addr.to_string();

    for (token, why) in [
        (None, "no bearer token"),
        (Some(wrong_file.as_path()), "wrong bearer token"),
    ] {
        let (code, _, err) = ctl(token, &["drain", &id, &b_addr]);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("401") && err.contains(why), "{err}");
        assert_eq!(state(b.addr), "serving", "nothing changed");
    }
    let (code, out, err) = ctl(Some(&token_file), &["drain", &id, &b_addr]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(state(b.addr), "drained");

    // The token is read at each write: a new one takes effect at once, the old one stops.
    std::fs::write(&token_file, "rotated\n").expect("write");
    let (code, _, err) = ctl(Some(&wrong_file), &["enable", &id, &b_addr]);
    assert_eq!(code, 1, "{err}");
    let (code, out, err) = ctl(Some(&token_file), &["enable", &id, &b_addr]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(state(b.addr), "serving");
    let audit = two.embassy.log_lines("admin change");
    assert!(
        audit.iter().any(|l| l.contains("tcp 127.0.0.1:")),
        "the audit line names the TCP peer: {audit:?}"
    );
}

#[test]
fn an_unusable_token_file_stops_the_start_with_its_name() {
    let dir = tempfile::tempdir().expect("dir");
    let empty = dir.path().join("empty-token");
    std::fs::write(&empty, "\n").expect("write");
    let missing = dir.path().join("no-such-token");
    for (file, why) in [(&empty, "empty"), (&missing, "No such file")] {
        let (code, _, err) = run_embassy([
            "--discovery".to_string(),
            "file:///nonexistent/services.json".into(),
            "--service".into(),
            "web;1/tcp".into(),
            "--admin-token-file".into(),
            file.display().to_string(),
        ]);
        assert_eq!(code, 64, "{err}");
        assert!(
            err.contains(&file.display().to_string()) && err.contains(why),
            "{err}"
        );
    }
}
