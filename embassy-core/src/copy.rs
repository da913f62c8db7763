//! Moving bytes between the client and the upstream, both ways, with correct half-close.
//!
//! On Linux the default moves bulk transfers with `splice(2)` through a pipe: the bytes never
//! enter user space. A pipe is taken from a per-thread pool only while a direction has data to
//! move and goes back once drained. Small exchanges (requests, responses, handshakes) go through
//! one scratch buffer per thread instead, which is cheaper than two splices for a few bytes. So
//! an idle connection holds neither a pipe nor a buffer. Elsewhere, or when asked, a user-space
//! copy with one buffer per direction per connection.
//!
//! Both modes run under one watchdog per connection ([`Timeouts`]): the copy loops only bump a
//! plain counter per read; one timer per connection, firing a few times per timeout, compares
//! it with what it saw last. So the timeouts cost nothing per byte and no timer is re-armed
//! per read.

use std::{
    future::{poll_fn, Future},
    io,
    pin::pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    task::Poll,
    time::Duration,
};

use crate::counters::{self, ByteCounters};
use socket2::SockRef;
use tokio::{
    net::TcpStream,
    sync::Notify,
    task::unconstrained,
    time::{sleep_until, Instant},
};

/// How a connection's bytes are moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMode {
    /// `read` into a buffer, `write` out of it.
    Userspace,
    /// Bulk through `splice` and a pooled pipe, small exchanges through a per-thread buffer
    /// (Linux only; falls back to `Userspace` elsewhere).
    Splice,
}

impl CopyMode {
    /// The fastest mode this platform supports.
    pub fn best() -> CopyMode {
        if cfg!(target_os = "linux") {
            CopyMode::Splice
        } else {
            CopyMode::Userspace
        }
    }
}

/// User-space buffer per direction: large enough for bulk transfers.
const COPY_BUFFER: usize = 64 * 1024;

/// A connection's time limits, both measured as time without a byte moving either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Both directions open and silent this long: close both (Envoy's tcp_proxy
    /// `idle_timeout`).
    pub idle: Duration,
    /// One side has sent its FIN and nothing moved for this long: close both (HAProxy's
    /// `timeout client-fin` / `server-fin`). Shorter than `idle`, because a half-closed
    /// connection whose other side stays silent is usually a peer that will never finish, and
    /// it holds two descriptors meanwhile. Measured as inactivity, not from the FIN, so a
    /// download that follows a client's `shutdown(SHUT_WR)` runs as long as bytes flow.
    pub half_close: Duration,
}

/// The watchdog looks a few times per timeout, so a connection closes between the timeout and
/// a quarter more.
const TICKS_PER_TIMEOUT: u32 = 4;
/// Shortest watchdog period, whatever the timeouts.
const MIN_TICK: Duration = Duration::from_millis(10);
/// A young connection starts listening for a [`Cut`] at its first watchdog tick, at most this
/// late: connections shorter than this never touch the cut signal's lock.
const CUT_LISTEN_AFTER: Duration = Duration::from_secs(1);

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Both sides finished: bytes sent client → upstream and upstream → client.
    Closed { sent: u64, received: u64 },
    /// Nothing moved for [`Timeouts::idle`].
    Idle,
    /// Half-closed, and nothing moved for [`Timeouts::half_close`].
    HalfClosed,
    /// [`Cut::cut`] was called (end of the grace period): the caller resets both sides.
    Cut,
}

/// Cuts every connection that listens to it: the end of a graceful stop. Connections check a
/// flag per wake-up (an atomic load); only those alive for [`CUT_LISTEN_AFTER`] register to be
/// woken, once each, so short connections never take its lock.
#[derive(Debug, Default)]
pub struct Cut {
    cut: AtomicBool,
    notify: Notify,
    /// Cut with this one: an endpoint's signal under its service's (which is the process's).
    children: std::sync::Mutex<Vec<std::sync::Weak<Cut>>>,
}

