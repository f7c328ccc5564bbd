use super::*;
use crate::roles::*;

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
    assert_eq!(schema_version(&state), SCHEMA_VERSION);
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

/// The schema version the file says it has.
fn schema_version(state: &SqliteState) -> String {
    state
        .conn
        .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
            r.get(0)
        })
        .unwrap()
}

/// `n` people created, as pending rows.
fn creates(n: u64) -> Vec<PendingRow> {
    crate::conformance::created_people(n)
}

/// Each of `rows` applied, awaiting the sink's finish.
fn awaiting(rows: &[PendingRow]) -> Vec<Settlement> {
    rows.iter()
        .map(|r| Settlement::AwaitingFinish {
            key: r.key.clone(),
            handle: None,
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
                   handle TEXT, email_hash INTEGER, PRIMARY KEY (pipeline, batch_id, seq));
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
        state.settle("p", &id, &awaiting(batch)).unwrap();
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
        let settlements: Vec<Settlement> = batch.iter().map(|r| r.clone().applied(None)).collect();
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

#[test]
fn committed_transactions_are_counted() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut state = SqliteState::open(&dir.path().join("state.db")).unwrap();
    let before = state.transactions_committed().expect("SQLite counts them");
    state.begin_run("csv->csv").unwrap();
    let after_one = state.transactions_committed().unwrap();
    assert!(after_one > before, "{before} -> {after_one}");
    state.cursor("csv->csv").unwrap();
    assert_eq!(
        state.transactions_committed().unwrap(),
        after_one,
        "a read commits nothing"
    );
}

/// A run that keeps its creates as one entry (a first sync writes each person once):
/// its audit holds no row for a person created and never changed. (That the history
/// it tells is the same is a part of the conformance suite.)
#[test]
fn creates_kept_as_one_entry_a_run_leave_no_row_a_person_unchanged() {
    for values in [true, false] {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut kept = SqliteState::open(&dir.path().join("kept.db")).unwrap();
        let mut each = SqliteState::open(&dir.path().join("each.db")).unwrap();
        crate::conformance::play_three_runs(&mut kept, true, values).unwrap();
        crate::conformance::play_three_runs(&mut each, false, values).unwrap();
        let rows = |state: &SqliteState| -> i64 {
            state
                .conn
                .query_row("SELECT COUNT(*) FROM audit", [], |r| r.get(0))
                .unwrap()
        };
        // The second E3 has no row of its own; E2, E3 and E4 were written out when
        // they changed, and E1 on each of the two nights its update was refused (one
        // row more than its create in `each`).
        assert_eq!(rows(&each) - rows(&kept), 0, "values kept: {values}");
    }
}

/// A state of schema 3 gains the creates of schema 4 on open, its rows as they were.
#[test]
fn a_state_of_schema_3_gains_the_creates_table_and_keeps_its_rows() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("state.db");
    {
        let mut state = SqliteState::open(&path).unwrap();
        let (run, _) = state.begin_run("p").unwrap();
        let rows = creates(3);
        state.record_pending("p", run, "b1", &rows).unwrap();
        let settlements: Vec<Settlement> = rows.iter().map(|r| r.clone().applied(None)).collect();
        state.settle("p", "b1", &settlements).unwrap();
        state
            .conn
            .execute_batch(
                "ALTER TABLE synced DROP COLUMN created_run; DROP TABLE creates;
                 UPDATE meta SET value = '3' WHERE key = 'schema';",
            )
            .unwrap();
    }
    let mut state = SqliteState::open(&path).unwrap();
    assert_eq!(schema_version(&state), SCHEMA_VERSION);
    assert_eq!(state.summaries().unwrap()[0].synced, 3);
    let (run, _) = state.begin_run("p").unwrap();
    assert!(state.record_created_run("p", run, 1, true).unwrap());
}

/// `contactsync serve` reads a state beside a run that writes it, and never writes.
#[test]
fn a_state_opened_read_only_reads_beside_a_writer_and_refuses_to_write() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("state.db");
    assert!(
        SqliteState::open_read_only(&path)
            .is_err_and(|e| e.to_string().contains("run `contactsync sync` first")),
        "a missing state is not created"
    );
    assert!(!path.exists());
    let mut writer = SqliteState::open(&path).expect("open");
    let (run, _) = writer.begin_run("a->b").expect("run");
    let mut reader = SqliteState::open_read_only(&path).expect("read-only");
    writer
        .finish_run("a->b", run, "synced", "{}", None, false)
        .expect("the writer is not blocked by the reader");
    let runs = reader.run_page("a->b", None, 10).expect("runs");
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].status.as_deref(), Some("synced"));
    assert!(
        reader.begin_run("a->b").is_err(),
        "a read-only store cannot write"
    );
}

