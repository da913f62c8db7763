//! The `dns` discovery plugin through the real host against a real DNS server (dnsmasq on
//! loopback): SRV targets, ports, priorities and weights; A records of HOST:PORT; a record
//! change under traffic; the server down; an NXDOMAIN held, then emptied.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    time::Duration,
};

use embassy_tests::{
    dns::{Dnsmasq, SrvRecord},
    faults::{Load, Tally, Traffic},
    *,
};

/// Every answer of the test server lives one second.
const TTL: u32 = 1;
const SRV_NAME: &str = "_echo._tcp.svc.test";

fn ip(text: &str) -> IpAddr {
    text.parse().expect("an IP address")
}

/// Embassy on `dns` with `options`, proxying each of `services` (`PORT`: a free port), once
/// it listens for all of them; the ids of the services.
fn embassy_on(dns: &Dnsmasq, options: &[&str], services: &[&str]) -> (Embassy, Vec<u16>) {
    let plugins = standard_plugin_dir(&[]);
    let mut args = vec![
        "--plugin-dir".to_string(),
        plugins.path().display().to_string(),
        "--discovery".to_string(),
        dns.uri(),
    ];
    for option in options {
        args.extend(["--discovery-opt".to_string(), option.to_string()]);
    }
    let mut ports = Vec::new();
    for service in services {
        // The system may hand the same free port out twice in a row.
        let port = std::iter::repeat_with(free_port)
            .find(|p| !ports.contains(p))
            .expect("a free port");
        ports.push(port);
        args.extend(service_arg(service.replace("PORT", &port.to_string())));
    }
    let embassy = Embassy::start(args);
    embassy
        .wait_for_services(services.len(), Duration::from_secs(30))
        .expect("listening");
    (embassy, ports)
}

/// Two upstreams at one port, on 127.0.0.2 and 127.0.0.3: one name's two A records.
fn upstreams_at_one_port() -> (Upstream, Upstream) {
    let (two, three) = (Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3));
    for _ in 0..20 {
        let a = Upstream::start_on("a", two.into());
        let port = a.addr.port();
        // Free on 127.0.0.3 too? (Dropped at once; the upstream binds it again.)
        if TcpListener::bind((three, port)).is_ok() {
            return (a, Upstream::start_at("b", SocketAddr::from((three, port))));
        }
    }
    panic!("no port free on both 127.0.0.2 and 127.0.0.3 in 20 tries");
}

