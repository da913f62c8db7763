//! Moving bytes between the client and the upstream, both ways, with correct half-close.
//!
//! On Linux the default moves bulk transfers with `splice(2)` through a pipe: the bytes never
//! enter user space. A pipe is taken from a per-thread pool only while a direction has data to
//! move and goes back once drained. Small exchanges (requests, responses, handshakes) go through
//! one scratch buffer per thread instead, which is cheaper than two splices for a few bytes. So
//! an idle connection holds neither a pipe nor a buffer. Elsewhere, or when asked, a user-space
//! copy with one buffer per direction per connection.

use std::io;

use tokio::{io::copy_bidirectional_with_sizes, net::TcpStream};

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

/// Copies both ways until both sides have closed their sending half; returns the bytes sent
/// client → upstream and upstream → client.
pub async fn copy_bidirectional(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    mode: CopyMode,
) -> io::Result<(u64, u64)> {
    match mode {
        #[cfg(target_os = "linux")]
        CopyMode::Splice => splice::bidirectional(client, upstream).await,
        _ => copy_bidirectional_with_sizes(client, upstream, COPY_BUFFER, COPY_BUFFER).await,
    }
}

#[cfg(target_os = "linux")]
mod splice {
    use std::{
        cell::RefCell,
        io,
        os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        sync::atomic::{AtomicBool, Ordering},
    };

    use tokio::{io::Interest, net::TcpStream};

    /// Most bytes asked of one `splice` call; the pipe's capacity bounds it anyway.
    const CHUNK: usize = 1 << 20;
    /// Idle pipes kept per thread.
    const POOL_LIMIT: usize = 64;

    /// Both directions at once; the first error ends both (a reset on one side must not leave
    /// the other direction waiting forever).
    pub(super) async fn bidirectional(
        client: &TcpStream,
        upstream: &TcpStream,
    ) -> io::Result<(u64, u64)> {
        let one_done = AtomicBool::new(false);
        tokio::try_join!(
            one_way(client, upstream, &one_done),
            one_way(upstream, client, &one_done)
        )
    }

    /// Moves `from` → `to` until `from` reaches end of stream, then half-closes `to`.
    ///
    /// Small reads go through this thread's scratch buffer (a request/response exchange costs
    /// one `read` and one `write`, like a plain event loop). A read that fills the scratch
    /// buffer, or a write the peer cannot take at once, marks the direction as bulk: from then
    /// on it splices.
    ///
    /// The direction that ends second skips the `shutdown`: both sockets close right after,
    /// and closing a socket whose input is drained sends the same FIN.
    async fn one_way(from: &TcpStream, to: &TcpStream, one_done: &AtomicBool) -> io::Result<u64> {
        let mut total = 0u64;
        let mut bulk = false;
        loop {
            from.readable().await?;
            let moved = if bulk {
                splice_available(from, to).await?
            } else {
                match relay_small(from, to) {
                    Ok(Relayed::All(n)) => {
                        bulk = n == SCRATCH;
                        Some(n)
                    }
                    Ok(Relayed::Partly(rest)) => {
                        bulk = true; // the peer is slower than the sender: bulk
                        write_all(to, &rest).await?;
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
                    if !one_done.swap(true, Ordering::AcqRel) {
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
        /// Wrote part; these bytes remain (the only allocation, and only under backpressure).
        Partly(Vec<u8>),
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
                Relayed::Partly(scratch[written..read].to_vec())
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
    /// bytes flow, so an idle direction holds none.
    async fn splice_available(from: &TcpStream, to: &TcpStream) -> io::Result<Option<usize>> {
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
                    moved += pending;
                    while pending > 0 {
                        // Errors leave bytes in the pipe: it is dropped, not pooled.
                        pending -= to
                            .async_io(Interest::WRITABLE, || {
                                splice(pipe.read.as_raw_fd(), to.as_raw_fd(), pending)
                            })
                            .await?;
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
