//! Who holds which address: the one place the rule "an address another person holds is
//! never the target of a removal or an old-address row" lives.
//!
//! A sink that finds people by email ([`contactsync_core::SinkCapabilities::addresses_by_email`])
//! removes a person by their address. When that address now belongs to someone else
//! (C left, B joined with C's old address; or one person's key changed form, from
//! external id to email), a removal sent by address would deactivate, unsubscribe or
//! delete the person who holds it now. So, for such sinks, the engine keeps every
//! address of the run's read (each with the key that holds it), and before each batch
//! goes out:
//! - a removal whose address another key holds is settled without a call: the person
//!   it names is gone from the source, the address is someone else's (the report counts
//!   it as `address_taken`, the history says by whom);
//! - an update whose old address another key holds is handed to the sink without that
//!   old address ([`Change::forget_previous_email`]), so the sink does not remove it.

use std::collections::HashMap;

use contactsync_core::{Change, ChangeBatch, ChangeKind, ContactKey};
use nohash_hasher::BuildNoHashHasher;

/// The run's addresses: email hash → (key hash of its holder, line it was read on,
/// 0 when the source has no lines).
#[derive(Debug, Default)]
pub(crate) struct AddressBook {
    holders: HashMap<u64, (u64, u64), BuildNoHashHasher<u64>>,
    /// The addresses of records rejected with a known key: still present, so still
    /// theirs, but no reason to refuse a later record the same address.
    rejected: HashMap<u64, (u64, u64), BuildNoHashHasher<u64>>,
}

/// A batch after the address rule: what the sink is handed, and what was settled
/// without a call.
pub(crate) struct Screened {
    /// The changes for the sink, in batch order; `None` when nothing was changed or
    /// left out (the batch goes as it is).
    pub sent: Option<ChangeBatch>,
    /// Per change of the original batch: `Some(why)` when it is settled without a call.
    pub taken: Vec<Option<String>>,
}

impl AddressBook {
    /// The hash under which an email is compared with the others: the platforms match
    /// addresses without regard to case.
    pub fn email_hash(email: &str) -> u64 {
        ContactKey::Email(email.trim().to_lowercase()).hash64()
    }

    /// Notes that the record keyed `key_hash`, read on `line`, holds `email`. Returns the
    /// first holder when another key holds it already (the first one keeps it).
    pub fn hold(&mut self, email: &str, key_hash: u64, line: u64) -> Option<(u64, u64)> {
        let held = *self
            .holders
            .entry(Self::email_hash(email))
            .or_insert((key_hash, line));
        (held.0 != key_hash).then_some(held)
    }

    /// Notes that a rejected record keyed `key_hash` (still present) holds `email`.
    pub fn hold_rejected(&mut self, email: &str, key_hash: u64, line: u64) {
        self.rejected
            .entry(Self::email_hash(email))
            .or_insert((key_hash, line));
    }

    /// Who else holds `email`: `Some(description)` when a key other than `key_hash`
    /// does.
    fn other_holder(&self, email: &str, key_hash: u64) -> Option<String> {
        let hash = Self::email_hash(email);
        let (holder, line) = self
            .holders
            .get(&hash)
            .filter(|(holder, _)| *holder != key_hash)
            .or_else(|| self.rejected.get(&hash))
            .copied()?;
        (holder != key_hash).then(|| {
            if line > 0 {
                format!("the record on line {line}")
            } else {
                "another record of this run".to_string()
            }
        })
    }

