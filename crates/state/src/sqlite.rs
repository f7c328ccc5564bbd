//! The embedded default backend: one SQLite file per config, in WAL mode.

use std::path::{Path, PathBuf};

use contactsync_core::{ConnectorError, Contact, ContactKey, PendingBatch, SinkStore};
use rusqlite::{params, Connection, OptionalExtension};

use contactsync_core::{ChangeKind, SyncedEntry};
use rusqlite::types::Value;

use crate::record::{RecordCodec, RecordDecodeError};

use super::{
    compact, from_sql, group_pending, stored_record, stored_record_with, to_sql,
    with_created_fields, AuditEntry, LockAttempt, LockHolder, PendingRow, PipelineSummary,
    RunRecord, Settlement, StateError, StateItem, StateStore, SyncedRow, LOCK_HEARTBEAT_EVERY,
    LOCK_STALE_AFTER,
};

/// The embedded default: one SQLite file per config, in WAL mode.
pub struct SqliteState {
    conn: Connection,
    path: PathBuf,
    /// Renews the heartbeat of the locks this store holds; stopped on unlock or drop.
    heartbeat: Option<Heartbeat>,
    /// Compresses the records kept with the file's dictionaries.
    codec: RecordCodec,
    /// See [`CONFIRM_RANGE_ROWS`]; smaller in tests.
    confirm_range_rows: i64,
}

/// Records compressed at a time by the thread that compresses a large batch's records
/// while the rows before them are inserted.
const ENCODE_CHUNK: usize = 256;

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

