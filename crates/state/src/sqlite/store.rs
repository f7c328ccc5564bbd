//! The SQLite backend's [`StateStore`] methods.

use super::*;
use crate::roles::*;

impl Locks for SqliteState {
    fn lock(&mut self, names: &[String], holder: &LockHolder) -> Result<LockAttempt, StateError> {
        let map = db_error(&self.path);
        // IMMEDIATE: the check and the insert are one write, so two processes can
        // never both see the lock free.
        let tx = self.conn.transaction_with_behavior(WRITE).map_err(map)?;
        let now = chrono::Utc::now().timestamp();
        let mut taken_over = Vec::new();
        {
            let mut find = tx
                .prepare_cached(
                    "SELECT token, pid, host, pipeline, since, heartbeat FROM locks WHERE name = ?1",
                )
                .map_err(map)?;
            for name in names {
                let found: Option<(LockHolder, i64)> = find
                    .query_row([name], |r| {
                        Ok((
                            LockHolder {
                                token: r.get(0)?,
                                pid: r.get::<_, i64>(1)? as u32,
                                host: r.get(2)?,
                                pipeline: r.get(3)?,
                                since: r.get(4)?,
                            },
                            r.get(5)?,
                        ))
                    })
                    .optional()
                    .map_err(map)?;
                let Some((other, heartbeat)) = found else {
                    continue;
                };
                if other.token == holder.token {
                    continue;
                }
                let silent = now - heartbeat > LOCK_STALE_AFTER.as_secs() as i64;
                if other.is_gone() || silent {
                    taken_over.push((name.clone(), other));
                } else {
                    return Ok(LockAttempt::Busy {
                        name: name.clone(),
                        holder: other,
                    });
                }
            }
            let mut put = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO locks (name, token, pid, host, pipeline, since, heartbeat)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .map_err(map)?;
            for name in names {
                put.execute(params![
                    name,
                    holder.token,
                    i64::from(holder.pid),
                    holder.host,
                    holder.pipeline,
                    holder.since,
                    now
                ])
                .map_err(map)?;
            }
        }
        tx.commit().map_err(map)?;
        if self.heartbeat.as_ref().map(|h| &h.token) != Some(&holder.token) {
            self.heartbeat = Some(Heartbeat::start(&self.path, &holder.token).map_err(map)?);
        }
        Ok(LockAttempt::Acquired { taken_over })
    }

    fn unlock(&mut self, holder: &LockHolder) -> Result<(), StateError> {
        if self.heartbeat.as_ref().map(|h| &h.token) == Some(&holder.token) {
            self.heartbeat = None;
        }
        self.conn
            .execute("DELETE FROM locks WHERE token = ?1", [&holder.token])
            .map(|_| ())
            .map_err(db_error(&self.path))
    }
}

