//! A pipeline that maps its records skips the unchanged ones by its memo of what each
//! record as read became: only while the state holds what the entry says the record
//! became, under the same mapping.

use std::collections::HashMap;

use contactsync_core::{Unchanged, UnchangedRow};
use contactsync_engine::state::SourceMemo;

use super::*;

/// A list source that skips, as the CSV source does, each record whose hash as read the
/// engine says it knows; it keeps the keys it skipped.
struct SkippingSource {
    list: ListSource,
    skipped: Arc<Mutex<Vec<String>>>,
}

impl SkippingSource {
    fn of(people: &[Contact]) -> Self {
        SkippingSource {
            list: ListSource::of(people),
            skipped: Arc::default(),
        }
    }
    fn skipped(&self) -> Vec<String> {
        std::mem::take(&mut *self.skipped.lock().unwrap())
    }
}

#[async_trait]
impl Source for SkippingSource {
    fn capabilities(&self) -> SourceCapabilities {
        SourceCapabilities {
            skips_unchanged: true,
            ..self.list.capabilities()
        }
    }
    async fn check(&self) -> Result<(), ConnectorError> {
        Ok(())
    }
    async fn read(&self, mode: ReadMode) -> Result<Box<dyn RecordStream>, ConnectorError> {
        self.list.read(mode).await
    }
    async fn read_skipping_unchanged(
        &self,
        _mode: ReadMode,
        unchanged: Unchanged,
    ) -> Result<Box<dyn RecordStream>, ConnectorError> {
        let mut skipped = self.skipped.lock().unwrap();
        let items = self.list.items.iter().enumerate().map(|(i, item)| {
            let SourceItem::Record(record) = item else {
                return item.clone();
            };
            let contact = &record.contact;
            let Some(key_hash) = contact.key_hash(unchanged.rule) else {
                return item.clone();
            };
            if unchanged.known.content_hash(key_hash) != Some(contact.content_hash()) {
                return item.clone();
            }
            skipped.push(contact.external_id.clone().unwrap_or_default());
            SourceItem::Unchanged(UnchangedRow {
                key_hash,
                file: Arc::from("people.csv"),
                line: i as u64 + 2,
                at: None,
            })
        });
        Ok(Box::new(ListStream(
            items.collect::<Vec<_>>().into_iter(),
            true,
        )))
    }
}

/// The fixture's pipeline with `map` and lookup table `titles`.
fn mapped(f: &Fixture, map: &[(&str, &str)], titles: &[(&str, &str)]) -> Pipeline {
    let mut settings = f.settings.clone();
    settings.map = map
        .iter()
        .map(|(field, template)| (field.to_string(), template.to_string()))
        .collect();
    let table = titles
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let lookups = HashMap::from([("titles".to_string(), table)]);
    Pipeline {
        settings,
        ..f.pipeline()
    }
    .with_shaping("pipelines.test", Arc::new(lookups))
    .expect("compiles")
}

async fn run_mapped(
    f: &Fixture,
    pipeline: &Pipeline,
    source: &SkippingSource,
    sink: &mut MemorySink,
) -> RunReport {
    f.run_pipeline(pipeline, source, sink, RunOptions::default())
        .await
}

fn memo_entries(f: &Fixture) -> usize {
    let mut entries = 0;
    f.state()
        .scan_source_memo("list->memory", &mut |_: SourceMemo| entries += 1)
        .unwrap();
    entries
}

fn shown(sink: &MemorySink, field: Field) -> Vec<String> {
    sink.people()
        .values()
        .map(|c| c.get(&field).unwrap_or_default())
        .collect()
}

