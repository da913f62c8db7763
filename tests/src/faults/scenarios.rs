//! The scenarios. Each sets up real parts on loopback (Embassy, echo upstreams, etcd, a
//! private dockerd), runs checked traffic through Embassy while it breaks one thing, and
//! records every pass criterion with [`Report::check`]: the criterion's text is what
//! RELIABILITY.md lists.

use std::{
    io::{Read, Write},
    net::TcpStream,
    os::fd::AsRawFd,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::*;
use crate::{
    docker::{wait_accepting_in_netns_of, PrivateEngine},
    etcd::{Etcd, EtcdCluster},
    free_port,
};

/// Bound of every start-up wait (Embassy serving, an endpoint showing up).
const WAIT: Duration = Duration::from_secs(30);

pub const ALL: &[Scenario] = &[
    Scenario {
        name: "endpoint_churn",
        about: "file discovery: an endpoint added and removed every 100 ms under traffic",
        in_tests: true,
        run: endpoint_churn,
    },
    Scenario {
        name: "endpoint_churn_etcd",
        about: "etcd discovery: an instance key put and deleted every 100 ms under traffic",
        in_tests: false,
        run: endpoint_churn_etcd,
    },
    Scenario {
        name: "etcd_killed",
        about: "etcd SIGKILLed under traffic, restarted, then a new instance registered",
        in_tests: false,
        run: etcd_killed,
    },
    Scenario {
        name: "etcd_leader_loss",
        about: "3-member etcd: the leader SIGKILLed under traffic, then a new instance registered",
        in_tests: false,
        run: etcd_leader_loss,
    },
    Scenario {
        name: "upstream_killed",
        about: "one of three upstreams killed (listener and connections) under traffic",
        in_tests: true,
        run: upstream_killed,
    },
    Scenario {
        name: "hung_upstream",
        about: "open-file limit 256: 150 clients give up on an upstream that never answers, a healthy service beside it",
        in_tests: false,
        run: hung_upstream,
    },
    Scenario {
        name: "dockerd_restart",
        about: "a private dockerd (live restore) stopped and started under traffic, then a container started",
        in_tests: false,
        run: dockerd_restart,
    },
    Scenario {
        name: "fd_limit",
        about: "open-file limit 128 reached by held connections under traffic, then released",
        in_tests: true,
        run: fd_limit,
    },
    Scenario {
        name: "idle_5000",
        about: "5,000 idle connections held, checked after the hold, new connections beside them",
        in_tests: false,
        run: idle_5000,
    },
    Scenario {
        name: "sigterm_under_load",
        about: "SIGTERM (grace 1 s) with connections in flight and three outlasting the grace",
        in_tests: true,
        run: sigterm_under_load,
    },
    Scenario {
        name: "stalled_log_pipe",
        about: "stderr on a pipe nobody reads, filled, then traffic to a healthy service",
        in_tests: true,
        run: stalled_log_pipe,
    },
];

/// Polls `condition` until it holds (the instant it did) or `timeout` passes.
fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return Some(Instant::now());
        }
        if Instant::now() > deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

fn ms(from: Instant, to: Instant) -> u64 {
    to.saturating_duration_since(from).as_millis() as u64
}

fn web(port: u16) -> Vec<String> {
    vec![format!("web;{port}/tcp")]
}

fn check_no_failures(report: &mut Report, criterion: &str) {
    let tally = report.tally;
    report.check(criterion, tally.failed() == 0, tally.failures());
}

fn check_ran(report: &mut Report, least: usize) {
    let attempted = report.tally.attempted;
    report.check(
        format!("traffic ran (at least {least} connections)"),
        attempted >= least,
        format!("{attempted} attempted"),
    );
}

// --- endpoint churn ---------------------------------------------------------------------------

fn endpoint_churn(options: &Options, report: &mut Report) -> Result<()> {
    let (a, b, c) = (
        FaultUpstream::echo("a")?,
        FaultUpstream::echo("b")?,
        FaultUpstream::echo("c")?,
    );
    let port = free_port();
    let stable = vec![a.endpoint(), b.endpoint()];
    let services = web(port);
    let proxy = Proxy::start(
        Launch {
            services_file: json!({ "web": stable }),
            services: &services,
            ..Launch::default()
        },
        options,
    )?;
    wait_serving(port, WAIT)?;
    churn(options, report, port, &c, |present| {
        let mut list = stable.clone();
        if present {
            list.push(c.endpoint());
        }
        write_services(&proxy.services, &json!({ "web": list }));
        Ok(())
    })?;
    report.figure(
        "endpoint_updates_logged",
        proxy.embassy.log_lines("endpoints updated").len(),
    );
    Ok(())
}

