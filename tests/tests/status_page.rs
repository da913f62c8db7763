//! The status page (`GET /` on the admin API's TCP address) in a real headless Chromium: the
//! DOM it builds shows the services, endpoints and exclusions, a screenshot is drawn, and the
//! page's own script refreshes it when the set changes.
//!
//! Chromium is Debian's `chromium` (scripts/test installs it); without it these tests fail,
//! saying how to install it.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use embassy_tests::*;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);
/// What one Chromium run may take before it is killed and the test fails.
const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(60);

/// Embassy on the file plugin, serving `web[prod]` with a unix admin socket (for the test's
/// own questions) and a TCP admin address (for the browser).
struct Served {
    embassy: Embassy,
    services: PathBuf,
    port: u16,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
    _plugins: tempfile::TempDir,
}

impl Served {
    fn start(endpoints: Value) -> Served {
        let dir = tempfile::tempdir().expect("temp dir");
        let services = dir.path().join("services.json");
        write_services(&services, &json!({ "web": endpoints }));
        let plugins = standard_plugin_dir(&[]);
        let (port, admin_port) = (free_port(), free_port());
        let admin: SocketAddr = ([127, 0, 0, 1], admin_port).into();
        let mut command = Embassy::command(
            &artifacts().embassy(),
            [
                "--plugin-dir".to_string(),
                plugins.path().display().to_string(),
                "--discovery".to_string(),
                format!("file://{}", services.display()),
                "--service".to_string(),
                format!("web[prod];{port}/tcp"),
            ],
        );
        // The socket Embassy::command chose (so admin_get works), and the TCP address beside it.
        let socket = command
            .get_envs()
            .find(|(key, _)| *key == "EMBASSY_ADMIN")
            .and_then(|(_, value)| value)
            .and_then(|value| value.to_str())
            .expect("an admin socket")
            .to_string();
        command.args(["--admin", &socket, "--admin", &admin.to_string()]);
        let mut embassy = Embassy::spawn(&mut command);
        embassy
            .wait_for_log(&format!("admin={admin}"), WAIT)
            .expect("the TCP admin address serves");
        Served {
            embassy,
            services,
            port,
            admin,
            _dir: dir,
            _plugins: plugins,
        }
    }

    fn id(&self) -> String {
        format!("tcp-{}", self.port)
    }

    /// Waits until the service's endpoints are exactly `expected`.
    fn wait_for_endpoints(&self, expected: &[String]) -> Value {
        let mut expected = expected.to_vec();
        expected.sort();
        self.embassy
            .wait_for_service(&self.id(), WAIT, |view| addresses(view) == expected)
            .expect("the endpoint set")
    }
}

fn addresses(view: &Value) -> Vec<String> {
    let mut found: Vec<String> = view["endpoints"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter_map(|e| e["address"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

/// The `chromium` binary, or a failure saying how to get it.
fn chromium() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("chromium"))
            .find(|candidate| candidate.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "chromium is not installed: the status page tests need a real browser; \
             install it with `apt-get install chromium` (scripts/test does)"
        )
    })
}

/// Runs headless Chromium on `url` with `args` and a fresh profile; returns its stdout.
/// Killed, and the test failed, if it takes longer than [`CHROMIUM_TIMEOUT`].
fn run_chromium(url: &str, args: &[String]) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let out = profile.path().join("stdout");
    let err = profile.path().join("stderr");
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
        ])
        .arg(format!(
            "--user-data-dir={}",
            profile.path().join("profile").display()
        ))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("stdout file"))
        .stderr(std::fs::File::create(&err).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|e| {
            panic!("spawn chromium: {e} (install it with `apt-get install chromium`)")
        });
    let deadline = Instant::now() + CHROMIUM_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for chromium") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium {args:?} {url} did not finish within {CHROMIUM_TIMEOUT:?}:\n{}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(50));
    };
    let stdout = std::fs::read_to_string(&out).expect("chromium's stdout");
    assert!(
        status.success(),
        "chromium {args:?} {url} failed ({status}):\n{}",
        std::fs::read_to_string(&err).unwrap_or_default()
    );
    stdout
}

/// The DOM Chromium built from `url`, after `virtual_ms` of (virtual) time for the page's
/// timers.
fn dump_dom(url: &str, virtual_ms: u32) -> String {
    run_chromium(
        url,
        &[
            "--dump-dom".to_string(),
            format!("--virtual-time-budget={virtual_ms}"),
        ],
    )
}

/// Width and height from a PNG's header.
fn png_size(png: &[u8]) -> (u32, u32) {
    assert!(
        png.len() > 24 && png.starts_with(b"\x89PNG\r\n\x1a\n") && &png[12..16] == b"IHDR",
        "not a PNG ({} bytes)",
        png.len()
    );
    let be = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().expect("4 bytes"));
    (be(16), be(20))
}

