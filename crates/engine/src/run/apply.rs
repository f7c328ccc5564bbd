//! Steps 4 and 5 of a run: apply the change set in batches, settling each outcome, and record the run.

use std::borrow::Cow;

use super::*;

impl<'r> Run<'r> {
    /// Step 4: applies the change set in batches: what a streamed first sync left
    /// (see [`Streamed`]), then the spooled changes.
    pub(super) async fn apply(
        &mut self,
        sink: &mut dyn Sink,
        mut changes: ChangeSet,
    ) -> Result<(), RunError> {
        let streamed = changes.streamed.take().unwrap_or_default();
        if changes.upserts.len() + changes.removals.len() + streamed.sent + streamed.left() == 0 {
            return Ok(());
        }
        let capabilities = self.capabilities;
        // Counted again from the outcomes: the plan's counts become what really happened.
        self.report.unconfirmed = changes.plan.total().saturating_sub(self.settled);
        self.report.created = 0;
        self.report.updated = 0;
        self.report.removed = 0;
        self.observer
            .phase(Phase::Applying, Some(changes.plan.total()));
        if streamed.sent > 0 {
            self.observer.advance(streamed.sent);
        }
        if streamed.begun {
            // Only now: the sample is drawn across the whole read (see `apply_streamed`).
            self.state.sample_records(&changes.records.records)?;
        } else {
            self.begin_apply(sink, &changes.plan, Some(&changes.records))
                .await?;
        }
        let batch_size = self.batch_size(sink);
        let addresses = changes.addresses.unwrap_or_default();
        let mut left = streamed.buffer;
        while !left.is_empty() {
            let rest = left.split_off(batch_size.min(left.len()));
            let batch = std::mem::replace(&mut left, rest);
            self.send_batch(sink, batch, &addresses, false).await?;
        }
        let mut parts = [
            changes.upserts.into_reader()?,
            changes.removals.into_reader()?,
        ];
        let parts_len = parts.len();
        for at in 0..parts_len {
            loop {
                let mut batch = parts[at].next_batch(batch_size)?;
                // A sink whose one job carries removals too gets the last batch of
                // creates and updates topped up with the first removals.
                if capabilities.mixes_removals && batch.len() < batch_size {
                    for next in parts.iter_mut().skip(at + 1) {
                        let more = next.next_batch(batch_size - batch.len())?;
                        batch.extend(more);
                        if batch.len() == batch_size {
                            break;
                        }
                    }
                }
                if batch.is_empty() {
                    break;
                }
                self.send_batch(sink, batch, &addresses, false).await?;
            }
        }
        let run_id = self.report.run;
        self.observer.phase(Phase::Finishing, None);
        let committed =
            capabilities.durable_at_finish && self.confirm_while_finishing(sink, run_id)?;
        let finished = {
            let mut lent = self.lend();
            sink.finish(&mut lent.context())
                .await
                .map_err(RunError::Sink)
        };
        // Committed, the changes are durable and counted below, even if the sink then
        // failed to end its own work (its file's fingerprint not kept), which still
        // fails the run; otherwise nothing is confirmed unless the finish succeeded.
        let finished = match (committed, finished) {
            (false, Err(e)) => return Err(e),
            (_, finished) => finished,
        };
        if capabilities.durable_at_finish {
            if !committed {
                let started = Instant::now();
                let confirmed = self.state.confirm_finished(&self.pipeline.name, run_id)?;
                tracing::debug!(
                    confirmed,
                    seconds = started.elapsed().as_secs_f64(),
                    "the sink's changes are recorded as synced after its finish"
                );
            }
            // Made durable now, and only now: what the report counts.
            let done = std::mem::take(&mut self.awaiting_finish);
            self.report.created += done.created;
            self.report.updated += done.updated;
            self.report.removed += done.removed;
            self.report.unconfirmed = self
                .report
                .unconfirmed
                .saturating_sub(done.created + done.updated + done.removed);
        }
        finished?;
        let summary = sink.summary();
        self.report.unknown_in_sink = summary.unknown_in_sink;
        self.report.imports = summary.jobs;
        self.report.sink_plan = summary.how;
        self.report.outcome_reads = summary.reads;
        Ok(())
    }

