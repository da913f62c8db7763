//! Real UDP peers on loopback: an echo upstream that can say who it is and who asked, and a
//! client that resends a bounded number of times.

use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// The request a [`UdpUpstream`] answers with `whoami <name> <peer>` instead of an echo.
pub const WHOAMI: &[u8] = b"whoami";

/// A UDP echo server on 127.0.0.1. It echoes every datagram unchanged, except [`WHOAMI`],
/// which it answers with its name and the source address it saw (the proxy's session socket).
pub struct UdpUpstream {
    pub name: String,
    pub addr: SocketAddr,
    received: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl UdpUpstream {
    pub fn start(name: &str) -> UdpUpstream {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind udp upstream");
        let addr = socket.local_addr().expect("udp upstream addr");
        // Wakes up regularly to notice `stop`.
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
        let received = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopped, own_name) =
            (Arc::clone(&received), Arc::clone(&stop), name.to_string());
        thread::spawn(move || {
            let mut buffer = vec![0u8; 65_536];
            while !stopped.load(Ordering::Relaxed) {
                let Ok((len, peer)) = socket.recv_from(&mut buffer) else {
                    continue;
                };
                count.fetch_add(1, Ordering::Relaxed);
                let _ = if &buffer[..len] == WHOAMI {
                    socket.send_to(format!("whoami {own_name} {peer}").as_bytes(), peer)
                } else {
                    socket.send_to(&buffer[..len], peer)
                };
            }
        });
        UdpUpstream {
            name: name.to_string(),
            addr,
            received,
            stop,
        }
    }

    /// Datagrams received so far.
    pub fn received(&self) -> usize {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for UdpUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A loopback UDP port with nothing listening: datagrams to it draw ICMP port unreachable.
pub fn closed_udp_addr() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|socket| socket.local_addr())
        .expect("free udp port")
}

/// Which upstream answered and which proxy session socket it saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub upstream: String,
    /// The proxy's source address for this client's session: changes when a new session opens.
    pub session: String,
}

/// A UDP client of the proxy on 127.0.0.1:`port`, from its own socket (its own session).
pub struct UdpClient {
    socket: UdpSocket,
    buffer: Vec<u8>,
}

impl UdpClient {
    pub fn new(port: u16) -> Result<UdpClient> {
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        socket.connect(("127.0.0.1", port))?;
        Ok(UdpClient {
            socket,
            buffer: vec![0u8; 65_536],
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.socket.local_addr().expect("local addr")
    }

    /// Sends `request` and returns the first answer `accept` takes (others, e.g. late answers
    /// to an earlier resend, are skipped). Each of `attempts` sends waits up to `wait`.
    fn exchange(
        &mut self,
        request: &[u8],
        attempts: usize,
        wait: Duration,
        accept: impl Fn(&[u8]) -> bool,
    ) -> Result<Vec<u8>> {
        // Clients whose datagrams were dropped together (a full socket buffer) would resend
        // together after equal waits and collide again: each wait is stretched by up to half,
        // differently per client and attempt.
        let port = u32::from(self.local_addr().port());
        for attempt in 0..attempts as u32 {
            self.socket.send(request).context("send")?;
            let stretch = (port.wrapping_mul(7_919) ^ attempt.wrapping_mul(104_729)) % 50;
            let deadline = Instant::now() + wait + wait * stretch / 100;
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                self.socket
                    .set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
                match self.socket.recv(&mut self.buffer) {
                    Ok(len) if accept(&self.buffer[..len]) => {
                        return Ok(self.buffer[..len].to_vec())
                    }
                    Ok(_) => continue,
                    Err(error)
                        if matches!(
                            error.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        break
                    }
                    // ICMP from the proxy's port (e.g. it is not listening): try again.
                    Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => {
                        thread::sleep(Duration::from_millis(20));
                        break;
                    }
                    Err(error) => return Err(error.into()),
                }
            }
        }
        bail!(
            "no answer to a {}-byte datagram after {attempts} sends of {wait:?} (+ up to half) each",
            request.len()
        )
    }

    /// Sends `payload` and waits for the identical echo (5 sends of 2-3 s at most: a loaded
    /// machine drops large datagrams when socket buffers fill, as UDP may).
    pub fn echo(&mut self, payload: &[u8]) -> Result<()> {
        self.exchange(payload, 5, Duration::from_secs(2), |answer| {
            answer == payload
        })
        .map(drop)
    }

    /// Asks which upstream and session serve this client (3 sends of 2 s at most).
    pub fn whoami(&mut self) -> Result<Identity> {
        self.whoami_within(3, Duration::from_secs(2))
    }

    /// [`whoami`](Self::whoami) with a chosen number of sends and wait per send.
    pub fn whoami_within(&mut self, attempts: usize, wait: Duration) -> Result<Identity> {
        let answer = self.exchange(WHOAMI, attempts, wait, |answer| {
            answer.starts_with(b"whoami ")
        })?;
        let text = String::from_utf8(answer).context("whoami answer is not text")?;
        let mut words = text.split(' ').skip(1);
        match (words.next(), words.next()) {
            (Some(upstream), Some(session)) => Ok(Identity {
                upstream: upstream.to_string(),
                session: session.to_string(),
            }),
            _ => bail!("malformed whoami answer {text:?}"),
        }
    }
}
