//! Balancers: pick one endpoint per connection.

use abi_stable::{
    sabi_trait,
    std_types::{RBox, ROk, ROption, RResult, RSlice, RString},
    StableAbi,
};

use crate::{ClientAddress, EndpointView, Options, PluginError};

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
/// The pick methods run once per connection on the accept path: they must not allocate, lock
/// or block. `Ok(None)` means "no endpoint is acceptable"; an error is a bug in the plugin (a
/// caught panic), reported by the host and failing only that connection.
#[sabi_trait]
pub trait Balancer: Send + Sync {
    /// 1.0: the pick of a host that predates 1.1. A 1.1 host calls [`pick_for`] instead.
    ///
    /// [`pick_for`]: Balancer::pick_for
    #[sabi(last_prefix_field)]
    fn pick(&self, endpoints: RSlice<'_, EndpointView>) -> RResult<ROption<usize>, PluginError>;

    /// 1.1: the pick for a connection (or datagram session) from `client`.
    fn pick_for(
        &self,
        endpoints: RSlice<'_, EndpointView>,
        client: ClientAddress,
    ) -> RResult<ROption<usize>, PluginError> {
        let _ = client;
        self.pick(endpoints)
    }

    /// 1.1: the service's endpoint set is now `endpoints` (same order as the picks will see),
    /// called off the connection path before the first pick over it, so a balancer can
    /// precompute what its picks read. Picks over the previous set may still run meanwhile.
    fn endpoints_changed(&self, endpoints: RSlice<'_, EndpointView>) -> RResult<(), PluginError> {
        let _ = endpoints;
        ROk(())
    }
}

/// A balancer instance as the host owns it.
pub type BalancerBox = Balancer_TO<'static, RBox<()>>;

/// What a balancer plugin author implements; [`crate::export_balancer!`] does the rest.
///
/// Threading: one instance per service, called from any thread, picks possibly concurrently
/// with each other and with [`endpoints_changed`](BalancerPlugin::endpoints_changed). A pick
/// may see a set of another length than the last `endpoints_changed` (a connection that
/// loaded the previous set): index only into the slice it is given.
pub trait BalancerPlugin: Send + Sync + Sized + 'static {
    /// The name services select it by (`balancer=NAME`).
    const NAME: &'static str;
    /// One line for `embassy plugins`.
    const DESCRIPTION: &'static str;
    /// True when the policy depends on [`pick_for`](BalancerPlugin::pick_for) or
    /// [`endpoints_changed`](BalancerPlugin::endpoints_changed): in a host older than 1.1 its
    /// first pick then logs that it falls back to [`pick`](BalancerPlugin::pick).
    const NEEDS_CONTRACT_1_1: bool = false;

    /// A new instance for one service.
    fn new(config: &BalancerConfig) -> Result<Self, PluginError>;

    /// The index of the endpoint the next connection goes to, or `None`. Also what a host
    /// older than 1.1 calls, without the client's address.
    fn pick(&self, endpoints: &[EndpointView]) -> Option<usize>;

    /// The pick for a connection from `client` (1.1 hosts). Affinity policies override it.
    fn pick_for(&self, endpoints: &[EndpointView], client: ClientAddress) -> Option<usize> {
        let _ = client;
        self.pick(endpoints)
    }

    /// The set changed (1.1 hosts): rebuild whatever the picks read, here and not per pick.
    fn endpoints_changed(&self, endpoints: &[EndpointView]) {
        let _ = endpoints;
    }
}
