//! Applying what the watcher saw to the supervisor.
//!
//! Every container served holds claims (descriptor, owner) on listeners; its death releases
//! exactly those, through the supervisor's one add/remove path. A container is recorded even
//! when none of its requests could be served, so seeing it again (events overlap a listing)
//! neither serves twice nor reports its errors twice.

use std::collections::{HashMap, HashSet};

use embassy_core::ServiceDescriptor;
use tracing::{error, info, warn};

use super::{Change, Container, ContainerLabel, Declaration, Mode, Run};
use crate::{
    netns::Netns,
    state::{Consumer, Owner},
    supervisor::{Place, Supervisor},
};

struct Claims {
    name: String,
    /// The run whose namespace holds the listeners (host mode).
    run: Option<Run>,
    place: Place,
    /// What the container declared when last applied (declaration and value), so that seeing
    /// the same again changes nothing and reports nothing twice; `None` before the first time.
    declared: Option<Vec<(Declaration, String)>>,
    held: Vec<(Declaration, ServiceDescriptor, Owner)>,
}

/// The containers served, and their claims.
pub struct ServedContainers {
    host_mode: bool,
    /// Embassy's own namespace: a container sharing it (`--net=host`) is served as
    /// [`Place::Own`], so it shares listeners with `--service` and Embassy's own variables.
    own_netns: Option<u64>,
    containers: HashMap<String, Claims>,
}

impl ServedContainers {
    pub fn new(mode: &Mode) -> Self {
        ServedContainers {
            host_mode: *mode == Mode::Host,
            own_netns: Netns::own().ok().map(|netns| netns.inode),
            containers: HashMap::new(),
        }
    }

    /// How many containers are being served.
    pub fn len(&self) -> usize {
        self.containers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.containers.is_empty()
    }

    pub async fn apply(&mut self, supervisor: &mut Supervisor, change: Change) {
        match change {
            Change::Listed(containers) => {
                let running: HashSet<&str> = containers.iter().map(|c| c.id.as_str()).collect();
                let gone: Vec<String> = self
                    .containers
                    .keys()
                    .filter(|id| !running.contains(id.as_str()))
                    .cloned()
                    .collect();
                for id in gone {
                    self.down(supervisor, &id);
                }
                for container in containers {
                    self.up(supervisor, container).await;
                }
            }
            Change::Up(container) => self.up(supervisor, container).await,
            Change::Down { id } => self.down(supervisor, &id),
        }
    }

    async fn up(&mut self, supervisor: &mut Supervisor, container: Container) {
        if let Some(known) = self.containers.get(&container.id) {
            // Restarted while we were not looking: its old namespace is gone. (In Embassy's
            // namespace a container's claims outlive its runs.)
            if self.host_mode && known.run != container.run {
                self.down(supervisor, &container.id);
            }
        }
        if !self.containers.contains_key(&container.id) {
            let place = if self.host_mode {
                let Some(run) = &container.run else {
                    return;
                };
                match Netns::of_pid(run.pid) {
                    Ok(netns) if Some(netns.inode) == self.own_netns => Place::Own,
                    Ok(netns) => Place::Netns(netns),
                    Err(error) => {
                        warn!(container = %container.label(), %error, "cannot reach the container's network namespace (gone, or embassy lacks the host's pid namespace), not served");
                        return;
                    }
                }
            } else {
                Place::Own
            };
            let claims = Claims {
                name: container.name.clone(),
                run: container.run.clone(),
                place,
                declared: None,
                held: Vec::new(),
            };
            self.containers.insert(container.id.clone(), claims);
        }
        self.reconcile(supervisor, &container).await;
    }

    /// Makes the claims of a known container what it declares now: a first sight serves
    /// everything; a fuller view (network-container mode sees labels at `create`, variables a
    /// moment later) serves what is new and releases what is no longer declared as it was.
    async fn reconcile(&mut self, supervisor: &mut Supervisor, container: &Container) {
        let Some(claims) = self.containers.get_mut(&container.id) else {
            return;
        };
        let declared: Vec<(Declaration, String)> = container
            .requests
            .iter()
            .map(|request| (request.declared.clone(), request.value.clone()))
            .collect();
        if claims.declared.as_ref() == Some(&declared) {
            return;
        }
        let label = container.label();
        let place = claims.place.clone();
        claims.held.retain(|(declaration, descriptor, owner)| {
            let still = container.requests.iter().any(|request| {
                request.declared == *declaration && request.descriptor.as_ref() == Ok(descriptor)
            });
            if !still {
                supervisor.remove_in(&place, descriptor, owner);
            }
            still
        });
        for request in &container.requests {
            // Held, or seen as it is and reported then: nothing to do.
            let seen = claims
                .declared
                .iter()
                .flatten()
                .any(|(declaration, value)| {
                    *declaration == request.declared && *value == request.value
                });
            let held = claims
                .held
                .iter()
                .any(|(declaration, _, _)| *declaration == request.declared);
            if held || seen {
                continue;
            }
            let descriptor = match &request.descriptor {
                Ok(descriptor) => descriptor,
                Err(error) => {
                    error!(container = %label, declared = %request.declared, value = %request.value, "{error}");
                    continue;
                }
            };
            let owner = Owner {
                container: Some(Consumer {
                    name: container.name.clone(),
                    id: container.id.clone(),
                }),
                source: request.declared.name().to_string(),
            };
            match supervisor.add_in(&place, descriptor, &owner).await {
                Ok(()) => claims
                    .held
                    .push((request.declared.clone(), descriptor.clone(), owner)),
                Err(error) => {
                    error!(container = %label, declared = %request.declared, service = %descriptor, "cannot serve: {error}")
                }
            }
        }
        claims.declared = Some(declared);
        info!(container = %label, services = claims.held.len(), requested = container.requests.len(), "container served");
    }

    fn down(&mut self, supervisor: &mut Supervisor, id: &str) {
        let Some(claims) = self.containers.remove(id) else {
            return;
        };
        for (_, descriptor, owner) in &claims.held {
            supervisor.remove_in(&claims.place, descriptor, owner);
        }
        info!(container = %ContainerLabel(&claims.name, id), released = claims.held.len(), "container gone, its claims released");
    }
}
