//! The diff of one record against the state, the sweep of the unseen, the one rejection path, and step 3, the removal guard.

use super::*;

impl<'r> Run<'r> {
    /// Diffs one record read from the source, after the stage that mapped and shaped it.
    pub(super) fn diff_record(&mut self, diff: &mut Diff, staged: Staged) -> Result<(), RunError> {
        let rule = self.pipeline.settings.key;
        let Some((
            SourceRecord {
                contact,
                origin,
                deleted,
            },
            prepared,
        )) = self.ready(diff, staged)?
        else {
            return Ok(());
        };
        let Some(key_hash) = prepared.key_hash else {
            return self.reject_keyless(diff, &origin, &contact);
        };
        let Some(seen) = self.screen(diff, &origin, &contact, deleted, &prepared, key_hash)? else {
            return Ok(());
        };
        if let (Some(memo), Some(source_hash), false) =
            (diff.memo.as_mut(), prepared.source_hash, deleted)
        {
            if memo.keep(key_hash, source_hash, prepared.content_hash) {
                self.write_memo(memo)?;
            }
        }
        // Most people read are unchanged: they are settled by their hashes alone, and
        // their key is never built.
        if let (Seen::Synced(synced_hash), false, false) = (seen, deleted, diff.resend_all) {
            if synced_hash == prepared.content_hash {
                self.report.unchanged += 1;
                return Ok(());
            }
        }
        // The same rule gave the key hash, so there is a key; the branch only keeps a
        // mistake here from becoming a panic.
        let Some(key) = contact.key(rule) else {
            return self.reject_keyless(diff, &origin, &contact);
        };
        let (change, lookup) = match seen {
            Seen::Duplicate => return Ok(()),
            Seen::New if deleted => {
                self.report.unchanged += 1;
                return Ok(());
            }
            Seen::Synced(_) if deleted => (
                Change::Remove {
                    previous: SyncedEntry::default(),
                    key,
                    origin,
                },
                Some(key_hash),
            ),
            Seen::New => match self.create(key, contact, origin)? {
                Some(change) => (change, None),
                None => return Ok(()),
            },
            Seen::Synced(_) => (
                Change::Update {
                    previous: SyncedEntry::default(),
                    key,
                    contact,
                    origin,
                },
                Some(key_hash),
            ),
        };
        self.wait(diff, change, lookup)
    }

    /// The record and what the stage prepared of it, when the stage made it ready;
    /// else the stage's verdict is taken (rejected, out of scope) and `None` returned.
    fn ready(
        &mut self,
        diff: &mut Diff,
        staged: Staged,
    ) -> Result<Option<(SourceRecord, Prepared)>, RunError> {
        match staged {
            Staged::Ready(record, prepared) => return Ok(Some((*record, prepared))),
            // Taken before the diff (see `Run::read_and_diff`).
            Staged::Rejected(_) | Staged::Unchanged(_) => {}
            Staged::Unmapped {
                record,
                field,
                reason,
            } => self.reject_seen(diff, &record.origin, &record.contact, &field, reason)?,
            Staged::Out(contact) => {
                self.report.out_of_scope += 1;
                // Kept: seen, so not removed. Removed: left unseen, so the sweep
                // removes whoever was synced (through the guard).
                if self.pipeline.settings.out_of_scope == OutOfScope::Keep {
                    if let Some(key) = trusted_key(&contact, self.pipeline.settings.key) {
                        diff.index.mark(key.hash64());
                    }
                }
            }
            Staged::ScopeError {
                origin,
                contact,
                reason,
            } => {
                let reason = format!("where: {reason}");
                self.reject_seen(diff, &origin, &contact, "where", reason)?;
            }
            Staged::MapError { origin, failure } => {
                let FieldFailure {
                    contact,
                    field,
                    reason,
                } = *failure;
                let reason = format!("map: {reason}");
                self.reject_seen(diff, &origin, &contact, &field, reason)?;
            }
        }
        Ok(None)
    }

