//! The sync run: read → map → validate → diff against the state → apply → record.
//!
//! This crate knows no connector by name: it drives any [`contactsync_core::Source`]
//! into any [`contactsync_core::Sink`], and it is the only code that reads or writes
//! sync state, through [`state::StateStore`] (SQLite by default, [`state::SqliteState`];
//! PostgreSQL for many runners, [`state::PostgresState`]).
//!
//! Start reading at [`run`]. The shape of a run, its state and its crash safety are
//! described in the repository's `ARCHITECTURE.md`.

mod addresses;
mod index;
mod preview;
pub mod report;
mod run;
pub mod settings;
pub mod shaping;
mod spool;
/// The sync state: the `contactsync-state` crate.
pub use contactsync_state as state;

pub use preview::{preview, PreviewOutcome, PreviewRecord};
pub use report::{
    ChangeCounts, GuardVerdict, PlanError, PlannedChange, RejectStage, Rejection, RejectionSummary,
    RejectsWriter, RunReport, RunStatus,
};
pub use run::{run, Phase, Pipeline, RunObserver, RunOptions, SilentObserver};
pub use settings::{OutOfScope, PipelineSettings, SyncMode, DEFAULT_MAX_REMOVAL_RATIO};
pub use shaping::{Lookups, RecordShaping, ShapingError};
pub use state::{
    history, AuditEntry, LockAttempt, LockHolder, PostgresState, RunRecord, SqliteState,
    StateError, StateItem, StateLocation, StateStore,
};
