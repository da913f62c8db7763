//! Following one service: read every key under its prefix, then watch from the revision right
//! after that read so no change falls between the two; on compaction or connection loss, read
//! again. All watches share the backend's one client (one HTTP/2 connection per member).
//!
//! With several members, a watch whose member goes away is a failover, not an outage: the
//! client's balanced channel sends the retries to members at random, so they are made
//! quickly for up to the request timeout before etcd is called unreachable. The log names
//! the member lost (each watch knows its member from etcd's response header) and the one the
//! watches moved to.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use embassy_plugin_api::{
    support::{Backoff, Selector, WatchSink},
    text::cut,
    BackendHealth, Exclusion, WatchRequest,
};
use etcd_client::{Client, ConnectOptions, EventType, GetOptions, KeyValue, WatchOptions};
use tokio::sync::OnceCell;
use tracing::{debug, info, warn};

use crate::{config::EtcdConfig, instances::parse_instance, instances::Instance};

/// Keys per range request when loading a prefix, so a large service never hits gRPC's message
/// size limit.
const PAGE: i64 = 1000;
/// Watch responses carry whole values; a large transaction can exceed gRPC's 4 MiB default.
const MAX_WATCH_MESSAGE: usize = 64 << 20;
/// First wait of the reconnect backoff, and of each quick retry while failing over.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

#[cfg(test)]
type BeforeWatch = Box<dyn FnMut(i64) + Send>;

/// What all watches of one `--discovery` URI share.
pub(crate) struct Backend {
    config: EtcdConfig,
    options: ConnectOptions,
    client: OnceCell<Client>,
    /// The plugin-wide view of the connection, so a state change is logged once.
    reachable: Mutex<Option<bool>>,
    /// Member id to `name (client URLs)`, from etcd's member list, for logs.
    member_names: tokio::sync::Mutex<HashMap<u64, String>>,
    /// Members whose watches broke and that no watch has used since (a loss is logged once).
    lost_members: Mutex<HashSet<u64>>,
    /// The member lost last, until a watch is created on another one (logged then, once).
    failing_over_from: Mutex<Option<String>>,
    /// Runs between each read and the watch that follows it, with the read's revision.
    #[cfg(test)]
    before_watch: Mutex<Option<BeforeWatch>>,
}

impl Backend {
    pub(crate) fn new(config: EtcdConfig, options: ConnectOptions) -> Self {
        Backend {
            config,
            options,
            client: OnceCell::new(),
            reachable: Mutex::new(None),
            member_names: tokio::sync::Mutex::new(HashMap::new()),
            lost_members: Mutex::new(HashSet::new()),
            failing_over_from: Mutex::new(None),
            #[cfg(test)]
            before_watch: Mutex::new(None),
        }
    }

    /// The shared client, created by the first watch that needs it (creation only talks to
    /// etcd when a user must authenticate, so it can fail and is then retried).
    async fn client(&self) -> Result<Client, String> {
        let client = self
            .client
            .get_or_try_init(|| {
                self.timed(
                    "connecting to etcd",
                    Client::connect(self.config.endpoints.clone(), Some(self.options.clone())),
                )
            })
            .await?;
        Ok(client.clone())
    }

