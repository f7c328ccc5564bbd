//! csv → actito through the binary, against the Actito sandbox over HTTP: one-by-one
//! writes for small change sets, bulk imports for large ones within the day's quota,
//! records checked against the table before sending, and both removal policies.

mod common;

use std::time::Duration;

use common::{counts, people_csv, Run, Scenario};
use contactsync_sandbox_actito::{
    ActitoSandbox, Attribute, Profile, RunningActito, SandboxConfig, TableDef,
};

const API_KEY: &str = "actito-Key-5150";
const TABLE: &str = "contacts";

async fn sandbox(table: TableDef) -> RunningActito {
    ActitoSandbox::start(SandboxConfig {
        api_key: API_KEY.into(),
        tables: vec![table],
        import_delay: Duration::from_millis(20),
        ..SandboxConfig::default()
    })
    .await
    .expect("sandbox starts")
}

/// `extra` goes into `[sinks.actito]`, before its attribute mapping.
fn scenario(sandbox: &RunningActito, people: &str, extra: &str) -> Scenario {
    let s = Scenario::new();
    s.write("people.csv", people);
    s.write("actito-key.txt", API_KEY);
    s.config(&format!(
        r#"
state = "data/state.db"

[sources.hr]
type = "csv"
path = "people.csv"

[sinks.actito]
type = "actito"
base_url = "{}"
entity = "{}"
table = "{TABLE}"
api_key_file = "actito-key.txt"
bulk_threshold = 50
poll_interval = "50ms"
retry_backoff = "50ms"
# The sandbox does not slow calls here; pacing has its own test.
rate_limit = "off"
{extra}

[sinks.actito.attributes]
external_id = "customerId"

[pipelines.p]
from = "hr"
to = "actito"
max_removal_ratio = 0.5
"#,
        sandbox.base_url(),
        sandbox.entity(),
    ));
    s
}

/// Runs a sync without blocking the sandbox's runtime.
async fn sync(s: &Scenario, extra: &[&str]) -> (Run, serde_json::Value) {
    s.sync_off_runtime("hr", "actito", extra).await
}

fn profile(sandbox: &RunningActito, id: &str) -> Option<Profile> {
    sandbox.profile_where(TABLE, "customerId", id)
}

/// `POST …/import` requests the sandbox received, accepted or not.
fn import_attempts(sandbox: &RunningActito) -> usize {
    sandbox
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/import"))
        .count()
}

