//! Runs killed and resumed, recovering sinks, the sink store, batch order, state
//! migration, and reads that fail or are shaped.

use super::*;

#[tokio::test]
async fn a_run_killed_at_any_point_converges_on_rerun() {
    let people: Vec<Contact> = (1..=7).map(|i| person(i, "A")).collect();
    let mut edited = people.clone();
    edited[0].set(&Field::FirstName, "Changed").unwrap();
    edited[1].status = ContactStatus::Inactive;
    edited.truncate(6);
    edited.push(person(8, "New"));
    // Kill the second run at each of its apply calls (3 batches of 1 change, plus the
    // removal), before and after the platform applied it.
    for call in 1..=4 {
        for after in [false, true] {
            let mut f = Fixture::new();
            f.settings.max_removal_ratio = 1.0;
            let mut sink = MemorySink::new(1);
            f.run(&ListSource::of(&people), &mut sink).await;
            {
                let mut p = sink.platform.lock().unwrap();
                p.hang_on_call = Some((p.calls + call, after));
            }
            let killed = tokio::time::timeout(
                std::time::Duration::from_millis(300),
                f.run(&ListSource::of(&edited), &mut sink.clone()),
            )
            .await;
            assert!(
                killed.is_err(),
                "call {call} after {after}: the run should have hung"
            );
            sink.platform.lock().unwrap().hang_on_call = None;

            let r = f.run(&ListSource::of(&edited), &mut sink).await;
            assert_eq!(
                r.status,
                RunStatus::Synced,
                "call {call} after {after}: {r:?}"
            );
            let expected: BTreeMap<ContactKey, Contact> = edited
                .iter()
                .map(|c| (c.key(Default::default()).unwrap(), c.clone()))
                .collect();
            assert_eq!(sink.people(), expected, "call {call} after {after}");
            let r = f.run(&ListSource::of(&edited), &mut sink).await;
            assert_eq!(
                (r.created, r.updated, r.removed, r.unchanged),
                (0, 0, 0, 7),
                "call {call} after {after}"
            );
            let summary = &f.state().summaries().unwrap()[0];
            assert_eq!((summary.synced, summary.pending), (7, 0));
        }
    }
}

#[tokio::test]
async fn a_sink_that_can_recover_settles_pending_batches_without_resending() {
    let f = Fixture::new();
    let mut sink = MemorySink::new(10);
    let people: Vec<Contact> = (1..=3).map(|i| person(i, "A")).collect();
    sink.platform.lock().unwrap().hang_on_call = Some((1, true));
    let killed = tokio::time::timeout(
        std::time::Duration::from_millis(300),
        f.run(&ListSource::of(&people), &mut sink.clone()),
    )
    .await;
    assert!(killed.is_err());
    {
        let mut p = sink.platform.lock().unwrap();
        p.hang_on_call = None;
        p.recoverable = true;
    }
    let r = f.run(&ListSource::of(&people), &mut sink).await;
    assert_eq!(r.recovered, 3);
    assert_eq!((r.created, r.unchanged), (0, 3), "{r:?}");
    let p = sink.platform.lock().unwrap();
    assert_eq!(p.recovered, vec!["run-1-batch-1".to_string()]);
    assert_eq!(p.batches.len(), 1, "nothing sent twice");
}

#[tokio::test]
async fn the_sink_store_persists_between_runs() {
    let f = Fixture::new();
    let mut sink = MemorySink::new(10);
    f.run(&ListSource::of(&[person(1, "A")]), &mut sink).await;
    let mut state = f.state();
    let store = state.sink_store("sinks.memory");
    assert_eq!(
        store.get("last-batch").unwrap().as_deref(),
        Some("run-1-batch-1")
    );
    drop(store);
    assert_eq!(
        state.sink_store("sinks.other").get("last-batch").unwrap(),
        None
    );
}

#[tokio::test]
async fn a_batch_never_mixes_removals_with_upserts_and_removals_come_last() {
    let mut f = Fixture::new();
    f.settings.max_removal_ratio = 1.0;
    let mut sink = MemorySink::new(3);
    let people: Vec<Contact> = (1..=6).map(|i| person(i, "A")).collect();
    f.run(&ListSource::of(&people), &mut sink).await;
    sink.platform.lock().unwrap().batches.clear();
    let mut next: Vec<Contact> = people[2..].to_vec();
    next[0].set(&Field::FirstName, "B").unwrap();
    next.push(person(7, "New"));
    let r = f.run(&ListSource::of(&next), &mut sink).await;
    assert_eq!((r.created, r.updated, r.removed), (1, 1, 2), "{r:?}");
    let batches = sink.platform.lock().unwrap().batches.clone();
    let kinds: Vec<Vec<&str>> = batches
        .iter()
        .map(|b| b.iter().map(|(k, _)| k.as_str()).collect())
        .collect();
    assert_eq!(
        kinds,
        vec![vec!["update", "create"], vec!["remove", "remove"]]
    );
}

