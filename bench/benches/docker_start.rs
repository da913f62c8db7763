//! The start-up race, both modes.
//!
//! Host mode: time from `docker start` of an app container to its listener accepting (Embassy
//! on the host binds inside the container's namespace, which exists only from `start`),
//! p50/p99 over 50 starts.
//!
//! Network-container mode: how many apps whose very first action is to connect to their
//! service are refused, out of 30 apps declaring it by label and 30 by variable (Embassy binds
//! at `create`; labels are read without waiting for the engine's container lock, variables
//! need an inspect, which waits for it while `docker start` runs).
//!
//! Run (as root, with dockerd running or startable): `cargo bench -p embassy-bench --bench
//! docker_start`. Each round stops the container, then starts it while a thread watches
//! `/proc` for its process, enters its network namespace and connects until accepted.
//! Also printed: how long the `docker start` command itself took, and the time from the app's
//! process showing up in /proc to its listener accepting (mostly Embassy's share: start event,
//! inspect, bind inside the namespace).

use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use embassy_tests::{docker::*, *};
use serde_json::json;

const ROUNDS: usize = 50;
const PORT: u16 = 8080;

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; a filter that does not name us skips the run.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    if filter.is_some_and(|f| !"docker_start".contains(f.as_str())) {
        return Ok(());
    }
    let engine = engine();
    let busybox = engine.busybox_image()?;
    let upstream = Upstream::start("bench");
    let dir = tempfile::tempdir()?;
    let services = dir.path().join("services.json");
    write_services(&services, &json!({ "web": [upstream.addr.to_string()] }));
    let prefix = format!("EMBASSYBENCH{}_", std::process::id());
    let plugins = standard_plugin_dir(&[]);
    let mut embassy = Embassy::start([
        "--plugin-dir".to_string(),
        plugins.path().display().to_string(),
        "--discovery".to_string(),
        format!("file://{}", services.display()),
        "--docker".to_string(),
        engine.host.clone(),
        "--mode".to_string(),
        "host".to_string(),
        "--prefix".to_string(),
        prefix.clone(),
    ]);
    embassy.wait_for_log("following the docker engine", Duration::from_secs(30))?;

    // `sleep <marker>` tells the app's process apart in /proc.
    let marker = (1_000_000 + std::process::id()).to_string();
    let variable = format!("{prefix}WEB=web;{PORT}/tcp");
    let app = engine.run(
        "bench-app",
        &["--net", "none", "-e", &variable, &busybox, "sleep", &marker],
    )?;
    let mut accept = Vec::with_capacity(ROUNDS);
    let mut command = Vec::with_capacity(ROUNDS);
    let mut embassy_part = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        engine.docker(["stop", "--time", "0", &app.id])?;
        let watcher = {
            let marker = marker.clone();
            thread::spawn(move || -> Result<(Instant, Instant)> {
                let pid = wait_for_process(&["sleep", &marker], Duration::from_secs(20))?;
                let appeared = Instant::now();
                let accepted = wait_accepting_in_netns_of(pid, PORT, Duration::from_secs(20))?;
                Ok((appeared, accepted))
            })
        };
        let started = Instant::now();
        app.start()?;
        command.push(started.elapsed());
        let (appeared, accepted) = watcher
            .join()
            .map_err(|_| anyhow::anyhow!("watcher panicked"))??;
        accept.push(accepted - started);
        embassy_part.push(accepted.saturating_duration_since(appeared));
    }
    report("docker start -> listener accepting", &mut accept);
    report("docker start command returned", &mut command);
    report("app process seen -> listener accepting", &mut embassy_part);
    drop(app);
    drop(embassy);
    network_container_first_connects(engine, &busybox)
}

const FIRST_CONNECT_APPS: usize = 30;

/// Apps started with `docker run` beside Embassy's own container, each connecting first thing;
/// prints how many were refused, by how the service was declared.
fn network_container_first_connects(engine: &Engine, busybox: &str) -> Result<()> {
    let gateway = bridge_gateway()?;
    let web = Upstream::start_on("web-a", gateway.into());
    let config = tempfile::tempdir()?;
    write_services(
        &config.path().join("services.json"),
        &json!({ "web": [web.addr.to_string()] }),
    );
    let admin = tempfile::tempdir()?;
    let embassy = engine.embassy_network_container(config.path(), admin.path())?;
    let net = format!("container:{}", embassy.name);
    for (how, flag, declaration) in [
        ("label", "--label", "embassy.backend.web=web;8080/tcp"),
        ("variable", "-e", "BACKEND_WEB=web;8080/tcp"),
    ] {
        let mut refused = 0;
        for _ in 0..FIRST_CONNECT_APPS {
            let app = engine.run(
                "first-connect",
                &[
                    "--net",
                    &net,
                    flag,
                    declaration,
                    busybox,
                    "sh",
                    "-c",
                    FIRST_CONNECT,
                ],
            )?;
            app.wait_exit()?;
            if app.first_connects() != ["first-connect:ok"] {
                refused += 1;
            }
            app.remove()?;
            // Released before the next app is created, so each one binds anew.
            if !eventually(Duration::from_secs(20), || embassy.talk(PORT).is_err()) {
                bail!("the listener outlived its app:\n{}", embassy.logs());
            }
        }
        println!(
            "network-container mode, declared by {how}: {refused} of {FIRST_CONNECT_APPS} first connects refused"
        );
    }
    Ok(())
}

/// The pid of the process whose command line is exactly `argv`.
fn wait_for_process(argv: &[&str], timeout: Duration) -> Result<u32> {
    let wanted: Vec<u8> = argv
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    let deadline = Instant::now() + timeout;
    loop {
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if std::fs::read(entry.path().join("cmdline")).is_ok_and(|c| c == wanted) {
                return Ok(pid);
            }
        }
        if Instant::now() > deadline {
            bail!("no process {argv:?} within {timeout:?}");
        }
        thread::sleep(Duration::from_micros(500));
    }
}

fn report(what: &str, samples: &mut [Duration]) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    println!(
        "{what}: p50 {:.1} ms, p99 {:.1} ms, min {:.1} ms, max {:.1} ms ({} starts)",
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        samples.first().map_or(0.0, |d| d.as_secs_f64() * 1e3),
        samples.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
        samples.len(),
    );
}
