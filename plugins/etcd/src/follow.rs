//! Following one service over etcd's v3 API: read every key under its prefix, then watch
//! from the revision right after that read so no change falls between the two; on compaction
//! or connection loss, read again. All watches share the backend's one client (one HTTP/2
//! connection per member).
//!
//! With several members, the client's balanced channel sends the retries to members at
//! random; each watch knows its member from etcd's response header, for the failover logs of
//! [`crate::service`].

#[cfg(test)]
use std::sync::Mutex;
use std::{collections::HashMap, future::Future, sync::Arc};

use embassy_plugin_api::{
    support::{Backoff, WatchSink},
    WatchRequest,
};
use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchOptions};
use tokio::sync::OnceCell;
use tracing::{debug, info};

use crate::{
    config::EtcdConfig,
    service::{Connection, Service, FIRST_BACKOFF},
};

/// Keys per range request when loading a prefix, so a large service never hits gRPC's message
/// size limit.
const PAGE: i64 = 1000;
/// Watch responses carry whole values; a large transaction can exceed gRPC's 4 MiB default.
const MAX_WATCH_MESSAGE: usize = 64 << 20;

#[cfg(test)]
pub(crate) type BeforeWatch = Box<dyn FnMut(i64) + Send>;

/// What all watches of one `--discovery` URI share.
pub(crate) struct Backend {
    config: EtcdConfig,
    options: ConnectOptions,
    client: OnceCell<Client>,
    connection: Connection,
    /// Member id to `name (client URLs)`, from etcd's member list, for logs.
    member_names: tokio::sync::Mutex<HashMap<u64, String>>,
    /// Runs between each read and the watch that follows it, with the read's revision.
    #[cfg(test)]
    before_watch: Mutex<Option<BeforeWatch>>,
}

impl Backend {
    pub(crate) fn new(config: EtcdConfig, options: ConnectOptions) -> Self {
        Backend {
            connection: Connection::new(&config),
            config,
            options,
            client: OnceCell::new(),
            member_names: tokio::sync::Mutex::new(HashMap::new()),
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

    #[cfg(test)]
    fn before_watch(&self, revision: i64) {
        if let Some(hook) = self
            .before_watch
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_mut()
        {
            hook(revision);
        }
    }
}

/// Why a watch stopped delivering.
enum WatchEnd {
    /// The revision it needed was compacted away: read again at once.
    Compacted(i64),
    Failed(String),
}

/// One service's prefix and range, and its state.
struct Followed {
    /// Everything the service's keys hold, with `/` appended: `/services/app/80/`.
    prefix: String,
    range_end: Vec<u8>,
    service: Service,
}

/// The watch task of one service; runs until aborted.
pub(crate) async fn follow(backend: Arc<Backend>, request: WatchRequest, sink: Arc<WatchSink>) {
    let prefix = key_prefix(request.service.as_str());
    let mut followed = Followed {
        range_end: prefix_end(prefix.as_bytes()),
        prefix,
        service: Service::new(request),
    };
    let mut backoff = Backoff::new(FIRST_BACKOFF, backend.config.backoff_max);
    loop {
        let revision = match followed.load(&backend).await {
            Ok(revision) => revision,
            Err(error) => {
                let wait =
                    followed
                        .service
                        .failed(&backend.connection, &sink, &error, &mut backoff);
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        followed.service.push(&sink);
        #[cfg(test)]
        backend.before_watch(revision);
        match followed
            .watch(&backend, &sink, revision + 1, &mut backoff)
            .await
        {
            WatchEnd::Compacted(compacted) => {
                info!(service = %followed.service.request.service, revision = revision + 1, compacted, "watch revision compacted, reading the prefix again");
            }
            WatchEnd::Failed(error) => {
                let wait =
                    followed
                        .service
                        .failed(&backend.connection, &sink, &error, &mut backoff);
                tokio::time::sleep(wait).await;
            }
        }
    }
}

impl Followed {
    /// Reads every key under the prefix, page by page at one revision; returns that revision.
    async fn load(&mut self, backend: &Backend) -> Result<i64, String> {
        let client = backend.client().await?;
        let mut kv = client.kv_client();
        let mut start = self.prefix.clone().into_bytes();
        let mut revision = 0;
        let mut pairs = Vec::new();
        loop {
            let options = GetOptions::new()
                .with_range(self.range_end.clone())
                .with_limit(PAGE)
                .with_revision(revision);
            let mut response = backend
                .timed(
                    &format!("reading {}", self.prefix),
                    kv.get(start.clone(), Some(options)),
                )
                .await?;
            if revision == 0 {
                revision = response.header().map_or(0, |header| header.revision());
            }
            let more = response.more();
            let page = response.take_kvs();
            match page.last() {
                Some(last) if more => {
                    start = last.key().to_vec();
                    start.push(0);
                    pairs.extend(page);
                }
                _ => {
                    pairs.extend(page);
                    break;
                }
            }
        }
        self.service.replace(
            revision,
            pairs.iter().map(|pair| {
                let key = String::from_utf8_lossy(pair.key()).into_owned();
                (key, pair.value(), pair.mod_revision())
            }),
        );
        Ok(revision)
    }

    /// Follows the prefix from `start_revision` until the watch ends.
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
                let member = match response.header() {
                    Some(header) => Some(backend.member_name(header.member_id()).await),
                    None => None,
                };
                self.service
                    .watching(&backend.connection, sink, member, backoff);
            }
            if response.events().is_empty() {
                continue;
            }
            for event in response.events() {
                let Some(pair) = event.kv() else { continue };
                let key = String::from_utf8_lossy(pair.key()).into_owned();
                match event.event_type() {
                    EventType::Put => self.service.put(key, pair.value(), pair.mod_revision()),
                    EventType::Delete => self.service.remove(&key),
                }
            }
            self.service.push(sink);
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
    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        time::Duration,
    };

    use embassy_plugin_api::Protocol;
    use embassy_tests::etcd::Etcd;

    use super::*;
    use crate::testing::{request, Following};

    fn backend(etcd: &Etcd) -> Arc<Backend> {
        let config = EtcdConfig::parse(&etcd.uri(), &Default::default()).expect("config");
        Arc::new(Backend::new(config, ConnectOptions::new()))
    }

    fn start(backend: &Arc<Backend>, request: WatchRequest) -> Following {
        let backend = Arc::clone(backend);
        Following::start(move |sink| follow(backend, request, sink))
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
        let following = start(&backend, request("/services/web/80", &[], Protocol::Tcp));
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
        let udp = start(&backend, request(prefix, &[], Protocol::Udp));
        let tcp = start(&backend, request(prefix, &[], Protocol::Tcp));
        let tagged = start(&backend, request(prefix, &["prod"], Protocol::Udp));
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
