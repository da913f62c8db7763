//! Harness for Embassy's end-to-end tests: the real `embassy` binary, real plugin libraries
//! copied into a plugin directory, real TCP upstreams on loopback.
//!
//! Every wait here is bounded; a test that waits too long fails with what it saw.
//! [`consul_sim`] stands in for a Consul agent, which cannot be installed here.

pub mod consul_sim;

pub mod prometheus;
pub mod redis;
pub mod udp;

pub use redis::Redis;
pub use udp::{closed_udp_addr, Identity, UdpClient, UdpUpstream};

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex, OnceLock,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

pub mod dns;
pub mod docker;
pub mod etcd;
pub mod faults;
pub mod tls;

/// Where the workspace's build outputs are, built once per test process.
pub struct Artifacts {
    /// `target/<profile>`: the binary and the plugin libraries.
    pub profile_dir: PathBuf,
    /// Outputs of the fixture workspaces: test-only plugins (`tests/fixtures/plugins`) and
    /// libraries built against other contracts (`tests/fixtures/changed-contract`,
    /// `tests/fixtures/contract-1.0`).
    pub fixtures_dir: PathBuf,
}

impl Artifacts {
    pub fn embassy(&self) -> PathBuf {
        self.profile_dir.join("embassy")
    }

    /// A plugin library of the workspace by crate name, e.g. `embassy-plugin-file`.
    pub fn library(&self, krate: &str) -> PathBuf {
        self.profile_dir
            .join(format!("lib{}.so", krate.replace('-', "_")))
    }

    /// A minimal host built against the frozen 1.0 contract (`tests/fixtures/contract-1.0`).
    pub fn v1_host(&self) -> PathBuf {
        self.fixtures_dir.join("v1-host")
    }

    /// A library of a fixture workspace, e.g. `not-a-plugin`.
    pub fn fixture_library(&self, krate: &str) -> PathBuf {
        self.fixtures_dir
            .join(format!("lib{}.so", krate.replace('-', "_")))
    }
}

/// The standard plugins: round robin, least connections, file, etcd and DNS discovery.
pub const STANDARD_PLUGINS: &[&str] = &[
    "embassy-plugin-round-robin",
    "embassy-plugin-least-conn",
    "embassy-plugin-file",
    "embassy-plugin-etcd",
    "embassy-plugin-dns",
];

/// Builds the binary and every plugin library (cargo is a no-op when they are fresh).
pub fn artifacts() -> &'static Artifacts {
    static ARTIFACTS: OnceLock<Artifacts> = OnceLock::new();
    ARTIFACTS.get_or_init(|| {
        build().unwrap_or_else(|error| panic!("building the artifacts failed: {error:#}"))
    })
}

fn build() -> Result<Artifacts> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_path_buf();
    // A test binary lives in target/<profile>/deps, a binary using the harness (the fault
    // suite's) in target/<profile>.
    let exe = std::env::current_exe()?;
    let mut profile_dir = exe.parent().context("profile dir")?;
    if profile_dir.file_name().is_some_and(|name| name == "deps") {
        profile_dir = profile_dir.parent().context("profile dir")?;
    }
    let profile_dir = profile_dir.to_path_buf();
    let target_dir = profile_dir.parent().context("target dir")?.to_path_buf();
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some(other) => other,
        None => bail!("cannot tell the build profile from {}", exe.display()),
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // Built beside the standard plugins; tests that want them add them to a plugin directory.
    let mut packages = vec![
        "embassy-host",
        "embassy-plugin-consul",
        "embassy-plugin-source-hash",
    ];
    packages.extend(STANDARD_PLUGINS);
    let mut main = Command::new(&cargo);
    main.current_dir(&root)
        .args(["build", "--profile", profile, "--target-dir"])
        .arg(&target_dir);
    for package in packages {
        main.args(["-p", package]);
    }
    run_cargo(main)?;
    let fixtures_target = target_dir.join("fixtures");
    for fixture in [
        "tests/fixtures/plugins",
        "tests/fixtures/changed-contract",
        "tests/fixtures/contract-1.0",
    ] {
        let mut build = Command::new(&cargo);
        build
            .current_dir(root.join(fixture))
            .args(["build", "--target-dir"])
            .arg(&fixtures_target);
        run_cargo(build)?;
    }
    Ok(Artifacts {
        profile_dir,
        fixtures_dir: fixtures_target.join("debug"),
    })
}

