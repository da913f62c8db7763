//! Following the engine: list, then events; on any trouble reconnect and list again.
//!
//! Each session asks for events *since just before* its listing, so nothing that happens
//! between the two is missed; what is seen twice is harmless because [`Change::Up`] of a
//! container already served (same run) is a no-op on the receiving side.
//!
//! Which events are followed depends on the mode. Host mode binds inside a container's own
//! namespace, which exists from `start` to `die`. Network-container mode binds in Embassy's
//! namespace and reads the container's configuration, fixed at creation: it serves a container
//! from `create` to `destroy`, so the listeners are there before the app's first process starts,
//! and stay through `docker restart` (a stopped container keeps them until it is removed).
//! Network connect/disconnect events change which Docker networks a container is on, never
//! which network namespace it has, so neither mode follows them.

use std::{
    collections::HashMap,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bollard::{
    errors::Error as EngineError,
    query_parameters::{EventsOptions, ListContainersOptions},
    Docker, API_DEFAULT_VERSION,
};
use embassy_plugin_api::support::Backoff;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, trace, warn};

use super::{
    identity::own_container_candidates, joins, requests_of, short_id, Change, Container,
    DockerError, Mode, Run,
};

/// First and largest wait between reconnection attempts. The engine is local and a failed
/// attempt costs one connect(2) on its socket, so the cap is low: once the engine answers
/// again, Embassy catches up within about [`BACKOFF_MAX`] rather than after a long backoff.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_millis(500);
/// A session that lasted this long was healthy: the next failure starts from the first wait.
const HEALTHY_SESSION: Duration = Duration::from_secs(10);
/// Per request (not for the event stream's body, which lasts as long as the session).
const REQUEST_TIMEOUT_SECS: u64 = 30;

/// The socket path in `unix:///var/run/docker.sock` (or a bare absolute path).
pub fn socket_path(uri: &str) -> Result<&str, DockerError> {
    match uri.strip_prefix("unix://") {
        Some(path) if path.starts_with('/') => Ok(path),
        None if uri.starts_with('/') => Ok(uri),
        _ => Err(DockerError::Uri(uri.to_string())),
    }
}

/// Opens a client and agrees on an API version with the engine (Debian's dockerd may be older
/// than bollard's default).
pub async fn connect(uri: &str) -> Result<Docker, DockerError> {
    let path = socket_path(uri)?;
    let connect_error = |reason| DockerError::Connect {
        uri: uri.to_string(),
        reason,
    };
    Docker::connect_with_unix(path, REQUEST_TIMEOUT_SECS, API_DEFAULT_VERSION)
        .map_err(connect_error)?
        .negotiate_version()
        .await
        .map_err(connect_error)
}

/// Decides the mode: `--mode` if given, else network-container when Embassy finds its own
/// container, host otherwise. `container_id` (`--container-id`) names the container outright.
pub async fn resolve_mode(
    docker: &Docker,
    forced: Option<ModeChoice>,
    container_id: Option<&str>,
) -> Result<Mode, DockerError> {
    if forced == Some(ModeChoice::Host) {
        return Ok(Mode::Host);
    }
    if let Some(given) = container_id {
        return match docker.inspect_container(given, None).await {
            Ok(found) => Ok(network_container(found, given)),
            Err(error) => Err(DockerError::OwnContainerNotFound(given.to_string(), error)),
        };
    }
    let mut candidates = own_container_candidates();
    if forced.is_none() {
        // The hostname is a guess worth trying only when the mode was asked for.
        candidates.truncate(usize::from(
            candidates.first().is_some_and(|c| c.len() == 64),
        ));
    }
    let mut tried = Vec::new();
    for candidate in candidates {
        match docker.inspect_container(&candidate, None).await {
            Ok(found) => return Ok(network_container(found, &candidate)),
            Err(error) => tried.push(format!("{candidate}: {error}")),
        }
    }
    match forced {
        None => Ok(Mode::Host),
        Some(_) if tried.is_empty() => Err(DockerError::OwnContainerUnknown(
            "no container id in /proc/self/cgroup or /proc/self/mountinfo, no hostname".into(),
        )),
        Some(_) => Err(DockerError::OwnContainerUnknown(tried.join("; "))),
    }
}

