//! The compact per-contact index a run diffs against: key hash → content hash, plus
//! whether the key was seen in this run. About 25 bytes a contact, so a million
//! contacts fit in a few tens of megabytes, and no key or record is held in memory.
//! Mark and sweep: every key read is marked; keys in the state left unmarked after a
//! complete read are the removals.

use std::collections::HashMap;

use nohash_hasher::BuildNoHashHasher;

const IN_STATE: u8 = 1;
const SEEN: u8 = 2;

#[derive(Debug, Clone, Copy)]
struct Slot {
    synced_hash: u64,
    flags: u8,
}

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

/// Key hashes are already uniformly distributed: hashing them again is wasted work.
#[derive(Default)]
pub(crate) struct ContactIndex {
    slots: HashMap<u64, Slot, BuildNoHashHasher<u64>>,
    population: u64,
}

impl ContactIndex {
    /// The index of the state's contacts (key hash, content hash), sized for them at
    /// once: growing a table of a million by doubling moves every entry some twenty
    /// times over.
    pub(crate) fn of_synced(synced: Vec<(u64, u64)>) -> Self {
        let mut index = ContactIndex {
            // Room for this run's new keys too (marked as they are read).
            slots: HashMap::with_capacity_and_hasher(
                synced.len() + synced.len() / 32,
                BuildNoHashHasher::default(),
            ),
            population: 0,
        };
        for (key_hash, content_hash) in synced {
            index.insert_synced(key_hash, content_hash);
        }
        index
    }

    /// Adds a contact of the state.
    pub(crate) fn insert_synced(&mut self, key_hash: u64, content_hash: u64) {
        self.slots.insert(
            key_hash,
            Slot {
                synced_hash: content_hash,
                flags: IN_STATE,
            },
        );
        self.population += 1;
    }

    /// Contacts in the state when the run started.
    pub(crate) fn population(&self) -> u64 {
        self.population
    }

    /// Marks `key_hash` as read in this run and says what it was.
    pub(crate) fn mark(&mut self, key_hash: u64) -> Seen {
        match self.slots.get_mut(&key_hash) {
            Some(slot) if slot.flags & SEEN != 0 => Seen::Duplicate,
            Some(slot) => {
                slot.flags |= SEEN;
                if slot.flags & IN_STATE != 0 {
                    Seen::Synced(slot.synced_hash)
                } else {
                    Seen::New
                }
            }
            None => {
                self.slots.insert(
                    key_hash,
                    Slot {
                        synced_hash: 0,
                        flags: SEEN,
                    },
                );
                Seen::New
            }
        }
    }

    /// Key hashes in the state that this run did not read.
    pub(crate) fn unseen(&self) -> impl Iterator<Item = u64> + '_ {
        self.slots
            .iter()
            .filter(|(_, s)| s.flags & IN_STATE != 0 && s.flags & SEEN == 0)
            .map(|(k, _)| *k)
    }
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
}
