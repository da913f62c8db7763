//! A proxied service: its descriptor, its endpoints, its balancer and its connection limits.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use embassy_plugin_api::{Endpoint, Excluded, PluginError};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::{
    balancer::Picker,
    check::{CheckParams, CheckSpec, Checks},
    copy::{CopyMode, Cut, Timeouts},
    counters::ServiceCounters,
    descriptor::{parse_duration, parse_percent, plain_number, ServiceDescriptor},
    endpoints::{Context, EndpointSet, OperatorChange, OperatorError, ServiceEndpoints, SetChange},
    health::{HealthPolicy, OnRemove, Operator},
};

/// Default upstream connect timeout when neither the descriptor nor the CLI sets one.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Default idle timeout: Envoy's tcp_proxy default. Long enough for pooled database and cache
/// connections that idle between bursts, short enough that a vanished peer is not held forever.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default half-close timeout: a peer that has said it is done and a peer that has been silent
/// for 30 s since are, in practice, never finishing; each such connection holds two
/// descriptors.
pub const DEFAULT_HALF_CLOSE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time a connection accepted while the service has no endpoint waits for one (as
/// HAProxy's `timeout queue`): covers the first moments after start and a short gap in
/// discovery, within a client's usual connect patience.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(3);
/// Descriptors kept out of the per-service budget: listeners, plugin files, discovery clients,
/// the splice pipe pools, logging.
pub const RESERVED_DESCRIPTORS: u64 = 64;

/// The default `max_connections` for an open-file limit of `limit`: half of the connections
/// the limit allows (two descriptors each, after a reserve), so one service stuck on a hung
/// upstream leaves the other half to the rest. Never below 1.
pub fn default_max_connections(limit: u64) -> usize {
    let per_service = limit.saturating_sub(RESERVED_DESCRIPTORS) / 2 / 2;
    usize::try_from(per_service.max(1)).unwrap_or(usize::MAX)
}

/// The settings of a service's connections unless its descriptor overrides them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionDefaults {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub half_close_timeout: Duration,
    pub queue_timeout: Duration,
    pub max_connections: usize,
    pub health: HealthPolicy,
}

impl Default for ConnectionDefaults {
    fn default() -> Self {
        ConnectionDefaults {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            half_close_timeout: DEFAULT_HALF_CLOSE_TIMEOUT,
            queue_timeout: DEFAULT_QUEUE_TIMEOUT,
            max_connections: usize::MAX,
            health: HealthPolicy::default(),
        }
    }
}

/// What a descriptor's options (or else the defaults) set, apart from the balancer.
struct Tunables {
    connect_timeout: Duration,
    timeouts: Timeouts,
    queue_timeout: Duration,
    max_connections: usize,
    health: HealthPolicy,
}

impl Tunables {
    fn of(descriptor: &ServiceDescriptor, defaults: &ConnectionDefaults) -> Tunables {
        // The parser has checked every value; an unreadable one cannot get here.
        let duration = |key, default| {
            descriptor
                .option(key)
                .and_then(parse_duration)
                .unwrap_or(default)
        };
        Tunables {
            connect_timeout: duration("connect_timeout", defaults.connect_timeout),
            timeouts: Timeouts {
                idle: duration("idle_timeout", defaults.idle_timeout),
                half_close: duration("half_close_timeout", defaults.half_close_timeout),
            },
            queue_timeout: duration("queue_timeout", defaults.queue_timeout),
            max_connections: descriptor
                .option("max_connections")
                .and_then(|value| value.parse::<usize>().ok())
                .filter(|&n| n > 0)
                .unwrap_or(defaults.max_connections.max(1)),
            health: health_policy(descriptor, &defaults.health),
        }
    }
}

/// A duration read and set without a lock (nanoseconds; longer than 584 years saturates).
#[derive(Debug)]
struct AtomicDuration(AtomicU64);

impl AtomicDuration {
    fn new(duration: Duration) -> Self {
        let atomic = AtomicDuration(AtomicU64::new(0));
        atomic.set(duration);
        atomic
    }

    #[inline]
    fn get(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }

    fn set(&self, duration: Duration) {
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        self.0.store(nanos, Ordering::Relaxed);
    }
}

