//! Binding listeners, with errors that name the address and the service.

use std::{net::SocketAddr, sync::Arc};

use embassy_plugin_api::Protocol;
use socket2::{Domain, Protocol as SocketProtocol, Socket, Type};
use thiserror::Error;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::warn;

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
    udp_listener(addr)
        .and_then(UdpSocket::from_std)
        .map_err(|source| ListenerError::from_io(addr, source))
}

/// Buffer asked for each way on a UDP listening socket. It carries every client of a service,
/// and the usual default (208 KiB) holds a single 64 KiB datagram at what the kernel charges for
/// it (128 KiB on loopback): two large datagrams arriving together overflowed it (the end-to-end
/// test lost seven in a thousand). The kernel charges only what is queued.
const UDP_LISTENER_BUFFER: usize = 4 << 20;

/// A non-blocking UDP socket bound to `addr` with [`UDP_LISTENER_BUFFER`] asked for both ways.
/// Plain std type, like [`tcp_listener`], so it can be made inside another network namespace.
pub fn udp_listener(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::DGRAM,
        Some(SocketProtocol::UDP),
    )?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    enlarge_buffers(&socket, addr);
    Ok(socket.into())
}

/// Asks for [`UDP_LISTENER_BUFFER`] past `net.core.rmem_max`/`wmem_max` when allowed
/// (`CAP_NET_ADMIN`, as DNS servers do), up to them otherwise, and says so when the system's
/// limit won: bursts of large datagrams may then be dropped.
fn enlarge_buffers(socket: &Socket, addr: SocketAddr) {
    type Unforced = fn(&Socket, usize) -> std::io::Result<()>;
    #[cfg(target_os = "linux")]
    let ways: [(libc::c_int, Unforced); 2] = [
        (libc::SO_RCVBUFFORCE, Socket::set_recv_buffer_size),
        (libc::SO_SNDBUFFORCE, Socket::set_send_buffer_size),
    ];
    #[cfg(target_os = "linux")]
    for (forced, unforced) in ways {
        let size = UDP_LISTENER_BUFFER as libc::c_int;
        // SAFETY: setsockopt on a descriptor `socket` owns, with a pointer to a local int and
        // its exact size.
        let set = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(socket),
                libc::SOL_SOCKET,
                forced,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if set != 0 {
            let _ = unforced(socket, UDP_LISTENER_BUFFER);
        }
    }
    #[cfg(not(target_os = "linux"))]
    for unforced in [
        Socket::set_recv_buffer_size as Unforced,
        Socket::set_send_buffer_size,
    ] {
        let _ = unforced(socket, UDP_LISTENER_BUFFER);
    }
    let granted = socket.recv_buffer_size().unwrap_or(0);
    if granted < UDP_LISTENER_BUFFER {
        warn!(
            %addr,
            asked = UDP_LISTENER_BUFFER,
            granted,
            "udp receive buffer limited by net.core.rmem_max: bursts of large datagrams may be dropped; raise it or grant CAP_NET_ADMIN"
        );
    }
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

    /// Serves connections or datagrams until `shutdown` fires, and runs the service's health
    /// task meanwhile; per-connection and per-session tasks go on `tasks`.
    pub async fn serve(
        self,
        service: Arc<Service>,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) {
        // The health task lives exactly as long as the listener.
        let health = service.maintain_health(shutdown.clone());
        let serve = async {
            match self {
                Listener::Tcp(listener) => {
                    serve_tcp(listener, Arc::clone(&service), shutdown, tasks).await
                }
                Listener::Udp(socket) => {
                    serve_udp(socket, Arc::clone(&service), shutdown, tasks).await
                }
            }
        };
        tokio::join!(serve, health);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the kernel grants for a buffer limited by `/proc/sys/net/core/{limit}`: past it
    /// only with CAP_NET_ADMIN (the test suite runs as root).
    fn expected(limit: &str) -> usize {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            return UDP_LISTENER_BUFFER;
        }
        let max: usize = std::fs::read_to_string(format!("/proc/sys/net/core/{limit}"))
            .expect("limit")
            .trim()
            .parse()
            .expect("number");
        UDP_LISTENER_BUFFER.min(max)
    }

    #[test]
    fn udp_listeners_ask_for_large_buffers() {
        let socket = udp_listener("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let socket = socket2::SockRef::from(&socket);
        // getsockopt reports twice what was set (bookkeeping included), so ">=" holds.
        let received = socket.recv_buffer_size().expect("SO_RCVBUF");
        assert!(
            received >= expected("rmem_max"),
            "receive buffer {received}"
        );
        let sent = socket.send_buffer_size().expect("SO_SNDBUF");
        assert!(sent >= expected("wmem_max"), "send buffer {sent}");
    }
}
