//! Discovery: a backend pushes whole endpoint sets to the host.
//!
//! Async does not cross this boundary: each plugin carries its own copy of any runtime, so a
//! discovery plugin runs its I/O on threads it owns and talks to the host only through the
//! [`EndpointSink`], which the host implements and which may be called from any thread.

use std::{fmt, sync::Arc};

use abi_stable::{
    sabi_trait,
    sabi_trait::TD_Opaque,
    std_types::{RArc, RBox, RResult, RStr, RString, RVec},
    StableAbi,
};

use crate::{Endpoint, Options, PluginError};

/// Transport protocol of a service.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// `tcp` or `udp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a discovery instance is opened: `--discovery URI` plus `--discovery-opt KEY=VALUE`.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct DiscoveryConfig {
    pub uri: RString,
    pub options: Options,
}

/// One service to follow.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct WatchRequest {
    /// An etcd key prefix, a Consul service name, a key of the services file...
    pub service: RString,
    /// Keep only instances that carry every one of these.
    pub tags: RVec<RString>,
    pub protocol: Protocol,
    /// The descriptor's options.
    pub options: Options,
}

impl WatchRequest {
    /// A request for `service` with `tags` over `protocol`, without options.
    pub fn new<S: AsRef<str>>(service: &str, tags: &[S], protocol: Protocol) -> Self {
        WatchRequest {
            service: service.into(),
            tags: tags.iter().map(|tag| tag.as_ref().into()).collect(),
            protocol,
            options: Default::default(),
        }
    }
}

/// The state of the backend as a plugin sees it.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendHealth {
    /// Talking to the backend normally.
    Reachable,
    /// The backend cannot be reached; the host keeps serving the last known endpoints.
    Unreachable,
    /// The backend answered with something unusable (bad file, bad document).
    Invalid,
}

/// Why a discovery plugin left an instance of the watched service out of the set (1.1).
///
/// An integer with named values rather than an enum, so that a later minor can add reasons
/// without breaking older hosts (which show an unknown one as its number).
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Exclusion(pub u8);

impl Exclusion {
    /// The backend's record could not be read (bad JSON, no address, bad port).
    pub const UNREADABLE: Exclusion = Exclusion(1);
    /// It lacks one of the requested tags.
    pub const TAG: Exclusion = Exclusion(2);
    /// It is for the other protocol (`/udp` vs `/tcp`).
    pub const PROTOCOL: Exclusion = Exclusion(3);
    /// Another record already gave the same address.
    pub const DUPLICATE: Exclusion = Exclusion(4);
    /// The backend says it is not passing its checks (or is in maintenance).
    pub const NOT_PASSING: Exclusion = Exclusion(5);

    /// `unreadable`, `tag`, `protocol`, `duplicate`, `not-passing`, or `reason-N`.
    pub fn as_str(self) -> std::borrow::Cow<'static, str> {
        match self {
            Exclusion::UNREADABLE => "unreadable".into(),
            Exclusion::TAG => "tag".into(),
            Exclusion::PROTOCOL => "protocol".into(),
            Exclusion::DUPLICATE => "duplicate".into(),
            Exclusion::NOT_PASSING => "not-passing".into(),
            Exclusion(other) => format!("reason-{other}").into(),
        }
    }
}

impl fmt::Debug for Exclusion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_str())
    }
}

impl fmt::Display for Exclusion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_str())
    }
}

/// One instance a discovery plugin left out of a set, and why (1.1).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Excluded {
    /// What names the instance in the backend: an etcd key, a Consul service ID, a file entry.
    pub instance: RString,
    pub reason: Exclusion,
    /// One line for the operator, naming the offending value (cut to a few hundred bytes).
    pub detail: RString,
}

impl Excluded {
    pub fn new(instance: impl Into<String>, reason: Exclusion, detail: impl Into<String>) -> Self {
        Excluded {
            instance: RString::from(instance.into()),
            reason,
            detail: RString::from(crate::text::cut(&detail.into()).into_owned()),
        }
    }
}

/// Where a discovery plugin sends what it learns, implemented by the host.
#[sabi_trait]
pub trait EndpointSink: Send + Sync {
    /// The complete, current set of endpoints for the watched service.
    fn update(&self, endpoints: RVec<Endpoint>);

    /// A change in the backend's state, with a one-line reason. Call on changes, not per retry.
    #[sabi(last_prefix_field)]
    fn report(&self, health: BackendHealth, detail: RStr<'_>);

    /// 1.1: the complete set, with every instance of the service left out of it and why.
    /// A host older than 1.1 lacks it; this default then passes the set alone.
    fn update_explained(&self, endpoints: RVec<Endpoint>, excluded: RVec<Excluded>) {
        let _ = excluded;
        self.update(endpoints)
    }
}

/// The sink a plugin receives: cheap to clone into the plugin's threads.
pub type EndpointSinkBox = EndpointSink_TO<'static, RArc<()>>;

/// A watch in progress; stopping or dropping it ends the watch.
#[sabi_trait]
pub trait WatchHandle: Send + Sync {
    /// Ends the watch; the sink is not called after this returns.
    #[sabi(last_prefix_field)]
    fn stop(&mut self);
}

pub type WatchHandleBox = WatchHandle_TO<'static, RBox<()>>;

/// An open discovery backend: one per `--discovery` URI, shared by every watch.
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

/// What a discovery plugin author implements; [`crate::export_discovery!`] does the rest.
pub trait DiscoveryPlugin: Send + Sync + Sized + 'static {
    /// The plugin's name.
    const NAME: &'static str;
    /// URI schemes served (`file`, `etcd`, ...).
    const SCHEMES: &'static [&'static str];
    /// One line for `embassy plugins`.
    const DESCRIPTION: &'static str;
    /// What a watch returns; dropping it must stop the watch.
    type Watch: Send + Sync + 'static;

    /// Opens the backend named by `config.uri`.
    fn open(config: &DiscoveryConfig) -> Result<Self, PluginError>;

    /// Starts following `request`, pushing sets through `sink` from the plugin's own threads.
    fn watch(&self, request: WatchRequest, sink: HostSink) -> Result<Self::Watch, PluginError>;
}

/// The host's sink as plugin code holds it: `Clone`, `Send`, `Sync`.
#[derive(Clone)]
pub struct HostSink {
    inner: Arc<EndpointSinkBox>,
}

impl HostSink {
    /// Wraps the sink the host handed over.
    pub fn new(inner: EndpointSinkBox) -> Self {
        HostSink {
            inner: Arc::new(inner),
        }
    }

    /// Wraps any Rust implementation of the sink (host side, tests).
    pub fn from_impl<S: EndpointSink + 'static>(sink: S) -> Self {
        HostSink {
            inner: Arc::new(EndpointSink_TO::from_ptr(RArc::new(sink), TD_Opaque)),
        }
    }

    /// The complete, current set of endpoints.
    pub fn update(&self, endpoints: Vec<Endpoint>) {
        self.inner.update(endpoints.into());
    }

    /// The complete, current set, and every instance left out of it with the reason.
    pub fn update_explained(&self, endpoints: Vec<Endpoint>, excluded: Vec<Excluded>) {
        self.inner
            .update_explained(endpoints.into(), excluded.into());
    }

    /// A change in the backend's state.
    pub fn report(&self, health: BackendHealth, detail: &str) {
        self.inner.report(health, detail.into());
    }
}

impl fmt::Debug for HostSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HostSink")
    }
}
