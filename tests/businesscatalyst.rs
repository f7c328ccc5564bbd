//! businesscatalyst ↔ csv through the binary, against the Business Catalyst sandbox
//! over HTTP (SOAP): incremental reads by `lastUpdateDate`, deletions, upserts matched
//! by external id or email, the 100-record limit and a record-level fault.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{NaiveDateTime, TimeZone, Utc};
use common::{counts, Run, Scenario};
use contactsync_businesscatalyst::client::BcClient;
use contactsync_businesscatalyst::soap::ContactRecord;
use contactsync_businesscatalyst::BcConfig;
use contactsync_core::{ConnectorSettings, SecretString};
use contactsync_sandbox_businesscatalyst::{
    Faults, Sandbox, SandboxConfig, SandboxContact, SoapCall,
};

const PASSWORD: &str = "bc-Pw-9931";
const RETRIEVE: &str = "ContactList_Retrieve";
const UPSERT: &str = "ContactList_UpdateInsert";

/// The sandbox, its clock fixed at 2026-03-02T08:00:00 (UTC, the site's zone).
async fn sandbox() -> Sandbox {
    let sandbox = Sandbox::start(SandboxConfig {
        username: "api-user".into(),
        password: SecretString::from(PASSWORD),
        site_id: 4711,
        ..SandboxConfig::default()
    })
    .await
    .expect("sandbox starts");
    sandbox.set_clock(Utc.with_ymd_and_hms(2026, 3, 2, 8, 0, 0).unwrap());
    sandbox
}

fn at(text: &str) -> NaiveDateTime {
    NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S").unwrap()
}

/// Contacts `E1..En`, contact `i` last updated `i` seconds after 08:00.
fn seed_people(sandbox: &Sandbox, n: usize) -> Vec<i64> {
    let base = at("2026-03-02T08:00:00");
    sandbox.seed(
        (1..=n)
            .map(|i| {
                let when = base + chrono::Duration::seconds(i as i64);
                SandboxContact {
                    external_id: Some(format!("E{i}")),
                    email_address: Some(format!("person{i}@example.com")),
                    first_name: Some("Ann".into()),
                    last_name: Some(format!("Last{i}")),
                    master_opt_in: true,
                    create_date: Some(when),
                    last_update_date: Some(when),
                    ..SandboxContact::default()
                }
            })
            .collect(),
    )
}

/// The connector section, for the binary's config and the test's own client.
fn section(sandbox: &Sandbox) -> String {
    format!(
        "type = \"businesscatalyst\"\nbase_url = \"{}\"\nsite_id = 4711\nusername = \"api-user\"\npassword_file = \"bc-password.txt\"\nretry_backoff = \"50ms\"\n",
        sandbox.base_url()
    )
}

fn scenario(sandbox: &Sandbox) -> Scenario {
    let s = Scenario::new();
    s.write("bc-password.txt", PASSWORD);
    let section = section(sandbox);
    s.config(&format!(
        r#"
state = "data/state.db"

[sources.bc]
{section}
[sinks.bc]
{section}
[sources.hr]
type = "csv"
path = "people.csv"

[sinks.out]
type = "csv"
path = "out.csv"

[pipelines.export]
from = "bc"
to = "out"
max_removal_ratio = 0.5

[pipelines.import]
from = "hr"
to = "bc"
max_removal_ratio = 0.5
"#
    ));
    s
}

/// A client of its own, to change contacts the way another BC user would.
fn client(sandbox: &Sandbox) -> BcClient {
    let toml = format!(
        "base_url = \"{}\"\nsite_id = 4711\nusername = \"api-user\"\npassword = \"{PASSWORD}\"\nretry_backoff = \"50ms\"\n",
        sandbox.base_url()
    );
    let settings = ConnectorSettings::from_toml("sinks.test", &toml).expect("settings");
    BcClient::new(&BcConfig::from_settings(&settings).expect("config")).expect("client")
}

/// Runs a sync without blocking the sandbox's runtime.
async fn sync(s: &Scenario, from: &str, to: &str, extra: &[&str]) -> (Run, serde_json::Value) {
    s.sync_off_runtime(from, to, extra).await
}

fn calls<'a>(log: &'a [SoapCall], operation: &str) -> Vec<&'a SoapCall> {
    log.iter().filter(|r| r.operation == operation).collect()
}

