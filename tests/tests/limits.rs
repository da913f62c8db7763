//! Connection limits end to end: half-close and connection caps against a hung upstream under
//! a small open-file limit, connect failures logged per endpoint, failover spread, connections
//! held until a first endpoint, and the reset at the end of the grace period.

use std::{
    io::{ErrorKind, Read, Write},
    net::{TcpListener, TcpStream},
    os::unix::process::CommandExt,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use embassy_tests::*;
use serde_json::json;

/// An upstream that accepts and then neither reads nor closes: what a wedged server looks
/// like from the proxy.
struct HungUpstream {
    addr: std::net::SocketAddr,
    held: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl HungUpstream {
    fn start() -> HungUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind hung upstream");
        let addr = listener.local_addr().expect("addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let held = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (keep, stopped) = (Arc::clone(&held), Arc::clone(&stop));
        thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => keep.lock().expect("held").push(stream),
                    Err(_) => thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        HungUpstream { addr, held, stop }
    }
}

impl Drop for HungUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.held.lock().expect("held").clear();
    }
}

/// Starts the real binary under an open-file limit of `nofile` (soft and hard, set between
/// fork and exec), on the file discovery plugin with `services`.
fn start_limited(
    nofile: u64,
    services: &serde_json::Value,
    args: &[String],
) -> (Embassy, tempfile::TempDir, tempfile::TempDir) {
    let plugins = standard_plugin_dir(&[]);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("services.json");
    write_services(&path, services);
    let mut command = Embassy::command(
        &artifacts().embassy(),
        [
            "--plugin-dir".to_string(),
            plugins.path().display().to_string(),
            "--discovery".to_string(),
            format!("file://{}", path.display()),
        ]
        .iter()
        .chain(args),
    );
    command.env("EMBASSY_LOG", "info");
    // SAFETY: setrlimit is async-signal-safe and touches only the child about to exec.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: nofile,
                rlim_max: nofile,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    (Embassy::spawn(&mut command), plugins, dir)
}

#[test]
fn a_hung_upstream_cannot_starve_another_service_and_its_descriptors_are_released() {
    let hung = HungUpstream::start();
    let web = Upstream::start("web");
    let (hung_port, web_port) = (free_port(), free_port());
    let mut args: Vec<String> = Vec::new();
    args.extend(service_arg(format!("hung;{hung_port}/tcp")));
    args.extend(service_arg(format!("web;{web_port}/tcp")));
    args.extend(["--half-close-timeout".to_string(), "2s".to_string()]);
    let (mut embassy, _plugins, _dir) = start_limited(
        256,
        &json!({ "hung": [hung.addr.to_string()], "web": [web.addr.to_string()] }),
        &args,
    );
    for (port, upstream) in [(hung_port, hung.addr), (web_port, web.addr)] {
        embassy
            .wait_for_endpoints(&format!("tcp-{port}"), &[upstream], Duration::from_secs(20))
            .expect("both services get their endpoint");
    }
    let warning = embassy
        .wait_for_log("open-file limit is low", Duration::from_secs(5))
        .expect("the low limit is reported at start");
    assert!(warning.contains("limit=256"), "{warning}");
    let idle_descriptors = embassy.open_descriptors();

    // 150 clients of the hung service send a request and give up after 1 s.
    let hung_clients: Vec<TcpStream> = (0..150)
        .map(|_| {
            let mut stream = TcpStream::connect(("127.0.0.1", hung_port)).expect("connect");
            stream.write_all(b"GET / HTTP/1.0\r\n\r\n").expect("send");
            stream
        })
        .collect();
    thread::sleep(Duration::from_secs(1));
    for mut stream in hung_clients {
        stream.set_nonblocking(true).expect("nonblocking");
        let mut byte = [0u8; 1];
        assert!(
            matches!(stream.read(&mut byte), Err(e) if e.kind() == ErrorKind::WouldBlock),
            "the hung upstream never answers"
        );
    }

    // Meanwhile the healthy service serves 40 connections held open at once.
    let mut served = Vec::new();
    for i in 0..40 {
        let mut client = Client::connect(web_port)
            .unwrap_or_else(|error| panic!("web connection {i} failed: {error:#}"));
        assert_eq!(client.echo(b"ping").expect("echo"), b"ping");
        served.push(client);
    }
    for client in &mut served {
        assert_eq!(client.echo(b"again").expect("echo"), b"again");
    }
    drop(served);

    // The hung service's connections are closed by the half-close timeout, a cap's worth at a
    // time: every descriptor comes back.
    let released = eventually(Duration::from_secs(40), || {
        embassy.open_descriptors() <= idle_descriptors + 4
    });
    assert!(
        released,
        "descriptors: {} open, {idle_descriptors} before the clients",
        embassy.open_descriptors()
    );
    let reached = embassy.log_lines("connection limit reached");
    assert!(
        !reached.is_empty() && reached.len() <= 10,
        "the cap is logged per episode, not per connection: {reached:?}"
    );
    assert!(
        reached
            .iter()
            .all(|line| line.contains("max_connections=48")),
        "half of (256 - 64) / 2: {reached:?}"
    );
    assert!(
        embassy.log_lines("accept failed").is_empty(),
        "never out of descriptors"
    );
}

