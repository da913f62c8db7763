//! The admin API and `embassy status`: what a running Embassy serves, asked over real HTTP on
//! its unix socket and TCP address, with the real binary and plugins.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    process::Command,
    time::Duration,
};

use embassy_tests::*;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

/// Embassy on the file plugin serving `web[prod]` on a free port from two upstreams, with an
/// instance of another protocol and one without the tag beside them in the file.
fn proxy_with_two_endpoints() -> (FileBacked, u16, Upstream, Upstream, tempfile::TempDir) {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let port = free_port();
    let services = json!({ "web": [
        { "address": a.addr.to_string(), "tags": ["prod"] },
        { "address": b.addr.to_string(), "tags": ["prod"] },
        { "address": "127.0.0.1:9", "tags": ["prod"], "proto": "udp" },
        { "address": "127.0.0.1:10", "tags": ["staging"] },
    ]});
    let plugins = standard_plugin_dir(&[]);
    let proxy = FileBacked::start(
        &services,
        plugins.path(),
        &service_arg(format!("web[prod];{port}/tcp")),
        "listening",
    );
    (proxy, port, a, b, plugins)
}

fn addresses(view: &Value) -> Vec<String> {
    let mut found: Vec<String> = view["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .map(|e| e["address"].as_str().expect("address").to_string())
        .collect();
    found.sort();
    found
}

#[test]
fn services_list_what_is_served_and_one_service_explains_what_discovery_left_out() {
    let (proxy, port, a, b, _plugins) = proxy_with_two_endpoints();
    let embassy = &proxy.embassy;
    let id = format!("tcp-{port}");
    let view = embassy
        .wait_for_service(&id, WAIT, |v| {
            v["endpoints"].as_array().is_some_and(|e| e.len() == 2)
        })
        .expect("two endpoints");
    let mut expected = vec![a.addr.to_string(), b.addr.to_string()];
    expected.sort();
    assert_eq!(addresses(&view), expected);
    assert_eq!(view["descriptor"], format!("web[prod];{port}/tcp"));
    assert_eq!(view["address"], format!("127.0.0.1:{port}"));
    assert_eq!(view["owners"], json!(["--service"]));
    assert_eq!(view["balancer"], "round-robin");
    assert_eq!(view["discovery"]["state"], "reachable");
    assert!(view["discovery"]["updates"].as_u64() >= Some(1));

    let mut reasons: Vec<(String, String)> = view["excluded"]
        .as_array()
        .expect("explain lists what was left out")
        .iter()
        .map(|e| {
            let field = |k: &str| e[k].as_str().unwrap_or_default().to_string();
            (field("reason"), field("detail"))
        })
        .collect();
    reasons.sort();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert_eq!(reasons[0].0, "protocol", "{reasons:?}");
    assert!(reasons[0].1.contains("127.0.0.1:9"), "{reasons:?}");
    assert_eq!(reasons[1].0, "tag", "{reasons:?}");
    assert!(reasons[1].1.contains("127.0.0.1:10"), "{reasons:?}");

    // A connection held open shows as active on its endpoint, and in the service's count.
    let client = Client::connect(port).expect("served");
    let held = if client.upstream == "a" { &a } else { &b };
    let view = embassy
        .wait_for_service(&id, WAIT, |v| v["open_connections"] == 1)
        .expect("one open connection");
    let active: Vec<(String, u64)> = view["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .map(|e| {
            (
                e["address"].as_str().expect("address").to_string(),
                e["active"].as_u64().expect("active"),
            )
        })
        .collect();
    for (address, count) in active {
        let expected = u64::from(address == held.addr.to_string());
        assert_eq!(count, expected, "{address}");
    }

    let (status, list) = embassy.admin_get("/v1/services").expect("list");
    assert_eq!(status, 200);
    let list = list.as_array().expect("a list");
    assert_eq!(list.len(), 1);
    assert!(
        list[0].get("excluded").is_none(),
        "the list does not explain"
    );

    let (status, missing) = embassy.admin_get("/v1/services/tcp-1").expect("answer");
    assert_eq!(status, 404);
    assert!(missing["error"]
        .as_str()
        .is_some_and(|e| e.contains("tcp-1")));
}