fn run_cargo(mut command: Command) -> Result<()> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// A temporary plugin directory holding copies of the given libraries.
pub fn plugin_dir(libraries: &[PathBuf]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for library in libraries {
        let name = library.file_name().expect("library file name");
        std::fs::copy(library, dir.path().join(name))
            .unwrap_or_else(|e| panic!("copy {}: {e}", library.display()));
    }
    dir
}

/// The standard plugins, plus `extra` libraries, in a fresh plugin directory.
pub fn standard_plugin_dir(extra: &[PathBuf]) -> tempfile::TempDir {
    let a = artifacts();
    let mut libraries: Vec<PathBuf> = STANDARD_PLUGINS.iter().map(|p| a.library(p)).collect();
    libraries.extend_from_slice(extra);
    plugin_dir(&libraries)
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A real TCP server on loopback: greets each connection with `<name>\n`, then echoes.
pub struct Upstream {
    pub name: String,
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Upstream {
    pub fn start(name: &str) -> Upstream {
        Upstream::start_on(name, std::net::Ipv4Addr::LOCALHOST.into())
    }

    /// Like [`Upstream::start`] on another local address (e.g. Docker's bridge gateway, for
    /// containers to reach).
    pub fn start_on(name: &str, ip: std::net::IpAddr) -> Upstream {
        Upstream::start_at(name, SocketAddr::new(ip, 0))
    }

    /// Like [`Upstream::start`] on `addr`: a stopped upstream coming back where it was.
    pub fn start_at(name: &str, addr: SocketAddr) -> Upstream {
        let listener = TcpListener::bind(addr).expect("bind upstream");
        let addr = listener.local_addr().expect("upstream addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (greeting, count, stopped) = (
            format!("{name}\n"),
            Arc::clone(&accepted),
            Arc::clone(&stop),
        );
        thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        count.fetch_add(1, Ordering::Relaxed);
                        let greeting = greeting.clone();
                        thread::spawn(move || serve_echo(stream, &greeting));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Upstream {
            name: name.to_string(),
            addr,
            accepted,
            stop,
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve_echo(mut stream: TcpStream, greeting: &str) {
    let _ = stream.set_nonblocking(false);
    if stream.write_all(greeting.as_bytes()).is_err() {
        return;
    }
    let mut buffer = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stream.write_all(&buffer[..n]).is_err() {
                    return;
                }
            }
        }
    }
    // The client half-closed: answer with our own FIN after the echo.
    let _ = stream.shutdown(Shutdown::Write);
}

/// A client connection through the proxy, knowing which upstream greeted it.
pub struct Client {
    pub upstream: String,
    reader: BufReader<TcpStream>,
}

impl Client {
    /// Connects to 127.0.0.1:`port` and reads the upstream's greeting.
    pub fn connect(port: u16) -> Result<Client> {
        Client::greeted(TcpStream::connect(("127.0.0.1", port))?)
    }

    /// Connects to 127.0.0.1:`port` from `source` (another loopback address, e.g. 127.0.0.2:
    /// another client as far as the proxy can tell) and reads the upstream's greeting.
    pub fn connect_from(port: u16, source: std::net::Ipv4Addr) -> Result<Client> {
        use socket2::{Domain, Protocol, Socket, Type};
        if !source.is_loopback() {
            bail!("tests connect from loopback only, not {source}");
        }
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        socket
            .bind(&SocketAddr::from((source, 0)).into())
            .with_context(|| format!("bind {source}"))?;
        socket.connect(&SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port)).into())?;
        Client::greeted(socket.into())
    }

    fn greeted(stream: TcpStream) -> Result<Client> {
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if line.is_empty() {
            bail!("connection closed before any upstream answered");
        }
        Ok(Client {
            upstream: line.trim_end().to_string(),
            reader,
        })
    }

    /// Sends `data` and reads back the echo.
    pub fn echo(&mut self, data: &[u8]) -> Result<Vec<u8>> {
        self.reader.get_mut().write_all(data)?;
        let mut back = vec![0u8; data.len()];
        self.reader.read_exact(&mut back)?;
        Ok(back)
    }

    pub fn stream(&mut self) -> &mut TcpStream {
        self.reader.get_mut()
    }
}

/// Opens `n` connections one after another and counts them per upstream.
pub fn distribution(port: u16, n: usize) -> Result<HashMap<String, usize>> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        let client = Client::connect(port)?;
        *counts.entry(client.upstream).or_insert(0) += 1;
    }
    Ok(counts)
}

