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
    http::{header::CONTENT_TYPE, StatusCode},
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
    plugins::LoadedPlugin,
    state::HostState,
};

/// Where the admin API listens unless `--admin` says otherwise (and where `embassy status`
/// asks).
pub const DEFAULT_ADMIN_ADDR: &str = "unix:/run/embassy/admin.sock";
/// Admin connections open at once; more wait in the listen backlog.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;
/// A client must send its request head within this, or its connection is closed.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// An address the admin API listens on (`--admin`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminAddr {
    /// `unix:PATH`: reads and (later) writes; mode 0660.
    Unix(PathBuf),
    /// `IP:PORT`: read-only.
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
    pub plugins: Vec<LoadedPlugin>,
    pub discovery_uri: String,
    /// Where writes go (the run loop); `None`: this API is read-only.
    pub control: Option<Control>,
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
    UrlPath(id): UrlPath<String>,
    Json(body): Json<BalancerBody>,
) -> Response {
    let request = Request::SetBalancer {
        service: id,
        balancer: body.name,
        options: body.options.into_iter().collect(),
    };
    write(&context, &peer, request).await
}

async fn set_endpoint(
    State(context): State<Arc<AdminContext>>,
    Extension(peer): Extension<Peer>,
    UrlPath(id): UrlPath<String>,
    Json(body): Json<EndpointBody>,
) -> Response {
    let request = Request::SetEndpoint {
        service: id,
        endpoint: body.address,
        action: body.action,
    };
    write(&context, &peer, request).await
}

/// Runs a write where writes are allowed: on the unix socket, with a run loop to carry it.
async fn write(context: &AdminContext, peer: &Peer, request: Request) -> Response {
    let refused =
        |status, message: String| (status, Json(json!({ "error": message }))).into_response();
    if let Peer::Tcp(_) = peer {
        warn!(by = %peer, ?request, "admin write refused: TCP admin addresses are read-only");
        return refused(
            StatusCode::FORBIDDEN,
            "this admin address is read-only: writes are accepted on the admin unix socket only"
                .into(),
        );
    }
    let Some(control) = &context.control else {
        return refused(StatusCode::FORBIDDEN, "this admin API is read-only".into());
    };
    match control.run(request, peer.to_string()).await {
        Ok(changed) => Json(changed).into_response(),
        Err(error @ ControlError::UnknownService(_)) => {
            refused(StatusCode::NOT_FOUND, error.to_string())
        }
        Err(error @ ControlError::Stopping) => {
            refused(StatusCode::SERVICE_UNAVAILABLE, error.to_string())
        }
        Err(error) => refused(StatusCode::CONFLICT, error.to_string()),
    }
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
    Json(context.plugins.clone())
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