/// Everything the connection path needs for one service.
pub struct Service {
    pub descriptor: ServiceDescriptor,
    pub endpoints: ServiceEndpoints,
    /// Swapped whole by an operator; the accept loop loads it per pick (no lock).
    picker: ArcSwap<Box<dyn Picker>>,
    /// Tunables, applied in place (see [`Service::apply_tunables`]): each connection reads
    /// them once, relaxed.
    connect_timeout: AtomicDuration,
    /// How connections of this service move their bytes.
    pub copy_mode: CopyMode,
    idle_timeout: AtomicDuration,
    half_close_timeout: AtomicDuration,
    /// How long a connection accepted with no endpoint waits for one.
    queue_timeout: AtomicDuration,
    /// Open connections against `max_connections`.
    pub limit: ConnectionLimit,
    /// Connections waiting for a first endpoint.
    pub queue: QueueState,
    /// Fired at the end of a graceful stop; shared by every service of the process.
    pub cut: Arc<Cut>,
    /// Connections accepted and failed, for metrics.
    pub counters: ServiceCounters,
    /// What keeps endpoints in rotation and what happens when discovery removes one; read by
    /// rebuilds only, never per connection.
    health: ArcSwap<HealthPolicy>,
    /// The descriptor whose tunables are in force (the identity's fields are `descriptor`'s).
    in_force: ArcSwap<ServiceDescriptor>,
    /// Where its endpoints' checks run: the host shares one registry among its services, so
    /// an endpoint two services check alike is checked once.
    pub checks: Arc<Checks>,
}

impl Service {
    /// A service with no endpoints yet; `connect_timeout` applies unless the descriptor
    /// overrides it, the other settings are the defaults.
    pub fn new(
        descriptor: ServiceDescriptor,
        picker: Box<dyn Picker>,
        connect_timeout: Duration,
    ) -> Self {
        Service::with_defaults(
            descriptor,
            picker,
            &ConnectionDefaults {
                connect_timeout,
                ..ConnectionDefaults::default()
            },
        )
    }

    /// A service with no endpoints yet; each of `defaults` applies unless the descriptor
    /// overrides it.
    pub fn with_defaults(
        descriptor: ServiceDescriptor,
        picker: Box<dyn Picker>,
        defaults: &ConnectionDefaults,
    ) -> Self {
        let tunables = Tunables::of(&descriptor, defaults);
        Service {
            in_force: ArcSwap::from_pointee(descriptor.clone()),
            descriptor,
            endpoints: ServiceEndpoints::default(),
            picker: ArcSwap::from_pointee(picker),
            connect_timeout: AtomicDuration::new(tunables.connect_timeout),
            copy_mode: CopyMode::best(),
            idle_timeout: AtomicDuration::new(tunables.timeouts.idle),
            half_close_timeout: AtomicDuration::new(tunables.timeouts.half_close),
            queue_timeout: AtomicDuration::new(tunables.queue_timeout),
            limit: ConnectionLimit::new(tunables.max_connections),
            queue: QueueState::default(),
            cut: Arc::default(),
            counters: ServiceCounters::default(),
            health: ArcSwap::from_pointee(tunables.health),
            checks: Arc::default(),
        }
    }

    /// Applies `descriptor`'s tunables (timeouts, `max_connections`, health and check
    /// options; the balancer is swapped apart, [`Service::set_balancer`]) in place: new
    /// connections and the next rebuild use them, connections in flight keep what they
    /// started with; the rebuild it ends with resubscribes a changed check. `descriptor`
    /// names the same service. A UDP listener picks up its session settings (`udp_idle`,
    /// `udp_max_sessions`) at its next sweep.
    pub fn apply_tunables(&self, descriptor: &ServiceDescriptor, defaults: &ConnectionDefaults) {
        let tunables = Tunables::of(descriptor, defaults);
        self.connect_timeout.set(tunables.connect_timeout);
        self.idle_timeout.set(tunables.timeouts.idle);
        self.half_close_timeout.set(tunables.timeouts.half_close);
        self.queue_timeout.set(tunables.queue_timeout);
        self.limit.set_max(tunables.max_connections);
        self.health.store(Arc::new(tunables.health));
        self.in_force.store(Arc::new(descriptor.clone()));
        // Rebuild with the new policy (ejection limits, panic threshold, timers).
        self.refresh_endpoints();
    }

