//! One run of one pipeline.
//!
//! 1. Settle what an interrupted earlier run left pending ([`contactsync_core::Sink::recover`]).
//! 2. Read the source, map and validate each record, and diff it against the compact
//!    index of what the sink last accepted; changes go to a spool file.
//! 3. After a complete read, the keys of the state that were not read are removals.
//! 4. The removal guard; a dry run stops here with the plan.
//! 5. Apply in batches: each batch is recorded as pending before it is sent, and each
//!    outcome settles its change in one transaction.
//! 6. Record the run; the source's cursor advances only if nothing failed.
//!
//! A process killed anywhere leaves pending changes the next run settles or re-sends;
//! every sink call is an upsert, so re-sending converges without duplicates.

use std::path::PathBuf;
use std::time::Instant;

use contactsync_core::{
    Change, ChangeBatch, ChangeKind, ChangePlan, ConnectorError, KeyRule, NoProgress, Origin,
    Outcome, ProgressReporter, ReadMode, Sink, SinkContext, Source, SourceItem, SyncedEntry,
};
use tokio_util::sync::CancellationToken;

use crate::index::{ContactIndex, Seen};
use crate::report::{
    GuardVerdict, PlannedChange, RejectStage, RejectsWriter, RunReport, RunStatus,
};
use crate::settings::{FieldMapping, PipelineSettings};
use crate::spool::ChangeSpool;
use crate::state::{PendingRow, Settlement, StateError, StateStore};

/// A pipeline to run: a source, a sink, and how they sync.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The pipeline's identity in the state: `source->sink` by config section names.
    pub name: String,
    /// The sink's config section (`sinks.poppulo`): the scope of its key-value space.
    pub sink_scope: String,
    /// How they sync.
    pub settings: PipelineSettings,
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
    /// How many changes of each kind the report shows.
    pub sample_size: usize,
    /// Where to spool the change set (the system's temp dir when `None`).
    pub spool_dir: Option<PathBuf>,
    /// Cancelled when the user interrupts: the run stops between batches.
    pub cancel: CancellationToken,
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
    #[error("change spool: {0}")]
    Spool(#[from] std::io::Error),
    #[error("the sink returned {got} outcomes for a batch of {expected} changes; nothing of that batch is trusted")]
    OutcomeCount { got: usize, expected: usize },
    #[error("interrupted; what was not confirmed is sent again by the next run")]
    Cancelled,
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
    let mut report = RunReport::new(&pipeline.name, pipeline.settings.mode, options.dry_run);
    let mut run_id = 0;
    let result = run_inner(
        pipeline,
        source,
        sink,
        state,
        options,
        observer,
        &mut report,
        &mut run_id,
    )
    .await;
    report.duration_ms = started.elapsed().as_millis() as u64;
    let (cursor, full_read) = match result {
        Ok(progress) => progress,
        Err(e) => {
            report.status = RunStatus::Failed;
            report.error = Some(e.to_string());
            (None, false)
        }
    };
    if report.status == RunStatus::Synced && (report.rejected > 0) {
        report.status = RunStatus::SyncedWithRejects;
    }
    if report.status != RunStatus::Failed && report.unknown > 0 {
        report.status = RunStatus::Failed;
        report.error.get_or_insert_with(|| {
            format!(
                "{} changes have an unknown outcome; the next run sends them again",
                report.unknown
            )
        });
    }
    if !options.dry_run && run_id > 0 {
        let succeeded = matches!(
            report.status,
            RunStatus::Synced | RunStatus::SyncedWithRejects
        );
        let json = serde_json::to_string(&report).unwrap_or_default();
        let cursor = if succeeded { cursor } else { None };
        if let Err(e) = state.finish_run(
            &pipeline.name,
            run_id,
            report.status.as_str(),
            &json,
            cursor.as_deref(),
            succeeded && full_read,
        ) {
            report.status = RunStatus::Failed;
            report.error = Some(e.to_string());
        }
    }
    report
}

