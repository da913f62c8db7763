//! The fault suite: scenarios that break one thing around a running Embassy (discovery, an
//! upstream, the engine, descriptors, the log pipe, a stop) while checked traffic runs, and
//! report what the clients saw. Shared by `bench/faults` (every scenario, a table and JSON
//! lines) and `tests/tests/faults.rs` (the short ones, asserting each pass criterion).
//!
//! Every scenario is bounded in time and in connections, and uses loopback only. Each states
//! its pass criteria as [`Check`]s; RELIABILITY.md lists them.

pub mod scenarios;
mod traffic;
mod upstream;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde_json::{json, Value};

pub use traffic::{classify, exchange, pattern, Attempt, Exchange, Held, Load, Traffic};
pub use upstream::{Behaviour, FaultUpstream};

use crate::{artifacts, standard_plugin_dir, write_services, Embassy};

/// How a connection failed, as its client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Failure {
    /// The connect was refused: nothing listened.
    Refused,
    /// Reset (or aborted, or a broken pipe) at any point.
    Reset,
    /// No answer within the bound (connect, read or write).
    Timeout,
    /// The stream ended cleanly before every byte came back: a cut that looks like an end.
    Short,
    /// Bytes came back that were not sent, or in another order, or more than sent.
    Corrupt,
    /// Anything else (e.g. no local port left).
    Other,
}

/// Connections attempted and how they ended.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub attempted: usize,
    pub ok: usize,
    pub refused: usize,
    pub reset: usize,
    pub timeout: usize,
    pub short: usize,
    pub corrupt: usize,
    pub other: usize,
}

impl Tally {
    pub fn of<'a>(attempts: impl IntoIterator<Item = &'a Attempt>) -> Tally {
        let mut tally = Tally::default();
        for attempt in attempts {
            tally.count(attempt.result);
        }
        tally
    }

    pub fn count(&mut self, result: Result<(), Failure>) {
        self.attempted += 1;
        match result {
            Ok(()) => self.ok += 1,
            Err(Failure::Refused) => self.refused += 1,
            Err(Failure::Reset) => self.reset += 1,
            Err(Failure::Timeout) => self.timeout += 1,
            Err(Failure::Short) => self.short += 1,
            Err(Failure::Corrupt) => self.corrupt += 1,
            Err(Failure::Other) => self.other += 1,
        }
    }

    pub fn add(&mut self, other: &Tally) {
        self.attempted += other.attempted;
        self.ok += other.ok;
        self.refused += other.refused;
        self.reset += other.reset;
        self.timeout += other.timeout;
        self.short += other.short;
        self.corrupt += other.corrupt;
        self.other += other.other;
    }

    pub fn failed(&self) -> usize {
        self.attempted - self.ok
    }

    /// `3 failed (2 reset, 1 short)`.
    pub fn failures(&self) -> String {
        let kinds: Vec<String> = [
            ("refused", self.refused),
            ("reset", self.reset),
            ("timeout", self.timeout),
            ("short", self.short),
            ("corrupt", self.corrupt),
            ("other", self.other),
        ]
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(kind, n)| format!("{n} {kind}"))
        .collect();
        if kinds.is_empty() {
            format!("0 of {} failed", self.attempted)
        } else {
            format!(
                "{} of {} failed ({})",
                self.failed(),
                self.attempted,
                kinds.join(", ")
            )
        }
    }
}

/// Time from a fault's end to the first successful connection started after it, and to the
/// first success after which nothing failed any more ("steady"). `None`: not recovered.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    pub first: Option<Duration>,
    pub steady: Option<Duration>,
}

impl Recovery {
    /// Recovery of `attempts` (sorted by start) from a fault that ended at `fault_end`.
    pub fn of(attempts: &[Attempt], fault_end: Instant) -> Recovery {
        let since = |a: &Attempt| a.end.saturating_duration_since(fault_end);
        let first = attempts
            .iter()
            .filter(|a| a.ok() && a.start >= fault_end)
            .map(since)
            .min();
        let last_failure = attempts.iter().filter(|a| !a.ok()).map(|a| a.start).max();
        let steady = attempts
            .iter()
            .filter(|a| {
                a.ok() && a.start >= fault_end && last_failure.is_none_or(|failed| a.start > failed)
            })
            .map(since)
            .min();
        Recovery { first, steady }
    }
}

