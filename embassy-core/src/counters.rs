//! Traffic counters, read by the host's metrics and admin API.
//!
//! Each is a relaxed atomic added to where the event already happens: once per connection or
//! connect attempt, once per read or splice chunk (never per byte). Endpoint counters sit
//! beside the live-connection counter and are carried across snapshots with it, so a new set
//! from discovery does not reset an endpoint's totals.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

/// Adds `n` to a counter.
#[inline]
pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Reads a counter.
#[inline]
pub fn read(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// Bytes moved by a connection (or datagrams' payload), each way.
#[derive(Debug, Default)]
pub struct ByteCounters {
    /// Client → upstream.
    pub sent: AtomicU64,
    /// Upstream → client.
    pub received: AtomicU64,
}

/// Why a connect attempt to an endpoint failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    /// The endpoint answered with a reset: nothing listens there.
    Refused,
    /// No answer within the connect timeout.
    Timeout,
    /// Anything else: unreachable network, a name that does not resolve, out of descriptors.
    Error,
}

impl ConnectFailure {
    pub const ALL: [ConnectFailure; 3] = [
        ConnectFailure::Refused,
        ConnectFailure::Timeout,
        ConnectFailure::Error,
    ];

    pub fn of(error: &std::io::Error) -> ConnectFailure {
        match error.kind() {
            std::io::ErrorKind::ConnectionRefused => ConnectFailure::Refused,
            std::io::ErrorKind::TimedOut => ConnectFailure::Timeout,
            _ => ConnectFailure::Error,
        }
    }

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectFailure::Refused => "connect_refused",
            ConnectFailure::Timeout => "connect_timeout",
            ConnectFailure::Error => "connect_error",
        }
    }
}

/// Upper bounds of the connect-latency buckets, in seconds: loopback and same-host
/// connects take tens of microseconds, a cross-zone one milliseconds, a struggling one seconds.
pub const CONNECT_BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
    3.0,
];

/// A fixed-bucket latency histogram: one atomic per bucket and one for the sum.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Observations per bucket (not cumulative); the last one is above every bound.
    buckets: [AtomicU64; CONNECT_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl LatencyHistogram {
    #[inline]
    pub fn observe(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        let bucket = CONNECT_BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(CONNECT_BUCKETS.len());
        add(&self.buckets[bucket], 1);
        add(
            &self.sum_nanos,
            u64::try_from(took.as_nanos()).unwrap_or(u64::MAX),
        );
    }

    /// `(sum in seconds, count, observations per bucket by upper bound)`, `+Inf` last (not
    /// cumulative: the exposition encoder adds them up).
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let buckets: Vec<(f64, u64)> = self
            .buckets
            .iter()
            .enumerate()
            .map(|(index, count)| {
                let bound = CONNECT_BUCKETS.get(index).copied().unwrap_or(f64::INFINITY);
                (bound, read(count))
            })
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = read(&self.sum_nanos) as f64 / 1e9;
        (sum, count, buckets)
    }
}

/// What one endpoint has done, across snapshots.
#[derive(Debug, Default)]
pub struct EndpointCounters {
    /// Connections established (TCP) or sessions opened (UDP).
    pub connections: AtomicU64,
    /// Failed connect attempts, by [`ConnectFailure`] in [`ConnectFailure::ALL`] order.
    connect_failures: [AtomicU64; 3],
    pub bytes: ByteCounters,
    /// UDP datagrams client → endpoint.
    pub datagrams_sent: AtomicU64,
    /// UDP datagrams endpoint → client.
    pub datagrams_received: AtomicU64,
    /// Time to establish each successful TCP connection.
    pub connect_latency: LatencyHistogram,
}

impl EndpointCounters {
    #[inline]
    pub fn connect_failed(&self, failure: ConnectFailure) {
        add(&self.connect_failures[failure as usize], 1);
    }

    pub fn connect_failures(&self, failure: ConnectFailure) -> u64 {
        read(&self.connect_failures[failure as usize])
    }
}

