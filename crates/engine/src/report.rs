//! What a run tells its user: the report (counts, as JSON with `--report`) and the
//! rejects file, where every record that could not be synced is written with its origin
//! and reason, so that nothing is lost silently.

use std::path::{Path, PathBuf};

use contactsync_core::{Change, ChangeKind, Contact, ContactKey, FieldChange, Origin, RecordError};
use serde::{Deserialize, Serialize};

use crate::settings::SyncMode;

/// How a run ended. The report's `status`, the first word of the summary line, and
/// (through the binary) the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Everything synced.
    Synced,
    /// Finished, but some records were rejected (see the rejects file).
    FinishedWithRejects,
    /// Refused by the removal guard; nothing was changed.
    Refused,
    /// Failed; what was not confirmed is sent again next run.
    Failed,
    /// Interrupted by the user; what was not confirmed is sent again next run.
    Interrupted,
    /// Not started: another run holds the pipeline's or its sink section's lock.
    Locked,
    /// Finished, but removals were held back: the read was complete, yet some records
    /// could not be keyed, and one of them could be a person who would otherwise have
    /// been taken for a leaver.
    RemovalsHeld,
}

impl RunStatus {
    /// The name used in reports, the summary line and the state.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Synced => "synced",
            RunStatus::FinishedWithRejects => "finished_with_rejects",
            RunStatus::Refused => "refused",
            RunStatus::Failed => "failed",
            RunStatus::Interrupted => "interrupted",
            RunStatus::Locked => "locked",
            RunStatus::RemovalsHeld => "removals_held",
        }
    }

    /// Whether the run did what it set out to do (perhaps with rejected records), so
    /// that the source's cursor may advance.
    pub fn succeeded(self) -> bool {
        matches!(
            self,
            RunStatus::Synced | RunStatus::FinishedWithRejects | RunStatus::RemovalsHeld
        )
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
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
    /// The fields it sets, with their values before and after (none for a removal).
    pub fields: Vec<FieldChange>,
    /// Whether the values before are known (false for an update of a person synced
    /// before the state kept records: every field is then listed with no `before`).
    pub before_known: bool,
}

impl PlannedChange {
    pub(crate) fn of(change: &Change) -> Self {
        PlannedChange {
            kind: change.kind(),
            key: change.key().to_string(),
            email: change.email().map(str::to_string),
            origin: change.origin().to_string(),
            fields: change.field_changes(),
            before_known: change.kind() != ChangeKind::Update || change.before().is_some(),
        }
    }

    /// The change as one line of a `--plan` file: `{"kind", "key", "email", "origin",
    /// "fields": {"last_name": {"before": "Lee", "after": "Smith"}}}`, fields in the
    /// order of the canonical record; `"before_known": false` when the values before are
    /// not known.
    pub fn to_json_line(&self) -> String {
        let line = PlanLine {
            kind: self.kind.as_str(),
            key: &self.key,
            email: self.email.as_deref(),
            origin: &self.origin,
            fields: OrderedFields(&self.fields),
            before_known: (!self.before_known).then_some(false),
        };
        // Strings, options and maps of strings always serialise.
        serde_json::to_string(&line).unwrap_or_default()
    }
}

#[derive(Serialize)]
struct PlanLine<'a> {
    kind: &'static str,
    key: &'a str,
    email: Option<&'a str>,
    origin: &'a str,
    fields: OrderedFields<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    before_known: Option<bool>,
}

/// Field changes as a JSON object keyed by field name, in the order given.
struct OrderedFields<'a>(&'a [FieldChange]);

impl Serialize for OrderedFields<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        #[derive(Serialize)]
        struct BeforeAfter<'a> {
            before: &'a Option<String>,
            after: &'a Option<String>,
        }
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for change in self.0 {
            map.serialize_entry(
                &change.field.to_string(),
                &BeforeAfter {
                    before: &change.before,
                    after: &change.after,
                },
            )?;
        }
        map.end()
    }
}

/// Writes every change of a run to a `--plan` file, one JSON object a line.
pub(crate) struct PlanWriter {
    out: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
}