/// One pass criterion and what the run showed.
#[derive(Debug, Clone)]
pub struct Check {
    pub criterion: String,
    pub passed: bool,
    pub seen: String,
}

/// What one scenario run showed.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub name: String,
    /// Set when the scenario could not run here (with why); it then neither passes nor fails.
    pub skipped: Option<String>,
    /// Set when setting the scenario up failed; the run counts as failed.
    pub error: Option<String>,
    pub tally: Tally,
    /// `None` where the scenario has no fault end to recover from (or nothing failed).
    pub recovery: Option<Recovery>,
    pub checks: Vec<Check>,
    /// Scenario-specific figures (in flight at a stop, descriptors, timings...).
    pub figures: BTreeMap<String, Value>,
    pub seconds: f64,
}

impl Report {
    pub fn new(name: &str) -> Report {
        Report {
            name: name.to_string(),
            ..Report::default()
        }
    }

    /// Adds a criterion: `passed` with what was `seen`.
    pub fn check(&mut self, criterion: impl Into<String>, passed: bool, seen: impl Into<String>) {
        self.checks.push(Check {
            criterion: criterion.into(),
            passed,
            seen: seen.into(),
        });
    }

    pub fn figure(&mut self, key: &str, value: impl Into<Value>) {
        self.figures.insert(key.to_string(), value.into());
    }

    pub fn passed(&self) -> bool {
        self.skipped.is_none() && self.error.is_none() && self.checks.iter().all(|c| c.passed)
    }

    pub fn failed(&self) -> bool {
        self.skipped.is_none() && !self.passed()
    }

    pub fn result(&self) -> &'static str {
        if self.skipped.is_some() {
            "skip"
        } else if self.error.is_some() {
            "error"
        } else if self.passed() {
            "pass"
        } else {
            "FAIL"
        }
    }

    /// Everything, one item a line: for a failing test's message and the suite's log.
    pub fn describe(&self) -> String {
        let mut out = format!(
            "{}: {} in {:.1}s; {}",
            self.name,
            self.result(),
            self.seconds,
            self.tally.failures()
        );
        if let Some(reason) = &self.skipped {
            let _ = write!(out, "\n  skipped: {reason}");
        }
        if let Some(error) = &self.error {
            let _ = write!(out, "\n  error: {error}");
        }
        if let Some(recovery) = &self.recovery {
            let _ = write!(
                out,
                "\n  recovery: first {}, steady {}",
                millis(recovery.first),
                millis(recovery.steady)
            );
        }
        for check in &self.checks {
            let mark = if check.passed { "ok  " } else { "FAIL" };
            let _ = write!(out, "\n  {mark} {} (seen: {})", check.criterion, check.seen);
        }
        for (key, value) in &self.figures {
            let _ = write!(out, "\n  {key} = {value}");
        }
        out
    }

    /// One JSON object for the results file.
    pub fn json(&self) -> Value {
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
        json!({
            "scenario": self.name,
            "result": self.result(),
            "skipped": self.skipped,
            "error": self.error,
            "seconds": self.seconds,
            "attempted": self.tally.attempted,
            "ok": self.tally.ok,
            "failed": {
                "refused": self.tally.refused,
                "reset": self.tally.reset,
                "timeout": self.tally.timeout,
                "short": self.tally.short,
                "corrupt": self.tally.corrupt,
                "other": self.tally.other,
            },
            "recover_first_ms": self.recovery.and_then(|r| ms(r.first)),
            "recover_steady_ms": self.recovery.and_then(|r| ms(r.steady)),
            "checks": self.checks.iter().map(|c| json!({
                "criterion": c.criterion, "passed": c.passed, "seen": c.seen,
            })).collect::<Vec<_>>(),
            "figures": self.figures,
        })
    }
}

