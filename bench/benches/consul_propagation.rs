//! Consul propagation latency: from a change in the (simulated) agent to the first new
//! connection through the real `embassy` that lands on the new endpoint set.
//!
//! Each round waits a little, moves one service's only instance to the other upstream (a
//! health flip takes the same path), then connects in a tight loop until the greeting names
//! the new upstream. Reported as p50/p99 over the rounds; the goal is under 100 ms.
//!
//! Run: `cargo bench -p embassy-bench --bench consul_propagation`.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use embassy_tests::{
    artifacts,
    consul_sim::{ConsulSim, Instance},
    free_port, plugin_dir, Client, Embassy, Upstream,
};

const ROUNDS: usize = 200;
const PAUSE: Duration = Duration::from_millis(120);

fn main() {
    let upstreams = [Upstream::start("a"), Upstream::start("b")];
    for services in [1, 50] {
        let latencies = scenario(services, &upstreams);
        report(services, latencies);
    }
}

/// `services` watched at once; each round changes one of them (in turn).
fn scenario(services: usize, upstreams: &[Upstream; 2]) -> Vec<Duration> {
    let sim = ConsulSim::start();
    let register = |service: usize, to: SocketAddr| {
        sim.register(Instance::new(
            &format!("i{service}"),
            &format!("svc{service}"),
            to,
        ));
    };
    for service in 0..services {
        register(service, upstreams[0].addr);
    }
    let plugins = plugin_dir(&[
        artifacts().library("embassy-plugin-round-robin"),
        artifacts().library("embassy-plugin-consul"),
    ]);
    let mut args = vec![
        "--plugin-dir".to_string(),
        plugins.path().display().to_string(),
        "--discovery".to_string(),
        sim.uri(),
    ];
    let mut ports: Vec<u16> = Vec::new();
    for service in 0..services {
        let port = std::iter::repeat_with(free_port)
            .find(|p| !ports.contains(p))
            .expect("free port");
        ports.push(port);
        args.push("--service".into());
        args.push(format!("svc{service};{port}/tcp"));
    }
    let embassy = Embassy::start(args);
    let deadline = Instant::now() + Duration::from_secs(30);
    while embassy.log_lines("listening").len() < services {
        assert!(Instant::now() < deadline, "embassy did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    for port in &ports {
        wait_for(*port, "a", Duration::from_secs(10)).expect("initial set served");
    }

    let mut on_b = vec![false; services];
    let mut latencies = Vec::with_capacity(ROUNDS);
    for round in 0..ROUNDS {
        let service = round % services;
        let (to, name) = if on_b[service] {
            (upstreams[0].addr, "a")
        } else {
            (upstreams[1].addr, "b")
        };
        on_b[service] = !on_b[service];
        // Isolated changes: a watch starts queries at most every `min_interval` (100 ms), so
        // changes to one service closer together than that wait for it by design.
        std::thread::sleep(PAUSE);
        let changed = Instant::now();
        register(service, to);
        let seen = wait_for(ports[service], name, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("round {round}: svc{service} never reached {name}"));
        latencies.push(seen - changed);
    }
    latencies
}

/// Connects until the greeting is `name`: the moment it was seen, or `None` past `timeout`.
fn wait_for(port: u16, name: &str, timeout: Duration) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if Client::connect(port).is_ok_and(|c| c.upstream == name) {
            return Some(Instant::now());
        }
    }
    None
}

fn report(services: usize, mut latencies: Vec<Duration>) {
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    println!(
        "consul propagation, {services} watched service(s), {} rounds: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        latencies.len(),
        at(0.50).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        at(1.0).as_secs_f64() * 1e3,
    );
}
