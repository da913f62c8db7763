//! The three commands: run the proxy, list plugins, check descriptors.

use std::{process::ExitCode, sync::Arc};

use anyhow::{bail, Context};
use embassy_core::{
    check::CheckParams,
    health::HealthPolicy,
    service::{default_max_connections, ConnectionDefaults, RESERVED_DESCRIPTORS},
    ServiceDescriptor,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::{
    admin::{AdminAddr, AdminContext, AdminListener, DEFAULT_ADMIN_ADDR},
    cli::RunArgs,
    control::Control,
    docker::{
        serve::ServedContainers,
        watch::{connect, resolve_mode, Watcher},
        Change, ContainerLabel, Mode,
    },
    plugins::{log_load_error, PluginRegistry},
    requests::Request,
    signals::{Signal, Signals},
    state::Owner,
    supervisor::{balancer_config, ServeDefaults, Supervisor},
};

/// Exit code for a usage error (sysexits' EX_USAGE).
pub const EXIT_USAGE: u8 = 64;

/// What was given cannot be used as it stands (a missing option, a bad variable, a plugin
/// directory that does not exist): one line, exit [`EXIT_USAGE`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The runtime the proxy runs on: `threads` workers (0: one per core this process may use).
/// With one, a single-threaded runtime: no work stealing and no cross-thread wake-ups, like
/// the event loop of a single-worker HAProxy or nginx.
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let threads = match threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads);
        builder
    };
    builder.enable_all().build()
}

/// Below this open-file limit (after raising it) Embassy warns at start.
pub const LOW_OPEN_FILE_LIMIT: u64 = 4096;

/// Raises the soft open-file limit to the hard one (a proxy holds two descriptors per
/// connection, and the usual soft default, 1024, would cap it at about 500) and returns the
/// limit in force; warns when it is low.
pub fn raise_open_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return u64::MAX; // unknown: assume no limit rather than cap every service at 1
        }
        if limit.rlim_cur < limit.rlim_max {
            let from = limit.rlim_cur;
            let mut raised = limit;
            raised.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                debug!(from, to = limit.rlim_max, "open-file limit raised");
                limit = raised;
            }
        }
    }
    let open_files: u64 = limit.rlim_cur;
    if open_files < LOW_OPEN_FILE_LIMIT {
        warn!(
            limit = open_files,
            connections = open_files.saturating_sub(RESERVED_DESCRIPTORS) / 2,
            per_service = default_max_connections(open_files),
            "the open-file limit is low: it allows about this many connections in all (two descriptors each), and max_connections defaults to half of them per service; raise it (ulimit -n, LimitNOFILE=, docker run --ulimit nofile=)"
        );
    }
    open_files
}

