//! Binding listeners, with errors that name the address and the service.

use std::{net::SocketAddr, sync::Arc};

use embassy_plugin_api::Protocol;
use socket2::{Domain, Protocol as SocketProtocol, Socket, Type};
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
    tcp_listener(addr)
        .and_then(TcpListener::from_std)
        .map_err(|source| ListenerError::from_io(addr, source))
}

/// Queue of connections not yet accepted; the kernel caps it at `net.core.somaxconn`.
const BACKLOG: i32 = 4096;

/// A non-blocking listening socket on `addr` with `TCP_NODELAY` set before `listen`, so that
/// every connection it accepts inherits the option on Linux (the forward path then skips a
/// `setsockopt` per connection). Plain std type so it can be made on any thread (the host binds
/// inside other network namespaces this way).
pub fn tcp_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM,
        Some(SocketProtocol::TCP),
    )?;
    socket.set_nonblocking(true)?;
    // As std and tokio do: a restarted proxy can bind while old connections linger.
    socket.set_reuse_address(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
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