    /// Starts the finish of a sink durable at its finish ([`Sink::start_finish`]) and,
    /// while its part runs (the CSV file written), confirms the run's changes in a
    /// transaction the state holds open ([`PendingJournal::hold_confirm`]); commits it
    /// once that part says the run is durable, or drops it. Returns whether it
    /// committed; if not (a sink that starts nothing, a confirm too large to hold, or a
    /// part that failed), the confirm comes after the finish.
    ///
    /// The wait is blocking, with no await while the confirm is held: another pipeline
    /// of this process (`sync --all --jobs`, on the same task) that wrote to the state
    /// meanwhile would wait for its write lock on the very thread this run needs.
    fn confirm_while_finishing(
        &mut self,
        sink: &mut dyn Sink,
        run_id: i64,
    ) -> Result<bool, RunError> {
        let Some(started) = sink.start_finish().map_err(RunError::Sink)? else {
            return Ok(false);
        };
        let began = Instant::now();
        let held = self
            .state
            .hold_confirm(&self.pipeline.name, run_id)
            .unwrap_or_else(|e| {
                tracing::debug!("the confirm waits for the sink's finish: {e}");
                None
            });
        let Some(confirmed) = held else {
            return Ok(false);
        };
        let confirming = began.elapsed();
        let durable = started.wait();
        tracing::debug!(
            confirmed,
            confirm_seconds = confirming.as_secs_f64(),
            seconds = began.elapsed().as_secs_f64(),
            durable,
            "the sink's changes confirmed while it finished"
        );
        if durable {
            self.state.commit_confirm()?;
        } else {
            self.state.abandon_confirm()?;
        }
        Ok(durable)
    }

    /// Tells the sink the run's work begins, and readies the state for its records:
    /// a dictionary trained on `records` (a sample of them, when given), and the creates
    /// of a sink durable at its finish kept as one history entry for the run.
    async fn begin_apply(
        &mut self,
        sink: &mut dyn Sink,
        plan: &ChangePlan,
        records: Option<&RecordSample>,
    ) -> Result<(), RunError> {
        {
            let mut lent = self.lend();
            sink.begin(plan, &mut lent.context())
                .await
                .map_err(RunError::Sink)?;
        }
        if let Some(records) = records {
            self.state.sample_records(&records.records)?;
        }
        let settings = &self.pipeline.settings;
        self.creates_per_run = self.capabilities.durable_at_finish
            && settings.audit_days > 0
            && plan.creates > 0
            && self.state.record_created_run(
                &self.pipeline.name,
                self.report.run,
                chrono::Utc::now().timestamp(),
                settings.audit_values,
            )?;
        Ok(())
    }

    /// The size of the sink's batches. Asked after `begin`: a sink may size its
    /// batches by how it chose to write (Actito: one import a batch in bulk, small
    /// batches one by one).
    pub(super) fn batch_size(&self, sink: &dyn Sink) -> usize {
        self.pipeline
            .settings
            .batch_size
            .unwrap_or(usize::MAX)
            .min(sink.capabilities().max_batch)
            .max(1)
    }

