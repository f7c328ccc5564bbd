//! The PostgreSQL backend's [`RejectLog`] and [`Views`].

use super::{lock_key, reject_row, run_record, PostgresState};
use crate::KEPT_REJECTS;
use crate::{HeldLock, LockHolder, RejectLog, RejectRow, RunRecord, StateError, Views};

impl RejectLog for PostgresState {
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
        let pipeline = pipeline.to_string();
        let rows = rows.to_vec();
        self.call(move |c| {
            let mut tx = c.transaction()?;
            let kept: i64 = tx
                .query_one(
                    "SELECT COALESCE(MAX(seq) + 1, 0) FROM rejects WHERE pipeline = $1 AND run = $2",
                    &[&pipeline, &run],
                )?
                .get(0);
            let room = KEPT_REJECTS.saturating_sub(kept as usize);
            let rows = &rows[..rows.len().min(room)];
            let column = |f: fn(&RejectRow) -> Option<&str>| -> Vec<Option<&str>> {
                rows.iter().map(f).collect()
            };
            let seqs: Vec<i64> = (0..rows.len() as i64).map(|i| kept + i).collect();
            // One statement over arrays, as the pending rows are written.
            tx.execute(
                "INSERT INTO rejects (pipeline, run, seq, at, stage, origin, key, email, field, reason)
                 SELECT $1, $2, s, $3, st, o, k, e, f, r
                 FROM UNNEST($4::BIGINT[], $5::TEXT[], $6::TEXT[], $7::TEXT[], $8::TEXT[], $9::TEXT[], $10::TEXT[])
                   AS u(s, st, o, k, e, f, r)",
                &[
                    &pipeline,
                    &run,
                    &at,
                    &seqs,
                    &column(|r| Some(r.stage.as_str())),
                    &column(|r| Some(r.origin.as_str())),
                    &column(|r| r.key.as_deref()),
                    &column(|r| r.email.as_deref()),
                    &column(|r| r.field.as_deref()),
                    &column(|r| Some(r.reason.as_str())),
                ],
            )?;
            tx.commit()
        })
    }

    fn rejects(
        &mut self,
        pipeline: &str,
        run: i64,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<RejectRow>, StateError> {
        let pipeline = pipeline.to_string();
        self.call(move |c| {
            Ok(c.query(
                "SELECT stage, origin, key, email, field, reason FROM rejects
                 WHERE pipeline = $1 AND run = $2 AND seq >= $3 ORDER BY seq LIMIT $4",
                &[&pipeline, &run, &(offset as i64), &(limit as i64)],
            )?
            .iter()
            .map(|r| reject_row(r, 0))
            .collect())
        })
    }
}

impl Views for PostgresState {
    fn pipelines(&mut self) -> Result<Vec<String>, StateError> {
        self.call(|c| {
            Ok(c.query("SELECT name FROM pipelines ORDER BY name", &[])?
                .iter()
                .map(|r| r.get(0))
                .collect())
        })
    }

    fn run_page(
        &mut self,
        pipeline: &str,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<RunRecord>, StateError> {
        let pipeline = pipeline.to_string();
        let before = before.unwrap_or(i64::MAX);
        self.call(move |c| {
            Ok(c.query(
                "SELECT pipeline, run, started_at, finished_at, status, report FROM runs
                 WHERE pipeline = $1 AND run < $2 ORDER BY run DESC LIMIT $3",
                &[&pipeline, &before, &(limit as i64)],
            )?
            .iter()
            .map(run_record)
            .collect())
        })
    }

    fn held_locks(&mut self) -> Result<Vec<HeldLock>, StateError> {
        self.call(|c| {
            // A lock is live while some session holds its advisory lock: a runner that
            // died released it with its connection, though its row is still there.
            let granted: std::collections::HashSet<i64> = c
                .query(
                    "SELECT ((classid::BIGINT << 32) | objid::BIGINT) FROM pg_locks
                     WHERE locktype = 'advisory' AND granted AND objsubid = 1",
                    &[],
                )?
                .iter()
                .map(|r| r.get(0))
                .collect();
            Ok(c.query(
                "SELECT name, token, pid, host, pipeline, since FROM locks ORDER BY name",
                &[],
            )?
            .iter()
            .map(|r| {
                let name: String = r.get(0);
                HeldLock {
                    live: granted.contains(&lock_key(&name)),
                    holder: LockHolder {
                        token: r.get(1),
                        pid: r.get::<_, i64>(2) as u32,
                        host: r.get(3),
                        pipeline: r.get(4),
                        since: r.get(5),
                    },
                    name,
                }
            })
            .collect())
        })
    }
}
