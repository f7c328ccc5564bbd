//! The testkit tested against a tiny in-memory system, including broken connectors
//! that the checks must catch.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use contactsync_core::{
    async_trait, Change, ChangeBatch, ConnectorError, Contact, ContactKey, ContactStatus, KeyRule,
    Origin, Outcome, ReadMode, ReadOutcome, RecordStream, RemovalStyle, Sink, SinkCapabilities,
    SinkContext, Source, SourceItem, SourceRecord,
};

use crate::*;

/// The "platform": people by key.
type System = Arc<Mutex<BTreeMap<ContactKey, Contact>>>;

/// What a [`MemorySink`] gets wrong on purpose.
#[derive(Clone, Copy, PartialEq)]
enum Fault {
    None,
    /// Says Applied for the second create but never stores it.
    DropsSecondCreate,
    /// Accepts records without email.
    AcceptsAnything,
    /// Marks removals but leaves the status active.
    MarkDoesNothing,
    /// Returns outcomes in reverse order.
    ReversesOutcomes,
}

struct MemorySink {
    system: System,
    removal: RemovalStyle,
    fault: Fault,
}

#[async_trait]
impl Sink for MemorySink {
    fn capabilities(&self) -> SinkCapabilities {
        SinkCapabilities {
            addresses_by_email: false,
            mixes_removals: false,
            max_batch: 4,
            asynchronous_jobs: false,
            durable_at_finish: false,
            removal: self.removal,
        }
    }

    async fn check(&mut self) -> Result<(), ConnectorError> {
        Ok(())
    }

    async fn apply(
        &mut self,
        batch: &ChangeBatch,
        _ctx: &mut SinkContext<'_>,
    ) -> Result<Vec<Outcome>, ConnectorError> {
        let mut system = self.system.lock().unwrap();
        let mut outcomes = Vec::new();
        for (i, change) in batch.changes.iter().enumerate() {
            match change {
                Change::Create { key, contact, .. } | Change::Update { key, contact, .. } => {
                    if contact.email.is_none() && self.fault != Fault::AcceptsAnything {
                        outcomes.push(Outcome::rejected("email is required"));
                        continue;
                    }
                    if !(self.fault == Fault::DropsSecondCreate && i == 1) {
                        system.insert(key.clone(), contact.clone());
                    }
                }
                Change::Remove { key, .. } => match self.removal {
                    RemovalStyle::Delete => {
                        system.remove(key);
                    }
                    RemovalStyle::Unsupported => {
                        outcomes.push(Outcome::rejected("cannot remove"));
                        continue;
                    }
                    _ if self.fault == Fault::MarkDoesNothing => {}
                    _ => {
                        if let Some(c) = system.get_mut(key) {
                            c.status = ContactStatus::Inactive;
                        }
                    }
                },
            }
            outcomes.push(Outcome::applied());
        }
        if self.fault == Fault::ReversesOutcomes {
            outcomes.reverse();
        }
        Ok(outcomes)
    }
}

struct MemorySource {
    system: System,
    derived_origin: bool,
    complete: bool,
}

struct MemoryStream(std::vec::IntoIter<SourceItem>, bool);

#[async_trait]
impl RecordStream for MemoryStream {
    async fn next(&mut self) -> Result<Option<SourceItem>, ConnectorError> {
        Ok(self.0.next())
    }
    async fn finish(self: Box<Self>) -> Result<ReadOutcome, ConnectorError> {
        Ok(ReadOutcome {
            complete: self.1,
            cursor: None,
        })
    }
}

#[async_trait]
impl Source for MemorySource {
    async fn check(&self) -> Result<(), ConnectorError> {
        Ok(())
    }
    async fn read(&self, _mode: ReadMode) -> Result<Box<dyn RecordStream>, ConnectorError> {
        let items: Vec<SourceItem> = self
            .system
            .lock()
            .unwrap()
            .values()
            .enumerate()
            .map(|(i, c)| {
                let origin = if self.derived_origin {
                    Origin::Derived
                } else {
                    Origin::line("memory", i as u64 + 2)
                };
                SourceItem::Record(Box::new(SourceRecord::new(c.clone(), origin)))
            })
            .collect();
        Ok(Box::new(MemoryStream(items.into_iter(), self.complete)))
    }
}

fn system_of(contacts: &[Contact]) -> System {
    Arc::new(Mutex::new(
        contacts
            .iter()
            .map(|c| (c.key(KeyRule::Auto).unwrap(), c.clone()))
            .collect(),
    ))
}

fn source(system: &System) -> MemorySource {
    MemorySource {
        system: system.clone(),
        derived_origin: false,
        complete: true,
    }
}

