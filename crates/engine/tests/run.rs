//! The engine's behaviours, against an in-memory source and sink with fault points.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use contactsync_core::{
    async_trait, Change, ChangeBatch, ConnectorError, Contact, ContactKey, ContactStatus, Field,
    Origin, Outcome, PendingBatch, ReadMode, ReadOutcome, RecordError, RecordStream, RemovalStyle,
    Sink, SinkCapabilities, SinkContext, Source, SourceCapabilities, SourceItem, SourceRecord,
};
use contactsync_engine::{
    run, Pipeline, PipelineSettings, RunOptions, RunReport, RunStatus, SilentObserver, SqliteState,
    StateStore, SyncMode,
};

fn person(id: u32, first: &str) -> Contact {
    let mut c = Contact::default();
    c.set(&Field::ExternalId, &format!("E{id}")).unwrap();
    c.set(&Field::Email, &format!("p{id}@example.com")).unwrap();
    c.set(&Field::FirstName, first).unwrap();
    c
}

/// A source over a list of items; `complete` says what the read claims.
#[derive(Clone)]
struct ListSource {
    items: Vec<SourceItem>,
    complete: bool,
    incremental: bool,
    full_every: Option<u32>,
    reads: Arc<Mutex<Vec<ReadMode>>>,
}

impl ListSource {
    fn of(contacts: &[Contact]) -> Self {
        ListSource {
            items: contacts
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    SourceItem::Record(SourceRecord::new(
                        c.clone(),
                        Origin::line("people.csv", i as u64 + 2),
                    ))
                })
                .collect(),
            complete: true,
            incremental: false,
            full_every: None,
            reads: Arc::default(),
        }
    }
}

struct ListStream(std::vec::IntoIter<SourceItem>, bool);

#[async_trait]
impl RecordStream for ListStream {
    async fn next(&mut self) -> Result<Option<SourceItem>, ConnectorError> {
        Ok(self.0.next())
    }
    async fn finish(self: Box<Self>) -> Result<ReadOutcome, ConnectorError> {
        Ok(ReadOutcome {
            complete: self.1,
            cursor: Some("c1".into()),
        })
    }
}

#[async_trait]
impl Source for ListSource {
    fn capabilities(&self) -> SourceCapabilities {
        SourceCapabilities {
            incremental: self.incremental,
            reports_deletions: false,
            full_every: self.full_every,
        }
    }
    async fn check(&self) -> Result<(), ConnectorError> {
        Ok(())
    }
    async fn read(&self, mode: ReadMode) -> Result<Box<dyn RecordStream>, ConnectorError> {
        self.reads.lock().unwrap().push(mode.clone());
        let complete = self.complete && mode == ReadMode::Full;
        Ok(Box::new(ListStream(
            self.items.clone().into_iter(),
            complete,
        )))
    }
}

/// The platform the memory sink writes to.
#[derive(Default)]
struct Platform {
    people: BTreeMap<ContactKey, Contact>,
    batches: Vec<Vec<(String, String)>>,
    /// Hang (simulating a kill) on this apply call, 1-based, before or after applying.
    hang_on_call: Option<(usize, bool)>,
    calls: usize,
    /// Keys whose recovery the sink can answer (a job it can find again).
    recoverable: bool,
    recovered: Vec<String>,
    /// The `before` record of every update and removal applied, in order.
    befores: Vec<(String, Option<Contact>)>,
}

#[derive(Clone, Default)]
struct MemorySink {
    platform: Arc<Mutex<Platform>>,
    max_batch: usize,
}

impl MemorySink {
    fn new(max_batch: usize) -> Self {
        MemorySink {
            platform: Arc::default(),
            max_batch,
        }
    }
    fn people(&self) -> BTreeMap<ContactKey, Contact> {
        self.platform.lock().unwrap().people.clone()
    }
}

