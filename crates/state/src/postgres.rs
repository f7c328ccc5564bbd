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
    audit_entry, from_sql, group_pending, synced_row, to_sql, with_created_fields, AuditEntry,
    LockAttempt, LockHolder, PendingRow, PipelineSummary, RunRecord, Settlement, StateError,
    StateItem, StateStore, StoredAudit, StoredSynced, SyncedRow, AUDIT_COLUMNS,
};
use crate::redact;

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
];

/// The advisory lock key that serialises migrations.
const MIGRATION_LOCK: i64 = 0x636f_6e74_6163_7473; // "contacts"

type Job = Box<dyn FnOnce(&mut Client) + Send>;

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
            .map(|r| r.record.as_ref().map(crate::record::encode))
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
        let mut state = PostgresState {
            jobs: Some(jobs),
            thread: Some(thread),
            shown,
            worker: None,
            held: HashMap::new(),
        };
        state.migrate()?;
        Ok(state)
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
        let (answer, answered) = mpsc::channel();
        let job: Job = Box::new(move |client| {
            let _ = answer.send(work(client));
        });
        let sent = self
            .jobs
            .as_ref()
            .map(|j| j.send(job).is_ok())
            .unwrap_or(false);
        let lost = || StateError::Shared {
            url: self.shown.clone(),
            message: "the connection to the state database was lost".into(),
        };
        if !sent {
            return Err(lost());
        }
        match answered.recv() {
            Ok(result) => result.map_err(|e| StateError::Shared {
                url: self.shown.clone(),
                message: describe(&e),
            }),
            Err(_) => Err(lost()),
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
        text.parse().map_err(|message| StateError::Shared {
            url: self.shown.clone(),
            message: format!("a stored key: {message}"),
        })
    }
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

impl StateStore for PostgresState {
    fn lock(&mut self, names: &[String], holder: &LockHolder) -> Result<LockAttempt, StateError> {
        for name in names {
            if let Some(other) = self.held.get(&lock_key(name)) {
                if other.token != holder.token {
                    return Ok(LockAttempt::Busy {
                        name: name.clone(),
                        holder: other.clone(),
                    });
                }
            }
        }
        let names = names.to_vec();
        let holder_owned = holder.clone();
        let already: Vec<i64> = self
            .held
            .iter()
            .filter(|(_, h)| h.token == holder.token)
            .map(|(k, _)| *k)
            .collect();
        let outcome = self.call(move |c| {
            let mut taken: Vec<i64> = Vec::new();
            for name in &names {
                let key = lock_key(name);
                if already.contains(&key) {
                    continue;
                }
                let got: bool = c
                    .query_one("SELECT pg_try_advisory_lock($1)", &[&key])?
                    .get(0);
                if !got {
                    for k in &taken {
                        c.execute("SELECT pg_advisory_unlock($1)", &[k])?;
                    }
                    let other = match named_holder(c, name)? {
                        Some(holder) => holder,
                        None => LockHolder {
                            token: String::new(),
                            pid: 0,
                            host: "(another runner)".into(),
                            pipeline: String::new(),
                            since: String::new(),
                        },
                    };
                    return Ok(Err((name.clone(), other)));
                }
                taken.push(key);
            }
            // Ours now: whoever the table still names died without cleaning up.
            let mut taken_over = Vec::new();
            for name in &names {
                if let Some(other) = named_holder(c, name)? {
                    if other.token != holder_owned.token {
                        taken_over.push((name.clone(), other));
                    }
                }
                c.execute(
                    "INSERT INTO locks (name, token, pid, host, pipeline, since) VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (name) DO UPDATE SET token = excluded.token, pid = excluded.pid,
                       host = excluded.host, pipeline = excluded.pipeline, since = excluded.since",
                    &[
                        name,
                        &holder_owned.token,
                        &i64::from(holder_owned.pid),
                        &holder_owned.host,
                        &holder_owned.pipeline,
                        &holder_owned.since,
                    ],
                )?;
            }
            Ok(Ok((taken, taken_over)))
        })?;
        match outcome {
            Err((name, holder)) => Ok(LockAttempt::Busy { name, holder }),
            Ok((taken, taken_over)) => {
                for key in taken {
                    self.held.insert(key, holder.clone());
                }
                Ok(LockAttempt::Acquired { taken_over })
            }
        }
    }

