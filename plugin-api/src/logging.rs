//! Plugin logs, forwarded to the host so they appear in its log under the plugin's name.
//!
//! Each plugin library has its own copy of `tracing` and so its own global dispatcher; the
//! glue installs there a small layer that formats each event and hands it to the host's
//! callback. Plugin code just uses `tracing::info!` and friends.

use std::fmt::Write as _;

use abi_stable::{std_types::RStr, StableAbi};
use tracing::{field::Field, Event, Level, Subscriber};
use tracing_subscriber::{layer::Context, Layer};

/// Severity, ABI-stable.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
    Trace = 5,
}

impl From<&Level> for LogLevel {
    fn from(level: &Level) -> Self {
        match *level {
            Level::ERROR => LogLevel::Error,
            Level::WARN => LogLevel::Warn,
            Level::INFO => LogLevel::Info,
            Level::DEBUG => LogLevel::Debug,
            Level::TRACE => LogLevel::Trace,
        }
    }
}

/// The host's logging callback and the most verbose level it wants.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct HostLogger {
    pub max_level: LogLevel,
    /// `(level, plugin name, target, message with fields)`.
    pub log: extern "C" fn(LogLevel, RStr<'_>, RStr<'_>, RStr<'_>),
}

/// Forwards the plugin's `tracing` events to the host.
pub(crate) struct ForwardToHost {
    pub(crate) logger: HostLogger,
    pub(crate) plugin: &'static str,
}

impl<S: Subscriber> Layer<S> for ForwardToHost {
    fn enabled(&self, metadata: &tracing::Metadata<'_>, _: Context<'_, S>) -> bool {
        LogLevel::from(metadata.level()) <= self.logger.max_level
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut line = EventLine::default();
        event.record(&mut line);
        (self.logger.log)(
            LogLevel::from(event.metadata().level()),
            self.plugin.into(),
            event.metadata().target().into(),
            line.text.as_str().into(),
        );
    }
}

/// `message key=value key=value`, the way the host's own formatter prints fields.
#[derive(Default)]
struct EventLine {
    text: String,
}

impl tracing::field::Visit for EventLine {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if !self.text.is_empty() {
            self.text.push(' ');
        }
        // Writing into a String cannot fail.
        let _ = if field.name() == "message" {
            write!(self.text, "{value:?}")
        } else {
            write!(self.text, "{}={value:?}", field.name())
        };
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            if !self.text.is_empty() {
                self.text.push(' ');
            }
            self.text.push_str(value);
        } else {
            self.record_debug(field, &value);
        }
    }
}
