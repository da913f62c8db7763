//! The desired state: which listeners exist, for which service, on whose behalf.
//!
//! A listener is keyed by network namespace, address, port and protocol. The same descriptor
//! requested again in one namespace (another container, another variable) shares the listener
//! and its watch; the last owner to leave tears both down. A port held for a *different*
//! service is an error for the newcomer and no disturbance for the holder. Embassy's own
//! namespace is [`Place::Own`]; host mode opens listeners in each container's namespace
//! ([`Place::Netns`]), so two containers may use one port for two services.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use embassy_core::{
    check::Checks,
    copy::{CopyMode, Cut},
    service::ConnectionDefaults,
    Listener, ListenerError, Service, ServiceDescriptor,
};
use embassy_plugin_api::{BalancerConfig, Protocol, WatchHandleBox, WatchRequest};
use thiserror::Error;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, info_span, warn, Instrument};

use crate::{
    control::{ControlError, Request},
    netns::{Netns, NetnsError},
    plugins::{log_load_error, DiscoveryBackend, PluginRegistry, PluginUseError},
    sink::ServiceSink,
    state::{service_id, Consumer, DiscoveryStatus, HostState, Owner, ServiceState},
};

/// Why a service could not be served.
#[derive(Debug, Error)]
pub enum ServeError {
    #[error(transparent)]
    Listener(#[from] ListenerError),
    #[error(transparent)]
    Plugin(#[from] PluginUseError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("port {port}/{protocol} is already serving {holder}")]
    PortHeld {
        port: u16,
        protocol: Protocol,
        holder: String,
    },
    #[error("cannot watch the service: {0}")]
    Watch(String),
}

/// Settings that apply to every service.
#[derive(Debug, Clone)]
pub struct ServeDefaults {
    pub bind: IpAddr,
    pub balancer: String,
    pub copy_mode: CopyMode,
    /// Connect, idle, half-close and queue timeouts and the connection cap, unless a
    /// descriptor says otherwise.
    pub connections: ConnectionDefaults,
}

/// After the grace period, how long cut connections get to go: those younger than a second
/// notice the cut at their first watchdog tick, within a second.
const CUT_WAIT: Duration = Duration::from_secs(2);

/// The network namespace a listener lives in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// Embassy's own (and that of containers started with `--net=container:<embassy>`).
    Own,
    /// Another process's, entered to bind (host mode).
    Netns(Netns),
}

impl Place {
    async fn bind(&self, addr: SocketAddr, protocol: Protocol) -> Result<Listener, ServeError> {
        let Place::Netns(netns) = self else {
            return Ok(Listener::bind(addr, protocol).await?);
        };
        let registered = match protocol {
            Protocol::Tcp => TcpListener::from_std(netns.bind_tcp(addr).await?).map(Listener::Tcp),
            Protocol::Udp => UdpSocket::from_std(netns.bind_udp(addr).await?).map(Listener::Udp),
        };
        Ok(registered.map_err(|source| ListenerError::Bind { addr, source })?)
    }

    /// Equal for every process of one namespace.
    fn namespace_id(&self) -> Option<u64> {
        match self {
            Place::Own => None,
            Place::Netns(netns) => Some(netns.inode),
        }
    }
}

type ListenKey = (Option<u64>, SocketAddr, Protocol);

struct Active {
    service: Arc<Service>,
    /// Who asked, each with the descriptor it asked with (the same service, perhaps other
    /// tunables).
    owners: BTreeMap<Owner, ServiceDescriptor>,
    stop: CancellationToken,
    watch: WatchHandleBox,
    balancer: String,
    discovery: Arc<DiscoveryStatus>,
}

/// Owns every listener and watch.
pub struct Supervisor {
    plugins: PluginRegistry,
    /// Where `plugins` came from, scanned again on reload.
    plugin_dir: PathBuf,
    discovery: DiscoveryBackend,
    defaults: ServeDefaults,
    active: HashMap<ListenKey, Active>,
    listeners: TaskTracker,
    connections: TaskTracker,
    /// Resets the connections still open when the grace period is over.
    cut: Arc<Cut>,
    /// Every service's active checks: one checker per endpoint and check, however many
    /// services declare it.
    checks: Arc<Checks>,
    /// What readers see, republished on every change.
    state: Arc<HostState>,
}

/// The containers among `owners`, once each.
fn consumers(owners: &BTreeMap<Owner, ServiceDescriptor>) -> Vec<Consumer> {
    let mut consumers: Vec<Consumer> = owners.keys().filter_map(|o| o.container.clone()).collect();
    consumers.dedup();
    consumers
}

impl Supervisor {
    pub fn new(
        plugins: PluginRegistry,
        plugin_dir: PathBuf,
        discovery: DiscoveryBackend,
        defaults: ServeDefaults,
    ) -> Self {
        let state = Arc::new(HostState::default());
        state.publish_plugins(plugins.plugins().to_vec());
        Supervisor {
            plugins,
            plugin_dir,
            discovery,
            defaults,
            active: HashMap::new(),
            listeners: TaskTracker::new(),
            connections: TaskTracker::new(),
            cut: Arc::default(),
            // Rebuilds also run on discovery plugins' threads: checkers start on this runtime.
            checks: Arc::new(Checks::new(tokio::runtime::Handle::try_current().ok())),
            state,
        }
    }

