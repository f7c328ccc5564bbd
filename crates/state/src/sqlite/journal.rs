//! Where a batch is recorded before it is confirmed: `pending`, the journal kept across
//! a crash (the batches a sink durable at its finish took whole are staged apart,
//! `staging.rs`).

use super::staging::{ConfirmError, StagedRun};
use super::store::MARK_CONFIRMED;
use super::*;
use crate::PendingJournal;

/// Drops `synced_email` before `rows` rows are confirmed, when there are many and
/// `synced` holds fewer (a first sync), and says so; the caller builds it again
/// once they are in ([`restore_indexes`]). Its email hashes are random, so rows
/// confirmed in key order land on its pages in random order: a 1M first sync spent
/// 4.8 s inserting them one by one through the WAL, where building the index from
/// the table afterwards takes 1.0 s. A crash in between leaves the index missing
/// until the next open restores it; `history` finds people without it, only slower.
pub(super) fn drop_email_index_for(tx: &rusqlite::Connection, rows: i64) -> rusqlite::Result<bool> {
    if rows < crate::REBUILD_EMAIL_INDEX_ROWS {
        return Ok(false);
    }
    // Counts no further than `rows`: a nightly's few thousand rows do not count a
    // large `synced`.
    let held: i64 = tx.query_row(
        "SELECT COUNT(*) FROM (SELECT 1 FROM synced LIMIT ?1)",
        [rows],
        |r| r.get(0),
    )?;
    if held >= rows {
        return Ok(false);
    }
    tx.execute_batch("DROP INDEX IF EXISTS synced_email")?;
    Ok(true)
}

/// What a confirm moves into `synced`.
pub(super) enum Confirming<'a> {
    /// A run's applied rows in `pending`.
    Pending,
    /// A run's staged rows.
    Staged(&'a mut StagedRun),
}

/// The staged rows could not be read back (or the thread writing them failed).
fn staging_error(path: &std::path::Path, e: std::io::Error) -> StateError {
    StateError::Unavailable {
        path: path.to_path_buf(),
        message: format!("the changes staged for it in a temporary file: {e}"),
    }
}

impl SqliteState {
    /// The confirm of [`PendingJournal::hold_confirm`](crate::PendingJournal::hold_confirm),
    /// its transaction begun: `pending`'s rows, then `staged`'s; abandoned on an error or
    /// when the rows are too many to hold.
    pub(super) fn confirm_held(
        &mut self,
        pipeline: &str,
        id: i64,
        run: i64,
        mut staged: Option<&mut StagedRun>,
    ) -> Result<Option<u64>, StateError> {
        let mut confirmed = Some(0);
        for pending in [true, false] {
            let source = match (pending, staged.as_deref_mut()) {
                (true, _) => Confirming::Pending,
                (false, Some(staged)) => Confirming::Staged(staged),
                (false, None) => break,
            };
            let done = match self.confirm_from(source, id, run) {
                Ok(done) => done,
                Err(e) => {
                    let _ = self.abandon_confirm();
                    return Err(e);
                }
            };
            confirmed = confirmed.zip(done).map(|(a, b)| a + b);
            if confirmed.is_none() {
                // Too many rows to hold the write lock for: confirmed after the finish.
                self.abandon_confirm()?;
                return Ok(None);
            }
        }
        if let Err(e) = self.conn.execute(MARK_CONFIRMED, params![pipeline, run]) {
            let _ = self.abandon_confirm();
            return Err(db_error(&self.path)(e));
        }
        Ok(confirmed)
    }

    /// Gives the staged rows of a held confirm back to their run: it was dropped.
    pub(super) fn unhold_staged(&mut self) {
        if let Some((pipeline, staged)) = self.held_staged.take() {
            self.staged.insert(pipeline, staged);
        }
    }

