//! The embedded default backend: one SQLite file per config, in WAL mode.

use std::path::{Path, PathBuf};

use contactsync_core::{ConnectorError, Contact, ContactKey, PendingBatch, SinkStore};
use rusqlite::{params, Connection, OptionalExtension};

use contactsync_core::{ChangeKind, SyncedEntry};
use rusqlite::types::Value;

use crate::record::{RecordCodec, RecordDecodeError};

use super::{
    compact, created_entry, from_sql, group_pending, merge_history, stored_record,
    stored_record_with, to_sql, with_created_fields, AuditEntry, LockAttempt, LockHolder,
    PendingRow, PipelineSummary, RunRecord, Settlement, SourceMemo, StateError, StateItem,
    SyncedRow, LOCK_HEARTBEAT_EVERY, LOCK_STALE_AFTER,
};

mod creates;
mod journal;
mod migrate;
mod sink_store;
mod staging;
mod store;
mod views;
use creates::write_out_creates;
use journal::Confirming;
use migrate::migrate_to_compact_rows;
use sink_store::SqliteSinkStore;
use staging::{staging_dir, StagedRun};

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
    /// Transactions committed on `conn` since it was opened (SQLite's commit hook).
    commits: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The pipeline and run whose creates are kept as one entry a run
    /// ([`AuditLog::record_created_run`]).
    creates_run: Option<(String, i64)>,
    /// Set by a migration to schema 5: the synced rows' email hashes are to be filled
    /// in once the records can be read.
    backfill_email_hashes: bool,
    /// A confirm done and not yet committed is open on `conn`
    /// ([`PendingJournal::hold_confirm`]).
    held_confirm: bool,
    /// The rows each pipeline's current run staged for its confirm, by pipeline
    /// ([`PendingJournal::record_awaiting_finish`]).
    staged: std::collections::HashMap<String, StagedRun>,
    /// The staged rows a held confirm took, by pipeline, until its commit.
    held_staged: Option<(String, StagedRun)>,
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
/// the record that gives them: [`super::compact`]); version 4 keeps a first sync's
/// creates as one entry a run (`creates`) and each person's `created_run` in `synced`
/// instead of a history row a person ([`AuditLog::record_created_run`]); version 5 keeps
/// each run's rejects (`rejects`, [`crate::RejectLog`]) and finds a person's rows by
/// index (`email_hash` in `synced`, `key_hash` and `email_hash` in `audit`:
/// [`compact::email_hash`]); version 6 keeps what a mapped pipeline's source rows became
/// (`source_memo`, [`crate::SourceMemo`]).
const SCHEMA_VERSION: &str = "6";