    /// The read model this supervisor publishes to.
    pub fn state(&self) -> Arc<HostState> {
        Arc::clone(&self.state)
    }

    /// Publishes the services as they are now (after every change of listeners or owners).
    fn publish(&self) {
        let services = self
            .active
            .iter()
            .map(|((namespace, addr, protocol), active)| {
                Arc::new(ServiceState {
                    id: service_id(*namespace, addr.port(), *protocol),
                    address: *addr,
                    namespace: *namespace,
                    owners: active.owners.keys().map(Owner::to_string).collect(),
                    consumers: consumers(&active.owners),
                    balancer: active.balancer.clone(),
                    service: Arc::clone(&active.service),
                    discovery: Arc::clone(&active.discovery),
                })
            })
            .collect();
        self.state.publish(services);
    }

    /// Applies an operator's write; the answer says what changed.
    pub fn control(&mut self, request: &Request) -> Result<serde_json::Value, ControlError> {
        if let Request::ReloadPlugins = request {
            return self.reload_plugins();
        }
        // Every request but a reload names a service.
        let wanted = request.service().unwrap_or_default();
        let found = self
            .active
            .iter_mut()
            .find(|((namespace, addr, protocol), _)| {
                service_id(*namespace, addr.port(), *protocol) == wanted
            });
        let Some((_, active)) = found else {
            return Err(ControlError::UnknownService(wanted.to_string()));
        };
        let service_id = wanted;
        let answer = match request {
            Request::SetBalancer {
                balancer, options, ..
            } => {
                let descriptor = &active.service.descriptor;
                let config = BalancerConfig {
                    service: descriptor.service.as_str().into(),
                    options: options
                        .iter()
                        .map(|(k, v)| {
                            abi_stable::std_types::Tuple2(k.as_str().into(), v.as_str().into())
                        })
                        .collect(),
                };
                let refused = |reason: String| ControlError::Balancer {
                    balancer: balancer.clone(),
                    reason,
                };
                let picker = self
                    .plugins
                    .new_balancer(balancer, config)
                    .map_err(|error| refused(error.to_string()))?;
                let version = self
                    .plugins
                    .balancer(balancer)
                    .map(|plugin| plugin.version.clone())
                    .ok();
                active
                    .service
                    .set_balancer(picker)
                    .map_err(|error| refused(error.to_string()))?;
                let before = std::mem::replace(&mut active.balancer, balancer.clone());
                serde_json::json!({
                    "service": service_id,
                    "balancer": {
                        "before": before,
                        "after": balancer,
                        "version": version,
                        "options": options,
                    },
                })
            }
            Request::SetEndpoint {
                endpoint, action, ..
            } => {
                let change = active.service.set_endpoint(endpoint, action.operator())?;
                serde_json::json!({
                    "service": service_id,
                    "endpoint": endpoint,
                    "before": change.before,
                    "after": action,
                    "connections_reset": change.reset,
                    "connections_open": change.open,
                })
            }
            Request::Resync { .. } => {
                let updates = active.discovery.view().updates;
                let before = active.service.endpoints.load().len();
                restart_watch(&self.discovery, active)?;
                serde_json::json!({
                    "service": service_id,
                    "watch": "restarted",
                    "endpoints_before": before,
                    "updates_before": updates,
                })
            }
            Request::ReloadPlugins => return self.reload_plugins(),
        };
        self.publish();
        Ok(answer)
    }

    /// Scans the plugin directory again (an operator's reload, or SIGHUP): each refused file
    /// is logged as at start, and the answer lists what was loaded and what was refused.
    pub fn reload_plugins(&mut self) -> Result<serde_json::Value, ControlError> {
        let scan = self.plugins.scan(&self.plugin_dir)?;
        scan.errors.iter().for_each(log_load_error);
        self.state.publish_plugins(self.plugins.plugins().to_vec());
        let refused: Vec<String> = scan.errors.iter().map(ToString::to_string).collect();
        Ok(serde_json::json!({
            "plugin_dir": self.plugin_dir,
            "loaded": scan.loaded,
            "refused": refused,
            "unchanged": scan.unchanged,
        }))
    }