#[async_trait]
impl Sink for MemorySink {
    fn capabilities(&self) -> SinkCapabilities {
        SinkCapabilities {
            addresses_by_email: false,
            mixes_removals: false,
            max_batch: self.max_batch,
            asynchronous_jobs: false,
            durable_at_finish: false,
            removal: RemovalStyle::Delete,
        }
    }
    async fn check(&mut self) -> Result<(), ConnectorError> {
        Ok(())
    }
    async fn recover(
        &mut self,
        batch: &PendingBatch,
        _ctx: &mut SinkContext<'_>,
    ) -> Result<Option<Vec<Outcome>>, ConnectorError> {
        let mut p = self.platform.lock().unwrap();
        if !p.recoverable {
            return Ok(None);
        }
        p.recovered.push(batch.id.clone());
        Ok(Some(
            batch.records.iter().map(|_| Outcome::applied()).collect(),
        ))
    }
    async fn apply(
        &mut self,
        batch: &ChangeBatch,
        ctx: &mut SinkContext<'_>,
    ) -> Result<Vec<Outcome>, ConnectorError> {
        let hang_after = {
            let mut p = self.platform.lock().unwrap();
            p.calls += 1;
            let hang = p
                .hang_on_call
                .filter(|(n, _)| *n == p.calls)
                .map(|(_, after)| after);
            if hang == Some(false) {
                None
            } else {
                Some(hang.is_some())
            }
        };
        let Some(hang_after) = hang_after else {
            // Killed before the platform saw anything.
            std::future::pending::<()>().await;
            unreachable!()
        };
        ctx.store.put("last-batch", &batch.id)?;
        let mut outcomes = Vec::new();
        {
            let mut p = self.platform.lock().unwrap();
            p.batches.push(
                batch
                    .changes
                    .iter()
                    .map(|c| (c.kind().as_str().to_string(), c.key().to_string()))
                    .collect(),
            );
            for change in &batch.changes {
                let email = change.email().unwrap_or_default().to_string();
                if email.starts_with("reject") {
                    outcomes.push(Outcome::rejected("the platform refuses this address"));
                    continue;
                }
                if email.starts_with("optout") {
                    outcomes.push(Outcome::Rejected {
                        reason: "opted out".into(),
                        field: None,
                        retry: false,
                    });
                    continue;
                }
                if email.starts_with("unknown") {
                    outcomes.push(Outcome::Unknown {
                        reason: "job failed".into(),
                    });
                    continue;
                }
                if change.kind() != contactsync_core::ChangeKind::Create {
                    p.befores
                        .push((change.key().to_string(), change.before().cloned()));
                }
                match change {
                    Change::Create { key, contact, .. } | Change::Update { key, contact, .. } => {
                        p.people.insert(key.clone(), contact.clone());
                    }
                    Change::Remove { key, .. } => {
                        p.people.remove(key);
                    }
                }
                outcomes.push(Outcome::applied());
            }
        }
        if hang_after {
            // Killed after the platform applied, before the outcomes were recorded.
            std::future::pending::<()>().await;
        }
        Ok(outcomes)
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    settings: PipelineSettings,
}

impl Fixture {
    fn new() -> Self {
        Fixture {
            dir: tempfile::tempdir().unwrap(),
            settings: PipelineSettings::default(),
        }
    }
    fn state(&self) -> SqliteState {
        SqliteState::open(&self.dir.path().join("state.db")).unwrap()
    }
    fn pipeline(&self) -> Pipeline {
        Pipeline {
            name: "list->memory".into(),
            sink_scope: "sinks.memory".into(),
            settings: self.settings.clone(),
            shaping: None,
        }
    }
    async fn run_with(
        &self,
        source: &ListSource,
        sink: &mut MemorySink,
        options: RunOptions,
    ) -> RunReport {
        let mut state = self.state();
        run(
            &self.pipeline(),
            source,
            sink,
            &mut state,
            &options,
            &SilentObserver,
        )
        .await
    }
    async fn run(&self, source: &ListSource, sink: &mut MemorySink) -> RunReport {
        self.run_with(source, sink, RunOptions::default()).await
    }
}

fn keys(people: &BTreeMap<ContactKey, Contact>) -> Vec<String> {
    people.keys().map(|k| k.to_string()).collect()
}

#[tokio::test]
async fn first_run_creates_second_does_nothing_edit_sends_only_the_edit() {
    let f = Fixture::new();
    let mut sink = MemorySink::new(2);
    let mut people: Vec<Contact> = (1..=5).map(|i| person(i, "Ann")).collect();
    let r = f.run(&ListSource::of(&people), &mut sink).await;
    assert_eq!(
        (r.read, r.created, r.updated, r.removed, r.unchanged),
        (5, 5, 0, 0, 0),
        "{r:?}"
    );
    assert_eq!(r.status, RunStatus::Synced);
    assert_eq!(
        sink.platform.lock().unwrap().batches.len(),
        3,
        "batches of at most 2"
    );

    let r = f.run(&ListSource::of(&people), &mut sink).await;
    assert_eq!((r.created, r.updated, r.removed, r.unchanged), (0, 0, 0, 5));
    assert_eq!(
        sink.platform.lock().unwrap().batches.len(),
        3,
        "nothing sent"
    );

    people[2].set(&Field::FirstName, "Bea").unwrap();
    let r = f.run(&ListSource::of(&people), &mut sink).await;
    assert_eq!((r.created, r.updated, r.unchanged), (0, 1, 4));
    let last = sink
        .platform
        .lock()
        .unwrap()
        .batches
        .last()
        .unwrap()
        .clone();
    assert_eq!(
        last,
        vec![("update".to_string(), "external_id:E3".to_string())]
    );
    assert_eq!(
        sink.people()[&ContactKey::ExternalId("E3".into())]
            .first_name
            .as_deref(),
        Some("Bea")
    );
}

/// The rows of the people who changed are fetched from the state in batches: across
/// many batches, every update and removal still carries the record last sent for that
/// very person, and the changes keep the order they were read in.
#[tokio::test]
async fn changes_looked_up_in_batches_keep_their_order_and_their_own_previous_records() {
    let f = Fixture::new();
    let mut sink = MemorySink::new(100);
    let day1: Vec<Contact> = (1..=1500)
        .map(|i| person(i, &format!("First{i}")))
        .collect();
    let r = f.run(&ListSource::of(&day1), &mut sink).await;
    assert_eq!(r.created, 1500, "{r:?}");
    // Night: every third person edited, every twentieth gone, a new one at every tenth.
    let mut night = Vec::new();
    let mut expected_upserts = Vec::new();
    for i in 1..=1500u32 {
        if i % 10 == 0 {
            night.push(person(10_000 + i, "New"));
            expected_upserts.push(format!("external_id:E{}", 10_000 + i));
        }
        if i % 20 == 0 {
            continue;
        }
        let mut c = person(i, &format!("First{i}"));
        if i % 3 == 0 {
            c.set(&Field::LastName, "Edited").unwrap();
            expected_upserts.push(format!("external_id:E{i}"));
        }
        night.push(c);
    }
    sink.platform.lock().unwrap().batches.clear();
    let r = f.run(&ListSource::of(&night), &mut sink).await;
    assert_eq!(
        (r.created, r.updated, r.removed),
        (150, 1500 / 3 - 1500 / 60, 1500 / 20),
        "{r:?}"
    );
    let platform = sink.platform.lock().unwrap();
    let upserts: Vec<String> = platform
        .batches
        .iter()
        .flatten()
        .filter(|(kind, _)| kind != "remove")
        .map(|(_, key)| key.clone())
        .collect();
    assert_eq!(upserts, expected_upserts, "upserts in read order");
    let befores = &platform.befores[platform.befores.len() - (r.updated + r.removed) as usize..];
    for (key, before) in befores {
        let id: u32 = key.trim_start_matches("external_id:E").parse().unwrap();
        assert_eq!(
            before.as_ref(),
            Some(&day1[id as usize - 1]),
            "the previous record of {key}"
        );
    }
}

#[tokio::test]
async fn removals_come_only_from_complete_reads() {
    let mut f = Fixture::new();
    f.settings.max_removal_ratio = 1.0;
    let mut sink = MemorySink::new(100);
    let people: Vec<Contact> = (1..=10).map(|i| person(i, "A")).collect();
    f.run(&ListSource::of(&people), &mut sink).await;

    let mut partial = ListSource::of(&people[..9]);
    partial.complete = false;
    let r = f.run(&partial, &mut sink).await;
    assert_eq!(r.removed, 0, "an incomplete read never removes");
    assert!(!r.complete_read);
    assert_eq!(sink.people().len(), 10);

    let r = f.run(&ListSource::of(&people[..9]), &mut sink).await;
    assert_eq!(r.removed, 1);
    assert_eq!(sink.people().len(), 9);
    assert!(!sink
        .people()
        .contains_key(&ContactKey::ExternalId("E10".into())));
}

#[tokio::test]
async fn the_guard_refuses_mass_removal_unless_allowed() {
    let f = Fixture::new();
    let mut sink = MemorySink::new(100);
    let people: Vec<Contact> = (1..=20).map(|i| person(i, "A")).collect();
    f.run(&ListSource::of(&people), &mut sink).await;

    // 2 of 20 = 10%: at the bound, allowed.
    let r = f.run(&ListSource::of(&people[..18]), &mut sink).await;
    assert_eq!(r.status, RunStatus::Synced, "{r:?}");
    assert_eq!(r.removed, 2);

    // An empty export would remove everyone: refused, nothing touched.
    let r = f.run(&ListSource::of(&[]), &mut sink).await;
    assert_eq!(r.status, RunStatus::Refused);
    assert!(r.error.as_deref().unwrap().contains("--allow-mass-removal"));
    assert_eq!(sink.people().len(), 18);
    let r = f.run(&ListSource::of(&people[..18]), &mut sink).await;
    assert_eq!(
        r.unchanged, 18,
        "the state still holds everyone after a refused run"
    );

    let options = RunOptions {
        allow_mass_removal: true,
        ..RunOptions::default()
    };
    let r = f
        .run_with(&ListSource::of(&people[..1]), &mut sink, options)
        .await;
    assert_eq!(r.status, RunStatus::Synced);
    assert_eq!(r.removed, 17);
    assert_eq!(sink.people().len(), 1);
}

#[tokio::test]
async fn dry_run_plans_and_touches_nothing() {
    let f = Fixture::new();
    let mut sink = MemorySink::new(100);
    let people: Vec<Contact> = (1..=4).map(|i| person(i, "A")).collect();
    let options = RunOptions {
        dry_run: true,
        sample_size: 2,
        ..RunOptions::default()
    };
    let r = f
        .run_with(&ListSource::of(&people), &mut sink, options.clone())
        .await;
    assert!(r.dry_run);
    assert_eq!(r.created, 4);
    assert_eq!(r.sample.len(), 2);
    assert_eq!(sink.platform.lock().unwrap().calls, 0);
    assert!(f.state().summaries().unwrap().is_empty(), "no run recorded");

    let r = f.run(&ListSource::of(&people), &mut sink).await;
    assert_eq!(r.created, 4, "the dry run left the state untouched");
    let r = f
        .run_with(&ListSource::of(&people[..3]), &mut sink, options)
        .await;
    assert_eq!(r.removed, 1);
    assert_eq!(
        r.status,
        RunStatus::Refused,
        "25% > 10%, reported in the plan too"
    );
    assert_eq!(sink.people().len(), 4);
}

#[tokio::test]
async fn invalid_and_duplicate_records_are_rejected_with_their_line() {
    let f = Fixture::new();
    let mut sink = MemorySink::new(100);
    let mut bad_email = person(2, "B");
    bad_email.email = Some("not an email".into());
    let no_key = Contact {
        first_name: Some("Nobody".into()),
        ..Contact::default()
    };
    let people = vec![
        person(1, "A"),
        bad_email,
        person(1, "A-again"),
        no_key,
        person(3, "C"),
    ];
    let mut source = ListSource::of(&people);
    source.items.push(SourceItem::Rejected(
        RecordError::new(Origin::line("people.csv", 7), "wrong number of columns").with_raw("a,b"),
    ));
    let rejects = f.dir.path().join("rejects.csv");
    let options = RunOptions {
        rejects: Some(rejects.clone()),
        ..RunOptions::default()
    };
    let r = f.run_with(&source, &mut sink, options).await;
    assert_eq!(r.read, 6);
    assert_eq!(r.created, 2);
    assert_eq!(r.rejected, 4);
    assert_eq!(r.status, RunStatus::FinishedWithRejects);
    assert_eq!(
        sink.people()[&ContactKey::ExternalId("E1".into())]
            .first_name
            .as_deref(),
        Some("A"),
        "first wins"
    );

    let mut reader = csv::Reader::from_path(&rejects).unwrap();
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 4);
    let line_of = |needle: &str| {
        rows.iter()
            .find(|r| r.get(6).unwrap().contains(needle))
            .map(|r| {
                (
                    r.get(1).unwrap().to_string(),
                    r.get(2).unwrap().to_string(),
                    r.get(5).unwrap().to_string(),
                )
            })
            .unwrap_or_else(|| panic!("no reject about {needle}: {rows:?}"))
    };
    assert_eq!(
        line_of("not a valid email"),
        ("people.csv".into(), "3".into(), "email".into())
    );
    assert_eq!(
        line_of("duplicate key"),
        ("people.csv".into(), "4".into(), "external_id".into())
    );
    assert_eq!(
        line_of("no key"),
        ("people.csv".into(), "5".into(), "external_id".into())
    );
    assert_eq!(
        line_of("wrong number of columns"),
        ("people.csv".into(), "7".into(), "".into())
    );
}