fn suite(removal: RemovalStyle, fault: Fault) -> SinkConformance {
    let system = System::default();
    let sink = MemorySink {
        system: system.clone(),
        removal,
        fault,
    };
    SinkConformance::new(Box::new(sink), Box::new(source(&system))).with_unacceptable(vec![
        Contact {
            external_id: Some("NO-MAIL".into()),
            ..Contact::default()
        },
    ])
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

#[test]
fn a_correct_sink_passes_with_every_removal_style() {
    for removal in [
        RemovalStyle::Delete,
        RemovalStyle::MarkInactive,
        RemovalStyle::OptOut,
        RemovalStyle::Unsubscribe,
        RemovalStyle::Unsupported,
    ] {
        runtime()
            .block_on(suite(removal, Fault::None).run())
            .unwrap_or_else(|e| panic!("{removal}: {e}"));
    }
}

#[test]
fn a_sink_that_drops_a_record_fails_the_create_check() {
    let err = runtime()
        .block_on(suite(RemovalStyle::Delete, Fault::DropsSecondCreate).run())
        .unwrap_err();
    assert_eq!(err.check(), Check::Create, "{err}");
    match &err {
        ConformanceError::Mismatch { differences, .. } => {
            // Batches hold 4 changes: the second of each (contact 1, then the create
            // after the unacceptable one) is dropped.
            assert!(
                differences
                    .iter()
                    .all(|d| matches!(d, Difference::Missing { .. })),
                "{err}"
            );
            assert!(err.to_string().contains("is missing"), "{err}");
        }
        other => panic!("expected a mismatch, got {other}"),
    }
}

#[test]
fn a_sink_that_accepts_an_unacceptable_record_fails_the_reject_check() {
    let err = runtime()
        .block_on(suite(RemovalStyle::Delete, Fault::AcceptsAnything).run())
        .unwrap_err();
    assert_eq!(err.check(), Check::Reject, "{err}");
    assert!(
        matches!(
            err,
            ConformanceError::WrongOutcome {
                expected: "rejected",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn a_sink_whose_mark_leaves_people_active_fails_the_remove_check() {
    let err = runtime()
        .block_on(suite(RemovalStyle::MarkInactive, Fault::MarkDoesNothing).run())
        .unwrap_err();
    assert_eq!(err.check(), Check::Remove, "{err}");
    assert!(err.to_string().contains("still active"), "{err}");
}

#[test]
fn outcomes_out_of_order_are_caught() {
    let err = runtime()
        .block_on(suite(RemovalStyle::Delete, Fault::ReversesOutcomes).run())
        .unwrap_err();
    assert!(
        matches!(err, ConformanceError::WrongOutcome { .. }),
        "{err}"
    );
}

#[test]
fn too_few_contacts_is_a_setup_error() {
    let mut suite = suite(RemovalStyle::Delete, Fault::None).with_contacts(sample_contacts(2));
    let err = runtime().block_on(suite.run()).unwrap_err();
    assert_eq!(err.check(), Check::Setup);
}

#[test]
fn a_correct_source_passes() {
    let contacts = sample_contacts(5);
    let read = runtime()
        .block_on(source_conformance(
            &source(&system_of(&contacts)),
            &contacts,
        ))
        .unwrap();
    assert_eq!(read.records.len(), 5);
}

#[test]
fn a_source_missing_or_changing_a_record_fails() {
    let contacts = sample_contacts(5);
    let system = system_of(&contacts[..4]);
    let err = runtime()
        .block_on(source_conformance(&source(&system), &contacts))
        .unwrap_err();
    assert!(
        matches!(&err, ConformanceError::Mismatch { check: Check::FullRead, differences } if differences.len() == 1),
        "{err}"
    );

    let mut changed = contacts.clone();
    changed[2].department = Some("Other".into());
    let err = runtime()
        .block_on(source_conformance(&source(&system_of(&changed)), &contacts))
        .unwrap_err();
    assert!(err.to_string().contains("department"), "{err}");
}

#[test]
fn an_incomplete_or_derived_read_fails() {
    let contacts = sample_contacts(3);
    let mut incomplete = source(&system_of(&contacts));
    incomplete.complete = false;
    let err = runtime()
        .block_on(source_conformance(&incomplete, &contacts))
        .unwrap_err();
    assert!(matches!(err, ConformanceError::Incomplete { .. }), "{err}");

    let mut derived = source(&system_of(&contacts));
    derived.derived_origin = true;
    let err = runtime()
        .block_on(source_conformance(&derived, &contacts))
        .unwrap_err();
    assert!(
        matches!(err, ConformanceError::DerivedOrigin { .. }),
        "{err}"
    );
}

#[test]
fn memory_store_round_trips() {
    use contactsync_core::SinkStore;
    let mut store = MemoryStore::new();
    store.put("a", "1").unwrap();
    assert_eq!(store.get("a").unwrap().as_deref(), Some("1"));
    store.remove("a").unwrap();
    assert_eq!(store.get("a").unwrap(), None);
}
