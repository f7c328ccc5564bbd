//! A sink durable at its finish (a file written whole): the engine confirms the run in
//! its state while the sink finishes, and keeps that confirm only once the finish has
//! succeeded.

use super::*;

/// A platform that takes a run's changes only at the finish, as a file does.
#[derive(Default)]
struct Written {
    people: BTreeMap<ContactKey, Contact>,
    /// Changes applied and not yet made durable.
    taken: Vec<Change>,
    /// Whether the next finish fails (the disk full as the file is written).
    fail_finish: bool,
    /// `start_finish` was called and no `finish` since.
    start_called: bool,
    /// Whether `start_finish` came before each `finish`.
    started: Vec<bool>,
    /// The size of each batch applied.
    batch_sizes: Vec<usize>,
}

#[derive(Clone, Default)]
struct FileSink(Arc<Mutex<Written>>);

#[async_trait]
impl Sink for FileSink {
    fn capabilities(&self) -> SinkCapabilities {
        SinkCapabilities {
            addresses_by_email: false,
            mixes_removals: false,
            max_batch: 3,
            asynchronous_jobs: false,
            durable_at_finish: true,
            removal: RemovalStyle::Delete,
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
        let mut written = self.0.lock().unwrap();
        written.batch_sizes.push(batch.changes.len());
        written.taken.extend(batch.changes.iter().cloned());
        Ok(batch.changes.iter().map(|_| Outcome::applied()).collect())
    }
    fn start_finish(&mut self) -> Result<Option<FinishStarted>, ConnectorError> {
        let mut written = self.0.lock().unwrap();
        written.start_called = true;
        // The file written at once, or not (the disk full).
        let (ended, started) = FinishStarted::channel();
        let _ = ended.send(!written.fail_finish);
        Ok(Some(started))
    }
    async fn finish(&mut self, ctx: &mut SinkContext<'_>) -> Result<(), ConnectorError> {
        let mut written = self.0.lock().unwrap();
        let started = std::mem::take(&mut written.start_called);
        written.started.push(started);
        let taken = std::mem::take(&mut written.taken);
        if std::mem::take(&mut written.fail_finish) {
            return Err(ConnectorError::Other("no space left on device".into()));
        }
        for change in taken {
            match change {
                Change::Create { key, contact, .. } | Change::Update { key, contact, .. } => {
                    written.people.insert(key, contact);
                }
                Change::Remove { key, .. } => {
                    written.people.remove(&key);
                }
            }
        }
        // What the CSV sink keeps of its file once written.
        ctx.store.put("fingerprint", "written")
    }
}

/// A finish that fails leaves nothing confirmed, though the confirm was done while it
/// ran; the next run sends everything again and converges.
#[tokio::test]
async fn a_failed_finish_leaves_nothing_confirmed_and_the_next_run_converges() {
    let f = Fixture::new();
    let sink = FileSink::default();
    let people: Vec<Contact> = (1..=7).map(|i| person(i, "Ann")).collect();
    let source = ListSource::of(&people);
    let run_once = || async {
        let mut state = f.state();
        let mut sink = sink.clone();
        let options = RunOptions::default();
        run(
            &f.pipeline(),
            &source,
            &mut sink,
            &mut state,
            &options,
            &SilentObserver,
        )
        .await
    };
    sink.0.lock().unwrap().fail_finish = true;
    let r = run_once().await;
    assert_eq!(r.status, RunStatus::Failed, "{r:?}");
    assert_eq!(r.created, 0, "nothing made durable is counted");
    let mut state = f.state();
    assert_eq!(state.summaries().unwrap()[0].synced, 0, "nothing confirmed");
    drop(state);
    assert!(sink.0.lock().unwrap().people.is_empty());

    let r = run_once().await;
    assert_eq!((r.status, r.created), (RunStatus::Synced, 7), "{r:?}");
    assert_eq!(sink.0.lock().unwrap().people.len(), 7);
    let mut state = f.state();
    assert_eq!(state.summaries().unwrap()[0].synced, 7);
    assert_eq!(
        state
            .sink_store("sinks.memory")
            .get("fingerprint")
            .unwrap()
            .as_deref(),
        Some("written")
    );
    drop(state);
    let r = run_once().await;
    assert_eq!((r.created, r.updated, r.unchanged), (0, 0, 7), "converged");
    assert_eq!(
        sink.0.lock().unwrap().started,
        [true, true],
        "each finish was started first"
    );
}

/// A source of `people` that fails after them when told to (an export cut off).
struct CutSource {
    people: Vec<Contact>,
    cut: bool,
}

struct CutStream {
    people: std::vec::IntoIter<Contact>,
    line: u64,
    cut: bool,
}

#[async_trait]
impl RecordStream for CutStream {
    async fn next(&mut self) -> Result<Option<SourceItem>, ConnectorError> {
        let Some(contact) = self.people.next() else {
            return match self.cut {
                true => Err(ConnectorError::Other("the export was cut off".into())),
                false => Ok(None),
            };
        };
        self.line += 1;
        let origin = Origin::line("people.csv", self.line);
        Ok(Some(SourceItem::Record(Box::new(SourceRecord::new(
            contact, origin,
        )))))
    }
    async fn finish(self: Box<Self>) -> Result<ReadOutcome, ConnectorError> {
        Ok(ReadOutcome {
            complete: true,
            ..ReadOutcome::default()
        })
    }
}

#[async_trait]
impl Source for CutSource {
    fn capabilities(&self) -> SourceCapabilities {
        SourceCapabilities {
            incremental: false,
            reports_deletions: false,
            full_every: None,
            skips_unchanged: false,
        }
    }
    async fn check(&self) -> Result<(), ConnectorError> {
        Ok(())
    }
    async fn read(&self, _mode: ReadMode) -> Result<Box<dyn RecordStream>, ConnectorError> {
        Ok(Box::new(CutStream {
            people: self.people.clone().into_iter(),
            line: 1,
            cut: self.cut,
        }))
    }
}

/// A first sync into a sink durable at its finish is sent while the source is read:
/// a read that fails at its end has had its whole batches sent by then. It leaves
/// nothing confirmed and nothing written, and the next run sends everyone and
/// converges.
#[tokio::test]
async fn a_first_sync_is_sent_while_it_is_read_and_a_failed_read_leaves_nothing() {
    let f = Fixture::new();
    let sink = FileSink::default();
    let people: Vec<Contact> = (1..=8).map(|i| person(i, "Ann")).collect();
    let first_sync = |cut: bool| {
        let source = CutSource {
            people: people.clone(),
            cut,
        };
        let mut sink = sink.clone();
        let mut state = f.state();
        let pipeline = f.pipeline();
        async move {
            run(
                &pipeline,
                &source,
                &mut sink,
                &mut state,
                &RunOptions::default(),
                &SilentObserver,
            )
            .await
        }
    };

    let r = first_sync(true).await;
    assert_eq!(r.status, RunStatus::Failed, "{r:?}");
    {
        let mut written = sink.0.lock().unwrap();
        assert_eq!(
            written.batch_sizes,
            [3, 3],
            "two batches of three sent before the read failed"
        );
        assert!(written.people.is_empty(), "nothing written");
        // The process ends: what the sink took goes with it.
        written.taken.clear();
        written.batch_sizes.clear();
    }
    let mut state = f.state();
    assert_eq!(state.summaries().unwrap()[0].synced, 0, "nothing confirmed");
    drop(state);

    let r = first_sync(false).await;
    assert_eq!((r.status, r.created), (RunStatus::Synced, 8), "{r:?}");
    {
        let written = sink.0.lock().unwrap();
        assert_eq!(written.batch_sizes, [3, 3, 2]);
        assert_eq!(written.people.len(), 8);
    }
    let mut state = f.state();
    assert_eq!(state.summaries().unwrap()[0].synced, 8);
}
