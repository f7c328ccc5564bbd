//! The embedded default backend: one SQLite file per config, in WAL mode.

use std::path::{Path, PathBuf};

use contactsync_core::{ConnectorError, Contact, ContactKey, PendingBatch, SinkStore};
use rusqlite::{params, Connection, OptionalExtension};

use super::{
    audit_entry, from_sql, group_pending, synced_row, to_sql, with_created_fields, AuditEntry,
    LockAttempt, LockHolder, PendingRow, PipelineSummary, RunRecord, Settlement, StateError,
    StateItem, StateStore, StoredAudit, StoredSynced, SyncedRow, AUDIT_COLUMNS,
    LOCK_HEARTBEAT_EVERY, LOCK_STALE_AFTER,
};

/// The embedded default: one SQLite file per config, in WAL mode.
pub struct SqliteState {
    conn: Connection,
    path: PathBuf,
    /// Renews the heartbeat of the locks this store holds; stopped on unlock or drop.
    heartbeat: Option<Heartbeat>,
}

/// A thread with its own connection that renews a holder's locks.
struct Heartbeat {
    token: String,
    stop: std::sync::mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Heartbeat {
    fn start(path: &Path, token: &str) -> Result<Heartbeat, rusqlite::Error> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let owned = token.to_string();
        let thread = std::thread::Builder::new()
            .name("state-lock-heartbeat".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(LOCK_HEARTBEAT_EVERY)
                {
                    if let Err(e) = conn.execute(
                        "UPDATE locks SET heartbeat = ?2 WHERE token = ?1",
                        params![owned, chrono::Utc::now().timestamp()],
                    ) {
                        tracing::warn!("could not renew the run lock's heartbeat: {e}");
                    }
                }
            })
            .ok();
        Ok(Heartbeat {
            token: token.to_string(),
            stop,
            thread,
        })
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for SqliteState {
    /// A store dropped while holding locks (a panic, an early return) releases them.
    fn drop(&mut self) {
        if let Some(heartbeat) = self.heartbeat.take() {
            let token = heartbeat.token.clone();
            drop(heartbeat);
            let _ = self
                .conn
                .execute("DELETE FROM locks WHERE token = ?1", [token]);
        }
    }
}

impl std::fmt::Debug for SqliteState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteState")
            .field("path", &self.path)
            .finish()
    }
}

/// Version 2 added the last-sent record (`record` in `synced` and `pending`).
const SCHEMA_VERSION: &str = "2";

/// Every transaction that writes starts IMMEDIATE: in WAL mode a deferred one that
/// read first and then writes fails at once ("database is locked", no waiting) when
/// another connection (the lock heartbeat, another worker) wrote in between.
const WRITE: rusqlite::TransactionBehavior = rusqlite::TransactionBehavior::Immediate;

/// How long a connection waits for another one's write before it gives up.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether SQLite said another connection holds the lock it needs.
fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pipelines (
    name TEXT PRIMARY KEY,
    runs INTEGER NOT NULL DEFAULT 0,
    cursor TEXT,
    last_full_run INTEGER
);
CREATE TABLE IF NOT EXISTS synced (
    pipeline TEXT NOT NULL,
    key_hash INTEGER NOT NULL,
    key TEXT NOT NULL,
    content_hash INTEGER NOT NULL,
    email TEXT,
    handle TEXT,
    record BLOB,
    PRIMARY KEY (pipeline, key_hash)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pending (
    pipeline TEXT NOT NULL,
    batch_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    run INTEGER NOT NULL,
    key_hash INTEGER NOT NULL,
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    content_hash INTEGER NOT NULL,
    email TEXT,
    applied INTEGER NOT NULL DEFAULT 0,
    handle TEXT,
    record BLOB,
    PRIMARY KEY (pipeline, batch_id, seq)
);
CREATE INDEX IF NOT EXISTS pending_key ON pending (pipeline, batch_id, key);
CREATE TABLE IF NOT EXISTS runs (
    pipeline TEXT NOT NULL,
    run INTEGER NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    status TEXT,
    report TEXT,
    PRIMARY KEY (pipeline, run)
);
CREATE TABLE IF NOT EXISTS locks (
    name TEXT PRIMARY KEY,
    token TEXT NOT NULL,
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    pipeline TEXT NOT NULL,
    since TEXT NOT NULL,
    heartbeat INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    pipeline TEXT NOT NULL,
    run INTEGER NOT NULL,
    at INTEGER NOT NULL,
    key TEXT NOT NULL,
    email TEXT,
    kind TEXT NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT,
    fields TEXT NOT NULL,
    created BLOB
);
CREATE TABLE IF NOT EXISTS slots (
    slot TEXT NOT NULL,
    pipeline TEXT NOT NULL,
    worker TEXT NOT NULL,
    status TEXT NOT NULL,
    claimed_at TEXT NOT NULL,
    finished_at TEXT,
    PRIMARY KEY (slot, pipeline)
);
CREATE TABLE IF NOT EXISTS sink_data (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (scope, key)
);
";

/// Maps a SQLite error to a [`StateError`] naming the database file. A free function
/// over the path (not a method) so that it can be used while the connection is borrowed.
fn db_error(path: &Path) -> impl Fn(rusqlite::Error) -> StateError + Copy + '_ {
    move |source| StateError::Database {
        path: path.to_path_buf(),
        source,
    }
}

