//! What a reader of the state sees beyond a run's own work, for `contactsync serve`:
//! the records each run rejected (kept with the run for `audit_days`), the run locks
//! held now, and runs a page at a time.

use crate::{LockHolder, RunRecord, StateError};

/// One record a run rejected, as the dashboard lists it: where, whose, and why; never
/// the record itself (that stays in the run's rejects file).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RejectRow {
    /// Where it was refused: `source`, `validation` or `sink`.
    pub stage: String,
    /// Where it was read (`people.csv:12`, `query:3`).
    pub origin: String,
    /// Its key, when known (`external_id:E1`).
    pub key: Option<String>,
    /// Its email, when known.
    pub email: Option<String>,
    /// The field at fault, when known.
    pub field: Option<String>,
    /// Why.
    pub reason: String,
}

/// The most rejects kept with one run: a run that rejects more (a broken export) keeps
/// its first ones here, and its rejects file has them all.
pub const KEPT_REJECTS: usize = 100_000;

/// The records each run rejected, kept with the run.
pub trait RejectLog: Send {
    /// Keeps `rows`, rejected by `run` at `at` (Unix seconds), after those already
    /// kept for it, in order. Pruned with the audit ([`crate::AuditLog::prune_audit`]).
    fn record_rejects(
        &mut self,
        pipeline: &str,
        run: i64,
        at: i64,
        rows: &[RejectRow],
    ) -> Result<(), StateError>;

    /// The rejects of `run` from position `offset` (0-based, in the order they were
    /// rejected), at most `limit`.
    fn rejects(
        &mut self,
        pipeline: &str,
        run: i64,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<RejectRow>, StateError>;
}

/// A run lock as it is held now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldLock {
    /// The lock's name (`pipeline:hr->poppulo`, `sink:sinks.poppulo`).
    pub name: String,
    /// Who holds it.
    pub holder: LockHolder,
    /// Whether its holder is certainly alive (SQLite: its heartbeat is recent and its
    /// process exists; PostgreSQL: its session holds the advisory lock). A lock left by
    /// a holder that died is shown, and taken over by the next run.
    pub live: bool,
}

/// Runs and locks as a reader pages through them.
pub trait Views: Send {
    /// The pipelines the state knows, by name: what [`crate::RunLog::summaries`] lists,
    /// without counting each one's people (a reader of a page wants no work that grows
    /// with them).
    fn pipelines(&mut self) -> Result<Vec<String>, StateError>;

    /// Runs of `pipeline`, newest first, numbered below `before` (all when `None`), at
    /// most `limit`.
    fn run_page(
        &mut self,
        pipeline: &str,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<RunRecord>, StateError>;

    /// The run locks recorded now, by name.
    fn held_locks(&mut self) -> Result<Vec<HeldLock>, StateError>;
}
