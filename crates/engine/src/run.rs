//! One run of one pipeline, in five steps, each a method of [`Run`]:
//!
//! 1. **Recover**: settle what an interrupted earlier run left pending
//!    ([`contactsync_core::Sink::recover`]).
//! 2. **Read and diff**: read the source, map and validate each record, and diff it
//!    against the compact index of what the sink last accepted; changes go to a spool
//!    file (and to the `--plan` file). Every record read counts as *seen*, valid or not:
//!    after a complete read, the keys of the state that were not seen are removals,
//!    unless some rejected record had no key that could be read, in which case removals
//!    are held back (any of those records could be a person the sweep would remove).
//! 3. **Guard**: the removal guard; a dry run stops here with the plan.
//! 4. **Apply** in batches: each batch is recorded as pending before it is sent, and
//!    each outcome settles its change (and the last-sent record) in one transaction.
//! 5. **Record** the run; the source's cursor advances only if the run succeeded.
//!
//! A process killed anywhere leaves pending changes the next run settles or re-sends;
//! every sink call is an upsert, so re-sending converges without duplicates.

use std::path::PathBuf;
use std::time::Instant;

use contactsync_core::{
    Change, ChangeBatch, ChangeKind, ChangePlan, ConnectorError, Contact, ContactKey, KeyRule,
    NoProgress, Origin, Outcome, ProgressReporter, ReadMode, ReadOutcome, RecordError,
    RecordStream, Sink, SinkCapabilities, SinkContext, SinkIntegrity, SinkStore, Source,
    SourceItem, SourceRecord, SyncedEntry,
};
use tokio_util::sync::CancellationToken;

use crate::addresses::AddressBook;
use crate::index::{ContactIndex, Seen};
use crate::report::{
    ChangeCounts, GuardVerdict, PlanError, PlanWriter, PlannedChange, RejectStage,
    RejectionSummary, RejectsWriter, RunReport, RunStatus,
};
use crate::settings::{FieldMapping, OutOfScope, PipelineSettings};
use crate::shaping::{FieldFailure, Lookups, RecordShaping, Shaped, ShapingError};
use crate::spool::ChangeSpool;
use crate::state::{
    AuditEntry, LockAttempt, LockHolder, PendingRow, Settlement, StateError, StateStore,
};

/// A pipeline to run: a source, a sink, and how they sync.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The pipeline's identity in the state: `source->sink` by config section names
    /// (see [`Pipeline::id`]).
    pub name: String,
    /// The sink's config section (`sinks.poppulo`): the scope of its key-value space.
    pub sink_scope: String,
    /// How they sync.
    pub settings: PipelineSettings,
    /// The compiled `map`, `on_create` and `where` of the settings, when any.
    pub shaping: Option<std::sync::Arc<RecordShaping>>,
}

impl Pipeline {
    /// The pipeline from source section `from` to sink section `to`.
    pub fn new(from: &str, to: &str, sink_scope: &str, settings: PipelineSettings) -> Self {
        Pipeline {
            name: Pipeline::id(from, to),
            sink_scope: sink_scope.to_string(),
            settings,
            shaping: None,
        }
    }

    /// Compiles the settings' `map`, `on_create` and `where` against `lookups`; a
    /// syntax error names `section` (the `[pipelines.NAME]`), the field and the position.
    pub fn with_shaping(
        mut self,
        section: &str,
        lookups: std::sync::Arc<Lookups>,
    ) -> Result<Self, ShapingError> {
        let s = &self.settings;
        if s.map.is_empty() && s.on_create.is_empty() && s.scope.is_none() {
            return Ok(self);
        }
        let shaping =
            RecordShaping::compile(section, &s.map, &s.on_create, s.scope.as_deref(), lookups)?;
        self.shaping = Some(std::sync::Arc::new(shaping));
        Ok(self)
    }

    /// What the state's content hash is for `contact`: without the fields `on_create`
    /// sets, which are never compared.
    fn diff_hash(&self, contact: &Contact) -> u64 {
        diff_hash(self.shaping.as_deref(), contact)
    }

    /// The identity in the state of the pipeline from `from` to `to`: `from->to`.
    pub fn id(from: &str, to: &str) -> String {
        format!("{from}->{to}")
    }
}

/// Options of one run, from the command line.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Plan only: change neither the sink nor the state.
    pub dry_run: bool,
    /// Let a run remove more than the pipeline's `max_removal_ratio`.
    pub allow_mass_removal: bool,
    /// Read everything, even from an incremental source with a cursor.
    pub full: bool,
    /// Where to write rejected records.
    pub rejects: Option<PathBuf>,
    /// Where to write every change of the run, one JSON object a line (`--plan`).
    pub plan: Option<PathBuf>,
    /// How many changes of each kind the report shows, with their fields.
    pub sample_size: usize,
    /// Where to spool the change set (the system's temp dir when `None`).
    pub spool_dir: Option<PathBuf>,
    /// Cancelled when the user interrupts: the run stops between batches.
    pub cancel: CancellationToken,
    /// How long to wait for the pipeline's and the sink section's locks when another
    /// run holds them; `None` gives up at once ([`RunStatus::Locked`]).
    pub wait_for_lock: Option<std::time::Duration>,
}

/// The phases a run goes through, for progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Settling an interrupted earlier run.
    Recovering,
    /// Reading and diffing.
    Reading,
    /// Applying changes; the total is the number of changes.
    Applying,
    /// The sink makes the changes durable.
    Finishing,
}

/// Watches a run: the binary draws progress from it. Also receives the sink's
/// [`ProgressReporter`] calls.
pub trait RunObserver: ProgressReporter {
    /// A phase starts, with its total when known.
    fn phase(&self, phase: Phase, total: Option<u64>);
    /// `n` more records read, or changes applied.
    fn advance(&self, n: u64);
}

/// An observer that shows nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct SilentObserver;

impl ProgressReporter for SilentObserver {
    fn job_progress(&self, progress: &contactsync_core::JobProgress) {
        NoProgress.job_progress(progress)
    }
    fn note(&self, message: &str) {
        tracing::info!("{message}");
    }
}

impl RunObserver for SilentObserver {
    fn phase(&self, _phase: Phase, _total: Option<u64>) {}
    fn advance(&self, _n: u64) {}
}

/// Why a run stopped. Reported in [`RunReport::error`].
#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error("reading the source failed: {0}")]
    Source(#[source] ConnectorError),
    #[error("the sink failed: {0}")]
    Sink(#[source] ConnectorError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Rejects(#[from] crate::report::RejectsError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("change spool: {0}")]
    Spool(#[from] std::io::Error),
    #[error("the sink returned {got} outcomes for a batch of {expected} changes; nothing of that batch is trusted")]
    OutcomeCount { got: usize, expected: usize },
    #[error("interrupted; what was not confirmed is sent again by the next run")]
    Cancelled,
    #[error("{0}")]
    Locked(String),
}

/// Runs `pipeline` once and reports what happened. Never panics on bad input and
/// always returns a report: a failure is [`RunStatus::Failed`] with
/// [`RunReport::error`] saying why.
pub async fn run(
    pipeline: &Pipeline,
    source: &dyn Source,
    sink: &mut dyn Sink,
    state: &mut dyn StateStore,
    options: &RunOptions,
    observer: &dyn RunObserver,
) -> RunReport {
    let started = Instant::now();
    let mut run = Run {
        pipeline,
        options,
        observer,
        state,
        report: RunReport::new(&pipeline.name, pipeline.settings.mode, options.dry_run),
        rejects: RejectsWriter::counting(),
        capabilities: sink.capabilities(),
        awaiting_finish: ChangeCounts::default(),
    };
    let holder = LockHolder::current(&pipeline.name);
    let result = match run.lock(&holder).await {
        Ok(()) => run.execute(source, sink).await,
        Err(e) => Err(e),
    };
    run.record(result, started);
    if !options.dry_run {
        if let Err(e) = run.state.unlock(&holder) {
            tracing::warn!("could not release the run lock: {e}");
        }
    }
    run.report
}

/// How the steps before [`Run::record`] ended, when nothing failed.
#[derive(Debug, Default)]
struct Completion {
    /// The source's new cursor, stored if the run succeeded.
    cursor: Option<String>,
    /// Whether this run counts as a full read for `full_every`: complete, trusted for
    /// removals, and applied.
    full_read: bool,
}

/// One run in progress: what every step shares.
struct Run<'r> {
    pipeline: &'r Pipeline,
    options: &'r RunOptions,
    observer: &'r dyn RunObserver,
    state: &'r mut dyn StateStore,
    report: RunReport,
    rejects: RejectsWriter,
    capabilities: SinkCapabilities,
    /// Changes a sink durable at its finish took, not yet made durable: counted in the
    /// report only once its finish succeeds.
    awaiting_finish: ChangeCounts,
}

/// A record that cannot be synced, on its way to the rejects file.
struct Rejection<'a> {
    stage: RejectStage,
    origin: &'a Origin,
    key: Option<&'a ContactKey>,
    email: Option<&'a str>,
    field: Option<&'a str>,
    reason: String,
    /// The record as the engine saw it, written as JSON…
    contact: Option<&'a Contact>,
    /// …or as the source read it, when it could not be mapped.
    raw: Option<&'a str>,
}

