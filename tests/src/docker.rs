//! A real Docker engine for the tests: started if none answers, images built locally (no
//! registry is reachable) with `docker import` of a root filesystem made of busybox-static,
//! and, for the Embassy image, the `embassy` binary, its plugins and the libraries they need.
//!
//! Images are tagged by a hash of their content, built once per test process and reused
//! across processes while the content is unchanged.

use std::{
    collections::BTreeSet,
    hash::{Hash, Hasher},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        OnceLock,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{artifacts, STANDARD_PLUGINS};

const INSTALL_HINT: &str = "install Debian's docker.io and busybox-static (apt-get install -y docker.io busybox-static), or run ./scripts/test";

/// The busybox applets the test containers use.
const APPLETS: &[&str] = &[
    "sh", "nc", "sleep", "cat", "echo", "ls", "wget", "httpd", "timeout", "hostname",
];

/// A Docker engine reachable through the `docker` CLI at `host` (`unix://...`).
#[derive(Debug, Clone)]
pub struct Engine {
    pub host: String,
}

/// The machine's engine (`/var/run/docker.sock`), started in the background if none answers.
pub fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let engine = Engine {
            host: "unix:///var/run/docker.sock".into(),
        };
        if let Err(error) = engine.ensure_running() {
            panic!("no docker engine: {error:#}");
        }
        engine
    })
}