/// Version 2 added the last-sent record (`record` in `synced` and `pending`); version 3
/// made the rows compact (pipelines by integer id, keys and emails not repeated beside
/// the record that gives them: [`super::compact`]).
const SCHEMA_VERSION: &str = "3";

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
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    runs INTEGER NOT NULL DEFAULT 0,
    cursor TEXT,
    last_full_run INTEGER
);
CREATE TABLE IF NOT EXISTS synced (
    pipeline INTEGER NOT NULL,
    key_hash INTEGER NOT NULL,
    content_hash INTEGER NOT NULL,
    record BLOB,
    key TEXT,
    email TEXT,
    handle TEXT,
    PRIMARY KEY (pipeline, key_hash)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pending (
    pipeline INTEGER NOT NULL,
    batch_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    run INTEGER NOT NULL,
    key_hash INTEGER NOT NULL,
    kind NOT NULL,
    content_hash INTEGER NOT NULL,
    applied INTEGER NOT NULL DEFAULT 0,
    record BLOB,
    key TEXT,
    email TEXT,
    handle TEXT,
    PRIMARY KEY (pipeline, batch_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pending_key ON pending (pipeline, batch_id, key_hash);
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
    pipeline INTEGER NOT NULL,
    run INTEGER NOT NULL,
    at INTEGER NOT NULL,
    kind NOT NULL,
    outcome NOT NULL,
    fields TEXT NOT NULL,
    created BLOB,
    key TEXT,
    email TEXT,
    reason TEXT
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
CREATE TABLE IF NOT EXISTS dictionaries (
    id INTEGER PRIMARY KEY,
    dictionary BLOB NOT NULL
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
    move |source| {
        if is_busy(&source) {
            return StateError::Busy {
                path: path.to_path_buf(),
                message: format!(
                    "another process has held its write lock for over {}s (a run stopped or stuck in the middle of a write); nothing was changed. Try again later, or find that process",
                    BUSY_TIMEOUT.as_secs()
                ),
            };
        }
        StateError::Database {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// How old an empty state file must be to be refused: younger, another process is
/// creating the state this instant.
const NEW_FILE_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// The write-ahead log SQLite keeps beside `path`.
fn wal_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push("-wal");
    PathBuf::from(name)
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
        // Only a missing file is a new state. An empty one was cut short or replaced:
        // taken for new, it would keep every leaver forever and resend everyone. (A
        // file a moment old is another process creating the state this instant.)
        if let Ok(meta) = std::fs::metadata(path) {
            let age = meta.modified().ok().and_then(|m| m.elapsed().ok());
            if meta.is_file() && meta.len() == 0 && age.is_some_and(|a| a > NEW_FILE_GRACE) {
                return Err(StateError::Corrupt {
                    path: path.to_path_buf(),
                    message: "the file is empty (0 bytes), so what was synced is unknown. Restore it from a backup; or, to start a new state that sends everyone again, delete it".into(),
                });
            }
        }
        // A write-ahead log left beside the file: the last process to use it did not
        // close it (killed, a crash, a full disk), or one is using it now.
        let unclean = std::fs::metadata(wal_path(path)).is_ok_and(|m| m.len() > 0);
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
            codec: RecordCodec::default(),
            confirm_range_rows: CONFIRM_RANGE_ROWS,
        };
        if unclean {
            state.quick_check()?;
        }
        state.init()?;
        load_dictionaries(&mut state.codec, &state.conn, true).map_err(|message| {
            StateError::Corrupt {
                path: path.to_path_buf(),
                message,
            }
        })?;
        Ok(state)
    }

    /// SQLite's `quick_check`: refuses a damaged file (garbage pages, a torn write)
    /// with what to do, instead of syncing against whatever it would read.
    fn quick_check(&self) -> Result<(), StateError> {
        self.conn
            .busy_timeout(BUSY_TIMEOUT)
            .map_err(db_error(&self.path))?;
        let damaged = |detail: String| {
            StateError::Corrupt {
            path: self.path.clone(),
            message: format!(
                "the file is damaged ({detail}). Restore it from a backup; or, to start a new state that sends everyone again, delete it (or `contactsync state reset` a pipeline whose rows are damaged)"
            ),
        }
        };
        let problems: Vec<String> = match self.conn.prepare("PRAGMA quick_check(5)") {
            Ok(mut statement) => statement
                .query_map([], |row| row.get::<_, String>(0))
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(|e| damaged(e.to_string()))?,
            Err(e) => return Err(damaged(e.to_string())),
        };
        match problems.as_slice() {
            [ok] if ok == "ok" => Ok(()),
            _ => Err(damaged(problems.join("; "))),
        }
    }

    fn init(&mut self) -> Result<(), StateError> {
        let map = db_error(&self.path);
        // Set before anything else: a run, `state show` and other workers may open the
        // same (maybe new) file at the same moment, and each waits for the others.
        self.conn.busy_timeout(BUSY_TIMEOUT).map_err(map)?;
        // A new file frees the pages an emptied table leaves (a first sync's pending
        // changes are as large as what it synced) when a run ends; see `release_free_pages`.
        // Set first: it has no effect on a file that has tables, or that the switch to
        // WAL below has written.
        self.conn
            .execute_batch("PRAGMA auto_vacuum = INCREMENTAL;")
            .map_err(map)?;
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
        let has_meta: bool = tx
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta')",
                [],
                |r| r.get(0),
            )
            .map_err(map)?;
        let version: Option<String> = if has_meta {
            tx.query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(map)?
        } else {
            None
        };
        let mut migrated = false;
        match version.as_deref() {
            None => {
                tx.execute_batch(SCHEMA).map_err(map)?;
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema', ?1)",
                    [SCHEMA_VERSION],
                )
                .map_err(map)?;
            }
            Some(SCHEMA_VERSION) => rebuild_empty_pending(&tx).map_err(map)?,
            Some(old @ ("1" | "2")) => {
                if old == "1" {
                    // Version 1 kept no records: people synced by it have no `before`
                    // until their next change is sent, and nobody is sent again for it.
                    tx.execute_batch(
                        "ALTER TABLE synced ADD COLUMN record BLOB;
                         ALTER TABLE pending ADD COLUMN record BLOB;",
                    )
                    .map_err(map)?;
                }
                migrate_to_v3(&tx).map_err(map)?;
                migrated = true;
                tracing::info!(state = %self.path.display(), "state migrated from schema {old} to {SCHEMA_VERSION} (compact rows)");
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
        tx.commit().map_err(map)?;
        if migrated {
            // The old tables' pages are free now; a file made before auto-vacuum needs
            // one VACUUM to give them back and to free pages from then on. Another
            // process reading the file makes it fail, which costs only disk space.
            if let Err(e) = self
                .conn
                .execute_batch("PRAGMA auto_vacuum = INCREMENTAL; VACUUM;")
            {
                tracing::warn!(state = %self.path.display(), "could not compact the migrated state (it works as it is): {e}");
            }
        }
        Ok(())
    }

    /// Inserts a batch's pending rows in one transaction; with `applied`, each marked
    /// applied with its handle (awaiting the sink's finish).
    fn insert_pending(
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
        let id = ensure_pipeline(&tx, pipeline).map_err(map)?;
        let mut stmt = tx
            .prepare_cached(
                "INSERT OR REPLACE INTO pending (pipeline, batch_id, seq, run, key_hash, kind, content_hash, record, key, email, applied, handle)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            )
            .map_err(map)?;
        let mut insert = |seq: usize, row: &PendingRow, bytes: Option<Vec<u8>>| {
            let record = row.record.as_ref();
            let handle = applied
                .and_then(|handles| handles.get(seq))
                .cloned()
                .flatten();
            stmt.execute(params![
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
            ])
            .map(drop)
            .map_err(map)
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

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps records to train the file's dictionary on; once there are enough, stores
    /// the dictionary (committed before any record uses it) and compresses from then on.
    fn learn<'a>(&mut self, contacts: impl Iterator<Item = &'a Contact>) -> Result<(), StateError> {
        let Some(dictionary) = self.codec.learn(contacts) else {
            return Ok(());
        };
        let map = db_error(&self.path);
        let tx = self.conn.transaction_with_behavior(WRITE).map_err(map)?;
        tx.execute(
            "INSERT INTO dictionaries (dictionary) VALUES (?1)",
            [&dictionary],
        )
        .map_err(map)?;
        let id = tx.last_insert_rowid();
        tx.commit().map_err(map)?;
        if let Err(e) = self.codec.add_dictionary(id as u64, &dictionary, true) {
            tracing::warn!("records stay uncompressed: dictionary {id} is not usable: {e}");
        }
        Ok(())
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

    fn record_pending(
        &mut self,
        pipeline: &str,
        run: i64,
        batch_id: &str,
        rows: &[PendingRow],
    ) -> Result<(), StateError> {
        self.insert_pending(pipeline, run, batch_id, rows, None)
    }

    fn record_awaiting_finish(
        &mut self,
        pipeline: &str,
        run: i64,
        batch_id: &str,
        rows: &[PendingRow],
        handles: &[Option<String>],
    ) -> Result<(), StateError> {
        self.insert_pending(pipeline, run, batch_id, rows, Some(handles))
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
        let mut stored: Vec<super::StoredPending> = Vec::with_capacity(rows.len());
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
                    "INSERT INTO synced (pipeline, key_hash, content_hash, record, key, email, handle)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) {SYNCED_UPSERT}"
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

    fn confirm_finished(&mut self, pipeline: &str, run: i64) -> Result<u64, StateError> {
        let map = db_error(&self.path);
        let Some(id) = pipeline_id(&self.conn, pipeline).map_err(map)? else {
            return Ok(0);
        };
        let remove = compact::kind(ChangeKind::Remove);
        // In ranges of key hashes, each its own transaction, so that no transaction
        // holds the write lock for long (ten million rows took over a minute, and the
        // run lock's heartbeat counts a lock not renewed for two minutes as abandoned).
        // Ranges of the hash, in the order `synced` keeps them, so that each range's
        // rows are appended to its b-tree in order (ranges of rows would interleave and
        // split its pages). Each range scans `pending`; a range holds about
        // `confirm_range_rows` rows, so a million take one scan.
        // A crash between two ranges leaves the rest pending, applied: the next run's
        // recovery asks the sink about them, as after a crash before the confirmation.
        let pending: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM pending", [], |r| r.get(0))
            .map_err(map)?;
        if pending == 0 {
            return Ok(0);
        }
        let ranges = || {
            let rows = i128::from(pending);
            let parts = (rows + i128::from(self.confirm_range_rows.max(1)) - 1)
                / i128::from(self.confirm_range_rows.max(1));
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
        let mut confirmed = 0u64;
        for (from, to) in ranges() {
            let tx = self.conn.transaction_with_behavior(WRITE).map_err(map)?;
            let removed = tx
                .execute(
                    "DELETE FROM synced WHERE pipeline = ?1 AND key_hash IN
                       (SELECT key_hash FROM pending WHERE key_hash BETWEEN ?4 AND ?5
                          AND pipeline = ?1 AND run = ?2 AND applied = 1 AND kind = ?3)",
                    params![id, run, remove, from, to],
                )
                .map_err(map)?;
            let upserted = tx
                .execute(
                    &format!(
                        "INSERT INTO synced (pipeline, key_hash, content_hash, record, key, email, handle)
                           SELECT pipeline, key_hash, content_hash, record, key, email, handle FROM pending
                           WHERE key_hash BETWEEN ?4 AND ?5
                             AND pipeline = ?1 AND run = ?2 AND applied = 1 AND kind != ?3
                           ORDER BY key_hash
                         {SYNCED_UPSERT}"
                    ),
                    params![id, run, remove, from, to],
                )
                .map_err(map)?;
            tx.commit().map_err(map)?;
            confirmed += (removed + upserted) as u64;
        }
        // The confirmed rows leave `pending` last: when they are all it holds (a run
        // alone, as usual), at once, which costs next to nothing where deleting them row
        // by row took longer than confirming them. Until then they are pending and
        // applied, and confirming them again (after a crash, through recovery) changes
        // nothing.
        // The check and the delete in one transaction: another pipeline's run may be
        // recording its own pending changes in the same file.
        let tx = self.conn.transaction_with_behavior(WRITE).map_err(map)?;
        let others: bool = tx
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM pending WHERE NOT (pipeline = ?1 AND run = ?2 AND applied = 1))",
                params![id, run],
                |r| r.get(0),
            )
            .map_err(map)?;
        if !others {
            tx.execute("DELETE FROM pending", []).map_err(map)?;
            return tx.commit().map_err(map).map(|()| confirmed);
        }
        drop(tx);
        for (from, to) in ranges() {
            self.conn
                .execute(
                    "DELETE FROM pending WHERE key_hash BETWEEN ?3 AND ?4
                       AND pipeline = ?1 AND run = ?2 AND applied = 1",
                    params![id, run, from, to],
                )
                .map_err(map)?;
        }
        Ok(confirmed)
    }

    fn sample_records(&mut self, sample: &[Contact]) -> Result<(), StateError> {
        self.learn(sample.iter())
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
        insert_audit(&tx, &mut self.codec, entries).map_err(map)?;
        tx.commit().map_err(map)
    }

    fn prune_audit(&mut self, pipeline: &str, before: i64) -> Result<u64, StateError> {
        self.conn
            .execute(
                &format!("DELETE FROM audit WHERE pipeline = {PIPELINE_ID} AND at < ?2"),
                params![pipeline, before],
            )
            .map(|n| n as u64)
            .map_err(db_error(&self.path))
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
        let mut entries = Vec::new();
        self.audit_rows(
            "WHERE a.key IS NULL OR a.email IS NULL OR a.key IN (?1, ?2, ?3) OR a.email = ?4 COLLATE NOCASE
             ORDER BY a.at, a.rowid",
            params![keys[0], keys[1], keys[2], email],
            &mut |entry| {
                let matches = keys.contains(&entry.key)
                    || entry
                        .email
                        .as_deref()
                        .is_some_and(|e| !email.is_empty() && e.eq_ignore_ascii_case(&email));
                if matches {
                    entries.push(with_created_fields(entry));
                }
                Ok(())
            },
        )?;
        Ok(entries)
    }

    fn reset(&mut self, pipeline: &str) -> Result<(), StateError> {
        let map = db_error(&self.path);
        let tx = self.conn.transaction_with_behavior(WRITE).map_err(map)?;
        for table in ["synced", "pending", "audit"] {
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
                            "INSERT OR REPLACE INTO synced (pipeline, key_hash, content_hash, record, key, email, handle)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                            params![
                                id,
                                to_sql(row.key.hash64()),
                                to_sql(row.entry.content_hash),
                                record.map(|r| self.codec.encode(r)),
                                compact::key(&row.key, record),
                                compact::email(row.entry.email.as_deref(), record),
                                row.entry.handle,
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

/// A pipeline's id, in SQL, from its name as parameter `?1`.
const PIPELINE_ID: &str = "(SELECT id FROM pipelines WHERE name = ?1)";

fn parse_key(path: &Path, text: &str) -> Result<ContactKey, StateError> {
    text.parse().map_err(|message| StateError::Corrupt {
        path: path.to_path_buf(),
        message,
    })
}

/// Learns the file's dictionaries the codec does not know; with `current`, new records
/// use the newest.
fn load_dictionaries(
    codec: &mut RecordCodec,
    conn: &Connection,
    current: bool,
) -> Result<(), String> {
    let stored: Vec<(i64, Vec<u8>)> = conn
        .prepare_cached("SELECT id, dictionary FROM dictionaries ORDER BY id")
        .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
        .map_err(|e| format!("reading the record dictionaries: {e}"))?;
    let newest = stored.last().map(|(id, _)| *id);
    for (id, dictionary) in &stored {
        let make_current = current && Some(*id) == newest;
        if make_current || !codec.knows(*id as u64) {
            codec
                .add_dictionary(*id as u64, dictionary, make_current)
                .map_err(|e| format!("record dictionary {id}: {e}"))?;
        }
    }
    Ok(())
}

/// A stored record, read with the file's dictionaries: one another process trained
/// since this one opened the file is loaded first.
fn read_record(
    codec: &mut RecordCodec,
    conn: &Connection,
    key: &str,
    bytes: Option<&[u8]>,
) -> Option<Contact> {
    let describe = |e: RecordDecodeError| match e {
        RecordDecodeError::Dictionary(id) => format!("record dictionary {id} is not in the file"),
        RecordDecodeError::Unreadable(message) => message,
    };
    stored_record_with(key, bytes, |bytes| match codec.decode(bytes) {
        Err(RecordDecodeError::Dictionary(_)) => {
            load_dictionaries(codec, conn, false)?;
            codec.decode(bytes).map_err(describe)
        }
        other => other.map_err(describe),
    })
}

/// A pipeline's id, when it has one.
fn pipeline_id(conn: &Connection, name: &str) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached("SELECT id FROM pipelines WHERE name = ?1")?
        .query_row([name], |r| r.get(0))
        .optional()
}

/// A pipeline's id, given one first if it has none.
fn ensure_pipeline(conn: &Connection, name: &str) -> rusqlite::Result<i64> {
    conn.prepare_cached("INSERT INTO pipelines (name) VALUES (?1) ON CONFLICT (name) DO NOTHING")?
        .execute([name])?;
    conn.prepare_cached("SELECT id FROM pipelines WHERE name = ?1")?
        .query_row([name], |r| r.get(0))
}

/// A synced row's columns, in the order of [`CompactSynced`].
const SYNCED_COLUMNS: &str = "content_hash, record, key, email, handle";

/// A synced row as stored: content hash, record, key and email in their compact form
/// ([`compact`]), handle.
type CompactSynced = (
    i64,
    Option<Vec<u8>>,
    Option<String>,
    Option<String>,
    Option<String>,
);

fn compact_synced(r: &rusqlite::Row<'_>) -> rusqlite::Result<CompactSynced> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

/// How a synced row takes a newer one of the same person: a change without a record
/// (a final rejection) keeps the last-sent record, and its explicit key and email
/// stay true beside it; see [`compact`].
/// Pending rows [`StateStore::confirm_finished`] confirms in one transaction, about.
const CONFIRM_RANGE_ROWS: i64 = 2_000_000;

const SYNCED_UPSERT: &str = "ON CONFLICT (pipeline, key_hash) DO UPDATE SET
    content_hash = excluded.content_hash, record = COALESCE(excluded.record, synced.record),
    key = excluded.key, email = excluded.email, handle = COALESCE(excluded.handle, synced.handle)";

/// Writes audit entries in their compact form.
fn insert_audit(
    conn: &Connection,
    codec: &mut RecordCodec,
    entries: &[AuditEntry],
) -> rusqlite::Result<()> {
    let mut ids: Vec<(&str, i64)> = Vec::new();
    let mut put = conn.prepare_cached(
        "INSERT INTO audit (pipeline, run, at, kind, outcome, fields, created, key, email, reason)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?;
    for e in entries {
        let id = match ids.iter().find(|(name, _)| *name == e.pipeline) {
            Some((_, id)) => *id,
            None => {
                let id = ensure_pipeline(conn, &e.pipeline)?;
                ids.push((&e.pipeline, id));
                id
            }
        };
        let created = e.created.as_deref();
        put.execute(params![
            id,
            e.run,
            e.at,
            compact::word(&e.kind),
            compact::word(&e.outcome),
            e.fields,
            created.map(|c| codec.encode(c)),
            compact::key_text(&e.key, created),
            compact::email(e.email.as_deref(), created),
            e.reason,
        ])?;
    }
    Ok(())
}

/// A synced row from its stored columns.
fn synced_row(
    codec: &mut RecordCodec,
    conn: &Connection,
    path: &Path,
    (content_hash, bytes, key, email, handle): CompactSynced,
) -> Result<SyncedRow, StateError> {
    let record = read_record(
        codec,
        conn,
        key.as_deref().unwrap_or("(its record's)"),
        bytes.as_deref(),
    );
    let key = compact::expand_key(key.as_deref(), record.as_ref()).map_err(|message| {
        StateError::Corrupt {
            path: path.to_path_buf(),
            message: format!("in synced: {message}"),
        }
    })?;
    Ok(SyncedRow {
        key: parse_key(path, &key)?,
        entry: SyncedEntry {
            content_hash: from_sql(content_hash),
            email: compact::expand_email(email, record.as_ref()),
            handle,
            record: record.map(Box::new),
        },
    })
}

impl SqliteState {
    /// Visits the audit entries `tail` (a WHERE and ORDER BY over `a`) selects.
    fn audit_rows(
        &mut self,
        tail: &str,
        params: impl rusqlite::Params,
        visit: &mut dyn FnMut(AuditEntry) -> Result<(), StateError>,
    ) -> Result<(), StateError> {
        let path = self.path.clone();
        let map = db_error(&path);
        let corrupt = |message: String| StateError::Corrupt {
            path: path.clone(),
            message: format!("in the audit: {message}"),
        };
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT p.name, a.run, a.at, a.key, a.email, a.kind, a.outcome, a.reason, a.fields, a.created
                 FROM audit a JOIN pipelines p ON p.id = a.pipeline {tail}"
            ))
            .map_err(map)?;
        let mut rows = stmt.query(params).map_err(map)?;
        while let Some(r) = rows.next().map_err(map)? {
            let key: Option<String> = r.get(3).map_err(map)?;
            let bytes: Option<Vec<u8>> = r.get(9).map_err(map)?;
            let created = read_record(
                &mut self.codec,
                &self.conn,
                key.as_deref().unwrap_or("(its record's)"),
                bytes.as_deref(),
            );
            visit(AuditEntry {
                pipeline: r.get(0).map_err(map)?,
                run: r.get(1).map_err(map)?,
                at: r.get(2).map_err(map)?,
                key: compact::expand_key(key.as_deref(), created.as_ref()).map_err(corrupt)?,
                email: compact::expand_email(r.get(4).map_err(map)?, created.as_ref()),
                kind: compact::expand_word(r.get(5).map_err(map)?).map_err(corrupt)?,
                outcome: compact::expand_word(r.get(6).map_err(map)?).map_err(corrupt)?,
                reason: r.get(7).map_err(map)?,
                fields: r.get(8).map_err(map)?,
                created: created.map(Box::new),
            })?;
        }
        Ok(())
    }

    /// Gives back the pages a run emptied (its pending changes: as large as what a
    /// first sync synced), beyond a few the next run reuses. Moving the file's last pages
    /// into the gaps costs about what writing them did, and a nightly frees few.
    fn release_free_pages(&self) {
        let count = |pragma: &str| {
            self.conn
                .query_row(&format!("PRAGMA {pragma}"), [], |r| r.get::<_, i64>(0))
                .unwrap_or(0)
        };
        let free = count("freelist_count");
        if free > FREE_PAGES_KEPT {
            let started = std::time::Instant::now();
            // Each step of the pragma frees one page: it is stepped to its end.
            let vacuum = self
                .conn
                .prepare("PRAGMA incremental_vacuum")
                .and_then(|mut s| {
                    let mut rows = s.query([])?;
                    while rows.next()?.is_some() {}
                    Ok(())
                });
            match vacuum {
                Ok(()) => tracing::debug!(
                    free,
                    seconds = started.elapsed().as_secs_f64(),
                    "free pages given back to the file system"
                ),
                Err(e) => tracing::warn!("could not give free pages back: {e}"),
            }
        }
    }
}

/// Free pages (4 KiB each) a state keeps for the next run rather than give back.
const FREE_PAGES_KEPT: i64 = 256;

/// A state made before `pending` lost its rowid (one b-tree less to write per change)
/// gets the new table the first time it opens with nothing pending; with rows pending,
/// the old table serves as it is until then.
fn rebuild_empty_pending(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    let sql: Option<String> = tx
        .query_row(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'pending'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    let has_rowid = sql.is_some_and(|sql| !sql.to_ascii_uppercase().contains("WITHOUT ROWID"));
    if !has_rowid {
        return Ok(());
    }
    let empty: bool = tx.query_row("SELECT NOT EXISTS (SELECT 1 FROM pending)", [], |r| {
        r.get(0)
    })?;
    if empty {
        tx.execute_batch("DROP INDEX IF EXISTS pending_key; DROP TABLE pending;")?;
        tx.execute_batch(SCHEMA)?;
    }
    Ok(())
}

/// Rewrites a version 1 (given its `record` columns) or 2 state in the compact rows of
/// version 3, in the caller's transaction.
fn migrate_to_v3(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
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
    tx.execute_batch("UPDATE meta SET value = '3' WHERE key = 'schema';")
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

    /// The tables of schema 2 this release migrates from, as that release made them.
    const SCHEMA_2: &str = "
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema', '2');
        CREATE TABLE pipelines (name TEXT PRIMARY KEY, runs INTEGER NOT NULL DEFAULT 0, cursor TEXT, last_full_run INTEGER);
        CREATE TABLE synced (pipeline TEXT NOT NULL, key_hash INTEGER NOT NULL, key TEXT NOT NULL,
            content_hash INTEGER NOT NULL, email TEXT, handle TEXT, record BLOB,
            PRIMARY KEY (pipeline, key_hash)) WITHOUT ROWID;
        CREATE TABLE pending (pipeline TEXT NOT NULL, batch_id TEXT NOT NULL, seq INTEGER NOT NULL,
            run INTEGER NOT NULL, key_hash INTEGER NOT NULL, key TEXT NOT NULL, kind TEXT NOT NULL,
            content_hash INTEGER NOT NULL, email TEXT, applied INTEGER NOT NULL DEFAULT 0, handle TEXT,
            record BLOB, PRIMARY KEY (pipeline, batch_id, seq));
        CREATE INDEX pending_key ON pending (pipeline, batch_id, key);
        CREATE TABLE audit (pipeline TEXT NOT NULL, run INTEGER NOT NULL, at INTEGER NOT NULL,
            key TEXT NOT NULL, email TEXT, kind TEXT NOT NULL, outcome TEXT NOT NULL, reason TEXT,
            fields TEXT NOT NULL, created BLOB);
    ";

    fn person(id: &str, email: &str) -> Contact {
        let mut c = Contact::default();
        c.set(&contactsync_core::Field::ExternalId, id).unwrap();
        c.set(&contactsync_core::Field::Email, email).unwrap();
        c.set(&contactsync_core::Field::FirstName, "Ann").unwrap();
        c
    }

    /// A state of schema 2 reads back the same after its rows are made compact, and
    /// its file frees pages from then on.
    #[test]
    fn a_state_of_schema_2_is_migrated_to_compact_rows() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state.db");
        let ann = person("E1", "ann@x.org");
        let bob = person("E2", "bob@x.org");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SCHEMA_2).unwrap();
            conn.execute(
                "INSERT INTO pipelines VALUES ('csv->csv', 4, 'c1', 3), ('csv->ldap', 1, NULL, NULL)",
                [],
            )
            .unwrap();
            let synced = "INSERT INTO synced VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)";
            let e1 = ContactKey::ExternalId("E1".into());
            // Ann's record gives her key and email; Bob's email is another one.
            conn.execute(
                synced,
                params![
                    "csv->csv",
                    to_sql(e1.hash64()),
                    e1.to_string(),
                    11,
                    "ann@x.org",
                    "h1",
                    crate::record::encode(&ann)
                ],
            )
            .unwrap();
            let by_email = ContactKey::Email("bob@x.org".into());
            conn.execute(
                synced,
                params![
                    "csv->ldap",
                    to_sql(by_email.hash64()),
                    by_email.to_string(),
                    12,
                    "old@x.org",
                    None::<String>,
                    crate::record::encode(&bob)
                ],
            )
            .unwrap();
            let e3 = ContactKey::ExternalId("E3".into());
            conn.execute(
                synced,
                params![
                    "csv->csv",
                    to_sql(e3.hash64()),
                    e3.to_string(),
                    13,
                    None::<String>,
                    None::<String>,
                    None::<Vec<u8>>
                ],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO pending VALUES ('csv->csv', 'run-5-batch-1', 0, 5, ?1, 'external_id:E2', 'update', 21, 'bob@x.org', 1, NULL, ?2),
                                           ('csv->csv', 'run-5-batch-1', 1, 5, ?3, 'external_id:E3', 'remove', 0, NULL, 0, NULL, NULL)",
                params![to_sql(ContactKey::ExternalId("E2".into()).hash64()), crate::record::encode(&bob), to_sql(e3.hash64())],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO audit VALUES ('csv->csv', 1, 100, 'external_id:E1', 'ann@x.org', 'create', 'applied', NULL, '', ?1),
                                         ('csv->csv', 2, 200, 'external_id:E1', 'ann@x.org', 'update', 'rejected', 'no', '{\"first_name\":[\"A\",\"Ann\"]}', NULL)",
                [crate::record::encode(&ann)],
            )
            .unwrap();
        }
        let mut state = SqliteState::open(&path).unwrap();
        let version: String = state
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let auto_vacuum: i64 = state
            .conn
            .query_row("PRAGMA auto_vacuum", [], |r| r.get(0))
            .unwrap();
        assert_eq!(auto_vacuum, 2, "incremental");
        let (key, email): (Option<String>, Option<String>) = state
            .conn
            .query_row(
                "SELECT key, email FROM synced WHERE content_hash = 11",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(
            (key, email),
            (None, None),
            "nothing the record says is stored again"
        );

        let a = state.synced("csv->csv", e1_hash()).unwrap().unwrap();
        assert_eq!(a.key.to_string(), "external_id:E1");
        assert_eq!(
            (
                a.entry.content_hash,
                a.entry.email.as_deref(),
                a.entry.handle.as_deref()
            ),
            (11, Some("ann@x.org"), Some("h1"))
        );
        assert_eq!(a.entry.record.as_deref(), Some(&ann));
        let b = state
            .synced("csv->ldap", ContactKey::Email("bob@x.org".into()).hash64())
            .unwrap()
            .unwrap();
        assert_eq!(
            (b.key.to_string().as_str(), b.entry.email.as_deref()),
            ("email:bob@x.org", Some("old@x.org"))
        );
        let c = state
            .synced("csv->csv", ContactKey::ExternalId("E3".into()).hash64())
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.key.to_string().as_str(), c.entry.email, c.entry.record),
            ("external_id:E3", None, None)
        );
        assert_eq!(state.cursor("csv->csv").unwrap().as_deref(), Some("c1"));

        let pending = state.pending_batches("csv->csv").unwrap();
        assert_eq!(pending.len(), 1);
        let rows = &pending[0].1;
        assert_eq!(rows[0].key.to_string(), "external_id:E2");
        assert_eq!(
            (
                rows[0].kind,
                rows[0].email.as_deref(),
                rows[0].record.as_ref()
            ),
            (ChangeKind::Update, Some("bob@x.org"), Some(&bob))
        );
        assert_eq!(
            (
                rows[1].kind,
                rows[1].key.to_string().as_str(),
                rows[1].email.as_deref()
            ),
            (ChangeKind::Remove, "external_id:E3", None)
        );
        // The applied update is confirmed as before.
        assert_eq!(state.confirm_finished("csv->csv", 5).unwrap(), 1);

        let history = state.history("ann@x.org").unwrap();
        assert_eq!(history.len(), 2, "{history:?}");
        assert_eq!(
            (
                history[0].kind.as_str(),
                history[0].outcome.as_str(),
                history[0].key.as_str()
            ),
            ("create", "applied", "external_id:E1")
        );
        assert!(history[0].fields.contains("Ann"), "{}", history[0].fields);
        assert_eq!(
            (history[1].kind.as_str(), history[1].reason.as_deref()),
            ("update", Some("no"))
        );
        assert_eq!(state.history("E1").unwrap().len(), 2);
        assert!(state.history("bob@x.org").unwrap().is_empty());
        let summaries = state.summaries().unwrap();
        assert_eq!(
            summaries
                .iter()
                .map(|s| (s.pipeline.as_str(), s.synced, s.runs))
                .collect::<Vec<_>>(),
            [("csv->csv", 3, 4), ("csv->ldap", 1, 1)]
        );
    }

    /// `n` people created, as pending rows.
    fn creates(n: u64) -> Vec<PendingRow> {
        (0..n)
            .map(|i| {
                let contact = person(&format!("E{i}"), &format!("person{i}@example.com"));
                PendingRow {
                    key: ContactKey::ExternalId(format!("E{i}")),
                    kind: ChangeKind::Create,
                    content_hash: i,
                    email: contact.email.clone(),
                    record: Some(contact),
                }
            })
            .collect()
    }

    fn e1_hash() -> u64 {
        ContactKey::ExternalId("E1".into()).hash64()
    }

    /// A batch large enough to be compressed on a second thread reads back row for
    /// row, in its order, records and all.
    #[test]
    fn a_large_batch_reads_back_in_its_order() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut state = SqliteState::open(&dir.path().join("state.db")).unwrap();
        let (run, _) = state.begin_run("p").unwrap();
        // Enough first records to train a dictionary, so that records are compressed.
        state
            .sample_records(
                &creates(2_000)
                    .into_iter()
                    .filter_map(|r| r.record)
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        assert!(state.codec.compresses());
        let rows = creates(5 * ENCODE_CHUNK as u64 + 7);
        state
            .record_pending("p", run, "run-1-batch-1", &rows)
            .unwrap();
        let back = state.pending_batches("p").unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].1, rows);
    }

    /// A state whose `pending` still has a rowid gets the new table when it opens with
    /// nothing pending, and keeps the old one, rows and all, while something is.
    #[test]
    fn an_old_pending_table_is_rebuilt_only_when_empty() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state.db");
        let old_table = |state: &SqliteState| {
            state
                .conn
                .execute_batch(
                    "DROP INDEX pending_key; DROP TABLE pending;
                     CREATE TABLE pending (pipeline INTEGER NOT NULL, batch_id TEXT NOT NULL,
                       seq INTEGER NOT NULL, run INTEGER NOT NULL, key_hash INTEGER NOT NULL,
                       kind NOT NULL, content_hash INTEGER NOT NULL,
                       applied INTEGER NOT NULL DEFAULT 0, record BLOB, key TEXT, email TEXT,
                       handle TEXT, PRIMARY KEY (pipeline, batch_id, seq));
                     CREATE INDEX pending_key ON pending (pipeline, batch_id, key_hash);",
                )
                .unwrap();
        };
        let without_rowid = |state: &SqliteState| -> bool {
            state
                .conn
                .query_row(
                    "SELECT sql FROM sqlite_master WHERE name = 'pending'",
                    [],
                    |r| r.get::<_, String>(0),
                )
                .unwrap()
                .contains("WITHOUT ROWID")
        };
        {
            let mut state = SqliteState::open(&path).unwrap();
            assert!(without_rowid(&state), "a new state's pending has no rowid");
            old_table(&state);
            let (run, _) = state.begin_run("p").unwrap();
            state
                .record_pending("p", run, "run-1-batch-1", &creates(3))
                .unwrap();
        }
        let mut state = SqliteState::open(&path).unwrap();
        assert!(!without_rowid(&state), "a table with rows pending is kept");
        let left = state.pending_batches("p").unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].1, creates(3));
        state.drop_pending("p", "run-1-batch-1").unwrap();
        drop(state);
        let state = SqliteState::open(&path).unwrap();
        assert!(without_rowid(&state), "an empty old table is rebuilt");
    }

    /// A first sync's pending changes are as large as what it synced: once confirmed,
    /// the run gives their pages back instead of leaving the file twice its size.
    #[test]
    fn the_pages_a_confirmed_run_emptied_are_given_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut state = SqliteState::open(&dir.path().join("state.db")).unwrap();
        let (run, _) = state.begin_run("p").unwrap();
        let rows = creates(80_000);
        for (n, batch) in rows.chunks(10_000).enumerate() {
            let id = format!("run-{run}-batch-{n}");
            state.record_pending("p", run, &id, batch).unwrap();
            let settlements: Vec<Settlement> = batch
                .iter()
                .map(|r| Settlement::AwaitingFinish {
                    key: r.key.clone(),
                    handle: None,
                })
                .collect();
            state.settle("p", &id, &settlements).unwrap();
        }
        assert_eq!(state.confirm_finished("p", run).unwrap(), 80_000);
        let free = |state: &SqliteState| -> i64 {
            state
                .conn
                .query_row("PRAGMA freelist_count", [], |r| r.get(0))
                .unwrap()
        };
        assert!(
            free(&state) > 2 * FREE_PAGES_KEPT,
            "the emptied pending table left {} free pages",
            free(&state)
        );
        state
            .finish_run("p", run, "synced", "{}", None, true)
            .unwrap();
        assert!(
            free(&state) <= FREE_PAGES_KEPT,
            "{} free pages after the run",
            free(&state)
        );
        assert_eq!(state.summaries().unwrap()[0].synced, 80_000);
    }

    /// Confirmed in ranges of pending rows, a run's applied changes all reach `synced`
    /// and leave `pending`, whatever range they fall in; what is not applied (an
    /// unknown outcome) and another pipeline's rows stay pending.
    #[test]
    fn a_run_confirmed_in_many_ranges_confirms_exactly_its_applied_changes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut state = SqliteState::open(&dir.path().join("state.db")).unwrap();
        state.confirm_range_rows = 7;
        let awaiting = |rows: &[PendingRow]| -> Vec<Settlement> {
            rows.iter()
                .map(|r| Settlement::AwaitingFinish {
                    key: r.key.clone(),
                    handle: None,
                })
                .collect()
        };
        let (run, _) = state.begin_run("p").unwrap();
        let rows = creates(50);
        for (n, batch) in rows.chunks(12).enumerate() {
            let id = format!("run-{run}-batch-{n}");
            state.record_pending("p", run, &id, batch).unwrap();
            state.settle("p", &id, &awaiting(batch)).unwrap();
        }
        // Another pipeline's pending change, not applied yet.
        let (other, _) = state.begin_run("q").unwrap();
        state
            .record_pending("q", other, "q-batch", &creates(1))
            .unwrap();
        assert_eq!(state.confirm_finished("p", run).unwrap(), 50);
        state
            .finish_run("p", run, "synced", "{}", None, true)
            .unwrap();

        let (run, _) = state.begin_run("p").unwrap();
        let mut night: Vec<PendingRow> = creates(20)
            .into_iter()
            .map(|mut row| {
                row.kind = if row.content_hash % 2 == 0 {
                    ChangeKind::Remove
                } else {
                    ChangeKind::Update
                };
                row.content_hash += 1000;
                row
            })
            .collect();
        let unknown = night.pop().unwrap();
        state.record_pending("p", run, "night-1", &night).unwrap();
        state.settle("p", "night-1", &awaiting(&night)).unwrap();
        state
            .record_pending("p", run, "night-2", std::slice::from_ref(&unknown))
            .unwrap();
        assert_eq!(state.confirm_finished("p", run).unwrap(), 19);
        let summary = |state: &mut SqliteState, name: &str| {
            state
                .summaries()
                .unwrap()
                .into_iter()
                .find(|s| s.pipeline == name)
                .unwrap()
        };
        let p = summary(&mut state, "p");
        assert_eq!((p.synced, p.pending), (50 - 10, 1));
        assert_eq!(summary(&mut state, "q").pending, 1);
        let updated = state
            .synced("p", ContactKey::ExternalId("E1".into()).hash64())
            .unwrap()
            .unwrap();
        assert_eq!(updated.entry.content_hash, 1001);
        assert!(state
            .synced("p", ContactKey::ExternalId("E0".into()).hash64())
            .unwrap()
            .is_none());
    }

    /// Records are compressed with a dictionary the file trained on its first ones: they
    /// read back the same in a connection opened before the dictionary existed, and
    /// after the file is opened again.
    #[test]
    fn records_compressed_by_one_connection_read_back_in_another() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state.db");
        let mut writer = SqliteState::open(&path).unwrap();
        let mut early_reader = SqliteState::open(&path).unwrap();
        let (run, _) = writer.begin_run("p").unwrap();
        let rows = creates(3000);
        for (n, batch) in rows.chunks(500).enumerate() {
            let id = format!("run-{run}-batch-{n}");
            writer.record_pending("p", run, &id, batch).unwrap();
            let settlements: Vec<Settlement> = batch
                .iter()
                .map(|r| Settlement::Synced {
                    key: r.key.clone(),
                    entry: SyncedEntry {
                        content_hash: r.content_hash,
                        email: r.email.clone(),
                        handle: None,
                        record: r.record.clone().map(Box::new),
                    },
                })
                .collect();
            writer.settle("p", &id, &settlements).unwrap();
        }
        let (compressed, average): (i64, f64) = writer
            .conn
            .query_row(
                "SELECT COUNT(*) FILTER (WHERE substr(record, 1, 1) = x'02'), AVG(length(record)) FROM synced",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert!(compressed >= 2000, "{compressed} records compressed");
        let plain = crate::record::encode(rows[0].record.as_ref().unwrap()).len() as f64;
        assert!(
            average < plain * 0.75,
            "{average} bytes a record, {plain} plain"
        );
        drop(writer);
        let mut reopened = SqliteState::open(&path).unwrap();
        for store in [&mut early_reader, &mut reopened] {
            for row in [&rows[0], &rows[1500], &rows[2999]] {
                let synced = store.synced("p", row.key.hash64()).unwrap().unwrap();
                assert_eq!(synced.key, row.key);
                assert_eq!(synced.entry.email, row.email);
                assert_eq!(synced.entry.record.as_deref(), row.record.as_ref());
            }
        }
    }
}
