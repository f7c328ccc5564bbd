//! The SQL source against a real MariaDB (the testkit's throwaway server): the
//! conformance suite, a query that calls a function that deletes, the documented value
//! formats and a column of a type not read, incremental reads from a bound cursor, and
//! TLS always verified.

use contactsync_core::{ConnectorSettings, ReadMode, Source};
use contactsync_sql::{SqlConfig, SqlSource};
use contactsync_testkit::mariadb::MariaDb;
use contactsync_testkit::{read_all, sample_contacts, source_conformance};
use mysql_async::prelude::Queryable;

const COLUMNS: &str = "external_id, email, first_name, last_name, company, department, job_title, \
language, subscriptions, status, `attributes.cost_center`, `attributes.site`";

/// A database with a `people` table holding the five sample contacts; its URL and a
/// connection to it.
async fn database(server: &MariaDb) -> (String, mysql_async::Conn) {
    let url = server.new_database().expect("database");
    let opts = mysql_async::OptsBuilder::from_opts(mysql_async::Opts::from_url(&url).expect("url"))
        .pass(Some(server.password()));
    let mut conn = mysql_async::Conn::new(opts).await.expect("connect");
    conn.query_drop(
        "CREATE TABLE people (id int AUTO_INCREMENT PRIMARY KEY, external_id varchar(40),
           email varchar(200), first_name varchar(100), last_name varchar(100),
           company varchar(100), department varchar(100), job_title varchar(100),
           language varchar(10), subscriptions text, status varchar(20),
           `attributes.cost_center` varchar(20), `attributes.site` varchar(100),
           vip boolean NOT NULL DEFAULT 0, hired date, salary decimal(10,2), shift time,
           updated_at timestamp(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6))",
    )
    .await
    .expect("table");
    for c in sample_contacts(5) {
        let subs = c
            .subscriptions
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join(";");
        let values: Vec<mysql_async::Value> = vec![
            c.external_id.clone().into(),
            c.email.clone().into(),
            c.first_name.clone().into(),
            c.last_name.clone().into(),
            c.company.clone().into(),
            c.department.clone().into(),
            c.job_title.clone().into(),
            c.language.clone().into(),
            subs.into(),
            c.status.as_str().into(),
            c.attributes.get("cost_center").cloned().into(),
            c.attributes.get("site").cloned().into(),
        ];
        conn.exec_drop(
            format!("INSERT INTO people ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"),
            mysql_async::Params::Positional(values),
        )
        .await
        .expect("insert");
    }
    (url, conn)
}

fn source(server: &MariaDb, url: &str, extra: &str) -> SqlSource {
    let text = format!(
        "url = \"{url}\"\npassword = \"{}\"\n{extra}",
        server.password()
    );
    let settings = ConnectorSettings::from_toml("sources.hrdb", &text).expect("settings");
    SqlSource::new(SqlConfig::from_settings(&settings).expect("config")).expect("source")
}

async fn count(conn: &mut mysql_async::Conn) -> i64 {
    conn.query_first("SELECT count(*) FROM people")
        .await
        .expect("count")
        .expect("a row")
}

#[tokio::test]
async fn the_source_passes_the_conformance_suite() {
    let server = MariaDb::start().expect("mariadb");
    let (url, _conn) = database(&server).await;
    let source = source(
        &server,
        &url,
        &format!("query = 'SELECT {COLUMNS}, id AS row_id FROM people ORDER BY id'"),
    );
    source_conformance(&source, &sample_contacts(5))
        .await
        .expect("conformance");
    source.check().await.expect("check");
    let said = source.described().expect("described");
    assert!(
        said.contains("maps external_id, email") && said.contains("ignores row_id"),
        "{said}"
    );
}

#[tokio::test]
async fn a_query_that_calls_a_function_that_deletes_fails_and_changes_nothing() {
    let server = MariaDb::start().expect("mariadb");
    let (url, mut conn) = database(&server).await;
    conn.query_drop(
        "CREATE FUNCTION wipe_people() RETURNS int MODIFIES SQL DATA BEGIN DELETE FROM people; RETURN 1; END",
    )
    .await
    .expect("function");
    let source = source(
        &server,
        &url,
        &format!("query = 'SELECT {COLUMNS}, wipe_people() AS n FROM people'"),
    );
    let error = read_all(&source, ReadMode::Full)
        .await
        .expect_err("refused");
    let text = error.to_string();
    assert!(
        text.contains("`query` failed: ") && text.contains("READ ONLY transaction"),
        "{text}"
    );
    assert!(!text.contains(server.password()), "{text}");
    assert_eq!(count(&mut conn).await, 5, "nothing deleted");
}

