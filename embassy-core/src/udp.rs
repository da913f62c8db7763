//! The datagram path: one session per client address, pinned to one endpoint.
//!
//! The listener's own loop owns the session table, so it needs no lock: it receives a
//! datagram, finds or opens the client's session (picking the endpoint there, as the TCP
//! accept loop does) and sends it on the session's upstream socket. Each session has a small
//! task relaying replies from its connected upstream socket back to the client through the
//! listening socket. Buffers are allocated once (one per listener, one per worker thread for
//! replies), never per datagram or per session.
//!
//! A session ends when it has been idle (both directions) for `udp_idle`, when the table is
//! full and it is the oldest idle one, when its endpoint is gone from discovery (checked once
//! per new snapshot, on the session's next datagram), or when the endpoint answers with an
//! ICMP error such as port unreachable (`ECONNREFUSED` on the connected socket). The next
//! datagram from that client then opens a new session and picks again.

use std::{
    cell::RefCell,
    collections::HashMap,
    io::ErrorKind,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::{io::Interest, net::UdpSocket, sync::mpsc, task::AbortHandle, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, trace, warn};

use crate::{
    counters::{self, ConnectFailure, EndpointCounters, ServiceFailure},
    descriptor::ServiceDescriptor,
    endpoints::{ActiveGuard, EndpointSet, Health, Upstream, UpstreamAddr},
    service::Service,
};

/// Idle time after which a session ends unless the descriptor's `udp_idle` says otherwise.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(60);
/// Sessions kept at once unless the descriptor's `udp_max_sessions` says otherwise.
pub const DEFAULT_MAX_SESSIONS: usize = 10_000;
/// Room for the largest UDP payload (65,507 bytes over IPv4, 65,527 over IPv6), so nothing
/// is ever truncated.
const DATAGRAM_BUFFER: usize = 64 * 1024;

/// A UDP service's session settings, from its descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpSettings {
    pub idle: Duration,
    pub max_sessions: usize,
}

impl UdpSettings {
    /// Reads `udp_idle` (seconds) and `udp_max_sessions`; the parser has already checked both.
    pub fn of(descriptor: &ServiceDescriptor) -> Self {
        let number = |key| {
            descriptor
                .option(key)
                .and_then(|value| value.parse::<u64>().ok())
                .filter(|&n| n > 0)
        };
        UdpSettings {
            idle: number("udp_idle").map_or(DEFAULT_IDLE, Duration::from_secs),
            max_sessions: number("udp_max_sessions").map_or(DEFAULT_MAX_SESSIONS, |n| {
                usize::try_from(n).unwrap_or(usize::MAX)
            }),
        }
    }

    /// How often expired sessions are swept: a quarter of the idle time, within limits, so a
    /// session outlives `idle` by at most that much.
    fn sweep_period(&self) -> Duration {
        (self.idle / 4).clamp(Duration::from_millis(20), Duration::from_secs(5))
    }
}

/// Monotonic nanoseconds since the listener started: fits an atomic, costs one clock read.
#[derive(Debug, Clone, Copy)]
struct Clock(Instant);

