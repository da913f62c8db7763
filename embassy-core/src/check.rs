//! Active health checks: one checker per distinct (endpoint, check, parameters), shared by
//! every service that declares it, each a small tokio task probing on a jittered interval.
//!
//! A service states the intent (`check=tcp`, `check=http:/healthz`,
//! `check=send:PING,expect:PONG`, `check=udp:send:PING,expect:PONG`); [`Checks::subscribe`]
//! hands back the shared [`CheckStatus`], whose state follows HAProxy's rise/fall rule: the
//! first result decides, then `fall` failures in a row turn a passing endpoint failing and
//! `rise` passes in a row bring it back, so one lost probe neither ejects nor readmits.
//!
//! Checks leave from Embassy's own network namespace, as the proxy's upstream connections do:
//! their sockets are created on ordinary runtime threads, never on the `setns` threads that
//! bind listeners inside containers. A check thus sees the endpoint exactly as a forwarded
//! connection would (routes, firewall, name resolution), which is what its verdict is for.
//!
//! The first check runs at once, so a new endpoint has a state within one timeout. Then each
//! checker waits the interval moved by up to a quarter either way (the jitter of the one
//! backoff), so a thousand checkers started together drift apart, rounded up to a slot of a
//! fortieth of the interval (25 ms at most) on one grid for the process, so one runtime turn
//! serves the handful of checks due in it (this halved the CPU of 1,000 endpoints under
//! 1-second checks; BENCHMARKS.md). `timeout` bounds connect and exchange together. A named
//! address is resolved at every check (TCP tries each address, UDP takes the first). Check
//! connections close with a reset, as HAProxy's do, so none lingers in TIME_WAIT. A reply
//! that began but lacks the expected text at the deadline is a wrong answer, not silence.
//!
//! Nothing here is on the connection path: the path reads the state the host derives from a
//! status, never the status itself. A checker logs one line per state change, never per check.
//!
//! # Spec grammar
//!
//! `tcp` | `http:<path>` | `send:<text>,expect:<text>` | `udp:send:<text>,expect:<text>`.
//! A path starts with `/` and is printable ASCII. A text is non-empty; since a descriptor value
//! holds no whitespace, `;` or (here) `,`, such bytes are written as escapes: `\r`, `\n`, `\t`,
//! `\\`, and `\xHH` for any byte (`\x20` a space, `\x2c` a comma, `\x3b` a semicolon). The
//! parser is strict (an unknown escape, a stray part or an empty text is an error naming it)
//! and `Display` prints the canonical form, which parses back equal.

use std::{
    collections::HashMap,
    fmt,
    io::{self, ErrorKind},
    net::SocketAddr,
    str::FromStr,
    sync::{
        atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard, PoisonError, Weak,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use embassy_plugin_api::{support::Backoff, Protocol};
use socket2::SockRef;
use thiserror::Error;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
    runtime::Handle,
    sync::Notify,
    time::{timeout_at, Instant},
};
use tracing::{debug, info, warn};

use crate::endpoints::UpstreamAddr;

/// Between two checks of one endpoint, jittered a quarter either way. HAProxy's `inter`
/// default: an endpoint that dies is out within `fall` intervals (about 6 s with the default
/// fall), at one cheap connection per endpoint every 2 s.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Deadline of one check, connect and exchange together. Shorter than the interval so a check
/// is over before the next is due; a healthy endpoint on a LAN answers in milliseconds, so a
/// second means it is stuck (HAProxy falls back to `inter` itself, which lets one hung probe
/// stretch detection by a whole interval).
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// Passes in a row that bring a failing endpoint back: HAProxy's default, so one lucky probe
/// of a flapping endpoint does not readmit it.
pub const DEFAULT_CHECK_RISE: u32 = 2;

/// Failures in a row that take a passing endpoint out: HAProxy's default, so one dropped probe
/// (a full backlog, a lost SYN) does not eject a healthy endpoint.
pub const DEFAULT_CHECK_FALL: u32 = 3;

/// The shortest interval a checker keeps: faster probing loads the endpoint without telling
/// anything sooner that matters, and an interval of zero would spin.
pub const MIN_CHECK_INTERVAL: Duration = Duration::from_millis(10);

/// Most bytes of a reply a check reads looking for its status line or expected text: a
/// health answer is short, and a bound keeps a chatty endpoint from costing memory.
pub const MAX_REPLY: usize = 4096;

/// What a consumer declares in its descriptor as `check=<spec>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CheckSpec {
    /// `tcp`: the connect succeeds.
    Tcp,
    /// `http:/healthz`: `GET path HTTP/1.1` (Host: the endpoint, Connection: close) answered
    /// with a 2xx or 3xx status, HAProxy's rule.
    Http { path: String },
    /// `send:PING,expect:PONG`: over TCP, `send` followed by `\r\n` (line protocols such as
    /// Redis inline commands); passes once the reply (up to [`MAX_REPLY`] bytes) contains
    /// `expect`.
    Send { send: Vec<u8>, expect: Vec<u8> },
    /// `udp:send:PING,expect:PONG`: one datagram exactly `send` (no line end); passes if the
    /// reply datagram contains `expect`.
    Udp { send: Vec<u8>, expect: Vec<u8> },
}

/// What is wrong with a check spec.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CheckSpecError {
    #[error("check is empty: expected tcp, http:<path>, send:<text>,expect:<text> or udp:send:<text>,expect:<text>")]
    Empty,
    #[error("unknown check {0:?}: expected tcp, http:<path>, send:<text>,expect:<text> or udp:send:<text>,expect:<text>")]
    Unknown(String),
    #[error("http check path {0:?} does not start with '/'")]
    PathNotAbsolute(String),
    #[error("http check path {path:?} contains {found:?}: a path is printable ASCII with no ';'")]
    InvalidPathChar { path: String, found: char },
    #[error("check {0:?} is not of the form send:<text>,expect:<text>")]
    NotSendExpect(String),
    #[error("the {part} text of check {spec:?} is empty")]
    EmptyText { spec: String, part: &'static str },
    #[error(
        "check text {text:?} has an unknown escape {escape:?}: use \\r, \\n, \\t, \\\\ or \\xHH"
    )]
    UnknownEscape { text: String, escape: String },
    #[error("check text {text:?} contains {found:?}: write it as {escape}")]
    Unescaped {
        text: String,
        found: char,
        /// Its UTF-8 bytes in `\xHH` escapes.
        escape: String,
    },
}

impl FromStr for CheckSpec {
    type Err = CheckSpecError;

    fn from_str(input: &str) -> Result<Self, CheckSpecError> {
        if input.is_empty() {
            return Err(CheckSpecError::Empty);
        }
        if input == "tcp" {
            return Ok(CheckSpec::Tcp);
        }
        if let Some(path) = input.strip_prefix("http:") {
            if !path.starts_with('/') {
                return Err(CheckSpecError::PathNotAbsolute(path.to_string()));
            }
            if let Some(found) = path.chars().find(|&c| !c.is_ascii_graphic() || c == ';') {
                return Err(CheckSpecError::InvalidPathChar {
                    path: path.to_string(),
                    found,
                });
            }
            return Ok(CheckSpec::Http {
                path: path.to_string(),
            });
        }
        if let Some(rest) = input.strip_prefix("udp:") {
            let (send, expect) = parse_send_expect(input, rest)?;
            return Ok(CheckSpec::Udp { send, expect });
        }
        if input.starts_with("send:") {
            let (send, expect) = parse_send_expect(input, input)?;
            return Ok(CheckSpec::Send { send, expect });
        }
        Err(CheckSpecError::Unknown(input.to_string()))
    }
}