#[test]
fn plugins_discovery_health_and_readiness() {
    let (proxy, port, _a, _b, _plugins) = proxy_with_two_endpoints();
    let embassy = &proxy.embassy;
    let (status, plugins) = embassy.admin_get("/v1/plugins").expect("plugins");
    assert_eq!(status, 200);
    let mut names: Vec<&str> = plugins
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    names.sort();
    assert!(
        names.contains(&"file") && names.contains(&"round-robin"),
        "{names:?}"
    );

    let (status, discovery) = embassy.admin_get("/v1/discovery").expect("discovery");
    assert_eq!(status, 200);
    assert!(discovery["uri"]
        .as_str()
        .is_some_and(|u| u.starts_with("file://")));
    assert_eq!(discovery["services"][0]["id"], format!("tcp-{port}"));
    assert_eq!(discovery["services"][0]["state"], "reachable");
    assert!(discovery["services"][0]["set_age_seconds"]
        .as_f64()
        .is_some());

    let (status, ready) = embassy.admin_get("/ready").expect("ready");
    assert_eq!((status, &ready["ready"]), (200, &json!(true)), "{ready}");
    let socket = embassy.admin_socket().expect("an admin socket");
    let (status, body) = http_get_unix(socket, "/healthz").expect("healthz");
    assert_eq!((status, body.trim()), (200, "ok"));
    let mode = std::fs::metadata(socket)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .expect("socket metadata");
    assert_eq!(mode, 0o660, "the socket is for root and its group");
}

/// A client that is no HTTP client, garbage, and a client that connects and says nothing: the
/// API still answers others at once, and the proxy keeps serving.
#[test]
fn bad_and_slow_admin_clients_affect_nobody_else() {
    let (proxy, port, _a, _b, _plugins) = proxy_with_two_endpoints();
    let embassy = &proxy.embassy;
    let socket = embassy
        .admin_socket()
        .expect("an admin socket")
        .to_path_buf();
    let mut silent: Vec<UnixStream> = (0..8)
        .map(|_| UnixStream::connect(&socket).expect("connect"))
        .collect();
    let mut garbage = UnixStream::connect(&socket).expect("connect");
    garbage
        .write_all(b"\x16\x03\x01\x02\x00 this is no HTTP request\r\n\r\n")
        .expect("write garbage");
    garbage
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut answer = Vec::new();
    let _ = garbage.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "garbage gets a 400 or a close: {answer:?}"
    );
    let half = UnixStream::connect(&socket).expect("connect");
    (&half)
        .write_all(b"GET /v1/services HTTP/1.1\r\nHost: x\r\n")
        .expect("half a request");
    silent.push(half);

    let (status, _) = embassy
        .admin_get("/v1/services")
        .expect("others are answered");
    assert_eq!(status, 200);
    assert!(Client::connect(port).is_ok(), "the proxy is unaffected");
    drop(silent);
}

