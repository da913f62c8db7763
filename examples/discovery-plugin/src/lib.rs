//! `lines://PATH` discovery: services from a plain-text list (see [`records`]), re-read every
//! `interval` and pushed to the host when a watched service's set changes.
//!
//! The smallest complete discovery plugin, meant to be copied: `records` is the backend (replace
//! it with yours); this file is what every discovery plugin has: options checked against the
//! keys it knows, one thread per watch started through the support library (a panic there is
//! reported to the host, not lost), a sink that forwards only changes, and every instance left
//! out explained. See PLUGINS.md in the Embassy repository.

pub mod records;

use std::{
    path::PathBuf,
    sync::{
        mpsc::{self, RecvTimeoutError},
        Arc,
    },
    time::Duration,
};

use embassy_plugin_api::{
    export_discovery,
    support::{spawn_guarded, OptionReader, WatchSink},
    BackendHealth, DiscoveryConfig, DiscoveryPlugin, HostSink, PluginError, WatchRequest,
};

/// The options this plugin knows: anything else in `--discovery-opt` is refused at start.
const OPTIONS: &[(&str, &str)] = &[("interval", "how often the list is re-read (default 1s)")];
const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

pub struct Lines {
    path: PathBuf,
    interval: Duration,
}

/// A running watch: dropping it drops the sender, which ends the watch's thread.
pub struct Watch {
    _stop: mpsc::Sender<()>,
    sink: Arc<WatchSink>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        // Nothing reaches the host once the handle is gone, even from a read in progress.
        self.sink.close();
    }
}

impl DiscoveryPlugin for Lines {
    const NAME: &'static str = "lines";
    const SCHEMES: &'static [&'static str] = &["lines"];
    const DESCRIPTION: &'static str =
        "lines:///PATH: services from a plain-text list (example plugin)";
    type Watch = Watch;

    fn open(config: &DiscoveryConfig) -> Result<Self, PluginError> {
        let uri = config.uri.as_str();
        let path = uri
            .strip_prefix("lines://")
            .filter(|path| path.starts_with('/'))
            .ok_or_else(|| PluginError::new(format!("{uri:?} is not lines:///ABSOLUTE/PATH")))?;
        let options = OptionReader::new(Self::NAME, OPTIONS, &config.options)
            .map_err(|error| PluginError::new(error.to_string()))?;
        let interval = options
            .duration("interval", DEFAULT_INTERVAL)
            .map_err(|error| PluginError::new(error.to_string()))?;
        Ok(Lines {
            path: PathBuf::from(path),
            interval,
        })
    }

    fn watch(&self, request: WatchRequest, sink: HostSink) -> Result<Watch, PluginError> {
        let (stop, stopped) = mpsc::channel::<()>();
        let sink = Arc::new(WatchSink::new(sink));
        let (path, interval) = (self.path.clone(), self.interval);
        let (polling, reporting) = (Arc::clone(&sink), Arc::clone(&sink));
        let name = format!("lines {}", request.service);
        let body = move || loop {
            poll(&path, &request, &polling);
            match stopped.recv_timeout(interval) {
                Err(RecvTimeoutError::Timeout) => continue,
                _ => return, // the handle was dropped
            }
        };
        // A panic in `body` ends this watch only, and the host hears of it.
        let on_panic = move |error: PluginError| {
            reporting.report(BackendHealth::Invalid, &error.message);
        };
        spawn_guarded(name, body, on_panic)
            .map_err(|error| PluginError::new(format!("cannot start a watch thread: {error}")))?;
        Ok(Watch { _stop: stop, sink })
    }
}

/// One read of the list: the service's set (the sink drops it if unchanged), or a report.
fn poll(path: &std::path::Path, request: &WatchRequest, sink: &WatchSink) {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let (endpoints, excluded) = records::select(&records::parse(&text), request);
            sink.update_explained(endpoints, excluded);
            sink.report(BackendHealth::Reachable, "list read");
        }
        Err(error) => {
            let detail = format!(
                "cannot read {}: {error}; keeping the last endpoints",
                path.display()
            );
            sink.report(BackendHealth::Unreachable, &detail);
        }
    }
}

