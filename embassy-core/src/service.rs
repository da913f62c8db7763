//! A proxied service: its descriptor, its endpoints and its balancer.

use std::time::Duration;

use embassy_plugin_api::PluginError;

use crate::{
    balancer::Picker,
    copy::CopyMode,
    descriptor::{parse_duration, ServiceDescriptor},
    endpoints::{EndpointSet, ServiceEndpoints},
};

/// Default upstream connect timeout when neither the descriptor nor the CLI sets one.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Everything the connection path needs for one service.
pub struct Service {
    pub descriptor: ServiceDescriptor,
    pub endpoints: ServiceEndpoints,
    picker: Box<dyn Picker>,
    pub connect_timeout: Duration,
    /// How connections of this service move their bytes.
    pub copy_mode: CopyMode,
}

impl Service {
    /// A service with no endpoints yet; `connect_timeout` applies unless the descriptor
    /// overrides it.
    pub fn new(
        descriptor: ServiceDescriptor,
        picker: Box<dyn Picker>,
        connect_timeout: Duration,
    ) -> Self {
        let connect_timeout = descriptor
            .option("connect_timeout")
            .and_then(parse_duration)
            .unwrap_or(connect_timeout);
        Service {
            descriptor,
            endpoints: ServiceEndpoints::default(),
            picker,
            connect_timeout,
            copy_mode: CopyMode::best(),
        }
    }

    /// Asks the balancer for an index into `set`, checking it is in range.
    #[inline]
    pub fn pick(&self, set: &EndpointSet) -> Result<Option<usize>, PluginError> {
        if set.is_empty() {
            return Ok(None);
        }
        match self.picker.pick(set.views())? {
            Some(index) if index < set.len() => Ok(Some(index)),
            Some(index) => Err(PluginError::new(format!(
                "balancer returned index {index} for {} endpoints",
                set.len()
            ))),
            None => Ok(None),
        }
    }
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("descriptor", &self.descriptor.to_string())
            .field("endpoints", &self.endpoints.load().len())
            .finish()
    }
}
