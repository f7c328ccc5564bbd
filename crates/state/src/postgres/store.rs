//! The PostgreSQL backend's [`StateStore`] methods.

use super::*;
use crate::roles::*;

impl Locks for PostgresState {
    fn lock(&mut self, names: &[String], holder: &LockHolder) -> Result<LockAttempt, StateError> {
        for name in names {
            if let Some(other) = self.held.get(&lock_key(name)) {
                if other.token != holder.token {
                    return Ok(LockAttempt::Busy {
                        name: name.clone(),
                        holder: other.clone(),
                    });
                }
            }
        }
        let names = names.to_vec();
        let holder_owned = holder.clone();
        let already: Vec<i64> = self
            .held
            .iter()
            .filter(|(_, h)| h.token == holder.token)
            .map(|(k, _)| *k)
            .collect();
        let outcome = self.call(move |c| {
            let mut taken: Vec<i64> = Vec::new();
            for name in &names {
                let key = lock_key(name);
                if already.contains(&key) {
                    continue;
                }
                let got: bool = c
                    .query_one("SELECT pg_try_advisory_lock($1)", &[&key])?
                    .get(0);
                if !got {
                    for k in &taken {
                        c.execute("SELECT pg_advisory_unlock($1)", &[k])?;
                    }
                    let other = match named_holder(c, name)? {
                        Some(holder) => holder,
                        None => LockHolder {
                            token: String::new(),
                            pid: 0,
                            host: "(another runner)".into(),
                            pipeline: String::new(),
                            since: String::new(),
                        },
                    };
                    return Ok(Err((name.clone(), other)));
                }
                taken.push(key);
            }
            // Ours now: whoever the table still names died without cleaning up.
            let mut taken_over = Vec::new();
            for name in &names {
                if let Some(other) = named_holder(c, name)? {
                    if other.token != holder_owned.token {
                        taken_over.push((name.clone(), other));
                    }
                }
                c.execute(
                    "INSERT INTO locks (name, token, pid, host, pipeline, since) VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (name) DO UPDATE SET token = excluded.token, pid = excluded.pid,
                       host = excluded.host, pipeline = excluded.pipeline, since = excluded.since",
                    &[
                        name,
                        &holder_owned.token,
                        &i64::from(holder_owned.pid),
                        &holder_owned.host,
                        &holder_owned.pipeline,
                        &holder_owned.since,
                    ],
                )?;
            }
            Ok(Ok((taken, taken_over)))
        })?;
        match outcome {
            Err((name, holder)) => Ok(LockAttempt::Busy { name, holder }),
            Ok((taken, taken_over)) => {
                for key in taken {
                    self.held.insert(key, holder.clone());
                }
                Ok(LockAttempt::Acquired { taken_over })
            }
        }
    }

    fn unlock(&mut self, holder: &LockHolder) -> Result<(), StateError> {
        let keys: Vec<i64> = self
            .held
            .iter()
            .filter(|(_, h)| h.token == holder.token)
            .map(|(k, _)| *k)
            .collect();
        for k in &keys {
            self.held.remove(k);
        }
        let token = holder.token.clone();
        self.call(move |c| {
            c.execute("DELETE FROM locks WHERE token = $1", &[&token])?;
            for k in &keys {
                c.execute("SELECT pg_advisory_unlock($1)", &[k])?;
            }
            Ok(())
        })
    }
}