    /// Marks the record seen and refuses what cannot be sent: an invalid email, a key
    /// read twice, an address another key of this read holds (for a sink that finds
    /// people by email). Returns how the index had the key, or `None` when refused.
    fn screen(
        &mut self,
        diff: &mut Diff,
        origin: &Origin,
        contact: &Contact,
        deleted: bool,
        prepared: &Prepared,
        key_hash: u64,
    ) -> Result<Option<Seen>, RunError> {
        let rule = self.pipeline.settings.key;
        if !deleted && !prepared.email_valid {
            let trusted = trusted_key(contact, rule);
            self.seen_rejected(diff, trusted.as_ref());
            let email = contact.email.as_deref().unwrap_or_default();
            let reason = format!("not a valid email address: {email:?}");
            let key = contact.key(rule);
            self.reject(Rejection::of_record(
                origin,
                contact,
                key.as_ref(),
                "email",
                reason,
            ))?;
            return Ok(None);
        }
        let seen = diff.index.mark(key_hash);
        if seen == Seen::Duplicate {
            match contact.key(rule) {
                Some(key) => self.reject_duplicate(origin, contact, &key)?,
                None => self.reject_keyless(diff, origin, contact)?,
            }
            return Ok(None);
        }
        if let (Some(emails), Some(email), false) =
            (diff.emails.as_mut(), contact.email.as_deref(), deleted)
        {
            if let Some((_, first_line)) = emails.hold(email, key_hash, origin_line(origin)) {
                let earlier = if first_line > 0 {
                    format!("the record on line {first_line}")
                } else {
                    "an earlier record of this read".to_string()
                };
                let reason = format!(
                    "duplicate email {email}: {earlier} has it under another key, and the sink finds people by email, \
                     so this record would overwrite that person; the first one wins. Give each person their own address"
                );
                let key = contact.key(rule);
                self.reject(Rejection::of_record(
                    origin,
                    contact,
                    key.as_ref(),
                    "email",
                    reason,
                ))?;
                return Ok(None);
            }
        }
        Ok(Some(seen))
    }

    /// Settles a record the source found as the state holds it. Its key is in the
    /// state, so only a second record of the same key is more than seen: a duplicate,
    /// rejected with the content it shares with the state's record.
    pub(super) fn diff_unchanged(
        &mut self,
        diff: &mut Diff,
        row: &UnchangedRow,
    ) -> Result<(), RunError> {
        if let Seen::Synced(_) = diff.index.mark_at(row.key_hash, row.at) {
            self.report.unchanged += 1;
            return Ok(());
        }
        let origin = row.origin();
        match self
            .state
            .synced_many(&self.pipeline.name, &[row.key_hash])?
            .pop()
            .flatten()
        {
            Some(synced) => {
                let contact = synced.entry.record.map(|c| *c).unwrap_or_default();
                self.reject_duplicate(&origin, &contact, &synced.key)
            }
            // The state's row is gone while the run holds its lock: not expected, and
            // still a record this read cannot send twice.
            None => self.reject(Rejection {
                stage: RejectStage::Source,
                origin: &origin,
                key: None,
                email: None,
                field: None,
                reason: "duplicate key: an earlier record of this read has the same key, and the first one wins"
                    .to_string(),
                contact: None,
                raw: None,
            }),
        }
    }

    /// Rejects a second record of `key` in one read.
    fn reject_duplicate(
        &mut self,
        origin: &Origin,
        contact: &Contact,
        key: &ContactKey,
    ) -> Result<(), RunError> {
        let reason = format!(
            "duplicate key {key}: an earlier record of this read has the same key, and the first one wins"
        );
        self.reject(Rejection::of_record(
            origin,
            contact,
            Some(key),
            key_field(key),
            reason,
        ))
    }

    /// The create of a person new to the sink, shaped by the pipeline's `on_create`;
    /// `None` when shaping refused it (rejected).
    fn create(
        &mut self,
        key: ContactKey,
        contact: Contact,
        origin: Origin,
    ) -> Result<Option<Change>, RunError> {
        let contact = match self.pipeline.shaping.clone() {
            Some(shaping) => match shaping.on_create(contact) {
                Ok(contact) => contact,
                Err(failure) => {
                    let FieldFailure {
                        contact,
                        field,
                        reason,
                    } = *failure;
                    self.reject(Rejection::of_record(
                        &origin,
                        &contact,
                        Some(&key),
                        &field,
                        format!("on_create: {reason}"),
                    ))?;
                    return Ok(None);
                }
            },
            None => contact,
        };
        Ok(Some(Change::Create {
            key,
            contact,
            origin,
        }))
    }

    /// Plans `change` once the state's row of the person it changes (`lookup`, their
    /// key hash) is fetched: changes wait, in read order, until [`LOOKUP_BATCH`] of them
    /// need a row, and the rows are fetched together ([`SyncedIndex::synced_many`](crate::state::SyncedIndex::synced_many)).
    pub(super) fn wait(
        &mut self,
        diff: &mut Diff,
        change: Change,
        lookup: Option<u64>,
    ) -> Result<(), RunError> {
        if lookup.is_none() && diff.waiting.is_empty() {
            return self.plan_change(diff, change);
        }
        diff.lookups += usize::from(lookup.is_some());
        diff.waiting.push((change, lookup));
        if diff.lookups >= LOOKUP_BATCH {
            self.plan_waiting(diff)?;
        }
        Ok(())
    }