/// `history EMAIL` (and the dashboard's person search) finds a person through the
/// indexes, not by reading every record: on a million people that is the difference
/// between a millisecond and a second.
#[test]
fn history_reads_a_person_through_the_indexes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut state = SqliteState::open(&dir.path().join("state.db")).unwrap();
    crate::conformance::play_three_runs(&mut state, true, true).unwrap();
    let plan = |sql: &str| -> String {
        let mut stmt = state
            .conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap();
        let rows: Vec<String> = stmt
            .query_map(params![1, 2, 3, 4], |r| r.get::<_, String>(3))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        rows.join("; ")
    };
    let created = plan(&creates::created_rows_sql(store::HISTORY_CREATED));
    assert!(
        created.contains("synced_email") && !created.contains("SCAN s"),
        "{created}"
    );
    let audit = plan(&format!(
        "SELECT a.rowid FROM audit a {}",
        store::HISTORY_AUDIT
    ));
    assert!(
        audit.contains("audit_key") && audit.contains("audit_email"),
        "{audit}"
    );
    // The people play_three_runs made are found by key, external id and email.
    for who in ["E1", "external_id:E1", "e1@example.com", "E1@Example.COM"] {
        // (An email key in other case is found by the email's hash too.)
        let found = state.history(who).unwrap();
        assert!(!found.is_empty(), "{who}");
        assert!(
            found.iter().all(|e| e.key == "external_id:E1"),
            "{who}: {found:?}"
        );
    }
}

/// A state of schema 4 gains the indexes, its people's email hashes filled in on open.
#[test]
fn a_state_of_schema_4_is_indexed_on_open() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("state.db");
    {
        let mut state = SqliteState::open(&path).unwrap();
        crate::conformance::play_three_runs(&mut state, true, true).unwrap();
        state
            .conn
            .execute_batch(
                "DROP INDEX synced_email; DROP INDEX audit_key; DROP INDEX audit_email;
                 ALTER TABLE synced DROP COLUMN email_hash; ALTER TABLE pending DROP COLUMN email_hash;
                 ALTER TABLE audit DROP COLUMN key_hash; ALTER TABLE audit DROP COLUMN email_hash;
                 DROP TABLE rejects; UPDATE meta SET value = '4' WHERE key = 'schema';",
            )
            .unwrap();
    }
    let mut state = SqliteState::open(&path).unwrap();
    assert_eq!(schema_version(&state), SCHEMA_VERSION);
    let unindexed: i64 = state
        .conn
        .query_row(
            "SELECT COUNT(*) FROM synced WHERE email_hash IS NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(unindexed, 0, "every person's email hash is filled in");
    assert!(!state.history("e1@example.com").unwrap().is_empty());
}

#[test]
fn a_state_of_schema_5_is_read_as_it_is_and_gains_the_source_memo_on_open() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("state.db");
    {
        let mut state = SqliteState::open(&path).unwrap();
        state.begin_run("p").unwrap();
        state
            .conn
            .execute_batch(
                "DROP TABLE source_memo; UPDATE meta SET value = '5' WHERE key = 'schema';",
            )
            .unwrap();
    }
    let mut reader = SqliteState::open_read_only(&path).expect("a schema-5 file is read");
    assert_eq!(reader.runs(Some("p"), 10).unwrap().len(), 1);
    drop(reader);
    let mut state = SqliteState::open(&path).unwrap();
    assert_eq!(schema_version(&state), SCHEMA_VERSION);
    let memo = SourceMemo {
        key_hash: 1,
        source_hash: 2,
        tag: 3,
    };
    state.record_source_memo("p", &[memo], false).unwrap();
    let mut kept = Vec::new();
    state.scan_source_memo("p", &mut |m| kept.push(m)).unwrap();
    assert_eq!(kept, [memo]);
}

/// Whether the file has the index `synced_email`.
fn has_email_index(state: &SqliteState) -> bool {
    state
        .conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'synced_email')",
            [],
            |r| r.get(0),
        )
        .unwrap()
}

/// A first sync large enough to build `synced_email` again after its rows rather than
/// insert into it row by row ends with the index in place and every person in it; an
/// index left missing by a crash in between is restored when the file is next opened.
#[test]
fn a_large_first_sync_leaves_the_email_index_whole() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("state.db");
    let mut state = SqliteState::open(&path).unwrap();
    let (run, _) = state.begin_run("p").unwrap();
    let people = creates(crate::REBUILD_EMAIL_INDEX_ROWS as u64 + 1);
    for (n, batch) in people.chunks(4_000).enumerate() {
        let handles = vec![None; batch.len()];
        state
            .record_awaiting_finish("p", run, &format!("b{n}"), batch.to_vec(), handles)
            .unwrap();
    }
    assert_eq!(
        state.confirm_finished("p", run).unwrap(),
        people.len() as u64
    );
    assert!(has_email_index(&state));
    let indexed: i64 = state
        .conn
        .query_row(
            "SELECT COUNT(*) FROM synced INDEXED BY synced_email WHERE email_hash IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(indexed, people.len() as i64);
    // A crash between the drop and the build.
    state.conn.execute_batch("DROP INDEX synced_email").unwrap();
    drop(state);
    let state = SqliteState::open(&path).unwrap();
    assert!(has_email_index(&state), "restored on open");
}

