//! The short scenarios of the fault suite (`bench/faults`, RELIABILITY.md), each asserting its
//! pass criteria. One at a time: they measure failures, so they must not share the machine
//! with each other.

use std::sync::Mutex;

use embassy_tests::faults::{self, Options};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn check(name: &str) {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let scenario = faults::scenario(name).expect("a scenario of the suite");
    assert!(
        scenario.in_tests,
        "{name} is not marked as short enough for the tests"
    );
    let report = faults::run(scenario, &Options::default());
    assert!(report.passed(), "{}", report.describe());
    eprintln!("{}", report.describe());
}

#[test]
fn endpoint_churn() {
    check("endpoint_churn");
}

#[test]
fn upstream_killed() {
    check("upstream_killed");
}

#[test]
fn fd_limit() {
    check("fd_limit");
}

#[test]
fn sigterm_under_load() {
    check("sigterm_under_load");
}

#[test]
fn stalled_log_pipe() {
    check("stalled_log_pipe");
}

/// Every scenario marked short enough has a test above.
#[test]
fn every_short_scenario_is_tested() {
    let tested = [
        "endpoint_churn",
        "upstream_killed",
        "fd_limit",
        "sigterm_under_load",
        "stalled_log_pipe",
    ];
    for scenario in faults::scenarios::ALL.iter().filter(|s| s.in_tests) {
        assert!(
            tested.contains(&scenario.name),
            "{} has no test",
            scenario.name
        );
    }
}
