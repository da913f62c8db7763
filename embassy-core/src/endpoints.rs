//! The endpoint table: an immutable snapshot per service, swapped whole on every update.
//!
//! Readers on the connection path `load` the current snapshot without locking. Each endpoint's
//! live-connection counter lives outside the snapshot and is carried over by address, so a
//! balancer keeps seeing the load of connections opened under an older snapshot; so are its
//! [`Health`], so a failing endpoint is reported once per state change across updates, and its
//! traffic [`EndpointCounters`], so totals survive updates.

use std::{
    collections::HashMap,
    fmt::Display,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use embassy_plugin_api::{Endpoint, EndpointView, Excluded};

use crate::counters::EndpointCounters;
use tokio::sync::{futures::Notified, Notify};
use tracing::{info, warn};

/// Where an upstream lives: an address ready to connect, or a name resolved at connect time.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum UpstreamAddr {
    Socket(SocketAddr),
    Named(String),
}

impl UpstreamAddr {
    /// Reads `host:port` (`[v6]:port` for IPv6).
    pub fn parse(text: &str) -> Option<UpstreamAddr> {
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Some(UpstreamAddr::Socket(addr));
        }
        let (host, port) = text.rsplit_once(':')?;
        let valid_host = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        (valid_host && port.parse::<u16>().is_ok_and(|p| p > 0))
            .then(|| UpstreamAddr::Named(text.to_string()))
    }
}

impl std::fmt::Display for UpstreamAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamAddr::Socket(addr) => addr.fmt(f),
            UpstreamAddr::Named(name) => f.write_str(name),
        }
    }
}

/// One endpoint of a snapshot.
#[derive(Debug)]
pub struct Upstream {
    pub addr: UpstreamAddr,
    /// Live connections to this address, shared across snapshots.
    pub active: Arc<AtomicU64>,
    /// Connect failures of this address, shared across snapshots.
    pub health: Arc<Health>,
    /// Its traffic totals, shared across snapshots.
    pub counters: Arc<EndpointCounters>,
}

/// While an endpoint keeps failing, one summary line per this period at most.
pub const FAILURE_SUMMARY_PERIOD: Duration = Duration::from_secs(10);

/// An endpoint's connect failures, logged per state change: the first failure (with its
/// error), a summary at most every [`FAILURE_SUMMARY_PERIOD`] while it keeps failing, and
/// recovery with the count. Atomics only; a success costs one load.
#[derive(Debug, Default)]
pub struct Health {
    /// Failures since the last success; 0 while healthy.
    failing: AtomicU64,
    /// When the last line about this endpoint was logged, in seconds of [`coarse_seconds`].
    reported: AtomicU64,
}

impl Health {
    #[inline]
    pub fn succeeded(&self, addr: &UpstreamAddr) {
        if self.failing.load(Ordering::Relaxed) != 0 {
            let failures = self.failing.swap(0, Ordering::AcqRel);
            if failures > 0 {
                info!(upstream = %addr, failures, "endpoint reachable again");
            }
        }
    }

    /// A connect attempt failed; `reason` is its metrics label (`connect_refused`...).
    pub fn failed(&self, addr: &UpstreamAddr, reason: &'static str, error: &dyn Display) {
        let failures = self.failing.fetch_add(1, Ordering::AcqRel) + 1;
        let now = coarse_seconds();
        if failures == 1 {
            self.reported.store(now, Ordering::Relaxed);
            warn!(%error, upstream = %addr, reason, "connect failed; further failures of this endpoint are counted until it answers again");
            return;
        }
        let reported = self.reported.load(Ordering::Relaxed);
        if now >= reported + FAILURE_SUMMARY_PERIOD.as_secs()
            && self
                .reported
                .compare_exchange(reported, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            warn!(%error, upstream = %addr, reason, failures, "endpoint still failing");
        }
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u64 {
        self.failing.load(Ordering::Relaxed)
    }
}

/// Seconds since the first call: a clock for the failure path only.
fn coarse_seconds() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs()
}

