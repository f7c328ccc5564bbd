//! A mapped pipeline's memo of what its records as read became ([`SourceMemo`]): read
//! before the source is, so that the source can skip the rows that did not change as
//! it does for a pipeline that sends records as read, and appended to as the diff goes.

use std::sync::Arc;

use super::*;
use crate::index::KnownAsRead;
use crate::state::SourceMemo;

/// Entries written at once: a first sync's memo is written as the diff goes, not held.
const MEMO_CHUNK: usize = 65_536;

/// The memo entries a run has still to write.
pub(super) struct MemoWriter {
    fingerprint: u64,
    entries: Vec<SourceMemo>,
    /// The next write replaces the whole memo: a first sync's, or one that compacts
    /// a memo grown with entries that no longer count.
    replace: bool,
}

impl MemoWriter {
    /// The writer of a run whose state holds `population` people.
    pub(super) fn new(fingerprint: u64, population: u64) -> Self {
        MemoWriter {
            fingerprint,
            entries: Vec::new(),
            replace: population == 0,
        }
    }

    /// Keeps that the record read as `source_hash` became `content_hash`; `true` when
    /// enough are kept to write them.
    pub(super) fn keep(&mut self, key_hash: u64, source_hash: u64, content_hash: u64) -> bool {
        self.entries.push(SourceMemo {
            key_hash,
            source_hash,
            tag: memo_tag(content_hash, self.fingerprint),
        });
        self.entries.len() >= MEMO_CHUNK
    }
}

/// The tag of an entry whose record became `content_hash` in a pipeline whose mapping
/// has `fingerprint` ([`Pipeline::mapping_fingerprint`]): an entry made under another
/// mapping names another content hash, and is ignored.
fn memo_tag(content_hash: u64, fingerprint: u64) -> u64 {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&content_hash.to_le_bytes());
    bytes[8..].copy_from_slice(&fingerprint.to_le_bytes());
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

impl<'r> Run<'r> {
    /// The state's people by the content hash of their records as read, from the
    /// pipeline's memo. A memo that holds a quarter more entries than people (changed,
    /// stale, gone) is compacted: `writer` starts with the entries that count, and
    /// replaces the memo with them and the run's own.
    pub(super) fn known_as_read(
        &mut self,
        index: &mut ContactIndex,
        fingerprint: u64,
        writer: Option<&mut MemoWriter>,
    ) -> Result<Arc<KnownAsRead>, RunError> {
        let (state, name) = (&mut *self.state, &self.pipeline.name);
        let (known, entries) = index.known_as_read(
            |visit| state.scan_source_memo(name, visit),
            |content_hash| memo_tag(content_hash, fingerprint),
        )?;
        let population = index.population();
        tracing::debug!(pipeline = %name, entries, population, "source memo read");
        if let Some(writer) = writer.filter(|_| entries > population + population / 4) {
            writer.replace = true;
            writer.entries = index
                .known_entries()
                .map(|(key_hash, source_hash, content_hash)| SourceMemo {
                    key_hash,
                    source_hash,
                    tag: memo_tag(content_hash, fingerprint),
                })
                .collect();
        }
        Ok(Arc::new(known))
    }

    /// Writes the entries kept so far.
    pub(super) fn write_memo(&mut self, writer: &mut MemoWriter) -> Result<(), RunError> {
        if writer.entries.is_empty() && !writer.replace {
            return Ok(());
        }
        let started = std::time::Instant::now();
        // In key order, as the index is: the next read looks them up in one pass.
        writer.entries.sort_by_key(|e| e.key_hash);
        self.state
            .record_source_memo(&self.pipeline.name, &writer.entries, writer.replace)?;
        tracing::debug!(
            pipeline = %self.pipeline.name,
            entries = writer.entries.len(),
            replaced = writer.replace,
            seconds = started.elapsed().as_secs_f64(),
            "source memo written"
        );
        writer.entries.clear();
        writer.replace = false;
        Ok(())
    }
}
