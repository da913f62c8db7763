//! Datagrams through Embassy against the same datagrams sent directly, on loopback.
//!
//! Each client thread does request/response round trips (one datagram each way, the next
//! sent when the answer is back) against a UDP echo upstream, either directly or through the
//! real `embassy` binary with the standard plugins. Reported: round trips per second over all
//! clients (each is two datagrams through the proxy), and the median and p99 round trip.
//! Counts are fixed, so a run is bounded; a datagram unanswered within a second is counted
//! as lost rather than waited for. Each figure is the median of three alternated runs.

use std::{
    net::{SocketAddr, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use embassy_tests::{free_port, service_arg, standard_plugin_dir, FileBacked, UdpUpstream};
use serde_json::json;

/// (client threads, payload bytes, round trips per client)
const CASES: &[(usize, usize, usize)] = &[
    (1, 64, 20_000),
    (4, 64, 20_000),
    (4, 1_400, 10_000),
    (1, 65_507, 2_000),
];
const WARM_UP: usize = 200;
const REPEATS: usize = 3;

struct Outcome {
    round_trips: usize,
    lost: usize,
    elapsed: Duration,
    /// Sorted round-trip times of answered datagrams.
    rtts: Vec<Duration>,
}

impl Outcome {
    fn rate(&self) -> f64 {
        self.round_trips as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> Duration {
        if self.rtts.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((self.rtts.len() - 1) as f64 * p).round() as usize;
        self.rtts[rank]
    }
}

/// One client: `count` round trips of `size` bytes to `target`.
fn client(target: SocketAddr, size: usize, count: usize) -> (Vec<Duration>, usize, Duration) {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind client");
    socket.connect(target).expect("connect");
    socket
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    let payload = vec![0x5a_u8; size];
    let mut answer = vec![0u8; 65_536];
    let mut rtts = Vec::with_capacity(count);
    let mut lost = 0;
    let mut round_trip = |record: bool, rtts: &mut Vec<Duration>, lost: &mut usize| {
        let sent = Instant::now();
        socket.send(&payload).expect("send");
        match socket.recv(&mut answer) {
            Ok(len) if len == size => {
                if record {
                    rtts.push(sent.elapsed());
                }
            }
            _ => *lost += 1,
        }
    };
    for _ in 0..WARM_UP {
        round_trip(false, &mut rtts, &mut lost);
    }
    lost = 0;
    let start = Instant::now();
    for _ in 0..count {
        round_trip(true, &mut rtts, &mut lost);
    }
    (rtts, lost, start.elapsed())
}

fn run(target: SocketAddr, clients: usize, size: usize, count: usize) -> Outcome {
    let threads: Vec<_> = (0..clients)
        .map(|_| thread::spawn(move || client(target, size, count)))
        .collect();
    let mut outcome = Outcome {
        round_trips: 0,
        lost: 0,
        elapsed: Duration::ZERO,
        rtts: Vec::with_capacity(clients * count),
    };
    for thread in threads {
        let (rtts, lost, elapsed) = thread.join().expect("client thread");
        outcome.round_trips += rtts.len();
        outcome.lost += lost;
        outcome.elapsed = outcome.elapsed.max(elapsed);
        outcome.rtts.extend(rtts);
    }
    outcome.rtts.sort_unstable();
    outcome
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument skips this benchmark unless it matches.
    if let Some(filter) = std::env::args().skip(1).find(|a| !a.starts_with('-')) {
        if !"udp".contains(&filter) {
            return;
        }
    }
    let upstream = UdpUpstream::start("bench");
    let plugins = standard_plugin_dir(&[]);
    let port = free_port();
    let _embassy = FileBacked::start(
        &json!({ "dns": [{ "address": upstream.addr.to_string(), "proto": "udp" }] }),
        plugins.path(),
        &service_arg(format!("dns;{port}/udp")),
    );
    let proxy: SocketAddr = ([127, 0, 0, 1], port).into();

    println!(
        "{:<8} {:>7} {:>7} {:>14} {:>10} {:>10} {:>6}",
        "path", "clients", "bytes", "round trips/s", "p50", "p99", "lost"
    );
    for &(clients, size, count) in CASES {
        // Alternated and repeated, reporting each path's median run: the machine may be
        // shared, and a burst of other work should not land on one path only.
        let mut runs: [Vec<Outcome>; 2] = [Vec::new(), Vec::new()];
        for _ in 0..REPEATS {
            for (path, target) in [upstream.addr, proxy].into_iter().enumerate() {
                runs[path].push(run(target, clients, size, count));
            }
        }
        for (name, mut outcomes) in ["direct", "embassy"].into_iter().zip(runs) {
            outcomes.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
            let median = &outcomes[outcomes.len() / 2];
            println!(
                "{:<8} {:>7} {:>7} {:>14.0} {:>10.1?} {:>10.1?} {:>6}",
                name,
                clients,
                size,
                median.rate(),
                median.percentile(0.50),
                median.percentile(0.99),
                median.lost
            );
        }
    }
}