/// An immutable snapshot of a service's endpoints, with the views balancers pick over.
#[derive(Debug, Default)]
pub struct EndpointSet {
    upstreams: Vec<Upstream>,
    // Views point into `upstreams[i].active`; both live and die with this snapshot.
    views: Vec<EndpointView>,
    /// What discovery left out of this set, and why (empty from a 1.0 plugin).
    excluded: Vec<Excluded>,
}

impl EndpointSet {
    pub fn len(&self) -> usize {
        self.upstreams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.upstreams.is_empty()
    }

    pub fn upstreams(&self) -> &[Upstream] {
        &self.upstreams
    }

    /// What balancers see: one view per upstream, same order.
    pub fn views(&self) -> &[EndpointView] {
        &self.views
    }

    /// The instances discovery left out of this set, and why.
    pub fn excluded(&self) -> &[Excluded] {
        &self.excluded
    }
}

/// The result of applying a full set: what changed, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SetChange {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Addresses that could not be parsed and were left out.
    pub rejected: Vec<String>,
}

impl SetChange {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.rejected.is_empty()
    }
}

/// A service's current endpoints: the snapshot plus the counters carried across snapshots.
#[derive(Debug, Default)]
pub struct ServiceEndpoints {
    current: ArcSwap<EndpointSet>,
    /// Touched only when a new set arrives, never on the connection path.
    counters: Mutex<HashMap<String, Carried>>,
    /// Woken by every [`replace`](Self::replace), for connections waiting for an endpoint.
    changed: Notify,
}

/// What an address keeps across snapshots.
#[derive(Debug, Clone)]
struct Carried {
    active: Arc<AtomicU64>,
    health: Arc<Health>,
    counters: Arc<EndpointCounters>,
}

impl ServiceEndpoints {
    /// The current snapshot; holding it keeps its counters alive.
    #[inline]
    pub fn load(&self) -> Arc<EndpointSet> {
        self.current.load_full()
    }

    /// Whether `set` is still the current snapshot: cheaper than [`load`](Self::load), as it
    /// touches no reference count, so the datagram path can ask it per datagram.
    #[inline]
    pub fn is_current(&self, set: &Arc<EndpointSet>) -> bool {
        Arc::ptr_eq(&self.current.load(), set)
    }

    /// Completes at the next [`replace`](Self::replace) after it is enabled or first polled
    /// (the waiting path only: it takes a lock).
    pub fn changed(&self) -> Notified<'_> {
        self.changed.notified()
    }

    /// Replaces the whole set, with nothing said about what was left out.
    pub fn replace(&self, endpoints: &[Endpoint]) -> SetChange {
        self.replace_explained(endpoints, Vec::new(), |_| {})
    }

    /// Replaces the whole set. Start-up and every later update come through here. `prepare`
    /// sees the new views before any reader can load them (the balancer's set-change hook).
    pub fn replace_explained(
        &self,
        endpoints: &[Endpoint],
        excluded: Vec<Excluded>,
        prepare: impl FnOnce(&[EndpointView]),
    ) -> SetChange {
        let mut counters = self
            .counters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut change = SetChange::default();
        let mut upstreams = Vec::with_capacity(endpoints.len());
        let mut weights = Vec::with_capacity(endpoints.len());
        let mut next_counters = HashMap::with_capacity(endpoints.len());
        for endpoint in endpoints {
            let address = endpoint.address.as_str();
            let Some(addr) = UpstreamAddr::parse(address) else {
                change.rejected.push(address.to_string());
                continue;
            };
            if next_counters.contains_key(address) {
                continue; // the same instance listed twice would skew balancing
            }
            let carried = match counters.get(address) {
                Some(carried) => carried.clone(),
                None => {
                    change.added.push(address.to_string());
                    Carried {
                        active: Arc::new(AtomicU64::new(0)),
                        health: Arc::default(),
                        counters: Arc::default(),
                    }
                }
            };
            next_counters.insert(address.to_string(), carried.clone());
            upstreams.push(Upstream {
                addr,
                active: carried.active,
                health: carried.health,
                counters: carried.counters,
            });
            weights.push(endpoint.weight.max(1));
        }
        change.removed = counters
            .keys()
            .filter(|address| !next_counters.contains_key(*address))
            .cloned()
            .collect();
        change.removed.sort();
        *counters = next_counters;
        let views = upstreams
            .iter()
            .zip(weights)
            // SAFETY: each view points into an `Arc` owned by the same `EndpointSet`.
            .map(|(upstream, weight)| unsafe {
                EndpointView::new(Arc::as_ptr(&upstream.active), weight, true)
            })
            .collect();
        let set = EndpointSet {
            upstreams,
            views,
            excluded,
        };
        prepare(set.views());
        self.current.store(Arc::new(set));
        self.changed.notify_waiters();
        change
    }
}

