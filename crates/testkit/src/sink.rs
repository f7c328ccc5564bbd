//! Sink conformance: changes written through a sink are what a source reads back from
//! the same system, re-sending is harmless, and refusals are reported, not swallowed.
//!
//! The harness plays the engine: for each step it calls `begin`, `apply` for each batch
//! (no longer than the sink's `max_batch`) and `finish`, then reads the system back and
//! compares only the people it wrote, so it also runs against a live instance that holds
//! other data.

use std::collections::{BTreeSet, HashMap};

use contactsync_core::{
    Change, ChangeBatch, ChangePlan, Contact, ContactKey, ContactStatus, Field, KeyRule, Origin,
    Outcome, ReadMode, RemovalStyle, Sink, Source, SyncedEntry,
};

use crate::compare::{compare_contacts, identity};
use crate::{
    default_round_trip_fields, read_all, sample_contacts, Check, ConformanceError, Difference,
    MemoryStore,
};

/// The fields the update step may change, in order of preference: plain text that every
/// platform stores as given.
const UPDATABLE: [Field; 6] = [
    Field::FirstName,
    Field::LastName,
    Field::JobTitle,
    Field::Department,
    Field::Company,
    Field::DisplayName,
];

/// The conformance suite for a sink, with the source that reads the same system back.
///
/// Steps, each a separate run (`begin`, `apply`…, `finish`) with batch ids
/// `conformance-1`, `conformance-2`, …:
/// 1. **create** every one of [`contacts`](Self::contacts), with the
///    [`unacceptable`](Self::unacceptable) records interleaved: each contact's outcome
///    must be `Applied`, each unacceptable one's `Rejected` (not `Applied`, not
///    `Unknown`), one outcome per change in order; the readback holds each contact once
///    with the same [`round_trip_fields`](Self::round_trip_fields), and no unacceptable
///    record;
/// 2. **re-apply** the same batches: all outcomes as before, readback unchanged, no
///    duplicates;
/// 3. **update** a third of the contacts (one round-tripped text field gets
///    ` (updated)`): `Applied`, and the readback shows the change and nothing else;
/// 4. **remove** the last contact (two when there are four or more): per the sink's
///    [`RemovalStyle`], `Delete` ⇒ absent from the readback; `MarkInactive`, `OptOut`,
///    `Unsubscribe` ⇒ absent or present with a status other than active; `Unsupported`
///    ⇒ the outcome is `Rejected` and the readback unchanged. The other contacts are
///    untouched;
/// 5. **re-apply** the removal: still `Applied`, readback as after step 4.
///
/// The readback is matched by key ([`KeyRule::Auto`]: external id, else email) and
/// restricted to the keys of `contacts`, so other people in the system do not matter.
///
/// ```no_run
/// # async fn demo(sink: Box<dyn contactsync_core::Sink>, readback: Box<dyn contactsync_core::Source>) {
/// use contactsync_core::{Contact, Field};
/// use contactsync_testkit::SinkConformance;
///
/// SinkConformance::new(sink, readback)
///     // This platform drops phone numbers:
///     .with_round_trip_fields(vec![Field::ExternalId, Field::Email, Field::FirstName])
///     // ...and refuses a person without an email:
///     .with_unacceptable(vec![Contact { external_id: Some("NO-MAIL".into()), ..Contact::default() }])
///     .run()
///     .await
///     .unwrap();
/// # }
/// ```
pub struct SinkConformance {
    /// The sink under test.
    pub sink: Box<dyn Sink>,
    /// A source reading back the system the sink writes to (for CSV: a CSV source on the
    /// same file; for a platform: its source connector on the same account).
    pub readback: Box<dyn Source>,
    /// The fields the platform stores and gives back as written; only these are
    /// compared. Default: [`default_round_trip_fields`].
    pub round_trip_fields: Vec<Field>,
    /// The people to write; at least three, each with a key. Default:
    /// [`sample_contacts`]`(6)`.
    pub contacts: Vec<Contact>,
    /// Records the sink must refuse (`Outcome::Rejected`). Empty by default, which is
    /// right only for a sink that truly accepts any record: give at least one whenever
    /// the platform refuses something (no email, an invalid attribute), so that the
    /// rejection path is tested.
    pub unacceptable: Vec<Contact>,
    /// The store lent to the sink; inspect it after [`run`](Self::run).
    pub store: MemoryStore,
}

/// What one change is expected to come back as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Applied,
    Rejected,
}

