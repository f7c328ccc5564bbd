//! Migrations of older SQLite states to the current schema, in the caller's transaction.

use super::*;

/// Rewrites a version 1 (given its `record` columns) or 2 state in the compact rows of
/// version 3 and later, in the caller's transaction.
pub(super) fn migrate_to_compact_rows(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    // A table of a later release than the file's is not there yet.
    let mut old = Vec::new();
    for table in ["pipelines", "synced", "pending", "audit"] {
        let exists: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
            [table],
            |r| r.get(0),
        )?;
        if exists {
            tx.execute_batch(&format!("ALTER TABLE {table} RENAME TO {table}_v2"))?;
            old.push(table);
        }
    }
    tx.execute_batch("DROP INDEX IF EXISTS pending_key;")?;
    tx.execute_batch(SCHEMA)?;
    if old.contains(&"pipelines") {
        tx.execute_batch(
            "INSERT INTO pipelines (name, runs, cursor, last_full_run)
               SELECT name, runs, cursor, last_full_run FROM pipelines_v2 ORDER BY name;",
        )?;
    }
    for table in old.iter().filter(|t| **t != "pipelines") {
        tx.execute_batch(&format!(
            "INSERT OR IGNORE INTO pipelines (name) SELECT DISTINCT pipeline FROM {table}_v2;"
        ))?;
    }
    if old.contains(&"synced") {
        migrate_synced(tx)?;
    }
    if old.contains(&"pending") {
        migrate_pending(tx)?;
    }
    if old.contains(&"audit") {
        migrate_audit(tx)?;
    }
    for table in old {
        tx.execute_batch(&format!("DROP TABLE {table}_v2;"))?;
    }
    tx.execute(
        "UPDATE meta SET value = ?1 WHERE key = 'schema'",
        [SCHEMA_VERSION],
    )
    .map(drop)
}

fn migrate_synced(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    {
        let mut read = tx.prepare(
            "SELECT p.id, s.key_hash, s.content_hash, s.record, s.key, s.email, s.handle
             FROM synced_v2 s JOIN pipelines p ON p.name = s.pipeline",
        )?;
        let mut put = tx.prepare(
            "INSERT INTO synced (pipeline, key_hash, content_hash, record, key, email, handle)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        let mut rows = read.query([])?;
        while let Some(r) = rows.next()? {
            let bytes: Option<Vec<u8>> = r.get(3)?;
            let key: String = r.get(4)?;
            let email: Option<String> = r.get(5)?;
            let record = stored_record(&key, bytes.as_deref());
            put.execute(params![
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                bytes,
                compact::key_text(&key, record.as_ref()),
                compact::email(email.as_deref(), record.as_ref()),
                r.get::<_, Option<String>>(6)?,
            ])?;
        }
    }
    Ok(())
}

fn migrate_pending(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    {
        let mut read = tx.prepare(
            "SELECT p.id, q.batch_id, q.seq, q.run, q.key_hash, q.kind, q.content_hash, q.applied,
               q.record, q.key, q.email, q.handle
             FROM pending_v2 q JOIN pipelines p ON p.name = q.pipeline",
        )?;
        let mut put = tx.prepare(
            "INSERT INTO pending (pipeline, batch_id, seq, run, key_hash, kind, content_hash, applied, record, key, email, handle)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        )?;
        let mut rows = read.query([])?;
        while let Some(r) = rows.next()? {
            let bytes: Option<Vec<u8>> = r.get(8)?;
            let key: String = r.get(9)?;
            let email: Option<String> = r.get(10)?;
            let kind: String = r.get(5)?;
            let record = stored_record(&key, bytes.as_deref());
            put.execute(params![
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                compact::word(&kind),
                r.get::<_, i64>(6)?,
                r.get::<_, i64>(7)?,
                bytes,
                compact::key_text(&key, record.as_ref()),
                compact::email(email.as_deref(), record.as_ref()),
                r.get::<_, Option<String>>(11)?,
            ])?;
        }
    }
    Ok(())
}

fn migrate_audit(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    {
        let mut read = tx.prepare(
            "SELECT p.id, a.run, a.at, a.kind, a.outcome, a.fields, a.created, a.key, a.email, a.reason
             FROM audit_v2 a JOIN pipelines p ON p.name = a.pipeline ORDER BY a.rowid",
        )?;
        let mut put = tx.prepare(
            "INSERT INTO audit (pipeline, run, at, kind, outcome, fields, created, key, email, reason)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?;
        let mut rows = read.query([])?;
        while let Some(r) = rows.next()? {
            let bytes: Option<Vec<u8>> = r.get(6)?;
            let key: String = r.get(7)?;
            let email: Option<String> = r.get(8)?;
            let record = stored_record(&key, bytes.as_deref());
            put.execute(params![
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                compact::word(&r.get::<_, String>(3)?),
                compact::word(&r.get::<_, String>(4)?),
                r.get::<_, String>(5)?,
                bytes,
                compact::key_text(&key, record.as_ref()),
                compact::email(email.as_deref(), record.as_ref()),
                r.get::<_, Option<String>>(9)?,
            ])?;
        }
    }
    Ok(())
}