export_discovery!(Lines);

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use abi_stable::std_types::{RStr, RVec, Tuple2};
    use embassy_plugin_api::{Endpoint, EndpointSink, Excluded, Exclusion, Protocol};

    use super::*;

    /// A set as the host got it: addresses, and (instance, reason) of what was left out.
    type Set = (Vec<String>, Vec<(String, Exclusion)>);

    /// The host's side, as a test sees it: every set and report that reached it.
    #[derive(Default)]
    struct Recorded {
        sets: Mutex<Vec<Set>>,
    }

    /// What the test hands the plugin as the host's sink.
    struct Recorder(Arc<Recorded>);

    impl EndpointSink for Recorder {
        fn update(&self, endpoints: RVec<Endpoint>) {
            self.update_explained(endpoints, RVec::new());
        }

        fn report(&self, _: BackendHealth, _: RStr<'_>) {}

        fn update_explained(&self, endpoints: RVec<Endpoint>, excluded: RVec<Excluded>) {
            let addresses = endpoints.iter().map(|e| e.address.to_string()).collect();
            let excluded = excluded
                .iter()
                .map(|e| (e.instance.to_string(), e.reason))
                .collect();
            self.0
                .sets
                .lock()
                .expect("lock")
                .push((addresses, excluded));
        }
    }

    fn config(uri: &str, options: &[(&str, &str)]) -> DiscoveryConfig {
        DiscoveryConfig {
            uri: uri.into(),
            options: options
                .iter()
                .map(|(k, v)| Tuple2((*k).into(), (*v).into()))
                .collect(),
        }
    }

    #[test]
    fn open_refuses_bad_uris_and_unknown_options() {
        let error = |uri: &str, options: &[(&str, &str)]| {
            Lines::open(&config(uri, options))
                .err()
                .map(|e| e.message.to_string())
        };
        assert_eq!(error("lines:///tmp/list", &[("interval", "100ms")]), None);
        assert!(
            error("lines://relative", &[]).is_some_and(|e| e.contains("lines:///ABSOLUTE/PATH"))
        );
        assert!(error("lines:///tmp/list", &[("intervall", "1s")])
            .is_some_and(|e| e.contains("intervall")));
        assert!(
            error("lines:///tmp/list", &[("interval", "soon")]).is_some_and(|e| e.contains("soon"))
        );
    }

    #[test]
    fn a_watch_sends_changes_only_and_nothing_after_it_is_dropped() {
        let dir = std::env::temp_dir().join(format!("lines-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let list = dir.join("list");
        std::fs::write(&list, "web 127.0.0.1:1\nweb 127.0.0.1:2 proto=udp\n").expect("write");
        let backend = Lines::open(&config(
            &format!("lines://{}", list.display()),
            &[("interval", "20ms")],
        ))
        .expect("open");
        let recorded = Arc::new(Recorded::default());
        let watch = backend
            .watch(
                WatchRequest::new::<&str>("web", &[], Protocol::Tcp),
                HostSink::from_impl(Recorder(Arc::clone(&recorded))),
            )
            .expect("watch");
        let wait_for = |count: usize| {
            for _ in 0..500 {
                if recorded.sets.lock().expect("lock").len() >= count {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            panic!("no set {count} within 5 s");
        };
        wait_for(1);
        std::thread::sleep(Duration::from_millis(100)); // several polls of an unchanged list
        std::fs::write(&list, "web 127.0.0.1:3\n").expect("write");
        wait_for(2);
        drop(watch);
        std::fs::write(&list, "web 127.0.0.1:4\n").expect("write");
        std::thread::sleep(Duration::from_millis(100));
        let sets = recorded.sets.lock().expect("lock").clone();
        assert_eq!(
            sets,
            [
                (
                    vec!["127.0.0.1:1".to_string()],
                    vec![("line 2".to_string(), Exclusion::PROTOCOL)]
                ),
                (vec!["127.0.0.1:3".to_string()], vec![]),
            ],
            "one set per change, none after the drop"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
