//! A real DNS server for tests: Debian's `dnsmasq` on a free loopback port, answering only
//! for `.test` (anything else there is NXDOMAIN; nothing is forwarded). A and AAAA records
//! live in a hosts file that dnsmasq re-reads when it changes ([`Dnsmasq::set_hosts`]); SRV
//! records are flags, so changing them restarts it on the same port ([`Dnsmasq::set_srv`]).
//! Every answer carries the TTL given at start. Killed when dropped.

use std::{
    fs::File,
    net::{IpAddr, UdpSocket},
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::free_port;

const INSTALL_HINT: &str = "dnsmasq is needed by this test: apt-get install -y dnsmasq-base";

/// One SRV record: `name` (`_echo._tcp.svc.test`) points at `target:port`.
#[derive(Debug, Clone)]
pub struct SrvRecord {
    pub name: String,
    pub target: String,
    pub port: u16,
    pub priority: u16,
    pub weight: u16,
}

impl SrvRecord {
    pub fn new(name: &str, target: &str, port: u16, priority: u16, weight: u16) -> SrvRecord {
        SrvRecord {
            name: name.to_string(),
            target: target.to_string(),
            port,
            priority,
            weight,
        }
    }
}

/// A running dnsmasq.
pub struct Dnsmasq {
    pub port: u16,
    ttl: u32,
    dir: tempfile::TempDir,
    srv: Vec<SrvRecord>,
    child: Option<Child>,
}

impl Dnsmasq {
    /// Starts dnsmasq with no records, answering with `ttl` seconds; panics with the install
    /// hint if it is missing.
    pub fn start(ttl: u32) -> Dnsmasq {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut dnsmasq = Dnsmasq {
            port: free_port(),
            ttl,
            dir,
            srv: Vec::new(),
            child: None,
        };
        std::fs::create_dir(dnsmasq.hosts_dir()).expect("hosts dir");
        // dnsmasq reads the hosts files as `nobody` once it has dropped root.
        set_mode(dnsmasq.dir.path(), 0o755);
        set_mode(&dnsmasq.hosts_dir(), 0o755);
        dnsmasq.set_hosts(&[]);
        dnsmasq.spawn().unwrap_or_else(|error| panic!("{error:#}"));
        dnsmasq
    }

    /// The `--discovery` URI for Embassy.
    pub fn uri(&self) -> String {
        format!("dns://127.0.0.1:{}", self.port)
    }

    fn hosts_dir(&self) -> PathBuf {
        self.dir.path().join("hosts")
    }

    /// Replaces every A/AAAA record with `records` (`(name, address)`; a name given twice
    /// has two addresses). Written beside the directory and renamed in, so dnsmasq never
    /// reads half a file.
    pub fn set_hosts(&self, records: &[(&str, IpAddr)]) {
        let text: String = records
            .iter()
            .map(|(name, ip)| format!("{ip} {name}\n"))
            .collect();
        let staged = self.dir.path().join("records.staged");
        std::fs::write(&staged, text).expect("write hosts file");
        set_mode(&staged, 0o644);
        std::fs::rename(&staged, self.hosts_dir().join("records")).expect("rename hosts file");
    }

    /// Replaces every SRV record with `records`: dnsmasq restarts on the same port.
    pub fn set_srv(&mut self, records: &[SrvRecord]) {
        self.srv = records.to_vec();
        self.restart();
    }

    fn spawn(&mut self) -> Result<()> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("dnsmasq.log"))?;
        let binary =
            std::env::var("EMBASSY_TEST_DNSMASQ").unwrap_or_else(|_| "/usr/sbin/dnsmasq".into());
        let mut command = Command::new(&binary);
        command
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--local=/test/",
                "--log-facility=-",
            ])
            .arg(format!(
                "--pid-file={}",
                self.dir.path().join("dnsmasq.pid").display()
            ))
            .arg(format!("--port={}", self.port))
            .arg(format!("--local-ttl={}", self.ttl))
            .arg(format!("--hostsdir={}", self.hosts_dir().display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for record in &self.srv {
            command.arg(format!(
                "--srv-host={},{},{},{},{}",
                record.name, record.target, record.port, record.priority, record.weight
            ));
        }
        let child = command.spawn().map_err(|error| {
            if error.kind() == std::io::ErrorKind::NotFound {
                anyhow::anyhow!("{binary} not found. {INSTALL_HINT}")
            } else {
                anyhow::anyhow!("cannot start {binary}: {error}")
            }
        })?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(20))
    }

    /// Waits until dnsmasq answers a query (for a name it does not have).
    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.answers()? {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("dnsmasq exited ({status}) while starting:\n{}", self.log());
                }
            }
            if Instant::now() > deadline {
                bail!("dnsmasq not answering within {timeout:?}:\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether one UDP query for `ready.test` gets an answer.
    fn answers(&self) -> Result<bool> {
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        // Header (id 0x4242, recursion desired, one question), `ready.test`, type A, class IN.
        let mut query = vec![0x42, 0x42, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in ["ready", "test"] {
            query.push(label.len() as u8);
            query.extend_from_slice(label.as_bytes());
        }
        query.extend_from_slice(&[0, 0, 1, 0, 1]);
        socket
            .send_to(&query, ("127.0.0.1", self.port))
            .context("send a query to dnsmasq")?;
        let mut answer = [0u8; 512];
        Ok(matches!(socket.recv(&mut answer), Ok(n) if n >= 12 && answer[..2] == [0x42, 0x42]))
    }

    /// dnsmasq's own log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dnsmasq.log")).unwrap_or_default()
    }

    /// Kills dnsmasq (SIGKILL: an outage, not a goodbye).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts dnsmasq again on the same port with the current records.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn().unwrap_or_else(|error| panic!("{error:#}"));
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.stop();
    }
}

fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}