impl<'a> Rejection<'a> {
    /// A record the engine refuses while diffing, at the field `field`.
    fn of_record(
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

/// What the read and diff produced: the change set, spooled, and how the read ended.
struct ChangeSet {
    /// Creates and updates. A batch mixes removals with creates and updates only for a
    /// sink whose one job carries both ([`SinkCapabilities::mixes_removals`]), and
    /// removals are applied last, after everyone who stays is up to date.
    upserts: ChangeSpool,
    removals: ChangeSpool,
    plan: ChangePlan,
    /// Contacts in the state before the run.
    population: u64,
    read: ReadOutcome,
    /// Whether the read was a full one.
    full_read: bool,
    /// Records drawn across the creates and updates, for the state to learn from
    /// ([`StateStore::sample_records`]).
    records: RecordSample,
    /// Who holds which address in this read (sinks that find people by email).
    addresses: Option<AddressBook>,
}

/// The diff's working set during the read.
struct Diff {
    index: ContactIndex,
    mapping: FieldMapping,
    changes: ChangeSet,
    samples: Samples,
    plan_file: Option<PlanWriter>,
    /// Who holds which address in this read; only for sinks that find people by email.
    emails: Option<AddressBook>,
    /// Rejected records whose key could not be read: a complete read with any of these
    /// removes nobody.
    keyless_rejects: u64,
    /// The sink is rebuilt: unchanged people are sent again too.
    resend_all: bool,
    /// Changes diffed and not planned yet, with the key hash of the state's row each
    /// needs (see [`Run::wait`]); `lookups` counts those.
    waiting: Vec<(Change, Option<u64>)>,
    lookups: usize,
}

/// State rows a diff fetches at once: one round trip per changed person was most of a
/// nightly against PostgreSQL.
const LOOKUP_BATCH: usize = 256;

impl<'r> Run<'r> {
    /// Step 0: takes the locks of the pipeline and of its sink section, waiting for them
    /// up to `--wait-for-lock`. A dry run changes nothing and takes none.
    async fn lock(&mut self, holder: &LockHolder) -> Result<(), RunError> {
        if self.options.dry_run {
            return Ok(());
        }
        let names = [
            format!("pipeline:{}", self.pipeline.name),
            format!("sink:{}", self.pipeline.sink_scope),
        ];
        let started = Instant::now();
        let mut said = false;
        loop {
            // A state whose write lock another process keeps (a run stopped in the
            // middle of a write) is as busy as a held run lock.
            let attempt = match self.state.lock(&names, holder) {
                Err(StateError::Busy { message, .. }) => Err(message),
                attempt => Ok(attempt?),
            };
            let attempt = match attempt {
                Ok(attempt) => attempt,
                Err(why) => {
                    let wait = self.options.wait_for_lock.unwrap_or_default();
                    if started.elapsed() >= wait {
                        return Err(RunError::Locked(format!("the state is locked: {why}")));
                    }
                    tokio::select! {
                        _ = self.options.cancel.cancelled() => return Err(RunError::Cancelled),
                        _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
                    }
                    continue;
                }
            };
            match attempt {
                LockAttempt::Acquired { taken_over } => {
                    for (name, stale) in taken_over {
                        tracing::warn!(
                            "took over the lock {name} from pid {} on host {} (since {}): that run is gone",
                            stale.pid,
                            stale.host,
                            stale.since
                        );
                    }
                    return Ok(());
                }
                LockAttempt::Busy {
                    name,
                    holder: other,
                } => {
                    let what = match name.strip_prefix("sink:") {
                        Some(section) if other.pipeline != self.pipeline.name => format!(
                            "sink section {section} is being written by pipeline {} (pid {} on host {} since {})",
                            other.pipeline,
                            other.pid,
                            other.host,
                            lock_time(&other.since)
                        ),
                        _ => format!(
                            "pipeline {} is being synced by pid {} on host {} since {}",
                            self.pipeline.name,
                            other.pid,
                            other.host,
                            lock_time(&other.since)
                        ),
                    };
                    let wait = self.options.wait_for_lock.unwrap_or_default();
                    if started.elapsed() >= wait {
                        return Err(RunError::Locked(if wait.is_zero() {
                            format!("{what}; try again later or pass --wait-for-lock 10m")
                        } else {
                            format!("{what}; gave up after waiting {}s", wait.as_secs())
                        }));
                    }
                    if !said {
                        self.observer.note(&format!("{what}; waiting for it"));
                        said = true;
                    }
                    tokio::select! {
                        _ = self.options.cancel.cancelled() => return Err(RunError::Cancelled),
                        _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
                    }
                }
            }
        }
    }

    async fn execute(
        &mut self,
        source: &dyn Source,
        sink: &mut dyn Sink,
    ) -> Result<Completion, RunError> {
        self.rejects = RejectsWriter::create(self.options.rejects.as_deref())?;
        let result = self.steps(source, sink).await;
        self.rejects.flush()?;
        result
    }

    async fn steps(
        &mut self,
        source: &dyn Source,
        sink: &mut dyn Sink,
    ) -> Result<Completion, RunError> {
        let last_full = if self.options.dry_run {
            None
        } else {
            let (run, last_full) = self.state.begin_run(&self.pipeline.name)?;
            self.report.run = run;
            tracing::Span::current().record("run", run);
            self.recover(sink).await?;
            last_full
        };
        let changes = self.read_and_diff(source, sink, last_full).await?;
        if !self.guard(&changes) || self.options.dry_run {
            return Ok(Completion::default());
        }
        let cursor = changes.read.cursor.clone();
        let full_read =
            changes.full_read && changes.read.complete && self.report.removals_held == 0;
        self.apply(sink, changes).await?;
        Ok(Completion { cursor, full_read })
    }

    /// What the sink is lent for one call: its key-value space, the observer, and the
    /// cancellation token.
    fn lend(&mut self) -> Lent<'_> {
        Lent {
            store: self.state.sink_store(&self.pipeline.sink_scope),
            progress: self.observer,
            cancel: self.options.cancel.clone(),
            resubscribe: self.pipeline.settings.resubscribe,
        }
    }

    /// Step 1: settles batches an interrupted run left pending.
    async fn recover(&mut self, sink: &mut dyn Sink) -> Result<(), RunError> {
        self.observer.phase(Phase::Recovering, None);
        let batches = self.state.pending_batches(&self.pipeline.name)?;
        for (batch, rows) in batches {
            tracing::info!(batch = %batch.id, changes = batch.records.len(), "settling a batch an earlier run left unconfirmed");
            let outcomes = {
                let mut lent = self.lend();
                sink.recover(&batch, &mut lent.context())
                    .await
                    .map_err(RunError::Sink)?
            };
            let Some(outcomes) = outcomes else {
                // Sent again by this run's diff, since `synced` still holds the old content.
                self.state.drop_pending(&self.pipeline.name, &batch.id)?;
                continue;
            };
            if outcomes.len() != rows.len() {
                return Err(RunError::OutcomeCount {
                    got: outcomes.len(),
                    expected: rows.len(),
                });
            }
            let settlements: Vec<Settlement> = rows
                .into_iter()
                .zip(outcomes)
                .map(|(row, outcome)| match (outcome, row.kind) {
                    (Outcome::Applied { .. }, ChangeKind::Remove) => {
                        Settlement::Forgotten { key: row.key }
                    }
                    (Outcome::Applied { handle }, _) => Settlement::Synced {
                        key: row.key,
                        entry: SyncedEntry {
                            content_hash: row.content_hash,
                            email: row.email,
                            handle,
                            record: row.record.map(Box::new),
                        },
                    },
                    // Whatever else: the diff of this run decides again.
                    _ => Settlement::Dropped { key: row.key },
                })
                .collect();
            self.report.recovered += settlements.len() as u64;
            self.state
                .settle(&self.pipeline.name, &batch.id, &settlements)?;
        }
        Ok(())
    }

    /// Step 2: reads the source and diffs every record against the state.
    async fn read_and_diff(
        &mut self,
        source: &dyn Source,
        sink: &mut dyn Sink,
        last_full: Option<i64>,
    ) -> Result<ChangeSet, RunError> {
        let settings = &self.pipeline.settings;
        let mut synced = Vec::new();
        self.state
            .scan_index(&self.pipeline.name, &mut |key_hash, content_hash| {
                synced.push((key_hash, content_hash))
            })?;
        let index = ContactIndex::of_synced(synced);
        // Does the sink still hold what the state says? If not, everyone is sent again.
        let integrity = {
            let population = index.population();
            let mut lent = self.lend();
            sink.verify(population, &mut lent.context())
                .await
                .map_err(RunError::Sink)?
        };
        let resend_all = match integrity {
            SinkIntegrity::Intact => false,
            SinkIntegrity::Rebuild { reason } => {
                tracing::warn!("{reason}: everyone is sent again and the sink is rebuilt");
                self.report.rebuilt = Some(reason);
                true
            }
            SinkIntegrity::Foreign { reason } => {
                tracing::warn!(
                    "{reason}: removals cannot be detected for people synced before this state existed; they are kept"
                );
                self.report.foreign = Some(reason);
                false
            }
        };
        // Which read: full when asked, when the source cannot do better, when there is
        // no cursor yet, when `full_every` (the pipeline's, else the source's) says it is
        // time, or when the
        // sink is rebuilt from this read.
        let cursor = self.state.cursor(&self.pipeline.name)?;
        let full_every = settings
            .full_every
            .or(source.capabilities().full_every)
            .filter(|&n| n > 0);
        let full_due = match (full_every, last_full) {
            (Some(n), Some(last)) => self.report.run - last >= i64::from(n),
            (Some(_), None) => true,
            (None, _) => false,
        };
        let read_mode = if self.options.full
            || resend_all
            || !source.capabilities().incremental
            || cursor.is_none()
            || full_due
        {
            ReadMode::Full
        } else {
            ReadMode::Incremental { cursor }
        };
        tracing::info!(pipeline = %self.pipeline.name, mode = ?read_mode, "reading");

        let spool_dir = self.options.spool_dir.as_deref();
        let mut diff = Diff {
            changes: ChangeSet {
                upserts: ChangeSpool::create(spool_dir)?,
                removals: ChangeSpool::create(spool_dir)?,
                plan: ChangePlan::default(),
                population: index.population(),
                read: ReadOutcome::default(),
                full_read: read_mode == ReadMode::Full,
                records: RecordSample::default(),
                addresses: None,
            },
            index,
            mapping: FieldMapping::new(settings),
            samples: Samples::new(self.options.sample_size),
            plan_file: self
                .options
                .plan
                .as_deref()
                .map(PlanWriter::create)
                .transpose()?,
            emails: self
                .capabilities
                .addresses_by_email
                .then(AddressBook::default),
            keyless_rejects: 0,
            resend_all,
            waiting: Vec::new(),
            lookups: 0,
        };

        self.observer.phase(Phase::Reading, None);
        let stream = source.read(read_mode).await.map_err(RunError::Source)?;
        let mut feed = Feed::new(
            stream,
            diff.mapping.clone(),
            self.pipeline.shaping.clone(),
            settings.key,
            // With nobody synced (a first sync) no record is compared by content.
            diff.index.population() > 0,
        );
        loop {
            if self.options.cancel.is_cancelled() {
                return Err(RunError::Cancelled);
            }
            let Some(item) = feed.next().await.map_err(RunError::Source)? else {
                break;
            };
            if let Some(ahead) = feed.fresh_batch() {
                diff.index.warm(ahead.iter().filter_map(Staged::key_hash));
            }
            self.report.read += 1;
            if self.report.read.is_multiple_of(4096) {
                self.observer.advance(4096);
            }
            match item {
                Staged::Rejected(error) => {
                    let key = error
                        .partial
                        .as_deref()
                        .and_then(|partial| {
                            let mut partial = partial.clone();
                            // The key may come from a mapped field; a mapping error only
                            // means the key is taken from the fields as read.
                            let _ = diff.mapping.apply(&mut partial);
                            trusted_key(&partial, settings.key)
                        })
                        .or_else(|| error.key.clone().filter(|k| rule_allows(settings.key, k)));
                    self.seen_rejected(&mut diff, key.as_ref());
                    self.reject(Rejection {
                        stage: RejectStage::Source,
                        origin: &error.origin,
                        key: key.as_ref().or(error.key.as_ref()),
                        email: error.partial.as_ref().and_then(|c| c.email.as_deref()),
                        field: error.field.as_deref(),
                        reason: error.reason.clone(),
                        contact: None,
                        raw: error.raw.as_deref(),
                    })?;
                }
                staged => self.diff_record(&mut diff, staged)?,
            }
        }
        self.plan_waiting(&mut diff)?;
        diff.changes.read = feed.finish().await.map_err(RunError::Source)?;
        self.report.complete_read = diff.changes.read.complete;
        self.observer.advance(self.report.read % 4096);
        self.sweep(&mut diff)?;

        if let Some(plan_file) = diff.plan_file.as_mut() {
            plan_file.flush()?;
        }
        diff.changes.addresses = diff.emails.take();
        let plan = diff.changes.plan;
        self.report.created = plan.creates;
        self.report.updated = plan.updates;
        self.report.removed = plan.removals;
        self.report.sample = diff.samples.into_changes();
        Ok(diff.changes)
    }

    /// Diffs one record read from the source, after the stage that mapped and shaped it.
    fn diff_record(&mut self, diff: &mut Diff, staged: Staged) -> Result<(), RunError> {
        let rule = self.pipeline.settings.key;
        let (
            SourceRecord {
                contact,
                origin,
                deleted,
            },
            prepared,
        ) = match staged {
            Staged::Ready(record, prepared) => (record, prepared),
            Staged::Rejected(_) => return Ok(()),
            Staged::Unmapped {
                record,
                field,
                reason,
            } => return self.reject_seen(diff, &record.origin, &record.contact, &field, reason),
            Staged::Out(contact) => {
                self.report.out_of_scope += 1;
                // Kept: seen, so not removed. Removed: left unseen, so the sweep
                // removes whoever was synced (through the guard).
                if self.pipeline.settings.out_of_scope == OutOfScope::Keep {
                    if let Some(key) = trusted_key(&contact, rule) {
                        diff.index.mark(key.hash64());
                    }
                }
                return Ok(());
            }
            Staged::ScopeError {
                origin,
                contact,
                reason,
            } => {
                let reason = format!("where: {reason}");
                return self.reject_seen(diff, &origin, &contact, "where", reason);
            }
            Staged::MapError { origin, failure } => {
                let FieldFailure {
                    contact,
                    field,
                    reason,
                } = *failure;
                let reason = format!("map: {reason}");
                return self.reject_seen(diff, &origin, &contact, &field, reason);
            }
        };
        let Some(key_hash) = prepared.key_hash else {
            return self.reject_keyless(diff, &origin, &contact);
        };
        if !deleted && !prepared.email_valid {
            let trusted = trusted_key(&contact, rule);
            self.seen_rejected(diff, trusted.as_ref());
            let email = contact.email.as_deref().unwrap_or_default();
            let reason = format!("not a valid email address: {email:?}");
            return self.reject(Rejection::of_record(
                &origin,
                &contact,
                contact.key(rule).as_ref(),
                "email",
                reason,
            ));
        }
        let seen = diff.index.mark(key_hash);
        if seen == Seen::Duplicate {
            let Some(key) = contact.key(rule) else {
                return self.reject_keyless(diff, &origin, &contact);
            };
            let reason = format!(
                "duplicate key {key}: an earlier record of this read has the same key, and the first one wins"
            );
            return self.reject(Rejection::of_record(
                &origin,
                &contact,
                Some(&key),
                key_field(&key),
                reason,
            ));
        }
        if let (Some(emails), Some(email), false) =
            (diff.emails.as_mut(), contact.email.as_deref(), deleted)
        {
            if let Some((_, first_line)) = emails.hold(email, key_hash, origin_line(&origin)) {
                let earlier = if first_line > 0 {
                    format!("the record on line {first_line}")
                } else {
                    "an earlier record of this read".to_string()
                };
                let reason = format!(
                    "duplicate email {email}: {earlier} has it under another key, and the sink finds people by email, \
                     so this record would overwrite that person; the first one wins. Give each person their own address"
                );
                return self.reject(Rejection::of_record(
                    &origin,
                    &contact,
                    contact.key(rule).as_ref(),
                    "email",
                    reason,
                ));
            }
        }
        // Most people read are unchanged: they are settled by their hashes alone, and
        // their key is never built.
        if let (Seen::Synced(synced_hash), false, false) = (seen, deleted, diff.resend_all) {
            if synced_hash == prepared.content_hash {
                self.report.unchanged += 1;
                return Ok(());
            }
        }
        // The same rule gave the key hash, so there is a key; the branch only keeps a
        // mistake here from becoming a panic.
        let Some(key) = contact.key(rule) else {
            return self.reject_keyless(diff, &origin, &contact);
        };
        let (change, lookup) = match seen {
            Seen::Duplicate => return Ok(()),
            Seen::New if deleted => {
                self.report.unchanged += 1;
                return Ok(());
            }
            Seen::Synced(_) if deleted => (
                Change::Remove {
                    previous: SyncedEntry::default(),
                    key,
                    origin,
                },
                Some(key_hash),
            ),
            Seen::New => {
                let contact = match self.pipeline.shaping.clone() {
                    Some(shaping) => match shaping.on_create(contact) {
                        Ok(contact) => contact,
                        Err(failure) => {
                            let FieldFailure {
                                contact,
                                field,
                                reason,
                            } = *failure;
                            return self.reject(Rejection::of_record(
                                &origin,
                                &contact,
                                Some(&key),
                                &field,
                                format!("on_create: {reason}"),
                            ));
                        }
                    },
                    None => contact,
                };
                let change = Change::Create {
                    key,
                    contact,
                    origin,
                };
                (change, None)
            }
            Seen::Synced(_) => (
                Change::Update {
                    previous: SyncedEntry::default(),
                    key,
                    contact,
                    origin,
                },
                Some(key_hash),
            ),
        };
        self.wait(diff, change, lookup)
    }

    /// Plans `change` once the state's row of the person it changes (`lookup`, their
    /// key hash) is fetched: changes wait, in read order, until [`LOOKUP_BATCH`] of them
    /// need a row, and the rows are fetched together ([`StateStore::synced_many`]).
    fn wait(
        &mut self,
        diff: &mut Diff,
        change: Change,
        lookup: Option<u64>,
    ) -> Result<(), RunError> {
        if lookup.is_none() && diff.waiting.is_empty() {
            return self.plan_change(diff, &change);
        }
        diff.lookups += usize::from(lookup.is_some());
        diff.waiting.push((change, lookup));
        if diff.lookups >= LOOKUP_BATCH {
            self.plan_waiting(diff)?;
        }
        Ok(())
    }

    /// Fetches the rows the waiting changes need and plans them, in read order.
    fn plan_waiting(&mut self, diff: &mut Diff) -> Result<(), RunError> {
        let waiting = std::mem::take(&mut diff.waiting);
        diff.lookups = 0;
        let hashes: Vec<u64> = waiting.iter().filter_map(|(_, lookup)| *lookup).collect();
        let mut rows = self
            .state
            .synced_many(&self.pipeline.name, &hashes)?
            .into_iter();
        for (mut change, lookup) in waiting {
            if lookup.is_some() {
                let row = rows.next().flatten().map(|row| row.entry);
                let known = row.unwrap_or_default();
                match &mut change {
                    Change::Remove { previous, .. } => *previous = known,
                    Change::Update {
                        previous, contact, ..
                    } => {
                        // What `on_create` set stays as it was sent.
                        if let (Some(shaping), Some(before)) =
                            (&self.pipeline.shaping, &known.record)
                        {
                            for field in shaping.on_create_fields() {
                                if let (Some(value), None) = (before.get(field), contact.get(field))
                                {
                                    let _ = contact.set(field, &value);
                                }
                            }
                        }
                        *previous = known;
                    }
                    Change::Create { .. } => {}
                }
            }
            self.plan_change(diff, &change)?;
        }
        Ok(())
    }

    /// After a complete read, the keys of the state that were not seen are removals,
    /// unless the read had records without a key: then they are held back.
    fn sweep(&mut self, diff: &mut Diff) -> Result<(), RunError> {
        if !diff.changes.read.complete || !self.pipeline.settings.mode.removals() {
            return Ok(());
        }
        let unseen: Vec<u64> = diff.index.unseen().collect();
        if unseen.is_empty() {
            return Ok(());
        }
        if diff.keyless_rejects > 0 {
            self.report.removals_held = unseen.len() as u64;
            self.report.removals_held_reason = Some(format!(
                "{} rejected record(s) of this read have no key that could be read (see the rejects file); \
                 any of them could be one of the {} people not seen, so none is removed. \
                 Fix those rows and run again.",
                diff.keyless_rejects,
                unseen.len()
            ));
            return Ok(());
        }
        for hashes in unseen.chunks(LOOKUP_BATCH) {
            for row in self.state.synced_many(&self.pipeline.name, hashes)? {
                let Some(row) = row else { continue };
                let change = Change::Remove {
                    key: row.key,
                    previous: row.entry,
                    origin: Origin::Derived,
                };
                self.plan_change(diff, &change)?;
            }
        }
        Ok(())
    }

    /// Rejects a record whose fields give no key under the pipeline's rule; it holds
    /// back the run's removals (see [`Run::seen_rejected`]).
    fn reject_keyless(
        &mut self,
        diff: &mut Diff,
        origin: &Origin,
        contact: &Contact,
    ) -> Result<(), RunError> {
        let (field, reason) = match self.pipeline.settings.key {
            KeyRule::Auto => (
                "external_id",
                "no key: the record has neither an external id nor an email",
            ),
            KeyRule::ExternalId => (
                "external_id",
                "no key: the pipeline keys on external_id and the record has none",
            ),
            KeyRule::Email => (
                "email",
                "no key: the pipeline keys on email and the record has none",
            ),
        };
        self.seen_rejected(diff, None);
        self.reject(Rejection::of_record(
            origin,
            contact,
            None,
            field,
            reason.to_string(),
        ))
    }

    /// Rejects a record the engine refuses at `field`, counting it as seen under the
    /// key its fields give (see [`Run::seen_rejected`]).
    fn reject_seen(
        &mut self,
        diff: &mut Diff,
        origin: &Origin,
        contact: &Contact,
        field: &str,
        reason: String,
    ) -> Result<(), RunError> {
        let key = trusted_key(contact, self.pipeline.settings.key);
        // Still present, so still the holder of their address.
        if let (Some(emails), Some(key), Some(email)) =
            (diff.emails.as_mut(), key.as_ref(), contact.email.as_deref())
        {
            emails.hold_rejected(email, key.hash64(), origin_line(origin));
        }
        self.seen_rejected(diff, key.as_ref());
        self.reject(Rejection::of_record(
            origin,
            contact,
            key.as_ref(),
            field,
            reason,
        ))
    }

    /// A rejected record still counts as seen when its key is known, so that it keeps
    /// its last synced state; without a key, it holds back this run's removals.
    fn seen_rejected(&mut self, diff: &mut Diff, key: Option<&ContactKey>) {
        match key {
            Some(key) => {
                diff.index.mark(key.hash64());
            }
            None => diff.keyless_rejects += 1,
        }
    }

    /// Counts a change against the mode, and spools it when the mode applies it.
    fn plan_change(&mut self, diff: &mut Diff, change: &Change) -> Result<(), RunError> {
        let mode = self.pipeline.settings.mode;
        let plan = &mut diff.changes.plan;
        let (wanted, counter) = match change.kind() {
            ChangeKind::Create => (mode.creates(), &mut plan.creates),
            ChangeKind::Update => (mode.updates(), &mut plan.updates),
            ChangeKind::Remove => (mode.removals(), &mut plan.removals),
        };
        if !wanted {
            self.report.skipped += 1;
            return Ok(());
        }
        *counter += 1;
        diff.samples.offer(change);
        if let Some(contact) = change.contact() {
            diff.changes.records.offer(contact);
        }
        if let Some(plan_file) = diff.plan_file.as_mut() {
            plan_file.write(change)?;
        }
        match change.kind() {
            ChangeKind::Remove => diff.changes.removals.push(change)?,
            _ => diff.changes.upserts.push(change)?,
        }
        Ok(())
    }

    /// The one way a record is rejected: counted, logged and written to the rejects file.
    /// Its reason leaves the process: any secret in it (a platform that echoes the
    /// request) is redacted.
    fn reject(&mut self, mut rejection: Rejection<'_>) -> Result<(), RunError> {
        if let std::borrow::Cow::Owned(clean) = contactsync_core::redact_secrets(&rejection.reason)
        {
            rejection.reason = clean;
        }
        self.report.rejected += 1;
        if self.report.rejections.len() < RunReport::FIRST_REJECTIONS {
            self.report.rejections.push(RejectionSummary {
                key: rejection.key.map(ToString::to_string),
                origin: rejection.origin.to_string(),
                field: rejection.field.map(str::to_string),
                reason: rejection.reason.clone(),
            });
        }
        let record = match rejection.raw {
            Some(raw) => Some(raw.to_string()),
            None => rejection
                .contact
                .and_then(|c| serde_json::to_string(c).ok()),
        };
        self.rejects.write(
            rejection.stage,
            rejection.origin,
            rejection.key,
            rejection.email,
            rejection.field,
            &rejection.reason,
            record.as_deref(),
        )?;
        Ok(())
    }

    /// Step 3: the guard. An empty or truncated export must never wipe a platform.
    /// Returns whether the run may go on.
    fn guard(&mut self, changes: &ChangeSet) -> bool {
        let removals = changes.plan.removals;
        if removals == 0 {
            return true;
        }
        let population = changes.population;
        let max = self.pipeline.settings.max_removal_ratio;
        let ratio = removals as f64 / population.max(1) as f64;
        let allowed = ratio <= max || self.options.allow_mass_removal;
        self.report.guard = Some(GuardVerdict {
            removals,
            population,
            max_removal_ratio: max,
            allowed,
        });
        if !allowed {
            // Nothing was done: the counts say so, and what would have been done is
            // the plan's (a dry run's counts are its plan already).
            if !self.options.dry_run {
                let report = &mut self.report;
                report.planned = Some(ChangeCounts {
                    created: std::mem::take(&mut report.created),
                    updated: std::mem::take(&mut report.updated),
                    removed: std::mem::take(&mut report.removed),
                });
            }
            self.report.status = RunStatus::Refused;
            self.report.error = Some(format!(
                "refused: this run would remove {removals} of {population} synced contacts ({:.1}%), more than max_removal_ratio {:.1}%. \
                 If the source really lost them, run again with --allow-mass-removal; otherwise check the source export.",
                ratio * 100.0,
                max * 100.0
            ));
        }
        allowed
    }

    /// Step 4: applies the spooled change set in batches.
    async fn apply(&mut self, sink: &mut dyn Sink, changes: ChangeSet) -> Result<(), RunError> {
        if changes.upserts.len() + changes.removals.len() == 0 {
            return Ok(());
        }
        let capabilities = self.capabilities;
        // Counted again from the outcomes: the plan's counts become what really happened.
        self.report.unconfirmed = changes.plan.total();
        self.report.created = 0;
        self.report.updated = 0;
        self.report.removed = 0;
        self.observer
            .phase(Phase::Applying, Some(changes.plan.total()));
        {
            let mut lent = self.lend();
            sink.begin(&changes.plan, &mut lent.context())
                .await
                .map_err(RunError::Sink)?;
        }
        // Asked after `begin`: a sink may size its batches by how it chose to write
        // (Actito: one import a batch in bulk, small batches one by one).
        let batch_size = self
            .pipeline
            .settings
            .batch_size
            .unwrap_or(usize::MAX)
            .min(sink.capabilities().max_batch)
            .max(1);
        self.state.sample_records(&changes.records.records)?;
        let run_id = self.report.run;
        let addresses = changes.addresses.unwrap_or_default();
        let mut parts = [
            changes.upserts.into_reader()?,
            changes.removals.into_reader()?,
        ];
        let mut number = 0;
        let parts_len = parts.len();
        for at in 0..parts_len {
            loop {
                let mut batch = parts[at].next_batch(batch_size)?;
                // A sink whose one job carries removals too gets the last batch of
                // creates and updates topped up with the first removals.
                if capabilities.mixes_removals && batch.len() < batch_size {
                    for next in parts.iter_mut().skip(at + 1) {
                        let more = next.next_batch(batch_size - batch.len())?;
                        batch.extend(more);
                        if batch.len() == batch_size {
                            break;
                        }
                    }
                }
                if batch.is_empty() {
                    break;
                }
                if self.options.cancel.is_cancelled() {
                    return Err(RunError::Cancelled);
                }
                number += 1;
                let batch = ChangeBatch {
                    id: format!("run-{run_id}-batch-{number}"),
                    changes: batch,
                };
                self.apply_batch(sink, &batch, &addresses).await?;
            }
        }
        self.observer.phase(Phase::Finishing, None);
        {
            let mut lent = self.lend();
            sink.finish(&mut lent.context())
                .await
                .map_err(RunError::Sink)?;
        }
        if capabilities.durable_at_finish {
            let started = Instant::now();
            let confirmed = self.state.confirm_finished(&self.pipeline.name, run_id)?;
            tracing::debug!(
                confirmed,
                seconds = started.elapsed().as_secs_f64(),
                "the sink's changes are recorded as synced"
            );
            // Made durable now, and only now: what the report counts.
            let done = std::mem::take(&mut self.awaiting_finish);
            self.report.created += done.created;
            self.report.updated += done.updated;
            self.report.removed += done.removed;
            self.report.unconfirmed = self
                .report
                .unconfirmed
                .saturating_sub(done.created + done.updated + done.removed);
        }
        let summary = sink.summary();
        self.report.unknown_in_sink = summary.unknown_in_sink;
        self.report.imports = summary.jobs;
        self.report.sink_plan = summary.how;
        self.report.outcome_reads = summary.reads;
        Ok(())
    }

    /// Records one batch as pending, sends it, and settles each outcome. A change the
    /// address rule settles ([`AddressBook::screen`]) is recorded and settled with the
    /// others, but not sent.
    async fn apply_batch(
        &mut self,
        sink: &mut dyn Sink,
        batch: &ChangeBatch,
        addresses: &AddressBook,
    ) -> Result<(), RunError> {
        let rows: Vec<PendingRow> = batch
            .changes
            .iter()
            .map(|c| PendingRow {
                key: c.key().clone(),
                kind: c.kind(),
                content_hash: c.contact().map(|c| self.pipeline.diff_hash(c)).unwrap_or(0),
                email: c.email().map(str::to_string),
                record: c.contact().cloned(),
            })
            .collect();
        let durable_at_finish = self.capabilities.durable_at_finish;
        // A sink that keeps nothing before it finishes is handed the batch first and the
        // batch recorded after, already applied, in one write: a crash in between loses
        // nothing, since that sink has made nothing durable yet (pending first, then
        // settled as applied, took a second pass over every row of a first sync).
        if !durable_at_finish {
            self.state
                .record_pending(&self.pipeline.name, self.report.run, &batch.id, &rows)?;
        }
        let screened = addresses.screen(batch);
        let sent = screened.sent.as_ref().unwrap_or(batch);
        let answered = if sent.changes.is_empty() {
            Vec::new()
        } else {
            let mut lent = self.lend();
            sink.apply(sent, &mut lent.context())
                .await
                .map_err(RunError::Sink)?
        };
        if answered.len() != sent.changes.len() {
            return Err(RunError::OutcomeCount {
                got: answered.len(),
                expected: sent.changes.len(),
            });
        }
        let mut answered = answered.into_iter();
        let outcomes: Vec<Outcome> = screened
            .taken
            .iter()
            .map(|taken| match taken {
                Some(_) => Outcome::applied(),
                None => answered.next().unwrap_or(Outcome::Unknown {
                    reason: "no outcome".into(),
                }),
            })
            .collect();
        // Taken whole, as nearly always: recorded applied at once. Otherwise recorded
        // now as sent, and settled one by one below, as for any other sink.
        let mut recorded_applied = false;
        if durable_at_finish {
            let handles: Option<Vec<Option<String>>> = outcomes
                .iter()
                .map(|outcome| match outcome {
                    Outcome::Applied { handle } => Some(handle.clone()),
                    _ => None,
                })
                .collect();
            let (pipeline, run) = (&self.pipeline.name, self.report.run);
            match handles {
                Some(handles) => {
                    self.state
                        .record_awaiting_finish(pipeline, run, &batch.id, &rows, &handles)?;
                    recorded_applied = true;
                }
                None => self.state.record_pending(pipeline, run, &batch.id, &rows)?,
            }
        }
        let mut settlements = Vec::with_capacity(outcomes.len());
        let mut settled = 0u64;
        let mut audit: Vec<(&'static str, Option<String>)> = Vec::with_capacity(outcomes.len());
        for (((change, row), outcome), taken) in batch
            .changes
            .iter()
            .zip(rows)
            .zip(outcomes)
            .zip(screened.taken)
        {
            let kind = change.kind();
            let key = row.key.clone();
            let kept_handle = || change.previous().and_then(|p| p.handle.clone());
            match outcome {
                Outcome::Applied { handle } => {
                    if let Some(why) = taken {
                        settled += 1;
                        tracing::info!(key = %key, "{why}");
                        self.report.address_taken += 1;
                        audit.push(("address_taken", Some(why)));
                    } else if durable_at_finish {
                        // Taken, not yet made durable: counted (and confirmed) once the
                        // sink's finish succeeds; the history says `sent` until then.
                        audit.push(("sent", None));
                        self.awaiting_finish.count(kind);
                    } else {
                        settled += 1;
                        audit.push(("applied", None));
                        match kind {
                            ChangeKind::Create => self.report.created += 1,
                            ChangeKind::Update => self.report.updated += 1,
                            ChangeKind::Remove => self.report.removed += 1,
                        }
                    }
                    if recorded_applied {
                        continue;
                    }
                    settlements.push(if durable_at_finish {
                        Settlement::AwaitingFinish { key, handle }
                    } else if kind == ChangeKind::Remove {
                        Settlement::Forgotten { key }
                    } else {
                        Settlement::Synced {
                            key,
                            entry: SyncedEntry {
                                content_hash: row.content_hash,
                                email: row.email,
                                handle: handle.or_else(kept_handle),
                                record: row.record.map(Box::new),
                            },
                        }
                    });
                }
                Outcome::Rejected {
                    reason,
                    field,
                    retry,
                } => {
                    audit.push(("rejected", Some(reason.clone())));
                    settled += 1;
                    self.reject(Rejection {
                        stage: RejectStage::Sink,
                        origin: change.origin(),
                        key: Some(&key),
                        email: change.email(),
                        field: field.as_deref(),
                        reason,
                        contact: change.contact(),
                        raw: None,
                    })?;
                    settlements.push(match (retry, kind) {
                        (true, _) => Settlement::Dropped { key },
                        // Final: remember the content so it is not re-sent every night,
                        // only when the person changes again. The last-sent record stays
                        // what the sink last accepted.
                        (false, ChangeKind::Remove) => Settlement::Forgotten { key },
                        (false, _) => Settlement::Synced {
                            key,
                            entry: SyncedEntry {
                                content_hash: row.content_hash,
                                email: row.email,
                                handle: kept_handle(),
                                record: None,
                            },
                        },
                    });
                }
                Outcome::Unknown { reason } => {
                    audit.push(("unknown", Some(reason.clone())));
                    self.report.unknown += 1;
                    tracing::debug!(key = %key, "outcome unknown, sent again next run: {reason}");
                    // Stays pending; the next run settles or re-sends it.
                }
            }
        }
        if !settlements.is_empty() {
            self.state
                .settle(&self.pipeline.name, &batch.id, &settlements)?;
        }
        self.audit(batch, audit)?;
        // What stays pending (unknown outcomes) is still not confirmed.
        self.report.unconfirmed = self.report.unconfirmed.saturating_sub(settled);
        self.observer.advance(batch.changes.len() as u64);
        Ok(())
    }

    /// Keeps what the sink was asked to do to each person of `batch`, and what came of
    /// it, for `contactsync history` (unless `audit_days = 0`).
    fn audit(
        &mut self,
        batch: &ChangeBatch,
        outcomes: Vec<(&'static str, Option<String>)>,
    ) -> Result<(), RunError> {
        let settings = &self.pipeline.settings;
        if settings.audit_days == 0 {
            return Ok(());
        }
        let at = chrono::Utc::now().timestamp();
        let entries: Vec<AuditEntry> = batch
            .changes
            .iter()
            .zip(outcomes)
            .map(|(change, (outcome, reason))| {
                // A create keeps its record in the compact form, not as JSON.
                let created = (settings.audit_values && change.kind() == ChangeKind::Create)
                    .then(|| change.contact().cloned().map(Box::new))
                    .flatten();
                let changes = if created.is_some() {
                    Vec::new()
                } else {
                    change.field_changes()
                };
                let fields = if created.is_some() {
                    String::new()
                } else if settings.audit_values {
                    let map: serde_json::Map<String, serde_json::Value> = changes
                        .into_iter()
                        .map(|c| (c.field.to_string(), serde_json::json!([c.before, c.after])))
                        .collect();
                    serde_json::Value::Object(map).to_string()
                } else {
                    let names: Vec<String> =
                        changes.into_iter().map(|c| c.field.to_string()).collect();
                    serde_json::Value::from(names).to_string()
                };
                AuditEntry {
                    pipeline: self.pipeline.name.clone(),
                    run: self.report.run,
                    at,
                    key: change.key().to_string(),
                    email: change.email().map(str::to_string),
                    kind: change.kind().as_str().to_string(),
                    outcome: outcome.to_string(),
                    reason,
                    fields,
                    created,
                }
            })
            .collect();
        self.state.record_audit(&entries)?;
        Ok(())
    }

    /// Step 5: decides the run's status and records the run in the state.
    fn record(&mut self, result: Result<Completion, RunError>, started: Instant) {
        // The error leaves the process (summary, report, runs, webhooks): whatever its
        // origin, no secret of this process stays in it.
        let result = result.map_err(|e| match e {
            RunError::Locked(message) => {
                RunError::Locked(contactsync_core::redact_secrets(&message).into_owned())
            }
            e => e,
        });
        let completion = match result {
            Ok(completion) => Some(completion),
            Err(RunError::Locked(message)) => {
                // Another run holds the pipeline: this one did nothing, and records nothing.
                self.report.status = RunStatus::Locked;
                self.report.error = Some(message);
                self.report.duration_ms = started.elapsed().as_millis() as u64;
                return;
            }
            Err(RunError::Cancelled) => {
                self.report.status = RunStatus::Interrupted;
                self.report.error = Some(RunError::Cancelled.to_string());
                None
            }
            Err(e) => {
                self.report.status = RunStatus::Failed;
                self.report.error =
                    Some(contactsync_core::redact_secrets(&e.to_string()).into_owned());
                None
            }
        };
        let report = &mut self.report;
        if report.status == RunStatus::Synced {
            if report.unknown > 0 {
                report.status = RunStatus::Failed;
                report.error = Some(format!(
                    "{} changes have an unknown outcome; the next run sends them again",
                    report.unknown
                ));
            } else if report.removals_held > 0 {
                report.status = RunStatus::RemovalsHeld;
            } else if report.rejected > 0 {
                report.status = RunStatus::FinishedWithRejects;
            }
        }
        // A run the user interrupted that therefore could not finish (its job's
        // outcome unknown, a call cut short) was interrupted, not broken.
        if report.status == RunStatus::Failed && self.options.cancel.is_cancelled() {
            report.status = RunStatus::Interrupted;
        }
        if report.status.succeeded() || report.status == RunStatus::Refused {
            report.unconfirmed = 0;
        }
        report.duration_ms = started.elapsed().as_millis() as u64;
        if !self.options.dry_run && report.run > 0 {
            let succeeded = report.status.succeeded();
            let (cursor, full_read) = match completion.filter(|_| succeeded) {
                Some(c) => (c.cursor, c.full_read),
                None => (None, false),
            };
            let json = serde_json::to_string(&*report).unwrap_or_default();
            let audit_days = self.pipeline.settings.audit_days;
            if audit_days > 0 {
                let before = chrono::Utc::now().timestamp() - i64::from(audit_days) * 86_400;
                match self.state.prune_audit(&self.pipeline.name, before) {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::debug!("pruned {n} audit entries older than {audit_days} days")
                    }
                    Err(e) => tracing::warn!("could not prune the audit: {e}"),
                }
            }
            if let Err(e) = self.state.finish_run(
                &self.pipeline.name,
                report.run,
                report.status.as_str(),
                &json,
                cursor.as_deref(),
                full_read,
            ) {
                report.status = RunStatus::Failed;
                report.error = Some(e.to_string());
            }
        }
    }
}

/// What a sink is lent for one call (see [`Run::lend`]).
struct Lent<'a> {
    store: Box<dyn SinkStore + 'a>,
    progress: &'a dyn ProgressReporter,
    cancel: CancellationToken,
    resubscribe: bool,
}

impl Lent<'_> {
    fn context(&mut self) -> SinkContext<'_> {
        SinkContext {
            store: &mut *self.store,
            progress: self.progress,
            cancel: self.cancel.clone(),
            resubscribe: self.resubscribe,
        }
    }
}

