//! What the engine remembers between runs, behind a small interface of its own: the
//! `contactsync-state` crate. The engine depends on it (and re-exports it as
//! `contactsync_engine::state`); no connector does.
//!
//! Features: `sqlite` (default) the embedded backend, `postgres` the shared one,
//! `conformance` the suite every backend passes.

//!
//! The engine is the only code that reads or writes sync state, and it does so only
//! through [`StateStore`], so that a shared PostgreSQL backend can stand in for the
//! embedded SQLite one ([`SqliteState`]) without touching a connector.
//!
//! Per pipeline (`source->sink`), the state holds:
//! - `synced`: key → hash of the content the sink last accepted, with the email and the
//!   sink's handle, so removals can address the person, and the record itself in a
//!   compact binary form ([`record`]), so that the next change knows its `before`;
//! - `pending`: changes sent but not yet confirmed, so a crashed run is settled by the
//!   next one (see DESIGN.md, "Crash safety");
//! - the source's cursor, advanced only when a run completes;
//! - the runs, with their reports.
//!
//! Per sink config section, a small key-value space the sink uses through
//! [`contactsync_core::SinkStore`] (quota counters, the handle of a job in flight).
//!
//! This module is the interface and its contract; [`sqlite`] the embedded backend;
//! [`conformance`] the suite every backend passes (call it from the backend's tests).

// Helpers the two backends share go unused in a build with one of them.
#![cfg_attr(not(all(feature = "sqlite", feature = "postgres")), allow(dead_code))]

#[cfg(feature = "sqlite")]
mod compact;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
mod location;
#[cfg(feature = "postgres")]
mod postgres;
pub mod record;
#[cfg(feature = "sqlite")]
mod sqlite;
mod views;

#[cfg(feature = "postgres")]
pub use self::postgres::PostgresState;
pub use location::{redact, StateLocation};
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteState;
pub use views::{HeldLock, RejectLog, RejectRow, Views, KEPT_REJECTS};

use std::path::{Path, PathBuf};

use contactsync_core::{
    ChangeKind, Contact, ContactKey, PendingBatch, PendingRecord, SinkStore, SyncedEntry,
};

/// A state operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The database could not be opened or used.
    #[cfg(feature = "sqlite")]
    #[error("state database {}: {source}", path.display())]
    Database {
        /// The database file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: rusqlite::Error,
    },
    /// The database file cannot be opened (permissions, a directory in the way).
    #[error("state database {}: {message}", path.display())]
    Unavailable {
        /// The database file.
        path: PathBuf,
        /// What the file system said.
        message: String,
    },
    /// Another process holds the state's write lock and did not let go in time: a run
    /// stopped (`SIGSTOP`, a debugger) or stuck in the middle of a write. Nothing was
    /// changed; the CLI reports it as `locked` (exit 5).
    #[error("state database {} is locked: {message}", path.display())]
    Busy {
        /// The database file.
        path: PathBuf,
        /// What is known of it.
        message: String,
    },
    /// The database holds something this version does not understand.
    #[error("state database {}: {message}", path.display())]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The shared PostgreSQL state failed (cannot connect, a statement refused).
    #[error("state database {url}: {message}")]
    Shared {
        /// The database URL, without its password.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// Two different keys share a 64-bit key hash (about one chance in 10^7 for a
    /// million contacts): the index cannot tell them apart.
    #[error("keys {existing} and {new} share a hash; rename one of them or report this")]
    KeyCollision {
        /// The key already stored.
        existing: String,
        /// The key being stored.
        new: String,
    },
}

/// One row of the synced index, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncedRow {
    /// The contact's key.
    pub key: ContactKey,
    /// What was synced.
    pub entry: SyncedEntry,
}

/// What one source row became in a pipeline that maps its records: a memo, so that a
/// nightly can tell an unchanged row by the source's hash alone, as a pipeline that
/// sends records as read does by the state's content hash.
///
/// The memo claims nothing about the sink, so it is written apart from `synced` and
/// `pending`, with no crash safety of its own: an entry counts only while the synced
/// content hash of its key is the one its `tag` names (the engine folds the mapping's
/// configuration into the tag). An entry gone stale (the person's update failed, the
/// mapping changed, the person was removed) is ignored, and the row is read in full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceMemo {
    /// The person's key hash, the same before and after the mapping.
    pub key_hash: u64,
    /// [`Contact::content_hash`] of the record as the source read it.
    pub source_hash: u64,
    /// What the record became: the engine's fold of the mapped content hash and the
    /// mapping's configuration.
    pub tag: u64,
}

