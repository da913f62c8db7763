//! Changing a running Embassy: the admin API's write operations, carried to the run loop (the
//! supervisor's only owner) as commands, each answered with what it changed.
//!
//! Writes are accepted only where the operator controls who connects: the admin unix socket
//! (its file permissions; the peer's uid and pid go in the audit line), or a TCP admin address
//! with the bearer token of `--admin-token-file`. Each change is one audit line. SIGHUP sends
//! the run loop the same plugin reload an operator asks for.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use embassy_core::health::Operator;

/// One write operation.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "operation", rename_all = "snake_case")]
pub enum Request {
    /// Swap the service's balancer in place.
    SetBalancer {
        service: String,
        balancer: String,
        #[serde(default)]
        options: Vec<(String, String)>,
    },
    /// Drain, disable or enable one endpoint of a service.
    SetEndpoint {
        service: String,
        endpoint: String,
        action: EndpointAction,
    },
    /// Rescan the plugin directory: new libraries and newer versions are loaded.
    ReloadPlugins,
    /// Restart the service's watch: discovery answers with its whole current set.
    Resync { service: String },
}

impl Request {
    /// The service the request is about, if it is about one.
    pub fn service(&self) -> Option<&str> {
        match self {
            Request::SetBalancer { service, .. }
            | Request::SetEndpoint { service, .. }
            | Request::Resync { service } => Some(service),
            Request::ReloadPlugins => None,
        }
    }
}

/// What an operator does to one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointAction {
    /// No new connections; open ones finish.
    Drain,
    /// No new connections; open ones are reset.
    Disable,
    /// Back to what health and discovery say.
    Enable,
}

impl EndpointAction {
    pub fn operator(self) -> Option<Operator> {
        match self {
            EndpointAction::Drain => Some(Operator::Drain),
            EndpointAction::Disable => Some(Operator::Disable),
            EndpointAction::Enable => None,
        }
    }

    pub fn parse(text: &str) -> Option<EndpointAction> {
        match text {
            "drain" => Some(EndpointAction::Drain),
            "disable" => Some(EndpointAction::Disable),
            "enable" => Some(EndpointAction::Enable),
            _ => None,
        }
    }
}

/// Why a write was refused; nothing changed.
#[derive(Debug, Error)]
pub enum ControlError {
    #[error("no service {0:?}; ids are PROTO-PORT, as GET /v1/services lists them")]
    UnknownService(String),
    #[error("cannot set balancer {balancer:?}: {reason}")]
    Balancer { balancer: String, reason: String },
    #[error(transparent)]
    Endpoint(#[from] embassy_core::endpoints::OperatorError),
    #[error("{0}: {source}", source = .0.source)]
    PluginDir(#[from] crate::plugins::PluginDirError),
    #[error("cannot restart the watch (the one in force stays): {0}")]
    Watch(String),
    #[error("embassy is stopping")]
    Stopping,
}

/// A request on its way to the run loop, with who asked and where the answer goes.
#[derive(Debug)]
pub struct Command {
    pub request: Request,
    /// The peer, for the audit line (`uid=0 pid=1234`).
    pub by: String,
    pub reply: oneshot::Sender<Result<Value, ControlError>>,
}

/// The admin API's end of the command channel.
#[derive(Debug, Clone)]
pub struct Control(mpsc::Sender<Command>);

impl Control {
    /// A channel: the admin API sends, the run loop receives.
    pub fn channel() -> (Control, mpsc::Receiver<Command>) {
        let (sender, receiver) = mpsc::channel(16);
        (Control(sender), receiver)
    }

    /// Sends `request` and waits for the run loop's answer.
    pub async fn run(&self, request: Request, by: String) -> Result<Value, ControlError> {
        let (reply, answer) = oneshot::channel();
        self.0
            .send(Command { request, by, reply })
            .await
            .map_err(|_| ControlError::Stopping)?;
        answer.await.map_err(|_| ControlError::Stopping)?
    }
}
