//! sql -> csv through the binary, against a real PostgreSQL: a first sync of 10,000, a
//! no-op rerun, a night of changes made with SQL read incrementally (only the changed
//! rows, no removal), a full read that removes the deleted person, a row without a key
//! rejected at its position, a query that tries to write refused, and the password in
//! no output.

mod common;

use common::{counts, read_rows, Scenario};
use contactsync_testkit::postgres::Postgres;

const PEOPLE: usize = 10_000;
const PASSWORD: &str = "hr-Db-Pw-5521";

fn scenario(url: &str, query: &str) -> Scenario {
    let s = Scenario::new();
    s.write("hr-db.pass", PASSWORD);
    s.config(&format!(
        r#"
state = "data/state.db"

[sources.hrdb]
type = "sql"
url = "{url}"
password_file = "hr-db.pass"
query = "{query}"
incremental_query = "SELECT external_id, email, first_name, updated_at FROM people WHERE updated_at > :since ORDER BY id"
cursor_column = "updated_at"
overlap = "1m"

[sinks.out]
type = "csv"
path = "out.csv"

[pipelines.hr]
from = "hrdb"
to = "out"
full_every = 7
max_removal_ratio = 0.5
"#
    ));
    s
}

fn psql(pg: &Postgres, url: &str, sql: &str) {
    let out = std::process::Command::new("psql")
        .args([url, "-v", "ON_ERROR_STOP=1", "-q", "-c", sql])
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = pg;
}

#[test]
fn sql_to_csv_first_sync_nightly_and_full_read() {
    let pg = Postgres::start().expect("postgres");
    let url = pg.new_database().expect("database");
    psql(
        &pg,
        &url,
        &format!(
            "CREATE TABLE people (id serial PRIMARY KEY, external_id text, email text, first_name text,
               updated_at timestamptz NOT NULL);
             INSERT INTO people (external_id, email, first_name, updated_at)
               SELECT 'E' || i, 'person' || i || '@example.com', 'Ann',
                      '2025-01-01T00:00:00Z'::timestamptz + i * interval '1 hour'
               FROM generate_series(1, {PEOPLE}) AS i;"
        ),
    );
    let s = scenario(
        &url,
        "SELECT external_id, email, first_name, updated_at FROM people ORDER BY id",
    );

    let (run, report) = s.sync("hrdb", "out", &[]);
    run.expect_code(0);
    assert_eq!(counts(&report), [PEOPLE as u64, PEOPLE as u64, 0, 0, 0, 0]);
    assert_eq!(read_rows(&s.path("out.csv")).len(), PEOPLE);

    // Nothing changed: the incremental read fetches only the newest row again (within
    // the minute of `overlap` before the cursor).
    let (run, report) = s.sync("hrdb", "out", &[]);
    run.expect_code(0);
    assert_eq!(report["complete_read"], false);
    assert_eq!(counts(&report), [1, 0, 0, 0, 1, 0]);

    // The night's changes, made with SQL.
    psql(
        &pg,
        &url,
        "UPDATE people SET first_name = 'Zoe', updated_at = '2026-12-02T08:00:00Z' WHERE external_id = 'E7';
         INSERT INTO people (external_id, email, first_name, updated_at)
           VALUES ('E10001', 'new@example.com', 'Neo', '2026-12-02T08:00:01Z');
         DELETE FROM people WHERE external_id = 'E9';",
    );
    let (run, report) = s.sync("hrdb", "out", &[]);
    run.expect_code(0);
    assert_eq!(report["complete_read"], false, "an incremental read");
    assert_eq!(
        counts(&report),
        [3, 1, 1, 0, 1, 0],
        "only the changed rows (and the overlap), no removal"
    );

    // A full read removes the deleted person.
    let (run, report) = s.sync("hrdb", "out", &["--full"]);
    run.expect_code(0);
    assert_eq!(report["complete_read"], true);
    assert_eq!(counts(&report)[3], 1, "E9 removed");
    let rows = read_rows(&s.path("out.csv"));
    assert_eq!(rows.len(), PEOPLE);

    // A row without a key is rejected at its position, and the full read removes nobody.
    psql(
        &pg,
        &url,
        "UPDATE people SET external_id = NULL, email = NULL WHERE external_id = 'E3'",
    );
    let (run, report) = s.sync("hrdb", "out", &["--full"]);
    assert_eq!(
        counts(&report)[3],
        0,
        "no removal from a read with a key-less reject"
    );
    assert!(counts(&report)[5] >= 1);
    let rejects = s.rejects();
    // Its origin: the query, row 3 of the result.
    assert!(
        rejects
            .iter()
            .any(|r| r.get(1) == Some("query") && r.get(2) == Some("3")),
        "{rejects:?}"
    );
    for output in [
        run.stdout(),
        run.stderr(),
        std::fs::read_to_string(s.path("report.json")).unwrap_or_default(),
    ] {
        assert!(!output.contains(PASSWORD), "the password leaked: {output}");
    }
}

#[test]
fn a_query_that_tries_to_write_fails_naming_it_and_changes_nothing() {
    let pg = Postgres::start().expect("postgres");
    let url = pg.new_database().expect("database");
    psql(
        &pg,
        &url,
        "CREATE TABLE people (id serial PRIMARY KEY, external_id text, email text, first_name text,
           updated_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO people (external_id, email) VALUES ('E1', 'a@example.com');
         CREATE FUNCTION purge() RETURNS int AS 'DELETE FROM people RETURNING 1' LANGUAGE sql;",
    );
    for (query, says) in [
        (
            "WITH gone AS (DELETE FROM people RETURNING *) SELECT external_id, email FROM gone",
            "data-modifying",
        ),
        (
            "SELECT external_id, email, purge() AS n FROM people",
            "read-only transaction",
        ),
    ] {
        let s = scenario(&url, query);
        let (run, _) = s.sync("hrdb", "out", &[]);
        assert_ne!(run.code(), 0);
        let said = format!("{}{}", run.stdout(), run.stderr());
        // The server refuses each: a data-modifying WITH inside the read's wrapping, a
        // write in a read-only transaction.
        assert!(
            said.contains("`query` failed: ") && said.contains(says),
            "{said}"
        );
        assert!(!said.contains(PASSWORD));
    }
    let out = std::process::Command::new("psql")
        .args([url.as_str(), "-tA", "-c", "SELECT count(*) FROM people"])
        .output()
        .expect("psql");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1",
        "nothing deleted"
    );
}