impl SourceMemo {
    /// Bytes an entry takes packed.
    const PACKED: usize = 24;

    /// Entries packed in one stored row.
    pub(crate) const A_ROW: usize = 4096;

    /// `entries` as stored: each one's three hashes, little-endian.
    pub(crate) fn pack(entries: &[SourceMemo]) -> Vec<u8> {
        let mut packed = Vec::with_capacity(entries.len() * Self::PACKED);
        for e in entries {
            for hash in [e.key_hash, e.source_hash, e.tag] {
                packed.extend_from_slice(&hash.to_le_bytes());
            }
        }
        packed
    }

    /// The entries of a stored row. A row cut short loses only its last entry: the
    /// memo is a cache, and a row read in full again on the next night costs nothing.
    pub(crate) fn unpack(packed: &[u8]) -> impl Iterator<Item = SourceMemo> + '_ {
        let hash = |bytes: &[u8]| {
            let mut word = [0u8; 8];
            word.copy_from_slice(bytes);
            u64::from_le_bytes(word)
        };
        packed.chunks_exact(Self::PACKED).map(move |e| SourceMemo {
            key_hash: hash(&e[..8]),
            source_hash: hash(&e[8..16]),
            tag: hash(&e[16..]),
        })
    }
}

/// A change recorded as sent, before the sink confirmed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRow {
    /// The contact's key.
    pub key: ContactKey,
    /// The kind of change.
    pub kind: ChangeKind,
    /// The content hash the change carries (0 for a removal).
    pub content_hash: u64,
    /// The email it was sent with.
    pub email: Option<String>,
    /// The contact it sends (`None` for a removal), remembered as the last-sent record
    /// once the change is confirmed.
    pub record: Option<Contact>,
}

impl PendingRow {
    /// Its settlement once the sink applied it (a create or an update: a removal is
    /// [`Settlement::Forgotten`]): the sink holds what it sent, under `handle`.
    pub fn applied(self, handle: Option<String>) -> Settlement {
        Settlement::Synced {
            key: self.key,
            entry: SyncedEntry {
                content_hash: self.content_hash,
                email: self.email,
                handle,
                record: self.record.map(Box::new),
            },
        }
    }
}

/// How one pending change ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// The sink holds this content now: remember it. An `entry.record` of `None`
    /// keeps the record stored before (a final rejection changes the hash only, since
    /// the sink never accepted those values).
    Synced {
        /// The key.
        key: ContactKey,
        /// What to remember.
        entry: SyncedEntry,
    },
    /// The person is no longer synced: forget them.
    Forgotten {
        /// The key.
        key: ContactKey,
    },
    /// Drop the pending change without touching `synced` (a retryable rejection):
    /// the next run's diff sends it again.
    Dropped {
        /// The key.
        key: ContactKey,
    },
    /// The sink reported the change applied, but it becomes durable only when the sink
    /// finishes: keep it pending, marked applied, with what to remember then.
    AwaitingFinish {
        /// The key.
        key: ContactKey,
        /// The handle the sink returned.
        handle: Option<String>,
    },
}

/// A summary of a pipeline's state, for `contactsync state show`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PipelineSummary {
    /// `source->sink`.
    pub pipeline: String,
    /// Contacts the sink holds, as far as the state knows.
    pub synced: u64,
    /// Changes sent and not confirmed.
    pub pending: u64,
    /// The source's cursor.
    pub cursor: Option<String>,
    /// Runs recorded.
    pub runs: u64,
    /// When the last run finished, and how.
    pub last_run: Option<String>,
}

/// Who holds a run lock: enough for a user to find the process, and a token that tells
/// this holder from an earlier process with the same pid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockHolder {
    /// Unique to one run of one process.
    pub token: String,
    /// The process id.
    pub pid: u32,
    /// The host the process runs on.
    pub host: String,
    /// The pipeline the run syncs.
    pub pipeline: String,
    /// When the lock was taken (RFC 3339).
    pub since: String,
}

impl LockHolder {
    /// This process, running `pipeline`.
    pub fn current(pipeline: &str) -> Self {
        let now = chrono::Utc::now();
        let pid = std::process::id();
        LockHolder {
            token: format!("{pid}-{}", now.timestamp_nanos_opt().unwrap_or_default()),
            pid,
            host: gethostname::gethostname().to_string_lossy().into_owned(),
            pipeline: pipeline.to_string(),
            since: now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        }
    }

