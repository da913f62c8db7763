//! The `etcd` discovery plugin through the real host against a real etcd: registrator
//! formats, tags, live changes, an etcd outage, TLS and auth.

use std::time::Duration;

use embassy_tests::{
    etcd::{Etcd, EtcdCluster},
    *,
};
use serde_json::json;

/// service-registrar's document (the original README's), pointed at a loopback upstream.
fn registrar(upstream: &Upstream, tags: &[&str]) -> String {
    json!({
        "id": "13532987eae2831eb7d41f38172cb82db668b3c72d10f513551026b2525e634f",
        "host": "fury",
        "ipaddress": "127.0.0.1",
        "env": {"ENVIRONMENT": "prod", "NAME": "apache", "HOME": "/"},
        "tags": tags,
        "name": "/trusting_shockley",
        "image": "eboraas/apache",
        "hostname": "13532987eae2",
        "host_port": upstream.addr.port().to_string(),
        "proto": "tcp",
        "port": "80",
        "path": format!("/services/prod/apache/80/{}/13532987eae2", upstream.addr.port()),
    })
    .to_string()
}

/// `/services/prod/apache/80/<host port>/<container id>`, the seed's layout.
fn instance_key(upstream: &Upstream) -> String {
    format!(
        "/services/prod/apache/80/{}/{:012x}",
        upstream.addr.port(),
        u64::from(upstream.addr.port()) * 7919
    )
}

/// Embassy on `etcd` proxying each of `services` (with `PORT` replaced by a free port), once
/// every service has its first endpoints.
fn embassy(etcd: &Etcd, options: &[&str], services: &[&str]) -> (Embassy, Vec<u16>) {
    let (embassy, ports) = embassy_listening(etcd, options, services);
    // Every test starts with instances registered: wait for each service's first set.
    for service in embassy
        .wait_for_services(services.len(), Duration::from_secs(1))
        .expect("listed")
    {
        let id = service["id"].as_str().expect("an id");
        embassy
            .wait_for_service(id, Duration::from_secs(30), |view| {
                !serving(view).is_empty()
            })
            .expect("a first endpoint set");
    }
    (embassy, ports)
}

/// Embassy as above, once it listens.
fn embassy_listening(etcd: &Etcd, options: &[&str], services: &[&str]) -> (Embassy, Vec<u16>) {
    let plugins = standard_plugin_dir(&[]);
    let mut args = vec![
        "--plugin-dir".to_string(),
        plugins.path().display().to_string(),
        "--discovery".to_string(),
        etcd.uri(),
    ];
    for option in options {
        args.extend(["--discovery-opt".to_string(), option.to_string()]);
    }
    let mut ports = Vec::new();
    for service in services {
        let port = free_port();
        ports.push(port);
        args.extend([
            "--service".to_string(),
            service.replace("PORT", &port.to_string()),
        ]);
    }
    let embassy = Embassy::start(args);
    embassy
        .wait_for_services(services.len(), Duration::from_secs(30))
        .expect("listening");
    // The libraries are loaded by now; the directory may go.
    drop(plugins);
    (embassy, ports)
}

#[test]
fn the_seed_layout_is_proxied_end_to_end() {
    let etcd = Etcd::start();
    let (a, b, c, other) = (
        Upstream::start("a"),
        Upstream::start("b"),
        Upstream::start("c"),
        Upstream::start("other"),
    );
    for upstream in [&a, &b, &c] {
        etcd.put(&instance_key(upstream), &registrar(upstream, &[]));
    }
    // A neighbour whose key merely starts with the same characters is another service.
    etcd.put(
        &format!("/services/prod/apache/8080/{}/x", other.addr.port()),
        &registrar(&other, &[]),
    );
    let (_embassy, ports) = embassy(&etcd, &[], &["/services/prod/apache/80;PORT/tcp"]);
    let counts = distribution(ports[0], 30).expect("connections");
    assert_eq!(
        (counts.get("a"), counts.get("b"), counts.get("c")),
        (Some(&10), Some(&10), Some(&10)),
        "round robin over the three instances, none elsewhere: {counts:?}"
    );
    let mut client = Client::connect(ports[0]).expect("connect");
    assert_eq!(client.echo(b"through etcd").expect("echo"), b"through etcd");
    assert_eq!(other.accepted(), 0);
}