impl RunLog for PostgresState {
    fn begin_run(&mut self, pipeline: &str) -> Result<(i64, Option<i64>), StateError> {
        // What an earlier run of this store staged is done with before this one; a
        // failure there was that run's, which never confirmed.
        if let Err(e) = self.staged() {
            tracing::debug!("an earlier run's staged batch was not copied: {e}");
        }
        let pipeline = pipeline.to_string();
        self.call(move |c| {
            let mut tx = c.transaction()?;
            let row = tx.query_one(
                "INSERT INTO pipelines (name, runs) VALUES ($1, 1)
                 ON CONFLICT (name) DO UPDATE SET runs = pipelines.runs + 1
                 RETURNING runs, last_full_run",
                &[&pipeline],
            )?;
            let run: i64 = row.get(0);
            let last_full: Option<i64> = row.get(1);
            tx.execute(
                "INSERT INTO runs (pipeline, run, started_at) VALUES ($1, $2, $3)
                 ON CONFLICT (pipeline, run) DO UPDATE SET started_at = excluded.started_at,
                   finished_at = NULL, status = NULL, report = NULL",
                &[&pipeline, &run, &chrono::Utc::now().to_rfc3339()],
            )?;
            // What an earlier run staged and never confirmed (its sink's finish failed,
            // or it was killed) is not sent again by this run's rows.
            tx.execute("DELETE FROM staged WHERE pipeline = $1", &[&pipeline])?;
            tx.commit()?;
            Ok((run, last_full))
        })
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
        let (pipeline, status, report) =
            (pipeline.to_string(), status.to_string(), report.to_string());
        let cursor = cursor.map(str::to_string);
        self.call(move |c| {
            let mut tx = c.transaction()?;
            tx.execute(
                "UPDATE runs SET finished_at = $3, status = $4, report = $5 WHERE pipeline = $1 AND run = $2",
                &[&pipeline, &run, &chrono::Utc::now().to_rfc3339(), &status, &report],
            )?;
            if let Some(cursor) = &cursor {
                tx.execute(
                    "UPDATE pipelines SET cursor = $2 WHERE name = $1",
                    &[&pipeline, cursor],
                )?;
            }
            if full_read {
                tx.execute(
                    "UPDATE pipelines SET last_full_run = $2 WHERE name = $1",
                    &[&pipeline, &run],
                )?;
            }
            tx.commit()
        })
    }

    fn cursor(&mut self, pipeline: &str) -> Result<Option<String>, StateError> {
        let pipeline = pipeline.to_string();
        self.call(move |c| {
            Ok(
                c.query_opt("SELECT cursor FROM pipelines WHERE name = $1", &[&pipeline])?
                    .and_then(|r| r.get::<_, Option<String>>(0)),
            )
        })
    }

    fn summaries(&mut self) -> Result<Vec<PipelineSummary>, StateError> {
        self.call(|c| {
            Ok(c.query(
                "SELECT p.name, p.runs, p.cursor,
                   (SELECT COUNT(*) FROM synced s WHERE s.pipeline = p.name),
                   (SELECT COUNT(*) FROM pending q WHERE q.pipeline = p.name),
                   (SELECT finished_at || ' ' || status FROM runs r WHERE r.pipeline = p.name AND finished_at IS NOT NULL ORDER BY run DESC LIMIT 1)
                 FROM pipelines p ORDER BY p.name",
                &[],
            )?
            .iter()
            .map(|r| PipelineSummary {
                pipeline: r.get(0),
                runs: r.get::<_, i64>(1) as u64,
                cursor: r.get(2),
                synced: r.get::<_, i64>(3) as u64,
                pending: r.get::<_, i64>(4) as u64,
                last_run: r.get(5),
            })
            .collect())
        })
    }

    fn runs(&mut self, pipeline: Option<&str>, last: usize) -> Result<Vec<RunRecord>, StateError> {
        let pipeline = pipeline.map(str::to_string);
        self.call(move |c| {
            Ok(c.query(
                "SELECT pipeline, run, started_at, finished_at, status, report FROM runs
                 WHERE $1::TEXT IS NULL OR pipeline = $1 ORDER BY started_at DESC, run DESC LIMIT $2",
                &[&pipeline, &(last as i64)],
            )?
            .iter()
            .map(run_record)
            .collect())
        })
    }

    fn reset(&mut self, pipeline: &str) -> Result<(), StateError> {
        let pipeline = pipeline.to_string();
        self.call(move |c| {
            let mut tx = c.transaction()?;
            for table in [
                "synced",
                "pending",
                "runs",
                "audit",
                "creates",
                "staged",
                "rejects",
                "source_memo",
            ] {
                tx.execute(
                    &format!("DELETE FROM {table} WHERE pipeline = $1"),
                    &[&pipeline],
                )?;
            }
            tx.execute("DELETE FROM pipelines WHERE name = $1", &[&pipeline])?;
            tx.commit()
        })
    }
}