    /// Serves `descriptor` in Embassy's own namespace on behalf of `owner` (a container, a
    /// variable, the command line).
    pub async fn add(
        &mut self,
        descriptor: &ServiceDescriptor,
        owner: &Owner,
    ) -> Result<(), ServeError> {
        self.add_in(&Place::Own, descriptor, owner).await
    }

    /// Serves `descriptor` in the namespace `place` on behalf of `owner`.
    pub async fn add_in(
        &mut self,
        place: &Place,
        descriptor: &ServiceDescriptor,
        owner: &Owner,
    ) -> Result<(), ServeError> {
        let addr = SocketAddr::new(self.defaults.bind, descriptor.port);
        let key = (place.namespace_id(), addr, descriptor.protocol);
        if let Some(active) = self.active.get_mut(&key) {
            let serving = active.service.in_force();
            if !serving.same_service(descriptor) {
                return Err(ServeError::PortHeld {
                    port: descriptor.port,
                    protocol: descriptor.protocol,
                    holder: serving.to_string(),
                });
            }
            if *serving != *descriptor && !active.owners.contains_key(owner) {
                let owners: Vec<String> = active.owners.keys().map(Owner::to_string).collect();
                warn!(
                    owner = %owner,
                    asked = %descriptor,
                    in_force = %serving,
                    held_by = owners.join(", "),
                    "an owner asks for other tunables of a service already served: those in force stay while their owners do"
                );
            }
            if active
                .owners
                .insert(owner.clone(), descriptor.clone())
                .is_none()
            {
                self.publish();
            }
            return Ok(());
        }
        let balancer_name = descriptor
            .option("balancer")
            .unwrap_or(&self.defaults.balancer);
        let balancer = self
            .plugins
            .new_balancer(balancer_name, balancer_config(descriptor))?;
        let listener = place.bind(addr, descriptor.protocol).await?;
        let mut service =
            Service::with_defaults(descriptor.clone(), balancer, &self.defaults.connections);
        service.copy_mode = self.defaults.copy_mode;
        service.cut = Arc::clone(&self.cut);
        service.checks = Arc::clone(&self.checks);
        let service = Arc::new(service);
        let discovery = Arc::new(DiscoveryStatus::default());
        let sink = ServiceSink::new(Arc::clone(&service), Arc::clone(&discovery));
        let watch = self
            .discovery
            .watch(watch_request(descriptor), sink)
            .map_err(|error| ServeError::Watch(error.to_string()))?;
        let stop = CancellationToken::new();
        let consumer = owner.container.as_ref().map_or("", |c| c.name.as_str());
        let span =
            info_span!("listener", service = %descriptor, %addr, first_owner = %owner, consumer);
        span.in_scope(|| {
            info!(
                balancer = balancer_name,
                endpoints = service.endpoints.load().len(),
                "listening"
            )
        });
        self.listeners.spawn(
            listener
                .serve(Arc::clone(&service), stop.clone(), self.connections.clone())
                .instrument(span),
        );
        self.active.insert(
            key,
            Active {
                service,
                owners: BTreeMap::from([(owner.clone(), descriptor.clone())]),
                stop,
                watch,
                balancer: balancer_name.to_string(),
                discovery,
            },
        );
        self.publish();
        Ok(())
    }

    /// Drops `owner`'s claim on `descriptor`; the last owner closes the listener and the watch.
    /// Connections already open continue until they end.
    pub fn remove(&mut self, descriptor: &ServiceDescriptor, owner: &Owner) {
        self.remove_in(&Place::Own, descriptor, owner);
    }

    /// [`Supervisor::remove`] for a listener in the namespace `place`.
    pub fn remove_in(&mut self, place: &Place, descriptor: &ServiceDescriptor, owner: &Owner) {
        let key = (
            place.namespace_id(),
            SocketAddr::new(self.defaults.bind, descriptor.port),
            descriptor.protocol,
        );
        let Some(active) = self.active.get_mut(&key) else {
            return;
        };
        if active.owners.get(owner) != Some(descriptor) {
            return;
        }
        active.owners.remove(owner);
        if active.owners.is_empty() {
            if let Some(mut active) = self.active.remove(&key) {
                active.stop.cancel();
                active.watch.stop();
                info!(service = %descriptor, last_owner = %owner, "listener released");
            }
        } else if let Err(error) = self.hand_over(key, owner) {
            warn!(service = %descriptor, %error, "the remaining owners' tunables cannot be applied: those in force stay");
        }
        self.publish();
    }