#[tokio::test]
async fn sink_rejections_retry_unless_final_and_unknowns_stay_pending() {
    let f = Fixture::new();
    let mut sink = MemorySink::new(100);
    let mut reject = person(1, "A");
    reject.email = Some("reject1@example.com".into());
    let mut optout = person(2, "B");
    optout.email = Some("optout2@example.com".into());
    let mut unknown = person(3, "C");
    unknown.email = Some("unknown3@example.com".into());
    let people = vec![reject.clone(), optout.clone(), unknown, person(4, "D")];
    let r = f.run(&ListSource::of(&people), &mut sink).await;
    assert_eq!((r.created, r.rejected, r.unknown), (1, 2, 1));
    assert_eq!(r.status, RunStatus::Failed, "unknown outcomes fail the run");

    let r = f.run(&ListSource::of(&people), &mut sink).await;
    let last = sink
        .platform
        .lock()
        .unwrap()
        .batches
        .last()
        .unwrap()
        .clone();
    let sent: Vec<&str> = last.iter().map(|(_, k)| k.as_str()).collect();
    assert_eq!(
        sent,
        vec!["external_id:E1", "external_id:E3"],
        "retryable and unknown re-sent, final not: {r:?}"
    );

    // The opted-out person is sent again only once they change.
    let mut changed = people.clone();
    changed[1].set(&Field::FirstName, "Bee").unwrap();
    f.run(&ListSource::of(&changed), &mut sink).await;
    let last = sink
        .platform
        .lock()
        .unwrap()
        .batches
        .last()
        .unwrap()
        .clone();
    assert!(last.iter().any(|(_, k)| k == "external_id:E2"));
}

