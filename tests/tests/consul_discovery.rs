//! The `consul` discovery plugin through the real host, against the Consul simulator:
//! health and tags decide routing, blocking queries survive index resets, an outage keeps the
//! last endpoints, and fifty watches block side by side.

use std::{collections::HashSet, time::Duration};

use embassy_tests::{
    consul_sim::{ConsulSim, Health, Instance, Mode},
    *,
};

/// Starts `embassy` on the consul plugin with `options` (`key=value`), `env`, and `services`
/// (descriptors where `PORT` is replaced by a free port, returned in order).
fn start(
    sim: &ConsulSim,
    options: &[&str],
    env: &[(&str, &str)],
    services: &[&str],
) -> (Embassy, Vec<u16>, tempfile::TempDir) {
    let plugins = plugin_dir(&[
        artifacts().library("embassy-plugin-round-robin"),
        artifacts().library("embassy-plugin-consul"),
    ]);
    let mut command = Embassy::command(
        &artifacts().embassy(),
        ["--plugin-dir".as_ref(), plugins.path().as_os_str()],
    );
    command.args(["--discovery", &sim.uri()]);
    for option in options {
        command.args(["--discovery-opt", option]);
    }
    let mut ports = Vec::new();
    for service in services {
        // The system may hand the same free port out twice in a row.
        let port = std::iter::repeat_with(free_port)
            .find(|p| !ports.contains(p))
            .expect("a free port");
        ports.push(port);
        command.args(["--service", &service.replace("PORT", &port.to_string())]);
    }
    command
        .env_remove("CONSUL_HTTP_TOKEN")
        // The plugin honours proxy variables, as Consul's own client does; the simulator is
        // on loopback, so a CI machine's proxy must not get in between.
        .env("NO_PROXY", "*")
        .env("EMBASSY_LOG", "info,plugin=debug")
        .envs(env.iter().copied());
    let embassy = Embassy::spawn(&mut command);
    embassy
        .wait_for_services(services.len(), Duration::from_secs(30))
        .expect("embassy listens for every service");
    (embassy, ports, plugins)
}

/// Opens connections until one lands on `name`, at most 10 s of trying.
fn reaches(port: u16, name: &str) -> bool {
    eventually(Duration::from_secs(10), || {
        Client::connect(port).is_ok_and(|c| c.upstream == name)
    })
}

/// The upstreams `n` new connections land on.
fn landed(port: u16, n: usize) -> HashSet<String> {
    distribution(port, n)
        .expect("connections through the proxy")
        .into_keys()
        .collect()
}

fn names(list: &[&str]) -> HashSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn only_passing_instances_serve_and_health_flips_move_new_connections() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let sim = ConsulSim::start();
    sim.register(Instance::new("a", "web", a.addr));
    sim.register(Instance::new("b", "web", b.addr).health(Health::Critical));
    let (mut embassy, ports, _dir) = start(&sim, &[], &[], &["web;PORT/tcp"]);
    let port = ports[0];

    assert!(reaches(port, "a"));
    assert_eq!(landed(port, 10), names(&["a"]), "critical b gets nothing");
    let mut held = Client::connect(port).expect("connection to a");

    sim.set_health("b", Health::Passing);
    sim.set_health("a", Health::Critical);
    assert!(reaches(port, "b"), "b serves once passing");
    assert_eq!(landed(port, 10), names(&["b"]), "critical a gets nothing");
    assert_eq!(
        held.echo(b"still here").expect("open connection survives"),
        b"still here"
    );

    // A warning is not passing either.
    sim.set_health("a", Health::Passing);
    assert!(reaches(port, "a"));
    sim.set_health("b", Health::Warning);
    let only_a = eventually(Duration::from_secs(10), || landed(port, 4) == names(&["a"]));
    assert!(only_a, "warning b gets nothing");
    assert_eq!(landed(port, 10), names(&["a"]));
    assert!(embassy.is_running());
}