fn endpoint_churn_etcd(options: &Options, report: &mut Report) -> Result<()> {
    let etcd = Etcd::start();
    let (a, b, c) = (
        FaultUpstream::echo("a")?,
        FaultUpstream::echo("b")?,
        FaultUpstream::echo("c")?,
    );
    etcd.put("/services/faults/web/a", &a.endpoint());
    etcd.put("/services/faults/web/b", &b.endpoint());
    let port = free_port();
    let services = vec![format!("/services/faults/web;{port}/tcp")];
    let proxy = Proxy::start(
        Launch {
            discovery: Some(etcd.uri()),
            services: &services,
            ..Launch::default()
        },
        options,
    )?;
    wait_serving(port, WAIT)?;
    churn(options, report, port, &c, |present| {
        if present {
            etcd.put("/services/faults/web/c", &c.endpoint());
        } else {
            etcd.delete("/services/faults/web/c");
        }
        Ok(())
    })?;
    report.figure(
        "endpoint_updates_logged",
        proxy.embassy.log_lines("endpoints updated").len(),
    );
    Ok(())
}

/// Traffic through `port` while `set(present)` adds and removes `churned` every 100 ms.
fn churn(
    options: &Options,
    report: &mut Report,
    port: u16,
    churned: &FaultUpstream,
    mut set: impl FnMut(bool) -> Result<()>,
) -> Result<()> {
    let duration = options.scaled(Duration::from_secs(3));
    let traffic = Traffic::start(Load {
        max_time: duration + Duration::from_secs(2),
        max_attempts: options.count(10_000),
        ..Load::new(port)
    });
    let end = Instant::now() + duration;
    let mut changes = 0usize;
    while Instant::now() < end {
        thread::sleep(Duration::from_millis(100));
        set(changes.is_multiple_of(2))?;
        changes += 1;
    }
    let attempts = traffic.finish();
    report.tally = Tally::of(&attempts);
    let counts = per_upstream(&attempts);
    report.figure("changes", changes);
    report.figure("per_upstream", json!(counts));
    check_no_failures(
        report,
        "no connection fails while an endpoint is added and removed every 100 ms",
    );
    let served = counts.get(&churned.name).copied().unwrap_or(0);
    report.check(
        "the churned endpoint is served (the changes reach the data path)",
        served > 0,
        format!("{served} connections to it"),
    );
    check_ran(report, 100);
    Ok(())
}

// --- etcd outages -----------------------------------------------------------------------------

fn etcd_killed(options: &Options, report: &mut Report) -> Result<()> {
    let mut etcd = Etcd::start();
    let (a, b, c) = (
        FaultUpstream::echo("a")?,
        FaultUpstream::echo("b")?,
        FaultUpstream::echo("c")?,
    );
    etcd.put("/services/faults/web/a", &a.endpoint());
    etcd.put("/services/faults/web/b", &b.endpoint());
    let port = free_port();
    let services = vec![format!("/services/faults/web;{port}/tcp")];
    let proxy = Proxy::start(
        Launch {
            discovery: Some(etcd.uri()),
            services: &services,
            ..Launch::default()
        },
        options,
    )?;
    wait_serving(port, WAIT)?;
    let outage = options.scaled(Duration::from_secs(3));
    let traffic = Traffic::start(Load {
        max_time: outage + WAIT + Duration::from_secs(5),
        max_attempts: options.count(20_000),
        ..Load::new(port)
    });
    thread::sleep(Duration::from_secs(1));
    let killed = Instant::now();
    etcd.stop();
    thread::sleep(outage);
    etcd.restart();
    let back = Instant::now();
    etcd.put("/services/faults/web/c", &c.endpoint());
    let served = wait_until(WAIT, || c.accepted() > 0);
    thread::sleep(Duration::from_secs(1));
    let attempts = traffic.finish();
    report.tally = Tally::of(&attempts);
    report.recovery = Some(Recovery::of(&attempts, back));
    report.figure("outage_ms", ms(killed, back));
    report.figure("per_upstream", json!(per_upstream(&attempts)));
    report.figure(
        "etcd_state_lines",
        proxy.embassy.log_lines("etcd").len() as u64,
    );
    check_no_failures(
        report,
        "no connection fails while etcd is down and after it returns",
    );
    report.check(
        "an instance registered after the restart is served within 30 s",
        served.is_some(),
        match served {
            Some(at) => format!("served {} ms after etcd answered again", ms(back, at)),
            None => "never served".into(),
        },
    );
    if let Some(at) = served {
        report.figure("discovery_catch_up_ms", ms(back, at));
    }
    check_ran(report, 100);
    Ok(())
}