    /// Whether the holder is certainly gone: a process on this host that no longer
    /// exists. (On another host only the heartbeat can tell.)
    fn is_gone(&self) -> bool {
        let here = gethostname::gethostname().to_string_lossy().into_owned();
        self.host == here && !Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

/// What a lock attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockAttempt {
    /// Every lock is ours now; `taken_over` lists the stale holders replaced.
    Acquired {
        /// Holders whose process was gone or whose heartbeat had stopped.
        taken_over: Vec<(String, LockHolder)>,
    },
    /// A lock is held by a live run: nothing was taken.
    Busy {
        /// The lock's name (`pipeline:hr->poppulo`, `sink:sinks.poppulo`).
        name: String,
        /// Who holds it.
        holder: LockHolder,
    },
}

/// How long a lock holder's heartbeat may be silent before the lock counts as
/// abandoned (a holder on another host that died without releasing it).
pub const LOCK_STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(120);
/// How often a holder renews its heartbeat.
pub const LOCK_HEARTBEAT_EVERY: std::time::Duration = std::time::Duration::from_secs(15);

/// One recorded run, for `contactsync runs` and for notifications.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RunRecord {
    /// `source->sink`.
    pub pipeline: String,
    /// The run's number.
    pub run: i64,
    /// When it started and finished (RFC 3339); `finished_at` is `None` for a run that
    /// was killed.
    pub started_at: String,
    /// See `started_at`.
    pub finished_at: Option<String>,
    /// How it ended (`synced`, `failed`, …).
    pub status: Option<String>,
    /// Its report, as JSON.
    pub report: Option<String>,
}

/// What happened to the person `who` (see [`AuditLog::history`]), with each change a
/// sink durable at its finish took (`sent`) told as it ended: `applied` when its run's
/// finish made it durable (the run ended `synced`, `finished_with_rejects` or
/// `removals_held`, or was killed after its changes were `confirmed`), else `sent, not
/// confirmed` with why. A change is never said to be applied before the sink made it so.
pub fn history(state: &mut dyn StateStore, who: &str) -> Result<Vec<AuditEntry>, StateError> {
    let mut entries = state.history(who)?;
    let mut statuses: std::collections::HashMap<(String, i64), Option<String>> = Default::default();
    for entry in entries.iter_mut().filter(|e| e.outcome == "sent") {
        let key = (entry.pipeline.clone(), entry.run);
        if !statuses.contains_key(&key) {
            for run in state.runs(Some(&entry.pipeline), 1_000_000)? {
                statuses.insert((run.pipeline.clone(), run.run), run.status.clone());
            }
        }
        let status = statuses.get(&key).cloned().flatten();
        match status.as_deref() {
            Some("synced" | "finished_with_rejects" | "removals_held" | "confirmed") => {
                entry.outcome = "applied".into();
            }
            other => {
                entry.outcome = "sent, not confirmed".into();
                entry.reason = Some(format!(
                    "the run ended {} before the sink made it durable; the next run sent it again",
                    other.unwrap_or("without a word (killed)")
                ));
            }
        }
    }
    Ok(entries)
}

/// One change the sink was asked to make, kept for `contactsync history`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditEntry {
    /// `source->sink`.
    pub pipeline: String,
    /// The run.
    pub run: i64,
    /// When (Unix seconds).
    pub at: i64,
    /// The person's key.
    pub key: String,
    /// Their email, when known.
    pub email: Option<String>,
    /// `create`, `update` or `remove`.
    pub kind: String,
    /// `applied`, `rejected` or `unknown`.
    pub outcome: String,
    /// Why it was rejected or is unknown.
    pub reason: Option<String>,
    /// The fields that changed, as compact JSON: `{"last_name":["Lee","Smith"]}`, or
    /// `["last_name"]` when values are not kept (`audit_values = false`).
    pub fields: String,
    /// For a create with values kept: the record created, stored in the compact form
    /// of the last-sent records (a JSON object of every field would be some 300 bytes a
    /// person on a first sync); [`AuditLog::history`] turns it back into `fields`.
    #[serde(skip)]
    pub created: Option<Box<Contact>>,
}

/// One thing a store holds, as `contactsync state copy` moves it from one backend to
/// another (pending changes and locks are not moved: a state is copied settled).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateItem {
    /// A pipeline: its run counter, cursor and last complete read.
    Pipeline {
        /// `source->sink`.
        name: String,
        /// Runs so far.
        runs: i64,
        /// The source's cursor.
        cursor: Option<String>,
        /// The last run that read everything.
        last_full_run: Option<i64>,
    },
    /// A synced person.
    Synced {
        /// `source->sink`.
        pipeline: String,
        /// Their row.
        row: SyncedRow,
    },
    /// A recorded run.
    Run(RunRecord),
    /// An audit entry.
    Audit(AuditEntry),
    /// A record a run rejected, after the others of its run.
    Reject {
        /// `source->sink`.
        pipeline: String,
        /// The run.
        run: i64,
        /// When (Unix seconds).
        at: i64,
        /// The reject.
        row: RejectRow,
    },
    /// A sink's key-value pair.
    SinkData {
        /// The sink config section.
        scope: String,
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
}