    fn unlock(&mut self, holder: &LockHolder) -> Result<(), StateError> {
        let keys: Vec<i64> = self
            .held
            .iter()
            .filter(|(_, h)| h.token == holder.token)
            .map(|(k, _)| *k)
            .collect();
        for k in &keys {
            self.held.remove(k);
        }
        let token = holder.token.clone();
        self.call(move |c| {
            c.execute("DELETE FROM locks WHERE token = $1", &[&token])?;
            for k in &keys {
                c.execute("SELECT pg_advisory_unlock($1)", &[k])?;
            }
            Ok(())
        })
    }

    fn begin_run(&mut self, pipeline: &str) -> Result<(i64, Option<i64>), StateError> {
        let pipeline = pipeline.to_string();
        self.call(move |c| {
            let mut tx = c.transaction()?;
            let row = tx.query_one(
                "INSERT INTO pipelines (name, runs) VALUES ($1, 1)
                 ON CONFLICT (name) DO UPDATE SET runs = pipelines.runs + 1
                 RETURNING runs, last_full_run",
                &[&pipeline],
            )?;
            let run: i64 = row.get(0);
            let last_full: Option<i64> = row.get(1);
            tx.execute(
                "INSERT INTO runs (pipeline, run, started_at) VALUES ($1, $2, $3)
                 ON CONFLICT (pipeline, run) DO UPDATE SET started_at = excluded.started_at,
                   finished_at = NULL, status = NULL, report = NULL",
                &[&pipeline, &run, &chrono::Utc::now().to_rfc3339()],
            )?;
            tx.commit()?;
            Ok((run, last_full))
        })
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
        let (pipeline, status, report) =
            (pipeline.to_string(), status.to_string(), report.to_string());
        let cursor = cursor.map(str::to_string);
        self.call(move |c| {
            let mut tx = c.transaction()?;
            tx.execute(
                "UPDATE runs SET finished_at = $3, status = $4, report = $5 WHERE pipeline = $1 AND run = $2",
                &[&pipeline, &run, &chrono::Utc::now().to_rfc3339(), &status, &report],
            )?;
            if let Some(cursor) = &cursor {
                tx.execute(
                    "UPDATE pipelines SET cursor = $2 WHERE name = $1",
                    &[&pipeline, cursor],
                )?;
            }
            if full_read {
                tx.execute(
                    "UPDATE pipelines SET last_full_run = $2 WHERE name = $1",
                    &[&pipeline, &run],
                )?;
            }
            tx.commit()
        })
    }

    fn cursor(&mut self, pipeline: &str) -> Result<Option<String>, StateError> {
        let pipeline = pipeline.to_string();
        self.call(move |c| {
            Ok(
                c.query_opt("SELECT cursor FROM pipelines WHERE name = $1", &[&pipeline])?
                    .and_then(|r| r.get::<_, Option<String>>(0)),
            )
        })
    }