impl SyncedIndex for PostgresState {
    fn scan_index(
        &mut self,
        pipeline: &str,
        visit: &mut dyn FnMut(u64, u64),
    ) -> Result<(), StateError> {
        // Streamed in chunks from the connection's thread, so memory stays bounded.
        let pipeline = pipeline.to_string();
        let (chunks, received) = mpsc::sync_channel::<Vec<(i64, i64)>>(4);
        let (answer, answered) = mpsc::channel::<Result<(), postgres::Error>>();
        let job: Job = Box::new(move |c| {
            let result = (|| {
                use postgres::fallible_iterator::FallibleIterator;
                use postgres::types::Type;
                // In PostgreSQL's binary copy format: no row messages, no text to parse
                // (a million rows in a third of the time a portal's pages took). COPY
                // takes no parameters: the name goes in as a literal, its quotes doubled
                // (standard_conforming_strings, on since PostgreSQL 9.1).
                let literal = format!("'{}'", pipeline.replace('\'', "''"));
                let reader = c.copy_out(&format!(
                    "COPY (SELECT key_hash, content_hash FROM synced WHERE pipeline = {literal})
                     TO STDOUT (FORMAT binary)"
                ))?;
                let mut rows = postgres::binary_copy::BinaryCopyOutIter::new(
                    reader,
                    &[Type::INT8, Type::INT8],
                );
                let mut chunk = Vec::with_capacity(10_000);
                // Read to the end even when the visitor stopped: a copy left half read
                // would leave the connection unusable.
                let mut visited = true;
                while let Some(row) = rows.next()? {
                    if !visited {
                        continue;
                    }
                    chunk.push((row.try_get(0)?, row.try_get(1)?));
                    if chunk.len() == 10_000 {
                        let full = std::mem::replace(&mut chunk, Vec::with_capacity(10_000));
                        visited = chunks.send(full).is_ok();
                    }
                }
                if visited && !chunk.is_empty() {
                    let _ = chunks.send(chunk);
                }
                Ok(())
            })();
            drop(chunks);
            let _ = answer.send(result);
        });
        let lost = || StateError::Shared {
            url: self.shown.clone(),
            message: "the connection to the state database was lost".into(),
        };
        if !self
            .jobs
            .as_ref()
            .map(|j| j.send(job).is_ok())
            .unwrap_or(false)
        {
            return Err(lost());
        }
        for chunk in received {
            for (key_hash, content_hash) in chunk {
                visit(from_sql(key_hash), from_sql(content_hash));
            }
        }
        match answered.recv() {
            Ok(result) => result.map_err(|e| StateError::Shared {
                url: self.shown.clone(),
                message: describe(&e),
            }),
            Err(_) => Err(lost()),
        }
    }

    fn scan_source_memo(
        &mut self,
        pipeline: &str,
        visit: &mut dyn FnMut(SourceMemo),
    ) -> Result<(), StateError> {
        // A page of rows at a time (about 4 MB): ten million people's memo is 240 MB,
        // which a run should not hold on top of its index.
        const PAGE: i64 = 40;
        let mut after = 0i64;
        loop {
            let pipeline = pipeline.to_string();
            let rows: Vec<(i64, Vec<u8>)> = self.call(move |c| {
                Ok(c.query(
                    "SELECT seq, entries FROM source_memo WHERE pipeline = $1 AND seq > $2
                     ORDER BY seq LIMIT $3",
                    &[&pipeline, &after, &PAGE],
                )?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect())
            })?;
            for (_, packed) in &rows {
                SourceMemo::unpack(packed).for_each(&mut *visit);
            }
            match rows.last() {
                Some((seq, _)) if rows.len() as i64 == PAGE => after = *seq,
                _ => return Ok(()),
            }
        }
    }

    fn record_source_memo(
        &mut self,
        pipeline: &str,
        entries: &[SourceMemo],
        replace: bool,
    ) -> Result<(), StateError> {
        let pipeline = pipeline.to_string();
        let packed: Vec<Vec<u8>> = entries
            .chunks(SourceMemo::A_ROW)
            .map(SourceMemo::pack)
            .collect();
        self.call(move |c| {
            let mut tx = c.transaction()?;
            if replace {
                tx.execute("DELETE FROM source_memo WHERE pipeline = $1", &[&pipeline])?;
            }
            let next: i64 = tx
                .query_one(
                    "SELECT COALESCE(MAX(seq), 0) + 1 FROM source_memo WHERE pipeline = $1",
                    &[&pipeline],
                )?
                .get(0);
            let seqs: Vec<i64> = (next..).take(packed.len()).collect();
            tx.execute(
                "INSERT INTO source_memo (pipeline, seq, entries)
                 SELECT $1, s, e FROM UNNEST($2::BIGINT[], $3::BYTEA[]) AS u(s, e)",
                &[&pipeline, &seqs, &packed],
            )?;
            tx.commit()
        })
    }