#[test]
fn every_tag_must_match_and_an_empty_service_address_falls_back_to_the_node() {
    let (x, y, z) = (
        Upstream::start("x"),
        Upstream::start("y"),
        Upstream::start("z"),
    );
    let sim = ConsulSim::start();
    let mut on_node = Instance::new("x", "redis.master", x.addr).tags(&["prod", "stats"]);
    on_node.address = String::new();
    on_node.node_address = "127.0.0.1".into();
    sim.register(on_node);
    sim.register(Instance::new("y", "redis.master", y.addr).tags(&["prod"]));
    sim.register(Instance::new("z", "redis.master", z.addr).tags(&["stats", "extra", "prod"]));
    sim.register(Instance::new("other", "redis.replica", y.addr).tags(&["prod", "stats"]));
    let (_embassy, ports, _dir) = start(&sim, &[], &[], &["redis.master[prod,stats];PORT/tcp"]);

    assert!(reaches(ports[0], "x"), "node address used");
    assert!(reaches(ports[0], "z"));
    assert_eq!(landed(ports[0], 20), names(&["x", "z"]));
}

#[test]
fn index_resets_and_backwards_indexes_keep_the_watch_going_without_spinning() {
    let (a, b, c) = (
        Upstream::start("a"),
        Upstream::start("b"),
        Upstream::start("c"),
    );
    let sim = ConsulSim::start();
    for _ in 0..40 {
        sim.register(Instance::new("noise", "other", a.addr));
    }
    sim.register(Instance::new("a", "web", a.addr));
    // A query sent with the old, higher index after the reset is held until `wait` runs out,
    // as Consul would: only then does the lower index show, and the watch must start over.
    let (embassy, ports, _dir) = start(
        &sim,
        &["min_interval=100ms", "wait=1s"],
        &[],
        &["web;PORT/tcp"],
    );
    let port = ports[0];
    assert!(reaches(port, "a"));

    // Backwards: a restored snapshot at index 3, then a change at 4.
    assert!(sim.index() > 40);
    sim.reset_index(3);
    sim.register(Instance::new("b", "web", b.addr));
    assert!(reaches(port, "b"), "change after a backwards index seen");

    // Zero: every answer is immediate; the watch must not spin on it.
    sim.reset_index(0);
    // A query held with the old index answers within `wait`; then every answer is at once.
    let start = sim.requests("web");
    assert!(eventually(Duration::from_secs(5), || sim.requests("web") >= start + 3));
    let before = sim.requests("web");
    let sets = || {
        embassy
            .admin_get(&format!("/v1/services/tcp-{port}"))
            .expect("the service")
            .1["discovery"]["updates"]
            .as_u64()
    };
    let pushed_before = sets();
    std::thread::sleep(Duration::from_secs(1));
    let asked = sim.requests("web") - before;
    assert!(
        (2..=15).contains(&asked),
        "with min_interval=100ms, 1 s at index 0 should take ~10 queries, took {asked}"
    );
    assert_eq!(
        sets(),
        pushed_before,
        "{asked} identical answers pushed nothing"
    );
    sim.deregister("a");
    sim.register(Instance::new("c", "web", c.addr));
    assert!(reaches(port, "c"));
    assert_eq!(landed(port, 10), names(&["b", "c"]));
}

