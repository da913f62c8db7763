//! The stable-ABI contract between the Embassy host and its plugins.
//!
//! A plugin is a shared library exporting one [`PluginMod`] root module. Two kinds exist:
//! balancers (a pure `pick` over the endpoints of one service) and discovery backends
//! (which push whole endpoint sets to a host-provided [`EndpointSink`]). Plugin authors
//! implement the plain Rust traits [`BalancerPlugin`] or [`DiscoveryPlugin`] and add one line,
//! [`export_balancer!`] or [`export_discovery!`]; the glue in [`export`] catches panics at
//! every entry point so that none unwinds across the boundary.
//!
//! Compatibility: the root module and every `#[sabi_trait]` are prefix types, and a later 1.x
//! may only append fields or methods after the ones marked `last_prefix_field`. abi_stable's
//! load-time check accepts a library with *more* trailing members than the host expects, so a
//! plugin built against 1.y loads into a 1.x host for y >= x (a method it calls that the older
//! host lacks runs its default: see [`EndpointSink::update_explained`]). The other direction
//! needs the host to check an older library against that minor's own types: [`v1_0`] keeps
//! them, and the host tries the newest first. Both directions are covered by the tests, with
//! real libraries built against a frozen copy of 1.0 (`tests/fixtures/contract-1.0`).

pub mod balancer;
pub mod discovery;
pub mod endpoint;
pub mod error;
pub mod export;
pub mod logging;
pub mod module;
pub mod support;
pub mod text;
pub mod v1_0;

pub use abi_stable;
pub use balancer::{Balancer, BalancerBox, BalancerConfig, BalancerPlugin};
pub use discovery::{
    BackendHealth, Discovery, DiscoveryBox, DiscoveryConfig, DiscoveryPlugin, EndpointSink,
    EndpointSinkBox, Excluded, Exclusion, HostSink, Protocol, WatchHandle, WatchHandleBox,
    WatchRequest,
};
pub use endpoint::{ClientAddress, Endpoint, EndpointView};
pub use error::PluginError;
pub use logging::{HostLogger, LogLevel};
pub use module::{PluginKind, PluginMetadata, PluginMod, PluginModRef};

/// Options as `key=value` pairs in the order given, ABI-stable.
pub type Options = abi_stable::std_types::RVec<
    abi_stable::std_types::Tuple2<abi_stable::std_types::RString, abi_stable::std_types::RString>,
>;

/// Looks up `key` in `options` (last one wins, as on a command line).
pub fn option<'a>(options: &'a Options, key: &str) -> Option<&'a str> {
    options
        .iter()
        .rev()
        .find(|pair| pair.0.as_str() == key)
        .map(|pair| pair.1.as_str())
}