impl SqliteState {
    /// Opens (creating if needed) the state database at `path`.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| StateError::Corrupt {
                path: path.to_path_buf(),
                message: format!("cannot create {}: {e}", dir.display()),
            })?;
        }
        // SQLite says only "unable to open database file"; the file system says why.
        if let Err(e) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
        {
            return Err(StateError::Unavailable {
                path: path.to_path_buf(),
                message: format!("cannot open it for reading and writing: {e}"),
            });
        }
        let conn = Connection::open(path).map_err(db_error(path))?;
        let mut state = SqliteState {
            conn,
            path: path.to_path_buf(),
            heartbeat: None,
        };
        state.init()?;
        Ok(state)
    }

    fn init(&mut self) -> Result<(), StateError> {
        let map = db_error(&self.path);
        // Set before anything else: a run, `state show` and other workers may open the
        // same (maybe new) file at the same moment, and each waits for the others.
        self.conn.busy_timeout(BUSY_TIMEOUT).map_err(map)?;
        // WAL: readers never block the writer; synchronous=NORMAL keeps every committed
        // transaction across a killed process (only power loss may lose the last one).
        // Turning WAL on needs the file to itself, and SQLite answers "locked" at once
        // rather than waiting when another connection is in the middle of opening it.
        let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
        loop {
            match self.conn.execute_batch("PRAGMA journal_mode = WAL;") {
                Ok(()) => break,
                Err(e) if is_busy(&e) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => return Err(map(e)),
            }
        }
        self.conn
            .execute_batch("PRAGMA synchronous = NORMAL;")
            .map_err(map)?;
        // One IMMEDIATE transaction: two processes opening a new or old file never both
        // create the schema or both migrate it.
        let tx = self.conn.transaction_with_behavior(WRITE).map_err(map)?;
        tx.execute_batch(SCHEMA).map_err(map)?;
        let version: Option<String> = tx
            .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(map)?;
        match version.as_deref() {
            None => {
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema', ?1)",
                    [SCHEMA_VERSION],
                )
                .map_err(map)?;
            }
            Some(SCHEMA_VERSION) => {}
            Some("1") => {
                // Version 1 kept no records: people synced by it have no `before` until
                // their next change is sent, and nobody is sent again for the upgrade.
                tx.execute_batch(
                    "ALTER TABLE synced ADD COLUMN record BLOB;
                     ALTER TABLE pending ADD COLUMN record BLOB;
                     UPDATE meta SET value = '2' WHERE key = 'schema';",
                )
                .map_err(map)?;
                tracing::info!(state = %self.path.display(), "state migrated from schema 1 to 2 (last-sent records)");
            }
            Some(other) => {
                return Err(StateError::Corrupt {
                    path: self.path.clone(),
                    message: format!(
                        "schema version {other}, this contactsync understands {SCHEMA_VERSION}; use a matching contactsync"
                    ),
                })
            }
        }
        tx.commit().map_err(map)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn parse_key(&self, text: &str) -> Result<ContactKey, StateError> {
        text.parse().map_err(|message| StateError::Corrupt {
            path: self.path.clone(),
            message,
        })
    }
}

impl StateStore for SqliteState {
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
        tx.commit().map_err(db_error(&self.path))
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

