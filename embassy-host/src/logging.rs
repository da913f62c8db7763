//! Logging that never blocks the data path.
//!
//! Every line goes into a bounded queue; one thread (tracing-appender's worker) writes the
//! queue to stderr. When stderr stalls (a pipe nobody reads, a wedged log driver) the queue
//! fills and further lines are dropped and counted instead of blocking the worker thread that
//! logged them, so proxying goes on. Once writing works again the count is reported in one
//! line ("N log lines dropped").

use std::{
    io::{self, IsTerminal, Write},
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::{
    fmt::{
        format::Writer,
        time::{FormatTime, SystemTime},
    },
    EnvFilter,
};

/// Lines held while stderr is not being read: about 400 kB of typical lines, enough to ride
/// out a burst (a start-up with many containers) while the reader catches up.
pub const BUFFERED_LINES: usize = 2048;

/// While lines keep being dropped, at most one report per this interval, so the reports do not
/// add to the flood.
const REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// Sets up the global subscriber (`verbose`: 0 info, 1 debug, 2+ trace; `EMBASSY_LOG`
/// overrides). Keep the guard for the life of the process: dropping it flushes the queue
/// (waiting at most about a second for a stalled stderr).
pub fn init(verbose: u8, format: LogFormat) -> WorkerGuard {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env("EMBASSY_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let counter = Arc::new(OnceLock::new());
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(BUFFERED_LINES)
        .thread_name("embassy-log")
        .finish(DropReporter::new(io::stderr(), Arc::clone(&counter)));
    // Set before the first line can be written: the worker only reads it after a write.
    let _ = counter.set(writer.error_counter());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.with_ansi(io::stderr().is_terminal()).init(),
        // One object per line: timestamp, level, target, the event's fields flattened beside
        // `message`, and `spans`, outermost first (listener: service, addr; conn: peer).
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .init(),
    }
    guard
}

/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// The writer behind the queue (run by the log thread): writes each line, and after a line
/// that went out, reports the lines the queue dropped since the last report.
struct DropReporter<W: Write> {
    inner: W,
    dropped: Arc<OnceLock<ErrorCounter>>,
    reported: usize,
    last_report: Option<Instant>,
}

impl<W: Write> DropReporter<W> {
    fn new(inner: W, dropped: Arc<OnceLock<ErrorCounter>>) -> Self {
        DropReporter {
            inner,
            dropped,
            reported: 0,
            last_report: None,
        }
    }

    /// Reports the drops not yet reported; with `now == false` only if the last report is at
    /// least [`REPORT_INTERVAL`] old.
    fn report(&mut self, now: bool) -> io::Result<()> {
        let dropped = self.dropped.get().map_or(0, ErrorCounter::dropped_lines);
        let due = now
            || self
                .last_report
                .is_none_or(|at| at.elapsed() >= REPORT_INTERVAL);
        if dropped <= self.reported || !due {
            return Ok(());
        }
        let line = drop_report(dropped - self.reported);
        self.inner.write_all(line.as_bytes())?;
        self.reported = dropped;
        self.last_report = Some(Instant::now());
        Ok(())
    }
}

/// The report line, formatted like the subscriber's own lines.
fn drop_report(count: usize) -> String {
    let mut line = String::new();
    let _ = SystemTime.format_time(&mut Writer::new(&mut line));
    line.push_str(&format!(
        "  WARN embassy_host::logging: {count} log lines dropped: the log output (stderr) was \
         not read fast enough\n"
    ));
    line
}

impl<W: Write> Write for DropReporter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }

    /// The log thread writes one whole line per call.
    fn write_all(&mut self, line: &[u8]) -> io::Result<()> {
        self.inner.write_all(line)?;
        self.report(false)
    }

    /// Called when the queue is empty: caught up, so whatever was dropped is reported now.
    fn flush(&mut self) -> io::Result<()> {
        self.report(true)?;
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_appender::non_blocking::NonBlocking;

    /// A writer that blocks until the test lets it go, then records what it got.
    #[derive(Clone)]
    struct Gate {
        open: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
        written: Arc<std::sync::Mutex<Vec<u8>>>,
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (lock, opened) = &*self.open;
            let mut open = lock.lock().expect("gate");
            while !*open {
                open = opened.wait(open).expect("gate");
            }
            self.written.lock().expect("written").extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// With the output blocked, writing never blocks the caller; lines beyond the queue are
    /// dropped, and once the output moves the count comes out in one line.
    #[test]
    fn a_blocked_output_drops_lines_without_blocking_and_reports_the_count() {
        let gate = Gate {
            open: Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new())),
            written: Arc::default(),
        };
        let counter = Arc::new(OnceLock::new());
        let (mut writer, guard): (NonBlocking, _) = NonBlockingBuilder::default()
            .lossy(true)
            .buffered_lines_limit(4)
            .finish(DropReporter::new(gate.clone(), Arc::clone(&counter)));
        let _ = counter.set(writer.error_counter());
        let started = Instant::now();
        for n in 0..100 {
            writer
                .write_all(format!("line {n}\n").as_bytes())
                .expect("write");
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "writing blocked for {:?}",
            started.elapsed()
        );
        // One line may be held by the worker (blocked in the gate) and four queued.
        let dropped = writer.error_counter().dropped_lines();
        assert!((95..=96).contains(&dropped), "dropped {dropped}");
        {
            let (lock, opened) = &*gate.open;
            *lock.lock().expect("gate") = true;
            opened.notify_all();
        }
        drop(guard);
        let written =
            String::from_utf8(gate.written.lock().expect("written").clone()).expect("utf8");
        let lines: Vec<&str> = written.lines().collect();
        assert_eq!(lines.len(), 100 - dropped + 1, "{written}");
        assert!(lines[0].starts_with("line 0"), "{written}");
        let reports: Vec<&&str> = lines.iter().filter(|l| l.contains("dropped")).collect();
        assert_eq!(reports.len(), 1, "{written}");
        assert!(
            reports[0].contains(&format!(
                "WARN embassy_host::logging: {dropped} log lines dropped"
            )),
            "{written}"
        );
    }
}