    fn scan_index(
        &mut self,
        pipeline: &str,
        visit: &mut dyn FnMut(u64, u64),
    ) -> Result<(), StateError> {
        // Streamed in chunks from the connection's thread, so memory stays bounded.
        let pipeline = pipeline.to_string();
        let (chunks, received) = mpsc::sync_channel::<Vec<(i64, i64)>>(4);
        let (answer, answered) = mpsc::channel::<Result<(), postgres::Error>>();
        let job: Job = Box::new(move |c| {
            let result = (|| {
                let mut tx = c.transaction()?;
                let portal = tx.bind(
                    "SELECT key_hash, content_hash FROM synced WHERE pipeline = $1",
                    &[&pipeline],
                )?;
                loop {
                    let rows = tx.query_portal(&portal, 10_000)?;
                    if rows.is_empty() {
                        break;
                    }
                    let chunk = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
                    if chunks.send(chunk).is_err() {
                        break;
                    }
                }
                tx.commit()
            })();
            drop(chunks);
            let _ = answer.send(result);
        });
        let lost = || StateError::Shared {
            url: self.shown.clone(),
            message: "the connection to the state database was lost".into(),
        };
        if !self
            .jobs
            .as_ref()
            .map(|j| j.send(job).is_ok())
            .unwrap_or(false)
        {
            return Err(lost());
        }
        for chunk in received {
            for (key_hash, content_hash) in chunk {
                visit(from_sql(key_hash), from_sql(content_hash));
            }
        }
        match answered.recv() {
            Ok(result) => result.map_err(|e| StateError::Shared {
                url: self.shown.clone(),
                message: describe(&e),
            }),
            Err(_) => Err(lost()),
        }
    }

