//! The signals a running proxy answers: SIGTERM and SIGINT stop it (a second one during the
//! grace period stops it at once), SIGHUP reloads plugins (and is ignored while stopping).
//!
//! All three are registered before the first listener opens. Tokio's handlers stay installed
//! for the life of the process, so from then on SIGHUP (a closed terminal, a supervisor's
//! habit of "reloading") can never take the default action and kill every connection.

use tokio::signal::unix::{signal, Signal as Handler, SignalKind};
use tracing::info;

/// Ignores SIGHUP until [`Signals::new`] installs the handler that answers it: the proxy must
/// not die of one while its plugins load.
pub fn ignore_hangup() {
    // SAFETY: sets one signal's disposition to SIG_IGN; no handler code of ours is involved.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
}

/// A signal asking Embassy to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Terminate,
    Interrupt,
}

impl Stop {
    pub fn name(self) -> &'static str {
        match self {
            Stop::Terminate => "SIGTERM",
            Stop::Interrupt => "SIGINT",
        }
    }

    /// The exit code after a forced stop: 128 + the signal number, what a shell reports for a
    /// process killed by that signal (143, 130), so a supervisor sees the stop was not clean.
    pub fn forced_exit_code(self) -> u8 {
        let number = match self {
            Stop::Terminate => libc::SIGTERM,
            Stop::Interrupt => libc::SIGINT,
        };
        // Both numbers are below 16: the sum fits.
        (128 + number) as u8
    }
}

/// What a signal asks of a running Embassy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Stop(Stop),
    /// SIGHUP: rescan the plugin directory.
    Reload,
}

/// The registered handlers.
pub struct Signals {
    terminate: Handler,
    interrupt: Handler,
    hangup: Handler,
}

impl Signals {
    /// Registers the handlers (needs a Tokio runtime).
    pub fn new() -> std::io::Result<Signals> {
        Ok(Signals {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    /// Waits for the next signal.
    pub async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.terminate.recv() => Signal::Stop(Stop::Terminate),
            _ = self.interrupt.recv() => Signal::Stop(Stop::Interrupt),
            _ = self.hangup.recv() => Signal::Reload,
        }
    }

    /// Waits for SIGTERM or SIGINT (while stopping); every SIGHUP meanwhile is logged and
    /// ignored.
    pub async fn stop(&mut self) -> Stop {
        loop {
            match self.next().await {
                Signal::Stop(stop) => return stop,
                Signal::Reload => info!("SIGHUP received while stopping: ignored"),
            }
        }
    }
}
