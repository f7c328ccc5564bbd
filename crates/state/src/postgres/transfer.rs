//! The PostgreSQL backend's [`StateTransfer`]: `contactsync state copy` into and out
//! of a shared database.

use super::*;
use crate::roles::*;

impl StateTransfer for PostgresState {
    fn export(
        &mut self,
        visit: &mut dyn FnMut(StateItem) -> Result<(), StateError>,
    ) -> Result<(), StateError> {
        type Pipe = (String, i64, Option<String>, Option<i64>);
        let pipelines: Vec<Pipe> = self.call(|c| {
            Ok(c.query(
                "SELECT name, runs, cursor, last_full_run FROM pipelines ORDER BY name",
                &[],
            )?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect())
        })?;
        for (name, runs, cursor, last_full_run) in pipelines {
            visit(StateItem::Pipeline {
                name,
                runs,
                cursor,
                last_full_run,
            })?;
        }
        // The synced rows page by page (keyset on the primary key): memory stays bounded.
        let mut after: (String, i64) = (String::new(), i64::MIN);
        loop {
            let from = after.clone();
            type Row = (
                String,
                i64,
                String,
                i64,
                Option<String>,
                Option<String>,
                Option<Vec<u8>>,
            );
            let page: Vec<Row> = self.call(move |c| {
                Ok(c.query(
                    "SELECT pipeline, key_hash, key, content_hash, email, handle, record FROM synced
                     WHERE (pipeline, key_hash) > ($1, $2) ORDER BY pipeline, key_hash LIMIT 10000",
                    &[&from.0, &from.1],
                )?
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5), r.get(6)))
                .collect())
            })?;
            let Some(last) = page.last() else { break };
            after = (last.0.clone(), last.1);
            for (pipeline, _, key, content_hash, email, handle, record) in page {
                let row = self.synced_row((key, content_hash, email, handle, record))?;
                visit(StateItem::Synced { pipeline, row })?;
            }
        }
        for run in self.runs(None, i64::MAX as usize)?.into_iter().rev() {
            visit(StateItem::Run(run))?;
        }
        let audit: Vec<StoredAudit> = self.call(|c| {
            Ok(c.query(
                &format!("SELECT {AUDIT_COLUMNS} FROM audit ORDER BY id"),
                &[],
            )?
            .iter()
            .map(audit_columns)
            .collect())
        })?;
        for row in audit {
            let entry = self.audit_entry(row);
            visit(StateItem::Audit(entry))?;
        }
        // A run's creates kept as one entry go as an entry a person, last, as
        // `history` tells them after the stored entries of their second.
        let created: Vec<StoredCreated> = self.call(|c| {
            Ok(c.query(CREATED_ROWS, &[])?
                .iter()
                .map(created_columns)
                .collect())
        })?;
        for row in created {
            let entry = self.created_entry(row)?;
            visit(StateItem::Audit(entry))?;
        }
        let data: Vec<(String, String, String)> = self.call(|c| {
            Ok(c.query(
                "SELECT scope, key, value FROM sink_data ORDER BY scope, key",
                &[],
            )?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
        })?;
        for (scope, key, value) in data {
            visit(StateItem::SinkData { scope, key, value })?;
        }
        let rejects: Vec<StateItem> = self.call(|c| {
            Ok(c.query(
                "SELECT pipeline, run, at, stage, origin, key, email, field, reason FROM rejects
                 ORDER BY pipeline, run, seq",
                &[],
            )?
            .iter()
            .map(|r| StateItem::Reject {
                pipeline: r.get(0),
                run: r.get(1),
                at: r.get(2),
                row: reject_row(r, 3),
            })
            .collect())
        })?;
        for item in rejects {
            visit(item)?;
        }
        Ok(())
    }

    fn import(&mut self, items: &[StateItem]) -> Result<(), StateError> {
        // Per pipeline: the rows, each with its record encoded.
        type Encoded = Vec<(SyncedRow, Option<Vec<u8>>)>;
        let mut synced: HashMap<String, Encoded> = HashMap::new();
        let mut rest = Vec::new();
        let mut audit = Vec::new();
        self.learn(items.iter().filter_map(|item| match item {
            StateItem::Synced { row, .. } => row.entry.record.as_deref(),
            _ => None,
        }))?;
        for item in items {
            match item {
                StateItem::Synced { pipeline, row } => {
                    synced.entry(pipeline.clone()).or_default().push((
                        row.clone(),
                        row.entry.record.as_deref().map(|c| self.codec.encode(c)),
                    ))
                }
                StateItem::Audit(e) => audit.push(e.clone()),
                other => rest.push(other.clone()),
            }
        }
        self.call(move |c| {
            let mut tx = c.transaction()?;
            for item in &rest {
                match item {
                    StateItem::Pipeline {
                        name,
                        runs,
                        cursor,
                        last_full_run,
                    } => tx.execute(
                        "INSERT INTO pipelines (name, runs, cursor, last_full_run) VALUES ($1, $2, $3, $4)
                         ON CONFLICT (name) DO UPDATE SET runs = excluded.runs, cursor = excluded.cursor,
                           last_full_run = excluded.last_full_run",
                        &[name, runs, cursor, last_full_run],
                    )?,
                    StateItem::Run(r) => tx.execute(
                        "INSERT INTO runs (pipeline, run, started_at, finished_at, status, report) VALUES ($1, $2, $3, $4, $5, $6)
                         ON CONFLICT (pipeline, run) DO UPDATE SET started_at = excluded.started_at,
                           finished_at = excluded.finished_at, status = excluded.status, report = excluded.report",
                        &[&r.pipeline, &r.run, &r.started_at, &r.finished_at, &r.status, &r.report],
                    )?,
                    StateItem::SinkData { scope, key, value } => tx.execute(
                        "INSERT INTO sink_data (scope, key, value) VALUES ($1, $2, $3)
                         ON CONFLICT (scope, key) DO UPDATE SET value = excluded.value",
                        &[scope, key, value],
                    )?,
                    StateItem::Reject { pipeline, run, at, row } => tx.execute(
                        "INSERT INTO rejects (pipeline, run, seq, at, stage, origin, key, email, field, reason)
                         VALUES ($1, $2, (SELECT COALESCE(MAX(seq) + 1, 0) FROM rejects WHERE pipeline = $1 AND run = $2),
                                 $3, $4, $5, $6, $7, $8, $9)",
                        &[pipeline, run, at, &row.stage, &row.origin, &row.key, &row.email, &row.field, &row.reason],
                    )?,
                    StateItem::Synced { .. } | StateItem::Audit(_) => 0,
                };
            }
            for (pipeline, rows) in &synced {
                let hash: Vec<i64> = rows.iter().map(|(r, _)| to_sql(r.key.hash64())).collect();
                let key: Vec<String> = rows.iter().map(|(r, _)| r.key.to_string()).collect();
                let content: Vec<i64> = rows.iter().map(|(r, _)| to_sql(r.entry.content_hash)).collect();
                let email: Vec<Option<String>> = rows.iter().map(|(r, _)| r.entry.email.clone()).collect();
                let handle: Vec<Option<String>> = rows.iter().map(|(r, _)| r.entry.handle.clone()).collect();
                let record: Vec<Option<Vec<u8>>> = rows.iter().map(|(_, b)| b.clone()).collect();
                tx.execute(
                    "INSERT INTO synced (pipeline, key_hash, key, content_hash, email, handle, record)
                     SELECT $1, h, k, ch, e, hd, r
                     FROM UNNEST($2::BIGINT[], $3::TEXT[], $4::BIGINT[], $5::TEXT[], $6::TEXT[], $7::BYTEA[])
                       AS u(h, k, ch, e, hd, r)
                     ON CONFLICT (pipeline, key_hash) DO UPDATE SET key = excluded.key,
                       content_hash = excluded.content_hash, email = excluded.email,
                       handle = excluded.handle, record = excluded.record",
                    &[pipeline, &hash, &key, &content, &email, &handle, &record],
                )?;
            }
            tx.commit()
        })?;
        self.record_audit(&audit)
    }
}
