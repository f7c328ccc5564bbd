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
    SourceItem, SourceRecord, SyncedEntry, Unchanged, UnchangedRow,
};
use tokio_util::sync::CancellationToken;

use crate::addresses::AddressBook;
use crate::index::{ContactIndex, Seen};
use crate::report::{
    ChangeCounts, GuardVerdict, PlanError, PlanWriter, PlannedChange, RejectStage, Rejection,
    RejectionSummary, RejectsWriter, RunReport, RunStatus,
};
use crate::settings::{FieldMapping, OutOfScope, PipelineSettings};
use crate::shaping::{FieldFailure, Lookups, RecordShaping, Shaped, ShapingError};
use crate::spool::ChangeSpool;
use crate::state::{
    AuditEntry, LockAttempt, LockHolder, PendingRow, Settlement, StateError, StateStore,
};

mod apply;
mod diff;
mod memo;
mod read;

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

    /// A hash of everything that decides what a record as read becomes in this
    /// pipeline: the field mapping, `map`, `on_create`, `where` and what happens out of
    /// it, the key rule, and the lookup tables. The templates are pure (no clock, file
    /// or environment: see [`crate::shaping`]), so a record as read and this
    /// fingerprint decide the record sent ([`crate::state::SourceMemo`]).
    fn mapping_fingerprint(&self) -> u64 {
        let s = &self.settings;
        let lookups: std::collections::BTreeMap<_, std::collections::BTreeMap<_, _>> = self
            .shaping
            .as_deref()
            .map(|shaping| {
                shaping
                    .lookups()
                    .iter()
                    .map(|(name, table)| (name, table.iter().collect()))
                    .collect()
            })
            .unwrap_or_default();
        let settings = (
            (&s.fields, &s.drop, &s.map, &s.on_create),
            (&s.scope, &s.out_of_scope, &s.key),
            lookups,
        );
        // Serialising maps and strings cannot fail; were it to, every fingerprint
        // would be the same empty one and the memo would still be checked per person.
        let bytes = serde_json::to_vec(&settings).unwrap_or_default();
        xxhash_rust::xxh3::xxh3_64(&bytes)
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
    let transactions_before = state.transactions_committed();
    let mut run = Run {
        pipeline,
        options,
        observer,
        state,
        report: RunReport::new(&pipeline.name, pipeline.settings.mode, options.dry_run),
        rejects: RejectsWriter::counting(),
        kept_rejects: Vec::new(),
        capabilities: sink.capabilities(),
        awaiting_finish: ChangeCounts::default(),
        creates_per_run: false,
        batches: 0,
        settled: 0,
    };
    let holder = LockHolder::current(&pipeline.name);
    let result = match run.lock(&holder).await {
        Ok(()) => run.execute(source, sink).await,
        Err(e) => Err(e),
    };
    run.record(result, started, transactions_before);
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
    /// The run's rejects as the state keeps them with it (the first
    /// [`contactsync_state::KEPT_REJECTS`]), written when it is recorded.
    kept_rejects: Vec<contactsync_state::RejectRow>,
    capabilities: SinkCapabilities,
    /// Changes a sink durable at its finish took, not yet made durable: counted in the
    /// report only once its finish succeeds.
    awaiting_finish: ChangeCounts,
    /// Whether the state keeps the creates a sink durable at its finish takes whole as
    /// one history entry for the run ([`AuditLog::record_created_run`]), so that
    /// [`Run::audit`] writes none a person for them.
    creates_per_run: bool,
    /// Batches sent so far (their ids are numbered from 1).
    batches: u64,
    /// Changes whose outcome the batches settled so far (rejected, or applied by a
    /// sink that keeps as it goes).
    settled: u64,
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
    /// ([`SyncedIndex::sample_records`](crate::state::SyncedIndex::sample_records)).
    records: RecordSample,
    /// Who holds which address in this read (sinks that find people by email).
    addresses: Option<AddressBook>,
    /// A first sync sent while it is read, not spooled.
    streamed: Option<Streamed>,
}

/// A first sync into a sink durable at its finish (the CSV file), sent while it is read:
/// its creates are batched as the diff plans them and handed to the sink, with no
/// change spool in between (writing a million changes to the spool and reading them
/// back was a fifth of the run). Safe because nothing is durable before the sink's
/// finish, which comes after the read: a read that fails, or a run killed, leaves
/// nothing recorded, as before; and a first sync has no removal for the guard to weigh.
/// The sink's `begin` is told the plan as it stands at the first batch.
#[derive(Default)]
struct Streamed {
    /// Planned and not sent yet.
    buffer: Vec<Change>,
    /// Sent while reading.
    sent: u64,
    /// Whether the sink's work has begun ([`Run::apply_streamed`]).
    begun: bool,
    /// The sink's batch size (as its capabilities say before `begin`, then after).
    batch_size: usize,
}

