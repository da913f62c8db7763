//! The balancers that need contract 1.1, through the real host and real libraries:
//! `source-hash` (client affinity, consistent across a removal) and weighted `round-robin`
//! (weights from discovery), and both in a host built against contract 1.0.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use embassy_tests::{etcd::Etcd, *};
use serde_json::json;

/// 127.0.0.2 ..= 127.0.0.41: forty clients, as far as the proxy can tell.
fn clients() -> Vec<Ipv4Addr> {
    (2..=41)
        .map(|last| Ipv4Addr::new(127, 0, 0, last))
        .collect()
}

/// The upstream each client lands on, checking that three connections of one client agree.
fn placement(port: u16) -> BTreeMap<Ipv4Addr, String> {
    clients()
        .into_iter()
        .map(|client| {
            let upstreams: Vec<String> = (0..3)
                .map(|_| {
                    Client::connect_from(port, client)
                        .unwrap_or_else(|e| panic!("connect from {client}: {e:#}"))
                        .upstream
                })
                .collect();
            assert!(
                upstreams.iter().all(|u| *u == upstreams[0]),
                "{client} moved between connections: {upstreams:?}"
            );
            (client, upstreams[0].clone())
        })
        .collect()
}

#[test]
fn source_hash_keeps_each_client_on_its_upstream_across_a_removal() {
    let (a, b, c) = (
        Upstream::start("a"),
        Upstream::start("b"),
        Upstream::start("c"),
    );
    let plugins = standard_plugin_dir(&[artifacts().library("embassy-plugin-source-hash")]);
    let port = free_port();
    let args: Vec<String> = [
        "--service".to_string(),
        format!("web;{port}/tcp;balancer=source-hash"),
        "--discovery-opt".to_string(),
        "poll_interval=100ms".to_string(),
    ]
    .into();
    let services = |upstreams: &[&Upstream]| json!({ "web": upstreams.iter().map(|u| u.addr.to_string()).collect::<Vec<_>>() });
    let proxy = FileBacked::start(&services(&[&a, &b, &c]), plugins.path(), &args);
    let id = format!("tcp-{port}");
    proxy
        .embassy
        .wait_for_endpoints(&id, &[a.addr, b.addr, c.addr], Duration::from_secs(10))
        .expect("first set");

    // One client, many connections (from as many ports): one upstream.
    let from_localhost: Vec<String> = (0..10)
        .map(|_| Client::connect(port).expect("connect").upstream)
        .collect();
    assert!(
        from_localhost.iter().all(|u| *u == from_localhost[0]),
        "127.0.0.1 is one client: {from_localhost:?}"
    );

    let before = placement(port);
    let mut per_upstream: BTreeMap<&str, usize> = BTreeMap::new();
    for upstream in before.values() {
        *per_upstream.entry(upstream).or_default() += 1;
    }
    assert_eq!(
        per_upstream.len(),
        3,
        "forty clients spread over the three upstreams: {per_upstream:?}"
    );

    // a leaves: its clients go elsewhere, every other client stays put, although b and c
    // are now the first and second endpoints of the set.
    write_services(&proxy.services, &services(&[&b, &c]));
    proxy
        .embassy
        .wait_for_endpoints(&id, &[b.addr, c.addr], Duration::from_secs(5))
        .expect("the removal reaches the host");
    let after = placement(port);
    for (client, upstream) in &before {
        if upstream == "a" {
            assert_ne!(after[client], "a", "{client} still on the removed upstream");
        } else {
            assert_eq!(
                &after[client], upstream,
                "{client} moved off a remaining upstream"
            );
        }
    }
    assert!(
        proxy.embassy.log_lines("ERROR").is_empty(),
        "{:?}",
        proxy.embassy.log()
    );
}

/// Weights as SkyDNS records carry them, through the etcd plugin: 3 to 1.
#[test]
fn round_robin_follows_weights_from_discovery() {
    let (heavy, light) = (Upstream::start("heavy"), Upstream::start("light"));
    let etcd = Etcd::start();
    let prefix = "/skydns/weights";
    for (key, upstream, weight) in [("heavy", &heavy, 3), ("light", &light, 1)] {
        etcd.put(
            &format!("{prefix}/{key}"),
            &json!({"host": "127.0.0.1", "port": upstream.addr.port(), "weight": weight})
                .to_string(),
        );
    }
    let plugins = standard_plugin_dir(&[]);
    let port = free_port();
    let embassy = Embassy::start([
        "--plugin-dir".to_string(),
        plugins.path().display().to_string(),
        "--discovery".to_string(),
        etcd.uri(),
        "--service".to_string(),
        format!("{prefix};{port}/tcp"),
    ]);
    let view = embassy
        .wait_for_endpoints(
            &format!("tcp-{port}"),
            &[heavy.addr, light.addr],
            Duration::from_secs(30),
        )
        .expect("first set");
    let weight = |addr: std::net::SocketAddr| {
        view["endpoints"]
            .as_array()?
            .iter()
            .find(|e| e["address"] == addr.to_string())?["weight"]
            .as_u64()
    };
    assert_eq!(
        (weight(heavy.addr), weight(light.addr)),
        (Some(3), Some(1)),
        "the weights discovery gave: {view}"
    );
    let turns: Vec<String> = (0..40)
        .map(|_| Client::connect(port).expect("connect").upstream)
        .collect();
    let count = |name: &str| turns.iter().filter(|t| *t == name).count();
    assert_eq!((count("heavy"), count("light")), (30, 10), "{turns:?}");
    // Smooth: the light endpoint's turns are spread out, never two heavy-free turns in a row
    // and never more than three heavy ones.
    assert!(
        turns.windows(4).all(|w| w.iter().any(|t| t == "light")),
        "{turns:?}"
    );
    assert!(
        turns.windows(2).all(|w| w.iter().any(|t| t == "heavy")),
        "{turns:?}"
    );
}

/// A host built against contract 1.0 has no client address and no set-change hook: both
/// plugins rotate and say so once.
#[test]
fn in_a_1_0_host_they_rotate_and_say_so_once() {
    let a = artifacts();
    for krate in ["embassy-plugin-source-hash", "embassy-plugin-round-robin"] {
        let output = std::process::Command::new(a.v1_host())
            .arg(a.library(krate))
            .args(["balancer", "3", "6"])
            .output()
            .expect("run v1-host");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{krate}: {stderr}");
        assert_eq!(
            String::from_utf8_lossy(&output.stdout).trim(),
            "0 1 2 0 1 2",
            "{krate}"
        );
        let warnings: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("predates plugin-api 1.1"))
            .collect();
        assert_eq!(
            warnings.len(),
            1,
            "{krate}, one warning for six picks: {stderr}"
        );
        assert!(
            warnings[0].starts_with("Warn") && warnings[0].contains("falls back to its plain pick"),
            "{krate}: {}",
            warnings[0]
        );
    }
}
