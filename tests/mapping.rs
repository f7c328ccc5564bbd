//! What a person becomes on the platform: a pipeline's `map`, `on_create`, lookups and
//! `where`, through the binary into the Poppulo sandbox, read back from it.

mod common;

use common::{counts, read_rows, Run, Scenario};
use contactsync_sandbox_poppulo::{RunningPoppulo, Subscriber, SubscriberStatus};

const PASSWORD: &str = common::POPPULO_PASSWORD;

async fn sandbox() -> RunningPoppulo {
    common::poppulo_sandbox(500).await
}

const PEOPLE: &str = "external_id,email,first_name,last_name,department\n\
E1,ann@example.com,Ann,Lee,Sales\n\
E2,bob@example.com,Bob,Marsh,Marketing\n\
E3,cy@example.com,Cy,Hall,Contractors\n\
E4,dee@example.com,Dee,Ek,Sales\n";

fn scenario(sandbox: &RunningPoppulo, out_of_scope: &str) -> Scenario {
    let s = Scenario::new();
    s.write("people.csv", PEOPLE);
    s.write("password.txt", PASSWORD);
    s.write(
        "cost-centers.csv",
        "department,cost_center\nSales,CC-100\nMarketing,CC-200\n",
    );
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

[sinks.poppulo.columns]
"attributes.cost_center" = "Cost Center"
"attributes.origin" = "Origin"

[lookups.cost_centers]
file = "cost-centers.csv"

[pipelines.nightly]
from = "hr"
to = "poppulo"
max_removal_ratio = 0.5
where = "department != 'Contractors'"
out_of_scope = "{out_of_scope}"

[pipelines.nightly.map]
first_name = "{{{{ first_name | upper }}}}"
company = "{{{{ company | default('Acme') }}}}"
"attributes.cost_center" = "{{{{ lookup('cost_centers', department) }}}}"

[pipelines.nightly.on_create]
"attributes.origin" = "hr-sync"
"#,
        sandbox.base_url()
    ));
    s
}

async fn sync(s: &Scenario) -> (Run, serde_json::Value) {
    s.sync_off_runtime("hr", "poppulo", &[]).await
}

