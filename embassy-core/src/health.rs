//! Endpoint health: what keeps an endpoint in rotation, and what takes it out.
//!
//! The host decides what is eligible, so every balancer (a third party's too) picks only among
//! endpoints that are fit, without knowing why. Three inputs decide: connect failures seen by the
//! connection path (*passive ejection*), active checks ([`crate::check`]), and discovery itself
//! (an instance it stops listing, held down for `remove_delay`). None of them edits the
//! snapshot: each wakes the service's health task, which rebuilds the snapshot through the one
//! update path ([`ServiceEndpoints`](crate::endpoints::ServiceEndpoints)).

use std::{
    fmt::Display,
    sync::{
        atomic::{AtomicU32, AtomicU64, Ordering},
        Arc, OnceLock,
    },
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::Notify;
use tracing::{info, warn};

use crate::{
    check::{CheckParams, CheckSpec},
    endpoints::UpstreamAddr,
};

/// Consecutive connect failures that eject an endpoint. Connect failures (refused, timed out,
/// reset before any byte) are unambiguous, unlike Envoy's 5xx count, so fewer are needed than
/// Envoy's 5; each costs a client a failover attempt, not an error.
pub const DEFAULT_EJECT_AFTER: u32 = 3;
/// The first ejection's length: a container that restarts is back within seconds, and a
/// returning endpoint that still fails is ejected again after `eject_after` tries.
pub const DEFAULT_EJECT_TIME: Duration = Duration::from_secs(5);
/// Each ejection in a row doubles the time, up to this: an endpoint dead for good costs
/// `eject_after` failed attempts every two minutes.
pub const DEFAULT_EJECT_MAX_TIME: Duration = Duration::from_secs(120);
/// At most this share of a service's endpoints is ejected at once (but one always may be):
/// failures spread over many endpoints say more about the network or Embassy than about them.
pub const DEFAULT_MAX_EJECTED_PERCENT: u32 = 50;
/// Below this share of eligible endpoints, all of them are used (Envoy's default): the
/// survivors would take the whole load and likely fall too, while connect failover copes with
/// the dead ones. Whatever the share, no endpoint left means all of them.
pub const DEFAULT_PANIC_THRESHOLD_PERCENT: u32 = 50;
/// How long connections to a removed endpoint may run with `on_remove=drain`: Kubernetes'
/// default grace period, which most clients' reconnect logic is tuned for.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// What happens to open connections to an endpoint discovery removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnRemove {
    /// They run on until they end (the default: removal is often a registration glitch, and
    /// cutting a database connection costs more than keeping it).
    #[default]
    Keep,
    /// They run up to `drain_timeout`, then are reset.
    Drain,
    /// They are reset at once.
    Close,
}

impl OnRemove {
    pub fn parse(text: &str) -> Option<OnRemove> {
        match text {
            "keep" => Some(OnRemove::Keep),
            "drain" => Some(OnRemove::Drain),
            "close" => Some(OnRemove::Close),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OnRemove::Keep => "keep",
            OnRemove::Drain => "drain",
            OnRemove::Close => "close",
        }
    }
}

/// A service's health settings, from its descriptor over the command line's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthPolicy {
    /// Consecutive connect failures that eject; 0 turns passive ejection off.
    pub eject_after: u32,
    pub eject_time: Duration,
    pub eject_max_time: Duration,
    pub max_ejected_percent: u32,
    pub panic_threshold_percent: u32,
    pub on_remove: OnRemove,
    pub drain_timeout: Duration,
    /// An endpoint discovery stops listing stays (while healthy) this long; zero: removed at once.
    pub remove_delay: Duration,
    /// The active check the consumer declared, if any.
    pub check: Option<CheckSpec>,
    pub check_params: CheckParams,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy {
            eject_after: DEFAULT_EJECT_AFTER,
            eject_time: DEFAULT_EJECT_TIME,
            eject_max_time: DEFAULT_EJECT_MAX_TIME,
            max_ejected_percent: DEFAULT_MAX_EJECTED_PERCENT,
            panic_threshold_percent: DEFAULT_PANIC_THRESHOLD_PERCENT,
            on_remove: OnRemove::Keep,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            remove_delay: Duration::ZERO,
            check: None,
            check_params: CheckParams::default(),
        }
    }
}

impl HealthPolicy {
    /// The length of ejection number `ejections` in a row (1 for the first).
    pub fn ejection_time(&self, ejections: u32) -> Duration {
        let doublings = ejections.saturating_sub(1).min(20);
        self.eject_time
            .saturating_mul(1 << doublings)
            .min(self.eject_max_time.max(self.eject_time))
    }

