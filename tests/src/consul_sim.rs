//! A Consul agent's `/v1/health/service/:service` endpoint, simulated from Consul's API
//! documentation, because no Consul binary can be installed here.
//!
//! It keeps a catalog of instances and a raft-like index that every change bumps; like
//! Consul's, a service's `X-Consul-Index` is that of the last change to *that* service, so a
//! query held on one service is not woken by changes to others. Blocking: `index` given and
//! not yet passed holds the request until the service's index moves or `wait` (default 5m)
//! elapses; `passing` keeps instances whose checks all pass, each `tag` must be on
//! the instance, `dc` picks the datacenter. Tests drive it in-process: register, deregister,
//! flip health, reset the index, fail with 500, answer garbage, go away and come back.
//!
//! HTTP/1.1 by hand on std threads (keep-alive, GET only): the holding is a `Condvar`, and
//! the test crate stays free of an async server stack. [`ConsulSim::start_tls`] serves the
//! same over TLS (rustls) for `consuls://`.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread,
    time::{Duration, Instant},
};

use serde_json::json;

/// The datacenter instances are in unless told otherwise.
pub const DEFAULT_DC: &str = "dc1";

/// A health check status, as Consul spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Passing,
    Warning,
    Critical,
}

impl Health {
    fn as_str(self) -> &'static str {
        match self {
            Health::Passing => "passing",
            Health::Warning => "warning",
            Health::Critical => "critical",
        }
    }
}

/// One registered service instance.
#[derive(Debug, Clone)]
pub struct Instance {
    pub id: String,
    pub service: String,
    pub node: String,
    pub node_address: String,
    /// Empty: clients fall back to the node's address.
    pub address: String,
    pub port: u16,
    pub tags: Vec<String>,
    pub health: Health,
    pub datacenter: String,
    /// `Service.Weights.Passing`.
    pub weight: u32,
}

impl Instance {
    /// A passing instance of `service` at `addr`, on a node of its own at the same address.
    pub fn new(id: &str, service: &str, addr: SocketAddr) -> Instance {
        Instance {
            id: id.into(),
            service: service.into(),
            node: format!("node-{id}"),
            node_address: addr.ip().to_string(),
            address: addr.ip().to_string(),
            port: addr.port(),
            tags: Vec::new(),
            health: Health::Passing,
            datacenter: DEFAULT_DC.into(),
            weight: 1,
        }
    }

    pub fn tags(mut self, tags: &[&str]) -> Instance {
        self.tags = tags.iter().map(|t| t.to_string()).collect();
        self
    }

    pub fn health(mut self, health: Health) -> Instance {
        self.health = health;
        self
    }

    pub fn weight(mut self, weight: u32) -> Instance {
        self.weight = weight;
        self
    }
}

/// How the simulator answers health queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// `500 Internal Server Error`, as an agent without a leader does.
    Fail500,
    /// `200` with a body that is not JSON.
    Garbage,
}

#[derive(Default)]
struct State {
    index: u64,
    /// The index of the last change to each service (absent: the global index).
    service_index: HashMap<String, u64>,
    instances: Vec<Instance>,
    mode: Option<Mode>,
    /// Required `X-Consul-Token`, if any (403 otherwise).
    token: Option<String>,
    /// Health queries received, per service.
    requests: HashMap<String, usize>,
    /// Connections open now, to cut them on `go_away`.
    connections: Vec<TcpStream>,
    /// Bumped by `reset_index`: held queries answer at once, with the new (lower) index, as
    /// Consul's do when its state store is replaced.
    resets: u64,
    /// Bumped by `go_away`, so held requests and accept loops of an old life end.
    life: u64,
    listening: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running simulator; stops listening when dropped.
pub struct ConsulSim {
    addr: SocketAddr,
    shared: Arc<Shared>,
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for ConsulSim {
    fn default() -> Self {
        Self::start()
    }
}

impl ConsulSim {
    /// Listens on 127.0.0.1, on a port of the system's choosing.
    pub fn start() -> ConsulSim {
        Self::start_with(None)
    }