impl Clock {
    #[inline]
    fn now(self) -> u64 {
        u64::try_from(self.0.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// What the listener loop and the session's reply task share.
#[derive(Debug)]
struct SessionState {
    /// Last datagram in either direction, in [`Clock`] nanoseconds.
    last_active: AtomicU64,
    /// Set by the reply task when the upstream socket failed (ICMP error and the like).
    ended: AtomicBool,
}

/// One client's session, owned by the listener loop.
struct Session {
    upstream: Arc<UdpSocket>,
    upstream_addr: SocketAddr,
    state: Arc<SessionState>,
    /// Counts the session against its endpoint; its counter also identifies the endpoint in
    /// later snapshots (counters are carried over by address).
    active: ActiveGuard,
    /// The endpoint's traffic totals (this session's datagrams and bytes go there).
    counters: Arc<EndpointCounters>,
    /// The snapshot generation in which the endpoint was last known to be listed.
    confirmed: u64,
    reply: AbortHandle,
}

impl Drop for Session {
    fn drop(&mut self) {
        // The reply task holds the other reference to the upstream socket; ending it closes
        // the socket.
        self.reply.abort();
    }
}

/// Why a session ended, for the log.
#[derive(Debug, Clone, Copy)]
enum EndReason {
    Idle,
    Evicted,
    EndpointRemoved,
    UpstreamError,
}

impl EndReason {
    fn as_str(self) -> &'static str {
        match self {
            EndReason::Idle => "idle",
            EndReason::Evicted => "evicted as the oldest idle session, the table is full",
            EndReason::EndpointRemoved => "endpoint removed from discovery",
            EndReason::UpstreamError => "upstream answered with an error",
        }
    }
}

/// Serves `socket` until `shutdown` fires; reply tasks are spawned on `tasks`.
pub async fn serve_udp(
    socket: UdpSocket,
    service: Arc<Service>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let settings = UdpSettings::of(&service.in_force());
    let listen = Arc::new(socket);
    let snapshot = service.endpoints.load();
    let (opened_sender, mut opened) = mpsc::channel(OPENED_QUEUE);
    let mut proxy = UdpProxy {
        opening: HashMap::new(),
        opened_sender,
        listen: Arc::clone(&listen),
        service,
        settings,
        sessions: HashMap::new(),
        snapshot,
        generation: 0,
        clock: Clock(Instant::now()),
        tasks,
        no_endpoint_logged: false,
    };
    let mut buffer = vec![0u8; DATAGRAM_BUFFER];
    let mut sweep = tokio::time::interval(settings.sweep_period());
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = sweep.tick() => {
                // Tunables applied in place (Service::apply_tunables) reach the sessions here,
                // once per sweep: a changed idle time re-paces the sweep.
                let settings = UdpSettings::of(&proxy.service.in_force());
                if settings != proxy.settings {
                    if settings.sweep_period() != proxy.settings.sweep_period() {
                        sweep = tokio::time::interval(settings.sweep_period());
                        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                    proxy.settings = settings;
                }
                proxy.sweep()
            }
            Some(done) = opened.recv() => proxy.opened(done).await,
            received = listen.recv_from(&mut buffer) => match received {
                Ok((len, client)) => proxy.forward(&buffer[..len], client).await,
                // Linux reports no ICMP errors on an unconnected socket; anything else here is
                // transient (e.g. out of memory), so go on.
                Err(error) => debug!(%error, "receiving on the listening socket failed"),
            },
        }
    }
    info!(sessions = proxy.sessions.len(), "listener closed");
}

/// Resolved sessions waiting for the loop; resolver tasks wait when it is full.
const OPENED_QUEUE: usize = 64;

/// A session whose named endpoint is being resolved off the loop.
struct Opening {
    /// The client's first datagram, sent once the session opens.
    first: Vec<u8>,
    active: ActiveGuard,
    health: Arc<Health>,
    counters: Arc<EndpointCounters>,
    upstream: UpstreamAddr,
    generation: u64,
}

/// The endpoint a new session is pinned to.
struct SessionEndpoint {
    active: ActiveGuard,
    counters: Arc<EndpointCounters>,
    /// The snapshot generation it was picked in.
    confirmed: u64,
}

/// What a resolver task hands back.
struct Opened {
    client: SocketAddr,
    result: std::io::Result<(UdpSocket, SocketAddr)>,
}

struct UdpProxy {
    /// Sessions being opened off the loop, by client.
    opening: HashMap<SocketAddr, Opening>,
    opened_sender: mpsc::Sender<Opened>,
    listen: Arc<UdpSocket>,
    service: Arc<Service>,
    settings: UdpSettings,
    sessions: HashMap<SocketAddr, Session>,
    /// The snapshot sessions were last checked against, kept alive so a pointer comparison
    /// with the current one is meaningful.
    snapshot: Arc<EndpointSet>,
    /// Bumped whenever `snapshot` is replaced.
    generation: u64,
    clock: Clock,
    tasks: TaskTracker,
    /// Logged once per run of datagrams that found no endpoint, not once per datagram.
    no_endpoint_logged: bool,
}

impl UdpProxy {
    /// Sends one client datagram upstream, opening a session first if needed.
    async fn forward(&mut self, datagram: &[u8], client: SocketAddr) {
        if !self.service.endpoints.is_current(&self.snapshot) {
            self.snapshot = self.service.endpoints.load();
            self.generation += 1;
        }
        let now = self.clock.now();
        if let Some(session) = self.sessions.get_mut(&client) {
            match check(session, &self.snapshot, self.generation) {
                Ok(()) => {
                    session.state.last_active.store(now, Ordering::Relaxed);
                    match session.upstream.try_send(datagram) {
                        Ok(sent) => {
                            sent_one(&session.counters, sent);
                            return;
                        }
                        Err(error) if error.kind() == ErrorKind::WouldBlock => {
                            counters::add(&self.service.counters.datagrams_dropped, 1);
                            trace!(%client, "upstream send buffer full, datagram dropped");
                            return;
                        }
                        // A pending ICMP error surfaces here too; the datagram was not sent.
                        Err(error) => {
                            self.end(client, EndReason::UpstreamError, Some(&error));
                        }
                    }
                }
                Err(reason) => self.end(client, reason, None),
            }
        }
        let Some(session) = self.open(client, now, datagram).await else {
            return;
        };
        // Awaited: a new socket's writability is not known to the runtime until its first
        // readiness event, and it is immediate on a fresh UDP socket.
        match session.upstream.send(datagram).await {
            Ok(sent) => sent_one(&session.counters, sent),
            Err(error) => {
                debug!(%client, %error, "first datagram of the session could not be sent")
            }
        }
    }

