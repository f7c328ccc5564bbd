//! csv → poppulo through the binary, against the Poppulo sandbox over HTTP: the
//! user's nightly job.

mod common;

use std::time::Duration;

use common::{counts, people_csv, Run, Scenario};
use contactsync_sandbox_poppulo::{
    Faults, ImportStatus, RunningPoppulo, Subscriber, SubscriberStatus, WireFaults,
};

const PASSWORD: &str = common::POPPULO_PASSWORD;

async fn sandbox(records_per_tick: usize) -> RunningPoppulo {
    common::poppulo_sandbox(records_per_tick).await
}

fn scenario(sandbox: &RunningPoppulo, people: &str, extra_sink: &str) -> Scenario {
    let s = Scenario::new();
    s.write("people.csv", people);
    s.write("password.txt", PASSWORD);
    s.config(&format!(
        r#"
state = "data/state.db"
[sources.hr]
type = "csv"
path = "people.csv"
[sinks.poppulo]
type = "poppulo"
base_url = "{}"
account = "acme"
username = "api-user"
password_file = "password.txt"
min_poll_interval = "100ms"
busy_retry_interval = "200ms"
{extra_sink}
[pipelines.nightly]
from = "hr"
to = "poppulo"
max_removal_ratio = 0.5
"#,
        sandbox.base_url()
    ));
    s
}

/// Runs a sync without blocking the sandbox's runtime.
async fn sync(s: &Scenario, extra: &[&str]) -> (Run, serde_json::Value) {
    s.sync_off_runtime("hr", "poppulo", extra).await
}