#[tokio::test]
async fn modes_filter_changes() {
    let mut f = Fixture::new();
    let mut sink = MemorySink::new(100);
    let people: Vec<Contact> = (1..=10).map(|i| person(i, "A")).collect();
    f.settings.mode = SyncMode::UpdateOnly;
    let r = f.run(&ListSource::of(&people), &mut sink).await;
    assert_eq!((r.created, r.skipped), (0, 10));
    f.settings.mode = SyncMode::CreateOnly;
    f.run(&ListSource::of(&people[..9]), &mut sink).await;
    let mut edited = people.clone();
    edited[0].set(&Field::FirstName, "Z").unwrap();
    let r = f.run(&ListSource::of(&edited), &mut sink).await;
    assert_eq!((r.created, r.updated, r.skipped), (1, 0, 1));
    f.settings.mode = SyncMode::Upsert;
    let r = f.run(&ListSource::of(&edited[..8]), &mut sink).await;
    assert_eq!((r.updated, r.removed), (1, 0));
    assert_eq!(sink.people().len(), 10);
}

#[tokio::test]
async fn deleted_records_from_the_source_are_removals_even_in_incremental_reads() {
    let mut f = Fixture::new();
    f.settings.max_removal_ratio = 1.0;
    let mut sink = MemorySink::new(100);
    let people: Vec<Contact> = (1..=3).map(|i| person(i, "A")).collect();
    let mut source = ListSource::of(&people);
    source.incremental = true;
    f.run(&source, &mut sink).await;
    let mut deleted = SourceRecord::new(people[0].clone(), Origin::line("x", 1));
    deleted.deleted = true;
    source.items = vec![SourceItem::Record(deleted)];
    let r = f.run(&source, &mut sink).await;
    assert!(
        matches!(source.reads.lock().unwrap().last(), Some(ReadMode::Incremental { cursor: Some(c) }) if c == "c1")
    );
    assert_eq!((r.removed, r.complete_read), (1, false));
    assert_eq!(
        keys(&sink.people()),
        vec!["external_id:E2", "external_id:E3"]
    );
}