fn subscriber(sandbox: &RunningPoppulo, email: &str) -> Subscriber {
    sandbox
        .subscriber(email)
        .unwrap_or_else(|| panic!("{email} not in Poppulo"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_on_create_lookup_and_where_shape_what_poppulo_gets() {
    let sandbox = sandbox().await;
    let s = scenario(&sandbox, "remove");
    let (run, report) = sync(&s).await;
    run.expect_code(0);
    assert_eq!(counts(&report), [4, 3, 0, 0, 0, 0]);
    assert_eq!(report["out_of_scope"], 1);
    let ann = subscriber(&sandbox, "ann@example.com");
    assert_eq!(
        ann.fields.get("first_name").map(String::as_str),
        Some("ANN"),
        "{ann:?}"
    );
    assert_eq!(ann.fields.get("company").map(String::as_str), Some("Acme"));
    assert_eq!(
        ann.custom_fields.get("Cost Center").map(String::as_str),
        Some("CC-100")
    );
    assert_eq!(
        ann.custom_fields.get("Origin").map(String::as_str),
        Some("hr-sync")
    );
    assert!(
        sandbox.subscriber("cy@example.com").is_none(),
        "out of scope, never sent"
    );

    // Nothing changed: nothing is sent (the on_create value is not compared).
    let (run, report) = sync(&s).await;
    run.expect_code(0);
    assert_eq!(counts(&report), [4, 0, 0, 0, 3, 0]);

    // The lookup table changes for Marketing only, and Dee moves to Contractors.
    s.write(
        "cost-centers.csv",
        "department,cost_center\nSales,CC-100\nMarketing,CC-201\n",
    );
    s.write(
        "people.csv",
        &PEOPLE.replace("Dee,Ek,Sales", "Dee,Ek,Contractors"),
    );
    let imports_before = sandbox.imports().len();
    let (run, report) = sync(&s).await;
    run.expect_code(0);
    assert_eq!(counts(&report), [4, 0, 1, 1, 1, 0], "{report}");
    let bob = subscriber(&sandbox, "bob@example.com");
    assert_eq!(
        bob.custom_fields.get("Cost Center").map(String::as_str),
        Some("CC-201")
    );
    assert_eq!(
        bob.custom_fields.get("Origin").map(String::as_str),
        Some("hr-sync"),
        "an update keeps what on_create set"
    );
    let last = &sandbox.imports()[imports_before..];
    let sent: Vec<&str> = last
        .iter()
        .flat_map(|i| i.rows.iter().map(|r| r[0].as_str()))
        .collect();
    assert!(
        sent.contains(&"bob@example.com") && !sent.contains(&"ann@example.com"),
        "{sent:?}"
    );
    assert_ne!(
        subscriber(&sandbox, "dee@example.com").status,
        SubscriberStatus::Active,
        "out of scope now: removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_scope_keep_leaves_the_person_as_last_synced() {
    let sandbox = sandbox().await;
    let s = scenario(&sandbox, "keep");
    sync(&s).await.0.expect_code(0);
    s.write(
        "people.csv",
        &PEOPLE.replace("Dee,Ek,Sales", "Dee,Ek,Contractors"),
    );
    let (run, report) = sync(&s).await;
    run.expect_code(0);
    assert_eq!(counts(&report), [4, 0, 0, 0, 2, 0], "{report}");
    assert_eq!(report["out_of_scope"], 2);
    assert_eq!(
        subscriber(&sandbox, "dee@example.com").status,
        SubscriberStatus::Active
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_syntax_error_exits_2_naming_the_field() {
    let sandbox = sandbox().await;
    let s = scenario(&sandbox, "remove");
    let config = std::fs::read_to_string(s.path("contactsync.toml"))
        .unwrap()
        .replace(
            "{{ company | default('Acme') }}",
            "{{ company | default('Acme') ",
        );
    s.config(&config);
    let (run, _) = sync(&s).await;
    run.expect_code(2);
    assert!(
        run.stderr().contains("[pipelines.nightly] map.\"company\""),
        "{}",
        run.stderr()
    );
    assert!(run.stderr().contains("line 1"), "{}", run.stderr());
    assert!(sandbox.subscribers().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_shows_what_the_first_records_become_before_any_sync() {
    let sandbox = sandbox().await;
    let s = scenario(&sandbox, "remove");
    let run = s.run_off_runtime(&["check"]).await;
    run.expect_code(0);
    let out = run.stdout();
    assert!(
        out.contains("first 4 records: 3 would be sent, 1 out of scope, 0 rejected"),
        "{out}"
    );
    assert!(out.contains("first_name: \"Ann\" -> \"ANN\""), "{out}");
    assert!(out.contains("company: (unset) -> \"Acme\""), "{out}");
    assert!(
        out.contains("attributes.cost_center: (unset) -> \"CC-100\""),
        "{out}"
    );
    assert!(
        out.contains("attributes.origin: (unset) -> \"hr-sync\""),
        "{out}"
    );
    assert!(out.contains("people.csv:4: out of scope"), "{out}");
    assert!(sandbox.subscribers().is_empty(), "check changes nothing");
}

/// A csv -> csv pipeline that maps its records skips the rows that did not change by
/// its memo of what each became; a new lookup table or template is a new mapping, and
/// re-sends exactly the people it changes.
#[test]
fn a_new_lookup_table_or_template_re_sends_the_people_it_changes_to_a_csv_file() {
    let s = Scenario::new();
    s.write("people.csv", PEOPLE);
    let centers = |sales: &str| {
        s.write(
            "cost-centers.csv",
            &format!("department,cost_center\nSales,{sales}\nMarketing,CC-200\n"),
        )
    };
    let config = |display: &str| {
        s.config(&format!(
            r#"
state = "data/state.db"

[sources.hr]
type = "csv"
path = "people.csv"

[sinks.out]
type = "csv"
path = "out.csv"

[lookups.cost_centers]
file = "cost-centers.csv"

[pipelines.nightly]
from = "hr"
to = "out"

[pipelines.nightly.map]
display_name = "{display}"
"attributes.cost_center" = "{{{{ lookup('cost_centers', department, 'none') }}}}"
"#
        ))
    };
    let cells = |value: &str| {
        read_rows(&s.path("out.csv"))
            .iter()
            .filter(|row| row.iter().any(|cell| cell == value))
            .count()
    };
    centers("CC-100");
    config("{{ first_name }} {{ last_name | upper }}");
    let sync = || {
        let (run, report) = s.sync("hr", "out", &[]);
        run.expect_code(0);
        counts(&report)
    };
    assert_eq!(sync(), [4, 4, 0, 0, 0, 0]);
    assert_eq!(sync(), [4, 0, 0, 0, 4, 0]);
    assert_eq!(cells("Ann LEE"), 1);

    centers("CC-900");
    assert_eq!(sync(), [4, 0, 2, 0, 2, 0], "the two in Sales");
    assert_eq!((cells("CC-900"), cells("CC-100")), (2, 0));
    assert_eq!(sync(), [4, 0, 0, 0, 4, 0]);

    config("{{ last_name }}, {{ first_name }}");
    assert_eq!(sync(), [4, 0, 4, 0, 0, 0], "everyone's display name");
    assert_eq!((cells("Lee, Ann"), cells("Ann LEE")), (1, 0));
    assert_eq!(sync(), [4, 0, 0, 0, 4, 0]);
}
