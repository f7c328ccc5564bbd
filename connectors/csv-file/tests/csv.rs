//! The CSV connector end to end: conformance, file-format edge cases with their line
//! numbers, column mapping, and the sink's merge and atomic replace.

use std::path::Path;

use contactsync_core::{
    registry, Change, ChangeBatch, ConnectorError, ConnectorSettings, Contact, ContactKey,
    ContactStatus, Field, KeyRule, Origin, Outcome, ReadMode, Sink, Source, SyncedEntry,
};
use contactsync_csv::config::{SinkConfig, SourceConfig};
use contactsync_csv::sink::CsvSink;
use contactsync_csv::source::CsvSource;
use contactsync_testkit::changes;
use contactsync_testkit::{
    read_all, sample_contacts, source_conformance, MemoryStore, SinkConformance, SourceRead,
};

fn settings(dir: &Path, toml: &str) -> ConnectorSettings {
    let mut settings = ConnectorSettings::from_toml("pipelines.test", toml).unwrap();
    settings.base_dir = dir.to_path_buf();
    settings
}

fn source(dir: &Path, toml: &str) -> CsvSource {
    CsvSource::new(SourceConfig::from_settings(&settings(dir, toml)).unwrap())
}

fn sink(dir: &Path, toml: &str) -> CsvSink {
    CsvSink::new(SinkConfig::from_settings(&settings(dir, toml)).unwrap())
}

async fn read(dir: &Path, toml: &str) -> SourceRead {
    read_all(&source(dir, toml), ReadMode::Full).await.unwrap()
}

fn line_of(origin: &Origin) -> u64 {
    match origin {
        Origin::Line { line, .. } => *line,
        other => panic!("not a line origin: {other:?}"),
    }
}

/// Runs one sink "run": every change in one batch, then finish.
async fn apply(sink: &mut CsvSink, changes: Vec<Change>) -> Vec<Outcome> {
    let mut store = MemoryStore::new();
    let mut ctx = store.context();
    let outcomes = sink
        .apply(
            &ChangeBatch {
                id: "test-1".into(),
                changes,
            },
            &mut ctx,
        )
        .await
        .unwrap();
    sink.finish(&mut ctx).await.unwrap();
    outcomes
}

fn create(contact: &Contact) -> Change {
    changes::create(contact.clone())
}

fn remove(contact: &Contact) -> Change {
    changes::removal(contact)
}

/// Records a sink must refuse: no key at all, and an attribute that would read back as
/// the email column.
fn unacceptable() -> Vec<Contact> {
    let mut masquerading = sample_contacts(1).remove(0);
    masquerading.external_id = Some("MASK-1".into());
    masquerading
        .attributes
        .insert("Email".into(), "x@example.com".into());
    vec![
        Contact {
            first_name: Some("Nobody".into()),
            ..Contact::default()
        },
        masquerading,
    ]
}

#[test]
fn registered_as_csv() {
    assert!(registry::source("csv").is_some());
    assert!(registry::sink("csv").is_some());
}

#[tokio::test]
async fn sink_conformance_with_drop() {
    let dir = tempfile::tempdir().unwrap();
    let toml = "path = \"out.csv\"";
    SinkConformance::new(
        Box::new(sink(dir.path(), toml)),
        Box::new(source(dir.path(), toml)),
    )
    .with_unacceptable(unacceptable())
    .run()
    .await
    .unwrap();
}

#[tokio::test]
async fn sink_conformance_with_mark_and_semicolons() {
    let dir = tempfile::tempdir().unwrap();
    let toml = "path = \"out.csv\"\ndelimiter = \";\"";
    let sink_toml = format!("{toml}\nremoval = \"mark\"");
    SinkConformance::new(
        Box::new(sink(dir.path(), &sink_toml)),
        Box::new(source(dir.path(), toml)),
    )
    .with_unacceptable(unacceptable())
    .with_contacts(sample_contacts(9))
    .run()
    .await
    .unwrap();
}

#[tokio::test]
async fn source_conformance_on_a_file_the_sink_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let contacts = sample_contacts(7);
    apply(
        &mut sink(dir.path(), "path = \"people.csv\""),
        contacts.iter().map(create).collect(),
    )
    .await;
    let read = source_conformance(&source(dir.path(), "path = \"people.csv\""), &contacts)
        .await
        .unwrap();
    let lines: Vec<u64> = read.records.iter().map(|r| line_of(&r.origin)).collect();
    assert_eq!(lines, (2..=8).collect::<Vec<_>>());
}