impl RunLog for SqliteState {
    fn transactions_committed(&self) -> Option<u64> {
        Some(self.commits.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn begin_run(&mut self, pipeline: &str) -> Result<(i64, Option<i64>), StateError> {
        let tx = self
            .conn
            .transaction_with_behavior(WRITE)
            .map_err(db_error(&self.path))?;
        let result = (|| {
            tx.execute(
                "INSERT INTO pipelines (name) VALUES (?1) ON CONFLICT (name) DO NOTHING",
                [pipeline],
            )?;
            tx.execute(
                "UPDATE pipelines SET runs = runs + 1 WHERE name = ?1",
                [pipeline],
            )?;
            let (run, last_full): (i64, Option<i64>) = tx.query_row(
                "SELECT runs, last_full_run FROM pipelines WHERE name = ?1",
                [pipeline],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            tx.execute(
                "INSERT OR REPLACE INTO runs (pipeline, run, started_at) VALUES (?1, ?2, ?3)",
                params![pipeline, run, chrono::Utc::now().to_rfc3339()],
            )?;
            Ok((run, last_full))
        })();
        let value = result.map_err(db_error(&self.path))?;
        tx.commit().map_err(db_error(&self.path))?;
        // What an earlier run of this process staged and never confirmed (its sink's
        // finish failed) is not confirmed with this run's rows.
        self.staged.remove(pipeline);
        Ok(value)
    }

    fn finish_run(
        &mut self,
        pipeline: &str,
        run: i64,
        status: &str,
        report: &str,
        cursor: Option<&str>,
        full_read: bool,
    ) -> Result<(), StateError> {
        let tx = self
            .conn
            .transaction_with_behavior(WRITE)
            .map_err(db_error(&self.path))?;
        let result = (|| {
            tx.execute(
                "UPDATE runs SET finished_at = ?3, status = ?4, report = ?5 WHERE pipeline = ?1 AND run = ?2",
                params![pipeline, run, chrono::Utc::now().to_rfc3339(), status, report],
            )?;
            if let Some(cursor) = cursor {
                tx.execute(
                    "UPDATE pipelines SET cursor = ?2 WHERE name = ?1",
                    params![pipeline, cursor],
                )?;
            }
            if full_read {
                tx.execute(
                    "UPDATE pipelines SET last_full_run = ?2 WHERE name = ?1",
                    params![pipeline, run],
                )?;
            }
            Ok(())
        })();
        result.map_err(db_error(&self.path))?;
        tx.commit().map_err(db_error(&self.path))?;
        self.release_free_pages();
        Ok(())
    }

    fn cursor(&mut self, pipeline: &str) -> Result<Option<String>, StateError> {
        self.conn
            .query_row(
                "SELECT cursor FROM pipelines WHERE name = ?1",
                [pipeline],
                |r| r.get(0),
            )
            .optional()
            .map(Option::flatten)
            .map_err(db_error(&self.path))
    }

    fn summaries(&mut self) -> Result<Vec<PipelineSummary>, StateError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT p.name, p.runs, p.cursor,
                   (SELECT COUNT(*) FROM synced s WHERE s.pipeline = p.id),
                   (SELECT COUNT(*) FROM pending q WHERE q.pipeline = p.id),
                   (SELECT finished_at || ' ' || status FROM runs r WHERE r.pipeline = p.name AND finished_at IS NOT NULL ORDER BY run DESC LIMIT 1)
                 FROM pipelines p ORDER BY p.name",
            )
            .map_err(db_error(&self.path))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(PipelineSummary {
                    pipeline: r.get(0)?,
                    runs: r.get::<_, i64>(1)? as u64,
                    cursor: r.get(2)?,
                    synced: r.get::<_, i64>(3)? as u64,
                    pending: r.get::<_, i64>(4)? as u64,
                    last_run: r.get(5)?,
                })
            })
            .and_then(|rows| rows.collect())
            .map_err(db_error(&self.path))?;
        Ok(rows)
    }

    fn runs(&mut self, pipeline: Option<&str>, last: usize) -> Result<Vec<RunRecord>, StateError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT pipeline, run, started_at, finished_at, status, report FROM runs
                 WHERE ?1 IS NULL OR pipeline = ?1 ORDER BY started_at DESC, run DESC LIMIT ?2",
            )
            .map_err(db_error(&self.path))?;
        let rows = stmt
            .query_map(params![pipeline, last as i64], run_record)
            .and_then(|rows| rows.collect())
            .map_err(db_error(&self.path))?;
        Ok(rows)
    }

    fn reset(&mut self, pipeline: &str) -> Result<(), StateError> {
        let map = db_error(&self.path);
        let tx = self.conn.transaction_with_behavior(WRITE).map_err(map)?;
        for table in [
            "synced",
            "pending",
            "audit",
            "creates",
            "rejects",
            "source_memo",
        ] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE pipeline = {PIPELINE_ID}"),
                [pipeline],
            )
            .map_err(map)?;
        }
        tx.execute("DELETE FROM runs WHERE pipeline = ?1", [pipeline])
            .map_err(map)?;
        tx.execute("DELETE FROM pipelines WHERE name = ?1", [pipeline])
            .map_err(map)?;
        tx.commit().map_err(map)
    }
}