    /// How many of `total` endpoints may be ejected at once.
    pub fn max_ejected(&self, total: usize) -> usize {
        (total * self.max_ejected_percent as usize / 100).max(1)
    }

    /// Whether `eligible` of `total` endpoints is too few, so all are used instead.
    pub fn panics(&self, eligible: usize, total: usize) -> bool {
        total > 0
            && (eligible == 0 || eligible * 100 < total * self.panic_threshold_percent as usize)
    }
}

/// Failures since the last success live in the low bits of [`Health::state`], ejections in a
/// row above them, so a success clears both with the one load it already costs.
const EJECTIONS_SHIFT: u32 = 40;
const FAILURES_MASK: u64 = (1 << EJECTIONS_SHIFT) - 1;

/// While an endpoint keeps failing, one summary line per this period at most.
pub const FAILURE_SUMMARY_PERIOD: Duration = Duration::from_secs(10);

/// An endpoint's connect results as the connection path reports them, carried across
/// snapshots. Failures are logged per state change (the first, with its error; a summary at
/// most every [`FAILURE_SUMMARY_PERIOD`]; recovery with the count). Reaching `eject_after`
/// wakes the service's health task, which decides on ejection. Atomics only; a success costs
/// one load.
#[derive(Debug)]
pub struct Health {
    /// Failures since the last success, and ejections in a row (see [`EJECTIONS_SHIFT`]).
    state: AtomicU64,
    /// When the last line about this endpoint was logged, in seconds of [`coarse_seconds`].
    reported: AtomicU64,
    /// Failures that wake `wake`; 0: never.
    eject_after: AtomicU32,
    wake: Arc<Notify>,
}

impl Default for Health {
    fn default() -> Self {
        Health::new(0, Arc::default())
    }
}

impl Health {
    pub fn new(eject_after: u32, wake: Arc<Notify>) -> Health {
        Health {
            state: AtomicU64::new(0),
            reported: AtomicU64::new(0),
            eject_after: AtomicU32::new(eject_after),
            wake,
        }
    }

    #[inline]
    pub fn succeeded(&self, addr: &UpstreamAddr) {
        if self.state.load(Ordering::Relaxed) != 0 {
            let failures = self.state.swap(0, Ordering::AcqRel) & FAILURES_MASK;
            if failures > 0 {
                info!(upstream = %addr, failures, "endpoint reachable again");
            }
        }
    }

    /// A connect attempt failed; `reason` is its metrics label (`connect_refused`...).
    pub fn failed(&self, addr: &UpstreamAddr, reason: &'static str, error: &dyn Display) {
        let failures = (self.state.fetch_add(1, Ordering::AcqRel) + 1) & FAILURES_MASK;
        let eject_after = self.eject_after.load(Ordering::Relaxed);
        if eject_after > 0 && failures >= u64::from(eject_after) {
            self.wake.notify_one();
        }
        let now = coarse_seconds();
        if failures == 1 {
            self.reported.store(now, Ordering::Relaxed);
            warn!(%error, upstream = %addr, reason, "connect failed; further failures of this endpoint are counted until it answers again");
            return;
        }
        let reported = self.reported.load(Ordering::Relaxed);
        if now >= reported + FAILURE_SUMMARY_PERIOD.as_secs()
            && self
                .reported
                .compare_exchange(reported, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            warn!(%error, upstream = %addr, reason, failures, "endpoint still failing");
        }
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u64 {
        self.state.load(Ordering::Relaxed) & FAILURES_MASK
    }

    /// Whether enough failures for an ejection have been seen.
    pub(crate) fn wants_ejection(&self) -> bool {
        let eject_after = self.eject_after.load(Ordering::Relaxed);
        eject_after > 0 && self.failures() >= u64::from(eject_after)
    }

    /// Ejections in a row, with no success since.
    pub fn ejections(&self) -> u32 {
        (self.state.load(Ordering::Relaxed) >> EJECTIONS_SHIFT) as u32
    }

    /// Starts an ejection: counts it and forgets the failures that caused it. Returns the
    /// ejections in a row, this one included.
    pub(crate) fn ejected(&self) -> u32 {
        let ejections = self.ejections().saturating_add(1);
        self.state
            .store(u64::from(ejections) << EJECTIONS_SHIFT, Ordering::Release);
        ejections
    }

    pub(crate) fn set_eject_after(&self, eject_after: u32) {
        self.eject_after.store(eject_after, Ordering::Relaxed);
    }
}

/// Seconds since the first call: a clock for the failure path only.
fn coarse_seconds() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs()
}