    /// Fetches the rows the waiting changes need and plans them, in read order.
    pub(super) fn plan_waiting(&mut self, diff: &mut Diff) -> Result<(), RunError> {
        let waiting = std::mem::take(&mut diff.waiting);
        diff.lookups = 0;
        let hashes: Vec<u64> = waiting.iter().filter_map(|(_, lookup)| *lookup).collect();
        let mut rows = self
            .state
            .synced_many(&self.pipeline.name, &hashes)?
            .into_iter();
        for (mut change, lookup) in waiting {
            if lookup.is_some() {
                let row = rows.next().flatten().map(|row| row.entry);
                let known = row.unwrap_or_default();
                match &mut change {
                    Change::Remove { previous, .. } => *previous = known,
                    Change::Update {
                        previous, contact, ..
                    } => {
                        // What `on_create` set stays as it was sent.
                        if let (Some(shaping), Some(before)) =
                            (&self.pipeline.shaping, &known.record)
                        {
                            for field in shaping.on_create_fields() {
                                if let (Some(value), None) = (before.get(field), contact.get(field))
                                {
                                    let _ = contact.set(field, &value);
                                }
                            }
                        }
                        *previous = known;
                    }
                    Change::Create { .. } => {}
                }
            }
            self.plan_change(diff, change)?;
        }
        Ok(())
    }

    /// After a complete read, the keys of the state that were not seen are removals,
    /// unless the read had records without a key: then they are held back.
    pub(super) fn sweep(&mut self, diff: &mut Diff) -> Result<(), RunError> {
        if !diff.changes.read.complete || !self.pipeline.settings.mode.removals() {
            return Ok(());
        }
        let unseen: Vec<u64> = diff.index.unseen().collect();
        if unseen.is_empty() {
            return Ok(());
        }
        if diff.keyless_rejects > 0 {
            self.report.removals_held = unseen.len() as u64;
            self.report.removals_held_reason = Some(format!(
                "{} rejected record(s) of this read have no key that could be read (see the rejects file); \
                 any of them could be one of the {} people not seen, so none is removed. \
                 Fix those rows and run again.",
                diff.keyless_rejects,
                unseen.len()
            ));
            return Ok(());
        }
        for hashes in unseen.chunks(LOOKUP_BATCH) {
            for row in self.state.synced_many(&self.pipeline.name, hashes)? {
                let Some(row) = row else { continue };
                let change = Change::Remove {
                    key: row.key,
                    previous: row.entry,
                    origin: Origin::Derived,
                };
                self.plan_change(diff, change)?;
            }
        }
        Ok(())
    }

    /// Rejects a record whose fields give no key under the pipeline's rule; it holds
    /// back the run's removals (see [`Run::seen_rejected`]).
    pub(super) fn reject_keyless(
        &mut self,
        diff: &mut Diff,
        origin: &Origin,
        contact: &Contact,
    ) -> Result<(), RunError> {
        let (field, reason) = match self.pipeline.settings.key {
            KeyRule::Auto => (
                "external_id",
                "no key: the record has neither an external id nor an email",
            ),
            KeyRule::ExternalId => (
                "external_id",
                "no key: the pipeline keys on external_id and the record has none",
            ),
            KeyRule::Email => (
                "email",
                "no key: the pipeline keys on email and the record has none",
            ),
        };
        self.seen_rejected(diff, None);
        self.reject(Rejection::of_record(
            origin,
            contact,
            None,
            field,
            reason.to_string(),
        ))
    }

    /// Rejects a record the engine refuses at `field`, counting it as seen under the
    /// key its fields give (see [`Run::seen_rejected`]).
    pub(super) fn reject_seen(
        &mut self,
        diff: &mut Diff,
        origin: &Origin,
        contact: &Contact,
        field: &str,
        reason: String,
    ) -> Result<(), RunError> {
        let key = trusted_key(contact, self.pipeline.settings.key);
        // Still present, so still the holder of their address.
        if let (Some(emails), Some(key), Some(email)) =
            (diff.emails.as_mut(), key.as_ref(), contact.email.as_deref())
        {
            emails.hold_rejected(email, key.hash64(), origin_line(origin));
        }
        self.seen_rejected(diff, key.as_ref());
        self.reject(Rejection::of_record(
            origin,
            contact,
            key.as_ref(),
            field,
            reason,
        ))
    }