#[tokio::test]
async fn bom_and_semicolons() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("hr.csv"),
        "\u{feff}Email;First_Name;Status\nann@Example.com;Ann;active\nbob@example.com;Bob;INACTIVE\n",
    )
    .unwrap();
    let read = read(dir.path(), "path = \"hr.csv\"\ndelimiter = \";\"").await;
    assert!(read.rejected.is_empty(), "{:?}", read.rejected);
    assert!(read.outcome.complete);
    assert_eq!(read.outcome.cursor, None);
    let contacts = read.contacts();
    assert_eq!(contacts[0].email.as_deref(), Some("ann@example.com"));
    assert_eq!(contacts[0].first_name.as_deref(), Some("Ann"));
    assert_eq!(contacts[1].status, ContactStatus::Inactive);
    assert!(
        contacts[0].attributes.is_empty(),
        "the BOM must not make `Email` an attribute"
    );
}

#[tokio::test]
async fn malformed_rows_are_rejected_at_their_real_line_and_the_read_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut file = Vec::new();
    file.extend_from_slice(b"external_id,email,job_title,status\n"); // line 1
    file.extend_from_slice(b"E1,ann@example.com,\"Head of\nSales\",active\n"); // lines 2-3
    file.extend_from_slice(b"E2,bob@example.com,Clerk\n"); // line 4: 3 fields
    file.extend_from_slice(b"E3,cy@example.com,\"Multi\nline\nnote\",active\n"); // lines 5-7
    file.extend_from_slice(b"E4,d\xffn@example.com,Clerk,active\n"); // line 8: bad UTF-8
    file.extend_from_slice(b"E5,eve@example.com,Clerk,maybe\n"); // line 9: bad status
    file.extend_from_slice(b"E6,fay@example.com,Clerk,active\n"); // line 10
    std::fs::write(dir.path().join("hr.csv"), file).unwrap();

    let read = read(dir.path(), "path = \"hr.csv\"").await;
    assert!(read.outcome.complete);
    let good: Vec<(Option<String>, u64)> = read
        .records
        .iter()
        .map(|r| (r.contact.external_id.clone(), line_of(&r.origin)))
        .collect();
    assert_eq!(
        good,
        vec![
            (Some("E1".into()), 2),
            (Some("E3".into()), 5),
            (Some("E6".into()), 10)
        ]
    );
    assert_eq!(
        read.records[0].contact.job_title.as_deref(),
        Some("Head of\nSales")
    );
    assert_eq!(read.records[0].origin, Origin::line("hr.csv", 2));

    let rejected: Vec<(u64, Option<String>)> = read
        .rejected
        .iter()
        .map(|e| (line_of(&e.origin), e.field.clone()))
        .collect();
    assert_eq!(
        rejected,
        vec![
            (4, None),
            (8, Some("email".into())),
            (9, Some("status".into()))
        ]
    );
    assert!(
        read.rejected[0].reason.contains("3 fields"),
        "{}",
        read.rejected[0]
    );
    assert_eq!(
        read.rejected[0].raw.as_deref(),
        Some("E2,bob@example.com,Clerk")
    );
    assert!(read.rejected[1].reason.contains("UTF-8"));
    assert_eq!(
        read.rejected[1].raw.as_deref(),
        Some("E4,d\u{fffd}n@example.com,Clerk,active")
    );
    assert_eq!(
        read.rejected[2].key,
        Some(ContactKey::ExternalId("E5".into()))
    );
}

