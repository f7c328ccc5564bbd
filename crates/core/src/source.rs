//! Reading people out of a system.
//!
//! A [`Source`] opens a [`RecordStream`]; the engine pulls records one at a time (so a
//! source never holds a population in memory), then calls [`RecordStream::finish`] to
//! learn whether the read was complete and where the next incremental read starts.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::{ConnectorError, Contact, Origin, RecordError};

/// How much to read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReadMode {
    /// Everything. A complete full read is the only read from which the engine infers
    /// removals by absence.
    Full,
    /// What changed since `cursor` (`None`: no cursor yet, so read everything, but it
    /// still counts as the start of an incremental series). Sources without incremental
    /// reads treat this as [`ReadMode::Full`] and say so through [`ReadOutcome::complete`].
    Incremental {
        /// The cursor a previous [`ReadOutcome`] returned.
        cursor: Option<String>,
    },
}

/// What a source can do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourceCapabilities {
    /// Whether [`ReadMode::Incremental`] reads only changes.
    pub incremental: bool,
    /// Whether the source reports deletions itself ([`SourceRecord::deleted`]).
    pub reports_deletions: bool,
    /// Every how many runs a full read is due when the pipeline sets no `full_every`:
    /// a source whose incremental reads cannot see deletions sets one, so that removals
    /// reach the sink (LDAP: 7, a week of nightly runs). `None`: only when asked.
    pub full_every: Option<u32>,
    /// Whether [`Source::read_skipping_unchanged`] skips anything (the CSV source): only
    /// then does a pipeline that maps its records keep the memo that lets it skip.
    pub skips_unchanged: bool,
}

/// One person as read, with where they were read.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceRecord {
    /// The person, mapped into the canonical shape.
    pub contact: Contact,
    /// Where the record was read.
    pub origin: Origin,
    /// The source says this person was deleted (Business Catalyst's `deleted=true`).
    /// The engine turns it into a removal whether or not the read is complete.
    pub deleted: bool,
}

impl SourceRecord {
    /// A present (not deleted) record.
    pub fn new(contact: Contact, origin: Origin) -> Self {
        SourceRecord {
            contact,
            origin,
            deleted: false,
        }
    }
}

/// One item of a read: a record, or a record the source could not map (a malformed
/// row, an invalid value). A rejected item is reported and written to the rejects
/// file; it never stops the read.
// Boxed, so that an item is a few words: items are moved through channels and batches
// several times on their way to the diff, and most of a nightly's are `Unchanged`.
#[derive(Debug, Clone)]
pub enum SourceItem {
    /// A record.
    Record(Box<SourceRecord>),
    /// A record that could not be read, with its origin and why.
    Rejected(Box<RecordError>),
    /// A record whose content is what the state holds for its key, so that no
    /// [`Contact`] was built for it. Only from [`Source::read_skipping_unchanged`].
    Unchanged(UnchangedRow),
}

/// A row of a file that [`Source::read_skipping_unchanged`] found unchanged: its key's
/// hash under the read's rule, and where it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnchangedRow {
    /// [`Contact::key_hash`] of the record under the rule [`Unchanged`] gave.
    pub key_hash: u64,
    /// The file as the user named it (shared by every row of a read).
    pub file: std::sync::Arc<str>,
    /// The line the row starts on, 1-based.
    pub line: u64,
    /// Where the [`KnownContent`] that found the row unchanged holds its key
    /// ([`KnownEntry::at`]), when it said: the engine marks the person read there
    /// instead of looking the key up again (and looks it up when that place holds
    /// another key).
    pub at: Option<u32>,
}

impl UnchangedRow {
    /// Where the row was read.
    pub fn origin(&self) -> Origin {
        Origin::line(self.file.as_ref(), self.line)
    }
}

/// A key [`KnownContent`] holds ([`KnownContent::entry`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownEntry {
    /// The content hash held for the key.
    pub content_hash: u64,
    /// Where the key is among the people held, when the [`KnownContent`] says: a place
    /// only it and the engine that made it read, carried by [`UnchangedRow::at`].
    pub at: Option<u32>,
}

/// What the state knows of the people a run diffs against: the content hash of each
/// one's record as the source last read it, by key hash ([`Contact::key_hash`] to
/// [`Contact::content_hash`]), for a source that can skip building the records that
/// did not change.
pub trait KnownContent: Send + Sync {
    /// The content hash the state holds for `key_hash`, `None` for a key it does not hold.
    fn content_hash(&self, key_hash: u64) -> Option<u64>;

