//! Running a real watch loop in unit tests and recording what it pushes.

use std::{
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use abi_stable::std_types::{RStr, RVec};
use embassy_plugin_api::{
    support::WatchSink, BackendHealth, Endpoint, EndpointSink, HostSink, Protocol, WatchRequest,
};

/// Records every set the plugin pushes, as sorted address lists, and every health report.
#[derive(Clone, Default)]
struct Recorder {
    sets: Arc<Mutex<Vec<Vec<String>>>>,
    reports: Arc<Mutex<Vec<String>>>,
}

impl EndpointSink for Recorder {
    fn update(&self, endpoints: RVec<Endpoint>) {
        let mut set: Vec<String> = endpoints.iter().map(|e| e.address.to_string()).collect();
        set.sort();
        self.sets.lock().expect("recorder").push(set);
    }

    fn report(&self, health: BackendHealth, detail: RStr<'_>) {
        let report = format!("{health:?}: {detail}");
        self.reports.lock().expect("recorder").push(report);
    }
}

pub(crate) fn request(service: &str, tags: &[&str], protocol: Protocol) -> WatchRequest {
    WatchRequest::new(service, tags, protocol)
}

/// A watch loop on its own runtime, recording what it pushes.
pub(crate) struct Following {
    recorder: Recorder,
    _runtime: tokio::runtime::Runtime,
}

impl Following {
    /// Runs the loop `follow` makes for a sink.
    pub(crate) fn start<F>(follow: impl FnOnce(Arc<WatchSink>) -> F) -> Following
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let recorder = Recorder::default();
        let sink = Arc::new(WatchSink::new(HostSink::from_impl(recorder.clone())));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.spawn(follow(sink));
        Following {
            recorder,
            _runtime: runtime,
        }
    }

    /// Waits (at most 10 s) until `addresses` (sorted) was pushed.
    pub(crate) fn wait_for(&self, addresses: &[&str]) {
        let wanted: Vec<String> = addresses.iter().map(|a| a.to_string()).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.sets().contains(&wanted) {
            assert!(
                Instant::now() < deadline,
                "waiting for {wanted:?}; sets: {:?}",
                self.sets()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub(crate) fn sets(&self) -> Vec<Vec<String>> {
        self.recorder.sets.lock().expect("recorder").clone()
    }

    /// The health reports so far, as `Health: detail`.
    pub(crate) fn reports(&self) -> Vec<String> {
        self.recorder.reports.lock().expect("recorder").clone()
    }
}