/// Runs the proxy until SIGTERM or SIGINT. Every service of the static configuration
/// (`--service`, Embassy's own variables) must be served, or the start fails.
/// `requests` come from [`crate::requests::checked_run_args`].
pub async fn run(
    plugins: PluginRegistry,
    plugin_dir: std::path::PathBuf,
    args: RunArgs,
    requests: Vec<Request>,
) -> anyhow::Result<ExitCode> {
    let open_files = raise_open_file_limit();
    // Before the first listener opens: from here on SIGHUP cannot kill the process.
    let mut signals = Signals::new().context("cannot listen for signals")?;
    let uri = args.discovery.as_deref().context("no discovery backend")?;
    plugins.balancer(&args.balancer).context("--balancer")?;
    let discovery = plugins
        .open_discovery(uri, &args.discovery_options)
        .with_context(|| format!("cannot open discovery backend {uri}"))?;
    info!(%uri, "discovery backend open");
    let mut supervisor = Supervisor::new(
        plugins,
        plugin_dir,
        discovery,
        ServeDefaults {
            bind: args.bind,
            balancer: args.balancer.clone(),
            copy_mode: args.copy_mode,
            connections: ConnectionDefaults {
                connect_timeout: args.connect_timeout,
                idle_timeout: args.idle_timeout,
                half_close_timeout: args.half_close_timeout,
                queue_timeout: args.queue_timeout,
                max_connections: args
                    .max_connections
                    .unwrap_or_else(|| default_max_connections(open_files)),
                health: HealthPolicy {
                    eject_after: args.eject_after,
                    eject_time: args.eject_time,
                    eject_max_time: args.eject_max_time,
                    max_ejected_percent: args.max_ejected,
                    panic_threshold_percent: args.panic_threshold,
                    on_remove: args.on_remove,
                    drain_timeout: args.drain_timeout,
                    remove_delay: args.remove_delay,
                    check: None,
                    check_params: CheckParams {
                        interval: args.check_interval,
                        timeout: args.check_timeout,
                        rise: args.check_rise,
                        fall: args.check_fall,
                    },
                },
            },
        },
    );
    let stop_admin = CancellationToken::new();
    let (control, mut commands) = Control::channel();
    let admin = Arc::new(AdminContext {
        host: supervisor.state(),
        discovery_uri: uri.to_string(),
        control: Some(control),
        token_file: args.admin_token_file.clone(),
    });
    start_admin(&args.admin, Arc::clone(&admin), stop_admin.clone()).await?;
    if let Some(addr) = args.metrics {
        let listener = AdminListener::bind(&AdminAddr::Tcp(addr))
            .await
            .context("--metrics")?;
        tokio::spawn(listener.serve_metrics(admin, stop_admin.clone()));
    }
    let mut failures = 0;
    for request in &requests {
        if let Err(error) = supervisor
            .add(&request.descriptor, &Owner::configured(&request.origin))
            .await
        {
            failures += 1;
            error!(service = %request.descriptor, origin = %request.origin, "cannot serve: {error}");
        }
    }
    if failures > 0 {
        bail!(
            "{failures} of the {} services given with --service or {}* variables cannot be served (see above); not starting",
            requests.len(),
            args.prefix
        );
    }
    let stop_watching = CancellationToken::new();
    let (mut changes, mut served) = match &args.docker {
        Some(uri) => start_docker(uri, &args, stop_watching.clone()).await?,
        None => (mpsc::channel(1).1, None),
    };
    let stop = loop {
        tokio::select! {
            signal = signals.next() => match signal {
                Signal::Stop(stop) => break stop,
                Signal::Reload => match supervisor.reload_plugins() {
                    Ok(changed) => info!(by = "SIGHUP", %changed, "plugins reloaded"),
                    Err(error) => warn!(by = "SIGHUP", %error, "plugin reload failed: the plugins loaded stay"),
                },
            },
            Some(change) = changes.recv() => {
                if let Some(served) = served.as_mut() {
                    served.apply(&mut supervisor, change).await;
                }
            }
            Some(command) = commands.recv() => {
                let answer = supervisor.control(&command.request);
                match &answer {
                    Ok(changed) => info!(by = %command.by, request = ?command.request, %changed, "admin change"),
                    Err(error) => warn!(by = %command.by, request = ?command.request, %error, "admin change refused"),
                }
                let _ = command.reply.send(answer);
            }
        }
    };
    stop_watching.cancel();
    info!(signal = stop.name(), grace = ?args.grace_period, "stopping: no new connections");
    let (left, again) = supervisor.shutdown(args.grace_period, signals.stop()).await;
    stop_admin.cancel();
    if let Some(again) = again {
        warn!(
            signal = again.name(),
            connections = left,
            "second stop signal during the grace period: the connections still open were reset, exiting now"
        );
        return Ok(ExitCode::from(again.forced_exit_code()));
    }
    if left > 0 {
        warn!(
            connections = left,
            "grace period over: the connections still open were reset"
        );
    }
    info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Refuses to start with a token file that cannot be used (so a typo is not found at the first
/// write); warns when others may read it.
pub fn check_token_file(path: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    crate::admin::read_token(path)
        .map_err(|error| UsageError(format!("--admin-token-file: {error}")))?;
    let mode = std::fs::metadata(path).map_or(0, |m| m.permissions().mode());
    if mode & 0o077 != 0 {
        warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "the admin token file may be read by other users: anyone who reads it may change this Embassy (chmod 600)");
    }
    Ok(())
}

/// Starts the admin API on each `--admin` address, or on the default socket when none is
/// given. An address given that cannot be bound stops the start; the default that cannot be
/// (another Embassy has it, no `/run`) only costs the API, with a warning saying so.
async fn start_admin(
    addresses: &[Option<AdminAddr>],
    context: Arc<AdminContext>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let given: Vec<&AdminAddr> = addresses.iter().flatten().collect();
    if addresses.iter().any(Option::is_none) {
        if !given.is_empty() {
            return Err(
                UsageError("--admin off cannot be combined with admin addresses".into()).into(),
            );
        }
        info!("admin API off (--admin off)");
        return Ok(());
    }
    let default: AdminAddr = DEFAULT_ADMIN_ADDR.parse().map_err(anyhow::Error::msg)?;
    let implicit = given.is_empty();
    let chosen = if implicit { vec![&default] } else { given };
    for addr in chosen {
        match AdminListener::bind(addr).await {
            Ok(listener) => {
                tokio::spawn(listener.serve(Arc::clone(&context), stop.clone()));
            }
            Err(error) if implicit => warn!(
                %error,
                "no admin API (so no `embassy status`); give --admin unix:PATH to serve it elsewhere, or --admin off"
            ),
            Err(error) => return Err(error).context("--admin"),
        }
    }
    Ok(())
}

/// Connects to the engine, settles the mode and starts following it: the changes arrive on the
/// returned channel, to be applied to the supervisor by the run loop (its only owner).
async fn start_docker(
    uri: &str,
    args: &RunArgs,
    stop: CancellationToken,
) -> anyhow::Result<(mpsc::Receiver<Change>, Option<ServedContainers>)> {
    let docker = connect(uri).await?;
    let mode = resolve_mode(&docker, args.mode, args.container_id.as_deref()).await?;
    match &mode {
        Mode::NetworkContainer { id, name } => info!(
            container = %ContainerLabel(name, id),
            "network-container mode: serving containers started with --net=container:{name}"
        ),
        Mode::Host => {
            info!("host mode: serving every container with {}* variables or {}* labels, in its own network namespace", args.prefix, args.label_prefix)
        }
    }
    let (sender, changes) = mpsc::channel(64);
    let served = ServedContainers::new(&mode);
    let watcher = Watcher {
        uri: uri.to_string(),
        mode,
        prefix: args.prefix.clone(),
        label_prefix: args.label_prefix.clone(),
    };
    tokio::spawn(watcher.run(sender, stop));
    Ok((changes, Some(served)))
}

/// `embassy plugins`: one line (or JSON object) per plugin.
pub fn list_plugins(
    plugins: &PluginRegistry,
    json: bool,
    failed: usize,
) -> anyhow::Result<ExitCode> {
    for plugin in plugins.plugins() {
        if json {
            println!("{}", serde_json::to_string(plugin)?);
        } else {
            let schemes = if plugin.schemes.is_empty() {
                "-".to_string()
            } else {
                plugin.schemes.join(",")
            };
            println!(
                "{:<16} {:<10} {:<8} {:<12} contract {:<4} {}{}",
                plugin.name,
                plugin.kind,
                plugin.version,
                schemes,
                plugin.contract,
                plugin.path.display(),
                if plugin.serving {
                    ""
                } else {
                    " (superseded by a newer version)"
                }
            );
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `embassy check`: explains each descriptor. With the plugins of `plugin_dir` at hand, a
/// descriptor's balancer must be one of them (and accept the descriptor's options); without
/// them only the syntax is checked, and the output says so.
pub fn check(descriptors: &[String], plugin_dir: &std::path::Path) -> ExitCode {
    let plugins = match PluginRegistry::load_dir(plugin_dir) {
        Ok((plugins, errors)) => {
            errors.iter().for_each(log_load_error);
            Some(plugins)
        }
        Err(error) => {
            println!(
                "note: {error} ({}): syntax checked only, balancer names not checked",
                error.source
            );
            None
        }
    };
    let mut invalid = 0;
    for text in descriptors {
        let checked = text.parse::<ServiceDescriptor>().map_err(|e| e.to_string());
        let checked = match (checked, &plugins) {
            (Ok(d), Some(plugins)) => match d.option("balancer") {
                Some(name) => plugins
                    .new_balancer(name, balancer_config(&d))
                    .map(|_| d)
                    .map_err(|e| e.to_string()),
                None => Ok(d),
            },
            (checked, _) => checked,
        };
        match checked {
            Ok(d) => {
                let kind = if d.is_key_prefix() {
                    "etcd key prefix"
                } else {
                    "service name"
                };
                let tags = if d.tags.is_empty() {
                    "none".to_string()
                } else {
                    d.tags.join(", ")
                };
                println!("ok: {d}");
                println!("  service:  {} ({kind})", d.service);
                println!("  tags:     {tags}");
                println!("  listens:  port {}/{}", d.port, d.protocol);
                for (key, value) in &d.options {
                    println!("  option:   {key}={value}");
                }
            }
            Err(error) => {
                invalid += 1;
                println!("invalid: {text:?}: {error}");
            }
        }
    }
    if invalid == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Loads the plugin directory, logging each file that failed. A directory that cannot be
/// read is a usage error.
pub fn load_plugins(dir: &std::path::Path) -> anyhow::Result<(PluginRegistry, usize)> {
    let (registry, errors) = PluginRegistry::load_dir(dir).map_err(|error| {
        UsageError(format!(
            "{error}: {}; set --plugin-dir or EMBASSY_PLUGIN_DIR to the directory holding the plugin libraries",
            error.source
        ))
    })?;
    for error in &errors {
        log_load_error(error);
    }
    if registry.plugins().is_empty() {
        warn!(dir = %dir.display(), "no plugin loaded");
    }
    Ok((registry, errors.len()))
}
