//! The host's side of a discovery watch: endpoint sets land in a service's snapshot.

use std::sync::{Arc, Mutex};

use abi_stable::std_types::{RStr, RVec};
use embassy_core::Service;
use embassy_plugin_api::{BackendHealth, Endpoint, EndpointSink, Excluded, Exclusion};
use tracing::{info, warn};

/// Feeds one service from one watch. Called from the discovery plugin's own threads.
pub struct ServiceSink {
    service: Arc<Service>,
    label: String,
    health: Mutex<BackendHealth>,
}

impl ServiceSink {
    pub fn new(service: Arc<Service>) -> Self {
        let label = service.descriptor.to_string();
        ServiceSink {
            service,
            label,
            health: Mutex::new(BackendHealth::Reachable),
        }
    }
}

impl EndpointSink for ServiceSink {
    fn update(&self, endpoints: RVec<Endpoint>) {
        self.update_explained(endpoints, RVec::new());
    }

    fn update_explained(&self, endpoints: RVec<Endpoint>, excluded: RVec<Excluded>) {
        let mut excluded = excluded.into_vec();
        excluded.sort();
        excluded.dedup();
        let before = self.service.endpoints.load();
        if before.excluded() != excluded.as_slice() {
            log_exclusions(&self.label, before.excluded(), &excluded);
        }
        drop(before);
        let change = self.service.replace_endpoints(&endpoints, excluded);
        for address in &change.rejected {
            warn!(service = %self.label, address, "endpoint address is not host:port, ignored");
        }
        if !change.added.is_empty() || !change.removed.is_empty() {
            info!(
                service = %self.label,
                endpoints = self.service.endpoints.load().len(),
                added = ?change.added,
                removed = ?change.removed,
                "endpoints updated"
            );
        }
    }

    fn report(&self, health: BackendHealth, detail: RStr<'_>) {
        let mut last = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let changed = *last != health;
        *last = health;
        match health {
            BackendHealth::Reachable if changed => {
                info!(service = %self.label, %detail, "discovery backend recovered")
            }
            BackendHealth::Reachable => {}
            BackendHealth::Unreachable => {
                warn!(service = %self.label, %detail, "discovery backend unreachable, serving the last known endpoints")
            }
            BackendHealth::Invalid => {
                warn!(service = %self.label, %detail, "discovery backend sent unusable data")
            }
        }
    }
}

/// One line when what discovery leaves out changes: how many, by reason, and the first few.
fn log_exclusions(service: &str, before: &[Excluded], now: &[Excluded]) {
    if now.is_empty() {
        info!(service, "discovery no longer leaves any instance out");
        return;
    }
    let mut by_reason: Vec<(String, usize)> = Vec::new();
    for excluded in now {
        let reason = excluded.reason.to_string();
        match by_reason.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, count)) => *count += 1,
            None => by_reason.push((reason, 1)),
        }
    }
    let reasons: Vec<String> = by_reason.iter().map(|(r, n)| format!("{r}: {n}")).collect();
    let newly: Vec<String> = now
        .iter()
        .filter(|e| !before.contains(e))
        .take(5)
        .map(|e| format!("{} ({}: {})", e.instance, e.reason, e.detail))
        .collect();
    // Tags, protocol and failing checks are selection working; bad records need someone.
    let faulty = now
        .iter()
        .any(|e| e.reason == Exclusion::UNREADABLE || e.reason == Exclusion::DUPLICATE);
    let reasons = reasons.join(", ");
    if faulty {
        warn!(service, left_out = now.len(), %reasons, newly_left_out = ?newly, "discovery leaves instances out of the set");
    } else {
        info!(service, left_out = now.len(), %reasons, newly_left_out = ?newly, "discovery leaves instances out of the set");
    }
}
