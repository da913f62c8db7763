//! The TCP connection path end to end: real binary, real plugin libraries, real upstreams.

use std::{
    io::{Read, Write},
    net::Shutdown,
    time::Duration,
};

use embassy_tests::*;
use serde_json::json;

/// Starts Embassy serving `web` on a free port from a services file listing `addresses`.
fn serve(
    addresses: &[String],
    extra_args: &[&str],
    extra_plugins: &[std::path::PathBuf],
) -> (FileBacked, u16) {
    let plugins = standard_plugin_dir(extra_plugins);
    let port = free_port();
    let mut args: Vec<String> = service_arg(format!("web;{port}/tcp")).into();
    args.extend(extra_args.iter().map(|s| s.to_string()));
    let proxy = FileBacked::start(&json!({ "web": addresses }), plugins.path(), &args);
    (proxy, port)
}

fn addresses(upstreams: &[&Upstream]) -> Vec<String> {
    upstreams.iter().map(|u| u.addr.to_string()).collect()
}

#[test]
fn round_robin_spreads_300_connections_evenly() {
    let (a, b, c) = (
        Upstream::start("a"),
        Upstream::start("b"),
        Upstream::start("c"),
    );
    let (_proxy, port) = serve(&addresses(&[&a, &b, &c]), &[], &[]);
    let counts = distribution(port, 300).expect("300 connections through the proxy");
    assert_eq!(counts.get("a"), Some(&100), "{counts:?}");
    assert_eq!(counts.get("b"), Some(&100), "{counts:?}");
    assert_eq!(counts.get("c"), Some(&100), "{counts:?}");
}

/// 1 MB one way, echoed back, with the client half-closing: the FIN must cross the proxy both
/// ways for the read to end.
fn bulk_echo_with_half_close(copy_mode: &str) {
    let a = Upstream::start("a");
    let (_proxy, port) = serve(&addresses(&[&a]), &["--copy", copy_mode], &[]);
    let mut client = Client::connect(port).expect("connect");
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut writer = client.stream().try_clone().expect("clone");
    let sent = payload.clone();
    let writing = std::thread::spawn(move || {
        writer.write_all(&sent).expect("write");
        writer.shutdown(Shutdown::Write).expect("half close");
    });
    let mut echoed = Vec::new();
    client
        .stream()
        .read_to_end(&mut echoed)
        .expect("read to EOF");
    writing.join().expect("writer");
    assert_eq!(echoed.len(), payload.len());
    assert!(echoed == payload, "echo differs from what was sent");
}

#[test]
fn splice_passes_data_intact_both_ways_with_half_close() {
    bulk_echo_with_half_close("splice");
}

#[test]
fn userspace_copy_passes_data_intact_both_ways_with_half_close() {
    bulk_echo_with_half_close("userspace");
}

/// 500 rounds of small messages on one connection, up to four sent before reading: the small
/// path (one read per message, readiness cleared after a short read) must neither lose nor
/// reorder a byte, nor miss a wake-up (that would stall a round past the client's read timeout).
#[test]
fn small_exchanges_on_one_connection_arrive_whole_and_in_order() {
    let a = Upstream::start("a");
    let (_proxy, port) = serve(&addresses(&[&a]), &[], &[]);
    let mut client = Client::connect(port).expect("connect");
    let stream = client.stream();
    for round in 0..500usize {
        let burst: Vec<u8> = (0..1 + round % 4)
            .flat_map(|message| {
                let len = 1 + (round * 37 + message * 911) % 3000;
                (0..len).map(move |i| (round + message * 7 + i) as u8)
            })
            .collect();
        stream.write_all(&burst).expect("write");
        let mut back = vec![0; burst.len()];
        stream
            .read_exact(&mut back)
            .unwrap_or_else(|error| panic!("round {round}: {error}"));
        assert!(back == burst, "round {round}: echo differs");
    }
}

#[test]
fn idle_spliced_connections_hold_no_pipes() {
    let a = Upstream::start("a");
    let (proxy, port) = serve(&addresses(&[&a]), &["--copy", "splice"], &[]);
    // The admin connection FileBacked::start last polled on may still be closing.
    let mut before = proxy.embassy.open_descriptors();
    let settled = eventually(Duration::from_secs(5), || {
        std::thread::sleep(Duration::from_millis(50));
        let now = proxy.embassy.open_descriptors();
        std::mem::replace(&mut before, now) == now
    });
    assert!(settled, "descriptors keep changing: {before}");
    let mut clients: Vec<Client> = (0..100)
        .map(|_| Client::connect(port).expect("connect"))
        .collect();
    for client in &mut clients {
        assert_eq!(client.echo(b"ping").expect("echo"), b"ping");
    }
    // Two sockets per connection; pipes are pooled while idle, not held per connection
    // (which would add four descriptors per connection).
    let added = proxy.embassy.open_descriptors() - before;
    assert!(
        (200..250).contains(&added),
        "descriptors added for 100 idle connections: {added}"
    );
}