    /// Listens like [`ConsulSim::start`], over TLS with the PEM certificate chain and key.
    pub fn start_tls(cert_chain: &Path, key: &Path) -> ConsulSim {
        use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
        let chain = CertificateDer::pem_file_iter(cert_chain)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .expect("simulator certificate chain");
        let key = PrivateKeyDer::from_pem_file(key).expect("simulator private key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("tls versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("simulator tls config");
        Self::start_with(Some(Arc::new(config)))
    }

    fn start_with(tls: Option<Arc<rustls::ServerConfig>>) -> ConsulSim {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind consul simulator");
        let addr = listener.local_addr().expect("simulator address");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                index: 1,
                mode: Some(Mode::Normal),
                ..State::default()
            }),
            changed: Condvar::new(),
        });
        let sim = ConsulSim { addr, shared, tls };
        sim.serve(listener);
        sim
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `consul://127.0.0.1:PORT`, or `consuls://` over TLS.
    pub fn uri(&self) -> String {
        let scheme = if self.tls.is_some() {
            "consuls"
        } else {
            "consul"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// The current global index.
    pub fn index(&self) -> u64 {
        self.shared.lock().index
    }

    /// Health queries received so far for `service`.
    pub fn requests(&self, service: &str) -> usize {
        self.shared
            .lock()
            .requests
            .get(service)
            .copied()
            .unwrap_or(0)
    }

    /// Adds or replaces (by id) an instance.
    pub fn register(&self, instance: Instance) {
        self.change(&instance.service.clone(), |state| {
            state.instances.retain(|i| i.id != instance.id);
            state.instances.push(instance);
        });
    }

    pub fn deregister(&self, id: &str) {
        for service in self.services_of(id) {
            self.change(&service, |state| state.instances.retain(|i| i.id != id));
        }
    }

    /// Sets the status of the instance's service check.
    pub fn set_health(&self, id: &str, health: Health) {
        for service in self.services_of(id) {
            self.change(&service, |state| {
                for instance in state.instances.iter_mut().filter(|i| i.id == id) {
                    instance.health = health;
                }
            });
        }
    }

    fn services_of(&self, id: &str) -> Vec<String> {
        let state = self.shared.lock();
        let mut services: Vec<String> = state
            .instances
            .iter()
            .filter(|i| i.id == id)
            .map(|i| i.service.clone())
            .collect();
        services.dedup();
        services
    }

    /// Sets the index to `index` (lower than now: a restarted agent or a restored snapshot;
    /// 0: the bug Consul's docs warn of), waking every held query.
    pub fn reset_index(&self, index: u64) {
        let mut state = self.shared.lock();
        state.index = index;
        for service_index in state.service_index.values_mut() {
            *service_index = index;
        }
        state.resets += 1;
        self.shared.changed.notify_all();
    }

    pub fn set_mode(&self, mode: Mode) {
        let mut state = self.shared.lock();
        state.mode = Some(mode);
        self.shared.changed.notify_all();
    }

    /// Answers 403 to queries without this `X-Consul-Token`.
    pub fn require_token(&self, token: &str) {
        self.shared.lock().token = Some(token.into());
    }

    /// Stops listening and cuts every open connection, as a dead agent would.
    pub fn go_away(&self) {
        let mut state = self.shared.lock();
        state.life += 1;
        state.listening = false;
        for connection in state.connections.drain(..) {
            let _ = connection.shutdown(Shutdown::Both);
        }
        self.shared.changed.notify_all();
        drop(state);
        // Wake the accept loop so it sees the new life and drops the listener.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        // Until the old listener is closed, a bind on the port would fail.
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect_timeout(&self.addr, Duration::from_millis(100)).is_ok()
            && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Listens again on the same port, with the catalog as it was.
    pub fn come_back(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.addr) {
                Ok(listener) => break listener,
                Err(error) if Instant::now() > deadline => {
                    panic!("simulator cannot listen again on {}: {error}", self.addr)
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        };
        self.serve(listener);
    }

    fn change(&self, service: &str, f: impl FnOnce(&mut State)) {
        let mut state = self.shared.lock();
        f(&mut state);
        state.index += 1;
        let index = state.index;
        state.service_index.insert(service.to_string(), index);
        self.shared.changed.notify_all();
    }

    fn serve(&self, listener: TcpListener) {
        let shared = Arc::clone(&self.shared);
        let tls = self.tls.clone();
        let life = {
            let mut state = shared.lock();
            state.listening = true;
            state.life
        };
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                // Answers are one write each; no need to wait for the client's ACK.
                let _ = stream.set_nodelay(true);
                {
                    let mut state = shared.lock();
                    if state.life != life {
                        return;
                    }
                    if let Ok(clone) = stream.try_clone() {
                        state.connections.push(clone);
                    }
                }
                let shared = Arc::clone(&shared);
                let tls = tls.clone();
                thread::spawn(move || match tls {
                    None => serve_connection(stream, &shared, life),
                    Some(config) => {
                        if let Ok(session) = rustls::ServerConnection::new(config) {
                            let stream = rustls::StreamOwned::new(session, stream);
                            serve_connection(stream, &shared, life);
                        }
                    }
                });
            }
        });
    }
}

impl Drop for ConsulSim {
    fn drop(&mut self) {
        if self.shared.lock().listening {
            self.go_away();
        }
    }
}

/// One parsed request.
struct Request {
    path: String,
    query: Vec<(String, String)>,
    token: Option<String>,
    close: bool,
}

fn serve_connection(stream: impl Read + Write, shared: &Shared, life: u64) {
    let mut reader = BufReader::new(stream);
    while let Some(request) = read_request(&mut reader) {
        let (status, index, body) = answer(&request, shared, life);
        let Some((status, index, body)) = status.map(|s| (s, index, body)) else {
            return; // the simulator went away while the request was held
        };
        let mut head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
        if let Some(index) = index {
            head.push_str(&format!("X-Consul-Index: {index}\r\n"));
        }
        head.push_str("\r\n");
        let mut response = head.into_bytes();
        response.extend_from_slice(&body);
        let writer = reader.get_mut();
        if writer.write_all(&response).is_err() || writer.flush().is_err() {
            return;
        }
        if request.close {
            return;
        }
    }
}

