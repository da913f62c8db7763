//! The admin API: HTTP/1.1 + JSON over a unix socket (the trusted channel) and, if an operator
//! asks for one, a TCP address.
//!
//! Handlers read the [`HostState`] read model only: they never wait for the run loop and never
//! touch the connection path. Each admin connection is its own task with a header deadline, and
//! at most [`MAX_ADMIN_CONNECTIONS`] are open at once, so a client that is no HTTP client, or
//! one that holds its connection, costs a task and a descriptor, never the API or the proxy.

use std::{
    io,
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use axum::{
    extract::{Path as UrlPath, State},
    http::{
        header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE},
        HeaderMap, HeaderValue, StatusCode,
    },
    response::{IntoResponse, Response},
    routing::{get, post},
    Extension, Json, Router,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
    service::TowerToHyperService,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
    sync::Semaphore,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    control::{Control, ControlError, EndpointAction, Request},
    state::HostState,
};

/// Where the admin API listens unless `--admin` says otherwise (and where `embassy status`
/// asks).
pub const DEFAULT_ADMIN_ADDR: &str = "unix:/run/embassy/admin.sock";
/// Admin connections open at once; more wait in the listen backlog.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;
/// A client must send its request head within this, or its connection is closed.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a resync's answer waits for discovery's first set from the new watch.
const RESYNC_WAIT: Duration = Duration::from_secs(5);

/// An address the admin API listens on (`--admin`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminAddr {
    /// `unix:PATH`: reads and writes; mode 0660.
    Unix(PathBuf),
    /// `IP:PORT`: read-only, or writes with the bearer token of `--admin-token-file`.
    Tcp(SocketAddr),
}

impl std::str::FromStr for AdminAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Some(path) = text.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!("{text:?}: the socket path must be absolute"));
            }
            return Ok(AdminAddr::Unix(PathBuf::from(path)));
        }
        text.parse().map(AdminAddr::Tcp).map_err(|_| {
            format!("{text:?} is neither unix:/ABSOLUTE/PATH nor IP:PORT (e.g. 127.0.0.1:9901)")
        })
    }
}

impl std::fmt::Display for AdminAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdminAddr::Unix(path) => write!(f, "unix:{}", path.display()),
            AdminAddr::Tcp(addr) => addr.fmt(f),
        }
    }
}

/// Why the admin API could not listen.
#[derive(Debug, Error)]
pub enum AdminError {
    #[error("admin socket {path}: another process is serving it", path = .0.display())]
    SocketInUse(PathBuf),
    #[error("admin socket {path}: {source}", path = .path.display())]
    Socket { path: PathBuf, source: io::Error },
    #[error("admin address {addr}: {source}")]
    Tcp { addr: SocketAddr, source: io::Error },
}

/// What the handlers read.
pub struct AdminContext {
    pub host: Arc<HostState>,
    pub discovery_uri: String,
    /// Where writes go (the run loop); `None`: this API is read-only.
    pub control: Option<Control>,
    /// The bearer token's file (`--admin-token-file`); `None`: TCP addresses are read-only.
    pub token_file: Option<PathBuf>,
}

/// Why a token file cannot be used.
#[derive(Debug, Error)]
pub enum TokenError {
    #[error("admin token file {path}: {source}", path = .path.display())]
    Unreadable { path: PathBuf, source: io::Error },
    #[error("admin token file {path}: empty (it must hold the bearer token)", path = .0.display())]
    Empty(PathBuf),
}

/// The bearer token in `path`: its content without surrounding whitespace.
pub fn read_token(path: &Path) -> Result<String, TokenError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenError::Unreadable {
        path: path.to_path_buf(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(TokenError::Empty(path.to_path_buf()));
    }
    Ok(token.to_string())
}

/// Compares in time that depends on the lengths only, not on where the first difference is.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |differ, (a, b)| differ | (a ^ b))
            == 0
}

/// A bound admin listener, served by [`AdminListener::serve`].
pub enum AdminListener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl AdminListener {
    /// Binds `addr`. A unix socket's directory is created; a socket file left by a process
    /// that is gone is replaced, one a live process answers on is an error.
    pub async fn bind(addr: &AdminAddr) -> Result<AdminListener, AdminError> {
        match addr {
            AdminAddr::Unix(path) => bind_unix(path).await,
            AdminAddr::Tcp(addr) => TcpListener::bind(addr)
                .await
                .map(AdminListener::Tcp)
                .map_err(|source| AdminError::Tcp {
                    addr: *addr,
                    source,
                }),
        }
    }

