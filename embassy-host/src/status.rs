//! `embassy status`: asks a running Embassy's admin API and prints what it serves.

use std::{fmt::Write as _, process::ExitCode, time::Duration};

use anyhow::{bail, Context};
use http_body_util::{BodyExt, Full};
use hyper::{body::Bytes, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::{admin::AdminAddr, cli::CtlOperation};

/// How long `status` waits for the admin API.
const TIMEOUT: Duration = Duration::from_secs(5);
/// How long `ctl` waits: a resync's answer may wait 5 s for discovery.
const WRITE_TIMEOUT: Duration = Duration::from_secs(15);

/// GETs `path` from the admin API at `addr`: the status code and the parsed JSON body.
pub async fn get(addr: &AdminAddr, path: &str) -> anyhow::Result<(StatusCode, Value)> {
    exchange(addr, "GET", path, None, None).await
}

/// POSTs `body` to `path` (a write, for `embassy ctl`), with `token` as the bearer token.
pub async fn post(
    addr: &AdminAddr,
    path: &str,
    body: &Value,
    token: Option<&str>,
) -> anyhow::Result<(StatusCode, Value)> {
    exchange(addr, "POST", path, Some(body), token).await
}

async fn exchange(
    addr: &AdminAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
    token: Option<&str>,
) -> anyhow::Result<(StatusCode, Value)> {
    let timeout = if body.is_some() {
        WRITE_TIMEOUT
    } else {
        TIMEOUT
    };
    let exchange = async {
        let bytes = match body {
            Some(body) => Bytes::from(serde_json::to_vec(body)?),
            None => Bytes::new(),
        };
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "embassy")
            .header("content-type", "application/json");
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = request.body(Full::new(bytes))?;
        let response = match addr {
            AdminAddr::Unix(socket) => {
                let stream = tokio::net::UnixStream::connect(socket)
                    .await
                    .with_context(|| {
                        format!("cannot reach the admin socket {}", socket.display())
                    })?;
                send(stream, request).await?
            }
            AdminAddr::Tcp(tcp) => {
                let stream = tokio::net::TcpStream::connect(tcp)
                    .await
                    .with_context(|| format!("cannot reach the admin API at {tcp}"))?;
                send(stream, request).await?
            }
        };
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        let json = serde_json::from_slice(&body)
            .with_context(|| format!("the admin API answered {path} with something not JSON"))?;
        anyhow::Ok((status, json))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .with_context(|| format!("the admin API at {addr} did not answer within {timeout:?}"))?
}

async fn send<S>(
    stream: S,
    request: Request<Full<Bytes>>,
) -> anyhow::Result<hyper::Response<hyper::body::Incoming>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender.send_request(request).await?)
}

/// `embassy ctl OPERATION`: one write, its answer printed; exit 1 if refused.
pub async fn ctl(
    addr: &AdminAddr,
    token_file: Option<&std::path::Path>,
    operation: CtlOperation,
) -> anyhow::Result<ExitCode> {
    let token = token_file.map(crate::admin::read_token).transpose()?;
    let (path, body) = match operation {
        CtlOperation::Balancer {
            service,
            name,
            options,
        } => (
            format!("/v1/services/{service}/balancer"),
            serde_json::json!({
                "name": name,
                "options": options.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
            }),
        ),
        CtlOperation::Drain { service, endpoint } => endpoint_body(service, endpoint, "drain"),
        CtlOperation::Disable { service, endpoint } => endpoint_body(service, endpoint, "disable"),
        CtlOperation::Enable { service, endpoint } => endpoint_body(service, endpoint, "enable"),
        CtlOperation::Reload => ("/v1/plugins/reload".to_string(), Value::Null),
        CtlOperation::Resync { service } => (format!("/v1/services/{service}/resync"), Value::Null),
    };
    let (status, answer) = post(addr, &path, &body, token.as_deref()).await.with_context(|| {
        format!("no answer from the admin API at {addr} (is Embassy running? --admin ADDR names another)")
    })?;
    if status.is_success() {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "refused ({}): {}",
        status.as_u16(),
        answer["error"].as_str().unwrap_or("no reason given")
    );
    Ok(ExitCode::from(1))
}

fn endpoint_body(service: String, endpoint: String, action: &str) -> (String, Value) {
    (
        format!("/v1/services/{service}/endpoint"),
        serde_json::json!({ "address": endpoint, "action": action }),
    )
}

