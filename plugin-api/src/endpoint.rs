//! Endpoints as discovery reports them and as balancers see them.

use std::sync::atomic::{AtomicU64, Ordering};

use abi_stable::{
    std_types::{RString, RVec},
    StableAbi,
};

/// One instance of a service, as a discovery plugin reports it.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    /// `host:port`; host is an IP literal (`[v6]:port` for IPv6) or a DNS name.
    pub address: RString,
    /// Tags the backend carries for this instance (informational once filtered).
    pub tags: RVec<RString>,
    /// Relative weight for balancers that honour it; 1 when the backend has none.
    pub weight: u32,
}

impl Endpoint {
    /// An endpoint at `address` with no tags and weight 1.
    pub fn new(address: impl Into<String>) -> Self {
        Endpoint {
            address: RString::from(address.into()),
            tags: RVec::new(),
            weight: 1,
        }
    }

    /// The same endpoint carrying `tags`.
    pub fn with_tags<I, S>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.tags = tags.into_iter().map(|t| RString::from(t.into())).collect();
        self
    }
}

/// What a balancer sees of one endpoint when it picks: its position is its index in the slice.
///
/// The live connection count is read through a pointer into the host's counter, so a pick
/// sees the load of this very moment without the host copying anything per connection.
#[repr(C)]
#[derive(StableAbi, Debug)]
pub struct EndpointView {
    active: *const AtomicU64,
    /// Relative weight (1 by default).
    pub weight: u32,
    /// False when the host knows the endpoint to be failing.
    pub healthy: bool,
}

// SAFETY: the pointee is an atomic, shared by design; see `EndpointView::new` for lifetime.
unsafe impl Send for EndpointView {}
// SAFETY: as above: all access to the pointee is atomic.
unsafe impl Sync for EndpointView {}

impl EndpointView {
    /// A view of an endpoint whose live connections are counted in `*active`.
    ///
    /// # Safety
    /// `active` must point to an `AtomicU64` that outlives the view (the host keeps the
    /// counter in the same snapshot that owns the views).
    pub unsafe fn new(active: *const AtomicU64, weight: u32, healthy: bool) -> Self {
        EndpointView {
            active,
            weight,
            healthy,
        }
    }

    /// Connections currently open to this endpoint through this host.
    #[inline]
    pub fn active_connections(&self) -> u64 {
        // SAFETY: `new`'s contract keeps the counter alive as long as the view.
        unsafe { (*self.active).load(Ordering::Relaxed) }
    }
}
