//! The compact per-contact index a run diffs against: key hash → content hash, plus
//! whether the key was seen in this run. Mark and sweep: every key read is marked; keys
//! in the state left unmarked after a complete read are the removals.
//!
//! The state's people are one array of (key hash, content hash) sorted by key hash,
//! 16 bytes a person, with a directory over the hashes' top bits (about one byte a
//! person) and one bit a person for "seen". Key hashes are uniform, so a directory
//! bucket holds a few entries on one or two cache lines: a lookup costs what a hash
//! table's does, and ten million people take some 180 MB where a table of them (24
//! bytes an entry, sized to the next power of two, built beside the rows it was built
//! from) took over 600. Keys read that the state does not hold (a first sync's every
//! key) go to a set of their own.

use std::collections::HashSet;
use std::sync::Arc;

use contactsync_core::{KnownContent, KnownEntry};
use nohash_hasher::BuildNoHashHasher;

use crate::state::SourceMemo;

/// What the index says about a key read in this run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seen {
    /// Not in the state: a create.
    New,
    /// In the state with this content hash.
    Synced(u64),
    /// Already read earlier in this run.
    Duplicate,
}

/// The state's people as the diff looks them up: immutable, so that a source may look
/// them up too ([`KnownContent`]) while the diff marks who was seen.
#[derive(Default)]
pub(crate) struct SyncedHashes {
    /// (key hash, content hash) of the state's people, sorted by key hash.
    synced: Vec<(u64, u64)>,
    /// Where each bucket of key hashes (by their top `bits`) starts in `synced`; one
    /// entry more than there are buckets.
    starts: Vec<u32>,
    bits: u32,
}

impl SyncedHashes {
    /// Where `key_hash` is in `synced`.
    fn find(&self, key_hash: u64) -> Option<usize> {
        let bucket = bucket_of(key_hash, self.bits);
        let (from, to) = (
            *self.starts.get(bucket)? as usize,
            *self.starts.get(bucket + 1)? as usize,
        );
        let entries = self.synced.get(from..to)?;
        entries
            .iter()
            .position(|(k, _)| *k == key_hash)
            .map(|i| from + i)
    }

    /// Loads where each of `key_hashes` is ([`ContactIndex::warm`]): a short loop of
    /// independent loads, whose cache misses the processor overlaps. A bucket's first
    /// and last entries, since a bucket of a few 16-byte entries often spans two cache
    /// lines.
    fn touch(&self, key_hashes: impl Iterator<Item = u64>) {
        let mut touched = 0u64;
        for key_hash in key_hashes {
            let bucket = bucket_of(key_hash, self.bits);
            let (Some(&first), Some(&end)) = (self.starts.get(bucket), self.starts.get(bucket + 1))
            else {
                continue;
            };
            for at in [first as usize, (end as usize).saturating_sub(1)] {
                if let Some((k, _)) = self.synced.get(at) {
                    touched = touched.wrapping_add(*k);
                }
            }
        }
        std::hint::black_box(touched);
    }
}

impl KnownContent for SyncedHashes {
    fn content_hash(&self, key_hash: u64) -> Option<u64> {
        self.find(key_hash).map(|at| self.synced[at].1)
    }

    fn entry(&self, key_hash: u64) -> Option<KnownEntry> {
        let at = self.find(key_hash)?;
        Some(KnownEntry {
            content_hash: self.synced[at].1,
            at: u32::try_from(at).ok(),
        })
    }

    fn warm(&self, key_hashes: &[u64]) {
        self.touch(key_hashes.iter().copied());
    }
}

/// The state's people as a pipeline that maps its records can skip them: by the
/// content hash of each one's record as the source read it, where the pipeline's
/// [`SourceMemo`] says what that record became and the state still holds it.
///
/// It is the index's own array, with the source hash in place of each content hash (0
/// for none): the source and the diff touch the same cache lines, as they do for a
/// pipeline that compares records as read.
pub(crate) struct KnownAsRead(Arc<SyncedHashes>);

impl KnownContent for KnownAsRead {
    fn content_hash(&self, key_hash: u64) -> Option<u64> {
        self.0.content_hash(key_hash).filter(|&hash| hash != 0)
    }

    fn entry(&self, key_hash: u64) -> Option<KnownEntry> {
        self.0
            .entry(key_hash)
            .filter(|entry| entry.content_hash != 0)
    }

    fn warm(&self, key_hashes: &[u64]) {
        self.0.touch(key_hashes.iter().copied());
    }
}

/// The diff's index; see the module's documentation.
#[derive(Default)]
pub(crate) struct ContactIndex {
    hashes: Arc<SyncedHashes>,
    /// One bit a person of the state: read in this run.
    seen: Vec<u64>,
    /// The content hashes, at the places of `hashes`, once those hold the source
    /// hashes instead ([`ContactIndex::known_as_read`]).
    content: Option<Vec<u64>>,
    /// Key hashes read in this run that the state does not hold. Key hashes are already
    /// uniformly distributed: hashing them again is wasted work.
    new: HashSet<u64, BuildNoHashHasher<u64>>,
}