#[test]
fn puts_updates_and_deletes_follow_while_traffic_flows() {
    let etcd = Etcd::start();
    let (a, b, c) = (
        Upstream::start("a"),
        Upstream::start("b"),
        Upstream::start("c"),
    );
    let key_a = instance_key(&a);
    etcd.put(&key_a, &registrar(&a, &[]));
    let (mut embassy, ports) = embassy(&etcd, &[], &["/services/prod/apache/80;PORT/tcp"]);
    let port = ports[0];
    let mut on_a = Client::connect(port).expect("connect");
    assert_eq!(on_a.upstream, "a");
    let traffic = Traffic::start(port);

    // Put: a second instance.
    etcd.put(&instance_key(&b), &registrar(&b, &[]));
    assert!(settles_on(port, &["a", "b"]), "b joins a");

    // Update: a's key now points at c.
    etcd.put(&key_a, &registrar(&c, &[]));
    assert!(settles_on(port, &["b", "c"]), "a's key moved to c");

    // Delete: b goes.
    etcd.delete(&instance_key(&b));
    assert!(settles_on(port, &["c"]), "b deleted");
    let a_before = a.accepted();
    let counts = distribution(port, 10).expect("connections");
    assert_eq!(counts.get("c"), Some(&10), "{counts:?}");
    assert_eq!(a.accepted(), a_before, "no new connection reaches a");

    // The connection opened at the start still works, and no connection failed meanwhile.
    assert_eq!(on_a.echo(b"still here").expect("echo"), b"still here");
    let (ok, failures) = traffic.finish();
    assert!(
        ok > 0 && failures.is_empty(),
        "{ok} ok, failures: {failures:?}"
    );
    embassy
        .wait_for_log("endpoints updated", Duration::from_secs(1))
        .expect("updates logged");
}

#[test]
fn tags_plain_values_and_garbage_beside_good_values() {
    let etcd = Etcd::start();
    let (a, b, c, d) = (
        Upstream::start("a"),
        Upstream::start("b"),
        Upstream::start("c"),
        Upstream::start("d"),
    );
    let prefix = "/services/prod/app1/80";
    etcd.put(&format!("{prefix}/1/a"), &registrar(&a, &["prod", "app1"]));
    etcd.put(&format!("{prefix}/2/b"), &registrar(&b, &["prod"]));
    // registrator's plain value and a SkyDNS record: no tags.
    etcd.put(&format!("{prefix}/host:c:80"), &c.addr.to_string());
    etcd.put(
        &format!("{prefix}/skydns-d"),
        &json!({"host": "127.0.0.1", "port": d.addr.port()}).to_string(),
    );
    let garbage_key = format!("{prefix}/3/garbage");
    etcd.put(&garbage_key, "{\"ipaddress\": \"127.0.0.1\", \"host_po");

    let (mut embassy, ports) = embassy(
        &etcd,
        &[],
        &[
            &format!("{prefix}[prod,app1];PORT/tcp"),
            &format!("{prefix};PORT/tcp"),
        ],
    );
    let tagged = distribution(ports[0], 8).expect("tagged connections");
    assert_eq!(
        tagged.get("a"),
        Some(&8),
        "only a carries prod and app1: {tagged:?}"
    );
    let all = distribution(ports[1], 40).expect("untagged connections");
    assert_eq!(all.len(), 4, "a, b, c and d, the garbage skipped: {all:?}");

    let warning = embassy
        .wait_for_log("skipping an etcd value", Duration::from_secs(5))
        .expect("garbage warned about");
    assert!(warning.contains(&garbage_key), "names the key: {warning}");
    assert!(
        warning.contains("invalid JSON"),
        "says what is wrong: {warning}"
    );
    // Once per watch (two services read it), not once per read or per connection.
    assert_eq!(embassy.log_lines("skipping an etcd value").len(), 2);

    // Fixing the value adds the instance; nothing else moves.
    let e = Upstream::start("e");
    etcd.put(&garbage_key, &e.addr.to_string());
    assert!(reaches(ports[1], "e"));
    assert!(Client::connect(ports[0]).is_ok_and(|client| client.upstream == "a"));
}

