//! Embassy as a daemon: signals it must survive or obey, and a log output that stalls.

use std::{
    io::{BufRead, BufReader},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use embassy_tests::*;
use serde_json::json;

/// Embassy serving `web` (one upstream) on a fresh port, with `args` added.
fn serve(upstream: &Upstream, args: &[&str]) -> (FileBacked, u16) {
    let port = free_port();
    let mut all: Vec<String> = service_arg(format!("web;{port}/tcp")).into();
    all.extend(args.iter().map(|a| a.to_string()));
    let plugins = standard_plugin_dir(&[]);
    let proxy = FileBacked::start(
        &json!({ "web": [upstream.addr.to_string()] }),
        plugins.path(),
        &all,
    );
    // The libraries are loaded; the directory may go.
    drop(plugins);
    (proxy, port)
}

#[test]
fn sighup_reloads_plugins_and_a_failed_reload_changes_nothing() {
    let upstream = Upstream::start("a");
    let (mut proxy, port) = serve(&upstream, &[]);
    let mut open = Client::connect(port).expect("connect");
    for _ in 0..2 {
        proxy.embassy.signal(libc::SIGHUP);
    }
    // The plugin directory is gone (see `serve`): the reload fails and says so, and the
    // plugins loaded, the listener and its connections stay.
    let line = proxy
        .embassy
        .wait_for_log("plugin reload failed", Duration::from_secs(5))
        .expect("the failed reload logged");
    assert!(line.contains("cannot read plugin directory"), "{line}");
    assert!(proxy.embassy.is_running(), "SIGHUP must not stop embassy");
    assert_eq!(
        open.echo(b"still open").expect("open connection"),
        b"still open"
    );
    assert_eq!(Client::connect(port).expect("new connection").upstream, "a");
    drop(open);
    proxy.embassy.signal(libc::SIGTERM);
    let status = proxy.embassy.wait_exit(Duration::from_secs(10));
    assert!(status.expect("exits on SIGTERM").success());
}

#[test]
fn a_second_sigterm_during_the_grace_period_exits_at_once() {
    let upstream = Upstream::start("a");
    let (mut proxy, port) = serve(&upstream, &["--grace-period", "120s"]);
    let _open = Client::connect(port).expect("connect");
    proxy.embassy.signal(libc::SIGTERM);
    proxy
        .embassy
        .wait_for_log("waiting for open connections", Duration::from_secs(5))
        .expect("grace period started");
    assert!(
        proxy.embassy.is_running(),
        "the open connection holds the grace period"
    );
    proxy.embassy.signal(libc::SIGTERM);
    let status = proxy
        .embassy
        .wait_exit(Duration::from_secs(10))
        .expect("a second SIGTERM ends the grace period");
    assert_eq!(status.code(), Some(143), "{status}");
    assert_eq!(
        proxy.embassy.log_lines("second stop signal").len(),
        1,
        "{:?}",
        proxy.embassy.log()
    );
}

/// Lines Embassy's log queue holds (`embassy_host::logging::BUFFERED_LINES`; the tests run
/// the binary and do not link the host library).
const QUEUE_LINES: usize = 2048;

/// A pipe whose buffer is as small as Linux allows (one page): (read end, write end).
fn small_pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two descriptors on success; each is owned once below.
    let (read, write) = unsafe {
        assert_eq!(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC), 0, "pipe2");
        (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
    };
    // SAFETY: fcntl on a descriptor we own.
    let size = unsafe { libc::fcntl(read.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    assert!(size > 0, "F_SETPIPE_SZ");
    (read, write)
}

/// Bytes waiting in the pipe.
fn queued(read: &OwnedFd) -> usize {
    let mut bytes: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    let result = unsafe { libc::ioctl(read.as_raw_fd(), libc::FIONREAD, &mut bytes) };
    assert_eq!(result, 0, "FIONREAD");
    bytes as usize
}

/// Stderr on a pipe nobody reads: once it is full, logging (at trace level, a few lines per
/// connection) must not stop proxying. Lines are dropped and, once the pipe is read again,
/// their number is reported.
#[test]
fn a_stalled_log_pipe_never_stops_proxying() {
    let upstream = Upstream::start("a");
    let dir = tempfile::tempdir().expect("temp dir");
    let services = dir.path().join("services.json");
    write_services(&services, &json!({ "web": [upstream.addr.to_string()] }));
    let plugins = standard_plugin_dir(&[]);
    let port = free_port();
    let (read, write) = small_pipe();
    let child = Command::new(artifacts().embassy())
        .env("EMBASSY_ADMIN", "off") // the default socket is the machine's, not this test's
        .args(["-vv", "--plugin-dir"])
        .arg(plugins.path())
        .arg("--discovery")
        .arg(format!("file://{}", services.display()))
        .args(["--service", &format!("web;{port}/tcp")])
        .env_remove("DISCOVERY")
        .env_remove("EMBASSY_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(write))
        .spawn()
        .expect("spawn embassy");
    let mut child = KillOnDrop(child);

    let ready = Instant::now();
    while Client::connect(port).is_err() {
        assert!(
            ready.elapsed() < Duration::from_secs(20),
            "embassy never served (queued log: {} bytes)",
            queued(&read)
        );
        assert!(
            child.0.try_wait().expect("wait").is_none(),
            "embassy exited"
        );
        thread::sleep(Duration::from_millis(20));
    }
    // Fill the pipe: a line that does not fit blocks whoever writes it.
    for _ in 0..200 {
        if queued(&read) > 3584 {
            break;
        }
        Client::connect(port).expect("connection while filling the pipe");
    }
    assert!(
        queued(&read) > 3584,
        "the pipe did not fill: {}",
        queued(&read)
    );

    // Each connection logs at least one line: more than the queue holds.
    let connections = 2 * QUEUE_LINES;
    let started = Instant::now();
    let mut failed = Vec::new();
    for n in 0..connections {
        match Client::connect(port).and_then(|mut c| c.echo(b"ping")) {
            Ok(echo) if echo == b"ping" => {}
            Ok(echo) => failed.push(format!("{n}: echo {echo:?}")),
            Err(error) => failed.push(format!("{n}: {error:#}")),
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{n} connections took too long"
        );
        if failed.len() >= 5 {
            break;
        }
    }
    assert!(failed.is_empty(), "with the log stalled: {failed:?}");
    eprintln!("{connections} connections in {:?}", started.elapsed());

    // Read again: the count of what was dropped comes out.
    let lines = Arc::new(Mutex::new(Vec::new()));
    let collected = Arc::clone(&lines);
    thread::spawn(move || {
        let reader = BufReader::new(std::fs::File::from(read));
        for line in reader.lines().map_while(Result::ok) {
            collected.lock().expect("lines").push(line);
        }
    });
    let dropped = || {
        lines
            .lock()
            .expect("lines")
            .iter()
            .find(|l| l.contains("log lines dropped"))
            .cloned()
    };
    // The report follows the next line written once the queue drains.
    let reported = eventually(Duration::from_secs(10), || {
        let _ = Client::connect(port);
        dropped().is_some()
    });
    assert!(reported, "no drop report; last lines: {:?}", {
        let all = lines.lock().expect("lines");
        all.iter().rev().take(5).cloned().collect::<Vec<_>>()
    });
    assert!(
        child.0.try_wait().expect("wait").is_none(),
        "embassy exited"
    );
}

/// Kills a child that has no [`Embassy`] wrapper when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