/// The roles of a state store, to bring their methods into scope:
/// `use contactsync_state::roles::*;`.
pub mod roles {
    pub use super::{
        AuditLog, Locks, PendingJournal, RejectLog, RunLog, SinkStores, Slots, StateStore,
        StateTransfer, SyncedIndex, Views,
    };
}

/// The engine's view of the sync state: every role below, which a backend implements
/// one by one. All writes of one call are atomic. A caller names the roles it uses
/// (`use contactsync_state::roles::*`).
pub trait StateStore:
    Locks
    + RunLog
    + SyncedIndex
    + PendingJournal
    + SinkStores
    + AuditLog
    + StateTransfer
    + Slots
    + RejectLog
    + Views
{
}

impl<T> StateStore for T where
    T: Locks
        + RunLog
        + SyncedIndex
        + PendingJournal
        + SinkStores
        + AuditLog
        + StateTransfer
        + Slots
        + RejectLog
        + Views
{
}

/// The run locks: one run a pipeline and a sink section at a time.
pub trait Locks: Send {
    /// Takes every lock of `names` for `holder` at once, or none: a run holds the lock
    /// of its pipeline and of its sink section for its whole length, so that two runs
    /// never post the same change set, nor two pipelines write one sink section at a
    /// time. A lock whose holder is gone (its process no longer exists on this host, or
    /// its heartbeat is older than [`LOCK_STALE_AFTER`]) is taken over. The store keeps
    /// the locks alive (a heartbeat) until [`Locks::unlock`] or until it is dropped.
    fn lock(&mut self, names: &[String], holder: &LockHolder) -> Result<LockAttempt, StateError>;

    /// Releases the locks `holder` took.
    fn unlock(&mut self, holder: &LockHolder) -> Result<(), StateError>;
}

/// Runs: their numbers, how they ended, the cursor, and what is reported of them.
pub trait RunLog: Send {
    /// Starts a run of `pipeline`, returning its number (1, 2, …) and the number of the
    /// last run that read everything, if any.
    fn begin_run(&mut self, pipeline: &str) -> Result<(i64, Option<i64>), StateError>;

    /// Records how a run ended; stores `cursor` only when `Some` and `full_read` marks
    /// the run as the latest complete read.
    fn finish_run(
        &mut self,
        pipeline: &str,
        run: i64,
        status: &str,
        report: &str,
        cursor: Option<&str>,
        full_read: bool,
    ) -> Result<(), StateError>;

    /// The cursor the last successful run left.
    fn cursor(&mut self, pipeline: &str) -> Result<Option<String>, StateError>;

    /// Summaries of every pipeline.
    fn summaries(&mut self) -> Result<Vec<PipelineSummary>, StateError>;

    /// The last `last` runs, newest first, of `pipeline` (or of every pipeline).
    fn runs(&mut self, pipeline: Option<&str>, last: usize) -> Result<Vec<RunRecord>, StateError>;

    /// Forgets everything about `pipeline` (its sink's key-value space is kept).
    fn reset(&mut self, pipeline: &str) -> Result<(), StateError>;

    /// Transactions this store has committed since it was opened, for a backend that
    /// counts them (the bench prints a run's): `None` otherwise.
    fn transactions_committed(&self) -> Option<u64> {
        None
    }
}

/// What each person was last sent as: the index the diff reads.
pub trait SyncedIndex: Send {
    /// Calls `visit(key_hash, content_hash)` for every synced contact.
    fn scan_index(
        &mut self,
        pipeline: &str,
        visit: &mut dyn FnMut(u64, u64),
    ) -> Result<(), StateError>;

    /// The synced row with this key hash.
    fn synced(&mut self, pipeline: &str, key_hash: u64) -> Result<Option<SyncedRow>, StateError>;

    /// The synced rows of these key hashes, in their order (`None` where there is none).
    /// A diff looks up the people who changed in batches: one round trip each was most
    /// of a nightly against a server. The default asks [`SyncedIndex::synced`] for each.
    fn synced_many(
        &mut self,
        pipeline: &str,
        key_hashes: &[u64],
    ) -> Result<Vec<Option<SyncedRow>>, StateError> {
        key_hashes
            .iter()
            .map(|&key_hash| self.synced(pipeline, key_hash))
            .collect()
    }