    fn end(&mut self, client: SocketAddr, reason: EndReason, error: Option<&std::io::Error>) {
        if let Some(session) = self.sessions.remove(&client) {
            match error {
                Some(error) => {
                    debug!(%client, upstream = %session.upstream_addr, %error, reason = reason.as_str(), "udp session ended")
                }
                None => {
                    debug!(%client, upstream = %session.upstream_addr, reason = reason.as_str(), "udp session ended")
                }
            }
        }
    }

    /// Picks an endpoint and opens a session for `client`, evicting the oldest idle session
    /// when the table is full. `None` when no session could be opened now, including while a
    /// named endpoint is being resolved (then `datagram` is kept for it).
    async fn open(&mut self, client: SocketAddr, now: u64, datagram: &[u8]) -> Option<&Session> {
        let counters = &self.service.counters;
        if self.opening.contains_key(&client) {
            counters::add(&counters.datagrams_dropped, 1);
            trace!(%client, "session still opening, datagram dropped");
            return None;
        }
        counters::add(&counters.accepted, 1);
        let first = match self.service.pick(&self.snapshot, client) {
            Ok(Some(index)) => index,
            Ok(None) => {
                counters.failed(ServiceFailure::NoEndpoint);
                counters::add(&counters.datagrams_dropped, 1);
                if !self.no_endpoint_logged {
                    warn!(%client, endpoints = self.snapshot.len(), "no endpoint available, dropping datagrams");
                    self.no_endpoint_logged = true;
                }
                return None;
            }
            Err(error) => {
                counters.failed(ServiceFailure::BalancerError);
                counters::add(&counters.datagrams_dropped, 1);
                warn!(%client, %error, "balancer failed, datagram dropped");
                return None;
            }
        };
        self.no_endpoint_logged = false;
        let snapshot = Arc::clone(&self.snapshot);
        let upstreams = snapshot.upstreams();
        // Opening a socket fails only locally (out of descriptors and the like); try the next
        // endpoints as the TCP path does, boundedly.
        for upstream in upstreams
            .iter()
            .cycle()
            .skip(first)
            .take(crate::forward::MAX_CONNECT_ATTEMPTS.min(upstreams.len()))
        {
            let addr = match &upstream.addr {
                UpstreamAddr::Socket(addr) => *addr,
                UpstreamAddr::Named(name) => {
                    self.resolve_off_loop(client, upstream, name, datagram);
                    return None;
                }
            };
            match connect_udp(addr).await {
                Ok(socket) => {
                    upstream.health.succeeded(&upstream.addr);
                    let active = ActiveGuard::new(&upstream.active);
                    let endpoint = SessionEndpoint {
                        active,
                        counters: Arc::clone(&upstream.counters),
                        confirmed: self.generation,
                    };
                    return Some(self.start_session(client, socket, addr, endpoint, now));
                }
                Err(error) => {
                    let failure = ConnectFailure::of(&error);
                    upstream.counters.connect_failed(failure);
                    upstream
                        .health
                        .failed(&upstream.addr, failure.as_str(), &error);
                }
            }
        }
        counters::add(&self.service.counters.datagrams_dropped, 1);
        None
    }