#[test]
fn outages_keep_the_last_endpoints_and_recovery_resyncs() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let sim = ConsulSim::start();
    sim.register(Instance::new("a", "web", a.addr));
    let (mut embassy, ports, _dir) = start(
        &sim,
        &["backoff=20ms", "max_backoff=100ms"],
        &[],
        &["web;PORT/tcp"],
    );
    let port = ports[0];
    let id = format!("tcp-{port}");
    assert!(reaches(port, "a"));

    sim.set_mode(Mode::Fail500);
    let view = embassy
        .wait_for_discovery(&id, "unreachable", Duration::from_secs(10))
        .expect("500 reported");
    assert!(discovery_detail(&view).contains("500"), "{view}");
    assert_eq!(landed(port, 5), names(&["a"]), "last endpoints kept on 500");

    sim.set_mode(Mode::Garbage);
    embassy
        .wait_for_discovery(&id, "invalid", Duration::from_secs(10))
        .expect("garbage reported");
    assert_eq!(
        landed(port, 5),
        names(&["a"]),
        "last endpoints kept on garbage"
    );

    sim.set_mode(Mode::Normal);
    sim.go_away();
    embassy
        .wait_for_discovery(&id, "unreachable", Duration::from_secs(10))
        .expect("dead agent reported");
    // Many retries later, still one line per state change.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(embassy.log_lines("unreachable").len(), 2);
    assert_eq!(embassy.log_lines("unusable data").len(), 1);
    assert_eq!(
        landed(port, 5),
        names(&["a"]),
        "last endpoints kept while dead"
    );

    // The catalog changed while we could not see it; recovery must pick it all up.
    sim.deregister("a");
    sim.register(Instance::new("b", "web", b.addr));
    sim.come_back();
    embassy
        .wait_for_discovery(&id, "reachable", Duration::from_secs(10))
        .expect("recovery reported");
    assert!(reaches(port, "b"));
    assert_eq!(landed(port, 10), names(&["b"]));
    assert!(embassy.is_running());
}

#[test]
fn token_and_datacenter_reach_the_agent() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let sim = ConsulSim::start();
    sim.require_token("s3cret");
    sim.register(Instance::new("a", "web", a.addr));
    let mut in_dc2 = Instance::new("b", "web", b.addr);
    in_dc2.datacenter = "dc2".into();
    sim.register(in_dc2);

    // Without a token: refused, reported, nothing served.
    let (refused, ports, _dir) = start(&sim, &[], &[], &["web;PORT/tcp"]);
    let view = refused
        .wait_for_discovery(
            &format!("tcp-{}", ports[0]),
            "invalid",
            Duration::from_secs(10),
        )
        .expect("403 reported");
    assert!(discovery_detail(&view).contains("403"), "{view}");
    drop(refused);

    let (_from_env, ports, _dir) = start(
        &sim,
        &[],
        &[("CONSUL_HTTP_TOKEN", "s3cret")],
        &["web;PORT/tcp"],
    );
    assert!(reaches(ports[0], "a"));
    assert_eq!(landed(ports[0], 5), names(&["a"]));

    let (_from_option, ports, _dir) =
        start(&sim, &["token=s3cret", "dc=dc2"], &[], &["web;PORT/tcp"]);
    assert!(reaches(ports[0], "b"));
    assert_eq!(landed(ports[0], 5), names(&["b"]));
}

#[test]
fn fifty_services_block_side_by_side() {
    const N: usize = 50;
    let upstreams: Vec<Upstream> = (0..N).map(|i| Upstream::start(&format!("u{i}"))).collect();
    let sim = ConsulSim::start();
    for (i, upstream) in upstreams.iter().enumerate() {
        sim.register(Instance::new(
            &format!("i{i}"),
            &format!("svc{i}"),
            upstream.addr,
        ));
    }
    let descriptors: Vec<String> = (0..N).map(|i| format!("svc{i};PORT/tcp")).collect();
    let descriptors: Vec<&str> = descriptors.iter().map(String::as_str).collect();
    // A long wait: were the watches serialised, one held query would stall the rest for 30 s.
    let (_embassy, ports, _dir) = start(&sim, &["wait=30s"], &[], &descriptors);
    for (i, port) in ports.iter().enumerate() {
        assert!(reaches(*port, &format!("u{i}")), "svc{i} served");
    }

    // Every service moves to its neighbour's upstream, one after another, while the other
    // watches are all held.
    for i in (0..N).rev() {
        sim.register(Instance::new(
            &format!("i{i}"),
            &format!("svc{i}"),
            upstreams[(i + 1) % N].addr,
        ));
        assert!(
            reaches(ports[i], &format!("u{}", (i + 1) % N)),
            "svc{i} follows its change"
        );
    }
    for (i, port) in ports.iter().enumerate() {
        assert_eq!(landed(*port, 3), names(&[&format!("u{}", (i + 1) % N)]));
    }
}

