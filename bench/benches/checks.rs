//! The CPU the active checkers cost: 1,000 endpoints under 1-second TCP checks (issue 15's
//! target: under 2% of one core).
//!
//! 1,000 listeners on 127.0.0.1 that never accept (the kernel completes each handshake from
//! its backlog, so no userspace server shares the figure), one `Checks` on a runtime of the
//! machine's cores, as the host runs it. The process's CPU time (getrusage, user and system)
//! is taken over an idle baseline with the listeners bound, then over the checkers' run; the
//! figure is the difference per second, as a share of one core. It includes the kernel's
//! loopback work on the checker's side (connect, reset), which a remote endpoint would cost
//! too. Bounded: a fixed run, every checker stopped at the end.

use std::{
    net::TcpListener,
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

/// User plus system CPU time of this process so far.
fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct it is given; zeroed is a valid rusage.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, &mut usage), 0);
        usage
    };
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// CPU used while `f` runs, per second of wall time.
fn cpu_share(f: impl FnOnce()) -> (f64, Duration) {
    let (cpu, wall) = (cpu_time(), Instant::now());
    f();
    let (used, elapsed) = (cpu_time() - cpu, wall.elapsed());
    (used.as_secs_f64() / elapsed.as_secs_f64(), used)
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument skips this benchmark unless it matches.
    if let Some(filter) = std::env::args().skip(1).find(|a| !a.starts_with('-')) {
        if !"checks".contains(&filter) {
            return;
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
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

    let (idle, _) = cpu_share(|| thread::sleep(BASELINE));
    let changes = Arc::new(tokio::sync::Notify::new());
    let mut statuses = Vec::new();
    let (busy, used) = cpu_share(|| {
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
        thread::sleep(RUN);
    });
    let total: u64 = statuses.iter().map(|s| s.checks()).sum();
    let failures: u64 = statuses.iter().map(|s| s.failures()).sum();
    let passing = statuses
        .iter()
        .filter(|s| s.state() == CheckState::Passing)
        .count();
    let running = checks.running();
    drop(statuses);
    let share = (busy - idle).max(0.0);
    println!(
        "checks: {ENDPOINTS} endpoints, tcp every {INTERVAL:?} for {RUN:?}, {} runtime threads",
        runtime.metrics().num_workers()
    );
    println!(
        "checks: {total} checks ({:.0}/s), {failures} failed, {passing}/{ENDPOINTS} passing, {running} checkers",
        total as f64 / RUN.as_secs_f64()
    );
    println!(
        "checks: CPU {:.2}% of one core ({:.2}% with the idle baseline of {:.3}%), {:.1} µs per check",
        share * 100.0,
        busy * 100.0,
        idle * 100.0,
        (used.as_secs_f64() - idle * RUN.as_secs_f64()).max(0.0) * 1e6 / total.max(1) as f64
    );
    assert_eq!(failures, 0, "a check of a bound listener failed");
}