#[tokio::test]
async fn column_mapping_and_extra_columns() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("hr.csv"),
        "Emp No,E-Mail,Cost Center,Site,phone\n42,ann@example.com,CC1,Brussels,+32 2\n",
    )
    .unwrap();
    let mapped = "path = \"hr.csv\"\ncolumns = { external_id = \"Emp No\", email = \"e-mail\", \"attributes.cc\" = \"Cost Center\" }";
    let contact = read(dir.path(), mapped).await.contacts().remove(0);
    assert_eq!(
        contact.key(KeyRule::Auto),
        Some(ContactKey::ExternalId("42".into()))
    );
    assert_eq!(contact.email.as_deref(), Some("ann@example.com"));
    assert_eq!(contact.phone.as_deref(), Some("+32 2"));
    assert_eq!(
        contact.get(&Field::Attribute("cc".into())).as_deref(),
        Some("CC1")
    );
    assert_eq!(
        contact.get(&Field::Attribute("Site".into())).as_deref(),
        Some("Brussels")
    );

    let ignoring = format!("{mapped}\nextra_columns = \"ignore\"");
    let contact = read(dir.path(), &ignoring).await.contacts().remove(0);
    assert_eq!(contact.attributes.keys().collect::<Vec<_>>(), vec!["cc"]);

    let err = source(
        dir.path(),
        "path = \"hr.csv\"\ncolumns = { email = \"Mail\" }",
    )
    .check()
    .await
    .unwrap_err();
    assert!(err.to_string().contains("\"Mail\""), "{err}");
}

#[tokio::test]
async fn a_missing_file_is_an_io_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let source = source(dir.path(), "path = \"nowhere.csv\"");
    for err in [
        source.check().await.unwrap_err(),
        source.read(ReadMode::Full).await.err().unwrap(),
    ] {
        assert!(
            matches!(&err, ConnectorError::Io { path, .. } if path.ends_with("nowhere.csv")),
            "{err}"
        );
    }
}

#[tokio::test]
async fn the_sink_replaces_atomically_and_keeps_foreign_columns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.csv");
    std::fs::write(
        &path,
        "email,first_name,Notes\nann@example.com,Ann,keep me\nbob@example.com,Bob,\"two\nlines\"\n",
    )
    .unwrap();
    // `Notes` is not read (extra columns ignored), so the sink must keep its values.
    let mut sink = sink(
        dir.path(),
        "path = \"out.csv\"\nextra_columns = \"ignore\"\nfields = [\"email\", \"first_name\"]",
    );
    sink.check().await.unwrap();
    let mut ann = Contact::default();
    ann.set(&Field::Email, "ann@example.com").unwrap();
    ann.set(&Field::FirstName, "Anne").unwrap();
    let mut cy = Contact::default();
    cy.set(&Field::Email, "cy@example.com").unwrap();
    let update = Change::Update {
        key: ann.key(KeyRule::Auto).unwrap(),
        contact: ann.clone(),
        origin: Origin::line("test", 2),
        previous: SyncedEntry {
            content_hash: 0,
            email: ann.email.clone(),
            handle: None,
            record: None,
        },
    };
    let outcomes = apply(&mut sink, vec![update, create(&cy)]).await;
    assert_eq!(outcomes, vec![Outcome::applied(), Outcome::applied()]);
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "email,first_name,Notes\nann@example.com,Anne,keep me\nbob@example.com,Bob,\"two\nlines\"\ncy@example.com,,\n"
    );
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("out.csv")],
        "temporary files left behind"
    );
}

#[tokio::test]
async fn removal_drop_versus_mark() {
    let contacts = sample_contacts(3);
    for (removal, expected_rows, expected_status) in [
        ("drop", 2, None),
        ("mark", 3, Some(ContactStatus::Inactive)),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let toml = format!("path = \"out.csv\"\nremoval = \"{removal}\"");
        let mut sink = sink(dir.path(), &toml);
        apply(&mut sink, contacts.iter().map(create).collect()).await;
        apply(&mut sink, vec![remove(&contacts[1])]).await;
        let read = read(dir.path(), "path = \"out.csv\"").await;
        let people = read.contacts();
        assert_eq!(people.len(), expected_rows, "{removal}");
        let removed = people
            .iter()
            .find(|c| c.external_id == contacts[1].external_id);
        assert_eq!(removed.map(|c| c.status), expected_status, "{removal}");
        // Removing again changes nothing.
        apply(&mut sink, vec![remove(&contacts[1])]).await;
        assert_eq!(super_read(dir.path()).await, people, "{removal}");
    }
}

async fn super_read(dir: &Path) -> Vec<Contact> {
    read(dir, "path = \"out.csv\"").await.contacts()
}

#[tokio::test]
async fn a_create_for_an_existing_row_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut sink = sink(dir.path(), "path = \"out.csv\"");
    let mut contacts = sample_contacts(2);
    apply(&mut sink, contacts.iter().map(create).collect()).await;
    contacts[0].first_name = Some("Changed".into());
    apply(&mut sink, vec![create(&contacts[0]), create(&contacts[0])]).await;
    let read = super_read(dir.path()).await;
    assert_eq!(read.len(), 2);
    assert!(read.contains(&contacts[0]));
}

