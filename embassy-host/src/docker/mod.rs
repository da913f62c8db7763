//! Docker integration: containers declare `BACKEND_*` variables, Embassy serves them.
//!
//! - [`watch`] talks to the engine (bollard): lists running containers, follows the event
//!   stream, reconnects with capped backoff and reports what it sees as [`Change`]s. It never
//!   touches listeners, so an engine outage cannot close one.
//! - [`serve`] applies those changes to the supervisor, remembering which listener claims each
//!   container holds so that its death releases exactly those.
//! - [`identity`] finds Embassy's own container (network-container mode).

pub mod identity;
pub mod serve;
pub mod watch;

use std::fmt;

use embassy_core::{DescriptorError, ServiceDescriptor};
use thiserror::Error;

/// Which containers this Embassy serves, and where their listeners live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Embassy is the network container of its apps (`--net=container:<embassy>`): listeners
    /// in Embassy's own namespace, shared by every associated container.
    NetworkContainer {
        /// Embassy's own container: full id and name (without the leading `/`).
        id: String,
        name: String,
    },
    /// Embassy runs on the host: every container with `BACKEND_*` variables is served, each
    /// in its own network namespace.
    Host,
}

/// What the watcher learnt from the engine.
#[derive(Debug)]
pub enum Change {
    /// The full set of running, associated containers (at start and after a reconnect):
    /// anything served and absent here is gone.
    Listed(Vec<Container>),
    /// A container started (or was found running).
    Up(Container),
    /// A container died or was removed.
    Down { id: String },
}

/// A running container, as far as Embassy cares.
#[derive(Debug, Clone)]
pub struct Container {
    pub id: String,
    pub name: String,
    /// Its main process, whose network namespace host mode binds in.
    pub pid: u32,
    /// Tells two runs of the same container apart (a restart missed during an outage).
    pub started_at: String,
    /// Its `BACKEND_*` variables, read or not, sorted by name.
    pub requests: Vec<ContainerRequest>,
}

/// One `BACKEND_*` variable of a container.
#[derive(Debug, Clone)]
pub struct ContainerRequest {
    pub variable: String,
    pub value: String,
    pub descriptor: Result<ServiceDescriptor, DescriptorError>,
}

impl Container {
    /// `name (short id)`, for logs.
    pub fn label(&self) -> ContainerLabel<'_> {
        ContainerLabel(&self.name, &self.id)
    }
}

/// Formats a container as `name (0123456789ab)`.
pub struct ContainerLabel<'a>(pub &'a str, pub &'a str);

impl fmt::Display for ContainerLabel<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.0, short_id(self.1))
    }
}

/// The 12-character form Docker shows.
pub fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// Why the Docker integration could not start or lost the engine.
#[derive(Debug, Error)]
pub enum DockerError {
    #[error("unsupported docker address {0:?}: give unix:///path/to/docker.sock")]
    Uri(String),
    // The engine's error is in the message, not a `source`: anyhow's `{:#}` would repeat it.
    #[error("cannot reach the docker engine at {uri}: {reason}")]
    Connect {
        uri: String,
        reason: bollard::errors::Error,
    },
    #[error("docker engine request failed: {0}")]
    Engine(#[from] bollard::errors::Error),
    #[error("the docker event stream ended")]
    StreamEnded,
    #[error(
        "cannot tell which container embassy runs in ({0}); give --container-id or --mode host"
    )]
    OwnContainerUnknown(String),
    #[error("container {0:?} (given by --container-id) not found: {1}")]
    OwnContainerNotFound(String, bollard::errors::Error),
}

/// Reads the `prefix`ed variables out of a container's environment (`NAME=value` strings).
pub fn requests_of(env: &[String], prefix: &str) -> Vec<ContainerRequest> {
    let mut requests: Vec<ContainerRequest> = env
        .iter()
        .filter_map(|entry| entry.split_once('='))
        .filter(|(name, _)| !prefix.is_empty() && name.starts_with(prefix))
        .map(|(name, value)| ContainerRequest {
            variable: name.to_string(),
            value: value.to_string(),
            descriptor: value.parse(),
        })
        .collect();
    requests.sort_by(|a, b| a.variable.cmp(&b.variable));
    requests
}