    /// Starts resolving `name` and connecting a socket to it in a task; [`UdpProxy::opened`]
    /// takes the result.
    fn resolve_off_loop(
        &mut self,
        client: SocketAddr,
        upstream: &Upstream,
        name: &str,
        datagram: &[u8],
    ) {
        if self.opening.len() >= self.settings.max_sessions {
            counters::add(&self.service.counters.datagrams_dropped, 1);
            trace!(%client, "too many sessions opening, datagram dropped");
            return;
        }
        self.opening.insert(
            client,
            Opening {
                first: datagram.to_vec(),
                active: ActiveGuard::new(&upstream.active),
                health: Arc::clone(&upstream.health),
                counters: Arc::clone(&upstream.counters),
                upstream: upstream.addr.clone(),
                generation: self.generation,
            },
        );
        let (name, timeout, sender) = (
            name.to_string(),
            self.service.connect_timeout(),
            self.opened_sender.clone(),
        );
        self.tasks.spawn(async move {
            let result = match tokio::time::timeout(timeout, resolve_and_connect(&name)).await {
                Ok(result) => result,
                Err(_) => Err(std::io::Error::new(
                    ErrorKind::TimedOut,
                    format!("name resolution timed out after {timeout:?}"),
                )),
            };
            // The loop is gone when the listener closed: nothing to hand over.
            let _ = sender.send(Opened { client, result }).await;
        });
    }

    /// A resolver task finished: open the session and send the datagram that asked for it.
    async fn opened(&mut self, done: Opened) {
        let Some(opening) = self.opening.remove(&done.client) else {
            return;
        };
        match done.result {
            Ok((socket, addr)) => {
                opening.health.succeeded(&opening.upstream);
                let now = self.clock.now();
                let endpoint = SessionEndpoint {
                    active: opening.active,
                    counters: opening.counters,
                    confirmed: opening.generation,
                };
                let session = self.start_session(done.client, socket, addr, endpoint, now);
                match session.upstream.send(&opening.first).await {
                    Ok(sent) => sent_one(&session.counters, sent),
                    Err(error) => {
                        debug!(client = %done.client, %error, "first datagram of the session could not be sent")
                    }
                }
            }
            Err(error) => {
                let failure = ConnectFailure::of(&error);
                opening.counters.connect_failed(failure);
                counters::add(&self.service.counters.datagrams_dropped, 1);
                opening
                    .health
                    .failed(&opening.upstream, failure.as_str(), &error);
            }
        }
    }

    /// Enters a session for `client` on a connected `socket` and starts its reply task.
    fn start_session(
        &mut self,
        client: SocketAddr,
        socket: UdpSocket,
        upstream_addr: SocketAddr,
        endpoint: SessionEndpoint,
        now: u64,
    ) -> &Session {
        if self.sessions.len() >= self.settings.max_sessions {
            self.evict_oldest();
        }
        let socket = Arc::new(socket);
        let state = Arc::new(SessionState {
            last_active: AtomicU64::new(now),
            ended: AtomicBool::new(false),
        });
        let reply = self
            .tasks
            .spawn(relay_replies(
                Arc::clone(&socket),
                Arc::clone(&self.listen),
                client,
                Arc::clone(&state),
                Arc::clone(&endpoint.counters),
                self.clock,
            ))
            .abort_handle();
        counters::add(&endpoint.counters.connections, 1);
        debug!(%client, upstream = %upstream_addr, sessions = self.sessions.len() + 1, "udp session opened");
        let session = Session {
            upstream: socket,
            upstream_addr,
            state,
            active: endpoint.active,
            counters: endpoint.counters,
            confirmed: endpoint.confirmed,
            reply,
        };
        self.sessions.entry(client).insert_entry(session).into_mut()
    }

    /// Ends sessions idle for longer than `udp_idle` and those whose upstream failed.
    fn sweep(&mut self) {
        let now = self.clock.now();
        let idle = u64::try_from(self.settings.idle.as_nanos()).unwrap_or(u64::MAX);
        self.sessions.retain(|client, session| {
            let reason = if session.state.ended.load(Ordering::Relaxed) {
                EndReason::UpstreamError
            } else if now.saturating_sub(session.state.last_active.load(Ordering::Relaxed)) >= idle
            {
                EndReason::Idle
            } else {
                return true;
            };
            debug!(%client, upstream = %session.upstream_addr, reason = reason.as_str(), "udp session ended");
            false
        });
    }