/// `cargo test -p contactsync-csv --release -- --ignored` to time a million rows.
#[tokio::test]
#[ignore]
async fn reads_a_million_rows() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let mut file =
        std::io::BufWriter::new(std::fs::File::create(dir.path().join("big.csv")).unwrap());
    writeln!(
        file,
        "external_id,email,first_name,last_name,department,cost_center"
    )
    .unwrap();
    for i in 0..1_000_000 {
        writeln!(
            file,
            "E{i},person.{i}@example.com,First{i},Last{i},Dept {},CC{}",
            i % 40,
            i % 300
        )
        .unwrap();
    }
    drop(file);
    let source = source(dir.path(), "path = \"big.csv\"");
    let mut stream = source.read(ReadMode::Full).await.unwrap();
    let mut n = 0;
    while stream.next().await.unwrap().is_some() {
        n += 1;
    }
    // Speed is `cargo xtask bench`'s to measure; this asserts every row arrives.
    assert_eq!(n, 1_000_000);
}

/// The state's content hashes for a read that skips unchanged rows.
struct Known(std::collections::HashMap<u64, u64>);

impl contactsync_core::KnownContent for Known {
    fn content_hash(&self, key_hash: u64) -> Option<u64> {
        self.0.get(&key_hash).copied()
    }
}

/// A row the state holds as it reads (however it is padded or cased) comes as
/// `Unchanged`, with its line and key hash; every other row comes as a read without
/// skipping gives it: changed, new, keyed otherwise, or one the engine must see to
/// reject (an invalid email, an unknown status, invalid UTF-8).
#[tokio::test]
async fn a_read_skipping_unchanged_rows_yields_only_the_rows_the_state_holds_as_read() {
    let dir = tempfile::tempdir().unwrap();
    let header = "external_id,email,first_name,status,subscriptions\n";
    let synced = [
        ("E1", "ann@example.com", "Ann", "active", "news;offers"),
        ("E2", "bo@example.com", "Bo", "active", ""),
        ("E3", "cy@example.com", "Cy", "active", ""),
        ("E4", "not-an-email", "Di", "active", ""),
        ("E5", "ed@example.com", "Ed", "active", ""),
        ("E6", "fay@example.com", "Fay", "active", ""),
    ];
    let mut known = std::collections::HashMap::new();
    for (id, email, first, status, subscriptions) in synced {
        let mut contact = Contact::default();
        for (field, value) in [
            (Field::ExternalId, id),
            (Field::Email, email),
            (Field::FirstName, first),
            (Field::Status, status),
            (Field::Subscriptions, subscriptions),
        ] {
            contact.set(&field, value).unwrap();
        }
        known.insert(
            contact.key_hash(KeyRule::Auto).unwrap(),
            contact.content_hash(),
        );
    }
    let mut file = header.as_bytes().to_vec();
    file.extend_from_slice(
        b" E1 ,ann@EXAMPLE.com,Ann , ACTIVE ,offers|news;news\n\
          E2,bo@example.com,Bob,active,\n\
          E3,cy@example.com,Cy,active,\n\
          E4,not-an-email,Di,active,\n\
          E5,ed@example.com,Ed,retired,\n\
          E7,gus@example.com,Gus,active,\n",
    );
    file.extend_from_slice(b"E6,fay@example.com,F\xFFy,active,\n");
    std::fs::write(dir.path().join("p.csv"), &file).unwrap();
    let unchanged = contactsync_core::Unchanged {
        known: std::sync::Arc::new(Known(known)),
        rule: KeyRule::Auto,
    };
    let source = source(dir.path(), "path = \"p.csv\"\n");
    let read = contactsync_testkit::read_all_skipping_unchanged(&source, ReadMode::Full, unchanged)
        .await
        .unwrap();
    let unchanged: Vec<(u64, u64)> = read
        .unchanged
        .iter()
        .map(|row| (row.line, row.key_hash))
        .collect();
    assert_eq!(
        unchanged,
        [
            (2, ContactKey::external_id_hash("E1")),
            (4, ContactKey::external_id_hash("E3")),
        ]
    );
    assert_eq!(read.unchanged[0].origin(), Origin::line("p.csv", 2));
    let records: Vec<(u64, &str)> = read
        .records
        .iter()
        .map(|r| {
            (
                line_of(&r.origin),
                r.contact.external_id.as_deref().unwrap(),
            )
        })
        .collect();
    assert_eq!(records, [(3, "E2"), (5, "E4"), (7, "E7")]);
    let rejected: Vec<(u64, Option<&str>)> = read
        .rejected
        .iter()
        .map(|e| (line_of(&e.origin), e.field.as_deref()))
        .collect();
    assert_eq!(rejected, [(6, Some("status")), (8, Some("first_name"))]);

    // Keyed by email, the same rows are other people.
    let by_email = contactsync_core::Unchanged {
        known: std::sync::Arc::new(Known(std::collections::HashMap::new())),
        rule: KeyRule::Email,
    };
    let read = contactsync_testkit::read_all_skipping_unchanged(&source, ReadMode::Full, by_email)
        .await
        .unwrap();
    assert!(read.unchanged.is_empty());
    assert_eq!(read.records.len(), 5);
}

