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
//! a broken edit is reported once and changes nothing until the file is fixed. A new watch
//! reads the file first, so the host's resync (a watch restarted) sees it as it is now. This is the
//! model for a third-party discovery plugin: the plugin owns its thread (started with
//! `support::spawn_guarded`, so a panic is reported to every watch, not lost), reads its
//! options through `support::OptionReader`, builds each set with `support::Selector` (which
//! explains every entry left out) and talks to the host only through a `support::WatchSink`.

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
    export_discovery,
    support::{spawn_guarded, OptionReader, WatchSink},
    BackendHealth, DiscoveryConfig, DiscoveryPlugin, HostSink, PluginError, WatchRequest,
};
pub use services::{parse_services, ServicesFile};
use tracing::{info, warn};

/// How often the file is checked unless `--discovery-opt poll_interval=...` says otherwise.
const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Every `--discovery-opt` the plugin takes; any other is refused.
pub const OPTIONS: &[(&str, &str)] = &[(
    "poll_interval",
    "how often the file is checked for changes (default 250ms)",
)];

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
    /// Drops a set equal to the last one, so an edit elsewhere in the file pushes nothing here.
    sink: WatchSink,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reads the file; on a change parses it and pushes what changed to every watch.
    fn poll(&self) {
        // Read under the lock: a new watch polls too, and an older read must never be
        // applied after a newer one.
        let mut state = self.lock();
        let read = std::fs::read(&self.path);
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

    fn push_changes(&self) {
        for watch in &self.watches {
            let (endpoints, excluded) = self.good.select(&watch.request);
            watch.sink.update_explained(endpoints, excluded);
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
        let interval = OptionReader::new("file", OPTIONS, &config.options)
            .and_then(|options| options.duration("poll_interval", DEFAULT_POLL_INTERVAL))
            .map_err(|error| PluginError::new(error.to_string()))?;
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
        let reporter = Arc::clone(&shared);
        spawn_guarded(
            "embassy-file-discovery".into(),
            move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                    poller.poll();
                }
            },
            // The watches keep their last sets; the host hears that no change will come.
            move |error| {
                let detail = format!(
                    "the watcher of {} panicked and stopped: {}; keeping the last endpoints",
                    reporter.path.display(),
                    error.message
                );
                reporter.lock().report_all(BackendHealth::Invalid, &detail);
            },
        )
        .map_err(|error| {
            PluginError::new(format!("cannot start the file watcher thread: {error}"))
        })?;
        Ok(FileDiscovery {
            shared,
            _stop: stop,
        })
    }

    fn watch(&self, request: WatchRequest, sink: HostSink) -> Result<FileWatch, PluginError> {
        // What changed since the last poll reaches the watches already open first.
        self.shared.poll();
        let mut state = self.shared.lock();
        let id = state.next_id;
        state.next_id += 1;
        let (endpoints, excluded) = state.good.select(&request);
        if !state.good.contains(request.service.as_str()) {
            warn!(service = %request.service, path = %self.shared.path.display(), "service not in the services file (yet)");
        }
        let sink = WatchSink::new(sink);
        sink.update_explained(endpoints, excluded);
        state.watches.push(Watch { id, request, sink });
        Ok(FileWatch {
            id,
            shared: Arc::clone(&self.shared),
        })
    }
}

export_discovery!(FileDiscovery);