    /// Calls `visit` with every entry of the pipeline's [`SourceMemo`], in the order
    /// they were recorded: a later entry of a key replaces an earlier one.
    fn scan_source_memo(
        &mut self,
        pipeline: &str,
        visit: &mut dyn FnMut(SourceMemo),
    ) -> Result<(), StateError>;

    /// Appends these entries to the pipeline's [`SourceMemo`]; with `replace`, they
    /// are the whole memo from then on (one transaction). The entries are kept packed,
    /// [`SourceMemo::pack`]ed a few thousand a row: a nightly's entries are a few rows
    /// appended, not a row each scattered over the table, and a million are read back
    /// in a few hundredths of a second.
    fn record_source_memo(
        &mut self,
        pipeline: &str,
        entries: &[SourceMemo],
        replace: bool,
    ) -> Result<(), StateError>;

    /// Before a run applies its changes: records drawn evenly across the ones it will
    /// store, for a backend that compresses records to learn their shape from (the first
    /// records of a sorted source are not like the rest). A hint; the default ignores it.
    fn sample_records(&mut self, sample: &[Contact]) -> Result<(), StateError> {
        let _ = sample;
        Ok(())
    }
}

/// Changes sent and not yet confirmed, and how they settle.
pub trait PendingJournal: Send {
    /// Records a batch as sent.
    fn record_pending(
        &mut self,
        pipeline: &str,
        run: i64,
        batch_id: &str,
        rows: &[PendingRow],
    ) -> Result<(), StateError>;

    /// Batches left pending by earlier runs, oldest first, each with the rows recorded
    /// for it (in the batch's order).
    fn pending_batches(
        &mut self,
        pipeline: &str,
    ) -> Result<Vec<(PendingBatch, Vec<PendingRow>)>, StateError>;

    /// Settles pending changes of `batch_id` (one transaction).
    fn settle(
        &mut self,
        pipeline: &str,
        batch_id: &str,
        settlements: &[Settlement],
    ) -> Result<(), StateError>;

    /// Records a batch a sink that keeps nothing before it finishes has already taken:
    /// each row pending and applied, awaiting the finish, with the handle the sink gave
    /// it (`handles[i]` for `rows[i]`). The result is what [`PendingJournal::record_pending`]
    /// followed by [`Settlement::AwaitingFinish`] for every row leaves; the default
    /// takes exactly those two steps, and a backend that can write it at once overrides
    /// it. The rows are given, not lent: a backend may keep them until the confirm
    /// (SQLite hands them to a thread that compresses and stages them while the run
    /// goes on).
    fn record_awaiting_finish(
        &mut self,
        pipeline: &str,
        run: i64,
        batch_id: &str,
        rows: Vec<PendingRow>,
        handles: Vec<Option<String>>,
    ) -> Result<(), StateError> {
        self.record_pending(pipeline, run, batch_id, &rows)?;
        let settlements: Vec<Settlement> = rows
            .into_iter()
            .zip(handles)
            .map(|(row, handle)| Settlement::AwaitingFinish {
                key: row.key,
                handle,
            })
            .collect();
        self.settle(pipeline, batch_id, &settlements)
    }

    /// Moves every change of `run` marked applied-awaiting-finish into `synced`, and
    /// marks the run `confirmed` when there were any (see
    /// [`hold_confirm`](Self::hold_confirm)).
    fn confirm_finished(&mut self, pipeline: &str, run: i64) -> Result<u64, StateError>;

    /// Does the work of [`confirm_finished`](Self::confirm_finished) while the sink's
    /// finish is still under way, in one transaction left open: nothing of it is durable
    /// until [`commit_confirm`](Self::commit_confirm), called once the finish has
    /// succeeded; [`abandon_confirm`](Self::abandon_confirm) drops it when the finish
    /// fails. Until either, every write of this store (the sink's own key-value space
    /// among them) goes into that transaction and is committed or dropped with it.
    ///
    /// The run's status becomes `confirmed` in the same transaction, until its end
    /// records how it ended: a run killed once the commit is done still has its changes
    /// told as applied by [`history`](crate::history).
    ///
    /// Returns how many changes the commit will confirm, or `None` when the backend did
    /// not hold the confirm (too large to keep one transaction open for, or a backend
    /// that cannot): the caller then calls `confirm_finished` after the finish, as
    /// before. A caller that gets `Some` must commit or abandon before any other call.
    /// The default holds nothing.
    fn hold_confirm(&mut self, pipeline: &str, run: i64) -> Result<Option<u64>, StateError> {
        let _ = (pipeline, run);
        Ok(None)
    }

