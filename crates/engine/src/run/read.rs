//! Steps 1 and 2 of a run: recover what an interrupted run left pending, then read the source and diff it against the state.

use super::memo::MemoWriter;
use super::*;
use contactsync_core::KnownContent;

impl<'r> Run<'r> {
    /// Step 1: settles batches an interrupted run left pending.
    pub(super) async fn recover(&mut self, sink: &mut dyn Sink) -> Result<(), RunError> {
        self.observer.phase(Phase::Recovering, None);
        let batches = self.state.pending_batches(&self.pipeline.name)?;
        for (batch, rows) in batches {
            tracing::info!(batch = %batch.id, changes = batch.records.len(), "settling a batch an earlier run left unconfirmed");
            let outcomes = {
                let mut lent = self.lend();
                sink.recover(&batch, &mut lent.context())
                    .await
                    .map_err(RunError::Sink)?
            };
            let Some(outcomes) = outcomes else {
                // Sent again by this run's diff, since `synced` still holds the old content.
                self.state.drop_pending(&self.pipeline.name, &batch.id)?;
                continue;
            };
            if outcomes.len() != rows.len() {
                return Err(RunError::OutcomeCount {
                    got: outcomes.len(),
                    expected: rows.len(),
                });
            }
            let settlements: Vec<Settlement> = rows
                .into_iter()
                .zip(outcomes)
                .map(|(row, outcome)| match (outcome, row.kind) {
                    (Outcome::Applied { .. }, ChangeKind::Remove) => {
                        Settlement::Forgotten { key: row.key }
                    }
                    (Outcome::Applied { handle }, _) => row.applied(handle),
                    // Whatever else: the diff of this run decides again.
                    _ => Settlement::Dropped { key: row.key },
                })
                .collect();
            self.report.recovered += settlements.len() as u64;
            self.state
                .settle(&self.pipeline.name, &batch.id, &settlements)?;
        }
        Ok(())
    }

    /// Step 2: reads the source and diffs every record against the state.
    pub(super) async fn read_and_diff(
        &mut self,
        source: &dyn Source,
        sink: &mut dyn Sink,
        last_full: Option<i64>,
    ) -> Result<ChangeSet, RunError> {
        let settings = &self.pipeline.settings;
        let started = std::time::Instant::now();
        let mut synced = Vec::new();
        self.state
            .scan_index(&self.pipeline.name, &mut |key_hash, content_hash| {
                synced.push((key_hash, content_hash))
            })?;
        let scanned = started.elapsed().as_secs_f64();
        let index = ContactIndex::of_synced(synced);
        tracing::debug!(
            people = index.population(),
            scanned,
            seconds = started.elapsed().as_secs_f64(),
            "the synced index loaded"
        );
        let resend_all = self.sink_integrity(sink, index.population()).await?;
        let read_mode = self.read_mode(source, last_full, resend_all)?;
        tracing::info!(pipeline = %self.pipeline.name, mode = ?read_mode, "reading");

        let spool_dir = self.options.spool_dir.as_deref();
        let mut diff = Diff {
            changes: ChangeSet {
                upserts: ChangeSpool::create(spool_dir)?,
                removals: ChangeSpool::create(spool_dir)?,
                plan: ChangePlan::default(),
                population: index.population(),
                read: ReadOutcome::default(),
                full_read: read_mode == ReadMode::Full,
                records: RecordSample::default(),
                addresses: None,
                streamed: None,
            },
            index,
            mapping: FieldMapping::new(settings),
            samples: Samples::new(self.options.sample_size),
            plan_file: self
                .options
                .plan
                .as_deref()
                .map(PlanWriter::create)
                .transpose()?,
            emails: self
                .capabilities
                .addresses_by_email
                .then(AddressBook::default),
            keyless_rejects: 0,
            resend_all,
            waiting: Vec::new(),
            lookups: 0,
            memo: None,
        };

        // A first sync into a sink durable at its finish is sent as it is read.
        let streams = !self.options.dry_run
            && self.capabilities.durable_at_finish
            && diff.index.population() == 0
            && diff.emails.is_none();
        if streams {
            let batch_size = self.batch_size(sink);
            diff.changes.streamed = Some(Streamed {
                buffer: Vec::with_capacity(batch_size.min(STREAMED_ROOM)),
                batch_size,
                ..Streamed::default()
            });
        }
        self.observer.phase(Phase::Reading, None);
        // A record unchanged since it was sent can be settled by the source's hashes
        // alone, without building it: compared as read (no mapping, no shaping) by the
        // state's content hashes, and in a pipeline that maps by its memo of what each
        // record as read became, kept only for a source that skips. Not with an
        // address book to keep, which needs every record's address.
        let as_read = diff.mapping.is_identity() && self.pipeline.shaping.is_none();
        let memo_kept = !as_read && diff.emails.is_none() && source.capabilities().skips_unchanged;
        let fingerprint = self.pipeline.mapping_fingerprint();
        diff.memo = (memo_kept && !self.options.dry_run)
            .then(|| MemoWriter::new(fingerprint, diff.index.population()));
        let compared = diff.index.population() > 0 && !diff.resend_all && diff.emails.is_none();
        let known: Option<std::sync::Arc<dyn KnownContent>> = if !compared {
            None
        } else if as_read {
            Some(diff.index.known())
        } else {
            Some(self.known_as_read(&mut diff.index, fingerprint, diff.memo.as_mut())?)
        };
        let stream = match known {
            Some(known) => {
                let unchanged = Unchanged {
                    known,
                    rule: settings.key,
                };
                source.read_skipping_unchanged(read_mode, unchanged).await
            }
            None => source.read(read_mode).await,
        }
        .map_err(RunError::Source)?;
        let preparing = Preparing {
            mapping: diff.mapping.clone(),
            shaping: self.pipeline.shaping.clone(),
            rule: settings.key,
            // With nobody synced (a first sync) no record is compared by content.
            hash_content: diff.index.population() > 0 || diff.memo.is_some(),
            hash_source: diff.memo.is_some(),
        };
        let mut feed = Feed::new(stream, preparing);
        loop {
            let Some(item) = feed.next().await.map_err(RunError::Source)? else {
                break;
            };
            if let Some(ahead) = feed.fresh_batch() {
                // Once a batch: the token takes a lock to answer.
                if self.options.cancel.is_cancelled() {
                    return Err(RunError::Cancelled);
                }
                diff.index.warm(ahead.iter().filter_map(Staged::key_hash));
            }
            self.report.read += 1;
            if self.report.read.is_multiple_of(4096) {
                self.observer.advance(4096);
            }
            match item {
                Staged::Rejected(error) => self.source_rejected(&mut diff, &error)?,
                Staged::Unchanged(row) => self.diff_unchanged(&mut diff, &row)?,
                staged => self.diff_record(&mut diff, staged)?,
            }
            if let Some(streamed) = &diff.changes.streamed {
                if streamed.left() >= streamed.batch_size as u64 {
                    self.apply_streamed(sink, &mut diff.changes).await?;
                }
            }
        }
        self.plan_waiting(&mut diff)?;
        if let Some(mut memo) = diff.memo.take() {
            self.write_memo(&mut memo)?;
        }
        diff.changes.read = feed.finish().await.map_err(RunError::Source)?;
        self.report.complete_read = diff.changes.read.complete;
        self.observer.advance(self.report.read % 4096);
        self.sweep(&mut diff)?;

        if let Some(plan_file) = diff.plan_file.as_mut() {
            plan_file.flush()?;
        }
        diff.changes.addresses = diff.emails.take();
        let plan = diff.changes.plan;
        self.report.created = plan.creates;
        self.report.updated = plan.updates;
        self.report.removed = plan.removals;
        self.report.sample = diff.samples.into_changes();
        Ok(diff.changes)
    }