/// Addresses to weights, as the service's view shows them.
fn weights(view: &serde_json::Value) -> Vec<(String, u64)> {
    let mut weights: Vec<(String, u64)> = view["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["address"].as_str().unwrap_or_default().to_string(),
                e["weight"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    weights.sort();
    weights
}

/// What the view says discovery left out: `(instance, reason)`, sorted.
fn excluded(view: &serde_json::Value) -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = view["excluded"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|x| {
            (
                x["instance"].as_str().unwrap_or_default().to_string(),
                x["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    found.sort();
    found
}

#[test]
fn srv_targets_ports_priorities_and_weights_are_served() {
    let (a1, a2, standby) = (
        Upstream::start("a1"),
        Upstream::start("a2"),
        Upstream::start("standby"),
    );
    let b = Upstream::start_on("b", ip("127.0.0.2"));
    let mut dns = Dnsmasq::start(TTL);
    dns.set_hosts(&[
        ("a.svc.test", ip("127.0.0.1")),
        ("b.svc.test", ip("127.0.0.2")),
        ("c.svc.test", ip("127.0.0.1")),
    ]);
    dns.set_srv(&[
        SrvRecord::new(SRV_NAME, "a.svc.test", a1.addr.port(), 10, 1),
        SrvRecord::new(SRV_NAME, "a.svc.test", a2.addr.port(), 10, 0),
        SrvRecord::new(SRV_NAME, "b.svc.test", b.addr.port(), 10, 2),
        // A fallback: not served while priority 10 has targets.
        SrvRecord::new(SRV_NAME, "c.svc.test", standby.addr.port(), 20, 1),
    ]);
    let (embassy, ports) = embassy_on(&dns, &[], &[&format!("{SRV_NAME};PORT/tcp")]);
    let id = format!("tcp-{}", ports[0]);
    let view = embassy
        .wait_for_endpoints(&id, &[a1.addr, a2.addr, b.addr], Duration::from_secs(30))
        .expect("every target and port of priority 10");
    // Weight 0 counts as 1.
    let mut expected = vec![
        (a1.addr.to_string(), 1),
        (a2.addr.to_string(), 1),
        (b.addr.to_string(), 2),
    ];
    expected.sort();
    assert_eq!(weights(&view), expected, "{view}");
    assert_eq!(
        excluded(&view),
        [(
            format!("c.svc.test:{}", standby.addr.port()),
            "not-passing".to_string()
        )],
        "{view}"
    );
    // Smooth weighted round robin over weights 1, 1, 2: exactly in proportion.
    let counts = distribution(ports[0], 40).expect("connections through the proxy");
    assert_eq!(counts.get("a1"), Some(&10), "{counts:?}");
    assert_eq!(counts.get("a2"), Some(&10), "{counts:?}");
    assert_eq!(counts.get("b"), Some(&20), "{counts:?}");
    assert_eq!(standby.accepted(), 0);

    // The priority-10 targets go: the fallback serves.
    dns.set_srv(&[SrvRecord::new(
        SRV_NAME,
        "c.svc.test",
        standby.addr.port(),
        20,
        1,
    )]);
    embassy
        .wait_for_endpoints(&id, &[standby.addr], Duration::from_secs(30))
        .expect("the fallback once it is the lowest priority");
    let client = Client::connect(ports[0]).expect("a connection");
    assert_eq!(client.upstream, "standby");
}

#[test]
fn a_records_give_every_address_at_the_port() {
    let (a, b) = upstreams_at_one_port();
    let dns = Dnsmasq::start(TTL);
    dns.set_hosts(&[("web.test", a.addr.ip()), ("web.test", b.addr.ip())]);
    let port = a.addr.port();
    let (embassy, ports) = embassy_on(&dns, &[], &[&format!("web.test:{port};PORT/tcp")]);
    embassy
        .wait_for_endpoints(
            &format!("tcp-{}", ports[0]),
            &[a.addr, b.addr],
            Duration::from_secs(30),
        )
        .expect("both addresses at the port");
    let counts = distribution(ports[0], 10).expect("connections through the proxy");
    assert_eq!(counts.get("a"), Some(&5), "{counts:?}");
    assert_eq!(counts.get("b"), Some(&5), "{counts:?}");
}

#[test]
fn a_record_change_is_followed_while_traffic_flows() {
    let (a, b) = upstreams_at_one_port();
    let dns = Dnsmasq::start(TTL);
    dns.set_hosts(&[("web.test", a.addr.ip())]);
    let port = a.addr.port();
    let (embassy, ports) = embassy_on(&dns, &[], &[&format!("web.test:{port};PORT/tcp")]);
    let id = format!("tcp-{}", ports[0]);
    embassy
        .wait_for_endpoints(&id, &[a.addr], Duration::from_secs(30))
        .expect("the first address");
    let traffic = Traffic::start(Load {
        workers: 2,
        max_time: Duration::from_secs(60),
        ..Load::new(ports[0])
    });
    assert!(
        traffic.wait_count(20, Duration::from_secs(20)),
        "traffic flows"
    );

    dns.set_hosts(&[("web.test", b.addr.ip())]);
    embassy
        .wait_for_endpoints(&id, &[b.addr], Duration::from_secs(15))
        .expect("the new address, a TTL or so later");
    assert!(
        eventually(Duration::from_secs(10), || b.accepted() >= 20),
        "traffic reaches the new address"
    );
    let attempts = traffic.finish();
    let tally = Tally::of(&attempts);
    assert_eq!(tally.failed(), 0, "{}", tally.failures());
    assert!(a.accepted() > 0, "traffic went to the old address first");
    assert_eq!(
        attempts.last().and_then(|a| a.upstream.as_deref()),
        Some("b")
    );
}

#[test]
fn the_last_answer_is_kept_while_the_server_is_down() {
    let a = Upstream::start("a");
    let mut dns = Dnsmasq::start(TTL);
    dns.set_hosts(&[("db.test", a.addr.ip())]);
    let service = format!("db.test:{};PORT/tcp", a.addr.port());
    let (embassy, ports) = embassy_on(&dns, &["timeout=500ms", "attempts=1"], &[&service]);
    let id = format!("tcp-{}", ports[0]);
    embassy
        .wait_for_endpoints(&id, &[a.addr], Duration::from_secs(30))
        .expect("the first answer");

    dns.stop();
    let view = embassy
        .wait_for_discovery(&id, "unreachable", Duration::from_secs(20))
        .expect("the outage is reported");
    assert_eq!(serving(&view), [a.addr.to_string()], "{view}");
    let detail = discovery_detail(&view);
    assert!(
        detail.contains(&format!("at 127.0.0.1:{}", dns.port))
            && detail.contains("keeping the last known endpoints"),
        "{detail}"
    );
    let mut client = Client::connect(ports[0]).expect("served from the last answer");
    assert_eq!(client.upstream, "a");
    assert_eq!(client.echo(b"ping").expect("echo"), b"ping");

    dns.restart();
    let view = embassy
        .wait_for_discovery(&id, "reachable", Duration::from_secs(30))
        .expect("the server answers again");
    assert_eq!(serving(&view), [a.addr.to_string()], "{view}");
}

#[test]
fn a_missing_name_is_held_then_emptied() {
    let a = Upstream::start("a");
    let dns = Dnsmasq::start(TTL);
    dns.set_hosts(&[("web.test", a.addr.ip())]);
    let service = format!("web.test:{};PORT/tcp", a.addr.port());
    let (embassy, ports) = embassy_on(&dns, &["nxdomain_hold=3s"], &[&service]);
    let id = format!("tcp-{}", ports[0]);
    embassy
        .wait_for_endpoints(&id, &[a.addr], Duration::from_secs(30))
        .expect("the first answer");

    // The name goes (NXDOMAIN): the set stays for the hold, and says so.
    dns.set_hosts(&[]);
    let held = embassy
        .wait_for_service(&id, Duration::from_secs(15), |view| {
            discovery_detail(view).contains("keeping the last endpoints")
        })
        .expect("the hold is reported");
    assert_eq!(held["discovery"]["state"], "invalid", "{held}");
    assert!(
        discovery_detail(&held).contains("web.test: NXDOMAIN"),
        "{held}"
    );
    assert_eq!(serving(&held), [a.addr.to_string()], "{held}");
    assert_eq!(Client::connect(ports[0]).expect("held").upstream, "a");

    // Past the hold: no endpoints.
    let emptied = embassy
        .wait_for_endpoints(&id, &[] as &[String], Duration::from_secs(20))
        .expect("emptied after the hold");
    assert!(
        discovery_detail(&emptied).contains("serving no endpoints"),
        "{emptied}"
    );

    // The name comes back: so does its endpoint.
    dns.set_hosts(&[("web.test", a.addr.ip())]);
    let back = embassy
        .wait_for_endpoints(&id, &[a.addr], Duration::from_secs(15))
        .expect("back");
    assert_eq!(back["discovery"]["state"], "reachable", "{back}");
}

#[test]
fn a_name_never_resolved_starts_empty_whatever_the_hold() {
    let dns = Dnsmasq::start(TTL);
    let (embassy, ports) = embassy_on(&dns, &["nxdomain_hold=1h"], &["nothing.test:80;PORT/tcp"]);
    let view = embassy
        .wait_for_discovery(
            &format!("tcp-{}", ports[0]),
            "invalid",
            Duration::from_secs(15),
        )
        .expect("reported at once");
    assert!(serving(&view).is_empty(), "{view}");
    assert!(
        discovery_detail(&view).contains("nothing.test: NXDOMAIN; serving no endpoints"),
        "{view}"
    );
    assert!(
        view["discovery"]["last_update"].is_number(),
        "an empty set was sent, not none: {view}"
    );
}

#[test]
fn descriptors_dns_cannot_serve_are_refused_naming_the_service() {
    let dns = Dnsmasq::start(TTL);
    let plugins = standard_plugin_dir(&[]);
    // The system resolver (dns://) is opened too: the watch is refused before any query.
    for (uri, service, expected) in [
        (
            "dns://".to_string(),
            "redis.test",
            "dns service \"redis.test\" is neither an SRV name (_service._proto.name) nor HOST:PORT: add the port",
        ),
        (
            dns.uri(),
            "_redis._tcp.svc.test[prod]",
            "dns service \"_redis._tcp.svc.test\": DNS records carry no tags",
        ),
    ] {
        let mut embassy = Embassy::start([
            "--plugin-dir".to_string(),
            plugins.path().display().to_string(),
            "--discovery".to_string(),
            uri,
            "--service".to_string(),
            format!("{service};{}/tcp", free_port()),
        ]);
        let status = embassy
            .wait_exit(Duration::from_secs(20))
            .expect("the start fails");
        assert!(!status.success(), "{status}");
        let log = embassy.log().join("\n");
        assert!(log.contains(expected), "{log}");
    }
}