/// A lock's start time for a message: `2026-12-01 02:00:03 UTC`.
fn lock_time(since: &str) -> String {
    chrono::DateTime::parse_from_rfc3339(since)
        .map(|t| {
            t.with_timezone(&chrono::Utc)
                .format("%Y-%m-%d %H:%M:%S UTC")
                .to_string()
        })
        .unwrap_or_else(|_| since.to_string())
}

/// The record's key under `rule`, when it can be trusted to name the person: a key
/// made of an invalid email address could be anyone's.
fn trusted_key(contact: &Contact, rule: KeyRule) -> Option<ContactKey> {
    match contact.key(rule)? {
        ContactKey::Email(email) if !Contact::is_valid_email(&email) => None,
        key => Some(key),
    }
}

/// Whether a key a source worked out is one the pipeline's rule would give.
fn rule_allows(rule: KeyRule, key: &ContactKey) -> bool {
    match (rule, key) {
        (KeyRule::Auto, _) => true,
        (KeyRule::ExternalId, ContactKey::ExternalId(_)) => true,
        (KeyRule::Email, ContactKey::Email(email)) => Contact::is_valid_email(email),
        _ => false,
    }
}

fn key_field(key: &ContactKey) -> &'static str {
    match key {
        ContactKey::Email(_) => "email",
        ContactKey::ExternalId(_) => "external_id",
    }
}

