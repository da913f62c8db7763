//! The `etcd` discovery plugin's v2 client (`etcd2://`) through the real host against a real
//! etcd serving its v2 API, keys written as registrator writes them: the seed's layout and
//! registrator's `ip:port` values, live changes and TTL expiry under traffic, an event
//! history cleared under a watch that fell behind, an outage, TLS, a failover.

use std::time::Duration;

use embassy_tests::{
    etcd::{Etcd, EtcdCluster},
    *,
};
use serde_json::json;

/// service-registrar's document (the seed's), pointed at a loopback upstream.
fn registrar(upstream: &Upstream) -> String {
    json!({
        "id": "13532987eae2831eb7d41f38172cb82db668b3c72d10f513551026b2525e634f",
        "ipaddress": "127.0.0.1",
        "tags": [],
        "name": "/trusting_shockley",
        "image": "eboraas/apache",
        "host_port": upstream.addr.port().to_string(),
        "proto": "tcp",
        "port": "80",
    })
    .to_string()
}

/// registrator's key for an instance: `<prefix>/<service name>/<host>:<container>:<port>`.
fn registrator_key(prefix: &str, name: &str, upstream: &Upstream) -> String {
    format!(
        "{prefix}/{name}/docker-host:{name}-{}:6379",
        upstream.addr.port()
    )
}

/// Embassy on `uri` proxying each of `services` (`PORT` replaced by a free port), once it
/// listens; their ports.
fn embassy(uri: &str, options: &[&str], services: &[&str]) -> (Embassy, Vec<u16>) {
    embassy_logging(uri, options, services, "info,embassy_core=debug")
}

/// [`embassy`] with `EMBASSY_LOG` set to `log`.
fn embassy_logging(
    uri: &str,
    options: &[&str],
    services: &[&str],
    log: &str,
) -> (Embassy, Vec<u16>) {
    let plugins = standard_plugin_dir(&[]);
    let mut args = vec![
        "--plugin-dir".to_string(),
        plugins.path().display().to_string(),
        "--discovery".to_string(),
        uri.to_string(),
    ];
    for option in options {
        args.extend(["--discovery-opt".to_string(), option.to_string()]);
    }
    let mut ports = Vec::new();
    for service in services {
        let port = free_port();
        ports.push(port);
        args.extend(service_arg(service.replace("PORT", &port.to_string())));
    }
    let embassy =
        Embassy::spawn(Embassy::command(&artifacts().embassy(), args).env("EMBASSY_LOG", log));
    embassy
        .wait_for_services(services.len(), Duration::from_secs(30))
        .expect("listening");
    drop(plugins);
    (embassy, ports)
}

/// `tcp-PORT` serves exactly `upstreams` (at most 10 s).
fn wait_serving(embassy: &Embassy, port: u16, upstreams: &[&Upstream]) {
    let addresses: Vec<_> = upstreams.iter().map(|u| u.addr).collect();
    embassy
        .wait_for_endpoints(&format!("tcp-{port}"), &addresses, Duration::from_secs(10))
        .unwrap_or_else(|error| panic!("{error:#}"));
}

#[test]
fn the_seed_layout_and_registrator_values_are_served() {
    let etcd = Etcd::start_v2(None);
    let (a, b, r1, r2, other) = (
        Upstream::start("a"),
        Upstream::start("b"),
        Upstream::start("r1"),
        Upstream::start("r2"),
        Upstream::start("other"),
    );
    // The seed's layout: /services/prod/apache/80/<host port>/<container id> = document.
    for upstream in [&a, &b] {
        let key = format!(
            "/services/prod/apache/80/{}/13532987eae2",
            upstream.addr.port()
        );
        etcd.v2_put(&key, &registrar(upstream), None);
    }
    // registrator: /services/redis/<name>/<id> = ip:port, one with a TTL as `-ttl` writes it.
    etcd.v2_put(
        &registrator_key("/services/redis", "redis", &r1),
        &r1.addr.to_string(),
        None,
    );
    etcd.v2_put(
        &registrator_key("/services/redis", "redis", &r2),
        &r2.addr.to_string(),
        Some(600),
    );
    // A neighbour whose name merely starts the same is another service.
    etcd.v2_put(
        &registrator_key("/services/redis2", "redis", &other),
        &other.addr.to_string(),
        None,
    );
    let (embassy, ports) = embassy(
        &etcd.uri_v2(),
        &[],
        &[
            "/services/prod/apache/80;PORT/tcp",
            "/services/redis;PORT/tcp",
        ],
    );
    wait_serving(&embassy, ports[0], &[&a, &b]);
    wait_serving(&embassy, ports[1], &[&r1, &r2]);
    let counts = distribution(ports[1], 20).expect("connections");
    assert_eq!(
        (counts.get("r1"), counts.get("r2")),
        (Some(&10), Some(&10)),
        "{counts:?}"
    );
    let mut client = Client::connect(ports[0]).expect("connect");
    assert_eq!(
        client.echo(b"through etcd v2").expect("echo"),
        b"through etcd v2"
    );
    assert_eq!(other.accepted(), 0);
}