/// Returns the cursor to store and whether the read was a complete full read.
#[allow(clippy::too_many_arguments)]
async fn run_inner(
    pipeline: &Pipeline,
    source: &dyn Source,
    sink: &mut dyn Sink,
    state: &mut dyn StateStore,
    options: &RunOptions,
    observer: &dyn RunObserver,
    report: &mut RunReport,
    run_id: &mut i64,
) -> Result<(Option<String>, bool), RunError> {
    let settings = &pipeline.settings;
    let mut rejects = RejectsWriter::create(options.rejects.as_deref())?;

    let last_full = if options.dry_run {
        None
    } else {
        let (run, last_full) = state.begin_run(&pipeline.name)?;
        *run_id = run;
        report.run = run;
        observer.phase(Phase::Recovering, None);
        report.recovered = recover(pipeline, sink, state, observer, &options.cancel).await?;
        last_full
    };

    // Which read: full when asked, when the source cannot do better, when there is no
    // cursor yet, or when the pipeline's `full_every` says it is time.
    let cursor = state.cursor(&pipeline.name)?;
    let full_due = match (settings.full_every, last_full) {
        (Some(n), Some(last)) => *run_id - last >= i64::from(n.max(1)),
        (Some(_), None) => true,
        (None, _) => false,
    };
    let read_mode =
        if options.full || !source.capabilities().incremental || cursor.is_none() || full_due {
            ReadMode::Full
        } else {
            ReadMode::Incremental { cursor }
        };
    let full_read = read_mode == ReadMode::Full;
    tracing::info!(pipeline = %pipeline.name, mode = ?read_mode, "reading");

    let mut index = ContactIndex::default();
    state.scan_index(&pipeline.name, &mut |key_hash, content_hash| {
        index.insert_synced(key_hash, content_hash)
    })?;
    let population = index.population();

    let mapping = FieldMapping::new(settings);
    let mut spool = Spools {
        upserts: ChangeSpool::create(options.spool_dir.as_deref())?,
        removals: ChangeSpool::create(options.spool_dir.as_deref())?,
    };
    let mut plan = ChangePlan::default();
    let mut samples = Samples::new(options.sample_size);

    observer.phase(Phase::Reading, None);
    let mut stream = source.read(read_mode).await.map_err(RunError::Source)?;
    loop {
        if options.cancel.is_cancelled() {
            return Err(RunError::Cancelled);
        }
        let item = match stream.next().await.map_err(RunError::Source)? {
            Some(item) => item,
            None => break,
        };
        report.read += 1;
        if report.read.is_multiple_of(4096) {
            observer.advance(4096);
        }
        let record = match item {
            SourceItem::Rejected(error) => {
                report.rejected += 1;
                rejects.write_error(RejectStage::Source, &error)?;
                continue;
            }
            SourceItem::Record(record) => record,
        };
        let mut contact = record.contact;
        if !mapping.is_empty() {
            if let Err((field, reason)) = mapping.apply(&mut contact) {
                report.rejected += 1;
                rejects.write(
                    RejectStage::Validation,
                    &record.origin,
                    None,
                    contact.email.as_deref(),
                    Some(&field),
                    &reason,
                    serde_json::to_string(&contact).ok().as_deref(),
                )?;
                continue;
            }
        }
        let Some(key) = contact.key(settings.key) else {
            let (field, reason) = match settings.key {
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
            report.rejected += 1;
            rejects.write(
                RejectStage::Validation,
                &record.origin,
                None,
                contact.email.as_deref(),
                Some(field),
                reason,
                serde_json::to_string(&contact).ok().as_deref(),
            )?;
            continue;
        };
        if let Some(email) = contact.email.as_deref() {
            if !contactsync_core::Contact::is_valid_email(email) && !record.deleted {
                report.rejected += 1;
                rejects.write(
                    RejectStage::Validation,
                    &record.origin,
                    Some(&key),
                    Some(email),
                    Some("email"),
                    &format!("not a valid email address: {email:?}"),
                    serde_json::to_string(&contact).ok().as_deref(),
                )?;
                continue;
            }
        }
        let key_hash = key.hash64();
        let change = match index.mark(key_hash) {
            Seen::Duplicate => {
                report.rejected += 1;
                rejects.write(
                    RejectStage::Validation,
                    &record.origin,
                    Some(&key),
                    contact.email.as_deref(),
                    Some(settings_key_field(settings.key, &key)),
                    &format!("duplicate key {key}: an earlier record of this read has the same key, and the first one wins"),
                    serde_json::to_string(&contact).ok().as_deref(),
                )?;
                continue;
            }
            Seen::New if record.deleted => {
                report.unchanged += 1;
                continue;
            }
            Seen::Synced(_) if record.deleted => {
                let previous = previous_entry(state, &pipeline.name, key_hash)?;
                Change::Remove {
                    key,
                    previous,
                    origin: record.origin,
                }
            }
            Seen::New => Change::Create {
                key,
                contact,
                origin: record.origin,
            },
            Seen::Synced(synced_hash) => {
                if synced_hash == contact.content_hash() {
                    report.unchanged += 1;
                    continue;
                }
                let previous = previous_entry(state, &pipeline.name, key_hash)?;
                Change::Update {
                    key,
                    contact,
                    origin: record.origin,
                    previous,
                }
            }
        };
        plan_change(
            &change,
            settings,
            &mut plan,
            report,
            &mut spool,
            &mut samples,
        )?;
    }
    let outcome = stream.finish().await.map_err(RunError::Source)?;
    report.complete_read = outcome.complete;
    observer.advance(report.read % 4096);

    // Removals by absence: only from a complete read, and only when the mode removes.
    if outcome.complete && settings.mode.removals() {
        let unseen: Vec<u64> = index.unseen().collect();
        for key_hash in unseen {
            if let Some(row) = state.synced(&pipeline.name, key_hash)? {
                let change = Change::Remove {
                    key: row.key,
                    previous: row.entry,
                    origin: Origin::Derived,
                };
                plan_change(
                    &change,
                    settings,
                    &mut plan,
                    report,
                    &mut spool,
                    &mut samples,
                )?;
            }
        }
    }
    drop(index);
    report.created = plan.creates;
    report.updated = plan.updates;
    report.removed = plan.removals;
    report.sample = samples.into_changes();

    // The guard: an empty or truncated export must never wipe a platform.
    if plan.removals > 0 {
        let ratio = plan.removals as f64 / population.max(1) as f64;
        let over = ratio > settings.max_removal_ratio;
        let allowed = !over || options.allow_mass_removal;
        report.guard = Some(GuardVerdict {
            removals: plan.removals,
            population,
            max_removal_ratio: settings.max_removal_ratio,
            allowed,
        });
        if !allowed {
            report.status = RunStatus::RefusedByGuard;
            report.error = Some(format!(
                "refused: this run would remove {} of {} synced contacts ({:.1}%), more than max_removal_ratio {:.1}%. \
                 If the source really lost them, run again with --allow-mass-removal; otherwise check the source export.",
                plan.removals,
                population,
                ratio * 100.0,
                settings.max_removal_ratio * 100.0
            ));
            rejects.flush()?;
            return Ok((None, false));
        }
    }
    if options.dry_run {
        rejects.flush()?;
        return Ok((None, false));
    }

    let outcome_cursor = outcome.cursor;
    let applied = apply(
        pipeline,
        sink,
        state,
        options,
        observer,
        report,
        &mut rejects,
        spool,
        plan,
        *run_id,
    )
    .await;
    rejects.flush()?;
    applied?;
    Ok((outcome_cursor, full_read && outcome.complete))
}

fn settings_key_field(rule: KeyRule, key: &contactsync_core::ContactKey) -> &'static str {
    match (rule, key) {
        (_, contactsync_core::ContactKey::Email(_)) => "email",
        _ => "external_id",
    }
}