    /// The descriptor whose tunables are in force.
    pub fn in_force(&self) -> Arc<ServiceDescriptor> {
        self.in_force.load_full()
    }

    /// The upstream connect timeout in force.
    #[inline]
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout.get()
    }

    /// The idle and half-close timeouts in force.
    #[inline]
    pub fn timeouts(&self) -> Timeouts {
        Timeouts {
            idle: self.idle_timeout.get(),
            half_close: self.half_close_timeout.get(),
        }
    }

    /// How long a connection accepted with no endpoint waits for one.
    #[inline]
    pub fn queue_timeout(&self) -> Duration {
        self.queue_timeout.get()
    }

    /// The health policy in force.
    pub fn health(&self) -> Arc<HealthPolicy> {
        self.health.load_full()
    }

    /// Counts one connection against `max_connections` until the handle drops.
    #[inline]
    pub fn open_connection(self: &Arc<Self>) -> OpenConnection {
        self.limit.open.fetch_add(1, Ordering::AcqRel);
        OpenConnection(Arc::clone(self))
    }

    /// Replaces the service's endpoint set (the one update path): the balancer prepares for
    /// the new set before the first pick over it.
    pub fn replace_endpoints(&self, endpoints: &[Endpoint], excluded: Vec<Excluded>) -> SetChange {
        let policy = self.health.load();
        self.endpoints
            .replace_explained(endpoints, excluded, &self.context(&policy), |views| {
                self.endpoints_changed(views)
            })
    }

    /// Applies health and timers (ejections, checks, hold-downs, drains) through the same
    /// path; returns whether the snapshot changed.
    pub fn refresh_endpoints(&self) -> bool {
        let policy = self.health.load();
        self.endpoints.refresh(&self.context(&policy), |views| {
            self.endpoints_changed(views)
        })
    }

    /// The service's health task: rebuilds the snapshot when a failure count reaches
    /// `eject_after`, a check changes or a timer runs out, until `shutdown`.
    pub async fn maintain_health(&self, shutdown: tokio_util::sync::CancellationToken) {
        let wake = std::sync::Arc::clone(self.endpoints.health_wake());
        loop {
            let due = self.endpoints.next_due();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = wake.notified() => {}
                _ = sleep_until_due(due) => {}
            }
            self.refresh_endpoints();
        }
    }

    fn context<'a>(&'a self, policy: &'a HealthPolicy) -> Context<'a> {
        Context {
            policy,
            checks: &self.checks,
            cut: &self.cut,
            service: &self.descriptor,
        }
    }

    /// Swaps the balancer in place: the new one takes the current set first (no rebuild can
    /// run meanwhile), then picks from the next connection on. Connections in flight and the
    /// live-connection counters (what least-conn reads) are untouched.
    pub fn set_balancer(&self, picker: Box<dyn Picker>) -> Result<(), PluginError> {
        self.endpoints.with_current_views(|views| {
            picker.endpoints_changed(views)?;
            self.picker.store(Arc::new(picker));
            Ok(())
        })
    }

    /// An operator drains, disables or (`None`) enables one endpoint, through the one update
    /// path.
    pub fn set_endpoint(
        &self,
        address: &str,
        operator: Option<Operator>,
    ) -> Result<OperatorChange, OperatorError> {
        let policy = self.health.load();
        self.endpoints
            .set_operator(address, operator, &self.context(&policy), |views| {
                self.endpoints_changed(views)
            })
    }

    fn endpoints_changed(&self, views: &[embassy_plugin_api::EndpointView]) {
        if let Err(error) = self.picker.load().endpoints_changed(views) {
            warn!(service = %self.descriptor, %error, "balancer failed to take the new endpoint set; its picks may be uneven until the next one");
        }
    }

    /// Asks the balancer for an index into `set` for a connection from `client`, checking it
    /// is in range.
    #[inline]
    pub fn pick(
        &self,
        set: &EndpointSet,
        client: SocketAddr,
    ) -> Result<Option<usize>, PluginError> {
        if set.is_empty() {
            return Ok(None);
        }
        match self.picker.load().pick(set.views(), client)? {
            Some(index) if index < set.len() => Ok(Some(index)),
            Some(index) => Err(PluginError::new(format!(
                "balancer returned index {index} for {} endpoints",
                set.len()
            ))),
            None => Ok(None),
        }
    }
}