    /// The address actually bound (a TCP port 0 resolved).
    pub fn local(&self) -> String {
        match self {
            AdminListener::Unix(_, path) => format!("unix:{}", path.display()),
            AdminListener::Tcp(listener) => listener
                .local_addr()
                .map_or_else(|_| "?".to_string(), |a| a.to_string()),
        }
    }

    /// Serves the API until `stop`; then removes a unix socket file.
    pub async fn serve(self, context: Arc<AdminContext>, stop: CancellationToken) {
        let local = self.local();
        info!(admin = %local, "admin API serving");
        self.serve_app(router(context), stop).await
    }

    /// Serves only `GET /metrics` until `stop` (`--metrics`: an address for scrapers, which
    /// learn nothing else there).
    pub async fn serve_metrics(self, context: Arc<AdminContext>, stop: CancellationToken) {
        let local = self.local();
        info!(metrics = %local, "metrics serving");
        let app = Router::new()
            .route("/metrics", get(metrics))
            .fallback(|| async { not_found("only /metrics is served here") })
            .with_state(context);
        self.serve_app(app, stop).await
    }

    async fn serve_app(self, app: Router, stop: CancellationToken) {
        let slots = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
        let local = self.local();
        loop {
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            let accepted = tokio::select! {
                _ = stop.cancelled() => break,
                accepted = self.accept() => accepted,
            };
            match accepted {
                Ok((io, peer)) => {
                    let app = app.clone().layer(axum::Extension(peer));
                    let stop = stop.clone();
                    tokio::spawn(async move {
                        serve_connection(io, app, stop).await;
                        drop(slot);
                    });
                }
                Err(error) => {
                    warn!(%error, admin = %local, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        if let AdminListener::Unix(_, path) = &self {
            let _ = std::fs::remove_file(path);
        }
    }

    async fn accept(&self) -> io::Result<(Box<dyn Connection>, Peer)> {
        Ok(match self {
            AdminListener::Unix(listener, _) => {
                let stream = listener.accept().await?.0;
                let peer = match stream.peer_cred() {
                    Ok(cred) => Peer::Unix {
                        uid: Some(cred.uid()),
                        pid: cred.pid(),
                    },
                    Err(_) => Peer::Unix {
                        uid: None,
                        pid: None,
                    },
                };
                (Box::new(stream), peer)
            }
            AdminListener::Tcp(listener) => {
                let (stream, addr) = listener.accept().await?;
                (Box::new(stream), Peer::Tcp(addr))
            }
        })
    }
}

/// Who is on the other end of an admin connection: for the unix socket, the kernel says
/// (`SO_PEERCRED`), for the audit line.
#[derive(Debug, Clone)]
enum Peer {
    Unix { uid: Option<u32>, pid: Option<i32> },
    Tcp(SocketAddr),
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Unix { uid, pid } => {
                let show = |n: Option<String>| n.unwrap_or_else(|| "?".into());
                write!(
                    f,
                    "unix uid={} pid={}",
                    show(uid.map(|u| u.to_string())),
                    show(pid.map(|p| p.to_string()))
                )
            }
            Peer::Tcp(addr) => write!(f, "tcp {addr}"),
        }
    }
}

trait Connection: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Connection for T {}

async fn serve_connection(io: Box<dyn Connection>, app: Router, stop: CancellationToken) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let connection = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(app));
    tokio::select! {
        result = connection => {
            if let Err(error) = result {
                debug!(%error, "admin connection ended with an error");
            }
        }
        _ = stop.cancelled() => {}
    }
}

async fn bind_unix(path: &Path) -> Result<AdminListener, AdminError> {
    let failed = |source| AdminError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(failed)?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(AdminError::SocketInUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(failed)?;
    }
    let listener = UnixListener::bind(path).map_err(failed)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(failed)?;
    Ok(AdminListener::Unix(listener, path.to_path_buf()))
}

fn router(context: Arc<AdminContext>) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/v1/services", get(services))
        .route("/v1/services/{id}", get(service))
        .route("/v1/plugins", get(plugins))
        .route("/v1/discovery", get(discovery))
        .route("/metrics", get(metrics))
        .route("/v1/services/{id}/balancer", post(set_balancer))
        .route("/v1/services/{id}/endpoint", post(set_endpoint))
        .route("/v1/services/{id}/resync", post(resync))
        .route("/v1/plugins/reload", post(reload_plugins))
        .fallback(|| async { not_found("no such admin endpoint; try /v1/services") })
        .with_state(context)
}

/// `POST /v1/services/{id}/balancer`'s body.
#[derive(Debug, Deserialize)]
struct BalancerBody {
    name: String,
    #[serde(default)]
    options: std::collections::BTreeMap<String, String>,
}

