//! The endpoint table: an immutable snapshot per service, swapped whole on every update.
//!
//! Readers on the connection path `load` the current snapshot without locking. Each endpoint's
//! live-connection counter lives outside the snapshot and is carried over by address, so a
//! balancer keeps seeing the load of connections opened under an older snapshot; so are its
//! [`Health`], so failures count across updates, its traffic [`EndpointCounters`], so totals
//! survive updates, and its ejection, hold-down or drain. The snapshot holds what is in
//! rotation (what balancers see) apart from what is known but out, each with its
//! [`EndpointState`]; every change, from discovery or health, is one rebuild.

use std::{
    collections::{HashMap, HashSet},
    fmt::Display,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use embassy_plugin_api::{Endpoint, EndpointView, Excluded};

pub use crate::health::Health;
use crate::{
    check::{CheckKey, CheckState, CheckStatus, Checks},
    copy::Cut,
    counters::EndpointCounters,
    health::{At, EndpointState, HealthPolicy, OnRemove, Operator},
};
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
    pub weight: u32,
    /// Live connections to this address, shared across snapshots.
    pub active: Arc<AtomicU64>,
    /// Its connect results, shared across snapshots.
    pub health: Arc<Health>,
    /// Its traffic totals, shared across snapshots.
    pub counters: Arc<EndpointCounters>,
    /// Resets this endpoint's connections: on removal (`on_remove`), and through its parent,
    /// the service's signal, at the end of a graceful stop.
    pub cut: Arc<Cut>,
    /// Why it is in or out of rotation, as of this snapshot.
    pub state: EndpointState,
    /// Its active check, if the service declares one (shared with other services).
    pub check: Option<Arc<CheckStatus>>,
}

/// An immutable snapshot of a service's endpoints, with the views balancers pick over.
#[derive(Debug, Default)]
pub struct EndpointSet {
    /// In rotation: what the balancer picks from.
    upstreams: Vec<Upstream>,
    // Views point into `upstreams[i].active`; both live and die with this snapshot.
    views: Vec<EndpointView>,
    /// Known but out of rotation (ejected, check failing, held down while failing, draining).
    out: Vec<Upstream>,
    /// What discovery left out of this set, and why (empty from a 1.0 plugin).
    excluded: Vec<Excluded>,
    /// Too few endpoints were fit, so all of them are in rotation.
    panic: bool,
}

impl EndpointSet {
    /// Endpoints in rotation.
    pub fn len(&self) -> usize {
        self.upstreams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.upstreams.is_empty()
    }

    /// Endpoints in rotation, in the balancer's order.
    pub fn upstreams(&self) -> &[Upstream] {
        &self.upstreams
    }

    /// Endpoints known but out of rotation, with their state saying why.
    pub fn out_of_rotation(&self) -> &[Upstream] {
        &self.out
    }

    /// What balancers see: one view per upstream in rotation, same order.
    pub fn views(&self) -> &[EndpointView] {
        &self.views
    }

    /// The instances discovery left out of this set, and why.
    pub fn excluded(&self) -> &[Excluded] {
        &self.excluded
    }

    /// Whether too few endpoints were fit and all are used (the panic threshold).
    pub fn panic(&self) -> bool {
        self.panic
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

/// What a rebuild needs from its service.
pub struct Context<'a> {
    pub policy: &'a HealthPolicy,
    /// Where endpoints' active checks are subscribed (shared by the process's services).
    pub checks: &'a Checks,
    /// The service's cut signal: each endpoint's is its child.
    pub cut: &'a Cut,
    /// Names the service in log lines (rebuilds also run outside its span).
    pub service: &'a dyn Display,
}

/// A service's current endpoints: the snapshot plus the state carried across snapshots.
#[derive(Debug, Default)]
pub struct ServiceEndpoints {
    current: ArcSwap<EndpointSet>,
    /// Touched only by rebuilds (a new set, a health change, a timer), never on the connection
    /// path.
    inner: Mutex<Inner>,
    /// Woken by every rebuild that stores a snapshot, for connections waiting for an endpoint.
    changed: Notify,
    /// Wakes the service's health task: enough connect failures for an ejection.
    wake: Arc<Notify>,
}

/// The last set from discovery and what each address keeps across snapshots.
#[derive(Debug, Default)]
struct Inner {
    listed: Vec<Endpoint>,
    excluded: Vec<Excluded>,
    /// Every address with state: listed, held down or draining.
    carried: HashMap<String, Carried>,
    panic: bool,
    /// An ejection was refused for the max-ejected share (logged once per episode).
    ejection_refused: bool,
    /// When the next rebuild is due (an ejection ends, a hold-down or drain runs out).
    next_due: Option<Instant>,
    /// Endpoints an operator drained or disabled, by address; kept while discovery drops and
    /// lists them again.
    operator: HashMap<String, (Operator, At)>,
}

/// Why an operator's change to an endpoint was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OperatorError {
    #[error("no endpoint {address:?} in this service (it has: {known})")]
    UnknownEndpoint { address: String, known: String },
}