    fn synced(&mut self, pipeline: &str, key_hash: u64) -> Result<Option<SyncedRow>, StateError> {
        let pipeline = pipeline.to_string();
        let row: Option<StoredSynced> = self.call(move |c| {
            Ok(c.query_opt(
                "SELECT key, content_hash, email, handle, record FROM synced WHERE pipeline = $1 AND key_hash = $2",
                &[&pipeline, &to_sql(key_hash)],
            )?
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))))
        })?;
        row.map(|stored| self.synced_row(stored)).transpose()
    }

    fn synced_many(
        &mut self,
        pipeline: &str,
        key_hashes: &[u64],
    ) -> Result<Vec<Option<SyncedRow>>, StateError> {
        if key_hashes.is_empty() {
            return Ok(Vec::new());
        }
        let pipeline = pipeline.to_string();
        let hashes: Vec<i64> = key_hashes.iter().map(|&h| to_sql(h)).collect();
        let rows: Vec<(i64, StoredSynced)> = self.call(move |c| {
            Ok(c.query(
                "SELECT key_hash, key, content_hash, email, handle, record FROM synced
                 WHERE pipeline = $1 AND key_hash = ANY($2)",
                &[&pipeline, &hashes],
            )?
            .into_iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3), r.get(4), r.get(5))))
            .collect())
        })?;
        let mut found: HashMap<u64, SyncedRow> = HashMap::with_capacity(rows.len());
        for (hash, stored) in rows {
            found.insert(from_sql(hash), self.synced_row(stored)?);
        }
        Ok(key_hashes.iter().map(|h| found.get(h).cloned()).collect())
    }
}