/// `POST /v1/services/{id}/endpoint`'s body.
#[derive(Debug, Deserialize)]
struct EndpointBody {
    address: String,
    action: EndpointAction,
}

async fn set_balancer(
    State(context): State<Arc<AdminContext>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
    Json(body): Json<BalancerBody>,
) -> Response {
    let request = Request::SetBalancer {
        service: id,
        balancer: body.name,
        options: body.options.into_iter().collect(),
    };
    write(&context, &peer, &headers, request).await
}

async fn set_endpoint(
    State(context): State<Arc<AdminContext>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
    Json(body): Json<EndpointBody>,
) -> Response {
    let request = Request::SetEndpoint {
        service: id,
        endpoint: body.address,
        action: body.action,
    };
    write(&context, &peer, &headers, request).await
}

async fn reload_plugins(
    State(context): State<Arc<AdminContext>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
) -> Response {
    write(&context, &peer, &headers, Request::ReloadPlugins).await
}

/// Restarts the watch, then waits (up to [`RESYNC_WAIT`]) for the new watch's first set, so
/// the answer can say what it changed.
async fn resync(
    State(context): State<Arc<AdminContext>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Response {
    let addresses = |id: &str| -> Vec<String> {
        context.host.service(id).map_or_else(Vec::new, |s| {
            s.view(false)
                .endpoints
                .iter()
                .map(|e| e.address.clone())
                .collect()
        })
    };
    let before = addresses(&id);
    let request = Request::Resync {
        service: id.clone(),
    };
    let control = match authorize(&context, &peer, &headers, &request) {
        Ok(control) => control,
        Err(refused) => return *refused,
    };
    let mut answer = match control.run(request, peer.to_string()).await {
        Ok(answer) => answer,
        Err(error) => return control_refused(error),
    };
    let updates_before = answer["updates_before"].as_u64().unwrap_or(0);
    let deadline = tokio::time::Instant::now() + RESYNC_WAIT;
    let answered = loop {
        let updates = context
            .host
            .service(&id)
            .map_or(0, |s| s.discovery.view().updates);
        if updates > updates_before {
            break true;
        }
        if tokio::time::Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let after = addresses(&id);
    answer["answered"] = json!(answered);
    answer["added"] = json!(after
        .iter()
        .filter(|a| !before.contains(a))
        .collect::<Vec<_>>());
    answer["removed"] = json!(before
        .iter()
        .filter(|a| !after.contains(a))
        .collect::<Vec<_>>());
    answer["endpoints_after"] = json!(after.len());
    if !answered {
        answer["note"] = json!(format!(
            "discovery has not answered the new watch within {RESYNC_WAIT:?}; the endpoints in force stay until it does"
        ));
    }
    Json(answer).into_response()
}

fn refused(status: StatusCode, message: String) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// The run loop's channel, if `peer` may write here: anyone on the unix socket (its file
/// permissions decide), on a TCP address only with the bearer token. A refusal is logged.
fn authorize<'a>(
    context: &'a AdminContext,
    peer: &Peer,
    headers: &HeaderMap,
    request: &Request,
) -> Result<&'a Control, Box<Response>> {
    let Some(control) = &context.control else {
        return Err(Box::new(refused(
            StatusCode::FORBIDDEN,
            "this admin API is read-only".into(),
        )));
    };
    let Peer::Tcp(_) = peer else {
        return Ok(control);
    };
    let Some(token_file) = &context.token_file else {
        warn!(by = %peer, ?request, "admin write refused: TCP admin addresses are read-only without --admin-token-file");
        return Err(Box::new(refused(
            StatusCode::FORBIDDEN,
            "this admin address is read-only: writes are accepted on the admin unix socket, or here with a bearer token when Embassy runs with --admin-token-file".into(),
        )));
    };
    let expected = match read_token(token_file) {
        Ok(token) => token,
        Err(error) => {
            warn!(by = %peer, ?request, %error, "admin write refused: the token file cannot be used");
            return Err(Box::new(refused(
                StatusCode::SERVICE_UNAVAILABLE,
                "writes are off here until Embassy's admin token file is fixed (its log says why)"
                    .into(),
            )));
        }
    };
    let given = headers
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(given) if same_secret(given.as_bytes(), expected.as_bytes()) => Ok(control),
        given => {
            let why = if given.is_some() {
                "wrong bearer token"
            } else {
                "no bearer token"
            };
            warn!(by = %peer, ?request, "admin write refused: {why}");
            let mut response = refused(
                StatusCode::UNAUTHORIZED,
                format!("{why}: writes here need Authorization: Bearer TOKEN, the token in Embassy's --admin-token-file"),
            );
            response
                .headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            Err(Box::new(response))
        }
    }
}

