//! The shared backend: the state in a PostgreSQL database, for many runners on many
//! machines (`state = "postgres://contactsync@db.internal/contactsync"`).
//!
//! Why it is shaped so:
//! - The engine's state calls are synchronous and made from async code. The `postgres`
//!   client runs its own small runtime, which must not be started inside the engine's:
//!   so one thread of this store owns the connection, and each call hands it a job and
//!   waits for the answer (as a SQLite call waits for its file).
//! - That connection is the run's session: the run locks are `pg_try_advisory_lock`
//!   keys held on it, so a runner that dies releases them with its connection, at once,
//!   with no heartbeat. The `locks` table only says who holds them, for messages.
//! - Writes of many rows (a batch recorded as pending, its settlement) are one
//!   statement over arrays (`UNNEST`), so that a 1M first sync is not a million round
//!   trips.
//! - The schema is versioned (`schema_migrations`); missing migrations are applied on
//!   open, in one transaction, under an advisory lock so that two runners starting
//!   together do not both apply them.

use std::collections::HashMap;
use std::sync::mpsc;

use contactsync_core::{ConnectorError, Contact, ContactKey, PendingBatch, SinkStore};
use postgres::Client;

use super::{
    audit_entry, created_entry, from_sql, group_pending, merge_history, synced_row, to_sql,
    with_created_fields, AuditEntry, LockAttempt, LockHolder, PendingRow, PipelineSummary,
    RunRecord, Settlement, SourceMemo, StateError, StateItem, StoredAudit, StoredSynced, SyncedRow,
    AUDIT_COLUMNS,
};
use crate::record::{RecordCodec, RecordDecodeError};
use crate::redact;

mod confirm;
mod sink_store;
mod store;
mod transfer;
mod views;
use sink_store::PostgresSinkStore;

/// How `synced_email` is made: by migration 5, and again by a first sync that dropped
/// it (`confirm::insert_staged`).
macro_rules! synced_email_index {
    () => {
        "CREATE INDEX synced_email ON synced USING hash (lower(email))"
    };
}
pub(crate) use synced_email_index;

/// The migrations, in order: version `i + 1` is `MIGRATIONS[i]`.
const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE pipelines (
    name TEXT PRIMARY KEY,
    runs BIGINT NOT NULL DEFAULT 0,
    cursor TEXT,
    last_full_run BIGINT
);
CREATE TABLE synced (
    pipeline TEXT NOT NULL,
    key_hash BIGINT NOT NULL,
    key TEXT NOT NULL,
    content_hash BIGINT NOT NULL,
    email TEXT,
    handle TEXT,
    record BYTEA,
    PRIMARY KEY (pipeline, key_hash)
);
CREATE TABLE pending (
    pipeline TEXT NOT NULL,
    batch_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    run BIGINT NOT NULL,
    key_hash BIGINT NOT NULL,
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    content_hash BIGINT NOT NULL,
    email TEXT,
    applied BOOLEAN NOT NULL DEFAULT FALSE,
    handle TEXT,
    record BYTEA,
    PRIMARY KEY (pipeline, batch_id, seq)
);
CREATE INDEX pending_key ON pending (pipeline, batch_id, key);
CREATE TABLE runs (
    pipeline TEXT NOT NULL,
    run BIGINT NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    status TEXT,
    report TEXT,
    PRIMARY KEY (pipeline, run)
);
CREATE TABLE locks (
    name TEXT PRIMARY KEY,
    token TEXT NOT NULL,
    pid BIGINT NOT NULL,
    host TEXT NOT NULL,
    pipeline TEXT NOT NULL,
    since TEXT NOT NULL
);
CREATE TABLE audit (
    id BIGSERIAL PRIMARY KEY,
    pipeline TEXT NOT NULL,
    run BIGINT NOT NULL,
    at BIGINT NOT NULL,
    key TEXT NOT NULL,
    email TEXT,
    kind TEXT NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT,
    fields TEXT NOT NULL,
    created BYTEA
);
CREATE INDEX audit_key ON audit (key);
CREATE INDEX audit_email ON audit (lower(email));
CREATE TABLE sink_data (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (scope, key)
);
",
    "
