//! Helpers for plugin authors, outside the ABI types: what every discovery plugin needs and
//! would otherwise write again, slightly differently each time.
//!
//! - [`duration`]: the one duration grammar (descriptors use it too).
//! - [`options`]: `--discovery-opt` validation that refuses unknown keys the same way everywhere.
//! - [`backoff`]: jittered, capped exponential backoff.
//! - [`sink`]: a closable sink that drops identical consecutive sets and reports.
//! - [`select`]: the one rule for what a watch keeps (protocol, tags, duplicates), with every
//!   instance left out explained.
//! - [`thread`]: a watch thread that reports a panic to the host instead of dying silently.
//!
//! Nothing here crosses the plugin boundary: each plugin links its own copy.

pub mod backoff;
pub mod duration;
pub mod options;
pub mod select;
pub mod sink;
pub mod thread;

pub use backoff::Backoff;
pub use duration::{parse_duration, DurationError};
pub use options::{OptionError, OptionReader};
pub use select::{instance_protocol, serves_protocol, Selector, UDP_TAG};
pub use sink::WatchSink;
pub use thread::{spawn_guarded, spawn_watch_thread};