/// What an operator's change did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorChange {
    /// `drain`, `disable` or `enable` before the change.
    pub before: &'static str,
    /// Connections reset by it (a disable).
    pub reset: u64,
    /// Connections left open to it.
    pub open: u64,
}

/// What an address keeps across snapshots.
#[derive(Debug)]
struct Carried {
    addr: UpstreamAddr,
    weight: u32,
    active: Arc<AtomicU64>,
    health: Arc<Health>,
    counters: Arc<EndpointCounters>,
    cut: Arc<Cut>,
    /// Its active check, if the service declares one.
    check: Option<Arc<CheckStatus>>,
    /// The check's verdict as of the last rebuild.
    check_failing: bool,
    /// In the last set from discovery.
    listed: bool,
    ejected: Option<Ejection>,
    /// Discovery stopped listing it then (with `remove_delay`).
    missing_since: Option<At>,
    /// Removed with connections left (`on_remove=drain`): reset them then.
    draining: Option<(At, At)>,
}

#[derive(Debug, Clone, Copy)]
struct Ejection {
    since: At,
    until: At,
    failures: u64,
    ejections: u32,
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

    /// Completes at the next stored snapshot after it is enabled or first polled (the waiting
    /// path only: it takes a lock).
    pub fn changed(&self) -> Notified<'_> {
        self.changed.notified()
    }

    /// Completes when the health task should look again: a failure count reached `eject_after`
    /// or a check changed.
    pub fn health_wake(&self) -> &Arc<Notify> {
        &self.wake
    }

    /// When the next timed rebuild is due, if any.
    pub fn next_due(&self) -> Option<Instant> {
        self.lock().next_due
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sets what an operator says about `address` (`None`: enabled again) and rebuilds. A
    /// disable resets the endpoint's open connections.
    pub fn set_operator(
        &self,
        address: &str,
        operator: Option<Operator>,
        context: &Context<'_>,
        prepare: impl FnOnce(&[EndpointView]),
    ) -> Result<OperatorChange, OperatorError> {
        let mut inner = self.lock();
        let Some(carried) = inner.carried.get_mut(address) else {
            let mut known: Vec<&str> = inner.carried.keys().map(String::as_str).collect();
            known.sort_unstable();
            return Err(OperatorError::UnknownEndpoint {
                address: address.to_string(),
                known: known.join(", "),
            });
        };
        let open = carried.active.load(Ordering::Relaxed);
        let mut reset = 0;
        if operator == Some(Operator::Disable) {
            // Fired once for the connections open now; later ones (after an enable) get a
            // fresh signal.
            carried.cut.cut();
            carried.cut = context.cut.child();
            reset = open;
        }
        let before = match inner.operator.get(address) {
            Some((was, _)) => was.as_str(),
            None => "enable",
        };
        match operator {
            Some(operator) => {
                inner
                    .operator
                    .insert(address.to_string(), (operator, At::now()));
            }
            None => {
                inner.operator.remove(address);
            }
        }
        let mut change = SetChange::default();
        self.rebuild(&mut inner, context, &mut change, true, prepare);
        Ok(OperatorChange {
            before,
            reset,
            open: open - reset,
        })
    }

    /// Runs `f` on the current views while no rebuild can run (a new balancer takes the set
    /// this way before it is installed).
    pub fn with_current_views<R>(&self, f: impl FnOnce(&[EndpointView]) -> R) -> R {
        let _inner = self.lock();
        let current = self.current.load();
        f(current.views())
    }

    /// Replaces the whole set under the default policy, with nothing said about what was left
    /// out.
    pub fn replace(&self, endpoints: &[Endpoint]) -> SetChange {
        let context = Context {
            policy: &HealthPolicy::default(),
            checks: &Checks::default(),
            cut: &Cut::default(),
            service: &"-",
        };
        self.replace_explained(endpoints, Vec::new(), &context, |_| {})
    }

    /// Replaces discovery's set: start-up and every later update come through here. `prepare`
    /// sees the new views before any reader can load them (the balancer's set-change hook).
    pub fn replace_explained(
        &self,
        endpoints: &[Endpoint],
        excluded: Vec<Excluded>,
        context: &Context<'_>,
        prepare: impl FnOnce(&[EndpointView]),
    ) -> SetChange {
        let mut inner = self.lock();
        inner.listed = endpoints.to_vec();
        inner.excluded = excluded;
        let mut change = SetChange::default();
        self.rebuild(&mut inner, context, &mut change, true, prepare);
        drop(inner);
        // The set may have started a timer (a hold-down, a drain) the task does not wait for.
        self.wake.notify_one();
        change
    }

    /// Applies what time and health changed since the last rebuild (ejections starting or
    /// ending, checks, hold-downs and drains running out); stores a snapshot only if something
    /// did. Returns whether one was stored.
    pub fn refresh(&self, context: &Context<'_>, prepare: impl FnOnce(&[EndpointView])) -> bool {
        let mut inner = self.lock();
        let mut change = SetChange::default();
        let stored = self.rebuild(&mut inner, context, &mut change, false, prepare);
        for address in &change.removed {
            info!(service = %context.service, endpoint = %address, "endpoint removed: its hold-down is over");
        }
        stored
    }

    /// The one update path: decides every address's state and what is in rotation, and stores
    /// the snapshot when `store` (discovery sent a set) or a state changed.
    fn rebuild(
        &self,
        inner: &mut Inner,
        context: &Context<'_>,
        change: &mut SetChange,
        store: bool,
        prepare: impl FnOnce(&[EndpointView]),
    ) -> bool {
        let policy = context.policy;
        let service = context.service;
        let now = At::now();
        let mut dirty = store;

        // Discovery's set: what is listed, in its order.
        let mut order: Vec<String> = Vec::with_capacity(inner.listed.len());
        let mut seen: HashSet<&str> = HashSet::with_capacity(inner.listed.len());
        let listed = std::mem::take(&mut inner.listed);
        for endpoint in &listed {
            let address = endpoint.address.as_str();
            let Some(addr) = UpstreamAddr::parse(address) else {
                change.rejected.push(address.to_string());
                continue;
            };
            if !seen.insert(address) {
                continue; // the same instance listed twice would skew balancing
            }
            order.push(address.to_string());
            let weight = endpoint.weight.max(1);
            match inner.carried.get_mut(address) {
                Some(carried) => {
                    if carried.missing_since.take().is_some() || carried.draining.take().is_some() {
                        dirty = true;
                        info!(%service, endpoint = %address, "endpoint listed again");
                    }
                    if !carried.listed || carried.weight != weight {
                        dirty = true;
                    }
                    carried.listed = true;
                    carried.weight = weight;
                    carried.health.set_eject_after(policy.eject_after);
                    // A check changed in place (new tunables): the new one from here on.
                    let wanted = policy
                        .check
                        .as_ref()
                        .map(|spec| (spec, &policy.check_params));
                    let current = carried
                        .check
                        .as_ref()
                        .map(|check| (&check.key().spec, &check.key().params));
                    if wanted != current {
                        dirty = true;
                        carried.check_failing = false;
                        carried.check = subscribe(context, policy, &addr, &self.wake);
                    }
                }
                None => {
                    dirty = true;
                    change.added.push(address.to_string());
                    inner.carried.insert(
                        address.to_string(),
                        Carried {
                            addr: addr.clone(),
                            weight,
                            active: Arc::new(AtomicU64::new(0)),
                            health: Arc::new(Health::new(
                                policy.eject_after,
                                Arc::clone(&self.wake),
                            )),
                            counters: Arc::default(),
                            cut: context.cut.child(),
                            check: subscribe(context, policy, &addr, &self.wake),
                            check_failing: false,
                            listed: true,
                            ejected: None,
                            missing_since: None,
                            draining: None,
                        },
                    );
                }
            }
        }

        // What discovery no longer lists: held down, then removed; removed with connections
        // left: kept, drained or closed.
        let mut gone = Vec::new();
        for (address, carried) in inner.carried.iter_mut() {
            if carried.listed && !seen.contains(address.as_str()) {
                carried.listed = false;
                dirty = true;
                if policy.remove_delay > Duration::ZERO {
                    carried.missing_since = Some(now);
                    info!(%service, endpoint = %address, remove_delay = ?policy.remove_delay, "endpoint no longer listed: held down, in rotation while healthy");
                    continue;
                }
                gone.push(address.clone());
            } else if let Some(since) = carried.missing_since {
                if now.instant >= since.instant + policy.remove_delay {
                    carried.missing_since = None;
                    dirty = true;
                    gone.push(address.clone());
                }
            } else if let Some((_, until)) = carried.draining {
                let open = carried.active.load(Ordering::Relaxed);
                if open == 0 {
                    info!(%service, endpoint = %address, "endpoint drained: its last connection closed");
                    gone.push(address.clone());
                } else if now.instant >= until.instant {
                    warn!(%service, endpoint = %address, connections = open, drain_timeout = ?policy.drain_timeout, "drain timeout: resetting the endpoint's remaining connections");
                    carried.cut.cut();
                    gone.push(address.clone());
                }
            }
        }
        for address in gone {
            let Some(mut carried) = inner.carried.remove(&address) else {
                continue;
            };
            if carried.draining.is_some() {
                dirty = true;
                continue; // its drain ended above
            }
            change.removed.push(address.clone());
            let open = carried.active.load(Ordering::Relaxed);
            match policy.on_remove {
                OnRemove::Keep => {}
                OnRemove::Close => {
                    if open > 0 {
                        info!(%service, endpoint = %address, connections = open, "endpoint removed: resetting its connections (on_remove=close)");
                    }
                    carried.cut.cut();
                }
                OnRemove::Drain if open > 0 => {
                    let until = now.after(policy.drain_timeout);
                    info!(%service, endpoint = %address, connections = open, drain_timeout = ?policy.drain_timeout, "endpoint removed: draining its connections");
                    carried.draining = Some((now, until));
                    carried.ejected = None;
                    inner.carried.insert(address, carried);
                }
                OnRemove::Drain => {}
            }
        }
        change.removed.sort();

        // Ejections: those over first, so their places are free for new ones.
        for (address, carried) in inner.carried.iter_mut() {
            if let Some(ejection) = carried.ejected {
                if now.instant >= ejection.until.instant {
                    carried.ejected = None;
                    dirty = true;
                    info!(%service, endpoint = %address, ejected_for = ?now.instant.duration_since(ejection.since.instant), "ejection over: endpoint back in rotation");
                }
            }
        }
        // Checks: a verdict that changed since the last rebuild (which woke the task).
        for carried in inner.carried.values_mut() {
            let failing = carried
                .check
                .as_ref()
                .is_some_and(|check| check.state() == CheckState::Failing);
            if failing != carried.check_failing {
                carried.check_failing = failing;
                dirty = true;
            }
        }

        let in_service = |c: &Carried| c.listed || c.missing_since.is_some();
        let total = inner.carried.values().filter(|c| in_service(c)).count();
        let mut ejected = inner
            .carried
            .values()
            .filter(|c| in_service(c) && c.ejected.is_some())
            .count();
        let allowed = policy.max_ejected(total);
        let mut refused = 0usize;
        for address in &order {
            let Some(carried) = inner.carried.get_mut(address) else {
                continue;
            };
            if carried.ejected.is_some() || !carried.health.wants_ejection() {
                continue;
            }
            if ejected >= allowed {
                refused += 1;
                continue;
            }
            let failures = carried.health.failures();
            let ejections = carried.health.ejected();
            let time = policy.ejection_time(ejections);
            carried.ejected = Some(Ejection {
                since: now,
                until: now.after(time),
                failures,
                ejections,
            });
            ejected += 1;
            dirty = true;
            warn!(%service, endpoint = %address, failures, ejections, ejected_for = ?time, "endpoint ejected: connects kept failing");
        }
        if refused > 0 && !inner.ejection_refused {
            warn!(%service, failing = refused, ejected, max_ejected_percent = policy.max_ejected_percent, "failing endpoints left in rotation: the max-ejected share is reached");
        }
        inner.ejection_refused = refused > 0;

        drop(seen);
        inner.listed = listed;
        if !dirty {
            inner.next_due = next_due(inner, policy, now);
            return false;
        }

        // What is in rotation, in discovery's order, then what is held down.
        let mut rotation = Vec::new();
        let mut out = Vec::new();
        let held = inner
            .carried
            .iter()
            .filter(|(_, c)| c.missing_since.is_some())
            .map(|(a, _)| a.clone());
        let mut held: Vec<String> = held.collect();
        held.sort();
        for address in order.iter().chain(held.iter()) {
            let Some(carried) = inner.carried.get(address) else {
                continue;
            };
            let (state, fit) = match (carried.ejected, carried.missing_since) {
                (Some(e), _) => (
                    EndpointState::Ejected {
                        since: e.since.wall,
                        until: e.until.wall,
                        failures: e.failures,
                        ejections: e.ejections,
                    },
                    false,
                ),
                (None, _) if carried.check_failing => (
                    EndpointState::CheckFailing {
                        since: carried
                            .check
                            .as_ref()
                            .map_or(now.wall, |check| check.since()),
                        error: carried.check.as_ref().and_then(|check| check.last_error()),
                    },
                    false,
                ),
                (None, Some(since)) => {
                    let healthy = carried.health.failures() == 0;
                    (
                        EndpointState::HeldDown {
                            since: since.wall,
                            until: since.after(policy.remove_delay).wall,
                            healthy,
                        },
                        healthy,
                    )
                }
                (None, None) => (EndpointState::Serving, true),
            };
            let upstream = carried.upstream(state);
            if fit {
                rotation.push(upstream);
            } else {
                out.push(upstream);
            }
        }
        // An operator's word holds whatever the panic threshold says.
        let mut operated = Vec::new();
        for list in [&mut rotation, &mut out] {
            let mut kept = Vec::with_capacity(list.len());
            for upstream in list.drain(..) {
                match inner.operator.get(&upstream.addr.to_string()) {
                    Some((operator, since)) => {
                        let since = since.wall;
                        let state = match operator {
                            Operator::Drain => EndpointState::Drained { since },
                            Operator::Disable => EndpointState::Disabled { since },
                        };
                        operated.push(Upstream { state, ..upstream });
                    }
                    None => kept.push(upstream),
                }
            }
            *list = kept;
        }
        let panic = policy.panics(rotation.len(), rotation.len() + out.len());
        if panic != inner.panic {
            if panic {
                warn!(%service, fit = rotation.len(), endpoints = rotation.len() + out.len(), panic_threshold_percent = policy.panic_threshold_percent, "panic: too few endpoints are fit, so all of them are in rotation");
            } else {
                info!(%service, fit = rotation.len(), endpoints = rotation.len() + out.len(), "panic over: only fit endpoints are in rotation");
            }
            inner.panic = panic;
        }
        if panic {
            rotation.append(&mut out);
        }
        out.append(&mut operated);
        let mut draining: Vec<(&String, &Carried)> = inner
            .carried
            .iter()
            .filter(|(_, c)| c.draining.is_some())
            .collect();
        draining.sort_by(|a, b| a.0.cmp(b.0));
        for (_, carried) in draining {
            if let Some((since, until)) = carried.draining {
                out.push(carried.upstream(EndpointState::Draining {
                    since: since.wall,
                    until: until.wall,
                }));
            }
        }
        let views = rotation
            .iter()
            // SAFETY: each view points into an `Arc` owned by the same `EndpointSet`.
            .map(|upstream| unsafe {
                EndpointView::new(Arc::as_ptr(&upstream.active), upstream.weight, true)
            })
            .collect();
        let set = EndpointSet {
            upstreams: rotation,
            views,
            out,
            excluded: inner.excluded.clone(),
            panic,
        };
        inner.next_due = next_due(inner, policy, now);
        prepare(set.views());
        self.current.store(Arc::new(set));
        self.changed.notify_waiters();
        true
    }
}