    /// Sends the creates a streamed first sync planned so far, a whole batch at a time,
    /// while the read goes on; the first batch begins the sink's work. What is left
    /// when the read ends is sent by [`Run::apply`].
    pub(super) async fn apply_streamed(
        &mut self,
        sink: &mut dyn Sink,
        changes: &mut ChangeSet,
    ) -> Result<(), RunError> {
        let ChangeSet {
            streamed: Some(streamed),
            plan,
            ..
        } = changes
        else {
            return Ok(());
        };
        if !streamed.begun {
            // No dictionary trained yet: a sample of the first batch (of a file sorted
            // by id) made the records a third larger than one drawn across the whole
            // read, which `apply` gives the state once the read is done. The state
            // compresses staged records only at the confirm.
            self.begin_apply(sink, plan, None).await?;
            streamed.begun = true;
            streamed.batch_size = self.batch_size(sink);
            tracing::info!(
                batch = streamed.batch_size,
                "a first sync: sent to the sink as it is read"
            );
        }
        let addresses = AddressBook::default();
        while streamed.left() >= streamed.batch_size as u64 {
            // The next batch's room made at once: grown a push at a time, a first
            // sync's buffer was copied over and over (a fifth of the diff's time).
            let mut rest = Vec::with_capacity(streamed.batch_size.min(STREAMED_ROOM));
            rest.extend(streamed.buffer.drain(streamed.batch_size..));
            let batch = std::mem::replace(&mut streamed.buffer, rest);
            streamed.sent += batch.len() as u64;
            self.send_batch(sink, batch, &addresses, true).await?;
        }
        Ok(())
    }

    /// Sends `changes` as the run's next batch. Sent `while_reading` (a streamed first
    /// sync), they count as unconfirmed and not in the progress, which `apply` counts
    /// once the read is done.
    async fn send_batch(
        &mut self,
        sink: &mut dyn Sink,
        changes: Vec<Change>,
        addresses: &AddressBook,
        while_reading: bool,
    ) -> Result<(), RunError> {
        if self.options.cancel.is_cancelled() {
            return Err(RunError::Cancelled);
        }
        self.batches += 1;
        let size = changes.len() as u64;
        if while_reading {
            // Not confirmed until the finish; `apply` counts every change planned.
            self.report.unconfirmed += size;
        }
        let batch = ChangeBatch {
            id: format!("run-{}-batch-{}", self.report.run, self.batches),
            changes,
        };
        self.apply_batch(sink, batch, addresses).await?;
        if !while_reading {
            self.observer.advance(size);
        }
        Ok(())
    }

    /// What the state records of each change of `batch`, in its order.
    fn pending_rows(&self, batch: &ChangeBatch) -> Vec<PendingRow> {
        batch
            .changes
            .iter()
            .map(|change| self.pending_row(Cow::Borrowed(change)))
            .collect()
    }

    /// What the state records of `change`: given, its key and contact are moved, not
    /// copied (a first sync's million records).
    fn pending_row(&self, change: Cow<'_, Change>) -> PendingRow {
        let kind = change.kind();
        let content_hash = change
            .contact()
            .map(|c| self.pipeline.diff_hash(c))
            .unwrap_or(0);
        let email = change.email().map(str::to_string);
        let (key, record) = match change {
            Cow::Borrowed(change) => (change.key().clone(), change.contact().cloned()),
            Cow::Owned(
                Change::Create { key, contact, .. } | Change::Update { key, contact, .. },
            ) => (key, Some(contact)),
            Cow::Owned(Change::Remove { key, .. }) => (key, None),
        };
        PendingRow {
            key,
            kind,
            content_hash,
            email,
            record,
        }
    }