#[test]
fn embassy_status_prints_services_and_explains_one() {
    let (proxy, port, a, _b, _plugins) = proxy_with_two_endpoints();
    let embassy = &proxy.embassy;
    let id = format!("tcp-{port}");
    embassy
        .wait_for_service(&id, WAIT, |v| {
            v["endpoints"].as_array().is_some_and(|e| e.len() == 2)
        })
        .expect("two endpoints");
    let admin = format!("unix:{}", embassy.admin_socket().expect("socket").display());
    let status = |args: &[&str]| {
        let output = Command::new(artifacts().embassy())
            .arg("status")
            .args(args)
            .args(["--admin", &admin])
            .output()
            .expect("run embassy status");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).to_string(),
            String::from_utf8_lossy(&output.stderr).to_string(),
        )
    };
    let (code, table, stderr) = status(&[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        table.contains(&id) && table.contains(&a.addr.to_string()),
        "{table}"
    );
    assert!(table.contains("serving"), "{table}");

    for name in [id.as_str(), &port.to_string(), "web"] {
        let (code, one, stderr) = status(&[name]);
        assert_eq!(code, Some(0), "{name}: {stderr}");
        assert!(one.contains("left out by discovery"), "{name}: {one}");
        assert!(
            one.contains("protocol") && one.contains("127.0.0.1:9"),
            "{one}"
        );
    }

    let (code, json_out, _) = status(&["--json"]);
    assert_eq!(code, Some(0));
    let parsed: Value = serde_json::from_str(&json_out).expect("--json is JSON");
    assert_eq!(parsed[0]["id"], id);

    let (code, _, stderr) = status(&["nothing-here"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("nothing-here") && stderr.contains(&id),
        "{stderr}"
    );

    let (code, _, stderr) = Command::new(artifacts().embassy())
        .args(["status", "--admin", "unix:/nonexistent/admin.sock"])
        .output()
        .map(|o| {
            (
                o.status.code(),
                (),
                String::from_utf8_lossy(&o.stderr).to_string(),
            )
        })
        .expect("run");
    assert_eq!(code, Some(1));
    assert!(stderr.contains("/nonexistent/admin.sock"), "{stderr}");
}

/// The TCP address is off by default and serves the same reads when given.
#[test]
fn a_tcp_admin_address_serves_when_given() {
    let upstream = Upstream::start("a");
    let (port, admin_port) = (free_port(), free_port());
    let dir = tempfile::tempdir().expect("temp dir");
    let services = dir.path().join("services.json");
    write_services(&services, &json!({ "web": [upstream.addr.to_string()] }));
    let plugins = standard_plugin_dir(&[]);
    let mut command = Embassy::command(
        &artifacts().embassy(),
        [
            "--plugin-dir".to_string(),
            plugins.path().display().to_string(),
            "--discovery".to_string(),
            format!("file://{}", services.display()),
            "--service".to_string(),
            format!("web;{port}/tcp"),
            "--admin".to_string(),
            format!("127.0.0.1:{admin_port}"),
        ],
    );
    command.env_remove("EMBASSY_ADMIN");
    let mut embassy = Embassy::spawn(&mut command);
    embassy
        .wait_for_log("admin API serving", WAIT)
        .expect("admin up");
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", admin_port)).expect("connect");
    stream
        .write_all(b"GET /v1/services HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains(&format!("tcp-{port}")), "{response}");
}

/// `--log-format json`: every line one JSON object, a connection failure carrying the
/// service, the endpoint and the reason as fields.
#[test]
fn json_logs_carry_their_fields() {
    let dead = free_port(); // nothing listens there
    let port = free_port();
    let dir = tempfile::tempdir().expect("temp dir");
    let services = dir.path().join("services.json");
    write_services(&services, &json!({ "web": [format!("127.0.0.1:{dead}")] }));
    let plugins = standard_plugin_dir(&[]);
    let mut command = Embassy::command(
        &artifacts().embassy(),
        [
            "--log-format".to_string(),
            "json".to_string(),
            "--plugin-dir".to_string(),
            plugins.path().display().to_string(),
            "--discovery".to_string(),
            format!("file://{}", services.display()),
            "--service".to_string(),
            format!("web;{port}/tcp"),
        ],
    );
    let mut embassy = Embassy::spawn(&mut command);
    embassy.wait_for_log("listening", WAIT).expect("listening");
    let _ = Client::connect(port);
    embassy
        .wait_for_log("connect failed", WAIT)
        .expect("a failure line");
    let lines: Vec<Value> = embassy
        .log()
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect();
    let failed = lines
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("connect failed"))
        })
        .expect("the failure line");
    assert_eq!(failed["level"], "WARN");
    assert_eq!(failed["upstream"], format!("127.0.0.1:{dead}"), "{failed}");
    assert_eq!(failed["reason"], "connect_refused", "{failed}");
    // No container asked for it (--service): the consumer field is there, empty.
    assert_eq!(failed["spans"][0]["consumer"], "", "{failed}");
    assert!(
        failed["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{failed}"
    );
    assert_eq!(
        failed["spans"][0]["service"],
        format!("web;{port}/tcp"),
        "{failed}"
    );
    assert!(
        failed["spans"][1]["peer"].as_str().is_some(),
        "the client: {failed}"
    );
}