/// Runs a write where writes are allowed (see [`authorize`]).
async fn write(
    context: &AdminContext,
    peer: &Peer,
    headers: &HeaderMap,
    request: Request,
) -> Response {
    let control = match authorize(context, peer, headers, &request) {
        Ok(control) => control,
        Err(refused) => return *refused,
    };
    match control.run(request, peer.to_string()).await {
        Ok(changed) => Json(changed).into_response(),
        Err(error) => control_refused(error),
    }
}

fn control_refused(error: ControlError) -> Response {
    let status = match error {
        ControlError::UnknownService(_) => StatusCode::NOT_FOUND,
        ControlError::Stopping | ControlError::Watch(_) => StatusCode::SERVICE_UNAVAILABLE,
        ControlError::PluginDir(_) => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::CONFLICT,
    };
    refused(status, error.to_string())
}

fn not_found(message: &str) -> Response {
    (StatusCode::NOT_FOUND, Json(json!({ "error": message }))).into_response()
}

async fn services(State(context): State<Arc<AdminContext>>) -> impl IntoResponse {
    let views: Vec<_> = context
        .host
        .services()
        .iter()
        .map(|s| s.view(false))
        .collect();
    Json(views)
}

async fn service(
    State(context): State<Arc<AdminContext>>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    match context.host.service(&id) {
        Some(service) => Json(service.view(true)).into_response(),
        None => not_found(&format!(
            "no service {id:?}; ids are PROTO-PORT, as GET /v1/services lists them"
        )),
    }
}

async fn metrics(State(context): State<Arc<AdminContext>>) -> Response {
    match crate::metrics::render(Arc::clone(&context.host)) {
        Ok(text) => ([(CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "metrics encoding failed\n",
        )
            .into_response(),
    }
}

async fn plugins(State(context): State<Arc<AdminContext>>) -> impl IntoResponse {
    Json(context.host.plugins().as_ref().clone())
}

#[derive(Serialize)]
struct DiscoveryEntry {
    id: String,
    descriptor: String,
    #[serde(flatten)]
    state: crate::state::DiscoveryView,
}

async fn discovery(State(context): State<Arc<AdminContext>>) -> impl IntoResponse {
    let services: Vec<DiscoveryEntry> = context
        .host
        .services()
        .iter()
        .map(|s| DiscoveryEntry {
            id: s.id.clone(),
            descriptor: s.service.descriptor.to_string(),
            state: s.discovery.view(),
        })
        .collect();
    Json(json!({ "uri": context.discovery_uri, "services": services }))
}

/// The status page: every service explained, as HTML for a browser.
async fn status_page(State(context): State<Arc<AdminContext>>) -> Response {
    use axum::http::header;
    // A view is plain data with string keys: serialising it cannot fail.
    let views: Vec<serde_json::Value> = context
        .host
        .services()
        .iter()
        .filter_map(|s| serde_json::to_value(s.view(true)).ok())
        .collect();
    let page =
        crate::status_page::render(&views, &context.discovery_uri, std::time::SystemTime::now());
    let headers = [
        (header::CACHE_CONTROL, "no-store"),
        // Nothing but the page itself: no frames, no loads from elsewhere.
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; \
             connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    ];
    (headers, axum::response::Html(page)).into_response()
}

/// 200 once every service has had a first answer from discovery (a set, or a reason why not).
async fn ready(State(context): State<Arc<AdminContext>>) -> Response {
    let waiting: Vec<String> = context
        .host
        .services()
        .iter()
        .filter(|s| !s.discovery.answered())
        .map(|s| s.id.clone())
        .collect();
    let status = if waiting.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({ "ready": waiting.is_empty(), "waiting_for_discovery": waiting })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected: Result<AdminAddr, &str>) {
        assert_eq!(
            text.parse::<AdminAddr>(),
            expected.map_err(str::to_string),
            "{text:?}"
        );
    }

    #[test]
    fn admin_addresses() {
        check(
            "unix:/run/embassy/admin.sock",
            Ok(AdminAddr::Unix("/run/embassy/admin.sock".into())),
        );
        check(
            "127.0.0.1:9901",
            Ok(AdminAddr::Tcp("127.0.0.1:9901".parse().expect("addr"))),
        );
        check(
            "unix:admin.sock",
            Err("\"unix:admin.sock\": the socket path must be absolute"),
        );
        check(
            "localhost:9901",
            Err("\"localhost:9901\" is neither unix:/ABSOLUTE/PATH nor IP:PORT (e.g. 127.0.0.1:9901)"),
        );
    }
}
