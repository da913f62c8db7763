//! When a watch resolves again and what each outcome does to the set: pure, so every rule
//! (TTL clamping, a failure keeping the last set, the NXDOMAIN hold) is table-tested here.

use std::time::{Duration, Instant};

use embassy_plugin_api::BackendHealth;

use crate::{config::Timing, records::Set};

/// What one resolution gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Records: the set they make, and the smallest TTL among them.
    Resolved { set: Set, ttl: Option<Duration> },
    /// The server says there is nothing (NXDOMAIN, or no record of the type), with the
    /// negative TTL of its SOA if it sent one.
    Missing {
        why: String,
        negative_ttl: Option<Duration>,
    },
    /// No usable answer: a timeout, SERVFAIL, REFUSED, an unreachable server.
    Failed(String),
}

/// What to do after an outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// A set to push (the sink drops it if it equals the last).
    pub set: Option<Set>,
    /// A state change to report.
    pub report: Option<(BackendHealth, String)>,
    pub next: Next,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Resolve again after this long (the server answered: the backoff starts over).
    After(Duration),
    /// Resolve again after the backoff's next wait.
    Retry,
}

/// What was last reported, so each state is reported once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Answering,
    Failing,
    /// The name is missing; the last set still serves.
    Holding,
    /// The name is missing; the set is empty.
    Empty,
}

/// One watch's memory between resolutions.
#[derive(Debug, Clone)]
pub struct Tracker {
    timing: Timing,
    name: String,
    /// Whether a set made of records was ever pushed.
    resolved: bool,
    /// When the run of "missing" answers began (reset by records, not by failures: only an
    /// answer says whether the name is still missing).
    missing_since: Option<Instant>,
    phase: Phase,
}

impl Tracker {
    pub fn new(name: &str, timing: Timing) -> Self {
        Tracker {
            timing,
            name: name.to_string(),
            resolved: false,
            missing_since: None,
            // The host assumes a reachable backend until told otherwise.
            phase: Phase::Answering,
        }
    }

    pub fn step(&mut self, outcome: Outcome, now: Instant) -> Step {
        match outcome {
            Outcome::Resolved { set, ttl } => {
                let report = match self.phase {
                    Phase::Answering => None,
                    Phase::Failing => Some("the dns server answers again".to_string()),
                    Phase::Holding | Phase::Empty => Some(format!("{} resolves again", self.name)),
                };
                self.resolved = true;
                self.missing_since = None;
                self.phase = Phase::Answering;
                Step {
                    set: Some(set),
                    report: report.map(|detail| (BackendHealth::Reachable, detail)),
                    next: Next::After(clamp(ttl, self.timing)),
                }
            }
            Outcome::Missing { why, negative_ttl } => {
                let again = clamp(negative_ttl, self.timing);
                let since = *self.missing_since.get_or_insert(now);
                let missing_for = now.saturating_duration_since(since);
                let hold = self.timing.nxdomain_hold;
                if self.resolved && missing_for < hold {
                    let detail = format!(
                        "{}: {why}; keeping the last endpoints until it has been missing for {hold:?}",
                        self.name
                    );
                    return Step {
                        set: None,
                        report: self.enter(Phase::Holding, BackendHealth::Invalid, detail),
                        // Look again by the end of the hold, to empty the set on time.
                        next: Next::After(again.min(hold - missing_for)),
                    };
                }
                let detail = if self.resolved {
                    format!("{}: {why} for {hold:?}; serving no endpoints", self.name)
                } else {
                    format!("{}: {why}; serving no endpoints", self.name)
                };
                Step {
                    set: Some((Vec::new(), Vec::new())),
                    report: self.enter(Phase::Empty, BackendHealth::Invalid, detail),
                    next: Next::After(again),
                }
            }
            Outcome::Failed(error) => {
                let detail = format!("{error}; retrying, keeping the last known endpoints");
                Step {
                    set: None,
                    report: self.enter(Phase::Failing, BackendHealth::Unreachable, detail),
                    next: Next::Retry,
                }
            }
        }
    }

    /// The report for entering `phase`, if it is a change.
    fn enter(
        &mut self,
        phase: Phase,
        health: BackendHealth,
        detail: String,
    ) -> Option<(BackendHealth, String)> {
        (std::mem::replace(&mut self.phase, phase) != phase).then_some((health, detail))
    }
}

/// The wait before the next resolution: the TTL (none: `min_ttl`) within
/// `[min_ttl, max_ttl]`; a TTL of 0 (do not cache) waits `min_ttl`.
pub fn clamp(ttl: Option<Duration>, timing: Timing) -> Duration {
    ttl.unwrap_or(timing.min_ttl)
        .clamp(timing.min_ttl, timing.max_ttl)
}

#[cfg(test)]
mod tests {
    use embassy_plugin_api::Endpoint;

    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn ttls_are_clamped() {
        let timing = Timing {
            min_ttl: secs(1),
            max_ttl: secs(300),
            nxdomain_hold: secs(30),
        };
        let check = |ttl: Option<Duration>, expected: Duration| {
            assert_eq!(clamp(ttl, timing), expected, "{ttl:?}");
        };
        check(Some(secs(60)), secs(60));
        check(Some(secs(0)), secs(1));
        check(Some(Duration::from_millis(200)), secs(1));
        check(Some(secs(86_400)), secs(300));
        check(None, secs(1));
    }

