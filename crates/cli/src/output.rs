//! How the binary speaks: the log writer that redacts secrets, plain or JSON lines,
//! the one line a failure gets, and the exit code it deserves.

use std::io::IsTerminal;

use anyhow::anyhow;

use crate::*;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// For people.
    Text,
    /// One JSON object a line: time, level, pipeline, run, message, fields.
    Json,
}

/// Where log records go: stderr, each record whole and cleaned of every secret this
/// process knows ([`contactsync_core::redact_secrets`]), whatever put it there (a
/// platform's error body that echoes the request).
pub struct RedactingWriter(Vec<u8>);

impl std::io::Write for RedactingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for RedactingWriter {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.0);
        let text = contactsync_core::redact_secrets(&text);
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), text.as_bytes());
    }
}

/// Whether logs are JSON: then everything on stderr goes through the log.
pub static JSON_LOGS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// Says something on stderr: a line for a person, or a log record in JSON mode, so
/// that every line of stderr stays parseable.
pub fn say(level: tracing::Level, message: &str) {
    let message = &*contactsync_core::redact_secrets(message);
    if JSON_LOGS.get().copied().unwrap_or(false) {
        match level {
            tracing::Level::ERROR => tracing::error!("{message}"),
            tracing::Level::WARN => tracing::warn!("{message}"),
            _ => tracing::info!("{message}"),
        }
    } else {
        eprintln!("{message}");
    }
}

/// An error and the exit code it deserves.
pub struct Failure {
    /// The exit code.
    pub code: u8,
    /// What went wrong, in one sentence (with its causes).
    pub error: anyhow::Error,
}

pub fn usage(error: anyhow::Error) -> Failure {
    Failure { code: 2, error }
}

pub fn failed(error: anyhow::Error) -> Failure {
    Failure { code: 1, error }
}

/// A state that cannot be opened: `locked` (exit 5) while another process keeps its
/// write lock (a run stopped mid-write), a failure otherwise.
pub fn state_failure(error: contactsync_engine::StateError) -> Failure {
    match error {
        contactsync_engine::StateError::Busy { .. } => Failure {
            code: 5,
            error: anyhow!("locked: {error}"),
        },
        error => failed(anyhow!(error)),
    }
}

pub fn init_logging(verbose: u8, format: LogFormat) {
    let _ = JSON_LOGS.set(format == LogFormat::Json);
    let default = match verbose {
        // Warnings, and the progress lines of a run that is not on a terminal (cron logs).
        0 => "warn,contactsync::progress=info",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colour only for a person at a terminal: never in a file, a pipe or a cron mail,
    // and never when NO_COLOR is set (https://no-color.org).
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| RedactingWriter(Vec::new()))
        .with_target(false);
    match format {
        LogFormat::Text => builder.with_ansi(colour).init(),
        // `pipeline` and `run` come from the run's span.
        LogFormat::Json => builder
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(jsonlog::JsonLines)
            .init(),
    }
}
