//! The client side of the fault scenarios: connections through Embassy that check every byte
//! (a greeting naming the upstream, then an echo of a pattern unique to the connection, then a
//! clean end), classified by how they failed. Plain threads and blocking sockets; every load is
//! bounded in count and time.

use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use super::Failure;

/// What one connection does.
#[derive(Debug, Clone, Copy)]
pub struct Exchange {
    /// Echo rounds after the greeting.
    pub rounds: usize,
    /// Bytes per round.
    pub size: usize,
    /// Pause between rounds (a connection that stays in flight a while).
    pub pause: Duration,
    /// Bound of the connect and of every read and write.
    pub timeout: Duration,
}

impl Exchange {
    /// One 256-byte round, 2 s bound.
    pub const SHORT: Exchange = Exchange {
        rounds: 1,
        size: 256,
        pause: Duration::ZERO,
        timeout: Duration::from_secs(2),
    };

    pub fn timeout(self, timeout: Duration) -> Exchange {
        Exchange { timeout, ..self }
    }
}

/// One connection's story.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub start: Instant,
    /// When the upstream's greeting arrived: Embassy had accepted and connected.
    pub greeted: Option<Instant>,
    pub end: Instant,
    /// The upstream that greeted.
    pub upstream: Option<String>,
    pub result: Result<(), Failure>,
}

impl Attempt {
    pub fn ok(&self) -> bool {
        self.result.is_ok()
    }
}

/// How an I/O error shows to a client.
pub fn classify(error: &io::Error) -> Failure {
    match error.kind() {
        io::ErrorKind::ConnectionRefused => Failure::Refused,
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => Failure::Reset,
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Failure::Timeout,
        io::ErrorKind::UnexpectedEof => Failure::Short,
        _ => Failure::Other,
    }
}

/// The bytes of round `round` of connection `seed`: a misrouted or reordered echo shows.
pub fn pattern(seed: u64, round: usize, size: usize, out: &mut Vec<u8>) {
    out.clear();
    let mut x = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(round as u64 + 1);
    out.extend((0..size).map(|_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as u8
    }));
}

/// A connection that has been greeted and checked once, kept open.
pub struct Held {
    pub stream: TcpStream,
    pub upstream: String,
    seed: u64,
}

impl Held {
    /// Connects, reads the greeting and checks one echo round; the connection stays open.
    pub fn open(port: u16, seed: u64, timeout: Duration) -> Result<Held, Failure> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut stream = connect(addr, timeout)?;
        let upstream = greeting(&mut stream)?;
        let mut held = Held {
            stream,
            upstream,
            seed,
        };
        held.check(0)?;
        Ok(held)
    }

    /// One more echo round on the open connection.
    pub fn check(&mut self, round: usize) -> Result<(), Failure> {
        let mut data = Vec::new();
        pattern(self.seed, round, 64, &mut data);
        echo_round(&mut self.stream, &data)
    }
}

fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, Failure> {
    let stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| classify(&e))?;
    let setup = || -> io::Result<()> {
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)
    };
    setup().map_err(|e| classify(&e))?;
    Ok(stream)
}

/// Reads `<name>\n`; end of stream before it is short data, anything after it corrupt.
fn greeting(stream: &mut TcpStream) -> Result<String, Failure> {
    let mut line = [0u8; 64];
    let mut len = 0;
    loop {
        let n = stream.read(&mut line[len..]).map_err(|e| classify(&e))?;
        if n == 0 {
            return Err(Failure::Short);
        }
        len += n;
        if let Some(newline) = line[..len].iter().position(|&b| b == b'\n') {
            if newline + 1 != len {
                return Err(Failure::Corrupt);
            }
            return String::from_utf8(line[..newline].to_vec()).map_err(|_| Failure::Corrupt);
        }
        if len == line.len() {
            return Err(Failure::Corrupt);
        }
    }
}

fn echo_round(stream: &mut TcpStream, data: &[u8]) -> Result<(), Failure> {
    stream.write_all(data).map_err(|e| classify(&e))?;
    let mut back = vec![0u8; data.len()];
    stream.read_exact(&mut back).map_err(|e| classify(&e))?;
    if back != data {
        return Err(Failure::Corrupt);
    }
    Ok(())
}