    fn synced(&mut self, pipeline: &str, key_hash: u64) -> Result<Option<SyncedRow>, StateError> {
        let pipeline = pipeline.to_string();
        let row: Option<StoredSynced> = self.call(move |c| {
            Ok(c.query_opt(
                "SELECT key, content_hash, email, handle, record FROM synced WHERE pipeline = $1 AND key_hash = $2",
                &[&pipeline, &to_sql(key_hash)],
            )?
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))))
        })?;
        row.map(|stored| synced_row(stored, |text| self.parse_key(text)))
            .transpose()
    }

    fn synced_many(
        &mut self,
        pipeline: &str,
        key_hashes: &[u64],
    ) -> Result<Vec<Option<SyncedRow>>, StateError> {
        if key_hashes.is_empty() {
            return Ok(Vec::new());
        }
        let pipeline = pipeline.to_string();
        let hashes: Vec<i64> = key_hashes.iter().map(|&h| to_sql(h)).collect();
        let rows: Vec<(i64, StoredSynced)> = self.call(move |c| {
            Ok(c.query(
                "SELECT key_hash, key, content_hash, email, handle, record FROM synced
                 WHERE pipeline = $1 AND key_hash = ANY($2)",
                &[&pipeline, &hashes],
            )?
            .into_iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3), r.get(4), r.get(5))))
            .collect())
        })?;
        let mut found: HashMap<u64, SyncedRow> = HashMap::with_capacity(rows.len());
        for (hash, stored) in rows {
            found.insert(
                from_sql(hash),
                synced_row(stored, |text| self.parse_key(text))?,
            );
        }
        Ok(key_hashes.iter().map(|h| found.get(h).cloned()).collect())
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
        type Row = super::StoredPending;
        let pipeline = pipeline.to_string();
        let rows: Vec<Row> = self.call(move |c| {
            Ok(c.query(
                "SELECT batch_id, key, kind, email, content_hash, record FROM pending WHERE pipeline = $1 ORDER BY run, batch_id, seq",
                &[&pipeline],
            )?
            .iter()
            .map(|r| {
                let key: String = r.get(1);
                let bytes: Option<Vec<u8>> = r.get(5);
                let record = super::stored_record(&key, bytes.as_deref());
                (r.get(0), key, r.get(2), r.get(3), r.get(4), record)
            })
            .collect())
        })?;
        group_pending(
            rows,
            |text| self.parse_key(text),
            |kind| StateError::Shared {
                url: self.shown.clone(),
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
        // Four sets of rows, each written by one statement over arrays.
        let mut up_hash = Vec::new();
        let mut up_key = Vec::new();
        let mut up_content = Vec::new();
        let mut up_email: Vec<Option<String>> = Vec::new();
        let mut up_handle: Vec<Option<String>> = Vec::new();
        let mut up_record: Vec<Option<Vec<u8>>> = Vec::new();
        let mut forget: Vec<i64> = Vec::new();
        let mut unpend: Vec<String> = Vec::new();
        let mut mark_key: Vec<String> = Vec::new();
        let mut mark_handle: Vec<Option<String>> = Vec::new();
        for settlement in settlements {
            match settlement {
                Settlement::Synced { key, entry } => {
                    up_hash.push(to_sql(key.hash64()));
                    up_key.push(key.to_string());
                    up_content.push(to_sql(entry.content_hash));
                    up_email.push(entry.email.clone());
                    up_handle.push(entry.handle.clone());
                    up_record.push(entry.record.as_deref().map(crate::record::encode));
                    unpend.push(key.to_string());
                }
                Settlement::Forgotten { key } => {
                    forget.push(to_sql(key.hash64()));
                    unpend.push(key.to_string());
                }
                Settlement::Dropped { key } => unpend.push(key.to_string()),
                Settlement::AwaitingFinish { key, handle } => {
                    mark_key.push(key.to_string());
                    mark_handle.push(handle.clone());
                }
            }
        }
        let pipeline = pipeline.to_string();
        let batch_id = batch_id.to_string();
        let collision = self.call(move |c| {
            let mut tx = c.transaction()?;
            if !up_hash.is_empty() {
                // A key hash already held by another key is not overwritten; the
                // rows that were not written name the collision.
                let written = tx.query(
                    "INSERT INTO synced (pipeline, key_hash, key, content_hash, email, handle, record)
                     SELECT $1, h, k, ch, e, hd, r
                     FROM UNNEST($2::BIGINT[], $3::TEXT[], $4::BIGINT[], $5::TEXT[], $6::TEXT[], $7::BYTEA[])
                       AS u(h, k, ch, e, hd, r)
                     ON CONFLICT (pipeline, key_hash) DO UPDATE SET content_hash = excluded.content_hash,
                       email = excluded.email, handle = COALESCE(excluded.handle, synced.handle),
                       record = COALESCE(excluded.record, synced.record)
                     WHERE synced.key = excluded.key
                     RETURNING key",
                    &[&pipeline, &up_hash, &up_key, &up_content, &up_email, &up_handle, &up_record],
                )?;
                if written.len() < up_key.len() {
                    let done: std::collections::HashSet<String> =
                        written.iter().map(|r| r.get::<_, String>(0)).collect();
                    if let Some((i, new)) = up_key.iter().enumerate().find(|(_, k)| !done.contains(*k)) {
                        let existing: String = tx
                            .query_one(
                                "SELECT key FROM synced WHERE pipeline = $1 AND key_hash = $2",
                                &[&pipeline, &up_hash[i]],
                            )?
                            .get(0);
                        return Ok(Some((existing, new.clone())));
                    }
                }
            }
            if !forget.is_empty() {
                tx.execute(
                    "DELETE FROM synced WHERE pipeline = $1 AND key_hash = ANY($2)",
                    &[&pipeline, &forget],
                )?;
            }
            if !unpend.is_empty() {
                tx.execute(
                    "DELETE FROM pending WHERE pipeline = $1 AND batch_id = $2 AND key = ANY($3)",
                    &[&pipeline, &batch_id, &unpend],
                )?;
            }
            if !mark_key.is_empty() {
                tx.execute(
                    "UPDATE pending p SET applied = TRUE, handle = u.hd
                     FROM UNNEST($3::TEXT[], $4::TEXT[]) AS u(k, hd)
                     WHERE p.pipeline = $1 AND p.batch_id = $2 AND p.key = u.k",
                    &[&pipeline, &batch_id, &mark_key, &mark_handle],
                )?;
            }
            tx.commit()?;
            Ok(None)
        })?;
        match collision {
            Some((existing, new)) => Err(StateError::KeyCollision { existing, new }),
            None => Ok(()),
        }
    }

    fn confirm_finished(&mut self, pipeline: &str, run: i64) -> Result<u64, StateError> {
        let pipeline = pipeline.to_string();
        self.call(move |c| {
            let mut tx = c.transaction()?;
            let removed = tx.execute(
                "DELETE FROM synced WHERE pipeline = $1 AND key_hash IN
                   (SELECT key_hash FROM pending WHERE pipeline = $1 AND run = $2 AND applied AND kind = 'remove')",
                &[&pipeline, &run],
            )?;
            let upserted = tx.execute(
                "INSERT INTO synced (pipeline, key_hash, key, content_hash, email, handle, record)
                   SELECT pipeline, key_hash, key, content_hash, email, handle, record FROM pending
                   WHERE pipeline = $1 AND run = $2 AND applied AND kind <> 'remove'
                 ON CONFLICT (pipeline, key_hash) DO UPDATE SET content_hash = excluded.content_hash,
                   email = excluded.email, handle = COALESCE(excluded.handle, synced.handle),
                   record = COALESCE(excluded.record, synced.record)",
                &[&pipeline, &run],
            )?;
            tx.execute(
                "DELETE FROM pending WHERE pipeline = $1 AND run = $2 AND applied",
                &[&pipeline, &run],
            )?;
            tx.commit()?;
            Ok(removed + upserted)
        })
    }

    fn drop_pending(&mut self, pipeline: &str, batch_id: &str) -> Result<(), StateError> {
        let (pipeline, batch_id) = (pipeline.to_string(), batch_id.to_string());
        self.call(move |c| {
            c.execute(
                "DELETE FROM pending WHERE pipeline = $1 AND batch_id = $2",
                &[&pipeline, &batch_id],
            )
            .map(|_| ())
        })
    }

    fn sink_store<'a>(&'a mut self, scope: &str) -> Box<dyn SinkStore + 'a> {
        Box::new(PostgresSinkStore {
            state: self,
            scope: scope.to_string(),
        })
    }

    fn summaries(&mut self) -> Result<Vec<PipelineSummary>, StateError> {
        self.call(|c| {
            Ok(c.query(
                "SELECT p.name, p.runs, p.cursor,
                   (SELECT COUNT(*) FROM synced s WHERE s.pipeline = p.name),
                   (SELECT COUNT(*) FROM pending q WHERE q.pipeline = p.name),
                   (SELECT finished_at || ' ' || status FROM runs r WHERE r.pipeline = p.name AND finished_at IS NOT NULL ORDER BY run DESC LIMIT 1)
                 FROM pipelines p ORDER BY p.name",
                &[],
            )?
            .iter()
            .map(|r| PipelineSummary {
                pipeline: r.get(0),
                runs: r.get::<_, i64>(1) as u64,
                cursor: r.get(2),
                synced: r.get::<_, i64>(3) as u64,
                pending: r.get::<_, i64>(4) as u64,
                last_run: r.get(5),
            })
            .collect())
        })
    }

    fn runs(&mut self, pipeline: Option<&str>, last: usize) -> Result<Vec<RunRecord>, StateError> {
        let pipeline = pipeline.map(str::to_string);
        self.call(move |c| {
            Ok(c.query(
                "SELECT pipeline, run, started_at, finished_at, status, report FROM runs
                 WHERE $1::TEXT IS NULL OR pipeline = $1 ORDER BY started_at DESC, run DESC LIMIT $2",
                &[&pipeline, &(last as i64)],
            )?
            .iter()
            .map(|r| RunRecord {
                pipeline: r.get(0),
                run: r.get(1),
                started_at: r.get(2),
                finished_at: r.get(3),
                status: r.get(4),
                report: r.get(5),
            })
            .collect())
        })
    }

    fn record_audit(&mut self, entries: &[AuditEntry]) -> Result<(), StateError> {
        if entries.is_empty() {
            return Ok(());
        }
        let pipeline: Vec<String> = entries.iter().map(|e| e.pipeline.clone()).collect();
        let run: Vec<i64> = entries.iter().map(|e| e.run).collect();
        let at: Vec<i64> = entries.iter().map(|e| e.at).collect();
        let key: Vec<String> = entries.iter().map(|e| e.key.clone()).collect();
        let email: Vec<Option<String>> = entries.iter().map(|e| e.email.clone()).collect();
        let kind: Vec<String> = entries.iter().map(|e| e.kind.clone()).collect();
        let outcome: Vec<String> = entries.iter().map(|e| e.outcome.clone()).collect();
        let reason: Vec<Option<String>> = entries.iter().map(|e| e.reason.clone()).collect();
        let fields: Vec<String> = entries.iter().map(|e| e.fields.clone()).collect();
        let created: Vec<Option<Vec<u8>>> = entries
            .iter()
            .map(|e| e.created.as_deref().map(crate::record::encode))
            .collect();
        self.call(move |c| {
            c.execute(
                "INSERT INTO audit (pipeline, run, at, key, email, kind, outcome, reason, fields, created)
                 SELECT * FROM UNNEST($1::TEXT[], $2::BIGINT[], $3::BIGINT[], $4::TEXT[], $5::TEXT[],
                   $6::TEXT[], $7::TEXT[], $8::TEXT[], $9::TEXT[], $10::BYTEA[])",
                &[&pipeline, &run, &at, &key, &email, &kind, &outcome, &reason, &fields, &created],
            )
            .map(|_| ())
        })
    }

    fn prune_audit(&mut self, pipeline: &str, before: i64) -> Result<u64, StateError> {
        let pipeline = pipeline.to_string();
        self.call(move |c| {
            c.execute(
                "DELETE FROM audit WHERE pipeline = $1 AND at < $2",
                &[&pipeline, &before],
            )
        })
    }

    fn history(&mut self, who: &str) -> Result<Vec<AuditEntry>, StateError> {
        let who = who.trim().to_string();
        let email = Contact::normalize_email(&who).unwrap_or_default();
        let rows: Vec<StoredAudit> = self.call(move |c| {
            Ok(c.query(
                &format!(
                    "SELECT {AUDIT_COLUMNS} FROM audit
                     WHERE key = $1 OR key = 'external_id:' || $1 OR key = 'email:' || $2
                        OR lower(email) = lower($2)
                     ORDER BY at, id"
                ),
                &[&who, &email],
            )?
            .iter()
            .map(audit_columns)
            .collect())
        })?;
        Ok(rows
            .into_iter()
            .map(|row| with_created_fields(audit_entry(row)))
            .collect())
    }

    fn reset(&mut self, pipeline: &str) -> Result<(), StateError> {
        let pipeline = pipeline.to_string();
        self.call(move |c| {
            let mut tx = c.transaction()?;
            for table in ["synced", "pending", "runs", "audit"] {
                tx.execute(
                    &format!("DELETE FROM {table} WHERE pipeline = $1"),
                    &[&pipeline],
                )?;
            }
            tx.execute("DELETE FROM pipelines WHERE name = $1", &[&pipeline])?;
            tx.commit()
        })
    }

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
                let row = synced_row((key, content_hash, email, handle, record), |text| {
                    self.parse_key(text)
                })?;
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
            visit(StateItem::Audit(audit_entry(row)))?;
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
        Ok(())
    }

    fn claim_slot(&mut self, slot: &str, pipeline: &str, worker: &str) -> Result<bool, StateError> {
        // A worker holds an advisory lock of its own name while it lives: a claim whose
        // worker's lock is free was left by a worker that died, and is taken over.
        if self.worker.as_deref() != Some(worker) {
            let key = lock_key(&format!("worker:{worker}"));
            let got = self.call(move |c| {
                Ok(c.query_one("SELECT pg_try_advisory_lock($1)", &[&key])?
                    .get::<_, bool>(0))
            })?;
            if !got {
                return Err(StateError::Shared {
                    url: self.shown.clone(),
                    message: format!("another live worker calls itself {worker:?}"),
                });
            }
            self.worker = Some(worker.to_string());
        }
        let (slot, pipeline, worker) = (slot.to_string(), pipeline.to_string(), worker.to_string());
        self.call(move |c| {
            let mut tx = c.transaction()?;
            let inserted = tx.execute(
                "INSERT INTO slots (slot, pipeline, worker, status, claimed_at) VALUES ($1, $2, $3, 'claimed', $4)
                 ON CONFLICT (slot, pipeline) DO NOTHING",
                &[&slot, &pipeline, &worker, &chrono::Utc::now().to_rfc3339()],
            )?;
            if inserted == 1 {
                tx.commit()?;
                return Ok(true);
            }
            let row = tx.query_one(
                "SELECT worker, status FROM slots WHERE slot = $1 AND pipeline = $2 FOR UPDATE",
                &[&slot, &pipeline],
            )?;
            let (other, status): (String, String) = (row.get(0), row.get(1));
            if status != "claimed" {
                tx.commit()?;
                return Ok(false);
            }
            let alive = other != worker && {
                let key = lock_key(&format!("worker:{other}"));
                let free: bool = tx
                    .query_one("SELECT pg_try_advisory_lock($1)", &[&key])?
                    .get(0);
                if free {
                    tx.execute("SELECT pg_advisory_unlock($1)", &[&key])?;
                }
                !free
            };
            if alive {
                tx.commit()?;
                return Ok(false);
            }
            tx.execute(
                "UPDATE slots SET worker = $3, claimed_at = $4 WHERE slot = $1 AND pipeline = $2",
                &[&slot, &pipeline, &worker, &chrono::Utc::now().to_rfc3339()],
            )?;
            tx.commit()?;
            Ok(true)
        })
    }

    fn finish_slot(&mut self, slot: &str, pipeline: &str, status: &str) -> Result<(), StateError> {
        let (slot, pipeline, status) = (slot.to_string(), pipeline.to_string(), status.to_string());
        self.call(move |c| {
            c.execute(
                "UPDATE slots SET status = $3, finished_at = $4 WHERE slot = $1 AND pipeline = $2",
                &[&slot, &pipeline, &status, &chrono::Utc::now().to_rfc3339()],
            )
            .map(|_| ())
        })
    }

    fn import(&mut self, items: &[StateItem]) -> Result<(), StateError> {
        // Per pipeline: the rows, each with its record encoded.
        type Encoded = Vec<(SyncedRow, Option<Vec<u8>>)>;
        let mut synced: HashMap<String, Encoded> = HashMap::new();
        let mut rest = Vec::new();
        let mut audit = Vec::new();
        for item in items {
            match item {
                StateItem::Synced { pipeline, row } => {
                    synced.entry(pipeline.clone()).or_default().push((
                        row.clone(),
                        row.entry.record.as_deref().map(crate::record::encode),
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

/// The sink's key-value space, written through at once.
struct PostgresSinkStore<'a> {
    state: &'a PostgresState,
    scope: String,
}

fn store_error(e: StateError) -> ConnectorError {
    ConnectorError::Other(format!("sink store in the state database: {e}"))
}

impl SinkStore for PostgresSinkStore<'_> {
    fn get(&self, key: &str) -> Result<Option<String>, ConnectorError> {
        let (scope, key) = (self.scope.clone(), key.to_string());
        self.state
            .call(move |c| {
                Ok(c.query_opt(
                    "SELECT value FROM sink_data WHERE scope = $1 AND key = $2",
                    &[&scope, &key],
                )?
                .map(|r| r.get(0)))
            })
            .map_err(store_error)
    }

    fn put(&mut self, key: &str, value: &str) -> Result<(), ConnectorError> {
        let (scope, key, value) = (self.scope.clone(), key.to_string(), value.to_string());
        self.state
            .call(move |c| {
                c.execute(
                    "INSERT INTO sink_data (scope, key, value) VALUES ($1, $2, $3)
                     ON CONFLICT (scope, key) DO UPDATE SET value = excluded.value",
                    &[&scope, &key, &value],
                )
                .map(|_| ())
            })
            .map_err(store_error)
    }

    fn remove(&mut self, key: &str) -> Result<(), ConnectorError> {
        let (scope, key) = (self.scope.clone(), key.to_string());
        self.state
            .call(move |c| {
                c.execute(
                    "DELETE FROM sink_data WHERE scope = $1 AND key = $2",
                    &[&scope, &key],
                )
                .map(|_| ())
            })
            .map_err(store_error)
    }
}
