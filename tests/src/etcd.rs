//! A real etcd (Debian's `etcd-server`) for tests, one member or an [`EtcdCluster`]: started
//! on free loopback ports with a temporary data directory, stoppable and restartable on the
//! same ports and data, killed when dropped. Keys are written through etcd's own JSON gateway
//! (`/v3/kv/...`), or its v2 key space (`/v2/keys/...`, as registrator writes them) when
//! started with [`Etcd::start_v2`], with plain std I/O, so the tests need no etcd client of
//! their own.

use std::{
    fs::File,
    io::{Read, Write},
    net::TcpStream,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::{free_port, tls::TestPki};

const INSTALL_HINT: &str = "etcd is needed by this test: apt-get install -y etcd-server";

/// A running etcd member on loopback: a cluster of its own, or one of an [`EtcdCluster`].
pub struct Etcd {
    /// The port clients (Embassy) use: plain HTTP, or TLS with [`TestPki`].
    pub client_port: u16,
    /// A plain-HTTP client port for the test's own writes (the same port without TLS).
    admin_port: u16,
    peer_port: u16,
    tls: Option<TestPki>,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Sent with every request once auth is enabled.
    token: Option<String>,
    /// The member's name and etcd's `--initial-cluster` (`None`: a cluster of this one).
    name: String,
    initial_cluster: Option<String>,
    /// Serves the v2 API beside v3 (`--enable-v2`).
    v2: bool,
    /// The `Authorization` header of v2 writes once v2 auth is enabled (root's).
    v2_auth: Option<String>,
}

impl Etcd {
    /// Starts etcd and waits until it serves; panics with the install hint if it is missing.
    pub fn start() -> Etcd {
        Etcd::start_with(None)
    }

    /// Starts etcd whose client port speaks TLS with `tls`'s certificates.
    pub fn start_with(tls: Option<TestPki>) -> Etcd {
        let mut etcd = Etcd::new("embassy-test".to_string(), tls);
        etcd.spawn().unwrap_or_else(|error| panic!("{error:#}"));
        etcd
    }

    /// Starts etcd serving its v2 API too (`--enable-v2`), its client port with TLS if given.
    pub fn start_v2(tls: Option<TestPki>) -> Etcd {
        let mut etcd = Etcd::new("embassy-test".to_string(), tls);
        etcd.v2 = true;
        etcd.spawn().unwrap_or_else(|error| panic!("{error:#}"));
        etcd
    }

    /// A member on fresh free ports and data directory, not started yet.
    fn new(name: String, tls: Option<TestPki>) -> Etcd {
        let client_port = free_port();
        let admin_port = if tls.is_some() {
            free_port()
        } else {
            client_port
        };
        Etcd {
            client_port,
            admin_port,
            peer_port: free_port(),
            tls,
            dir: tempfile::tempdir().expect("temp dir"),
            child: None,
            token: None,
            name,
            initial_cluster: None,
            v2: false,
            v2_auth: None,
        }
    }

    /// The member's name in its cluster.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `127.0.0.1:PORT` of the client port.
    pub fn member(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// The `--discovery` URI for Embassy.
    pub fn uri(&self) -> String {
        let scheme = if self.tls.is_some() { "etcds" } else { "etcd" };
        format!("{scheme}://{}", self.member())
    }

    /// The `--discovery` URI for Embassy's v2 client.
    pub fn uri_v2(&self) -> String {
        let scheme = if self.tls.is_some() {
            "etcd2s"
        } else {
            "etcd2"
        };
        format!("{scheme}://{}", self.member())
    }

    fn spawn(&mut self) -> Result<()> {
        self.spawn_process()?;
        self.wait_healthy(Duration::from_secs(30))
    }

    fn spawn_process(&mut self) -> Result<()> {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let initial_cluster = self
            .initial_cluster
            .clone()
            .unwrap_or_else(|| format!("{}={peer}", self.name));
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", self.client_port);
        let mut listen = client.clone();
        if self.admin_port != self.client_port {
            listen.push_str(&format!(",http://127.0.0.1:{}", self.admin_port));
        }
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))?;
        let binary = std::env::var("EMBASSY_TEST_ETCD").unwrap_or_else(|_| "etcd".into());
        let mut command = Command::new(&binary);
        // An operator's ETCD_* variables would override the flags below.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD") {
                command.env_remove(key);
            }
        }
        command
            .args(["--name", &self.name, "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &listen])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial_cluster])
            .args(["--initial-cluster-token", "embassy-test"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .arg(format!("--enable-v2={}", self.v2))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(tls) = &self.tls {
            command
                .arg("--cert-file")
                .arg(tls.file("server.pem"))
                .arg("--key-file")
                .arg(tls.file("server.key"))
                .arg("--trusted-ca-file")
                .arg(tls.file("ca.pem"))
                .arg("--client-cert-auth");
        }
        let child = command.spawn().map_err(|error| {
            if error.kind() == std::io::ErrorKind::NotFound {
                anyhow::anyhow!("{binary} not found. {INSTALL_HINT}")
            } else {
                anyhow::anyhow!("cannot start {binary}: {error}")
            }
        })?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until this member serves (a cluster member: until its cluster has a leader).
    pub fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok((200, body)) = self.http("GET", "/health", None) {
                if body.contains("true") {
                    return Ok(());
                }
            }
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "etcd {} exited ({status}) while starting:\n{}",
                        self.name,
                        self.log()
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd {} not healthy within {timeout:?}:\n{}",
                    self.name,
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// etcd's own log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    /// Kills etcd (SIGKILL: an outage, not a goodbye).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports and data directory.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn().unwrap_or_else(|error| panic!("{error:#}"));
    }

    /// Puts `value` at `key`; returns the new revision.
    pub fn put(&self, key: &str, value: &str) -> i64 {
        let body = json!({"key": base64(key.as_bytes()), "value": base64(value.as_bytes())});
        revision(&self.call("/v3/kv/put", &body))
    }

    /// Puts many keys, 128 per transaction (etcd's default limit of operations per
    /// transaction); returns the last revision.
    pub fn put_many(&self, pairs: &[(String, String)]) -> i64 {
        let mut last = 0;
        for chunk in pairs.chunks(128) {
            let success: Vec<Value> = chunk
                .iter()
                .map(|(key, value)| {
                    json!({"request_put": {"key": base64(key.as_bytes()), "value": base64(value.as_bytes())}})
                })
                .collect();
            last = revision(&self.call("/v3/kv/txn", &json!({ "success": success })));
        }
        last
    }

    /// Deletes `key`; returns the new revision.
    pub fn delete(&self, key: &str) -> i64 {
        revision(&self.call(
            "/v3/kv/deleterange",
            &json!({"key": base64(key.as_bytes())}),
        ))
    }

    /// The store's current revision.
    pub fn revision(&self) -> i64 {
        revision(&self.call(
            "/v3/kv/range",
            &json!({"key": base64(b"\0"), "count_only": true}),
        ))
    }

    /// Compacts the history up to `revision` (physically, so it is really gone).
    pub fn compact(&self, revision: i64) {
        self.call(
            "/v3/kv/compaction",
            &json!({"revision": revision.to_string(), "physical": true}),
        );
    }

    /// Creates user `name` allowed to read keys under `prefix` (and a root user), enables
    /// auth, and from then on writes as root.
    pub fn enable_auth(&mut self, name: &str, password: &str, prefix: &str) {
        let root_password = "root-test-password";
        self.call("/v3/auth/role/add", &json!({"name": "root"}));
        self.call(
            "/v3/auth/user/add",
            &json!({"name": "root", "password": root_password}),
        );
        self.call(
            "/v3/auth/user/grant",
            &json!({"user": "root", "role": "root"}),
        );
        self.call("/v3/auth/role/add", &json!({"name": "reader"}));
        let mut end = prefix.as_bytes().to_vec();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        self.call(
            "/v3/auth/role/grant",
            &json!({"name": "reader", "perm": {"permType": "READ", "key": base64(prefix.as_bytes()), "range_end": base64(&end)}}),
        );
        self.call(
            "/v3/auth/user/add",
            &json!({"name": name, "password": password}),
        );
        self.call(
            "/v3/auth/user/grant",
            &json!({"user": name, "role": "reader"}),
        );
        self.call("/v3/auth/enable", &json!({}));
        let answer = self.call(
            "/v3/auth/authenticate",
            &json!({"name": "root", "password": root_password}),
        );
        self.token = answer["token"].as_str().map(str::to_string);
    }

    /// Sets v2 key `key` (`/a/b`) to `value` as registrator does (`PUT /v2/keys/<key>`), with
    /// a TTL in seconds if given; returns the change's index.
    pub fn v2_put(&self, key: &str, value: &str, ttl: Option<u64>) -> i64 {
        let mut form = format!("value={}", form_encode(value));
        if let Some(ttl) = ttl {
            form.push_str(&format!("&ttl={ttl}"));
        }
        self.v2_call("PUT", key, &form)
    }

    /// Deletes v2 key `key`, or directory `key` with everything under it; returns the
    /// change's index.
    pub fn v2_delete(&self, key: &str) -> i64 {
        self.v2_call("DELETE", &format!("{key}?recursive=true"), "")
    }

    /// Enables v2 auth with user `name` allowed to read the keys under `prefix` (`/services`)
    /// and nothing else (anonymous access revoked); from then on v2 writes are root's.
    pub fn enable_v2_auth(&mut self, name: &str, password: &str, prefix: &str) {
        let root_password = "root-test-password";
        let put = |path: &str, body: &Value, auth: Option<&str>| match exchange(
            self.admin_port,
            auth,
            "PUT",
            path,
            "application/json",
            &body.to_string(),
        ) {
            Ok((200 | 201, _)) => {}
            other => panic!("etcd PUT {path} {body}: {other:?}"),
        };
        put(
            "/v2/auth/users/root",
            &json!({"user": "root", "password": root_password}),
            None,
        );
        put(
            "/v2/auth/roles/reader",
            &json!({"role": "reader", "permissions": {"kv": {"read": [format!("{prefix}/*")], "write": []}}}),
            None,
        );
        put(
            &format!("/v2/auth/users/{name}"),
            &json!({"user": name, "password": password, "roles": ["reader"]}),
            None,
        );
        put("/v2/auth/enable", &json!({}), None);
        let root = format!(
            "Basic {}",
            base64(format!("root:{root_password}").as_bytes())
        );
        put(
            "/v2/auth/roles/guest",
            &json!({"role": "guest", "revoke": {"kv": {"read": ["/*"], "write": ["/*"]}}}),
            Some(&root),
        );
        self.v2_auth = Some(root);
    }

    /// One v2 write; panics with etcd's answer unless it took it.
    fn v2_call(&self, method: &str, key: &str, form: &str) -> i64 {
        let (key, query) = key.split_once('?').unwrap_or((key, ""));
        assert!(
            key.starts_with('/') && !key.contains(['#', '%', ' ']),
            "v2 key {key:?}: a path of plain segments"
        );
        let path = if query.is_empty() {
            format!("/v2/keys{key}")
        } else {
            format!("/v2/keys{key}?{query}")
        };
        let answer = exchange(
            self.admin_port,
            self.v2_auth.as_deref(),
            method,
            &path,
            "application/x-www-form-urlencoded",
            form,
        )
        .unwrap_or_else(|error| panic!("etcd {method} {path}: {error:#}"));
        match answer {
            (200 | 201, body) => {
                let answer: Value = serde_json::from_str(&body)
                    .unwrap_or_else(|_| panic!("etcd {method} {path}: bad JSON {body:?}"));
                answer["node"]["modifiedIndex"]
                    .as_i64()
                    .unwrap_or_else(|| panic!("no modifiedIndex in etcd's answer {answer}"))
            }
            (status, body) => panic!("etcd {method} {path} {form}: HTTP {status}: {body}"),
        }
    }

    /// POSTs `body` to the JSON gateway; panics with etcd's last answer if it takes none.
    fn call(&self, path: &str, body: &Value) -> Value {
        post(std::slice::from_ref(self), path, body).unwrap_or_else(|error| panic!("{error:#}"))
    }

    /// One HTTP/1.0 exchange with the admin port: (status, body).
    fn http(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, String)> {
        http(self.admin_port, self.token.as_deref(), method, path, body)
    }
}

/// POSTs `body` to the first running member of `members` that answers 200, trying them all
/// again for up to 10 s (one just restarted or still electing a leader may not answer yet).
fn post(members: &[Etcd], path: &str, body: &Value) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut last = "no member running".to_string();
        for member in members.iter().filter(|m| m.child.is_some()) {
            match member.http("POST", path, Some(body)) {
                Ok((200, text)) => {
                    return serde_json::from_str(&text)
                        .with_context(|| format!("etcd {path}: bad JSON {text:?}"))
                }
                Ok((status, text)) => last = format!("{}: HTTP {status}: {text}", member.name),
                Err(error) => last = format!("{}: {error:#}", member.name),
            }
        }
        if Instant::now() > deadline {
            bail!("etcd {path} {body}: no member took it: {last}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// One HTTP/1.0 exchange with etcd's JSON gateway on 127.0.0.1:`port`: (status, body).
fn http(
    port: u16,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, String)> {
    let body = body.map(Value::to_string).unwrap_or_default();
    exchange(port, token, method, path, "application/json", &body)
}

/// One HTTP/1.0 exchange with etcd on 127.0.0.1:`port`: (status, body).
fn exchange(
    port: u16,
    token: Option<&str>,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let auth = token
        .map(|token| format!("Authorization: {token}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n\
             Content-Length: {}\r\n{auth}\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("HTTP response without a body")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("HTTP status line")?;
    Ok((status, body.to_string()))
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A real etcd cluster of several plain-HTTP members on loopback, for failover tests: a slice
/// of [`Etcd`] members (index it to stop, restart or write through one) plus what needs them
/// all. Members keep their ports and data across `stop`/`restart`.
pub struct EtcdCluster {
    members: Vec<Etcd>,
}

impl EtcdCluster {
    /// Starts `size` members at once (they wait for each other's quorum) and waits until every
    /// one serves.
    pub fn start(size: usize) -> Result<EtcdCluster> {
        EtcdCluster::start_serving(size, false)
    }

    /// [`EtcdCluster::start`] with the v2 API enabled on every member.
    pub fn start_v2(size: usize) -> Result<EtcdCluster> {
        EtcdCluster::start_serving(size, true)
    }

    fn start_serving(size: usize, v2: bool) -> Result<EtcdCluster> {
        let mut members: Vec<Etcd> = (0..size)
            .map(|n| Etcd::new(format!("member{n}"), None))
            .collect();
        let cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        for member in &mut members {
            member.initial_cluster = Some(cluster.clone());
            member.v2 = v2;
            member.spawn_process()?;
        }
        for member in &mut members {
            member.wait_healthy(Duration::from_secs(30))?;
        }
        Ok(EtcdCluster { members })
    }

    /// The `--discovery` URI naming every member.
    pub fn uri(&self) -> String {
        let members: Vec<String> = self.members.iter().map(Etcd::member).collect();
        format!("etcd://{}", members.join(","))
    }

    /// The `--discovery` URI naming every member, for Embassy's v2 client.
    pub fn uri_v2(&self) -> String {
        let members: Vec<String> = self.members.iter().map(Etcd::member).collect();
        format!("etcd2://{}", members.join(","))
    }

    /// The index of the member every running member calls leader, once they agree (at most
    /// `timeout`).
    pub fn leader(&self, timeout: Duration) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut ids = Vec::new();
            let mut leaders = Vec::new();
            for member in &self.members {
                let status = member.child.as_ref().and_then(|_| {
                    let (code, body) = member
                        .http("POST", "/v3/maintenance/status", Some(&json!({})))
                        .ok()?;
                    (code == 200).then(|| serde_json::from_str::<Value>(&body).ok())?
                });
                let id = status
                    .as_ref()
                    .and_then(|s| s["header"]["member_id"].as_str().map(str::to_string));
                if let Some(leader) = status.as_ref().and_then(|s| s["leader"].as_str()) {
                    leaders.push(leader.to_string());
                }
                ids.push(id);
            }
            if let Some(first) = leaders.first() {
                if leaders.iter().all(|l| l == first) && first != "0" {
                    if let Some(i) = ids.iter().position(|id| id.as_deref() == Some(first)) {
                        return Ok(i);
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("no agreed etcd leader within {timeout:?} (members {ids:?}, leaders {leaders:?})");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Puts `value` at `key` through the first running member that takes it.
    pub fn put(&self, key: &str, value: &str) -> Result<()> {
        let body = json!({"key": base64(key.as_bytes()), "value": base64(value.as_bytes())});
        post(&self.members, "/v3/kv/put", &body).map(drop)
    }

    /// Deletes `key` through the first running member that takes it.
    pub fn delete(&self, key: &str) -> Result<()> {
        let body = json!({"key": base64(key.as_bytes())});
        post(&self.members, "/v3/kv/deleterange", &body).map(drop)
    }
}

impl std::ops::Deref for EtcdCluster {
    type Target = [Etcd];

    fn deref(&self) -> &[Etcd] {
        &self.members
    }
}

impl std::ops::DerefMut for EtcdCluster {
    fn deref_mut(&mut self) -> &mut [Etcd] {
        &mut self.members
    }
}

fn revision(answer: &Value) -> i64 {
    answer["header"]["revision"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no revision in etcd's answer {answer}"))
}

/// `text` as a form value: everything but unreserved characters percent-encoded.
fn form_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_rfc4648() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(super::base64(input.as_bytes()), expected);
        }
    }

    #[test]
    fn form_values_are_percent_encoded() {
        assert_eq!(super::form_encode("127.0.0.1:6379"), "127.0.0.1%3A6379");
        assert_eq!(
            super::form_encode(r#"{"a": 1}&b"#),
            "%7B%22a%22%3A%201%7D%26b"
        );
    }
}