    /// As [`KnownContent::content_hash`], with where the key is held, which a source
    /// hands back in [`UnchangedRow::at`]. The default says no place.
    fn entry(&self, key_hash: u64) -> Option<KnownEntry> {
        self.content_hash(key_hash).map(|content_hash| KnownEntry {
            content_hash,
            at: None,
        })
    }

    /// Brings where each of `key_hashes` is into the cache, so that the lookups of a
    /// batch of rows wait for memory together rather than one after another. A source
    /// calls it with a chunk's keys before it looks them up; it changes no answer.
    fn warm(&self, key_hashes: &[u64]) {
        let _ = key_hashes;
    }
}

/// What [`Source::read_skipping_unchanged`] compares records with.
#[derive(Clone)]
pub struct Unchanged {
    /// The state's content hashes.
    pub known: std::sync::Arc<dyn KnownContent>,
    /// The key rule of the pipeline.
    pub rule: crate::KeyRule,
}

impl std::fmt::Debug for Unchanged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unchanged")
            .field("rule", &self.rule)
            .finish_non_exhaustive()
    }
}

/// How a read ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadOutcome {
    /// Whether every person in scope was read. Only a complete read may produce
    /// removals by absence: an incremental read, or one that a source cut short, is not.
    pub complete: bool,
    /// Where the next incremental read should start; stored by the engine only after the
    /// whole run succeeded.
    pub cursor: Option<String>,
}

/// A read in progress.
#[async_trait]
pub trait RecordStream: Send {
    /// The next item, or `None` at the end. An `Err` ends the read: the engine stops the
    /// run without applying anything, so a broken read never looks like a short one.
    async fn next(&mut self) -> Result<Option<SourceItem>, ConnectorError>;

