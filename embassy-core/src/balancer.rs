//! The engine's view of a balancer: anything that picks an index from endpoint views.

use std::net::SocketAddr;

use abi_stable::std_types::RSlice;
use embassy_plugin_api::{v1_0, BalancerBox, EndpointView, PluginError};

/// Picks the endpoint for the next connection. Runs on the accept path: no I/O, no blocking.
pub trait Picker: Send + Sync {
    /// The pick for a connection from `client`: `Ok(None)` when no endpoint is acceptable,
    /// `Err` when the balancer itself failed.
    fn pick(
        &self,
        endpoints: &[EndpointView],
        client: SocketAddr,
    ) -> Result<Option<usize>, PluginError>;

    /// The set is now `endpoints`; called before the first pick over it, off the connection
    /// path.
    fn endpoints_changed(&self, endpoints: &[EndpointView]) -> Result<(), PluginError> {
        let _ = endpoints;
        Ok(())
    }
}

/// A balancer loaded from a plugin library built against the current contract.
impl Picker for BalancerBox {
    #[inline]
    fn pick(
        &self,
        endpoints: &[EndpointView],
        client: SocketAddr,
    ) -> Result<Option<usize>, PluginError> {
        embassy_plugin_api::Balancer::pick_for(self, RSlice::from_slice(endpoints), client.into())
            .into_result()
            .map(Into::into)
    }

    fn endpoints_changed(&self, endpoints: &[EndpointView]) -> Result<(), PluginError> {
        embassy_plugin_api::Balancer::endpoints_changed(self, RSlice::from_slice(endpoints))
            .into_result()
    }
}

/// A balancer built against contract 1.0: no client address, no set-change hook.
impl Picker for v1_0::BalancerBox {
    #[inline]
    fn pick(
        &self,
        endpoints: &[EndpointView],
        _: SocketAddr,
    ) -> Result<Option<usize>, PluginError> {
        v1_0::Balancer::pick(self, RSlice::from_slice(endpoints))
            .into_result()
            .map(Into::into)
    }
}

/// A plain function, for tests and benchmarks.
impl<F> Picker for F
where
    F: Fn(&[EndpointView]) -> Option<usize> + Send + Sync,
{
    fn pick(
        &self,
        endpoints: &[EndpointView],
        _: SocketAddr,
    ) -> Result<Option<usize>, PluginError> {
        Ok(self(endpoints))
    }
}