/// `send:<text>,expect:<text>` of `spec`.
fn parse_send_expect(spec: &str, text: &str) -> Result<(Vec<u8>, Vec<u8>), CheckSpecError> {
    let (send, expect) = text
        .strip_prefix("send:")
        .and_then(|rest| rest.split_once(",expect:"))
        .ok_or_else(|| CheckSpecError::NotSendExpect(spec.to_string()))?;
    let empty = |part| CheckSpecError::EmptyText {
        spec: spec.to_string(),
        part,
    };
    if send.is_empty() {
        return Err(empty("send"));
    }
    if expect.is_empty() {
        return Err(empty("expect"));
    }
    Ok((unescape(send)?, unescape(expect)?))
}

/// The bytes `text` stands for, in the escape grammar of the module doc.
fn unescape(text: &str) -> Result<Vec<u8>, CheckSpecError> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            if !c.is_ascii_graphic() || matches!(c, ',' | ';') {
                let mut utf8 = [0u8; 4];
                return Err(CheckSpecError::Unescaped {
                    text: text.to_string(),
                    found: c,
                    escape: Escaped(c.encode_utf8(&mut utf8).as_bytes()).to_string(),
                });
            }
            bytes.push(c as u8);
            continue;
        }
        let unknown = |escape: String| CheckSpecError::UnknownEscape {
            text: text.to_string(),
            escape,
        };
        match chars.next() {
            Some('r') => bytes.push(b'\r'),
            Some('n') => bytes.push(b'\n'),
            Some('t') => bytes.push(b'\t'),
            Some('\\') => bytes.push(b'\\'),
            Some('x') => {
                let high = chars.next();
                let low = chars.next();
                match (
                    high.and_then(|h| h.to_digit(16)),
                    low.and_then(|l| l.to_digit(16)),
                ) {
                    (Some(h), Some(l)) => bytes.push((h * 16 + l) as u8),
                    _ => {
                        return Err(unknown(
                            ['\\', 'x'].into_iter().chain(high).chain(low).collect(),
                        ))
                    }
                }
            }
            Some(other) => return Err(unknown(format!("\\{other}"))),
            None => return Err(unknown("\\".to_string())),
        }
    }
    Ok(bytes)
}

/// `bytes` in the canonical escaped form.
struct Escaped<'a>(&'a [u8]);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &byte in self.0 {
            match byte {
                b'\r' => f.write_str("\\r")?,
                b'\n' => f.write_str("\\n")?,
                b'\t' => f.write_str("\\t")?,
                b'\\' => f.write_str("\\\\")?,
                b',' | b';' => write!(f, "\\x{byte:02x}")?,
                _ if byte.is_ascii_graphic() => write!(f, "{}", byte as char)?,
                _ => write!(f, "\\x{byte:02x}")?,
            }
        }
        Ok(())
    }
}

impl CheckSpec {
    /// The transport the check speaks (a DNS server may be checked over TCP, say).
    pub fn protocol(&self) -> Protocol {
        match self {
            CheckSpec::Udp { .. } => Protocol::Udp,
            _ => Protocol::Tcp,
        }
    }
}

impl fmt::Display for CheckSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckSpec::Tcp => f.write_str("tcp"),
            CheckSpec::Http { path } => write!(f, "http:{path}"),
            CheckSpec::Send { send, expect } => {
                write!(f, "send:{},expect:{}", Escaped(send), Escaped(expect))
            }
            CheckSpec::Udp { send, expect } => {
                write!(f, "udp:send:{},expect:{}", Escaped(send), Escaped(expect))
            }
        }
    }
}

/// How often and how strictly an endpoint is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CheckParams {
    /// Between checks (jittered a quarter either way); the next starts after one ends. Under
    /// [`MIN_CHECK_INTERVAL`] counts as that.
    pub interval: Duration,
    /// Deadline of one check, connect and exchange together.
    pub timeout: Duration,
    /// Passes in a row that turn failing into passing; 0 counts as 1.
    pub rise: u32,
    /// Failures in a row that turn passing into failing; 0 counts as 1.
    pub fall: u32,
}

impl Default for CheckParams {
    fn default() -> Self {
        CheckParams {
            interval: DEFAULT_CHECK_INTERVAL,
            timeout: DEFAULT_CHECK_TIMEOUT,
            rise: DEFAULT_CHECK_RISE,
            fall: DEFAULT_CHECK_FALL,
        }
    }
}

/// One checker's identity: services declaring the same endpoint, check and parameters share it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CheckKey {
    pub addr: UpstreamAddr,
    pub spec: CheckSpec,
    pub params: CheckParams,
}

/// An endpoint's check result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CheckState {
    /// No check has finished yet.
    Unknown,
    Passing,
    Failing,
}

impl CheckState {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckState::Unknown => "unknown",
            CheckState::Passing => "passing",
            CheckState::Failing => "failing",
        }
    }

    fn from_u8(value: u8) -> CheckState {
        match value {
            1 => CheckState::Passing,
            2 => CheckState::Failing,
            _ => CheckState::Unknown,
        }
    }
}

impl fmt::Display for CheckState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why one check failed; [`CheckStatus::last_error`] is its text.
#[derive(Debug, Error)]
pub enum CheckError {
    #[error("cannot resolve {name}: {error}")]
    Resolve { name: String, error: io::Error },
    #[error("{0} resolves to no address")]
    NoAddress(String),
    #[error("connect refused")]
    Refused,
    #[error("connect failed: {0}")]
    Connect(io::Error),
    #[error("timed out after {after:?} {doing}")]
    Timeout {
        after: Duration,
        doing: &'static str,
    },
    #[error("{doing} failed: {error}")]
    Io {
        doing: &'static str,
        error: io::Error,
    },
    #[error("port unreachable (nothing listens on it)")]
    Unreachable,
    #[error("closed without a reply")]
    Closed,
    #[error("status {0}")]
    Status(u16),
    #[error("not an HTTP response: \"{0}\"")]
    NotHttp(String),
    #[error("reply did not contain \"{expect}\": got \"{got}\"")]
    Missing { expect: String, got: String },
}

/// An endpoint's shared check status: written by its checker, read by the host and the
/// operator's views. Atomics, plus a small lock for the last error.
#[derive(Debug)]
pub struct CheckStatus {
    key: CheckKey,
    state: AtomicU8,
    /// When the state last changed, in nanoseconds since the Unix epoch.
    since: AtomicU64,
    checks: AtomicU64,
    failures: AtomicU64,
    last_error: Mutex<Option<CheckError>>,
    /// Notified on each state change.
    watchers: Mutex<Vec<Weak<Notify>>>,
    /// Wakes the checker to stop when the last holder drops this status.
    stop: Arc<Notify>,
}

impl CheckStatus {
    fn new(key: CheckKey) -> CheckStatus {
        CheckStatus {
            key,
            state: AtomicU8::new(CheckState::Unknown as u8),
            since: AtomicU64::new(unix_nanos(SystemTime::now())),
            checks: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            last_error: Mutex::new(None),
            watchers: Mutex::new(Vec::new()),
            stop: Arc::new(Notify::new()),
        }
    }

    pub fn state(&self) -> CheckState {
        CheckState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// When the state last changed (or the checker started, while unknown).
    pub fn since(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.since.load(Ordering::Acquire))
    }