#[tokio::test]
async fn values_have_one_format_and_a_type_not_read_is_a_reject_naming_it() {
    let server = MariaDb::start().expect("mariadb");
    let (url, mut conn) = database(&server).await;
    conn.query_drop(
        "UPDATE people SET vip = 1, hired = '2024-02-29', salary = 4250.5,
           updated_at = '2026-12-07 10:00:00.25' WHERE external_id = 'CS-0001';
         UPDATE people SET shift = '08:00:00' WHERE external_id = 'CS-0002'",
    )
    .await
    .expect("values");
    let source = source(
        &server,
        &url,
        "query = '''SELECT external_id, email, vip AS `attributes.vip`, hired AS `attributes.hired`,
           salary AS `attributes.salary`, updated_at, shift AS `attributes.shift`,
           NULL AS first_name FROM people ORDER BY id'''",
    );
    let read = read_all(&source, ReadMode::Full).await.expect("read");
    assert_eq!(read.records.len(), 4);
    let first = &read.records[0].contact;
    let attribute = |name: &str| first.attributes.get(name).map(String::as_str);
    assert_eq!(attribute("vip"), Some("true"));
    assert_eq!(attribute("hired"), Some("2024-02-29"));
    assert_eq!(attribute("salary"), Some("4250.50"));
    assert_eq!(first.first_name, None, "NULL is absent");
    assert_eq!(
        first.updated_at.map(|t| t.to_rfc3339()),
        Some("2026-12-07T10:00:00.250+00:00".into()),
        "a TIMESTAMP read in UTC"
    );
    assert_eq!(
        read.records[1]
            .contact
            .attributes
            .get("vip")
            .map(String::as_str),
        Some("false")
    );
    assert_eq!(read.rejected.len(), 1);
    let reject = &read.rejected[0];
    assert_eq!(reject.field.as_deref(), Some("attributes.shift"));
    assert!(reject.reason.contains("time"), "{}", reject.reason);
    assert_eq!(
        reject.origin.to_string(),
        "query:2",
        "its position in the result"
    );
    let partial = reject.partial.as_deref().expect("what could be read");
    assert_eq!(partial.external_id.as_deref(), Some("CS-0002"));
}

#[tokio::test]
async fn an_incremental_read_binds_the_cursor_and_fetches_only_what_changed() {
    let server = MariaDb::start().expect("mariadb");
    let (url, mut conn) = database(&server).await;
    conn.query_drop(
        "UPDATE people SET updated_at = '2026-11-01 10:00:00';
         UPDATE people SET updated_at = '2026-12-01 10:00:00' WHERE external_id = 'CS-0005'",
    )
    .await
    .expect("old times");
    // `:since` twice: each bound.
    let queries = format!(
        "query = 'SELECT {COLUMNS}, updated_at FROM people'\n\
         incremental_query = 'SELECT {COLUMNS}, updated_at FROM people WHERE updated_at > :since OR (updated_at = :since AND 0)'\n\
         cursor_column = \"updated_at\"\noverlap = \"10m\""
    );
    let source = source(&server, &url, &queries);
    source.check().await.expect("check");
    let full = read_all(&source, ReadMode::Full).await.expect("full");
    assert!(full.outcome.complete);
    let cursor = full.outcome.cursor.clone().expect("cursor");
    assert_eq!(cursor, "2026-12-01T10:00:00Z");

    conn.query_drop("UPDATE people SET first_name = 'Zoe', updated_at = '2026-12-02 09:00:00' WHERE external_id = 'CS-0003'")
        .await
        .expect("edit");
    let night = read_all(
        &source,
        ReadMode::Incremental {
            cursor: Some(cursor),
        },
    )
    .await
    .expect("incremental");
    assert!(
        !night.outcome.complete,
        "an incremental read removes nobody"
    );
    let mut ids: Vec<_> = night
        .records
        .iter()
        .filter_map(|r| r.contact.external_id.clone())
        .collect();
    ids.sort();
    // The edited row, and the one within `overlap` of the cursor (read again, harmless).
    assert_eq!(
        ids,
        ["CS-0003", "CS-0005"],
        "only the rows changed since the cursor"
    );
    assert_eq!(
        night.outcome.cursor.as_deref(),
        Some("2026-12-02T09:00:00Z")
    );
}

#[tokio::test]
async fn tls_is_verified_against_the_ca_file_and_never_skipped() {
    let server = MariaDb::start_tls().expect("mariadb with TLS");
    let (url, _conn) = database(&server).await;
    let ca = server.ca_certificate().expect("CA").display().to_string();
    let query = format!("query = 'SELECT {COLUMNS} FROM people'");
    let trusted = source(
        &server,
        &format!("{url}?sslmode=verify-full"),
        &format!("{query}\nca_file = \"{ca}\""),
    );
    let read = read_all(&trusted, ReadMode::Full).await.expect("verified");
    assert_eq!(read.records.len(), 5);
    // Without the CA, the web's roots do not vouch for the server: refused, even when
    // TLS is only preferred.
    for mode in ["verify-full", "prefer"] {
        let untrusted = source(&server, &format!("{url}?sslmode={mode}"), &query);
        let error = read_all(&untrusted, ReadMode::Full)
            .await
            .expect_err("not verified");
        let text = error.to_string();
        assert!(
            text.contains("cannot connect to the database at 127.0.0.1 port"),
            "{text}"
        );
    }
}
