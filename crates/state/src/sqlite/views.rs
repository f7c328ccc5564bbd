//! The SQLite backend's [`RejectLog`] and [`Views`].

use rusqlite::{params, OptionalExtension};

use super::{db_error, reject_row, run_record, SqliteState, PIPELINE_ID, WRITE};
use crate::{HeldLock, LockHolder, RejectLog, RejectRow, RunRecord, StateError, Views};
use crate::{KEPT_REJECTS, LOCK_STALE_AFTER};

impl RejectLog for SqliteState {
    fn record_rejects(
        &mut self,
        pipeline: &str,
        run: i64,
        at: i64,
        rows: &[RejectRow],
    ) -> Result<(), StateError> {
        if rows.is_empty() {
            return Ok(());
        }
        let map = db_error(&self.path);
        let tx = self.conn.transaction_with_behavior(WRITE).map_err(map)?;
        {
            // The pipeline row exists once its first run began.
            let id: Option<i64> = tx
                .query_row(
                    "SELECT id FROM pipelines WHERE name = ?1",
                    [pipeline],
                    |r| r.get(0),
                )
                .optional()
                .map_err(map)?;
            let Some(id) = id else { return Ok(()) };
            let kept: i64 = tx
                .query_row(
                    "SELECT COALESCE(MAX(seq) + 1, 0) FROM rejects WHERE pipeline = ?1 AND run = ?2",
                    params![id, run],
                    |r| r.get(0),
                )
                .map_err(map)?;
            let room = KEPT_REJECTS.saturating_sub(kept as usize);
            let mut put = tx
                .prepare_cached(
                    "INSERT INTO rejects (pipeline, run, seq, at, stage, origin, key, email, field, reason)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                )
                .map_err(map)?;
            for (i, row) in rows.iter().take(room).enumerate() {
                put.execute(params![
                    id,
                    run,
                    kept + i as i64,
                    at,
                    row.stage,
                    row.origin,
                    row.key,
                    row.email,
                    row.field,
                    row.reason
                ])
                .map_err(map)?;
            }
        }
        tx.commit().map_err(map)
    }

    fn rejects(
        &mut self,
        pipeline: &str,
        run: i64,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<RejectRow>, StateError> {
        let map = db_error(&self.path);
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT stage, origin, key, email, field, reason FROM rejects
                 WHERE pipeline = {PIPELINE_ID} AND run = ?2 AND seq >= ?3 ORDER BY seq LIMIT ?4"
            ))
            .map_err(map)?;
        let rows = stmt
            .query_map(params![pipeline, run, offset as i64, limit as i64], |r| {
                reject_row(r, 0)
            })
            .and_then(|rows| rows.collect())
            .map_err(map)?;
        Ok(rows)
    }
}

impl Views for SqliteState {
    fn pipelines(&mut self) -> Result<Vec<String>, StateError> {
        let map = db_error(&self.path);
        let mut stmt = self
            .conn
            .prepare_cached("SELECT name FROM pipelines ORDER BY name")
            .map_err(map)?;
        let names = stmt
            .query_map([], |r| r.get(0))
            .and_then(|rows| rows.collect())
            .map_err(map)?;
        Ok(names)
    }

    fn run_page(
        &mut self,
        pipeline: &str,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<RunRecord>, StateError> {
        let map = db_error(&self.path);
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT pipeline, run, started_at, finished_at, status, report FROM runs
                 WHERE pipeline = ?1 AND run < ?2 ORDER BY run DESC LIMIT ?3",
            )
            .map_err(map)?;
        let rows = stmt
            .query_map(
                params![pipeline, before.unwrap_or(i64::MAX), limit as i64],
                run_record,
            )
            .and_then(|rows| rows.collect())
            .map_err(map)?;
        Ok(rows)
    }

    fn held_locks(&mut self) -> Result<Vec<HeldLock>, StateError> {
        let map = db_error(&self.path);
        let now = chrono::Utc::now().timestamp();
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT name, token, pid, host, pipeline, since, heartbeat FROM locks ORDER BY name",
            )
            .map_err(map)?;
        let rows = stmt
            .query_map([], |r| {
                let holder = LockHolder {
                    token: r.get(1)?,
                    pid: r.get::<_, i64>(2)? as u32,
                    host: r.get(3)?,
                    pipeline: r.get(4)?,
                    since: r.get(5)?,
                };
                let heartbeat: i64 = r.get(6)?;
                Ok(HeldLock {
                    name: r.get(0)?,
                    live: now - heartbeat <= LOCK_STALE_AFTER.as_secs() as i64 && !holder.is_gone(),
                    holder,
                })
            })
            .and_then(|rows| rows.collect())
            .map_err(map)?;
        Ok(rows)
    }
}
