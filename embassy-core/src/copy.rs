//! Moving bytes between the client and the upstream, both ways, with correct half-close.
//!
//! On Linux the default is `splice(2)` through a pipe: the bytes never enter user space, so the
//! proxy neither copies them nor holds a buffer per connection. A pipe is taken from a
//! per-thread pool only while a direction has data to move and goes back once drained, so an idle
//! connection holds no pipe (and no extra descriptors). Elsewhere, or when asked, a user-space
//! copy with one buffer per direction.

use std::io;

use tokio::{io::copy_bidirectional_with_sizes, net::TcpStream};

/// How a connection's bytes are moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMode {
    /// `read` into a buffer, `write` out of it.
    Userspace,
    /// `splice` through a pooled pipe (Linux only; falls back to `Userspace` elsewhere).
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
        tokio::try_join!(one_way(client, upstream), one_way(upstream, client))
    }

    /// Moves `from` → `to` until `from` reaches end of stream, then half-closes `to`.
    async fn one_way(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
        let mut total = 0u64;
        loop {
            from.readable().await?;
            let pipe = Pipe::take()?;
            loop {
                let filled = from.try_io(Interest::READABLE, || {
                    splice(from.as_raw_fd(), pipe.write.as_raw_fd(), CHUNK)
                });
                match filled {
                    Ok(0) => {
                        pipe.give_back();
                        // SAFETY: shutdown(2) on a descriptor `to` owns; it stays open.
                        if unsafe { libc::shutdown(to.as_raw_fd(), libc::SHUT_WR) } == -1 {
                            let error = io::Error::last_os_error();
                            if error.raw_os_error() != Some(libc::ENOTCONN) {
                                return Err(error);
                            }
                        }
                        return Ok(total);
                    }
                    Ok(mut pending) => {
                        total += pending as u64;
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
                        pipe.give_back(); // drained: an idle direction holds no pipe
                        break;
                    }
                    Err(error) => return Err(error),
                }
            }
        }
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