/// `embassy status [SERVICE] [--json]`.
pub async fn status(
    addr: &AdminAddr,
    service: Option<&str>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let (_, services) = get(addr, "/v1/services").await.with_context(|| {
        format!("no answer from the admin API at {addr} (is Embassy running? --admin ADDR names another)")
    })?;
    let Some(list) = services.as_array() else {
        bail!("the admin API's /v1/services is not a list");
    };
    let Some(wanted) = service else {
        if json {
            println!("{}", serde_json::to_string_pretty(&services)?);
        } else {
            print!("{}", render_services(list));
        }
        return Ok(ExitCode::SUCCESS);
    };
    let Some(id) = find(list, wanted) else {
        let ids: Vec<&str> = list.iter().filter_map(|s| s["id"].as_str()).collect();
        bail!(
            "no service {wanted:?} (by id, port or name); serving: {}",
            if ids.is_empty() {
                "nothing".to_string()
            } else {
                ids.join(", ")
            }
        );
    };
    let (_, one) = get(addr, &format!("/v1/services/{id}")).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&one)?);
    } else {
        print!("{}", render_service(&one));
    }
    Ok(ExitCode::SUCCESS)
}

/// The id of the service `wanted` names: an id, a port, or a service name (if only one).
fn find<'a>(list: &'a [Value], wanted: &str) -> Option<&'a str> {
    let id_of = |s: &'a Value| s["id"].as_str();
    if let Some(exact) = list.iter().find(|s| s["id"].as_str() == Some(wanted)) {
        return id_of(exact);
    }
    let found: Vec<&'a Value> = list
        .iter()
        .filter(|s| {
            s["address"]
                .as_str()
                .and_then(|a| a.rsplit_once(':'))
                .is_some_and(|(_, port)| port == wanted)
                || s["service"].as_str() == Some(wanted)
        })
        .collect();
    match found.as_slice() {
        [one] => id_of(one),
        _ => None,
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    }
}

/// The discovery state in a few words: `reachable, 3 sets, last 12s ago`.
fn discovery_summary(discovery: &Value) -> String {
    let state = text(&discovery["state"]);
    match discovery["set_age_seconds"].as_f64() {
        Some(age) => format!("{state}, set {}s old", age.round()),
        None => format!(
            "{state}, no set yet ({}s)",
            discovery["waiting_seconds"].as_f64().unwrap_or(0.0).round()
        ),
    }
}

fn render_services(list: &[Value]) -> String {
    if list.is_empty() {
        return "serving nothing yet\n".to_string();
    }
    let mut out = String::new();
    for service in list {
        let endpoints = service["endpoints"]
            .as_array()
            .map_or(&[][..], Vec::as_slice);
        let _ = writeln!(
            out,
            "{}  {}  on {}  balancer {}  discovery {}  connections {}/{}, {} accepted{}",
            text(&service["id"]),
            text(&service["descriptor"]),
            text(&service["address"]),
            text(&service["balancer"]),
            discovery_summary(&service["discovery"]),
            text(&service["open_connections"]),
            text(&service["max_connections"]),
            text(&service["accepted"]),
            failed_summary(&service["failed"]),
        );
        if let Some(owners) = service["owners"].as_array() {
            let owners: Vec<String> = owners.iter().map(text).collect();
            let _ = writeln!(out, "  for: {}", owners.join(", "));
        }
        if service["panic"] == true {
            let _ = writeln!(
                out,
                "  panic: too few endpoints are fit, so all of them are in rotation"
            );
        }
        out.push_str(&endpoint_table(endpoints));
    }
    out
}

fn endpoint_table(endpoints: &[Value]) -> String {
    if endpoints.is_empty() {
        return "  no endpoints\n".to_string();
    }
    let mut out = format!(
        "  {:<28} {:<13} {:>6} {:>7} {:>9} {:>8} {:>9} {:>9}\n",
        "ENDPOINT", "STATE", "WEIGHT", "ACTIVE", "TOTAL", "FAILED", "SENT", "RECEIVED"
    );
    for endpoint in endpoints {
        let _ = writeln!(
            out,
            "  {:<28} {:<13} {:>6} {:>7} {:>9} {:>8} {:>9} {:>9}",
            text(&endpoint["address"]),
            text(&endpoint["state"]),
            text(&endpoint["weight"]),
            text(&endpoint["active"]),
            text(&endpoint["connections"]),
            text(&endpoint["connect_failures"]),
            bytes(&endpoint["sent_bytes"]),
            bytes(&endpoint["received_bytes"]),
        );
        if let Some(reason) = endpoint["reason"].as_str() {
            let until = endpoint["until"]
                .as_f64()
                .map(|until| format!(", for {}s more", (until - now_unix()).max(0.0).round()))
                .unwrap_or_default();
            let rotation = if endpoint["in_rotation"] == true && endpoint["state"] != "held_down" {
                " (in rotation: panic)"
            } else {
                ""
            };
            let _ = writeln!(out, "    {reason}{until}{rotation}");
        }
    }
    out
}

fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

/// `, 3 failed (2 connect_refused, 1 no_endpoint)`, or nothing when none failed.
fn failed_summary(failed: &Value) -> String {
    let Some(failed) = failed.as_object().filter(|f| !f.is_empty()) else {
        return String::new();
    };
    let total: u64 = failed.values().filter_map(Value::as_u64).sum();
    let parts: Vec<String> = failed
        .iter()
        .map(|(reason, n)| format!("{} {reason}", text(n)))
        .collect();
    format!(", {total} failed ({})", parts.join(", "))
}

/// A byte count as people read it: `812`, `12.3K`, `4.0M`, `1.2G` (powers of 1024).
fn bytes(value: &Value) -> String {
    let Some(n) = value.as_u64() else {
        return text(value);
    };
    const UNITS: [&str; 4] = ["K", "M", "G", "T"];
    if n < 1024 {
        return n.to_string();
    }
    let mut scaled = n as f64 / 1024.0;
    let mut unit = 0;
    while scaled >= 1024.0 && unit < UNITS.len() - 1 {
        scaled /= 1024.0;
        unit += 1;
    }
    format!("{scaled:.1}{}", UNITS[unit])
}

fn render_service(service: &Value) -> String {
    let mut out = render_services(std::slice::from_ref(service));
    let discovery = &service["discovery"];
    if let Some(detail) = discovery["detail"].as_str().filter(|d| !d.is_empty()) {
        let _ = writeln!(out, "  discovery says: {detail}");
    }
    match service["excluded"].as_array() {
        Some(excluded) if !excluded.is_empty() => {
            let _ = writeln!(out, "  left out by discovery:");
            let _ = writeln!(out, "  {:<40} {:<12} WHY", "INSTANCE", "REASON");
            for entry in excluded {
                let _ = writeln!(
                    out,
                    "  {:<40} {:<12} {}",
                    text(&entry["instance"]),
                    text(&entry["reason"]),
                    text(&entry["detail"]),
                );
            }
        }
        _ => out.push_str("  discovery left nothing out\n"),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(value: Value, expected: &str) {
        assert_eq!(bytes(&value), expected, "{value}");
    }

    #[test]
    fn byte_counts_read_as_people_read_them() {
        check(json!(0), "0");
        check(json!(1023), "1023");
        check(json!(1024), "1.0K");
        check(json!(1536), "1.5K");
        check(json!(5 * 1024 * 1024), "5.0M");
        check(json!(3u64 << 40), "3.0T");
        check(json!(5u64 << 50), "5120.0T");
        check(json!(null), "-");
    }

    #[test]
    fn an_endpoint_out_of_rotation_says_why_and_for_how_long() {
        let until = now_unix() + 30.0;
        let table = endpoint_table(&[
            json!({"address": "127.0.0.1:1", "state": "serving", "in_rotation": true}),
            json!({"address": "127.0.0.1:2", "state": "ejected", "in_rotation": false,
                   "reason": "3 connect failures in a row (ejection 1 in a row)", "until": until}),
            json!({"address": "127.0.0.1:3", "state": "check_failing", "in_rotation": true,
                   "reason": "status 503"}),
        ]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 6, "{table}");
        assert!(lines[2].contains("ejected"), "{table}");
        assert!(
            lines[3].trim() == "3 connect failures in a row (ejection 1 in a row), for 30s more"
                || lines[3].trim()
                    == "3 connect failures in a row (ejection 1 in a row), for 29s more",
            "{table}"
        );
        assert_eq!(lines[5].trim(), "status 503 (in rotation: panic)");
    }

    #[test]
    fn failures_are_summed_with_their_reasons() {
        assert_eq!(failed_summary(&json!({})), "");
        assert_eq!(failed_summary(&json!(null)), "");
        assert_eq!(
            failed_summary(&json!({"connect_refused": 2, "no_endpoint": 1})),
            ", 3 failed (2 connect_refused, 1 no_endpoint)"
        );
    }
}