/// Counts one connection against an upstream for as long as it lives.
#[derive(Debug)]
pub struct ActiveGuard(Arc<AtomicU64>);

impl ActiveGuard {
    pub fn new(counter: &Arc<AtomicU64>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(Arc::clone(counter))
    }
}

impl ActiveGuard {
    /// Whether this guard counts against `counter`: tells whether an endpoint of a later
    /// snapshot is the same one (counters are carried over by address).
    #[inline]
    pub fn counts(&self, counter: &Arc<AtomicU64>) -> bool {
        Arc::ptr_eq(&self.0, counter)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(addresses: &[&str]) -> Vec<Endpoint> {
        addresses.iter().map(|a| Endpoint::new(*a)).collect()
    }

    #[test]
    fn counters_survive_a_new_snapshot() {
        let service = ServiceEndpoints::default();
        service.replace(&endpoints(&["127.0.0.1:1", "127.0.0.1:2"]));
        let old = service.load();
        let _guard = ActiveGuard::new(&old.upstreams()[1].active);
        let change = service.replace(&endpoints(&["127.0.0.1:2", "127.0.0.1:3"]));
        assert_eq!(change.added, vec!["127.0.0.1:3"]);
        assert_eq!(change.removed, vec!["127.0.0.1:1"]);
        let new = service.load();
        assert_eq!(
            new.views()[0].active_connections(),
            1,
            "127.0.0.1:2 keeps its count"
        );
        assert_eq!(new.views()[1].active_connections(), 0);
        drop(_guard);
        assert_eq!(new.views()[0].active_connections(), 0);
    }

    #[test]
    fn health_is_carried_across_snapshots() {
        let service = ServiceEndpoints::default();
        service.replace(&endpoints(&["127.0.0.1:1"]));
        let old = service.load();
        let addr = &old.upstreams()[0].addr;
        old.upstreams()[0]
            .health
            .failed(addr, "connect_refused", &"refused");
        old.upstreams()[0]
            .health
            .failed(addr, "connect_refused", &"refused");
        service.replace(&endpoints(&["127.0.0.1:1", "127.0.0.1:2"]));
        let new = service.load();
        assert_eq!(new.upstreams()[0].health.failures(), 2, "kept by address");
        assert_eq!(new.upstreams()[1].health.failures(), 0);
        new.upstreams()[0].health.succeeded(addr);
        assert_eq!(
            old.upstreams()[0].health.failures(),
            0,
            "one state per address"
        );
    }

    #[tokio::test]
    async fn replace_wakes_waiters() {
        let service = ServiceEndpoints::default();
        let changed = service.changed();
        let mut changed = std::pin::pin!(changed);
        changed.as_mut().enable();
        service.replace(&endpoints(&["127.0.0.1:1"]));
        tokio::time::timeout(Duration::from_secs(5), changed)
            .await
            .expect("woken by replace");
    }

    #[test]
    fn bad_addresses_are_rejected_and_duplicates_collapsed() {
        let service = ServiceEndpoints::default();
        let change = service.replace(&endpoints(&[
            "127.0.0.1:1",
            "nonsense",
            "127.0.0.1:1",
            "db.local:5432",
            "[::1]:80",
            "x:0",
        ]));
        assert_eq!(change.rejected, vec!["nonsense", "x:0"]);
        let set = service.load();
        let addrs: Vec<String> = set.upstreams().iter().map(|u| u.addr.to_string()).collect();
        assert_eq!(addrs, vec!["127.0.0.1:1", "db.local:5432", "[::1]:80"]);
    }
}
