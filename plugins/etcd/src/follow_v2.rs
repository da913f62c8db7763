//! Following one service over etcd's v2 HTTP API (`etcd2://`): read the directory
//! recursively, then long-poll for its next event from the index right after that read
//! (`wait=true&recursive=true&waitIndex=`), one event per poll. etcd keeps only the last 1000
//! events: a watch that fell further behind is refused (error 401) and the directory is read
//! again. Outages and failovers follow [`crate::service`]'s rules, as for v3.
//!
//! HTTP/1.1 has no pings: a long poll is renewed every [`WATCH_RENEWAL`] (a member that hangs
//! is noticed then) and the client's TCP keepalive notices a vanished peer. Each watch holds
//! its own connection while it polls.
//!
//! Requests go to one member at a time, the first configured to begin with; a failed request
//! moves every watch to the next one. The v2 API has no equivalent of v3's "require leader":
//! a member cut off from its cluster keeps answering from its last state.

#[cfg(test)]
use std::sync::Mutex;
use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use embassy_plugin_api::{
    support::{Backoff, WatchSink},
    WatchRequest,
};
use reqwest::{Client, RequestBuilder, StatusCode, Url};
use tracing::info;

use crate::{
    config::EtcdConfig,
    keys_v2::{self, Change, V2Error, INDEX_CLEARED, KEY_NOT_FOUND},
    service::{Connection, Service, FIRST_BACKOFF},
};

/// How long one long poll waits for an event before it is made again. No event meanwhile
/// means none happened under the directory up to now, so the renewed poll starts from the
/// index etcd had when the last one began: a quiet service in a busy cluster is not pushed
/// out of the event history.
const WATCH_RENEWAL: Duration = Duration::from_secs(30);

#[cfg(test)]
pub(crate) type BeforeWatch = Box<dyn FnMut(i64) + Send>;

/// What all watches of one `--discovery` URI share.
pub(crate) struct Backend {
    config: EtcdConfig,
    client: Client,
    connection: Connection,
    /// The index in `config.endpoints` of the member requests go to.
    current: AtomicUsize,
    /// [`WATCH_RENEWAL`], shorter in tests.
    renewal: Duration,
    /// Runs between each read and the watch that follows it, with the read's index.
    #[cfg(test)]
    before_watch: Mutex<Option<BeforeWatch>>,
}

impl Backend {
    pub(crate) fn new(config: EtcdConfig, client: Client) -> Self {
        Backend {
            connection: Connection::new(&config),
            config,
            client,
            current: AtomicUsize::new(0),
            renewal: WATCH_RENEWAL,
            #[cfg(test)]
            before_watch: Mutex::new(None),
        }
    }

    fn member(&self) -> usize {
        self.current.load(Ordering::Relaxed) % self.config.endpoints.len().max(1)
    }

    /// A request to `member` failed: move on to the next member, unless another watch did.
    fn member_failed(&self, member: usize) {
        let next = (member + 1) % self.config.endpoints.len().max(1);
        let _ = self
            .current
            .compare_exchange(member, next, Ordering::Relaxed, Ordering::Relaxed);
    }

    fn member_url(&self, member: usize) -> &str {
        self.config.endpoints.get(member).map_or("", String::as_str)
    }

    /// `GET /v2/keys<dir>?query` on `member`, with the user's credentials.
    fn get(
        &self,
        member: usize,
        dir: &str,
        query: &[(&str, &str)],
    ) -> Result<RequestBuilder, String> {
        let base = self.member_url(member);
        let mut url = Url::parse(base).map_err(|error| format!("member {base}: {error}"))?;
        {
            let mut path = url
                .path_segments_mut()
                .map_err(|()| format!("member {base} cannot carry a path"))?;
            path.clear().extend(["v2", "keys"]);
            if dir.is_empty() {
                path.push("");
            } else {
                path.extend(dir.split('/').skip(1));
            }
        }
        let mut request = self.client.get(url).query(query);
        if let Some((name, password)) = &self.config.user {
            request = request.basic_auth(name, Some(password));
        }
        Ok(request)
    }