#[test]
fn an_etcd_outage_keeps_the_last_endpoints_and_resyncs_after() {
    let mut etcd = Etcd::start();
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let key_a = instance_key(&a);
    etcd.put(&key_a, &registrar(&a, &[]));
    let (mut embassy, ports) = embassy(
        &etcd,
        &["backoff_max=2s", "timeout=1s"],
        &["/services/prod/apache/80;PORT/tcp"],
    );
    let port = ports[0];
    let id = format!("tcp-{port}");
    let mut open = Client::connect(port).expect("connect");
    let traffic = Traffic::start(port);

    etcd.stop();
    let view = embassy
        .wait_for_discovery(&id, "unreachable", Duration::from_secs(10))
        .expect("outage noticed");
    assert_eq!(serving(&view), [a.addr.to_string()], "the last set stays");
    // Several retries happen during these seconds; traffic keeps flowing meanwhile.
    for _ in 0..4 {
        let counts = distribution(port, 5).expect("served during the outage");
        assert_eq!(counts.get("a"), Some(&5), "{counts:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(open.echo(b"during").expect("echo"), b"during");

    // etcd returns; the change is made before Embassy's next retry reaches it.
    etcd.restart();
    etcd.put(&instance_key(&b), &registrar(&b, &[]));
    etcd.delete(&key_a);
    assert!(
        settles_on(port, &["b"]),
        "the change made around the outage is picked up"
    );
    embassy
        .wait_for_discovery(&id, "reachable", Duration::from_secs(10))
        .expect("recovered");
    // The log says so too, once: its line may trail the state a little.
    embassy
        .wait_for_log("etcd reachable again", Duration::from_secs(10))
        .expect("recovery logged");
    assert_eq!(
        embassy.log_lines("etcd unreachable").len(),
        1,
        "one line per state change, not per retry"
    );
    assert_eq!(embassy.log_lines("etcd reachable again").len(), 1);
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
    let etcd = Etcd::start_with(Some(tls.clone()));
    let a = Upstream::start("a");
    etcd.put(&instance_key(&a), &registrar(&a, &[]));
    let (ca, cert, key) = (
        format!("ca={}", tls.file("ca.pem").display()),
        format!("cert={}", tls.file("client.pem").display()),
        format!("key={}", tls.file("client.key").display()),
    );
    let (_embassy, ports) = embassy(
        &etcd,
        &[&ca, &cert, &key],
        &["/services/prod/apache/80;PORT/tcp"],
    );
    assert!(reaches(ports[0], "a"), "read over TLS");
    let b = Upstream::start("b");
    etcd.put(&instance_key(&b), &registrar(&b, &[]));
    assert!(reaches(ports[0], "b"), "watched over TLS");
}

#[test]
fn username_and_password() {
    let mut etcd = Etcd::start();
    let a = Upstream::start("a");
    etcd.put(&instance_key(&a), &registrar(&a, &[]));
    etcd.enable_auth("embassy", "s3cret", "/services/");
    let dir = tempfile::tempdir().expect("temp dir");
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, "s3cret\n").expect("password file");
    let (_embassy, ports) = embassy(
        &etcd,
        &[
            "username=embassy",
            &format!("password_file={}", password_file.display()),
        ],
        &["/services/prod/apache/80;PORT/tcp"],
    );
    assert!(reaches(ports[0], "a"), "read as embassy");
    let b = Upstream::start("b");
    etcd.put(&instance_key(&b), &registrar(&b, &[]));
    assert!(reaches(ports[0], "b"), "watched as embassy");
}

#[test]
fn compaction_then_a_change_is_picked_up() {
    let etcd = Etcd::start();
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    etcd.put(&instance_key(&a), &registrar(&a, &[]));
    let (_embassy, ports) = embassy(&etcd, &[], &["/services/prod/apache/80;PORT/tcp"]);
    // History churn, then all of it compacted away under the running watch.
    for round in 0..20 {
        etcd.put(
            "/services/prod/apache/80/churn",
            &format!("127.0.0.1:{}", 1000 + round),
        );
    }
    etcd.delete("/services/prod/apache/80/churn");
    etcd.compact(etcd.revision());
    etcd.put(&instance_key(&b), &registrar(&b, &[]));
    assert!(
        settles_on(ports[0], &["a", "b"]),
        "the change after compaction arrives"
    );
}

#[test]
fn etcd_down_at_start_with_auth_then_up() {
    let mut etcd = Etcd::start();
    let a = Upstream::start("a");
    etcd.put(&instance_key(&a), &registrar(&a, &[]));
    etcd.enable_auth("embassy", "s3cret", "/services/");
    etcd.stop();
    let (embassy, ports) = embassy_listening(
        &etcd,
        &[
            "username=embassy",
            "password=s3cret",
            "backoff_max=1s",
            "timeout=1s",
        ],
        &["/services/prod/apache/80;PORT/tcp"],
    );
    embassy
        .wait_for_discovery(
            &format!("tcp-{}", ports[0]),
            "unreachable",
            Duration::from_secs(10),
        )
        .expect("outage reported");
    assert!(Client::connect(ports[0]).is_err(), "no endpoint known yet");
    etcd.restart();
    assert!(
        reaches(ports[0], "a"),
        "authenticated and read once etcd is up"
    );
}

/// Established TCP connections (IPv4) that process `pid` holds to port `port`, from /proc.
fn connections_to(pid: u32, port: u16) -> usize {
    let sockets: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy();
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .collect();
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let remote_port = fields
                .get(2)
                .and_then(|remote| remote.split(':').nth(1))
                .and_then(|hex| u16::from_str_radix(hex, 16).ok());
            remote_port == Some(port)
                && fields.get(3) == Some(&"01")
                && fields.get(9).is_some_and(|inode| sockets.contains(*inode))
        })
        .count()
}

