//! The host's side of a discovery watch: endpoint sets land in a service's snapshot, and what
//! the watch says lands in the read model ([`DiscoveryStatus`]).

use std::sync::Arc;

use abi_stable::std_types::{RStr, RVec};
use embassy_core::{endpoints::UpstreamAddr, Service};
use embassy_plugin_api::{BackendHealth, Endpoint, EndpointSink, Excluded, Exclusion};
use tracing::{info, warn};

use crate::state::DiscoveryStatus;

/// Feeds one service from one watch. Called from the discovery plugin's own threads.
pub struct ServiceSink {
    service: Arc<Service>,
    label: String,
    status: Arc<DiscoveryStatus>,
}

impl ServiceSink {
    pub fn new(service: Arc<Service>, status: Arc<DiscoveryStatus>) -> Self {
        let label = service.descriptor.to_string();
        ServiceSink {
            service,
            label,
            status,
        }
    }
}

impl EndpointSink for ServiceSink {
    fn update(&self, endpoints: RVec<Endpoint>) {
        self.update_explained(endpoints, RVec::new());
    }

    fn update_explained(&self, endpoints: RVec<Endpoint>, excluded: RVec<Excluded>) {
        let mut excluded = excluded.into_vec();
        // An address the host cannot use is left out like any other instance, with the reason.
        let (endpoints, unusable): (Vec<Endpoint>, Vec<Endpoint>) = endpoints
            .into_iter()
            .partition(|e| UpstreamAddr::parse(e.address.as_str()).is_some());
        for endpoint in &unusable {
            warn!(service = %self.label, address = %embassy_plugin_api::text::cut(&endpoint.address), "endpoint address is not host:port, ignored");
            excluded.push(Excluded::new(
                endpoint.address.as_str(),
                Exclusion::UNREADABLE,
                "the address is not HOST:PORT",
            ));
        }
        excluded.sort();
        excluded.dedup();
        let before = self.service.endpoints.load();
        if before.excluded() != excluded.as_slice() {
            log_exclusions(&self.label, before.excluded(), &excluded);
        }
        drop(before);
        let change = self.service.replace_endpoints(&endpoints, excluded);
        self.status.updated();
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
        let (changed, detail_changed) = self.status.reported(health, detail.as_str());
        match health {
            BackendHealth::Reachable if changed => {
                info!(service = %self.label, %detail, "discovery backend recovered")
            }
            BackendHealth::Reachable => {}
            // A plugin repeating its report (every retry) says nothing new: one line per state,
            // or per new reason within it.
            _ if !changed && !detail_changed => {}
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
