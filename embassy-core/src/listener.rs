//! Binding listeners, with errors that name the address and the service.

use std::net::SocketAddr;

use thiserror::Error;
use tokio::net::TcpListener;

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

/// Binds a TCP listener on `addr`.
pub async fn bind_tcp(addr: SocketAddr) -> Result<TcpListener, ListenerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AddrInUse => ListenerError::AddrInUse { addr },
            _ => ListenerError::Bind { addr, source },
        })
}
