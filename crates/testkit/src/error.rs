//! What a failed conformance check reports: which check, and what differed.

use std::fmt;

use contactsync_core::{ConnectorError, Outcome};

use crate::Difference;

/// The checks of the conformance suites, by the name a failure reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// `check()` of the connector.
    ConnectorCheck,
    /// A full read of the source holds exactly the expected contacts.
    FullRead,
    /// A second full read of the unchanged source gives the same contacts.
    StableRead,
    /// Creating contacts through the sink.
    Create,
    /// Re-applying the same create batch changes nothing.
    ReapplyCreate,
    /// Updating contacts through the sink.
    Update,
    /// Removing contacts through the sink.
    Remove,
    /// Re-applying the same removal batch changes nothing.
    ReapplyRemove,
    /// Records the sink must refuse come back as rejected.
    Reject,
    /// The suite's own inputs (no mutable field to update, too few contacts).
    Setup,
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Check::ConnectorCheck => "connector check",
            Check::FullRead => "full read",
            Check::StableRead => "stable read (second full read)",
            Check::Create => "create",
            Check::ReapplyCreate => "re-apply create batch (idempotence)",
            Check::Update => "update",
            Check::Remove => "remove",
            Check::ReapplyRemove => "re-apply remove batch (idempotence)",
            Check::Reject => "reject unacceptable records",
            Check::Setup => "conformance setup",
        })
    }
}

/// Why a connector failed conformance. Every variant names the [`Check`] that failed.
#[derive(Debug, thiserror::Error)]
pub enum ConformanceError {
    /// The connector returned an error where it should have worked.
    #[error("{check}: {call} failed: {source}")]
    Connector {
        /// The check.
        check: Check,
        /// The call (`read`, `apply conformance-1`).
        call: String,
        /// The connector's error.
        #[source]
        source: ConnectorError,
    },
    /// A full read said it was not complete.
    #[error("{check}: the read ended with complete = false")]
    Incomplete {
        /// The check.
        check: Check,
    },
    /// The source rejected records it should have read.
    #[error("{check}: the source rejected {count} record(s); first: {first}")]
    SourceRejected {
        /// The check.
        check: Check,
        /// How many.
        count: usize,
        /// The first rejection, as the engine would report it.
        first: String,
    },
    /// A source record claims an origin it was not read from.
    #[error(
        "{check}: record {key} has the origin Derived; a source must say where it read each record"
    )]
    DerivedOrigin {
        /// The check.
        check: Check,
        /// Who.
        key: String,
    },
    /// A source marked a record deleted though it says it does not report deletions.
    #[error("{check}: record {key} is marked deleted but the source's capabilities say reports_deletions = false")]
    UnexpectedDeletion {
        /// The check.
        check: Check,
        /// Who.
        key: String,
    },
    /// What was read differs from what was expected.
    #[error("{check}: {} difference(s): {}", differences.len(), DifferenceList(differences))]
    Mismatch {
        /// The check.
        check: Check,
        /// Every difference found.
        differences: Vec<Difference>,
    },
    /// A sink returned a different number of outcomes than the batch had changes.
    #[error(
        "{check}: batch {batch} had {expected} change(s) but the sink returned {actual} outcome(s)"
    )]
    OutcomeCount {
        /// The check.
        check: Check,
        /// The batch id.
        batch: String,
        /// Changes in the batch.
        expected: usize,
        /// Outcomes returned.
        actual: usize,
    },
    /// A sink returned the wrong kind of outcome for a change.
    #[error("{check}: batch {batch}, change {index} ({key}): expected {expected}, got {actual:?}")]
    WrongOutcome {
        /// The check.
        check: Check,
        /// The batch id.
        batch: String,
        /// The change's position in the batch, 0-based.
        index: usize,
        /// Who.
        key: String,
        /// What was expected (`applied`, `rejected`).
        expected: &'static str,
        /// What the sink said.
        actual: Outcome,
    },
    /// The suite cannot run as configured.
    #[error("conformance setup: {0}")]
    Setup(String),
}

impl ConformanceError {
    /// The check that failed.
    pub fn check(&self) -> Check {
        match self {
            ConformanceError::Connector { check, .. }
            | ConformanceError::Incomplete { check }
            | ConformanceError::SourceRejected { check, .. }
            | ConformanceError::DerivedOrigin { check, .. }
            | ConformanceError::UnexpectedDeletion { check, .. }
            | ConformanceError::Mismatch { check, .. }
            | ConformanceError::OutcomeCount { check, .. }
            | ConformanceError::WrongOutcome { check, .. } => *check,
            ConformanceError::Setup(_) => Check::Setup,
        }
    }

    /// A connector error during `check`, in `call`.
    pub(crate) fn connector(
        check: Check,
        call: impl Into<String>,
    ) -> impl FnOnce(ConnectorError) -> Self {
        let call = call.into();
        move |source| ConformanceError::Connector {
            check,
            call,
            source,
        }
    }
}

/// Lists differences in an error message, at most ten, so that a connector that loses
/// everything still gets a readable message.
struct DifferenceList<'a>(&'a [Difference]);

impl fmt::Display for DifferenceList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 10;
        for (i, d) in self.0.iter().take(SHOWN).enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{d}")?;
        }
        if self.0.len() > SHOWN {
            write!(f, "; and {} more", self.0.len() - SHOWN)?;
        }
        Ok(())
    }
}
