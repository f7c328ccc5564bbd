//! The engine's behaviours, against an in-memory source and sink with fault points.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use contactsync_core::{
    async_trait, Change, ChangeBatch, ConnectorError, Contact, ContactKey, ContactStatus, Field,
    FinishStarted, Origin, Outcome, PendingBatch, ReadMode, ReadOutcome, RecordError, RecordStream,
    RemovalStyle, Sink, SinkCapabilities, SinkContext, Source, SourceCapabilities, SourceItem,
    SourceRecord,
};
use contactsync_engine::state::roles::*;
use contactsync_engine::{
    run, Pipeline, PipelineSettings, RunOptions, RunReport, RunStatus, SilentObserver, SqliteState,
    SyncMode,
};

mod crash_and_state;
mod finish;
mod source_memo;

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
                    SourceItem::Record(Box::new(SourceRecord::new(
                        c.clone(),
                        Origin::line("people.csv", i as u64 + 2),
                    )))
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
            skips_unchanged: false,
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
    /// The last batch applied, as (kind, key) pairs.
    fn last_batch(&self) -> Vec<(String, String)> {
        let platform = self.platform.lock().unwrap();
        platform
            .batches
            .last()
            .cloned()
            .expect("a batch was applied")
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
        self.run_pipeline(&self.pipeline(), source, sink, options)
            .await
    }
    /// As [`Fixture::run_with`], for another pipeline and any source.
    async fn run_pipeline(
        &self,
        pipeline: &Pipeline,
        source: &dyn Source,
        sink: &mut MemorySink,
        options: RunOptions,
    ) -> RunReport {
        let mut state = self.state();
        run(
            pipeline,
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
    let last = sink.last_batch();
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
    source.items.push(SourceItem::Rejected(Box::new(
        RecordError::new(Origin::line("people.csv", 7), "wrong number of columns").with_raw("a,b"),
    )));
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

    // The state keeps the same rejects with the run, for the dashboard: where, whose
    // and why, never the record.
    let kept = f
        .state()
        .rejects("list->memory", r.run, 0, 10)
        .expect("rejects");
    assert_eq!(kept.len(), 4);
    let bad = kept
        .iter()
        .find(|k| k.reason.contains("not a valid email"))
        .expect("the bad email");
    assert_eq!(
        (bad.stage.as_str(), bad.origin.as_str(), bad.key.as_deref()),
        ("validation", "people.csv:3", Some("external_id:E2"))
    );
    assert_eq!(bad.email.as_deref(), Some("not an email"));
    assert_eq!(kept[3].origin, "people.csv:7");
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
    let last = sink.last_batch();
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
    let last = sink.last_batch();
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
    source.items = vec![SourceItem::Record(Box::new(deleted))];
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

    // `full_every = "never"` (kept as 0): never scheduled (the first read, without a cursor, is full).
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