fn network_container(found: bollard::models::ContainerInspectResponse, asked: &str) -> Mode {
    Mode::NetworkContainer {
        id: found.id.unwrap_or_else(|| asked.to_string()),
        name: found
            .name
            .map(|n| n.trim_start_matches('/').to_string())
            .unwrap_or_default(),
    }
}

/// `--mode`: which containers to serve and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeChoice {
    /// Serve every container with BACKEND_* variables, inside each one's own network namespace.
    Host,
    /// Serve the containers started with --net=container:<this embassy>.
    NetworkContainer,
}

/// Follows one engine for as long as `stop` is not cancelled.
pub struct Watcher {
    pub uri: String,
    pub mode: Mode,
    /// Of the variables that declare services (`--prefix`).
    pub prefix: String,
    /// Of the labels that declare services (`--label-prefix`).
    pub label_prefix: String,
}

impl Watcher {
    /// Runs sessions until `stop` fires or the receiver goes away.
    pub async fn run(self, changes: mpsc::Sender<Change>, stop: CancellationToken) {
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        let mut connected = true;
        loop {
            let started = Instant::now();
            let error = tokio::select! {
                _ = stop.cancelled() => return,
                error = self.session(&changes, &mut connected) => error,
            };
            if changes.is_closed() {
                return;
            }
            if started.elapsed() > HEALTHY_SESSION {
                backoff.reset();
            }
            let wait = backoff.next_wait();
            if connected {
                warn!(%error, uri = %self.uri, "docker engine lost: serving what exists, reconnecting");
                connected = false;
            } else {
                trace!(%error, retry_in = ?wait, "docker engine still unreachable");
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Connect, list, follow events; returns why it stopped.
    async fn session(&self, changes: &mpsc::Sender<Change>, connected: &mut bool) -> DockerError {
        let docker = match connect(&self.uri).await {
            Ok(docker) => docker,
            Err(error) => return error,
        };
        // Events from one second before the listing: overlap, never a gap.
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs().saturating_sub(1));
        let listed = match self.list(&docker).await {
            Ok(listed) => listed,
            Err(error) => return error,
        };
        if !*connected {
            info!(uri = %self.uri, containers = listed.len(), "docker engine reachable again, resynchronising");
            *connected = true;
        } else {
            info!(uri = %self.uri, containers = listed.len(), "following the docker engine");
        }
        if changes.send(Change::Listed(listed)).await.is_err() {
            return DockerError::StreamEnded;
        }
        let followed: &[&str] = match self.mode {
            Mode::Host => &["start", "die", "destroy"],
            Mode::NetworkContainer { .. } => &["create", "destroy"],
        };
        let filters = HashMap::from([
            ("type".to_string(), vec!["container".to_string()]),
            (
                "event".to_string(),
                followed.iter().map(|event| event.to_string()).collect(),
            ),
        ]);
        let mut events = docker.events(Some(EventsOptions {
            since: Some(since.to_string()),
            until: None,
            filters: Some(filters),
        }));
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(event) => event,
                Err(error) => return error.into(),
            };
            let Some(id) = event.actor.and_then(|actor| actor.id) else {
                continue;
            };
            let change = match event.action.as_deref() {
                Some("create") => {
                    // Labels first, from Docker's lock-free view: an inspect waits for the
                    // container's lock, which `docker start` holds until the app runs.
                    match self.declared_by_labels(&docker, &id).await {
                        Ok(Some(early)) => {
                            if changes.send(Change::Up(early)).await.is_err() {
                                return DockerError::StreamEnded;
                            }
                        }
                        Ok(None) => {}
                        Err(error) => return error,
                    }
                    match self.inspect(&docker, &id).await {
                        Ok(Some(container)) => Change::Up(container),
                        Ok(None) => continue,
                        Err(error) => return error,
                    }
                }
                Some("start") => match self.inspect(&docker, &id).await {
                    Ok(Some(container)) => Change::Up(container),
                    Ok(None) => continue,
                    Err(error) => return error,
                },
                Some("die" | "destroy") => Change::Down { id },
                _ => continue,
            };
            if changes.send(change).await.is_err() {
                return DockerError::StreamEnded;
            }
        }
        DockerError::StreamEnded
    }