/// A file of several chunks read on the source's two threads (the parser's and the
/// builder's): every row comes once, in file order, at its line, as what it is, with
/// rejections for shape and for value, unchanged rows and records mixed across the
/// chunks' edges (whose row buffers are used again).
#[tokio::test]
async fn a_read_of_many_chunks_keeps_every_row_in_order() {
    use contactsync_core::SourceItem;
    let dir = tempfile::tempdir().unwrap();
    let rows = 3 * contactsync_csv::source::CHUNK_ROWS + 517;
    let mut file = String::from("external_id,email,first_name,status\n");
    let mut known = std::collections::HashMap::new();
    #[derive(Debug, PartialEq)]
    enum Kind {
        Shape,
        Status,
        Unchanged(u64),
        Record(String),
    }
    let mut expected = Vec::new();
    for i in 0..rows {
        let id = format!("E{i}");
        // A long name now and then, so that a reused row buffer would show what it held.
        let first = if i % 5 == 0 {
            "F".repeat(300)
        } else {
            format!("F{i}")
        };
        let line = (i + 2) as u64;
        if i % 7 == 3 {
            file.push_str(&format!("{id},p{i}@example.com\n"));
            expected.push((line, Kind::Shape));
        } else if i % 11 == 5 {
            file.push_str(&format!("{id},p{i}@example.com,{first},sleeping\n"));
            expected.push((line, Kind::Status));
        } else {
            file.push_str(&format!("{id},p{i}@example.com,{first},active\n"));
            if i % 2 == 0 {
                let mut contact = Contact::default();
                contact.set(&Field::ExternalId, &id).unwrap();
                contact
                    .set(&Field::Email, &format!("p{i}@example.com"))
                    .unwrap();
                contact.set(&Field::FirstName, &first).unwrap();
                let key_hash = contact.key_hash(KeyRule::Auto).unwrap();
                known.insert(key_hash, contact.content_hash());
                expected.push((line, Kind::Unchanged(key_hash)));
            } else {
                expected.push((line, Kind::Record(id)));
            }
        }
    }
    std::fs::write(dir.path().join("p.csv"), file).unwrap();
    let unchanged = contactsync_core::Unchanged {
        known: std::sync::Arc::new(Known(known)),
        rule: KeyRule::Auto,
    };
    let source = source(dir.path(), "path = \"p.csv\"\n");
    let mut stream = source
        .read_skipping_unchanged(ReadMode::Full, unchanged)
        .await
        .unwrap();
    let mut got = Vec::new();
    while let Some(item) = stream.next().await.unwrap() {
        got.push(match item {
            SourceItem::Unchanged(row) => (row.line, Kind::Unchanged(row.key_hash)),
            SourceItem::Record(record) => (
                line_of(&record.origin),
                Kind::Record(record.contact.external_id.clone().unwrap()),
            ),
            SourceItem::Rejected(error) => (
                line_of(&error.origin),
                match error.field.as_deref() {
                    Some("status") => Kind::Status,
                    None => Kind::Shape,
                    other => panic!("rejected for {other:?}: {error:?}"),
                },
            ),
        });
    }
    assert_eq!(got.len(), expected.len());
    for (got, expected) in got.iter().zip(&expected) {
        assert_eq!(got, expected);
    }
    assert!(stream.finish().await.unwrap().complete);
}
