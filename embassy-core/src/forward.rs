//! The connection path: accept, pick, connect, copy.
//!
//! The balancer is asked once per connection, in the listener's own accept loop, so a
//! round-robin counter is never contended across worker threads. Connecting and copying run
//! in a task per connection; a failed connect moves on to other endpoints of the same
//! snapshot without asking the balancer again, spread over them by a per-connection offset.
//!
//! At `max_connections` the accept loop stops accepting: new connections wait in the kernel's
//! listen backlog (as with HAProxy's `maxconn`), costing no descriptor, and are taken as soon
//! as one closes. A connection accepted while the service has no endpoint waits for one up to
//! `queue_timeout` (the one slow path: it picks in its task), then is reset.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::{
    io::Interest,
    net::{TcpListener, TcpStream},
    time::{sleep_until, timeout, Instant},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::{
    copy::{copy_bidirectional, reset_on_close, Ended},
    counters::{self, ConnectFailure, ServiceFailure},
    endpoints::{ActiveGuard, EndpointSet, Upstream, UpstreamAddr},
    service::{OpenConnection, Service},
};

/// How many endpoints one connection tries before giving up.
pub const MAX_CONNECT_ATTEMPTS: usize = 3;
/// Pause after a failed `accept` (out of descriptors and the like) instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serves `listener` until `shutdown` fires; connections are spawned on `connections` so a
/// graceful stop can wait for them.
pub async fn serve_tcp(
    listener: TcpListener,
    service: Arc<Service>,
    shutdown: CancellationToken,
    connections: TaskTracker,
) {
    let accepted_nodelay = accepts_with_nodelay(&listener);
    let mut accepted: u64 = 0;
    let mut accept_failures: u64 = 0;
    let mut limited: Option<Limited> = None;
    loop {
        if service.limit.at_cap() {
            let episode = limited.get_or_insert_with(|| Limited::start(&service, &listener));
            episode.pauses += 1;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = service.limit.below_cap() => {}
            }
        } else if limited
            .as_ref()
            .is_some_and(|_| service.limit.open() <= service.limit.low_water())
        {
            if let Some(episode) = limited.take() {
                episode.end(&service);
            }
        }
        let accepted_now = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted_now = listener.accept() => accepted_now,
        };
        let (client, peer) = match accepted_now {
            Ok(accepted_now) => accepted_now,
            Err(error) => {
                accept_failures += 1;
                if accept_failures == 1 {
                    warn!(%error, retry = ?ACCEPT_BACKOFF, "accept failed; failures are counted until it succeeds again");
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        if accept_failures > 0 {
            info!(failures = accept_failures, "accepting again");
            accept_failures = 0;
        }
        accepted = accepted.wrapping_add(1);
        counters::add(&service.counters.accepted, 1);
        if let Some(episode) = limited.as_mut() {
            episode.accepted += 1;
        }
        let connection = service.open_connection();
        let snapshot = service.endpoints.load();
        let first = match service.pick(&snapshot, peer) {
            Ok(Some(index)) => {
                service.queue.endpoint_available(&service.descriptor);
                Some(index)
            }
            Ok(None) => {
                service
                    .queue
                    .hold(&service.descriptor, service.queue_timeout());
                None
            }
            Err(error) => {
                service.counters.failed(ServiceFailure::BalancerError);
                warn!(%peer, %error, "balancer failed, closing connection");
                continue;
            }
        };
        let span = info_span!("conn", %peer);
        let path = Path {
            service: connection,
            snapshot,
            first,
            salt: spread(accepted),
            accepted_nodelay,
        };
        connections.spawn(forward(client, path).instrument(span));
    }
    info!("listener closed");
}

/// A run of time at `max_connections`, logged as one line when it starts and one when the
/// service is comfortably below the cap again (noticed at the next accept).
struct Limited {
    since: Instant,
    /// Times the accept loop stopped at the cap.
    pauses: u64,
    /// Connections accepted meanwhile: each had waited in the backlog for a free slot.
    accepted: u64,
}

impl Limited {
    fn start(service: &Service, listener: &TcpListener) -> Limited {
        warn!(
            max_connections = service.limit.max(),
            backlog = backlog(listener),
            "connection limit reached: new connections wait in the listen backlog"
        );
        Limited {
            since: Instant::now(),
            pauses: 0,
            accepted: 0,
        }
    }

    fn end(self, service: &Service) {
        info!(
            max_connections = service.limit.max(),
            open = service.limit.open(),
            limited_for = ?self.since.elapsed(),
            pauses = self.pauses,
            held_back = self.accepted,
            "below the connection limit again"
        );
    }
}

/// Connections waiting in `listener`'s accept queue, where the kernel reports it.
fn backlog(listener: &TcpListener) -> Option<u32> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: an all-zero tcp_info is valid; getsockopt writes at most `len` bytes into it.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: TCP_INFO on a socket `listener` owns, into a local of the size given.
        let ok = unsafe {
            libc::getsockopt(
                listener.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            )
        } == 0;
        // On a listening socket `tcpi_unacked` is the accept queue's length.
        ok.then_some(info.tcpi_unacked)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = listener;
        None
    }
}