/// Why a service could not serve a client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceFailure {
    /// No endpoint appeared within the queue timeout.
    NoEndpoint,
    /// The balancer returned an error or an index out of range.
    BalancerError,
    /// Every endpoint tried failed; the last attempt's reason.
    Connect(ConnectFailure),
}

impl ServiceFailure {
    pub const ALL: [ServiceFailure; 5] = [
        ServiceFailure::NoEndpoint,
        ServiceFailure::BalancerError,
        ServiceFailure::Connect(ConnectFailure::Refused),
        ServiceFailure::Connect(ConnectFailure::Timeout),
        ServiceFailure::Connect(ConnectFailure::Error),
    ];

    fn index(self) -> usize {
        match self {
            ServiceFailure::NoEndpoint => 0,
            ServiceFailure::BalancerError => 1,
            ServiceFailure::Connect(failure) => 2 + failure as usize,
        }
    }

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceFailure::NoEndpoint => "no_endpoint",
            ServiceFailure::BalancerError => "balancer_error",
            ServiceFailure::Connect(failure) => failure.as_str(),
        }
    }
}

/// What one service (listener) has done.
#[derive(Debug, Default)]
pub struct ServiceCounters {
    /// Client connections accepted (TCP) or sessions asked for (UDP: a new client address).
    pub accepted: AtomicU64,
    failed: [AtomicU64; 5],
    /// UDP datagrams from clients dropped before reaching an endpoint: no endpoint, a session
    /// still opening, a full send buffer.
    pub datagrams_dropped: AtomicU64,
}

impl ServiceCounters {
    #[inline]
    pub fn failed(&self, failure: ServiceFailure) {
        add(&self.failed[failure.index()], 1);
    }

    pub fn failures(&self, failure: ServiceFailure) -> u64 {
        read(&self.failed[failure.index()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_counts_each_observation_in_its_bucket() {
        let histogram = LatencyHistogram::default();
        histogram.observe(Duration::from_micros(30)); // first bucket
        histogram.observe(Duration::from_micros(100)); // on a bound: that bucket
        histogram.observe(Duration::from_millis(2));
        histogram.observe(Duration::from_secs(10)); // above every bound
        let (sum, count, buckets) = histogram.snapshot();
        assert_eq!(count, 4);
        assert!((sum - 10.002_13).abs() < 1e-9, "{sum}");
        let at = |bound: f64| buckets.iter().find(|(b, _)| *b == bound).map(|(_, c)| *c);
        assert_eq!(at(0.000_05), Some(1));
        assert_eq!(at(0.000_1), Some(1));
        assert_eq!(at(0.001), Some(0));
        assert_eq!(at(0.002_5), Some(1));
        assert_eq!(at(3.0), Some(0));
        assert_eq!(buckets.last(), Some(&(f64::INFINITY, 1)));
        assert_eq!(buckets.len(), CONNECT_BUCKETS.len() + 1);
    }

    #[test]
    fn failures_are_counted_by_reason() {
        let service = ServiceCounters::default();
        service.failed(ServiceFailure::Connect(ConnectFailure::Timeout));
        service.failed(ServiceFailure::Connect(ConnectFailure::Timeout));
        service.failed(ServiceFailure::NoEndpoint);
        let counts: Vec<(&str, u64)> = ServiceFailure::ALL
            .iter()
            .map(|f| (f.as_str(), service.failures(*f)))
            .collect();
        assert_eq!(
            counts,
            vec![
                ("no_endpoint", 1),
                ("balancer_error", 0),
                ("connect_refused", 0),
                ("connect_timeout", 2),
                ("connect_error", 0)
            ]
        );
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(ConnectFailure::of(&refused), ConnectFailure::Refused);
        let other = std::io::Error::from(std::io::ErrorKind::AddrNotAvailable);
        assert_eq!(ConnectFailure::of(&other), ConnectFailure::Error);
    }
}
