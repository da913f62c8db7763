//! Binding listeners, with errors that name the address and the service.

use std::{net::SocketAddr, sync::Arc};

use embassy_plugin_api::Protocol;
use thiserror::Error;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{forward::serve_tcp, service::Service, udp::serve_udp};

/// Why a listener could not be opened.
#[derive(Debug, Error)]
pub enum ListenerError {
    #[error("port {addr} is already in use (by another program or another service)")]
    AddrInUse { addr: SocketAddr },
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl ListenerError {
    fn from_io(addr: SocketAddr, source: std::io::Error) -> Self {
        match source.kind() {
            std::io::ErrorKind::AddrInUse => ListenerError::AddrInUse { addr },
            _ => ListenerError::Bind { addr, source },
        }
    }
}

/// Binds a TCP listener on `addr`.
pub async fn bind_tcp(addr: SocketAddr) -> Result<TcpListener, ListenerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ListenerError::from_io(addr, source))
}

/// Binds a UDP socket on `addr`.
pub async fn bind_udp(addr: SocketAddr) -> Result<UdpSocket, ListenerError> {
    UdpSocket::bind(addr)
        .await
        .map_err(|source| ListenerError::from_io(addr, source))
}

/// A bound listener of either protocol.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

impl Listener {
    /// Binds `addr` for `protocol`.
    pub async fn bind(addr: SocketAddr, protocol: Protocol) -> Result<Listener, ListenerError> {
        Ok(match protocol {
            Protocol::Tcp => Listener::Tcp(bind_tcp(addr).await?),
            Protocol::Udp => Listener::Udp(bind_udp(addr).await?),
        })
    }

    /// Serves connections or datagrams until `shutdown` fires; per-connection and per-session
    /// tasks go on `tasks`.
    pub async fn serve(
        self,
        service: Arc<Service>,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) {
        match self {
            Listener::Tcp(listener) => serve_tcp(listener, service, shutdown, tasks).await,
            Listener::Udp(socket) => serve_udp(socket, service, shutdown, tasks).await,
        }
    }
}
