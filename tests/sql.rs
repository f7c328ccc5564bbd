//! sql -> csv through the binary, against a real PostgreSQL and a real MariaDB: a first
//! sync of 10,000, a no-op rerun, a night of changes made with SQL read incrementally
//! (only the changed rows, no removal), a full read that removes the deleted person, a
//! row without a key rejected at its position, a query that tries to write refused, and
//! the password in no output.

mod common;

use common::{counts, read_rows, Scenario};
use contactsync_testkit::mariadb::MariaDb;
use contactsync_testkit::postgres::Postgres;

const PEOPLE: usize = 10_000;
/// The PostgreSQL cluster trusts loopback, so this password is only looked for in outputs;
/// the MariaDB server checks its own.
const PG_PASSWORD: &str = "hr-Db-Pw-5521";

/// A database holding `people`, on one of the two servers.
enum Database {
    /// The cluster is kept for as long as the database is used.
    Postgres {
        _cluster: Postgres,
        url: String,
    },
    MariaDb(MariaDb, String),
}

impl Database {
    fn postgres() -> Database {
        let pg = Postgres::start().expect("postgres");
        let url = pg.new_database().expect("database");
        Database::Postgres { _cluster: pg, url }
    }

    fn mariadb() -> Database {
        let server = MariaDb::start().expect("mariadb");
        let url = server.new_database().expect("database");
        Database::MariaDb(server, url)
    }

    fn url(&self) -> &str {
        match self {
            Database::Postgres { url, .. } | Database::MariaDb(_, url) => url,
        }
    }

    fn password(&self) -> &str {
        match self {
            Database::Postgres { .. } => PG_PASSWORD,
            Database::MariaDb(server, _) => server.password(),
        }
    }

    /// Runs `sql` with the server's own client (times in UTC); what it printed.
    fn run(&self, sql: &str) -> String {
        match self {
            Database::Postgres { url, .. } => {
                let out = std::process::Command::new("psql")
                    .args([url.as_str(), "-v", "ON_ERROR_STOP=1", "-qtA", "-c"])
                    .arg(format!("SET TIME ZONE 'UTC'; {sql}"))
                    .output()
                    .expect("psql runs");
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                String::from_utf8_lossy(&out.stdout).into_owned()
            }
            Database::MariaDb(server, url) => {
                let name = url.rsplit('/').next().expect("database name");
                server
                    .execute(name, &format!("SET time_zone = '+00:00';\n{sql}"))
                    .expect("mariadb runs")
            }
        }
    }

    /// `people` with PEOPLE rows, E1… one hour apart from 2025-01-01.
    fn fill(&self) {
        self.run(&match self {
            Database::Postgres { .. } => format!(
                "CREATE TABLE people (id serial PRIMARY KEY, external_id text, email text,
                   first_name text, updated_at timestamptz NOT NULL DEFAULT now());
                 INSERT INTO people (external_id, email, first_name, updated_at)
                   SELECT 'E' || i, 'person' || i || '@example.com', 'Ann',
                          '2025-01-01T00:00:00Z'::timestamptz + i * interval '1 hour'
                   FROM generate_series(1, {PEOPLE}) AS i;"
            ),
            Database::MariaDb(..) => format!(
                "CREATE TABLE people (id int AUTO_INCREMENT PRIMARY KEY, external_id varchar(40),
                   email varchar(200), first_name varchar(100),
                   updated_at timestamp(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6));
                 INSERT INTO people (external_id, email, first_name, updated_at)
                   SELECT concat('E', seq), concat('person', seq, '@example.com'), 'Ann',
                          TIMESTAMP'2025-01-01 00:00:00' + INTERVAL seq HOUR
                   FROM seq_1_to_{PEOPLE};"
            ),
        });
    }

    fn scenario(&self, query: &str) -> Scenario {
        let s = Scenario::new();
        s.write("hr-db.pass", self.password());
        s.config(&format!(
            r#"
state = "data/state.db"

[sources.hrdb]
type = "sql"
url = "{}"
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
"#,
            self.url()
        ));
        s
    }
}