impl SyncedIndex for SqliteState {
    fn scan_index(
        &mut self,
        pipeline: &str,
        visit: &mut dyn FnMut(u64, u64),
    ) -> Result<(), StateError> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT key_hash, content_hash FROM synced WHERE pipeline = {PIPELINE_ID}"
            ))
            .map_err(db_error(&self.path))?;
        let mut rows = stmt.query([pipeline]).map_err(db_error(&self.path))?;
        while let Some(row) = rows.next().map_err(db_error(&self.path))? {
            let key_hash: i64 = row.get(0).map_err(db_error(&self.path))?;
            let content_hash: i64 = row.get(1).map_err(db_error(&self.path))?;
            visit(from_sql(key_hash), from_sql(content_hash));
        }
        Ok(())
    }

    fn scan_source_memo(
        &mut self,
        pipeline: &str,
        visit: &mut dyn FnMut(SourceMemo),
    ) -> Result<(), StateError> {
        let map = db_error(&self.path);
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT entries FROM source_memo WHERE pipeline = {PIPELINE_ID} ORDER BY seq"
            ))
            .map_err(map)?;
        let mut rows = stmt.query([pipeline]).map_err(map)?;
        while let Some(row) = rows.next().map_err(map)? {
            let packed = row.get_ref(0).and_then(|v| Ok(v.as_blob()?)).map_err(map)?;
            SourceMemo::unpack(packed).for_each(&mut *visit);
        }
        Ok(())
    }

    fn record_source_memo(
        &mut self,
        pipeline: &str,
        entries: &[SourceMemo],
        replace: bool,
    ) -> Result<(), StateError> {
        let map = db_error(&self.path);
        let tx = self.conn.transaction_with_behavior(WRITE).map_err(map)?;
        // A pipeline that never ran has no synced people for a memo to speak of.
        let Some(id) = pipeline_id(&tx, pipeline).map_err(map)? else {
            return Ok(());
        };
        if replace {
            tx.execute("DELETE FROM source_memo WHERE pipeline = ?1", [id])
                .map_err(map)?;
        }
        let next: i64 = tx
            .query_row(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM source_memo WHERE pipeline = ?1",
                [id],
                |r| r.get(0),
            )
            .map_err(map)?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO source_memo (pipeline, seq, entries) VALUES (?1, ?2, ?3)",
                )
                .map_err(map)?;
            for (seq, chunk) in (next..).zip(entries.chunks(SourceMemo::A_ROW)) {
                insert
                    .execute(params![id, seq, SourceMemo::pack(chunk)])
                    .map_err(map)?;
            }
        }
        tx.commit().map_err(map)
    }

    fn synced(&mut self, pipeline: &str, key_hash: u64) -> Result<Option<SyncedRow>, StateError> {
        let row: Option<CompactSynced> = self
            .conn
            .prepare_cached(&format!(
                "SELECT {SYNCED_COLUMNS} FROM synced WHERE pipeline = {PIPELINE_ID} AND key_hash = ?2"
            ))
            .and_then(|mut s| {
                s.query_row(params![pipeline, to_sql(key_hash)], compact_synced)
                    .optional()
            })
            .map_err(db_error(&self.path))?;
        row.map(|stored| synced_row(&mut self.codec, &self.conn, &self.path, stored))
            .transpose()
    }

    fn sample_records(&mut self, sample: &[Contact]) -> Result<(), StateError> {
        self.learn(sample.iter())
    }
}

/// Marks a run whose changes are confirmed (`?1` its pipeline, `?2` the run) until its
/// end says how it ended: `history` then tells them applied even if the process dies
/// first.
pub(super) const MARK_CONFIRMED: &str =
    "UPDATE runs SET status = 'confirmed' WHERE pipeline = ?1 AND run = ?2 AND status IS NULL";

impl PendingJournal for SqliteState {
    fn record_pending(
        &mut self,
        pipeline: &str,
        run: i64,
        batch_id: &str,
        rows: &[PendingRow],
    ) -> Result<(), StateError> {
        self.insert_pending(pipeline, run, batch_id, rows, None)
    }

