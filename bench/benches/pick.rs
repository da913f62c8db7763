//! `pick` through the plugin boundary: the real `.so` files, loaded by the host's loader,
//! called through the ABI-stable trait object the connection path uses.
//!
//! Run: `cargo bench -p embassy-bench --bench pick`.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{atomic::AtomicU64, Arc},
    time::{Duration, Instant},
};

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use embassy_core::Picker;
use embassy_host::plugins::PluginRegistry;
use embassy_plugin_api::{BalancerConfig, EndpointView};
use embassy_tests::{artifacts, standard_plugin_dir};

struct Endpoints {
    _counters: Vec<Arc<AtomicU64>>,
    views: Vec<EndpointView>,
}

fn endpoints(n: usize) -> Endpoints {
    weighted_endpoints(n, |_| 1)
}

/// `n` endpoints, the `i`th of weight `weight(i)`.
fn weighted_endpoints(n: usize, weight: impl Fn(usize) -> u32) -> Endpoints {
    let counters: Vec<Arc<AtomicU64>> = (0..n)
        .map(|i| Arc::new(AtomicU64::new((i % 7) as u64 + 1)))
        .collect();
    // SAFETY: the counters live in the same struct as the views.
    let views = counters
        .iter()
        .enumerate()
        .map(|(i, c)| unsafe { EndpointView::new(Arc::as_ptr(c), weight(i), true) })
        .collect();
    Endpoints {
        _counters: counters,
        views,
    }
}

fn registry() -> PluginRegistry {
    let dir = standard_plugin_dir(&[artifacts().library("embassy-plugin-source-hash")]);
    let (registry, errors) = PluginRegistry::load_dir(dir.path()).expect("plugin dir");
    assert!(errors.is_empty(), "{errors:?}");
    registry
}

fn balancer(registry: &PluginRegistry, name: &str) -> Box<dyn Picker> {
    registry
        .new_balancer(
            name,
            BalancerConfig {
                service: "bench".into(),
                options: Default::default(),
            },
        )
        .expect("balancer")
}

/// Runs `iters` picks in a tight loop on each of `pickers.len()` threads at once and returns
/// the wall time divided by the thread count: the throughput cost of one pick.
/// The clients cycle through 1024 addresses, so an affinity balancer reads its table as
/// many clients would rather than one hot entry.
fn timed_picks(iters: u64, pickers: &[&dyn Picker], views: &[EndpointView]) -> Duration {
    let clients: Vec<SocketAddr> = (0..1024u32)
        .map(|i| SocketAddr::new(Ipv4Addr::from(0x0a00_0000 + i * 7919).into(), 40000))
        .collect();
    let clients = &clients;
    let start = Instant::now();
    std::thread::scope(|scope| {
        for picker in pickers {
            scope.spawn(move || {
                for i in 0..iters as usize {
                    let client = clients[i % clients.len()];
                    black_box(picker.pick(black_box(views), black_box(client)).ok());
                }
            });
        }
    });
    start.elapsed() / pickers.len() as u32
}

fn pick(c: &mut Criterion) {
    let registry = registry();
    let mut group = c.benchmark_group("pick");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    let native = |views: &[EndpointView]| Some(views.len() - 1);
    for n in [16usize, 1024] {
        let set = endpoints(n);
        group.bench_with_input(BenchmarkId::new("in-process-closure", n), &set, |b, set| {
            b.iter_custom(|iters| timed_picks(iters, &[&native], &set.views))
        });
        for name in ["round-robin", "least-conn", "source-hash"] {
            let balancer = balancer(&registry, name);
            // What the host does before the first pick over a set (source-hash builds its
            // table here).
            balancer
                .endpoints_changed(&set.views)
                .expect("endpoints_changed");
            group.bench_with_input(BenchmarkId::new(name, n), &set, |b, set| {
                b.iter_custom(|iters| timed_picks(iters, &[balancer.as_ref()], &set.views))
            });
        }
        // Unequal weights (1 to 4): round robin through its precomputed smooth sequence.
        let weighted = weighted_endpoints(n, |i| (i % 4) as u32 + 1);
        let balancer = balancer(&registry, "round-robin");
        balancer
            .endpoints_changed(&weighted.views)
            .expect("endpoints_changed");
        group.bench_with_input(
            BenchmarkId::new("round-robin-weighted", n),
            &weighted,
            |b, set| b.iter_custom(|iters| timed_picks(iters, &[balancer.as_ref()], &set.views)),
        );
    }
    group.finish();
}

/// Two threads picking on one shared round-robin instance versus one instance each: what
/// contention on the counter costs (the host picks per listener to stay uncontended).
fn contention(c: &mut Criterion) {
    let registry = registry();
    let set = endpoints(16);
    let mut group = c.benchmark_group("pick-2-threads");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    let shared = balancer(&registry, "round-robin");
    let (own_a, own_b) = (
        balancer(&registry, "round-robin"),
        balancer(&registry, "round-robin"),
    );
    group.bench_function("shared-instance", |b| {
        b.iter_custom(|iters| timed_picks(iters, &[shared.as_ref(), shared.as_ref()], &set.views))
    });
    group.bench_function("instance-per-thread", |b| {
        b.iter_custom(|iters| timed_picks(iters, &[own_a.as_ref(), own_b.as_ref()], &set.views))
    });
    group.finish();
}

criterion_group!(benches, pick, contention);
criterion_main!(benches);
