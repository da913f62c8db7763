//! etcd discovery, measured against a real etcd (Debian's `etcd-server`):
//!
//! - propagation: an etcd write moving a service's one instance between two upstreams, until
//!   the first new connection through the real `embassy` binary reaches the new one; p50/p99
//!   over 200 changes, timed from the write's acknowledgement and from its start;
//! - load: the plugin `.so`, loaded by the host's loader, watching a prefix of 10,000
//!   service-registrar documents, until the full set reaches the sink.
//!
//! Run: `cargo bench -p embassy-bench --bench etcd`.

use std::{
    sync::{mpsc, Mutex},
    time::{Duration, Instant},
};

use abi_stable::std_types::{RStr, RVec};
use embassy_host::plugins::PluginRegistry;
use embassy_plugin_api::{BackendHealth, Endpoint, EndpointSink, Protocol, WatchRequest};
use embassy_tests::{
    artifacts, etcd::Etcd, free_port, standard_plugin_dir, Client, Embassy, Upstream,
};

const CHANGES: usize = 200;
const INSTANCES: usize = 10_000;

fn document(port: u16, id: usize) -> String {
    serde_json::json!({
        "id": format!("{id:064x}"),
        "host": "bench",
        "ipaddress": "127.0.0.1",
        "env": {"ENVIRONMENT": "prod", "NAME": "app"},
        "tags": ["prod"],
        "name": format!("/bench_{id}"),
        "image": "bench/app",
        "hostname": format!("{id:012x}"),
        "host_port": port.to_string(),
        "proto": "tcp",
        "port": "80",
        "path": format!("/services/bench/load/80/{port}/{id:012x}"),
    })
    .to_string()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn propagation(etcd: &Etcd) {
    let upstreams = [Upstream::start("a"), Upstream::start("b")];
    let key = "/services/bench/prop/80/instance";
    etcd.put(key, &upstreams[0].addr.to_string());
    let plugins = standard_plugin_dir(&[]);
    let port = free_port();
    let mut embassy = Embassy::start([
        "--plugin-dir".to_string(),
        plugins.path().display().to_string(),
        "--discovery".to_string(),
        etcd.uri(),
        "--service".to_string(),
        format!("/services/bench/prop/80;{port}/tcp"),
    ]);
    embassy
        .wait_for_log("endpoints updated", Duration::from_secs(30))
        .expect("first set");
    let (mut from_ack, mut from_start) = (Vec::new(), Vec::new());
    for change in 1..=CHANGES {
        let target = &upstreams[change % 2];
        let start = Instant::now();
        etcd.put(key, &target.addr.to_string());
        let acked = Instant::now();
        let deadline = acked + Duration::from_secs(5);
        loop {
            if Client::connect(port).is_ok_and(|c| c.upstream == target.name) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "change {change} not routed in 5 s"
            );
        }
        from_ack.push(acked.elapsed());
        from_start.push(start.elapsed());
    }
    from_ack.sort();
    from_start.sort();
    println!(
        "etcd propagation over {CHANGES} changes (write acknowledged -> first connection routed): p50 {:?}, p99 {:?}, max {:?}",
        percentile(&from_ack, 0.5),
        percentile(&from_ack, 0.99),
        from_ack[from_ack.len() - 1],
    );
    println!(
        "etcd propagation over {CHANGES} changes (write sent -> first connection routed): p50 {:?}, p99 {:?}",
        percentile(&from_start, 0.5),
        percentile(&from_start, 0.99),
    );
}

/// Signals when a set of the expected size arrives.
struct Until {
    size: usize,
    done: Mutex<Option<mpsc::Sender<Instant>>>,
}

impl EndpointSink for Until {
    fn update(&self, endpoints: RVec<Endpoint>) {
        if endpoints.len() == self.size {
            if let Some(done) = self.done.lock().expect("sink").take() {
                let _ = done.send(Instant::now());
            }
        }
    }

    fn report(&self, _: BackendHealth, _: RStr<'_>) {}
}

fn load(etcd: &Etcd) {
    let pairs: Vec<(String, String)> = (0..INSTANCES)
        .map(|id| {
            let port = 10_000 + id as u16;
            (
                format!("/services/bench/load/80/{port}/{id:012x}"),
                document(port, id),
            )
        })
        .collect();
    let bytes: usize = pairs.iter().map(|(k, v)| k.len() + v.len()).sum();
    etcd.put_many(&pairs);
    let dir = standard_plugin_dir(&[]);
    let (registry, errors) = PluginRegistry::load_dir(dir.path()).expect("plugin dir");
    assert!(errors.is_empty(), "{errors:?}");
    let mut times = Vec::new();
    for _ in 0..5 {
        let discovery = registry
            .open_discovery(&etcd.uri(), &[])
            .expect("open etcd discovery");
        let (done, arrived) = mpsc::channel();
        let sink = Until {
            size: INSTANCES,
            done: Mutex::new(Some(done)),
        };
        let request = WatchRequest::new::<&str>("/services/bench/load/80", &[], Protocol::Tcp);
        let start = Instant::now();
        let _watch = discovery.watch(request, sink).expect("watch");
        let at = arrived
            .recv_timeout(Duration::from_secs(60))
            .expect("10,000 instances within 60 s");
        times.push(at - start);
    }
    times.sort();
    println!(
        "etcd load of {INSTANCES} instances ({:.1} MB of documents), fresh client each time, 5 runs: min {:?}, median {:?}, max {:?}",
        bytes as f64 / 1e6,
        times[0],
        times[2],
        times[4],
    );
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would too: run once either way.
    let _ = artifacts();
    let etcd = Etcd::start();
    propagation(&etcd);
    load(&etcd);
}