/// The line a record was read on, 0 when its source has no lines.
fn origin_line(origin: &Origin) -> u64 {
    match origin {
        Origin::Line { line, .. } => *line,
        _ => 0,
    }
}

/// A uniform sample of the records a run stores (reservoir sampling, algorithm R, with
/// a fixed-seed xorshift: the same read draws the same sample).
struct RecordSample {
    records: Vec<Contact>,
    seen: u64,
    state: u64,
}

impl Default for RecordSample {
    fn default() -> Self {
        RecordSample {
            records: Vec::new(),
            seen: 0,
            state: 0x9E37_79B9_7F4A_7C15,
        }
    }
}

impl RecordSample {
    /// How many records are kept: enough to train a dictionary on
    /// ([`contactsync_state::record::TRAINING_RECORDS`] at the least).
    const SIZE: usize = 2 * contactsync_state::record::TRAINING_RECORDS;

    fn offer(&mut self, contact: &Contact) {
        self.seen += 1;
        if self.records.len() < Self::SIZE {
            self.records.push(contact.clone());
            return;
        }
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        let slot = self.state % self.seen;
        if let Some(kept) = self.records.get_mut(slot as usize) {
            *kept = contact.clone();
        }
    }
}

/// The first few changes of each kind.
struct Samples {
    per_kind: usize,
    changes: Vec<PlannedChange>,
    counts: [usize; 3],
}