/// `12 ms`, or `-` for none.
pub fn millis(duration: Option<Duration>) -> String {
    match duration {
        Some(d) => format!("{} ms", d.as_millis()),
        None => "-".to_string(),
    }
}

/// The markdown table of a run.
pub fn table(reports: &[Report]) -> String {
    let mut out = String::from(
        "| scenario | result | attempted | ok | refused | reset | timeout | short | corrupt | other | recover first | recover steady | notes |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in reports {
        let t = &r.tally;
        let (first, steady) = match &r.recovery {
            Some(rec) => (millis(rec.first), millis(rec.steady)),
            None => ("-".into(), "-".into()),
        };
        let mut notes: Vec<String> = Vec::new();
        if let Some(reason) = &r.skipped {
            notes.push(format!("skipped: {reason}"));
        }
        if let Some(error) = &r.error {
            notes.push(format!("error: {error}"));
        }
        notes.extend(
            r.checks
                .iter()
                .filter(|c| !c.passed)
                .map(|c| format!("failed: {} (seen: {})", c.criterion, c.seen)),
        );
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {first} | {steady} | {} |",
            r.name,
            r.result(),
            t.attempted,
            t.ok,
            t.refused,
            t.reset,
            t.timeout,
            t.short,
            t.corrupt,
            t.other,
            notes.join("; ").replace('|', "/").replace('\n', " ")
        );
    }
    out
}

/// Settings of a run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Multiplies each scenario's fault and traffic durations (`bench/faults --scale 10` for
    /// the 30 s figures); the tests use 1.
    pub scale: f64,
    /// Extra arguments for every Embassy the scenarios start (e.g. a timeout to try).
    pub embassy_args: Vec<String>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            scale: 1.0,
            embassy_args: Vec::new(),
        }
    }
}

impl Options {
    /// `base` times the scale.
    pub fn scaled(&self, base: Duration) -> Duration {
        base.mul_f64(self.scale.max(0.01))
    }

    /// `base` times the scale, for counts.
    pub fn count(&self, base: usize) -> usize {
        ((base as f64) * self.scale.max(0.01)).ceil() as usize
    }
}

/// A scenario of the suite.
pub struct Scenario {
    pub name: &'static str,
    /// What it does, one line.
    pub about: &'static str,
    /// Short enough for the normal test suite (`tests/tests/faults.rs`).
    pub in_tests: bool,
    pub run: fn(&Options, &mut Report) -> Result<()>,
}

/// Runs `scenario`: a panic or an error while setting it up becomes the report's error.
pub fn run(scenario: &Scenario, options: &Options) -> Report {
    let mut report = Report::new(scenario.name);
    // Building the binary and plugins (once per process) is not part of any scenario.
    artifacts();
    let started = Instant::now();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        (scenario.run)(options, &mut report)
    }));
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(error)) => report.error = Some(format!("{error:#}")),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            report.error = Some(format!("panicked: {message}"));
        }
    }
    if report.checks.is_empty() && report.skipped.is_none() && report.error.is_none() {
        report.error = Some("the scenario checked nothing".into());
    }
    report.seconds = started.elapsed().as_secs_f64();
    report
}

/// The scenario called `name`.
pub fn scenario(name: &str) -> Option<&'static Scenario> {
    scenarios::ALL.iter().find(|s| s.name == name)
}

/// An Embassy to break, with what it needs kept alive.
pub struct Proxy {
    pub embassy: Embassy,
    /// The services file, for file-discovery proxies.
    pub services: PathBuf,
    _plugins: tempfile::TempDir,
    _dir: tempfile::TempDir,
}

/// How to start an Embassy for a scenario.
pub struct Launch<'a> {
    /// `--discovery` URI; `None`: a services file holding `services_file`.
    pub discovery: Option<String>,
    pub services_file: Value,
    /// `--service` descriptors.
    pub services: &'a [String],
    pub extra: &'a [&'a str],
    /// `EMBASSY_LOG`.
    pub log: &'a str,
    /// Open-file limit (soft and hard) of the process.
    pub nofile: Option<u64>,
}