impl Cut {
    /// Ends every connection listening to this signal or to one of its children; the young
    /// ones within [`CUT_LISTEN_AFTER`].
    pub fn cut(&self) {
        self.cut.store(true, Ordering::Release);
        self.notify.notify_waiters();
        let children = std::mem::take(
            &mut *self
                .children
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        for child in children.iter().filter_map(std::sync::Weak::upgrade) {
            child.cut();
        }
    }

    /// A signal of its own that this one also fires (once per endpoint, not per connection).
    pub fn child(&self) -> Arc<Cut> {
        let child = Arc::new(Cut::default());
        let mut children = self
            .children
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if self.is_cut() {
            child.cut();
        } else {
            children.retain(|weak| weak.strong_count() > 0);
            children.push(Arc::downgrade(&child));
        }
        child
    }

    #[inline]
    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::Acquire)
    }

    /// Waits until [`Cut::cut`] is called (for paths that are not per byte).
    pub async fn wait(&self) {
        let notified = self.notify.notified();
        let mut notified = pin!(notified);
        notified.as_mut().enable();
        if !self.is_cut() {
            notified.await;
        }
    }
}

/// Copies both ways until both sides have closed their sending half, a timeout strikes or
/// `cut` fires.
pub async fn copy_bidirectional(
    client: &TcpStream,
    upstream: &TcpStream,
    mode: CopyMode,
    timeouts: Timeouts,
    cut: &Cut,
    bytes: &ByteCounters,
) -> io::Result<Ended> {
    let shared = Shared {
        progress: AtomicU64::new(0),
        one_done: AtomicBool::new(false),
        bytes,
    };
    match mode {
        #[cfg(target_os = "linux")]
        CopyMode::Splice => {
            drive(
                splice::one_way(client, upstream, &shared, Way::ToUpstream),
                splice::one_way(upstream, client, &shared, Way::ToClient),
                &shared.progress,
                timeouts,
                cut,
            )
            .await
        }
        _ => {
            drive(
                userspace_one_way(client, upstream, &shared, Way::ToUpstream),
                userspace_one_way(upstream, client, &shared, Way::ToClient),
                &shared.progress,
                timeouts,
                cut,
            )
            .await
        }
    }
}

/// What both directions of one connection share, behind one reference (each direction's
/// future holds references for its whole life: one instead of two keeps idle connections
/// small).
struct Shared<'a> {
    /// Reads and writes so far, for the watchdog.
    progress: AtomicU64,
    /// One direction has ended.
    one_done: AtomicBool,
    /// Where the bytes moved are counted, each way.
    bytes: &'a ByteCounters,
}

/// Which way a direction moves bytes: a byte, where a counter's address would take eight in
/// every direction's future.
#[derive(Clone, Copy)]
enum Way {
    ToUpstream,
    ToClient,
}

impl Shared<'_> {
    #[inline]
    fn moved(&self, way: Way) -> &AtomicU64 {
        match way {
            Way::ToUpstream => &self.bytes.sent,
            Way::ToClient => &self.bytes.received,
        }
    }
}

/// One more read happened. Both directions run in one task, never at once, so a plain load and
/// store (no locked instruction) is enough.
#[inline]
fn bump(progress: &AtomicU64) {
    progress.store(
        progress.load(Ordering::Relaxed).wrapping_add(1),
        Ordering::Relaxed,
    );
}

/// What the watchdog knows between ticks.
struct Watchdog {
    timeouts: Timeouts,
    half_closed: bool,
    /// `progress` as of the last tick, and since when it has not changed.
    seen: u64,
    quiet_since: Instant,
}

impl Watchdog {
    fn limit(&self) -> Duration {
        if self.half_closed {
            self.timeouts.half_close.min(self.timeouts.idle)
        } else {
            self.timeouts.idle
        }
    }

    fn period(&self) -> Duration {
        (self.limit() / TICKS_PER_TIMEOUT).max(MIN_TICK)
    }

    /// One look at the counter; `Some` when the connection must end.
    fn tick(&mut self, now: Instant, progress: u64) -> Option<Ended> {
        if progress != self.seen {
            self.seen = progress;
            self.quiet_since = now;
        } else if now.duration_since(self.quiet_since) >= self.limit() {
            return Some(if self.half_closed {
                Ended::HalfClosed
            } else {
                Ended::Idle
            });
        }
        None
    }

    /// When to look next: a period from now, or exactly when the limit runs out if sooner.
    fn next(&self, now: Instant) -> Instant {
        (now + self.period()).min(self.quiet_since + self.limit())
    }
}

