//! `file://` discovery: endpoints from a JSON file, re-read when it changes.
//!
//! The file maps a service name to its endpoints:
//!
//! ```json
//! { "web": ["127.0.0.1:8001", {"address": "127.0.0.1:8002", "tags": ["prod"], "weight": 2}],
//!   "dns": [{"address": "127.0.0.1:5353", "proto": "udp"}] }
//! ```
//!
//! One thread per opened file polls it; every watch is answered from the last good content, so
//! a broken edit is reported once and changes nothing until the file is fixed. This is the
//! model for a third-party discovery plugin: the plugin owns its thread, and talks to the host
//! only through the sink.

mod services;

use std::{
    path::PathBuf,
    sync::{
        mpsc::{self, RecvTimeoutError},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use embassy_plugin_api::{
    export_discovery, option, BackendHealth, DiscoveryConfig, DiscoveryPlugin, Endpoint, HostSink,
    PluginError, WatchRequest,
};
pub use services::{parse_services, ServicesFile};
use tracing::{info, warn};

/// How often the file is checked unless `--discovery-opt poll_interval=...` says otherwise.
const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(250);

pub struct FileDiscovery {
    shared: Arc<Shared>,
    // Dropping the sender ends the polling thread.
    _stop: mpsc::Sender<()>,
}

struct Shared {
    path: PathBuf,
    state: Mutex<State>,
}

struct State {
    /// The last content read (good or bad), to notice changes.
    last_bytes: Option<Vec<u8>>,
    /// The last content that parsed; what every watch is answered from.
    good: ServicesFile,
    watches: Vec<Watch>,
    next_id: u64,
}

struct Watch {
    id: u64,
    request: WatchRequest,
    sink: HostSink,
    last_sent: Option<Vec<Endpoint>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reads the file; on a change parses it and pushes what changed to every watch.
    fn poll(&self) {
        let read = std::fs::read(&self.path);
        let mut state = self.lock();
        let bytes = match read {
            Ok(bytes) => bytes,
            Err(error) => {
                if state.last_bytes.take().is_some() {
                    let detail = format!(
                        "cannot read {}: {error}; keeping the last good endpoints",
                        self.path.display()
                    );
                    warn!("{detail}");
                    state.report_all(BackendHealth::Unreachable, &detail);
                }
                return;
            }
        };
        if state.last_bytes.as_deref() == Some(bytes.as_slice()) {
            return;
        }
        match parse_services(&bytes) {
            Ok(services) => {
                info!(path = %self.path.display(), services = services.len(), "services file loaded");
                state.good = services;
                state.report_all(BackendHealth::Reachable, "services file loaded");
                state.push_changes();
            }
            Err(error) => {
                let detail = format!(
                    "{}: {error}; keeping the last good endpoints",
                    self.path.display()
                );
                warn!("{detail}");
                state.report_all(BackendHealth::Invalid, &detail);
            }
        }
        state.last_bytes = Some(bytes);
    }
}

impl State {
    fn report_all(&self, health: BackendHealth, detail: &str) {
        for watch in &self.watches {
            watch.sink.report(health, detail);
        }
    }

    fn push_changes(&mut self) {
        for watch in &mut self.watches {
            let endpoints = self.good.endpoints_for(&watch.request);
            if watch.last_sent.as_ref() != Some(&endpoints) {
                watch.sink.update(endpoints.clone());
                watch.last_sent = Some(endpoints);
            }
        }
    }
}

/// A watch in progress; dropping it unregisters it.
pub struct FileWatch {
    id: u64,
    shared: Arc<Shared>,
}

impl Drop for FileWatch {
    fn drop(&mut self) {
        self.shared
            .lock()
            .watches
            .retain(|watch| watch.id != self.id);
    }
}

impl DiscoveryPlugin for FileDiscovery {
    const NAME: &'static str = "file";
    const SCHEMES: &'static [&'static str] = &["file"];
    const DESCRIPTION: &'static str =
        "endpoints from a JSON file (file:///path/services.json), re-read when it changes";
    type Watch = FileWatch;

    fn open(config: &DiscoveryConfig) -> Result<Self, PluginError> {
        let uri = config.uri.as_str();
        let path = uri
            .strip_prefix("file://")
            .filter(|path| !path.is_empty())
            .ok_or_else(|| {
                PluginError::new(format!(
                    "{uri:?} is not a file URI: expected file:///path/services.json"
                ))
            })?;
        let interval = match option(&config.options, "poll_interval") {
            None => DEFAULT_POLL_INTERVAL,
            Some(text) => parse_millis(text).ok_or_else(|| {
                PluginError::new(format!(
                    "poll_interval {text:?} is not a duration such as 250ms or 1s"
                ))
            })?,
        };
        let bytes = std::fs::read(path).map_err(|error| {
            PluginError::new(format!("cannot read services file {path}: {error}"))
        })?;
        let good = parse_services(&bytes)
            .map_err(|error| PluginError::new(format!("services file {path}: {error}")))?;
        let shared = Arc::new(Shared {
            path: PathBuf::from(path),
            state: Mutex::new(State {
                last_bytes: Some(bytes),
                good,
                watches: Vec::new(),
                next_id: 0,
            }),
        });
        let (stop, stopped) = mpsc::channel::<()>();
        let poller = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("embassy-file-discovery".into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                    poller.poll();
                }
            })
            .map_err(|error| {
                PluginError::new(format!("cannot start the file watcher thread: {error}"))
            })?;
        Ok(FileDiscovery {
            shared,
            _stop: stop,
        })
    }

    fn watch(&self, request: WatchRequest, sink: HostSink) -> Result<FileWatch, PluginError> {
        let mut state = self.shared.lock();
        let id = state.next_id;
        state.next_id += 1;
        let endpoints = state.good.endpoints_for(&request);
        if !state.good.contains(request.service.as_str()) {
            warn!(service = %request.service, path = %self.shared.path.display(), "service not in the services file (yet)");
        }
        sink.update(endpoints.clone());
        state.watches.push(Watch {
            id,
            request,
            sink,
            last_sent: Some(endpoints),
        });
        Ok(FileWatch {
            id,
            shared: Arc::clone(&self.shared),
        })
    }
}

/// `250ms`, `1s` or a bare number of milliseconds.
fn parse_millis(text: &str) -> Option<Duration> {
    let duration = if let Some(ms) = text.strip_suffix("ms") {
        Duration::from_millis(ms.parse().ok()?)
    } else if let Some(s) = text.strip_suffix('s') {
        Duration::from_secs(s.parse().ok()?)
    } else {
        Duration::from_millis(text.parse().ok()?)
    };
    (!duration.is_zero()).then_some(duration)
}

export_discovery!(FileDiscovery);