    /// Makes room for one session: failed sessions go first, then the least recently active.
    /// A scan, but only when a new client arrives at a full table.
    fn evict_oldest(&mut self) {
        let oldest = self
            .sessions
            .iter()
            .min_by_key(|(_, session)| {
                let state = &session.state;
                (
                    !state.ended.load(Ordering::Relaxed),
                    state.last_active.load(Ordering::Relaxed),
                )
            })
            .map(|(client, _)| *client);
        if let Some(client) = oldest {
            self.end(client, EndReason::Evicted, None);
        }
    }
}

/// Resolves `name` and connects a socket to its first address.
async fn resolve_and_connect(name: &str) -> std::io::Result<(UdpSocket, SocketAddr)> {
    #[cfg(test)]
    tests::resolve_delay().await;
    let addr = tokio::net::lookup_host(name)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::new(ErrorKind::NotFound, "name resolves to no address"))?;
    Ok((connect_udp(addr).await?, addr))
}

/// A socket connected to `addr`, so that only its replies arrive and its ICMP errors are
/// reported.
async fn connect_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let local = match addr.ip() {
        IpAddr::V4(_) => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0),
        IpAddr::V6(_) => SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0),
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(addr).await?;
    Ok(socket)
}

/// Whether `session` may carry on: not failed, and its endpoint still listed in `snapshot`
/// (scanned once per session and snapshot `generation`).
fn check(session: &mut Session, snapshot: &EndpointSet, generation: u64) -> Result<(), EndReason> {
    if session.state.ended.load(Ordering::Relaxed) {
        return Err(EndReason::UpstreamError);
    }
    if session.confirmed != generation {
        let listed = snapshot
            .upstreams()
            .iter()
            .any(|upstream| session.active.counts(&upstream.active));
        if !listed {
            return Err(EndReason::EndpointRemoved);
        }
        session.confirmed = generation;
    }
    Ok(())
}

/// One datagram of `bytes` went to the endpoint.
#[inline]
fn sent_one(counters: &EndpointCounters, bytes: usize) {
    counters::add(&counters.datagrams_sent, 1);
    counters::add(&counters.bytes.sent, bytes as u64);
}

thread_local! {
    /// One reply buffer per runtime worker thread, borrowed only between a receive and a send
    /// that never await, so sessions cost no buffer of their own.
    static REPLY_BUFFER: RefCell<Vec<u8>> = RefCell::new(vec![0u8; DATAGRAM_BUFFER]);
}

/// What happened to one reply.
enum Relay {
    Sent,
    Spurious,
    Dropped(std::io::Error),
    UpstreamFailed(std::io::Error),
}

