//! Active checks against real servers the core's own tests cannot start: a real Redis.

use std::{sync::Weak, time::Duration};

use embassy_core::{
    check::{CheckKey, CheckParams, CheckSpec, CheckState, CheckStatus, Checks},
    endpoints::UpstreamAddr,
};
use embassy_tests::{eventually, Redis};

/// Waits (bounded) for `status` to be `state`; fails with what it saw.
fn wait_for(status: &CheckStatus, state: CheckState) {
    assert!(
        eventually(Duration::from_secs(20), || status.state() == state),
        "{} is {} after 20s, not {state}; {} checks, {} failed, last error {:?}",
        status.key().addr,
        status.state(),
        status.checks(),
        status.failures(),
        status.last_error()
    );
}

#[test]
fn send_expect_follows_a_real_redis() {
    let mut redis = Redis::start();
    // A runtime of the test's own, handed over as the host hands over its runtime.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let checks = Checks::new(Some(runtime.handle().clone()));
    let key = CheckKey {
        addr: UpstreamAddr::Socket(redis.addr()),
        spec: "send:PING,expect:PONG".parse::<CheckSpec>().expect("spec"),
        params: CheckParams {
            interval: Duration::from_millis(50),
            timeout: Duration::from_secs(5),
            rise: 2,
            fall: 2,
        },
    };
    let status = checks.subscribe(key, Weak::new());
    wait_for(&status, CheckState::Passing);
    assert_eq!(status.failures(), 0, "{:?}", status.last_error());

    redis.kill();
    wait_for(&status, CheckState::Failing);
    assert_eq!(status.last_error().as_deref(), Some("connect refused"));

    redis.restart();
    wait_for(&status, CheckState::Passing);

    // A command Redis refuses is an answer without the expected text.
    let wrong = checks.subscribe(
        CheckKey {
            spec: "send:NOSUCHCOMMAND,expect:PONG".parse().expect("spec"),
            ..status.key().clone()
        },
        Weak::new(),
    );
    wait_for(&wrong, CheckState::Failing);
    // Redis keeps the connection open after its error: the check judges what came by the
    // deadline, not silence.
    let error = wrong.last_error().unwrap_or_default();
    assert!(
        error.starts_with("reply did not contain \"PONG\": got \"-ERR unknown command"),
        "{error}"
    );
    assert_eq!(checks.running(), 2);
    drop((status, wrong));
    assert!(
        eventually(Duration::from_secs(20), || checks.running() == 0),
        "{} checkers still run",
        checks.running()
    );
}