    fn pending_batches(
        &mut self,
        pipeline: &str,
    ) -> Result<Vec<(PendingBatch, Vec<PendingRow>)>, StateError> {
        let path = self.path.clone();
        let map = db_error(&path);
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT batch_id, key, kind, email, content_hash, record FROM pending
                 WHERE pipeline = {PIPELINE_ID} ORDER BY run, batch_id, seq"
            ))
            .map_err(map)?;
        type Row = (
            String,
            Option<String>,
            Value,
            Option<String>,
            i64,
            Option<Vec<u8>>,
        );
        let rows: Vec<Row> = stmt
            .query_map([pipeline], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })
            .and_then(|rows| rows.collect())
            .map_err(map)?;
        drop(stmt);
        let corrupt = |message: String| StateError::Corrupt {
            path: path.clone(),
            message: format!("in pending: {message}"),
        };
        let mut stored: Vec<crate::StoredPending> = Vec::with_capacity(rows.len());
        for (batch_id, key, kind, email, content_hash, bytes) in rows {
            let record = read_record(
                &mut self.codec,
                &self.conn,
                key.as_deref().unwrap_or(&batch_id),
                bytes.as_deref(),
            );
            let key = compact::expand_key(key.as_deref(), record.as_ref()).map_err(corrupt)?;
            let email = compact::expand_email(email, record.as_ref());
            let kind = compact::expand_word(kind).map_err(corrupt)?;
            stored.push((batch_id, key, kind, email, content_hash, record));
        }
        group_pending(
            stored,
            |text| parse_key(&path, text),
            |kind| StateError::Corrupt {
                path: path.clone(),
                message: format!("unknown change kind {kind:?} in pending"),
            },
        )
    }

    fn settle(
        &mut self,
        pipeline: &str,
        batch_id: &str,
        settlements: &[Settlement],
    ) -> Result<(), StateError> {
        let path = self.path.clone();
        let map = db_error(&path);
        let tx = self.conn.transaction_with_behavior(WRITE).map_err(map)?;
        let id = ensure_pipeline(&tx, pipeline).map_err(map)?;
        let whole_batch_awaits = !settlements.is_empty()
            && settlements
                .iter()
                .all(|s| matches!(s, Settlement::AwaitingFinish { handle: None, .. }));
        if whole_batch_awaits {
            let rows: i64 = tx
                .prepare_cached(
                    "SELECT COUNT(*) FROM pending WHERE pipeline = ?1 AND batch_id = ?2",
                )
                .and_then(|mut s| s.query_row(params![id, batch_id], |r| r.get(0)))
                .map_err(map)?;
            if rows == settlements.len() as i64 {
                tx.prepare_cached(
                    "UPDATE pending SET applied = 1, handle = NULL WHERE pipeline = ?1 AND batch_id = ?2",
                )
                .and_then(|mut s| s.execute(params![id, batch_id]))
                .map_err(map)?;
                return tx.commit().map_err(map);
            }
        }
        {
            let mut upsert = tx
                .prepare_cached(&format!(
                    "INSERT INTO synced (pipeline, key_hash, content_hash, record, key, email, handle, email_hash)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) {SYNCED_UPSERT}"
                ))
                .map_err(map)?;
            let mut forget = tx
                .prepare_cached("DELETE FROM synced WHERE pipeline = ?1 AND key_hash = ?2")
                .map_err(map)?;
            let mut unpend = tx
                .prepare_cached(
                    "DELETE FROM pending WHERE pipeline = ?1 AND batch_id = ?2 AND key_hash = ?3",
                )
                .map_err(map)?;
            let mut mark = tx
                .prepare_cached(
                    "UPDATE pending SET applied = 1, handle = ?4 WHERE pipeline = ?1 AND batch_id = ?2 AND key_hash = ?3",
                )
                .map_err(map)?;
            let mut owner = tx
                .prepare_cached(
                    "SELECT key, record FROM synced WHERE pipeline = ?1 AND key_hash = ?2",
                )
                .map_err(map)?;
            for settlement in settlements {
                match settlement {
                    Settlement::Synced { key, entry } => {
                        let hash = to_sql(key.hash64());
                        // Two keys of one hash: the person there is somebody else.
                        let existing: Option<(Option<String>, Option<Vec<u8>>)> = owner
                            .query_row(params![id, hash], |r| Ok((r.get(0)?, r.get(1)?)))
                            .optional()
                            .map_err(map)?;
                        let text = key.to_string();
                        if let Some((stored, bytes)) = existing {
                            let record = read_record(&mut self.codec, &tx, &text, bytes.as_deref());
                            let existing = compact::expand_key(stored.as_deref(), record.as_ref())
                                .map_err(|message| StateError::Corrupt {
                                    path: path.clone(),
                                    message,
                                })?;
                            if existing != text {
                                return Err(StateError::KeyCollision {
                                    existing,
                                    new: text,
                                });
                            }
                        }
                        let record = entry.record.as_deref();
                        upsert
                            .execute(params![
                                id,
                                hash,
                                to_sql(entry.content_hash),
                                record.map(|r| self.codec.encode(r)),
                                compact::key(key, record),
                                compact::email(entry.email.as_deref(), record),
                                entry.handle,
                                compact::email_hash(key.hash64(), entry.email.as_deref(), record),
                            ])
                            .map_err(map)?;
                        unpend.execute(params![id, batch_id, hash]).map_err(map)?;
                    }
                    Settlement::Forgotten { key } => {
                        let hash = to_sql(key.hash64());
                        forget.execute(params![id, hash]).map_err(map)?;
                        unpend.execute(params![id, batch_id, hash]).map_err(map)?;
                    }
                    Settlement::Dropped { key } => {
                        unpend
                            .execute(params![id, batch_id, to_sql(key.hash64())])
                            .map_err(map)?;
                    }
                    Settlement::AwaitingFinish { key, handle } => {
                        mark.execute(params![id, batch_id, to_sql(key.hash64()), handle])
                            .map_err(map)?;
                    }
                }
            }
        }
        tx.commit().map_err(map)
    }

    fn record_awaiting_finish(
        &mut self,
        pipeline: &str,
        run: i64,
        batch_id: &str,
        rows: Vec<PendingRow>,
        handles: Vec<Option<String>>,
    ) -> Result<(), StateError> {
        let _ = batch_id; // staged rows are confirmed by run, not by batch
        let created_run = self
            .creates_run
            .as_ref()
            .is_some_and(|(p, r)| p == pipeline && *r == run)
            .then_some(run);
        let path = self.path.clone();
        let staging = |e: std::io::Error| StateError::Unavailable {
            path: path.clone(),
            message: format!("staging the changes for the confirm in a temporary file: {e}"),
        };
        let staged = match self.staged.entry(pipeline.to_string()) {
            std::collections::hash_map::Entry::Occupied(mut held) => {
                if held.get().run() != run {
                    held.insert(StagedRun::start(run, &staging_dir(&path)).map_err(staging)?);
                }
                held.into_mut()
            }
            std::collections::hash_map::Entry::Vacant(vacant) => {
                vacant.insert(StagedRun::start(run, &staging_dir(&path)).map_err(staging)?)
            }
        };
        staged.push(rows, handles, created_run).map_err(staging)
    }

    fn confirm_finished(&mut self, pipeline: &str, run: i64) -> Result<u64, StateError> {
        let map = db_error(&self.path);
        let Some(id) = pipeline_id(&self.conn, pipeline).map_err(map)? else {
            return Ok(0);
        };
        // Not held: in ranges, never `None`.
        let mut confirmed = self
            .confirm_from(Confirming::Pending, id, run)?
            .unwrap_or_default();
        if let Some(mut staged) = self.take_staged(pipeline, run) {
            confirmed += self
                .confirm_from(Confirming::Staged(&mut staged), id, run)?
                .unwrap_or_default();
        }
        if confirmed > 0 {
            self.conn
                .execute(MARK_CONFIRMED, params![pipeline, run])
                .map_err(db_error(&self.path))?;
        }
        Ok(confirmed)
    }

    fn hold_confirm(&mut self, pipeline: &str, run: i64) -> Result<Option<u64>, StateError> {
        let map = db_error(&self.path);
        let Some(id) = pipeline_id(&self.conn, pipeline).map_err(map)? else {
            return Ok(None);
        };
        // IMMEDIATE, as every write transaction here: the write lock from the start.
        self.conn.execute_batch("BEGIN IMMEDIATE").map_err(map)?;
        self.held_confirm = true;
        // The staged rows stay the run's until the commit: an abandoned confirm (or
        // one too large to hold) leaves them to confirm again.
        let mut staged = self.take_staged(pipeline, run);
        let held = self.confirm_held(pipeline, id, run, staged.as_mut());
        if let Some(staged) = staged {
            match held {
                Ok(Some(_)) => self.held_staged = Some((pipeline.to_string(), staged)),
                _ => {
                    self.staged.insert(pipeline.to_string(), staged);
                }
            }
        }
        held
    }

    fn commit_confirm(&mut self) -> Result<(), StateError> {
        if !std::mem::take(&mut self.held_confirm) {
            return Ok(());
        }
        let map = db_error(&self.path);
        if let Err(e) = self.conn.execute_batch("COMMIT") {
            // A failed COMMIT may leave the transaction open: nothing of it is kept.
            if !self.conn.is_autocommit() {
                let _ = self.conn.execute_batch("ROLLBACK");
            }
            let e = map(e);
            self.unhold_staged();
            return Err(e);
        }
        self.held_staged = None;
        Ok(())
    }

    fn abandon_confirm(&mut self) -> Result<(), StateError> {
        self.unhold_staged();
        if !std::mem::take(&mut self.held_confirm) || self.conn.is_autocommit() {
            return Ok(());
        }
        self.conn
            .execute_batch("ROLLBACK")
            .map_err(db_error(&self.path))
    }

    fn drop_pending(&mut self, pipeline: &str, batch_id: &str) -> Result<(), StateError> {
        self.conn
            .execute(
                &format!("DELETE FROM pending WHERE pipeline = {PIPELINE_ID} AND batch_id = ?2"),
                params![pipeline, batch_id],
            )
            .map(|_| ())
            .map_err(db_error(&self.path))
    }
}