/// Runs both directions and the watchdog in the caller's task. The directions are polled on
/// every wake-up as they would be by `try_join!`; the timer only when it fired (or needs
/// arming), and the cut signal's flag is one atomic load.
async fn drive(
    client_to_upstream: impl Future<Output = io::Result<u64>>,
    upstream_to_client: impl Future<Output = io::Result<u64>>,
    progress: &AtomicU64,
    timeouts: Timeouts,
    cut: &Cut,
) -> io::Result<Ended> {
    let mut there = pin!(client_to_upstream);
    let mut back = pin!(upstream_to_client);
    let mut sent = None;
    let mut received = None;
    let start = Instant::now();
    let mut watchdog = Watchdog {
        timeouts,
        half_closed: false,
        seen: 0,
        quiet_since: start,
    };
    let mut timer = pin!(sleep_until(
        watchdog.next(start).min(start + CUT_LISTEN_AFTER)
    ));
    let mut timer_armed = false;
    let mut cut_wait = pin!(cut.notify.notified());
    let mut listening_for_cut = false;
    poll_fn(|cx| {
        let was_open = sent.is_none() && received.is_none();
        if sent.is_none() {
            if let Poll::Ready(result) = there.as_mut().poll(cx) {
                sent = Some(result?);
            }
        }
        if received.is_none() {
            if let Poll::Ready(result) = back.as_mut().poll(cx) {
                received = Some(result?);
            }
        }
        if let (Some(sent), Some(received)) = (sent, received) {
            return Poll::Ready(Ok(Ended::Closed { sent, received }));
        }
        if listening_for_cut && cut.is_cut() {
            return Poll::Ready(Ok(Ended::Cut));
        }
        if was_open && (sent.is_some() || received.is_some()) {
            // The first FIN: from now on the half-close limit applies (one timer reset).
            let now = Instant::now();
            watchdog.half_closed = true;
            watchdog.seen = progress.load(Ordering::Relaxed);
            watchdog.quiet_since = now;
            timer.as_mut().reset(watchdog.next(now));
            timer_armed = false;
        }
        while !timer_armed || timer.is_elapsed() {
            // Outside the task's cooperative budget: a timer refused for budget would stay
            // unregistered, and an idle connection would never be looked at again.
            if pin!(unconstrained(timer.as_mut())).poll(cx).is_pending() {
                timer_armed = true;
                break;
            }
            let now = Instant::now();
            if let Some(ended) = watchdog.tick(now, progress.load(Ordering::Relaxed)) {
                return Poll::Ready(Ok(ended));
            }
            if !listening_for_cut {
                // Registers this task with the cut signal, once per connection.
                if cut_wait.as_mut().poll(cx).is_ready() || cut.is_cut() {
                    return Poll::Ready(Ok(Ended::Cut));
                }
                listening_for_cut = true;
            }
            timer.as_mut().reset(watchdog.next(now));
            timer_armed = false;
        }
        Poll::Pending
    })
    .await
}

