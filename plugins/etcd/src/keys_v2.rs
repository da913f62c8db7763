//! etcd's v2 key space as its HTTP API shows it: what a recursive read of a directory and a
//! watch event say, and its error documents. Pure functions, so each answer shape is
//! table-tested.
//!
//! v2 keys form a tree; a service's instances are the keys (leaves, at any depth) under its
//! directory: registrator writes `<prefix>/<service name>/<service id>`.

use embassy_plugin_api::text::cut;
use serde::Deserialize;

/// etcd's error code for a key that does not exist (a service with no instance yet).
pub(crate) const KEY_NOT_FOUND: u32 = 100;
/// etcd's error code for a watch index older than the event history it keeps (1000 events).
pub(crate) const INDEX_CLEARED: u32 = 401;

/// What is wrong with an answer from etcd. What it quotes of the answer is cut ([`cut`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum V2Error {
    #[error("malformed answer from etcd: {0}")]
    Malformed(String),
    #[error("etcd answered HTTP {status}: {body}")]
    Status { status: u16, body: String },
    #[error("etcd error {code}: {message} ({cause})")]
    Etcd {
        code: u32,
        message: String,
        cause: String,
        /// The store's index when it answered.
        index: i64,
    },
    #[error("etcd answered without a valid X-Etcd-Index header")]
    Index,
    #[error("a watch event with action {0:?}, which is none of etcd's")]
    Action(String),
}

/// One key under the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Leaf {
    pub(crate) key: String,
    pub(crate) value: String,
    /// The index of the key's last change.
    pub(crate) index: i64,
}

/// What a watch event does to the directory's keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    Put(Leaf),
    Removed(String),
    /// Every key starting with this (a directory deleted or expired, with its `/`) is gone.
    RemovedAll(String),
    /// A directory created or refreshed, or a key outside the directory.
    Nothing,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Node {
    /// Absent on the root.
    #[serde(default)]
    key: String,
    #[serde(default)]
    dir: bool,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    nodes: Vec<Node>,
    #[serde(default)]
    modified_index: i64,
}

#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    action: String,
    node: Node,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ErrorDocument {
    error_code: u32,
    #[serde(default)]
    message: String,
    #[serde(default)]
    cause: String,
    #[serde(default)]
    index: i64,
}

/// The directory a service names, as etcd spells keys: one leading `/`, no trailing or
/// doubled ones (etcd cleans paths so); the root is `""`.
pub(crate) fn directory(service: &str) -> String {
    service
        .split('/')
        .filter(|segment| !segment.is_empty())
        .fold(String::new(), |dir, segment| dir + "/" + segment)
}

/// The keys under `dir` in the answer to `GET /v2/keys<dir>?recursive=true`, sorted.
pub(crate) fn read(dir: &str, body: &[u8]) -> Result<Vec<Leaf>, V2Error> {
    let answer: Answer = parse(body)?;
    let under = format!("{dir}/");
    let mut leaves = Vec::new();
    let mut pending = vec![answer.node];
    while let Some(node) = pending.pop() {
        if node.dir {
            pending.extend(node.nodes);
        } else if node.key.starts_with(&under) {
            leaves.push(leaf(node));
        }
    }
    leaves.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(leaves)
}

/// The index of a watch event on `dir` (the next watch starts after it) and what it changes.
pub(crate) fn event(dir: &str, body: &[u8]) -> Result<(i64, Change), V2Error> {
    let answer: Answer = parse(body)?;
    let node = answer.node;
    let index = node.modified_index;
    let under = format!("{dir}/");
    let change = match answer.action.as_str() {
        "set" | "create" | "update" | "compareAndSwap" => {
            if !node.dir && node.key.starts_with(&under) {
                Change::Put(leaf(node))
            } else {
                Change::Nothing
            }
        }
        "delete" | "expire" | "compareAndDelete" => {
            if node.dir {
                let removed = format!("{}/", node.key);
                if under.starts_with(&removed) {
                    // The directory itself or one above it.
                    Change::RemovedAll(under)
                } else if removed.starts_with(&under) {
                    Change::RemovedAll(removed)
                } else {
                    Change::Nothing
                }
            } else if node.key.starts_with(&under) {
                Change::Removed(node.key)
            } else {
                Change::Nothing
            }
        }
        other => return Err(V2Error::Action(cut(other).into_owned())),
    };
    Ok((index, change))
}

/// What a non-200 answer says: etcd's error document, or the status and body.
pub(crate) fn error(status: u16, body: &[u8]) -> V2Error {
    match serde_json::from_slice::<ErrorDocument>(body) {
        Ok(document) => V2Error::Etcd {
            code: document.error_code,
            message: cut(&document.message).into_owned(),
            cause: cut(&document.cause).into_owned(),
            index: document.index,
        },
        Err(_) => V2Error::Status {
            status,
            body: cut(String::from_utf8_lossy(body).trim()).into_owned(),
        },
    }
}

