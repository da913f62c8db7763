//! The host's read model: what the admin API, `embassy status` and tests ask.
//!
//! The supervisor (owned by the run loop) publishes the list of services whole on every change
//! of listeners or owners; each entry holds the live `Service` (whose endpoint snapshot is read
//! lock-free) and the discovery status its sink keeps. Readers never block the run loop, and
//! nothing here is touched on the connection path.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use embassy_core::{
    counters::{self, ConnectFailure, ServiceFailure},
    endpoints::Upstream,
    health::EndpointState,
    Service,
};
use embassy_plugin_api::{BackendHealth, Protocol};
use serde::Serialize;

use crate::plugins::LoadedPlugin;

/// Everything the run loop publishes for readers.
#[derive(Default)]
pub struct HostState {
    services: ArcSwap<Vec<Arc<ServiceState>>>,
    plugins: ArcSwap<Vec<LoadedPlugin>>,
}

impl HostState {
    /// Replaces the list of services (the supervisor, on every change).
    pub fn publish(&self, mut services: Vec<Arc<ServiceState>>) {
        services.sort_by(|a, b| a.id.cmp(&b.id));
        self.services.store(Arc::new(services));
    }

    /// The services as last published, ordered by id.
    pub fn services(&self) -> Arc<Vec<Arc<ServiceState>>> {
        self.services.load_full()
    }

    /// Replaces the list of plugins (at start, and after each reload).
    pub fn publish_plugins(&self, plugins: Vec<LoadedPlugin>) {
        self.plugins.store(Arc::new(plugins));
    }

    /// Every plugin loaded, the superseded versions too.
    pub fn plugins(&self) -> Arc<Vec<LoadedPlugin>> {
        self.plugins.load_full()
    }

    /// The service `id`.
    pub fn service(&self, id: &str) -> Option<Arc<ServiceState>> {
        self.services.load().iter().find(|s| s.id == id).cloned()
    }
}

/// One listener and the service it serves.
pub struct ServiceState {
    /// What names the listener: its protocol and port, and its namespace when not Embassy's
    /// own (`tcp-8080`, `ns4026532245-udp-53`). Never what an operator may change.
    pub id: String,
    pub address: SocketAddr,
    /// The network namespace's inode, for listeners in another container's namespace.
    pub namespace: Option<u64>,
    /// Who asked for it: `NAME (ID):VARIABLE` for a container, `--service`, an environment
    /// variable.
    pub owners: Vec<String>,
    /// The containers among them, once each, by name.
    pub consumers: Vec<Consumer>,
    pub balancer: String,
    pub service: Arc<Service>,
    pub discovery: Arc<DiscoveryStatus>,
}

/// Who asked for a listener: a container's variable, or a source of Embassy's own
/// configuration. Ordered and compared whole: one container asking twice (two variables) is two
/// claims.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Owner {
    /// The container that asked, in Docker modes.
    pub container: Option<Consumer>,
    /// What asked: the container's `BACKEND_*` variable, `--service`, an environment variable.
    pub source: String,
}

impl Owner {
    /// A claim from Embassy's own configuration.
    pub fn configured(source: &str) -> Owner {
        Owner {
            container: None,
            source: source.to_string(),
        }
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.container {
            Some(container) => write!(
                f,
                "{} ({}):{}",
                container.name,
                crate::docker::short_id(&container.id),
                self.source
            ),
            None => f.write_str(&self.source),
        }
    }
}

/// A container served by a listener: the consumer whose name labels its metrics.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Consumer {
    pub name: String,
    pub id: String,
}

/// The id of the listener on `port`/`protocol` in `namespace` (`None`: Embassy's own).
pub fn service_id(namespace: Option<u64>, port: u16, protocol: Protocol) -> String {
    match namespace {
        None => format!("{protocol}-{port}"),
        Some(inode) => format!("ns{inode}-{protocol}-{port}"),
    }
}

/// What a service's discovery watch has said, kept by its sink.
#[derive(Debug)]
pub struct DiscoveryStatus {
    inner: Mutex<DiscoveryInner>,
    started: Instant,
}

#[derive(Debug, Clone)]
struct DiscoveryInner {
    health: BackendHealth,
    detail: String,
    /// When `health` last changed.
    health_since: SystemTime,
    /// When the last set arrived, and how many have.
    last_update: Option<(SystemTime, Instant)>,
    updates: u64,
}

impl Default for DiscoveryStatus {
    fn default() -> Self {
        DiscoveryStatus {
            inner: Mutex::new(DiscoveryInner {
                health: BackendHealth::Reachable,
                detail: String::new(),
                health_since: SystemTime::now(),
                last_update: None,
                updates: 0,
            }),
            started: Instant::now(),
        }
    }
}

