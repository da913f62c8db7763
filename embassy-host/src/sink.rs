//! The host's side of a discovery watch: endpoint sets land in a service's snapshot.

use std::sync::{Arc, Mutex};

use abi_stable::std_types::{RStr, RVec};
use embassy_core::Service;
use embassy_plugin_api::{BackendHealth, Endpoint, EndpointSink};
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
        let change = self.service.endpoints.replace(&endpoints);
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