#[test]
fn bad_uris_and_ca_files_are_refused_at_start() {
    // With the default balancer: start-up checks it before it opens the discovery backend.
    let plugins = plugin_dir(&[
        artifacts().library("embassy-plugin-consul"),
        artifacts().library("embassy-plugin-round-robin"),
    ]);
    let dir = tempfile::tempdir().expect("temp dir");
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "this is not a certificate\n").expect("write");
    let cases = [
        (
            "consul://127.0.0.1:0",
            String::new(),
            "the port must be a number from 1 to 65535",
        ),
        (
            "consuls://127.0.0.1:8501",
            "ca_file=/nonexistent/ca.pem".to_string(),
            "ca_file /nonexistent/ca.pem: No such file",
        ),
        (
            "consuls://127.0.0.1:8501",
            format!("ca_file={}", not_pem.display()),
            "no PEM certificate in it",
        ),
        (
            "consul://127.0.0.1:8500",
            "wait=1h".to_string(),
            "option wait=\"1h\"",
        ),
    ];
    for (uri, option, expected) in cases {
        let mut args = vec![
            "--plugin-dir".to_string(),
            plugins.path().display().to_string(),
            "--discovery".to_string(),
            uri.to_string(),
            "--service".to_string(),
            format!("web;{}/tcp", free_port()),
        ];
        if !option.is_empty() {
            args.push("--discovery-opt".into());
            args.push(option.clone());
        }
        let (code, _, stderr) = run_embassy(args);
        assert_ne!(code, 0, "{uri} {option}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{uri} {option}: want {expected:?} in:\n{stderr}"
        );
    }
}

#[test]
fn https_with_a_ca_file() {
    let a = Upstream::start("a");
    let dir = tempfile::tempdir().expect("temp dir");
    tls::TestPki::generate(dir.path()).expect("certificates");
    let sim = ConsulSim::start_tls(
        &dir.path().join("server.pem"),
        &dir.path().join("server.key"),
    );
    sim.register(Instance::new("a", "web", a.addr));
    assert!(sim.uri().starts_with("consuls://"));

    let ca = format!("ca_file={}", dir.path().join("ca.pem").display());
    let (_embassy, ports, _plugins) = start(&sim, &[&ca], &[], &["web;PORT/tcp"]);
    assert!(reaches(ports[0], "a"), "served over https");

    // Without the CA the agent's certificate is not trusted: reported, nothing served.
    let (untrusted, ports, _plugins) = start(&sim, &[], &[], &["web;PORT/tcp"]);
    let view = untrusted
        .wait_for_discovery(
            &format!("tcp-{}", ports[0]),
            "unreachable",
            Duration::from_secs(10),
        )
        .expect("untrusted certificate reported");
    assert!(discovery_detail(&view).contains("certificate"), "{view}");
    assert!(Client::connect(ports[0]).is_err());
}

/// Registrator's convention end to end: `/udp` takes the instances tagged `udp`, `/tcp` the
/// others, under one service name.
#[test]
fn udp_descriptors_take_udp_tagged_instances_and_tcp_ones_the_others() {
    let sim = ConsulSim::start();
    let tcp = Upstream::start("t");
    let udp = UdpUpstream::start("u");
    sim.register(Instance::new("dns-tcp", "dns", tcp.addr));
    sim.register(Instance::new("dns-udp", "dns", udp.addr).tags(&["udp"]));
    let (embassy, ports, _plugins) = start(&sim, &[], &[], &["dns;PORT/udp", "dns;PORT/tcp"]);
    // Each service gets its protocol's instance only.
    embassy
        .wait_for_endpoints(
            &format!("udp-{}", ports[0]),
            &[udp.addr],
            Duration::from_secs(10),
        )
        .expect("the udp instance");
    embassy
        .wait_for_endpoints(
            &format!("tcp-{}", ports[1]),
            &[tcp.addr],
            Duration::from_secs(10),
        )
        .expect("the tcp instance");
    let mut client = UdpClient::new(ports[0]).expect("udp client");
    assert_eq!(client.whoami().expect("answered over udp").upstream, "u");
    assert_eq!(landed(ports[1], 6), HashSet::from(["t".to_string()]));
}