/// One full exchange with 127.0.0.1:`port`: greeting, `rounds` echoes, half-close, and the
/// upstream's clean end of stream (nothing more, no reset).
pub fn exchange(port: u16, how: &Exchange, seed: u64) -> Attempt {
    let start = Instant::now();
    let mut attempt = Attempt {
        start,
        greeted: None,
        end: start,
        upstream: None,
        result: Ok(()),
    };
    attempt.result = (|| {
        let mut stream = connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), how.timeout)?;
        attempt.upstream = Some(greeting(&mut stream)?);
        attempt.greeted = Some(Instant::now());
        let mut data = Vec::with_capacity(how.size);
        for round in 0..how.rounds {
            if round > 0 && !how.pause.is_zero() {
                thread::sleep(how.pause);
            }
            pattern(seed, round, how.size, &mut data);
            echo_round(&mut stream, &data)?;
        }
        stream.shutdown(Shutdown::Write).map_err(|e| classify(&e))?;
        let mut rest = [0u8; 64];
        match stream.read(&mut rest) {
            Ok(0) => Ok(()),
            Ok(_) => Err(Failure::Corrupt),
            Err(e) => Err(classify(&e)),
        }
    })();
    attempt.end = Instant::now();
    attempt
}

/// A bounded load: `workers` threads running exchanges back to back (with `pause` between),
/// until `max_attempts` in all or `max_time`, whichever comes first, or until stopped.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub port: u16,
    pub workers: usize,
    pub max_attempts: usize,
    pub max_time: Duration,
    pub pause: Duration,
    pub exchange: Exchange,
    /// Run inside the network namespace of this process (a container's).
    pub netns: Option<u32>,
}

impl Load {
    pub fn new(port: u16) -> Load {
        Load {
            port,
            workers: 4,
            max_attempts: 20_000,
            max_time: Duration::from_secs(10),
            pause: Duration::from_millis(5),
            exchange: Exchange::SHORT,
            netns: None,
        }
    }
}

/// A load running in the background.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    workers: Vec<thread::JoinHandle<()>>,
}

/// Seeds differ across loads, so two loads never send the same pattern.
static NEXT_SEED: AtomicUsize = AtomicUsize::new(1);

impl Traffic {
    pub fn start(load: Load) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let issued = Arc::new(AtomicUsize::new(0));
        let deadline = Instant::now() + load.max_time;
        let workers = (0..load.workers)
            .map(|worker| {
                let (stop, attempts, issued) = (
                    Arc::clone(&stop),
                    Arc::clone(&attempts),
                    Arc::clone(&issued),
                );
                let work = move || {
                    // Staggered starts: workers in lockstep would leave moments with no
                    // connection in flight at all.
                    thread::sleep(Duration::from_millis(worker as u64 * 13 % 50));
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        if issued.fetch_add(1, Ordering::Relaxed) >= load.max_attempts {
                            break;
                        }
                        let seed = NEXT_SEED.fetch_add(1, Ordering::Relaxed) as u64;
                        let attempt = exchange(load.port, &load.exchange, seed);
                        let failed = !attempt.ok();
                        attempts.lock().expect("attempts").push(attempt);
                        // A refused connect returns at once: do not spin on it.
                        let pause = if failed {
                            load.pause.max(Duration::from_millis(5))
                        } else {
                            load.pause
                        };
                        if !pause.is_zero() {
                            thread::sleep(pause);
                        }
                    }
                };
                match load.netns {
                    None => thread::spawn(work),
                    Some(pid) => thread::spawn(move || {
                        if let Err(error) = crate::docker::in_netns_of(pid, move || {
                            work();
                            Ok(())
                        }) {
                            eprintln!("traffic in the namespace of {pid} failed: {error:#}");
                        }
                    }),
                }
            })
            .collect();
        Traffic {
            stop,
            attempts,
            workers,
        }
    }

    /// Attempts finished so far.
    pub fn count(&self) -> usize {
        self.attempts.lock().expect("attempts").len()
    }

    /// A copy of the attempts finished so far.
    pub fn so_far(&self) -> Vec<Attempt> {
        self.attempts.lock().expect("attempts").clone()
    }

    /// Waits until at least `n` attempts finished, at most `timeout`.
    pub fn wait_count(&self, n: usize, timeout: Duration) -> bool {
        crate::eventually(timeout, || self.count() >= n)
    }

    /// Stops the workers (each finishes its connection) and returns every attempt, by start.
    pub fn finish(self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::Relaxed);
        self.join()
    }

    /// Waits for the load to end by its own bounds and returns every attempt, by start.
    pub fn join(self) -> Vec<Attempt> {
        for worker in self.workers {
            let _ = worker.join();
        }
        let mut attempts = std::mem::take(&mut *self.attempts.lock().expect("attempts"));
        attempts.sort_by_key(|a| a.start);
        attempts
    }
}