    /// Every container this Embassy serves: running ones (host mode), or every one that joins
    /// it, running or not (network-container mode).
    async fn list(&self, docker: &Docker) -> Result<Vec<Container>, DockerError> {
        let options = ListContainersOptions {
            all: matches!(self.mode, Mode::NetworkContainer { .. }),
            ..Default::default()
        };
        let summaries = docker.list_containers(Some(options)).await?;
        let mut containers = Vec::new();
        for id in summaries.into_iter().filter_map(|summary| summary.id) {
            if let Some(container) = self.inspect(docker, &id).await? {
                containers.push(container);
            }
        }
        Ok(containers)
    }

    /// What a container joining Embassy declares by label, read from the container list (an
    /// in-memory view in the engine, answered without waiting for the container's lock, so
    /// before its start has run); `None` when it declares nothing by label or does not join.
    async fn declared_by_labels(
        &self,
        docker: &Docker,
        id: &str,
    ) -> Result<Option<Container>, DockerError> {
        let Mode::NetworkContainer {
            id: own_id,
            name: own_name,
        } = &self.mode
        else {
            return Ok(None);
        };
        let options = ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([("id".to_string(), vec![id.to_string()])])),
            ..Default::default()
        };
        let Some(found) = docker
            .list_containers(Some(options))
            .await?
            .into_iter()
            .next()
        else {
            return Ok(None);
        };
        let network_mode = found
            .host_config
            .and_then(|host| host.network_mode)
            .unwrap_or_default();
        if !joins(&network_mode, own_id, own_name) {
            return Ok(None);
        }
        // No variable prefix: the variables come with the inspect that follows.
        let requests = requests_of(
            &[],
            &found.labels.unwrap_or_default(),
            "",
            &self.label_prefix,
        );
        if requests.is_empty() {
            return Ok(None);
        }
        let name = found
            .names
            .and_then(|names| names.into_iter().next())
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_string();
        Ok(Some(Container {
            id: found.id.unwrap_or_else(|| id.to_string()),
            name,
            run: None,
            requests,
        }))
    }

    /// The container if it is served here; `None` otherwise (a container that vanished
    /// meanwhile is logged and skipped). Host mode serves a container only while it runs.
    async fn inspect(&self, docker: &Docker, id: &str) -> Result<Option<Container>, DockerError> {
        let found = match docker.inspect_container(id, None).await {
            Ok(found) => found,
            Err(EngineError::DockerResponseServerError {
                status_code: 404,
                message,
            }) => {
                warn!(container = short_id(id), %message, "container vanished before it could be inspected, skipped");
                return Ok(None);
            }
            Err(error) => return Err(error.into()),
        };
        let name = found
            .name
            .as_deref()
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_string();
        let state = found.state.unwrap_or_default();
        let pid = state.pid.and_then(|pid| u32::try_from(pid).ok());
        let run = match (pid.filter(|&pid| pid > 0), state.running) {
            (Some(pid), Some(true)) => Some(Run {
                pid,
                started_at: state.started_at.unwrap_or_default(),
            }),
            _ => None,
        };
        let network_mode = found
            .host_config
            .and_then(|host| host.network_mode)
            .unwrap_or_default();
        let config = found.config.unwrap_or_default();
        let requests = requests_of(
            config.env.as_deref().unwrap_or_default(),
            &config.labels.unwrap_or_default(),
            &self.prefix,
            &self.label_prefix,
        );
        let served = match &self.mode {
            Mode::NetworkContainer {
                id: own_id,
                name: own_name,
            } => joins(&network_mode, own_id, own_name),
            Mode::Host if run.is_none() => {
                debug!(container = %super::ContainerLabel(&name, id), "not running, skipped");
                false
            }
            Mode::Host => !requests.is_empty(),
        };
        if !served {
            return Ok(None);
        }
        Ok(Some(Container {
            id: found.id.unwrap_or_else(|| id.to_string()),
            name,
            run,
            requests,
        }))
    }
}