impl Default for Launch<'_> {
    fn default() -> Self {
        Launch {
            discovery: None,
            services_file: json!({}),
            services: &[],
            extra: &[],
            log: "info",
            nofile: None,
        }
    }
}

/// What a started Embassy needs kept alive: its plugin directory and services file.
pub struct Prepared {
    pub services: PathBuf,
    plugins: tempfile::TempDir,
    dir: tempfile::TempDir,
}

impl Proxy {
    pub fn start(launch: Launch<'_>, options: &Options) -> Result<Proxy> {
        let (mut command, prepared) = Proxy::prepare(&launch, options)?;
        let child = command.spawn().context("spawn embassy")?;
        Ok(Proxy {
            embassy: Embassy::adopt(child),
            services: prepared.services,
            _plugins: prepared.plugins,
            _dir: prepared.dir,
        })
    }

    /// The command starting Embassy as `launch` says (stderr piped), not yet spawned.
    pub fn prepare(
        launch: &Launch<'_>,
        options: &Options,
    ) -> Result<(std::process::Command, Prepared)> {
        let plugins = standard_plugin_dir(&[]);
        let dir = tempfile::tempdir()?;
        let services = dir.path().join("services.json");
        write_services(&services, &launch.services_file);
        let mut args = vec![
            "--plugin-dir".to_string(),
            plugins.path().display().to_string(),
            "--discovery".to_string(),
            launch
                .discovery
                .clone()
                .unwrap_or_else(|| format!("file://{}", services.display())),
        ];
        if launch.discovery.is_none() {
            args.extend(["--discovery-opt".into(), "poll_interval=20ms".into()]);
        }
        for service in launch.services {
            args.extend(["--service".to_string(), service.clone()]);
        }
        args.extend(launch.extra.iter().map(|a| a.to_string()));
        args.extend(options.embassy_args.iter().cloned());
        let mut command = Embassy::command(&artifacts().embassy(), &args);
        command.env("EMBASSY_LOG", launch.log);
        if let Some(limit) = launch.nofile {
            limit_open_files(&mut command, limit);
        }
        Ok((
            command,
            Prepared {
                services,
                plugins,
                dir,
            },
        ))
    }
}

/// Sets the child's open-file limit (soft and hard) to `limit`, as `prlimit --nofile` would.
pub fn limit_open_files(command: &mut std::process::Command, limit: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit(2) is async-signal-safe and touches nothing of the parent's.
    unsafe {
        command.pre_exec(move || {
            let rlimit = libc::rlimit {
                rlim_cur: limit as libc::rlim_t,
                rlim_max: limit as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Waits until a full exchange through `port` succeeds, at most `timeout`.
pub fn wait_serving(port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = exchange(port, &Exchange::SHORT, 0);
        if attempt.ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "port {port} did not serve within {timeout:?}: last attempt {:?}",
                attempt.result
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Descriptors process `pid` has open.
pub fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| dir.count())
}

/// Resident memory of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// Lines of `lines` at WARN or ERROR level (tracing's default format).
pub fn warnings(lines: &[String]) -> Vec<&String> {
    lines
        .iter()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect()
}

/// Raises this process's soft open-file limit to its hard limit; returns (soft, hard) after.
pub fn raise_own_open_file_limit() -> (u64, u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    (limit.rlim_cur, limit.rlim_max)
}

/// Connections per upstream name among `attempts`.
pub fn per_upstream<'a>(
    attempts: impl IntoIterator<Item = &'a Attempt>,
) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for attempt in attempts {
        if let Some(name) = &attempt.upstream {
            *counts.entry(name.clone()).or_insert(0) += 1;
        }
    }
    counts
}

/// The path of a file in the workspace (for the suite's results).
pub fn workspace_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from(relative), |root| root.join(relative))
}