/// The most changes a streamed first sync makes room for at once.
const STREAMED_ROOM: usize = 100_000;

impl Streamed {
    /// Planned and not sent yet.
    fn left(&self) -> u64 {
        self.buffer.len() as u64
    }
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
    /// The memo entries to write, in a pipeline that maps its records.
    memo: Option<memo::MemoWriter>,
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
    Rejected(Box<RecordError>),
    /// The source found it as the state holds it (see [`Source::read_skipping_unchanged`]).
    Unchanged(UnchangedRow),
    /// Mapped and shaped: ready to diff, with what the diff needs of it.
    Ready(Box<SourceRecord>, Prepared),
    /// The field mapping refused it.
    Unmapped {
        record: Box<SourceRecord>,
        field: String,
        reason: String,
    },
    /// Out of the pipeline's `where`.
    Out(Box<Contact>),
    /// `where` could not be decided.
    ScopeError {
        origin: Origin,
        contact: Box<Contact>,
        reason: String,
    },
    /// A `map` expression failed.
    MapError {
        origin: Origin,
        failure: Box<FieldFailure>,
    },
}

impl Staged {
    /// The key hash the diff will look up in the index: of a record ready to diff, or
    /// of an unchanged row the source gave no place for ([`UnchangedRow::at`]).
    fn key_hash(&self) -> Option<u64> {
        match self {
            Staged::Ready(_, prepared) => prepared.key_hash,
            Staged::Unchanged(row) if row.at.is_none() => Some(row.key_hash),
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
    /// The content hash of the record as the source read it, for the pipeline's
    /// [`SourceMemo`](crate::state::SourceMemo): when it keeps one, and the mapping
    /// left the key's hash as it was.
    source_hash: Option<u64>,
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
            source_hash: None,
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
    /// Whether records are compared by content: not when the state holds nobody, unless
    /// the memo needs their hashes.
    hash_content: bool,
    /// Whether the pipeline keeps a [`SourceMemo`](crate::state::SourceMemo): each
    /// record's hash as read is taken before it is mapped.
    hash_source: bool,
}

/// Maps and shapes one item. The scope is decided on the record as read: who is in at
/// all, before what they become.
fn stage(how: &Preparing, item: SourceItem) -> Staged {
    let mut record = match item {
        SourceItem::Rejected(error) => return Staged::Rejected(error),
        SourceItem::Unchanged(row) => return Staged::Unchanged(row),
        SourceItem::Record(record) => record,
    };
    let as_read = how.hash_source.then(|| {
        (
            record.contact.key_hash(how.rule),
            record.contact.content_hash(),
        )
    });
    let prepared = |contact: &Contact| {
        let mut prepared = Prepared::of(contact, how);
        prepared.source_hash = as_read
            .filter(|(key_hash, _)| key_hash.is_some() && *key_hash == prepared.key_hash)
            .map(|(_, content_hash)| content_hash);
        prepared
    };
    if let Err((field, reason)) = how.mapping.apply(&mut record.contact) {
        return Staged::Unmapped {
            record,
            field,
            reason,
        };
    }
    let Some(shaping) = how.shaping.as_deref() else {
        let prepared = prepared(&record.contact);
        return Staged::Ready(record, prepared);
    };
    // The record's box is kept for the shaped contact.
    let contact = std::mem::take(&mut record.contact);
    match shaping.scope_and_map(contact) {
        Shaped::In(contact) => {
            let prepared = prepared(&contact);
            record.contact = contact;
            Staged::Ready(record, prepared)
        }
        Shaped::Out(contact) => Staged::Out(Box::new(contact)),
        Shaped::ScopeError(contact, reason) => Staged::ScopeError {
            origin: record.origin,
            contact: Box::new(contact),
            reason,
        },
        Shaped::MapError(failure) => Staged::MapError {
            origin: record.origin,
            failure,
        },
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
    fn new(stream: Box<dyn RecordStream>, how: Preparing) -> Feed {
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
                let end = stream
                    .next_batch(&mut batch, STAGE_BATCH)
                    .await
                    .map(|more| !more);
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