CREATE TABLE slots (
    slot TEXT NOT NULL,
    pipeline TEXT NOT NULL,
    worker TEXT NOT NULL,
    status TEXT NOT NULL,
    claimed_at TEXT NOT NULL,
    finished_at TEXT,
    PRIMARY KEY (slot, pipeline)
);
",
    // A run's creates as one entry (AuditLog::record_created_run), and the batches a
    // sink durable at its finish took whole, staged until its finish (unlogged: no WAL,
    // and a crash may lose them, as it may).
    "
ALTER TABLE synced ADD COLUMN created_run BIGINT;
CREATE TABLE creates (
    pipeline TEXT NOT NULL,
    run BIGINT NOT NULL,
    at BIGINT NOT NULL,
    values_kept BOOLEAN NOT NULL,
    PRIMARY KEY (pipeline, run)
);
CREATE UNLOGGED TABLE staged (
    pipeline TEXT NOT NULL,
    run BIGINT NOT NULL,
    key_hash BIGINT NOT NULL,
    key TEXT NOT NULL,
    kind TEXT NOT NULL,
    content_hash BIGINT NOT NULL,
    email TEXT,
    handle TEXT,
    record BYTEA,
    created_run BIGINT
);
CREATE INDEX staged_run ON staged (pipeline, run);
",
    // Records compressed with dictionaries the database trains on its own first records.
    "
CREATE TABLE dictionaries (
    id BIGSERIAL PRIMARY KEY,
    dictionary BYTEA NOT NULL
);
",
    // Each run's rejects (RejectLog), for `contactsync serve`; and a person's synced
    // row found by email through an index (`history`, the dashboard's search; by key
    // it is the primary key). A hash index: some 20 bytes a person, where a B-tree of
    // the addresses took about 50.
    concat!(
        "\n",
        synced_email_index!(),
        ";
CREATE TABLE rejects (
    pipeline TEXT NOT NULL,
    run BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    at BIGINT NOT NULL,
    stage TEXT NOT NULL,
    origin TEXT NOT NULL,
    key TEXT,
    email TEXT,
    field TEXT,
    reason TEXT NOT NULL,
    PRIMARY KEY (pipeline, run, seq)
);
",
    ),
    // What a mapped pipeline's source rows became (SourceMemo).
    "
CREATE TABLE source_memo (
    pipeline TEXT NOT NULL,
    seq BIGINT NOT NULL,
    entries BYTEA NOT NULL,
    PRIMARY KEY (pipeline, seq)
);
",
];

/// The advisory lock key that serialises migrations.
const MIGRATION_LOCK: i64 = 0x636f_6e74_6163_7473; // "contacts"

type Job = Box<dyn FnOnce(&mut Client) + Send>;

/// A batch handed to the connection's thread to stage: answers once copied.
type Staging = mpsc::Receiver<Result<(), postgres::Error>>;

/// Batches handed to the connection's thread to stage and not yet done, at most: the
/// run prepares the next while the thread copies these, and no more wait in memory.
const STAGING_AHEAD: usize = 2;

/// `COPY`s a batch's rows into `staged` ([`PostgresState::stage`]), compressing their
/// records with `codec`.
fn copy_staged(
    c: &mut Client,
    pipeline: &str,
    run: i64,
    rows: Vec<PendingRow>,
    handles: Vec<Option<String>>,
    created_run: Option<i64>,
    codec: &mut RecordCodec,
) -> Result<(), postgres::Error> {
    use postgres::types::Type;
    let sink = c.copy_in(
        "COPY staged (pipeline, run, key_hash, key, kind, content_hash, email, handle, record, created_run)
         FROM STDIN (FORMAT binary)",
    )?;
    let types = [
        Type::TEXT,
        Type::INT8,
        Type::INT8,
        Type::TEXT,
        Type::TEXT,
        Type::INT8,
        Type::TEXT,
        Type::TEXT,
        Type::BYTEA,
        Type::INT8,
    ];
    let mut writer = postgres::binary_copy::BinaryCopyInWriter::new(sink, &types);
    for (row, handle) in rows.into_iter().zip(handles) {
        let record = row.record.as_ref().map(|c| codec.encode(c));
        let created = created_run.filter(|_| row.kind == contactsync_core::ChangeKind::Create);
        writer.write(&[
            &pipeline,
            &run,
            &to_sql(row.key.hash64()),
            &row.key.to_string(),
            &row.kind.as_str(),
            &to_sql(row.content_hash),
            &row.email,
            &handle,
            &record,
            &created,
        ])?;
    }
    writer.finish().map(drop)
}

