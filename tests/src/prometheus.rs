//! Reading Embassy's metrics: a sample parser for the text exposition, and a real Prometheus
//! server (Debian's `prometheus` package) that scrapes a `--metrics` address.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{free_port, http_get_tcp};

/// The value of the sample `name` whose labels include every one of `labels`, from the text
/// exposition `text`; `None` when there is none. Several matching samples are an error in the
/// test, so the first is taken only when the labels pin one down.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            // Bounded by commas, so a value that itself holds commas still matches whole.
            let have = format!(",{series_labels},");
            (series_name == name && wanted.iter().all(|w| have.contains(&format!(",{w},"))))
                .then(|| value.parse().ok())
                .flatten()
        })
        .next()
}

/// A Prometheus server on a free loopback port, scraping one target every 200 ms, with its
/// storage in a temporary directory; stopped on drop.
pub struct Prometheus {
    child: Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

/// Where the Prometheus binaries come from.
pub const INSTALL_HINT: &str = "apt-get install prometheus (Debian's package has prometheus and promtool; scripts/test installs it)";

fn binary(name: &str) -> Result<PathBuf> {
    let path = PathBuf::from("/usr/bin").join(name);
    if !path.exists() {
        bail!("{name} is missing: {INSTALL_HINT}");
    }
    Ok(path)
}

impl Prometheus {
    pub fn scraping(target: SocketAddr) -> Result<Prometheus> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 200ms\n  scrape_timeout: 150ms\nscrape_configs:\n  - job_name: embassy\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )?;
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let child = Command::new(binary("prometheus")?)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start prometheus")?;
        let mut prometheus = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = http_get_tcp(addr, "/-/ready") {
                return Ok(prometheus);
            }
            if let Some(status) = prometheus.child.try_wait()? {
                bail!("prometheus exited at start: {status}");
            }
            if Instant::now() > deadline {
                bail!("prometheus not ready on {addr} within 30 s");
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The value of the instant query `expr` (one series), through the HTTP API.
    pub fn query(&self, expr: &str) -> Result<Option<f64>> {
        let encoded: String = expr
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let (status, body) = http_get_tcp(self.addr, &format!("/api/v1/query?query={encoded}"))?;
        if status != 200 {
            bail!("query {expr}: {status}: {body}");
        }
        let answer: serde_json::Value = serde_json::from_str(&body)?;
        let result = answer["data"]["result"]
            .as_array()
            .with_context(|| format!("query {expr}: no result in {body}"))?;
        match result.as_slice() {
            [] => Ok(None),
            [one] => Ok(one["value"][1].as_str().and_then(|v| v.parse().ok())),
            _ => bail!("query {expr}: {} series, wanted one: {body}", result.len()),
        }
    }

    /// Queries until `expr` is `expected` (or fails after `timeout` with the last value).
    pub fn wait_for(&self, expr: &str, expected: f64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        while Instant::now() < deadline {
            last = self.query(expr)?;
            if last == Some(expected) {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(200));
        }
        bail!("prometheus: {expr} is {last:?}, not {expected}, after {timeout:?}")
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `promtool check metrics` on `text`: its complaints, if any (an error when it cannot run).
pub fn promtool_check(text: &str) -> Result<std::process::Output> {
    use std::io::Write;
    let mut child = Command::new(binary("promtool")?)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start promtool")?;
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(text.as_bytes())?;
    Ok(child.wait_with_output()?)
}
