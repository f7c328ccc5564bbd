//! `contactsync check`'s look at a pipeline: the first records of its source through
//! the pipeline's mapping and scope, without touching the sink or the state.

use contactsync_core::{ConnectorError, Contact, Origin, ReadMode, Source, SourceItem};

use crate::run::Pipeline;
use crate::settings::FieldMapping;
use crate::shaping::Shaped;

/// What the pipeline makes of one record.
#[derive(Debug, Clone, PartialEq)]
pub enum PreviewOutcome {
    /// Synced as `after` (with the `on_create` values a new person would get).
    Sent {
        /// The record as the sink would get it.
        after: Box<Contact>,
    },
    /// Outside the pipeline's `where`.
    OutOfScope,
    /// Rejected: by the source or by the mapping, at `field` for `reason`.
    Rejected {
        /// The field at fault, when known.
        field: Option<String>,
        /// Why.
        reason: String,
    },
}

/// One record of a preview.
#[derive(Debug, Clone, PartialEq)]
pub struct PreviewRecord {
    /// Where it was read.
    pub origin: Origin,
    /// The record as the source read it (`None` when it could not be read).
    pub before: Option<Box<Contact>>,
    /// What the pipeline makes of it.
    pub outcome: PreviewOutcome,
}

/// Reads up to `limit` records of `source` and puts each through the pipeline's
/// mapping, scope and `on_create`.
pub async fn preview(
    pipeline: &Pipeline,
    source: &dyn Source,
    limit: usize,
) -> Result<Vec<PreviewRecord>, ConnectorError> {
    let mapping = FieldMapping::new(&pipeline.settings);
    let mut stream = source.read(ReadMode::Full).await?;
    let mut out = Vec::new();
    while out.len() < limit {
        let Some(item) = stream.next().await? else {
            break;
        };
        let record = match item {
            SourceItem::Rejected(error) => {
                out.push(PreviewRecord {
                    origin: error.origin,
                    before: error.partial,
                    outcome: PreviewOutcome::Rejected {
                        field: error.field,
                        reason: error.reason,
                    },
                });
                continue;
            }
            SourceItem::Record(record) => record,
            // Only a read that skips unchanged records yields these; this one does not.
            SourceItem::Unchanged(_) => continue,
        };
        let before = record.contact.clone();
        let mut contact = record.contact;
        let outcome = match mapping.apply(&mut contact) {
            Err((field, reason)) => PreviewOutcome::Rejected {
                field: Some(field),
                reason,
            },
            Ok(()) => match &pipeline.shaping {
                None => PreviewOutcome::Sent {
                    after: Box::new(contact),
                },
                // The same decision a run makes, then what a create would add.
                Some(shaping) => match shaping.scope_and_map(contact) {
                    Shaped::Out(_) => PreviewOutcome::OutOfScope,
                    Shaped::ScopeError(_, reason) => PreviewOutcome::Rejected {
                        field: Some("where".into()),
                        reason,
                    },
                    Shaped::MapError(failure) => PreviewOutcome::Rejected {
                        field: Some(failure.field),
                        reason: failure.reason,
                    },
                    Shaped::In(mapped) => match shaping.on_create(mapped) {
                        Ok(after) => PreviewOutcome::Sent {
                            after: Box::new(after),
                        },
                        Err(failure) => PreviewOutcome::Rejected {
                            field: Some(failure.field),
                            reason: failure.reason,
                        },
                    },
                },
            },
        };
        out.push(PreviewRecord {
            origin: record.origin,
            before: Some(Box::new(before)),
            outcome,
        });
    }
    Ok(out)
}
