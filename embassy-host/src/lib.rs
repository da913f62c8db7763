//! The Embassy daemon: command line, plugin loading, and the supervisor that turns service
//! requests into listeners fed by discovery watches.
//!
//! `main.rs` stays thin: parse, set up logging, load plugins, dispatch to [`run`].

pub mod admin;
pub mod cli;
pub mod control;
pub mod docker;
pub mod logging;
pub mod metrics;
pub mod netns;
pub mod plugins;
pub mod requests;
pub mod run;
pub mod signals;
pub mod sink;
pub mod state;
pub mod status;
pub mod status_page;
pub mod supervisor;