    /// The last failed check's error, kept after the endpoint passes again.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.last_error).as_ref().map(ToString::to_string)
    }

    pub fn key(&self) -> &CheckKey {
        &self.key
    }

    /// Checks finished so far.
    pub fn checks(&self) -> u64 {
        self.checks.load(Ordering::Acquire)
    }

    /// Checks failed so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Acquire)
    }

    fn watch(&self, on_change: Weak<Notify>) {
        let mut watchers = lock(&self.watchers);
        watchers.retain(|w| w.strong_count() > 0);
        if !watchers.iter().any(|w| w.ptr_eq(&on_change)) {
            watchers.push(on_change);
        }
    }

    /// Counts one result (counters first, so whoever sees a new state sees its counts).
    fn record(&self, result: &Result<(), CheckError>) {
        if result.is_err() {
            self.failures.fetch_add(1, Ordering::AcqRel);
        }
        self.checks.fetch_add(1, Ordering::AcqRel);
    }

    fn set_state(&self, state: CheckState) {
        self.since
            .store(unix_nanos(SystemTime::now()), Ordering::Release);
        self.state.store(state as u8, Ordering::Release);
        let mut watchers = lock(&self.watchers);
        watchers.retain(|watcher| match watcher.upgrade() {
            Some(notify) => {
                notify.notify_one();
                true
            }
            None => false,
        });
    }
}

impl Drop for CheckStatus {
    fn drop(&mut self) {
        // A stored permit: the checker stops even if it is mid-check now.
        self.stop.notify_one();
    }
}

fn unix_nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// A lock whose data stays valid if a holder panicked (a counter list, an error text).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// HAProxy's rise/fall counting over one endpoint's results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tally {
    state: CheckState,
    /// Results in a row that disagree with `state`.
    against: u32,
}

impl Tally {
    const START: Tally = Tally {
        state: CheckState::Unknown,
        against: 0,
    };

    /// Counts one result; the new state if it changed, with the results in a row that did it.
    fn record(&mut self, passed: bool, rise: u32, fall: u32) -> Option<(CheckState, u32)> {
        let (agrees, turns_to, needed) = match self.state {
            CheckState::Unknown => (false, verdict(passed), 1),
            CheckState::Passing => (passed, CheckState::Failing, fall.max(1)),
            CheckState::Failing => (!passed, CheckState::Passing, rise.max(1)),
        };
        if agrees {
            self.against = 0;
            return None;
        }
        self.against += 1;
        if self.against < needed {
            return None;
        }
        *self = Tally {
            state: turns_to,
            against: 0,
        };
        Some((turns_to, needed))
    }
}

fn verdict(passed: bool) -> CheckState {
    if passed {
        CheckState::Passing
    } else {
        CheckState::Failing
    }
}

/// The process's checkers: one per distinct [`CheckKey`], shared by every service that uses it.
pub struct Checks {
    handle: Option<Handle>,
    registry: Arc<Registry>,
}

#[derive(Default)]
struct Registry {
    statuses: Mutex<HashMap<CheckKey, Weak<CheckStatus>>>,
    running: AtomicUsize,
}

impl fmt::Debug for Checks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checks")
            .field("running", &self.running())
            .finish()
    }
}

impl Default for Checks {
    fn default() -> Self {
        Checks::new(Handle::try_current().ok())
    }
}

impl Checks {
    /// Checkers run on `handle`, or (`None`) on the runtime current at each subscribe.
    pub fn new(handle: Option<Handle>) -> Self {
        Checks {
            handle,
            registry: Arc::default(),
        }
    }

    /// Returns the shared status for `key`, starting its checker if none runs. `on_change` is
    /// notified (`notify_one`, so a permit is stored) each time the state changes. The checker
    /// stops once every `Arc<CheckStatus>` for it is dropped: it holds only a `Weak`.
    ///
    /// # Panics
    ///
    /// When a checker must start and there is neither a handle nor a current runtime: a
    /// host that wires checks without a runtime is a programming error, not an input one.
    pub fn subscribe(&self, key: CheckKey, on_change: Weak<Notify>) -> Arc<CheckStatus> {
        let mut statuses = lock(&self.registry.statuses);
        if let Some(status) = statuses.get(&key).and_then(Weak::upgrade) {
            status.watch(on_change);
            return status;
        }
        let status = Arc::new(CheckStatus::new(key.clone()));
        status.watch(on_change);
        let handle = match &self.handle {
            Some(handle) => handle.clone(),
            None => Handle::try_current()
                .unwrap_or_else(|_| panic!("Checks::subscribe needs a tokio runtime or a handle")),
        };
        statuses.insert(key.clone(), Arc::downgrade(&status));
        drop(statuses);
        self.registry.running.fetch_add(1, Ordering::AcqRel);
        let running = Running {
            registry: Arc::clone(&self.registry),
            key,
            status: Arc::downgrade(&status),
        };
        handle.spawn(run_checker(running, Arc::clone(&status.stop)));
        status
    }

    /// Checker tasks running now (for metrics and tests), counting one that is winding down
    /// because its last status just went, perhaps beside a successor for the same key.
    pub fn running(&self) -> usize {
        self.registry.running.load(Ordering::Acquire)
    }
}

/// A running checker's place in the registry, given up when its task ends (or is dropped
/// with its runtime).
struct Running {
    registry: Arc<Registry>,
    key: CheckKey,
    status: Weak<CheckStatus>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut statuses = lock(&self.registry.statuses);
        // Only our own entry: a new subscriber may already have replaced it.
        if statuses
            .get(&self.key)
            .is_some_and(|weak| weak.ptr_eq(&self.status))
        {
            statuses.remove(&self.key);
        }
        drop(statuses);
        self.registry.running.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn run_checker(running: Running, stop: Arc<Notify>) {
    let key = &running.key;
    let probe = Probe::new(key);
    let CheckParams { rise, fall, .. } = key.params;
    let interval = key.params.interval.max(MIN_CHECK_INTERVAL);
    // The jitter of the one backoff, held at one base: each wait is `interval` ± a quarter.
    let mut pace = Backoff::new(interval, interval);
    let mut tally = Tally::START;
    debug!(upstream = %key.addr, check = %key.spec, "checker started");
    loop {
        let result = tokio::select! {
            result = probe.run(key) => result,
            () = stop.notified() => break,
        };
        let Some(status) = running.status.upgrade() else {
            break;
        };
        status.record(&result);
        let was = tally.state;
        let changed = tally.record(result.is_ok(), rise, fall);
        match (&result, changed) {
            (Err(error), Some((_, failures))) => warn!(
                upstream = %key.addr, check = %key.spec, %error, failures,
                "check failing; it passes again after {} pass(es) in a row", rise.max(1)
            ),
            (Ok(()), Some(_)) if was == CheckState::Unknown => {
                debug!(upstream = %key.addr, check = %key.spec, "check passing")
            }
            (Ok(()), Some((_, passes))) => info!(
                upstream = %key.addr, check = %key.spec, passes, "check passing again"
            ),
            _ => {}
        }
        if let Err(error) = result {
            *lock(&status.last_error) = Some(error);
        }
        if let Some((state, _)) = changed {
            status.set_state(state);
        }
        drop(status);
        tokio::select! {
            () = tokio::time::sleep_until(in_slot(Instant::now() + pace.next_wait(), interval)) => {}
            () = stop.notified() => break,
        }
    }
    debug!(upstream = %key.addr, check = %key.spec, "checker stopped: no service uses it");
    drop(running);
}

/// The longest slot checks are gathered in (for intervals of a second and more).
const WAKE_SLOT: Duration = Duration::from_millis(25);

/// `at`, moved up to the end of its slot of the process's common grid (a hundredth of
/// `interval`, at most [`WAKE_SLOT`]): checkers due within one slot wake together, so the
/// runtime turns once for a handful of checks rather than once each. The jitter still spreads
/// them over the interval; a slot is too short to matter to a check's verdict.
fn in_slot(at: Instant, interval: Duration) -> Instant {
    static GRID: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let grid = *GRID.get_or_init(Instant::now);
    let slot = (interval / 40).min(WAKE_SLOT).as_nanos().max(1);
    let since = at.saturating_duration_since(grid).as_nanos();
    let slots = since.div_ceil(slot);
    // A u64 of nanoseconds lasts 584 years of uptime; saturate rather than wrap past it.
    grid + Duration::from_nanos(u64::try_from(slots * slot).unwrap_or(u64::MAX))
}

/// What one checker sends, built once.
struct Probe {
    /// The request bytes: HTTP request, line plus `\r\n`, or datagram.
    request: Vec<u8>,
    deadline: Duration,
}

impl Probe {
    fn new(key: &CheckKey) -> Probe {
        let request = match &key.spec {
            CheckSpec::Tcp => Vec::new(),
            CheckSpec::Http { path } => format!(
                "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: embassy-check\r\nConnection: close\r\n\r\n",
                key.addr
            )
            .into_bytes(),
            CheckSpec::Send { send, .. } => [send.as_slice(), b"\r\n"].concat(),
            CheckSpec::Udp { send, .. } => send.clone(),
        };
        Probe {
            request,
            deadline: key.params.timeout,
        }
    }