#[test]
fn puts_deletes_and_ttl_expiry_follow_while_traffic_flows() {
    let etcd = Etcd::start_v2(None);
    let (a, b, c, d) = (
        Upstream::start("a"),
        Upstream::start("b"),
        Upstream::start("c"),
        Upstream::start("d"),
    );
    let prefix = "/services/redis";
    let key_a = registrator_key(prefix, "redis", &a);
    etcd.v2_put(&key_a, &a.addr.to_string(), None);
    let (embassy, ports) = embassy(&etcd.uri_v2(), &[], &["/services/redis;PORT/tcp"]);
    let port = ports[0];
    wait_serving(&embassy, port, &[&a]);
    let mut on_a = Client::connect(port).expect("connect");
    let traffic = Traffic::start(port);

    // Put: a second instance.
    etcd.v2_put(
        &registrator_key(prefix, "redis", &b),
        &b.addr.to_string(),
        None,
    );
    wait_serving(&embassy, port, &[&a, &b]);
    assert!(settles_on(port, &["a", "b"]), "b joins a");

    // A registration with registrator's -ttl, refreshed once (-ttl-refresh), then left to
    // expire: etcd removes it with an `expire` event.
    let key_c = registrator_key(prefix, "cache", &c);
    etcd.v2_put(&key_c, &c.addr.to_string(), Some(2));
    wait_serving(&embassy, port, &[&a, &b, &c]);
    etcd.v2_put(&key_c, &c.addr.to_string(), Some(2));
    wait_serving(&embassy, port, &[&a, &b]);

    // Update and delete: a's key moves to d, then b goes.
    etcd.v2_put(&key_a, &d.addr.to_string(), None);
    wait_serving(&embassy, port, &[&b, &d]);
    etcd.v2_delete(&registrator_key(prefix, "redis", &b));
    wait_serving(&embassy, port, &[&d]);
    assert!(settles_on(port, &["d"]), "only d left");

    // The connection opened at the start still works, and no connection failed meanwhile.
    assert_eq!(on_a.echo(b"still here").expect("echo"), b"still here");
    let (ok, failures) = traffic.finish();
    assert!(
        ok > 0 && failures.is_empty(),
        "{ok} ok, failures: {failures:?}"
    );
}

/// Embassy is frozen (SIGSTOP) while its watch waits: the next change under the prefix is
/// answered into its socket, then more than 1000 other writes push the index after it out of
/// etcd's event history. Thawed, the watch takes that one change, is refused the next index
/// (error 401), reads the prefix again and so also sees the changes it can no longer replay,
/// without ever calling etcd unreachable.
#[test]
fn a_watch_index_cleared_by_more_than_1000_writes_is_read_again() {
    let etcd = Etcd::start_v2(None);
    let (a, b, c) = (
        Upstream::start("a"),
        Upstream::start("b"),
        Upstream::start("c"),
    );
    let prefix = "/services/redis";
    let key_a = registrator_key(prefix, "redis", &a);
    etcd.v2_put(&key_a, &a.addr.to_string(), None);
    let (mut embassy, ports) = embassy(&etcd.uri_v2(), &[], &["/services/redis;PORT/tcp"]);
    let port = ports[0];
    wait_serving(&embassy, port, &[&a]);
    embassy
        .wait_for_discovery(&format!("tcp-{port}"), "reachable", Duration::from_secs(10))
        .expect("watching");

    embassy.signal(libc::SIGSTOP);
    etcd.v2_put(
        &registrator_key(prefix, "redis", &b),
        &b.addr.to_string(),
        None,
    );
    for n in 0..1100 {
        etcd.v2_put(&format!("{prefix}/churn/x"), &n.to_string(), None);
    }
    etcd.v2_delete(&format!("{prefix}/churn"));
    etcd.v2_put(
        &registrator_key(prefix, "redis", &c),
        &c.addr.to_string(),
        None,
    );
    etcd.v2_delete(&key_a);
    embassy.signal(libc::SIGCONT);

    wait_serving(&embassy, port, &[&b, &c]);
    assert!(settles_on(port, &["b", "c"]), "the changes arrive");
    embassy
        .wait_for_log("etcd event index cleared", Duration::from_secs(5))
        .expect("the cleared index is why it read again");
    let view = embassy
        .wait_for_discovery(&format!("tcp-{port}"), "reachable", Duration::from_secs(1))
        .expect("still reachable");
    assert_eq!(serving(&view).len(), 2);
    assert!(
        embassy.log_lines("etcd unreachable").is_empty(),
        "{:?}",
        embassy.log_lines("plugin")
    );
}