impl ContactIndex {
    /// The index of the state's contacts (key hash, content hash), in any order (a
    /// backend that gives them by key hash, as SQLite does, saves the sort).
    pub(crate) fn of_synced(mut synced: Vec<(u64, u64)>) -> Self {
        // SQLite orders the hashes as signed integers: the upper half of the range
        // first. Put it back in place rather than sort.
        let upper = synced.partition_point(|(k, _)| *k >= 1 << 63);
        synced.rotate_left(upper);
        if !synced.is_sorted_by_key(|(k, _)| *k) {
            synced.sort_unstable_by_key(|(k, _)| *k);
        }
        // About four people a bucket; at most 2^32 people (the starts are u32).
        let bits = (synced.len() / 4).max(1).ilog2().min(31);
        let buckets = 1usize << bits;
        let mut starts = Vec::with_capacity(buckets + 1);
        let mut at = 0usize;
        for bucket in 0..buckets {
            while at < synced.len() && bucket_of(synced[at].0, bits) < bucket {
                at += 1;
            }
            starts.push(at as u32);
        }
        starts.push(synced.len() as u32);
        let seen = vec![0u64; synced.len().div_ceil(64)];
        ContactIndex {
            hashes: Arc::new(SyncedHashes {
                synced,
                starts,
                bits,
            }),
            seen,
            content: None,
            new: HashSet::default(),
        }
    }

    /// How many contacts the state holds.
    pub(crate) fn population(&self) -> u64 {
        self.hashes.synced.len() as u64
    }

    /// The state's content hashes, to share with a source.
    pub(crate) fn known(&self) -> Arc<SyncedHashes> {
        Arc::clone(&self.hashes)
    }

    /// The state's people by the hashes of their records as read, from a pipeline's
    /// memo, which `scan` visits in the order it was recorded (a later entry of a key
    /// replaces an earlier one): an entry counts while the person's synced content hash
    /// is the one whose [`tag_of`](SourceMemo::tag) is the entry's tag. The index keeps
    /// the source hashes in its array from then on, and the content hashes beside it.
    /// Also returns how many entries the memo holds.
    pub(crate) fn known_as_read<E>(
        &mut self,
        scan: impl FnOnce(&mut dyn FnMut(SourceMemo)) -> Result<(), E>,
        tag_of: impl Fn(u64) -> u64,
    ) -> Result<(KnownAsRead, u64), E> {
        let hashes = &self.hashes;
        let content: Vec<u64> = hashes.synced.iter().map(|&(_, c)| c).collect();
        let mut source: Vec<(u64, u64)> = hashes.synced.iter().map(|&(k, _)| (k, 0)).collect();
        let mut entries = 0u64;
        scan(&mut |entry| {
            entries += 1;
            if let Some(at) = hashes.find(entry.key_hash) {
                source[at].1 = if tag_of(content[at]) == entry.tag {
                    entry.source_hash
                } else {
                    0
                };
            }
        })?;
        let (starts, bits) = (hashes.starts.clone(), hashes.bits);
        self.hashes = Arc::new(SyncedHashes {
            synced: source,
            starts,
            bits,
        });
        self.content = Some(content);
        Ok((KnownAsRead(Arc::clone(&self.hashes)), entries))
    }

    /// The memo entries that count, after [`ContactIndex::known_as_read`]: (key hash,
    /// source hash, content hash).
    pub(crate) fn known_entries(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        let content = self.content.as_deref().unwrap_or_default();
        self.hashes
            .synced
            .iter()
            .zip(content)
            .filter(|((_, source), _)| *source != 0)
            .map(|(&(key, source), &content)| (key, source, content))
    }

    /// Touches where each of `key_hashes` is in the index, so that the memory loads of
    /// a batch of records overlap instead of each record waiting for its own: the array
    /// is larger than the caches, and a nightly looks every person up.
    pub(crate) fn warm(&self, key_hashes: impl Iterator<Item = u64>) {
        self.hashes.touch(key_hashes);
    }

    /// Marks `key_hash` as read in this run and says what the state knows of it.
    pub(crate) fn mark(&mut self, key_hash: u64) -> Seen {
        match self.hashes.find(key_hash) {
            Some(at) => self.mark_held(at),
            None if self.new.insert(key_hash) => Seen::New,
            None => Seen::Duplicate,
        }
    }

    /// As [`ContactIndex::mark`], for a key a source found in the index's
    /// [`KnownContent`] at `at` ([`KnownEntry::at`]): one load instead of a lookup.
    /// A place that does not hold `key_hash` is not taken on trust; the key is looked
    /// up then.
    pub(crate) fn mark_at(&mut self, key_hash: u64, at: Option<u32>) -> Seen {
        let at = at.map(|at| at as usize);
        match at.filter(|&at| {
            self.hashes
                .synced
                .get(at)
                .is_some_and(|(k, _)| *k == key_hash)
        }) {
            Some(at) => self.mark_held(at),
            None => self.mark(key_hash),
        }
    }