/// The state in a PostgreSQL database.
pub struct PostgresState {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The URL without its password, for messages.
    shown: String,
    /// The worker whose liveness lock this session holds (`sync --worker`).
    worker: Option<String>,
    /// Advisory lock keys this store's session holds, with their holder: a session
    /// may take an advisory lock again, so another holder in this process is refused
    /// here.
    held: HashMap<i64, LockHolder>,
    /// The pipeline and run whose creates are kept as one entry a run
    /// ([`AuditLog::record_created_run`]).
    creates_run: Option<(String, i64)>,
    /// Compresses the records kept with the database's dictionaries, as SQLite does.
    codec: RecordCodec,
    /// A confirm done and not yet committed is open on the connection
    /// ([`PendingJournal::hold_confirm`]).
    held_confirm: bool,
    /// Batches handed to the connection's thread to stage, each answering once copied
    /// ([`PostgresState::stage`]); in a mutex only so that the store is `Sync` (only
    /// `&mut self` touches it).
    staging: std::sync::Mutex<std::collections::VecDeque<Staging>>,
}

impl std::fmt::Debug for PostgresState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresState")
            .field("url", &self.shown)
            .finish()
    }
}

/// Where the password comes from when the URL has none: `CONTACTSYNC_STATE_PASSWORD`,
/// the file `password_file`, `PGPASSWORD`, or the user's `.pgpass` (`PGPASSFILE`).
fn password_for(
    config: &postgres::Config,
    password_file: Option<&std::path::Path>,
) -> Result<Option<String>, String> {
    let password = find_password(config, password_file)?;
    if let Some(p) = &password {
        contactsync_core::remember_secret(p);
    }
    if let Some(p) = config.get_password() {
        contactsync_core::remember_secret(&String::from_utf8_lossy(p));
    }
    Ok(password)
}

fn find_password(
    config: &postgres::Config,
    password_file: Option<&std::path::Path>,
) -> Result<Option<String>, String> {
    if let Ok(p) = std::env::var("CONTACTSYNC_STATE_PASSWORD") {
        return Ok(Some(p));
    }
    if let Some(path) = password_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("the state password file {}: {e}", path.display()))?;
        return Ok(Some(text.trim_end_matches(['\n', '\r']).to_string()));
    }
    if let Ok(p) = std::env::var("PGPASSWORD") {
        return Ok(Some(p));
    }
    let file = std::env::var_os("PGPASSFILE")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".pgpass")));
    let Some(text) = file.and_then(|f| std::fs::read_to_string(f).ok()) else {
        return Ok(None);
    };
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "localhost".to_string(),
    };
    let port = config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string();
    let db = config.get_dbname().unwrap_or("").to_string();
    let user = config.get_user().unwrap_or("").to_string();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let parts: Vec<&str> = line.splitn(5, ':').collect();
        if parts.len() != 5 {
            continue;
        }
        let fits = |pattern: &str, value: &str| pattern == "*" || pattern == value;
        if fits(parts[0], &host)
            && fits(parts[1], &port)
            && fits(parts[2], &db)
            && fits(parts[3], &user)
        {
            return Ok(Some(parts[4].to_string()));
        }
    }
    Ok(None)
}

/// The advisory lock key of a lock name.
fn lock_key(name: &str) -> i64 {
    xxhash_rust::xxh3::xxh3_64(format!("contactsync lock {name}").as_bytes()) as i64
}

