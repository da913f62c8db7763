//! `etcd://` discovery: every key under a service's prefix is an instance, read once and then
//! followed with a watch: etcd's v3 API (`etcd://`), or its v2 key space (`etcd2://`), where
//! registrator's etcd backend writes.
//!
//! - [`instances`]: what a value says (service-registrar JSON, registrator `ip:port`, SkyDNS
//!   JSON), a pure function; a value in none of these is skipped with one warning naming its
//!   key.
//! - [`config`]: the URI (`etcd://`, `etcds://`, `etcd2://`, `etcd2s://`) and the options
//!   (TLS files, user, backoff).
//! - `service`: what both APIs share: a service's set built from its keys, and the outage
//!   and failover rules with their log lines.
//! - `follow` (v3) and `follow_v2` with `keys_v2` (its answers, pure): the read-then-watch
//!   loop of one service and the client all watches share.
//!
//! Each opened backend owns a small tokio runtime on its own thread: async never crosses the
//! plugin boundary, the host only sees whole endpoint sets arriving through its sink.

pub mod config;
mod follow;
mod follow_v2;
pub mod instances;
mod keys_v2;
mod service;
#[cfg(test)]
mod testing;

use std::sync::Arc;

use embassy_plugin_api::{
    export_discovery, support::WatchSink, BackendHealth, DiscoveryConfig, DiscoveryPlugin,
    HostSink, PluginError, WatchRequest,
};
use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

pub use config::{Api, ConfigError, EtcdConfig};
pub use instances::{parse_instance, Instance, ValueError};
pub use keys_v2::V2Error;

/// HTTP/2 pings on an idle connection, so a peer that vanished without closing is noticed.
const KEEP_ALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
const KEEP_ALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

pub struct EtcdDiscovery {
    backend: Backend,
    runtime: Option<tokio::runtime::Runtime>,
}

/// The client all watches of one URI share, for the API its scheme names.
enum Backend {
    V3(Arc<follow::Backend>),
    V2(Arc<follow_v2::Backend>),
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
    const SCHEMES: &'static [&'static str] = &["etcd", "etcds", "etcd2", "etcd2s"];
    const DESCRIPTION: &'static str =
        "endpoints from the keys under an etcd prefix, watched live (v3 API: etcd://HOST:PORT[,HOST:PORT..]; v2: etcd2://...)";
    type Watch = EtcdWatch;

    fn open(config: &DiscoveryConfig) -> Result<Self, PluginError> {
        let etcd = EtcdConfig::parse(config.uri.as_str(), &config.options)
            .map_err(|error| PluginError::new(error.to_string()))?;
        let backend = match etcd.api {
            Api::V3 => {
                let options = connect_options(&etcd)?;
                Backend::V3(Arc::new(follow::Backend::new(etcd, options)))
            }
            Api::V2 => {
                let client = http_client(&etcd)?;
                Backend::V2(Arc::new(follow_v2::Backend::new(etcd, client)))
            }
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("embassy-etcd")
            .enable_all()
            .build()
            .map_err(|error| {
                PluginError::new(format!("cannot start the etcd plugin's runtime: {error}"))
            })?;
        Ok(EtcdDiscovery {
            backend,
            runtime: Some(runtime),
        })
    }

    fn watch(&self, request: WatchRequest, sink: HostSink) -> Result<EtcdWatch, PluginError> {
        let runtime = self
            .runtime
            .as_ref()
            .ok_or_else(|| PluginError::new("the etcd backend is shutting down"))?;
        let sink = Arc::new(WatchSink::new(sink));
        let task = match &self.backend {
            Backend::V3(backend) => runtime.spawn(follow::follow(
                Arc::clone(backend),
                request,
                Arc::clone(&sink),
            )),
            Backend::V2(backend) => runtime.spawn(follow_v2::follow(
                Arc::clone(backend),
                request,
                Arc::clone(&sink),
            )),
        };
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

/// The v2 API's HTTP client; TLS files are read here, as for v3.
fn http_client(config: &EtcdConfig) -> Result<reqwest::Client, PluginError> {
    let mut builder = reqwest::Client::builder()
        .user_agent(concat!("embassy-etcd/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(config.request_timeout)
        // A long poll is silent for long: keepalive probes notice a peer that vanished.
        .tcp_keepalive(KEEP_ALIVE_INTERVAL)
        .tcp_keepalive_interval(KEEP_ALIVE_TIMEOUT)
        .tcp_keepalive_retries(2);
    if let Some(files) = &config.tls {
        // etcd's CA only, as for v3: the public roots do not vouch for a cluster member.
        builder = builder.tls_built_in_root_certs(false);
        if let Some(ca) = &files.ca {
            let certificates = reqwest::Certificate::from_pem_bundle(&read("ca", ca)?)
                .ok()
                .filter(|certificates| !certificates.is_empty())
                .ok_or_else(|| {
                    PluginError::new(format!("TLS ca {}: no PEM certificate in it", ca.display()))
                })?;
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        if let (Some(cert), Some(key)) = (&files.cert, &files.key) {
            let mut pem = read("cert", cert)?;
            pem.push(b'\n');
            pem.extend(read("key", key)?);
            let identity = reqwest::Identity::from_pem(&pem).map_err(|error| {
                PluginError::new(format!(
                    "TLS cert {} with key {}: {error}",
                    cert.display(),
                    key.display()
                ))
            })?;
            builder = builder.identity(identity);
        }
    }
    builder
        .build()
        .map_err(|error| PluginError::new(format!("cannot start the etcd v2 client: {error}")))
}

fn read(what: &str, path: &std::path::Path) -> Result<Vec<u8>, PluginError> {
    std::fs::read(path).map_err(|error| {
        PluginError::new(format!(
            "cannot read TLS {what} {}: {error}",
            path.display()
        ))
    })
}

export_discovery!(EtcdDiscovery);
