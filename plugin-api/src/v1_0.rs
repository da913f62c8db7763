//! The 1.0 contract's interfaces that 1.1 extended, frozen, for the host side only.
//!
//! abi_stable accepts a library whose prefix types have *more* members than the host's, never
//! fewer: a 1.1 host checking a 1.0 library against the 1.1 types would refuse it. So the host
//! tries the current [`crate::PluginModRef`] first and, for a library built against 1.0, this
//! module's. Names and layouts here must stay exactly those of plugin-api 1.0.0 (abi_stable
//! compares type and member names); the types 1.1 left unchanged are shared. Plugin authors
//! never use this module.

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    sabi_trait,
    sabi_types::VersionStrings,
    std_types::{RArc, RBox, ROption, RResult, RSlice, RStr, RVec},
    StableAbi,
};

use crate::{
    BackendHealth, BalancerConfig, DiscoveryConfig, Endpoint, EndpointView, HostLogger,
    PluginError, PluginMetadata, WatchHandleBox, WatchRequest,
};

/// The 1.0 root module.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
pub struct PluginMod {
    pub metadata: extern "C" fn() -> PluginMetadata,
    pub install_logger: extern "C" fn(HostLogger),
    pub new_balancer: extern "C" fn(BalancerConfig) -> RResult<BalancerBox, PluginError>,
    #[sabi(last_prefix_field)]
    pub open_discovery: extern "C" fn(DiscoveryConfig) -> RResult<DiscoveryBox, PluginError>,
}

impl RootModule for PluginModRef {
    declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "embassy_plugin";
    const NAME: &'static str = "embassy_plugin";
    const VERSION_STRINGS: VersionStrings = VersionStrings {
        version: abi_stable::std_types::RStr::from_str("1.0.0"),
    };
}

/// The 1.0 balancer: `pick` without the client, no set-change hook.
#[sabi_trait]
pub trait Balancer: Send + Sync {
    #[sabi(last_prefix_field)]
    fn pick(&self, endpoints: RSlice<'_, EndpointView>) -> RResult<ROption<usize>, PluginError>;
}

pub type BalancerBox = Balancer_TO<'static, RBox<()>>;

/// The 1.0 sink: sets without the instances left out.
#[sabi_trait]
pub trait EndpointSink: Send + Sync {
    fn update(&self, endpoints: RVec<Endpoint>);

    #[sabi(last_prefix_field)]
    fn report(&self, health: BackendHealth, detail: RStr<'_>);
}

pub type EndpointSinkBox = EndpointSink_TO<'static, RArc<()>>;

/// Every current sink is a 1.0 sink too, so the host hands the same object to either.
impl<S: crate::EndpointSink> EndpointSink for S {
    fn update(&self, endpoints: RVec<Endpoint>) {
        crate::EndpointSink::update(self, endpoints)
    }

    fn report(&self, health: BackendHealth, detail: RStr<'_>) {
        crate::EndpointSink::report(self, health, detail)
    }
}

/// The 1.0 discovery backend: its watches take a 1.0 sink.
#[sabi_trait]
pub trait Discovery: Send + Sync {
    #[sabi(last_prefix_field)]
    fn watch(
        &self,
        request: WatchRequest,
        sink: EndpointSinkBox,
    ) -> RResult<WatchHandleBox, PluginError>;
}

pub type DiscoveryBox = Discovery_TO<'static, RBox<()>>;
