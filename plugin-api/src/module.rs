//! The root module every plugin library exports.

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings,
    sabi_types::VersionStrings,
    std_types::{RResult, RString, RVec},
    StableAbi,
};

use crate::{BalancerBox, BalancerConfig, DiscoveryBox, DiscoveryConfig, HostLogger, PluginError};

/// What a plugin provides.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginKind {
    Discovery,
    Balancer,
}

impl PluginKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::Discovery => "discovery",
            PluginKind::Balancer => "balancer",
        }
    }
}

/// Who the plugin is.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct PluginMetadata {
    pub name: RString,
    pub kind: PluginKind,
    /// The plugin crate's own version.
    pub version: RString,
    /// URI schemes served; empty for balancers.
    pub schemes: RVec<RString>,
    pub description: RString,
}

/// The root module. Every entry point catches panics (see [`crate::export`]).
///
/// A balancer plugin answers `open_discovery` with an error and a discovery plugin answers
/// `new_balancer` with one; the host only calls what `metadata().kind` says.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
pub struct PluginMod {
    pub metadata: extern "C" fn() -> PluginMetadata,
    /// Routes the plugin's `tracing` output to the host; called once, right after loading.
    pub install_logger: extern "C" fn(HostLogger),
    pub new_balancer: extern "C" fn(BalancerConfig) -> RResult<BalancerBox, PluginError>,
    /// Fields added in later 1.x versions go after this one; the host reads them as `Option`
    /// (`None` from a library built against an older 1.x).
    #[sabi(last_prefix_field)]
    pub open_discovery: extern "C" fn(DiscoveryConfig) -> RResult<DiscoveryBox, PluginError>,
}

impl RootModule for PluginModRef {
    declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "embassy_plugin";
    const NAME: &'static str = "embassy_plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

/// The plugin-api version this host or plugin was built against.
pub const PLUGIN_API_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The contract minors this crate's host side can load, newest first: the current types, then
/// the frozen interfaces of [`crate::v1_0`].
pub const LOADABLE_MINORS: &[&str] = &["1.1", "1.0"];