async fn sleep_until_due(due: Option<std::time::Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due.into()).await,
        None => std::future::pending().await,
    }
}

/// The descriptor's health options over `defaults` (the parser has checked every value).
fn health_policy(descriptor: &ServiceDescriptor, defaults: &HealthPolicy) -> HealthPolicy {
    let duration = |key, default| {
        descriptor
            .option(key)
            .and_then(parse_duration)
            .unwrap_or(default)
    };
    let count = |key, default: u32| {
        descriptor
            .option(key)
            .and_then(plain_number)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(default)
    };
    let percent = |key, default| {
        descriptor
            .option(key)
            .and_then(parse_percent)
            .unwrap_or(default)
    };
    HealthPolicy {
        eject_after: count("eject_after", defaults.eject_after),
        eject_time: duration("eject_time", defaults.eject_time),
        eject_max_time: duration("eject_max_time", defaults.eject_max_time),
        max_ejected_percent: percent("max_ejected", defaults.max_ejected_percent),
        panic_threshold_percent: percent("panic_threshold", defaults.panic_threshold_percent),
        on_remove: descriptor
            .option("on_remove")
            .and_then(OnRemove::parse)
            .unwrap_or(defaults.on_remove),
        drain_timeout: duration("drain_timeout", defaults.drain_timeout),
        remove_delay: descriptor
            .option("remove_delay")
            .and_then(|value| {
                if value == "0" {
                    Some(Duration::ZERO)
                } else {
                    parse_duration(value)
                }
            })
            .unwrap_or(defaults.remove_delay),
        check: descriptor
            .option("check")
            .and_then(|spec| spec.parse::<CheckSpec>().ok())
            .or_else(|| defaults.check.clone()),
        check_params: CheckParams {
            interval: duration("check_interval", defaults.check_params.interval),
            timeout: duration("check_timeout", defaults.check_params.timeout),
            rise: count("check_rise", defaults.check_params.rise),
            fall: count("check_fall", defaults.check_params.fall),
        },
    }
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("descriptor", &self.descriptor.to_string())
            .field("endpoints", &self.endpoints.load().len())
            .finish()
    }
}

/// A service's open connections against its cap. Only the accept loop opens, so it never
/// overshoots; closing is one atomic subtraction, and wakes the accept loop only when it
/// frees the first slot under the cap.
#[derive(Debug)]
pub struct ConnectionLimit {
    open: AtomicUsize,
    /// Applied in place with the other tunables.
    max: AtomicUsize,
    freed: Notify,
}

impl ConnectionLimit {
    pub fn new(max: usize) -> Self {
        ConnectionLimit {
            open: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
            freed: Notify::new(),
        }
    }

    #[inline]
    pub fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }

    /// A new cap; connections over it are not closed, new ones wait until under it. A
    /// raised cap frees waiting connections at once.
    fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
        self.freed.notify_waiters();
    }

    /// Connections open now (accepted and not yet closed).
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    #[inline]
    pub fn at_cap(&self) -> bool {
        self.open.load(Ordering::Acquire) >= self.max()
    }

    /// Below this again, a limited episode is over (a tenth of head room, so a service that
    /// hovers at its cap logs one episode, not one per connection).
    pub fn low_water(&self) -> usize {
        let max = self.max();
        max.saturating_sub((max / 10).max(1))
    }

    fn close_one(&self) {
        // At or over the cap before this one closed (over it: the cap was lowered).
        if self.open.fetch_sub(1, Ordering::AcqRel) >= self.max() {
            self.freed.notify_one();
        }
    }

    /// Waits until a connection closes below the cap.
    pub async fn below_cap(&self) {
        loop {
            let freed = self.freed.notified();
            let mut freed = std::pin::pin!(freed);
            freed.as_mut().enable();
            if !self.at_cap() {
                return;
            }
            freed.await;
        }
    }
}

/// One open connection of a service: the connection task's handle on it, counted against
/// `max_connections` until dropped.
#[derive(Debug)]
pub struct OpenConnection(Arc<Service>);