impl DiscoveryStatus {
    fn lock(&self) -> MutexGuard<'_, DiscoveryInner> {
        // Every write replaces whole fields: a panic elsewhere leaves nothing half-written.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A set arrived.
    pub fn updated(&self) {
        let mut inner = self.lock();
        inner.last_update = Some((SystemTime::now(), Instant::now()));
        inner.updates += 1;
    }

    /// The plugin reported `health`; returns whether it changed, and whether the detail did.
    pub fn reported(&self, health: BackendHealth, detail: &str) -> (bool, bool) {
        let mut inner = self.lock();
        let changed = inner.health != health;
        if changed {
            inner.health_since = SystemTime::now();
        }
        let detail_changed = inner.detail != detail;
        inner.health = health;
        if detail_changed {
            inner.detail = detail.to_string();
        }
        (changed, detail_changed)
    }

    /// Whether a first set has arrived, or the plugin has said why not.
    pub fn answered(&self) -> bool {
        let inner = self.lock();
        inner.updates > 0 || inner.health != BackendHealth::Reachable
    }

    pub fn view(&self) -> DiscoveryView {
        let inner = self.lock().clone();
        DiscoveryView {
            state: match inner.health {
                BackendHealth::Reachable => "reachable",
                BackendHealth::Unreachable => "unreachable",
                BackendHealth::Invalid => "invalid",
            },
            detail: inner.detail,
            state_since: unix_seconds(inner.health_since),
            updates: inner.updates,
            last_update: inner.last_update.map(|(at, _)| unix_seconds(at)),
            set_age_seconds: inner.last_update.map(|(_, at)| at.elapsed().as_secs_f64()),
            waiting_seconds: (inner.updates == 0).then(|| self.started.elapsed().as_secs_f64()),
        }
    }
}

fn unix_seconds(at: SystemTime) -> f64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

/// A service's discovery state, as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DiscoveryView {
    /// `reachable`, `unreachable` or `invalid`: what the plugin last reported.
    pub state: &'static str,
    pub detail: String,
    /// Unix seconds since which `state` holds.
    pub state_since: f64,
    /// Sets received since the watch started.
    pub updates: u64,
    /// Unix seconds of the last set, if any came.
    pub last_update: Option<f64>,
    /// Seconds since the current set arrived.
    pub set_age_seconds: Option<f64>,
    /// Seconds waited so far for a first set, while none has come.
    pub waiting_seconds: Option<f64>,
}

/// One endpoint of a service, as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointView {
    pub address: String,
    /// `serving`; `failing`: serving, but its last connects failed (connections fail over);
    /// `ejected`: out after `eject_after` failures in a row; `check_failing`; `held_down`:
    /// discovery stopped listing it and `remove_delay` keeps it; `draining`: removed, its
    /// connections run out (`on_remove=drain`).
    pub state: &'static str,
    /// Whether the balancer picks it now (an unfit endpoint is, in a panic).
    pub in_rotation: bool,
    /// Unix seconds since which `state` holds, and until which it will (ejected, held down,
    /// draining).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<f64>,
    /// What put it in this state, in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub weight: u32,
    /// Connections (or UDP sessions) open to it now.
    pub active: u64,
    /// Connect failures since its last success.
    pub consecutive_failures: u64,
    /// Ejections in a row without a successful connect since.
    pub ejections: u32,
    /// Its active check, if the service declares one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckView>,
    /// Connections established (UDP: sessions opened) since it joined the set.
    pub connections: u64,
    /// Failed connect attempts since it joined the set.
    pub connect_failures: u64,
    /// Bytes client → endpoint and back, counted as they move.
    pub sent_bytes: u64,
    pub received_bytes: u64,
}

/// An endpoint's active check, as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct CheckView {
    /// The check as declared, canonical (`http:/healthz`).
    pub spec: String,
    /// `unknown` (none finished yet), `passing` or `failing`.
    pub state: &'static str,
    /// Unix seconds since which `state` holds.
    pub since: f64,
    pub checks: u64,
    pub failures: u64,
    pub last_error: Option<String>,
}