    /// Applies the rule to `batch` (see the module's documentation).
    pub fn screen(&self, batch: &ChangeBatch) -> Screened {
        let mut taken = vec![None; batch.changes.len()];
        let mut forget = vec![false; batch.changes.len()];
        for (i, change) in batch.changes.iter().enumerate() {
            let key_hash = change.key().hash64();
            match change.kind() {
                ChangeKind::Remove => {
                    if let Some(email) = change.email() {
                        taken[i] = self.other_holder(email, key_hash).map(|by| {
                            format!(
                                "address taken: {email} now belongs to {by}; the removal is settled without a call, so that it does not reach them"
                            )
                        });
                    }
                }
                ChangeKind::Update => {
                    if let Some(old) = change.previous_email() {
                        forget[i] = self.other_holder(old, key_hash).is_some();
                    }
                }
                ChangeKind::Create => {}
            }
        }
        if !taken.iter().any(Option::is_some) && !forget.contains(&true) {
            return Screened { sent: None, taken };
        }
        let changes: Vec<Change> = batch
            .changes
            .iter()
            .zip(&taken)
            .zip(&forget)
            .filter(|((_, taken), _)| taken.is_none())
            .map(|((change, _), forget)| {
                let mut change = change.clone();
                if *forget {
                    tracing::info!(key = %change.key(), "the old address is now someone else's; it is not removed");
                    change.forget_previous_email();
                }
                change
            })
            .collect();
        Screened {
            sent: Some(ChangeBatch {
                id: batch.id.clone(),
                changes,
            }),
            taken,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use contactsync_core::{Contact, Origin, SyncedEntry};

    fn contact(id: &str, email: &str) -> Contact {
        Contact {
            external_id: Some(id.into()),
            email: Some(email.into()),
            ..Contact::default()
        }
    }

    fn entry(email: &str, id: &str) -> SyncedEntry {
        SyncedEntry {
            email: Some(email.into()),
            record: Some(Box::new(contact(id, email))),
            ..SyncedEntry::default()
        }
    }

    #[test]
    fn a_removal_of_an_address_someone_else_holds_is_settled_and_an_old_address_forgotten() {
        let mut book = AddressBook::default();
        let b = ContactKey::ExternalId("E2".into());
        assert_eq!(book.hold("X@example.com", b.hash64(), 3), None);
        let c = ContactKey::ExternalId("E1".into());
        let d = ContactKey::ExternalId("E4".into());
        let batch = ChangeBatch {
            id: "b1".into(),
            changes: vec![
                Change::Remove {
                    key: c.clone(),
                    previous: entry("x@example.com", "E1"),
                    origin: Origin::Derived,
                },
                Change::Update {
                    key: d.clone(),
                    contact: contact("E4", "new@example.com"),
                    origin: Origin::Derived,
                    previous: entry("x@EXAMPLE.com", "E4"),
                },
                Change::Remove {
                    key: ContactKey::ExternalId("E3".into()),
                    previous: entry("gone@example.com", "E3"),
                    origin: Origin::Derived,
                },
            ],
        };
        let screened = book.screen(&batch);
        assert!(screened.taken[0]
            .as_deref()
            .is_some_and(|why| why.contains("line 3")));
        assert_eq!(screened.taken[1], None);
        assert_eq!(screened.taken[2], None);
        let sent = screened.sent.expect("changed");
        assert_eq!(sent.changes.len(), 2);
        assert_eq!(sent.changes[0].key(), &d);
        assert_eq!(sent.changes[0].previous_email(), None);
        // The original keeps its old address (for the plan and the history).
        assert_eq!(batch.changes[1].previous_email(), Some("x@EXAMPLE.com"));
        assert_eq!(sent.changes[1].kind(), ChangeKind::Remove);
    }

    #[test]
    fn a_person_holding_their_own_address_is_removed_as_usual() {
        let mut book = AddressBook::default();
        let c = ContactKey::ExternalId("E1".into());
        book.hold("x@example.com", c.hash64(), 0);
        assert_eq!(book.hold("x@example.com", c.hash64(), 0), None);
        let batch = ChangeBatch {
            id: "b1".into(),
            changes: vec![Change::Remove {
                key: c,
                previous: entry("x@example.com", "E1"),
                origin: Origin::Derived,
            }],
        };
        let screened = book.screen(&batch);
        assert!(screened.sent.is_none());
        assert!(screened.taken.iter().all(Option::is_none));
    }
}