    fn scan_index(
        &mut self,
        pipeline: &str,
        visit: &mut dyn FnMut(u64, u64),
    ) -> Result<(), StateError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT key_hash, content_hash FROM synced WHERE pipeline = ?1")
            .map_err(db_error(&self.path))?;
        let mut rows = stmt.query([pipeline]).map_err(db_error(&self.path))?;
        while let Some(row) = rows.next().map_err(db_error(&self.path))? {
            let key_hash: i64 = row.get(0).map_err(db_error(&self.path))?;
            let content_hash: i64 = row.get(1).map_err(db_error(&self.path))?;
            visit(from_sql(key_hash), from_sql(content_hash));
        }
        Ok(())
    }

    fn synced(&mut self, pipeline: &str, key_hash: u64) -> Result<Option<SyncedRow>, StateError> {
        let row: Option<StoredSynced> = self
            .conn
            .prepare_cached(
                "SELECT key, content_hash, email, handle, record FROM synced WHERE pipeline = ?1 AND key_hash = ?2",
            )
            .and_then(|mut s| {
                s.query_row(params![pipeline, to_sql(key_hash)], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })
                .optional()
            })
            .map_err(db_error(&self.path))?;
        row.map(|stored| synced_row(stored, |text| self.parse_key(text)))
            .transpose()
    }

    fn record_pending(
        &mut self,
        pipeline: &str,
        run: i64,
        batch_id: &str,
        rows: &[PendingRow],
    ) -> Result<(), StateError> {
        let map = db_error(&self.path);
        let tx = self.conn.transaction_with_behavior(WRITE).map_err(map)?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO pending (pipeline, batch_id, seq, run, key_hash, key, kind, content_hash, email, record)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                )
                .map_err(map)?;
            for (seq, row) in rows.iter().enumerate() {
                stmt.execute(params![
                    pipeline,
                    batch_id,
                    seq as i64,
                    run,
                    to_sql(row.key.hash64()),
                    row.key.to_string(),
                    row.kind.as_str(),
                    to_sql(row.content_hash),
                    row.email,
                    row.record.as_ref().map(crate::record::encode),
                ])
                .map_err(map)?;
            }
        }
        tx.commit().map_err(map)
    }

    fn pending_batches(
        &mut self,
        pipeline: &str,
    ) -> Result<Vec<(PendingBatch, Vec<PendingRow>)>, StateError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT batch_id, key, kind, email, content_hash, record FROM pending WHERE pipeline = ?1 ORDER BY run, batch_id, seq",
            )
            .map_err(db_error(&self.path))?;
        type Row = super::StoredPending;
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
            .map_err(db_error(&self.path))?;
        drop(stmt);
        group_pending(
            rows,
            |text| self.parse_key(text),
            |kind| StateError::Corrupt {
                path: self.path.clone(),
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
        let map = db_error(&self.path);
        let tx = self.conn.transaction_with_behavior(WRITE).map_err(map)?;
        // A sink that is durable at finish and took the whole batch (the common case):
        // one statement marks the batch, instead of one lookup a row. Only when the
        // batch has no other rows than these, each settled once.
        let whole_batch_awaits = !settlements.is_empty()
            && settlements
                .iter()
                .all(|s| matches!(s, Settlement::AwaitingFinish { handle: None, .. }));
        if whole_batch_awaits {
            let rows: i64 = tx
                .prepare_cached(
                    "SELECT COUNT(*) FROM pending WHERE pipeline = ?1 AND batch_id = ?2",
                )
                .and_then(|mut s| s.query_row(params![pipeline, batch_id], |r| r.get(0)))
                .map_err(map)?;
            if rows == settlements.len() as i64 {
                tx.prepare_cached(
                    "UPDATE pending SET applied = 1, handle = NULL WHERE pipeline = ?1 AND batch_id = ?2",
                )
                .and_then(|mut s| s.execute(params![pipeline, batch_id]))
                .map_err(map)?;
                return tx.commit().map_err(map);
            }
        }
        {
            let mut upsert = tx
                .prepare_cached(
                    "INSERT INTO synced (pipeline, key_hash, key, content_hash, email, handle, record) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (pipeline, key_hash) DO UPDATE SET content_hash = excluded.content_hash,
                       email = excluded.email, handle = COALESCE(excluded.handle, synced.handle),
                       record = COALESCE(excluded.record, synced.record)
                     WHERE synced.key = excluded.key",
                )
                .map_err(map)?;
            let mut forget = tx
                .prepare_cached("DELETE FROM synced WHERE pipeline = ?1 AND key_hash = ?2")
                .map_err(map)?;
            let mut unpend = tx
                .prepare_cached(
                    "DELETE FROM pending WHERE pipeline = ?1 AND batch_id = ?2 AND key = ?3",
                )
                .map_err(map)?;
            let mut mark = tx
                .prepare_cached(
                    "UPDATE pending SET applied = 1, handle = ?4 WHERE pipeline = ?1 AND batch_id = ?2 AND key = ?3",
                )
                .map_err(map)?;
            let mut owner = tx
                .prepare_cached("SELECT key FROM synced WHERE pipeline = ?1 AND key_hash = ?2")
                .map_err(map)?;
            for settlement in settlements {
                match settlement {
                    Settlement::Synced { key, entry } => {
                        let text = key.to_string();
                        let changed = upsert
                            .execute(params![
                                pipeline,
                                to_sql(key.hash64()),
                                text,
                                to_sql(entry.content_hash),
                                entry.email,
                                entry.handle,
                                entry.record.as_deref().map(crate::record::encode),
                            ])
                            .map_err(map)?;
                        if changed == 0 {
                            let existing: String = owner
                                .query_row(params![pipeline, to_sql(key.hash64())], |r| r.get(0))
                                .map_err(map)?;
                            return Err(StateError::KeyCollision {
                                existing,
                                new: text,
                            });
                        }
                        unpend
                            .execute(params![pipeline, batch_id, text])
                            .map_err(map)?;
                    }
                    Settlement::Forgotten { key } => {
                        forget
                            .execute(params![pipeline, to_sql(key.hash64())])
                            .map_err(map)?;
                        unpend
                            .execute(params![pipeline, batch_id, key.to_string()])
                            .map_err(map)?;
                    }
                    Settlement::Dropped { key } => {
                        unpend
                            .execute(params![pipeline, batch_id, key.to_string()])
                            .map_err(map)?;
                    }
                    Settlement::AwaitingFinish { key, handle } => {
                        mark.execute(params![pipeline, batch_id, key.to_string(), handle])
                            .map_err(map)?;
                    }
                }
            }
        }
        tx.commit().map_err(map)
    }

    fn confirm_finished(&mut self, pipeline: &str, run: i64) -> Result<u64, StateError> {
        let map = db_error(&self.path);
        let tx = self.conn.transaction_with_behavior(WRITE).map_err(map)?;
        let removed = tx
            .execute(
                "DELETE FROM synced WHERE pipeline = ?1 AND key_hash IN
                   (SELECT key_hash FROM pending WHERE pipeline = ?1 AND run = ?2 AND applied = 1 AND kind = 'remove')",
                params![pipeline, run],
            )
            .map_err(map)?;
        let upserted = tx
            .execute(
                // In key order: appending to the b-tree instead of splitting its pages
                // at random (a first sync of a million is several times faster, and
                // the pages end up full).
                "INSERT INTO synced (pipeline, key_hash, key, content_hash, email, handle, record)
                   SELECT pipeline, key_hash, key, content_hash, email, handle, record FROM pending
                   WHERE pipeline = ?1 AND run = ?2 AND applied = 1 AND kind != 'remove'
                   ORDER BY key_hash
                 ON CONFLICT (pipeline, key_hash) DO UPDATE SET content_hash = excluded.content_hash,
                   email = excluded.email, handle = COALESCE(excluded.handle, synced.handle),
                   record = COALESCE(excluded.record, synced.record)",
                params![pipeline, run],
            )
            .map_err(map)?;
        // When these rows are all the pending table holds (the usual case), an
        // unqualified DELETE empties it at once (SQLite drops the pages instead of
        // removing a million rows and their index entries one by one).
        let others: bool = tx
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM pending WHERE NOT (pipeline = ?1 AND run = ?2 AND applied = 1))",
                params![pipeline, run],
                |r| r.get(0),
            )
            .map_err(map)?;
        if others {
            tx.execute(
                "DELETE FROM pending WHERE pipeline = ?1 AND run = ?2 AND applied = 1",
                params![pipeline, run],
            )
            .map_err(map)?;
        } else {
            tx.execute("DELETE FROM pending", []).map_err(map)?;
        }
        tx.commit().map_err(map)?;
        Ok((removed + upserted) as u64)
    }

    fn drop_pending(&mut self, pipeline: &str, batch_id: &str) -> Result<(), StateError> {
        self.conn
            .execute(
                "DELETE FROM pending WHERE pipeline = ?1 AND batch_id = ?2",
                params![pipeline, batch_id],
            )
            .map(|_| ())
            .map_err(db_error(&self.path))
    }

    fn sink_store<'a>(&'a mut self, scope: &str) -> Box<dyn SinkStore + 'a> {
        Box::new(SqliteSinkStore {
            conn: &mut self.conn,
            scope: scope.to_string(),
        })
    }

    fn summaries(&mut self) -> Result<Vec<PipelineSummary>, StateError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT p.name, p.runs, p.cursor,
                   (SELECT COUNT(*) FROM synced s WHERE s.pipeline = p.name),
                   (SELECT COUNT(*) FROM pending q WHERE q.pipeline = p.name),
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
            .query_map(params![pipeline, last as i64], |r| {
                Ok(RunRecord {
                    pipeline: r.get(0)?,
                    run: r.get(1)?,
                    started_at: r.get(2)?,
                    finished_at: r.get(3)?,
                    status: r.get(4)?,
                    report: r.get(5)?,
                })
            })
            .and_then(|rows| rows.collect())
            .map_err(db_error(&self.path))?;
        Ok(rows)
    }

    fn record_audit(&mut self, entries: &[AuditEntry]) -> Result<(), StateError> {
        let map = db_error(&self.path);
        let tx = self.conn.transaction_with_behavior(WRITE).map_err(map)?;
        {
            let mut put = tx
                .prepare_cached(
                    "INSERT INTO audit (pipeline, run, at, key, email, kind, outcome, reason, fields, created)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                )
                .map_err(map)?;
            for e in entries {
                put.execute(params![
                    e.pipeline,
                    e.run,
                    e.at,
                    e.key,
                    e.email,
                    e.kind,
                    e.outcome,
                    e.reason,
                    e.fields,
                    e.created.as_deref().map(crate::record::encode),
                ])
                .map_err(map)?;
            }
        }
        tx.commit().map_err(map)
    }

    fn prune_audit(&mut self, pipeline: &str, before: i64) -> Result<u64, StateError> {
        self.conn
            .execute(
                "DELETE FROM audit WHERE pipeline = ?1 AND at < ?2",
                params![pipeline, before],
            )
            .map(|n| n as u64)
            .map_err(db_error(&self.path))
    }

    fn history(&mut self, who: &str) -> Result<Vec<AuditEntry>, StateError> {
        let who = who.trim();
        let email = Contact::normalize_email(who).unwrap_or_default();
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT {AUDIT_COLUMNS} FROM audit
                 WHERE key = ?1 OR key = 'external_id:' || ?1 OR key = 'email:' || ?2
                    OR email = ?2 COLLATE NOCASE
                 ORDER BY at, rowid"
            ))
            .map_err(db_error(&self.path))?;
        let rows: Vec<StoredAudit> = stmt
            .query_map(params![who, email], audit_columns)
            .and_then(|rows| rows.collect())
            .map_err(db_error(&self.path))?;
        Ok(rows
            .into_iter()
            .map(|row| with_created_fields(audit_entry(row)))
            .collect())
    }

    fn reset(&mut self, pipeline: &str) -> Result<(), StateError> {
        let map = db_error(&self.path);
        let tx = self.conn.transaction_with_behavior(WRITE).map_err(map)?;
        for table in ["synced", "pending", "runs", "audit"] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE pipeline = ?1"),
                [pipeline],
            )
            .map_err(map)?;
        }
        tx.execute("DELETE FROM pipelines WHERE name = ?1", [pipeline])
            .map_err(map)?;
        tx.commit().map_err(map)
    }

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
                .prepare("SELECT pipeline, key, content_hash, email, handle, record FROM synced")
                .map_err(map)?;
            let mut rows = stmt.query([]).map_err(map)?;
            while let Some(r) = rows.next().map_err(map)? {
                let stored: StoredSynced = (
                    r.get(1).map_err(map)?,
                    r.get(2).map_err(map)?,
                    r.get(3).map_err(map)?,
                    r.get(4).map_err(map)?,
                    r.get(5).map_err(map)?,
                );
                let row = synced_row(stored, |text| {
                    text.parse().map_err(|message| StateError::Corrupt {
                        path: path.clone(),
                        message,
                    })
                })?;
                visit(StateItem::Synced {
                    pipeline: r.get(0).map_err(map)?,
                    row,
                })?;
            }
        }
        for run in self.runs(None, usize::MAX >> 1)?.into_iter().rev() {
            visit(StateItem::Run(run))?;
        }
        {
            let mut stmt = self
                .conn
                .prepare(&format!("SELECT {AUDIT_COLUMNS} FROM audit ORDER BY rowid"))
                .map_err(map)?;
            let mut rows = stmt.query([]).map_err(map)?;
            while let Some(r) = rows.next().map_err(map)? {
                visit(StateItem::Audit(audit_entry(
                    audit_columns(r).map_err(map)?,
                )))?;
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

    fn import(&mut self, items: &[StateItem]) -> Result<(), StateError> {
        let map = db_error(&self.path);
        let tx = self.conn.transaction_with_behavior(WRITE).map_err(map)?;
        for item in items {
            match item {
                StateItem::Pipeline {
                    name,
                    runs,
                    cursor,
                    last_full_run,
                } => tx.execute(
                    "INSERT OR REPLACE INTO pipelines (name, runs, cursor, last_full_run) VALUES (?1, ?2, ?3, ?4)",
                    params![name, runs, cursor, last_full_run],
                ),
                StateItem::Synced { pipeline, row } => tx.execute(
                    "INSERT OR REPLACE INTO synced (pipeline, key_hash, key, content_hash, email, handle, record) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        pipeline,
                        to_sql(row.key.hash64()),
                        row.key.to_string(),
                        to_sql(row.entry.content_hash),
                        row.entry.email,
                        row.entry.handle,
                        row.entry.record.as_deref().map(crate::record::encode),
                    ],
                ),
                StateItem::Run(r) => tx.execute(
                    "INSERT OR REPLACE INTO runs (pipeline, run, started_at, finished_at, status, report) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![r.pipeline, r.run, r.started_at, r.finished_at, r.status, r.report],
                ),
                StateItem::Audit(e) => tx.execute(
                    "INSERT INTO audit (pipeline, run, at, key, email, kind, outcome, reason, fields, created) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                    params![
                        e.pipeline,
                        e.run,
                        e.at,
                        e.key,
                        e.email,
                        e.kind,
                        e.outcome,
                        e.reason,
                        e.fields,
                        e.created.as_deref().map(crate::record::encode),
                    ],
                ),
                StateItem::SinkData { scope, key, value } => tx.execute(
                    "INSERT OR REPLACE INTO sink_data (scope, key, value) VALUES (?1, ?2, ?3)",
                    params![scope, key, value],
                ),
            }
            .map_err(map)?;
        }
        tx.commit().map_err(map)
    }
}

