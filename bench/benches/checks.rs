//! The CPU the active checkers cost: 1,000 endpoints under 1-second TCP checks (issue 15's
//! target: under 2% of one core).
//!
//! 1,000 listeners on 127.0.0.1 that never accept (the kernel completes each handshake from
//! its backlog, so no userspace server shares the figure), one `Checks` on the host's runtime
//! (one worker per core unless EMBASSY_BENCH_THREADS says otherwise). The process's CPU time (getrusage, user and system)
//! is taken over an idle baseline with the listeners bound, then over the checkers' run; the
//! figure is the difference per second, as a share of one core. It includes the kernel's
//! loopback work on the checker's side (connect, reset), which a remote endpoint would cost
//! too. Bounded: a fixed run, every checker stopped at the end.

use std::{
    net::{SocketAddr, TcpListener},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use embassy_core::{
    check::{CheckKey, CheckParams, CheckSpec, CheckState, Checks},
    endpoints::UpstreamAddr,
};

const ENDPOINTS: usize = 1_000;
const INTERVAL: Duration = Duration::from_secs(1);
const BASELINE: Duration = Duration::from_secs(5);
const RUN: Duration = Duration::from_secs(20);

/// User and system CPU time of this process so far.
fn cpu_time() -> (Duration, Duration) {
    // SAFETY: getrusage fills the struct it is given; zeroed is a valid rusage.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, &mut usage), 0);
        usage
    };
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    (time(usage.ru_utime), time(usage.ru_stime))
}

/// Shares of one core (user, system) used while `f` runs.
fn cpu_share(f: impl FnOnce()) -> (f64, f64) {
    let ((user, system), wall) = (cpu_time(), Instant::now());
    f();
    let ((user_after, system_after), elapsed) = (cpu_time(), wall.elapsed().as_secs_f64());
    (
        (user_after - user).as_secs_f64() / elapsed,
        (system_after - system).as_secs_f64() / elapsed,
    )
}

/// The kernel's floor: what the same connects cost with no runtime at all. One thread
/// connects to each address in turn at the checkers' rate (blocking: on loopback the
/// handshake completes inside `connect`), closing with a reset as a check does, for `run`.
fn bare_connects(addrs: &[SocketAddr], run: Duration) {
    let start = Instant::now();
    let per_batch = Duration::from_millis(10);
    let batch = (addrs.len() as u128 * per_batch.as_nanos() / INTERVAL.as_nanos()).max(1) as usize;
    let (mut next, mut at) = (start, 0);
    while start.elapsed() < run {
        for _ in 0..batch {
            let stream = std::net::TcpStream::connect(addrs[at]).expect("bare connect");
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            at = (at + 1) % addrs.len();
        }
        next += per_batch;
        thread::sleep(next.saturating_duration_since(Instant::now()));
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument skips this benchmark unless it matches.
    if let Some(filter) = std::env::args().skip(1).find(|a| !a.starts_with('-')) {
        if !"checks".contains(&filter) {
            return;
        }
    }
    // The host's own runtime: `--threads` (here EMBASSY_BENCH_THREADS), 0 for one per core.
    let threads = std::env::var("EMBASSY_BENCH_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let runtime = embassy_host::run::runtime(threads).expect("runtime");
    let listeners: Vec<TcpListener> = (0..ENDPOINTS)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind listener"))
        .collect();
    let checks = Checks::new(Some(runtime.handle().clone()));
    let params = CheckParams {
        interval: INTERVAL,
        timeout: Duration::from_secs(1),
        rise: 2,
        fall: 3,
    };

    // Slept in `block_on`, so a single-threaded runtime is driven too.
    let (idle_user, idle_system) =
        cpu_share(|| runtime.block_on(async { tokio::time::sleep(BASELINE).await }));
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .map(|l| l.local_addr().expect("addr"))
        .collect();
    let (floor_user, floor_system) = cpu_share(|| bare_connects(&addrs, BASELINE));
    let changes = Arc::new(tokio::sync::Notify::new());
    let mut statuses = Vec::new();
    let (user, system) = cpu_share(|| {
        statuses = listeners
            .iter()
            .map(|listener| {
                let key = CheckKey {
                    addr: UpstreamAddr::Socket(listener.local_addr().expect("addr")),
                    spec: CheckSpec::Tcp,
                    params,
                };
                checks.subscribe(key, Arc::downgrade(&changes))
            })
            .collect();
        runtime.block_on(async { tokio::time::sleep(RUN).await });
    });
    let total: u64 = statuses.iter().map(|s| s.checks()).sum();
    let failures: u64 = statuses.iter().map(|s| s.failures()).sum();
    let passing = statuses
        .iter()
        .filter(|s| s.state() == CheckState::Passing)
        .count();
    let running = checks.running();
    drop(statuses);
    let (user, system) = ((user - idle_user).max(0.0), (system - idle_system).max(0.0));
    let share = user + system;
    let (floor_user, floor_system) = (
        (floor_user - idle_user).max(0.0),
        (floor_system - idle_system).max(0.0),
    );
    println!(
        "checks: {ENDPOINTS} endpoints, tcp every {INTERVAL:?} for {RUN:?}, {} runtime threads",
        runtime.metrics().num_workers().max(1)
    );
    println!(
        "checks: {total} checks ({:.0}/s), {failures} failed, {passing}/{ENDPOINTS} passing, {running} checkers",
        total as f64 / RUN.as_secs_f64()
    );
    println!(
        "checks: CPU {:.2}% of one core (user {:.2}%, system {:.2}%; idle baseline {:.3}% subtracted), {:.1} µs per check",
        share * 100.0,
        user * 100.0,
        system * 100.0,
        (idle_user + idle_system) * 100.0,
        share * RUN.as_secs_f64() * 1e6 / total.max(1) as f64
    );
    println!(
        "checks: the kernel's floor, the same connects from one plain thread: {:.2}% (user {:.2}%, system {:.2}%); the checkers add {:.2}%",
        (floor_user + floor_system) * 100.0,
        floor_user * 100.0,
        floor_system * 100.0,
        (share - floor_user - floor_system).max(0.0) * 100.0
    );
    assert_eq!(failures, 0, "a check of a bound listener failed");
}