/// The next time something runs out: an ejection, a hold-down, a drain (whose connections are
/// also looked at every second, as their closing wakes nobody).
/// The check `policy` declares for the endpoint at `addr`, subscribed in `context`'s registry
/// (one checker per endpoint and check, however many services ask), waking `wake` on a change.
fn subscribe(
    context: &Context<'_>,
    policy: &HealthPolicy,
    addr: &UpstreamAddr,
    wake: &Arc<Notify>,
) -> Option<Arc<CheckStatus>> {
    let spec = policy.check.as_ref()?;
    Some(context.checks.subscribe(
        CheckKey {
            addr: addr.clone(),
            spec: spec.clone(),
            params: policy.check_params,
        },
        Arc::downgrade(wake),
    ))
}

fn next_due(inner: &Inner, policy: &HealthPolicy, now: At) -> Option<Instant> {
    inner
        .carried
        .values()
        .flat_map(|c| {
            [
                c.ejected.map(|e| e.until.instant),
                c.missing_since
                    .map(|since| since.instant + policy.remove_delay),
                c.draining
                    .map(|(_, until)| until.instant.min(now.instant + DRAIN_LOOK_PERIOD)),
            ]
        })
        .flatten()
        .min()
}

/// How often a draining endpoint's connections are counted.
const DRAIN_LOOK_PERIOD: Duration = Duration::from_secs(1);

