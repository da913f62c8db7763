//! `consul://` discovery: the healthy instances of a Consul service, followed with blocking
//! queries on `/v1/health/service/:service`.
//!
//! - [`config`]: the URI and options (token, datacenter, CA file, timings).
//! - [`health`]: pure logic: query parameters, the answer's meaning, the index rules.
//! - [`watch`]: the loop of one watch: block, compare, push; back off and resync on trouble.
//!
//! Each opened backend owns a small tokio runtime; every watch is one task on it, so fifty
//! services blocking at once cost fifty idle connections, not fifty threads, and none waits
//! for another. The host is reached only through its sink.

pub mod config;
pub mod health;
pub mod watch;

use std::sync::Arc;

use embassy_plugin_api::{
    export_discovery,
    support::{OptionError, WatchSink},
    BackendHealth, DiscoveryConfig, DiscoveryPlugin, HostSink, PluginError, WatchRequest,
};
use tokio::{
    runtime::Runtime,
    task::{AbortHandle, JoinHandle},
};

pub use config::ConsulConfig;
use watch::Target;

/// What can go wrong talking to Consul; every one ends a round, never the watch.
#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    #[error("discovery uri {uri:?}: {reason}")]
    Uri { uri: String, reason: &'static str },
    #[error(transparent)]
    Option(#[from] OptionError),
    #[error("ca_file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("cannot reach consul: {0}")]
    Http(String),
    #[error("consul answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("malformed answer from consul: {0}")]
    Malformed(String),
    #[error("consul answered without an X-Consul-Index header")]
    MissingIndex,
    #[error("consul answered with a bad X-Consul-Index {0:?}")]
    BadIndex(String),
    #[error("cannot start the consul client: {0}")]
    Start(String),
}

impl ConsulError {
    /// How the host should see the backend after this error.
    fn health(&self) -> BackendHealth {
        match self {
            ConsulError::Http(_) => BackendHealth::Unreachable,
            ConsulError::Status { status, .. } if *status >= 500 => BackendHealth::Unreachable,
            _ => BackendHealth::Invalid,
        }
    }
}

impl From<ConsulError> for PluginError {
    fn from(error: ConsulError) -> Self {
        PluginError::new(error.to_string())
    }
}

/// An opened `consul://` backend.
pub struct ConsulDiscovery {
    runtime: Arc<OwnedRuntime>,
    client: reqwest::Client,
    config: Arc<ConsulConfig>,
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
pub struct ConsulWatch {
    task: AbortHandle,
    sink: Arc<WatchSink>,
    // Keeps the runtime alive while the watch runs, even if the backend is dropped first.
    _runtime: Arc<OwnedRuntime>,
}

impl Drop for ConsulWatch {
    fn drop(&mut self) {
        // Closing first: the sink waits for a push under way, and refuses any later one.
        self.sink.close();
        self.task.abort();
    }
}

impl DiscoveryPlugin for ConsulDiscovery {
    const NAME: &'static str = "consul";
    const SCHEMES: &'static [&'static str] = &["consul", "consuls"];
    const DESCRIPTION: &'static str =
        "healthy instances of Consul services by name and tags (consul://HOST:8500, consuls:// for HTTPS)";
    type Watch = ConsulWatch;

    fn open(config: &DiscoveryConfig) -> Result<Self, PluginError> {
        let config = ConsulConfig::parse(
            config.uri.as_str(),
            &config.options,
            std::env::var("CONSUL_HTTP_TOKEN").ok(),
        )?;
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("embassy-consul/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(std::time::Duration::from_secs(5));
        if let Some(path) = &config.ca_file {
            let pem = std::fs::read(path).map_err(|error| ConsulError::CaFile {
                path: path.clone(),
                reason: error.to_string(),
            })?;
            let certificates = reqwest::Certificate::from_pem_bundle(&pem)
                .ok()
                .filter(|certificates| !certificates.is_empty())
                .ok_or_else(|| ConsulError::CaFile {
                    path: path.clone(),
                    reason: "no PEM certificate in it".into(),
                })?;
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        let client = builder
            .build()
            .map_err(|error| ConsulError::Start(error.to_string()))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("embassy-consul")
            .enable_all()
            .build()
            .map_err(|error| ConsulError::Start(error.to_string()))?;
        Ok(ConsulDiscovery {
            runtime: Arc::new(OwnedRuntime(Some(runtime))),
            client,
            config: Arc::new(config),
        })
    }

    fn watch(&self, request: WatchRequest, sink: HostSink) -> Result<ConsulWatch, PluginError> {
        let service = request.service.to_string();
        if service.is_empty() || service.contains('/') {
            return Err(PluginError::new(format!(
                "{service:?} is not a consul service name (a name such as redis.master, no '/')"
            )));
        }
        let target = Target {
            service,
            request,
            datacenter: self.config.datacenter.clone(),
        };
        let sink = Arc::new(WatchSink::new(sink));
        let task = self.runtime.spawn(watch::run(
            self.client.clone(),
            Arc::clone(&self.config),
            target,
            Arc::clone(&sink),
        ));
        let abort = task.abort_handle();
        // A panic ends only this watch; the host hears of it instead of a silent stop.
        let reporter = Arc::clone(&sink);
        self.runtime.spawn(async move {
            if let Err(error) = task.await {
                if error.is_panic() {
                    reporter.report(
                        BackendHealth::Invalid,
                        "the consul watch panicked and stopped",
                    );
                }
            }
        });
        Ok(ConsulWatch {
            task: abort,
            sink,
            _runtime: Arc::clone(&self.runtime),
        })
    }
}

export_discovery!(ConsulDiscovery);