fn read_request(reader: &mut BufReader<impl Read>) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let (_method, target) = (parts.next()?, parts.next()?);
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut request = Request {
        path: percent_decode(path),
        query: query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect(),
        token: None,
        close: false,
    };
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).ok()? == 0 {
            return None;
        }
        let header = header.trim_end();
        if header.is_empty() {
            return Some(request);
        }
        if let Some((name, value)) = header.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("x-consul-token") {
                request.token = Some(value.to_string());
            } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close")
            {
                request.close = true;
            }
        }
    }
}

/// Status line, index header and body; `None` status when the simulator went away.
fn answer(request: &Request, shared: &Shared, life: u64) -> (Option<String>, Option<u64>, Vec<u8>) {
    let Some(service) = request.path.strip_prefix("/v1/health/service/") else {
        return (
            Some("404 Not Found".into()),
            None,
            b"not simulated".to_vec(),
        );
    };
    let param = |key: &str| {
        request
            .query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let tags: Vec<&str> = request
        .query
        .iter()
        .filter(|(k, _)| k == "tag")
        .map(|(_, v)| v.as_str())
        .collect();
    let passing = param("passing").is_some_and(|v| v.is_empty() || v == "true" || v == "1");
    let datacenter = param("dc").unwrap_or(DEFAULT_DC).to_string();
    let wanted_index: u64 = param("index").and_then(|i| i.parse().ok()).unwrap_or(0);
    let wait = param("wait")
        .and_then(parse_wait)
        .unwrap_or(Duration::from_secs(300));

    let mut state = shared.lock();
    *state.requests.entry(service.to_string()).or_insert(0) += 1;
    if state.token.is_some() && state.token != request.token {
        return (
            Some("403 Forbidden".into()),
            None,
            b"ACL not found".to_vec(),
        );
    }
    if datacenter != DEFAULT_DC && !state.instances.iter().any(|i| i.datacenter == datacenter) {
        return (
            Some("500 Internal Server Error".into()),
            None,
            b"No path to datacenter".to_vec(),
        );
    }
    // Blocking: hold while the index has not passed the one the client saw.
    let deadline = Instant::now() + wait;
    let service_index = |state: &State| {
        state
            .service_index
            .get(service)
            .copied()
            .unwrap_or(state.index)
    };
    while wanted_index > 0
        && service_index(&state) <= wanted_index
        && state.mode == Some(Mode::Normal)
        && state.life == life
    {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        state = shared
            .changed
            .wait_timeout(state, deadline - now)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
    if state.life != life {
        return (None, None, Vec::new());
    }
    match state.mode {
        Some(Mode::Fail500) => {
            return (
                Some("500 Internal Server Error".into()),
                None,
                b"rpc error: No cluster leader".to_vec(),
            )
        }
        Some(Mode::Garbage) => {
            return (
                Some("200 OK".into()),
                Some(service_index(&state)),
                b"{\"Node\": <html>oops".to_vec(),
            )
        }
        _ => {}
    }
    let entries: Vec<_> = state
        .instances
        .iter()
        .filter(|i| i.service == service && i.datacenter == datacenter)
        .filter(|i| tags.iter().all(|t| i.tags.iter().any(|have| have == t)))
        .filter(|i| !passing || i.health == Health::Passing)
        .map(|i| {
            json!({
                "Node": {"ID": format!("id-{}", i.node), "Node": i.node, "Address": i.node_address,
                         "Datacenter": i.datacenter, "TaggedAddresses": null, "Meta": {}},
                "Service": {"ID": i.id, "Service": i.service, "Tags": i.tags, "Address": i.address,
                            "Port": i.port, "Meta": {}, "Weights": {"Passing": i.weight, "Warning": 1},
                            "EnableTagOverride": false},
                "Checks": [
                    {"Node": i.node, "CheckID": "serfHealth", "Name": "Serf Health Status",
                     "Status": "passing", "ServiceID": "", "ServiceName": ""},
                    {"Node": i.node, "CheckID": format!("service:{}", i.id), "Name": "service check",
                     "Status": i.health.as_str(), "ServiceID": i.id, "ServiceName": i.service}
                ]
            })
        })
        .collect();
    let body = serde_json::to_vec(&entries).unwrap_or_default();
    (Some("200 OK".into()), Some(service_index(&state)), body)
}

/// Consul's `wait`: `10s`, `5m`, `100ms`.
fn parse_wait(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let wait = match unit {
        "ms" => Duration::from_millis(number),
        "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number * 60),
        _ => return None,
    };
    // Consul caps it at 10 minutes.
    Some(wait.min(Duration::from_secs(600)))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(byte) => {
                        out.push(byte);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            other => out.push(other),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
