//! The vocabulary every part of contactsync speaks.
//!
//! This crate is what a connector author implements against, and nothing more: the
//! canonical [`Contact`] record and its identity ([`ContactKey`]), the [`Source`] and
//! [`Sink`] traits, the change and outcome types that flow between the engine and a
//! sink, and the [`registry`] through which connectors make themselves known by name.
//!
//! It deliberately knows no platform, no HTTP and no SQL. Start reading at
//! [`Contact`], then [`Source`] and [`Sink`].

mod binary;
pub mod change;
pub mod contact;
mod contact_text;
pub mod duration;
pub mod error;
pub mod job;
pub mod origin;
pub mod registry;
pub mod secret;
pub mod sink;
pub mod source;
pub mod text;

pub use change::{
    Change, ChangeBatch, ChangeKind, ChangePlan, Outcome, PendingBatch, PendingRecord, SyncedEntry,
};
pub use contact::{Contact, ContactKey, ContactStatus, Field, FieldChange, KeyRule};
pub use contact_text::ContactText;
pub use duration::DurationSetting;
pub use error::{ConfigError, ConnectorError, RecordError};
pub use job::{
    Followed, ImportJob, JobEntry, JobFollower, JobLedger, JobPoll, JobTiming, Posted, Submitted,
    Waited,
};
pub use origin::Origin;
pub use registry::{
    ConnectorSettings, RunningSandbox, SandboxFactory, SandboxOptions, SinkFactory, SourceFactory,
};
pub use secret::{
    redact_secrets, remember_secret, resolve_secret, ExposeSecret, SecretString, REDACTED,
};
pub use sink::{
    FinishStarted, JobProgress, NoProgress, ProgressReporter, RemovalStyle, Sink, SinkCapabilities,
    SinkContext, SinkIntegrity, SinkStore, SinkSummary,
};
pub use source::{
    CheckFindings, KnownContent, KnownEntry, ReadMode, ReadOutcome, ReadPasses, RecordStream,
    Source, SourceCapabilities, SourceItem, SourceRecord, Unchanged, UnchangedRow,
};

/// Re-exported so that connector crates register themselves without naming `inventory`
/// in their own manifests' versions (one version for the whole workspace).
pub use async_trait::async_trait;
pub use inventory;
/// Re-exported for [`SinkContext::cancel`].
pub use tokio_util::sync::CancellationToken;
