//! The engine's view of a balancer: anything that picks an index from endpoint views.

use abi_stable::std_types::RSlice;
use embassy_plugin_api::{BalancerBox, EndpointView, PluginError};

/// Picks the endpoint for the next connection. Runs on the accept path: no I/O, no blocking.
pub trait Picker: Send + Sync {
    /// `Ok(None)` when no endpoint is acceptable; `Err` when the balancer itself failed.
    fn pick(&self, endpoints: &[EndpointView]) -> Result<Option<usize>, PluginError>;
}

/// A balancer loaded from a plugin library.
impl Picker for BalancerBox {
    #[inline]
    fn pick(&self, endpoints: &[EndpointView]) -> Result<Option<usize>, PluginError> {
        embassy_plugin_api::Balancer::pick(self, RSlice::from_slice(endpoints))
            .into_result()
            .map(Into::into)
    }
}

impl<F> Picker for F
where
    F: Fn(&[EndpointView]) -> Option<usize> + Send + Sync,
{
    fn pick(&self, endpoints: &[EndpointView]) -> Result<Option<usize>, PluginError> {
        Ok(self(endpoints))
    }
}
