//! Endpoints as discovery reports them and as balancers see them.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::atomic::{AtomicU64, Ordering},
};

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
    /// Relative weight, at least 1: the endpoint's `weight` from discovery.
    pub weight: u32,
    /// Always true: the host leaves an endpoint it knows to be failing out of the set instead
    /// (so every balancer gets health for free). Kept for the 1.0 layout.
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

    /// Tells endpoints apart across sets: the host carries an endpoint's counter from one set
    /// to the next while its address stays in the set, so views of two sets with the same
    /// identity are the same endpoint. Only meaningful within one host process, and an
    /// identity may come back for another endpoint once its endpoint has left every set.
    #[inline]
    pub fn identity(&self) -> usize {
        self.active as usize
    }
}

/// The address a connection or datagram session comes from, ABI-stable (1.1).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAddress {
    /// The IPv6 address, or the IPv4-mapped form (`::ffff:a.b.c.d`) of an IPv4 one.
    octets: [u8; 16],
    port: u16,
    is_ipv4: bool,
}

impl ClientAddress {
    /// The address as `std` has it.
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip(), self.port)
    }

    pub fn ip(&self) -> IpAddr {
        let v6 = Ipv6Addr::from(self.octets);
        match v6.to_ipv4_mapped() {
            Some(v4) if self.is_ipv4 => IpAddr::V4(v4),
            _ => IpAddr::V6(v6),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The 16 address bytes (IPv4 as IPv4-mapped IPv6): what an affinity hash should read, so
    /// that a client keeps its endpoint whatever port it connects from.
    pub fn ip_octets(&self) -> &[u8; 16] {
        &self.octets
    }
}

impl From<SocketAddr> for ClientAddress {
    #[inline]
    fn from(addr: SocketAddr) -> Self {
        let (octets, is_ipv4) = match addr.ip() {
            IpAddr::V4(v4) => (v4.to_ipv6_mapped().octets(), true),
            IpAddr::V6(v6) => (v6.octets(), false),
        };
        ClientAddress {
            octets,
            port: addr.port(),
            is_ipv4,
        }
    }
}

impl Default for ClientAddress {
    /// `0.0.0.0:0`, for callers with no client (benchmarks, a host's own probes).
    fn default() -> Self {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_addresses_round_trip() {
        for text in [
            "127.0.0.1:5000",
            "[::1]:80",
            "[::ffff:10.0.0.1]:7",
            "0.0.0.0:0",
        ] {
            let addr: SocketAddr = text.parse().expect("an address");
            assert_eq!(ClientAddress::from(addr).socket_addr(), addr, "{text}");
        }
        let v4: SocketAddr = "10.0.0.1:1".parse().expect("an address");
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:2".parse().expect("an address");
        assert_eq!(
            ClientAddress::from(v4).ip_octets(),
            ClientAddress::from(mapped).ip_octets(),
            "one client, one hash input"
        );
    }
}