    /// Records one batch as pending, sends it, and settles each outcome. A change the
    /// address rule settles ([`AddressBook::screen`]) is recorded and settled with the
    /// others, but not sent.
    pub(super) async fn apply_batch(
        &mut self,
        sink: &mut dyn Sink,
        batch: ChangeBatch,
        addresses: &AddressBook,
    ) -> Result<(), RunError> {
        let durable_at_finish = self.capabilities.durable_at_finish;
        // A sink that keeps nothing before it finishes is handed the batch first and the
        // batch recorded after, already applied, in one write: a crash in between loses
        // nothing, since that sink has made nothing durable yet (pending first, then
        // settled as applied, took a second pass over every row of a first sync).
        let mut rows = Vec::new();
        if !durable_at_finish {
            rows = self.pending_rows(&batch);
            self.state
                .record_pending(&self.pipeline.name, self.report.run, &batch.id, &rows)?;
        }
        let screened = addresses.screen(&batch);
        let sent = screened.sent.as_ref().unwrap_or(&batch);
        let answered = if sent.changes.is_empty() {
            Vec::new()
        } else {
            let mut lent = self.lend();
            sink.apply(sent, &mut lent.context())
                .await
                .map_err(RunError::Sink)?
        };
        if answered.len() != sent.changes.len() {
            return Err(RunError::OutcomeCount {
                got: answered.len(),
                expected: sent.changes.len(),
            });
        }
        let mut answered = answered.into_iter();
        let outcomes: Vec<Outcome> = screened
            .taken
            .iter()
            .map(|taken| match taken {
                Some(_) => Outcome::applied(),
                None => answered.next().unwrap_or(Outcome::Unknown {
                    reason: "no outcome".into(),
                }),
            })
            .collect();
        // Taken whole, as nearly always: recorded applied at once. Otherwise recorded
        // now as sent, and settled one by one below, as for any other sink (as is a
        // batch with a change the address rule settled, which has its own history).
        if durable_at_finish {
            let handles: Option<Vec<Option<String>>> = outcomes
                .iter()
                .zip(&screened.taken)
                .map(|(outcome, taken)| match (outcome, taken) {
                    (Outcome::Applied { handle }, None) => Some(handle.clone()),
                    _ => None,
                })
                .collect();
            let (pipeline, run) = (&self.pipeline.name, self.report.run);
            let Some(handles) = handles else {
                rows = self.pending_rows(&batch);
                self.state.record_pending(
                    &self.pipeline.name,
                    self.report.run,
                    &batch.id,
                    &rows,
                )?;
                return self.settle_batch(batch, rows, outcomes, screened.taken);
            };
            // Every change applied and none taken by the address rule: counted once the
            // finish succeeds, told `sent` until then. The history first, then the rows
            // given to the state, moved out of the batch (a first sync's million records
            // are not copied).
            let told = vec![("sent", None); batch.changes.len()];
            for change in &batch.changes {
                self.awaiting_finish.count(change.kind());
            }
            self.audit(&batch, told, self.creates_per_run)?;
            let rows = batch
                .changes
                .into_iter()
                .map(|change| self.pending_row(Cow::Owned(change)))
                .collect();
            self.state
                .record_awaiting_finish(pipeline, run, &batch.id, rows, handles)?;
            return Ok(());
        }
        self.settle_batch(batch, rows, outcomes, screened.taken)
    }