    /// Makes the confirm [`hold_confirm`](Self::hold_confirm) holds durable.
    fn commit_confirm(&mut self) -> Result<(), StateError> {
        Ok(())
    }

    /// Drops the confirm [`hold_confirm`](Self::hold_confirm) holds: the run's changes
    /// stay unconfirmed, as if it had never been done.
    fn abandon_confirm(&mut self) -> Result<(), StateError> {
        Ok(())
    }

    /// Drops every pending change of the pipeline.
    fn drop_pending(&mut self, pipeline: &str, batch_id: &str) -> Result<(), StateError>;
}

/// The key-value spaces lent to sinks.
pub trait SinkStores: Send {
    /// The sink's key-value space for config section `scope`.
    fn sink_store<'a>(&'a mut self, scope: &str) -> Box<dyn SinkStore + 'a>;
}

/// What each person was sent, kept for `history`.
pub trait AuditLog: Send {
    /// Keeps what the sink was asked to do to each person.
    fn record_audit(&mut self, entries: &[AuditEntry]) -> Result<(), StateError>;

    /// Keeps the creates of `run` that a sink durable at its finish takes whole
    /// ([`PendingJournal::record_awaiting_finish`]) as one history entry for the run,
    /// made at `at`, with each created record (`values`) or only its field names; each
    /// person created is marked with the run when [`PendingJournal::confirm_finished`]
    /// records them. [`AuditLog::history`] still tells each create as an entry of its
    /// own, from the person's last-sent record, and an update or removal of the person
    /// writes that entry out first ([`AuditLog::record_audit`]), before the record it
    /// was made from changes. A first sync so writes each person once.
    ///
    /// Returns `false` for a backend that keeps an entry a person: then the caller
    /// writes them.
    fn record_created_run(
        &mut self,
        pipeline: &str,
        run: i64,
        at: i64,
        values: bool,
    ) -> Result<bool, StateError> {
        let _ = (pipeline, run, at, values);
        Ok(false)
    }

    /// Forgets the audit of `pipeline` from before `before` (Unix seconds); returns how
    /// many entries went.
    fn prune_audit(&mut self, pipeline: &str, before: i64) -> Result<u64, StateError>;

    /// What happened to the person with this key (`external_id:E1`), bare key value, or
    /// email, oldest first.
    fn history(&mut self, who: &str) -> Result<Vec<AuditEntry>, StateError>;
}

/// Copying a whole state into another store (`state copy`).
pub trait StateTransfer: Send {
    /// Hands every item the store holds to `visit` (pipelines first), for a copy into
    /// another store. Pending changes and locks are not part of it.
    fn export(
        &mut self,
        visit: &mut dyn FnMut(StateItem) -> Result<(), StateError>,
    ) -> Result<(), StateError>;

    /// Writes items another store exported (in one transaction per call).
    fn import(&mut self, items: &[StateItem]) -> Result<(), StateError>;
}

/// The schedule slots that workers of `sync --all --worker` claim.
pub trait Slots: Send {
    /// Claims `pipeline` for the schedule slot `slot` (`2026-12-01`) on behalf of
    /// `worker` (`sync --all --worker`): `true` when this worker is to run it now
    /// (nobody claimed it, or the worker that did is gone before finishing); `false`
    /// when it already ran in this slot, or another live worker runs it.
    fn claim_slot(&mut self, slot: &str, pipeline: &str, worker: &str) -> Result<bool, StateError>;

    /// Records that `pipeline` ran in `slot`, and how it ended.
    fn finish_slot(&mut self, slot: &str, pipeline: &str, status: &str) -> Result<(), StateError>;
}

/// Hashes are stored as the bit pattern of a signed 64-bit integer (both backends'
/// integer type).
pub(crate) fn to_sql(hash: u64) -> i64 {
    hash as i64
}

/// The hash a stored integer holds.
pub(crate) fn from_sql(value: i64) -> u64 {
    value as u64
}

/// A stored record, decoded. One that cannot be read (written by a newer contactsync,
/// or damaged) counts as not known: the sink then behaves as it did before records
/// were kept, which is safe, and the next change stores a fresh one.
pub(crate) fn stored_record(key: &str, bytes: Option<&[u8]>) -> Option<Contact> {
    stored_record_with(key, bytes, crate::record::decode)
}