/// The csv file's rows by `external_id` (else `email`), each as column → value.
fn csv_by_key(path: &Path) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut reader = csv::Reader::from_path(path).expect("csv file");
    let headers = reader.headers().expect("header").clone();
    let mut rows = BTreeMap::new();
    for record in reader.records() {
        let record = record.expect("row");
        let row: BTreeMap<String, String> = headers
            .iter()
            .zip(record.iter())
            .map(|(h, v)| (h.to_string(), v.to_string()))
            .collect();
        let key = match row.get("external_id").filter(|v| !v.is_empty()) {
            Some(id) => id.clone(),
            None => row.get("email").cloned().unwrap_or_default(),
        };
        assert!(rows.insert(key.clone(), row).is_none(), "{key} twice");
    }
    rows
}

fn live(sandbox: &Sandbox) -> Vec<SandboxContact> {
    sandbox
        .contacts()
        .into_iter()
        .filter(|c| !c.deleted)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_first_read_then_an_incremental_read_from_the_cursor() {
    let sandbox = sandbox().await;
    seed_people(&sandbox, 250);
    let s = scenario(&sandbox);

    let (run, report) = sync(&s, "bc", "out", &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report), [250, 250, 0, 0, 0, 0]);
    assert_eq!(report["complete_read"], true);
    let log = sandbox.requests();
    let pages = calls(&log, RETRIEVE);
    assert_eq!(
        pages
            .iter()
            .map(|r| (r.record_start, r.records, r.last_update_date.as_deref()))
            .collect::<Vec<_>>(),
        vec![
            (Some(0), 100, Some("0001-01-01T00:00:00")),
            (Some(100), 100, Some("0001-01-01T00:00:00")),
            (Some(200), 50, Some("0001-01-01T00:00:00")),
        ],
        "a full read, page by page"
    );
    let rows = csv_by_key(&s.path("out.csv"));
    assert_eq!(rows.len(), 250);
    assert_eq!(rows["E42"]["email"], "person42@example.com");
    assert_eq!(rows["E42"]["first_name"], "Ann");
    assert_eq!(rows["E42"]["last_name"], "Last42");

    // Another BC user edits two people, an hour later.
    sandbox.advance_clock(chrono::Duration::hours(1));
    let bc = client(&sandbox);
    for (id, name) in [("E10", "Zoe"), ("E77", "Yan")] {
        bc.update_insert(&[ContactRecord {
            entity_id: -1,
            external_id: Some(id.into()),
            first_name: Some(name.into()),
            ..ContactRecord::default()
        }])
        .await
        .expect("edit in BC");
    }
    assert_eq!(live(&sandbox).len(), 250, "edits, not additions");
    sandbox.clear_requests();

    let (run, report) = sync(&s, "bc", "out", &[]).await;
    run.expect_code(0);
    assert_eq!(report["complete_read"], false, "an incremental read");
    // The cursor's own second is read again on purpose: E250 (08:04:10), unchanged.
    assert_eq!(counts(&report), [3, 0, 2, 0, 1, 0]);
    let log = sandbox.requests();
    let pages = calls(&log, RETRIEVE);
    assert_eq!(pages.len(), 1, "{pages:?}");
    assert_eq!(
        pages[0].last_update_date.as_deref(),
        Some("2026-03-02T08:04:10"),
        "from the newest lastUpdateDate of the first run"
    );
    assert_eq!(pages[0].record_start, Some(0));
    assert_eq!(pages[0].records, 3);

    let after = csv_by_key(&s.path("out.csv"));
    assert_eq!(after.len(), 250);
    assert_eq!(after["E10"]["first_name"], "Zoe");
    assert_eq!(after["E77"]["first_name"], "Yan");
    let changed: Vec<&String> = after
        .iter()
        .filter(|(k, row)| rows.get(*k) != Some(row))
        .map(|(k, _)| k)
        .collect();
    assert_eq!(changed, ["E10", "E77"], "exactly the two edits");

    // Nothing changed since: the cursor moved to 09:00, only the two are re-read.
    sandbox.clear_requests();
    let (run, report) = sync(&s, "bc", "out", &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report), [2, 0, 0, 0, 2, 0]);
    assert_eq!(
        calls(&sandbox.requests(), RETRIEVE)[0]
            .last_update_date
            .as_deref(),
        Some("2026-03-02T09:00:00")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_in_bc_is_a_removal_and_full_reads_from_the_beginning() {
    let sandbox = sandbox().await;
    let ids = seed_people(&sandbox, 30);
    let s = scenario(&sandbox);
    let (run, report) = sync(&s, "bc", "out", &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report), [30, 30, 0, 0, 0, 0]);

    sandbox.advance_clock(chrono::Duration::minutes(5));
    assert!(client(&sandbox)
        .delete_by_entity_id(ids[4])
        .await
        .expect("delete in BC"));
    let gone = sandbox
        .contacts()
        .into_iter()
        .find(|c| c.entity_id == ids[4])
        .unwrap();
    assert!(gone.deleted && gone.external_id.as_deref() == Some("E5"));
    sandbox.clear_requests();

    let (run, report) = sync(&s, "bc", "out", &[]).await;
    run.expect_code(0);
    assert_eq!(report["complete_read"], false);
    // E30 (the cursor's second) and the deleted E5.
    assert_eq!(counts(&report), [2, 0, 0, 1, 1, 0]);
    let pages = calls(&sandbox.requests(), RETRIEVE)
        .into_iter()
        .cloned()
        .collect::<Vec<_>>();
    assert_eq!(
        pages[0].last_update_date.as_deref(),
        Some("2026-03-02T08:00:30")
    );
    let rows = csv_by_key(&s.path("out.csv"));
    assert_eq!(rows.len(), 29);
    assert!(!rows.contains_key("E5"), "removed from the csv");

    sandbox.clear_requests();
    let (run, report) = sync(&s, "bc", "out", &["--full"]).await;
    run.expect_code(0);
    assert_eq!(report["complete_read"], true);
    assert_eq!(
        counts(&report),
        [30, 0, 0, 0, 30, 0],
        "everyone read, the deleted one included, nothing to do"
    );
    let log = sandbox.requests();
    let pages = calls(&log, RETRIEVE);
    assert_eq!(pages.len(), 1);
    assert_eq!(
        pages[0].last_update_date.as_deref(),
        Some("0001-01-01T00:00:00"),
        "--full reads from the beginning"
    );
    assert_eq!(pages[0].records, 30);
    assert_eq!(csv_by_key(&s.path("out.csv")).len(), 29);
}