impl PendingJournal for PostgresState {
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
        type Row = (String, String, String, Option<String>, i64, Option<Vec<u8>>);
        let pipeline = pipeline.to_string();
        let rows: Vec<Row> = self.call(move |c| {
            Ok(c.query(
                "SELECT batch_id, key, kind, email, content_hash, record FROM pending WHERE pipeline = $1 ORDER BY run, batch_id, seq",
                &[&pipeline],
            )?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
            .collect())
        })?;
        let rows: Vec<crate::StoredPending> = rows
            .into_iter()
            .map(|(batch_id, key, kind, email, content_hash, bytes)| {
                let record = self.read_record(&key, bytes.as_deref());
                (batch_id, key, kind, email, content_hash, record)
            })
            .collect();
        group_pending(
            rows,
            |text| self.parse_key(text),
            |kind| StateError::Shared {
                url: self.shown.clone(),
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
        // Four sets of rows, each written by one statement over arrays.
        let mut up_hash = Vec::new();
        let mut up_key = Vec::new();
        let mut up_content = Vec::new();
        let mut up_email: Vec<Option<String>> = Vec::new();
        let mut up_handle: Vec<Option<String>> = Vec::new();
        let mut up_record: Vec<Option<Vec<u8>>> = Vec::new();
        let mut forget: Vec<i64> = Vec::new();
        let mut unpend: Vec<String> = Vec::new();
        let mut mark_key: Vec<String> = Vec::new();
        let mut mark_handle: Vec<Option<String>> = Vec::new();
        for settlement in settlements {
            match settlement {
                Settlement::Synced { key, entry } => {
                    up_hash.push(to_sql(key.hash64()));
                    up_key.push(key.to_string());
                    up_content.push(to_sql(entry.content_hash));
                    up_email.push(entry.email.clone());
                    up_handle.push(entry.handle.clone());
                    up_record.push(entry.record.as_deref().map(|c| self.codec.encode(c)));
                    unpend.push(key.to_string());
                }
                Settlement::Forgotten { key } => {
                    forget.push(to_sql(key.hash64()));
                    unpend.push(key.to_string());
                }
                Settlement::Dropped { key } => unpend.push(key.to_string()),
                Settlement::AwaitingFinish { key, handle } => {
                    mark_key.push(key.to_string());
                    mark_handle.push(handle.clone());
                }
            }
        }
        let pipeline = pipeline.to_string();
        let batch_id = batch_id.to_string();
        let collision = self.call(move |c| {
            let mut tx = c.transaction()?;
            if !up_hash.is_empty() {
                // A key hash already held by another key is not overwritten; the
                // rows that were not written name the collision.
                let written = tx.query(
                    "INSERT INTO synced (pipeline, key_hash, key, content_hash, email, handle, record)
                     SELECT $1, h, k, ch, e, hd, r
                     FROM UNNEST($2::BIGINT[], $3::TEXT[], $4::BIGINT[], $5::TEXT[], $6::TEXT[], $7::BYTEA[])
                       AS u(h, k, ch, e, hd, r)
                     ON CONFLICT (pipeline, key_hash) DO UPDATE SET content_hash = excluded.content_hash,
                       email = excluded.email, handle = COALESCE(excluded.handle, synced.handle),
                       record = COALESCE(excluded.record, synced.record),
                       created_run = CASE WHEN excluded.record IS NULL THEN synced.created_run END
                     WHERE synced.key = excluded.key
                     RETURNING key",
                    &[&pipeline, &up_hash, &up_key, &up_content, &up_email, &up_handle, &up_record],
                )?;
                if written.len() < up_key.len() {
                    let done: std::collections::HashSet<String> =
                        written.iter().map(|r| r.get::<_, String>(0)).collect();
                    if let Some((i, new)) = up_key.iter().enumerate().find(|(_, k)| !done.contains(*k)) {
                        let existing: String = tx
                            .query_one(
                                "SELECT key FROM synced WHERE pipeline = $1 AND key_hash = $2",
                                &[&pipeline, &up_hash[i]],
                            )?
                            .get(0);
                        return Ok(Some((existing, new.clone())));
                    }
                }
            }
            if !forget.is_empty() {
                tx.execute(
                    "DELETE FROM synced WHERE pipeline = $1 AND key_hash = ANY($2)",
                    &[&pipeline, &forget],
                )?;
            }
            if !unpend.is_empty() {
                tx.execute(
                    "DELETE FROM pending WHERE pipeline = $1 AND batch_id = $2 AND key = ANY($3)",
                    &[&pipeline, &batch_id, &unpend],
                )?;
            }
            if !mark_key.is_empty() {
                tx.execute(
                    "UPDATE pending p SET applied = TRUE, handle = u.hd
                     FROM UNNEST($3::TEXT[], $4::TEXT[]) AS u(k, hd)
                     WHERE p.pipeline = $1 AND p.batch_id = $2 AND p.key = u.k",
                    &[&pipeline, &batch_id, &mark_key, &mark_handle],
                )?;
            }
            tx.commit()?;
            Ok(None)
        })?;
        match collision {
            Some((existing, new)) => Err(StateError::KeyCollision { existing, new }),
            None => Ok(()),
        }
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
        self.stage(pipeline, run, rows, handles, created_run)
    }

    fn confirm_finished(&mut self, pipeline: &str, run: i64) -> Result<u64, StateError> {
        self.staged()?;
        let pipeline = pipeline.to_string();
        self.call(move |c| {
            let mut tx = c.transaction()?;
            let confirmed = confirm::confirm_run(&mut tx, &pipeline, run)?;
            tx.commit()?;
            Ok(confirmed)
        })
    }

    fn hold_confirm(&mut self, pipeline: &str, run: i64) -> Result<Option<u64>, StateError> {
        self.staged()?;
        let pipeline = pipeline.to_string();
        // Begun in SQL, not as a `Transaction`, which could not outlive this call: the
        // client's next statements (the sink's own key-value writes among them) run in
        // it until the commit or the rollback. Held whatever its size: a run's locks
        // are the connection's, with no heartbeat to keep up.
        let confirmed = self.call(move |c| {
            c.batch_execute("BEGIN")?;
            confirm::confirm_run(c, &pipeline, run).inspect_err(|_| {
                let _ = c.batch_execute("ROLLBACK");
            })
        })?;
        self.held_confirm = true;
        Ok(Some(confirmed))
    }

    fn commit_confirm(&mut self) -> Result<(), StateError> {
        if !std::mem::take(&mut self.held_confirm) {
            return Ok(());
        }
        // A COMMIT that fails ends the transaction too, rolled back.
        self.call(|c| c.batch_execute("COMMIT"))
    }

    fn abandon_confirm(&mut self) -> Result<(), StateError> {
        if !std::mem::take(&mut self.held_confirm) {
            return Ok(());
        }
        self.call(|c| c.batch_execute("ROLLBACK"))
    }

    fn drop_pending(&mut self, pipeline: &str, batch_id: &str) -> Result<(), StateError> {
        let (pipeline, batch_id) = (pipeline.to_string(), batch_id.to_string());
        self.call(move |c| {
            c.execute(
                "DELETE FROM pending WHERE pipeline = $1 AND batch_id = $2",
                &[&pipeline, &batch_id],
            )
            .map(|_| ())
        })
    }
}

impl SinkStores for PostgresState {
    fn sink_store<'a>(&'a mut self, scope: &str) -> Box<dyn SinkStore + 'a> {
        Box::new(PostgresSinkStore {
            state: self,
            scope: scope.to_string(),
        })
    }
}