/// Whether `network_mode` (a container's `HostConfig.NetworkMode`) joins Embassy's container:
/// `container:<id, id prefix or name>`.
pub fn joins(network_mode: &str, own_id: &str, own_name: &str) -> bool {
    let Some(target) = network_mode.strip_prefix("container:") else {
        return false;
    };
    let target = target.trim_start_matches('/');
    target == own_name || (target.len() >= 12 && own_id.starts_with(target))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_by_id_prefix_or_name_only() {
        let id = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert!(joins(&format!("container:{id}"), id, "embassy"));
        assert!(joins("container:0123456789ab", id, "embassy"));
        assert!(joins("container:embassy", id, "embassy"));
        assert!(joins("container:/embassy", id, "embassy"));
        assert!(!joins("container:0123", id, "embassy"));
        assert!(!joins("container:other", id, "embassy"));
        assert!(!joins("bridge", id, "embassy"));
        assert!(!joins("host", id, "embassy"));
    }

    #[test]
    fn requests_keep_bad_descriptors_and_skip_other_variables() {
        let env = [
            "PATH=/bin".to_string(),
            "BACKEND_Y=web;8080/tcp".to_string(),
            "BACKEND_X=web;notaport/tcp".to_string(),
            "NOEQUALS".to_string(),
        ];
        let requests = requests_of(&env, "BACKEND_");
        let names: Vec<_> = requests.iter().map(|r| r.variable.as_str()).collect();
        assert_eq!(names, ["BACKEND_X", "BACKEND_Y"]);
        assert!(requests[0].descriptor.is_err());
        assert_eq!(
            requests[1].descriptor.as_ref().map(|d| d.port).ok(),
            Some(8080)
        );
        assert!(requests_of(&env, "").is_empty());
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    /// Environment entries: mostly `NAME=value` with names near the prefix, some without `=`.
    fn entry() -> impl Strategy<Value = String> {
        prop_oneof![
            ("(BACKEND_|BACK|PATH|backend_)[A-Z_=]{0,6}", any::<String>())
                .prop_map(|(name, value)| format!("{name}={value}")),
            any::<String>(),
        ]
    }

    /// A descriptor the parser accepts, written canonically.
    fn descriptor() -> impl Strategy<Value = ServiceDescriptor> {
        (
            "/?[a-z0-9._-]{1,10}",
            prop::collection::btree_set("[a-z0-9]{1,4}", 0..3),
            1u16..,
            prop_oneof![
                Just(embassy_plugin_api::Protocol::Tcp),
                Just(embassy_plugin_api::Protocol::Udp)
            ],
        )
            .prop_map(|(service, tags, port, protocol)| {
                let mut descriptor = ServiceDescriptor::new(service, port, protocol);
                descriptor.tags = tags.into_iter().collect();
                descriptor
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Exactly the prefixed variables are read, sorted, each parsed from its own value.
        #[test]
        fn any_environment_yields_its_prefixed_variables(
            env in prop::collection::vec(entry(), 0..8),
            prefix in prop_oneof![Just("BACKEND_".to_string()), Just(String::new()), any::<String>()],
        ) {
            let requests = requests_of(&env, &prefix);
            prop_assert!(requests.windows(2).all(|w| w[0].variable <= w[1].variable));
            let expected = env
                .iter()
                .filter_map(|e| e.split_once('='))
                .filter(|(name, _)| !prefix.is_empty() && name.starts_with(prefix.as_str()))
                .count();
            prop_assert_eq!(requests.len(), expected);
            for request in &requests {
                prop_assert!(request.variable.starts_with(prefix.as_str()));
                prop_assert!(!request.variable.contains('='));
                let entry = format!("{}={}", request.variable, request.value);
                prop_assert!(env.contains(&entry), "{:?} not in the environment", entry);
                prop_assert_eq!(&request.descriptor, &request.value.parse::<ServiceDescriptor>());
            }
        }

        /// A container declaring canonical descriptors gets exactly those, whatever else its
        /// environment holds.
        #[test]
        fn declared_descriptors_read_back(
            declared in prop::collection::btree_map("[A-Z0-9]{1,6}", descriptor(), 0..4),
            other in prop::collection::vec("[a-zA-Z_]{1,8}=[ -~]{0,12}", 0..4),
        ) {
            let mut env: Vec<String> = declared
                .iter()
                .map(|(name, d)| format!("BACKEND_{name}={d}"))
                .collect();
            env.extend(other.into_iter().filter(|e| !e.starts_with("BACKEND_")));
            let read: Vec<(String, ServiceDescriptor)> = requests_of(&env, "BACKEND_")
                .into_iter()
                .map(|r| (r.variable, r.descriptor.expect("a canonical descriptor parses")))
                .collect();
            let expected: Vec<(String, ServiceDescriptor)> = declared
                .into_iter()
                .map(|(name, d)| (format!("BACKEND_{name}"), d))
                .collect();
            prop_assert_eq!(read, expected);
        }
    }
}