/// [`stored_record`] with a decoder of the backend's (one that knows its dictionaries).
pub(crate) fn stored_record_with(
    key: &str,
    bytes: Option<&[u8]>,
    decode: impl FnOnce(&[u8]) -> Result<Contact, String>,
) -> Option<Contact> {
    let bytes = bytes?;
    match decode(bytes) {
        Ok(contact) => Some(contact),
        Err(e) => {
            tracing::warn!(
                key,
                "the last-sent record is not readable, treated as unknown: {e}"
            );
            None
        }
    }
}

/// One stored pending row: batch id, key, kind, email, content hash, and the record,
/// decoded by the backend (which knows how it stored it).
pub(crate) type StoredPending = (String, String, String, Option<String>, i64, Option<Contact>);

/// Stored pending rows (ordered by run, batch and position) grouped into the batches
/// they were sent in, each with its rows.
pub(crate) fn group_pending(
    rows: Vec<StoredPending>,
    parse_key: impl Fn(&str) -> Result<ContactKey, StateError>,
    unknown_kind: impl Fn(&str) -> StateError,
) -> Result<Vec<(PendingBatch, Vec<PendingRow>)>, StateError> {
    let mut batches: Vec<(PendingBatch, Vec<PendingRow>)> = Vec::new();
    for (batch_id, key_text, kind, email, content_hash, record) in rows {
        let key = parse_key(&key_text)?;
        let kind = match kind.as_str() {
            "create" => ChangeKind::Create,
            "update" => ChangeKind::Update,
            "remove" => ChangeKind::Remove,
            other => return Err(unknown_kind(other)),
        };
        if batches.last().is_none_or(|(b, _)| b.id != batch_id) {
            batches.push((
                PendingBatch {
                    id: batch_id.clone(),
                    records: Vec::new(),
                },
                Vec::new(),
            ));
        }
        if let Some((batch, rows)) = batches.last_mut() {
            batch.records.push(PendingRecord {
                key: key.clone(),
                kind,
                email: email.clone(),
            });
            rows.push(PendingRow {
                key,
                kind,
                content_hash: from_sql(content_hash),
                email,
                record,
            });
        }
    }
    Ok(batches)
}

/// A stored synced row's columns: key, content hash, email, handle, record.
pub(crate) type StoredSynced = (String, i64, Option<String>, Option<String>, Option<Vec<u8>>);

/// A synced row from its stored columns.
pub(crate) fn synced_row(
    (key, content_hash, email, handle, record): StoredSynced,
    parse_key: impl Fn(&str) -> Result<ContactKey, StateError>,
    read_record: impl FnOnce(&str, Option<&[u8]>) -> Option<Contact>,
) -> Result<SyncedRow, StateError> {
    Ok(SyncedRow {
        entry: SyncedEntry {
            content_hash: from_sql(content_hash),
            email,
            handle,
            record: read_record(&key, record.as_deref()).map(Box::new),
        },
        key: parse_key(&key)?,
    })
}

/// Fewer rows than this, confirmed into `synced`, go into its email index row by row
/// in either backend; a confirm of this many or more into a `synced` that holds fewer (a
/// first sync) drops the index and builds it again after them, which costs a fifth of
/// taking a million random email hashes one at a time. Below it, dropping and building
/// the index is not worth it.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) const REBUILD_EMAIL_INDEX_ROWS: i64 = 10_000;

/// The audit's columns, in the order of [`StoredAudit`].
pub(crate) const AUDIT_COLUMNS: &str =
    "pipeline, run, at, key, email, kind, outcome, reason, fields, created";

/// A stored audit row's columns ([`AUDIT_COLUMNS`]).
pub(crate) type StoredAudit = (
    String,
    i64,
    i64,
    String,
    Option<String>,
    String,
    String,
    Option<String>,
    String,
    Option<Vec<u8>>,
);

/// An audit entry from its stored columns, `fields` as stored.
pub(crate) fn audit_entry(
    (pipeline, run, at, key, email, kind, outcome, reason, fields, created): StoredAudit,
    read_record: impl FnOnce(&str, Option<&[u8]>) -> Option<Contact>,
) -> AuditEntry {
    AuditEntry {
        created: read_record(&key, created.as_deref()).map(Box::new),
        pipeline,
        run,
        at,
        key,
        email,
        kind,
        outcome,
        reason,
        fields,
    }
}