    /// Appends the next items to `into`, at most `max` of them; `Ok(false)` once the
    /// stream has ended (after what it appended). The engine reads through this. The
    /// default takes them from [`RecordStream::next`] one by one; a stream that receives
    /// its items in chunks hands them over together, saving a call an item. On an error,
    /// what was appended before it stays in `into`.
    async fn next_batch(
        &mut self,
        into: &mut Vec<SourceItem>,
        max: usize,
    ) -> Result<bool, ConnectorError> {
        for _ in 0..max {
            match self.next().await? {
                Some(item) => into.push(item),
                None => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Called once after `next` returned `None`: whether the read was complete, and the
    /// cursor for the next incremental read.
    async fn finish(self: Box<Self>) -> Result<ReadOutcome, ConnectorError>;
}

/// A system people are read from.
///
/// # Contract
/// - `read` streams: memory must not grow with the population.
/// - Records come with an [`Origin`] precise enough for a user to find the record.
/// - A record that cannot be mapped is yielded as [`SourceItem::Rejected`], never
///   dropped and never fatal.
/// - Reading the same unchanged system twice yields the same contacts (the engine's
///   diff depends on it), in any order.
///
/// # Example
/// ```
/// use contactsync_core::{
///     async_trait, Contact, ConnectorError, Origin, ReadMode, ReadOutcome, RecordStream,
///     Source, SourceItem, SourceRecord,
/// };
///
/// /// A source of people held in memory.
/// struct Fixed(Vec<Contact>);
///
/// struct FixedStream(std::vec::IntoIter<Contact>, u64);
///
/// #[async_trait]
/// impl RecordStream for FixedStream {
///     async fn next(&mut self) -> Result<Option<SourceItem>, ConnectorError> {
///         self.1 += 1;
///         let line = self.1;
///         Ok(self.0.next().map(|c| SourceItem::Record(Box::new(SourceRecord::new(c, Origin::line("fixed", line))))))
///     }
///     async fn finish(self: Box<Self>) -> Result<ReadOutcome, ConnectorError> {
///         Ok(ReadOutcome { complete: true, cursor: None })
///     }
/// }
///
/// #[async_trait]
/// impl Source for Fixed {
///     async fn check(&self) -> Result<(), ConnectorError> {
///         Ok(())
///     }
///     async fn read(&self, _mode: ReadMode) -> Result<Box<dyn RecordStream>, ConnectorError> {
///         Ok(Box::new(FixedStream(self.0.clone().into_iter(), 0)))
///     }
/// }
/// # let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
/// # rt.block_on(async {
/// let source = Fixed(vec![Contact { email: Some("ann@example.com".into()), ..Contact::default() }]);
/// let mut stream = source.read(ReadMode::Full).await?;
/// let mut n = 0;
/// while let Some(_item) = stream.next().await? { n += 1; }
/// assert_eq!(n, 1);
/// assert!(stream.finish().await?.complete);
/// # Ok::<(), ConnectorError>(())
/// # }).unwrap();
/// ```
#[async_trait]
pub trait Source: Send + Sync {
    /// What this source can do. The default, [`SourceCapabilities::default`], is the
    /// safe answer for a source that says nothing: full reads only, deletions not
    /// reported.
    fn capabilities(&self) -> SourceCapabilities {
        SourceCapabilities::default()
    }

    /// Opens the endpoint and checks credentials and configuration, changing nothing
    /// (`contactsync check`).
    async fn check(&self) -> Result<(), ConnectorError>;

    /// Starts a read.
    async fn read(&self, mode: ReadMode) -> Result<Box<dyn RecordStream>, ConnectorError>;

    /// Starts a read that may yield [`SourceItem::Unchanged`] for a record whose
    /// [`Contact::key_hash`] under `unchanged.rule` is known with the same
    /// [`Contact::content_hash`], and whose email (if any) is valid, without building
    /// its `Contact` (see [`ContactText`](crate::ContactText)). Every other record comes
    /// as [`Source::read`] gives it. The engine asks when it knows people by their
    /// records as read: by the state's content hashes for a pipeline that sends
    /// records as read, by its memo of what each record as read became for one that
    /// maps them, when [`SourceCapabilities::skips_unchanged`] says the source skips.
    /// The default reads as `read` does.
    async fn read_skipping_unchanged(
        &self,
        mode: ReadMode,
        unchanged: Unchanged,
    ) -> Result<Box<dyn RecordStream>, ConnectorError> {
        let _ = unchanged;
        self.read(mode).await
    }

    /// What [`Source::check`] found out about the system that a person choosing
    /// settings wants to see, for `contactsync check`; `None` (the default) when there
    /// is nothing to add.
    fn described(&self) -> Option<String> {
        None
    }

    /// The local files this source reads (a CSV export), so that the binary can refuse
    /// to write a report, rejects or plan file over one. Most sources have none.
    fn files(&self) -> Vec<std::path::PathBuf> {
        Vec::new()
    }
}

/// What a source's [`Source::check`] found, kept for [`Source::described`]: a source
/// checks through `&self`, so it keeps the sentence here.
#[derive(Debug, Default)]
pub struct CheckFindings(std::sync::Mutex<Option<String>>);

impl CheckFindings {
    /// Keeps what the last check found.
    pub fn set(&self, found: String) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(found);
    }

    /// What the last check found, if a check ran.
    pub fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The passes of a paged read over a list that changes under it: a pass in which
/// something moved may have skipped a record, so another pass follows for the records
/// no pass yielded yet, at most `max` in all; past that the read is not complete, and
/// no removal comes from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadPasses {
    current: u32,
    max: u32,
    used_up: bool,
}

impl ReadPasses {
    /// The first of at most `max` passes.
    pub fn new(max: u32) -> Self {
        ReadPasses {
            current: 1,
            max,
            used_up: false,
        }
    }

    /// The pass under way, from 1.
    pub fn current(&self) -> u32 {
        self.current
    }

    /// Whether no pass was refused: once the passes are used up while records still
    /// moved, the read is not complete.
    pub fn complete(&self) -> bool {
        !self.used_up
    }

    /// After a pass in which `what` (`Actito profiles`) moved: `true` when another
    /// pass begins; `false` when the passes are used up, and the read is not complete
    /// ([`ReadPasses::complete`]). Both are logged.
    pub fn another(&mut self, what: &str) -> bool {
        if self.current >= self.max {
            self.used_up = true;
            tracing::warn!(
                passes = self.current,
                "{what} kept changing while they were paged; the read is not complete, so no removal comes from it"
            );
            return false;
        }
        self.current += 1;
        tracing::info!(
            pass = self.current,
            "{what} moved while they were paged; reading them again for any one skipped"
        );
        true
    }
}

#[cfg(test)]
mod tests {
    use super::ReadPasses;

    #[test]
    fn passes_stop_at_the_most_allowed() {
        let mut passes = ReadPasses::new(3);
        assert_eq!(passes.current(), 1);
        assert!(passes.another("people"));
        assert!(passes.another("people"));
        assert_eq!(passes.current(), 3);
        assert!(passes.complete());
        assert!(!passes.another("people"), "a fourth pass is not made");
        assert_eq!(passes.current(), 3);
        assert!(!passes.complete());
    }
}
