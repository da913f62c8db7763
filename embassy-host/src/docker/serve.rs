//! Applying what the watcher saw to the supervisor.
//!
//! Every container served holds claims (descriptor, owner) on listeners; its death releases
//! exactly those, through the supervisor's one add/remove path. A container is recorded even
//! when none of its requests could be served, so seeing it again (events overlap a listing)
//! neither serves twice nor reports its errors twice.

use std::collections::{HashMap, HashSet};

use embassy_core::ServiceDescriptor;
use tracing::{error, info, warn};

use super::{Change, Container, ContainerLabel, Mode};
use crate::{
    netns::Netns,
    state::{Consumer, Owner},
    supervisor::{Place, Supervisor},
};

struct Claims {
    name: String,
    pid: u32,
    started_at: String,
    place: Place,
    held: Vec<(ServiceDescriptor, Owner)>,
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
            if known.pid == container.pid && known.started_at == container.started_at {
                return;
            }
            // Restarted while we were not looking: its old namespace is gone.
            self.down(supervisor, &container.id);
        }
        let label = container.label();
        let place = if self.host_mode {
            match Netns::of_pid(container.pid) {
                Ok(netns) if Some(netns.inode) == self.own_netns => Place::Own,
                Ok(netns) => Place::Netns(netns),
                Err(error) => {
                    warn!(container = %label, %error, "cannot reach the container's network namespace (gone, or embassy lacks the host's pid namespace), not served");
                    return;
                }
            }
        } else {
            Place::Own
        };
        let mut held = Vec::new();
        for request in &container.requests {
            let descriptor = match &request.descriptor {
                Ok(descriptor) => descriptor,
                Err(error) => {
                    error!(container = %label, variable = %request.variable, value = %request.value, "invalid service descriptor: {error}");
                    continue;
                }
            };
            let owner = Owner {
                container: Some(Consumer {
                    name: container.name.clone(),
                    id: container.id.clone(),
                }),
                source: request.variable.clone(),
            };
            match supervisor.add_in(&place, descriptor, &owner).await {
                Ok(()) => held.push((descriptor.clone(), owner)),
                Err(error) => {
                    error!(container = %label, variable = %request.variable, service = %descriptor, "cannot serve: {error}")
                }
            }
        }
        info!(container = %label, services = held.len(), requested = container.requests.len(), "container served");
        self.containers.insert(
            container.id.clone(),
            Claims {
                name: container.name,
                pid: container.pid,
                started_at: container.started_at,
                place,
                held,
            },
        );
    }

    fn down(&mut self, supervisor: &mut Supervisor, id: &str) {
        let Some(claims) = self.containers.remove(id) else {
            return;
        };
        for (descriptor, owner) in &claims.held {
            supervisor.remove_in(&claims.place, descriptor, owner);
        }
        info!(container = %ContainerLabel(&claims.name, id), released = claims.held.len(), "container gone, its claims released");
    }
}