/// The suite every backend passes, here where a broken promise names itself (the
/// crate's doc example runs it too, with the `conformance` feature).
#[test]
fn the_state_conformance_suite_passes_on_sqlite() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut n = 0;
    let checked = crate::conformance::check(&mut || {
        n += 1;
        SqliteState::open(&dir.path().join(format!("state-{n}.db")))
            .map(|s| Box::new(s) as Box<dyn crate::StateStore>)
            .map_err(|e| e.to_string())
    });
    assert_eq!(checked, Ok(()));
}

/// A confirm held while the sink finishes is one open transaction: a process that
/// ends before the commit (here, its store dropped) leaves nothing confirmed and the
/// applied changes pending, for the next run's recovery, and a commit keeps it all; a
/// confirm too large for one range is not held at all, and changes nothing.
#[test]
fn a_held_confirm_is_kept_only_once_committed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("state.db");
    let rows = creates(20);
    let run = {
        let mut state = SqliteState::open(&path).unwrap();
        let (run, _) = state.begin_run("p").unwrap();
        state.record_pending("p", run, "b1", &rows).unwrap();
        state.settle("p", "b1", &awaiting(&rows)).unwrap();
        state.confirm_range_rows = 7;
        assert_eq!(state.hold_confirm("p", run).unwrap(), None, "three ranges");
        assert!(state.conn.is_autocommit(), "nothing is held");
        state.confirm_range_rows = CONFIRM_RANGE_ROWS;
        assert_eq!(state.hold_confirm("p", run).unwrap(), Some(20));
        run
    };
    let mut state = SqliteState::open(&path).unwrap();
    assert_eq!(state.summaries().unwrap()[0].synced, 0);
    let pending: usize = state
        .pending_batches("p")
        .unwrap()
        .iter()
        .map(|(_, rows)| rows.len())
        .sum();
    assert_eq!(pending, 20, "the applied changes are still pending");
    assert_eq!(state.hold_confirm("p", run).unwrap(), Some(20));
    state.commit_confirm().unwrap();
    drop(state);
    let mut state = SqliteState::open(&path).unwrap();
    assert_eq!(
        state.summaries().unwrap()[0].synced,
        20,
        "kept once committed"
    );
    assert!(state.pending_batches("p").unwrap().is_empty());
}

/// Staged rows reach `synced` once each, whatever range and bucket their key hash
/// falls in: a confirm too large to hold leaves them all for the confirm after the
/// finish, which goes in ranges; a key staged twice in a run ends as its last change,
/// and a removal takes the person out.
#[test]
fn staged_rows_are_confirmed_once_each_across_ranges() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut state = SqliteState::open(&dir.path().join("state.db")).unwrap();
    let people = creates(300);
    let (run, _) = state.begin_run("p").unwrap();
    for (n, batch) in people.chunks(120).enumerate() {
        let handles = vec![None; batch.len()];
        state
            .record_awaiting_finish("p", run, &format!("b{n}"), batch.to_vec(), handles)
            .unwrap();
    }
    state.confirm_range_rows = 7;
    assert_eq!(state.hold_confirm("p", run).unwrap(), None, "43 ranges");
    assert_eq!(state.confirm_finished("p", run).unwrap(), 300);
    assert_eq!(state.summaries().unwrap()[0].synced, 300);
    for person in &people {
        let row = state.synced("p", person.key.hash64()).unwrap();
        assert_eq!(row.map(|r| r.entry.content_hash), Some(person.content_hash));
    }

    let (run, _) = state.begin_run("p").unwrap();
    let changed = |row: &PendingRow, content_hash: u64| PendingRow {
        kind: ChangeKind::Update,
        content_hash,
        ..row.clone()
    };
    let removed = PendingRow {
        kind: ChangeKind::Remove,
        content_hash: 0,
        record: None,
        ..people[1].clone()
    };
    let first = vec![changed(&people[0], 11), removed, changed(&people[2], 12)];
    let second = vec![changed(&people[2], 13)];
    for (id, batch) in [("c1", first), ("c2", second)] {
        let handles = vec![None; batch.len()];
        state
            .record_awaiting_finish("p", run, id, batch, handles)
            .unwrap();
    }
    assert_eq!(state.hold_confirm("p", run).unwrap(), Some(4));
    state.commit_confirm().unwrap();
    let hash = |state: &mut SqliteState, n: usize| {
        state
            .synced("p", people[n].key.hash64())
            .unwrap()
            .map(|r| r.entry.content_hash)
    };
    assert_eq!(hash(&mut state, 0), Some(11));
    assert_eq!(hash(&mut state, 1), None, "removed");
    assert_eq!(hash(&mut state, 2), Some(13), "the last of its two changes");
    assert_eq!(state.summaries().unwrap()[0].synced, 299);
}