    /// A rejected record still counts as seen when its key is known, so that it keeps
    /// its last synced state; without a key, it holds back this run's removals.
    pub(super) fn seen_rejected(&mut self, diff: &mut Diff, key: Option<&ContactKey>) {
        match key {
            Some(key) => {
                diff.index.mark(key.hash64());
            }
            None => diff.keyless_rejects += 1,
        }
    }

    /// Counts a change against the mode, and spools it when the mode applies it.
    pub(super) fn plan_change(&mut self, diff: &mut Diff, change: Change) -> Result<(), RunError> {
        let mode = self.pipeline.settings.mode;
        let plan = &mut diff.changes.plan;
        let (wanted, counter) = match change.kind() {
            ChangeKind::Create => (mode.creates(), &mut plan.creates),
            ChangeKind::Update => (mode.updates(), &mut plan.updates),
            ChangeKind::Remove => (mode.removals(), &mut plan.removals),
        };
        if !wanted {
            self.report.skipped += 1;
            return Ok(());
        }
        *counter += 1;
        diff.samples.offer(&change);
        if let Some(contact) = change.contact() {
            diff.changes.records.offer(contact);
        }
        if let Some(plan_file) = diff.plan_file.as_mut() {
            plan_file.write(&change)?;
        }
        match (change.kind(), diff.changes.streamed.as_mut()) {
            (ChangeKind::Remove, _) => diff.changes.removals.push(&change)?,
            (_, Some(streamed)) => streamed.buffer.push(change),
            (_, None) => diff.changes.upserts.push(&change)?,
        }
        Ok(())
    }

    /// The one way a record is rejected: counted, logged and written to the rejects file.
    /// Its reason leaves the process: any secret in it (a platform that echoes the
    /// request) is redacted.
    pub(super) fn reject(&mut self, mut rejection: Rejection<'_>) -> Result<(), RunError> {
        if let std::borrow::Cow::Owned(clean) = contactsync_core::redact_secrets(&rejection.reason)
        {
            rejection.reason = clean;
        }
        self.report.rejected += 1;
        if self.report.rejections.len() < RunReport::FIRST_REJECTIONS {
            self.report.rejections.push(RejectionSummary {
                key: rejection.key.map(ToString::to_string),
                origin: rejection.origin.to_string(),
                field: rejection.field.map(str::to_string),
                reason: rejection.reason.clone(),
            });
        }
        if !self.options.dry_run && self.kept_rejects.len() < contactsync_state::KEPT_REJECTS {
            self.kept_rejects.push(contactsync_state::RejectRow {
                stage: rejection.stage.as_str().to_string(),
                origin: rejection.origin.to_string(),
                key: rejection.key.map(ToString::to_string),
                email: rejection
                    .email
                    .or_else(|| rejection.contact.and_then(|c| c.email.as_deref()))
                    .map(str::to_string),
                field: rejection.field.map(str::to_string),
                reason: rejection.reason.clone(),
            });
        }
        self.rejects.write(&rejection)?;
        Ok(())
    }

    /// Step 3: the guard. An empty or truncated export must never wipe a platform.
    /// Returns whether the run may go on.
    pub(super) fn guard(&mut self, changes: &ChangeSet) -> bool {
        let removals = changes.plan.removals;
        if removals == 0 {
            return true;
        }
        let population = changes.population;
        let max = self.pipeline.settings.max_removal_ratio;
        let ratio = removals as f64 / population.max(1) as f64;
        let allowed = ratio <= max || self.options.allow_mass_removal;
        self.report.guard = Some(GuardVerdict {
            removals,
            population,
            max_removal_ratio: max,
            allowed,
        });
        if !allowed {
            // Nothing was done: the counts say so, and what would have been done is
            // the plan's (a dry run's counts are its plan already).
            if !self.options.dry_run {
                let report = &mut self.report;
                report.planned = Some(ChangeCounts {
                    created: std::mem::take(&mut report.created),
                    updated: std::mem::take(&mut report.updated),
                    removed: std::mem::take(&mut report.removed),
                });
            }
            self.report.status = RunStatus::Refused;
            self.report.error = Some(format!(
                "refused: this run would remove {removals} of {population} synced contacts ({:.1}%), more than max_removal_ratio {:.1}%. \
                 If the source really lost them, run again with --allow-mass-removal; otherwise check the source export.",
                ratio * 100.0,
                max * 100.0
            ));
        }
        allowed
    }
}