    async fn run(&self, key: &CheckKey) -> Result<(), CheckError> {
        let deadline = Instant::now() + self.deadline;
        let timed_out = |doing| CheckError::Timeout {
            after: self.deadline,
            doing,
        };
        if let CheckSpec::Udp { expect, .. } = &key.spec {
            return timeout_at(deadline, self.udp(&key.addr, expect))
                .await
                .unwrap_or_else(|_| Err(timed_out("waiting for a reply")));
        }
        let mut stream = timeout_at(deadline, connect(&key.addr))
            .await
            .unwrap_or_else(|_| Err(timed_out("connecting")))?;
        // Closed with a reset, as HAProxy closes its checks: a check has nothing in flight
        // worth a graceful close, and 1,000 endpoints checked every second would otherwise
        // leave some 60,000 sockets in TIME_WAIT on Embassy's side.
        let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        let expect: &[u8] = match &key.spec {
            CheckSpec::Tcp | CheckSpec::Udp { .. } => return Ok(()),
            // The status line's end: LF, so a server ending lines with a bare LF is read too.
            CheckSpec::Http { .. } => b"\n",
            CheckSpec::Send { expect, .. } => expect,
        };
        // Owned here, so what came before a timeout can still be judged.
        let mut reply = Vec::new();
        let found = match timeout_at(
            deadline,
            exchange(&mut stream, &self.request, expect, &mut reply),
        )
        .await
        {
            Ok(found) => found?,
            Err(_) if reply.is_empty() => return Err(timed_out("waiting for a reply")),
            // An answer that stopped short of the wanted bytes: a wrong answer, not silence.
            Err(_) => false,
        };
        match &key.spec {
            CheckSpec::Http { .. } => http_status(&reply, found),
            CheckSpec::Send { .. } if !found => Err(missing(expect, &reply)),
            _ => Ok(()),
        }
    }