impl Samples {
    fn new(per_kind: usize) -> Self {
        Samples {
            per_kind,
            changes: Vec::new(),
            counts: [0; 3],
        }
    }

    fn offer(&mut self, change: &Change) {
        let slot = match change.kind() {
            ChangeKind::Create => 0,
            ChangeKind::Update => 1,
            ChangeKind::Remove => 2,
        };
        if self.counts[slot] < self.per_kind {
            self.counts[slot] += 1;
            self.changes.push(PlannedChange::of(change));
        }
    }

    fn into_changes(mut self) -> Vec<PlannedChange> {
        self.changes.sort_by_key(|c| c.kind as u8);
        self.changes
    }
}

/// One source item after the pipeline's field mapping and shaping.
enum Staged {
    /// The source refused it.
    Rejected(RecordError),
    /// Mapped and shaped: ready to diff, with what the diff needs of it.
    Ready(SourceRecord, Prepared),
    /// The field mapping refused it.
    Unmapped {
        record: SourceRecord,
        field: String,
        reason: String,
    },
    /// Out of the pipeline's `where`.
    Out(Contact),
    /// `where` could not be decided.
    ScopeError {
        origin: Origin,
        contact: Contact,
        reason: String,
    },
    /// A `map` expression failed.
    MapError {
        origin: Origin,
        failure: Box<FieldFailure>,
    },
}