#[test]
fn a_refusing_endpoint_is_skipped() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let dead = format!("127.0.0.1:{}", free_port());
    let mut list = addresses(&[&a, &b]);
    list.insert(1, dead.clone());
    let (proxy, port) = serve(&list, &[], &[]);
    let counts = distribution(port, 30).expect("every client gets through");
    assert_eq!(counts.values().sum::<usize>(), 30);
    assert!(
        counts.get("a").copied().unwrap_or(0) >= 10 && counts.get("b").copied().unwrap_or(0) >= 10,
        "{counts:?}"
    );
    assert!(
        proxy
            .embassy
            .log_lines("connect failed")
            .iter()
            .any(|l| l.contains(&dead)),
        "the refused endpoint is named in the log"
    );
}

#[test]
fn least_conn_sends_new_connections_to_idle_endpoints() {
    let (a, b, c) = (
        Upstream::start("a"),
        Upstream::start("b"),
        Upstream::start("c"),
    );
    let (proxy, port) = serve(&addresses(&[&a]), &["--balancer", "least-conn"], &[]);
    // Five long-lived connections pile up on the only endpoint...
    let mut held: Vec<Client> = (0..5)
        .map(|_| Client::connect(port).expect("connect"))
        .collect();
    assert!(held.iter().all(|c| c.upstream == "a"));
    // ...then two idle endpoints appear.
    write_services(&proxy.services, &json!({ "web": addresses(&[&a, &b, &c]) }));
    proxy
        .embassy
        .wait_for_endpoints(
            &format!("tcp-{port}"),
            &[a.addr, b.addr, c.addr],
            Duration::from_secs(5),
        )
        .expect("update seen");
    let counts = distribution(port, 20).expect("new connections");
    assert_eq!(
        counts.get("a"),
        None,
        "new connections avoid the loaded endpoint: {counts:?}"
    );
    assert!(
        counts.contains_key("b") && counts.contains_key("c"),
        "both idle endpoints used: {counts:?}"
    );
    // The held connections still work.
    for client in &mut held {
        assert_eq!(client.echo(b"still here").expect("echo"), b"still here");
    }
}

#[test]
fn a_panicking_balancer_fails_one_connection_not_the_host() {
    let a = Upstream::start("a");
    let fixture = artifacts().fixture_library("embassy-fixture-panicking-balancer");
    let (mut proxy, port) = serve(&addresses(&[&a]), &["--balancer", "panicking"], &[fixture]);
    for round in 0..3 {
        // The fixture panics on even-numbered picks and answers on odd ones.
        assert!(
            Client::connect(port).is_err(),
            "round {round}: the panicking pick closes the connection"
        );
        let client = Client::connect(port).expect("the next connection works");
        assert_eq!(client.upstream, "a");
    }
    assert!(proxy.embassy.is_running(), "host survived the panics");
    assert!(
        !proxy
            .embassy
            .log_lines("plugin panicked: fixture panic on pick")
            .is_empty(),
        "the panic is reported"
    );
}

#[test]
fn sigterm_stops_accepting_and_lets_open_connections_finish() {
    let a = Upstream::start("a");
    let (mut proxy, port) = serve(&addresses(&[&a]), &["--grace-period", "20s"], &[]);
    let mut open = Client::connect(port).expect("connect");
    proxy.embassy.signal(libc::SIGTERM);
    proxy
        .embassy
        .wait_for_services(0, Duration::from_secs(5))
        .expect("every listener stopped");
    assert!(
        eventually(Duration::from_secs(5), || std::net::TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_err()),
        "the listener closes"
    );
    assert_eq!(
        open.echo(b"in flight")
            .expect("open connection still served"),
        b"in flight"
    );
    assert!(proxy.embassy.is_running(), "waits for the open connection");
    drop(open);
    let status = proxy
        .embassy
        .wait_exit(Duration::from_secs(10))
        .expect("exits once the connection ends");
    assert!(status.success(), "{status}");
}

#[test]
fn grace_period_bounds_the_wait() {
    let a = Upstream::start("a");
    let (mut proxy, port) = serve(&addresses(&[&a]), &["--grace-period", "300ms"], &[]);
    let _open = Client::connect(port).expect("connect");
    proxy.embassy.signal(libc::SIGINT);
    let status = proxy
        .embassy
        .wait_exit(Duration::from_secs(10))
        .expect("exits after the grace period");
    assert!(status.success(), "{status}");
    assert!(!proxy.embassy.log_lines("grace period over").is_empty());
}
