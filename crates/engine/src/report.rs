//! What a run tells its user: the report (counts, as JSON with `--report`) and the
//! rejects file, where every record that could not be synced is written with its origin
//! and reason, so that nothing is lost silently.

use std::path::{Path, PathBuf};

use contactsync_core::{Change, ChangeKind, ContactKey, Origin, RecordError};
use serde::Serialize;

use crate::settings::SyncMode;

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Everything synced.
    Synced,
    /// Finished, but some records were rejected.
    SyncedWithRejects,
    /// Refused by the removal guard; nothing was changed.
    RefusedByGuard,
    /// Failed; what was not confirmed is sent again next run.
    Failed,
}

impl RunStatus {
    /// The name stored in the state.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Synced => "synced",
            RunStatus::SyncedWithRejects => "synced_with_rejects",
            RunStatus::RefusedByGuard => "refused_by_guard",
            RunStatus::Failed => "failed",
        }
    }
}

/// One change shown in a plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlannedChange {
    /// `create`, `update` or `remove`.
    pub kind: ChangeKind,
    /// The contact's key.
    pub key: String,
    /// Its email, if known.
    pub email: Option<String>,
    /// Where it came from.
    pub origin: String,
}

impl PlannedChange {
    pub(crate) fn of(change: &Change) -> Self {
        PlannedChange {
            kind: change.kind(),
            key: change.key().to_string(),
            email: change.email().map(str::to_string),
            origin: change.origin().to_string(),
        }
    }
}

/// The removal guard's verdict.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GuardVerdict {
    /// Removals planned.
    pub removals: u64,
    /// Contacts synced before the run.
    pub population: u64,
    /// The configured bound.
    pub max_removal_ratio: f64,
    /// Whether the run went ahead.
    pub allowed: bool,
}

/// What a run did (or, for a dry run, would do).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunReport {
    /// `source->sink`.
    pub pipeline: String,
    /// The run's number in the state (0 for a dry run, which records nothing).
    pub run: i64,
    /// Whether this is a plan only.
    pub dry_run: bool,
    /// The mode applied.
    pub mode: SyncMode,
    /// How it ended.
    pub status: RunStatus,
    /// Whether the read was complete (removals by absence need it).
    pub complete_read: bool,
    /// Records read from the source, rejected ones included.
    pub read: u64,
    /// Contacts created (planned, in a dry run).
    pub created: u64,
    /// Contacts updated (planned, in a dry run).
    pub updated: u64,
    /// Contacts removed (planned, in a dry run).
    pub removed: u64,
    /// Contacts the sink already had as they are.
    pub unchanged: u64,
    /// Records rejected: by the source, by validation, or by the sink.
    pub rejected: u64,
    /// Changes the mode left out (creates in update-only, …).
    pub skipped: u64,
    /// Changes sent whose outcome is unknown; sent again next run.
    pub unknown: u64,
    /// Changes of earlier, interrupted runs settled at the start of this one.
    pub recovered: u64,
    /// The removal guard's verdict, when there were removals.
    pub guard: Option<GuardVerdict>,
    /// The first changes of each kind (dry runs).
    pub sample: Vec<PlannedChange>,
    /// When the run started (RFC 3339).
    pub started_at: String,
    /// How long it took, in milliseconds.
    pub duration_ms: u64,
    /// The error that stopped the run, in a sentence.
    pub error: Option<String>,
}

impl RunReport {
    pub(crate) fn new(pipeline: &str, mode: SyncMode, dry_run: bool) -> Self {
        RunReport {
            pipeline: pipeline.to_string(),
            run: 0,
            dry_run,
            mode,
            status: RunStatus::Synced,
            complete_read: false,
            read: 0,
            created: 0,
            updated: 0,
            removed: 0,
            unchanged: 0,
            rejected: 0,
            skipped: 0,
            unknown: 0,
            recovered: 0,
            guard: None,
            sample: Vec::new(),
            started_at: chrono::Utc::now().to_rfc3339(),
            duration_ms: 0,
            error: None,
        }
    }
}

/// Where a rejection happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectStage {
    /// The source could not read the record.
    Source,
    /// The engine's validation refused it.
    Validation,
    /// The sink (the platform) refused it.
    Sink,
}

impl RejectStage {
    fn as_str(self) -> &'static str {
        match self {
            RejectStage::Source => "source",
            RejectStage::Validation => "validation",
            RejectStage::Sink => "sink",
        }
    }
}

/// A rejects file failed.
#[derive(Debug, thiserror::Error)]
#[error("rejects file {}: {source}", path.display())]
pub struct RejectsError {
    path: PathBuf,
    #[source]
    source: csv::Error,
}

/// Writes rejected records, one CSV row each: `stage,source,line,key,email,field,reason,record`.
pub struct RejectsWriter {
    writer: Option<(csv::Writer<std::fs::File>, PathBuf)>,
}

impl RejectsWriter {
    /// A writer to `path`, or one that only counts when `None`.
    pub fn create(path: Option<&Path>) -> Result<Self, RejectsError> {
        let writer = match path {
            None => None,
            Some(path) => {
                let mut w = csv::Writer::from_path(path).map_err(|source| RejectsError {
                    path: path.to_path_buf(),
                    source,
                })?;
                w.write_record([
                    "stage", "source", "line", "key", "email", "field", "reason", "record",
                ])
                .map_err(|source| RejectsError {
                    path: path.to_path_buf(),
                    source,
                })?;
                Some((w, path.to_path_buf()))
            }
        };
        Ok(RejectsWriter { writer })
    }

    /// Writes one rejected record; also logs it, so nothing is silent without a file.
    #[allow(clippy::too_many_arguments)]
    pub fn write(
        &mut self,
        stage: RejectStage,
        origin: &Origin,
        key: Option<&ContactKey>,
        email: Option<&str>,
        field: Option<&str>,
        reason: &str,
        record: Option<&str>,
    ) -> Result<(), RejectsError> {
        tracing::warn!(
            stage = stage.as_str(),
            origin = %origin,
            key = key.map(|k| k.to_string()).unwrap_or_default(),
            field = field.unwrap_or_default(),
            "rejected: {reason}"
        );
        if let Some((w, path)) = self.writer.as_mut() {
            let key = key.map(|k| k.to_string()).unwrap_or_default();
            w.write_record([
                stage.as_str(),
                &origin.location(),
                &origin.position(),
                &key,
                email.unwrap_or_default(),
                field.unwrap_or_default(),
                reason,
                record.unwrap_or_default(),
            ])
            .map_err(|source| RejectsError {
                path: path.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Writes a [`RecordError`].
    pub fn write_error(
        &mut self,
        stage: RejectStage,
        error: &RecordError,
    ) -> Result<(), RejectsError> {
        self.write(
            stage,
            &error.origin,
            error.key.as_ref(),
            None,
            error.field.as_deref(),
            &error.reason,
            error.raw.as_deref(),
        )
    }

    /// Flushes the file.
    pub fn flush(&mut self) -> Result<(), RejectsError> {
        if let Some((w, path)) = self.writer.as_mut() {
            w.flush().map_err(|e| RejectsError {
                path: path.clone(),
                source: e.into(),
            })?;
        }
        Ok(())
    }
}