/// The plan file failed.
#[derive(Debug, thiserror::Error)]
#[error("plan file {}: {source}", path.display())]
pub struct PlanError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

impl PlanWriter {
    pub(crate) fn create(path: &Path) -> Result<Self, PlanError> {
        let file = std::fs::File::create(path).map_err(|source| PlanError {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(PlanWriter {
            out: std::io::BufWriter::new(file),
            path: path.to_path_buf(),
        })
    }

    pub(crate) fn write(&mut self, change: &Change) -> Result<(), PlanError> {
        use std::io::Write;
        let line = PlannedChange::of(change).to_json_line();
        writeln!(self.out, "{line}").map_err(|source| PlanError {
            path: self.path.clone(),
            source,
        })
    }

    pub(crate) fn flush(&mut self) -> Result<(), PlanError> {
        use std::io::Write;
        self.out.flush().map_err(|source| PlanError {
            path: self.path.clone(),
            source,
        })
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
    /// Records outside the pipeline's `where` scope (not sent).
    pub out_of_scope: u64,
    /// Changes sent whose outcome is unknown; sent again next run.
    pub unknown: u64,
    /// Changes of this run's plan not confirmed when it stopped (interrupted or failed):
    /// the next run sends them again.
    pub unconfirmed: u64,
    /// Changes of earlier, interrupted runs settled at the start of this one.
    pub recovered: u64,
    /// What a refused run would have done (the guard refused it: `created`, `updated`
    /// and `removed` are 0, since nothing was).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planned: Option<ChangeCounts>,
    /// Removals settled without a call, because the address they would have reached
    /// now belongs to another person of this run (see `ARCHITECTURE.md`, the address
    /// rule): the person removed is gone from the state, the address holder untouched.
    #[serde(default)]
    pub address_taken: u64,
    /// Removals this run would have made but held back, because the read, though
    /// complete, had records whose key could not be read ([`RunReport::removals_held_reason`]).
    pub removals_held: u64,
    /// Why removals were held back.
    pub removals_held_reason: Option<String>,
    /// Why the sink was rebuilt from this run's read (its content could not be
    /// trusted: a file deleted or edited by hand), when it was.
    pub rebuilt: Option<String>,
    /// What the sink held that this state never synced (a new state facing a non-empty
    /// sink), when it did.
    pub foreign: Option<String>,
    /// People the sink holds that neither the source nor the state knows (kept).
    pub unknown_in_sink: Option<u64>,
    /// Asynchronous jobs (imports) the sink posted, for a sink that works in them: what
    /// a platform's budget counts (Poppulo's one import at a time, Actito's 12 a day).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imports: Option<u64>,
    /// How the sink chose to write, and why (Actito's bulk or one by one, costed at the
    /// documented rate), for a sink with a choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sink_plan: Option<String>,
    /// Reads the sink made to find out what its writes did (Poppulo's look-up of rows
    /// an import did not count), for a sink that makes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome_reads: Option<u64>,
    /// Transactions the run committed in the state, for a backend that counts them
    /// (SQLite); the run's own record, written after this report, is not among them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_transactions: Option<u64>,
    /// The removal guard's verdict, when there were removals.
    pub guard: Option<GuardVerdict>,
    /// The first changes of each kind (dry runs).
    pub sample: Vec<PlannedChange>,
    /// The first [`RunReport::FIRST_REJECTIONS`] rejections: key, origin, field and
    /// reason, never the record itself (for notifications).
    pub rejections: Vec<RejectionSummary>,
    /// When the run started (RFC 3339).
    pub started_at: String,
    /// How long it took, in milliseconds.
    pub duration_ms: u64,
    /// The error that stopped the run, in a sentence.
    pub error: Option<String>,
}

/// One rejected record, as a notification may show it: where and why, not what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RejectionSummary {
    /// The record's key, when known.
    pub key: Option<String>,
    /// Where it was read (`people.csv:12`).
    pub origin: String,
    /// The field at fault, when known.
    pub field: Option<String>,
    /// Why.
    pub reason: String,
}

/// Changes by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeCounts {
    /// Creates.
    pub created: u64,
    /// Updates.
    pub updated: u64,
    /// Removals.
    pub removed: u64,
}

impl ChangeCounts {
    /// Counts one change of `kind`.
    pub fn count(&mut self, kind: contactsync_core::ChangeKind) {
        match kind {
            contactsync_core::ChangeKind::Create => self.created += 1,
            contactsync_core::ChangeKind::Update => self.updated += 1,
            contactsync_core::ChangeKind::Remove => self.removed += 1,
        }
    }
}

impl RunReport {
    /// How many rejections a report lists.
    pub const FIRST_REJECTIONS: usize = 20;

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
            out_of_scope: 0,
            unknown: 0,
            unconfirmed: 0,
            recovered: 0,
            planned: None,
            address_taken: 0,
            removals_held: 0,
            removals_held_reason: None,
            rebuilt: None,
            foreign: None,
            unknown_in_sink: None,
            imports: None,
            sink_plan: None,
            outcome_reads: None,
            state_transactions: None,
            guard: None,
            sample: Vec::new(),
            rejections: Vec::new(),
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
    /// The stage as the rejects file and the state name it.
    pub fn as_str(self) -> &'static str {
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

/// A record that cannot be synced, on its way to the rejects file.
pub struct Rejection<'a> {
    /// Where it was refused.
    pub stage: RejectStage,
    /// Where it was read.
    pub origin: &'a Origin,
    /// Its key, when known.
    pub key: Option<&'a ContactKey>,
    /// Its email, when known.
    pub email: Option<&'a str>,
    /// The field at fault, when known.
    pub field: Option<&'a str>,
    /// Why.
    pub reason: String,
    /// The record as the engine saw it, written as JSON…
    pub contact: Option<&'a Contact>,
    /// …or as the source read it, when it could not be mapped.
    pub raw: Option<&'a str>,
}

impl<'a> Rejection<'a> {
    /// A record the engine refuses while diffing, at the field `field`.
    pub fn of_record(
        origin: &'a Origin,
        contact: &'a Contact,
        key: Option<&'a ContactKey>,
        field: &'a str,
        reason: String,
    ) -> Self {
        Rejection {
            stage: RejectStage::Validation,
            origin,
            key,
            email: contact.email.as_deref(),
            field: Some(field),
            reason,
            contact: Some(contact),
            raw: None,
        }
    }
}

/// Writes rejected records, one CSV row each: `stage,source,line,key,email,field,reason,record`.
pub struct RejectsWriter {
    writer: Option<(csv::Writer<std::fs::File>, PathBuf)>,
}

impl RejectsWriter {
    /// A writer that only logs.
    pub fn counting() -> Self {
        RejectsWriter { writer: None }
    }

    /// A writer to `path`, or one that only logs when `None`.
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
    pub fn write(&mut self, rejection: &Rejection<'_>) -> Result<(), RejectsError> {
        let key = rejection.key.map(|k| k.to_string()).unwrap_or_default();
        tracing::warn!(
            stage = rejection.stage.as_str(),
            origin = %rejection.origin,
            key,
            field = rejection.field.unwrap_or_default(),
            "rejected: {}",
            rejection.reason
        );
        if let Some((w, path)) = self.writer.as_mut() {
            let record = match rejection.raw {
                Some(raw) => Some(raw.to_string()),
                None => rejection
                    .contact
                    .and_then(|c| serde_json::to_string(c).ok()),
            };
            w.write_record([
                rejection.stage.as_str(),
                &rejection.origin.location(),
                &rejection.origin.position(),
                &key,
                rejection.email.unwrap_or_default(),
                rejection.field.unwrap_or_default(),
                &rejection.reason,
                record.as_deref().unwrap_or_default(),
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
        self.write(&Rejection {
            stage,
            origin: &error.origin,
            key: error.key.as_ref(),
            email: None,
            field: error.field.as_deref(),
            reason: error.reason.clone(),
            contact: None,
            raw: error.raw.as_deref(),
        })
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