fn etcd_leader_loss(options: &Options, report: &mut Report) -> Result<()> {
    let mut cluster = EtcdCluster::start(3)?;
    let (a, b, c) = (
        FaultUpstream::echo("a")?,
        FaultUpstream::echo("b")?,
        FaultUpstream::echo("c")?,
    );
    cluster.put("/services/faults/web/a", &a.endpoint())?;
    cluster.put("/services/faults/web/b", &b.endpoint())?;
    let port = free_port();
    let services = vec![format!("/services/faults/web;{port}/tcp")];
    let proxy = Proxy::start(
        Launch {
            discovery: Some(cluster.uri()),
            services: &services,
            ..Launch::default()
        },
        options,
    )?;
    wait_serving(port, WAIT)?;
    let traffic = Traffic::start(Load {
        max_time: options.scaled(Duration::from_secs(3)) + WAIT * 2,
        max_attempts: options.count(20_000),
        ..Load::new(port)
    });
    thread::sleep(options.scaled(Duration::from_secs(1)));
    let leader = cluster.leader(Duration::from_secs(10))?;
    let lines_before = proxy.embassy.log().len();
    let killed = Instant::now();
    cluster[leader].stop();
    let new_leader = cluster.leader(WAIT)?;
    let elected = Instant::now();
    cluster.put("/services/faults/web/c", &c.endpoint())?;
    let served = wait_until(WAIT, || c.accepted() > 0);
    thread::sleep(options.scaled(Duration::from_secs(2)));
    let attempts = traffic.finish();
    report.tally = Tally::of(&attempts);
    report.recovery = Some(Recovery::of(&attempts, elected));
    report.figure("killed_member", cluster[leader].member());
    report.figure("new_leader", cluster[new_leader].member());
    report.figure("election_ms", ms(killed, elected));
    report.figure("per_upstream", json!(per_upstream(&attempts)));
    let lines = proxy.embassy.log();
    report.figure(
        "log_lines_after_loss",
        json!(lines[lines_before.min(lines.len())..]),
    );
    check_no_failures(
        report,
        "no connection fails while the etcd leader is lost and a new one elected",
    );
    report.check(
        "an instance registered after the leader's loss is served within 30 s",
        served.is_some(),
        match served {
            Some(at) => format!("served {} ms after the leader was killed", ms(killed, at)),
            None => "never served".into(),
        },
    );
    if let Some(at) = served {
        report.figure("discovery_catch_up_ms", ms(killed, at));
    }
    check_ran(report, 100);
    Ok(())
}

// --- an upstream killed -----------------------------------------------------------------------

fn upstream_killed(options: &Options, report: &mut Report) -> Result<()> {
    let mut a = FaultUpstream::echo("a")?;
    let (b, c) = (FaultUpstream::echo("b")?, FaultUpstream::echo("c")?);
    let port = free_port();
    let services = web(port);
    let proxy = Proxy::start(
        Launch {
            services_file: json!({ "web": [a.endpoint(), b.endpoint(), c.endpoint()] }),
            services: &services,
            ..Launch::default()
        },
        options,
    )?;
    wait_serving(port, WAIT)?;
    // Connections of ~60 ms, so some are in flight on the upstream when it dies.
    let exchange = Exchange {
        rounds: 4,
        size: 256,
        pause: Duration::from_millis(20),
        timeout: Duration::from_secs(2),
    };
    let after = options.scaled(Duration::from_secs(2));
    let traffic = Traffic::start(Load {
        exchange,
        pause: Duration::from_millis(2),
        max_time: after + Duration::from_secs(5),
        max_attempts: options.count(10_000),
        ..Load::new(port)
    });
    thread::sleep(Duration::from_secs(1));
    let lines_before = proxy.embassy.log().len();
    let kill_start = Instant::now();
    a.kill()?;
    let killed = Instant::now();
    thread::sleep(after);
    let attempts = traffic.finish();
    report.tally = Tally::of(&attempts);
    report.recovery = Some(Recovery::of(&attempts, killed));

    let in_flight: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.start < killed && a.end > kill_start)
        .collect();
    let failed_in_flight = in_flight.iter().filter(|a| !a.ok()).count();
    let started_after: Vec<&Attempt> = attempts.iter().filter(|a| a.start >= killed).collect();
    let after_tally = Tally::of(started_after.iter().copied());
    report.figure("in_flight_at_kill", in_flight.len());
    report.figure("failed_in_flight", failed_in_flight);
    report.check(
        "no connection started after the kill fails (the dead endpoint is skipped)",
        after_tally.failed() == 0,
        after_tally.failures(),
    );
    report.check(
        "only connections in flight at the kill fail",
        report.tally.failed() <= failed_in_flight,
        format!(
            "{} failed, {failed_in_flight} of {} in flight",
            report.tally.failed(),
            in_flight.len()
        ),
    );
    let lines = proxy.embassy.log();
    let dead = a.endpoint();
    let about_dead = lines[lines_before.min(lines.len())..]
        .iter()
        .filter(|l| l.contains(&dead))
        .count();
    report.figure("log_lines_naming_dead_endpoint", about_dead);
    report.check(
        "at most 10 log lines name the dead endpoint (one per state change or rate-limited, not one per connection)",
        about_dead <= 10,
        format!("{about_dead} lines"),
    );
    let counts = per_upstream(started_after.iter().copied());
    let (nb, nc) = (
        counts.get("b").copied().unwrap_or(0),
        counts.get("c").copied().unwrap_or(0),
    );
    report.figure("after_kill_per_upstream", json!(counts));
    let ratio = nb.max(nc) as f64 / nb.min(nc).max(1) as f64;
    report.check(
        "failover spreads over the survivors (the busier takes at most 1.5 times the other's connections)",
        nb > 0 && nc > 0 && ratio <= 1.5,
        format!("b {nb}, c {nc} (ratio {ratio:.2})"),
    );
    check_ran(report, 100);
    Ok(())
}