impl Carried {
    fn upstream(&self, state: EndpointState) -> Upstream {
        Upstream {
            addr: self.addr.clone(),
            weight: self.weight,
            active: Arc::clone(&self.active),
            health: Arc::clone(&self.health),
            counters: Arc::clone(&self.counters),
            cut: Arc::clone(&self.cut),
            state,
            check: self.check.clone(),
        }
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

    /// A service's endpoints under `policy`, with what a rebuild borrows.
    struct Fixture {
        policy: HealthPolicy,
        cut: Cut,
        checks: Checks,
        service: ServiceEndpoints,
    }

    impl Fixture {
        fn new(policy: HealthPolicy) -> Fixture {
            Fixture {
                policy,
                cut: Cut::default(),
                checks: Checks::default(),
                service: ServiceEndpoints::default(),
            }
        }

        /// Discovery's set, through the one update path.
        fn set(&self, addresses: &[&str]) -> SetChange {
            self.service.replace_explained(
                &endpoints(addresses),
                Vec::new(),
                &self.context(),
                |_| {},
            )
        }

        fn context(&self) -> Context<'_> {
            Context {
                policy: &self.policy,
                checks: &self.checks,
                cut: &self.cut,
                service: &"web",
            }
        }
    }

    fn states(set: &EndpointSet) -> (Vec<String>, Vec<String>) {
        let show = |u: &Upstream| format!("{} {}", u.addr, u.state.as_str());
        (
            set.upstreams().iter().map(show).collect(),
            set.out_of_rotation().iter().map(show).collect(),
        )
    }