/// The `X-Etcd-Index` header's value.
pub(crate) fn index(header: Option<&[u8]>) -> Result<i64, V2Error> {
    header
        .and_then(|value| std::str::from_utf8(value).ok())
        .and_then(|text| text.trim().parse::<i64>().ok())
        .filter(|&index| index >= 0)
        .ok_or(V2Error::Index)
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, V2Error> {
    serde_json::from_slice(body)
        .map_err(|error| V2Error::Malformed(cut(&error.to_string()).into_owned()))
}

fn leaf(node: Node) -> Leaf {
    Leaf {
        key: node.key,
        // An expired or deleted key's node has no value; a set key's may be "".
        value: node.value.unwrap_or_default(),
        index: node.modified_index,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Renders what `read` (`action` "read"), `event` or `error` make of `body` on directory
    /// `dir`: keys as `key=value@index`, a change, or `error: ...`.
    fn check(what: &str, dir: &str, body: &str, expected: &str) {
        let actual = match what {
            "read" => match read(dir, body.as_bytes()) {
                Ok(leaves) => leaves
                    .iter()
                    .map(|l| format!("{}={}@{}", l.key, l.value, l.index))
                    .collect::<Vec<_>>()
                    .join(" "),
                Err(error) => format!("error: {error}"),
            },
            "event" => match event(dir, body.as_bytes()) {
                Ok((index, change)) => format!("{index} {change:?}"),
                Err(error) => format!("error: {error}"),
            },
            "error" => format!("error: {}", error(400, body.as_bytes())),
            other => unreachable!("no such check {other}"),
        };
        assert_eq!(actual, expected, "{what} {dir} {body}");
    }

    #[test]
    fn directories_are_spelled_as_etcd_cleans_keys() {
        for (service, expected) in [
            ("/services/redis", "/services/redis"),
            ("/services/redis/", "/services/redis"),
            ("services//redis", "/services/redis"),
            ("/", ""),
            ("", ""),
        ] {
            assert_eq!(directory(service), expected, "{service}");
        }
    }

    #[test]
    fn reads_take_every_key_at_any_depth() {
        // registrator's layout: <prefix>/<service name>/<service id> = ip:port.
        check(
            "read",
            "/services/redis",
            r#"{"action":"get","node":{"key":"/services/redis","dir":true,"nodes":[
                {"key":"/services/redis/redis","dir":true,"nodes":[
                    {"key":"/services/redis/redis/host:r2:6379","value":"127.0.0.1:6380","expiration":"2026-12-02T18:21:39.824226223Z","ttl":2,"modifiedIndex":5,"createdIndex":5},
                    {"key":"/services/redis/redis/host:r1:6379","value":"127.0.0.1:6379","modifiedIndex":4,"createdIndex":4}
                ],"modifiedIndex":4,"createdIndex":4},
                {"key":"/services/redis/empty","dir":true,"modifiedIndex":6,"createdIndex":6},
                {"key":"/services/redis/flat","value":"","modifiedIndex":7,"createdIndex":7}
            ],"modifiedIndex":4,"createdIndex":4}}"#,
            "/services/redis/flat=@7 /services/redis/redis/host:r1:6379=127.0.0.1:6379@4 /services/redis/redis/host:r2:6379=127.0.0.1:6380@5",
        );
        // The directory's name is a key itself: no instance under it.
        check(
            "read",
            "/services/redis",
            r#"{"action":"get","node":{"key":"/services/redis","value":"127.0.0.1:1","modifiedIndex":3,"createdIndex":3}}"#,
            "",
        );
        // The root (etcd names it with no key): everything.
        check(
            "read",
            "",
            r#"{"action":"get","node":{"dir":true,"nodes":[{"key":"/a","value":"1.2.3.4:5","modifiedIndex":9},{"key":"/b","dir":true,"nodes":[{"key":"/b/c","value":"1.2.3.4:6","modifiedIndex":10}]}]}}"#,
            "/a=1.2.3.4:5@9 /b/c=1.2.3.4:6@10",
        );
        check(
            "read",
            "/s",
            r#"{"action":"get","node":{"dir":true,"nodes":{"key":"/s/a"}}}"#,
            "error: malformed answer from etcd: invalid type: map, expected a sequence at line 1 column 43",
        );
        check(
            "read",
            "/s",
            "<html>",
            "error: malformed answer from etcd: expected value at line 1 column 1",
        );
    }

    #[test]
    fn events_say_what_changed() {
        let dir = "/services/redis";
        check(
            "event",
            dir,
            r#"{"action":"set","node":{"key":"/services/redis/redis/a","value":"127.0.0.1:6379","modifiedIndex":4,"createdIndex":4}}"#,
            r#"4 Put(Leaf { key: "/services/redis/redis/a", value: "127.0.0.1:6379", index: 4 })"#,
        );
        // registrator's TTL refresh (prevExist=true) is an update.
        check(
            "event",
            dir,
            r#"{"action":"update","node":{"key":"/services/redis/a","value":"127.0.0.1:1","ttl":30,"modifiedIndex":8,"createdIndex":4},"prevNode":{"key":"/services/redis/a","value":"127.0.0.1:1","modifiedIndex":4,"createdIndex":4}}"#,
            r#"8 Put(Leaf { key: "/services/redis/a", value: "127.0.0.1:1", index: 8 })"#,
        );
        check(
            "event",
            dir,
            r#"{"action":"compareAndSwap","node":{"key":"/services/redis/a","value":"127.0.0.1:2","modifiedIndex":9}}"#,
            r#"9 Put(Leaf { key: "/services/redis/a", value: "127.0.0.1:2", index: 9 })"#,
        );
        // TTL expiry: the node has no value.
        check(
            "event",
            dir,
            r#"{"action":"expire","node":{"key":"/services/redis/redis/host:r2:6379","modifiedIndex":6,"createdIndex":5},"prevNode":{"key":"/services/redis/redis/host:r2:6379","value":"127.0.0.1:6380","modifiedIndex":5,"createdIndex":5}}"#,
            r#"6 Removed("/services/redis/redis/host:r2:6379")"#,
        );
        check(
            "event",
            dir,
            r#"{"action":"compareAndDelete","node":{"key":"/services/redis/a","modifiedIndex":10}}"#,
            r#"10 Removed("/services/redis/a")"#,
        );
        // A directory under the service, the service's own, and one above it.
        check(
            "event",
            dir,
            r#"{"action":"delete","node":{"key":"/services/redis/x","dir":true,"modifiedIndex":1018,"createdIndex":1017}}"#,
            r#"1018 RemovedAll("/services/redis/x/")"#,
        );
        check(
            "event",
            dir,
            r#"{"action":"expire","node":{"key":"/services/redis","dir":true,"modifiedIndex":11}}"#,
            r#"11 RemovedAll("/services/redis/")"#,
        );
        check(
            "event",
            dir,
            r#"{"action":"delete","node":{"key":"/services","dir":true,"modifiedIndex":12}}"#,
            r#"12 RemovedAll("/services/redis/")"#,
        );
        // Nothing to do: a directory made, the service's own name set, a neighbour.
        check(
            "event",
            dir,
            r#"{"action":"set","node":{"key":"/services/redis/y","dir":true,"modifiedIndex":13}}"#,
            "13 Nothing",
        );
        check(
            "event",
            dir,
            r#"{"action":"set","node":{"key":"/services/redis","value":"x","modifiedIndex":14}}"#,
            "14 Nothing",
        );
        check(
            "event",
            dir,
            r#"{"action":"delete","node":{"key":"/services/redis2/a","modifiedIndex":15}}"#,
            "15 Nothing",
        );
        check(
            "event",
            dir,
            r#"{"action":"delete","node":{"key":"/services/redis2","dir":true,"modifiedIndex":16}}"#,
            "16 Nothing",
        );
        check(
            "event",
            dir,
            r#"{"action":"get","node":{"key":"/services/redis/a","value":"x","modifiedIndex":17}}"#,
            r#"error: a watch event with action "get", which is none of etcd's"#,
        );
        check(
            "event",
            dir,
            r#"{"action":"set"}"#,
            "error: malformed answer from etcd: missing field `node` at line 1 column 16",
        );
    }

    #[test]
    fn error_documents_and_other_failures() {
        check(
            "error",
            "",
            r#"{"errorCode":401,"message":"The event in requested index is outdated and cleared","cause":"the requested history has been cleared [17/7]","index":1016}"#,
            "error: etcd error 401: The event in requested index is outdated and cleared (the requested history has been cleared [17/7])",
        );
        check(
            "error",
            "",
            r#"{"errorCode":100,"message":"Key not found","cause":"/services","index":3}"#,
            "error: etcd error 100: Key not found (/services)",
        );
        check(
            "error",
            "",
            "404 page not found\n",
            "error: etcd answered HTTP 400: 404 page not found",
        );
        assert_eq!(index(Some(b"1016")), Ok(1016));
        assert_eq!(index(Some(b"x")), Err(V2Error::Index));
        assert_eq!(index(None), Err(V2Error::Index));
    }
}
