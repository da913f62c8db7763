//! Embassy's proxy engine.
//!
//! It parses service descriptors, keeps each service's endpoints as an immutable snapshot
//! swapped whole, and runs the connection path (accept, pick, connect, copy) and the datagram path
//! (sessions per client address, pinned to one endpoint). It never loads
//! a library and never talks to Docker or a discovery backend: the host feeds it endpoint
//! sets and balancers.

pub mod balancer;
pub mod check;
pub mod copy;
pub mod counters;
pub mod descriptor;
pub mod endpoints;
pub mod forward;
pub mod health;
pub mod listener;
pub mod service;
pub mod udp;

pub use balancer::Picker;
pub use descriptor::{DescriptorError, ServiceDescriptor};
pub use endpoints::{EndpointSet, ServiceEndpoints};
pub use listener::{Listener, ListenerError};
pub use service::Service;