impl SinkStores for SqliteState {
    fn sink_store<'a>(&'a mut self, scope: &str) -> Box<dyn SinkStore + 'a> {
        Box::new(SqliteSinkStore {
            conn: &mut self.conn,
            scope: scope.to_string(),
        })
    }
}

impl AuditLog for SqliteState {
    fn record_audit(&mut self, entries: &[AuditEntry]) -> Result<(), StateError> {
        let path = self.path.clone();
        let map = db_error(&path);
        let tx = self.conn.transaction_with_behavior(WRITE).map_err(map)?;
        write_out_creates(&tx, &mut self.codec, &path, entries)?;
        insert_audit(&tx, &mut self.codec, entries).map_err(map)?;
        tx.commit().map_err(map)
    }

    fn record_created_run(
        &mut self,
        pipeline: &str,
        run: i64,
        at: i64,
        values: bool,
    ) -> Result<bool, StateError> {
        let map = db_error(&self.path);
        let tx = self.conn.transaction_with_behavior(WRITE).map_err(map)?;
        let id = ensure_pipeline(&tx, pipeline).map_err(map)?;
        tx.execute(
            "INSERT OR REPLACE INTO creates (pipeline, run, at, values_kept) VALUES (?1, ?2, ?3, ?4)",
            params![id, run, at, i64::from(values)],
        )
        .map_err(map)?;
        tx.commit().map_err(map)?;
        self.creates_run = Some((pipeline.to_string(), run));
        Ok(true)
    }