impl PostgresState {
    /// Inserts a batch's pending rows in one statement; with `applied`, each marked
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
        let pipeline = pipeline.to_string();
        let batch_id = batch_id.to_string();
        let seq: Vec<i64> = (0..rows.len() as i64).collect();
        let key_hash: Vec<i64> = rows.iter().map(|r| to_sql(r.key.hash64())).collect();
        let key: Vec<String> = rows.iter().map(|r| r.key.to_string()).collect();
        let kind: Vec<String> = rows.iter().map(|r| r.kind.as_str().to_string()).collect();
        let content: Vec<i64> = rows.iter().map(|r| to_sql(r.content_hash)).collect();
        let email: Vec<Option<String>> = rows.iter().map(|r| r.email.clone()).collect();
        let record: Vec<Option<Vec<u8>>> = rows
            .iter()
            .map(|r| r.record.as_ref().map(|c| self.codec.encode(c)))
            .collect();
        let taken = applied.is_some();
        let handle: Vec<Option<String>> = (0..rows.len())
            .map(|i| applied.and_then(|h| h.get(i)).cloned().flatten())
            .collect();
        self.call(move |c| {
            c.execute(
                "INSERT INTO pending (pipeline, batch_id, seq, run, key_hash, key, kind, content_hash, email, record, applied, handle)
                 SELECT $1, $2, s, $3, h, k, t, ch, e, r, $11::BOOLEAN, hd
                 FROM UNNEST($4::BIGINT[], $5::BIGINT[], $6::TEXT[], $7::TEXT[], $8::BIGINT[], $9::TEXT[], $10::BYTEA[], $12::TEXT[])
                   AS u(s, h, k, t, ch, e, r, hd)
                 ON CONFLICT (pipeline, batch_id, seq) DO UPDATE SET run = excluded.run,
                   key_hash = excluded.key_hash, key = excluded.key, kind = excluded.kind,
                   content_hash = excluded.content_hash, email = excluded.email,
                   applied = excluded.applied, handle = excluded.handle, record = excluded.record",
                &[&pipeline, &batch_id, &run, &seq, &key_hash, &key, &kind, &content, &email, &record, &taken, &handle],
            )
            .map(|_| ())
        })
    }

    /// Copies a batch a sink durable at its finish took whole into `staged`
    /// (`COPY … FROM STDIN (FORMAT binary)`), each row applied with its handle, the
    /// creates marked with `created_run` when given. Handed to the connection's thread,
    /// which compresses the records and copies them while the run goes on, as SQLite's
    /// staging thread does; [`PostgresState::staged`] says how it went, before the
    /// confirm. At most [`STAGING_AHEAD`] batches wait there.
    fn stage(
        &mut self,
        pipeline: &str,
        run: i64,
        rows: Vec<PendingRow>,
        handles: Vec<Option<String>>,
        created_run: Option<i64>,
    ) -> Result<(), StateError> {
        self.learn(rows.iter().filter_map(|r| r.record.as_ref()))?;
        while self.staging_queue().len() >= STAGING_AHEAD {
            self.staged_one()?;
        }
        let mut codec = self.codec.writer();
        let pipeline = pipeline.to_string();
        let answered = self.submit(move |client| {
            copy_staged(
                client,
                &pipeline,
                run,
                rows,
                handles,
                created_run,
                &mut codec,
            )
        })?;
        self.staging_queue().push_back(answered);
        Ok(())
    }

    /// The batches handed to the connection's thread to stage.
    fn staging_queue(&mut self) -> &mut std::collections::VecDeque<Staging> {
        self.staging
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits for the oldest batch handed to [`PostgresState::stage`].
    fn staged_one(&mut self) -> Result<(), StateError> {
        let Some(answered) = self.staging_queue().pop_front() else {
            return Ok(());
        };
        self.answer(answered)
    }

    /// Waits for every batch handed to [`PostgresState::stage`]: the first error, if
    /// one failed.
    pub(crate) fn staged(&mut self) -> Result<(), StateError> {
        let mut first = Ok(());
        while !self.staging_queue().is_empty() {
            if let Err(e) = self.staged_one() {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }

    /// The connection's thread is gone.
    fn lost(&self) -> StateError {
        StateError::Shared {
            url: self.shown.clone(),
            message: "the connection to the state database was lost".into(),
        }
    }

    /// Connects to `url` (`postgres://user@host:port/db`), applying any missing
    /// migration. The password comes from the URL, `CONTACTSYNC_STATE_PASSWORD`,
    /// `password_file`, `PGPASSWORD` or `.pgpass`. TLS (rustls) is used as the URL's
    /// `sslmode` says (`prefer` by default, `require`, `disable`), verifying the server
    /// against `ca_file` (a private CA) or else the public web roots.
    pub fn open(
        url: &str,
        password_file: Option<&std::path::Path>,
        ca_file: Option<&std::path::Path>,
    ) -> Result<Self, StateError> {
        let mut state = PostgresState::connect(url, password_file, ca_file)?;
        state.migrate()?;
        state.load_dictionaries(true)?;
        Ok(state)
    }

    /// Opens the database for reading only (`contactsync serve`): every transaction of
    /// the session is read-only, and no migration is applied; a database of another
    /// schema version is refused.
    pub fn open_read_only(
        url: &str,
        password_file: Option<&std::path::Path>,
        ca_file: Option<&std::path::Path>,
    ) -> Result<Self, StateError> {
        let mut state = PostgresState::connect(url, password_file, ca_file)?;
        let version: Option<i64> = state.call(|c| {
            c.batch_execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")?;
            let exists: bool = c
                .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])?
                .get(0);
            if !exists {
                return Ok(None);
            }
            Ok(
                c.query_one("SELECT MAX(version) FROM schema_migrations", &[])?
                    .get(0),
            )
        })?;
        // The last migration only added `source_memo`, which nothing read-only reads.
        let readable = MIGRATIONS.len() as i64 - 1..=MIGRATIONS.len() as i64;
        if !version.is_some_and(|v| readable.contains(&v)) {
            return Err(StateError::Shared {
                url: state.shown.clone(),
                message: format!(
                    "schema version {}, this contactsync reads {}: run `contactsync sync` of this version once, or use a matching contactsync",
                    version.map_or("none (not a contactsync state)".into(), |v| v.to_string()),
                    MIGRATIONS.len()
                ),
            });
        }
        state.load_dictionaries(false)?;
        Ok(state)
    }

    fn connect(
        url: &str,
        password_file: Option<&std::path::Path>,
        ca_file: Option<&std::path::Path>,
    ) -> Result<Self, StateError> {
        let shown = redact(url);
        let unavailable = |message: String| StateError::Shared {
            url: shown.clone(),
            message,
        };
        let mut config: postgres::Config = url
            .parse()
            .map_err(|e: postgres::Error| unavailable(format!("not a PostgreSQL URL: {e}")))?;
        if config.get_password().is_none() {
            if let Some(p) = password_for(&config, password_file).map_err(unavailable)? {
                config.password(p);
            }
        }
        if config.get_application_name().is_none() {
            config.application_name("contactsync");
        }
        let certificates = match ca_file {
            Some(path) => contactsync_tls::read_ca_file(path).map_err(unavailable)?,
            None => Vec::new(),
        };
        let tls = contactsync_tls::client_config(&certificates).map_err(unavailable)?;
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone());
        let (jobs, queue) = mpsc::channel::<Job>();
        let (ready, connected) = mpsc::channel::<Result<(), String>>();
        let thread = std::thread::Builder::new()
            .name("state-postgres".into())
            .spawn(move || {
                let mut client = match config.connect(tls) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready.send(Err(describe(&e)));
                        return;
                    }
                };
                let _ = ready.send(Ok(()));
                while let Ok(job) = queue.recv() {
                    job(&mut client);
                }
            })
            .map_err(|e| unavailable(format!("cannot start its thread: {e}")))?;
        match connected.recv() {
            Ok(Ok(())) => {}
            Ok(Err(message)) => {
                let _ = thread.join();
                return Err(unavailable(format!("cannot connect: {message}")));
            }
            Err(_) => return Err(unavailable("the connection thread ended".into())),
        }
        Ok(PostgresState {
            jobs: Some(jobs),
            staging: Default::default(),
            thread: Some(thread),
            shown,
            worker: None,
            held: HashMap::new(),
            creates_run: None,
            held_confirm: false,
            codec: RecordCodec::default(),
        })
    }

    /// The URL, without its password.
    pub fn url(&self) -> &str {
        &self.shown
    }

    /// Runs `work` on the connection's thread and waits for it.
    fn call<R: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Client) -> Result<R, postgres::Error> + Send + 'static,
    ) -> Result<R, StateError> {
        let answered = self.submit(work)?;
        self.answer(answered)
    }

    /// Hands `work` to the connection's thread; the receiver answers with its result.
    fn submit<R: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Client) -> Result<R, postgres::Error> + Send + 'static,
    ) -> Result<mpsc::Receiver<Result<R, postgres::Error>>, StateError> {
        let (answer, answered) = mpsc::channel();
        let job: Job = Box::new(move |client| {
            let _ = answer.send(work(client));
        });
        if self.jobs.as_ref().is_none_or(|j| j.send(job).is_err()) {
            return Err(self.lost());
        }
        Ok(answered)
    }

    /// Waits for what the connection's thread answered to one [`submit`](Self::submit).
    fn answer<R>(
        &self,
        answered: mpsc::Receiver<Result<R, postgres::Error>>,
    ) -> Result<R, StateError> {
        match answered.recv() {
            Ok(result) => result.map_err(|e| StateError::Shared {
                url: self.shown.clone(),
                message: describe(&e),
            }),
            Err(_) => Err(self.lost()),
        }
    }

    fn migrate(&mut self) -> Result<(), StateError> {
        let applied = self.call(|c| {
            c.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])?;
            let result = (|| {
                c.batch_execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at TEXT NOT NULL)",
                )?;
                let current: i64 = c
                    .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", &[])?
                    .get(0);
                let mut applied = Vec::new();
                for (i, sql) in MIGRATIONS.iter().enumerate() {
                    let version = i as i64 + 1;
                    if version <= current {
                        continue;
                    }
                    let mut tx = c.transaction()?;
                    tx.batch_execute(sql)?;
                    tx.execute(
                        "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                        &[&version, &chrono::Utc::now().to_rfc3339()],
                    )?;
                    tx.commit()?;
                    applied.push(version);
                }
                Ok((current, applied))
            })();
            c.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])?;
            result
        })?;
        let (current, applied) = applied;
        if current > MIGRATIONS.len() as i64 {
            return Err(StateError::Shared {
                url: self.shown.clone(),
                message: format!(
                    "schema version {current}, this contactsync understands {}; use a matching contactsync",
                    MIGRATIONS.len()
                ),
            });
        }
        if !applied.is_empty() {
            tracing::info!(state = %self.shown, ?applied, "state schema migrated");
        }
        Ok(())
    }

    fn parse_key(&self, text: &str) -> Result<ContactKey, StateError> {
        parse_stored_key(&self.shown, text)
    }

    /// Keeps records to train the database's dictionary on; once there are enough,
    /// stores the dictionary (committed before any record uses it) and compresses from
    /// then on.
    fn learn<'a>(&mut self, contacts: impl Iterator<Item = &'a Contact>) -> Result<(), StateError> {
        let Some(dictionary) = self.codec.learn(contacts) else {
            return Ok(());
        };
        let stored = dictionary.clone();
        let id: i64 = self.call(move |c| {
            Ok(c.query_one(
                "INSERT INTO dictionaries (dictionary) VALUES ($1) RETURNING id",
                &[&stored],
            )?
            .get(0))
        })?;
        if let Err(e) = self.codec.add_dictionary(id as u64, &dictionary, true) {
            tracing::warn!("records stay uncompressed: dictionary {id} is not usable: {e}");
        }
        Ok(())
    }

    /// Learns the stored dictionaries; `current` makes the newest the one new records
    /// use.
    fn load_dictionaries(&mut self, current: bool) -> Result<(), StateError> {
        let stored: Vec<(i64, Vec<u8>)> = self.call(|c| {
            Ok(
                c.query("SELECT id, dictionary FROM dictionaries ORDER BY id", &[])?
                    .iter()
                    .map(|r| (r.get(0), r.get(1)))
                    .collect(),
            )
        })?;
        let newest = stored.last().map(|(id, _)| *id);
        for (id, dictionary) in &stored {
            let make_current = current && Some(*id) == newest;
            if make_current || !self.codec.knows(*id as u64) {
                self.codec
                    .add_dictionary(*id as u64, dictionary, make_current)
                    .map_err(|e| StateError::Shared {
                        url: self.shown.clone(),
                        message: format!("record dictionary {id}: {e}"),
                    })?;
            }
        }
        Ok(())
    }

    /// A stored record, read with the database's dictionaries: one another runner
    /// trained since this one connected is loaded first. Unreadable counts as not
    /// known ([`crate::stored_record`]).
    fn read_record(&mut self, key: &str, bytes: Option<&[u8]>) -> Option<Contact> {
        let bytes = bytes?;
        if let Err(RecordDecodeError::Dictionary(_)) = self.codec.decode(bytes) {
            if let Err(e) = self.load_dictionaries(false) {
                tracing::warn!("{e}");
            }
        }
        let codec = &mut self.codec;
        crate::stored_record_with(key, Some(bytes), |b| {
            codec.decode(b).map_err(|e| match e {
                RecordDecodeError::Dictionary(id) => {
                    format!("record dictionary {id} is not in the database")
                }
                RecordDecodeError::Unreadable(message) => message,
            })
        })
    }

    /// A synced row from its stored columns, its record read with the dictionaries.
    fn synced_row(&mut self, stored: StoredSynced) -> Result<SyncedRow, StateError> {
        let shown = self.shown.clone();
        synced_row(
            stored,
            |text| parse_stored_key(&shown, text),
            |key, bytes| self.read_record(key, bytes),
        )
    }

    /// An audit entry from its stored columns, its record read with the dictionaries.
    fn audit_entry(&mut self, stored: StoredAudit) -> AuditEntry {
        audit_entry(stored, |key, bytes| self.read_record(key, bytes))
    }

    /// A create told from a row of [`CREATED_ROWS`], as [`created_entry`] builds it.
    fn created_entry(
        &mut self,
        (stored, pipeline, run, at, values): StoredCreated,
    ) -> Result<AuditEntry, StateError> {
        let row = self.synced_row(stored)?;
        Ok(created_entry(pipeline, run, at, values, row))
    }
}