/// People `E1..En` subscribed to both of the table's subscriptions.
fn subscribed_csv(n: usize, skip: &[usize]) -> String {
    let mut s = String::from("external_id,email,first_name,last_name,subscriptions\n");
    for i in (1..=n).filter(|i| !skip.contains(i)) {
        s.push_str(&format!(
            "E{i},person{i}@example.com,Ann,Last{i},Newsletter;Events\n"
        ));
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_delta_goes_one_by_one_and_a_large_one_in_one_bulk_import() {
    let sandbox = sandbox(TableDef::default_named(TABLE)).await;
    let s = scenario(&sandbox, &people_csv(10, |_| "Ann".into()), "");

    let (run, report) = sync(&s, &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report), [10, 10, 0, 0, 0, 0]);
    let stats = sandbox.stats();
    assert_eq!(stats.imports_posted, 0, "{stats:?}");
    assert_eq!(stats.profile_posts, 10, "{stats:?}");
    assert_eq!(sandbox.profiles(TABLE).len(), 10);
    let p4 = profile(&sandbox, "E4").expect("E4 written");
    assert_eq!(p4.attributes["emailAddress"], "person4@example.com");
    assert_eq!(p4.attributes["firstName"], "Ann");
    assert_eq!(p4.attributes["lastName"], "Last4");
    assert_eq!(p4.attributes["department"], "Dept1");

    // 110 new people, 10 unchanged: above the threshold of 50, one bulk import.
    s.write("people.csv", &people_csv(120, |_| "Ann".into()));
    let (run, report) = sync(&s, &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report), [120, 110, 0, 0, 10, 0]);
    let stats = sandbox.stats();
    assert_eq!(stats.imports_posted, 1, "exactly one import: {stats:?}");
    assert_eq!(stats.profile_posts, 10, "nothing one by one: {stats:?}");
    assert_eq!(sandbox.imports().len(), 1);
    assert_eq!(sandbox.profiles(TABLE).len(), 120);
    let p99 = profile(&sandbox, "E99").expect("E99 imported");
    assert_eq!(p99.attributes["emailAddress"], "person99@example.com");
    assert_eq!(p99.attributes["department"], "Dept0");

    let (run, report) = sync(&s, &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report), [120, 0, 0, 0, 120, 0]);
    assert_eq!(sandbox.stats().imports_posted, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_days_12_imports_used_a_large_change_set_goes_one_by_one() {
    let sandbox = sandbox(TableDef::default_named(TABLE)).await;
    sandbox.set_bulk_count_today(TABLE, 12);
    let s = scenario(&sandbox, &people_csv(120, |_| "Ann".into()), "");

    let (run, report) = sync(&s, &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report), [120, 120, 0, 0, 0, 0]);
    let stats = sandbox.stats();
    assert_eq!(stats.imports_posted, 0, "no 13th import: {stats:?}");
    assert!(sandbox.imports().is_empty());
    assert!(
        import_attempts(&sandbox) >= 1 && stats.too_many_requests >= 1,
        "Actito refused the attempt: {stats:?}"
    );
    assert_eq!(stats.profile_posts, 120, "one by one instead: {stats:?}");
    assert_eq!(sandbox.profiles(TABLE).len(), 120);

    // The sink now knows the quota is used: the next large run does not even try.
    s.write("people.csv", &people_csv(120, |_| "Bea".into()));
    let (refused, attempts) = (sandbox.stats().too_many_requests, import_attempts(&sandbox));
    let (run, report) = sync(&s, &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report), [120, 0, 120, 0, 0, 0]);
    let stats = sandbox.stats();
    assert_eq!(stats.imports_posted, 0, "{stats:?}");
    assert_eq!(import_attempts(&sandbox), attempts, "no import posted");
    assert_eq!(stats.too_many_requests, refused, "{stats:?}");
    assert_eq!(stats.profile_posts, 240);
    assert_eq!(
        profile(&sandbox, "E77").unwrap().attributes["firstName"],
        "Bea"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_quota_used_and_stop_configured_the_run_fails_and_sends_nothing() {
    let sandbox = sandbox(TableDef::default_named(TABLE)).await;
    sandbox.set_bulk_count_today(TABLE, 12);
    let s = scenario(
        &sandbox,
        &people_csv(120, |_| "Ann".into()),
        "when_bulk_quota_exhausted = \"stop\"",
    );

    let (run, report) = sync(&s, &[]).await;
    run.expect_code(1);
    assert_eq!(report["status"], "failed");
    let stderr = run.stderr();
    assert!(
        stderr.contains("bulk import") && stderr.contains("when_bulk_quota_exhausted"),
        "{stderr}"
    );
    let stats = sandbox.stats();
    assert_eq!(stats.imports_posted, 0, "{stats:?}");
    assert_eq!(stats.profile_posts, 0, "{stats:?}");
    assert!(sandbox.profiles(TABLE).is_empty());

    // Again: the same answer, without another import attempt.
    let (refused, attempts) = (stats.too_many_requests, import_attempts(&sandbox));
    let (run, _) = sync(&s, &[]).await;
    run.expect_code(1);
    assert!(
        run.stderr().contains("when_bulk_quota_exhausted"),
        "{}",
        run.stderr()
    );
    assert_eq!(import_attempts(&sandbox), attempts, "no import posted");
    let stats = sandbox.stats();
    assert_eq!(stats.imports_posted, 0);
    assert_eq!(stats.profile_posts, 0);
    assert_eq!(stats.too_many_requests, refused, "{stats:?}");
    assert!(sandbox.profiles(TABLE).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_table_refuses_is_rejected_before_sending() {
    let mut table = TableDef::default_named(TABLE);
    for attribute in &mut table.attributes {
        if attribute.name == "department" {
            *attribute = Attribute::custom("department", "STRING").max_length(10);
        }
    }
    let sandbox = sandbox(table).await;
    let csv = "external_id,email,first_name,last_name,department\n\
               E1,person1@example.com,Ann,Lee,Sales\n\
               E2,person2@example.com,Bob,Marsh,Sales\n\
               E3,person3@example.com,Carl,Ek,Research and Development\n\
               E4,,Dana,Ek,Ops\n\
               E5,person5@example.com,Eve,Oz,Ops\n";
    let s = scenario(&sandbox, csv, "");

    let (run, report) = sync(&s, &[]).await;
    run.expect_code(3);
    assert_eq!(report["status"], "finished_with_rejects");
    assert_eq!(counts(&report), [5, 3, 0, 0, 0, 2]);
    let rejects = s.rejects();
    assert_eq!(rejects.len(), 2, "{rejects:?}");
    let of = |key: &str| {
        rejects
            .iter()
            .find(|r| r.get(3) == Some(key))
            .unwrap_or_else(|| panic!("{key} not rejected: {rejects:?}"))
            .clone()
    };
    let e3 = of("external_id:E3");
    assert_eq!(e3.get(0), Some("sink"));
    assert_eq!(e3.get(5), Some("department"), "{e3:?}");
    assert!(e3.get(6).unwrap().contains("10"), "{e3:?}");
    let e4 = of("external_id:E4");
    assert_eq!(e4.get(5), Some("email"), "{e4:?}");
    assert!(e4.get(6).unwrap().contains("mandatory"), "{e4:?}");

    let stats = sandbox.stats();
    assert_eq!(
        stats.profile_posts, 3,
        "the sandbox never saw them: {stats:?}"
    );
    assert_eq!(stats.imports_posted, 0);
    assert!(profile(&sandbox, "E3").is_none());
    assert!(profile(&sandbox, "E4").is_none());
    assert_eq!(sandbox.profiles(TABLE).len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removal_unsubscribes_by_default() {
    let sandbox = sandbox(TableDef::default_named(TABLE)).await;
    let s = scenario(&sandbox, &subscribed_csv(10, &[]), "");
    let (run, report) = sync(&s, &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report), [10, 10, 0, 0, 0, 0]);
    let p3 = profile(&sandbox, "E3").unwrap();
    assert!(
        p3.subscribed("Newsletter") && p3.subscribed("Events"),
        "{p3:?}"
    );

    s.write("people.csv", &subscribed_csv(10, &[3]));
    let (run, report) = sync(&s, &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report), [9, 0, 0, 1, 9, 0]);
    let p3 = profile(&sandbox, "E3").expect("the profile stays");
    assert!(
        !p3.subscribed("Newsletter") && !p3.subscribed("Events"),
        "{p3:?}"
    );
    assert_eq!(p3.attributes["emailAddress"], "person3@example.com");
    let stats = sandbox.stats();
    assert_eq!(stats.subscription_changes, 2, "{stats:?}");
    assert_eq!(stats.profile_deletes, 0);
    assert_eq!(sandbox.profiles(TABLE).len(), 10);
    let p4 = profile(&sandbox, "E4").unwrap();
    assert!(p4.subscribed("Newsletter") && p4.subscribed("Events"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removal_deletes_when_configured() {
    let sandbox = sandbox(TableDef::default_named(TABLE)).await;
    let s = scenario(&sandbox, &subscribed_csv(10, &[]), "removal = \"delete\"");
    sync(&s, &[]).await.0.expect_code(0);
    assert_eq!(sandbox.profiles(TABLE).len(), 10);

    s.write("people.csv", &subscribed_csv(10, &[3]));
    let (run, report) = sync(&s, &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report), [9, 0, 0, 1, 9, 0]);
    assert!(profile(&sandbox, "E3").is_none(), "deleted");
    assert_eq!(sandbox.profiles(TABLE).len(), 9);
    let stats = sandbox.stats();
    assert_eq!(stats.profile_deletes, 1, "{stats:?}");
    assert_eq!(stats.subscription_changes, 0);
}

/// What a person or an administrator does in Actito: `attributes` and `subscriptions`
/// set on the profile `E{id}`.
fn edit_in_actito(
    sandbox: &RunningActito,
    id: &str,
    attributes: &[(&str, &str)],
    subscriptions: &[(&str, bool)],
) {
    let mut input = contactsync_sandbox_actito::ProfileInput {
        attributes: vec![("customerId".into(), Some(id.into()))],
        ..Default::default()
    };
    input.attributes.extend(
        attributes
            .iter()
            .map(|(n, v)| (n.to_string(), Some(v.to_string()))),
    );
    input.subscriptions = subscriptions
        .iter()
        .map(|(n, on)| (n.to_string(), *on))
        .collect();
    sandbox
        .seed_profile(TABLE, &input)
        .expect("edited in Actito");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_run_unsubscribes_who_the_source_unsubscribed() {
    let sandbox = sandbox(TableDef::default_named(TABLE)).await;
    let s = scenario(&sandbox, &subscribed_csv(60, &[]), "");
    let (run, _) = sync(&s, &[]).await;
    run.expect_code(0);
    assert_eq!(
        sandbox.stats().imports_posted,
        1,
        "the first sync is a bulk one"
    );
    assert_eq!(
        sandbox.stats().profile_posts,
        0,
        "the subscriptions travel in the import file (Y/N columns), not one call a person"
    );
    let p7 = profile(&sandbox, "E7").unwrap();
    assert_eq!(p7.subscriptions.get("Newsletter"), Some(&true), "{p7:?}");
    // 55 people lose every subscription in the source: a bulk run again.
    let csv = subscribed_csv(60, &[])
        .lines()
        .enumerate()
        .map(|(n, line)| {
            if (1..=55).contains(&n) {
                line.replace(",Newsletter;Events", ",")
            } else {
                line.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n";
    s.write("people.csv", &csv);
    let (run, report) = sync(&s, &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report)[2], 55, "{report}");
    assert_eq!(sandbox.stats().imports_posted, 2, "a bulk import");
    assert_eq!(sandbox.stats().profile_posts, 0, "and no call a person");
    let p7 = profile(&sandbox, "E7").unwrap();
    assert_eq!(
        p7.subscriptions.get("Newsletter"),
        Some(&false),
        "unsubscribed by the bulk run: {p7:?}"
    );
    assert_eq!(p7.subscriptions.get("Events"), Some(&false));
    let p58 = profile(&sandbox, "E58").unwrap();
    assert_eq!(p58.subscriptions.get("Newsletter"), Some(&true));
    // Recorded as done: nothing is sent again.
    let (run, report) = sync(&s, &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report)[1..4], [0, 0, 0], "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_people_and_staff_do_in_actito_stands() {
    let sandbox = sandbox(TableDef::default_named(TABLE)).await;
    let s = scenario(&sandbox, &subscribed_csv(3, &[]), "");
    sync(&s, &[]).await.0.expect_code(0);
    // In Actito: person 1 unsubscribes from the newsletter; staff fill in person 2's
    // department, an attribute this source does not have.
    edit_in_actito(&sandbox, "E1", &[], &[("Newsletter", false)]);
    edit_in_actito(&sandbox, "E2", &[("department", "Editorial")], &[]);
    // The source changes both (and still lists both subscriptions for them).
    s.write(
        "people.csv",
        &subscribed_csv(3, &[]).replace(",Ann,", ",Anna,"),
    );
    let (run, report) = sync(&s, &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report)[2], 3, "{report}");
    let p1 = profile(&sandbox, "E1").unwrap();
    assert_eq!(p1.attributes["firstName"], "Anna");
    assert_eq!(
        p1.subscriptions.get("Newsletter"),
        Some(&false),
        "a person's own unsubscribe stands"
    );
    assert_eq!(p1.subscriptions.get("Events"), Some(&true));
    let p2 = profile(&sandbox, "E2").unwrap();
    assert_eq!(p2.attributes["firstName"], "Anna");
    assert_eq!(
        p2.attributes.get("department").map(String::as_str),
        Some("Editorial"),
        "an attribute the source does not have is left alone"
    );
    // With resubscribe = true the pipeline turns them back on (the user said so).
    let config = std::fs::read_to_string(s.dir.path().join("contactsync.toml")).unwrap();
    s.config(&config.replace(
        "max_removal_ratio = 0.5",
        "max_removal_ratio = 0.5\nresubscribe = true",
    ));
    s.write(
        "people.csv",
        &subscribed_csv(3, &[]).replace(",Ann,", ",Anne,"),
    );
    sync(&s, &[]).await.0.expect_code(0);
    let p1 = profile(&sandbox, "E1").unwrap();
    assert_eq!(p1.subscriptions.get("Newsletter"), Some(&true));
}

/// Consent belongs to the person: a first sync (a new or lost state) into a table where
/// a person unsubscribed themselves leaves them unsubscribed, one by one and in bulk;
/// profiles new to Actito are subscribed as the source lists. An empty table costs one
/// read, not one per create.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_never_resubscribes_someone_actito_holds() {
    for n in [5usize, 60] {
        let sandbox = sandbox(TableDef::default_named(TABLE)).await;
        edit_in_actito(
            &sandbox,
            "E1",
            &[("emailAddress", "person1@example.com")],
            &[("Newsletter", false), ("Events", false)],
        );
        let s = scenario(&sandbox, &subscribed_csv(n, &[]), "");
        let (run, report) = sync(&s, &[]).await;
        run.expect_code(0);
        assert_eq!(counts(&report)[1], n as u64, "{report}");
        let p1 = profile(&sandbox, "E1").unwrap();
        assert_eq!(
            p1.attributes["firstName"], "Ann",
            "{n}: synced all the same"
        );
        assert_ne!(
            p1.subscriptions.get("Newsletter"),
            Some(&true),
            "{n}: their own unsubscribe stands: {p1:?}"
        );
        assert_ne!(p1.subscriptions.get("Events"), Some(&true), "{n}: {p1:?}");
        let p2 = profile(&sandbox, "E2").unwrap();
        assert_eq!(
            p2.subscriptions.get("Newsletter"),
            Some(&true),
            "{n}: {p2:?}"
        );
        let reads = sandbox
            .requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path.contains("/profile"))
            .count();
        assert_eq!(reads, 1, "{n}: one read of the table tells who exists");
    }
}

/// A row carries only what its own change sets: in a bulk import where some people
/// have a department and Bob has none, the department Actito staff gave Bob stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_import_never_blanks_a_field_with_a_neighbours_column() {
    let sandbox = sandbox(TableDef::default_named(TABLE)).await;
    edit_in_actito(
        &sandbox,
        "E60",
        &[
            ("emailAddress", "person60@example.com"),
            ("department", "Editorial"),
        ],
        &[],
    );
    let mut people = people_csv(60, |_| "Ann".into());
    people = people.replace(
        "E60,person60@example.com,Ann,Last60,Dept0",
        "E60,person60@example.com,Ann,Last60,",
    );
    let s = scenario(&sandbox, &people, "");
    let (run, report) = sync(&s, &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report)[1], 60, "{report}");
    let p60 = profile(&sandbox, "E60").unwrap();
    assert_eq!(p60.attributes["firstName"], "Ann");
    assert_eq!(
        p60.attributes.get("department").map(String::as_str),
        Some("Editorial"),
        "{p60:?}"
    );
    assert_eq!(sandbox.stats().imports_posted, 1, "59 alike in bulk");
    assert_eq!(report["imports"], 1, "{report}");
    assert_eq!(
        profile(&sandbox, "E7").unwrap().attributes["department"],
        "Dept1"
    );
}

/// When the email is the profile's key (no unique external id mapped), Actito cannot
/// change it in place: a person whose address changed moves to a new profile, written
/// whole with the subscriptions the old one holds (their own unsubscribe included), and
/// the old profile is unsubscribed, instead of a second profile holding only the new
/// address while the old one stays subscribed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_that_is_the_profiles_key_moves_to_a_new_profile() {
    let sandbox = sandbox(TableDef::default_named(TABLE)).await;
    let people = |email: &str| {
        format!(
            "external_id,email,first_name,last_name,subscriptions\n\
             E1,{email},Ann,Lee,Newsletter;Events\n\
             E2,bob@example.com,Bob,Ray,Newsletter\n"
        )
    };
    let s = scenario(&sandbox, &people("ann@example.com"), "");
    // No unique external id mapped: profiles are keyed on their address.
    let config = std::fs::read_to_string(s.dir.path().join("contactsync.toml")).unwrap();
    s.config(&config.replace(
        "[sinks.actito.attributes]\nexternal_id = \"customerId\"\n",
        "",
    ));
    sync(&s, &[]).await.0.expect_code(0);
    let by_email = |email: &str| sandbox.profile_where(TABLE, "emailAddress", email);
    assert!(by_email("ann@example.com").is_some());
    // Ann unsubscribes from Events in Actito herself.
    sandbox
        .seed_profile(
            TABLE,
            &contactsync_sandbox_actito::ProfileInput {
                attributes: vec![("emailAddress".into(), Some("ann@example.com".into()))],
                subscriptions: vec![("Events".into(), false)],
                ..Default::default()
            },
        )
        .unwrap();
    s.write("people.csv", &people("ann.lee@example.com"));
    let (run, report) = sync(&s, &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report)[2], 1, "{report}");
    let new = by_email("ann.lee@example.com").expect("the new profile");
    assert_eq!(new.attributes["firstName"], "Ann", "written whole: {new:?}");
    assert_eq!(new.attributes["lastName"], "Lee");
    assert_eq!(new.subscriptions.get("Newsletter"), Some(&true), "{new:?}");
    assert_ne!(
        new.subscriptions.get("Events"),
        Some(&true),
        "her own unsubscribe moved with her: {new:?}"
    );
    let old = by_email("ann@example.com").expect("the old profile stays, unsubscribed");
    assert!(
        old.subscriptions.values().all(|on| !on),
        "the old address is no longer subscribed: {old:?}"
    );
    assert_eq!(sandbox.profiles(TABLE).len(), 3);
    let (run, report) = sync(&s, &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report)[1..4], [0, 0, 0], "{report}");
}