#[test]
fn an_etcd_outage_keeps_the_last_endpoints_and_resyncs_after() {
    let mut etcd = Etcd::start_v2(None);
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let prefix = "/services/redis";
    let key_a = registrator_key(prefix, "redis", &a);
    etcd.v2_put(&key_a, &a.addr.to_string(), None);
    let (mut embassy, ports) = embassy(
        &etcd.uri_v2(),
        &["backoff_max=2s", "timeout=1s"],
        &["/services/redis;PORT/tcp"],
    );
    let port = ports[0];
    let id = format!("tcp-{port}");
    wait_serving(&embassy, port, &[&a]);
    let mut open = Client::connect(port).expect("connect");
    let traffic = Traffic::start(port);

    etcd.stop();
    let view = embassy
        .wait_for_discovery(&id, "unreachable", Duration::from_secs(10))
        .expect("outage noticed");
    assert_eq!(serving(&view), [a.addr.to_string()], "the last set stays");
    for _ in 0..4 {
        let counts = distribution(port, 5).expect("served during the outage");
        assert_eq!(counts.get("a"), Some(&5), "{counts:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(open.echo(b"during").expect("echo"), b"during");

    // etcd returns (its v2 keys with it); the change is made before Embassy's next retry.
    etcd.restart();
    etcd.v2_put(
        &registrator_key(prefix, "redis", &b),
        &b.addr.to_string(),
        None,
    );
    etcd.v2_delete(&key_a);
    wait_serving(&embassy, port, &[&b]);
    assert!(
        settles_on(port, &["b"]),
        "the change made around the outage"
    );
    embassy
        .wait_for_discovery(&id, "reachable", Duration::from_secs(10))
        .expect("recovered");
    embassy
        .wait_for_log("etcd reachable again", Duration::from_secs(10))
        .expect("recovery logged");
    assert_eq!(
        embassy.log_lines("etcd unreachable").len(),
        1,
        "one line per state change, not per retry"
    );
    assert_eq!(embassy.log_lines("etcd reachable again").len(), 1);

    // Followed again after the outage.
    let c = Upstream::start("c");
    etcd.v2_put(
        &registrator_key(prefix, "redis", &c),
        &c.addr.to_string(),
        None,
    );
    wait_serving(&embassy, port, &[&b, &c]);
    assert_eq!(open.echo(b"after").expect("echo"), b"after");
    let (ok, failures) = traffic.finish();
    assert!(
        ok > 0 && failures.is_empty(),
        "{ok} ok, failures: {failures:?}"
    );
}

#[test]
fn tls_with_a_client_certificate() {
    let pki = tempfile::tempdir().expect("temp dir");
    let tls = tls::TestPki::generate(pki.path()).expect("certificates");
    let etcd = Etcd::start_v2(Some(tls.clone()));
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let prefix = "/services/redis";
    etcd.v2_put(
        &registrator_key(prefix, "redis", &a),
        &a.addr.to_string(),
        None,
    );
    let uri = etcd.uri_v2();
    assert!(uri.starts_with("etcd2s://"), "{uri}");
    let (ca, cert, key) = (
        format!("ca={}", tls.file("ca.pem").display()),
        format!("cert={}", tls.file("client.pem").display()),
        format!("key={}", tls.file("client.key").display()),
    );
    let (embassy, ports) = embassy(&uri, &[&ca, &cert, &key], &["/services/redis;PORT/tcp"]);
    wait_serving(&embassy, ports[0], &[&a]);
    etcd.v2_put(
        &registrator_key(prefix, "redis", &b),
        &b.addr.to_string(),
        None,
    );
    wait_serving(&embassy, ports[0], &[&a, &b]);
}

/// etcd's v2 auth: HTTP basic credentials from the options; a wrong password is an
/// unreachable backend whose detail says why.
#[test]
fn username_and_password() {
    let mut etcd = Etcd::start_v2(None);
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let prefix = "/services/redis";
    etcd.v2_put(
        &registrator_key(prefix, "redis", &a),
        &a.addr.to_string(),
        None,
    );
    etcd.enable_v2_auth("embassy", "s3cret", "/services");
    let dir = tempfile::tempdir().expect("temp dir");
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, "s3cret\n").expect("password file");
    let password_file = format!("password_file={}", password_file.display());
    let (allowed, ports) = embassy(
        &etcd.uri_v2(),
        &["username=embassy", &password_file],
        &["/services/redis;PORT/tcp"],
    );
    wait_serving(&allowed, ports[0], &[&a]);
    etcd.v2_put(
        &registrator_key(prefix, "redis", &b),
        &b.addr.to_string(),
        None,
    );
    wait_serving(&allowed, ports[0], &[&a, &b]);

    let (wrong, ports) = embassy(
        &etcd.uri_v2(),
        &["username=embassy", "password=wrong"],
        &["/services/redis;PORT/tcp"],
    );
    let view = wrong
        .wait_for_discovery(
            &format!("tcp-{}", ports[0]),
            "unreachable",
            Duration::from_secs(10),
        )
        .expect("refused");
    assert!(
        discovery_detail(&view)
            .contains("etcd error 110: The request requires user authentication"),
        "{view}"
    );
    assert!(serving(&view).is_empty(), "{view}");
}

/// The member the watch is on is killed: it moves to another member, changes keep arriving,
/// and the log names the member lost and the one taken over, never "etcd unreachable".
#[test]
fn losing_one_of_three_members_is_a_failover_not_an_outage() {
    let mut cluster = EtcdCluster::start_v2(3).unwrap_or_else(|error| panic!("{error:#}"));
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let prefix = "/services/redis";
    let key_a = registrator_key(prefix, "redis", &a);
    cluster[0].v2_put(&key_a, &a.addr.to_string(), None);
    // The plugin's debug line says which member the watch is on.
    let (mut embassy, ports) = embassy_logging(
        &cluster.uri_v2(),
        &["timeout=3s"],
        &["/services/redis;PORT/tcp"],
        "info,embassy_core=debug,plugin=debug",
    );
    let port = ports[0];
    wait_serving(&embassy, port, &[&a]);
    let watching = embassy
        .wait_for_log("watching", Duration::from_secs(30))
        .expect("a watch is on a member");
    let url = |member: &Etcd| format!("http://{}", member.member());
    let on = cluster
        .iter()
        .position(|m| watching.contains(&format!("member={}", url(m))))
        .unwrap_or_else(|| panic!("no member named in {watching}"));
    let traffic = Traffic::start(port);

    cluster[on].stop();
    let other = (on + 1) % 3;
    cluster[other]
        .wait_healthy(Duration::from_secs(30))
        .expect("the other two keep a leader");
    cluster[other].v2_put(
        &registrator_key(prefix, "redis", &b),
        &b.addr.to_string(),
        None,
    );
    cluster[other].v2_delete(&key_a);
    wait_serving(&embassy, port, &[&b]);
    assert!(settles_on(port, &["b"]), "changes arrive after the loss");

    let lost = embassy.log_lines("etcd member lost");
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert!(
        lost[0].contains(&format!("member={}", url(&cluster[on]))),
        "{}",
        lost[0]
    );
    let moved = embassy
        .wait_for_log("failed over to another member", Duration::from_secs(10))
        .expect("failover logged");
    assert!(
        moved.contains(&format!("from={}", url(&cluster[on])))
            && !moved.contains(&format!("to={}", url(&cluster[on]))),
        "{moved}"
    );
    assert!(
        embassy.log_lines("etcd unreachable").is_empty(),
        "{:?}",
        embassy.log_lines("plugin")
    );
    let (ok, failures) = traffic.finish();
    assert!(
        ok > 0 && failures.is_empty(),
        "{ok} ok, failures: {failures:?}"
    );
}

#[test]
fn bad_uris_and_options_are_refused_with_the_reason() {
    let plugins = standard_plugin_dir(&[]);
    let dir = plugins.path().display().to_string();
    for (uri, expected) in [
        (
            "etcd2://127.0.0.1",
            r#"member "127.0.0.1" is not host:port"#,
        ),
        (
            "etcd2s://127.0.0.1:2379",
            "etcd2s:// needs option ca: the PEM file of the CA",
        ),
        (
            "etcd2s://127.0.0.1:2379?ca=/nonexistent/ca.pem",
            "cannot read TLS ca /nonexistent/ca.pem",
        ),
        (
            "etcd2://127.0.0.1:2379?ca=/x.pem",
            "option ca needs an etcds:// or etcd2s:// URI (TLS)",
        ),
    ] {
        let (code, _, stderr) = run_embassy([
            "--plugin-dir",
            &dir,
            "--service",
            "/services/web;8080/tcp",
            "--discovery",
            uri,
        ]);
        assert_eq!(code, 1, "{uri}: {stderr}");
        assert!(stderr.contains(expected), "{uri}: {stderr}");
    }
}