    /// Settles each outcome of a batch recorded pending (`rows`, in its order).
    fn settle_batch(
        &mut self,
        batch: ChangeBatch,
        rows: Vec<PendingRow>,
        outcomes: Vec<Outcome>,
        taken: Vec<Option<String>>,
    ) -> Result<(), RunError> {
        let durable_at_finish = self.capabilities.durable_at_finish;
        let mut settlements = Vec::with_capacity(outcomes.len());
        let mut settled = 0u64;
        let mut audit: Vec<(&'static str, Option<String>)> = Vec::with_capacity(outcomes.len());
        for (((change, row), outcome), taken) in
            batch.changes.iter().zip(rows).zip(outcomes).zip(taken)
        {
            let kind = change.kind();
            let key = row.key.clone();
            let kept_handle = || change.previous().and_then(|p| p.handle.clone());
            match outcome {
                Outcome::Applied { handle } => {
                    if let Some(why) = taken {
                        settled += 1;
                        tracing::info!(key = %key, "{why}");
                        self.report.address_taken += 1;
                        audit.push(("address_taken", Some(why)));
                    } else if durable_at_finish {
                        // Taken, not yet made durable: counted (and confirmed) once the
                        // sink's finish succeeds; the history says `sent` until then.
                        audit.push(("sent", None));
                        self.awaiting_finish.count(kind);
                    } else {
                        settled += 1;
                        audit.push(("applied", None));
                        match kind {
                            ChangeKind::Create => self.report.created += 1,
                            ChangeKind::Update => self.report.updated += 1,
                            ChangeKind::Remove => self.report.removed += 1,
                        }
                    }
                    settlements.push(if durable_at_finish {
                        Settlement::AwaitingFinish { key, handle }
                    } else if kind == ChangeKind::Remove {
                        Settlement::Forgotten { key }
                    } else {
                        Settlement::Synced {
                            key,
                            entry: SyncedEntry {
                                content_hash: row.content_hash,
                                email: row.email,
                                handle: handle.or_else(kept_handle),
                                record: row.record.map(Box::new),
                            },
                        }
                    });
                }
                Outcome::Rejected {
                    reason,
                    field,
                    retry,
                } => {
                    audit.push(("rejected", Some(reason.clone())));
                    settled += 1;
                    self.reject(Rejection {
                        stage: RejectStage::Sink,
                        origin: change.origin(),
                        key: Some(&key),
                        email: change.email(),
                        field: field.as_deref(),
                        reason,
                        contact: change.contact(),
                        raw: None,
                    })?;
                    settlements.push(match (retry, kind) {
                        (true, _) => Settlement::Dropped { key },
                        // Final: remember the content so it is not re-sent every night,
                        // only when the person changes again. The last-sent record stays
                        // what the sink last accepted.
                        (false, ChangeKind::Remove) => Settlement::Forgotten { key },
                        (false, _) => Settlement::Synced {
                            key,
                            entry: SyncedEntry {
                                content_hash: row.content_hash,
                                email: row.email,
                                handle: kept_handle(),
                                record: None,
                            },
                        },
                    });
                }
                Outcome::Unknown { reason } => {
                    audit.push(("unknown", Some(reason.clone())));
                    self.report.unknown += 1;
                    tracing::debug!(key = %key, "outcome unknown, sent again next run: {reason}");
                    // Stays pending; the next run settles or re-sends it.
                }
            }
        }
        // The history first: writing it writes out a create kept as its run's one
        // entry from the record that a settlement may be about to change.
        self.audit(&batch, audit, false)?;
        if !settlements.is_empty() {
            self.state
                .settle(&self.pipeline.name, &batch.id, &settlements)?;
        }
        // What stays pending (unknown outcomes) is still not confirmed.
        self.report.unconfirmed = self.report.unconfirmed.saturating_sub(settled);
        self.settled += settled;
        Ok(())
    }

    /// Keeps what the sink was asked to do to each person of `batch`, and what came of
    /// it, for `contactsync history` (unless `audit_days = 0`); with `creates_kept`, the
    /// batch's creates are kept by their run's one entry
    /// ([`AuditLog::record_created_run`]) and get none of their own.
    pub(super) fn audit(
        &mut self,
        batch: &ChangeBatch,
        outcomes: Vec<(&'static str, Option<String>)>,
        creates_kept: bool,
    ) -> Result<(), RunError> {
        let settings = &self.pipeline.settings;
        if settings.audit_days == 0 {
            return Ok(());
        }
        let at = chrono::Utc::now().timestamp();
        let entries: Vec<AuditEntry> = batch
            .changes
            .iter()
            .zip(outcomes)
            .filter(|(change, _)| !(creates_kept && change.kind() == ChangeKind::Create))
            .map(|(change, (outcome, reason))| {
                // A create keeps its record in the compact form, not as JSON.
                let created = (settings.audit_values && change.kind() == ChangeKind::Create)
                    .then(|| change.contact().cloned().map(Box::new))
                    .flatten();
                let changes = if created.is_some() {
                    Vec::new()
                } else {
                    change.field_changes()
                };
                let fields = if created.is_some() {
                    String::new()
                } else if settings.audit_values {
                    let map: serde_json::Map<String, serde_json::Value> = changes
                        .into_iter()
                        .map(|c| (c.field.to_string(), serde_json::json!([c.before, c.after])))
                        .collect();
                    serde_json::Value::Object(map).to_string()
                } else {
                    let names: Vec<String> =
                        changes.into_iter().map(|c| c.field.to_string()).collect();
                    serde_json::Value::from(names).to_string()
                };
                AuditEntry {
                    pipeline: self.pipeline.name.clone(),
                    run: self.report.run,
                    at,
                    key: change.key().to_string(),
                    email: change.email().map(str::to_string),
                    kind: change.kind().as_str().to_string(),
                    outcome: outcome.to_string(),
                    reason,
                    fields,
                    created,
                }
            })
            .collect();
        self.state.record_audit(&entries)?;
        Ok(())
    }

    /// Step 5: decides the run's status and records the run in the state.
    /// `transactions_before` is the state's count of committed transactions when the
    /// run began, for a backend that counts them.
    pub(super) fn record(
        &mut self,
        result: Result<Completion, RunError>,
        started: Instant,
        transactions_before: Option<u64>,
    ) {
        // The error leaves the process (summary, report, runs, webhooks): whatever its
        // origin, no secret of this process stays in it.
        let result = result.map_err(|e| match e {
            RunError::Locked(message) => {
                RunError::Locked(contactsync_core::redact_secrets(&message).into_owned())
            }
            e => e,
        });
        let completion = match result {
            Ok(completion) => Some(completion),
            Err(RunError::Locked(message)) => {
                // Another run holds the pipeline: this one did nothing, and records nothing.
                self.report.status = RunStatus::Locked;
                self.report.error = Some(message);
                self.report.duration_ms = started.elapsed().as_millis() as u64;
                return;
            }
            Err(RunError::Cancelled) => {
                self.report.status = RunStatus::Interrupted;
                self.report.error = Some(RunError::Cancelled.to_string());
                None
            }
            Err(e) => {
                self.report.status = RunStatus::Failed;
                self.report.error =
                    Some(contactsync_core::redact_secrets(&e.to_string()).into_owned());
                None
            }
        };
        let report = &mut self.report;
        if report.status == RunStatus::Synced {
            if report.unknown > 0 {
                report.status = RunStatus::Failed;
                report.error = Some(format!(
                    "{} changes have an unknown outcome; the next run sends them again",
                    report.unknown
                ));
            } else if report.removals_held > 0 {
                report.status = RunStatus::RemovalsHeld;
            } else if report.rejected > 0 {
                report.status = RunStatus::FinishedWithRejects;
            }
        }
        // A run the user interrupted that therefore could not finish (its job's
        // outcome unknown, a call cut short) was interrupted, not broken.
        if report.status == RunStatus::Failed && self.options.cancel.is_cancelled() {
            report.status = RunStatus::Interrupted;
        }
        if report.status.succeeded() || report.status == RunStatus::Refused {
            report.unconfirmed = 0;
        }
        report.duration_ms = started.elapsed().as_millis() as u64;
        report.state_transactions = self
            .state
            .transactions_committed()
            .zip(transactions_before)
            .map(|(now, before)| now.saturating_sub(before));
        if !self.options.dry_run && report.run > 0 {
            let succeeded = report.status.succeeded();
            let (cursor, full_read) = match completion.filter(|_| succeeded) {
                Some(c) => (c.cursor, c.full_read),
                None => (None, false),
            };
            let json = serde_json::to_string(&*report).unwrap_or_default();
            let audit_days = self.pipeline.settings.audit_days;
            if audit_days > 0 {
                let before = chrono::Utc::now().timestamp() - i64::from(audit_days) * 86_400;
                match self.state.prune_audit(&self.pipeline.name, before) {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::debug!("pruned {n} audit entries older than {audit_days} days")
                    }
                    Err(e) => tracing::warn!("could not prune the audit: {e}"),
                }
            }
            let kept = std::mem::take(&mut self.kept_rejects);
            if let Err(e) = self.state.record_rejects(
                &self.pipeline.name,
                report.run,
                chrono::Utc::now().timestamp(),
                &kept,
            ) {
                tracing::warn!("could not keep the run's rejects in the state (the rejects file has them): {e}");
            }
            if let Err(e) = self.state.finish_run(
                &self.pipeline.name,
                report.run,
                report.status.as_str(),
                &json,
                cursor.as_deref(),
                full_read,
            ) {
                report.status = RunStatus::Failed;
                report.error = Some(e.to_string());
            }
        }
    }
}