/// Moves `from` → `to` through a buffer of this connection's until `from` reaches end of
/// stream, then half-closes `to` (unless the other direction already ended: both sockets close
/// right after, which sends the same FIN).
async fn userspace_one_way(
    from: &TcpStream,
    to: &TcpStream,
    shared: &Shared<'_>,
    way: Way,
) -> io::Result<u64> {
    let mut buffer = vec![0u8; COPY_BUFFER];
    let mut total = 0u64;
    loop {
        from.readable().await?;
        bump(&shared.progress);
        let read = match from.try_read(&mut buffer) {
            Ok(0) => {
                if !shared.one_done.swap(true, Ordering::AcqRel) {
                    shutdown_write(to)?;
                }
                return Ok(total);
            }
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => return Err(error),
        };
        let mut rest = &buffer[..read];
        while !rest.is_empty() {
            to.writable().await?;
            match to.try_write(rest) {
                Ok(written) => {
                    bump(&shared.progress); // a slow reader taking bytes is progress too
                    rest = &rest[written..];
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Err(error),
            }
        }
        total += read as u64;
        counters::add(shared.moved(way), read as u64);
    }
}

/// `shutdown(SHUT_WR)`; a peer already gone is not an error.
fn shutdown_write(to: &TcpStream) -> io::Result<()> {
    match SockRef::from(to).shutdown(std::net::Shutdown::Write) {
        Err(error) if error.kind() != io::ErrorKind::NotConnected => Err(error),
        _ => Ok(()),
    }
}

/// Makes the next close of `socket` send a reset instead of a FIN (`SO_LINGER` 0): the peer
/// learns the stream was cut, not finished.
pub fn reset_on_close(socket: &TcpStream) {
    let _ = SockRef::from(socket).set_linger(Some(Duration::ZERO));
}

#[cfg(target_os = "linux")]
mod splice {
    use std::{
        cell::RefCell,
        io,
        os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        sync::atomic::Ordering,
    };

    use tokio::{io::Interest, net::TcpStream};

    use crate::counters;

    /// Most bytes asked of one `splice` call; the pipe's capacity bounds it anyway.
    const CHUNK: usize = 1 << 20;
    /// Idle pipes kept per thread.
    const POOL_LIMIT: usize = 64;

    /// Moves `from` → `to` until `from` reaches end of stream, then half-closes `to`.
    ///
    /// Small reads go through this thread's scratch buffer (a request/response exchange costs
    /// one `read` and one `write`, like a plain event loop). A read that fills the scratch
    /// buffer, or a write the peer cannot take at once, marks the direction as bulk: from then
    /// on it splices.
    ///
    /// The direction that ends second skips the `shutdown`: both sockets close right after,
    /// and closing a socket whose input is drained sends the same FIN.
    pub(super) async fn one_way(
        from: &TcpStream,
        to: &TcpStream,
        shared: &super::Shared<'_>,
        way: super::Way,
    ) -> io::Result<u64> {
        let mut total = 0u64;
        let mut bulk = false;
        loop {
            from.readable().await?;
            super::bump(&shared.progress);
            let moved = if bulk {
                splice_available(from, to, shared, way).await?
            } else {
                match relay_small(from, to) {
                    Ok(Relayed::All(n)) => {
                        bulk = n == SCRATCH;
                        counters::add(shared.moved(way), n as u64);
                        Some(n)
                    }
                    Ok(Relayed::Partly(written, rest)) => {
                        bulk = true; // the peer is slower than the sender: bulk
                        counters::add(shared.moved(way), written as u64);
                        total += written as u64; // before the await: one less value held
                        write_all(to, &rest).await?;
                        counters::add(shared.moved(way), rest.len() as u64);
                        Some(rest.len())
                    }
                    Ok(Relayed::End) => None,
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => Some(0),
                    Err(error) => return Err(error),
                }
            };
            match moved {
                Some(n) => total += n as u64,
                None => {
                    if !shared.one_done.swap(true, Ordering::AcqRel) {
                        half_close(to)?;
                    }
                    return Ok(total);
                }
            }
        }
    }

    /// What one small relay did.
    enum Relayed {
        /// Read and wrote this many bytes.
        All(usize),
        /// Wrote this many bytes; these remain (the only allocation, and only under
        /// backpressure).
        Partly(usize, Vec<u8>),
        /// `from` reached end of stream.
        End,
    }

    /// Size of each thread's scratch buffer; a read that fills it means bulk.
    const SCRATCH: usize = 16 * 1024;

    thread_local! {
        static SCRATCH_BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH].into_boxed_slice());
    }

    /// One `read` into the scratch buffer and one `write` of what it got, without awaiting.
    fn relay_small(from: &TcpStream, to: &TcpStream) -> io::Result<Relayed> {
        SCRATCH_BUFFER.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let read = read_draining(from, &mut scratch)?;
            if read == 0 {
                return Ok(Relayed::End);
            }
            let written = match to.try_write(&scratch[..read]) {
                Ok(written) => written,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => 0,
                Err(error) => return Err(error),
            };
            Ok(if written == read {
                Relayed::All(read)
            } else {
                Relayed::Partly(written, scratch[written..read].to_vec())
            })
        })
    }

    /// `read(2)` once; a read shorter than the buffer drained the socket, so the readiness is
    /// cleared right away instead of by a second `read` that would fail with `EAGAIN` (one
    /// system call less per message). `try_io` documents `WouldBlock` as "the I/O would
    /// block"; reporting it after a short read departs from that on purpose, exactly as tokio's
    /// own `poll_read` does. No wake-up is lost: tokio clears readiness only if no newer event
    /// arrived since it was observed, epoll reports data (or a FIN) that arrives after the read
    /// as a new event, and a seen end of stream (read-closed) is never cleared.
    fn read_draining(from: &TcpStream, buffer: &mut [u8]) -> io::Result<usize> {
        let mut read = 0;
        let outcome = from.try_io(Interest::READABLE, || {
            // SAFETY: read(2) into a buffer we exclusively borrow, on a descriptor `from` owns.
            let n =
                unsafe { libc::read(from.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len()) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            read = n as usize;
            if read > 0 && read < buffer.len() {
                Err(io::ErrorKind::WouldBlock.into()) // drained: clear the readiness
            } else {
                Ok(read)
            }
        });
        match outcome {
            Err(error) if error.kind() == io::ErrorKind::WouldBlock && read > 0 => Ok(read),
            other => other,
        }
    }

    async fn write_all(to: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            to.writable().await?;
            match to.try_write(bytes) {
                Ok(written) => bytes = &bytes[written..],
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// Splices everything `from` has now; `None` at end of stream. Holds a pipe only while
    /// bytes flow, so an idle direction holds none. Bumps `progress` per chunk: a long
    /// transfer may never leave this loop.
    async fn splice_available(
        from: &TcpStream,
        to: &TcpStream,
        shared: &super::Shared<'_>,
        way: super::Way,
    ) -> io::Result<Option<usize>> {
        let pipe = Pipe::take()?;
        let mut moved = 0;
        loop {
            let filled = from.try_io(Interest::READABLE, || {
                splice(from.as_raw_fd(), pipe.write.as_raw_fd(), CHUNK)
            });
            match filled {
                Ok(0) => {
                    pipe.give_back();
                    return Ok(None);
                }
                Ok(mut pending) => {
                    super::bump(&shared.progress);
                    moved += pending;
                    counters::add(shared.moved(way), pending as u64);
                    while pending > 0 {
                        // Errors leave bytes in the pipe: it is dropped, not pooled.
                        pending -= to
                            .async_io(Interest::WRITABLE, || {
                                splice(pipe.read.as_raw_fd(), to.as_raw_fd(), pending)
                            })
                            .await?;
                        super::bump(&shared.progress); // a slow reader taking bytes is progress too
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    pipe.give_back();
                    return Ok(Some(moved));
                }
                Err(error) => return Err(error),
            }
        }
    }

    fn half_close(to: &TcpStream) -> io::Result<()> {
        // SAFETY: shutdown(2) on a descriptor `to` owns; it stays open.
        if unsafe { libc::shutdown(to.as_raw_fd(), libc::SHUT_WR) } == -1 {
            let error = io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::ENOTCONN) {
                return Err(error);
            }
        }
        Ok(())
    }

    fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
        // SAFETY: plain syscall on descriptors owned by the caller for the call's duration;
        // null offsets are valid for sockets and pipes.
        let moved = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if moved < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(moved as usize)
        }
    }

    struct Pipe {
        read: OwnedFd,
        write: OwnedFd,
    }

    thread_local! {
        static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    }

    impl Pipe {
        /// An empty pipe from this thread's pool, or a new one.
        fn take() -> io::Result<Pipe> {
            if let Some(pipe) = POOL.with(|pool| pool.borrow_mut().pop()) {
                return Ok(pipe);
            }
            let mut fds = [0 as RawFd; 2];
            // SAFETY: pipe2 writes two descriptors into `fds` on success.
            if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } == -1 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: both descriptors were just created and are owned by nobody else.
            Ok(unsafe {
                Pipe {
                    read: OwnedFd::from_raw_fd(fds[0]),
                    write: OwnedFd::from_raw_fd(fds[1]),
                }
            })
        }

        /// Returns an empty pipe to this thread's pool (or closes it when the pool is full).
        fn give_back(self) {
            POOL.with(|pool| {
                let mut pool = pool.borrow_mut();
                if pool.len() < POOL_LIMIT {
                    pool.push(self);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    /// Two connected sockets on loopback: (the proxy's end, the peer's end).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let peer = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (ours, _) = listener.accept().await.expect("accept");
        (ours, peer)
    }

    const MODES: [CopyMode; 2] = [CopyMode::Userspace, CopyMode::Splice];

    fn timeouts(idle_ms: u64, half_close_ms: u64) -> Timeouts {
        Timeouts {
            idle: Duration::from_millis(idle_ms),
            half_close: Duration::from_millis(half_close_ms),
        }
    }

    /// Runs a copy between two fresh pairs; returns its task and the two peers.
    async fn start(
        mode: CopyMode,
        limits: Timeouts,
        cut: Arc<Cut>,
    ) -> (
        tokio::task::JoinHandle<io::Result<Ended>>,
        TcpStream,
        TcpStream,
    ) {
        start_counted(mode, limits, cut, Arc::default()).await
    }

    /// [`start`], counting the copy's bytes into `bytes`.
    async fn start_counted(
        mode: CopyMode,
        limits: Timeouts,
        cut: Arc<Cut>,
        bytes: Arc<ByteCounters>,
    ) -> (
        tokio::task::JoinHandle<io::Result<Ended>>,
        TcpStream,
        TcpStream,
    ) {
        let (client, client_peer) = pair().await;
        let (upstream, upstream_peer) = pair().await;
        let task = tokio::spawn(async move {
            copy_bidirectional(&client, &upstream, mode, limits, &cut, &bytes).await
        });
        (task, client_peer, upstream_peer)
    }

    async fn ended(task: tokio::task::JoinHandle<io::Result<Ended>>) -> Ended {
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the copy ends within 10 s")
            .expect("task")
            .expect("no i/o error")
    }

    use std::sync::Arc;

    #[tokio::test]
    async fn a_silent_connection_ends_at_the_idle_timeout() {
        for mode in MODES {
            let started = Instant::now();
            let (task, _client, _upstream) =
                start(mode, timeouts(300, 60_000), Arc::default()).await;
            assert_eq!(ended(task).await, Ended::Idle, "{mode:?}");
            let took = started.elapsed();
            assert!(
                took >= Duration::from_millis(300),
                "{mode:?}: ended after {took:?}"
            );
        }
    }

    #[tokio::test]
    async fn traffic_keeps_a_connection_open_past_the_idle_timeout() {
        for mode in MODES {
            let (task, mut client, mut upstream) =
                start(mode, timeouts(300, 60_000), Arc::default()).await;
            // 1.2 s of a message every 50 ms: four idle timeouts' worth of time.
            for round in 0..24u8 {
                client.write_all(&[round]).await.expect("write");
                let mut byte = [0u8];
                upstream.read_exact(&mut byte).await.expect("relayed");
                assert_eq!(byte[0], round);
                tokio::time::sleep(Duration::from_millis(50)).await;
                assert!(!task.is_finished(), "{mode:?}: ended while bytes flowed");
            }
            assert_eq!(ended(task).await, Ended::Idle, "{mode:?}: then idle");
        }
    }

    /// The watchdog re-arms between bulk reads too (where the task's budget runs out), so a
    /// connection that goes quiet after a transfer still ends.
    #[tokio::test]
    async fn a_connection_quiet_after_bulk_ends_at_the_idle_timeout() {
        for mode in MODES {
            let (task, mut client, mut upstream) =
                start(mode, timeouts(200, 60_000), Arc::default()).await;
            let reader = tokio::spawn(async move {
                let mut buffer = vec![0u8; 1 << 16];
                let mut total = 0usize;
                while total < 64 << 20 {
                    total += upstream.read(&mut buffer).await.expect("read");
                }
                upstream
            });
            let chunk = vec![7u8; 1 << 20];
            for _ in 0..64 {
                client.write_all(&chunk).await.expect("write");
            }
            let _upstream = reader.await.expect("reader");
            assert_eq!(ended(task).await, Ended::Idle, "{mode:?}");
        }
    }

    #[tokio::test]
    async fn a_half_closed_silent_connection_ends_at_the_half_close_timeout() {
        for mode in MODES {
            let (task, client, mut upstream) =
                start(mode, timeouts(60_000, 300), Arc::default()).await;
            // The client finishes; the upstream neither answers nor closes.
            let (_read, mut write) = client.into_split();
            write.shutdown().await.expect("shutdown");
            let mut buffer = [0u8; 1];
            assert_eq!(
                upstream.read(&mut buffer).await.expect("read"),
                0,
                "FIN relayed"
            );
            assert_eq!(ended(task).await, Ended::HalfClosed, "{mode:?}");
        }
    }

    #[tokio::test]
    async fn a_half_closed_connection_lives_while_bytes_flow() {
        for mode in MODES {
            let (task, client, mut upstream) =
                start(mode, timeouts(60_000, 300), Arc::default()).await;
            let (mut client_read, mut client_write) = client.into_split();
            client_write.shutdown().await.expect("shutdown");
            // A download after the request's FIN: 1.2 s of it, a chunk every 50 ms.
            for _ in 0..24 {
                upstream.write_all(b"chunk").await.expect("write");
                let mut chunk = [0u8; 5];
                client_read.read_exact(&mut chunk).await.expect("relayed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                assert!(!task.is_finished(), "{mode:?}: ended while bytes flowed");
            }
            drop(upstream);
            assert!(
                matches!(ended(task).await, Ended::Closed { received: 120, .. }),
                "{mode:?}: finished normally"
            );
        }
    }

    #[tokio::test]
    async fn cut_ends_young_and_old_connections() {
        for mode in MODES {
            let cut = Arc::new(Cut::default());
            let (old, _c1, _u1) = start(mode, timeouts(60_000, 60_000), Arc::clone(&cut)).await;
            // Past its first watchdog tick: registered for the cut.
            tokio::time::sleep(CUT_LISTEN_AFTER + Duration::from_millis(200)).await;
            let (young, _c2, _u2) = start(mode, timeouts(60_000, 60_000), Arc::clone(&cut)).await;
            let cut_at = Instant::now();
            cut.cut();
            assert_eq!(ended(old).await, Ended::Cut, "{mode:?}");
            assert!(
                cut_at.elapsed() < CUT_LISTEN_AFTER,
                "a registered connection ends at once"
            );
            assert_eq!(
                ended(young).await,
                Ended::Cut,
                "{mode:?}: at its first tick"
            );
        }
    }

    #[tokio::test]
    async fn a_finished_exchange_reports_its_bytes() {
        for mode in MODES {
            let (task, mut client, mut upstream) =
                start(mode, timeouts(60_000, 60_000), Arc::default()).await;
            client.write_all(b"ping").await.expect("write");
            client.shutdown().await.expect("shutdown");
            let mut request = Vec::new();
            upstream.read_to_end(&mut request).await.expect("read");
            assert_eq!(request, b"ping");
            upstream.write_all(b"pong!").await.expect("write");
            drop(upstream);
            let mut reply = Vec::new();
            client.read_to_end(&mut reply).await.expect("read");
            assert_eq!(reply, b"pong!");
            assert_eq!(
                ended(task).await,
                Ended::Closed {
                    sent: 4,
                    received: 5
                },
                "{mode:?}"
            );
        }
    }

    /// Bytes are counted as they move, so a long-lived connection shows up while open; a bulk
    /// transfer (spliced in the default mode) is counted exactly.
    #[tokio::test]
    async fn bytes_are_counted_while_the_connection_is_open() {
        for mode in MODES {
            let bytes = Arc::new(ByteCounters::default());
            let (task, mut client, mut upstream) = start_counted(
                mode,
                timeouts(60_000, 60_000),
                Arc::default(),
                Arc::clone(&bytes),
            )
            .await;
            client.write_all(b"hello").await.expect("write");
            let mut hello = [0u8; 5];
            upstream.read_exact(&mut hello).await.expect("relayed");
            upstream.write_all(b"hi").await.expect("write");
            let mut hi = [0u8; 2];
            client.read_exact(&mut hi).await.expect("relayed");
            assert_eq!(counters::read(&bytes.sent), 5, "{mode:?}");
            assert_eq!(counters::read(&bytes.received), 2, "{mode:?}");

            let bulk = 8usize << 20;
            let reader = tokio::spawn(async move {
                let mut buffer = vec![0u8; 1 << 16];
                let mut total = 0usize;
                while total < bulk {
                    total += upstream.read(&mut buffer).await.expect("read");
                }
                upstream
            });
            let chunk = vec![7u8; 1 << 20];
            for _ in 0..8 {
                client.write_all(&chunk).await.expect("write");
            }
            let _upstream = reader.await.expect("reader");
            assert_eq!(
                counters::read(&bytes.sent),
                5 + bulk as u64,
                "{mode:?}: still open, bulk counted"
            );
            assert!(!task.is_finished());
            task.abort();
        }
    }
}