impl SinkConformance {
    /// The suite with default fields, [`sample_contacts`]`(6)` and no unacceptable
    /// records.
    pub fn new(sink: Box<dyn Sink>, readback: Box<dyn Source>) -> Self {
        SinkConformance {
            sink,
            readback,
            round_trip_fields: default_round_trip_fields(),
            contacts: sample_contacts(6),
            unacceptable: Vec::new(),
            store: MemoryStore::new(),
        }
    }

    /// Sets [`round_trip_fields`](Self::round_trip_fields).
    pub fn with_round_trip_fields(mut self, fields: Vec<Field>) -> Self {
        self.round_trip_fields = fields;
        self
    }

    /// Sets [`contacts`](Self::contacts).
    pub fn with_contacts(mut self, contacts: Vec<Contact>) -> Self {
        self.contacts = contacts;
        self
    }

    /// Sets [`unacceptable`](Self::unacceptable).
    pub fn with_unacceptable(mut self, unacceptable: Vec<Contact>) -> Self {
        self.unacceptable = unacceptable;
        self
    }

    /// Runs every step; the first failed check is the error.
    pub async fn run(&mut self) -> Result<(), ConformanceError> {
        if self.contacts.len() < 3 {
            return Err(ConformanceError::Setup(format!(
                "need at least 3 contacts (one to update, one to remove, one untouched), got {}",
                self.contacts.len()
            )));
        }
        let mut keys = Vec::with_capacity(self.contacts.len());
        for contact in &self.contacts {
            let key = contact.key(KeyRule::Auto).ok_or_else(|| {
                ConformanceError::Setup(format!(
                    "contact {contact:?} has neither external id nor email"
                ))
            })?;
            keys.push(key);
        }
        if BTreeSet::from_iter(&keys).len() != keys.len() {
            return Err(ConformanceError::Setup(
                "two contacts have the same key".into(),
            ));
        }
        self.sink
            .check()
            .await
            .map_err(ConformanceError::connector(Check::ConnectorCheck, "check"))?;
        let mut batch_number = 0;

        // 1. Create, with the unacceptable records interleaved so that outcome order shows.
        let mut changes = Vec::new();
        let mut expect = Vec::new();
        let mut unacceptable = self.unacceptable.iter().enumerate();
        for (i, (contact, key)) in self.contacts.iter().zip(&keys).enumerate() {
            changes.push(Change::Create {
                key: key.clone(),
                contact: contact.clone(),
                origin: Origin::line("conformance", i as u64 + 1),
            });
            expect.push(Expect::Applied);
            if let Some((j, bad)) = unacceptable.next() {
                changes.push(unacceptable_create(j, bad));
                expect.push(Expect::Rejected);
            }
        }
        for (j, bad) in unacceptable {
            changes.push(unacceptable_create(j, bad));
            expect.push(Expect::Rejected);
        }
        let create_batches = self.batches(&mut batch_number, changes);
        let outcomes = self
            .run_step(Check::Create, &create_batches, &expect)
            .await?;
        let mut handles: HashMap<ContactKey, Option<String>> = HashMap::new();
        for (change, outcome) in create_batches
            .iter()
            .flat_map(|b| &b.changes)
            .zip(&outcomes)
        {
            if let Outcome::Applied { handle } = outcome {
                handles.insert(change.key().clone(), handle.clone());
            }
        }
        let mut population = self.contacts.clone();
        self.verify(Check::Create, &population, &[], &keys).await?;
        self.verify_unacceptable_absent().await?;

        // 2. The engine re-sends a batch whose outcome it never recorded.
        self.run_step(Check::ReapplyCreate, &create_batches, &expect)
            .await?;
        self.verify(Check::ReapplyCreate, &population, &[], &keys)
            .await?;

        // 3. Update a third of the people.
        let field = UPDATABLE
            .iter()
            .chain(self.round_trip_fields.iter().filter(|f| matches!(f, Field::Attribute(_))))
            .find(|f| self.round_trip_fields.contains(f))
            .cloned()
            .ok_or_else(|| {
                ConformanceError::Setup(format!(
                    "no round-tripped field to update: round_trip_fields must include one of {} or an attribute",
                    UPDATABLE.iter().map(|f| f.name()).collect::<Vec<_>>().join(", ")
                ))
            })?;
        let updated_count = population.len().div_ceil(3);
        let mut changes = Vec::new();
        for (i, contact) in population.iter_mut().take(updated_count).enumerate() {
            let previous = self.synced(contact, &handles, &keys[i]);
            let value = format!("{} (updated)", contact.get(&field).unwrap_or_default());
            contact
                .set(&field, &value)
                .map_err(|e| ConformanceError::Setup(format!("cannot update {field}: {e}")))?;
            changes.push(Change::Update {
                key: keys[i].clone(),
                contact: contact.clone(),
                origin: Origin::line("conformance", i as u64 + 1),
                previous,
            });
        }
        let update_batches = self.batches(&mut batch_number, changes);
        self.run_step(
            Check::Update,
            &update_batches,
            &vec![Expect::Applied; updated_count],
        )
        .await?;
        self.verify(Check::Update, &population, &[], &keys).await?;

        // 4. Remove the last one or two.
        let removed_count = if population.len() >= 4 { 2 } else { 1 };
        let kept_count = population.len() - removed_count;
        let removed: Vec<Contact> = population.split_off(kept_count);
        let changes = removed
            .iter()
            .zip(&keys[kept_count..])
            .map(|(contact, key)| Change::Remove {
                key: key.clone(),
                previous: self.synced(contact, &handles, key),
                origin: Origin::Derived,
            })
            .collect();
        let style = self.sink.capabilities().removal;
        let (expected_outcome, expected_population) = if style == RemovalStyle::Unsupported {
            let mut all = population.clone();
            all.extend(removed.iter().cloned());
            (Expect::Rejected, all)
        } else {
            (Expect::Applied, population.clone())
        };
        let removed = if style == RemovalStyle::Unsupported {
            Vec::new()
        } else {
            removed
        };
        let remove_batches = self.batches(&mut batch_number, changes);
        let expect = vec![expected_outcome; removed_count];
        self.run_step(Check::Remove, &remove_batches, &expect)
            .await?;
        self.verify(Check::Remove, &expected_population, &removed, &keys)
            .await?;

        // 5. A removal re-sent is still a removal.
        self.run_step(Check::ReapplyRemove, &remove_batches, &expect)
            .await?;
        self.verify(Check::ReapplyRemove, &expected_population, &removed, &keys)
            .await?;
        tracing::debug!("sink conformance passed");
        Ok(())
    }

