//! A run's creates kept as one entry ([`AuditLog::record_created_run`]): told as an
//! entry a person from `synced`, and written out as one before the person changes.

use super::*;

/// Before `entries` change people whose create is told from their run's one entry:
/// writes that create out as an entry of its own, from the record it sent (about to
/// change). In the caller's transaction.
///
/// The person stays marked with their run until the change is recorded as synced,
/// which writes the row anyway ([`SYNCED_UPSERT`] ends the mark with a new record):
/// unmarking them here dirtied a random page of `synced` a person, a tenth of a
/// nightly. Until then, and for a change that never lands (rejected, retried the next
/// night), the create is both written out and told: [`merge_history`] tells it once.
pub(super) fn write_out_creates(
    tx: &rusqlite::Transaction<'_>,
    codec: &mut RecordCodec,
    path: &Path,
    entries: &[AuditEntry],
) -> Result<(), StateError> {
    let map = db_error(path);
    let any: bool = tx
        .query_row("SELECT EXISTS (SELECT 1 FROM creates)", [], |r| r.get(0))
        .map_err(map)?;
    if !any {
        return Ok(());
    }
    let mut written = Vec::new();
    for entry in entries
        .iter()
        .filter(|e| e.kind != ChangeKind::Create.as_str())
    {
        let Some(id) = pipeline_id(tx, &entry.pipeline).map_err(map)? else {
            continue;
        };
        let hash = to_sql(parse_key(path, &entry.key)?.hash64());
        let mut found = Vec::new();
        let mut stmt = tx
            .prepare_cached(
                "SELECT s.content_hash, s.record, s.key, s.email, s.handle, c.run, c.at, c.values_kept
                 FROM synced s JOIN creates c ON c.pipeline = s.pipeline AND c.run = s.created_run
                 WHERE s.pipeline = ?1 AND s.key_hash = ?2",
            )
            .map_err(map)?;
        let mut rows = stmt.query(params![id, hash]).map_err(map)?;
        while let Some(r) = rows.next().map_err(map)? {
            let stored = compact_synced(r).map_err(map)?;
            let row = synced_row(codec, tx, path, stored)?;
            found.push(created_entry(
                entry.pipeline.clone(),
                r.get(5).map_err(map)?,
                r.get(6).map_err(map)?,
                r.get::<_, i64>(7).map_err(map)? != 0,
                row,
            ));
        }
        written.extend(found);
    }
    insert_audit(tx, codec, &written).map_err(map)
}

impl SqliteState {
    /// Visits the creates told from the runs that keep them as one entry
    /// ([`AuditLog::record_created_run`]) whose people `tail` (more of a WHERE over `s`,
    /// their row in `synced`) selects, as [`created_entry`] builds them.
    /// Calls `visit` with the create entry of every person kept with their run's
    /// creates, narrowed by `tail` (`AND …`, see [`created_rows_sql`]).
    pub(super) fn created_rows(
        &mut self,
        tail: &str,
        params: impl rusqlite::Params,
        visit: &mut dyn FnMut(AuditEntry) -> Result<(), StateError>,
    ) -> Result<(), StateError> {
        let path = self.path.clone();
        let map = db_error(&path);
        let mut stmt = self
            .conn
            .prepare_cached(&created_rows_sql(tail))
            .map_err(map)?;
        let mut rows = stmt.query(params).map_err(map)?;
        while let Some(r) = rows.next().map_err(map)? {
            let stored = compact_synced(r).map_err(map)?;
            let row = synced_row(&mut self.codec, &self.conn, &path, stored)?;
            visit(created_entry(
                r.get(5).map_err(map)?,
                r.get(6).map_err(map)?,
                r.get(7).map_err(map)?,
                r.get::<_, i64>(8).map_err(map)? != 0,
                row,
            ))?;
        }
        Ok(())
    }
}

/// The query [`SqliteState::created_rows`] runs, narrowed by `tail`.
pub(super) fn created_rows_sql(tail: &str) -> String {
    format!(
        "SELECT s.content_hash, s.record, s.key, s.email, s.handle, p.name, c.run, c.at, c.values_kept
         FROM synced s JOIN creates c ON c.pipeline = s.pipeline AND c.run = s.created_run
           JOIN pipelines p ON p.id = s.pipeline
         WHERE s.created_run IS NOT NULL {tail}"
    )
}