/// The people whose create is told from their run's one entry, with it: [`created_row`]'s
/// columns; a caller adds `AND …` over `s`.
const CREATED_ROWS: &str = "SELECT s.key, s.content_hash, s.email, s.handle, s.record, s.pipeline, c.run, c.at, c.values_kept
     FROM synced s JOIN creates c ON c.pipeline = s.pipeline AND c.run = s.created_run
     WHERE s.created_run IS NOT NULL";

/// A row of [`CREATED_ROWS`]: the person's synced row, their pipeline, and the run's
/// number, time and whether it kept values.
type StoredCreated = (StoredSynced, String, i64, i64, bool);

fn created_columns(r: &postgres::Row) -> StoredCreated {
    (
        (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)),
        r.get(5),
        r.get(6),
        r.get(7),
        r.get(8),
    )
}

/// Writes audit entries, one statement over arrays, in the caller's transaction;
/// `created[i]` is `entries[i]`'s record as stored.
fn insert_audit(
    tx: &mut postgres::Transaction<'_>,
    entries: &[AuditEntry],
    created: &[Option<Vec<u8>>],
) -> Result<u64, postgres::Error> {
    if entries.is_empty() {
        return Ok(0);
    }
    let pipeline: Vec<&str> = entries.iter().map(|e| e.pipeline.as_str()).collect();
    let run: Vec<i64> = entries.iter().map(|e| e.run).collect();
    let at: Vec<i64> = entries.iter().map(|e| e.at).collect();
    let key: Vec<&str> = entries.iter().map(|e| e.key.as_str()).collect();
    let email: Vec<Option<&str>> = entries.iter().map(|e| e.email.as_deref()).collect();
    let kind: Vec<&str> = entries.iter().map(|e| e.kind.as_str()).collect();
    let outcome: Vec<&str> = entries.iter().map(|e| e.outcome.as_str()).collect();
    let reason: Vec<Option<&str>> = entries.iter().map(|e| e.reason.as_deref()).collect();
    let fields: Vec<&str> = entries.iter().map(|e| e.fields.as_str()).collect();
    tx.execute(
        "INSERT INTO audit (pipeline, run, at, key, email, kind, outcome, reason, fields, created)
         SELECT * FROM UNNEST($1::TEXT[], $2::BIGINT[], $3::BIGINT[], $4::TEXT[], $5::TEXT[],
           $6::TEXT[], $7::TEXT[], $8::TEXT[], $9::TEXT[], $10::BYTEA[])",
        &[
            &pipeline, &run, &at, &key, &email, &kind, &outcome, &reason, &fields, &created,
        ],
    )
}