#[test]
fn a_dead_endpoint_is_logged_once_and_its_failover_is_spread() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let dead = format!("127.0.0.1:{}", free_port());
    let plugins = standard_plugin_dir(&[]);
    let port = free_port();
    let args: Vec<String> = service_arg(format!("web;{port}/tcp")).into();
    let proxy = FileBacked::start(
        &json!({ "web": [dead, a.addr.to_string(), b.addr.to_string()] }),
        plugins.path(),
        &args,
    );
    let counts = distribution(port, 300).expect("300 connections through the proxy");
    let (on_a, on_b) = (counts["a"], counts["b"]);
    assert_eq!(on_a + on_b, 300, "{counts:?}");
    // Round robin sends 100 to each; the dead one's 100 must not all go to its neighbour.
    assert!(
        on_a.max(on_b) * 10 <= on_a.min(on_b) * 13,
        "failover spread: {counts:?}"
    );
    let failed = proxy.embassy.log_lines("connect failed");
    assert_eq!(failed.len(), 1, "one line for 100 failures: {failed:?}");
    assert!(failed[0].contains(&dead), "{}", failed[0]);
}

#[test]
fn a_connection_accepted_before_any_endpoint_is_served_once_one_appears() {
    let a = Upstream::start("a");
    let plugins = standard_plugin_dir(&[]);
    let (port, never_port) = (free_port(), free_port());
    let mut args: Vec<String> = service_arg(format!("web;{port}/tcp")).into();
    args.extend(service_arg(format!(
        "never;{never_port}/tcp;queue_timeout=500ms"
    )));
    args.extend([
        "--discovery-opt".to_string(),
        "poll_interval=100ms".to_string(),
        "--queue-timeout".to_string(),
        "10s".to_string(),
    ]);
    // Returns once both listeners are open.
    let proxy = FileBacked::start(&json!({ "web": [] }), plugins.path(), &args);

    let mut early = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    early
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    thread::sleep(Duration::from_millis(300));
    write_services(&proxy.services, &json!({ "web": [a.addr.to_string()] }));
    let mut greeting = [0u8; 2];
    early
        .read_exact(&mut greeting)
        .expect("the held connection is served");
    assert_eq!(&greeting, b"a\n");

    // No endpoint ever: reset (not a clean close) after the service's own 500 ms.
    let started = Instant::now();
    let mut stranded = TcpStream::connect(("127.0.0.1", never_port)).expect("connect");
    stranded
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut byte = [0u8; 1];
    let outcome = stranded.read(&mut byte);
    assert!(
        matches!(&outcome, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "{outcome:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(400));
    // The line travels through the log queue and the test's reader: it may follow the reset.
    assert!(
        eventually(Duration::from_secs(5), || {
            proxy
                .embassy
                .log_lines("no endpoint within the queue timeout")
                .len()
                == 1
        }),
        "one line for the reset: {:?}",
        proxy.embassy.log()
    );
}

#[test]
fn connections_open_at_the_end_of_the_grace_period_are_reset() {
    let a = Upstream::start("a");
    let plugins = standard_plugin_dir(&[]);
    let port = free_port();
    let mut args: Vec<String> = service_arg(format!("web;{port}/tcp")).into();
    args.extend(["--grace-period".to_string(), "500ms".to_string()]);
    let mut proxy = FileBacked::start(
        &json!({ "web": [a.addr.to_string()] }),
        plugins.path(),
        &args,
    );
    let mut old = Client::connect(port).expect("connect");
    assert_eq!(old.echo(b"mid-stream").expect("echo"), b"mid-stream");
    // `old` has lived past a second, `young` is fresh at the signal: both paths of the cut.
    thread::sleep(Duration::from_millis(1200));
    let mut young = Client::connect(port).expect("connect");
    proxy.embassy.signal(libc::SIGTERM);
    for (name, client) in [("old", &mut old), ("young", &mut young)] {
        let mut byte = [0u8; 1];
        let outcome = client.stream().read(&mut byte);
        assert!(
            matches!(&outcome, Err(e) if e.kind() == ErrorKind::ConnectionReset),
            "{name}: a cut stream reads as a reset, not an end: {outcome:?}"
        );
    }
    let status = proxy
        .embassy
        .wait_exit(Duration::from_secs(10))
        .expect("exits");
    assert!(status.success(), "{status}");
}
