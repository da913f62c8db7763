//! `dns://` discovery: a service's endpoints from DNS, re-resolved at the records' TTL.
//!
//! - [`config`]: the URI (`dns://` for the system resolver, `dns://SERVER[:PORT]`) and options.
//! - [`records`]: pure: what a descriptor's service asks (an SRV name or `HOST:PORT`) and
//!   what the records make of the set (priorities, weights, exclusions).
//! - [`schedule`]: pure: when to resolve again, and what a failure or NXDOMAIN does to the set.
//! - [`watch`]: the loop of one watch: resolve, push, sleep.
//!
//! A set lives until the next resolution, at the smallest TTL of the records that made it,
//! clamped to `[min_ttl, max_ttl]`. A failed resolution (timeout, SERVFAIL, REFUSED, no
//! server) keeps the last set and retries with backoff. NXDOMAIN or an empty answer keeps
//! the last set too, until the name has been missing for `nxdomain_hold`: a record deleted
//! and re-added, or a zone reloading, must not empty a service for a moment; a name that
//! never resolved is empty at once (there is nothing to hold).
//!
//! Each opened backend owns one small tokio runtime and one resolver (hickory, no cache: each
//! resolution asks the server, so the TTL it answers is the TTL we schedule by); every watch
//! is one task on it. The host is reached only through its sink.

pub mod config;
pub mod records;
pub mod schedule;
mod watch;

use std::sync::Arc;

use embassy_plugin_api::{
    export_discovery,
    support::{OptionError, WatchSink},
    BackendHealth, DiscoveryConfig, DiscoveryPlugin, HostSink, PluginError, WatchRequest,
};
use hickory_resolver::{
    config::{LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig},
    net::runtime::TokioRuntimeProvider,
    Resolver, TokioResolver,
};
use tokio::{
    runtime::Runtime,
    task::{AbortHandle, JoinHandle},
};

pub use config::DnsConfig;
pub use records::{parse_service, Query, ServiceError};

/// What can go wrong opening a `dns://` backend.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("discovery uri {uri:?}: {reason}")]
    Uri { uri: String, reason: &'static str },
    #[error(transparent)]
    Option(#[from] OptionError),
    #[error("cannot read the system resolver's configuration (/etc/resolv.conf): {0}")]
    SystemConfig(String),
    #[error("cannot start the dns resolver: {0}")]
    Start(String),
}

impl From<DnsError> for PluginError {
    fn from(error: DnsError) -> Self {
        PluginError::new(error.to_string())
    }
}

/// An opened `dns://` backend.
pub struct DnsDiscovery {
    runtime: Arc<OwnedRuntime>,
    resolver: TokioResolver,
    config: Arc<DnsConfig>,
}

/// The plugin's runtime; shut down without waiting once the backend and all its watches are
/// gone (dropping it normally would block on tasks that are mid-query).
struct OwnedRuntime(Option<Runtime>);

impl Drop for OwnedRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl OwnedRuntime {
    fn spawn(
        &self,
        future: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> JoinHandle<()> {
        match &self.0 {
            Some(runtime) => runtime.spawn(future),
            // Only `drop` takes the runtime, and nothing runs after that.
            None => unreachable!("runtime used after shutdown"),
        }
    }
}

/// A watch in progress; dropping it stops the task and closes its sink.
pub struct DnsWatch {
    task: AbortHandle,
    sink: Arc<WatchSink>,
    // Keeps the runtime alive while the watch runs, even if the backend is dropped first.
    _runtime: Arc<OwnedRuntime>,
}

impl Drop for DnsWatch {
    fn drop(&mut self) {
        // Closing first: the sink waits for a push under way, and refuses any later one.
        self.sink.close();
        self.task.abort();
    }
}

impl DiscoveryPlugin for DnsDiscovery {
    const NAME: &'static str = "dns";
    const SCHEMES: &'static [&'static str] = &["dns"];
    const DESCRIPTION: &'static str =
        "SRV records or the A/AAAA records of HOST:PORT, re-resolved at their TTL (dns:// for the system resolver, dns://SERVER[:PORT])";
    type Watch = DnsWatch;

    fn open(config: &DiscoveryConfig) -> Result<Self, PluginError> {
        let config = DnsConfig::parse(config.uri.as_str(), &config.options)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("embassy-dns")
            .enable_all()
            .build()
            .map_err(|error| DnsError::Start(error.to_string()))?;
        let resolver = {
            // The resolver's connections belong to this runtime.
            let _context = runtime.enter();
            build_resolver(&config)?
        };
        Ok(DnsDiscovery {
            runtime: Arc::new(OwnedRuntime(Some(runtime))),
            resolver,
            config: Arc::new(config),
        })
    }

    fn watch(&self, request: WatchRequest, sink: HostSink) -> Result<DnsWatch, PluginError> {
        let query = parse_service(request.service.as_str(), request.tags.as_slice())
            .map_err(|error| PluginError::new(error.to_string()))?;
        let sink = Arc::new(WatchSink::new(sink));
        let task = self.runtime.spawn(watch::run(
            self.resolver.clone(),
            Arc::clone(&self.config),
            watch::Target { query, request },
            Arc::clone(&sink),
        ));
        let abort = task.abort_handle();
        // A panic ends only this watch; the host hears of it instead of a silent stop (a
        // task, not a thread, so support::spawn_watch_thread does not apply).
        let reporter = Arc::clone(&sink);
        self.runtime.spawn(async move {
            if let Err(error) = task.await {
                if error.is_panic() {
                    let detail =
                        "the dns watch panicked and stopped; keeping the last known endpoints";
                    reporter.report(BackendHealth::Invalid, detail);
                }
            }
        });
        Ok(DnsWatch {
            task: abort,
            sink,
            _runtime: Arc::clone(&self.runtime),
        })
    }
}

/// The system resolver, or one server over UDP (TCP when an answer is truncated). No cache,
/// so every resolution asks the server; no hosts file for a given server.
fn build_resolver(config: &DnsConfig) -> Result<TokioResolver, DnsError> {
    let mut builder = match config.server {
        None => TokioResolver::builder_tokio()
            .map_err(|error| DnsError::SystemConfig(error.to_string()))?,
        Some(server) => {
            let mut name_server = NameServerConfig::udp_and_tcp(server.ip());
            for connection in &mut name_server.connections {
                connection.port = server.port();
            }
            let mut builder = Resolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![name_server]),
                TokioRuntimeProvider::default(),
            );
            builder.options_mut().use_hosts_file = ResolveHosts::Never;
            builder
        }
    };
    let options = builder.options_mut();
    options.cache_size = 0;
    options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    if let Some(timeout) = config.timeout {
        options.timeout = timeout;
    }
    if let Some(attempts) = config.attempts {
        options.attempts = attempts;
    }
    builder
        .build()
        .map_err(|error| DnsError::Start(error.to_string()))
}

export_discovery!(DnsDiscovery);
