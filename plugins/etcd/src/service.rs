//! What the v3 and v2 watch loops share, so both APIs behave and log alike: one service's
//! instances and the keys left out (and the set built from them), the plugin-wide view of the
//! connection, and the rules for outages and failovers with their log lines.
//!
//! A watch whose member goes away, with several members configured, is a failover, not an
//! outage: retries are made quickly for up to the request timeout before etcd is called
//! unreachable. The log names the member lost and the one the watches moved to.

use std::{
    collections::{BTreeMap, HashSet},
    sync::Mutex,
    time::{Duration, Instant},
};

use embassy_plugin_api::{
    support::{Backoff, Selector, WatchSink},
    text::cut,
    BackendHealth, Exclusion, WatchRequest,
};
use tracing::{debug, info, warn};

use crate::{
    config::EtcdConfig,
    instances::{parse_instance, Instance},
};

/// First wait of the reconnect backoff, and of each quick retry while failing over.
pub(crate) const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// The plugin-wide view of the cluster, shared by all watches of one `--discovery` URI, so
/// that a state change is logged once however many services notice it.
pub(crate) struct Connection {
    /// The members as configured, for logs.
    members: String,
    several_members: bool,
    request_timeout: Duration,
    reachable: Mutex<Option<bool>>,
    /// Members whose watches broke and that no watch has used since (a loss is logged once).
    lost_members: Mutex<HashSet<String>>,
    /// The member lost last, until a watch is created on another one (logged then, once).
    failing_over_from: Mutex<Option<String>>,
}

impl Connection {
    pub(crate) fn new(config: &EtcdConfig) -> Connection {
        Connection {
            members: config.endpoints.join(","),
            several_members: config.endpoints.len() > 1,
            request_timeout: config.request_timeout,
            reachable: Mutex::new(None),
            lost_members: Mutex::new(HashSet::new()),
            failing_over_from: Mutex::new(None),
        }
    }

    /// A watch on `member` broke; the first watch to see it logs it.
    fn member_lost(&self, member: &str, error: &str) {
        let first = lock(&self.lost_members).insert(member.to_string());
        if first {
            let members = &self.members;
            warn!(member = %member, %members, %error, "etcd member lost, failing over to the other members");
            *lock(&self.failing_over_from) = Some(member.to_string());
        }
    }

    /// A watch was created on `member`: logs a failover that this completes.
    fn watching_on(&self, member: &str) {
        lock(&self.lost_members).remove(member);
        let from = lock(&self.failing_over_from).take_if(|from| from != member);
        if let Some(from) = from {
            info!(from = %from, to = %member, "etcd watches failed over to another member");
        }
    }

    fn note(&self, reachable: bool, detail: &str) {
        let mut last = lock(&self.reachable);
        if *last == Some(reachable) {
            return;
        }
        let members = &self.members;
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

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded values stay consistent whatever a panicking holder did: sets and flags.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One service's state between reads and events.
pub(crate) struct Service {
    pub(crate) request: WatchRequest,
    instances: BTreeMap<String, Instance>,
    /// Keys whose value is no instance: the revision warned about, and why.
    skipped: BTreeMap<String, (i64, String)>,
    /// This watch's view of the connection, reported to the host on changes only.
    unreachable: bool,
    /// The member the live watch is on, as logs name it.
    member: Option<String>,
    /// Since when the service has been retrying after its member was lost.
    failing_over_since: Option<Instant>,
}

impl Service {
    pub(crate) fn new(request: WatchRequest) -> Service {
        Service {
            request,
            instances: BTreeMap::new(),
            skipped: BTreeMap::new(),
            unreachable: false,
            member: None,
            failing_over_since: None,
        }
    }

    /// Replaces everything with a whole read of the prefix made at `revision` (v2: index):
    /// `(key, value, revision)` of every key under it.
    pub(crate) fn replace<'a>(
        &mut self,
        revision: i64,
        keys: impl IntoIterator<Item = (String, &'a [u8], i64)>,
    ) {
        let mut instances = BTreeMap::new();
        let mut seen = HashSet::new();
        for (key, value, revision) in keys {
            if let Some(instance) = self.admit(&key, value, revision) {
                instances.insert(key.clone(), instance);
            }
            seen.insert(key);
        }
        self.skipped.retain(|key, _| seen.contains(key));
        debug!(service = %self.request.service, keys = seen.len(), instances = instances.len(), revision, "prefix read");
        self.instances = instances;
    }

    /// `key` now holds `value`.
    pub(crate) fn put(&mut self, key: String, value: &[u8], revision: i64) {
        match self.admit(&key, value, revision) {
            Some(instance) => {
                self.instances.insert(key, instance);
            }
            None => {
                self.instances.remove(&key);
            }
        }
    }

    /// `key` is gone.
    pub(crate) fn remove(&mut self, key: &str) {
        self.instances.remove(key);
        self.skipped.remove(key);
    }

    /// Every key starting with `prefix` is gone (etcd v2 deletes or expires whole directories).
    pub(crate) fn remove_prefixed(&mut self, prefix: &str) {
        self.instances.retain(|key, _| !key.starts_with(prefix));
        self.skipped.retain(|key, _| !key.starts_with(prefix));
    }

    /// The instance a key holds, or `None` after one warning per key and revision.
    fn admit(&mut self, key: &str, value: &[u8], revision: i64) -> Option<Instance> {
        match parse_instance(key, value) {
            Ok(instance) => {
                self.skipped.remove(key);
                Some(instance)
            }
            Err(error) => {
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
    pub(crate) fn push(&self, sink: &WatchSink) {
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

    /// etcd accepted a watch on `member`: back in touch. Only an accepted watch counts (resets
    /// `backoff`, reports reachable): a read that works beside a watch that keeps failing must
    /// not log every retry.
    pub(crate) fn watching(
        &mut self,
        connection: &Connection,
        sink: &WatchSink,
        member: Option<String>,
        backoff: &mut Backoff,
    ) {
        if let Some(name) = member {
            debug!(service = %self.request.service, member = %name, "watching");
            connection.watching_on(&name);
            self.member = Some(name);
        }
        self.failing_over_since = None;
        self.found(connection, sink);
        backoff.reset();
    }

    /// After a failed read or watch: how long to wait before the next try. A watch whose
    /// member broke, with other members configured, starts a failover: quick retries, and etcd
    /// counts as unreachable only if none answers within the request timeout.
    pub(crate) fn failed(
        &mut self,
        connection: &Connection,
        sink: &WatchSink,
        error: &str,
        backoff: &mut Backoff,
    ) -> Duration {
        if let Some(member) = self.member.take() {
            if connection.several_members {
                connection.member_lost(&member, error);
                self.failing_over_since = Some(Instant::now());
            }
        }
        if let Some(since) = self.failing_over_since {
            if since.elapsed() < connection.request_timeout {
                debug!(service = %self.request.service, %error, "failing over: retrying on another etcd member");
                return FIRST_BACKOFF;
            }
            self.failing_over_since = None;
        }
        self.lost(connection, sink, error);
        backoff.next_wait()
    }

    fn lost(&mut self, connection: &Connection, sink: &WatchSink, error: &str) {
        connection.note(false, error);
        if !self.unreachable {
            self.unreachable = true;
            sink.report(
                BackendHealth::Unreachable,
                &format!("{error}; keeping the last known endpoints"),
            );
        }
    }

    fn found(&mut self, connection: &Connection, sink: &WatchSink) {
        connection.note(true, "");
        if self.unreachable {
            self.unreachable = false;
            sink.report(
                BackendHealth::Reachable,
                "prefix re-read after reconnecting",
            );
        }
    }
}
