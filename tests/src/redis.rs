//! A real Redis (Debian's `redis-server`) for tests: on a free loopback port with no
//! persistence, answering `PING` before [`Redis::start`] returns, killed when dropped. It is
//! the text-protocol server behind `check=send:PING,expect:PONG`.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::free_port;

pub const INSTALL_HINT: &str =
    "redis-server is needed by this test: apt-get install -y redis-server (scripts/test installs it)";

/// A running `redis-server` on 127.0.0.1.
pub struct Redis {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Redis {
    /// Starts Redis and waits until it answers PING; panics with the install hint if the
    /// binary is missing.
    pub fn start() -> Redis {
        let mut redis = Redis {
            port: free_port(),
            dir: tempfile::tempdir().expect("temp dir"),
            child: None,
        };
        redis.spawn().unwrap_or_else(|error| panic!("{error:#}"));
        redis
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, self.port))
    }

    fn spawn(&mut self) -> Result<()> {
        let binary = std::env::var("EMBASSY_TEST_REDIS").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(&binary)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            // No snapshot, no append-only file: nothing outlives the test.
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.dir.path().join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|error| {
                if error.kind() == std::io::ErrorKind::NotFound {
                    anyhow::anyhow!("{binary} not found. {INSTALL_HINT}")
                } else {
                    anyhow::anyhow!("cannot start {binary}: {error}")
                }
            })?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(20))
    }

    /// Waits until PING is answered with PONG, or fails with Redis's log.
    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("redis-server exited ({status}):\n{}", self.log());
                }
            }
            match self.ping() {
                Ok(()) => return Ok(()),
                Err(error) => last = format!("{error:#}"),
            }
            thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "redis on port {} did not answer PING within {timeout:?} ({last}):\n{}",
            self.port,
            self.log()
        )
    }

    /// One PING over a fresh connection: Ok when the answer is `+PONG`.
    pub fn ping(&self) -> Result<()> {
        let mut stream = TcpStream::connect_timeout(&self.addr(), Duration::from_secs(2))
            .with_context(|| format!("connect {}", self.addr()))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(b"PING\r\n")?;
        let mut answer = [0u8; 7];
        stream.read_exact(&mut answer)?;
        if &answer != b"+PONG\r\n" {
            bail!("PING answered {:?}", String::from_utf8_lossy(&answer));
        }
        Ok(())
    }

    /// Redis's own log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// Kills the server (SIGKILL, as a crash would) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, once it answers PING.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn().unwrap_or_else(|error| panic!("{error:#}"));
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