    /// Inserts a batch's rows into `pending` in one transaction; with `applied`, each
    /// marked applied with its handle (awaiting the sink's finish).
    pub(super) fn insert_pending(
        &mut self,
        pipeline: &str,
        run: i64,
        batch_id: &str,
        rows: &[PendingRow],
        applied: Option<&[Option<String>]>,
    ) -> Result<(), StateError> {
        self.learn(rows.iter().filter_map(|r| r.record.as_ref()))?;
        let path = self.path.clone();
        let map = db_error(&path);
        let (conn, codec) = (&mut self.conn, &mut self.codec);
        let tx = conn.transaction_with_behavior(WRITE).map_err(map)?;
        let id = match pipeline_id(&tx, pipeline).map_err(map)? {
            Some(id) => id,
            None => ensure_pipeline(&tx, pipeline).map_err(map)?,
        };
        let mut stmt = tx
            .prepare_cached(
                "INSERT OR REPLACE INTO pending (pipeline, batch_id, seq, run, key_hash, kind, content_hash, record, key, email, applied, handle, email_hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            )
            .map_err(map)?;
        let mut insert = |seq: usize, row: &PendingRow, bytes: Option<Vec<u8>>| {
            let record = row.record.as_ref();
            let handle = applied
                .and_then(|handles| handles.get(seq))
                .cloned()
                .flatten();
            let values = params![
                id,
                batch_id,
                seq as i64,
                run,
                to_sql(row.key.hash64()),
                compact::kind(row.kind),
                to_sql(row.content_hash),
                bytes,
                compact::key(&row.key, record),
                compact::email(row.email.as_deref(), record),
                i64::from(applied.is_some()),
                handle,
                compact::email_hash(row.key.hash64(), row.email.as_deref(), record),
            ];
            stmt.execute(values).map(drop).map_err(map)
        };
        let encode = |codec: &mut RecordCodec, chunk: &[PendingRow]| -> Vec<Option<Vec<u8>>> {
            chunk
                .iter()
                .map(|row| row.record.as_ref().map(|r| codec.encode(r)))
                .collect()
        };
        if rows.len() < 2 * ENCODE_CHUNK {
            for (seq, (row, bytes)) in rows.iter().zip(encode(codec, rows)).enumerate() {
                insert(seq, row, bytes)?;
            }
        } else {
            // Records are compressed on a second thread while the rows before them are
            // inserted: compressing a first sync's million records took as long as
            // inserting them, one after the other on one core.
            std::thread::scope(|scope| -> Result<(), StateError> {
                let (send, receive) = std::sync::mpsc::sync_channel(4);
                scope.spawn(move || {
                    for chunk in rows.chunks(ENCODE_CHUNK) {
                        if send.send(encode(codec, chunk)).is_err() {
                            return; // the inserting side stopped at an error
                        }
                    }
                });
                for (n, chunk) in rows.chunks(ENCODE_CHUNK).enumerate() {
                    let encoded = receive.recv().map_err(|_| StateError::Corrupt {
                        path: path.clone(),
                        message: "the thread compressing records stopped".into(),
                    })?;
                    for (i, (row, bytes)) in chunk.iter().zip(encoded).enumerate() {
                        insert(n * ENCODE_CHUNK + i, row, bytes)?;
                    }
                }
                Ok(())
            })?;
        }
        drop(stmt);
        tx.commit().map_err(map)
    }

    /// Moves the rows of `run` that `source` holds applied into `synced` (removals out
    /// of it), and out of `pending`; returns how many.
    ///
    /// With a confirm held ([`SqliteState::held_confirm`]) every statement goes into
    /// that one open transaction, and `None` says the rows are too many for one range
    /// (the caller rolls back and confirms after the sink's finish instead).
    pub(super) fn confirm_from(
        &mut self,
        mut source: Confirming<'_>,
        id: i64,
        run: i64,
    ) -> Result<Option<u64>, StateError> {
        let path = self.path.clone();
        let map = db_error(&path);
        let held = self.held_confirm;
        let remove = compact::kind(ChangeKind::Remove);
        // In ranges of key hashes, each its own transaction, so that no transaction
        // holds the write lock for long (ten million rows took over a minute, and the
        // run lock's heartbeat counts a lock not renewed for two minutes as abandoned).
        // Ranges of the hash, in the order `synced` keeps them, so that each range's
        // rows are appended to its b-tree in order (ranges of rows would interleave and
        // split its pages). Each range scans `pending`; a range holds about
        // `confirm_range_rows` rows, so a million take one scan.
        // A crash between two ranges leaves the rest pending, applied: the next run's
        // recovery asks the sink about them, as after a crash before the confirmation
        // (staged rows go with the process: the next run sends them again, into a sink
        // that converges).
        let rows: i64 = match &mut source {
            Confirming::Pending => self
                .conn
                .query_row(
                    "SELECT COUNT(*) FROM pending WHERE pipeline = ?1 AND run = ?2",
                    params![id, run],
                    |r| r.get(0),
                )
                .map_err(map)?,
            Confirming::Staged(staged) => {
                let started = std::time::Instant::now();
                let rows = staged.rows().map_err(|e| staging_error(&path, e))?;
                tracing::debug!(
                    rows,
                    waited = started.elapsed().as_secs_f64(),
                    "the staged rows are written"
                );
                rows as i64
            }
        };
        if rows == 0 {
            return Ok(Some(0));
        }
        let parts = {
            let range = i128::from(self.confirm_range_rows.max(1));
            (i128::from(rows) + range - 1) / range
        };
        if held && parts > 1 {
            return Ok(None);
        }
        let ranges = || {
            let width = (1i128 << 64) / parts;
            (0..parts).map(move |n| {
                let from = i128::from(i64::MIN) + n * width;
                let to = if n == parts - 1 {
                    i128::from(i64::MAX)
                } else {
                    from + width - 1
                };
                // Both within i64 by construction.
                (from as i64, to as i64)
            })
        };
        let rebuild_email_index =
            in_write(&mut self.conn, held, |tx| drop_email_index_for(tx, rows)).map_err(map)?;
        let mut confirmed = 0u64;
        for (from, to) in ranges() {
            confirmed += match &mut source {
                Confirming::Pending => in_write(&mut self.conn, held, |tx| {
                    confirm_range(tx, params![id, run, remove, from, to])
                })
                .map_err(map)?,
                Confirming::Staged(staged) => in_write(&mut self.conn, held, |tx| {
                    staged.confirm_range(tx, &mut self.codec, id, from, to)
                })
                .map_err(|e| match e {
                    ConfirmError::Database(e) => map(e),
                    ConfirmError::Staging(e) => staging_error(&path, e),
                })?,
            };
        }
        if rebuild_email_index {
            in_write(&mut self.conn, held, restore_indexes).map_err(map)?;
        }
        if let Confirming::Staged(_) = source {
            return Ok(Some(confirmed));
        }
        // The confirmed rows leave `pending` last: when they are all it holds (a run
        // alone, as usual), at once, which costs next to nothing where deleting them row
        // by row took longer than confirming them. Until then they are pending and
        // applied, and confirming them again (after a crash, through recovery) changes
        // nothing.
        // The check and the delete in one transaction: another pipeline's run may be
        // recording its own pending changes in the same file.
        let alone = in_write(&mut self.conn, held, |tx| {
                let others: bool = tx.query_row(
                    "SELECT EXISTS (SELECT 1 FROM pending WHERE NOT (pipeline = ?1 AND run = ?2 AND applied = 1))",
                    params![id, run],
                    |r| r.get(0),
                )?;
                if !others {
                    tx.execute("DELETE FROM pending", [])?;
                }
                Ok(!others)
            })
            .map_err(map)?;
        if alone {
            return Ok(Some(confirmed));
        }
        for (from, to) in ranges() {
            self.conn
                .execute(
                    "DELETE FROM pending WHERE key_hash BETWEEN ?3 AND ?4
                       AND pipeline = ?1 AND run = ?2 AND applied = 1",
                    params![id, run, from, to],
                )
                .map_err(map)?;
        }
        Ok(Some(confirmed))
    }
}

/// Runs `step` in a write transaction of its own, committed when it succeeds; or, with
/// a confirm `held`, in that transaction, left open.
fn in_write<T, E: From<rusqlite::Error>>(
    conn: &mut rusqlite::Connection,
    held: bool,
    step: impl FnOnce(&rusqlite::Connection) -> Result<T, E>,
) -> Result<T, E> {
    if held {
        return step(conn);
    }
    let tx = conn.transaction_with_behavior(WRITE)?;
    let done = step(&tx)?;
    tx.commit()?;
    Ok(done)
}

/// Moves one range of key hashes of a run's applied rows from `pending` into `synced`:
/// `values` are the pipeline, the run, the removal's kind and the range's ends.
fn confirm_range(
    conn: &rusqlite::Connection,
    values: &[&dyn rusqlite::ToSql],
) -> rusqlite::Result<u64> {
    let removed = conn.execute(
        "DELETE FROM synced WHERE pipeline = ?1 AND key_hash IN
           (SELECT key_hash FROM pending WHERE key_hash BETWEEN ?4 AND ?5
              AND pipeline = ?1 AND run = ?2 AND applied = 1 AND kind = ?3)",
        values,
    )?;
    let upserted = conn.execute(
        &format!(
            "INSERT INTO synced (pipeline, key_hash, content_hash, record, key, email, handle, created_run, email_hash)
               SELECT pipeline, key_hash, content_hash, record, key, email, handle, NULL, email_hash
               FROM pending
               WHERE key_hash BETWEEN ?4 AND ?5
                 AND pipeline = ?1 AND run = ?2 AND applied = 1 AND kind != ?3
               ORDER BY key_hash
             {SYNCED_UPSERT}"
        ),
        values,
    )?;
    Ok((removed + upserted) as u64)
}