/// Connections opened through Embassy's `port` and echoed back to back on another thread until
/// finished: a test asserts none failed while discovery changed things.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<(usize, Vec<String>)>>,
}

impl Traffic {
    pub fn start(port: u16) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let (mut ok, mut failures) = (0, Vec::new());
            // About 200 connections a second (gentle on ephemeral ports), for at most 2 minutes
            // should a test hang before stopping it.
            for _ in 0..24_000 {
                if stopped.load(Ordering::Relaxed) {
                    break;
                }
                match Client::connect(port).and_then(|mut c| c.echo(b"ping")) {
                    Ok(echo) if echo == b"ping" => ok += 1,
                    Ok(other) => failures.push(format!("bad echo {other:?}")),
                    Err(error) => failures.push(format!("{error:#}")),
                }
                thread::sleep(Duration::from_millis(5));
            }
            (ok, failures)
        });
        Traffic {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the traffic; (connections that worked, failures).
    pub fn finish(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("traffic thread")
    }
}

/// Opens connections until one lands on `name`, at most 10 s of trying.
pub fn reaches(port: u16, name: &str) -> bool {
    eventually(Duration::from_secs(10), || {
        Client::connect(port).is_ok_and(|c| c.upstream == name)
    })
}

/// Until 12 connections in a row spread exactly over `names` (each reached), at most 10 s.
pub fn settles_on(port: u16, names: &[&str]) -> bool {
    eventually(Duration::from_secs(10), || {
        distribution(port, 12).is_ok_and(|counts| {
            counts.len() == names.len() && names.iter().all(|n| counts.contains_key(*n))
        })
    })
}

/// Writes a services file atomically (write then rename), as an operator's tooling would.
pub fn write_services(path: &Path, json: &serde_json::Value) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(json).expect("json")).expect("write services");
    std::fs::rename(&tmp, path).expect("rename services");
}

/// A running `embassy` process; killed when dropped.
pub struct Embassy {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    /// Reads stderr until the process closes it.
    reader: Option<thread::JoinHandle<()>>,
    /// The admin socket [`Embassy::command`] gave it, if it came from there.
    admin: Option<PathBuf>,
}