/// The history entry of one person created by a run that keeps its creates as one
/// entry ([`AuditLog::record_created_run`]): the entry a person would have had, built
/// from their row in `synced` (the record the create sent, as nothing has changed it
/// since: a change writes this entry out first). `sent`, as every change of a sink
/// durable at its finish, for [`history`] to settle from the run's status.
pub(crate) fn created_entry(
    pipeline: String,
    run: i64,
    at: i64,
    values: bool,
    row: SyncedRow,
) -> AuditEntry {
    let record = row.entry.record;
    let fields = match (&record, values) {
        (Some(_), true) => String::new(),
        (Some(record), false) => {
            let names: Vec<String> = Contact::field_changes(None, record)
                .into_iter()
                .map(|c| c.field.to_string())
                .collect();
            serde_json::Value::from(names).to_string()
        }
        (None, _) => "[]".to_string(),
    };
    AuditEntry {
        pipeline,
        run,
        at,
        key: row.key.to_string(),
        email: row.entry.email,
        kind: ChangeKind::Create.as_str().to_string(),
        outcome: "sent".into(),
        reason: None,
        fields,
        created: record.filter(|_| values),
    }
}

/// A person's history from the entries stored one a change (`stored`, oldest first) and
/// those told from the runs that keep their creates as one entry (`created`): oldest
/// first, a stored entry before a told one of the same second (a told create is the
/// person's latest change in its pipeline, or it would have been written out).
///
/// A create of such a run is written out before the person's first change after it,
/// and told from their synced row until that change is recorded as synced; a change
/// that never lands writes it out again the next night. The same create (pipeline,
/// run, key) is told once: by its first entry.
pub(crate) fn merge_history(
    mut stored: Vec<AuditEntry>,
    created: Vec<AuditEntry>,
) -> Vec<AuditEntry> {
    let create = ChangeKind::Create.as_str();
    let mut told = std::collections::HashSet::new();
    stored.retain(|e| e.kind != create || told.insert((e.pipeline.clone(), e.run, e.key.clone())));
    if created.is_empty() {
        return stored;
    }
    stored.extend(
        created
            .into_iter()
            .filter(|e| !told.contains(&(e.pipeline.clone(), e.run, e.key.clone()))),
    );
    // Stable: ties keep the stored entries first.
    stored.sort_by_key(|e| e.at);
    stored
}

/// For `history`: a create whose record was kept shows every field it set, from it.
pub(crate) fn with_created_fields(mut entry: AuditEntry) -> AuditEntry {
    if let Some(contact) = &entry.created {
        let map: serde_json::Map<String, serde_json::Value> = Contact::field_changes(None, contact)
            .into_iter()
            .map(|c| (c.field.to_string(), serde_json::json!([c.before, c.after])))
            .collect();
        entry.fields = serde_json::Value::Object(map).to_string();
    }
    entry
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(pipeline: &str, run: i64) -> AuditEntry {
        AuditEntry {
            pipeline: pipeline.into(),
            run,
            at: 0,
            key: "external_id:E1".into(),
            email: Some("ann@example.com".into()),
            kind: "update".into(),
            outcome: "sent".into(),
            reason: None,
            fields: "[]".into(),
            created: None,
        }
    }

    #[test]
    fn a_sent_change_is_applied_only_when_its_run_made_it_durable() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = SqliteState::open(&dir.path().join("state.db")).unwrap();
        let (killed, _) = state.begin_run("hr->out").unwrap();
        state.record_audit(&[sent("hr->out", killed)]).unwrap();
        let (failed, _) = state.begin_run("hr->out").unwrap();
        state.record_audit(&[sent("hr->out", failed)]).unwrap();
        state
            .finish_run("hr->out", failed, "failed", "{}", None, false)
            .unwrap();
        let (synced, _) = state.begin_run("hr->out").unwrap();
        state.record_audit(&[sent("hr->out", synced)]).unwrap();
        state
            .finish_run("hr->out", synced, "synced", "{}", None, false)
            .unwrap();
        let entries = history(&mut state, "ann@example.com").unwrap();
        let outcomes: Vec<(&str, Option<&str>)> = entries
            .iter()
            .map(|e| (e.outcome.as_str(), e.reason.as_deref()))
            .collect();
        assert_eq!(outcomes.len(), 3, "{outcomes:?}");
        assert_eq!(outcomes[0].0, "sent, not confirmed");
        assert!(
            outcomes[0].1.is_some_and(|r| r.contains("killed")),
            "{outcomes:?}"
        );
        assert_eq!(outcomes[1].0, "sent, not confirmed");
        assert!(
            outcomes[1].1.is_some_and(|r| r.contains("failed")),
            "{outcomes:?}"
        );
        assert_eq!(outcomes[2], ("applied", None));
    }
}
