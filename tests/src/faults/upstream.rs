//! Upstreams the fault scenarios can break: an echo server that greets each connection with
//! its name (as [`crate::Upstream`] does) and can be killed, listener and open connections
//! at once; and a hung one that accepts and then never reads, answers or closes.
//!
//! Both run on a tokio runtime of their own with one worker thread, so thousands of idle
//! connections cost no thread each, and killing is dropping the runtime: every socket closes
//! as it would when the process dies.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    runtime::Runtime,
};

/// What an upstream does with a connection it accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Greets with `<name>\n`, echoes until the client half-closes, then closes.
    Echo,
    /// Holds the connection forever without reading or writing.
    Hung,
}

/// A killable upstream on 127.0.0.1.
pub struct FaultUpstream {
    pub name: String,
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    runtime: Option<Runtime>,
}

impl FaultUpstream {
    pub fn echo(name: &str) -> Result<FaultUpstream> {
        FaultUpstream::start(name, Behaviour::Echo)
    }

    pub fn hung(name: &str) -> Result<FaultUpstream> {
        FaultUpstream::start(name, Behaviour::Hung)
    }

    pub fn start(name: &str, behaviour: Behaviour) -> Result<FaultUpstream> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("upstream-{name}"))
            .enable_io()
            .build()
            .context("upstream runtime")?;
        let listener = runtime
            .block_on(TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
            .context("bind upstream")?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let greeting: Arc<[u8]> = format!("{name}\n").into_bytes().into();
        let (count, live) = (Arc::clone(&accepted), Arc::clone(&open));
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    // Out of descriptors: the scenario that does this releases them.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                count.fetch_add(1, Ordering::Relaxed);
                let (greeting, live) = (Arc::clone(&greeting), Arc::clone(&live));
                tokio::spawn(async move {
                    let _open = Open::new(live);
                    match behaviour {
                        Behaviour::Echo => echo(stream, &greeting).await,
                        Behaviour::Hung => {
                            let _held = stream;
                            std::future::pending::<()>().await
                        }
                    }
                });
            }
        });
        Ok(FaultUpstream {
            name: name.to_string(),
            addr,
            accepted,
            open,
            runtime: Some(runtime),
        })
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Kills the upstream: the listener and every open connection close at once. Returns once
    /// the port refuses connections.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect_timeout(&self.addr, Duration::from_millis(100)).is_ok() {
            if Instant::now() > deadline {
                bail!("upstream {} still accepts after being killed", self.name);
            }
            thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// `127.0.0.1:PORT`, as a services file entry or an etcd registrator value.
    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for FaultUpstream {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Counts a connection as open for as long as it lives.
struct Open(Arc<AtomicUsize>);

impl Open {
    fn new(count: Arc<AtomicUsize>) -> Open {
        count.fetch_add(1, Ordering::Relaxed);
        Open(count)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn echo(mut stream: tokio::net::TcpStream, greeting: &[u8]) {
    let _ = stream.set_nodelay(true);
    if stream.write_all(greeting).await.is_err() {
        return;
    }
    // Allocated on the first byte, so an idle connection holds no buffer.
    let mut buffer = Vec::new();
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        if buffer.is_empty() {
            buffer = vec![0u8; 16 * 1024];
        }
        match stream.read(&mut buffer).await {
            Ok(0) => break,
            Ok(n) => {
                if stream.write_all(&buffer[..n]).await.is_err() {
                    return;
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        }
    }
    // The client half-closed: our FIN after the echo.
    let _ = stream.shutdown().await;
}