/// A per-connection number for spreading failover: the accept count, scrambled (Fibonacci
/// hashing) so it does not follow a round-robin balancer's own rhythm.
#[inline]
fn spread(accepted: u64) -> u32 {
    (accepted.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32
}

/// The endpoint index of connect attempt `attempt`: the pick first, then the other endpoints in
/// list order from a place that `salt` chooses, so the failover load of a dead endpoint is
/// spread over all the others instead of landing on its neighbour. Never the pick again, and
/// no endpoint twice within `len` attempts.
#[inline]
fn failover_index(first: usize, attempt: usize, salt: u32, len: usize) -> usize {
    if attempt == 0 || len < 2 {
        return first;
    }
    let others = len - 1;
    (first + 1 + (salt as usize + attempt - 1) % others) % len
}

/// What the accept loop decided for one connection.
struct Path {
    /// The service, counting this connection against its cap.
    service: OpenConnection,
    /// The snapshot the pick was made on; kept for the connection's life.
    snapshot: Arc<EndpointSet>,
    /// The pick; `None` when there was no endpoint to pick.
    first: Option<usize>,
    salt: u32,
    /// The client socket came out of `accept` with `TCP_NODELAY` already set.
    accepted_nodelay: bool,
}

/// Connects to an upstream (starting at the picked one) and copies both ways until both sides
/// close, a timeout strikes or the graceful stop runs out.
async fn forward(client: TcpStream, path: Path) {
    let service = &path.service;
    let (snapshot, first) = match path.first {
        Some(first) => (path.snapshot, first),
        None => match wait_for_endpoint(service, &client).await {
            Some(picked) => picked,
            None => {
                reset_on_close(&client);
                return;
            }
        },
    };
    let (upstream, _active, endpoint) =
        match connect(&snapshot, first, path.salt, service.connect_timeout()).await {
            Ok(connected) => connected,
            Err(failure) => {
                service.counters.failed(ServiceFailure::Connect(failure));
                return;
            }
        };
    if !path.accepted_nodelay {
        let _ = client.set_nodelay(true);
    }
    match copy_bidirectional(
        &client,
        &upstream,
        service.copy_mode,
        service.timeouts(),
        &endpoint.cut,
        &endpoint.counters.bytes,
    )
    .await
    {
        Ok(Ended::Closed { sent, received }) => {
            debug!(upstream = %endpoint.addr, sent, received, "connection closed")
        }
        Ok(Ended::Idle) => {
            debug!(upstream = %endpoint.addr, idle_timeout = ?service.timeouts().idle, "connection closed: idle")
        }
        Ok(Ended::HalfClosed) => {
            debug!(upstream = %endpoint.addr, half_close_timeout = ?service.timeouts().half_close, "connection closed: half-closed and silent")
        }
        Ok(Ended::Cut) => {
            // A reset, not a FIN: the client must not take a cut stream for a finished one.
            reset_on_close(&client);
            reset_on_close(&upstream);
            debug!(upstream = %endpoint.addr, "connection reset: the grace period is over");
        }
        Err(error) => debug!(upstream = %endpoint.addr, %error, "connection ended with an error"),
    }
}

/// Holds a connection accepted with no endpoint until one appears (the pick is made here),
/// `queue_timeout` passes or the graceful stop runs out; `None` means reset it.
async fn wait_for_endpoint(
    service: &Service,
    client: &TcpStream,
) -> Option<(Arc<EndpointSet>, usize)> {
    // A system call, but on the slow path only: the accept loop's pick had the address free.
    let peer = client.peer_addr().ok()?;
    let deadline = Instant::now() + service.queue_timeout();
    loop {
        let changed = service.endpoints.changed();
        let mut changed = std::pin::pin!(changed);
        changed.as_mut().enable();
        let snapshot = service.endpoints.load();
        match service.pick(&snapshot, peer) {
            Ok(Some(first)) => {
                service.queue.served();
                service.queue.endpoint_available(&service.descriptor);
                return Some((snapshot, first));
            }
            Ok(None) => {}
            Err(error) => {
                service.counters.failed(ServiceFailure::BalancerError);
                warn!(%error, "balancer failed, closing connection");
                return None;
            }
        }
        tokio::select! {
            _ = changed => {}
            _ = sleep_until(deadline) => {
                service.counters.failed(ServiceFailure::NoEndpoint);
                service.queue.timed_out(&service.descriptor, service.queue_timeout());
                return None;
            }
            _ = service.cut.wait() => return None,
        }
    }
}

/// Tries up to [`MAX_CONNECT_ATTEMPTS`] endpoints, starting at `first`. Failures are logged per
/// endpoint state change ([`Health`](crate::endpoints::Health)), not per connection; the error
/// is the last attempt's.
async fn connect(
    snapshot: &EndpointSet,
    first: usize,
    salt: u32,
    connect_timeout: Duration,
) -> Result<(TcpStream, ActiveGuard, &Upstream), ConnectFailure> {
    let upstreams = snapshot.upstreams();
    let mut failure = ConnectFailure::Error;
    for attempt in 0..MAX_CONNECT_ATTEMPTS.min(upstreams.len()) {
        let upstream = &upstreams[failover_index(first, attempt, salt, upstreams.len())];
        // Counted from the attempt on, so least-conn sees a burst of new connections at once.
        let active = ActiveGuard::new(&upstream.active);
        let started = Instant::now();
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
            Ok(Ok(stream)) => {
                upstream.counters.connect_latency.observe(started.elapsed());
                counters::add(&upstream.counters.connections, 1);
                upstream.health.succeeded(&upstream.addr);
                return Ok((stream, active, upstream));
            }
            Ok(Err(error)) => {
                failure = ConnectFailure::of(&error);
                upstream
                    .health
                    .failed(&upstream.addr, failure.as_str(), &error);
            }
            Err(_) => {
                failure = ConnectFailure::Timeout;
                upstream.health.failed(
                    &upstream.addr,
                    failure.as_str(),
                    &format_args!("timed out after {connect_timeout:?}"),
                );
            }
        }
        upstream.counters.connect_failed(failure);
    }
    debug!(
        reason = failure.as_str(),
        "no upstream accepted the connection, closing it"
    );
    Err(failure)
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

    #[test]
    fn failover_spreads_over_the_other_endpoints_and_never_repeats() {
        let len = 4;
        let mut second = [0usize; 4];
        for accepted in 0..4000u64 {
            let salt = spread(accepted);
            let tried: Vec<usize> = (0..len).map(|a| failover_index(2, a, salt, len)).collect();
            assert_eq!(tried[0], 2, "the pick first");
            let mut sorted = tried.clone();
            sorted.sort();
            assert_eq!(sorted, vec![0, 1, 2, 3], "each endpoint once: {tried:?}");
            second[tried[1]] += 1;
        }
        assert_eq!(second[2], 0);
        for (index, count) in second.iter().enumerate().filter(|(i, _)| *i != 2) {
            assert!(
                (1100..1570).contains(count),
                "endpoint {index} got {count} of 4000 failovers: {second:?}"
            );
        }
        assert_eq!(failover_index(0, 1, 7, 1), 0, "one endpoint: only itself");
    }

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