    /// After `left` has gone: when no remaining owner asks for the tunables in force, the
    /// first remaining owner's are applied in place (balancer swapped unless an operator set
    /// one, timeouts, limits and health policy stored, a changed check resubscribed).
    fn hand_over(&mut self, key: ListenKey, left: &Owner) -> Result<(), ControlError> {
        let Some(active) = self.active.get_mut(&key) else {
            return Ok(());
        };
        let in_force = active.service.in_force();
        if active.owners.values().any(|d| *d == *in_force) {
            return Ok(());
        }
        let Some((owner, next)) = active
            .owners
            .iter()
            .next()
            .map(|(o, d)| (o.clone(), d.clone()))
        else {
            return Ok(());
        };
        // A balancer an operator set (`ctl balancer`) stays: only the owners' own is replaced,
        // and anew when its options differ (a balancer is made with the descriptor's options).
        let default = self.defaults.balancer.as_str();
        let before = in_force.option("balancer").unwrap_or(default);
        let balancer = next.option("balancer").unwrap_or(default);
        let operator_set = active.balancer != before;
        if !operator_set && (balancer != before || next.options != in_force.options) {
            let refused = |reason: String| ControlError::Balancer {
                balancer: balancer.to_string(),
                reason,
            };
            let picker = self
                .plugins
                .new_balancer(balancer, balancer_config(&next))
                .map_err(|error| refused(error.to_string()))?;
            active
                .service
                .set_balancer(picker)
                .map_err(|error| refused(error.to_string()))?;
            active.balancer = balancer.to_string();
        }
        active
            .service
            .apply_tunables(&next, &self.defaults.connections);
        info!(
            service = %next,
            before = %in_force,
            owner = %owner,
            left = %left,
            "tunables applied in place: the owner whose tunables were in force has gone"
        );
        Ok(())
    }

    /// How many listeners are open.
    pub fn len(&self) -> usize {
        self.active.len()
    }

    pub fn is_empty(&self) -> bool {
        self.active.is_empty()
    }

    /// Stops accepting everywhere, then waits up to `grace` for open connections to finish,
    /// then resets those still open (a reset, not a FIN, so their clients can tell a cut stream
    /// from a finished one). `early` ends the grace period at once (a second stop signal); its
    /// output is returned beside how many connections were still open when the grace ended.
    pub async fn shutdown<T>(
        mut self,
        grace: Duration,
        early: impl std::future::Future<Output = T>,
    ) -> (usize, Option<T>) {
        for (_, mut active) in self.active.drain() {
            active.stop.cancel();
            active.watch.stop();
        }
        self.publish();
        self.listeners.close();
        self.listeners.wait().await;
        self.connections.close();
        let open = self.connections.len();
        if open > 0 {
            info!(connections = open, grace = ?grace, "waiting for open connections to finish");
        }
        let cut_early = tokio::select! {
            finished = tokio::time::timeout(grace, self.connections.wait()) => {
                if finished.is_ok() {
                    return (0, None);
                }
                None
            }
            early = early => Some(early),
        };
        let left = self.connections.len();
        self.cut.cut();
        let _ = tokio::time::timeout(CUT_WAIT, self.connections.wait()).await;
        (left, cut_early)
    }
}

/// What a balancer instance for `descriptor` is created with (also by `embassy check`).
pub fn balancer_config(descriptor: &ServiceDescriptor) -> BalancerConfig {
    BalancerConfig {
        service: descriptor.service.as_str().into(),
        options: options_of(descriptor),
    }
}

/// Replaces `active`'s watch with a new one, whose first answer is discovery's whole current
/// set. The new watch first: if it cannot start, the one in force keeps serving.
fn restart_watch(discovery: &DiscoveryBackend, active: &mut Active) -> Result<(), ControlError> {
    let sink = ServiceSink::new(Arc::clone(&active.service), Arc::clone(&active.discovery));
    let watch = discovery
        .watch(watch_request(&active.service.descriptor), sink)
        .map_err(|error| ControlError::Watch(error.to_string()))?;
    std::mem::replace(&mut active.watch, watch).stop();
    Ok(())
}

/// What a watch for `descriptor` asks discovery for.
fn watch_request(descriptor: &ServiceDescriptor) -> WatchRequest {
    WatchRequest {
        options: options_of(descriptor),
        ..WatchRequest::new(&descriptor.service, &descriptor.tags, descriptor.protocol)
    }
}

fn options_of(descriptor: &ServiceDescriptor) -> embassy_plugin_api::Options {
    descriptor
        .options
        .iter()
        .map(|(k, v)| abi_stable::std_types::Tuple2(k.as_str().into(), v.as_str().into()))
        .collect()
}