    /// Whether the sink still holds what the state says (`false`), or everyone is sent
    /// again to rebuild it (`true`).
    async fn sink_integrity(
        &mut self,
        sink: &mut dyn Sink,
        population: u64,
    ) -> Result<bool, RunError> {
        let integrity = {
            let mut lent = self.lend();
            sink.verify(population, &mut lent.context())
                .await
                .map_err(RunError::Sink)?
        };
        Ok(match integrity {
            SinkIntegrity::Intact => false,
            SinkIntegrity::Rebuild { reason } => {
                tracing::warn!("{reason}: everyone is sent again and the sink is rebuilt");
                self.report.rebuilt = Some(reason);
                true
            }
            SinkIntegrity::Foreign { reason } => {
                tracing::warn!(
                    "{reason}: removals cannot be detected for people synced before this state existed; they are kept"
                );
                self.report.foreign = Some(reason);
                false
            }
        })
    }

    /// Which read: full when asked, when the source cannot do better, when there is
    /// no cursor yet, when `full_every` (the pipeline's, else the source's) says it is
    /// time, or when the sink is rebuilt from this read.
    fn read_mode(
        &mut self,
        source: &dyn Source,
        last_full: Option<i64>,
        resend_all: bool,
    ) -> Result<ReadMode, RunError> {
        let cursor = self.state.cursor(&self.pipeline.name)?;
        let full_every = self
            .pipeline
            .settings
            .full_every
            .or(source.capabilities().full_every)
            .filter(|&n| n > 0);
        let full_due = match (full_every, last_full) {
            (Some(n), Some(last)) => self.report.run - last >= i64::from(n),
            (Some(_), None) => true,
            (None, _) => false,
        };
        Ok(
            if self.options.full
                || resend_all
                || !source.capabilities().incremental
                || cursor.is_none()
                || full_due
            {
                ReadMode::Full
            } else {
                ReadMode::Incremental { cursor }
            },
        )
    }

    /// A record the source could not read: rejected, and still seen when its key can
    /// be trusted (from the fields it could read, under the pipeline's mapping).
    fn source_rejected(&mut self, diff: &mut Diff, error: &RecordError) -> Result<(), RunError> {
        let rule = self.pipeline.settings.key;
        let key = error
            .partial
            .as_deref()
            .and_then(|partial| {
                let mut partial = partial.clone();
                // The key may come from a mapped field; a mapping error only means the
                // key is taken from the fields as read.
                let _ = diff.mapping.apply(&mut partial);
                trusted_key(&partial, rule)
            })
            .or_else(|| error.key.clone().filter(|k| rule_allows(rule, k)));
        self.seen_rejected(diff, key.as_ref());
        self.reject(Rejection {
            stage: RejectStage::Source,
            origin: &error.origin,
            key: key.as_ref().or(error.key.as_ref()),
            email: error.partial.as_ref().and_then(|c| c.email.as_deref()),
            field: error.field.as_deref(),
            reason: error.reason.clone(),
            contact: None,
            raw: error.raw.as_deref(),
        })
    }
}
