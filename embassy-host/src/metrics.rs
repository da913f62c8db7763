//! Prometheus metrics (`GET /metrics`), read at scrape time.
//!
//! Nothing here runs on the connection path: the counters are the core's own atomics, which a
//! scrape reads through the [`HostState`] read model; prometheus-client only writes the text
//! exposition. Every series of a listener carries `service` (the listener's id, which an
//! operator's change never alters) and `consumer` (the containers that asked for it, by name;
//! empty outside Docker modes); endpoint series add `endpoint`.

use std::{fmt, sync::Arc};

use embassy_core::{
    counters::{self, ConnectFailure, EndpointCounters, LatencyHistogram, ServiceFailure},
    endpoints::Upstream,
    health::EndpointState,
    EndpointSet,
};
use embassy_plugin_api::Protocol;
use prometheus_client::{
    collector::Collector,
    encoding::{prometheus_text, DescriptorEncoder, NoLabelSet},
    metrics::MetricType,
    registry::Registry,
};

use crate::state::{HostState, ServiceState};

/// The exposition's content type (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// The text exposition of every metric, as of now.
pub fn render(host: Arc<HostState>) -> Result<String, fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape(host)));
    let mut text = String::new();
    prometheus_text::encode(&mut text, &registry)?;
    Ok(text)
}

struct Scrape(Arc<HostState>);

impl fmt::Debug for Scrape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Scrape")
    }
}

/// One listener as one scrape sees it: its endpoint snapshot loaded once, so every family
/// of the scrape describes the same set.
struct Listed {
    state: Arc<ServiceState>,
    set: Arc<EndpointSet>,
    consumer: String,
    endpoints: Vec<String>,
}

impl Listed {
    fn new(state: &Arc<ServiceState>) -> Listed {
        let set = state.service.endpoints.load();
        let mut names: Vec<&str> = state.consumers.iter().map(|c| c.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        Listed {
            endpoints: all(&set).map(|u| u.addr.to_string()).collect(),
            consumer: names.join(","),
            set,
            state: Arc::clone(state),
        }
    }

    fn udp(&self) -> bool {
        self.state.service.descriptor.protocol == Protocol::Udp
    }

    fn labels(&self) -> Labels<'_> {
        vec![("service", &self.state.id), ("consumer", &self.consumer)]
    }

    /// `(labels, counters)` of each endpoint.
    fn endpoints(&self) -> impl Iterator<Item = (Labels<'_>, &EndpointCounters)> {
        all(&self.set)
            .zip(&self.endpoints)
            .map(|(upstream, endpoint)| {
                let mut labels = self.labels();
                labels.push(("endpoint", endpoint));
                (labels, upstream.counters.as_ref())
            })
    }
}

/// Every endpoint of `set`: in rotation, then out.
fn all(set: &EndpointSet) -> impl Iterator<Item = &Upstream> {
    set.upstreams().iter().chain(set.out_of_rotation())
}

/// An endpoint's state as the API names it.
fn state_name(upstream: &Upstream) -> &'static str {
    match upstream.state {
        EndpointState::Serving if upstream.health.failures() > 0 => "failing",
        ref state => state.as_str(),
    }
}

/// The states `embassy_endpoints` always reports (a zero says "none", not "unknown").
const STATES: [&str; 8] = [
    "serving",
    "failing",
    "ejected",
    "check_failing",
    "held_down",
    "draining",
    "drained",
    "disabled",
];

type Labels<'a> = Vec<(&'static str, &'a str)>;

enum Value<'a> {
    Counter(u64),
    Gauge(f64),
    Histogram(&'a LatencyHistogram),
}

/// Writes one metric family: its help and type, then a sample per row.
fn family<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels<'a>, Value<'a>)>,
) -> fmt::Result {
    let mut rows = rows.into_iter().peekable();
    let kind = match rows.peek() {
        Some((_, Value::Counter(_))) => MetricType::Counter,
        Some((_, Value::Histogram(_))) => MetricType::Histogram,
        Some((_, Value::Gauge(_))) => MetricType::Gauge,
        None => return Ok(()), // a family with no series says nothing
    };
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in rows {
        let mut sample = metric.encode_family(&labels)?;
        match value {
            Value::Counter(value) => sample.encode_counter::<NoLabelSet, _, u64>(&value, None)?,
            Value::Gauge(value) => sample.encode_gauge(&value)?,
            Value::Histogram(histogram) => {
                let (sum, count, buckets) = histogram.snapshot();
                sample.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?
            }
        }
    }
    Ok(())
}