/// A version a read-only open reads too: version 6 only added `source_memo`, which
/// nothing read-only reads.
const READABLE_VERSION: &str = "5";

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
    created_run INTEGER,
    email_hash INTEGER,
    PRIMARY KEY (pipeline, key_hash)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS synced_email ON synced (email_hash) WHERE email_hash IS NOT NULL;
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
    email_hash INTEGER,
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
    reason TEXT,
    key_hash INTEGER,
    email_hash INTEGER
);
CREATE INDEX IF NOT EXISTS audit_key ON audit (key_hash);
CREATE INDEX IF NOT EXISTS audit_email ON audit (email_hash) WHERE email_hash IS NOT NULL;
CREATE TABLE IF NOT EXISTS creates (
    pipeline INTEGER NOT NULL,
    run INTEGER NOT NULL,
    at INTEGER NOT NULL,
    values_kept INTEGER NOT NULL,
    PRIMARY KEY (pipeline, run)
);
CREATE TABLE IF NOT EXISTS rejects (
    pipeline INTEGER NOT NULL,
    run INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    at INTEGER NOT NULL,
    stage TEXT NOT NULL,
    origin TEXT NOT NULL,
    key TEXT,
    email TEXT,
    field TEXT,
    reason TEXT NOT NULL,
    PRIMARY KEY (pipeline, run, seq)
) WITHOUT ROWID;
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
CREATE TABLE IF NOT EXISTS source_memo (
    pipeline INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    entries BLOB NOT NULL,
    PRIMARY KEY (pipeline, seq)
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
        let commits = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = commits.clone();
        conn.commit_hook(Some(move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            false // let the commit go ahead
        }));
        let mut state = SqliteState {
            conn,
            path: path.to_path_buf(),
            heartbeat: None,
            codec: RecordCodec::default(),
            confirm_range_rows: CONFIRM_RANGE_ROWS,
            commits,
            creates_run: None,
            backfill_email_hashes: false,
            held_confirm: false,
            staged: Default::default(),
            held_staged: None,
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
        if state.backfill_email_hashes {
            state.backfill_email_hashes()?;
        }
        Ok(state)
    }

    /// Fills in the email hash of every synced row (a state migrated to schema 5), in
    /// one transaction: reads each record once.
    fn backfill_email_hashes(&mut self) -> Result<(), StateError> {
        let path = self.path.clone();
        let map = db_error(&path);
        let tx = self.conn.transaction_with_behavior(WRITE).map_err(map)?;
        let mut hashes: Vec<(i64, i64, i64)> = Vec::new();
        {
            let mut stmt = tx
                .prepare(&format!(
                    "SELECT {SYNCED_COLUMNS}, pipeline, key_hash FROM synced"
                ))
                .map_err(map)?;
            let mut rows = stmt.query([]).map_err(map)?;
            while let Some(r) = rows.next().map_err(map)? {
                let stored = compact_synced(r).map_err(map)?;
                let (pipeline, key_hash): (i64, i64) =
                    (r.get(5).map_err(map)?, r.get(6).map_err(map)?);
                let row = synced_row(&mut self.codec, &tx, &path, stored)?;
                if let Some(hash) = compact::email_hash(
                    from_sql(key_hash),
                    row.entry.email.as_deref(),
                    row.entry.record.as_deref(),
                ) {
                    hashes.push((pipeline, key_hash, hash));
                }
            }
        }
        {
            let mut put = tx
                .prepare("UPDATE synced SET email_hash = ?3 WHERE pipeline = ?1 AND key_hash = ?2")
                .map_err(map)?;
            for (pipeline, key_hash, hash) in &hashes {
                put.execute(params![pipeline, key_hash, hash])
                    .map_err(map)?;
            }
        }
        tx.commit().map_err(map)?;
        self.backfill_email_hashes = false;
        tracing::info!(state = %path.display(), rows = hashes.len(), "indexed the synced people's emails (schema 5)");
        Ok(())
    }

    /// Opens an existing state for reading only (`contactsync serve`): the file is
    /// opened read-only, beside runs that write it (WAL readers never block the writer),
    /// nothing is created or migrated, and a file of another schema version is refused.
    pub fn open_read_only(path: &Path) -> Result<Self, StateError> {
        if !path.is_file() {
            return Err(StateError::Unavailable {
                path: path.to_path_buf(),
                message:
                    "no state here: run `contactsync sync` first, or name the state with --state"
                        .into(),
            });
        }
        let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
            | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX
            | rusqlite::OpenFlags::SQLITE_OPEN_URI;
        let conn = Connection::open_with_flags(path, flags).map_err(db_error(path))?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(db_error(path))?;
        let version: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
                r.get(0)
            })
            .optional()
            .unwrap_or(None);
        if !matches!(version.as_deref(), Some(SCHEMA_VERSION | READABLE_VERSION)) {
            return Err(StateError::Corrupt {
                path: path.to_path_buf(),
                message: format!(
                    "schema version {}, this contactsync reads {SCHEMA_VERSION}: run `contactsync sync` of this version once, or use a matching contactsync",
                    version.as_deref().unwrap_or("none (not a contactsync state)")
                ),
            });
        }
        let mut state = SqliteState {
            conn,
            path: path.to_path_buf(),
            heartbeat: None,
            codec: RecordCodec::default(),
            confirm_range_rows: CONFIRM_RANGE_ROWS,
            commits: Default::default(),
            creates_run: None,
            backfill_email_hashes: false,
            held_confirm: false,
            staged: Default::default(),
            held_staged: None,
        };
        load_dictionaries(&mut state.codec, &state.conn, false).map_err(|message| {
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
            Some(SCHEMA_VERSION) => {
                restore_indexes(&tx).map_err(map)?;
                rebuild_empty_pending(&tx).map_err(map)?;
            }
            Some(old @ ("3" | "4" | READABLE_VERSION)) => {
                // Adding columns and tables: nothing is rewritten. The synced rows'
                // email hashes are filled in once the records can be read (`open`); the
                // audit's older rows are found without an index until they are pruned.
                // Version 5 lacks only a table.
                if old != READABLE_VERSION {
                    for (table, column) in [
                        ("synced", "created_run"),
                        ("synced", "email_hash"),
                        ("pending", "email_hash"),
                        ("audit", "key_hash"),
                        ("audit", "email_hash"),
                    ] {
                        add_column(&tx, table, column).map_err(map)?;
                    }
                    self.backfill_email_hashes = true;
                }
                tx.execute_batch(SCHEMA).map_err(map)?;
                tx.execute(
                    "UPDATE meta SET value = ?1 WHERE key = 'schema'",
                    [SCHEMA_VERSION],
                )
                .map_err(map)?;
                rebuild_empty_pending(&tx).map_err(map)?;
            }
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
                migrate_to_compact_rows(&tx).map_err(map)?;
                migrated = true;
                self.backfill_email_hashes = true;
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

/// A run as `SELECT pipeline, run, started_at, finished_at, status, report FROM runs`
/// returns it.
fn run_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunRecord> {
    Ok(RunRecord {
        pipeline: r.get(0)?,
        run: r.get(1)?,
        started_at: r.get(2)?,
        finished_at: r.get(3)?,
        status: r.get(4)?,
        report: r.get(5)?,
    })
}

/// A reject as `SELECT … stage, origin, key, email, field, reason FROM rejects`
/// returns it, its columns from `first` on.
fn reject_row(r: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<crate::RejectRow> {
    Ok(crate::RejectRow {
        stage: r.get(first)?,
        origin: r.get(first + 1)?,
        key: r.get(first + 2)?,
        email: r.get(first + 3)?,
        field: r.get(first + 4)?,
        reason: r.get(first + 5)?,
    })
}

/// Adds the integer `column` to `table` unless it has it.
fn add_column(tx: &rusqlite::Transaction<'_>, table: &str, column: &str) -> rusqlite::Result<()> {
    let has: bool = tx.query_row(
        &format!("SELECT EXISTS (SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1)"),
        [column],
        |r| r.get(0),
    )?;
    if !has {
        tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} INTEGER;"))?;
    }
    Ok(())
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
/// stay true beside it; see [`compact`]. A new record ends the create told from the
/// person's run ([`AuditLog::record_created_run`]): it was written out before
/// (`write_out_creates`).
/// Pending rows [`PendingJournal::confirm_finished`] confirms in one transaction, about.
const CONFIRM_RANGE_ROWS: i64 = 2_000_000;

const SYNCED_UPSERT: &str = "ON CONFLICT (pipeline, key_hash) DO UPDATE SET
    content_hash = excluded.content_hash, record = COALESCE(excluded.record, synced.record),
    key = excluded.key, email = excluded.email, handle = COALESCE(excluded.handle, synced.handle),
    created_run = CASE WHEN excluded.record IS NULL THEN synced.created_run
        ELSE excluded.created_run END,
    email_hash = excluded.email_hash";

/// Writes audit entries in their compact form.
fn insert_audit(
    conn: &Connection,
    codec: &mut RecordCodec,
    entries: &[AuditEntry],
) -> rusqlite::Result<()> {
    let mut ids: Vec<(&str, i64)> = Vec::new();
    let mut put = conn.prepare_cached(
        "INSERT INTO audit (pipeline, run, at, kind, outcome, fields, created, key, email, reason, key_hash, email_hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
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
        // The key's hash as a key hashes (its text form); what `history` looks it up by.
        let key_hash = e
            .key
            .parse::<ContactKey>()
            .map(|k| k.hash64())
            .unwrap_or_default();
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
            to_sql(key_hash),
            compact::email_hash(key_hash, e.email.as_deref(), created),
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

/// Creates the schema's indexes that are missing: one a bulk confirm dropped to build
/// it again after (`synced_email`), left missing by a crash in between. Every statement
/// of [`SCHEMA`] is `IF NOT EXISTS`, so it only adds what is missing.
fn restore_indexes(tx: &rusqlite::Connection) -> rusqlite::Result<()> {
    tx.execute_batch(SCHEMA)
}

#[cfg(test)]
mod tests;
