//! Threads a discovery plugin owns, with a panic reported to the host instead of a silent stop.

use std::{
    panic::{catch_unwind, AssertUnwindSafe},
    thread::JoinHandle,
};

use crate::{BackendHealth, HostSink, PluginError};

/// Runs `body` on a thread named `name`; a panic ends only this thread and is handed to
/// `on_panic` (to report it to the watches the thread served).
pub fn spawn_guarded<F, P>(name: String, body: F, on_panic: P) -> std::io::Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
    P: FnOnce(PluginError) + Send + 'static,
{
    std::thread::Builder::new().name(name).spawn(move || {
        if let Err(payload) = catch_unwind(AssertUnwindSafe(body)) {
            let error = PluginError::from_panic(payload.as_ref());
            // A panicking reporter must not unwind either: the thread is ending anyway.
            let _ = catch_unwind(AssertUnwindSafe(move || on_panic(error)));
        }
    })
}

/// Runs one watch's loop on a thread of its own: a panic ends only this watch and is reported
/// through its sink as [`BackendHealth::Invalid`].
pub fn spawn_watch_thread<F>(
    name: String,
    sink: HostSink,
    body: F,
) -> std::io::Result<JoinHandle<()>>
where
    F: FnOnce(HostSink) + Send + 'static,
{
    let reporter = sink.clone();
    spawn_guarded(
        name,
        move || body(sink),
        move |error| reporter.report(BackendHealth::Invalid, &error.message),
    )
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use abi_stable::std_types::{RStr, RVec};

    use super::*;
    use crate::{Endpoint, EndpointSink};

    #[derive(Clone, Default)]
    struct Reports(Arc<Mutex<Vec<String>>>);

    impl EndpointSink for Reports {
        fn update(&self, _: RVec<Endpoint>) {}

        fn report(&self, health: BackendHealth, detail: RStr<'_>) {
            self.0
                .lock()
                .expect("reports")
                .push(format!("{health:?} {detail}"));
        }
    }

    #[test]
    fn a_panic_is_reported_not_lost() {
        let reports = Reports::default();
        let thread = spawn_watch_thread(
            "test-watch".into(),
            HostSink::from_impl(reports.clone()),
            |_| panic!("the backend sent nonsense"),
        )
        .expect("thread");
        thread.join().expect("the panic is caught");
        let seen = reports.0.lock().expect("reports").clone();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert!(
            seen[0].starts_with("Invalid ") && seen[0].contains("the backend sent nonsense"),
            "{seen:?}"
        );
    }
}