impl Staged {
    /// The key hash of a record ready to diff.
    fn key_hash(&self) -> Option<u64> {
        match self {
            Staged::Ready(_, prepared) => prepared.key_hash,
            _ => None,
        }
    }
}

/// What the diff needs of a record ready to diff, worked out in the staging tasks beside
/// the diff rather than in it: for most records of a nightly, these are all it looks at.
#[derive(Debug, Clone, Copy)]
struct Prepared {
    /// The hash of the record's key under the pipeline's rule; `None` without a key.
    key_hash: Option<u64>,
    /// The state's content hash of the record (see [`Pipeline::diff_hash`]); 0 when
    /// the state holds nobody to compare with.
    content_hash: u64,
    /// The email is valid, or there is none.
    email_valid: bool,
}

impl Prepared {
    fn of(contact: &Contact, how: &Preparing) -> Prepared {
        Prepared {
            key_hash: contact.key_hash(how.rule),
            content_hash: if how.hash_content {
                diff_hash(how.shaping.as_deref(), contact)
            } else {
                0
            },
            email_valid: contact.email.as_deref().is_none_or(Contact::is_valid_email),
        }
    }
}

/// The state's content hash of `contact` under a pipeline's `shaping`: without the
/// fields `on_create` sets, which are never compared.
fn diff_hash(shaping: Option<&RecordShaping>, contact: &Contact) -> u64 {
    match shaping {
        Some(shaping) => shaping.diff_hash(contact),
        None => contact.content_hash(),
    }
}