/// A fresh admin socket path for one test instance (the directory is shared, the names not).
fn admin_socket_path() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join("embassy-tests-admin");
    let _ = std::fs::create_dir_all(&dir);
    dir.join(format!(
        "{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

impl Embassy {
    /// Starts `embassy` with `args`, logging to an in-memory buffer (and the test's stderr).
    pub fn start<I, S>(args: I) -> Embassy
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Embassy::start_binary(&artifacts().embassy(), args)
    }

    /// Starts the Embassy binary at `binary` (e.g. one built against another contract).
    pub fn start_binary<I, S>(binary: &Path, args: I) -> Embassy
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Embassy::spawn(&mut Embassy::command(binary, args))
    }

    /// Spawns `command` (made by [`Embassy::command`], perhaps changed), knowing its admin
    /// socket.
    pub fn spawn(command: &mut Command) -> Embassy {
        let admin = command
            .get_envs()
            .find(|(key, _)| *key == "EMBASSY_ADMIN")
            .and_then(|(_, value)| value)
            .and_then(|value| value.to_str())
            .and_then(|value| value.strip_prefix("unix:"))
            .map(PathBuf::from);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?}: {e}", command.get_program()));
        let mut embassy = Embassy::adopt(child);
        embassy.admin = admin;
        embassy
    }

    /// The command [`Embassy::start_binary`] spawns (stderr piped, debug logging of the
    /// engine, no inherited discovery settings), for a caller that changes it first (limits,
    /// log level) and hands the child to [`Embassy::adopt`].
    pub fn command<I, S>(binary: &Path, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut command = Command::new(binary);
        command
            .args(args)
            .env_remove("DISCOVERY")
            .env_remove("EMBASSY_PLUGIN_DIR")
            .env("EMBASSY_LOG", "info,embassy_core=debug")
            .env(
                "EMBASSY_ADMIN",
                format!("unix:{}", admin_socket_path().display()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    }

    /// Wraps a child started by the test itself (with a piped stderr).
    pub fn adopt(mut child: Child) -> Embassy {
        let stderr = child.stderr.take().expect("stderr must be piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let reader = Some(Embassy::collect(stderr, Arc::clone(&log)));
        Embassy {
            child,
            log,
            reader,
            admin: None,
        }
    }

    /// GETs `path` from this instance's admin API over its unix socket (plain HTTP/1.1, one
    /// request per connection): the status code and the JSON body.
    pub fn admin_get(&self, path: &str) -> Result<(u16, serde_json::Value)> {
        let socket = self
            .admin
            .as_ref()
            .context("this instance was not started with an admin socket")?;
        let (status, body) = http_get_unix(socket, path)?;
        let json =
            serde_json::from_str(&body).with_context(|| format!("GET {path}: not JSON: {body}"))?;
        Ok((status, json))
    }

    /// The service `id` as `GET /v1/services/{id}` shows it, once `ready` holds of it (or the
    /// last view after `timeout`, as an error).
    pub fn wait_for_service(
        &self,
        id: &str,
        timeout: Duration,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        self.wait_for_admin(&format!("/v1/services/{id}"), timeout, ready)
    }

    /// The services `GET /v1/services` lists, once it lists `count` (a listed service's
    /// listener is bound: what "listening" in the log says).
    pub fn wait_for_services(
        &self,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<serde_json::Value>> {
        let list = self.wait_for_admin("/v1/services", timeout, |list| {
            list.as_array().is_some_and(|l| l.len() == count)
        })?;
        Ok(list.as_array().cloned().unwrap_or_default())
    }

    /// The service `id` once the endpoints it serves are exactly `addresses` (in any order).
    pub fn wait_for_endpoints<A: ToString>(
        &self,
        id: &str,
        addresses: &[A],
        timeout: Duration,
    ) -> Result<serde_json::Value> {
        let mut expected: Vec<String> = addresses.iter().map(ToString::to_string).collect();
        expected.sort();
        self.wait_for_service(id, timeout, |view| serving(view) == expected)
    }

    /// The service `id` once its discovery watch is in `state` (`reachable`, `unreachable`,
    /// `invalid`: what the plugin last reported; `discovery.detail` says why).
    pub fn wait_for_discovery(
        &self,
        id: &str,
        state: &str,
        timeout: Duration,
    ) -> Result<serde_json::Value> {
        self.wait_for_service(id, timeout, |view| view["discovery"]["state"] == state)
    }

    /// `GET path` answered 200 with a body `ready` holds of (or the last body, as an error).
    fn wait_for_admin(
        &self,
        path: &str,
        timeout: Duration,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        if self.admin.is_none() {
            bail!("GET {path}: this instance was not started with an admin socket");
        }
        let deadline = Instant::now() + timeout;
        let mut last = None;
        while Instant::now() < deadline {
            match self.admin_get(path) {
                Ok((200, body)) if ready(&body) => return Ok(body),
                Ok((status, body)) => last = Some(format!("{status} {body}")),
                Err(error) => last = Some(format!("{error:#}")),
            }
            thread::sleep(Duration::from_millis(20));
        }
        bail!("GET {path} not as expected within {timeout:?}; last seen: {last:?}")
    }

    /// `GET /metrics` over the admin socket: the Prometheus text.
    pub fn metrics(&self) -> Result<String> {
        let socket = self
            .admin
            .as_ref()
            .context("this instance was not started with an admin socket")?;
        match http_get_unix(socket, "/metrics")? {
            (200, text) => Ok(text),
            (status, body) => bail!("GET /metrics: {status}: {body}"),
        }
    }

    /// Scrapes until the sample `name{labels}` equals `expected` (or fails after `timeout`
    /// with the last value): counters settle a moment after the client sees its bytes.
    pub fn wait_for_sample(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        expected: f64,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        while Instant::now() < deadline {
            last = prometheus::sample(&self.metrics()?, name, labels);
            if last == Some(expected) {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(20));
        }
        bail!("{name}{labels:?} is {last:?}, not {expected}, after {timeout:?}")
    }

    /// The admin socket's path.
    pub fn admin_socket(&self) -> Option<&Path> {
        self.admin.as_deref()
    }

    fn collect(
        stderr: std::process::ChildStderr,
        log: Arc<Mutex<Vec<String>>>,
    ) -> thread::JoinHandle<()> {
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[embassy] {line}");
                log.lock().expect("log").push(line);
            }
        })
    }

    /// Waits until a log line contains `needle`; fails with the log so far.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.log().into_iter().find(|l| l.contains(needle)) {
                return Ok(line);
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "embassy exited ({status}) before logging {needle:?}:\n{}",
                    self.log().join("\n")
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "no log line with {needle:?} within {timeout:?}:\n{}",
                    self.log().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Lines logged so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().expect("log").clone()
    }

    /// Lines logged so far that contain `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.log()
            .into_iter()
            .filter(|l| l.contains(needle))
            .collect()
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                // Everything it logged is in `log` once the reader reaches end of file.
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                }
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("embassy did not exit within {timeout:?}");
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Descriptors the process has open now.
    pub fn open_descriptors(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id())).map_or(0, |dir| dir.count())
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Embassy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Embassy running on the `file` discovery plugin, with the services file it reads.
pub struct FileBacked {
    pub embassy: Embassy,
    /// The services file; rewrite it with [`write_services`].
    pub services: PathBuf,
    _dir: tempfile::TempDir,
}