impl Engine {
    /// Runs `docker args...` against this engine: stdout (trimmed), or an error with stderr.
    pub fn docker<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut command = Command::new("docker");
        command.arg("--host").arg(&self.host).args(args);
        let output = command
            .output()
            .with_context(|| format!("running docker ({INSTALL_HINT})"))?;
        if !output.status.success() {
            bail!(
                "{command:?} failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    }

    /// True when the engine answers.
    pub fn answers(&self) -> bool {
        self.docker(["version", "--format", "{{.Server.Version}}"])
            .is_ok()
    }

    fn ensure_running(&self) -> Result<()> {
        if self.answers() {
            return Ok(());
        }
        which("dockerd").with_context(|| format!("dockerd not found: {INSTALL_HINT}"))?;
        let log = std::fs::File::create(std::env::temp_dir().join("embassy-tests-dockerd.log"))?;
        Command::new("dockerd")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting dockerd (the tests need root)")?;
        self.wait_answering(Duration::from_secs(60))
    }

    /// Waits until the engine answers, at most `timeout`.
    pub fn wait_answering(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.answers() {
            if Instant::now() > deadline {
                bail!(
                    "docker engine at {} not answering after {timeout:?}",
                    self.host
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// Imports a root filesystem (built by `fill` in a temp dir) as `embassy-test-<kind>:<hash>`,
    /// unless an image of that name exists already.
    fn import(&self, kind: &str, files: &[(PathBuf, PathBuf)]) -> Result<String> {
        let mut hasher = std::hash::DefaultHasher::new();
        for (source, target) in files {
            target.hash(&mut hasher);
            std::fs::read(source)
                .with_context(|| format!("reading {}", source.display()))?
                .hash(&mut hasher);
        }
        APPLETS.hash(&mut hasher);
        let tag = format!("embassy-test-{kind}:{:016x}", hasher.finish());
        if self
            .docker(["image", "inspect", "--format", "{{.Id}}", &tag])
            .is_ok()
        {
            return Ok(tag);
        }
        let root = tempfile::tempdir()?;
        for dir in ["bin", "tmp", "etc", "proc", "sys", "dev", "www"] {
            std::fs::create_dir_all(root.path().join(dir))?;
        }
        for (source, target) in files {
            let at = root.path().join(target.strip_prefix("/").unwrap_or(target));
            std::fs::create_dir_all(at.parent().context("file in a directory")?)?;
            std::fs::copy(source, &at)
                .with_context(|| format!("copying {} into the image", source.display()))?;
        }
        for applet in APPLETS {
            std::os::unix::fs::symlink("busybox", root.path().join("bin").join(applet))?;
        }
        let tar = root.path().with_extension("tar");
        let status = Command::new("tar")
            .arg("-C")
            .arg(root.path())
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()?;
        if !status.success() {
            bail!("tar of the image root failed");
        }
        let imported = self.docker([
            "import".as_ref(),
            "--change".as_ref(),
            "CMD [\"sh\"]".as_ref(),
            tar.as_os_str(),
            tag.as_ref(),
        ]);
        let _ = std::fs::remove_file(&tar);
        imported?;
        Ok(tag)
    }

    /// A minimal image: busybox-static and its applets.
    pub fn busybox_image(&self) -> Result<String> {
        self.import("busybox", &[busybox()?])
    }

    /// busybox plus `/usr/bin/embassy`, the standard plugins in `/usr/lib/embassy/plugins` (the
    /// default plugin dir) and every shared library `ldd` lists for them, at the same paths.
    pub fn embassy_image(&self) -> Result<String> {
        let a = artifacts();
        let mut files = vec![busybox()?];
        let binary = a.embassy();
        let plugins: Vec<PathBuf> = STANDARD_PLUGINS.iter().map(|p| a.library(p)).collect();
        let mut libraries = BTreeSet::new();
        for object in std::iter::once(&binary).chain(&plugins) {
            libraries.extend(shared_libraries(object)?);
        }
        files.push((binary, "/usr/bin/embassy".into()));
        for plugin in plugins {
            let name = plugin.file_name().context("plugin name")?.to_owned();
            files.push((plugin, Path::new("/usr/lib/embassy/plugins").join(name)));
        }
        files.extend(libraries.into_iter().map(|l| (l.clone(), l)));
        self.import("embassy", &files)
    }

    /// Starts a container (`docker run -d`) named `<prefix>-<pid>-<n>`; removed when dropped.
    pub fn run(&self, prefix: &str, args: &[&str]) -> Result<Container> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut all = vec!["run", "-d", "--name", &name];
        all.extend_from_slice(args);
        let id = self.docker(&all)?;
        Ok(Container {
            engine: self.clone(),
            id,
            name,
        })
    }
}

impl Engine {
    /// Embassy in a container of its own (network-container mode), reading `services.json` in
    /// `config` (file discovery, polled every 100 ms) and serving its admin socket in `admin`
    /// (shared with the host: tests ask the API there); returns once it has found its own
    /// container without being told.
    pub fn embassy_network_container(&self, config: &Path, admin: &Path) -> Result<Container> {
        let embassy_image = self.embassy_image()?;
        let volume = format!("{}:/etc/embassy", config.display());
        let admin_volume = format!("{}:/run/embassy", admin.display());
        let embassy = self.run(
            "embassy",
            &[
                "-v",
                "/var/run/docker.sock:/var/run/docker.sock",
                "-v",
                &volume,
                "-v",
                &admin_volume,
                "-e",
                "EMBASSY_LOG=info",
                &embassy_image,
                "/usr/bin/embassy",
                "--docker",
                "--discovery",
                "file:///etc/embassy/services.json",
                "--discovery-opt",
                "poll_interval=100ms",
            ],
        )?;
        embassy.wait_for_log(
            &["network-container mode", &embassy.name],
            Duration::from_secs(30),
        )?;
        Ok(embassy)
    }
}

/// The app of the start-up race, run with `sh -c`: its very first action is to connect to
/// 127.0.0.1:8080 and expect `web-a`'s greeting; it prints `first-connect:ok`, or
/// `first-connect:failed` with what nc got or said (refused, reset, nothing), then exits.
pub const FIRST_CONNECT: &str = "said=$(echo ping | nc -w 3 127.0.0.1 8080 2>&1); \
     case \"$said\" in *web-a*) echo first-connect:ok;; \
     *) echo \"first-connect:failed: $said\";; esac";

/// A container of the tests; `docker rm -f` when dropped.
pub struct Container {
    engine: Engine,
    pub id: String,
    pub name: String,
}

impl Container {
    /// `docker exec <container> sh -c <script>`: stdout, or an error with stderr.
    pub fn sh(&self, script: &str) -> Result<String> {
        self.engine.docker(["exec", &self.id, "sh", "-c", script])
    }

    /// Connects to 127.0.0.1:`port` from inside the container (busybox `nc`), sends a line and
    /// returns everything the far side said: an Embassy upstream's greeting, then the echo.
    pub fn talk(&self, port: u16) -> Result<String> {
        self.sh(&format!("echo ping | timeout 5 nc -w 3 127.0.0.1 {port}"))
    }

    /// The upstream greeting when `talk` reaches one.
    pub fn greeting(&self, port: u16) -> Option<String> {
        let said = self.talk(port).ok()?;
        let mut lines = said.lines();
        let greeting = lines.next()?.to_string();
        (lines.next() == Some("ping")).then_some(greeting)
    }

    /// The `first-connect:` lines of a [`FIRST_CONNECT`] app's log, one per run.
    pub fn first_connects(&self) -> Vec<String> {
        self.logs()
            .lines()
            .filter(|line| line.starts_with("first-connect:"))
            .map(String::from)
            .collect()
    }

    /// Waits for the container to exit (`docker wait`).
    pub fn wait_exit(&self) -> Result<()> {
        self.engine.docker(["wait", &self.id]).map(drop)
    }

    /// The container's log (stdout and stderr).
    pub fn logs(&self) -> String {
        let output = Command::new("docker")
            .args(["--host", &self.engine.host, "logs", &self.id])
            .output();
        match output {
            Ok(output) => format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
            Err(error) => format!("(docker logs failed: {error})"),
        }
    }

    /// Waits until the log has a line containing every one of `needles`; fails with the log.
    pub fn wait_for_log(&self, needles: &[&str], timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let logs = self.logs();
            if let Some(line) = logs
                .lines()
                .find(|line| needles.iter().all(|n| line.contains(n)))
            {
                return Ok(line.to_string());
            }
            if Instant::now() > deadline {
                bail!(
                    "no log line with {needles:?} in {} within {timeout:?}:\n{logs}",
                    self.name
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn stop(&self) -> Result<()> {
        self.engine
            .docker(["stop", "--time", "1", &self.id])
            .map(drop)
    }

    pub fn start(&self) -> Result<()> {
        self.engine.docker(["start", &self.id]).map(drop)
    }

    /// `docker rm -f`: the container is gone (its `destroy` event sent) when this returns.
    pub fn remove(self) -> Result<()> {
        self.engine.docker(["rm", "-f", &self.id]).map(drop)
    }

    /// The container's main process as the host sees it.
    pub fn pid(&self) -> Result<u32> {
        Ok(self
            .engine
            .docker(["inspect", "--format", "{{.State.Pid}}", &self.id])?
            .parse()?)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.engine.docker(["rm", "-f", &self.id]);
    }
}

/// The IPv4 address of the host on Docker's default bridge (`docker0`): where host processes
/// listening on it are reachable from containers.
pub fn bridge_gateway() -> Result<Ipv4Addr> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list we only read, then free once.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        bail!("getifaddrs: {}", std::io::Error::last_os_error());
    }
    let mut found = None;
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: `entry` is a node of the list getifaddrs returned, not yet freed.
        let node = unsafe { &*entry };
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(node.ifa_name) };
        if name.to_bytes() == b"docker0"
            && !node.ifa_addr.is_null()
            // SAFETY: ifa_addr is non-null and points to a sockaddr of the list.
            && i32::from(unsafe { (*node.ifa_addr).sa_family }) == libc::AF_INET
        {
            // SAFETY: an AF_INET address is a sockaddr_in.
            let addr = unsafe { &*(node.ifa_addr as *const libc::sockaddr_in) };
            found = Some(Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)));
        }
        entry = node.ifa_next;
    }
    // SAFETY: frees the list getifaddrs allocated, once; no reference to it outlives this.
    unsafe { libc::freeifaddrs(list) };
    found.context("no IPv4 address on docker0 (is dockerd running with its default bridge?)")
}

fn busybox() -> Result<(PathBuf, PathBuf)> {
    let path = which("busybox").with_context(|| format!("busybox not found: {INSTALL_HINT}"))?;
    let output = Command::new("ldd").arg(&path).output()?;
    if String::from_utf8_lossy(&output.stdout).contains("=>") {
        bail!("{} is dynamically linked: {INSTALL_HINT}", path.display());
    }
    Ok((path, "/bin/busybox".into()))
}

/// The libraries `ldd` lists for `object`, the dynamic loader included (absolute paths).
fn shared_libraries(object: &Path) -> Result<Vec<PathBuf>> {
    let output = Command::new("ldd").arg(object).output()?;
    if !output.status.success() {
        bail!("ldd {} failed", object.display());
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next(),
                None => line.split_whitespace().next(),
            }?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

fn which(command: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(command))
            .find(|path| path.is_file())
    })
}