/// Rows `1..=n`: up to 200 with an external id, the others keyed by email only.
fn people(n: usize, first_name: impl Fn(usize) -> String) -> String {
    let mut csv = String::from("external_id,email,first_name,last_name\n");
    for i in 1..=n {
        let id = if i <= 200 {
            format!("E{i}")
        } else {
            String::new()
        };
        csv.push_str(&format!(
            "{id},person{i}@example.com,{},Last{i}\n",
            first_name(i)
        ));
    }
    csv
}

fn assert_no_duplicates(contacts: &[SandboxContact]) {
    let mut ids = std::collections::BTreeSet::new();
    let mut emails = std::collections::BTreeSet::new();
    for c in contacts {
        if let Some(id) = &c.external_id {
            assert!(ids.insert(id.clone()), "external id {id} twice");
        }
        let email = c.email_address.clone().unwrap_or_default().to_lowercase();
        assert!(emails.insert(email.clone()), "email {email} twice");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_upserts_match_by_external_id_or_email_in_calls_of_at_most_100() {
    let sandbox = sandbox().await;
    // Two people BC already has: one by external id, one (without) by email.
    sandbox.seed(vec![
        SandboxContact {
            external_id: Some("E1".into()),
            email_address: Some("old.address@example.com".into()),
            first_name: Some("Old".into()),
            master_opt_in: true,
            ..SandboxContact::default()
        },
        SandboxContact {
            email_address: Some("Person222@example.com".into()),
            first_name: Some("Old".into()),
            master_opt_in: true,
            ..SandboxContact::default()
        },
    ]);
    let s = scenario(&sandbox);
    s.write("people.csv", &people(250, |_| "Ann".into()));

    let (run, report) = sync(&s, "hr", "bc", &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report), [250, 250, 0, 0, 0, 0]);
    let log = sandbox.requests();
    let upserts = calls(&log, UPSERT);
    assert!(
        upserts.iter().all(|r| r.records <= 100 && r.status == 200),
        "{upserts:?}"
    );
    assert_eq!(
        upserts.iter().map(|r| r.records).collect::<Vec<_>>(),
        [100, 100, 50]
    );
    let contacts = live(&sandbox);
    assert_eq!(contacts.len(), 250, "the two known people were updated");
    assert_no_duplicates(&contacts);
    let e1 = contacts
        .iter()
        .find(|c| c.external_id.as_deref() == Some("E1"))
        .unwrap();
    assert_eq!(e1.email_address.as_deref(), Some("person1@example.com"));
    assert_eq!(e1.first_name.as_deref(), Some("Ann"));
    let p222 = contacts
        .iter()
        .filter(|c| {
            c.email_address
                .as_deref()
                .is_some_and(|e| e.eq_ignore_ascii_case("person222@example.com"))
        })
        .collect::<Vec<_>>();
    assert_eq!(p222.len(), 1);
    assert_eq!(p222[0].first_name.as_deref(), Some("Ann"));
    assert_eq!(p222[0].external_id, None);

    // Edits of one row of each kind: updated in place.
    s.write(
        "people.csv",
        &people(250, |i| match i {
            7 => "Gus".into(),
            222 => "Hal".into(),
            _ => "Ann".into(),
        }),
    );
    sandbox.clear_requests();
    let (run, report) = sync(&s, "hr", "bc", &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report), [250, 0, 2, 0, 248, 0]);
    assert_eq!(
        calls(&sandbox.requests(), UPSERT)
            .iter()
            .map(|r| r.records)
            .collect::<Vec<_>>(),
        [2],
        "only the edits travel"
    );
    let contacts = live(&sandbox);
    assert_eq!(contacts.len(), 250, "no duplicate after a rerun with edits");
    assert_no_duplicates(&contacts);
    let name_of = |email: &str| {
        contacts
            .iter()
            .find(|c| {
                c.email_address
                    .as_deref()
                    .is_some_and(|e| e.eq_ignore_ascii_case(email))
            })
            .and_then(|c| c.first_name.clone())
    };
    assert_eq!(name_of("person7@example.com").as_deref(), Some("Gus"));
    assert_eq!(name_of("person222@example.com").as_deref(), Some("Hal"));
    assert_eq!(name_of("person8@example.com").as_deref(), Some("Ann"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_on_one_record_rejects_only_that_record() {
    let sandbox = sandbox().await;
    sandbox.set_faults(Faults {
        fault_on_emails: vec!["person7@example.com".into()],
        ..Faults::default()
    });
    let s = scenario(&sandbox);
    s.write("people.csv", &people(20, |_| "Ann".into()));

    let (run, report) = sync(&s, "hr", "bc", &[]).await;
    run.expect_code(3);
    assert_eq!(report["status"], "finished_with_rejects");
    assert_eq!(counts(&report), [20, 19, 0, 0, 0, 1]);
    let rejects = s.rejects();
    assert_eq!(rejects.len(), 1, "{rejects:?}");
    assert_eq!(rejects[0].get(0), Some("sink"));
    assert_eq!(rejects[0].get(3), Some("external_id:E7"));
    assert_eq!(rejects[0].get(4), Some("person7@example.com"));
    assert!(
        rejects[0].get(6).unwrap().contains("person7@example.com"),
        "the service's words name the record: {rejects:?}"
    );
    let contacts = live(&sandbox);
    assert_eq!(contacts.len(), 19);
    assert!(contacts
        .iter()
        .all(|c| c.external_id.as_deref() != Some("E7")));
    let log = sandbox.requests();
    let upserts = calls(&log, UPSERT);
    assert_eq!(upserts[0].records, 20);
    assert!(upserts[0].fault.is_some(), "the whole batch faulted first");
    assert_eq!(upserts.len(), 21, "then every record on its own");
    assert_eq!(upserts.iter().filter(|r| r.fault.is_some()).count(), 2);

    // The fault followed the record, so the rejection is final: unchanged, it is not
    // sent again (every run would fault once more) ...
    sandbox.set_faults(Faults::default());
    sandbox.clear_requests();
    let (run, report) = sync(&s, "hr", "bc", &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report), [20, 0, 0, 0, 20, 0]);
    assert!(calls(&sandbox.requests(), UPSERT).is_empty());
    // ... until the source changes it: then it is sent, and only it.
    s.write(
        "people.csv",
        &people(20, |i| if i == 7 { "Gus".into() } else { "Ann".into() }),
    );
    sandbox.clear_requests();
    let (run, report) = sync(&s, "hr", "bc", &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report), [20, 0, 1, 0, 19, 0]);
    assert_eq!(
        calls(&sandbox.requests(), UPSERT)
            .iter()
            .map(|r| r.records)
            .collect::<Vec<_>>(),
        [1]
    );
    assert_eq!(live(&sandbox).len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contacts_changing_while_the_list_is_paged_cause_no_false_removal_and_no_lost_update() {
    let sandbox = sandbox().await;
    seed_people(&sandbox, 250);
    let s = scenario(&sandbox);
    let (run, report) = sync(&s, "bc", "out", &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report), [250, 250, 0, 0, 0, 0]);

    // A full read while staff edit the head of the list as it is paged: E1 moves to the
    // end, everyone behind it shifts back, and offset paging alone would skip E101.
    sandbox.advance_clock(chrono::Duration::minutes(5));
    sandbox.set_faults(Faults {
        edit_while_paging: 1,
        ..Faults::default()
    });
    sandbox.clear_requests();
    let (run, report) = sync(&s, "bc", "out", &["--full"]).await;
    run.expect_code(0);
    assert_eq!(counts(&report)[3], 0, "no false removal: {report}");
    assert_eq!(
        report["complete_read"], true,
        "read again, complete: {report}"
    );
    let rows = csv_by_key(&s.path("out.csv"));
    assert_eq!(rows.len(), 250);
    assert!(rows.contains_key("E101"), "the shifted record was read");
    let passes = calls(&sandbox.requests(), RETRIEVE)
        .iter()
        .filter(|c| c.record_start == Some(0))
        .count();
    assert_eq!(passes, 2, "one more pass over the list");

    // The edit itself reaches the sink by the next (incremental) run: the cursor did
    // not pass the version read before it moved.
    let (run, _) = sync(&s, "bc", "out", &[]).await;
    run.expect_code(0);
    let rows = csv_by_key(&s.path("out.csv"));
    assert_eq!(rows["E1"]["first_name"], "Ann (edited)", "no lost update");
    assert_eq!(rows.len(), 250);

    // Edits that never stop: the read is incomplete, and removes nobody.
    sandbox.set_faults(Faults {
        edit_while_paging: 100,
        ..Faults::default()
    });
    let (run, report) = sync(&s, "bc", "out", &["--full"]).await;
    assert_ne!(run.code(), 1, "{report}");
    assert_eq!(report["complete_read"], false, "{report}");
    assert_eq!(counts(&report)[3], 0, "{report}");
    assert_eq!(csv_by_key(&s.path("out.csv")).len(), 250);
}

/// Consent belongs to the person: a first sync (a new state, a lost one) into a site
/// where people opted out of all mail leaves them opted out, whether the sink asks for
/// each create (`Contact_RetrieveByExternalID`, which faults for someone the site does
/// not hold: "no such contact", not an error) or reads the site once (over 100
/// creates). Someone new to the site is opted in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_sync_never_opts_back_in_whoever_opted_out_on_the_site() {
    for n in [8usize, 150] {
        let sandbox = sandbox().await;
        // On the site, E1..E5 opted out of all mail.
        sandbox.seed(
            (1..=5)
                .map(|i| SandboxContact {
                    external_id: Some(format!("E{i}")),
                    email_address: Some(format!("person{i}@example.com")),
                    first_name: Some("Old".into()),
                    master_opt_in: false,
                    ..SandboxContact::default()
                })
                .collect(),
        );
        let s = scenario(&sandbox);
        s.write("people.csv", &people(n, |_| "Ann".into()));
        let (run, report) = sync(&s, "hr", "bc", &[]).await;
        run.expect_code(0);
        assert_eq!(counts(&report)[1], n as u64, "{report}");
        let contacts = live(&sandbox);
        assert_eq!(contacts.len(), n, "no one added twice");
        for c in &contacts {
            let id: usize = c
                .external_id
                .as_deref()
                .and_then(|e| e.trim_start_matches('E').parse().ok())
                .unwrap_or(usize::MAX);
            assert_eq!(
                c.master_opt_in,
                id > 5,
                "{n} creates: {:?} opted {}",
                c.external_id,
                if c.master_opt_in { "in" } else { "out" }
            );
            assert_eq!(
                c.first_name.as_deref(),
                Some("Ann"),
                "their fields are synced"
            );
        }
        let lookups = calls(&sandbox.requests(), "Contact_RetrieveByExternalID").len();
        if n > 100 {
            assert_eq!(lookups, 0, "one read of the site instead");
        } else {
            assert_eq!(lookups, n, "one lookup a create");
        }
    }
}