    fn fail(set: &EndpointSet, address: &str, times: usize) {
        let upstream = set
            .upstreams()
            .iter()
            .chain(set.out_of_rotation())
            .find(|u| u.addr.to_string() == address)
            .expect("listed");
        for _ in 0..times {
            upstream
                .health
                .failed(&upstream.addr, "connect_refused", &"refused");
        }
    }

    #[test]
    fn failures_eject_within_the_share_and_the_ejection_ends() {
        let policy = HealthPolicy {
            eject_time: Duration::from_millis(50),
            ..HealthPolicy::default()
        };
        let fixture = Fixture::new(policy);
        let (service, context) = (&fixture.service, fixture.context());
        let listed = endpoints(&["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4"]);
        service.replace_explained(&listed, Vec::new(), &context, |_| {});
        fail(&service.load(), "127.0.0.1:1", 2);
        assert!(
            !service.refresh(&context, |_| {}),
            "two failures: nothing to do"
        );
        fail(&service.load(), "127.0.0.1:1", 1);
        fail(&service.load(), "127.0.0.1:2", 3);
        fail(&service.load(), "127.0.0.1:3", 3);
        let mut seen = 0;
        assert!(service.refresh(&context, |views| seen = views.len()));
        assert_eq!(seen, 2, "the balancer sees only what is in rotation");
        assert_eq!(
            states(&service.load()),
            (
                vec!["127.0.0.1:3 serving".into(), "127.0.0.1:4 serving".into()],
                vec!["127.0.0.1:1 ejected".into(), "127.0.0.1:2 ejected".into()]
            ),
            "at most half ejected: the third failing one stays"
        );
        assert!(service.next_due().is_some(), "the ejections' end is due");
        // A replace that keeps the endpoint keeps its ejection.
        service.replace_explained(&listed, Vec::new(), &context, |_| {});
        assert_eq!(service.load().out_of_rotation().len(), 2);
        std::thread::sleep(Duration::from_millis(60));
        assert!(service.refresh(&context, |_| {}));
        let set = service.load();
        assert_eq!(
            set.len(),
            3,
            "3 takes a free place as the others return: {:?}",
            states(&set)
        );
        assert_eq!(states(&set).1, vec!["127.0.0.1:3 ejected".to_string()]);
        let returned = set
            .upstreams()
            .iter()
            .find(|u| u.addr.to_string() == "127.0.0.1:1");
        assert_eq!(
            returned.map(|u| u.health.ejections()),
            Some(1),
            "the ejection count stays until a success"
        );
    }