#[tokio::test]
async fn a_mapped_pipeline_skips_the_rows_it_sent_as_they_are_and_reads_again_what_a_new_mapping_changes(
) {
    let f = Fixture::new();
    let mut sink = MemorySink::new(100);
    let map = [
        ("display_name", "{{ first_name }} (staff)"),
        ("job_title", "{{ lookup('titles', first_name, 'none') }}"),
    ];
    let titles = [("Ann", "Engineer")];
    let pipeline = mapped(&f, &map, &titles);
    let mut people: Vec<Contact> = (1..=4).map(|i| person(i, "Ann")).collect();

    let source = SkippingSource::of(&people);
    let r = run_mapped(&f, &pipeline, &source, &mut sink).await;
    assert_eq!((r.created, r.unchanged), (4, 0), "{r:?}");
    assert_eq!(
        memo_entries(&f),
        4,
        "the first sync keeps what each record became"
    );

    let r = run_mapped(&f, &pipeline, &source, &mut sink).await;
    assert_eq!((r.updated, r.unchanged), (0, 4), "{r:?}");
    assert_eq!(source.skipped(), ["E1", "E2", "E3", "E4"]);

    people[1].set(&Field::FirstName, "Bea").unwrap();
    let source = SkippingSource::of(&people);
    let r = run_mapped(&f, &pipeline, &source, &mut sink).await;
    assert_eq!((r.updated, r.unchanged), (1, 3), "{r:?}");
    assert_eq!(source.skipped(), ["E1", "E3", "E4"]);
    let r = run_mapped(&f, &pipeline, &source, &mut sink).await;
    assert_eq!(r.unchanged, 4, "{r:?}");
    assert_eq!(
        source.skipped(),
        ["E1", "E2", "E3", "E4"],
        "the changed record's new memo entry counts once the sink has it"
    );

    // Another template: every record becomes something else, though none changed.
    let map = [
        ("display_name", "{{ first_name }} (team)"),
        ("job_title", "{{ lookup('titles', first_name, 'none') }}"),
    ];
    let pipeline = mapped(&f, &map, &titles);
    let r = run_mapped(&f, &pipeline, &source, &mut sink).await;
    assert_eq!((r.updated, r.unchanged), (4, 0), "{r:?}");
    assert!(source.skipped().is_empty());
    assert_eq!(
        shown(&sink, Field::DisplayName),
        ["Ann (team)", "Bea (team)", "Ann (team)", "Ann (team)"]
    );
    let r = run_mapped(&f, &pipeline, &source, &mut sink).await;
    assert_eq!(r.unchanged, 4, "{r:?}");
    assert_eq!(source.skipped().len(), 4);

    // Another lookup table: the same.
    let pipeline = mapped(&f, &map, &[("Ann", "Manager")]);
    let r = run_mapped(&f, &pipeline, &source, &mut sink).await;
    assert_eq!((r.updated, r.unchanged), (3, 1), "{r:?}");
    assert_eq!(source.skipped(), Vec::<String>::new());
    assert_eq!(
        shown(&sink, Field::JobTitle),
        ["Manager", "none", "Manager", "Manager"]
    );

    // Entries that no longer count are compacted away.
    assert!(
        memo_entries(&f) <= 4 + 4 + 3,
        "{} entries for 4 people",
        memo_entries(&f)
    );
}

#[tokio::test]
async fn a_memo_entry_counts_only_while_the_state_holds_what_the_record_became() {
    let f = Fixture::new();
    let mut sink = MemorySink::new(100);
    let pipeline = mapped(&f, &[("display_name", "{{ first_name }}!")], &[]);
    let mut people: Vec<Contact> = (1..=3).map(|i| person(i, "Ann")).collect();
    run_mapped(&f, &pipeline, &SkippingSource::of(&people), &mut sink).await;

    // The platform refuses E2's new address, for now: the state keeps what E2 was.
    people[1].set(&Field::Email, "reject2@example.com").unwrap();
    let source = SkippingSource::of(&people);
    let r = run_mapped(&f, &pipeline, &source, &mut sink).await;
    assert_eq!(r.rejected, 1, "{r:?}");
    assert_eq!(source.skipped(), ["E1", "E3"]);

    // The record as read is the one the memo holds now, but the sink never took what
    // it became: it is read and sent again.
    let r = run_mapped(&f, &pipeline, &source, &mut sink).await;
    assert_eq!(source.skipped(), ["E1", "E3"]);
    assert_eq!((r.rejected, r.unchanged), (1, 2), "{r:?}");
}

#[tokio::test]
async fn a_source_that_cannot_skip_leaves_no_memo_to_keep() {
    let f = Fixture::new();
    let mut sink = MemorySink::new(100);
    let pipeline = mapped(&f, &[("display_name", "{{ first_name }}!")], &[]);
    let people: Vec<Contact> = (1..=3).map(|i| person(i, "Ann")).collect();
    let source = ListSource::of(&people);
    for _ in 0..2 {
        let r = f
            .run_pipeline(&pipeline, &source, &mut sink, RunOptions::default())
            .await;
        assert_eq!(r.status, RunStatus::Synced, "{r:?}");
    }
    assert_eq!(memo_entries(&f), 0, "every row is read in full anyway");
}
