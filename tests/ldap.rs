//! ldap → csv and ldap → poppulo through the binary, against a real OpenLDAP slapd on
//! loopback: the mapping, incremental reads by modifyTimestamp, removals only from full
//! reads, and a failed bind that changes nothing.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::{counts, Scenario};
use contactsync_sandbox_poppulo::{PoppuloSandbox, SandboxConfig, SubscriberStatus};
use contactsync_testkit::slapd::{Slapd, SlapdBuilder};

fn slapd(builder: SlapdBuilder) -> Slapd {
    builder.start().unwrap_or_else(|e| panic!("{e}"))
}

fn source_section(slapd: &Slapd) -> String {
    format!(
        "[sources.dir]\ntype = \"ldap\"\nurl = \"{}\"\nbind_dn = \"{}\"\npassword_file = \"ldap-password.txt\"\nbase_dn = \"{}\"\noperation_timeout = \"10s\"\n",
        slapd.url(),
        slapd.admin_dn(),
        slapd.people_dn()
    )
}

fn scenario(slapd: &Slapd) -> Scenario {
    let s = Scenario::new();
    s.write("ldap-password.txt", slapd.admin_password());
    s.config(&format!(
        r#"
state = "data/state.db"

{}
[sinks.out]
type = "csv"
path = "out.csv"

[pipelines.p]
from = "dir"
to = "out"
max_removal_ratio = 0.5
"#,
        source_section(slapd)
    ));
    s
}

/// The csv file's rows by `external_id`, each as column → value.
fn csv_by_id(path: &Path) -> BTreeMap<String, BTreeMap<String, String>> {
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
        let id = row["external_id"].clone();
        assert!(rows.insert(id.clone(), row).is_none(), "{id} twice");
    }
    rows
}

fn state_summary(s: &Scenario) -> serde_json::Value {
    let run = s.run(&["state", "show", "--json"]);
    run.expect_code(0);
    serde_json::from_str(&run.stdout()).expect("state show --json")
}

/// modifyTimestamp has a resolution of one second: a change made within the second
/// of the cursor would be read anyway, but a test must not depend on that.
fn next_second() {
    std::thread::sleep(Duration::from_millis(1100));
}

#[test]
fn a_full_read_maps_every_person() {
    let server = slapd(Slapd::builder().people(50));
    let s = scenario(&server);
    let (run, report) = s.sync("dir", "out", &[]);
    run.expect_code(0);
    assert_eq!(counts(&report), [50, 50, 0, 0, 0, 0]);
    assert_eq!(report["complete_read"], true);
    let rows = csv_by_id(&s.path("out.csv"));
    assert_eq!(rows.len(), 50);
    let p7 = &rows["E00007"];
    for (column, value) in [
        ("email", "person00007@example.org"),
        ("first_name", "Given7"),
        ("last_name", "Family7"),
        ("display_name", "Given7 Family7"),
        ("phone", "+32 2 555 0007"),
        ("company", "Example"),
        ("department", "D7"),
        ("job_title", "Engineer"),
        ("language", "en"),
    ] {
        assert_eq!(p7.get(column).map(String::as_str), Some(value), "{p7:?}");
    }
    assert_eq!(rows["E00049"]["email"], "person00049@example.org");

    let (run, report) = s.sync("dir", "out", &[]);
    run.expect_code(0);
    assert_eq!(report["complete_read"], false, "a cursor is stored");
    assert_eq!(report["created"], 0);
    assert_eq!(report["updated"], 0);
    assert_eq!(report["removed"], 0);
}

#[test]
fn an_incremental_run_sends_exactly_the_modified_entry() {
    let server = slapd(Slapd::builder().people(50));
    let s = scenario(&server);
    s.sync("dir", "out", &[]).0.expect_code(0);
    let before = csv_by_id(&s.path("out.csv"));
    let cursor = state_summary(&s)[0]["cursor"].clone();
    assert!(
        cursor.is_string(),
        "the full read stored a cursor: {cursor}"
    );

    next_second();
    server
        .ldapmodify(&format!(
            "dn: {}\nchangetype: modify\nreplace: title\ntitle: Architect\n",
            Slapd::person_dn(12)
        ))
        .unwrap();

    let (run, report) = s.sync("dir", "out", &[]);
    run.expect_code(0);
    assert_eq!(report["complete_read"], false, "incremental: {report}");
    let [read, created, updated, removed, unchanged, rejected] = counts(&report);
    assert_eq!(
        (created, updated, removed, rejected),
        (0, 1, 0, 0),
        "{report}"
    );
    assert_eq!(unchanged, read - 1);
    assert!(read <= 50, "{report}");
    let after = csv_by_id(&s.path("out.csv"));
    assert_eq!(after.len(), 50);
    assert_eq!(after["E00012"]["job_title"], "Architect");
    let changed: Vec<&String> = after
        .iter()
        .filter(|(k, row)| before.get(*k) != Some(row))
        .map(|(k, _)| k)
        .collect();
    assert_eq!(changed, ["E00012"]);
    let moved = state_summary(&s)[0]["cursor"].clone();
    assert!(
        moved.as_str() > cursor.as_str(),
        "the cursor advanced: {cursor} -> {moved}"
    );

    // From the new cursor, only the modified entry (its own second) is read.
    let (run, report) = s.sync("dir", "out", &[]);
    run.expect_code(0);
    assert_eq!(counts(&report), [1, 0, 0, 0, 1, 0]);
}