// --- a hung upstream under a low open-file limit ----------------------------------------------

fn hung_upstream(options: &Options, report: &mut Report) -> Result<()> {
    const CLIENTS: usize = 150;
    let bound = Duration::from_secs(40);
    let hung = FaultUpstream::hung("hung")?;
    let healthy = FaultUpstream::echo("web")?;
    let (hung_port, web_port) = (free_port(), free_port());
    let services = vec![
        format!("hung;{hung_port}/tcp"),
        format!("web;{web_port}/tcp"),
    ];
    let proxy = Proxy::start(
        Launch {
            services_file: json!({ "hung": [hung.endpoint()], "web": [healthy.endpoint()] }),
            services: &services,
            nofile: Some(256),
            ..Launch::default()
        },
        options,
    )?;
    wait_serving(web_port, WAIT)?;
    let pid = proxy.embassy.pid();
    let baseline = descriptors(pid);
    // Eight clients at a time: a healthy service needs some descriptors of its own.
    let traffic = Traffic::start(Load {
        workers: 8,
        pause: Duration::from_millis(10),
        max_time: bound + Duration::from_secs(10),
        max_attempts: 50_000,
        ..Load::new(web_port)
    });
    thread::sleep(Duration::from_millis(500));

    // 150 clients of the hung service, each giving up after 1 s without an answer.
    let fault_start = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        if let Ok(mut stream) = TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], hung_port)),
            Duration::from_secs(1),
        ) {
            let _ = stream.write_all(b"hello?\n");
            clients.push(stream);
        }
    }
    thread::sleep(Duration::from_secs(1));
    let mut answered = 0;
    for stream in &mut clients {
        let _ = stream.set_nonblocking(true);
        if matches!(stream.read(&mut [0u8; 16]), Ok(n) if n > 0) {
            answered += 1;
        }
    }
    let peak = descriptors(pid);
    let connected = clients.len();
    drop(clients);
    let gave_up = Instant::now();

    // Until the descriptors are back and the healthy service has served 2 s without a failure.
    let mut released = None;
    let deadline = gave_up + bound;
    while Instant::now() < deadline {
        if released.is_none() && descriptors(pid) <= baseline + 10 {
            released = Some(Instant::now());
        }
        let steady = Recovery::of(&traffic.so_far(), gave_up).steady;
        if let (Some(_), Some(steady)) = (released, steady) {
            if Instant::now() > gave_up + steady + Duration::from_secs(2) {
                break;
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
    let end_descriptors = descriptors(pid);
    let attempts = traffic.finish();
    report.tally = Tally::of(&attempts);
    let recovery = Recovery::of(&attempts, gave_up);
    report.recovery = Some(recovery);
    let during = Tally::of(
        attempts
            .iter()
            .filter(|a| a.start >= fault_start && a.start < gave_up),
    );
    report.figure("hung_clients_connected", connected);
    report.figure("healthy_during_fault", during.failures());
    report.figure("descriptors_baseline", baseline);
    report.figure("descriptors_peak", peak);
    report.figure("descriptors_end", end_descriptors);
    if let Some(at) = released {
        report.figure("descriptors_released_ms", ms(gave_up, at));
    }
    report.check(
        "the hung upstream never answered (the scenario is what it says)",
        answered == 0,
        format!("{answered} answered"),
    );
    report.check(
        "Embassy releases the abandoned connections' descriptors within 40 s (back to baseline + 10)",
        released.is_some(),
        format!("baseline {baseline}, peak {peak}, end {end_descriptors}"),
    );
    report.check(
        "the healthy service serves steadily again within 40 s of the hung clients giving up",
        recovery.steady.is_some_and(|d| d <= bound),
        format!(
            "steady after {}; {} while the clients waited",
            millis(recovery.steady),
            during.failures()
        ),
    );
    Ok(())
}

// --- a private dockerd restarted --------------------------------------------------------------

fn dockerd_restart(options: &Options, report: &mut Report) -> Result<()> {
    let mut private = match PrivateEngine::start() {
        Ok(private) => private,
        Err(error) => {
            report.skipped = Some(format!("a private dockerd cannot run here: {error:#}"));
            return Ok(());
        }
    };
    let engine = private.admin.clone();
    let busybox = engine.busybox_image().context("busybox image")?;
    let upstream = FaultUpstream::echo("web")?;
    let app = |name: &str| {
        engine.run(
            name,
            &[
                "--net",
                "none",
                "-e",
                "BACKEND_WEB=web;8080/tcp",
                &busybox,
                "sleep",
                "600",
            ],
        )
    };
    let stays = app("faults-stays")?;
    let stays_pid = stays.pid()?;
    let uri = private.public_uri();
    let _proxy = Proxy::start(
        Launch {
            services_file: json!({ "web": [upstream.endpoint()] }),
            extra: &["--docker", &uri, "--mode", "host"],
            ..Launch::default()
        },
        options,
    )?;
    wait_accepting_in_netns_of(stays_pid, 8080, WAIT)?;
    let traffic = Traffic::start(Load {
        workers: 2,
        netns: Some(stays_pid),
        max_time: options.scaled(Duration::from_secs(4)) + WAIT * 3,
        max_attempts: options.count(20_000),
        ..Load::new(8080)
    });
    thread::sleep(Duration::from_secs(1));
    let down = Instant::now();
    private.stop_daemon()?;
    thread::sleep(options.scaled(Duration::from_secs(2)));
    private.start_daemon(true)?;
    let up = Instant::now();
    let arrives = app("faults-arrives")?;
    let started = Instant::now();
    let arrives_pid = arrives.pid()?;
    let served = wait_accepting_in_netns_of(arrives_pid, 8080, WAIT).ok();
    thread::sleep(Duration::from_secs(1));
    let attempts = traffic.finish();
    report.tally = Tally::of(&attempts);
    report.recovery = Some(Recovery::of(&attempts, up));
    report.figure("engine_down_ms", ms(down, up));
    check_no_failures(
        report,
        "no connection of the container kept through the restart fails",
    );
    report.check(
        "a container started right after the engine returned is served within 500 ms of its start",
        served.is_some_and(|at| at <= started + Duration::from_millis(500)),
        match served {
            Some(at) => format!(
                "served {} ms after its start, {} ms after the engine answered",
                ms(started, at),
                ms(up, at)
            ),
            None => "never served".into(),
        },
    );
    if let Some(at) = served {
        report.figure("catch_up_ms", ms(started, at));
        report.figure("engine_back_to_served_ms", ms(up, at));
    }
    check_ran(report, 50);
    Ok(())
}

// --- the open-file limit reached and released -------------------------------------------------

fn fd_limit(options: &Options, report: &mut Report) -> Result<()> {
    let upstream = FaultUpstream::echo("web")?;
    let port = free_port();
    let services = web(port);
    let proxy = Proxy::start(
        Launch {
            services_file: json!({ "web": [upstream.endpoint()] }),
            services: &services,
            nofile: Some(128),
            ..Launch::default()
        },
        options,
    )?;
    wait_serving(port, WAIT)?;
    let pid = proxy.embassy.pid();
    let baseline = descriptors(pid);
    let traffic = Traffic::start(Load {
        workers: 2,
        pause: Duration::from_millis(10),
        exchange: Exchange::SHORT.timeout(Duration::from_secs(1)),
        max_time: options.scaled(Duration::from_secs(2)) + Duration::from_secs(20),
        max_attempts: options.count(10_000),
        ..Load::new(port)
    });
    thread::sleep(Duration::from_millis(300));
    let lines_before = proxy.embassy.log().len();
    let mut held = Vec::new();
    let mut stopped_by = None;
    for seed in 0..200u64 {
        match Held::open(port, 1_000_000 + seed, Duration::from_secs(1)) {
            Ok(connection) => held.push(connection),
            Err(failure) => {
                stopped_by = Some(failure);
                break;
            }
        }
    }
    let full = Instant::now();
    let full_descriptors = descriptors(pid);
    thread::sleep(options.scaled(Duration::from_secs(2)));
    let held_count = held.len();
    drop(held);
    let released = Instant::now();
    thread::sleep(Duration::from_secs(2));
    let attempts = traffic.finish();
    report.tally = Tally::of(&attempts);
    let recovery = Recovery::of(&attempts, released);
    report.recovery = Some(recovery);
    let during = Tally::of(
        attempts
            .iter()
            .filter(|a| a.start >= full && a.start < released),
    );
    let lines = proxy.embassy.log();
    let warned = warnings(&lines[lines_before.min(lines.len())..]).len();
    report.figure("held_connections", held_count);
    report.figure("descriptors_baseline", baseline);
    report.figure("descriptors_full", full_descriptors);
    report.figure("during_limit", during.failures());
    report.figure("warn_lines", warned);
    report.check(
        "the limit is reached (a new connection fails while the others are held)",
        stopped_by.is_some(),
        match stopped_by {
            Some(failure) => format!("{held_count} held, the next one: {failure:?}"),
            None => format!("{held_count} held without failing"),
        },
    );
    report.check(
        "steady service within 2 s of the descriptors being released",
        recovery.steady.is_some_and(|d| d <= Duration::from_secs(2)),
        format!("steady after {}", millis(recovery.steady)),
    );
    report.check(
        "at most 10 warning lines from the limit on (one per state change or rate-limited, not one per accept)",
        warned <= 10,
        format!("{warned} lines"),
    );
    Ok(())
}

// --- 5,000 idle connections -------------------------------------------------------------------

fn idle_5000(options: &Options, report: &mut Report) -> Result<()> {
    const IDLE: usize = 5000;
    const THREADS: usize = 4;
    // Here: the client end and the upstream end of each; in Embassy: two per connection.
    let (soft, hard) = raise_own_open_file_limit();
    let need = 2 * IDLE as u64 + 1000;
    report.figure("open_file_limit", json!({ "soft": soft, "hard": hard }));
    if soft < need {
        report.skipped = Some(format!(
            "the open-file limit is {soft} (hard {hard}); {IDLE} idle connections need {need} \
             here and in Embassy: raise it (ulimit -n)"
        ));
        return Ok(());
    }
    let upstream = FaultUpstream::echo("web")?;
    let port = free_port();
    let services = web(port);
    let proxy = Proxy::start(
        Launch {
            services_file: json!({ "web": [upstream.endpoint()] }),
            services: &services,
            ..Launch::default()
        },
        options,
    )?;
    wait_serving(port, WAIT)?;
    let pid = proxy.embassy.pid();
    let rss_before = rss_kib(pid).unwrap_or(0);
    let opening = Instant::now();
    let openers: Vec<_> = (0..THREADS)
        .map(|t| {
            thread::spawn(move || {
                let mut held = Vec::new();
                let mut tally = Tally::default();
                for i in 0..IDLE / THREADS {
                    let seed = 2_000_000 + (t * IDLE + i) as u64;
                    match Held::open(port, seed, Duration::from_secs(5)) {
                        Ok(connection) => {
                            tally.count(Ok(()));
                            held.push(connection);
                        }
                        Err(failure) => tally.count(Err(failure)),
                    }
                }
                (held, tally)
            })
        })
        .collect();
    let mut held = Vec::new();
    let mut opened = Tally::default();
    for opener in openers {
        let (connections, tally) = opener
            .join()
            .map_err(|_| anyhow::anyhow!("opener panicked"))?;
        held.extend(connections);
        opened.add(&tally);
    }
    let open_ms = opening.elapsed().as_millis() as u64;
    let idle_descriptors = descriptors(pid);
    let rss_idle = rss_kib(pid).unwrap_or(0);
    // New connections beside them during the hold.
    let hold = options.scaled(Duration::from_secs(2));
    let fresh = Traffic::start(Load {
        workers: 2,
        max_attempts: 200,
        max_time: hold + Duration::from_secs(10),
        pause: Duration::from_millis(5),
        ..Load::new(port)
    });
    thread::sleep(hold);
    let fresh = fresh.join();
    let mut rechecked = Tally::default();
    for connection in &mut held {
        rechecked.count(connection.check(1));
    }
    drop(held);
    let fresh_tally = Tally::of(&fresh);
    let mut tally = opened;
    tally.add(&fresh_tally);
    report.tally = tally;
    report.figure("open_ms", open_ms);
    report.figure("embassy_descriptors_idle", idle_descriptors);
    report.figure("embassy_rss_kib_before", rss_before);
    report.figure("embassy_rss_kib_idle", rss_idle);
    report.figure(
        "embassy_bytes_per_idle_connection",
        rss_idle.saturating_sub(rss_before) * 1024 / IDLE as u64,
    );
    report.check(
        format!("all {IDLE} idle connections open and echo"),
        opened.ok == IDLE,
        opened.failures(),
    );
    report.check(
        format!("all {IDLE} still echo after the hold"),
        rechecked.ok == IDLE,
        rechecked.failures(),
    );
    report.check(
        "every new connection beside them succeeds",
        fresh_tally.failed() == 0 && fresh_tally.attempted == 200,
        fresh_tally.failures(),
    );
    Ok(())
}

// --- SIGTERM under load -----------------------------------------------------------------------

fn sigterm_under_load(options: &Options, report: &mut Report) -> Result<()> {
    const LONG: usize = 3;
    let grace = Duration::from_secs(1);
    let (a, b) = (FaultUpstream::echo("a")?, FaultUpstream::echo("b")?);
    let port = free_port();
    let services = web(port);
    let mut proxy = Proxy::start(
        Launch {
            services_file: json!({ "web": [a.endpoint(), b.endpoint()] }),
            services: &services,
            extra: &["--grace-period", "1s"],
            ..Launch::default()
        },
        options,
    )?;
    wait_serving(port, WAIT)?;
    // Connections of ~100 ms: well inside the grace period.
    let exchange = Exchange {
        rounds: 5,
        size: 256,
        pause: Duration::from_millis(20),
        timeout: Duration::from_secs(3),
    };
    let traffic = Traffic::start(Load {
        exchange,
        pause: Duration::from_millis(2),
        max_time: options.scaled(Duration::from_secs(1)) + Duration::from_secs(8),
        max_attempts: options.count(10_000),
        ..Load::new(port)
    });
    // Connections that outlast the grace period: one echo every 100 ms.
    let long: Vec<_> = (0..LONG as u64)
        .map(|i| {
            thread::spawn(move || -> Result<Failure, Failure> {
                let mut held = Held::open(port, 3_000_000 + i, Duration::from_secs(3))?;
                let deadline = Instant::now() + Duration::from_secs(10);
                for round in 1.. {
                    thread::sleep(Duration::from_millis(100));
                    if let Err(failure) = held.check(round) {
                        return Ok(failure);
                    }
                    if Instant::now() > deadline {
                        break;
                    }
                }
                Err(Failure::Other)
            })
        })
        .collect();
    thread::sleep(options.scaled(Duration::from_secs(1)));
    let stop = Instant::now();
    proxy.embassy.signal(libc::SIGTERM);
    // A few new connections after the stop (refused), then each worker ends its own.
    thread::sleep(Duration::from_millis(50));
    let attempts = traffic.finish();
    let status = proxy.embassy.wait_exit(grace + Duration::from_secs(5));
    let exited = Instant::now();
    let long: Vec<Result<Failure, Failure>> = long
        .into_iter()
        .map(|t| t.join().unwrap_or(Err(Failure::Other)))
        .collect();
    report.tally = Tally::of(&attempts);

    let accepted: Vec<&Attempt> = attempts.iter().filter(|a| a.greeted.is_some()).collect();
    let cut = Tally::of(accepted.iter().copied().filter(|a| !a.ok()));
    let in_flight = accepted
        .iter()
        .filter(|a| a.greeted.is_some_and(|g| g < stop) && a.end > stop)
        .count();
    let refused_after = attempts
        .iter()
        .filter(|a| a.start > stop && a.result == Err(Failure::Refused))
        .count();
    let unaccepted = Tally::of(
        attempts
            .iter()
            .filter(|a| a.greeted.is_none() && a.start <= stop && !a.ok()),
    );
    report.figure("in_flight_at_stop", in_flight);
    report.figure("refused_after_stop", refused_after);
    report.figure("not_accepted_before_stop", unaccepted.failures());
    report.figure(
        "long_connections_ended_by",
        json!(long.iter().map(|r| format!("{r:?}")).collect::<Vec<_>>()),
    );
    report.check(
        "some connections were in flight at the SIGTERM (the scenario tests something)",
        in_flight > 0,
        format!("{in_flight} in flight"),
    );
    report.check(
        "every connection Embassy accepted completes its exchange (none cut, reset or short)",
        cut.attempted == 0,
        format!("{} of {} accepted were cut", cut.attempted, accepted.len()),
    );
    let reset = long.iter().filter(|r| **r == Ok(Failure::Reset)).count();
    report.check(
        "connections still open when the grace period ends are cut with a reset, not a clean end of stream",
        reset == LONG,
        format!("{reset} of {LONG} reset: {long:?}"),
    );
    let exit_ms = ms(stop, exited);
    report.figure("exit_ms", exit_ms);
    match status {
        Ok(status) => report.check(
            "exits 0 within the grace period + 2 s",
            status.success() && exited <= stop + grace + Duration::from_secs(2),
            format!("{status} after {exit_ms} ms"),
        ),
        Err(error) => report.check(
            "exits 0 within the grace period + 2 s",
            false,
            format!("{error:#}"),
        ),
    }
    check_ran(report, 20);
    Ok(())
}

// --- a stalled log pipe -----------------------------------------------------------------------

fn stalled_log_pipe(options: &Options, report: &mut Report) -> Result<()> {
    const HEALTHY: usize = 200;
    let upstream = FaultUpstream::echo("web")?;
    let port = free_port();
    let services = web(port);
    // Debug logging: a line per connection fills the pipe quickly.
    let launch = Launch {
        services_file: json!({ "web": [upstream.endpoint()] }),
        services: &services,
        log: "debug",
        ..Launch::default()
    };
    let (mut command, _prepared) = Proxy::prepare(&launch, options)?;
    let mut child = command.spawn().context("spawn embassy")?;
    let stderr = child.stderr.take().context("piped stderr")?;
    let kill = KillOnDrop(child);
    let fd = stderr.as_raw_fd();
    // SAFETY: fcntl(2) F_GETPIPE_SZ on a pipe descriptor we own.
    let capacity = unsafe { libc::fcntl(fd, libc::F_GETPIPE_SZ) }.max(4096) as usize;
    let queued = || {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes an int through a valid pointer.
        unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
        n.max(0) as usize
    };
    // A pipe holds whole pages: a line that does not fit in the last page's rest waits for a
    // free page, so a stalled pipe may show up to a line's length short of its capacity (lines
    // here carry the listener's and the connection's spans). A page of slack covers any line.
    let full = || queued() + 4096 > capacity;
    wait_serving(port, WAIT)?;

    // Fill it: connections until no log line fits any more.
    let mut fill = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !full() {
        if Instant::now() > deadline || fill.len() > 20_000 {
            bail!(
                "the log pipe never filled: {} of {capacity} bytes after {} connections",
                queued(),
                fill.len()
            );
        }
        fill.push(exchange(
            port,
            &Exchange::SHORT.timeout(Duration::from_secs(1)),
            4_000_000 + fill.len() as u64,
        ));
    }
    report.figure("pipe_capacity", capacity);
    report.figure("fill_connections", fill.len());
    report.figure("fill", Tally::of(&fill).failures());

    let stalled = Traffic::start(Load {
        workers: 2,
        max_attempts: HEALTHY,
        max_time: Duration::from_secs(10),
        pause: Duration::ZERO,
        exchange: Exchange::SHORT.timeout(Duration::from_secs(1)),
        ..Load::new(port)
    })
    .join();
    let still_full = full();
    let queued_then = queued();
    let stalled_tally = Tally::of(&stalled);

    // Somebody reads the log again.
    let drained = Instant::now();
    let drain = thread::spawn(move || {
        let mut stderr = stderr;
        let _ = std::io::copy(&mut stderr, &mut std::io::sink());
    });
    let after = Traffic::start(Load {
        workers: 2,
        max_attempts: 1000,
        max_time: options.scaled(Duration::from_secs(2)),
        ..Load::new(port)
    })
    .join();
    let mut all = stalled.clone();
    all.extend(after);
    all.sort_by_key(|a| a.start);
    report.tally = Tally::of(&all);
    report.recovery = Some(Recovery::of(&all, drained));
    report.check(
        "the pipe stayed full while the healthy service was measured (the scenario tests something)",
        still_full,
        format!("{queued_then} of {capacity} bytes queued"),
    );
    report.check(
        format!(
            "all {HEALTHY} connections to a healthy service succeed while nobody reads the log"
        ),
        stalled_tally.ok == HEALTHY,
        format!(
            "{} ({} attempted within 10 s)",
            stalled_tally.failures(),
            stalled_tally.attempted
        ),
    );
    drop(kill);
    let _ = drain.join();
    Ok(())
}

/// Kills and reaps a child when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