impl std::ops::Deref for OpenConnection {
    type Target = Service;

    fn deref(&self) -> &Service {
        &self.0
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.limit.close_one();
    }
}

/// Connections held while the service has no endpoint, logged once per state change.
#[derive(Debug, Default)]
pub struct QueueState {
    holding: AtomicBool,
    served: AtomicU64,
    reset: AtomicU64,
}

impl QueueState {
    /// A connection found no endpoint and waits (logs when this starts an episode).
    pub fn hold(&self, descriptor: &ServiceDescriptor, timeout: Duration) {
        if !self.holding.swap(true, Ordering::AcqRel) {
            warn!(service = %descriptor, queue_timeout = ?timeout, "no endpoint available: holding new connections until one appears");
        }
    }

    /// A held connection got an endpoint.
    pub fn served(&self) {
        self.served.fetch_add(1, Ordering::Relaxed);
    }

    /// A held connection waited `queue_timeout` in vain and is reset (logged for the first of
    /// an episode).
    pub fn timed_out(&self, descriptor: &ServiceDescriptor, timeout: Duration) {
        if self.reset.fetch_add(1, Ordering::Relaxed) == 0 {
            warn!(service = %descriptor, queue_timeout = ?timeout, "no endpoint within the queue timeout: resetting held connections (counted until one appears)");
        }
    }