    /// Marks the state's person at `at` as read.
    fn mark_held(&mut self, at: usize) -> Seen {
        let (word, bit) = (at / 64, 1u64 << (at % 64));
        if self.seen[word] & bit != 0 {
            Seen::Duplicate
        } else {
            self.seen[word] |= bit;
            let content = self.content.as_ref().map(|content| content[at]);
            Seen::Synced(content.unwrap_or(self.hashes.synced[at].1))
        }
    }

    /// Key hashes in the state that this run did not read.
    pub(crate) fn unseen(&self) -> impl Iterator<Item = u64> + '_ {
        self.hashes
            .synced
            .iter()
            .enumerate()
            .filter(|(at, _)| self.seen[at / 64] & (1u64 << (at % 64)) == 0)
            .map(|(_, (k, _))| *k)
    }
}

/// The directory bucket of a key hash: its top `bits` bits.
fn bucket_of(key_hash: u64, bits: u32) -> usize {
    // With no bits (a handful of people) there is one bucket.
    key_hash.checked_shr(64 - bits).unwrap_or(0) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_and_sweep() {
        let mut index = ContactIndex::of_synced(vec![(1, 10), (2, 20)]);
        assert_eq!(index.mark(1), Seen::Synced(10));
        assert_eq!(index.mark(1), Seen::Duplicate);
        assert_eq!(index.mark(3), Seen::New);
        assert_eq!(index.mark(3), Seen::Duplicate);
        assert_eq!(index.unseen().collect::<Vec<_>>(), vec![2]);
        assert_eq!(index.population(), 2);
    }

    /// A place a source hands back marks the person held there only when it holds the
    /// key read; any other place, or none, and the key is looked up.
    #[test]
    fn a_place_a_source_hands_back_is_checked_before_it_is_marked() {
        let mut index = ContactIndex::of_synced(vec![(1, 10), (2, 20), (3, 30)]);
        let known = index.known();
        let place = |key| known.entry(key).and_then(|entry| entry.at);
        assert_eq!(known.entry(2).map(|entry| entry.content_hash), Some(20));
        assert!(place(2).is_some());
        assert_eq!(index.mark_at(2, place(2)), Seen::Synced(20));
        assert_eq!(index.mark_at(2, place(2)), Seen::Duplicate);
        // Key 1's place for key 3: key 3 is marked, key 1 is not.
        assert_eq!(index.mark_at(3, place(1)), Seen::Synced(30));
        assert_eq!(index.unseen().collect::<Vec<_>>(), vec![1]);
        assert_eq!(index.mark_at(9, Some(0)), Seen::New);
        assert_eq!(index.mark_at(1, Some(99)), Seen::Synced(10));
        assert_eq!(index.mark_at(1, None), Seen::Duplicate);
        assert_eq!(index.unseen().count(), 0);
    }

    #[test]
    fn an_empty_state_knows_nobody() {
        let mut index = ContactIndex::of_synced(Vec::new());
        // Warming looks nothing up that is not there.
        index.warm([0, u64::MAX].into_iter());
        assert_eq!(index.population(), 0);
        assert_eq!(index.mark(u64::MAX), Seen::New);
        assert_eq!(index.mark(0), Seen::New);
        assert_eq!(index.mark(0), Seen::Duplicate);
        assert_eq!(index.unseen().count(), 0);
    }

    /// Hashes over the whole range, given in SQLite's order (as signed integers) or in
    /// none: every one is found with its content hash, every other key is new, and the
    /// sweep gives exactly those not read.
    #[test]
    fn every_state_key_is_found_whatever_the_order_it_came_in() {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut rows: Vec<(u64, u64)> = (0..50_000).map(|i| (next(), i)).collect();
        rows.extend([(0, 1), (u64::MAX, 2), (1 << 63, 3), ((1 << 63) - 1, 4)]);
        let mut signed = rows.clone();
        signed.sort_by_key(|(k, _)| *k as i64);
        let mut shuffled = rows.clone();
        shuffled.reverse();
        let known: HashSet<u64> = rows.iter().map(|(k, _)| *k).collect();
        for given in [signed, shuffled] {
            let mut index = ContactIndex::of_synced(given);
            assert_eq!(index.population(), rows.len() as u64);
            for (k, h) in rows.iter().step_by(2) {
                assert_eq!(index.mark(*k), Seen::Synced(*h));
            }
            for _ in 0..1000 {
                let other = next();
                if !known.contains(&other) {
                    assert_eq!(index.mark(other), Seen::New);
                }
            }
            let mut unseen: Vec<u64> = index.unseen().collect();
            let mut expected: Vec<u64> = rows.iter().skip(1).step_by(2).map(|(k, _)| *k).collect();
            unseen.sort_unstable();
            expected.sort_unstable();
            assert_eq!(unseen, expected);
        }
    }
}