fn previous_entry(
    state: &mut dyn StateStore,
    pipeline: &str,
    key_hash: u64,
) -> Result<SyncedEntry, RunError> {
    Ok(state
        .synced(pipeline, key_hash)?
        .map(|row| row.entry)
        .unwrap_or(SyncedEntry {
            content_hash: 0,
            email: None,
            handle: None,
        }))
}

/// Counts a change against the mode, and spools it when the mode applies it.
fn plan_change(
    change: &Change,
    settings: &PipelineSettings,
    plan: &mut ChangePlan,
    report: &mut RunReport,
    spool: &mut Spools,
    samples: &mut Samples,
) -> Result<(), RunError> {
    let mode = settings.mode;
    let (wanted, counter) = match change.kind() {
        ChangeKind::Create => (mode.creates(), &mut plan.creates),
        ChangeKind::Update => (mode.updates(), &mut plan.updates),
        ChangeKind::Remove => (mode.removals(), &mut plan.removals),
    };
    if !wanted {
        report.skipped += 1;
        return Ok(());
    }
    *counter += 1;
    samples.offer(change);
    match change.kind() {
        ChangeKind::Remove => spool.removals.push(change)?,
        _ => spool.upserts.push(change)?,
    }
    Ok(())
}

/// The change set, in two parts: a batch never mixes removals with creates and updates
/// (a platform row that removes someone carries different columns), and removals are
/// applied last, after everyone who stays is up to date.
struct Spools {
    upserts: ChangeSpool,
    removals: ChangeSpool,
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

/// Settles batches an interrupted run left pending. Returns how many changes it settled.
async fn recover(
    pipeline: &Pipeline,
    sink: &mut dyn Sink,
    state: &mut dyn StateStore,
    observer: &dyn RunObserver,
    cancel: &CancellationToken,
) -> Result<u64, RunError> {
    let batches = state.pending_batches(&pipeline.name)?;
    let mut settled = 0;
    for (batch, hashes) in batches {
        tracing::info!(batch = %batch.id, changes = batch.records.len(), "settling a batch an earlier run left unconfirmed");
        let outcomes = {
            let mut store = state.sink_store(&pipeline.sink_scope);
            let mut ctx = SinkContext {
                store: &mut *store,
                progress: observer,
                cancel: cancel.clone(),
            };
            sink.recover(&batch, &mut ctx)
                .await
                .map_err(RunError::Sink)?
        };
        match outcomes {
            Some(outcomes) if outcomes.len() == batch.records.len() => {
                let settlements: Vec<Settlement> = batch
                    .records
                    .iter()
                    .zip(hashes)
                    .zip(outcomes)
                    .map(
                        |((record, content_hash), outcome)| match (outcome, record.kind) {
                            (Outcome::Applied { .. }, ChangeKind::Remove) => {
                                Settlement::Forgotten {
                                    key: record.key.clone(),
                                }
                            }
                            (Outcome::Applied { handle }, _) => Settlement::Synced {
                                key: record.key.clone(),
                                entry: SyncedEntry {
                                    content_hash,
                                    email: record.email.clone(),
                                    handle,
                                },
                            },
                            // Whatever else: the diff of this run decides again.
                            _ => Settlement::Dropped {
                                key: record.key.clone(),
                            },
                        },
                    )
                    .collect();
                settled += settlements.len() as u64;
                state.settle(&pipeline.name, &batch.id, &settlements)?;
            }
            Some(outcomes) => {
                return Err(RunError::OutcomeCount {
                    got: outcomes.len(),
                    expected: batch.records.len(),
                })
            }
            // Sent again by this run's diff, since `synced` still holds the old content.
            None => state.drop_pending(&pipeline.name, &batch.id)?,
        }
    }
    Ok(settled)
}

/// Applies the spooled change set in batches.
#[allow(clippy::too_many_arguments)]
async fn apply(
    pipeline: &Pipeline,
    sink: &mut dyn Sink,
    state: &mut dyn StateStore,
    options: &RunOptions,
    observer: &dyn RunObserver,
    report: &mut RunReport,
    rejects: &mut RejectsWriter,
    spool: Spools,
    plan: ChangePlan,
    run_id: i64,
) -> Result<(), RunError> {
    if spool.upserts.len() + spool.removals.len() == 0 {
        return Ok(());
    }
    let capabilities = sink.capabilities();
    let batch_size = pipeline
        .settings
        .batch_size
        .unwrap_or(usize::MAX)
        .min(capabilities.max_batch)
        .max(1);
    // Counted again from the outcomes: the plan's counts become what really happened.
    report.created = 0;
    report.updated = 0;
    report.removed = 0;
    observer.phase(Phase::Applying, Some(plan.total()));
    {
        let mut store = state.sink_store(&pipeline.sink_scope);
        let mut ctx = SinkContext {
            store: &mut *store,
            progress: observer,
            cancel: options.cancel.clone(),
        };
        sink.begin(&plan, &mut ctx).await.map_err(RunError::Sink)?;
    }
    let mut readers = [spool.upserts.into_reader()?, spool.removals.into_reader()?];
    let mut part = 0;
    let mut number = 0;
    loop {
        let changes = readers[part].next_batch(batch_size)?;
        if changes.is_empty() {
            if part + 1 < readers.len() {
                part += 1;
                continue;
            }
            break;
        }
        if options.cancel.is_cancelled() {
            return Err(RunError::Cancelled);
        }
        number += 1;
        let batch = ChangeBatch {
            id: format!("run-{run_id}-batch-{number}"),
            changes,
        };
        let rows: Vec<PendingRow> = batch
            .changes
            .iter()
            .map(|c| PendingRow {
                key: c.key().clone(),
                kind: c.kind(),
                content_hash: c.contact().map(|c| c.content_hash()).unwrap_or(0),
                email: c.email().map(str::to_string),
            })
            .collect();
        state.record_pending(&pipeline.name, run_id, &batch.id, &rows)?;
        let outcomes = {
            let mut store = state.sink_store(&pipeline.sink_scope);
            let mut ctx = SinkContext {
                store: &mut *store,
                progress: observer,
                cancel: options.cancel.clone(),
            };
            sink.apply(&batch, &mut ctx).await.map_err(RunError::Sink)?
        };
        if outcomes.len() != batch.changes.len() {
            return Err(RunError::OutcomeCount {
                got: outcomes.len(),
                expected: batch.changes.len(),
            });
        }
        let mut settlements = Vec::with_capacity(outcomes.len());
        for ((change, row), outcome) in batch.changes.iter().zip(&rows).zip(outcomes) {
            let key = change.key().clone();
            match outcome {
                Outcome::Applied { handle } => {
                    match change.kind() {
                        ChangeKind::Create => report.created += 1,
                        ChangeKind::Update => report.updated += 1,
                        ChangeKind::Remove => report.removed += 1,
                    }
                    settlements.push(if capabilities.durable_at_finish {
                        Settlement::AwaitingFinish { key, handle }
                    } else if change.kind() == ChangeKind::Remove {
                        Settlement::Forgotten { key }
                    } else {
                        Settlement::Synced {
                            key,
                            entry: SyncedEntry {
                                content_hash: row.content_hash,
                                email: row.email.clone(),
                                handle: handle
                                    .or_else(|| change.previous().and_then(|p| p.handle.clone())),
                            },
                        }
                    });
                }
                Outcome::Rejected {
                    reason,
                    field,
                    retry,
                } => {
                    report.rejected += 1;
                    rejects.write(
                        RejectStage::Sink,
                        change.origin(),
                        Some(&key),
                        change.email(),
                        field.as_deref(),
                        &reason,
                        change
                            .contact()
                            .and_then(|c| serde_json::to_string(c).ok())
                            .as_deref(),
                    )?;
                    settlements.push(match (retry, change.kind()) {
                        (true, _) => Settlement::Dropped { key },
                        // Final: remember the content so it is not re-sent every night,
                        // only when the person changes again.
                        (false, ChangeKind::Remove) => Settlement::Forgotten { key },
                        (false, _) => Settlement::Synced {
                            key,
                            entry: SyncedEntry {
                                content_hash: row.content_hash,
                                email: row.email.clone(),
                                handle: change.previous().and_then(|p| p.handle.clone()),
                            },
                        },
                    });
                }
                Outcome::Unknown { reason } => {
                    report.unknown += 1;
                    tracing::warn!(key = %key, "outcome unknown, sent again next run: {reason}");
                    // Stays pending; the next run settles or re-sends it.
                }
            }
        }
        state.settle(&pipeline.name, &batch.id, &settlements)?;
        observer.advance(batch.changes.len() as u64);
    }
    observer.phase(Phase::Finishing, None);
    {
        let mut store = state.sink_store(&pipeline.sink_scope);
        let mut ctx = SinkContext {
            store: &mut *store,
            progress: observer,
            cancel: options.cancel.clone(),
        };
        sink.finish(&mut ctx).await.map_err(RunError::Sink)?;
    }
    if capabilities.durable_at_finish {
        state.confirm_finished(&pipeline.name, run_id)?;
    }
    Ok(())
}
