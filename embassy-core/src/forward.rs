//! The connection path: accept, pick, connect, copy.
//!
//! The balancer is asked once per connection, in the listener's own accept loop, so a
//! round-robin counter is never contended across worker threads. Connecting and copying run
//! in a task per connection; a failed connect moves on to the next endpoints of the same
//! snapshot without asking the balancer again.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::{
    io::Interest,
    net::{TcpListener, TcpStream},
    time::timeout,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::{
    copy::{copy_bidirectional, CopyMode},
    endpoints::{ActiveGuard, EndpointSet, UpstreamAddr},
    service::Service,
};

/// How many endpoints one connection tries before giving up.
pub const MAX_CONNECT_ATTEMPTS: usize = 3;

/// Serves `listener` until `shutdown` fires; connections are spawned on `connections` so a
/// graceful stop can wait for them.
pub async fn serve_tcp(
    listener: TcpListener,
    service: Arc<Service>,
    shutdown: CancellationToken,
    connections: TaskTracker,
) {
    let accepted_nodelay = accepts_with_nodelay(&listener);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (client, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of descriptors and the like: back off instead of spinning.
                warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let snapshot = service.endpoints.load();
        let first = match service.pick(&snapshot) {
            Ok(Some(index)) => index,
            Ok(None) => {
                warn!(%peer, endpoints = snapshot.len(), "no endpoint available, closing connection");
                continue;
            }
            Err(error) => {
                warn!(%peer, %error, "balancer failed, closing connection");
                continue;
            }
        };
        let span = info_span!("conn", %peer);
        let path = Path {
            snapshot,
            first,
            connect_timeout: service.connect_timeout,
            copy_mode: service.copy_mode,
            accepted_nodelay,
        };
        connections.spawn(forward(client, path).instrument(span));
    }
    info!("listener closed");
}

/// What the accept loop decided for one connection.
struct Path {
    /// The snapshot the pick was made on; kept for the connection's life.
    snapshot: Arc<EndpointSet>,
    first: usize,
    connect_timeout: Duration,
    copy_mode: CopyMode,
    /// The client socket came out of `accept` with `TCP_NODELAY` already set.
    accepted_nodelay: bool,
}

/// Connects to an upstream (starting at the picked one) and copies both ways until both sides
/// close.
async fn forward(mut client: TcpStream, path: Path) {
    let Some((mut upstream, _active, addr)) =
        connect(&path.snapshot, path.first, path.connect_timeout).await
    else {
        return;
    };
    if !path.accepted_nodelay {
        let _ = client.set_nodelay(true);
    }
    match copy_bidirectional(&mut client, &mut upstream, path.copy_mode).await {
        Ok((sent, received)) => debug!(upstream = %addr, sent, received, "connection closed"),
        Err(error) => debug!(upstream = %addr, %error, "connection ended with an error"),
    }
}

/// Tries up to [`MAX_CONNECT_ATTEMPTS`] endpoints, starting at `first`.
async fn connect(
    snapshot: &EndpointSet,
    first: usize,
    connect_timeout: Duration,
) -> Option<(TcpStream, ActiveGuard, &UpstreamAddr)> {
    let upstreams = snapshot.upstreams();
    for upstream in upstreams
        .iter()
        .cycle()
        .skip(first)
        .take(MAX_CONNECT_ATTEMPTS.min(upstreams.len()))
    {
        // Counted from the attempt on, so least-conn sees a burst of new connections at once.
        let active = ActiveGuard::new(&upstream.active);
        let attempt = match &upstream.addr {
            UpstreamAddr::Socket(addr) => timeout(connect_timeout, connect_nodelay(*addr)).await,
            UpstreamAddr::Named(name) => {
                timeout(connect_timeout, async {
                    let stream = TcpStream::connect(name.as_str()).await?;
                    let _ = stream.set_nodelay(true);
                    Ok(stream)
                })
                .await
            }
        };
        match attempt {
            Ok(Ok(stream)) => return Some((stream, active, &upstream.addr)),
            Ok(Err(error)) => warn!(%error, upstream = %upstream.addr, "connect failed"),
            Err(_) => {
                warn!(upstream = %upstream.addr, timeout = ?connect_timeout, "connect timed out")
            }
        }
    }
    warn!("no upstream accepted the connection, closing it");
    None
}

/// Connects with `TCP_NODELAY` set from the start. Unlike `TcpStream::connect`, it asks the
/// socket for an error only if the readiness event reported one: a connect that completes
/// cleanly costs one system call less.
async fn connect_nodelay(addr: SocketAddr) -> io::Result<TcpStream> {
    #[cfg(target_os = "linux")]
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    #[cfg(not(target_os = "linux"))]
    let socket = {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_nonblocking(true)?;
        socket
    };
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(error) if error.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(error) => return Err(error),
    }
    let stream = TcpStream::from_std(socket.into())?;
    // A connect in progress turns writable once it is established; a failed one also reports
    // an error or hang-up, which tokio folds into "write closed".
    if stream.ready(Interest::WRITABLE).await?.is_write_closed() {
        return Err(stream.take_error()?.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::ConnectionAborted, "closed while connecting")
        }));
    }
    Ok(stream)
}

/// Whether sockets accepted from `listener` come with `TCP_NODELAY` set: Linux copies the
/// option from the listening socket when a handshake completes, and [`tcp_listener`] sets it
/// before `listen`. Read from the socket, so a listener made elsewhere falls back to setting it
/// per connection.
///
/// [`tcp_listener`]: crate::listener::tcp_listener
fn accepts_with_nodelay(listener: &TcpListener) -> bool {
    cfg!(target_os = "linux") && SockRef::from(listener).tcp_nodelay().unwrap_or(false)
}

/// The address a listener for `port` binds on `bind`.
pub fn listen_addr(bind: std::net::IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(bind, port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn sockets_accepted_from_our_listeners_have_nodelay() {
        let listener = crate::listener::bind_tcp("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        // Connected before anyone asks: the handshake completes while nobody accepts yet.
        let _client = TcpStream::connect(addr).await.expect("connect");
        assert!(accepts_with_nodelay(&listener));
        let (accepted, _) = listener.accept().await.expect("accept");
        assert!(
            accepted.nodelay().expect("nodelay"),
            "TCP_NODELAY inherited"
        );

        let plain = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        assert!(
            !accepts_with_nodelay(&plain),
            "a listener made elsewhere: set per connection"
        );
    }

    #[tokio::test]
    async fn connect_nodelay_connects_with_nodelay_and_reports_refusal() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let open = listener.local_addr().expect("local addr");
        let stream = connect_nodelay(open).await.expect("connect to a listener");
        assert!(stream.nodelay().expect("nodelay"));
        assert_eq!(stream.peer_addr().expect("peer"), open);

        drop(listener); // nothing listens there any more
        let error = connect_nodelay(open)
            .await
            .expect_err("connect to a closed port");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused, "{error}");
    }
}