    /// Runs `request` with the configured deadline (a balanced channel with no member up would
    /// otherwise wait forever).
    async fn timed<T, E: std::fmt::Display>(
        &self,
        what: &str,
        request: impl Future<Output = Result<T, E>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(self.config.request_timeout, request).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(format!("{what}: {error}")),
            Err(_) => Err(format!(
                "{what}: no answer within {:?}",
                self.config.request_timeout
            )),
        }
    }

    /// `name (client URLs)` of a member, from etcd's member list (read when an id is new).
    async fn member_name(&self, id: u64) -> String {
        let mut names = self.member_names.lock().await;
        if !names.contains_key(&id) {
            if let Ok(client) = self.client().await {
                let mut cluster = client.cluster_client();
                match self.timed("listing members", cluster.member_list()).await {
                    Ok(list) => {
                        for member in list.members() {
                            let urls = member.client_urls().join(",");
                            names.insert(member.id(), format!("{} ({urls})", member.name()));
                        }
                    }
                    Err(error) => debug!(%error, "cannot name etcd members"),
                }
            }
        }
        names.get(&id).cloned().unwrap_or_else(|| format!("{id:x}"))
    }

    /// A watch on `member` broke; the first watch to see it logs it.
    fn member_lost(&self, member: u64, name: String, error: &str) {
        let first = self
            .lost_members
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(member);
        if first {
            let members = self.config.endpoints.join(",");
            warn!(member = %name, %members, %error, "etcd member lost, failing over to the other members");
            *self
                .failing_over_from
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(name);
        }
    }

    /// A watch was created on `member`: logs a failover that this completes.
    fn watching_on(&self, member: u64, name: &str) {
        self.lost_members
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&member);
        let from = self
            .failing_over_from
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take_if(|from| from != name);
        if let Some(from) = from {
            info!(from = %from, to = %name, "etcd watches failed over to another member");
        }
    }

    fn note(&self, reachable: bool, detail: &str) {
        let mut last = self
            .reachable
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if *last == Some(reachable) {
            return;
        }
        let members = self.config.endpoints.join(",");
        match (reachable, *last) {
            (true, None) => info!(%members, "connected to etcd"),
            (true, _) => info!(%members, "etcd reachable again, services re-read"),
            (false, _) => {
                warn!(%members, %detail, "etcd unreachable, keeping the last known endpoints; retrying")
            }
        }
        *last = Some(reachable);
    }
}

/// Why a watch stopped delivering.
enum WatchEnd {
    /// The revision it needed was compacted away: read again at once.
    Compacted(i64),
    Failed(String),
}

/// One service's state between reads and events.
struct Service {
    request: WatchRequest,
    /// Everything the service's keys hold, with `/` appended: `/services/app/80/`.
    prefix: String,
    range_end: Vec<u8>,
    instances: BTreeMap<String, Instance>,
    /// Keys whose value is no instance: the revision warned about, and why.
    skipped: BTreeMap<String, (i64, String)>,
    /// This watch's view of the connection, reported to the host on changes only.
    unreachable: bool,
    /// The member the live watch is on (from the header of etcd's answer).
    member: Option<u64>,
    /// Since when the service has been retrying after its member was lost.
    failing_over_since: Option<Instant>,
}