impl AuditLog for PostgresState {
    fn record_audit(&mut self, entries: &[AuditEntry]) -> Result<(), StateError> {
        if entries.is_empty() {
            return Ok(());
        }
        // The people these entries change whose create is told from their run's one
        // entry: that create is written out first, from the record about to change (see
        // `write_out_creates` in the SQLite backend).
        let changed: Vec<&AuditEntry> = entries
            .iter()
            .filter(|e| e.kind != contactsync_core::ChangeKind::Create.as_str())
            .collect();
        let mut pipelines = Vec::with_capacity(changed.len());
        let mut hashes = Vec::with_capacity(changed.len());
        for e in changed {
            pipelines.push(e.pipeline.clone());
            hashes.push(to_sql(self.parse_key(&e.key)?.hash64()));
        }
        let mut written = Vec::new();
        if !hashes.is_empty() {
            let (pipes, keys) = (pipelines.clone(), hashes.clone());
            let rows: Vec<StoredCreated> = self.call(move |c| {
                Ok(c.query(
                    &format!(
                        "{CREATED_ROWS} AND (s.pipeline, s.key_hash) IN
                           (SELECT * FROM UNNEST($1::TEXT[], $2::BIGINT[]))"
                    ),
                    &[&pipes, &keys],
                )?
                .iter()
                .map(created_columns)
                .collect())
            })?;
            for row in rows {
                written.push(self.created_entry(row)?);
            }
        }
        self.learn(entries.iter().filter_map(|e| e.created.as_deref()))?;
        let encode = |codec: &mut RecordCodec, entries: &[AuditEntry]| -> Vec<Option<Vec<u8>>> {
            entries
                .iter()
                .map(|e| e.created.as_deref().map(|c| codec.encode(c)))
                .collect()
        };
        let written_records = encode(&mut self.codec, &written);
        let records = encode(&mut self.codec, entries);
        let entries = entries.to_vec();
        self.call(move |c| {
            let mut tx = c.transaction()?;
            insert_audit(&mut tx, &written, &written_records)?;
            insert_audit(&mut tx, &entries, &records)?;
            tx.commit()
        })
    }

    fn record_created_run(
        &mut self,
        pipeline: &str,
        run: i64,
        at: i64,
        values: bool,
    ) -> Result<bool, StateError> {
        let name = pipeline.to_string();
        self.call(move |c| {
            c.execute(
                "INSERT INTO creates (pipeline, run, at, values_kept) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (pipeline, run) DO UPDATE SET at = excluded.at, values_kept = excluded.values_kept",
                &[&name, &run, &at, &values],
            )
        })?;
        self.creates_run = Some((pipeline.to_string(), run));
        Ok(true)
    }

    fn prune_audit(&mut self, pipeline: &str, before: i64) -> Result<u64, StateError> {
        let pipeline = pipeline.to_string();
        self.call(move |c| {
            let mut tx = c.transaction()?;
            let mut pruned = 0;
            // A run's creates go with it, as their entries would have; so do its rejects.
            for table in ["audit", "creates", "rejects"] {
                pruned += tx.execute(
                    &format!("DELETE FROM {table} WHERE pipeline = $1 AND at < $2"),
                    &[&pipeline, &before],
                )?;
            }
            tx.commit()?;
            Ok(pruned)
        })
    }