    /// What the engine would remember of `contact` as last accepted.
    fn synced(
        &self,
        contact: &Contact,
        handles: &HashMap<ContactKey, Option<String>>,
        key: &ContactKey,
    ) -> SyncedEntry {
        SyncedEntry {
            content_hash: contact.content_hash(),
            email: contact.email.clone(),
            handle: handles.get(key).cloned().flatten(),
            record: Some(Box::new(contact.clone())),
        }
    }

    /// Splits `changes` into batches of at most the sink's `max_batch`, numbered on from
    /// `batch_number`.
    fn batches(&self, batch_number: &mut usize, changes: Vec<Change>) -> Vec<ChangeBatch> {
        let size = self.sink.capabilities().max_batch.max(1);
        changes
            .chunks(size)
            .map(|chunk| {
                *batch_number += 1;
                ChangeBatch {
                    id: format!("conformance-{batch_number}"),
                    changes: chunk.to_vec(),
                }
            })
            .collect()
    }

    /// One run, as the engine drives it: `begin`, `apply` each batch, `finish`; checks
    /// each outcome against `expect` (one per change, in order) and returns them.
    async fn run_step(
        &mut self,
        check: Check,
        batches: &[ChangeBatch],
        expect: &[Expect],
    ) -> Result<Vec<Outcome>, ConformanceError> {
        let mut plan = ChangePlan::default();
        for change in batches.iter().flat_map(|b| &b.changes) {
            match change {
                Change::Create { .. } => plan.creates += 1,
                Change::Update { .. } => plan.updates += 1,
                Change::Remove { .. } => plan.removals += 1,
            }
        }
        let mut ctx = self.store.context();
        self.sink
            .begin(&plan, &mut ctx)
            .await
            .map_err(ConformanceError::connector(check, "begin"))?;
        let mut expect = expect.iter();
        let mut all = Vec::new();
        for batch in batches {
            let outcomes =
                self.sink
                    .apply(batch, &mut ctx)
                    .await
                    .map_err(ConformanceError::connector(
                        check,
                        format!("apply {}", batch.id),
                    ))?;
            if outcomes.len() != batch.changes.len() {
                return Err(ConformanceError::OutcomeCount {
                    check,
                    batch: batch.id.clone(),
                    expected: batch.changes.len(),
                    actual: outcomes.len(),
                });
            }
            for (index, (change, outcome)) in batch.changes.iter().zip(&outcomes).enumerate() {
                let wanted = expect.next().copied().unwrap_or(Expect::Applied);
                let ok = match wanted {
                    Expect::Applied => matches!(outcome, Outcome::Applied { .. }),
                    Expect::Rejected => matches!(outcome, Outcome::Rejected { .. }),
                };
                if !ok {
                    let is_unacceptable = wanted == Expect::Rejected
                        && change.kind() != contactsync_core::ChangeKind::Remove;
                    return Err(ConformanceError::WrongOutcome {
                        check: if is_unacceptable {
                            Check::Reject
                        } else {
                            check
                        },
                        batch: batch.id.clone(),
                        index,
                        key: change.key().to_string(),
                        expected: match wanted {
                            Expect::Applied => "applied",
                            Expect::Rejected => "rejected",
                        },
                        actual: outcome.clone(),
                    });
                }
            }
            all.extend(outcomes);
        }
        self.sink
            .finish(&mut ctx)
            .await
            .map_err(ConformanceError::connector(check, "finish"))?;
        Ok(all)
    }