/// A point in time twice: for deciding (monotonic) and for showing (wall clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct At {
    pub instant: Instant,
    pub wall: SystemTime,
}

impl At {
    pub fn now() -> At {
        At {
            instant: Instant::now(),
            wall: SystemTime::now(),
        }
    }

    pub fn after(self, duration: Duration) -> At {
        At {
            instant: self.instant + duration,
            wall: self.wall + duration,
        }
    }
}

/// Why an endpoint is where it is, as of the snapshot that holds it.
#[derive(Debug, Clone, PartialEq)]
pub enum EndpointState {
    /// In rotation.
    Serving,
    /// Out of rotation after `failures` connect failures in a row, until `until`.
    Ejected {
        since: SystemTime,
        until: SystemTime,
        failures: u64,
        /// Ejections in a row, this one included (each doubles the time).
        ejections: u32,
    },
    /// Its active check fails.
    CheckFailing {
        since: SystemTime,
        error: Option<String>,
    },
    /// Discovery stopped listing it at `since`; it stays, while healthy, until `until`.
    HeldDown {
        since: SystemTime,
        until: SystemTime,
        /// Whether it is in rotation: only while its connects and check succeed.
        healthy: bool,
    },
    /// Discovery removed it; its connections run until `until` (`on_remove=drain`).
    Draining {
        since: SystemTime,
        until: SystemTime,
    },
    /// An operator drained it: no new connection, the open ones run on.
    Drained { since: SystemTime },
    /// An operator disabled it: no new connection, the open ones were reset.
    Disabled { since: SystemTime },
}

/// What an operator said about one endpoint; it holds across discovery updates until undone,
/// and whatever the panic threshold says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operator {
    /// No new connections; open ones finish.
    Drain,
    /// No new connections; open ones are reset.
    Disable,
}

impl Operator {
    pub fn as_str(self) -> &'static str {
        match self {
            Operator::Drain => "drain",
            Operator::Disable => "disable",
        }
    }
}

impl EndpointState {
    /// The API's and metrics' name of the state.
    pub fn as_str(&self) -> &'static str {
        match self {
            EndpointState::Serving => "serving",
            EndpointState::Ejected { .. } => "ejected",
            EndpointState::CheckFailing { .. } => "check_failing",
            EndpointState::HeldDown { .. } => "held_down",
            EndpointState::Draining { .. } => "draining",
            EndpointState::Drained { .. } => "drained",
            EndpointState::Disabled { .. } => "disabled",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejection_time_doubles_up_to_the_cap() {
        let policy = HealthPolicy::default();
        let times: Vec<u64> = (1..=8).map(|n| policy.ejection_time(n).as_secs()).collect();
        assert_eq!(times, vec![5, 10, 20, 40, 80, 120, 120, 120]);
        assert_eq!(policy.ejection_time(u32::MAX).as_secs(), 120);
    }

    #[test]
    fn shares() {
        let policy = HealthPolicy::default();
        assert_eq!(policy.max_ejected(1), 1, "one may always be ejected");
        assert_eq!(policy.max_ejected(3), 1);
        assert_eq!(policy.max_ejected(10), 5);
        assert!(!policy.panics(0, 0), "nothing to panic about");
        assert!(policy.panics(0, 1));
        assert!(!policy.panics(1, 2), "half is not below half");
        assert!(policy.panics(1, 3));
        assert!(!policy.panics(2, 3));
        let never = HealthPolicy {
            panic_threshold_percent: 0,
            ..HealthPolicy::default()
        };
        assert!(never.panics(0, 3), "none left: all, whatever the share");
        assert!(!never.panics(1, 3));
    }

    #[test]
    fn a_success_clears_failures_and_ejections() {
        let addr = UpstreamAddr::parse("127.0.0.1:1").expect("addr");
        let wake = Arc::new(Notify::new());
        let health = Health::new(2, Arc::clone(&wake));
        health.failed(&addr, "connect_refused", &"refused");
        assert!(!health.wants_ejection());
        health.failed(&addr, "connect_refused", &"refused");
        assert!(health.wants_ejection());
        assert_eq!(health.ejected(), 1);
        assert_eq!((health.failures(), health.ejections()), (0, 1));
        health.failed(&addr, "connect_refused", &"refused");
        health.failed(&addr, "connect_refused", &"refused");
        assert_eq!(health.ejected(), 2, "a second ejection in a row");
        health.succeeded(&addr);
        assert_eq!((health.failures(), health.ejections()), (0, 0));
    }
}
