//! Docker integration: containers declare `BACKEND_*` variables or `embassy.backend.*` labels,
//! Embassy serves them.
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

use std::{collections::HashMap, fmt};

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
    /// The full set of containers served (at start and after a reconnect): anything served
    /// and absent here is gone.
    Listed(Vec<Container>),
    /// A container to serve: started (host mode), created or found (network-container mode).
    Up(Container),
    /// A container gone: dead (host mode) or removed.
    Down { id: String },
}

/// A container served, as far as Embassy cares.
#[derive(Debug, Clone)]
pub struct Container {
    pub id: String,
    pub name: String,
    /// Its current run; `None` for a container created but not (or no longer) running, which
    /// only network-container mode serves.
    pub run: Option<Run>,
    /// What it declares (variables and labels), read or not, sorted by name.
    pub requests: Vec<ContainerRequest>,
}

/// One run of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// Its main process, whose network namespace host mode binds in.
    pub pid: u32,
    /// Tells two runs of the same container apart (a restart missed during an outage).
    pub started_at: String,
}

/// Where a container declared a service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Declaration {
    /// An environment variable, e.g. `BACKEND_WEB`.
    Variable(String),
    /// A label, e.g. `embassy.backend.web`: Compose-friendly, and not in the app's environment.
    Label(String),
}

impl Declaration {
    /// The variable's or label's name: the owner's source in the read model.
    pub fn name(&self) -> &str {
        match self {
            Declaration::Variable(name) | Declaration::Label(name) => name,
        }
    }
}

impl fmt::Display for Declaration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Declaration::Variable(name) => write!(f, "variable {name}"),
            Declaration::Label(name) => write!(f, "label {name}"),
        }
    }
}

/// One service a container declares.
#[derive(Debug, Clone)]
pub struct ContainerRequest {
    pub declared: Declaration,
    pub value: String,
    pub descriptor: Result<ServiceDescriptor, RequestError>,
}