/// What a staging task needs to prepare records.
#[derive(Clone)]
struct Preparing {
    mapping: FieldMapping,
    shaping: Option<std::sync::Arc<RecordShaping>>,
    rule: KeyRule,
    /// Whether records are compared by content: not when the state holds nobody.
    hash_content: bool,
}

/// Maps and shapes one item. The scope is decided on the record as read: who is in at
/// all, before what they become.
fn stage(how: &Preparing, item: SourceItem) -> Staged {
    let mut record = match item {
        SourceItem::Rejected(error) => return Staged::Rejected(error),
        SourceItem::Record(record) => record,
    };
    if let Err((field, reason)) = how.mapping.apply(&mut record.contact) {
        return Staged::Unmapped {
            record,
            field,
            reason,
        };
    }
    let Some(shaping) = how.shaping.as_deref() else {
        let prepared = Prepared::of(&record.contact, how);
        return Staged::Ready(record, prepared);
    };
    let SourceRecord {
        contact,
        origin,
        deleted,
    } = record;
    match shaping.scope_and_map(contact) {
        Shaped::In(contact) => {
            let prepared = Prepared::of(&contact, how);
            Staged::Ready(
                SourceRecord {
                    contact,
                    origin,
                    deleted,
                },
                prepared,
            )
        }
        Shaped::Out(contact) => Staged::Out(contact),
        Shaped::ScopeError(contact, reason) => Staged::ScopeError {
            origin,
            contact,
            reason,
        },
        Shaped::MapError(failure) => Staged::MapError { origin, failure },
    }
}