/// An audit row's columns, as `SELECT {AUDIT_COLUMNS}` returns them.
fn audit_columns(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredAudit> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
    ))
}

/// The sink's key-value space, written through at once.
struct SqliteSinkStore<'a> {
    conn: &'a mut Connection,
    scope: String,
}

fn store_error(e: rusqlite::Error) -> ConnectorError {
    ConnectorError::Other(format!("sink store in the state database: {e}"))
}

impl SinkStore for SqliteSinkStore<'_> {
    fn get(&self, key: &str) -> Result<Option<String>, ConnectorError> {
        self.conn
            .query_row(
                "SELECT value FROM sink_data WHERE scope = ?1 AND key = ?2",
                params![self.scope, key],
                |r| r.get(0),
            )
            .optional()
            .map_err(store_error)
    }

    fn put(&mut self, key: &str, value: &str) -> Result<(), ConnectorError> {
        self.conn
            .execute(
                "INSERT INTO sink_data (scope, key, value) VALUES (?1, ?2, ?3)
                 ON CONFLICT (scope, key) DO UPDATE SET value = excluded.value",
                params![self.scope, key, value],
            )
            .map(|_| ())
            .map_err(store_error)
    }

    fn remove(&mut self, key: &str) -> Result<(), ConnectorError> {
        self.conn
            .execute(
                "DELETE FROM sink_data WHERE scope = ?1 AND key = ?2",
                params![self.scope, key],
            )
            .map(|_| ())
            .map_err(store_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run and `state show` (or two workers) opening a state that does not exist yet
    /// at the same moment: each must see one schema, created once.
    #[test]
    fn many_connections_opening_a_new_state_at_once_all_succeed() {
        for round in 0..20 {
            let dir = tempfile::tempdir().expect("temp dir");
            let path = dir.path().join("state.db");
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
            let opened: Vec<Result<(), String>> = (0..8)
                .map(|_| {
                    let (path, barrier) = (path.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        SqliteState::open(&path)
                            .map(|_| ())
                            .map_err(|e| e.to_string())
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().expect("no panic"))
                .collect();
            for result in opened {
                assert_eq!(result, Ok(()), "round {round}");
            }
        }
    }
}