    fn prune_audit(&mut self, pipeline: &str, before: i64) -> Result<u64, StateError> {
        let map = db_error(&self.path);
        let tx = self.conn.transaction_with_behavior(WRITE).map_err(map)?;
        let mut pruned = 0;
        // A run's creates go with it, as their entries would have; so do its rejects.
        for table in ["audit", "creates", "rejects"] {
            pruned += tx
                .execute(
                    &format!("DELETE FROM {table} WHERE pipeline = {PIPELINE_ID} AND at < ?2"),
                    params![pipeline, before],
                )
                .map_err(map)? as u64;
        }
        tx.commit().map_err(map)?;
        Ok(pruned)
    }

    fn history(&mut self, who: &str) -> Result<Vec<AuditEntry>, StateError> {
        let who = who.trim();
        let email = Contact::normalize_email(who).unwrap_or_default();
        let keys = [
            who.to_string(),
            format!("external_id:{who}"),
            format!("email:{email}"),
        ];
        // Rows whose key or email is their record's are matched once expanded.
        let matches = |entry: &AuditEntry| {
            keys.contains(&entry.key)
                || entry
                    .email
                    .as_deref()
                    .is_some_and(|e| !email.is_empty() && e.eq_ignore_ascii_case(&email))
        };
        // What the rows are found by, through the indexes (schema 5): the hash of each
        // key WHO may be, and of its email. The email's is a key hash too (a pipeline
        // keyed by email keeps it as one).
        let hash = |text: &str| {
            text.parse::<ContactKey>()
                .map(|k| to_sql(k.hash64()))
                .unwrap_or_default()
        };
        let by_key = [hash(&keys[0]), hash(&keys[1]), hash(&keys[2])];
        let by_email = compact::email_lookup_hash(who)
            .map(to_sql)
            .unwrap_or_default();
        let mut entries = Vec::new();
        // Audit rows written before schema 5 have no hashes: read as before until pruned.
        self.audit_rows(
            HISTORY_AUDIT,
            params![by_key[0], by_key[1], by_key[2], by_email],
            &mut |entry| {
                if matches(&entry) {
                    entries.push(with_created_fields(entry));
                }
                Ok(())
            },
        )?;
        let mut created = Vec::new();
        self.created_rows(
            HISTORY_CREATED,
            params![by_key[0], by_key[1], by_key[2], by_email],
            &mut |entry| {
                if matches(&entry) {
                    created.push(with_created_fields(entry));
                }
                Ok(())
            },
        )?;
        Ok(merge_history(entries, created))
    }
}