/// Items staged at once: enough to make the channels' cost small.
const STAGE_BATCH: usize = 512;

/// The source's items, mapped, shaped and prepared (see [`Prepared`]). A reader task
/// hands batches in turn to one staging task per core, and [`Feed::next`] takes their
/// results back in the same turn: the records keep their order, and the templates and
/// hashing run beside the diff instead of in it.
struct Feed {
    /// Each staging task's results, in turn.
    staged: Vec<tokio::sync::mpsc::Receiver<Result<Vec<Staged>, ConnectorError>>>,
    /// Whose turn it is.
    turn: usize,
    current: std::vec::IntoIter<Staged>,
    /// `current` was just received (see [`Feed::fresh_batch`]).
    fresh: bool,
    reader: tokio::task::JoinHandle<Box<dyn RecordStream>>,
}

type Batch<T> = Result<Vec<T>, ConnectorError>;

impl Feed {
    fn new(
        stream: Box<dyn RecordStream>,
        mapping: FieldMapping,
        shaping: Option<std::sync::Arc<RecordShaping>>,
        rule: KeyRule,
        hash_content: bool,
    ) -> Feed {
        let how = Preparing {
            mapping,
            shaping,
            rule,
            hash_content,
        };
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4));
        let mut inputs = Vec::with_capacity(workers);
        let mut staged = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (to_worker, mut from_reader) = tokio::sync::mpsc::channel::<Batch<SourceItem>>(4);
            let (to_feed, from_worker) = tokio::sync::mpsc::channel::<Batch<Staged>>(4);
            let how = how.clone();
            tokio::spawn(async move {
                while let Some(batch) = from_reader.recv().await {
                    let items = batch
                        .map(|items| items.into_iter().map(|item| stage(&how, item)).collect());
                    if to_feed.send(items).await.is_err() {
                        return; // The run stopped reading (an error, a cancel).
                    }
                }
            });
            inputs.push(to_worker);
            staged.push(from_worker);
        }
        let reader = tokio::spawn(async move {
            let mut stream = stream;
            let mut turn = 0;
            loop {
                let mut batch = Vec::with_capacity(STAGE_BATCH);
                let mut end = Ok(false);
                while batch.len() < STAGE_BATCH {
                    match stream.next().await {
                        Ok(Some(item)) => batch.push(item),
                        Ok(None) => {
                            end = Ok(true);
                            break;
                        }
                        Err(e) => {
                            end = Err(e);
                            break;
                        }
                    }
                }
                if !batch.is_empty() {
                    if inputs[turn].send(Ok(batch)).await.is_err() {
                        break; // The run stopped reading.
                    }
                    turn = (turn + 1) % inputs.len();
                }
                match end {
                    Ok(false) => {}
                    Ok(true) => break,
                    Err(e) => {
                        // In turn, after what was read before it.
                        let _ = inputs[turn].send(Err(e)).await;
                        break;
                    }
                }
            }
            stream
        });
        Feed {
            staged,
            turn: 0,
            current: Vec::new().into_iter(),
            fresh: false,
            reader,
        }
    }

    async fn next(&mut self) -> Result<Option<Staged>, ConnectorError> {
        loop {
            if let Some(item) = self.current.next() {
                return Ok(Some(item));
            }
            self.fresh = true;
            // The batch of this turn, or none: the reader ended before it.
            let received = self.staged[self.turn].recv().await;
            self.turn = (self.turn + 1) % self.staged.len();
            match received {
                Some(Ok(batch)) => self.current = batch.into_iter(),
                Some(Err(e)) => return Err(e),
                None => return Ok(None),
            }
        }
    }

    /// Once after [`Feed::next`] took the first item of a batch: the rest of it.
    fn fresh_batch(&mut self) -> Option<&[Staged]> {
        std::mem::take(&mut self.fresh).then_some(self.current.as_slice())
    }

    async fn finish(self) -> Result<ReadOutcome, ConnectorError> {
        drop(self.staged);
        let stream = self
            .reader
            .await
            .map_err(|e| ConnectorError::Other(format!("the staging of the read failed: {e}")))?;
        stream.finish().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use contactsync_core::Field;

    /// The sample a state learns its records' shape from is drawn across the whole
    /// change set, not from its first records (a sorted source's first thousand ids
    /// are not like the rest).
    #[test]
    fn the_record_sample_is_drawn_across_the_whole_change_set() {
        let mut sample = RecordSample::default();
        let n = 100_000;
        for i in 0..n {
            let mut c = Contact::default();
            c.set(&Field::ExternalId, &i.to_string()).unwrap();
            sample.offer(&c);
        }
        assert_eq!(sample.records.len(), RecordSample::SIZE);
        let ids: Vec<usize> = sample
            .records
            .iter()
            .filter_map(|c| c.external_id.as_deref()?.parse().ok())
            .collect();
        let in_last_half = ids.iter().filter(|&&i| i >= n / 2).count();
        let in_first_tenth = ids.iter().filter(|&&i| i < n / 10).count();
        // Uniform: about half from the last half, about a tenth from the first tenth.
        assert!(
            (in_last_half as f64) > 0.4 * RecordSample::SIZE as f64,
            "{in_last_half} of the last half"
        );
        assert!(
            (in_first_tenth as f64) < 0.2 * RecordSample::SIZE as f64,
            "{in_first_tenth} of the first tenth"
        );
    }
}