#[test]
fn the_page_shows_services_endpoints_and_what_discovery_left_out() {
    let upstream = Upstream::start("a");
    let served = Served::start(json!([
        { "address": upstream.addr.to_string(), "tags": ["prod"] },
        { "address": "127.0.0.1:10", "tags": ["staging"] },
    ]));
    served.wait_for_endpoints(&[upstream.addr.to_string()]);
    // A connection held open shows as active.
    let _client = Client::connect(served.port).expect("proxied");
    served
        .embassy
        .wait_for_service(&served.id(), WAIT, |v| v["open_connections"] == 1)
        .expect("one open connection");
    let url = format!("http://{}/", served.admin);

    let dom = dump_dom(&url, 1000);
    for expected in [
        served.id(),
        format!("web[prod];{}/tcp", served.port),
        format!("127.0.0.1:{}", served.port),
        upstream.addr.to_string(),
        "serving".to_string(),
        "round-robin".to_string(),
        "1 open of".to_string(),
        // The instance left out, and why.
        "web #2".to_string(),
        "127.0.0.1:10 lacks tag".to_string(),
    ] {
        assert!(
            dom.contains(&expected),
            "{expected:?} not in the DOM:\n{dom}"
        );
    }
    assert!(
        dom.contains("<title>Embassy: 1 service</title>"),
        "a healthy service: {dom}"
    );

    let shots = tempfile::tempdir().expect("temp dir");
    let shot = shots.path().join("status.png");
    run_chromium(
        &url,
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1366,768".to_string(),
            "--hide-scrollbars".to_string(),
        ],
    );
    let png = std::fs::read(&shot).expect("chromium wrote the screenshot");
    assert_eq!(png_size(&png), (1366, 768));
    // A blank page compresses to a few kilobytes; text and tables do not.
    assert!(
        png.len() > 20_000,
        "a near-empty screenshot: {} bytes",
        png.len()
    );
    if let Some(keep) = std::env::var_os("EMBASSY_STATUS_SCREENSHOT") {
        std::fs::copy(&shot, keep).expect("keep the screenshot");
    }
}

/// A plain HTTP/1.1 GET to `addr`: the whole response as bytes.
fn http_get(addr: SocketAddr, path: &str) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).expect("connect to the admin API");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("response");
    response
}

/// A relay between the browser and the admin API, one request per connection, that calls
/// `after(n)` once it has passed on the `n`th request for `/` (counting from 1) and before it
/// takes the next: the test changes what Embassy serves at a moment the page cannot have
/// seen yet, so only the page's own refresh can show the change.
fn relay(admin: SocketAddr, mut after: impl FnMut(usize) + Send + 'static) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the relay");
    let addr = listener.local_addr().expect("relay address");
    thread::spawn(move || {
        let mut pages = 0;
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut head = Vec::new();
            loop {
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) if line == "\r\n" => break,
                    Ok(_) => head.push(line),
                }
            }
            let Some(path) = head
                .first()
                .and_then(|line| line.split_whitespace().nth(1))
                .map(str::to_string)
            else {
                continue;
            };
            let _ = stream.write_all(&http_get(admin, &path));
            drop(stream);
            if path == "/" {
                pages += 1;
                after(pages);
            }
        }
    });
    addr
}

#[test]
fn the_page_refreshes_itself_when_the_set_changes() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let served = Served::start(json!([{ "address": a.addr.to_string(), "tags": ["prod"] }]));
    served.wait_for_endpoints(&[a.addr.to_string()]);

    // After the first load: the set becomes b. After the first refresh: the file turns
    // invalid, its error quoting a service name made of markup (the set stays b).
    let (services, admin, id, b_addr) = (
        served.services.clone(),
        served.admin,
        served.id(),
        b.addr.to_string(),
    );
    let relayed = relay(admin, move |pages| {
        let wait = |check: &dyn Fn(&Value) -> bool| {
            let deadline = Instant::now() + WAIT;
            while Instant::now() < deadline {
                let response = http_get(admin, &format!("/v1/services/{id}"));
                let text = String::from_utf8_lossy(&response).to_string();
                if let Some(view) = text
                    .split_once("\r\n\r\n")
                    .and_then(|(_, body)| serde_json::from_str::<Value>(body).ok())
                {
                    if check(&view) {
                        return;
                    }
                }
                thread::sleep(Duration::from_millis(20));
            }
            panic!("embassy did not take the change within {WAIT:?}");
        };
        match pages {
            1 => {
                write_services(
                    &services,
                    &json!({ "web": [{ "address": b_addr, "tags": ["prod"] }] }),
                );
                wait(&|view| addresses(view) == [b_addr.clone()]);
            }
            2 => {
                let bad = services.with_extension("tmp");
                std::fs::write(
                    &bad,
                    br#"{ "web": [], "<script>document.title='owned'</script>": 5 }"#,
                )
                .expect("write");
                std::fs::rename(&bad, &services).expect("rename");
                wait(&|view| view["discovery"]["state"] == "invalid");
            }
            _ => {}
        }
    });

    // Three refreshes' worth of the page's timer, in virtual time.
    let dom = dump_dom(&format!("http://{relayed}/"), 17_000);
    let shown = |addr: SocketAddr| dom.contains(&format!("<code>{addr}</code>"));
    assert!(
        shown(b.addr) && !shown(a.addr),
        "the page did not refresh to the new set (b {}, not a {}):\n{dom}",
        b.addr,
        a.addr
    );
    assert!(
        dom.contains(">invalid</span>") && dom.contains("&lt;script&gt;document.title="),
        "the page did not refresh to the invalid file's report, escaped:\n{dom}"
    );
    assert!(
        !dom.contains("<title>owned</title>") && dom.matches("<script").count() == 1,
        "markup from discovery ran or was inserted as markup:\n{dom}"
    );
    assert!(
        dom.contains("need a look"),
        "the title follows the refresh: {dom}"
    );
}