    async fn udp(&self, addr: &UpstreamAddr, expect: &[u8]) -> Result<(), CheckError> {
        let target = match addr {
            UpstreamAddr::Socket(addr) => *addr,
            UpstreamAddr::Named(name) => tokio::net::lookup_host(name.as_str())
                .await
                .map_err(|error| CheckError::Resolve {
                    name: name.clone(),
                    error,
                })?
                .next()
                .ok_or_else(|| CheckError::NoAddress(name.clone()))?,
        };
        let local: SocketAddr = if target.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let io = |doing| move |error| CheckError::Io { doing, error };
        let socket = UdpSocket::bind(local).await.map_err(io("bind"))?;
        // Connected: the kernel drops datagrams from anyone else and reports port unreachable.
        socket.connect(target).await.map_err(io("connect"))?;
        let refused = |error: io::Error, doing| match error.kind() {
            ErrorKind::ConnectionRefused => CheckError::Unreachable,
            _ => CheckError::Io { doing, error },
        };
        socket
            .send(&self.request)
            .await
            .map_err(|e| refused(e, "send"))?;
        let mut reply = vec![0u8; MAX_REPLY];
        let n = socket
            .recv(&mut reply)
            .await
            .map_err(|e| refused(e, "receive"))?;
        if contains(&reply[..n], expect) {
            Ok(())
        } else {
            Err(missing(expect, &reply[..n]))
        }
    }
}

async fn connect(addr: &UpstreamAddr) -> Result<TcpStream, CheckError> {
    let failed = |error: io::Error| match error.kind() {
        ErrorKind::ConnectionRefused => CheckError::Refused,
        _ => CheckError::Connect(error),
    };
    let name = match addr {
        UpstreamAddr::Socket(addr) => return TcpStream::connect(*addr).await.map_err(failed),
        UpstreamAddr::Named(name) => name,
    };
    // Resolved at each check, so a name that moves is followed; every address is tried, as
    // the connection path would.
    let addresses = tokio::net::lookup_host(name.as_str())
        .await
        .map_err(|error| CheckError::Resolve {
            name: name.clone(),
            error,
        })?;
    let mut last = None;
    for address in addresses {
        match TcpStream::connect(address).await {
            Ok(stream) => return Ok(stream),
            Err(error) => last = Some(error),
        }
    }
    Err(last.map_or_else(|| CheckError::NoAddress(name.clone()), failed))
}

/// Writes `request` (if any), then reads into `reply` until it contains `until` (true), the
/// peer closes or [`MAX_REPLY`] bytes are in (false). Cancelled at any await, `reply` holds
/// exactly what was read.
async fn exchange(
    stream: &mut TcpStream,
    request: &[u8],
    until: &[u8],
    reply: &mut Vec<u8>,
) -> Result<bool, CheckError> {
    stream
        .write_all(request)
        .await
        .map_err(|error| CheckError::Io {
            doing: "send",
            error,
        })?;
    while reply.len() < MAX_REPLY {
        let start = reply.len();
        reply.reserve((MAX_REPLY - start).min(1024));
        let n = match stream.read_buf(reply).await {
            Ok(n) => n,
            // A reset after the reply began is the peer's way of closing; judge what came.
            Err(_) if start > 0 => 0,
            Err(error) => {
                return Err(CheckError::Io {
                    doing: "receive",
                    error,
                })
            }
        };
        if n == 0 {
            return if reply.is_empty() {
                Err(CheckError::Closed)
            } else {
                Ok(false)
            };
        }
        // The wanted bytes may straddle reads: search from where they could begin.
        let from = start.saturating_sub(until.len().saturating_sub(1));
        if contains(&reply[from..], until) {
            return Ok(true);
        }
    }
    Ok(false)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// The start of a reply, for an error: enough to recognise the answer, no more.
const QUOTED_REPLY: usize = 64;

/// The start of `reply` as an error shows it: printable ASCII and spaces as they are,
/// `"` and `\` escaped, other bytes as in the spec grammar.
fn quoted(reply: &[u8]) -> String {
    let shown = &reply[..reply.len().min(QUOTED_REPLY)];
    let mut text = String::with_capacity(shown.len() + 3);
    for &byte in shown {
        match byte {
            b'"' => text.push_str("\\\""),
            b' ' | b',' | b';' => text.push(byte as char),
            _ => text.push_str(&Escaped(&[byte]).to_string()),
        }
    }
    if reply.len() > shown.len() {
        text.push_str("...");
    }
    text
}

fn missing(expect: &[u8], reply: &[u8]) -> CheckError {
    CheckError::Missing {
        expect: Escaped(expect).to_string(),
        got: quoted(reply),
    }
}

/// 2xx or 3xx from the status line at the start of `reply` (`complete`: its line end came).
fn http_status(reply: &[u8], complete: bool) -> Result<(), CheckError> {
    let line = reply.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let not_http = || CheckError::NotHttp(quoted(line));
    let text = std::str::from_utf8(line).map_err(|_| not_http())?;
    let mut parts = text.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(not_http());
    };
    if !complete || !version.starts_with("HTTP/1.") || code.len() != 3 {
        return Err(not_http());
    }
    let status: u16 = code.parse().map_err(|_| not_http())?;
    match status {
        200..=399 => Ok(()),
        100..=599 => Err(CheckError::Status(status)),
        _ => Err(not_http()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU16;

    use tokio::{io::AsyncBufReadExt, net::TcpListener, task::JoinHandle};

    use super::*;

    /// Parses `input`: the canonical form (which must parse back equal), or `error: ...`.
    fn check(input: &str, expected: &str) {
        let actual = match input.parse::<CheckSpec>() {
            Ok(spec) => {
                let canonical = spec.to_string();
                let reparsed: CheckSpec = canonical.parse().expect("canonical form parses");
                assert_eq!(reparsed, spec, "round trip of {input:?}");
                canonical
            }
            Err(error) => format!("error: {error}"),
        };
        assert_eq!(actual, expected, "input {input:?}");
    }

    #[test]
    fn specs_parse_strictly_and_print_canonically() {
        check("tcp", "tcp");
        check("http:/", "http:/");
        check("http:/healthz", "http:/healthz");
        check("http:/health?full=1&x=%20", "http:/health?full=1&x=%20");
        check("send:PING,expect:PONG", "send:PING,expect:PONG");
        check("udp:send:PING,expect:PONG", "udp:send:PING,expect:PONG");
        // Escapes: the canonical form names a byte its shortest way.
        check(
            "send:a\\x0d\\x0A,expect:\\r\\n",
            "send:a\\r\\n,expect:\\r\\n",
        );
        check(
            "send:a\\x2cb\\x3b\\x20c,expect:\\\\",
            "send:a\\x2cb\\x3b\\x20c,expect:\\\\",
        );
        check(
            "send:\\t\\xff\\x00,expect:+OK",
            "send:\\t\\xff\\x00,expect:+OK",
        );
        check("send:expect:,expect:x", "send:expect:,expect:x");

        let kinds =
            "expected tcp, http:<path>, send:<text>,expect:<text> or udp:send:<text>,expect:<text>";
        check("", &format!("error: check is empty: {kinds}"));
        check("TCP", &format!("error: unknown check \"TCP\": {kinds}"));
        check("tcp:", &format!("error: unknown check \"tcp:\": {kinds}"));
        check(
            "https:/x",
            &format!("error: unknown check \"https:/x\": {kinds}"),
        );
        check("udp", &format!("error: unknown check \"udp\": {kinds}"));
        check(
            "http:healthz",
            "error: http check path \"healthz\" does not start with '/'",
        );
        check(
            "http:",
            "error: http check path \"\" does not start with '/'",
        );
        check(
            "http:/a;b",
            "error: http check path \"/a;b\" contains ';': a path is printable ASCII with no ';'",
        );
        check(
            "http:/a b",
            "error: http check path \"/a b\" contains ' ': a path is printable ASCII with no ';'",
        );
        check(
            "send:PING",
            "error: check \"send:PING\" is not of the form send:<text>,expect:<text>",
        );
        check(
            "send:PING,expect",
            "error: check \"send:PING,expect\" is not of the form send:<text>,expect:<text>",
        );
        check(
            "udp:expect:PONG,send:PING",
            "error: check \"udp:expect:PONG,send:PING\" is not of the form send:<text>,expect:<text>",
        );
        check(
            "send:,expect:PONG",
            "error: the send text of check \"send:,expect:PONG\" is empty",
        );
        check(
            "udp:send:PING,expect:",
            "error: the expect text of check \"udp:send:PING,expect:\" is empty",
        );
        check(
            "send:a,b,expect:c",
            "error: check text \"a,b\" contains ',': write it as \\x2c",
        );
        check(
            "send:a,expect:b,c",
            "error: check text \"b,c\" contains ',': write it as \\x2c",
        );
        check(
            "send:a b,expect:c",
            "error: check text \"a b\" contains ' ': write it as \\x20",
        );
        check(
            "send:a\tb,expect:c",
            "error: check text \"a\\tb\" contains '\\t': write it as \\t",
        );
        check(
            "send:é,expect:c",
            "error: check text \"é\" contains 'é': write it as \\xc3\\xa9",
        );
        check(
            "send:a\\q,expect:b",
            "error: check text \"a\\\\q\" has an unknown escape \"\\\\q\": use \\r, \\n, \\t, \\\\ or \\xHH",
        );
        check(
            "send:a\\x4,expect:b",
            "error: check text \"a\\\\x4\" has an unknown escape \"\\\\x4\": use \\r, \\n, \\t, \\\\ or \\xHH",
        );
        check(
            "send:a\\xzz,expect:b",
            "error: check text \"a\\\\xzz\" has an unknown escape \"\\\\xzz\": use \\r, \\n, \\t, \\\\ or \\xHH",
        );
        check(
            "send:a\\,expect:b",
            "error: check text \"a\\\\\" has an unknown escape \"\\\\\": use \\r, \\n, \\t, \\\\ or \\xHH",
        );
    }

    /// States after each result of `results` (`+` pass, `-` failure): `u`nknown, `P`, `F`.
    fn tally(results: &str, rise: u32, fall: u32) -> String {
        let mut tally = Tally::START;
        results
            .chars()
            .map(|c| {
                tally.record(c == '+', rise, fall);
                match tally.state {
                    CheckState::Unknown => 'u',
                    CheckState::Passing => 'P',
                    CheckState::Failing => 'F',
                }
            })
            .collect()
    }

    #[test]
    fn first_result_decides_then_rise_and_fall() {
        assert_eq!(tally("+", 2, 3), "P");
        assert_eq!(tally("-", 2, 3), "F");
        assert_eq!(tally("+--+---", 2, 3), "PPPPPPF");
        assert_eq!(tally("---++", 2, 3), "FFFFP");
        assert_eq!(tally("-+-++", 2, 3), "FFFFP");
        assert_eq!(tally("+-", 1, 1), "PF");
        assert_eq!(tally("+-+", 0, 0), "PFP", "0 counts as 1");
        assert_eq!(tally("+---+++", 3, 3), "PPPFFFP");
    }

    /// `http_status` of `reply` (`complete`: its line end came): `pass` or the error.
    fn status_line(reply: &str, complete: bool, expected: &str) {
        let actual = match http_status(reply.as_bytes(), complete) {
            Ok(()) => "pass".to_string(),
            Err(error) => error.to_string(),
        };
        assert_eq!(actual, expected, "reply {reply:?}");
    }

    #[test]
    fn http_status_lines_pass_on_2xx_and_3xx() {
        status_line("HTTP/1.1 200 OK\r\nServer: x\r\n", true, "pass");
        status_line("HTTP/1.0 204 No Content\r\n", true, "pass");
        status_line("HTTP/1.1 399\r\n", true, "pass");
        status_line("HTTP/1.1 200 OK\nServer: bare LF\n", true, "pass");
        status_line("HTTP/1.1 199 Hm\r\n", true, "status 199");
        status_line("HTTP/1.1 400 Bad\r\n", true, "status 400");
        status_line("HTTP/1.1 503 Busy\r\n", true, "status 503");
        status_line(
            "HTTP/1.1 200 OK",
            false,
            "not an HTTP response: \"HTTP/1.1 200 OK\"",
        );
        status_line(
            "HTTP/2 200\r\n",
            true,
            "not an HTTP response: \"HTTP/2 200\"",
        );
        status_line(
            "HTTP/1.1 2000\r\n",
            true,
            "not an HTTP response: \"HTTP/1.1 2000\"",
        );
        status_line(
            "HTTP/1.1 700 x\r\n",
            true,
            "not an HTTP response: \"HTTP/1.1 700 x\"",
        );
        status_line("HTTP/1.1\r\n", true, "not an HTTP response: \"HTTP/1.1\"");
        status_line(
            "SSH-2.0-\"x\"\t\x01\r\n",
            true,
            "not an HTTP response: \"SSH-2.0-\\\"x\\\"\\t\\x01\"",
        );
        let long = format!("{}\r\n", "a".repeat(100));
        status_line(
            &long,
            true,
            &format!("not an HTTP response: \"{}...\"", "a".repeat(QUOTED_REPLY)),
        );
    }

    #[test]
    fn wakes_gather_in_slots_of_a_fortieth_of_the_interval() {
        let second = Duration::from_secs(1);
        let now = Instant::now();
        for offset_ms in [0, 1, 7, 24, 25, 26, 999] {
            let at = now + Duration::from_millis(offset_ms);
            let woken = in_slot(at, second);
            assert!(
                woken >= at && woken - at < WAKE_SLOT,
                "{offset_ms} ms: {:?}",
                woken - at
            );
            assert_eq!(
                in_slot(woken, second),
                woken,
                "a slot's end is its own slot"
            );
            assert_eq!(in_slot(woken - Duration::from_millis(1), second), woken);
        }
        // Short intervals get short slots: a 20 ms test interval moves by half a millisecond.
        let at = now + Duration::from_millis(3);
        let woken = in_slot(at, Duration::from_millis(20));
        assert!(woken >= at && woken - at < Duration::from_micros(500));
    }

    fn fast(rise: u32, fall: u32) -> CheckParams {
        CheckParams {
            interval: Duration::from_millis(20),
            // Generous: a loopback check that fails on time would make a test flaky.
            timeout: Duration::from_secs(5),
            rise,
            fall,
        }
    }

    fn key(addr: SocketAddr, spec: &str, params: CheckParams) -> CheckKey {
        CheckKey {
            addr: UpstreamAddr::Socket(addr),
            spec: spec.parse().expect("spec"),
            params,
        }
    }

    /// Waits (bounded) for `status` to reach `state`, woken by its change notifications.
    async fn wait_for(status: &CheckStatus, changes: &Notify, state: CheckState) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while status.state() != state {
            if timeout_at(deadline, changes.notified()).await.is_err() {
                panic!(
                    "{} is {} after 20s, not {state}; {} checks, {} failed, last error {:?}",
                    status.key().addr,
                    status.state(),
                    status.checks(),
                    status.failures(),
                    status.last_error()
                );
            }
        }
    }

    /// A TCP listener on `addr` that accepts and closes at once, until aborted.
    async fn accept_and_close(addr: SocketAddr) -> (SocketAddr, JoinHandle<()>) {
        let listener = TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                drop(stream);
            }
        });
        (addr, task)
    }

    #[tokio::test]
    async fn tcp_check_follows_a_listener_closing_and_reopening() {
        let (addr, server) = accept_and_close((std::net::Ipv4Addr::LOCALHOST, 0).into()).await;
        let checks = Checks::default();
        let changes = Arc::new(Notify::new());
        let (rise, fall) = (2, 3);
        let status = checks.subscribe(key(addr, "tcp", fast(rise, fall)), Arc::downgrade(&changes));
        wait_for(&status, &changes, CheckState::Passing).await;
        assert_eq!(status.failures(), 0);
        assert_eq!(status.last_error(), None);

        server.abort();
        let _ = server.await;
        wait_for(&status, &changes, CheckState::Failing).await;
        assert!(
            status.failures() >= u64::from(fall),
            "{} failures",
            status.failures()
        );
        assert_eq!(status.last_error().as_deref(), Some("connect refused"));
        let passes_when_failed = status.checks() - status.failures();

        let (_, server) = accept_and_close(addr).await;
        wait_for(&status, &changes, CheckState::Passing).await;
        let passes = status.checks() - status.failures() - passes_when_failed;
        assert!(
            passes >= u64::from(rise),
            "passing again after {passes} passes"
        );
        assert!(status.since() <= SystemTime::now());
        // The last failure stays readable after recovery.
        assert_eq!(status.last_error().as_deref(), Some("connect refused"));
        server.abort();
    }

    /// Every log line (`LEVEL message`) of the test process, with the thread that wrote it.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<(std::thread::ThreadId, String)>>>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Lines {
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            struct Message(String);
            impl tracing::field::Visit for Message {
                fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
                    if field.name() == "message" {
                        self.0 = format!("{value:?}");
                    }
                }
            }
            let mut message = Message(String::new());
            event.record(&mut message);
            let line = format!("{} {}", event.metadata().level(), message.0);
            let thread = std::thread::current().id();
            self.0.lock().expect("lines").push((thread, line));
        }
    }

    /// The process's one subscriber, installed by the first caller. Global rather than
    /// per-thread: tracing caches whether a call site is wanted, and a site first reached on a
    /// thread with no subscriber (another test) would stay silent for a scoped one.
    fn captured() -> &'static Lines {
        static LINES: std::sync::OnceLock<Lines> = std::sync::OnceLock::new();
        LINES.get_or_init(|| {
            use tracing_subscriber::layer::SubscriberExt;
            let lines = Lines::default();
            tracing::subscriber::set_global_default(
                tracing_subscriber::registry().with(lines.clone()),
            )
            .expect("no other subscriber in this test process");
            tracing::callsite::rebuild_interest_cache();
            lines
        })
    }

    /// Lines this thread logged.
    fn lines_of_this_thread() -> Vec<String> {
        let thread = std::thread::current().id();
        let lines = captured().0.lock().expect("lines");
        lines
            .iter()
            .filter(|(t, _)| *t == thread)
            .map(|(_, line)| line.clone())
            .collect()
    }

    /// A current-thread test: the checker runs on this thread, so its lines are this thread's.
    #[tokio::test]
    async fn one_log_line_per_state_change_not_per_check() {
        captured();
        let (addr, server) = accept_and_close((std::net::Ipv4Addr::LOCALHOST, 0).into()).await;
        let checks = Checks::default();
        let changes = Arc::new(Notify::new());
        let status = checks.subscribe(key(addr, "tcp", fast(2, 2)), Arc::downgrade(&changes));
        wait_for(&status, &changes, CheckState::Passing).await;
        server.abort();
        let _ = server.await;
        wait_for(&status, &changes, CheckState::Failing).await;
        // Keep failing a while: more failed checks, no more lines.
        let failures = status.failures();
        let deadline = Instant::now() + Duration::from_secs(20);
        while status.failures() < failures + 5 {
            assert!(Instant::now() < deadline, "no further checks");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (_, server) = accept_and_close(addr).await;
        wait_for(&status, &changes, CheckState::Passing).await;

        let lines = lines_of_this_thread();
        let warnings: Vec<&String> = lines.iter().filter(|l| l.starts_with("WARN")).collect();
        let infos: Vec<&String> = lines.iter().filter(|l| l.starts_with("INFO")).collect();
        assert_eq!(
            warnings,
            ["WARN check failing; it passes again after 2 pass(es) in a row"],
            "{} checks, {} failed; all lines: {lines:?}",
            status.checks(),
            status.failures()
        );
        assert_eq!(infos, ["INFO check passing again"], "{lines:?}");
        server.abort();
    }

    #[tokio::test]
    async fn a_named_address_is_resolved_at_each_check() {
        let (addr, server) = accept_and_close((std::net::Ipv4Addr::LOCALHOST, 0).into()).await;
        let checks = Checks::default();
        let changes = Arc::new(Notify::new());
        let key = CheckKey {
            addr: UpstreamAddr::Named(format!("localhost:{}", addr.port())),
            spec: CheckSpec::Tcp,
            params: fast(1, 1),
        };
        let status = checks.subscribe(key, Arc::downgrade(&changes));
        wait_for(&status, &changes, CheckState::Passing).await;
        server.abort();
        let _ = server.await;
        wait_for(&status, &changes, CheckState::Failing).await;
        assert_eq!(status.last_error().as_deref(), Some("connect refused"));
    }

    /// A tiny HTTP/1.1 responder answering every request with `status`; it keeps the last
    /// request head it read.
    struct HttpServer {
        addr: SocketAddr,
        status: Arc<AtomicU16>,
        last_request: Arc<Mutex<String>>,
        task: JoinHandle<()>,
    }

    impl HttpServer {
        async fn start(status: u16) -> HttpServer {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let status = Arc::new(AtomicU16::new(status));
            let last_request = Arc::new(Mutex::new(String::new()));
            let (answer, seen) = (Arc::clone(&status), Arc::clone(&last_request));
            let task = tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let (answer, seen) = (Arc::clone(&answer), Arc::clone(&seen));
                    tokio::spawn(async move {
                        let mut stream = tokio::io::BufReader::new(stream);
                        let mut head = String::new();
                        while !head.ends_with("\r\n\r\n") && head.len() < 8192 {
                            match stream.read_line(&mut head).await {
                                Ok(0) | Err(_) => return,
                                Ok(_) => {}
                            }
                        }
                        *seen.lock().expect("request") = head;
                        let code = answer.load(Ordering::Relaxed);
                        let response = format!(
                            "HTTP/1.1 {code} Whatever\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                        );
                        let _ = stream.get_mut().write_all(response.as_bytes()).await;
                    });
                }
            });
            HttpServer {
                addr,
                status,
                last_request,
                task,
            }
        }
    }

    #[tokio::test]
    async fn http_check_follows_the_status_code() {
        let server = HttpServer::start(200).await;
        let checks = Checks::default();
        let changes = Arc::new(Notify::new());
        let status = checks.subscribe(
            key(server.addr, "http:/healthz", fast(1, 2)),
            Arc::downgrade(&changes),
        );
        wait_for(&status, &changes, CheckState::Passing).await;
        let request = server.last_request.lock().expect("request").clone();
        assert!(
            request.starts_with("GET /healthz HTTP/1.1\r\n"),
            "{request:?}"
        );
        assert!(
            request.contains(&format!("\r\nHost: {}\r\n", server.addr)),
            "{request:?}"
        );
        assert!(request.contains("\r\nConnection: close\r\n"), "{request:?}");

        server.status.store(503, Ordering::Relaxed);
        wait_for(&status, &changes, CheckState::Failing).await;
        assert_eq!(status.last_error().as_deref(), Some("status 503"));

        // 3xx passes, as in HAProxy: a redirect is an application answering.
        server.status.store(302, Ordering::Relaxed);
        wait_for(&status, &changes, CheckState::Passing).await;
        server.status.store(404, Ordering::Relaxed);
        wait_for(&status, &changes, CheckState::Failing).await;
        assert_eq!(status.last_error().as_deref(), Some("status 404"));
        server.task.abort();
    }

    /// A TCP server that reads one line per connection and answers it with `answer(line)`
    /// (`None`: never answers), then holds the connection open until the peer closes.
    async fn line_server(answer: fn(&str) -> Option<&'static str>) -> (SocketAddr, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut stream = tokio::io::BufReader::new(stream);
                    let mut line = String::new();
                    if stream.read_line(&mut line).await.is_err() {
                        return;
                    }
                    if let Some(reply) = answer(&line) {
                        let _ = stream.get_mut().write_all(reply.as_bytes()).await;
                    }
                    // Hold the connection until the peer gives up, as Redis does.
                    let _ = stream.read_line(&mut line).await;
                });
            }
        });
        (addr, task)
    }

    #[tokio::test]
    async fn send_expect_sends_a_line_and_looks_for_the_text() {
        // Answers only a whole line ending in \r\n, as Redis's inline protocol reads it.
        let (addr, server) = line_server(|line| {
            Some(if line == "PING\r\n" {
                "+PONG\r\n"
            } else {
                "-ERR\r\n"
            })
        })
        .await;
        let checks = Checks::default();
        let changes = Arc::new(Notify::new());
        let passing = checks.subscribe(
            key(addr, "send:PING,expect:PONG", fast(1, 1)),
            Arc::downgrade(&changes),
        );
        wait_for(&passing, &changes, CheckState::Passing).await;

        // A wrong answer on a connection left open is judged at the deadline, as wrong.
        let other = Arc::new(Notify::new());
        let params = CheckParams {
            timeout: Duration::from_millis(200),
            ..fast(1, 1)
        };
        let failing = checks.subscribe(
            key(addr, "send:PING,expect:PANG", params),
            Arc::downgrade(&other),
        );
        wait_for(&failing, &other, CheckState::Failing).await;
        assert_eq!(
            failing.last_error().as_deref(),
            Some("reply did not contain \"PANG\": got \"+PONG\\r\\n\"")
        );
        server.abort();
    }

    #[tokio::test]
    async fn a_server_that_never_answers_fails_by_timeout() {
        let (addr, server) = line_server(|_| None).await;
        let checks = Checks::default();
        let changes = Arc::new(Notify::new());
        let params = CheckParams {
            timeout: Duration::from_millis(200),
            ..fast(1, 1)
        };
        let status = checks.subscribe(
            key(addr, "send:PING,expect:PONG", params),
            Arc::downgrade(&changes),
        );
        wait_for(&status, &changes, CheckState::Failing).await;
        assert_eq!(
            status.last_error().as_deref(),
            Some("timed out after 200ms waiting for a reply")
        );
        // The same server passes a plain connect check: the timeout is the exchange's.
        let connects = Arc::new(Notify::new());
        let tcp = checks.subscribe(key(addr, "tcp", params), Arc::downgrade(&connects));
        wait_for(&tcp, &connects, CheckState::Passing).await;
        server.abort();
    }

    #[tokio::test]
    async fn http_check_refuses_an_answer_that_is_not_http() {
        let (addr, server) = line_server(|_| Some("hello\r\n")).await;
        let checks = Checks::default();
        let changes = Arc::new(Notify::new());
        let status = checks.subscribe(key(addr, "http:/", fast(1, 1)), Arc::downgrade(&changes));
        wait_for(&status, &changes, CheckState::Failing).await;
        assert_eq!(
            status.last_error().as_deref(),
            Some("not an HTTP response: \"hello\"")
        );
        server.abort();
    }

    #[tokio::test]
    async fn udp_check_wants_an_answer_containing_the_text() {
        let echo = UdpSocket::bind("127.0.0.1:0").await.expect("bind echo");
        let echo_addr = echo.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen_by_echo = Arc::clone(&seen);
        let server = tokio::spawn(async move {
            let mut buffer = [0u8; 1500];
            while let Ok((n, from)) = echo.recv_from(&mut buffer).await {
                *seen_by_echo.lock().expect("seen") = buffer[..n].to_vec();
                let _ = echo.send_to(&buffer[..n], from).await;
            }
        });
        // Bound but never read: datagrams are queued, nothing answers.
        let silent = UdpSocket::bind("127.0.0.1:0").await.expect("bind silent");
        let closed = UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind")
            .local_addr()
            .expect("addr");

        let checks = Checks::default();
        let params = CheckParams {
            timeout: Duration::from_millis(200),
            ..fast(1, 1)
        };
        let changes = Arc::new(Notify::new());
        let spec = "udp:send:PING,expect:PING";
        let answered = checks.subscribe(key(echo_addr, spec, params), Arc::downgrade(&changes));
        wait_for(&answered, &changes, CheckState::Passing).await;
        assert_eq!(
            *seen.lock().expect("seen"),
            b"PING",
            "one datagram, no line end"
        );

        let changes = Arc::new(Notify::new());
        let wrong = checks.subscribe(
            key(echo_addr, "udp:send:PING,expect:PONG", params),
            Arc::downgrade(&changes),
        );
        wait_for(&wrong, &changes, CheckState::Failing).await;
        assert_eq!(
            wrong.last_error().as_deref(),
            Some("reply did not contain \"PONG\": got \"PING\"")
        );

        let changes = Arc::new(Notify::new());
        let unanswered = checks.subscribe(
            key(silent.local_addr().expect("addr"), spec, params),
            Arc::downgrade(&changes),
        );
        wait_for(&unanswered, &changes, CheckState::Failing).await;
        assert_eq!(
            unanswered.last_error().as_deref(),
            Some("timed out after 200ms waiting for a reply")
        );

        let changes = Arc::new(Notify::new());
        let refused = checks.subscribe(key(closed, spec, params), Arc::downgrade(&changes));
        wait_for(&refused, &changes, CheckState::Failing).await;
        assert_eq!(
            refused.last_error().as_deref(),
            Some("port unreachable (nothing listens on it)")
        );
        server.abort();
    }

    /// Polls (bounded) until `checks` runs `count` checkers.
    async fn wait_running(checks: &Checks, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while checks.running() != count {
            assert!(
                Instant::now() < deadline,
                "{} checkers run after 20s, not {count}",
                checks.running()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn one_checker_per_key_stopped_with_its_last_status() {
        let (addr, server) = accept_and_close((std::net::Ipv4Addr::LOCALHOST, 0).into()).await;
        let checks = Checks::default();
        let (first, second) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let a = checks.subscribe(key(addr, "tcp", fast(1, 1)), Arc::downgrade(&first));
        let b = checks.subscribe(key(addr, "tcp", fast(1, 1)), Arc::downgrade(&second));
        assert!(Arc::ptr_eq(&a, &b), "one status for one key");
        assert_eq!(checks.running(), 1);
        // Both subscribers hear of the change.
        wait_for(&a, &first, CheckState::Passing).await;
        tokio::time::timeout(Duration::from_secs(20), second.notified())
            .await
            .expect("the second subscriber is notified too");

        // Another check or other parameters of the same endpoint are another checker.
        let other = checks.subscribe(key(addr, "tcp", fast(2, 1)), Arc::downgrade(&first));
        assert!(!Arc::ptr_eq(&a, &other));
        assert_eq!(checks.running(), 2);
        drop(other);
        wait_running(&checks, 1).await;

        drop(a);
        assert_eq!(checks.running(), 1, "b still holds it");
        drop(b);
        wait_running(&checks, 0).await;

        // A later subscriber starts a fresh checker.
        let again = checks.subscribe(key(addr, "tcp", fast(1, 1)), Arc::downgrade(&first));
        assert_eq!(checks.running(), 1);
        assert_eq!(again.state(), CheckState::Unknown);
        wait_for(&again, &first, CheckState::Passing).await;
        server.abort();
    }

    #[test]
    fn statuses_and_registry_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Checks>();
        send_sync::<CheckStatus>();
        send_sync::<CheckSpecError>();
    }

    /// Subscribers coming and going on several threads at once: a key has one live status,
    /// and every checker stops and leaves no entry behind. (A checker whose last status just
    /// went may still be winding down beside its successor, so `running` is only asserted
    /// at the end.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn subscribers_coming_and_going_leave_nothing_behind() {
        let (addr, server) = accept_and_close((std::net::Ipv4Addr::LOCALHOST, 0).into()).await;
        let checks = Arc::new(Checks::default());
        let changes = Arc::new(Notify::new());
        let mut tasks = Vec::new();
        for worker in 0..4u32 {
            let (checks, changes) = (Arc::clone(&checks), Arc::clone(&changes));
            tasks.push(tokio::spawn(async move {
                for round in 0..50u32 {
                    // Two keys, shared by all workers.
                    let params = fast(1 + (worker + round) % 2, 1);
                    let status =
                        checks.subscribe(key(addr, "tcp", params), Arc::downgrade(&changes));
                    let again = checks.subscribe(key(addr, "tcp", params), Weak::new());
                    assert!(Arc::ptr_eq(&status, &again), "one live status per key");
                    drop(again);
                    if round % 7 == 0 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    drop(status);
                    tokio::task::yield_now().await;
                }
            }));
        }
        for task in tasks {
            task.await.expect("worker");
        }
        wait_running(&checks, 0).await;
        assert!(lock(&checks.registry.statuses).is_empty());
        server.abort();
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    fn text() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(any::<u8>(), 1..16)
    }

    /// Every spec the parser accepts, as a value.
    fn spec() -> impl Strategy<Value = CheckSpec> {
        prop_oneof![
            Just(CheckSpec::Tcp),
            "/[!-:<-~]{0,20}".prop_map(|path| CheckSpec::Http { path }),
            (text(), text()).prop_map(|(send, expect)| CheckSpec::Send { send, expect }),
            (text(), text()).prop_map(|(send, expect)| CheckSpec::Udp { send, expect }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// The canonical form parses back equal and fits in a descriptor value.
        #[test]
        fn specs_round_trip_within_a_descriptor_value(spec in spec()) {
            let text = spec.to_string();
            prop_assert!(!text.contains(|c: char| c.is_whitespace() || c == ';'), "{}", text);
            prop_assert_eq!(text.parse::<CheckSpec>(), Ok(spec), "{}", text);
        }

        #[test]
        fn any_text_is_a_spec_or_an_error(input in any::<String>()) {
            if let Ok(spec) = input.parse::<CheckSpec>() {
                prop_assert_eq!(spec.to_string().parse::<CheckSpec>(), Ok(spec));
            }
        }

        #[test]
        fn text_near_the_grammar_is_a_spec_or_an_error(
            input in "(tcp|http:|send:|udp:send:)[a-z/\\\\,:x0-9]{0,12}(,expect:)?[a-z\\\\x0-9,]{0,8}",
        ) {
            if let Ok(spec) = input.parse::<CheckSpec>() {
                prop_assert_eq!(spec.to_string().parse::<CheckSpec>(), Ok(spec));
            }
        }
    }
}