    /// Runs `request` with the configured deadline.
    async fn timed<T>(
        &self,
        request: impl std::future::Future<Output = Result<T, reqwest::Error>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(self.config.request_timeout, request).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(chain(&error)),
            Err(_) => Err(format!(
                "no answer within {:?}",
                self.config.request_timeout
            )),
        }
    }

    #[cfg(test)]
    fn before_watch(&self, index: i64) {
        if let Some(hook) = self
            .before_watch
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_mut()
        {
            hook(index);
        }
    }
}

/// Why a watch stopped delivering.
enum WatchEnd {
    /// The events it needed are gone from etcd's history: read again at once.
    Cleared {
        wanted: i64,
        current: i64,
    },
    /// An event it cannot apply (an action etcd's docs do not name): read again at once.
    Unknown(V2Error),
    Failed(String),
}

/// One service's directory and state.
struct Followed {
    /// As etcd spells keys: `/services/redis`.
    dir: String,
    service: Service,
}

/// The watch task of one service; runs until aborted.
pub(crate) async fn follow(backend: Arc<Backend>, request: WatchRequest, sink: Arc<WatchSink>) {
    let mut followed = Followed {
        dir: keys_v2::directory(request.service.as_str()),
        service: Service::new(request),
    };
    let mut backoff = Backoff::new(FIRST_BACKOFF, backend.config.backoff_max);
    loop {
        let index = match followed.load(&backend).await {
            Ok(index) => index,
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
        backend.before_watch(index);
        match followed
            .watch(&backend, &sink, index + 1, &mut backoff)
            .await
        {
            WatchEnd::Cleared { wanted, current } => {
                info!(service = %followed.service.request.service, index = wanted, current, "etcd event index cleared, reading the prefix again");
            }
            WatchEnd::Unknown(error) => {
                info!(service = %followed.service.request.service, %error, "reading the prefix again");
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
    /// Reads every key under the directory; returns etcd's index then. The member answers
    /// from its own store, as its watches do: a read through the leader (`quorum=true`) would
    /// hang for the whole timeout while the cluster elects a new leader, turning a failover
    /// into an outage.
    async fn load(&mut self, backend: &Backend) -> Result<i64, String> {
        let member = backend.member();
        let result = self.read(backend, member).await;
        if result.is_err() {
            backend.member_failed(member);
        }
        result.map_err(|error| {
            format!(
                "reading {} on {}: {error}",
                self.dir,
                backend.member_url(member)
            )
        })
    }

    async fn read(&mut self, backend: &Backend, member: usize) -> Result<i64, String> {
        let request = backend.get(member, &self.dir, &[("recursive", "true")])?;
        let response = backend.timed(request.send()).await?;
        let status = response.status();
        let index = keys_v2::index(
            response
                .headers()
                .get("X-Etcd-Index")
                .map(|value| value.as_bytes()),
        );
        let body = backend.timed(response.bytes()).await?;
        let leaves = match status {
            StatusCode::OK => keys_v2::read(&self.dir, &body).map_err(|e| e.to_string())?,
            _ => match keys_v2::error(status.as_u16(), &body) {
                // No key was ever written under the directory: no instance yet.
                V2Error::Etcd {
                    code: KEY_NOT_FOUND,
                    ..
                } => Vec::new(),
                error => return Err(error.to_string()),
            },
        };
        let index = index.map_err(|error| error.to_string())?;
        self.service.replace(
            index,
            leaves
                .iter()
                .map(|leaf| (leaf.key.clone(), leaf.value.as_bytes(), leaf.index)),
        );
        Ok(index)
    }

    /// Follows the directory from `start_index` until the watch ends; a failed one moves
    /// the watches to the next member.
    async fn watch(
        &mut self,
        backend: &Backend,
        sink: &WatchSink,
        start_index: i64,
        backoff: &mut Backoff,
    ) -> WatchEnd {
        let member = backend.member();
        let end = self.poll(backend, member, sink, start_index, backoff).await;
        if let WatchEnd::Failed(_) = end {
            backend.member_failed(member);
        }
        end
    }

    async fn poll(
        &mut self,
        backend: &Backend,
        member: usize,
        sink: &WatchSink,
        start_index: i64,
        backoff: &mut Backoff,
    ) -> WatchEnd {
        let name = backend.member_url(member).to_string();
        let dir = self.dir.clone();
        let failed = |error: String| WatchEnd::Failed(format!("watching {dir} on {name}: {error}"));
        let mut wait_index = start_index;
        let mut accepted = false;
        loop {
            let index = wait_index.to_string();
            let request = match backend.get(
                member,
                &dir,
                &[
                    ("wait", "true"),
                    ("recursive", "true"),
                    ("waitIndex", &index),
                ],
            ) {
                Ok(request) => request,
                Err(error) => return failed(error),
            };
            // etcd answers a long poll's headers at once; the event comes as the body.
            let response = match backend.timed(request.send()).await {
                Ok(response) => response,
                Err(error) => return failed(error),
            };
            let status = response.status();
            if status != StatusCode::OK {
                let body = match backend.timed(response.bytes()).await {
                    Ok(body) => body,
                    Err(error) => return failed(error),
                };
                return match keys_v2::error(status.as_u16(), &body) {
                    V2Error::Etcd {
                        code: INDEX_CLEARED,
                        index: current,
                        ..
                    } => WatchEnd::Cleared {
                        wanted: wait_index,
                        current,
                    },
                    error => failed(error.to_string()),
                };
            }
            // The store's index when the poll began: no event under the directory up to it
            // (the poll would have answered with it at once).
            let polled_at = keys_v2::index(
                response
                    .headers()
                    .get("X-Etcd-Index")
                    .map(|value| value.as_bytes()),
            )
            .ok();
            if !accepted {
                accepted = true;
                self.service
                    .watching(&backend.connection, sink, Some(name.clone()), backoff);
            }
            let body = match tokio::time::timeout(backend.renewal, response.bytes()).await {
                Ok(Ok(body)) => body,
                Ok(Err(error)) => return failed(chain(&error)),
                Err(_) => {
                    if let Some(polled_at) = polled_at {
                        wait_index = wait_index.max(polled_at + 1);
                    }
                    continue;
                }
            };
            let (index, change) = match keys_v2::event(&dir, &body) {
                Ok(event) => event,
                Err(error @ V2Error::Action(_)) => return WatchEnd::Unknown(error),
                Err(error) => return failed(error.to_string()),
            };
            match change {
                Change::Put(leaf) => self
                    .service
                    .put(leaf.key, leaf.value.as_bytes(), leaf.index),
                Change::Removed(key) => self.service.remove(&key),
                Change::RemovedAll(prefix) => self.service.remove_prefixed(&prefix),
                Change::Nothing => {}
            }
            self.service.push(sink);
            wait_index = wait_index.max(index + 1);
        }
    }
}

/// reqwest's error with its causes: its own text omits why ("error sending request").
fn chain(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use embassy_plugin_api::Protocol;
    use embassy_tests::etcd::Etcd;

    use super::*;
    use crate::testing::{request, Following};

    fn backend(etcd: &Etcd) -> Backend {
        let config = EtcdConfig::parse(&etcd.uri_v2(), &Default::default()).expect("config");
        Backend::new(config, Client::new())
    }

    fn start(backend: &Arc<Backend>, request: WatchRequest) -> Following {
        let backend = Arc::clone(backend);
        Following::start(move |sink| follow(backend, request, sink))
    }

    /// Counts the reads (each is followed by a watch) and runs `then` with the count before
    /// this read and the read's index.
    fn count_reads(
        backend: &Backend,
        mut then: impl FnMut(usize, i64) + Send + 'static,
    ) -> Arc<AtomicUsize> {
        let reads = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&reads);
        *backend.before_watch.lock().expect("hook") = Some(Box::new(move |index| {
            then(counted.fetch_add(1, Ordering::SeqCst), index);
        }));
        reads
    }

    /// More than 1000 writes between the read and the watch: the watch's index is cleared
    /// from etcd's history (error 401), the loop reads again, and the change made meanwhile
    /// arrives.
    #[test]
    fn a_cleared_watch_index_is_recovered_by_reading_again() {
        let etcd = Arc::new(Etcd::start_v2(None));
        etcd.v2_put("/services/web/web/a", "127.0.0.1:1001", None);
        let backend = backend(&etcd);
        let writer = Arc::clone(&etcd);
        let reads = count_reads(&backend, move |before, index| {
            if before == 0 {
                assert_eq!(
                    writer.v2_put("/services/web/web/b", "127.0.0.1:1002", None),
                    index + 1
                );
                for n in 0..1100 {
                    writer.v2_put("/elsewhere/churn", &n.to_string(), None);
                }
            }
        });
        let following = start(
            &Arc::new(backend),
            request("/services/web", &[], Protocol::Tcp),
        );
        following.wait_for(&["127.0.0.1:1001", "127.0.0.1:1002"]);
        assert_eq!(
            reads.load(Ordering::SeqCst),
            2,
            "one read, then one after the 401"
        );
        assert_eq!(following.reports(), Vec::<String>::new(), "no outage");
        assert_eq!(
            following.sets(),
            vec![
                vec!["127.0.0.1:1001".to_string()],
                vec!["127.0.0.1:1001".to_string(), "127.0.0.1:1002".to_string()]
            ]
        );
    }

    /// A long poll renewed while the cluster is busy elsewhere starts from where the last
    /// poll began, so a quiet service is not pushed out of the event history: 1200 writes
    /// elsewhere, spread over many renewals, and the next change arrives without a re-read.
    #[test]
    fn renewed_polls_keep_a_quiet_service_in_the_event_history() {
        let etcd = Etcd::start_v2(None);
        etcd.v2_put("/services/web/web/a", "127.0.0.1:1001", None);
        let mut backend = backend(&etcd);
        backend.renewal = Duration::from_millis(50);
        let reads = count_reads(&backend, |_, _| {});
        let following = start(
            &Arc::new(backend),
            request("/services/web", &[], Protocol::Tcp),
        );
        following.wait_for(&["127.0.0.1:1001"]);
        for n in 0..1200 {
            etcd.v2_put("/elsewhere/churn", &n.to_string(), None);
        }
        // At least one renewal after the last write, so that one starts past them all.
        std::thread::sleep(Duration::from_millis(200));
        etcd.v2_put("/services/web/web/b", "127.0.0.1:1002", None);
        following.wait_for(&["127.0.0.1:1001", "127.0.0.1:1002"]);
        assert_eq!(reads.load(Ordering::SeqCst), 1, "no read after the first");
    }

    /// registrator's tree: keys at any depth under the service's directory; deleting or
    /// expiring a directory removes every key under it, and only those.
    #[test]
    fn keys_at_any_depth_and_whole_directories_removed() {
        let etcd = Etcd::start_v2(None);
        etcd.v2_put("/services/redis/redis/host:r1:6379", "127.0.0.1:2001", None);
        etcd.v2_put("/services/redis/cache/host:c1:6379", "127.0.0.1:2002", None);
        etcd.v2_put("/services/redis/flat", "127.0.0.1:2003", None);
        // A neighbour whose name merely starts the same.
        etcd.v2_put("/services/redis2/x/y", "127.0.0.1:2999", None);
        let backend = Arc::new(backend(&etcd));
        let following = start(&backend, request("/services/redis/", &[], Protocol::Tcp));
        following.wait_for(&["127.0.0.1:2001", "127.0.0.1:2002", "127.0.0.1:2003"]);
        etcd.v2_delete("/services/redis/redis");
        following.wait_for(&["127.0.0.1:2002", "127.0.0.1:2003"]);
        etcd.v2_put("/services/redis/deep/a/b/c", "127.0.0.1:2004", None);
        following.wait_for(&["127.0.0.1:2002", "127.0.0.1:2003", "127.0.0.1:2004"]);
        etcd.v2_delete("/services/redis");
        following.wait_for(&[]);
        etcd.v2_put("/services/redis/again", "127.0.0.1:2005", None);
        following.wait_for(&["127.0.0.1:2005"]);
        assert!(
            following
                .sets()
                .iter()
                .all(|set| !set.contains(&"127.0.0.1:2999".to_string())),
            "{:?}",
            following.sets()
        );
    }

    /// A service nothing was ever written under is an empty set, then followed.
    #[test]
    fn a_missing_directory_is_an_empty_set() {
        let etcd = Etcd::start_v2(None);
        let backend = Arc::new(backend(&etcd));
        let following = start(&backend, request("/services/none", &[], Protocol::Tcp));
        following.wait_for(&[]);
        etcd.v2_put("/services/none/x/1", "127.0.0.1:3001", None);
        following.wait_for(&["127.0.0.1:3001"]);
    }
}