/// How `history` finds a person's audit rows: by the hash of each key they may be
/// (`?1`-`?3`) or of their email in lower case (`?4`, also the key of a pipeline keyed
/// by a lower-case email), through `audit_key` and `audit_email`.
pub(super) const HISTORY_AUDIT: &str =
    "WHERE a.key_hash IN (?1, ?2, ?3, ?4) OR a.email_hash = ?4 OR a.key_hash IS NULL
     ORDER BY a.at, a.rowid";

/// How `history` finds the people kept with their run's creates: each pipeline's
/// primary key for the key hashes, `synced_email` for the email's.
pub(super) const HISTORY_CREATED: &str = "AND ((s.pipeline, s.key_hash) IN
        (SELECT p2.id, k.h FROM pipelines p2,
           (SELECT ?1 AS h UNION ALL SELECT ?2 UNION ALL SELECT ?3 UNION ALL SELECT ?4) k)
      OR s.email_hash = ?4)";

impl StateTransfer for SqliteState {
    fn export(
        &mut self,
        visit: &mut dyn FnMut(StateItem) -> Result<(), StateError>,
    ) -> Result<(), StateError> {
        let path = self.path.clone();
        let map = db_error(&path);
        {
            let mut stmt = self
                .conn
                .prepare("SELECT name, runs, cursor, last_full_run FROM pipelines ORDER BY name")
                .map_err(map)?;
            let mut rows = stmt.query([]).map_err(map)?;
            while let Some(r) = rows.next().map_err(map)? {
                visit(StateItem::Pipeline {
                    name: r.get(0).map_err(map)?,
                    runs: r.get(1).map_err(map)?,
                    cursor: r.get(2).map_err(map)?,
                    last_full_run: r.get(3).map_err(map)?,
                })?;
            }
        }
        {
            let mut stmt = self
                .conn
                .prepare(&format!(
                    "SELECT {SYNCED_COLUMNS}, p.name FROM synced JOIN pipelines p ON p.id = synced.pipeline"
                ))
                .map_err(map)?;
            let mut rows = stmt.query([]).map_err(map)?;
            while let Some(r) = rows.next().map_err(map)? {
                let stored = compact_synced(r).map_err(map)?;
                let pipeline: String = r.get(5).map_err(map)?;
                visit(StateItem::Synced {
                    pipeline,
                    row: synced_row(&mut self.codec, &self.conn, &path, stored)?,
                })?;
            }
        }
        for run in self.runs(None, usize::MAX >> 1)?.into_iter().rev() {
            visit(StateItem::Run(run))?;
        }
        self.audit_rows("ORDER BY a.rowid", [], &mut |entry| {
            visit(StateItem::Audit(entry))
        })?;
        // A run's creates kept as one entry go as an entry a person: the other store
        // keeps them its own way. Last, as `history` tells them after the stored
        // entries of their second.
        self.created_rows("", [], &mut |entry| visit(StateItem::Audit(entry)))?;
        {
            let mut stmt = self
                .conn
                .prepare(
                    "SELECT p.name, r.run, r.at, r.stage, r.origin, r.key, r.email, r.field, r.reason
                     FROM rejects r JOIN pipelines p ON p.id = r.pipeline ORDER BY p.name, r.run, r.seq",
                )
                .map_err(map)?;
            let mut rows = stmt.query([]).map_err(map)?;
            while let Some(r) = rows.next().map_err(map)? {
                visit(StateItem::Reject {
                    pipeline: r.get(0).map_err(map)?,
                    run: r.get(1).map_err(map)?,
                    at: r.get(2).map_err(map)?,
                    row: reject_row(r, 3).map_err(map)?,
                })?;
            }
        }
        let mut stmt = self
            .conn
            .prepare("SELECT scope, key, value FROM sink_data ORDER BY scope, key")
            .map_err(map)?;
        let mut rows = stmt.query([]).map_err(map)?;
        while let Some(r) = rows.next().map_err(map)? {
            visit(StateItem::SinkData {
                scope: r.get(0).map_err(map)?,
                key: r.get(1).map_err(map)?,
                value: r.get(2).map_err(map)?,
            })?;
        }
        Ok(())
    }