    /// An endpoint is available: ends the episode, if any, with its counts. One load per
    /// connection otherwise.
    #[inline]
    pub fn endpoint_available(&self, descriptor: &ServiceDescriptor) {
        if self.holding.load(Ordering::Relaxed) && self.holding.swap(false, Ordering::AcqRel) {
            info!(
                service = %descriptor,
                served = self.served.swap(0, Ordering::Relaxed),
                reset = self.reset.swap(0, Ordering::Relaxed),
                "endpoint available: held connections resume"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use embassy_plugin_api::{EndpointView, Exclusion};

    use super::*;

    /// Records what the set-change hook saw, and what a reader could load at that moment.
    struct Recorder {
        service: std::sync::OnceLock<std::sync::Weak<Service>>,
        seen: Mutex<Vec<(usize, usize)>>,
        client: Mutex<Option<SocketAddr>>,
    }

    impl Picker for Arc<Recorder> {
        fn pick(
            &self,
            views: &[EndpointView],
            client: SocketAddr,
        ) -> Result<Option<usize>, PluginError> {
            *self.client.lock().expect("lock") = Some(client);
            Ok((!views.is_empty()).then_some(0))
        }

        fn endpoints_changed(&self, views: &[EndpointView]) -> Result<(), PluginError> {
            let loadable = self
                .service
                .get()
                .and_then(std::sync::Weak::upgrade)
                .map_or(0, |service| service.endpoints.load().len());
            self.seen
                .lock()
                .expect("lock")
                .push((views.len(), loadable));
            Ok(())
        }
    }

    #[test]
    fn the_balancer_sees_a_new_set_before_any_pick_can_and_picks_get_the_client() {
        let recorder = Arc::new(Recorder {
            service: Default::default(),
            seen: Mutex::default(),
            client: Mutex::default(),
        });
        let service = Arc::new(Service::new(
            "web;80/tcp".parse().expect("valid"),
            Box::new(Arc::clone(&recorder)),
            DEFAULT_CONNECT_TIMEOUT,
        ));
        let _ = recorder.service.set(Arc::downgrade(&service));
        let endpoints = |addresses: &[&str]| -> Vec<Endpoint> {
            addresses.iter().map(|a| Endpoint::new(*a)).collect()
        };
        let excluded = vec![Excluded::new(
            "/services/web/3",
            Exclusion::TAG,
            "lacks tag prod",
        )];
        service.replace_endpoints(
            &endpoints(&["127.0.0.1:1", "127.0.0.1:2"]),
            excluded.clone(),
        );
        service.replace_endpoints(&endpoints(&["127.0.0.1:1"]), Vec::new());
        assert_eq!(
            *recorder.seen.lock().expect("lock"),
            [(2, 0), (1, 2)],
            "each hook call sees the new set while readers still load the old one"
        );
        let snapshot = service.endpoints.load();
        assert!(snapshot.excluded().is_empty(), "exclusions are per set");
        let client: SocketAddr = "127.0.0.9:4242".parse().expect("an address");
        assert_eq!(service.pick(&snapshot, client).expect("pick"), Some(0));
        assert_eq!(*recorder.client.lock().expect("lock"), Some(client));
        service.replace_endpoints(&endpoints(&["127.0.0.1:1"]), excluded.clone());
        assert_eq!(service.endpoints.load().excluded(), excluded.as_slice());
    }

    #[test]
    fn default_max_connections_leaves_half_of_the_descriptors_to_others() {
        let check = |limit: u64, expected: usize| {
            assert_eq!(default_max_connections(limit), expected, "limit {limit}");
        };
        check(256, 48);
        check(1024, 240);
        check(1_048_576, 262_128);
        check(64, 1);
        check(0, 1);
    }

    #[test]
    fn tunables_are_applied_in_place() {
        let first = |views: &[embassy_plugin_api::EndpointView]| (!views.is_empty()).then_some(0);
        let defaults = ConnectionDefaults::default();
        let service = Service::with_defaults(
            "web;80/tcp".parse().expect("valid"),
            Box::new(first),
            &defaults,
        );
        let next: ServiceDescriptor =
            "web;80/tcp;connect_timeout=250ms;idle_timeout=5m;queue_timeout=1s;max_connections=9;eject_after=7"
                .parse()
                .expect("valid");
        service.apply_tunables(&next, &defaults);
        assert_eq!(service.connect_timeout(), Duration::from_millis(250));
        assert_eq!(service.timeouts().idle, Duration::from_secs(300));
        assert_eq!(service.timeouts().half_close, DEFAULT_HALF_CLOSE_TIMEOUT);
        assert_eq!(service.queue_timeout(), Duration::from_secs(1));
        assert_eq!(service.limit.max(), 9);
        assert_eq!(service.health().eject_after, 7);
        assert_eq!(*service.in_force(), next);
        assert_eq!(
            service.descriptor.to_string(),
            "web;80/tcp",
            "the identity stays"
        );
    }

    #[test]
    fn descriptor_options_override_the_defaults() {
        let first = |views: &[embassy_plugin_api::EndpointView]| (!views.is_empty()).then_some(0);
        let defaults = ConnectionDefaults {
            max_connections: 100,
            ..ConnectionDefaults::default()
        };
        let plain = Service::with_defaults(
            "web;80/tcp".parse().expect("valid"),
            Box::new(first),
            &defaults,
        );
        assert_eq!(plain.timeouts().idle, DEFAULT_IDLE_TIMEOUT);
        assert_eq!(plain.timeouts().half_close, DEFAULT_HALF_CLOSE_TIMEOUT);
        assert_eq!(plain.queue_timeout(), DEFAULT_QUEUE_TIMEOUT);
        assert_eq!(plain.limit.max(), 100);
        let own = Service::with_defaults(
            "web;80/tcp;idle_timeout=5m;half_close_timeout=2s;queue_timeout=500ms;max_connections=7"
                .parse()
                .expect("valid"),
            Box::new(first),
            &defaults,
        );
        assert_eq!(own.timeouts().idle, Duration::from_secs(300));
        assert_eq!(own.timeouts().half_close, Duration::from_secs(2));
        assert_eq!(own.queue_timeout(), Duration::from_millis(500));
        assert_eq!(own.limit.max(), 7);
    }

    #[test]
    fn the_limit_counts_open_connections() {
        let first = |views: &[embassy_plugin_api::EndpointView]| (!views.is_empty()).then_some(0);
        let service = Arc::new(Service::with_defaults(
            "web;80/tcp;max_connections=2".parse().expect("valid"),
            Box::new(first),
            &ConnectionDefaults::default(),
        ));
        let limit = &service.limit;
        let a = service.open_connection();
        assert!(!limit.at_cap());
        let b = service.open_connection();
        assert!(limit.at_cap());
        drop(a);
        assert!(!limit.at_cap());
        assert_eq!(limit.open(), 1);
        drop(b);
        assert_eq!(limit.open(), 0);
        assert_eq!(limit.low_water(), 1);
    }
}
