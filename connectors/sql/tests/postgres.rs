//! The SQL source against a real PostgreSQL (the testkit's throwaway cluster): the
//! conformance suite, a query that tries to write, a column of a type not read, and
//! incremental reads from a bound cursor.

use contactsync_core::{ConnectorSettings, ReadMode, Source};
use contactsync_sql::{SqlConfig, SqlSource};
use contactsync_testkit::postgres::Postgres;
use contactsync_testkit::{read_all, sample_contacts, source_conformance};

const COLUMNS: &str = "external_id, email, first_name, last_name, company, department, job_title, \
language, subscriptions, status, \"attributes.cost_center\", \"attributes.site\"";

async fn database(pg: &Postgres) -> (String, tokio_postgres::Client) {
    let url = pg.new_database().expect("database");
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    client
        .batch_execute(
            "CREATE TABLE people (id serial PRIMARY KEY, external_id text, email text, first_name text,
               last_name text, company text, department text, job_title text, language text,
               subscriptions text, status text, \"attributes.cost_center\" text, \"attributes.site\" text,
               profile jsonb, updated_at timestamptz NOT NULL DEFAULT now())",
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
        client
            .execute(
                &format!("INSERT INTO people ({COLUMNS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12)"),
                &[
                    &c.external_id, &c.email, &c.first_name, &c.last_name, &c.company, &c.department,
                    &c.job_title, &c.language, &subs, &c.status.as_str(),
                    &c.attributes.get("cost_center"), &c.attributes.get("site"),
                ],
            )
            .await
            .expect("insert");
    }
    (url, client)
}

fn source(url: &str, extra: &str) -> SqlSource {
    let text = format!("url = \"{url}\"\nfetch_size = 2\n{extra}");
    let settings = ConnectorSettings::from_toml("sources.hrdb", &text).expect("settings");
    SqlSource::new(SqlConfig::from_settings(&settings).expect("config")).expect("source")
}

#[tokio::test]
async fn the_source_passes_the_conformance_suite() {
    let pg = Postgres::start().expect("postgres");
    let (url, _client) = database(&pg).await;
    let source = source(
        &url,
        &format!("query = 'SELECT {COLUMNS}, id AS row_id FROM people ORDER BY id'"),
    );
    // Five rows fetched two at a time: three fetches from the portal.
    source_conformance(&source, &sample_contacts(5))
        .await
        .expect("conformance");
    source.check().await.expect("check");
    let said = source.described().expect("described");
    assert!(said.contains("ignores row_id"), "{said}");
}

#[tokio::test]
async fn a_query_that_tries_to_write_fails_and_changes_nothing() {
    let pg = Postgres::start().expect("postgres");
    let (url, client) = database(&pg).await;
    let source = source(
        &url,
        &format!(
            "query = 'WITH gone AS (DELETE FROM people RETURNING *) SELECT {COLUMNS} FROM gone'"
        ),
    );
    let error = read_all(&source, ReadMode::Full)
        .await
        .expect_err("refused");
    let text = error.to_string();
    assert!(text.contains("`query`"), "{text}");
    let count: i64 = client
        .query_one("SELECT count(*) FROM people", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, 5, "nothing deleted");
}

#[tokio::test]
async fn a_value_of_a_type_not_read_is_a_reject_naming_column_and_type() {
    let pg = Postgres::start().expect("postgres");
    let (url, client) = database(&pg).await;
    client
        .execute(
            "UPDATE people SET profile = '{\"a\": 1}' WHERE external_id = 'CS-0002'",
            &[],
        )
        .await
        .expect("update");
    let source = source(&url, "query = 'SELECT external_id, email, profile AS \"attributes.profile\" FROM people ORDER BY id'");
    let read = read_all(&source, ReadMode::Full).await.expect("read");
    assert_eq!(read.records.len(), 4);
    assert_eq!(read.rejected.len(), 1);
    let reject = &read.rejected[0];
    assert_eq!(reject.field.as_deref(), Some("attributes.profile"));
    assert!(reject.reason.contains("jsonb"), "{}", reject.reason);
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
    let pg = Postgres::start().expect("postgres");
    let (url, client) = database(&pg).await;
    client
        .batch_execute(
            "UPDATE people SET updated_at = '2026-11-01T10:00:00Z';
             UPDATE people SET updated_at = '2026-12-01T10:00:00Z' WHERE external_id = 'CS-0005'",
        )
        .await
        .expect("old times");
    let queries = format!(
        "query = 'SELECT {COLUMNS}, updated_at FROM people'\n\
         incremental_query = 'SELECT {COLUMNS}, updated_at FROM people WHERE updated_at > :since'\n\
         cursor_column = \"updated_at\"\noverlap = \"10m\""
    );
    let source = source(&url, &queries);
    let full = read_all(&source, ReadMode::Full).await.expect("full");
    assert!(full.outcome.complete);
    let cursor = full.outcome.cursor.clone().expect("cursor");
    assert_eq!(cursor, "2026-12-01T10:00:00Z");

    client
        .execute("UPDATE people SET first_name = 'Zoe', updated_at = '2026-12-02T09:00:00Z' WHERE external_id = 'CS-0003'", &[])
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

    // Nothing changed since: the cursor stays.
    let quiet = read_all(
        &source,
        ReadMode::Incremental {
            cursor: night.outcome.cursor.clone(),
        },
    )
    .await
    .expect("quiet");
    assert!(
        quiet
            .records
            .iter()
            .all(|r| r.contact.first_name.as_deref() == Some("Zoe")),
        "only the overlap"
    );
    assert_eq!(quiet.outcome.cursor, night.outcome.cursor);
}
