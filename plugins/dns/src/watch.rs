//! One watch: resolve, push what changed, sleep until the TTL (or the backoff) runs out.

use std::{collections::HashMap, net::IpAddr, sync::Arc, time::Duration};

use embassy_plugin_api::{
    support::{Backoff, WatchSink},
    text::cut,
    Protocol, WatchRequest,
};
use hickory_resolver::{
    net::{DnsError, NetError},
    proto::{
        op::ResponseCode,
        rr::{RData, Record},
    },
    TokioResolver,
};
use tracing::debug;

use crate::{
    config::{DnsConfig, FIRST_BACKOFF},
    records::{host_set, normal_name, priorities, srv_set, Addresses, Query, Srv},
    schedule::{Next, Outcome, Tracker},
};

/// What a watch follows, fixed at its start.
pub struct Target {
    pub query: Query,
    /// Its protocol selects the records (`_tcp`/`_udp`).
    pub request: WatchRequest,
}

/// The watch loop; runs until its task is aborted.
pub async fn run(
    resolver: TokioResolver,
    config: Arc<DnsConfig>,
    target: Target,
    sink: Arc<WatchSink>,
) {
    let server = match config.server {
        Some(server) => server.to_string(),
        None => "the system resolver".to_string(),
    };
    let name = target.query.name().to_string();
    let mut tracker = Tracker::new(&name, config.timing);
    let mut backoff = Backoff::new(FIRST_BACKOFF, config.backoff_max);
    loop {
        let outcome = match &target.query {
            Query::Srv { name, declared } => {
                resolve_srv(&resolver, name, *declared, &target.request).await
            }
            Query::Host { host, port } => {
                resolve_host(&resolver, host, *port, &target.request).await
            }
        };
        let outcome = match outcome {
            Outcome::Failed(error) => {
                Outcome::Failed(format!("resolving {} at {server}: {error}", cut(&name)))
            }
            other => other,
        };
        let step = tracker.step(outcome, std::time::Instant::now());
        // The report first: by the time a set changes, the status already says why.
        if let Some((health, detail)) = step.report {
            sink.report(health, &detail);
        }
        if let Some((endpoints, excluded)) = step.set {
            let (count, left_out) = (endpoints.len(), excluded.len());
            if sink.update_explained(endpoints, excluded) {
                debug!(service = %cut(&name), endpoints = count, left_out, "dns answer changed");
            }
        }
        let wait = match step.next {
            Next::After(wait) => {
                backoff.reset();
                wait
            }
            Next::Retry => backoff.next_wait(),
        };
        tokio::time::sleep(wait).await;
    }
}

/// The smallest TTL seen.
#[derive(Default)]
struct Ttl(Option<u32>);

impl Ttl {
    fn see(&mut self, record: &Record) {
        self.0 = Some(self.0.map_or(record.ttl, |ttl| ttl.min(record.ttl)));
    }

    fn duration(&self) -> Option<Duration> {
        self.0.map(|ttl| Duration::from_secs(u64::from(ttl)))
    }
}

/// How an error reads: the server saying "nothing here" (with its negative TTL), or a failure.
enum Lookup {
    Missing {
        why: String,
        negative_ttl: Option<Duration>,
    },
    Failed(String),
}

fn classify(error: NetError, what: &str) -> Lookup {
    match error {
        NetError::Dns(DnsError::NoRecordsFound(none)) => Lookup::Missing {
            why: if none.response_code == ResponseCode::NXDomain {
                "NXDOMAIN".to_string()
            } else {
                format!("no {what} record")
            },
            negative_ttl: none
                .negative_ttl
                .map(|ttl| Duration::from_secs(u64::from(ttl))),
        },
        other => Lookup::Failed(cut(&other.to_string()).into_owned()),
    }
}