impl EndpointView {
    fn of(upstream: &Upstream, in_rotation: bool) -> EndpointView {
        let failing = upstream.health.failures();
        let c = &upstream.counters;
        let (state, since, until, reason) = match &upstream.state {
            EndpointState::Serving if failing > 0 => ("failing", None, None, None),
            EndpointState::Serving => ("serving", None, None, None),
            EndpointState::Ejected {
                since,
                until,
                failures,
                ejections,
            } => (
                "ejected",
                Some(*since),
                Some(*until),
                Some(format!(
                    "{failures} connect failures in a row (ejection {ejections} in a row)"
                )),
            ),
            EndpointState::CheckFailing { since, error } => {
                ("check_failing", Some(*since), None, error.clone())
            }
            EndpointState::HeldDown {
                since,
                until,
                healthy,
            } => (
                "held_down",
                Some(*since),
                Some(*until),
                Some(if *healthy {
                    "no longer listed by discovery; kept for remove_delay".to_string()
                } else {
                    "no longer listed by discovery, and failing: out of rotation".to_string()
                }),
            ),
            EndpointState::Drained { since } => (
                "drained",
                Some(*since),
                None,
                Some("drained by an operator: no new connections until enabled".into()),
            ),
            EndpointState::Disabled { since } => (
                "disabled",
                Some(*since),
                None,
                Some("disabled by an operator: no connections until enabled".into()),
            ),
            EndpointState::Draining { since, until } => (
                "draining",
                Some(*since),
                Some(*until),
                Some("removed by discovery; its connections run until the drain timeout".into()),
            ),
        };
        EndpointView {
            address: upstream.addr.to_string(),
            state,
            in_rotation,
            since: since.map(unix_seconds),
            until: until.map(unix_seconds),
            reason,
            weight: upstream.weight,
            active: upstream.active.load(std::sync::atomic::Ordering::Relaxed),
            consecutive_failures: failing,
            ejections: upstream.health.ejections(),
            check: upstream.check.as_ref().map(|check| CheckView {
                spec: check.key().spec.to_string(),
                state: check.state().as_str(),
                since: unix_seconds(check.since()),
                checks: check.checks(),
                failures: check.failures(),
                last_error: check.last_error(),
            }),
            connections: counters::read(&c.connections),
            connect_failures: ConnectFailure::ALL
                .iter()
                .map(|f| c.connect_failures(*f))
                .sum(),
            sent_bytes: counters::read(&c.bytes.sent),
            received_bytes: counters::read(&c.bytes.received),
        }
    }
}

/// An instance discovery left out, and why.
#[derive(Debug, Clone, Serialize)]
pub struct ExcludedView {
    pub instance: String,
    pub reason: String,
    pub detail: String,
}

/// A service as `GET /v1/services` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceView {
    pub id: String,
    pub descriptor: String,
    pub service: String,
    pub tags: Vec<String>,
    pub protocol: &'static str,
    pub address: String,
    pub namespace: Option<u64>,
    pub owners: Vec<String>,
    /// The containers that asked for it (Docker modes).
    pub consumers: Vec<Consumer>,
    pub balancer: String,
    pub discovery: DiscoveryView,
    pub endpoints: Vec<EndpointView>,
    /// Too few endpoints are fit, so all of them are in rotation (the panic threshold).
    pub panic: bool,
    /// Client connections open now (TCP), against `max_connections`.
    pub open_connections: usize,
    pub max_connections: usize,
    /// Client connections accepted (UDP: sessions asked for) since the listener opened.
    pub accepted: u64,
    /// Those not served, by reason (`no_endpoint`, `connect_refused`, ...); zeros left out.
    pub failed: BTreeMap<&'static str, u64>,
    /// With `GET /v1/services/{id}` only: what discovery left out, and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub excluded: Option<Vec<ExcludedView>>,
}

impl ServiceState {
    /// The view of this service now; `explain` adds what discovery left out.
    pub fn view(&self, explain: bool) -> ServiceView {
        let descriptor = &self.service.descriptor;
        let set = self.service.endpoints.load();
        let endpoints = set
            .upstreams()
            .iter()
            .map(|upstream| EndpointView::of(upstream, true))
            .chain(
                set.out_of_rotation()
                    .iter()
                    .map(|upstream| EndpointView::of(upstream, false)),
            )
            .collect();
        let service_counters = &self.service.counters;
        let failed = ServiceFailure::ALL
            .iter()
            .map(|f| (f.as_str(), service_counters.failures(*f)))
            .filter(|(_, n)| *n > 0)
            .collect();
        let excluded = explain.then(|| {
            set.excluded()
                .iter()
                .map(|e| ExcludedView {
                    instance: e.instance.to_string(),
                    reason: e.reason.to_string(),
                    detail: e.detail.to_string(),
                })
                .collect()
        });
        ServiceView {
            id: self.id.clone(),
            descriptor: self.service.in_force().to_string(),
            service: descriptor.service.clone(),
            tags: descriptor.tags.clone(),
            protocol: descriptor.protocol.as_str(),
            address: self.address.to_string(),
            namespace: self.namespace,
            owners: self.owners.clone(),
            consumers: self.consumers.clone(),
            balancer: self.balancer.clone(),
            discovery: self.discovery.view(),
            endpoints,
            panic: set.panic(),
            open_connections: self.service.limit.open(),
            max_connections: self.service.limit.max(),
            accepted: counters::read(&service_counters.accepted),
            failed,
            excluded,
        }
    }
}
