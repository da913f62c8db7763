//! Round robin: each new connection goes to the next endpoint in turn.
//!
//! One counter per service instance, advanced with a relaxed `fetch_add`: the host picks in
//! each listener's accept loop, so the counter is not contended across threads.

use std::sync::atomic::{AtomicUsize, Ordering};

use embassy_plugin_api::{
    export_balancer, BalancerConfig, BalancerPlugin, EndpointView, PluginError,
};

pub struct RoundRobin {
    next: AtomicUsize,
}

impl BalancerPlugin for RoundRobin {
    const NAME: &'static str = "round-robin";
    const DESCRIPTION: &'static str = "each new connection goes to the next endpoint in turn";

    fn new(_: &BalancerConfig) -> Result<Self, PluginError> {
        Ok(RoundRobin {
            next: AtomicUsize::new(0),
        })
    }

    #[inline]
    fn pick(&self, endpoints: &[EndpointView]) -> Option<usize> {
        if endpoints.is_empty() {
            return None;
        }
        Some(self.next.fetch_add(1, Ordering::Relaxed) % endpoints.len())
    }
}

export_balancer!(RoundRobin);