fn with<'a>(mut labels: Labels<'a>, key: &'static str, value: &'a str) -> Labels<'a> {
    labels.push((key, value));
    labels
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let services: Vec<Listed> = self.0.services().iter().map(Listed::new).collect();
        let e = &mut encoder;
        family(
            e,
            "embassy_build_info",
            "Embassy's version; always 1.",
            [(
                vec![("version", env!("CARGO_PKG_VERSION"))],
                Value::Gauge(1.0),
            )],
        )?;
        family(
            e,
            "embassy_services",
            "Listeners served now.",
            [(vec![], Value::Gauge(services.len() as f64))],
        )?;

        family(
            e,
            "embassy_connections_accepted",
            "Client connections accepted (TCP), or new sessions asked for by a client address (UDP).",
            services.iter().map(|s| {
                let accepted = counters::read(&s.state.service.counters.accepted);
                (s.labels(), Value::Counter(accepted))
            }),
        )?;
        family(
            e,
            "embassy_connections_failed",
            "Client connections (UDP: sessions) not served, by reason: no_endpoint (none within the queue timeout), balancer_error, or the last connect attempt's connect_refused, connect_timeout, connect_error.",
            services.iter().flat_map(|s| {
                ServiceFailure::ALL.iter().map(move |failure| {
                    let count = s.state.service.counters.failures(*failure);
                    (with(s.labels(), "reason", failure.as_str()), Value::Counter(count))
                })
            }),
        )?;
        family(
            e,
            "embassy_connections_open",
            "Client connections open now (TCP), counted against max_connections.",
            services.iter().filter(|s| !s.udp()).map(|s| {
                let open = s.state.service.limit.open();
                (s.labels(), Value::Gauge(open as f64))
            }),
        )?;
        family(
            e,
            "embassy_connections_max",
            "The listener's max_connections.",
            services.iter().filter(|s| !s.udp()).map(|s| {
                let max = s.state.service.limit.max();
                (s.labels(), Value::Gauge(max as f64))
            }),
        )?;
        family(
            e,
            "embassy_udp_datagrams_dropped",
            "Client datagrams dropped before reaching an endpoint: no endpoint, session still opening, send buffer full.",
            services.iter().filter(|s| s.udp()).map(|s| {
                let dropped = counters::read(&s.state.service.counters.datagrams_dropped);
                (s.labels(), Value::Counter(dropped))
            }),
        )?;

        family(
            e,
            "embassy_endpoints",
            "Endpoints by state: serving; failing (serving, its last connects failed); ejected (out after eject_after connect failures in a row); check_failing; held_down (no longer listed, kept for remove_delay); draining (removed, connections running out); excluded (left out by discovery, see GET /v1/services/ID).",
            services.iter().flat_map(|s| {
                let mut counts = [0usize; STATES.len()];
                for upstream in all(&s.set) {
                    let name = state_name(upstream);
                    if let Some(i) = STATES.iter().position(|state| *state == name) {
                        counts[i] += 1;
                    }
                }
                STATES
                    .iter()
                    .zip(counts)
                    .chain([(&"excluded", s.set.excluded().len())])
                    .map(|(state, n)| (with(s.labels(), "state", state), Value::Gauge(n as f64)))
                    .collect::<Vec<_>>()
            }),
        )?;
        family(
            e,
            "embassy_endpoint_checks",
            "Active checks of the endpoint run, and how many failed (a checker shared by services counts once for each).",
            services.iter().flat_map(|s| {
                all(&s.set).zip(s.endpoints()).filter_map(|(u, (labels, _))| {
                    u.check.as_ref().map(|check| (labels, Value::Counter(check.checks())))
                })
            }),
        )?;
        family(
            e,
            "embassy_endpoint_check_failures",
            "Active checks of the endpoint that failed (connect, timeout, wrong answer).",
            services.iter().flat_map(|s| {
                all(&s.set)
                    .zip(s.endpoints())
                    .filter_map(|(u, (labels, _))| {
                        u.check
                            .as_ref()
                            .map(|check| (labels, Value::Counter(check.failures())))
                    })
            }),
        )?;
        family(
            e,
            "embassy_endpoints_panic",
            "1 while too few of the service's endpoints are fit and all of them are in rotation (the panic threshold).",
            services.iter().map(|s| {
                (s.labels(), Value::Gauge(if s.set.panic() { 1.0 } else { 0.0 }))
            }),
        )?;
        family(
            e,
            "embassy_endpoint_in_rotation",
            "1 if the balancer may pick the endpoint now, 0 if it is out (see embassy_endpoints' states).",
            services.iter().flat_map(|s| {
                let in_rotation = s.set.len();
                s.endpoints().enumerate().map(move |(i, (labels, _))| {
                    (labels, Value::Gauge(if i < in_rotation { 1.0 } else { 0.0 }))
                })
            }),
        )?;
        family(
            e,
            "embassy_endpoint_connections",
            "Connections established to the endpoint (TCP), or sessions opened to it (UDP).",
            services.iter().flat_map(|s| {
                s.endpoints()
                    .map(|(labels, c)| (labels, Value::Counter(counters::read(&c.connections))))
            }),
        )?;
        family(
            e,
            "embassy_endpoint_connections_active",
            "Connections (UDP: sessions) open to the endpoint now; what least-conn balances on.",
            services.iter().flat_map(|s| {
                all(&s.set).zip(s.endpoints()).map(|(u, (labels, _))| {
                    let active = u.active.load(std::sync::atomic::Ordering::Relaxed);
                    (labels, Value::Gauge(active as f64))
                })
            }),
        )?;
        family(
            e,
            "embassy_endpoint_connect_failures",
            "Failed connect attempts to the endpoint, by reason: connect_refused, connect_timeout, connect_error. A connection fails over to other endpoints after one.",
            services.iter().flat_map(|s| {
                s.endpoints().flat_map(|(labels, c)| {
                    ConnectFailure::ALL.iter().map(move |failure| {
                        (
                            with(labels.clone(), "reason", failure.as_str()),
                            Value::Counter(c.connect_failures(*failure)),
                        )
                    })
                })
            }),
        )?;
        family(
            e,
            "embassy_endpoint_sent_bytes",
            "Bytes sent from clients to the endpoint, counted as they move (open connections included).",
            services.iter().flat_map(|s| {
                s.endpoints()
                    .map(|(labels, c)| (labels, Value::Counter(counters::read(&c.bytes.sent))))
            }),
        )?;
        family(
            e,
            "embassy_endpoint_received_bytes",
            "Bytes sent from the endpoint back to clients, counted as they move.",
            services.iter().flat_map(|s| {
                s.endpoints()
                    .map(|(labels, c)| (labels, Value::Counter(counters::read(&c.bytes.received))))
            }),
        )?;
        family(
            e,
            "embassy_endpoint_connect_duration_seconds",
            "Time to establish each successful TCP connection to the endpoint.",
            services.iter().filter(|s| !s.udp()).flat_map(|s| {
                s.endpoints()
                    .map(|(labels, c)| (labels, Value::Histogram(&c.connect_latency)))
            }),
        )?;
        family(
            e,
            "embassy_endpoint_datagrams_sent",
            "UDP datagrams relayed from clients to the endpoint.",
            services.iter().filter(|s| s.udp()).flat_map(|s| {
                s.endpoints()
                    .map(|(labels, c)| (labels, Value::Counter(counters::read(&c.datagrams_sent))))
            }),
        )?;
        family(
            e,
            "embassy_endpoint_datagrams_received",
            "UDP datagrams relayed from the endpoint back to clients.",
            services.iter().filter(|s| s.udp()).flat_map(|s| {
                s.endpoints().map(|(labels, c)| {
                    (
                        labels,
                        Value::Counter(counters::read(&c.datagrams_received)),
                    )
                })
            }),
        )?;

        let discovery: Vec<_> = services.iter().map(|s| s.state.discovery.view()).collect();
        family(
            e,
            "embassy_discovery_up",
            "1 while the service's discovery backend is reachable and its answer valid, 0 otherwise.",
            services.iter().zip(&discovery).map(|(s, d)| {
                let up = if d.state == "reachable" { 1.0 } else { 0.0 };
                (s.labels(), Value::Gauge(up))
            }),
        )?;
        family(
            e,
            "embassy_discovery_updates",
            "Endpoint sets received from discovery for the service.",
            services
                .iter()
                .zip(&discovery)
                .map(|(s, d)| (s.labels(), Value::Counter(d.updates))),
        )?;
        family(
            e,
            "embassy_discovery_set_age_seconds",
            "Seconds since the service's current endpoint set arrived (absent until a first one does).",
            services.iter().zip(&discovery).filter_map(|(s, d)| {
                d.set_age_seconds
                    .map(|age| (s.labels(), Value::Gauge(age)))
            }),
        )?;
        Ok(())
    }
}
