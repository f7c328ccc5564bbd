//! Source conformance: a full read is complete, holds exactly the expected people, says
//! where each was read, and is the same when repeated (the engine's diff relies on it).

use contactsync_core::{
    ConnectorError, Contact, Origin, ReadMode, ReadOutcome, RecordError, RecordStream, Source,
    SourceItem, SourceRecord, Unchanged, UnchangedRow,
};

use crate::compare::{compare_contacts, identity};
use crate::{Check, ConformanceError};

/// Everything one read produced, kept in memory: for tests with small populations.
#[derive(Debug, Clone)]
pub struct SourceRead {
    /// The records, in the order read.
    pub records: Vec<SourceRecord>,
    /// The items the source rejected, in the order read.
    pub rejected: Vec<RecordError>,
    /// The records the source found unchanged, in the order read (only from
    /// [`read_all_skipping_unchanged`]).
    pub unchanged: Vec<UnchangedRow>,
    /// How the read ended.
    pub outcome: ReadOutcome,
}

impl SourceRead {
    /// The contacts of the records not marked deleted.
    pub fn contacts(&self) -> Vec<Contact> {
        self.records
            .iter()
            .filter(|r| !r.deleted)
            .map(|r| r.contact.clone())
            .collect()
    }
}

/// Reads `source` to the end in `mode`, as the engine does (`next` until `None`, then
/// `finish`), and collects every item.
pub async fn read_all(source: &dyn Source, mode: ReadMode) -> Result<SourceRead, ConnectorError> {
    collect(source.read(mode).await?).await
}

/// As [`read_all`], through [`Source::read_skipping_unchanged`].
pub async fn read_all_skipping_unchanged(
    source: &dyn Source,
    mode: ReadMode,
    unchanged: Unchanged,
) -> Result<SourceRead, ConnectorError> {
    collect(source.read_skipping_unchanged(mode, unchanged).await?).await
}

async fn collect(mut stream: Box<dyn RecordStream>) -> Result<SourceRead, ConnectorError> {
    let mut read = SourceRead {
        records: Vec::new(),
        rejected: Vec::new(),
        unchanged: Vec::new(),
        outcome: ReadOutcome::default(),
    };
    while let Some(item) = stream.next().await? {
        match item {
            SourceItem::Record(record) => read.records.push(*record),
            SourceItem::Rejected(error) => read.rejected.push(*error),
            SourceItem::Unchanged(row) => read.unchanged.push(row),
        }
    }
    read.outcome = stream.finish().await?;
    Ok(read)
}

/// Checks a source that holds exactly `expected` (in any order):
/// 1. `check()` succeeds;
/// 2. a [`ReadMode::Full`] read ends with `complete == true`, rejects nothing, gives
///    every record a non-[`Origin::Derived`] origin, marks none deleted unless the source
///    reports deletions, and yields each expected contact exactly once with the same
///    content ([`Contact::content_hash`]: `updated_at` is not compared), and nothing else;
/// 3. a second full read yields the same contacts again.
///
/// Returns the first read, for further assertions (origins, line numbers).
///
/// ```
/// # use contactsync_core::*;
/// # struct Fixed(Vec<Contact>);
/// # struct FixedStream(std::vec::IntoIter<Contact>, u64);
/// # #[async_trait]
/// # impl RecordStream for FixedStream {
/// #     async fn next(&mut self) -> Result<Option<SourceItem>, ConnectorError> {
/// #         self.1 += 1;
/// #         let line = self.1;
/// #         Ok(self.0.next().map(|c| SourceItem::Record(Box::new(SourceRecord::new(c, Origin::line("fixed", line))))))
/// #     }
/// #     async fn finish(self: Box<Self>) -> Result<ReadOutcome, ConnectorError> {
/// #         Ok(ReadOutcome { complete: true, cursor: None })
/// #     }
/// # }
/// # #[async_trait]
/// # impl Source for Fixed {
/// #     async fn check(&self) -> Result<(), ConnectorError> { Ok(()) }
/// #     async fn read(&self, _mode: ReadMode) -> Result<Box<dyn RecordStream>, ConnectorError> {
/// #         Ok(Box::new(FixedStream(self.0.clone().into_iter(), 0)))
/// #     }
/// # }
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use contactsync_testkit::{sample_contacts, source_conformance};
///
/// let contacts = sample_contacts(5);
/// let source = Fixed(contacts.clone()); // any Source holding exactly these people
/// source_conformance(&source, &contacts).await.unwrap();
/// # });
/// ```
pub async fn source_conformance(
    source: &dyn Source,
    expected: &[Contact],
) -> Result<SourceRead, ConformanceError> {
    source
        .check()
        .await
        .map_err(ConformanceError::connector(Check::ConnectorCheck, "check"))?;
    let first = checked_full_read(source, expected, Check::FullRead).await?;
    let again = checked_full_read(source, &first.contacts(), Check::StableRead).await?;
    tracing::debug!(records = again.records.len(), "source conformance passed");
    Ok(first)
}

/// One full read, checked against `expected` under the name `check`.
async fn checked_full_read(
    source: &dyn Source,
    expected: &[Contact],
    check: Check,
) -> Result<SourceRead, ConformanceError> {
    let read = read_all(source, ReadMode::Full)
        .await
        .map_err(ConformanceError::connector(check, "read"))?;
    if !read.outcome.complete {
        return Err(ConformanceError::Incomplete { check });
    }
    if let Some(first) = read.rejected.first() {
        return Err(ConformanceError::SourceRejected {
            check,
            count: read.rejected.len(),
            first: first.to_string(),
        });
    }
    let reports_deletions = source.capabilities().reports_deletions;
    for record in &read.records {
        if record.origin == Origin::Derived {
            return Err(ConformanceError::DerivedOrigin {
                check,
                key: identity(&record.contact),
            });
        }
        if record.deleted && !reports_deletions {
            return Err(ConformanceError::UnexpectedDeletion {
                check,
                key: identity(&record.contact),
            });
        }
    }
    let differences = compare_contacts(expected, &read.contacts(), None);
    if !differences.is_empty() {
        return Err(ConformanceError::Mismatch { check, differences });
    }
    Ok(read)
}
