//! Prometheus metrics: exact counters after known traffic, bytes of a connection still open,
//! a real Prometheus scraping `--metrics`, and `promtool check metrics` on the output.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use embassy_tests::{prometheus::*, *};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

/// Embassy on the file plugin serving `web` (one live upstream) and `dead` (an endpoint where
/// nothing listens); `extra` adds options.
fn two_services(extra: &[String]) -> (FileBacked, u16, u16, Upstream, u16, tempfile::TempDir) {
    let web = Upstream::start("web");
    let dead = free_port(); // nothing listens there
    let (web_port, dead_port) = (free_port(), free_port());
    let services = json!({
        "web": [web.addr.to_string()],
        "dead": [format!("127.0.0.1:{dead}")],
    });
    let plugins = standard_plugin_dir(&[]);
    let mut args: Vec<String> = service_arg(format!("web;{web_port}/tcp")).into();
    args.extend(service_arg(format!("dead;{dead_port}/tcp")));
    args.extend_from_slice(extra);
    let proxy = FileBacked::start(&services, plugins.path(), &args, "admin API serving");
    for port in [web_port, dead_port] {
        proxy
            .embassy
            .wait_for_service(&format!("tcp-{port}"), WAIT, |v| {
                v["endpoints"].as_array().is_some_and(|e| e.len() == 1)
            })
            .expect("one endpoint each");
    }
    (proxy, web_port, dead_port, web, dead, plugins)
}

/// [`two_services`] with `--metrics` on a free port, once it serves: the address, the proxy,
/// the `web` port and its upstream.
fn with_metrics_address() -> (SocketAddr, FileBacked, u16, Upstream) {
    let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let (mut proxy, web_port, _dead_port, web, _dead, _plugins) =
        two_services(&["--metrics".to_string(), metrics.to_string()]);
    proxy
        .embassy
        .wait_for_log("metrics serving", WAIT)
        .expect("metrics address up");
    (metrics, proxy, web_port, web)
}

#[test]
fn counters_are_exact_and_bytes_show_while_a_connection_is_open() {
    let (proxy, web_port, dead_port, web, dead, _plugins) = two_services(&[]);
    let embassy = &proxy.embassy;
    let (web_id, dead_id) = (format!("tcp-{web_port}"), format!("tcp-{dead_port}"));
    let web_endpoint = web.addr.to_string();
    let dead_endpoint = format!("127.0.0.1:{dead}");

    const N: usize = 7;
    const M: usize = 5;
    for _ in 0..N {
        let mut client = Client::connect(web_port).expect("served");
        assert_eq!(client.echo(b"ping\n").expect("echo"), b"ping\n");
    }
    for _ in 0..M {
        let mut stream = TcpStream::connect(("127.0.0.1", dead_port)).expect("accepted");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut byte = [0u8; 1];
        // Closed (or reset) once the only endpoint refuses: no byte ever comes.
        assert!(matches!(stream.read(&mut byte), Ok(0) | Err(_)));
    }

    let web_labels = [("service", web_id.as_str())];
    let web_endpoint_labels = [
        ("service", web_id.as_str()),
        ("endpoint", web_endpoint.as_str()),
    ];
    let wait = |name: &str, labels: &[(&str, &str)], value: usize| {
        embassy
            .wait_for_sample(name, labels, value as f64, WAIT)
            .unwrap_or_else(|error| panic!("{error:#}"))
    };
    wait("embassy_connections_accepted_total", &web_labels, N);
    wait(
        "embassy_endpoint_connections_total",
        &web_endpoint_labels,
        N,
    );
    // Each connection sent "ping\n" and got the greeting "web\n" and the echo back.
    wait(
        "embassy_endpoint_sent_bytes_total",
        &web_endpoint_labels,
        N * 5,
    );
    wait(
        "embassy_endpoint_received_bytes_total",
        &web_endpoint_labels,
        N * 9,
    );
    wait(
        "embassy_endpoint_connect_duration_seconds_count",
        &web_endpoint_labels,
        N,
    );
    wait("embassy_connections_open", &web_labels, 0);

    wait(
        "embassy_connections_accepted_total",
        &[("service", &dead_id)],
        M,
    );
    wait(
        "embassy_connections_failed_total",
        &[("service", &dead_id), ("reason", "connect_refused")],
        M,
    );
    wait(
        "embassy_endpoint_connect_failures_total",
        &[
            ("service", &dead_id),
            ("endpoint", &dead_endpoint),
            ("reason", "connect_refused"),
        ],
        M,
    );
    wait(
        "embassy_endpoints",
        &[("service", &dead_id), ("state", "failing")],
        1,
    );
    wait(
        "embassy_endpoints",
        &[("service", &web_id), ("state", "serving")],
        1,
    );
    let text = embassy.metrics().expect("metrics");
    for reason in ["no_endpoint", "balancer_error", "connect_timeout"] {
        assert_eq!(
            sample(
                &text,
                "embassy_connections_failed_total",
                &[("service", &dead_id), ("reason", reason)]
            ),
            Some(0.0),
            "{reason}"
        );
    }
    assert_eq!(
        sample(
            &text,
            "embassy_connections_failed_total",
            &[("service", &web_id), ("reason", "connect_refused")]
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, "embassy_discovery_up", &[("service", &web_id)]),
        Some(1.0)
    );

    // A long-lived connection's bytes count while it stays open.
    let mut held = Client::connect(web_port).expect("served");
    let payload = vec![b'x'; 100_000];
    assert_eq!(held.echo(&payload).expect("echo").len(), payload.len());
    wait(
        "embassy_endpoint_sent_bytes_total",
        &web_endpoint_labels,
        N * 5 + payload.len(),
    );
    wait(
        "embassy_endpoint_received_bytes_total",
        &web_endpoint_labels,
        N * 9 + 4 + payload.len(),
    );
    wait("embassy_connections_open", &web_labels, 1);
    wait(
        "embassy_endpoint_connections_active",
        &web_endpoint_labels,
        1,
    );
    drop(held);
}

