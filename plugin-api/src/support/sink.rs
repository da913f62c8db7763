//! The host's sink as a watch should hold it: closed for good when the watch stops, and
//! deaf to repeats, so a plugin can push after every event without flooding the host.

use std::sync::{Mutex, MutexGuard};

use crate::{BackendHealth, Endpoint, Excluded, HostSink};

/// A [`HostSink`] behind a gate that [`WatchSink::close`] shuts. A set (endpoints and
/// exclusions) equal to the last one sent is dropped, and so is a report equal to the last.
pub struct WatchSink {
    state: Mutex<State>,
}

struct State {
    /// `None` once closed.
    sink: Option<HostSink>,
    last_set: Option<(Vec<Endpoint>, Vec<Excluded>)>,
    last_report: Option<(BackendHealth, String)>,
}

impl WatchSink {
    pub fn new(sink: HostSink) -> Self {
        WatchSink {
            state: Mutex::new(State {
                sink: Some(sink),
                last_set: None,
                last_report: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding it leaves nothing half-done: every field is replaced whole.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Shuts the gate; returns once no call is in flight, and nothing reaches the host after.
    pub fn close(&self) {
        self.lock().sink = None;
    }

    pub fn is_closed(&self) -> bool {
        self.lock().sink.is_none()
    }

    /// Sends the set and what was left out of it, unless both equal the last ones sent.
    /// Returns whether it was sent.
    pub fn update_explained(&self, endpoints: Vec<Endpoint>, excluded: Vec<Excluded>) -> bool {
        let mut state = self.lock();
        let Some(sink) = state.sink.clone() else {
            return false;
        };
        if state
            .last_set
            .as_ref()
            .is_some_and(|(e, x)| *e == endpoints && *x == excluded)
        {
            return false;
        }
        // Sent under the lock, so `close` waits for it.
        sink.update_explained(endpoints.clone(), excluded.clone());
        state.last_set = Some((endpoints, excluded));
        true
    }

    /// [`WatchSink::update_explained`] with nothing left out.
    pub fn update(&self, endpoints: Vec<Endpoint>) -> bool {
        self.update_explained(endpoints, Vec::new())
    }

    /// Sends a change in the backend's state, unless it equals the last one sent.
    pub fn report(&self, health: BackendHealth, detail: &str) -> bool {
        let mut state = self.lock();
        let Some(sink) = state.sink.clone() else {
            return false;
        };
        if state
            .last_report
            .as_ref()
            .is_some_and(|(h, d)| *h == health && d == detail)
        {
            return false;
        }
        sink.report(health, detail);
        state.last_report = Some((health, detail.to_string()));
        true
    }
}

impl std::fmt::Debug for WatchSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WatchSink")
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use abi_stable::std_types::{RStr, RVec};

    use super::*;
    use crate::{EndpointSink, Exclusion};

    /// Every call the host would see, as text.
    #[derive(Clone, Default)]
    struct Host(Arc<Mutex<Vec<String>>>);

    impl EndpointSink for Host {
        fn update(&self, endpoints: RVec<Endpoint>) {
            self.update_explained(endpoints, RVec::new());
        }

        fn report(&self, health: BackendHealth, detail: RStr<'_>) {
            self.0
                .lock()
                .expect("host")
                .push(format!("report {health:?} {detail}"));
        }

        fn update_explained(&self, endpoints: RVec<Endpoint>, excluded: RVec<Excluded>) {
            let endpoints: Vec<String> = endpoints.iter().map(|e| e.address.to_string()).collect();
            let excluded: Vec<String> = excluded
                .iter()
                .map(|x| format!("{}:{}", x.instance, x.reason))
                .collect();
            self.0.lock().expect("host").push(format!(
                "set [{}] excluded [{}]",
                endpoints.join(" "),
                excluded.join(" ")
            ));
        }
    }

    #[test]
    fn repeats_are_dropped_and_close_is_final() {
        let host = Host::default();
        let sink = WatchSink::new(HostSink::from_impl(host.clone()));
        let a = || vec![Endpoint::new("127.0.0.1:1")];
        let bad = || vec![Excluded::new("k", Exclusion::UNREADABLE, "bad")];
        assert!(sink.update(a()));
        assert!(!sink.update(a()));
        assert!(sink.update_explained(a(), bad()), "same set, new exclusion");
        assert!(!sink.update_explained(a(), bad()));
        assert!(sink.update(Vec::new()));
        assert!(sink.report(BackendHealth::Unreachable, "down"));
        assert!(!sink.report(BackendHealth::Unreachable, "down"));
        assert!(sink.report(BackendHealth::Unreachable, "down, differently"));
        assert!(sink.report(BackendHealth::Reachable, "back"));
        sink.close();
        assert!(sink.is_closed());
        assert!(!sink.update(a()));
        assert!(!sink.report(BackendHealth::Invalid, "after close"));
        assert_eq!(
            *host.0.lock().expect("host"),
            [
                "set [127.0.0.1:1] excluded []",
                "set [127.0.0.1:1] excluded [k:unreadable]",
                "set [] excluded []",
                "report Unreachable down",
                "report Unreachable down, differently",
                "report Reachable back",
            ]
        );
    }
}