    fn history(&mut self, who: &str) -> Result<Vec<AuditEntry>, StateError> {
        let who = who.trim().to_string();
        let email = Contact::normalize_email(&who).unwrap_or_default();
        // The key hashes WHO may be: the synced rows' primary key finds them.
        let mut hashes: Vec<i64> = vec![
            to_sql(ContactKey::external_id_hash(&who)),
            to_sql(ContactKey::email_hash(&email)),
        ];
        if let Ok(key) = who.parse::<ContactKey>() {
            hashes.push(to_sql(key.hash64()));
        }
        let (rows, created): (Vec<StoredAudit>, Vec<StoredCreated>) = self.call(move |c| {
            let stored = c
                .query(
                    &format!(
                        "SELECT {AUDIT_COLUMNS} FROM audit
                             WHERE key = $1 OR key = 'external_id:' || $1 OR key = 'email:' || $2
                                OR lower(email) = lower($2)
                             ORDER BY at, id"
                    ),
                    &[&who, &email],
                )?
                .iter()
                .map(audit_columns)
                .collect();
            let created = c
                .query(
                    &format!(
                        "{CREATED_ROWS} AND ((s.pipeline, s.key_hash) IN
                               (SELECT p.name, h FROM pipelines p, unnest($3::BIGINT[]) AS h)
                             OR lower(s.email) = lower($2))
                           AND (s.key = $1 OR s.key = 'external_id:' || $1
                             OR s.key = 'email:' || $2 OR lower(s.email) = lower($2))"
                    ),
                    &[&who, &email, &hashes],
                )?
                .iter()
                .map(created_columns)
                .collect();
            Ok((stored, created))
        })?;
        let stored = rows
            .into_iter()
            .map(|row| with_created_fields(self.audit_entry(row)))
            .collect();
        let created = created
            .into_iter()
            .map(|row| self.created_entry(row).map(with_created_fields))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(merge_history(stored, created))
    }
}

impl Slots for PostgresState {
    fn claim_slot(&mut self, slot: &str, pipeline: &str, worker: &str) -> Result<bool, StateError> {
        // A worker holds an advisory lock of its own name while it lives: a claim whose
        // worker's lock is free was left by a worker that died, and is taken over.
        if self.worker.as_deref() != Some(worker) {
            let key = lock_key(&format!("worker:{worker}"));
            let got = self.call(move |c| {
                Ok(c.query_one("SELECT pg_try_advisory_lock($1)", &[&key])?
                    .get::<_, bool>(0))
            })?;
            if !got {
                return Err(StateError::Shared {
                    url: self.shown.clone(),
                    message: format!("another live worker calls itself {worker:?}"),
                });
            }
            self.worker = Some(worker.to_string());
        }
        let (slot, pipeline, worker) = (slot.to_string(), pipeline.to_string(), worker.to_string());
        self.call(move |c| {
            let mut tx = c.transaction()?;
            let inserted = tx.execute(
                "INSERT INTO slots (slot, pipeline, worker, status, claimed_at) VALUES ($1, $2, $3, 'claimed', $4)
                 ON CONFLICT (slot, pipeline) DO NOTHING",
                &[&slot, &pipeline, &worker, &chrono::Utc::now().to_rfc3339()],
            )?;
            if inserted == 1 {
                tx.commit()?;
                return Ok(true);
            }
            let row = tx.query_one(
                "SELECT worker, status FROM slots WHERE slot = $1 AND pipeline = $2 FOR UPDATE",
                &[&slot, &pipeline],
            )?;
            let (other, status): (String, String) = (row.get(0), row.get(1));
            if status != "claimed" {
                tx.commit()?;
                return Ok(false);
            }
            let alive = other != worker && {
                let key = lock_key(&format!("worker:{other}"));
                let free: bool = tx
                    .query_one("SELECT pg_try_advisory_lock($1)", &[&key])?
                    .get(0);
                if free {
                    tx.execute("SELECT pg_advisory_unlock($1)", &[&key])?;
                }
                !free
            };
            if alive {
                tx.commit()?;
                return Ok(false);
            }
            tx.execute(
                "UPDATE slots SET worker = $3, claimed_at = $4 WHERE slot = $1 AND pipeline = $2",
                &[&slot, &pipeline, &worker, &chrono::Utc::now().to_rfc3339()],
            )?;
            tx.commit()?;
            Ok(true)
        })
    }

    fn finish_slot(&mut self, slot: &str, pipeline: &str, status: &str) -> Result<(), StateError> {
        let (slot, pipeline, status) = (slot.to_string(), pipeline.to_string(), status.to_string());
        self.call(move |c| {
            c.execute(
                "UPDATE slots SET status = $3, finished_at = $4 WHERE slot = $1 AND pipeline = $2",
                &[&slot, &pipeline, &status, &chrono::Utc::now().to_rfc3339()],
            )
            .map(|_| ())
        })
    }
}
