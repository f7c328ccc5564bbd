//! Writing changes into a system.
//!
//! The engine calls a [`Sink`] in this order in every run that has changes:
//! [`Sink::recover`] for each batch a previous run left unconfirmed, then
//! [`Sink::begin`] with the counts of the whole change set, [`Sink::apply`] for each
//! batch, and [`Sink::finish`]. A dry run calls none of them.

use std::fmt;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::{ChangeBatch, ChangePlan, ConnectorError, Outcome, PendingBatch};

/// How a sink removes a person (its configured removal policy), for plans and reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemovalStyle {
    /// The record is deleted.
    Delete,
    /// The record is kept and marked inactive (or with a configured status).
    MarkInactive,
    /// The person is opted out of all mail.
    OptOut,
    /// The person is unsubscribed from the configured lists, and kept.
    Unsubscribe,
    /// The sink cannot remove people; removals are reported as rejected.
    Unsupported,
}

impl fmt::Display for RemovalStyle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RemovalStyle::Delete => "delete",
            RemovalStyle::MarkInactive => "mark inactive",
            RemovalStyle::OptOut => "opt out",
            RemovalStyle::Unsubscribe => "unsubscribe",
            RemovalStyle::Unsupported => "unsupported",
        })
    }
}

/// What a sink can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SinkCapabilities {
    /// The most changes in one [`ChangeBatch`]. The engine reads it again after
    /// [`Sink::begin`], so a sink may size batches by how it chose to write.
    pub max_batch: usize,
    /// Whether `apply` runs asynchronous jobs on the platform (and so reports progress).
    pub asynchronous_jobs: bool,
    /// Whether applied changes only become durable in [`Sink::finish`] (a file replaced
    /// at the end). The engine then confirms them only after `finish` succeeds, and
    /// sends a first sync while it is still reading the source: such a sink may get
    /// batches before the read ends, and a [`Sink::begin`] plan that counts only the
    /// changes planned by its first batch.
    pub durable_at_finish: bool,
    /// How removals are carried out.
    pub removal: RemovalStyle,
    /// Whether one batch may hold removals beside creates and updates (one platform job
    /// carries them all: Poppulo's import). Removals still come after every create and
    /// update of the run; the last batch of creates and updates is topped up with them.
    pub mixes_removals: bool,
    /// Whether the platform finds people by their email address (Poppulo, Actito;
    /// Business Catalyst matches by `externalId` first, so it does not say so). The engine then rejects the later of two records of one
    /// read that share an email under different keys, on every run, so that one
    /// person can never overwrite another.
    pub addresses_by_email: bool,
}

/// What a sink found when asked whether it still holds what the state says it was sent
/// ([`Sink::verify`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkIntegrity {
    /// As far as the sink can tell, it holds what it was last sent.
    Intact,
    /// The sink cannot trust what it holds (a file deleted or edited by hand): the
    /// engine sends everyone of a full read again, and the sink rebuilds from them.
    Rebuild {
        /// Why, in a sentence for the summary.
        reason: String,
    },
    /// The state knows nobody yet, but the sink already holds people: they were synced
    /// before this state existed (or by hand), so their removal cannot be detected.
    /// The engine says so once; the sink keeps them.
    Foreign {
        /// What the sink holds, in a sentence for the summary.
        reason: String,
    },
}

/// What a sink has to say about a run after [`Sink::finish`], for the report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkSummary {
    /// People the sink holds that this run's source does not have and the state never
    /// synced (kept, and counted so that a user can clean them up).
    pub unknown_in_sink: Option<u64>,
    /// Asynchronous jobs (imports) the sink posted this run, for a sink that works in
    /// them: what a platform's budget counts.
    pub jobs: Option<u64>,
    /// Reads the sink made to find out what its writes did (Poppulo's look-up of
    /// rows an import did not count), for a sink that makes them.
    pub reads: Option<u64>,
    /// How the sink chose to write this run, and why, for a sink with a choice
    /// (Actito: "bulk: 1 import instead of 2,400 calls ≈ 24 min at 100/min").
    pub how: Option<String>,
}

/// A small key-value space the engine lends a sink, kept in the sync state and scoped
/// to the sink's config section: quota counters, the handle of a job in flight. Writes
/// are durable when the call returns, so they survive a crash.
pub trait SinkStore: Send {
    /// The value of `key`, if set.
    fn get(&self, key: &str) -> Result<Option<String>, ConnectorError>;
    /// Sets `key` to `value`.
    fn put(&mut self, key: &str, value: &str) -> Result<(), ConnectorError>;
    /// Removes `key`.
    fn remove(&mut self, key: &str) -> Result<(), ConnectorError>;
}

/// Progress of a long job on the platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobProgress {
    /// What is running (`Poppulo import 6732468`).
    pub label: String,
    /// Records processed so far.
    pub done: u64,
    /// Records in the job.
    pub total: u64,
}

/// Where a sink reports what it is doing. The binary draws progress bars from it; a
/// library never writes to the terminal itself.
pub trait ProgressReporter: Send + Sync {
    /// A job advanced.
    fn job_progress(&self, progress: &JobProgress);
    /// Something worth a line in the log (`waiting for a running import to finish`).
    fn note(&self, message: &str);
}

/// A [`ProgressReporter`] that reports nowhere (tests, dry runs).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl ProgressReporter for NoProgress {
    fn job_progress(&self, _progress: &JobProgress) {}
    fn note(&self, _message: &str) {}
}

/// What the engine lends a sink during a run.
pub struct SinkContext<'a> {
    /// The sink's own durable key-value space.
    pub store: &'a mut dyn SinkStore,
    /// Where to report progress.
    pub progress: &'a dyn ProgressReporter,
    /// Set when the user interrupts the run: stop waiting, return what is known.
    pub cancel: CancellationToken,
    /// The pipeline's `resubscribe`: send status and subscriptions of every update, not
    /// only those the source changed (see [`crate::Change::sends_status`]).
    pub resubscribe: bool,
}

