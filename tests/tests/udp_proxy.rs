//! The UDP datagram path end to end: the real binary, real plugin libraries, real UDP
//! sockets on loopback. Sessions are observed from the outside: a `whoami` datagram tells
//! which upstream answered and which proxy socket it came from (a new one per session).

use std::{collections::HashMap, thread, time::Duration};

use embassy_tests::*;
use serde_json::json;

struct Setup {
    proxy: FileBacked,
    port: u16,
}

/// Starts Embassy with a services file and `descriptors` (`PORT` replaced by a free port).
fn start(services_json: serde_json::Value, descriptors: &[&str]) -> Setup {
    let plugins = standard_plugin_dir(&[]);
    let port = free_port();
    let mut args = vec![
        "--discovery-opt".to_string(),
        "poll_interval=100ms".to_string(),
    ];
    for descriptor in descriptors {
        args.extend(service_arg(descriptor.replace("PORT", &port.to_string())));
    }
    // Returns once every descriptor has its listener.
    let proxy = FileBacked::start(&services_json, plugins.path(), &args);
    Setup { proxy, port }
}

/// Services-file entries for UDP upstreams: an entry serves TCP unless it says `udp`.
fn addresses(upstreams: &[&UdpUpstream]) -> Vec<serde_json::Value> {
    upstreams.iter().map(|u| udp_entry(u.addr)).collect()
}

fn udp_entry(addr: std::net::SocketAddr) -> serde_json::Value {
    json!({ "address": addr.to_string(), "proto": "udp" })
}

/// A payload of `len` bytes that differs per client and datagram and never reads `whoami`.
/// `count` clients, each with a session and the upstream that answered it.
fn sessions(port: u16, count: usize) -> Vec<(UdpClient, Identity)> {
    (0..count)
        .map(|_| {
            let mut client = UdpClient::new(port).expect("client");
            let identity = client.whoami().expect("whoami");
            (client, identity)
        })
        .collect()
}

fn payload(client: usize, index: usize, len: usize) -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..len)
        .map(|j| ((client * 31 + index * 7 + j) % 251) as u8)
        .collect();
    if let Some(first) = bytes.first_mut() {
        *first = 0xff;
    }
    bytes
}

#[test]
fn a_thousand_datagrams_from_20_clients_are_echoed_pinned_and_spread_round_robin() {
    let upstreams: Vec<UdpUpstream> = ["a", "b", "c", "d"]
        .iter()
        .map(|name| UdpUpstream::start(name))
        .collect();
    let s = start(
        json!({ "dns": addresses(&upstreams.iter().collect::<Vec<_>>()) }),
        &["dns;PORT/udp"],
    );
    // Assorted sizes, up to the largest IPv4 UDP payload.
    const SIZES: &[usize] = &[1, 64, 512, 1_400, 1_473, 8_192, 65_507, 200, 33_000, 9];
    let port = s.port;
    let clients: Vec<_> = (0..20)
        .map(|client| {
            thread::spawn(move || {
                let mut udp = UdpClient::new(port).expect("client socket");
                let before = udp.whoami().expect("whoami before");
                for index in 0..50 {
                    let data = payload(client, index, SIZES[(client + index) % SIZES.len()]);
                    udp.echo(&data).unwrap_or_else(|error| {
                        panic!(
                            "client {client}, datagram {index} ({} bytes): {error}",
                            data.len()
                        )
                    });
                }
                let after = udp.whoami().expect("whoami after");
                (before, after)
            })
        })
        .collect();
    let mut per_upstream: HashMap<String, usize> = HashMap::new();
    let mut sessions = std::collections::HashSet::new();
    for client in clients {
        let (before, after) = client.join().expect("client thread");
        assert_eq!(before, after, "a client stays on one session and endpoint");
        *per_upstream.entry(before.upstream).or_default() += 1;
        sessions.insert(before.session);
    }
    assert_eq!(sessions.len(), 20, "one session per client");
    for name in ["a", "b", "c", "d"] {
        assert_eq!(per_upstream.get(name), Some(&5), "{per_upstream:?}");
    }
    let received: usize = upstreams.iter().map(UdpUpstream::received).sum();
    assert!(received >= 1_040, "upstreams received {received} datagrams");
}

#[test]
fn an_idle_session_expires_and_the_next_datagram_picks_again() {
    let (a, b) = (UdpUpstream::start("a"), UdpUpstream::start("b"));
    let s = start(
        json!({ "dns": addresses(&[&a, &b]) }),
        &["dns;PORT/udp;udp_idle=2"],
    );
    let mut client = UdpClient::new(s.port).expect("client");
    let first = client.whoami().expect("whoami");
    // Active for twice the idle time: the session lives on.
    for _ in 0..20 {
        thread::sleep(Duration::from_millis(200));
        assert_eq!(
            client.whoami().expect("whoami"),
            first,
            "an active session stays"
        );
    }
    // Quiet for longer than the idle time (retried a bounded number of times on a slow
    // machine): a new session, and round robin moves it to the other endpoint.
    let mut later = first.clone();
    for _ in 0..4 {
        thread::sleep(Duration::from_millis(3_000));
        later = client.whoami().expect("whoami after idling");
        if later != first {
            break;
        }
    }
    assert_ne!(later.session, first.session, "the idle session ended");
    assert_ne!(
        later.upstream, first.upstream,
        "the new session picked again"
    );
}

