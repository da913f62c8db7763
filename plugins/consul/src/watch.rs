//! One watch: a loop of blocking queries for one service, on the plugin's runtime.

use std::{sync::Arc, time::Duration};

use embassy_plugin_api::{
    support::{Backoff, WatchSink},
    text::cut,
    BackendHealth, WatchRequest,
};
use reqwest::{header::HeaderValue, Client, StatusCode, Url};
use tokio::time::{sleep_until, Instant};
use tracing::debug;

use crate::{
    config::{format_wait, ConsulConfig},
    health::{next_index, parse_answer, parse_index, query_params, Answer},
    ConsulError,
};

/// What a watch follows, fixed at its start.
pub struct Target {
    pub service: String,
    /// Its tags and protocol select the instances.
    pub request: WatchRequest,
    pub datacenter: Option<String>,
}

/// The watch loop; runs until its task is aborted.
pub async fn run(client: Client, config: Arc<ConsulConfig>, target: Target, sink: Arc<WatchSink>) {
    let wait = format_wait(config.wait);
    // The agent may add up to wait/16 of jitter; give the answer time to travel on top.
    let request_timeout = config.wait + config.wait / 16 + Duration::from_secs(5);
    let mut index = 0u64;
    // The host assumes a reachable backend until told otherwise.
    let mut health = BackendHealth::Reachable;
    let mut backoff = Backoff::new(config.backoff, config.max_backoff);
    let mut next_start = Instant::now();
    loop {
        sleep_until(next_start).await;
        let started = Instant::now();
        next_start = started + config.min_interval;
        let params = query_params(target.datacenter.as_deref(), index, &wait);
        match query(&client, &config, &target, &params, request_timeout).await {
            Ok((returned, answer)) => {
                backoff.reset();
                if health != BackendHealth::Reachable {
                    health = BackendHealth::Reachable;
                    sink.report(health, "consul answers again");
                }
                index = next_index(index, returned);
                let endpoints = answer.endpoints.len();
                // The host logs what was left out when that changes; the sink drops a repeat.
                if sink.update_explained(answer.endpoints, answer.excluded) {
                    debug!(service = %target.service, endpoints, index, "consul answer changed");
                }
            }
            Err(error) => {
                let state = error.health();
                if state != health {
                    health = state;
                    let detail = format!("{error}; retrying, keeping the last known endpoints");
                    sink.report(health, &detail);
                }
                // Start over from a full answer once the agent is back.
                index = 0;
                next_start = Instant::now() + backoff.next_wait();
            }
        }
    }
}

/// One round: the returned index and the answer.
async fn query(
    client: &Client,
    config: &ConsulConfig,
    target: &Target,
    params: &[(&str, String)],
    timeout: Duration,
) -> Result<(u64, Answer), ConsulError> {
    let mut url = Url::parse(&config.base_url).map_err(|e| ConsulError::Http(e.to_string()))?;
    url.path_segments_mut()
        .map_err(|()| ConsulError::Http(format!("{} cannot carry a path", config.base_url)))?
        .extend(["v1", "health", "service", target.service.as_str()]);
    let mut request = client.get(url).query(params).timeout(timeout);
    if let Some(token) = &config.token {
        let mut value = HeaderValue::from_str(token)
            .map_err(|_| ConsulError::Http("token is not a valid header value".into()))?;
        value.set_sensitive(true);
        request = request.header("X-Consul-Token", value);
    }
    let response = request.send().await.map_err(http_error)?;
    let status = response.status();
    let index = response
        .headers()
        .get("X-Consul-Index")
        .map(|v| v.as_bytes().to_vec());
    let body = response.bytes().await.map_err(http_error)?;
    if status != StatusCode::OK {
        let text = String::from_utf8_lossy(&body);
        return Err(ConsulError::Status {
            status: status.as_u16(),
            body: cut(text.trim()).into_owned(),
        });
    }
    let index = parse_index(index.as_deref())?;
    Ok((index, parse_answer(&body, &target.request)?))
}

fn http_error(error: reqwest::Error) -> ConsulError {
    // reqwest's Display omits the cause ("error sending request"); the chain says why.
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    ConsulError::Http(text)
}