/// A dockerd of the test's own (its own data root, socket, managed containerd and network
/// namespace, no bridge, live restore), which the test may stop and start without disturbing
/// anything else.
///
/// It answers on `admin.sock` always and on `docker.sock` only when started with `public`:
/// Embassy is given `docker.sock`, so a test can change containers while Embassy cannot see
/// the engine.
pub struct PrivateEngine {
    /// The engine as the test drives it (`admin.sock`).
    pub admin: Engine,
    dir: tempfile::TempDir,
    daemon: Option<std::process::Child>,
}

impl PrivateEngine {
    pub fn start() -> Result<PrivateEngine> {
        which("dockerd").with_context(|| format!("dockerd not found: {INSTALL_HINT}"))?;
        let dir = tempfile::tempdir()?;
        let admin = Engine {
            host: format!("unix://{}/admin.sock", dir.path().display()),
        };
        let mut engine = PrivateEngine {
            admin,
            dir,
            daemon: None,
        };
        engine.start_daemon(true)?;
        Ok(engine)
    }

    /// What Embassy is given: `unix://.../docker.sock`.
    pub fn public_uri(&self) -> String {
        format!("unix://{}/docker.sock", self.dir.path().display())
    }

    /// Starts dockerd, answering on `docker.sock` too if `public`; waits until it answers.
    pub fn start_daemon(&mut self, public: bool) -> Result<()> {
        let dir = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("dockerd.log"))?;
        // In a network namespace of its own: with `--bridge=none` dockerd deletes `docker0`,
        // which must stay for the machine's engine.
        let mut command = Command::new("unshare");
        command
            .args(["--net", "--", "dockerd"])
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .args(["--bridge=none", "--iptables=false", "--ip6tables=false"])
            .arg("--live-restore")
            .arg("-H")
            .arg(&self.admin.host);
        if public {
            command.arg("-H").arg(self.public_uri());
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting a private dockerd (the tests need root)")?;
        self.daemon = Some(child);
        self.admin
            .wait_answering(Duration::from_secs(60))
            .with_context(|| format!("see {}", dir.join("dockerd.log").display()))
    }