fn missing_or_failed(error: NetError, what: &str) -> Outcome {
    match classify(error, what) {
        Lookup::Missing { why, negative_ttl } => Outcome::Missing { why, negative_ttl },
        Lookup::Failed(error) => Outcome::Failed(error),
    }
}

async fn resolve_host(
    resolver: &TokioResolver,
    host: &str,
    port: u16,
    request: &WatchRequest,
) -> Outcome {
    let lookup = match resolver.lookup_ip(host).await {
        Ok(lookup) => lookup,
        Err(error) => return missing_or_failed(error, "A or AAAA"),
    };
    let mut ttl = Ttl::default();
    lookup.as_lookup().answers().iter().for_each(|r| ttl.see(r));
    let ips: Vec<IpAddr> = lookup.iter().collect();
    if ips.is_empty() {
        return Outcome::Missing {
            why: "no A or AAAA record".into(),
            negative_ttl: None,
        };
    }
    Outcome::Resolved {
        set: host_set(request, host, port, &ips),
        ttl: ttl.duration(),
    }
}

async fn resolve_srv(
    resolver: &TokioResolver,
    name: &str,
    declared: Option<Protocol>,
    request: &WatchRequest,
) -> Outcome {
    let lookup = match resolver.srv_lookup(name).await {
        Ok(lookup) => lookup,
        Err(error) => return missing_or_failed(error, "SRV"),
    };
    let mut ttl = Ttl::default();
    let mut records = Vec::new();
    for record in lookup.answers() {
        ttl.see(record);
        if let RData::SRV(srv) = &record.data {
            records.push(Srv {
                priority: srv.priority,
                weight: srv.weight,
                port: srv.port,
                target: normal_name(&srv.target.to_ascii()),
            });
        }
    }
    if records.is_empty() {
        return Outcome::Missing {
            why: "no SRV record".into(),
            negative_ttl: None,
        };
    }
    // The server's additional records save a lookup per target.
    let mut additional: HashMap<String, Vec<&Record>> = HashMap::new();
    for record in lookup.additionals() {
        if record.data.ip_addr().is_some() {
            additional
                .entry(normal_name(&record.name.to_ascii()))
                .or_default()
                .push(record);
        }
    }
    // Targets are resolved a priority at a time, until one has an address.
    let mut addresses: HashMap<String, Addresses> = HashMap::new();
    for priority in priorities(&records) {
        for record in records.iter().filter(|r| r.priority == priority) {
            if record.target.is_empty() || addresses.contains_key(&record.target) {
                continue;
            }
            let found = match additional.get(&record.target) {
                Some(glue) => {
                    glue.iter().for_each(|r| ttl.see(r));
                    Addresses::Found(glue.iter().filter_map(|r| r.data.ip_addr()).collect())
                }
                None => match resolver.lookup_ip(format!("{}.", record.target)).await {
                    Ok(lookup) => {
                        lookup.as_lookup().answers().iter().for_each(|r| ttl.see(r));
                        let ips: Vec<IpAddr> = lookup.iter().collect();
                        if ips.is_empty() {
                            Addresses::Missing("no A or AAAA record".into())
                        } else {
                            Addresses::Found(ips)
                        }
                    }
                    Err(error) => match classify(error, "A or AAAA") {
                        Lookup::Missing { why, .. } => Addresses::Missing(why),
                        // One target unknown: the last set is better than a partial one.
                        Lookup::Failed(error) => {
                            return Outcome::Failed(format!(
                                "SRV target {}: {error}",
                                cut(&record.target)
                            ))
                        }
                    },
                },
            };
            addresses.insert(record.target.clone(), found);
        }
        let served = records.iter().any(|r| {
            r.priority == priority
                && matches!(addresses.get(&r.target), Some(Addresses::Found(ips)) if !ips.is_empty())
        });
        if served {
            break;
        }
    }
    Outcome::Resolved {
        set: srv_set(request, declared, &records, &addresses),
        ttl: ttl.duration(),
    }
}