#[test]
fn a_full_session_table_evicts_the_oldest_idle_session() {
    let a = UdpUpstream::start("a");
    let s = start(
        json!({ "dns": addresses(&[&a]) }),
        &["dns;PORT/udp;udp_max_sessions=2"],
    );
    let pause = || thread::sleep(Duration::from_millis(20));
    let (mut x, mut y, mut z) = (
        UdpClient::new(s.port).expect("x"),
        UdpClient::new(s.port).expect("y"),
        UdpClient::new(s.port).expect("z"),
    );
    let x0 = x.whoami().expect("x");
    pause();
    let y0 = y.whoami().expect("y");
    pause();
    let z0 = z.whoami().expect("z"); // full: evicts x, the oldest
    pause();
    assert_eq!(y.whoami().expect("y"), y0, "y was not the oldest, it stays");
    pause();
    let x1 = x.whoami().expect("x again"); // full: evicts z, now the oldest
    assert_ne!(x1.session, x0.session, "x's session was evicted");
    pause();
    assert_eq!(y.whoami().expect("y"), y0, "y stays again");
    pause();
    let z1 = z.whoami().expect("z again");
    assert_ne!(z1.session, z0.session, "z's session was evicted");
}

#[test]
fn an_endpoint_removed_from_the_file_loses_its_sessions_on_their_next_datagram() {
    let (a, b) = (UdpUpstream::start("a"), UdpUpstream::start("b"));
    let entry = |u: &UdpUpstream| json!({ "address": u.addr.to_string(), "proto": "udp" });
    let s = start(json!({ "dns": [entry(&a), entry(&b)] }), &["dns;PORT/udp"]);
    let mut clients = sessions(s.port, 4);
    let on_a = clients.iter().filter(|(_, id)| id.upstream == "a").count();
    assert_eq!(on_a, 2, "round robin put two of four clients on a");

    write_services(&s.proxy.services, &json!({ "dns": [entry(&b)] }));
    s.proxy
        .embassy
        .wait_for_endpoints(
            &format!("udp-{}", s.port),
            &[b.addr],
            Duration::from_secs(5),
        )
        .expect("removal applied");
    for (client, before) in &mut clients {
        let now = client.whoami().expect("whoami after removal");
        assert_eq!(now.upstream, "b", "every client is now served by b");
        if before.upstream == "a" {
            assert_ne!(now.session, before.session, "a's sessions moved");
        } else {
            assert_eq!(&now, before, "b's sessions are untouched");
        }
    }
    for _ in 0..3 {
        let mut fresh = UdpClient::new(s.port).expect("client");
        assert_eq!(
            fresh.whoami().expect("whoami").upstream,
            "b",
            "new sessions avoid a"
        );
    }
}

#[test]
fn an_endpoint_answering_port_unreachable_ends_the_session() {
    let b = UdpUpstream::start("b");
    let dead = closed_udp_addr();
    let s = start(
        json!({ "dns": [udp_entry(dead), udp_entry(b.addr)] }),
        &["dns;PORT/udp"],
    );
    // Round robin sends every other new session to the dead port; the ICMP error ends it, so
    // the client's resend opens a session on b.
    for _ in 0..4 {
        let mut client = UdpClient::new(s.port).expect("client");
        let identity = client
            .whoami_within(5, Duration::from_millis(500))
            .expect("answered after at most a resend");
        assert_eq!(identity.upstream, "b");
    }
    assert!(
        !s.proxy
            .embassy
            .log_lines("upstream answered with an error")
            .is_empty(),
        "the dead endpoint was tried and its session ended:\n{}",
        s.proxy.embassy.log().join("\n")
    );
}

#[test]
fn tcp_and_udp_share_a_port_as_two_services() {
    let tcp = Upstream::start("t");
    let udp = UdpUpstream::start("u");
    let s = start(
        json!({ "dns": [
            { "address": tcp.addr.to_string(), "proto": "tcp" },
            { "address": udp.addr.to_string(), "proto": "udp" },
        ] }),
        &["dns;PORT/tcp", "dns;PORT/udp"],
    );
    let mut stream = Client::connect(s.port).expect("tcp through the proxy");
    assert_eq!(stream.upstream, "t");
    assert_eq!(stream.echo(b"over tcp").expect("tcp echo"), b"over tcp");
    let mut datagrams = UdpClient::new(s.port).expect("udp client");
    assert_eq!(datagrams.whoami().expect("udp whoami").upstream, "u");
    datagrams.echo(b"\xffover udp").expect("udp echo");
}

#[test]
fn least_conn_counts_live_sessions() {
    let (a, b) = (UdpUpstream::start("a"), UdpUpstream::start("b"));
    let s = start(
        json!({ "dns": addresses(&[&a, &b]) }),
        &["dns;PORT/udp;balancer=least-conn;udp_idle=1"],
    );
    // Four sessions, two per endpoint.
    let mut clients = sessions(s.port, 4);
    let on_a = clients.iter().filter(|(_, id)| id.upstream == "a").count();
    assert_eq!(on_a, 2, "two of four sessions on a");
    // a's sessions go quiet and expire; b's stay active meanwhile.
    let mut on_b: Vec<_> = clients
        .iter_mut()
        .filter(|(_, id)| id.upstream == "b")
        .collect();
    for _ in 0..15 {
        thread::sleep(Duration::from_millis(200));
        for (client, identity) in on_b.iter_mut() {
            assert_eq!(
                &client.whoami().expect("whoami"),
                identity,
                "b's sessions stay"
            );
        }
    }
    // b has two live sessions, a none: both new sessions go to a (rotation alone would
    // send one of them to b).
    for _ in 0..2 {
        let mut fresh = UdpClient::new(s.port).expect("client");
        assert_eq!(fresh.whoami().expect("whoami").upstream, "a");
    }
}