impl FileBacked {
    /// Writes `services` to a fresh services file and starts the default binary with
    /// `--plugin-dir plugins --discovery file://...` and `args` (the `--service`s and other
    /// options); returns once the admin API lists every `--service` of `args` (the file
    /// plugin hands a watch its first set before the service is listed).
    pub fn start(services: &serde_json::Value, plugins: &Path, args: &[String]) -> FileBacked {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("services.json");
        write_services(&path, services);
        let mut all = vec![
            "--plugin-dir".to_string(),
            plugins.display().to_string(),
            "--discovery".to_string(),
            format!("file://{}", path.display()),
        ];
        all.extend_from_slice(args);
        let embassy = Embassy::start(&all);
        let count = args.iter().filter(|a| *a == "--service").count();
        embassy
            .wait_for_services(count, Duration::from_secs(20))
            .expect("embassy serves every --service");
        FileBacked {
            embassy,
            services: path,
            _dir: dir,
        }
    }
}

/// One `GET path` over the unix socket `socket`: the status code and the body.
pub fn http_get_unix(socket: &Path, path: &str) -> Result<(u16, String)> {
    let stream = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("connect {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    http_get_on(stream, path)
}

/// One `GET path` to the TCP address `addr`: the status code and the body.
pub fn http_get_tcp(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connect {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    http_get_on(stream, path)
}

/// One `POST path` of `body` (JSON) over the unix socket `socket`: the status and the body.
pub fn http_post_unix(
    socket: &Path,
    path: &str,
    body: &serde_json::Value,
) -> Result<(u16, String)> {
    let stream = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("connect {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    http_exchange(stream, "POST", path, Some(body))
}

/// One `POST path` of `body` (JSON) to the TCP address `addr`: the status and the body.
pub fn http_post_tcp(
    addr: SocketAddr,
    path: &str,
    body: &serde_json::Value,
) -> Result<(u16, String)> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connect {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    http_exchange(stream, "POST", path, Some(body))
}

fn http_get_on(stream: impl Read + Write, path: &str) -> Result<(u16, String)> {
    http_exchange(stream, "GET", path, None)
}

fn http_exchange(
    mut stream: impl Read + Write,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<(u16, String)> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: embassy\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of headers in {response:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_string()))
}

/// The addresses of the endpoints a service view (`GET /v1/services/{id}`) shows serving,
/// sorted.
pub fn serving(view: &serde_json::Value) -> Vec<String> {
    let mut found: Vec<String> = view["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["state"] == "serving")
        .filter_map(|e| e["address"].as_str().map(str::to_string))
        .collect();
    found.sort();
    found
}

/// What the plugin last said about a service's discovery (a view's `discovery.detail`).
pub fn discovery_detail(view: &serde_json::Value) -> &str {
    view["discovery"]["detail"].as_str().unwrap_or_default()
}

/// `--service DESCRIPTOR` as arguments.
pub fn service_arg(descriptor: impl Into<String>) -> [String; 2] {
    ["--service".to_string(), descriptor.into()]
}

/// Runs `embassy` with `args` to completion: (exit code, stdout, stderr).
pub fn run_embassy<I, S>(args: I) -> (i32, String, String)
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let output = Command::new(artifacts().embassy())
        .args(args)
        .env_remove("DISCOVERY")
        .env("EMBASSY_ADMIN", "off")
        .output()
        .expect("run embassy");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Polls `condition` every 10 ms until it holds or `timeout` passes.
pub fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        thread::sleep(Duration::from_millis(10));
    }
    condition()
}