/// A key as stored, parsed; the error names the database.
fn parse_stored_key(shown: &str, text: &str) -> Result<ContactKey, StateError> {
    text.parse().map_err(|message| StateError::Shared {
        url: shown.to_string(),
        message: format!("a stored key: {message}"),
    })
}

/// A `postgres::Error` in a sentence: the server's message when there is one.
fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            text
        }
    }
}

impl Drop for PostgresState {
    /// Closing the connection releases every advisory lock it holds.
    fn drop(&mut self) {
        let mut holders: Vec<String> = self.held.values().map(|h| h.token.clone()).collect();
        holders.dedup();
        for token in holders {
            let _ = self.call(move |c| {
                c.execute("DELETE FROM locks WHERE token = $1", &[&token])
                    .map(|_| ())
            });
        }
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Who the `locks` table names as the holder of lock `name`, if anyone.
fn named_holder(c: &mut Client, name: &str) -> Result<Option<LockHolder>, postgres::Error> {
    Ok(c.query_opt(
        "SELECT token, pid, host, pipeline, since FROM locks WHERE name = $1",
        &[&name],
    )?
    .map(|r| LockHolder {
        token: r.get(0),
        pid: r.get::<_, i64>(1) as u32,
        host: r.get(2),
        pipeline: r.get(3),
        since: r.get(4),
    }))
}

/// A run as `SELECT pipeline, run, started_at, finished_at, status, report FROM runs`
/// returns it.
fn run_record(r: &postgres::Row) -> RunRecord {
    RunRecord {
        pipeline: r.get(0),
        run: r.get(1),
        started_at: r.get(2),
        finished_at: r.get(3),
        status: r.get(4),
        report: r.get(5),
    }
}

/// A reject as `SELECT … stage, origin, key, email, field, reason FROM rejects`
/// returns it, its columns from `first` on.
fn reject_row(r: &postgres::Row, first: usize) -> crate::RejectRow {
    crate::RejectRow {
        stage: r.get(first),
        origin: r.get(first + 1),
        key: r.get(first + 2),
        email: r.get(first + 3),
        field: r.get(first + 4),
        reason: r.get(first + 5),
    }
}

/// An audit row's columns, as `SELECT {AUDIT_COLUMNS}` returns them.
fn audit_columns(r: &postgres::Row) -> StoredAudit {
    (
        r.get(0),
        r.get(1),
        r.get(2),
        r.get(3),
        r.get(4),
        r.get(5),
        r.get(6),
        r.get(7),
        r.get(8),
        r.get(9),
    )
}