#[test]
fn a_deleted_entry_is_removed_only_by_a_full_read() {
    let server = slapd(Slapd::builder().people(50));
    let s = scenario(&server);
    s.sync("dir", "out", &[]).0.expect_code(0);

    next_second();
    server.ldapdelete(&Slapd::person_dn(20)).unwrap();
    let (run, report) = s.sync("dir", "out", &[]);
    run.expect_code(0);
    assert_eq!(report["complete_read"], false);
    assert_eq!(
        report["removed"], 0,
        "deletions are invisible to it: {report}"
    );
    assert_eq!(report["created"], 0);
    assert_eq!(report["updated"], 0);
    assert_eq!(csv_by_id(&s.path("out.csv")).len(), 50);

    let (run, report) = s.sync("dir", "out", &["--full"]);
    run.expect_code(0);
    assert_eq!(report["complete_read"], true);
    assert_eq!(counts(&report), [49, 0, 0, 1, 49, 0]);
    let rows = csv_by_id(&s.path("out.csv"));
    assert_eq!(rows.len(), 49);
    assert!(!rows.contains_key("E00020"));
    assert_eq!(state_summary(&s)[0]["synced"], 49);
}

#[test]
fn a_failed_bind_names_the_dn_hides_the_password_and_changes_nothing() {
    let server = slapd(Slapd::builder().people(5));
    let s = scenario(&server);

    // Before any successful run: no file is created.
    let wrong = "wrong-Ldap-Pw-0815";
    s.write("ldap-password.txt", wrong);
    let (run, report) = s.sync("dir", "out", &["-vv"]);
    run.expect_code(1);
    assert!(!s.path("out.csv").exists(), "the sink was not touched");
    let all = format!("{}{}{}", run.stdout(), run.stderr(), report);
    assert!(all.contains(server.admin_dn()), "names the bind DN: {all}");
    assert!(!all.contains(wrong), "a secret leaked: {all}");
    for pipeline in state_summary(&s).as_array().expect("a list") {
        assert_eq!(pipeline["synced"], 0, "{pipeline}");
        assert_eq!(pipeline["pending"], 0, "{pipeline}");
        assert!(pipeline["cursor"].is_null(), "{pipeline}");
    }

    // After a successful run: the file and the sync state stay as they were.
    s.write("ldap-password.txt", server.admin_password());
    s.sync("dir", "out", &[]).0.expect_code(0);
    let file = std::fs::read(s.path("out.csv")).unwrap();
    let state = state_summary(&s);
    s.write("ldap-password.txt", wrong);
    let (run, report) = s.sync("dir", "out", &["-vv"]);
    run.expect_code(1);
    assert_eq!(report["status"], "failed");
    let stderr = run.stderr();
    assert!(stderr.contains(server.admin_dn()), "{stderr}");
    assert!(
        stderr.to_lowercase().contains("bind"),
        "says the bind failed: {stderr}"
    );
    let all = format!("{}{}{}", run.stdout(), stderr, report);
    assert!(!all.contains(wrong), "a secret leaked: {all}");
    assert_eq!(std::fs::read(s.path("out.csv")).unwrap(), file);
    let after = state_summary(&s);
    for key in ["pipeline", "synced", "pending", "cursor"] {
        assert_eq!(after[0][key], state[0][key], "{key}: {state} -> {after}");
    }
    // Only the run history records the failed attempt.
    assert_eq!(after[0]["runs"], state[0]["runs"].as_u64().unwrap() + 1);
    assert!(
        after[0]["last_run"].as_str().unwrap().ends_with("failed"),
        "{after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everyone_in_the_directory_arrives_in_poppulo_as_subscribers() {
    let server = slapd(Slapd::builder().people(25));
    let password = "s3cret-Pw-4711";
    let sandbox = PoppuloSandbox::start(SandboxConfig {
        account: "acme".into(),
        username: "api-user".into(),
        password: password.into(),
        records_per_tick: 500,
        tick: Duration::from_millis(50),
        ping_interval: Duration::from_millis(300),
        ..SandboxConfig::default()
    })
    .await
    .expect("sandbox starts");
    let s = Scenario::new();
    s.write("ldap-password.txt", server.admin_password());
    s.write("poppulo-password.txt", password);
    s.config(&format!(
        r#"
state = "data/state.db"

{}
[sinks.poppulo]
type = "poppulo"
base_url = "{}"
account = "acme"
username = "api-user"
password_file = "poppulo-password.txt"
min_poll_interval = "100ms"
busy_retry_interval = "200ms"
"#,
        source_section(&server),
        sandbox.base_url()
    ));
    let dir = s.dir.path().to_path_buf();
    let (run, report) =
        tokio::task::spawn_blocking(move || Scenario::at(dir).sync("dir", "poppulo", &[]))
            .await
            .expect("sync task");
    run.expect_code(0);
    assert_eq!(counts(&report), [25, 25, 0, 0, 0, 0]);
    let subscribers = sandbox.subscribers();
    assert_eq!(subscribers.len(), 25);
    for i in 0..25 {
        let sub = sandbox
            .subscriber(&format!("person{i:05}@example.org"))
            .unwrap_or_else(|| panic!("person {i} missing"));
        assert_eq!(sub.status, SubscriberStatus::Active, "{sub:?}");
        assert_eq!(
            sub.fields.get("first_name").map(String::as_str),
            Some(format!("Given{i}").as_str()),
            "{sub:?}"
        );
    }
    assert_eq!(sandbox.imports().len(), 1, "one import job");
}