    #[test]
    fn too_few_fit_endpoints_put_all_in_rotation() {
        let policy = HealthPolicy {
            max_ejected_percent: 100,
            ..HealthPolicy::default()
        };
        let fixture = Fixture::new(policy);
        let (service, context) = (&fixture.service, fixture.context());
        fixture.set(&["127.0.0.1:1", "127.0.0.1:2"]);
        fail(&service.load(), "127.0.0.1:1", 3);
        service.refresh(&context, |_| {});
        assert!(!service.load().panic(), "one of two fit is not below half");
        fail(&service.load(), "127.0.0.1:2", 3);
        service.refresh(&context, |_| {});
        let set = service.load();
        assert!(set.panic());
        assert_eq!(
            states(&set).0,
            vec![
                "127.0.0.1:1 ejected".to_string(),
                "127.0.0.1:2 ejected".into()
            ],
            "all in rotation, each still saying why it is unfit"
        );
    }

    #[test]
    fn a_removed_endpoint_is_held_down_then_removed_and_closed() {
        let policy = HealthPolicy {
            remove_delay: Duration::from_millis(50),
            on_remove: OnRemove::Close,
            ..HealthPolicy::default()
        };
        let fixture = Fixture::new(policy);
        let (service, context) = (&fixture.service, fixture.context());
        fixture.set(&["127.0.0.1:1", "127.0.0.1:2"]);
        let first = service.load();
        let _open = ActiveGuard::new(&first.upstreams()[1].active);
        let change = fixture.set(&["127.0.0.1:1"]);
        assert!(change.removed.is_empty(), "held down, not removed yet");
        assert_eq!(
            states(&service.load()).0,
            vec![
                "127.0.0.1:1 serving".to_string(),
                "127.0.0.1:2 held_down".into()
            ]
        );
        std::thread::sleep(Duration::from_millis(60));
        assert!(!first.upstreams()[1].cut.is_cut());
        assert!(service.refresh(&context, |_| {}));
        assert_eq!(
            states(&service.load()),
            (vec!["127.0.0.1:1 serving".to_string()], vec![])
        );
        assert!(
            first.upstreams()[1].cut.is_cut(),
            "on_remove=close resets its connections"
        );
        assert!(!first.upstreams()[0].cut.is_cut());
        fixture.cut.cut();
        assert!(
            first.upstreams()[0].cut.is_cut(),
            "the service's cut reaches every endpoint"
        );
    }

    #[test]
    fn a_drained_endpoint_stays_until_its_connections_end() {
        let policy = HealthPolicy {
            on_remove: OnRemove::Drain,
            ..HealthPolicy::default()
        };
        let fixture = Fixture::new(policy);
        let (service, context) = (&fixture.service, fixture.context());
        fixture.set(&["127.0.0.1:1", "127.0.0.1:2"]);
        let first = service.load();
        let open = ActiveGuard::new(&first.upstreams()[1].active);
        let change = fixture.set(&["127.0.0.1:1"]);
        assert_eq!(change.removed, vec!["127.0.0.1:2"]);
        assert_eq!(
            states(&service.load()).1,
            vec!["127.0.0.1:2 draining".to_string()]
        );
        assert!(
            service.next_due().is_some(),
            "its connections are looked at"
        );
        drop(open);
        assert!(service.refresh(&context, |_| {}));
        assert!(service.load().out_of_rotation().is_empty());
        assert!(!first.upstreams()[1].cut.is_cut(), "nothing left to reset");
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