    /// Stops dockerd (SIGTERM) and waits for it; containers keep running (live restore).
    pub fn stop_daemon(&mut self) -> Result<()> {
        let Some(mut child) = self.daemon.take() else {
            return Ok(());
        };
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("private dockerd did not stop within 30 s");
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for PrivateEngine {
    fn drop(&mut self) {
        if self.daemon.is_some() {
            if let Ok(ids) = self.admin.docker(["ps", "-aq"]) {
                for id in ids.lines() {
                    let _ = self.admin.docker(["rm", "-f", id]);
                }
            }
        }
        let _ = self.stop_daemon();
        // dockerd bind-mounts its data root onto itself and leaves it mounted.
        if let Ok(data) =
            std::ffi::CString::new(self.dir.path().join("data").as_os_str().as_encoded_bytes())
        {
            // SAFETY: umount2(2) with a valid C string; failure (not mounted) is harmless.
            unsafe { libc::umount2(data.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Runs `work` on a thread of its own that first enters the network namespace of process `pid`.
pub fn in_netns_of<T: Send + 'static>(
    pid: u32,
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let path = format!("/proc/{pid}/ns/net");
    thread::spawn(move || -> Result<T> {
        let namespace = std::fs::File::open(&path).with_context(|| path.clone())?;
        // SAFETY: setns(2) on an open namespace file; only this short-lived thread moves.
        if unsafe {
            libc::setns(
                std::os::fd::AsRawFd::as_raw_fd(&namespace),
                libc::CLONE_NEWNET,
            )
        } != 0
        {
            bail!("setns {path}: {}", std::io::Error::last_os_error());
        }
        work()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
}

/// Connects to 127.0.0.1:`port` inside the network namespace of process `pid`, sends a line
/// and returns the upstream greeting if the echo came back. Works while the engine is down,
/// unlike `docker exec`.
pub fn greeting_in_netns_of(pid: u32, port: u16) -> Result<String> {
    in_netns_of(pid, move || {
        let mut client = crate::Client::connect(port)?;
        if client.echo(b"ping\n")? != b"ping\n" {
            bail!("the echo did not come back");
        }
        Ok(client.upstream)
    })
}

/// Tries to connect to 127.0.0.1:`port` in the network namespace of process `pid` until it
/// succeeds: when it did, or an error after `timeout`.
pub fn wait_accepting_in_netns_of(pid: u32, port: u16, timeout: Duration) -> Result<Instant> {
    in_netns_of(pid, move || {
        let deadline = Instant::now() + timeout;
        loop {
            if std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok() {
                return Ok(Instant::now());
            }
            if Instant::now() > deadline {
                bail!("nothing accepted on port {port} within {timeout:?}");
            }
            thread::sleep(Duration::from_micros(200));
        }
    })
}