/// The watch task of one service; runs until aborted.
pub(crate) async fn follow(backend: Arc<Backend>, request: WatchRequest, sink: Arc<WatchSink>) {
    let prefix = key_prefix(request.service.as_str());
    let mut service = Service {
        range_end: prefix_end(prefix.as_bytes()),
        prefix,
        request,
        instances: BTreeMap::new(),
        skipped: BTreeMap::new(),
        unreachable: false,
        member: None,
        failing_over_since: None,
    };
    let mut backoff = Backoff::new(FIRST_BACKOFF, backend.config.backoff_max);
    loop {
        let revision = match service.load(&backend).await {
            Ok(revision) => revision,
            Err(error) => {
                let wait = service.failed(&backend, &sink, &error, &mut backoff).await;
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        service.push(&sink);
        #[cfg(test)]
        if let Some(hook) = backend
            .before_watch
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_mut()
        {
            hook(revision);
        }
        match service
            .watch(&backend, &sink, revision + 1, &mut backoff)
            .await
        {
            WatchEnd::Compacted(compacted) => {
                info!(service = %service.request.service, revision = revision + 1, compacted, "watch revision compacted, reading the prefix again");
            }
            WatchEnd::Failed(error) => {
                let wait = service.failed(&backend, &sink, &error, &mut backoff).await;
                tokio::time::sleep(wait).await;
            }
        }
    }
}

impl Service {
    /// Reads every key under the prefix, page by page at one revision; returns that revision.
    async fn load(&mut self, backend: &Backend) -> Result<i64, String> {
        let client = backend.client().await?;
        let mut kv = client.kv_client();
        let mut start = self.prefix.clone().into_bytes();
        let mut revision = 0;
        let mut instances = BTreeMap::new();
        let mut seen = HashSet::new();
        loop {
            let options = GetOptions::new()
                .with_range(self.range_end.clone())
                .with_limit(PAGE)
                .with_revision(revision);
            let response = backend
                .timed(
                    &format!("reading {}", self.prefix),
                    kv.get(start.clone(), Some(options)),
                )
                .await?;
            if revision == 0 {
                revision = response.header().map_or(0, |header| header.revision());
            }
            for pair in response.kvs() {
                let key = String::from_utf8_lossy(pair.key()).into_owned();
                if let Some(instance) = self.admit(&key, pair) {
                    instances.insert(key.clone(), instance);
                }
                seen.insert(key);
            }
            match response.kvs().last() {
                Some(last) if response.more() => {
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => break,
            }
        }
        self.skipped.retain(|key, _| seen.contains(key));
        debug!(service = %self.request.service, keys = seen.len(), instances = instances.len(), revision, "prefix read");
        self.instances = instances;
        Ok(revision)
    }

    /// Follows the prefix from `start_revision` until the watch ends. Only a watch that etcd
    /// accepted counts as being back in touch (resets `backoff`, reports reachable): a read that
    /// works beside a watch that keeps failing must not log every retry.
    async fn watch(
        &mut self,
        backend: &Backend,
        sink: &WatchSink,
        start_revision: i64,
        backoff: &mut Backoff,
    ) -> WatchEnd {
        let client = match backend.client().await {
            Ok(client) => client,
            Err(error) => return WatchEnd::Failed(error),
        };
        let mut watch_client = client
            .watch_client()
            .max_decoding_message_size(MAX_WATCH_MESSAGE);
        let options = WatchOptions::new()
            .with_range(self.range_end.clone())
            .with_start_revision(start_revision);
        let mut stream = match backend
            .timed(
                &format!("watching {}", self.prefix),
                watch_client.watch(self.prefix.clone(), Some(options)),
            )
            .await
        {
            Ok(stream) => stream,
            Err(error) => return WatchEnd::Failed(error),
        };
        loop {
            let response = match stream.message().await {
                Ok(Some(response)) => response,
                Ok(None) => return WatchEnd::Failed("etcd closed the watch stream".into()),
                Err(error) => return WatchEnd::Failed(format!("watch stream: {error}")),
            };
            if response.compact_revision() > 0 {
                return WatchEnd::Compacted(response.compact_revision());
            }
            if response.canceled() {
                return WatchEnd::Failed(format!(
                    "etcd cancelled the watch: {}",
                    response.cancel_reason()
                ));
            }
            if response.created() {
                if let Some(header) = response.header() {
                    let member = header.member_id();
                    self.member = Some(member);
                    let name = backend.member_name(member).await;
                    debug!(service = %self.request.service, member = %name, "watching");
                    backend.watching_on(member, &name);
                }
                self.failing_over_since = None;
                self.found(backend, sink);
                backoff.reset();
            }
            if response.events().is_empty() {
                continue;
            }
            for event in response.events() {
                let Some(pair) = event.kv() else { continue };
                let key = String::from_utf8_lossy(pair.key()).into_owned();
                match event.event_type() {
                    EventType::Put => match self.admit(&key, pair) {
                        Some(instance) => {
                            self.instances.insert(key, instance);
                        }
                        None => {
                            self.instances.remove(&key);
                        }
                    },
                    EventType::Delete => {
                        self.instances.remove(&key);
                        self.skipped.remove(&key);
                    }
                }
            }
            self.push(sink);
        }
    }

    /// The instance a key holds, or `None` after one warning per key and revision.
    fn admit(&mut self, key: &str, pair: &KeyValue) -> Option<Instance> {
        match parse_instance(key, pair.value()) {
            Ok(instance) => {
                self.skipped.remove(key);
                Some(instance)
            }
            Err(error) => {
                let revision = pair.mod_revision();
                if self.skipped.get(key).map(|(r, _)| *r) != Some(revision) {
                    // The key is cut like the value: etcd allows keys of up to 1.5 MB.
                    warn!(service = %self.request.service, key = %cut(key), %error, "skipping an etcd value that is no instance");
                    self.skipped
                        .insert(key.to_string(), (revision, error.to_string()));
                }
                None
            }
        }
    }

    /// Sends the set, with every key left out and why (the sink drops a repeat).
    fn push(&mut self, sink: &WatchSink) {
        let mut selector = Selector::new(&self.request);
        for (key, (_, error)) in &self.skipped {
            selector.exclude(key, Exclusion::UNREADABLE, error.clone());
        }
        for (key, instance) in &self.instances {
            selector.offer(key, instance.endpoint(), instance.protocol);
        }
        let (endpoints, excluded) = selector.finish();
        sink.update_explained(endpoints, excluded);
    }

    /// After a failed read or watch: how long to wait before the next try. A watch whose
    /// member broke, with other members configured, starts a failover: quick retries, and etcd
    /// counts as unreachable only if none answers within the request timeout.
    async fn failed(
        &mut self,
        backend: &Backend,
        sink: &WatchSink,
        error: &str,
        backoff: &mut Backoff,
    ) -> Duration {
        if let Some(member) = self.member.take() {
            if backend.config.endpoints.len() > 1 {
                let name = backend.member_name(member).await;
                backend.member_lost(member, name, error);
                self.failing_over_since = Some(Instant::now());
            }
        }
        if let Some(since) = self.failing_over_since {
            if since.elapsed() < backend.config.request_timeout {
                debug!(service = %self.request.service, %error, "failing over: retrying on another etcd member");
                return FIRST_BACKOFF;
            }
            self.failing_over_since = None;
        }
        self.lost(backend, sink, error);
        backoff.next_wait()
    }

    fn lost(&mut self, backend: &Backend, sink: &WatchSink, error: &str) {
        backend.note(false, error);
        if !self.unreachable {
            self.unreachable = true;
            sink.report(
                BackendHealth::Unreachable,
                &format!("{error}; keeping the last known endpoints"),
            );
        }
    }

    fn found(&mut self, backend: &Backend, sink: &WatchSink) {
        backend.note(true, "");
        if self.unreachable {
            self.unreachable = false;
            sink.report(
                BackendHealth::Reachable,
                "prefix re-read after reconnecting",
            );
        }
    }
}

/// The service's key prefix ending in `/`, so `/app/80` does not also match `/app/8080/..`.
fn key_prefix(service: &str) -> String {
    if service.ends_with('/') {
        service.to_string()
    } else {
        format!("{service}/")
    }
}

/// The end of etcd's range for "every key starting with `prefix`".
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Only 0xff bytes: every key from the prefix on (etcd's "\0" range end).
    vec![0]
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use abi_stable::std_types::{RStr, RVec};
    use embassy_plugin_api::{Endpoint, EndpointSink, HostSink, Protocol};
    use embassy_tests::etcd::Etcd;

    use super::*;
    use crate::config::EtcdConfig;

    /// Records every set the plugin pushes, as sorted address lists.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<Vec<String>>>>);

    impl EndpointSink for Recorder {
        fn update(&self, endpoints: RVec<Endpoint>) {
            let mut set: Vec<String> = endpoints.iter().map(|e| e.address.to_string()).collect();
            set.sort();
            self.0.lock().expect("recorder").push(set);
        }

        fn report(&self, _: BackendHealth, _: RStr<'_>) {}
    }

    fn request(service: &str, tags: &[&str], protocol: Protocol) -> WatchRequest {
        WatchRequest::new(service, tags, protocol)
    }

    fn backend(etcd: &Etcd) -> Arc<Backend> {
        let config = EtcdConfig::parse(&etcd.uri(), &Default::default()).expect("config");
        Arc::new(Backend::new(config, ConnectOptions::new()))
    }

    /// Runs the real watch loop for `request` on its own runtime, recording what it pushes.
    struct Following {
        recorder: Recorder,
        _runtime: tokio::runtime::Runtime,
    }

    impl Following {
        fn start(backend: Arc<Backend>, request: WatchRequest) -> Following {
            let recorder = Recorder::default();
            let sink = Arc::new(WatchSink::new(HostSink::from_impl(recorder.clone())));
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            runtime.spawn(follow(backend, request, sink));
            Following {
                recorder,
                _runtime: runtime,
            }
        }

        /// Waits (at most 10 s) until `addresses` (sorted) was pushed.
        fn wait_for(&self, addresses: &[&str]) {
            let wanted: Vec<String> = addresses.iter().map(|a| a.to_string()).collect();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !self.sets().contains(&wanted) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "waiting for {wanted:?}; sets: {:?}",
                    self.sets()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }

        fn sets(&self) -> Vec<Vec<String>> {
            self.recorder.0.lock().expect("recorder").clone()
        }
    }

    /// The revision a watch needs is compacted away between the read and the watch: the
    /// watch is refused, the loop reads again, and the change made meanwhile arrives.
    #[test]
    fn a_compacted_watch_revision_is_recovered_by_reading_again() {
        let etcd = Arc::new(Etcd::start());
        etcd.put("/services/web/80/a", "127.0.0.1:1001");
        let backend = backend(&etcd);
        let reads = Arc::new(AtomicUsize::new(0));
        let (hook_etcd, hook_reads) = (Arc::clone(&etcd), Arc::clone(&reads));
        *backend.before_watch.lock().expect("hook") = Some(Box::new(move |revision| {
            if hook_reads.fetch_add(1, Ordering::SeqCst) == 0 {
                // A change, then the history the watch would start from is gone.
                // (etcd refuses a watch that starts *below* the compaction revision.)
                assert_eq!(
                    hook_etcd.put("/services/web/80/b", "127.0.0.1:1002"),
                    revision + 1
                );
                let newest = hook_etcd.put("/elsewhere", "x");
                hook_etcd.compact(newest);
            }
        }));
        let following = Following::start(backend, request("/services/web/80", &[], Protocol::Tcp));
        following.wait_for(&["127.0.0.1:1001", "127.0.0.1:1002"]);
        assert_eq!(
            reads.load(Ordering::SeqCst),
            2,
            "one read, then one after the compaction"
        );
        assert_eq!(
            following.sets(),
            vec![
                vec!["127.0.0.1:1001".to_string()],
                vec!["127.0.0.1:1001".to_string(), "127.0.0.1:1002".to_string()]
            ]
        );
    }

    /// UDP descriptors get the instances that say UDP, whatever the format says it with.
    #[test]
    fn udp_requests_get_udp_instances_only() {
        let etcd = Etcd::start();
        let prefix = "/services/dns/53";
        etcd.put(
            &format!("{prefix}/1/a"),
            r#"{"ipaddress": "127.0.0.1", "host_port": "5301", "proto": "udp"}"#,
        );
        etcd.put(
            &format!("{prefix}/2/b"),
            r#"{"ipaddress": "127.0.0.1", "host_port": "5302", "proto": "tcp"}"#,
        );
        etcd.put(
            &format!("{prefix}/3/c"),
            r#"{"ipaddress": "127.0.0.1", "host_port": "5303", "tags": ["prod", "udp"]}"#,
        );
        etcd.put(&format!("{prefix}/host:dns:53:udp"), "127.0.0.1:5304");
        etcd.put(&format!("{prefix}/host:dns:53"), "127.0.0.1:5305");
        let backend = backend(&etcd);
        let udp = Following::start(Arc::clone(&backend), request(prefix, &[], Protocol::Udp));
        let tcp = Following::start(Arc::clone(&backend), request(prefix, &[], Protocol::Tcp));
        let tagged = Following::start(backend, request(prefix, &["prod"], Protocol::Udp));
        udp.wait_for(&["127.0.0.1:5301", "127.0.0.1:5303", "127.0.0.1:5304"]);
        tcp.wait_for(&["127.0.0.1:5302", "127.0.0.1:5305"]);
        tagged.wait_for(&["127.0.0.1:5303"]);
        // A change moves only the sets it concerns (the TCP watch hears of one more instance
        // left out, with its set unchanged).
        etcd.put(
            &format!("{prefix}/4/d"),
            r#"{"ipaddress": "127.0.0.1", "host_port": "5306", "proto": "udp"}"#,
        );
        udp.wait_for(&[
            "127.0.0.1:5301",
            "127.0.0.1:5303",
            "127.0.0.1:5304",
            "127.0.0.1:5306",
        ]);
        std::thread::sleep(Duration::from_millis(200));
        let tcp_sets = tcp.sets();
        assert!(
            tcp_sets.iter().all(|set| set == &tcp_sets[0]),
            "{tcp_sets:?}"
        );
    }

    #[test]
    fn prefixes_cover_exactly_the_service() {
        assert_eq!(
            key_prefix("/services/prod/app1/80"),
            "/services/prod/app1/80/"
        );
        assert_eq!(
            key_prefix("/services/prod/app1/80/"),
            "/services/prod/app1/80/"
        );
        assert_eq!(
            prefix_end(b"/services/app/80/"),
            b"/services/app/800".to_vec()
        );
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