fn first_sync_nightly_and_full_read(db: Database) {
    db.fill();
    let s =
        db.scenario("SELECT external_id, email, first_name, updated_at FROM people ORDER BY id");

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
    db.run(
        "UPDATE people SET first_name = 'Zoe', updated_at = '2026-12-02 08:00:00' WHERE external_id = 'E7';
         INSERT INTO people (external_id, email, first_name, updated_at)
           VALUES ('E10001', 'new@example.com', 'Neo', '2026-12-02 08:00:01');
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
    db.run("UPDATE people SET external_id = NULL, email = NULL WHERE external_id = 'E3'");
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
        std::fs::read_to_string(s.path("rejects.csv")).unwrap_or_default(),
    ] {
        assert!(
            !output.contains(db.password()),
            "the password leaked: {output}"
        );
    }
}

/// Each query is refused by the server, the error names `query` and says what the
/// server said, and nothing is deleted.
fn queries_that_try_to_write_fail(db: &Database, queries: &[(&str, &str)]) {
    for (query, says) in queries {
        let s = db.scenario(query);
        let (run, _) = s.sync("hrdb", "out", &[]);
        assert_ne!(run.code(), 0);
        let said = format!("{}{}", run.stdout(), run.stderr());
        assert!(
            said.contains("`query` failed: ") && said.contains(says),
            "{said}"
        );
        assert!(!said.contains(db.password()));
    }
    assert_eq!(
        db.run("SELECT count(*) FROM people").trim(),
        "1",
        "nothing deleted"
    );
}

#[test]
fn postgresql_to_csv_first_sync_nightly_and_full_read() {
    first_sync_nightly_and_full_read(Database::postgres());
}

#[test]
fn mariadb_to_csv_first_sync_nightly_and_full_read() {
    first_sync_nightly_and_full_read(Database::mariadb());
}

#[test]
fn a_postgresql_query_that_tries_to_write_fails_naming_it_and_changes_nothing() {
    let db = Database::postgres();
    db.run(
        "CREATE TABLE people (id serial PRIMARY KEY, external_id text, email text, first_name text,
           updated_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO people (external_id, email) VALUES ('E1', 'a@example.com');
         CREATE FUNCTION wipe_people() RETURNS int AS 'DELETE FROM people RETURNING 1' LANGUAGE sql;",
    );
    // A data-modifying WITH inside the read's wrapping, a write in a read-only
    // transaction.
    queries_that_try_to_write_fail(
        &db,
        &[
            (
                "WITH gone AS (DELETE FROM people RETURNING *) SELECT external_id, email FROM gone",
                "data-modifying",
            ),
            (
                "SELECT external_id, email, wipe_people() AS n FROM people",
                "read-only transaction",
            ),
        ],
    );
}

#[test]
fn a_mariadb_query_that_tries_to_write_fails_naming_it_and_changes_nothing() {
    let db = Database::mariadb();
    db.run(
        "CREATE TABLE people (id int AUTO_INCREMENT PRIMARY KEY, external_id varchar(40),
           email varchar(200), first_name varchar(100),
           updated_at timestamp NOT NULL DEFAULT CURRENT_TIMESTAMP);
         INSERT INTO people (external_id, email) VALUES ('E1', 'a@example.com');
DELIMITER //
CREATE FUNCTION wipe_people() RETURNS int MODIFIES SQL DATA
  BEGIN DELETE FROM people; RETURN 1; END//
DELIMITER ;",
    );
    // A write in a read-only transaction; a second statement, which a prepared
    // statement cannot hold.
    queries_that_try_to_write_fail(
        &db,
        &[
            (
                "SELECT external_id, email, wipe_people() AS n FROM people",
                "READ ONLY transaction",
            ),
            (
                "SELECT external_id, email FROM people; DELETE FROM people",
                "SQL syntax",
            ),
        ],
    );
}