    /// Feeds `(at second, outcome)` to a tracker with a 10s hold; renders each step as
    /// `set=[addresses]|keep report=Health:detail|- next=...`.
    fn check(outcomes: &[(u64, Outcome)], expected: &[&str]) {
        let timing = Timing {
            min_ttl: secs(1),
            max_ttl: secs(60),
            nxdomain_hold: secs(10),
        };
        let mut tracker = Tracker::new("a.test", timing);
        let start = Instant::now();
        let steps: Vec<String> = outcomes
            .iter()
            .map(|(at, outcome)| {
                let step = tracker.step(outcome.clone(), start + secs(*at));
                let set = match step.set {
                    Some((endpoints, _)) => {
                        let addresses: Vec<&str> =
                            endpoints.iter().map(|e| e.address.as_str()).collect();
                        format!("set=[{}]", addresses.join(" "))
                    }
                    None => "keep".to_string(),
                };
                let report = match step.report {
                    Some((health, detail)) => format!("{health:?}:{detail}"),
                    None => "-".to_string(),
                };
                let next = match step.next {
                    Next::After(wait) => format!("{wait:?}"),
                    Next::Retry => "retry".to_string(),
                };
                format!("{set} {report} {next}")
            })
            .collect();
        assert_eq!(steps, expected);
    }

    fn resolved(addresses: &[&str], ttl: u64) -> Outcome {
        Outcome::Resolved {
            set: (
                addresses.iter().map(|a| Endpoint::new(*a)).collect(),
                Vec::new(),
            ),
            ttl: Some(secs(ttl)),
        }
    }

    fn missing() -> Outcome {
        Outcome::Missing {
            why: "NXDOMAIN".into(),
            negative_ttl: None,
        }
    }

    fn failed() -> Outcome {
        Outcome::Failed("request timed out".into())
    }

    #[test]
    fn answers_and_failures() {
        check(
            &[
                (0, resolved(&["127.0.0.2:80"], 5)),
                (5, resolved(&["127.0.0.3:80"], 120)),
                (65, failed()),
                (66, failed()),
                (68, resolved(&["127.0.0.3:80"], 0)),
            ],
            &[
                "set=[127.0.0.2:80] - 5s",
                "set=[127.0.0.3:80] - 60s",
                "keep Unreachable:request timed out; retrying, keeping the last known endpoints retry",
                "keep - retry",
                "set=[127.0.0.3:80] Reachable:the dns server answers again 1s",
            ],
        );
    }

    #[test]
    fn nxdomain_is_held_then_empties() {
        check(
            &[
                (0, resolved(&["127.0.0.2:80"], 1)),
                (1, missing()),
                (2, missing()),
                // A failure in the hold neither ends nor restarts it.
                (3, failed()),
                (9, missing()),
                (11, missing()),
                (12, missing()),
                (13, resolved(&["127.0.0.2:80"], 1)),
            ],
            &[
                "set=[127.0.0.2:80] - 1s",
                "keep Invalid:a.test: NXDOMAIN; keeping the last endpoints until it has been missing for 10s 1s",
                "keep - 1s",
                "keep Unreachable:request timed out; retrying, keeping the last known endpoints retry",
                "keep Invalid:a.test: NXDOMAIN; keeping the last endpoints until it has been missing for 10s 1s",
                "set=[] Invalid:a.test: NXDOMAIN for 10s; serving no endpoints 1s",
                "set=[] - 1s",
                "set=[127.0.0.2:80] Reachable:a.test resolves again 1s",
            ],
        );
    }

    #[test]
    fn the_hold_ends_on_time_and_restarts_after_records() {
        let long_negative = Outcome::Missing {
            why: "no records".into(),
            negative_ttl: Some(secs(3600)),
        };
        check(
            &[
                (0, resolved(&["127.0.0.2:80"], 1)),
                (4, long_negative.clone()),
                (8, long_negative.clone()),
                (9, resolved(&["127.0.0.2:80"], 1)),
                (10, missing()),
            ],
            &[
                "set=[127.0.0.2:80] - 1s",
                // The negative TTL is clamped, and the next look is by the hold's end.
                "keep Invalid:a.test: no records; keeping the last endpoints until it has been missing for 10s 10s",
                "keep - 6s",
                "set=[127.0.0.2:80] Reachable:a.test resolves again 1s",
                "keep Invalid:a.test: NXDOMAIN; keeping the last endpoints until it has been missing for 10s 1s",
            ],
        );
    }

    #[test]
    fn a_name_never_resolved_starts_empty() {
        check(
            &[
                (0, failed()),
                (1, missing()),
                (2, missing()),
                (3, resolved(&["127.0.0.2:80"], 1)),
            ],
            &[
                "keep Unreachable:request timed out; retrying, keeping the last known endpoints retry",
                "set=[] Invalid:a.test: NXDOMAIN; serving no endpoints 1s",
                "set=[] - 1s",
                "set=[127.0.0.2:80] Reachable:a.test resolves again 1s",
            ],
        );
    }
}