#[test]
fn many_services_share_one_connection_to_etcd() {
    let etcd = Etcd::start();
    let upstreams: Vec<Upstream> = (0..5).map(|i| Upstream::start(&format!("u{i}"))).collect();
    for (i, upstream) in upstreams.iter().enumerate() {
        etcd.put(
            &format!("/services/prod/s{i}/80/1/x"),
            &registrar(upstream, &[]),
        );
    }
    let services: Vec<String> = (0..5)
        .map(|i| format!("/services/prod/s{i}/80;PORT/tcp"))
        .collect();
    let services: Vec<&str> = services.iter().map(String::as_str).collect();
    let (embassy, ports) = embassy(&etcd, &[], &services);
    for (i, port) in ports.iter().enumerate() {
        assert!(reaches(*port, &format!("u{i}")));
    }
    assert_eq!(
        connections_to(embassy.pid(), etcd.client_port),
        1,
        "five watches, one connection"
    );
}

#[test]
fn bad_uris_and_options_are_refused_with_the_reason() {
    let plugins = standard_plugin_dir(&[]);
    let dir = plugins.path().display().to_string();
    for (uri, options, expected) in [
        (
            "etcd://127.0.0.1",
            vec![],
            r#"member "127.0.0.1" is not host:port"#,
        ),
        (
            "etcds://127.0.0.1:2379?ca=/nonexistent/ca.pem",
            vec![],
            "cannot read TLS ca /nonexistent/ca.pem",
        ),
        (
            "etcd://127.0.0.1:2379",
            vec!["--discovery-opt", "passwd=x"],
            r#"unknown etcd option passwd="x" (known: ca, cert, key, username, password, "#,
        ),
    ] {
        let mut args = vec![
            "--plugin-dir",
            &dir,
            "--service",
            "/services/web;8080/tcp",
            "--discovery",
            uri,
        ];
        args.extend(options);
        let (code, _, stderr) = run_embassy(args);
        assert_eq!(code, 1, "{uri}: {stderr}");
        assert!(stderr.contains(expected), "{uri}: {stderr}");
    }
}