/// Why a container's declaration is not served.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RequestError {
    #[error("invalid service descriptor: {0}")]
    Descriptor(#[from] DescriptorError),
    #[error("label {label} and variable {variable} both declare service {name:?}: keep one")]
    Clash {
        name: String,
        label: String,
        variable: String,
    },
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

/// Reads what a container declares: its `prefix`ed variables (`NAME=value` strings) and its
/// `label_prefix`ed labels. A label and a variable of one name (`embassy.backend.web`,
/// `BACKEND_WEB`; compared without case) make one request that is an error naming both, so
/// neither wins silently. An empty prefix reads none of its kind.
pub fn requests_of(
    env: &[String],
    labels: &HashMap<String, String>,
    prefix: &str,
    label_prefix: &str,
) -> Vec<ContainerRequest> {
    let declared = |declared: Declaration, value: &str| ContainerRequest {
        declared,
        value: value.to_string(),
        descriptor: value.parse().map_err(RequestError::Descriptor),
    };
    let mut requests: Vec<ContainerRequest> = env
        .iter()
        .filter_map(|entry| entry.split_once('='))
        .filter(|(name, _)| !prefix.is_empty() && name.starts_with(prefix))
        .map(|(name, value)| declared(Declaration::Variable(name.to_string()), value))
        .collect();
    for (key, value) in labels {
        let Some(name) = key.strip_prefix(label_prefix) else {
            continue;
        };
        if label_prefix.is_empty() || name.is_empty() {
            continue;
        }
        let variable = requests.iter_mut().find(|request| {
            matches!(&request.declared, Declaration::Variable(variable)
                if variable[prefix.len()..].eq_ignore_ascii_case(name))
        });
        match variable {
            Some(clash) => {
                clash.descriptor = Err(RequestError::Clash {
                    name: name.to_ascii_lowercase(),
                    label: key.clone(),
                    variable: clash.declared.name().to_string(),
                });
            }
            None => requests.push(declared(Declaration::Label(key.clone()), value)),
        }
    }
    requests.sort_by(|a, b| a.declared.cmp(&b.declared));
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
        let requests = requests_of(&env, &HashMap::new(), "BACKEND_", "embassy.backend.");
        let names: Vec<_> = requests.iter().map(|r| r.declared.name()).collect();
        assert_eq!(names, ["BACKEND_X", "BACKEND_Y"]);
        assert!(matches!(
            requests[0].descriptor,
            Err(RequestError::Descriptor(_))
        ));
        assert_eq!(
            requests[1].descriptor.as_ref().map(|d| d.port).ok(),
            Some(8080)
        );
        assert!(requests_of(&env, &HashMap::new(), "", "embassy.backend.").is_empty());
    }

    /// What one container declaring `env` and `labels` asks for: each declaration with its
    /// descriptor (canonical) or its error.
    fn check(
        env: &[&str],
        labels: &[(&str, &str)],
        expected: &[(Declaration, Result<&str, &str>)],
    ) {
        let env: Vec<String> = env.iter().map(|e| e.to_string()).collect();
        let labels: HashMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let read: Vec<(Declaration, Result<String, String>)> =
            requests_of(&env, &labels, "BACKEND_", "embassy.backend.")
                .into_iter()
                .map(|r| {
                    let outcome = r
                        .descriptor
                        .map(|d| d.to_string())
                        .map_err(|e| e.to_string());
                    (r.declared, outcome)
                })
                .collect();
        let expected: Vec<(Declaration, Result<String, String>)> = expected
            .iter()
            .map(|(d, o)| (d.clone(), o.map(String::from).map_err(String::from)))
            .collect();
        assert_eq!(read, expected, "env {env:?}, labels {labels:?}");
    }

    #[test]
    fn labels_declare_services_beside_variables_and_a_clash_is_one_error() {
        use Declaration::{Label, Variable};
        let var = |n: &str| Variable(n.to_string());
        let label = |n: &str| Label(n.to_string());
        check(
            &[],
            &[("embassy.backend.web", "web;8080/tcp")],
            &[(label("embassy.backend.web"), Ok("web;8080/tcp"))],
        );
        // Other labels, and the bare prefix, are not requests.
        check(
            &[],
            &[
                ("embassy.backend.", "web;8080/tcp"),
                ("com.docker.compose.service", "app"),
                ("embassy.other", "x;1/tcp"),
            ],
            &[],
        );
        check(
            &["BACKEND_DB=db;5432/tcp"],
            &[("embassy.backend.cache", "redis;6379/tcp")],
            &[
                (var("BACKEND_DB"), Ok("db;5432/tcp")),
                (label("embassy.backend.cache"), Ok("redis;6379/tcp")),
            ],
        );
        check(
            &[],
            &[("embassy.backend.web", "web;80x/tcp")],
            &[(
                label("embassy.backend.web"),
                Err("invalid service descriptor: port \"80x\" is not a number from 1 to 65535"),
            )],
        );
        // One name, both ways (case aside): neither is served, one error names both.
        check(
            &["BACKEND_WEB=web;8080/tcp"],
            &[("embassy.backend.web", "web;8080/tcp")],
            &[(var("BACKEND_WEB"), Err("label embassy.backend.web and variable BACKEND_WEB both declare service \"web\": keep one"))],
        );
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
            let requests = requests_of(&env, &HashMap::new(), &prefix, "embassy.backend.");
            prop_assert!(requests.windows(2).all(|w| w[0].declared <= w[1].declared));
            let expected = env
                .iter()
                .filter_map(|e| e.split_once('='))
                .filter(|(name, _)| !prefix.is_empty() && name.starts_with(prefix.as_str()))
                .count();
            prop_assert_eq!(requests.len(), expected);
            for request in &requests {
                let Declaration::Variable(variable) = &request.declared else {
                    return Err(TestCaseError::fail("a label without labels"));
                };
                prop_assert!(variable.starts_with(prefix.as_str()));
                prop_assert!(!variable.contains('='));
                let entry = format!("{}={}", variable, request.value);
                prop_assert!(env.contains(&entry), "{:?} not in the environment", entry);
                prop_assert_eq!(
                    request.descriptor.clone(),
                    request.value.parse::<ServiceDescriptor>().map_err(RequestError::Descriptor)
                );
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
            let read: Vec<(String, ServiceDescriptor)> =
                requests_of(&env, &HashMap::new(), "BACKEND_", "embassy.backend.")
                .into_iter()
                .map(|r| (r.declared.name().to_string(), r.descriptor.expect("a canonical descriptor parses")))
                .collect();
            let expected: Vec<(String, ServiceDescriptor)> = declared
                .into_iter()
                .map(|(name, d)| (format!("BACKEND_{name}"), d))
                .collect();
            prop_assert_eq!(read, expected);
        }
    }
}