fn status_of(sandbox: &RunningPoppulo, email: &str) -> Option<SubscriberStatus> {
    sandbox.subscriber(email).map(|s| s.status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_sync_then_nightly_delta_then_removal_as_inactive() {
    let sandbox = sandbox(500).await;
    let s = scenario(&sandbox, &people_csv(10, |_| "Ann".into()), "");
    let (run, report) = sync(&s, &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report), [10, 10, 0, 0, 0, 0]);
    assert_eq!(sandbox.subscribers().len(), 10);
    assert_eq!(
        sandbox.stats().early_polls,
        0,
        "never polled before ping_after"
    );
    let first = sandbox.imports();
    assert_eq!(first.len(), 1, "one import job for the run");
    let columns = &first[0].job.columns;
    assert_eq!(columns.first().map(String::as_str), Some("email"));
    assert_eq!(columns.last().map(String::as_str), Some("status"));
    assert!(columns.iter().any(|c| c == "name.first name"));
    assert!(
        !columns.iter().any(|c| c == "company" || c == "position"),
        "no column the source does not have: {columns:?}"
    );
    assert!(
        columns.iter().any(|c| c == "workDetails.department"),
        "{columns:?}"
    );

    // Nothing changed: nothing sent.
    let (run, report) = sync(&s, &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report), [10, 0, 0, 0, 10, 0]);
    assert_eq!(sandbox.imports().len(), 1);

    // The nightly delta: one edit, one leaver. Only those rows travel.
    let mut csv = people_csv(10, |i| if i == 4 { "Dora".into() } else { "Ann".into() });
    csv = csv
        .lines()
        .filter(|l| !l.starts_with("E9,"))
        .collect::<Vec<_>>()
        .join("\n")
        + "\n";
    s.write("people.csv", &csv);
    let (run, report) = sync(&s, &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report), [9, 0, 1, 1, 8, 0]);
    let imports = sandbox.imports();
    assert_eq!(
        imports.len(),
        3,
        "the nightly is one import of its update and one of its removal"
    );
    let update = &imports[1];
    let column = |name: &str| update.job.columns.iter().position(|c| c == name).unwrap();
    assert_eq!(update.rows.len(), 1);
    assert_eq!(update.rows[0][0], "person4@example.com");
    assert_eq!(update.rows[0][column("name.first name")], "Dora");
    assert!(
        !update.job.columns.iter().any(|c| c == "status"),
        "a status the source did not change is the person's: {:?}",
        update.job.columns
    );
    let removal = &imports[2];
    assert_eq!(
        removal.job.columns,
        ["email", "status"],
        "a removal row carries no cell that could clear a field"
    );
    assert_eq!(removal.rows, [["person9@example.com", "INACTIVE"]]);
    assert!(removal.job.tags.is_empty() && removal.job.set_fields.is_empty());
    assert_eq!(
        status_of(&sandbox, "person9@example.com"),
        Some(SubscriberStatus::Inactive)
    );
    let kept = sandbox.subscriber("person9@example.com").unwrap();
    assert_eq!(
        kept.fields.get("first_name").map(String::as_str),
        Some("Ann"),
        "removal keeps the fields"
    );
    assert_eq!(
        status_of(&sandbox, "person4@example.com"),
        Some(SubscriberStatus::Active)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_rows_are_reported_and_a_self_opt_out_is_respected() {
    let sandbox = sandbox(500).await;
    sandbox
        .seed_subscriber(Subscriber::self_opted_out("person3@example.com"))
        .unwrap();
    // E5 and E6 share an address: the first is kept, the second rejected.
    let csv = people_csv(6, |_| "Ann".into()).replace("person6@example.com", "person5@example.com");
    let s = scenario(&sandbox, &csv, "");
    let (run, report) = sync(&s, &[]).await;
    run.expect_code(3);
    assert_eq!(counts(&report), [6, 4, 0, 0, 0, 2]);
    let rejects = s.rejects();
    let reason = |key: &str| {
        rejects
            .iter()
            .find(|r| r.get(3) == Some(key))
            .map(|r| r.get(6).unwrap_or_default().to_string())
            .unwrap_or_else(|| panic!("{key} not rejected: {rejects:?}"))
    };
    assert!(
        reason("external_id:E3").contains("opted out"),
        "{rejects:?}"
    );
    assert!(
        reason("external_id:E6").contains("duplicate"),
        "{rejects:?}"
    );
    let stage = |key: &str| {
        rejects
            .iter()
            .find(|r| r.get(3) == Some(key))
            .and_then(|r| r.get(0).map(str::to_string))
    };
    assert_eq!(stage("external_id:E3").as_deref(), Some("sink"));
    // The engine itself refuses the second person of a shared address, naming the
    // first one's line, before Poppulo could merge them.
    assert_eq!(stage("external_id:E6").as_deref(), Some("validation"));
    assert!(reason("external_id:E6").contains("line 6"), "{rejects:?}");
    assert_eq!(
        status_of(&sandbox, "person3@example.com"),
        Some(SubscriberStatus::OptOut),
        "never re-subscribed"
    );

    // The opted-out person is not sent again every night, and the shared address is
    // refused again by the engine: nothing is left to send.
    let before = sandbox.imports().len();
    let (run, report) = sync(&s, &[]).await;
    run.expect_code(3);
    assert_eq!(sandbox.imports().len(), before, "no import: {report}");
    assert_eq!(counts(&report), [6, 0, 0, 0, 5, 1]);
    assert_eq!(
        status_of(&sandbox, "person3@example.com"),
        Some(SubscriberStatus::OptOut)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_and_a_busy_account_are_survived() {
    let sandbox = sandbox(500).await;
    let s = scenario(&sandbox, &people_csv(8, |_| "Ann".into()), "");
    sandbox.set_wire_faults(WireFaults {
        throttle_every: 2,
        retry_after_secs: 1,
        ..WireFaults::default()
    });
    sandbox.set_faults(Faults {
        busy_for_ms: 1500,
        ..Faults::default()
    });
    let (run, report) = sync(&s, &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report)[1], 8);
    let stats = sandbox.stats();
    assert!(
        stats.throttled > 0 && stats.imports_refused_busy > 0,
        "{stats:?}"
    );
    assert_eq!(stats.imports_posted, 1, "never two imports");
    assert_eq!(sandbox.subscribers().len(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_import_is_sent_again_by_the_next_run() {
    let sandbox = sandbox(500).await;
    let s = scenario(&sandbox, &people_csv(5, |_| "Ann".into()), "");
    sandbox.set_faults(Faults {
        fail_next_import: true,
        ..Faults::default()
    });
    let (run, report) = sync(&s, &[]).await;
    run.expect_code(1);
    assert_eq!(report["unknown"], 5);
    assert_eq!(sandbox.imports()[0].status, ImportStatus::Error);
    assert!(sandbox.subscribers().is_empty());

    let (run, report) = sync(&s, &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report)[1], 5, "the same records are sent again");
    assert_eq!(sandbox.subscribers().len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_during_polling_then_rerun_resumes_the_import() {
    // 10 records per 50 ms tick: 400 people take about two seconds to import.
    let sandbox = sandbox(10).await;
    let s = scenario(&sandbox, &people_csv(400, |_| "Ann".into()), "");
    let mut child = s
        .command(&["sync", "--from", "hr", "--to", "poppulo"])
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while sandbox.stats().import_polls == 0 {
        assert!(std::time::Instant::now() < deadline, "the run never polled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    unsafe {
        libc::kill(child.id() as i32, libc::SIGKILL);
    }
    let _ = child.wait();
    assert_eq!(
        sandbox.imports()[0].status,
        ImportStatus::InProgress,
        "killed while the import ran"
    );

    let (run, report) = sync(&s, &[]).await;
    run.expect_code(0);
    assert_eq!(report["recovered"], 400, "{report}");
    assert_eq!(counts(&report)[1], 0, "nothing left to create: {report}");
    assert_eq!(
        sandbox.stats().imports_posted,
        1,
        "the running import was resumed, not posted again"
    );
    assert_eq!(sandbox.subscribers().len(), 400);
    let (_, report) = sync(&s, &[]).await;
    assert_eq!(counts(&report), [400, 0, 0, 0, 400, 0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_fails_clearly_without_showing_it() {
    let sandbox = sandbox(500).await;
    let s = scenario(&sandbox, &people_csv(2, |_| "Ann".into()), "");
    s.write("password.txt", "wrong-Pw-0815");
    let (run, report) = sync(&s, &["-vv"]).await;
    run.expect_code(1);
    let all = format!("{}{}{}", run.stdout(), run.stderr(), report);
    assert!(all.to_lowercase().contains("auth"), "{all}");
    assert!(
        !all.contains("wrong-Pw-0815") && !all.contains(PASSWORD),
        "a secret leaked: {all}"
    );
    assert!(sandbox.subscribers().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_people_sharing_an_email_stay_one_created_and_one_rejected_every_run() {
    let sandbox = sandbox(500).await;
    // E2 (line 3) and E3 (line 4) share an address; Poppulo finds people by email, so
    // sending E3 would overwrite E2.
    let csv = people_csv(3, |i| format!("First{i}"))
        .replace("person3@example.com", "person2@example.com");
    let s = scenario(&sandbox, &csv, "");
    for run_number in 1..=3 {
        let (run, report) = sync(&s, &[]).await;
        run.expect_code(3);
        let created = if run_number == 1 { 2 } else { 0 };
        assert_eq!(
            counts(&report),
            [3, created, 0, 0, 2 - created, 1],
            "run {run_number}: {report}"
        );
        let rejects = s.rejects();
        assert_eq!(rejects.len(), 1, "run {run_number}: {rejects:?}");
        assert_eq!(rejects[0].get(2), Some("4"));
        assert_eq!(rejects[0].get(3), Some("external_id:E3"));
        assert!(rejects[0].get(6).unwrap().contains("line 3"), "{rejects:?}");
        let kept = sandbox
            .subscriber("person2@example.com")
            .expect("E2 exists");
        assert_eq!(
            kept.fields.get("first_name").map(String::as_str),
            Some("First2"),
            "run {run_number}: E2 was never overwritten"
        );
    }
    assert_eq!(
        sandbox.imports().len(),
        1,
        "only the first run sent anything"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_email_leaves_the_old_address_not_active() {
    let sandbox = sandbox(500).await;
    let s = scenario(&sandbox, &people_csv(3, |_| "Ann".into()), "");
    sync(&s, &[]).await.0.expect_code(0);
    s.write(
        "people.csv",
        &people_csv(3, |_| "Ann".into()).replace("person2@example.com", "p2.new@example.com"),
    );
    let (run, report) = sync(&s, &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report)[2], 1, "{report}");
    assert_eq!(
        sandbox.imports().len(),
        3,
        "the nightly: one import for the new address, one for the old"
    );
    assert_eq!(
        status_of(&sandbox, "p2.new@example.com"),
        Some(SubscriberStatus::Active)
    );
    assert_eq!(
        status_of(&sandbox, "person2@example.com"),
        Some(SubscriberStatus::Inactive),
        "the old address is not left subscribed"
    );
    // Nothing left to send, and the old address stays as it is.
    let (run, report) = sync(&s, &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report)[1..4], [0, 0, 0], "{report}");
    assert_eq!(sandbox.imports().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_people_and_staff_do_on_poppulo_stands() {
    use contactsync_sandbox_poppulo::RemovedBy;
    let sandbox = sandbox(500).await;
    let s = scenario(&sandbox, &people_csv(4, |_| "Ann".into()), "");
    sync(&s, &[]).await.0.expect_code(0);
    // On the platform: an administrator removes person1, person2 opts out, and staff
    // set person3's position, a field this source does not have.
    assert!(sandbox.edit_on_platform("person1@example.com", |p| {
        p.status = SubscriberStatus::Inactive;
        p.removed_by = Some(RemovedBy::Admin);
    }));
    assert!(sandbox.edit_on_platform("person2@example.com", |p| {
        p.status = SubscriberStatus::OptOut;
        p.removed_by = Some(RemovedBy::Subscriber);
    }));
    assert!(sandbox.edit_on_platform("person3@example.com", |p| {
        p.fields
            .insert("position_company".into(), "Chief Editor".into());
    }));
    // The source changes all three of them (and still lists them as active).
    s.write(
        "people.csv",
        &people_csv(4, |i| if i <= 3 { "Anna".into() } else { "Ann".into() }),
    );
    let (run, _report) = sync(&s, &[]).await;
    run.expect_code(3);
    assert_eq!(sandbox.imports().len(), 2);
    assert_eq!(
        status_of(&sandbox, "person1@example.com"),
        Some(SubscriberStatus::Inactive),
        "an administrator's removal stands"
    );
    assert_eq!(
        status_of(&sandbox, "person2@example.com"),
        Some(SubscriberStatus::OptOut),
        "a person's own opt-out stands"
    );
    let p3 = sandbox.subscriber("person3@example.com").unwrap();
    assert_eq!(
        p3.fields.get("first_name").map(String::as_str),
        Some("Anna")
    );
    assert_eq!(
        p3.fields.get("position_company").map(String::as_str),
        Some("Chief Editor"),
        "a field the source does not have is left alone"
    );
    // The opt-out is reported once, not every night.
    let rejects = s.rejects();
    assert!(
        rejects
            .iter()
            .any(|r| r.get(3) == Some("external_id:E2")
                && r.get(6).unwrap_or("").contains("opted out")),
        "{rejects:?}"
    );
    let (run, report) = sync(&s, &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report)[1..4], [0, 0, 0], "{report}");
    assert_eq!(sandbox.imports().len(), 2, "nothing sent again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_active_row_poppulo_skips_is_not_recorded_as_applied() {
    use contactsync_sandbox_poppulo::RemovedBy;
    let sandbox = sandbox(500).await;
    // Someone an administrator removed before the first sync: the create's ACTIVE
    // row is skipped, and Poppulo counts it nowhere.
    sandbox
        .seed_subscriber(
            Subscriber::new("person2@example.com")
                .with_status(SubscriberStatus::Inactive, Some(RemovedBy::Admin)),
        )
        .unwrap();
    let s = scenario(&sandbox, &people_csv(3, |_| "Ann".into()), "");
    let (run, report) = sync(&s, &[]).await;
    run.expect_code(3);
    assert_eq!(counts(&report)[1], 2, "{report}");
    let rejects = s.rejects();
    assert!(
        rejects.iter().any(|r| r.get(3) == Some("external_id:E2")
            && r.get(6).unwrap_or("").contains("not reactivated")),
        "{rejects:?}"
    );
    assert_eq!(
        status_of(&sandbox, "person2@example.com"),
        Some(SubscriberStatus::Inactive)
    );
}

/// A row carries only what its own change sets: Bob's HR row has no department, and the
/// department a Poppulo admin gave him stands, through a first sync into the account
/// (where Ann's row has one) and through a nightly that changes both of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_neighbours_column_never_blanks_a_persons_field() {
    use contactsync_sandbox_poppulo::Subscriber;
    let sandbox = sandbox(500).await;
    sandbox
        .seed_subscriber(
            Subscriber::new("bob@example.com")
                .with_field("first_name", "Bob")
                .with_field("work_details/department", "Editorial"),
        )
        .unwrap();
    let people = |ann: &str, bob: &str| {
        format!(
            "external_id,email,first_name,last_name,department\n\
             E1,ann@example.com,{ann},Lee,Sales\n\
             E2,bob@example.com,{bob},Ray,\n"
        )
    };
    let s = scenario(&sandbox, &people("Ann", "Bob"), "");
    let (run, report) = sync(&s, &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report)[1], 2, "{report}");
    let department = |email: &str| {
        sandbox
            .subscriber(email)
            .and_then(|p| p.fields.get("work_details/department").cloned())
    };
    assert_eq!(department("ann@example.com").as_deref(), Some("Sales"));
    assert_eq!(
        department("bob@example.com").as_deref(),
        Some("Editorial"),
        "no empty department cell for Bob because Ann's row has one"
    );
    assert_eq!(
        report["imports"], 2,
        "one import per set of cells: {report}"
    );
    s.write("people.csv", &people("Anna", "Bobby"));
    let (run, report) = sync(&s, &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report)[2], 2, "{report}");
    assert_eq!(
        sandbox
            .subscriber("bob@example.com")
            .and_then(|p| p.fields.get("first_name").cloned())
            .as_deref(),
        Some("Bobby")
    );
    assert_eq!(department("bob@example.com").as_deref(), Some("Editorial"));
    assert_eq!(department("ann@example.com").as_deref(), Some("Sales"));
}

/// An address another person holds is never the target of a removal: C (E1) leaves and
/// B (E2) joins with C's address in the same night. B is created; C's removal is settled
/// without a row (`address_taken`); no later night deactivates B or writes C's name
/// over B's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_never_reaches_whoever_inherited_the_address() {
    let sandbox = sandbox(500).await;
    let before = "external_id,email,first_name,last_name\n\
                  E1,x@example.com,Cy,Old\n\
                  E3,p3@example.com,Di,Lee\n\
                  E4,p4@example.com,Ed,Lee\n";
    let s = scenario(&sandbox, before, "");
    sync(&s, &[]).await.0.expect_code(0);
    s.write(
        "people.csv",
        "external_id,email,first_name,last_name\n\
         E2,x@example.com,Bea,New\n\
         E3,p3@example.com,Di,Lee\n\
         E4,p4@example.com,Ed,Lee\n",
    );
    let (nightly, report) = sync(&s, &[]).await;
    for night in 0..2 {
        let x = sandbox.subscriber("x@example.com").unwrap();
        assert_eq!(x.status, SubscriberStatus::Active, "night {night}");
        assert_eq!(
            x.fields.get("first_name").map(String::as_str),
            Some("Bea"),
            "night {night}"
        );
        let (run, report) = sync(&s, &[]).await;
        run.expect_code(0);
        assert_eq!(counts(&report)[1..4], [0, 0, 0], "{report}");
    }
    nightly.expect_code(0);
    assert_eq!(report["address_taken"], 1, "{report}");
    assert_eq!(report["removed"], 0, "{report}");
    assert!(
        nightly.stdout().contains("address taken 1"),
        "{}",
        nightly.stdout()
    );
    let history = s.run(&["history", "x@example.com"]);
    assert!(
        history.stdout().contains("address_taken"),
        "{}",
        history.stdout()
    );
}

/// Consent belongs to the person: a create (a first sync into an account where people
/// exist) never re-grants what a person dropped on Poppulo, neither the source's
/// permissions nor `add_permissions`; someone new to Poppulo gets both; an update of
/// someone who dropped a permission does not bring it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_never_regrants_a_permission_the_person_dropped() {
    use contactsync_sandbox_poppulo::Subscriber;
    let sandbox = sandbox(500).await;
    // person1 is on Poppulo and dropped every permission.
    sandbox
        .seed_subscriber(Subscriber::new("person1@example.com").with_field("first_name", "Ann"))
        .unwrap();
    let people = |first: &str| {
        let mut csv = String::from("external_id,email,first_name,last_name,subscriptions\n");
        for i in 1..=3 {
            csv.push_str(&format!(
                "E{i},person{i}@example.com,{first},Lee,Newsletter\n"
            ));
        }
        csv
    };
    let s = scenario(
        &sandbox,
        &people("Ann"),
        "add_permissions = [\"Intranet\"]\n[sinks.poppulo.columns]\nsubscriptions = \"permissions\"",
    );
    let (run, report) = sync(&s, &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report)[1], 3, "{report}");
    let permissions = |email: &str| sandbox.subscriber(email).unwrap().permissions;
    assert!(
        permissions("person1@example.com").is_empty(),
        "{:?}",
        permissions("person1@example.com")
    );
    for new in ["person2@example.com", "person3@example.com"] {
        assert_eq!(
            permissions(new).into_iter().collect::<Vec<_>>(),
            ["Intranet", "Newsletter"],
            "{new}"
        );
    }
    // person2 drops Intranet on Poppulo; the source changes everyone's name.
    assert!(sandbox.edit_on_platform("person2@example.com", |p| {
        p.permissions.remove("Intranet");
    }));
    s.write("people.csv", &people("Anna"));
    let (run, report) = sync(&s, &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report)[2], 3, "{report}");
    assert!(permissions("person1@example.com").is_empty());
    assert_eq!(
        permissions("person2@example.com")
            .into_iter()
            .collect::<Vec<_>>(),
        ["Newsletter"],
        "an update grants nothing the person dropped"
    );
    assert_eq!(
        sandbox
            .subscriber("person1@example.com")
            .unwrap()
            .fields
            .get("first_name")
            .map(String::as_str),
        Some("Anna"),
        "the person's fields are synced all the same"
    );
}

/// Seen is not valid: people whose `external_id` cell goes blank (key `auto`, email
/// unchanged) are still in the source. Their old key's removal is settled by the new
/// key holding the same address (`address_taken`): nobody is deactivated, that night or
/// any later one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_changes_form_removes_nobody() {
    let sandbox = sandbox(500).await;
    let s = scenario(&sandbox, &people_csv(10, |_| "Ann".into()), "");
    sync(&s, &[]).await.0.expect_code(0);
    // Five external ids go blank in the export.
    let blanked: String = people_csv(10, |_| "Ann".into())
        .lines()
        .map(|line| match line.split_once(',') {
            Some((id, rest)) if ["E1", "E2", "E3", "E4", "E5"].contains(&id) => format!(",{rest}"),
            _ => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n";
    s.write("people.csv", &blanked);
    let (run, report) = sync(&s, &[]).await;
    run.expect_code(0);
    assert_eq!(report["address_taken"], 5, "{report}");
    for night in 0..2 {
        for i in 1..=10 {
            assert_eq!(
                status_of(&sandbox, &format!("person{i}@example.com")),
                Some(SubscriberStatus::Active),
                "night {night}: person{i}"
            );
        }
        let (run, report) = sync(&s, &[]).await;
        run.expect_code(0);
        assert_eq!(counts(&report)[1..4], [0, 0, 0], "{report}");
        assert_eq!(report["removed"], 0, "{report}");
    }
}
