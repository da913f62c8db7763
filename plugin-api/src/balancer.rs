//! Balancers: pick one endpoint per connection.

use abi_stable::{
    sabi_trait,
    std_types::{RBox, ROption, RResult, RSlice, RString},
    StableAbi,
};

use crate::{EndpointView, Options, PluginError};

/// What a balancer is created with: one instance per service.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct BalancerConfig {
    /// The service the instance balances (for the plugin's logs).
    pub service: RString,
    /// The descriptor's options (`balancer=...` included).
    pub options: Options,
}

/// The ABI-level balancer object the host holds.
///
/// `pick` runs once per connection on the accept path: it must not allocate, lock or block.
/// `Ok(None)` means "no endpoint is acceptable"; an error is a bug in the plugin (a caught
/// panic), reported by the host and failing only that connection.
#[sabi_trait]
pub trait Balancer: Send + Sync {
    #[sabi(last_prefix_field)]
    fn pick(&self, endpoints: RSlice<'_, EndpointView>) -> RResult<ROption<usize>, PluginError>;
}

/// A balancer instance as the host owns it.
pub type BalancerBox = Balancer_TO<'static, RBox<()>>;

/// What a balancer plugin author implements; [`crate::export_balancer!`] does the rest.
pub trait BalancerPlugin: Send + Sync + Sized + 'static {
    /// The name services select it by (`balancer=NAME`).
    const NAME: &'static str;
    /// One line for `embassy plugins`.
    const DESCRIPTION: &'static str;

    /// A new instance for one service.
    fn new(config: &BalancerConfig) -> Result<Self, PluginError>;

    /// The index of the endpoint the next connection goes to, or `None`.
    fn pick(&self, endpoints: &[EndpointView]) -> Option<usize>;
}
