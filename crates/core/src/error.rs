//! Errors shared by connectors and the engine.
//!
//! Three kinds, because the engine treats them differently:
//! - [`RecordError`]: one record is wrong; it is rejected and reported, the run goes on.
//! - [`ConnectorError`]: a connector cannot go on (unreachable, refused, misconfigured);
//!   the run stops, and what was not confirmed is tried again next run.
//! - [`ConfigError`]: the configuration is wrong; nothing is started.

use std::path::PathBuf;

use crate::{Contact, ContactKey, Origin};

/// One record that cannot be synced, and why. Carries everything needed to find it again.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{origin}: {}{reason}", field.as_ref().map(|f| format!("field `{f}`: ")).unwrap_or_default())]
pub struct RecordError {
    /// Where the record was read.
    pub origin: Origin,
    /// Its key, when it could be worked out.
    pub key: Option<ContactKey>,
    /// The field at fault, when one is.
    pub field: Option<String>,
    /// What is wrong, in words a user can act on.
    pub reason: String,
    /// The record as read (a raw line, or the contact as JSON), so nothing is lost.
    pub raw: Option<String>,
    /// The fields that could be read before (and after) the one at fault, when the
    /// record's shape could be trusted. The engine works out the key from them under
    /// the pipeline's own key rule, so that a rejected person still counts as seen and
    /// is never removed for being invalid. `None` when nothing of the record can be
    /// trusted (a row with the wrong number of fields, an unterminated quote).
    pub partial: Option<Box<Contact>>,
}

impl RecordError {
    /// A rejection at `origin` for `reason`.
    pub fn new(origin: Origin, reason: impl Into<String>) -> Self {
        RecordError {
            origin,
            key: None,
            field: None,
            reason: reason.into(),
            raw: None,
            partial: None,
        }
    }

    /// Names the field at fault.
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// Attaches the record's key.
    pub fn with_key(mut self, key: ContactKey) -> Self {
        self.key = Some(key);
        self
    }

    /// Attaches the fields that could be read (see [`RecordError::partial`]).
    pub fn with_partial(mut self, contact: Contact) -> Self {
        self.partial = Some(Box::new(contact));
        self
    }

    /// Attaches the record as read.
    pub fn with_raw(mut self, raw: impl Into<String>) -> Self {
        self.raw = Some(raw.into());
        self
    }
}

/// A configuration problem, naming the section and key at fault.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}[{section}]{}: {message}", file.as_ref().map(|f| format!("{}: ", f.display())).unwrap_or_default(), key.as_ref().map(|k| format!(" `{k}`")).unwrap_or_default())]
pub struct ConfigError {
    /// The config file, when known.
    pub file: Option<PathBuf>,
    /// The section (`sinks.poppulo`).
    pub section: String,
    /// The key within the section, when one is at fault.
    pub key: Option<String>,
    /// What is wrong and what to do.
    pub message: String,
}

impl ConfigError {
    /// A problem with `key` of `section`.
    pub fn key(
        section: impl Into<String>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ConfigError {
            file: None,
            section: section.into(),
            key: Some(key.into()),
            message: message.into(),
        }
    }

    /// A problem with a whole section.
    pub fn section(section: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            file: None,
            section: section.into(),
            key: None,
            message: message.into(),
        }
    }
}

/// Why a connector cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    /// Its configuration is wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The platform refused the credentials.
    #[error("authentication failed for {call}: {message}")]
    Auth {
        /// The call (`GET /auth/token`), without credentials.
        call: String,
        /// What the platform said.
        message: String,
    },
    /// A call failed and retrying did not help (or would not).
    #[error("{call} failed{}: {message}", status.map(|s| format!(" with HTTP {s}")).unwrap_or_default())]
    Call {
        /// The call (`POST /v2/acme/subscriber_imports`), without credentials.
        call: String,
        /// The HTTP status, when there was an answer.
        status: Option<u16>,
        /// What the platform said, or the transport error.
        message: String,
    },
    /// The platform answered something this connector does not understand.
    #[error("unexpected answer to {call}: {message}")]
    Protocol {
        /// The call.
        call: String,
        /// What was wrong with the answer.
        message: String,
    },
    /// A platform limit was reached and the connector will not exceed it.
    #[error("limit reached: {0}")]
    Limit(String),
    /// An asynchronous job on the platform ended without applying the change.
    #[error("job {job} ended {status}: {message}")]
    Job {
        /// The job's id or URL.
        job: String,
        /// Its final status (`ERROR`, `CANCELLED`).
        status: String,
        /// What the platform said.
        message: String,
    },
    /// The run was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// Anything else, in a sentence.
    #[error("{0}")]
    Other(String),
}

impl ConnectorError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ConnectorError::Io {
            path: path.into(),
            source,
        }
    }
}
