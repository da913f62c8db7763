//! The one error type that crosses the boundary.

use std::fmt;

use abi_stable::{std_types::RString, StableAbi};

/// An error reported by a plugin entry point.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct PluginError {
    /// Human-readable, lowercase, naming the offending value.
    pub message: RString,
    /// True when the error is a caught panic rather than a returned error.
    pub panicked: bool,
}

impl PluginError {
    /// An ordinary error with `message`.
    pub fn new(message: impl Into<String>) -> Self {
        PluginError {
            message: RString::from(message.into()),
            panicked: false,
        }
    }

    /// A panic caught at an entry point, with the panic's payload if it was a string.
    pub fn from_panic(payload: &(dyn std::any::Any + Send)) -> Self {
        let text = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".to_string());
        PluginError {
            message: RString::from(format!("plugin panicked: {text}")),
            panicked: true,
        }
    }
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PluginError {}

impl From<String> for PluginError {
    fn from(message: String) -> Self {
        PluginError::new(message)
    }
}

impl From<&str> for PluginError {
    fn from(message: &str) -> Self {
        PluginError::new(message)
    }
}
