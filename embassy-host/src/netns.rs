//! Binding a listener inside another process's network namespace (host mode).
//!
//! `setns(CLONE_NEWNET)` switches only the calling thread, so the bind happens on a thread of
//! its own that ends right after: no runtime worker ever leaves Embassy's namespace. A socket
//! keeps the namespace it was created in, so the listener is then served on the runtime like
//! any other, and the app container reaches it at `127.0.0.1:PORT` in its own namespace.

use std::{
    fs::File,
    io,
    net::{SocketAddr, TcpListener, UdpSocket},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use thiserror::Error;

/// A network namespace, named by a file that holds it (`/proc/<pid>/ns/net`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Netns {
    /// The namespace's inode: equal for every process in the same namespace.
    pub inode: u64,
    pub path: PathBuf,
}

/// Why a listener could not be opened in a namespace.
#[derive(Debug, Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot enter network namespace {path}: {source} (embassy needs CAP_SYS_ADMIN)")]
    Enter {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("port {addr} is already in use in network namespace {path}")]
    AddrInUse { addr: SocketAddr, path: PathBuf },
    #[error("cannot bind {addr} in network namespace {path}: {source}")]
    Bind {
        addr: SocketAddr,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the thread binding {addr} in {path} died")]
    ThreadDied { addr: SocketAddr, path: PathBuf },
}

impl Netns {
    /// Embassy's own network namespace.
    pub fn own() -> Result<Netns, NetnsError> {
        Netns::at(PathBuf::from("/proc/self/ns/net"))
    }

    /// The network namespace of process `pid`, as this process sees it.
    pub fn of_pid(pid: u32) -> Result<Netns, NetnsError> {
        Netns::at(PathBuf::from(format!("/proc/{pid}/ns/net")))
    }

    fn at(path: PathBuf) -> Result<Netns, NetnsError> {
        let inode = std::fs::metadata(&path)
            .map_err(|source| NetnsError::Open {
                path: path.clone(),
                source,
            })?
            .ino();
        Ok(Netns { inode, path })
    }

    /// Binds a TCP listener on `addr` inside this namespace, returned non-blocking so that
    /// `tokio::net::TcpListener::from_std` can serve it.
    pub async fn bind_tcp(&self, addr: SocketAddr) -> Result<TcpListener, NetnsError> {
        self.inside(addr, move || embassy_core::listener::tcp_listener(addr))
            .await
    }

    /// Binds a UDP socket on `addr` inside this namespace, non-blocking for
    /// `tokio::net::UdpSocket::from_std`.
    pub async fn bind_udp(&self, addr: SocketAddr) -> Result<UdpSocket, NetnsError> {
        self.inside(addr, move || embassy_core::listener::udp_listener(addr))
            .await
    }

    /// Runs `make` (which creates a socket bound to `addr`) on a thread of its own that first
    /// enters this namespace. Any socket kind can be made this way (UDP too).
    pub async fn inside<T: Send + 'static>(
        &self,
        addr: SocketAddr,
        make: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> Result<T, NetnsError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let path = self.path.clone();
        let thread = std::thread::Builder::new()
            .name("embassy-netns".into())
            .spawn(move || {
                let _ = reply.send(enter(&path).and_then(|()| {
                    make().map_err(|source| match source.kind() {
                        io::ErrorKind::AddrInUse => NetnsError::AddrInUse {
                            addr,
                            path: path.clone(),
                        },
                        _ => NetnsError::Bind {
                            addr,
                            path: path.clone(),
                            source,
                        },
                    })
                }));
            });
        let died = || NetnsError::ThreadDied {
            addr,
            path: self.path.clone(),
        };
        if thread.is_err() {
            return Err(died());
        }
        answer.await.map_err(|_| died())?
    }
}

/// Moves the calling thread into the namespace at `path`. Only for threads that end right after.
fn enter(path: &Path) -> Result<(), NetnsError> {
    let namespace = File::open(path).map_err(|source| NetnsError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    // SAFETY: setns(2) on a valid, open namespace descriptor; it changes only this thread's
    // namespace, and the caller's thread ends as soon as its socket is made.
    if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(NetnsError::Enter {
            path: path.to_path_buf(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}