/// A real Prometheus scrapes `--metrics`, and its query API returns Embassy's connection
/// counter with the right value; `promtool check metrics` accepts the exposition.
#[test]
fn prometheus_scrapes_the_metrics_address_and_promtool_accepts_it() {
    let (metrics, _proxy, web_port, _web) = with_metrics_address();

    // Only /metrics there: the read-only address shows scrapers nothing else.
    let (status, _) = http_get_tcp(metrics, "/v1/services").expect("GET");
    assert_eq!(status, 404);
    let (status, text) = http_get_tcp(metrics, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200);
    let checked = promtool_check(&text).unwrap_or_else(|error| panic!("{error:#}"));
    assert!(
        checked.status.success() && checked.stdout.is_empty() && checked.stderr.is_empty(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    let prometheus = Prometheus::scraping(metrics).unwrap_or_else(|error| panic!("{error:#}"));
    const N: usize = 6;
    for _ in 0..N {
        let mut client = Client::connect(web_port).expect("served");
        client.echo(b"hi\n").expect("echo");
    }
    let query = format!("embassy_connections_accepted_total{{service=\"tcp-{web_port}\"}}");
    prometheus
        .wait_for(&query, N as f64, Duration::from_secs(60))
        .unwrap_or_else(|error| panic!("{error:#}"));
    let query = format!(
        "sum(embassy_endpoint_sent_bytes_total{{service=\"tcp-{web_port}\",job=\"embassy\"}})"
    );
    prometheus
        .wait_for(&query, (N * 3) as f64, Duration::from_secs(60))
        .unwrap_or_else(|error| panic!("{error:#}"));
}

/// A client that is no HTTP client, and one that sends nothing, on the metrics address cost
/// the proxy and other scrapers nothing.
#[test]
fn garbage_on_the_metrics_address_leaves_the_proxy_alone() {
    let (metrics, _proxy, web_port, _web) = with_metrics_address();
    let mut garbage = TcpStream::connect(metrics).expect("connect");
    garbage
        .write_all(b"\x16\x03\x01 not http\r\n\r\n")
        .expect("write");
    let _silent = TcpStream::connect(metrics).expect("connect"); // sends nothing
    let mut client = Client::connect(web_port).expect("served");
    assert_eq!(client.echo(b"still\n").expect("echo"), b"still\n");
    let (status, text) = http_get_tcp(metrics, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200);
    assert!(text.contains("embassy_connections_accepted_total"));
}

/// UDP: sessions per endpoint are exact; datagrams and their bytes agree (a resend after a
/// loss on a loaded machine adds to both).
#[test]
fn udp_sessions_and_datagrams_are_counted() {
    use embassy_tests::udp::{UdpClient, UdpUpstream};
    let upstream = UdpUpstream::start("dns");
    let port = free_port();
    let services = json!({ "dns": [{ "address": upstream.addr.to_string(), "proto": "udp" }] });
    let plugins = standard_plugin_dir(&[]);
    let proxy = FileBacked::start(
        &services,
        plugins.path(),
        &service_arg(format!("dns;{port}/udp")),
        "listening",
    );
    let embassy = &proxy.embassy;
    let id = format!("udp-{port}");
    embassy
        .wait_for_service(&id, WAIT, |v| {
            v["endpoints"].as_array().is_some_and(|e| e.len() == 1)
        })
        .expect("one endpoint");
    const CLIENTS: usize = 3;
    const DATAGRAMS: usize = 4;
    let mut clients: Vec<UdpClient> = (0..CLIENTS)
        .map(|_| UdpClient::new(port).expect("client"))
        .collect();
    for client in &mut clients {
        for index in 0..DATAGRAMS {
            client
                .echo(format!("datagram-{index}").as_bytes())
                .expect("echoed");
        }
    }
    let endpoint = upstream.addr.to_string();
    let labels = [("service", id.as_str()), ("endpoint", endpoint.as_str())];
    embassy
        .wait_for_sample(
            "embassy_endpoint_connections_total",
            &labels,
            CLIENTS as f64,
            WAIT,
        )
        .unwrap_or_else(|error| panic!("{error:#}"));
    embassy
        .wait_for_sample(
            "embassy_endpoint_connections_active",
            &labels,
            CLIENTS as f64,
            WAIT,
        )
        .unwrap_or_else(|error| panic!("{error:#}"));
    let text = embassy.metrics().expect("metrics");
    let value = |name: &str| sample(&text, name, &labels).unwrap_or_else(|| panic!("{name}"));
    let sent = value("embassy_endpoint_datagrams_sent_total");
    let received = value("embassy_endpoint_datagrams_received_total");
    assert!(sent >= (CLIENTS * DATAGRAMS) as f64, "{sent}");
    assert!(received >= (CLIENTS * DATAGRAMS) as f64, "{received}");
    // Every datagram here is "datagram-N": 10 bytes each way.
    assert_eq!(value("embassy_endpoint_sent_bytes_total"), sent * 10.0);
    assert_eq!(
        value("embassy_endpoint_received_bytes_total"),
        received * 10.0
    );
    assert_eq!(
        sample(
            &text,
            "embassy_connections_accepted_total",
            &[("service", &id)]
        ),
        Some(CLIENTS as f64)
    );
    assert!(
        sample(&text, "embassy_connections_open", &[("service", &id)]).is_none(),
        "TCP-only series are not shown for a UDP listener"
    );
}