/// The part of a sink's finish [`Sink::start_finish`] started on another thread. The
/// engine waits for it blocking, not awaiting: while it waits, it holds the state's
/// confirm of the run open, and nothing else of the process may run on its thread in
/// between (another pipeline of `sync --all --jobs` would wait there for the state's
/// write lock, on the thread this run needs to go on).
pub struct FinishStarted {
    ended: std::sync::mpsc::Receiver<bool>,
}

impl FinishStarted {
    /// A started part, and what its thread sends once it ends: whether it made the run
    /// durable. A sender dropped unsent (the thread panicked) says it did not.
    pub fn channel() -> (std::sync::mpsc::SyncSender<bool>, FinishStarted) {
        let (sender, ended) = std::sync::mpsc::sync_channel(1);
        (sender, FinishStarted { ended })
    }

    /// Blocks until the started part ends: whether it made the run durable
    /// ([`Sink::finish`] says why not).
    pub fn wait(self) -> bool {
        self.ended.recv().unwrap_or(false)
    }
}

/// A system changes are written to.
///
/// # Contract
/// - A key comes at most once in a run (in all its batches together).
/// - A batch holds either creates and updates, or removals, never both (unless the sink
///   says [`SinkCapabilities::mixes_removals`]); removals come after every create and
///   update of the run.
/// - `apply` returns exactly one [`Outcome`] per change, in the batch's order.
///   `Applied` means the platform confirmed it. Anything uncertain is
///   [`Outcome::Unknown`], never `Applied`.
/// - Every write is an upsert keyed on a stable identity: applying the same batch twice
///   leaves the platform as applying it once (the engine re-sends after a crash).
/// - A creation that may already have happened is converged on, never duplicated.
/// - An `Err` from `apply` means nothing in the batch is known to have happened; the
///   engine stops the run and re-sends the batch next time.
/// - Retries of transient failures (throttling, 5xx, dropped connections) happen
///   inside the sink, bounded in time; a validation error is not retried.
#[async_trait]
pub trait Sink: Send {
    /// Limits and style.
    fn capabilities(&self) -> SinkCapabilities;

    /// Opens the endpoint and checks credentials and configuration, changing nothing.
    async fn check(&mut self) -> Result<(), ConnectorError>;

    /// Settles a batch a previous run sent but never confirmed. A sink that can find
    /// out what happened (the job's handle is in its store) returns the outcomes;
    /// `None` (the default) lets the engine simply send those changes again.
    async fn recover(
        &mut self,
        _batch: &PendingBatch,
        _ctx: &mut SinkContext<'_>,
    ) -> Result<Option<Vec<Outcome>>, ConnectorError> {
        Ok(None)
    }

    /// Called once before the first batch, with the counts of the whole change set (for
    /// a sink [durable at its finish](SinkCapabilities::durable_at_finish), in a first
    /// sync, those planned so far).
    async fn begin(
        &mut self,
        _plan: &ChangePlan,
        _ctx: &mut SinkContext<'_>,
    ) -> Result<(), ConnectorError> {
        Ok(())
    }

    /// Applies one batch.
    async fn apply(
        &mut self,
        batch: &ChangeBatch,
        ctx: &mut SinkContext<'_>,
    ) -> Result<Vec<Outcome>, ConnectorError>;

    /// Called once after the last batch: make everything durable.
    async fn finish(&mut self, _ctx: &mut SinkContext<'_>) -> Result<(), ConnectorError> {
        Ok(())
    }

    /// Starts the part of [`finish`](Self::finish) that makes the run durable and needs
    /// no [`SinkContext`] (a file written, synced and renamed on a blocking thread),
    /// without waiting for it; `finish`, called after, waits for it and ends the work
    /// (what the sink keeps of its own). A sink [durable at its
    /// finish](SinkCapabilities::durable_at_finish) is called so, and the engine
    /// confirms the run's changes in its state meanwhile, kept only if the started part
    /// says it succeeded. The default starts nothing: `finish` does all, and the engine
    /// confirms after it.
    fn start_finish(&mut self) -> Result<Option<FinishStarted>, ConnectorError> {
        Ok(None)
    }

    /// Called once a run, before the read, with the number of people the state says
    /// the sink holds: whether the sink still holds what it was sent. A sink that can
    /// tell (a file it can fingerprint) answers [`SinkIntegrity::Rebuild`] when it
    /// cannot trust its content, and then rebuilds from the changes of this run, which
    /// then hold everyone; [`SinkIntegrity::Foreign`] when a new state meets a sink
    /// that already holds people. Changes nothing.
    async fn verify(
        &mut self,
        _synced: u64,
        _ctx: &mut SinkContext<'_>,
    ) -> Result<SinkIntegrity, ConnectorError> {
        Ok(SinkIntegrity::Intact)
    }

    /// What [`Sink::check`] found out about the platform that a person choosing
    /// settings wants to see (a SCIM server's `PATCH yes, Bulk yes (100 operations…)`),
    /// for `contactsync check`; `None` (the default) when there is nothing to add.
    fn described(&self) -> Option<String> {
        None
    }

    /// What the sink has to add to the run's report, after [`Sink::finish`].
    fn summary(&self) -> SinkSummary {
        SinkSummary::default()
    }

    /// The local files this sink writes (a CSV file), so that the binary can refuse to
    /// write a report, rejects or plan file over one, or to read and write one file.
    /// Most sinks have none.
    fn files(&self) -> Vec<std::path::PathBuf> {
        Vec::new()
    }
}