/// A source that says how often a full read is due (LDAP: deletes are invisible to its
/// incremental reads) gets one that often, unless the pipeline says otherwise.
#[tokio::test]
async fn full_reads_come_at_the_source_s_default_unless_the_pipeline_says_otherwise() {
    let people: Vec<Contact> = (1..=3).map(|i| person(i, "A")).collect();
    let mut source = ListSource::of(&people);
    source.incremental = true;
    source.full_every = Some(2);
    let modes = |source: &ListSource| -> Vec<&'static str> {
        source
            .reads
            .lock()
            .unwrap()
            .iter()
            .map(|m| match m {
                ReadMode::Full => "full",
                ReadMode::Incremental { .. } => "incremental",
            })
            .collect()
    };
    let f = Fixture::new();
    let mut sink = MemorySink::new(100);
    for _ in 0..5 {
        f.run(&source, &mut sink).await;
    }
    assert_eq!(
        modes(&source),
        ["full", "incremental", "full", "incremental", "full"]
    );

    // `full_every = 0`: never scheduled (the first read, without a cursor, is full).
    let mut f = Fixture::new();
    f.settings.full_every = Some(0);
    source.reads.lock().unwrap().clear();
    let mut sink = MemorySink::new(100);
    for _ in 0..4 {
        f.run(&source, &mut sink).await;
    }
    assert_eq!(
        modes(&source),
        ["full", "incremental", "incremental", "incremental"]
    );
}

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
    source.items.push(SourceItem::Rejected(
        RecordError::new(Origin::line("people.csv", 9), "bad value")
            .with_field("status")
            .with_partial(people[1].clone()),
    ));
    let r = f.run(&source, &mut sink).await;
    assert_eq!(r.status, RunStatus::FinishedWithRejects, "{r:?}");
    assert_eq!((r.removed, r.removals_held, r.rejected), (0, 0, 1));
    assert_eq!(sink.people().len(), 4);

    // A row whose shape cannot be trusted (no partial record): nobody is removed,
    // although E2 and E4 are missing.
    let mut source = ListSource::of(&[people[0].clone(), people[2].clone()]);
    source.items.push(SourceItem::Rejected(RecordError::new(
        Origin::line("people.csv", 4),
        "the row has 2 fields, the header has 5",
    )));
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
            SourceItem::Record(SourceRecord::new(c, Origin::line("people.csv", self.2 + 1)))
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
    fn capabilities(&self) -> SourceCapabilities {
        SourceCapabilities::default()
    }
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