    /// Reads the system back and checks that, among the people with `keys`, `present`
    /// are there exactly once with the round-tripped fields as given, and each of
    /// `removed` is gone, or (for a marking removal style) not active.
    async fn verify(
        &self,
        check: Check,
        present: &[Contact],
        removed: &[Contact],
        keys: &[ContactKey],
    ) -> Result<(), ConformanceError> {
        let ours: BTreeSet<String> = keys.iter().map(|k| k.to_string()).collect();
        let removed_ids: BTreeSet<String> = removed.iter().map(identity).collect();
        let read = self.read_back(check).await?;
        let mut kept = Vec::new();
        let mut found_removed: HashMap<String, Vec<Contact>> = HashMap::new();
        for contact in read.into_iter().filter(|c| ours.contains(&identity(c))) {
            let id = identity(&contact);
            if removed_ids.contains(&id) {
                found_removed.entry(id).or_default().push(contact);
            } else {
                kept.push(contact);
            }
        }
        let mut differences = compare_contacts(present, &kept, Some(&self.round_trip_fields));
        let style = self.sink.capabilities().removal;
        for (key, found) in found_removed {
            if found.len() > 1 {
                differences.push(Difference::Duplicate {
                    key: key.clone(),
                    count: found.len(),
                });
            }
            match style {
                RemovalStyle::Delete | RemovalStyle::Unsupported => {
                    differences.push(Difference::Present { key })
                }
                RemovalStyle::MarkInactive | RemovalStyle::OptOut | RemovalStyle::Unsubscribe => {
                    if found.iter().any(|c| c.status == ContactStatus::Active) {
                        differences.push(Difference::StillActive { key });
                    }
                }
            }
        }
        if differences.is_empty() {
            Ok(())
        } else {
            Err(ConformanceError::Mismatch { check, differences })
        }
    }

    /// Checks that no unacceptable record made it into the system.
    async fn verify_unacceptable_absent(&self) -> Result<(), ConformanceError> {
        if self.unacceptable.is_empty() {
            return Ok(());
        }
        let read = self.read_back(Check::Reject).await?;
        let differences: Vec<Difference> = self
            .unacceptable
            .iter()
            .enumerate()
            .filter(|(j, bad)| {
                let key = unacceptable_key(*j, bad);
                read.iter().any(|c| {
                    c.content_hash() == bad.content_hash()
                        || c.key(KeyRule::Auto).as_ref() == Some(&key)
                })
            })
            .map(|(j, bad)| Difference::Present {
                key: unacceptable_key(j, bad).to_string(),
            })
            .collect();
        if differences.is_empty() {
            Ok(())
        } else {
            Err(ConformanceError::Mismatch {
                check: Check::Reject,
                differences,
            })
        }
    }

    /// A complete full read of the readback source (present records only).
    async fn read_back(&self, check: Check) -> Result<Vec<Contact>, ConformanceError> {
        let read = read_all(self.readback.as_ref(), ReadMode::Full)
            .await
            .map_err(ConformanceError::connector(check, "readback read"))?;
        if !read.outcome.complete {
            return Err(ConformanceError::Incomplete { check });
        }
        for rejected in &read.rejected {
            tracing::warn!(%check, "readback rejected a record: {rejected}");
        }
        Ok(read.contacts())
    }
}

/// The key an unacceptable record is sent under: its own, or a made-up external id when
/// it has none (the engine never sends a keyless record, but a sink must still refuse
/// what it cannot write).
fn unacceptable_key(index: usize, contact: &Contact) -> ContactKey {
    contact.key(KeyRule::Auto).unwrap_or_else(|| {
        ContactKey::ExternalId(format!("conformance-unacceptable-{}", index + 1))
    })
}

fn unacceptable_create(index: usize, contact: &Contact) -> Change {
    Change::Create {
        key: unacceptable_key(index, contact),
        contact: contact.clone(),
        origin: Origin::line("conformance-unacceptable", index as u64 + 1),
    }
}