/// The schema of the first release, which kept no last-sent records.
const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pipelines (
    name TEXT PRIMARY KEY,
    runs INTEGER NOT NULL DEFAULT 0,
    cursor TEXT,
    last_full_run INTEGER
);
CREATE TABLE IF NOT EXISTS synced (
    pipeline TEXT NOT NULL,
    key_hash INTEGER NOT NULL,
    key TEXT NOT NULL,
    content_hash INTEGER NOT NULL,
    email TEXT,
    handle TEXT,
    PRIMARY KEY (pipeline, key_hash)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pending (
    pipeline TEXT NOT NULL,
    batch_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    run INTEGER NOT NULL,
    key_hash INTEGER NOT NULL,
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    content_hash INTEGER NOT NULL,
    email TEXT,
    applied INTEGER NOT NULL DEFAULT 0,
    handle TEXT,
    PRIMARY KEY (pipeline, batch_id, seq)
);
CREATE INDEX IF NOT EXISTS pending_key ON pending (pipeline, batch_id, key);
CREATE TABLE IF NOT EXISTS runs (
    pipeline TEXT NOT NULL,
    run INTEGER NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    status TEXT,
    report TEXT,
    PRIMARY KEY (pipeline, run)
);
CREATE TABLE IF NOT EXISTS sink_data (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (scope, key)
);
";

#[tokio::test]
async fn a_state_of_the_first_release_is_migrated_and_nobody_is_sent_again() {
    let f = Fixture::new();
    let mut people: Vec<Contact> = (1..=3).map(|i| person(i, "Ann")).collect();
    {
        let db = rusqlite::Connection::open(f.dir.path().join("state.db")).unwrap();
        db.execute_batch(SCHEMA_V1).unwrap();
        db.execute_batch(
            "INSERT INTO meta VALUES ('schema', '1');
             INSERT INTO pipelines (name, runs) VALUES ('list->memory', 1);",
        )
        .unwrap();
        for c in &people {
            let key = c.key(contactsync_core::KeyRule::Auto).unwrap();
            db.execute(
                "INSERT INTO synced (pipeline, key_hash, key, content_hash, email) VALUES ('list->memory', ?1, ?2, ?3, ?4)",
                rusqlite::params![
                    key.hash64() as i64,
                    key.to_string(),
                    c.content_hash() as i64,
                    c.email
                ],
            )
            .unwrap();
        }
    }
    let mut sink = MemorySink::new(10);
    let r = f.run(&ListSource::of(&people), &mut sink).await;
    assert_eq!(r.status, RunStatus::Synced, "{r:?}");
    assert_eq!(
        (r.created, r.updated, r.unchanged),
        (0, 0, 3),
        "nobody re-sent"
    );
    assert!(sink.platform.lock().unwrap().batches.is_empty());

    // The first change after the upgrade has no `before`; it stores one for the next.
    people[1].set(&Field::FirstName, "Bea").unwrap();
    let r = f.run(&ListSource::of(&people), &mut sink).await;
    assert_eq!((r.updated, r.unchanged), (1, 2), "{r:?}");
    assert_eq!(r.sample.len(), 0);
    people[1].set(&Field::FirstName, "Cy").unwrap();
    let r = f
        .run_with(
            &ListSource::of(&people),
            &mut sink,
            RunOptions {
                sample_size: 5,
                ..RunOptions::default()
            },
        )
        .await;
    assert_eq!(r.updated, 1);
    let fields = &r.sample[0].fields;
    assert_eq!(fields.len(), 1, "{fields:?}");
    assert_eq!(fields[0].before.as_deref(), Some("Bea"));
    assert_eq!(fields[0].after.as_deref(), Some("Cy"));
    let befores = sink.platform.lock().unwrap().befores.clone();
    assert_eq!(befores.len(), 2);
    assert_eq!(befores[0], ("external_id:E2".to_string(), None));
    assert_eq!(
        befores[1].1.as_ref().and_then(|c| c.first_name.as_deref()),
        Some("Bea"),
        "the second change knows what the first one sent"
    );

    // A removal carries the record last sent, when there is one.
    let allow = RunOptions {
        allow_mass_removal: true,
        ..RunOptions::default()
    };
    let r = f
        .run_with(&ListSource::of(&people[..2]), &mut sink, allow)
        .await;
    assert_eq!((r.status, r.removed), (RunStatus::Synced, 1), "{r:?}");
    let befores = sink.platform.lock().unwrap().befores.clone();
    assert_eq!(befores[2].0, "external_id:E3");
    assert_eq!(befores[2].1, None, "E3 was synced by the old release");
}

#[tokio::test]
async fn a_source_reject_with_a_key_is_seen_and_one_without_holds_back_removals() {
    let f = Fixture::new();
    let mut sink = MemorySink::new(10);
    let people: Vec<Contact> = (1..=4).map(|i| person(i, "Ann")).collect();
    f.run(&ListSource::of(&people), &mut sink).await;

    // E2's row could not be mapped, but the source read its id: E2 is seen.
    let mut source = ListSource::of(&[people[0].clone(), people[2].clone(), people[3].clone()]);
    source.items.push(SourceItem::Rejected(Box::new(
        RecordError::new(Origin::line("people.csv", 9), "bad value")
            .with_field("status")
            .with_partial(people[1].clone()),
    )));
    let r = f.run(&source, &mut sink).await;
    assert_eq!(r.status, RunStatus::FinishedWithRejects, "{r:?}");
    assert_eq!((r.removed, r.removals_held, r.rejected), (0, 0, 1));
    assert_eq!(sink.people().len(), 4);

    // A row whose shape cannot be trusted (no partial record): nobody is removed,
    // although E2 and E4 are missing.
    let mut source = ListSource::of(&[people[0].clone(), people[2].clone()]);
    source
        .items
        .push(SourceItem::Rejected(Box::new(RecordError::new(
            Origin::line("people.csv", 4),
            "the row has 2 fields, the header has 5",
        ))));
    let r = f.run(&source, &mut sink).await;
    assert_eq!(r.status, RunStatus::RemovalsHeld, "{r:?}");
    assert_eq!((r.removed, r.removals_held), (0, 2));
    assert!(r
        .removals_held_reason
        .unwrap()
        .contains("1 rejected record"));
    assert_eq!(sink.people().len(), 4);
}

/// A source that fails after `fail_after` records.
#[derive(Clone)]
struct FailingSource {
    people: Vec<Contact>,
    fail_after: usize,
}

struct FailingStream(std::vec::IntoIter<Contact>, usize, u64);

#[async_trait]
impl RecordStream for FailingStream {
    async fn next(&mut self) -> Result<Option<SourceItem>, ConnectorError> {
        if self.2 as usize == self.1 {
            return Err(ConnectorError::Other("the export broke off".into()));
        }
        self.2 += 1;
        Ok(self.0.next().map(|c| {
            SourceItem::Record(Box::new(SourceRecord::new(
                c,
                Origin::line("people.csv", self.2 + 1),
            )))
        }))
    }
    async fn finish(self: Box<Self>) -> Result<ReadOutcome, ConnectorError> {
        Ok(ReadOutcome {
            complete: true,
            cursor: None,
        })
    }
}

#[async_trait]
impl Source for FailingSource {
    async fn check(&self) -> Result<(), ConnectorError> {
        Ok(())
    }
    async fn read(&self, _mode: ReadMode) -> Result<Box<dyn RecordStream>, ConnectorError> {
        Ok(Box::new(FailingStream(
            self.people.clone().into_iter(),
            self.fail_after,
            0,
        )))
    }
}

/// With a `map`, records are shaped by several tasks in batches: they must still reach
/// the diff in the order read (the first of two records with one key wins, and rejects
/// name their lines), and a source error must still end the read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shaped_reads_keep_their_order_and_their_errors() {
    let mut f = Fixture::new();
    f.settings.map = BTreeMap::from([(
        "first_name".to_string(),
        "{{ first_name | upper }}".to_string(),
    )]);
    f.settings.scope = Some("external_id != 'E13'".into());
    let pipeline = f
        .pipeline()
        .with_shaping("pipelines.test", Arc::default())
        .expect("compiles");
    let mut people: Vec<Contact> = (1..=5000).map(|i| person(i, &format!("n{i}"))).collect();
    // Far from its first, in another batch: the later one is the duplicate.
    people.push(person(7, "late"));
    let source = ListSource::of(&people);
    let mut sink = MemorySink::new(1000);
    let rejects = f.dir.path().join("rejects.csv");
    let options = RunOptions {
        rejects: Some(rejects.clone()),
        ..RunOptions::default()
    };
    let mut state = f.state();
    let report = run(
        &pipeline,
        &source,
        &mut sink,
        &mut state,
        &options,
        &SilentObserver,
    )
    .await;
    assert_eq!(
        (report.read, report.created, report.rejected),
        (5001, 4999, 1),
        "{report:?}"
    );
    assert_eq!(report.out_of_scope, 1);
    let seventh = &sink.people()[&ContactKey::ExternalId("E7".into())];
    assert_eq!(
        seventh.first_name.as_deref(),
        Some("N7"),
        "the first one wins"
    );
    let rows: Vec<csv::StringRecord> = csv::Reader::from_path(&rejects)
        .unwrap()
        .records()
        .map(Result::unwrap)
        .collect();
    assert_eq!(rows[0].get(2), Some("5002"), "the duplicate's own line");

    let failing = FailingSource {
        people: (1..=5000).map(|i| person(i, "x")).collect(),
        fail_after: 3000,
    };
    let mut sink = MemorySink::new(1000);
    let report = run(
        &pipeline,
        &failing,
        &mut sink,
        &mut state,
        &RunOptions::default(),
        &SilentObserver,
    )
    .await;
    assert_eq!(report.status, RunStatus::Failed, "{report:?}");
    assert!(sink.people().is_empty(), "a broken read applies nothing");
}
