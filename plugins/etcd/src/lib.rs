//! `etcd://` discovery: every key under a service's prefix is an instance, read once and then
//! followed with a watch (etcd v3 API).
//!
//! - [`instances`]: what a value says (service-registrar JSON, registrator `ip:port`, SkyDNS
//!   JSON), a pure function; a value in none of these is skipped with one warning naming its
//!   key.
//! - [`config`]: the URI (`etcd://`, `etcds://`) and the options (TLS files, user, backoff).
//! - [`follow`]: the read-then-watch loop of one service and the client all watches share.
//!
//! Each opened backend owns a small tokio runtime on its own thread: async never crosses the
//! plugin boundary, the host only sees whole endpoint sets arriving through its sink.

pub mod config;
mod follow;
pub mod instances;

use std::sync::Arc;

use embassy_plugin_api::{
    export_discovery, support::WatchSink, BackendHealth, DiscoveryConfig, DiscoveryPlugin,
    HostSink, PluginError, WatchRequest,
};
use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

pub use config::{ConfigError, EtcdConfig};
pub use instances::{parse_instance, Instance, ValueError};

use follow::Backend;

/// HTTP/2 pings on an idle connection, so a peer that vanished without closing is noticed.
const KEEP_ALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
const KEEP_ALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

pub struct EtcdDiscovery {
    backend: Arc<Backend>,
    runtime: Option<tokio::runtime::Runtime>,
}

/// A service being followed; dropping it ends the watch, after which the sink is never called.
pub struct EtcdWatch {
    sink: Arc<WatchSink>,
    task: tokio::task::AbortHandle,
}

impl Drop for EtcdWatch {
    fn drop(&mut self) {
        self.sink.close();
        self.task.abort();
    }
}

impl Drop for EtcdDiscovery {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl DiscoveryPlugin for EtcdDiscovery {
    const NAME: &'static str = "etcd";
    const SCHEMES: &'static [&'static str] = &["etcd", "etcds"];
    const DESCRIPTION: &'static str =
        "endpoints from the keys under an etcd v3 prefix (etcd://HOST:PORT[,HOST:PORT..]), watched live";
    type Watch = EtcdWatch;

    fn open(config: &DiscoveryConfig) -> Result<Self, PluginError> {
        let etcd = EtcdConfig::parse(config.uri.as_str(), &config.options)
            .map_err(|error| PluginError::new(error.to_string()))?;
        let options = connect_options(&etcd)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("embassy-etcd")
            .enable_all()
            .build()
            .map_err(|error| {
                PluginError::new(format!("cannot start the etcd plugin's runtime: {error}"))
            })?;
        Ok(EtcdDiscovery {
            backend: Arc::new(Backend::new(etcd, options)),
            runtime: Some(runtime),
        })
    }

    fn watch(&self, request: WatchRequest, sink: HostSink) -> Result<EtcdWatch, PluginError> {
        let runtime = self
            .runtime
            .as_ref()
            .ok_or_else(|| PluginError::new("the etcd backend is shutting down"))?;
        let sink = Arc::new(WatchSink::new(sink));
        let task = runtime.spawn(follow::follow(
            Arc::clone(&self.backend),
            request,
            Arc::clone(&sink),
        ));
        let abort = task.abort_handle();
        // A panic ends only this watch; the host hears of it instead of a silent stop (a
        // task, not a thread, so support::spawn_watch_thread does not apply).
        let reporter = Arc::clone(&sink);
        runtime.spawn(async move {
            if let Err(error) = task.await {
                if error.is_panic() {
                    let detail =
                        "the etcd watch panicked and stopped; keeping the last known endpoints";
                    reporter.report(BackendHealth::Invalid, detail);
                }
            }
        });
        Ok(EtcdWatch { sink, task: abort })
    }
}

/// The client's options; TLS files are read here so a wrong path fails `open` with its name.
fn connect_options(config: &EtcdConfig) -> Result<ConnectOptions, PluginError> {
    let mut options = ConnectOptions::new()
        .with_keep_alive(KEEP_ALIVE_INTERVAL, KEEP_ALIVE_TIMEOUT)
        .with_connect_timeout(config.request_timeout)
        // A member cut off from its cluster's leader fails the watch (and we retry, maybe on
        // another member) instead of keeping it open and silent.
        .with_require_leader(true);
    if let Some(files) = &config.tls {
        let read = |what: &str, path: &std::path::Path| {
            std::fs::read(path).map_err(|error| {
                PluginError::new(format!(
                    "cannot read TLS {what} {}: {error}",
                    path.display()
                ))
            })
        };
        let mut tls = TlsOptions::new();
        if let Some(ca) = &files.ca {
            tls = tls.ca_certificate(Certificate::from_pem(read("ca", ca)?));
        }
        if let (Some(cert), Some(key)) = (&files.cert, &files.key) {
            tls = tls.identity(Identity::from_pem(read("cert", cert)?, read("key", key)?));
        }
        options = options.with_tls(tls);
    }
    if let Some((name, password)) = &config.user {
        options = options
            .with_user(name.clone(), password.clone())
            .with_auto_token_refresh(true);
    }
    Ok(options)
}

export_discovery!(EtcdDiscovery);