/// `/udp` takes instances whose document says udp (or registrator's `:udp` key); `/tcp` the
/// others; both served at once from one prefix.
#[test]
fn udp_and_tcp_descriptors_split_one_prefix_by_protocol() {
    let etcd = Etcd::start();
    let tcp = Upstream::start("t");
    let (udp_doc, udp_plain) = (UdpUpstream::start("u1"), UdpUpstream::start("u2"));
    etcd.put(
        "/services/prod/dns/53/tcp-1",
        &format!("127.0.0.1:{}", tcp.addr.port()),
    );
    let document = json!({"ipaddress": "127.0.0.1", "host_port": udp_doc.addr.port().to_string(), "proto": "udp"});
    etcd.put("/services/prod/dns/53/udp-1", &document.to_string());
    etcd.put(
        "/services/prod/dns/53/udp-2:udp",
        &udp_plain.addr.to_string(),
    );
    let (embassy, ports) = embassy(
        &etcd,
        &[],
        &[
            "/services/prod/dns/53;PORT/udp",
            "/services/prod/dns/53;PORT/tcp",
        ],
    );
    embassy
        .wait_for_endpoints(
            &format!("udp-{}", ports[0]),
            &[udp_doc.addr, udp_plain.addr],
            Duration::from_secs(10),
        )
        .expect("the udp service's endpoints");
    embassy
        .wait_for_endpoints(
            &format!("tcp-{}", ports[1]),
            &[tcp.addr],
            Duration::from_secs(10),
        )
        .expect("the tcp service's endpoints");
    let answered: std::collections::HashSet<String> = (0..6)
        .map(|_| {
            UdpClient::new(ports[0])
                .expect("client")
                .whoami()
                .expect("answered over udp")
                .upstream
        })
        .collect();
    assert_eq!(
        answered,
        ["u1", "u2"].map(String::from).into(),
        "udp sessions spread over the udp instances only"
    );
    let counts = distribution(ports[1], 6).expect("tcp connections");
    assert_eq!(counts.get("t"), Some(&6), "{counts:?}");
}

/// One member of three is killed under the watch: the watch moves to another member, changes
/// keep arriving, and the log names the member lost and the one taken over, never "etcd
/// unreachable".
#[test]
fn losing_one_of_three_members_is_a_failover_not_an_outage() {
    let mut cluster = EtcdCluster::start(3).unwrap_or_else(|error| panic!("{error:#}"));
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let key_a = instance_key(&a);
    cluster[0].put(&key_a, &registrar(&a, &[]));
    let members: Vec<String> = cluster.iter().map(Etcd::member).collect();
    let plugins = standard_plugin_dir(&[]);
    let port = free_port();
    let child = std::process::Command::new(artifacts().embassy())
        .env("EMBASSY_ADMIN", "off") // the default socket is the machine's, not this test's
        .args(["--plugin-dir", &plugins.path().display().to_string()])
        .args(["--discovery", &format!("etcd://{}", members.join(","))])
        .args(["--discovery-opt", "timeout=3s"])
        .args(["--service", &format!("/services/prod/apache/80;{port}/tcp")])
        .env_remove("DISCOVERY")
        // The plugin's debug line says which member each watch is on.
        .env("EMBASSY_LOG", "info,embassy_core=debug,plugin=debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn embassy");
    let mut embassy = Embassy::adopt(child);
    let watching = embassy
        .wait_for_log("watching", Duration::from_secs(30))
        .expect("a watch is created");
    let on = cluster
        .iter()
        .position(|m| watching.contains(&format!("member={} (", m.name())))
        .unwrap_or_else(|| panic!("no member named in {watching}"));
    assert!(reaches(port, "a"), "served before the loss");
    let traffic = Traffic::start(port);

    cluster[on].stop();
    let other = (on + 1) % 3;
    cluster[other]
        .wait_healthy(Duration::from_secs(30))
        .expect("the other two keep a leader");
    cluster[other].put(&instance_key(&b), &registrar(&b, &[]));
    cluster[other].delete(&key_a);
    assert!(settles_on(port, &["b"]), "changes arrive after the loss");

    let lost = embassy.log_lines("etcd member lost");
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert!(
        lost[0].contains(&format!(
            "member={} (http://{})",
            cluster[on].name(),
            members[on]
        )),
        "{}",
        lost[0]
    );
    let moved = embassy
        .wait_for_log("failed over to another member", Duration::from_secs(10))
        .expect("failover logged");
    assert!(
        !moved.contains(&format!("to={} (", cluster[on].name())),
        "{moved}"
    );
    assert!(
        embassy.log_lines("etcd unreachable").is_empty(),
        "{:?}",
        embassy.log()
    );
    let (ok, failures) = traffic.finish();
    assert!(
        ok > 0 && failures.is_empty(),
        "{ok} ok, failures: {failures:?}"
    );
}