/// Relays the upstream's replies to `client` until the upstream socket fails or the session
/// is dropped (which aborts this task).
async fn relay_replies(
    upstream: Arc<UdpSocket>,
    listen: Arc<UdpSocket>,
    client: SocketAddr,
    state: Arc<SessionState>,
    counters: Arc<EndpointCounters>,
    clock: Clock,
) {
    loop {
        // An ICMP error raises only the error readiness, not readability.
        let relay = match upstream.ready(Interest::READABLE | Interest::ERROR).await {
            Ok(ready) if ready.is_error() => Relay::UpstreamFailed(
                upstream
                    .take_error()
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| std::io::Error::other("error reported on the socket")),
            ),
            Ok(_) => REPLY_BUFFER.with_borrow_mut(|buffer| match upstream.try_recv(buffer) {
                Ok(len) => {
                    state.last_active.store(clock.now(), Ordering::Relaxed);
                    match listen.try_send_to(&buffer[..len], client) {
                        Ok(sent) => {
                            counters::add(&counters.datagrams_received, 1);
                            counters::add(&counters.bytes.received, sent as u64);
                            Relay::Sent
                        }
                        // UDP may drop: waiting here would hold the shared buffer.
                        Err(error) => Relay::Dropped(error),
                    }
                }
                Err(error) if error.kind() == ErrorKind::WouldBlock => Relay::Spurious,
                Err(error) => Relay::UpstreamFailed(error),
            }),
            Err(error) => Relay::UpstreamFailed(error),
        };
        match relay {
            Relay::Sent | Relay::Spurious => {}
            Relay::Dropped(error) => trace!(%client, %error, "reply dropped"),
            Relay::UpstreamFailed(error) => {
                debug!(%client, %error, "upstream socket failed, the session ends");
                state.ended.store(true, Ordering::Relaxed);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::DEFAULT_CONNECT_TIMEOUT;
    use embassy_plugin_api::{Endpoint, EndpointView};

    /// How long the next name resolutions take on top of the real lookup: a slow resolver,
    /// for the tests that need one.
    static RESOLVE_DELAY_MS: AtomicU64 = AtomicU64::new(0);

    pub(super) async fn resolve_delay() {
        let delay = RESOLVE_DELAY_MS.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
    }

    fn settings(descriptor: &str) -> UdpSettings {
        UdpSettings::of(&descriptor.parse().expect("valid descriptor"))
    }

    #[test]
    fn settings_come_from_the_descriptor_or_default() {
        assert_eq!(
            settings("dns;53/udp"),
            UdpSettings {
                idle: DEFAULT_IDLE,
                max_sessions: DEFAULT_MAX_SESSIONS
            }
        );
        assert_eq!(
            settings("dns;53/udp;udp_idle=5;udp_max_sessions=7"),
            UdpSettings {
                idle: Duration::from_secs(5),
                max_sessions: 7
            }
        );
        assert_eq!(
            settings("dns;53/udp;udp_idle=1").sweep_period(),
            Duration::from_millis(250)
        );
        assert_eq!(
            settings("dns;53/udp").sweep_period(),
            Duration::from_secs(5)
        );
    }

    /// An echo upstream on loopback, served by a task.
    async fn echo_upstream() -> SocketAddr {
        echo_upstream_on("127.0.0.1".parse().expect("ip")).await
    }

    async fn echo_upstream_on(ip: IpAddr) -> SocketAddr {
        let socket = UdpSocket::bind((ip, 0)).await.expect("bind upstream");
        let addr = socket.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut buffer = vec![0u8; DATAGRAM_BUFFER];
            while let Ok((len, peer)) = socket.recv_from(&mut buffer).await {
                let _ = socket.send_to(&buffer[..len], peer).await;
            }
        });
        addr
    }

    /// A listener on 127.0.0.1 for `descriptor`, whose one endpoint is an echo upstream and
    /// whose balancer picks it: the service, the port, the stop token, the reply tasks and
    /// the listener's task.
    async fn serve_one_echo(
        descriptor: &str,
    ) -> (
        Arc<Service>,
        u16,
        CancellationToken,
        TaskTracker,
        tokio::task::JoinHandle<()>,
    ) {
        let upstream = echo_upstream().await;
        let first = |views: &[EndpointView]| (!views.is_empty()).then_some(0);
        let service = Arc::new(Service::new(
            descriptor.parse().expect("descriptor"),
            Box::new(first),
            DEFAULT_CONNECT_TIMEOUT,
        ));
        service
            .endpoints
            .replace(&[Endpoint::new(upstream.to_string())]);
        let listen = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let port = listen.local_addr().expect("addr").port();
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let serving = tokio::spawn(serve_udp(
            listen,
            Arc::clone(&service),
            stop.clone(),
            tasks.clone(),
        ));
        (service, port, stop, tasks, serving)
    }

    async fn exchange(client: &UdpSocket, payload: &[u8]) -> Vec<u8> {
        client.send(payload).await.expect("send");
        let mut buffer = vec![0u8; DATAGRAM_BUFFER];
        let len = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buffer))
            .await
            .expect("answered within 5 s")
            .expect("recv");
        buffer.truncate(len);
        buffer
    }

    /// Live sessions are what least-conn sees, and an idle session stops counting.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn endpoint_counters_count_live_sessions() {
        let (service, port, stop, tasks, serving) = serve_one_echo("dns;53/udp;udp_idle=1").await;
        let live = || service.endpoints.load().views()[0].active_connections();

        let mut clients = Vec::new();
        for size in [1usize, 1_000, 65_507] {
            let client = UdpSocket::bind("127.0.0.1:0").await.expect("client");
            client.connect(("127.0.0.1", port)).await.expect("connect");
            let payload: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
            assert_eq!(
                exchange(&client, &payload).await,
                payload,
                "{size} bytes intact"
            );
            clients.push(client);
        }
        assert_eq!(live(), 3, "one count per session");
        // A second datagram of the same client is the same session.
        assert_eq!(exchange(&clients[0], b"again").await, b"again");
        assert_eq!(live(), 3);

        // Idle 1 s, swept every 250 ms.
        let deadline = Instant::now() + Duration::from_secs(5);
        while live() != 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(live(), 0, "idle sessions released their count");

        stop.cancel();
        serving.await.expect("listener ends");
        tasks.close();
        tokio::time::timeout(Duration::from_secs(5), tasks.wait())
            .await
            .expect("reply tasks end with the listener");
    }

    /// A shorter `udp_idle` applied in place ends a session the listener's starting settings
    /// (60 s) would have kept.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn session_settings_applied_in_place_reach_the_sessions() {
        let (service, port, stop, _tasks, serving) = serve_one_echo("dns;53/udp").await;
        let live = || service.endpoints.load().views()[0].active_connections();
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("client");
        client.connect(("127.0.0.1", port)).await.expect("connect");
        assert_eq!(exchange(&client, b"hello").await, b"hello");
        assert_eq!(live(), 1);

        service.apply_tunables(
            &"dns;53/udp;udp_idle=1".parse().expect("descriptor"),
            &crate::service::ConnectionDefaults::default(),
        );
        // The next sweep (within 5 s, the old pace) takes the new idle time; the session,
        // idle since, ends at the sweep after.
        let deadline = Instant::now() + Duration::from_secs(15);
        while live() != 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(live(), 0, "the session ended under the new udp_idle");
        stop.cancel();
        serving.await.expect("listener ends");
    }

    /// A client whose session waits for a slow name resolution does not hold up the others,
    /// and its first datagram is delivered once the name resolves.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_name_resolution_stalls_only_its_own_client() {
        let local = tokio::net::lookup_host("localhost:0")
            .await
            .expect("localhost resolves")
            .next()
            .expect("an address");
        let upstream = echo_upstream_on(local.ip()).await;
        // The first pick goes to the named endpoint, every later one to the address.
        let picks = AtomicU64::new(0);
        let picker = move |views: &[EndpointView]| {
            (views.len() == 2).then(|| usize::from(picks.fetch_add(1, Ordering::Relaxed) > 0))
        };
        let service = Arc::new(Service::new(
            "dns;53/udp".parse().expect("descriptor"),
            Box::new(picker),
            DEFAULT_CONNECT_TIMEOUT,
        ));
        service.endpoints.replace(&[
            Endpoint::new(format!("localhost:{}", upstream.port())),
            Endpoint::new(upstream.to_string()),
        ]);
        let listen = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let port = listen.local_addr().expect("addr").port();
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let serving = tokio::spawn(serve_udp(
            listen,
            Arc::clone(&service),
            stop.clone(),
            tasks.clone(),
        ));

        RESOLVE_DELAY_MS.store(1500, Ordering::Relaxed);
        let slow = UdpSocket::bind("127.0.0.1:0").await.expect("client");
        slow.connect(("127.0.0.1", port)).await.expect("connect");
        slow.send(b"slow").await.expect("send");
        let resolving = Instant::now();
        let fast = UdpSocket::bind("127.0.0.1:0").await.expect("client");
        fast.connect(("127.0.0.1", port)).await.expect("connect");
        for round in 0..5u8 {
            assert_eq!(
                exchange(&fast, &[round]).await,
                [round],
                "relayed meanwhile"
            );
        }
        assert!(
            resolving.elapsed() < Duration::from_millis(1500),
            "the other client was served while the name was resolving"
        );
        let mut buffer = [0u8; 16];
        assert!(
            matches!(slow.try_recv(&mut buffer), Err(e) if e.kind() == ErrorKind::WouldBlock),
            "the slow session is still opening"
        );
        let len = tokio::time::timeout(Duration::from_secs(10), slow.recv(&mut buffer))
            .await
            .expect("answered once resolved")
            .expect("recv");
        assert_eq!(&buffer[..len], b"slow", "the first datagram was kept");
        assert!(resolving.elapsed() >= Duration::from_millis(1500));
        RESOLVE_DELAY_MS.store(0, Ordering::Relaxed);

        stop.cancel();
        serving.await.expect("listener ends");
        tasks.close();
        tokio::time::timeout(Duration::from_secs(5), tasks.wait())
            .await
            .expect("tasks end with the listener");
    }
}