    fn import(&mut self, items: &[StateItem]) -> Result<(), StateError> {
        self.learn(items.iter().filter_map(|item| match item {
            StateItem::Synced { row, .. } => row.entry.record.as_deref(),
            StateItem::Audit(e) => e.created.as_deref(),
            _ => None,
        }))?;
        let map = db_error(&self.path);
        let tx = self.conn.transaction_with_behavior(WRITE).map_err(map)?;
        for item in items {
            match item {
                StateItem::Pipeline {
                    name,
                    runs,
                    cursor,
                    last_full_run,
                } => tx
                    .execute(
                        // Not OR REPLACE: that would give the pipeline a new id.
                        "INSERT INTO pipelines (name, runs, cursor, last_full_run) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (name) DO UPDATE SET runs = excluded.runs, cursor = excluded.cursor,
                           last_full_run = excluded.last_full_run",
                        params![name, runs, cursor, last_full_run],
                    )
                    .map(|_| ()),
                StateItem::Synced { pipeline, row } => {
                    ensure_pipeline(&tx, pipeline).and_then(|id| {
                        let record = row.entry.record.as_deref();
                        tx.execute(
                            "INSERT OR REPLACE INTO synced (pipeline, key_hash, content_hash, record, key, email, handle, email_hash)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                            params![
                                id,
                                to_sql(row.key.hash64()),
                                to_sql(row.entry.content_hash),
                                record.map(|r| self.codec.encode(r)),
                                compact::key(&row.key, record),
                                compact::email(row.entry.email.as_deref(), record),
                                row.entry.handle,
                                compact::email_hash(
                                    row.key.hash64(),
                                    row.entry.email.as_deref(),
                                    record
                                ),
                            ],
                        )
                        .map(|_| ())
                    })
                }
                StateItem::Run(r) => tx
                    .execute(
                        "INSERT OR REPLACE INTO runs (pipeline, run, started_at, finished_at, status, report) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                        params![r.pipeline, r.run, r.started_at, r.finished_at, r.status, r.report],
                    )
                    .map(|_| ()),
                StateItem::Audit(e) => insert_audit(&tx, &mut self.codec, std::slice::from_ref(e)),
                StateItem::Reject { pipeline, run, at, row } => {
                    ensure_pipeline(&tx, pipeline).and_then(|id| {
                        tx.execute(
                            "INSERT INTO rejects (pipeline, run, seq, at, stage, origin, key, email, field, reason)
                             VALUES (?1, ?2, (SELECT COALESCE(MAX(seq) + 1, 0) FROM rejects WHERE pipeline = ?1 AND run = ?2),
                                     ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                            params![id, run, at, row.stage, row.origin, row.key, row.email, row.field, row.reason],
                        )
                        .map(|_| ())
                    })
                }
                StateItem::SinkData { scope, key, value } => tx
                    .execute(
                        "INSERT OR REPLACE INTO sink_data (scope, key, value) VALUES (?1, ?2, ?3)",
                        params![scope, key, value],
                    )
                    .map(|_| ()),
            }
            .map_err(map)?;
        }
        tx.commit().map_err(map)
    }
}

impl Slots for SqliteState {
    fn claim_slot(&mut self, slot: &str, pipeline: &str, worker: &str) -> Result<bool, StateError> {
        let map = db_error(&self.path);
        let tx = self.conn.transaction_with_behavior(WRITE).map_err(map)?;
        let found: Option<(String, String)> = tx
            .query_row(
                "SELECT worker, status FROM slots WHERE slot = ?1 AND pipeline = ?2",
                params![slot, pipeline],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(map)?;
        // A worker is `pid@host`: one on this host whose process is gone left its
        // claim unfinished, and it is taken over.
        let gone = |worker: &str| {
            let here = gethostname::gethostname().to_string_lossy().into_owned();
            match worker.split_once('@') {
                Some((pid, host)) if host == here => !Path::new(&format!("/proc/{pid}")).exists(),
                _ => false,
            }
        };
        let claim = match found {
            None => true,
            Some((_, status)) if status != "claimed" => false,
            Some((other, _)) => other == worker || gone(&other),
        };
        if claim {
            tx.execute(
                "INSERT OR REPLACE INTO slots (slot, pipeline, worker, status, claimed_at) VALUES (?1, ?2, ?3, 'claimed', ?4)",
                params![slot, pipeline, worker, chrono::Utc::now().to_rfc3339()],
            )
            .map_err(map)?;
        }
        tx.commit().map_err(map)?;
        Ok(claim)
    }

    fn finish_slot(&mut self, slot: &str, pipeline: &str, status: &str) -> Result<(), StateError> {
        self.conn
            .execute(
                "UPDATE slots SET status = ?3, finished_at = ?4 WHERE slot = ?1 AND pipeline = ?2",
                params![slot, pipeline, status, chrono::Utc::now().to_rfc3339()],
            )
            .map(|_| ())
            .map_err(db_error(&self.path))
    }
}
