//! `contactsync sync --all` and `--pipeline NAME`: every pipeline of the config in one
//! command, one summary table, the worst exit code, one report.

mod common;

use common::{people_csv, read_rows, Scenario};

const CONFIG: &str = r#"
state = "data/state.db"

[sources.hr]
type = "csv"
path = "people.csv"

[sources.contractors]
type = "csv"
path = "contractors.csv"

[sinks.directory]
type = "csv"
path = "directory.csv"

[sinks.mailing]
type = "csv"
path = "mailing.csv"

[pipelines.staff]
from = "hr"
to = "directory"

[pipelines.contractors]
from = "contractors"
to = "directory"

[pipelines.mailing]
from = "hr"
to = "mailing"
"#;

fn scenario() -> Scenario {
    let s = Scenario::new();
    s.config(CONFIG);
    s.write("people.csv", &people_csv(4, |_| "Ann".into()));
    s.write(
        "contractors.csv",
        &people_csv(3, |_| "Cy".into())
            .replace("person", "contractor")
            .replace(",E", ",C"),
    );
    s
}

#[test]
fn sync_all_runs_every_pipeline_and_exits_with_the_worst_code() {
    let s = scenario();
    // The contractors' file has a bad email: that pipeline finishes with rejects (3).
    s.write(
        "contractors.csv",
        "external_id,email,first_name\nC1,c1@example.com,Cy\nC2,broken,Cy\n",
    );
    let report = s.path("all.json");
    let run = s.run(&[
        "sync",
        "--all",
        "--jobs",
        "2",
        "--report",
        report.to_str().unwrap(),
        "--rejects",
        "rejects",
    ]);
    run.expect_code(3);
    let stdout = run.stdout();
    let table: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("pipeline "))
        .collect();
    assert_eq!(table.len(), 4, "{stdout}");
    // In config order.
    assert!(
        table[1].starts_with("staff ") && table[1].contains("synced"),
        "{stdout}"
    );
    assert!(
        table[2].starts_with("contractors ") && table[2].contains("finished_with_rejects"),
        "{stdout}"
    );
    assert!(
        table[3].starts_with("mailing ") && table[3].contains("synced"),
        "{stdout}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap();
    let pipelines = json["pipelines"].as_array().unwrap();
    assert_eq!(pipelines.len(), 3);
    assert_eq!(pipelines[0]["pipeline"], "hr->directory");
    assert_eq!(pipelines[1]["rejected"], 1);
    // One sink section, two pipelines: both wrote it, one after the other.
    assert_eq!(read_rows(&s.path("directory.csv")).len(), 4 + 1);
    assert_eq!(read_rows(&s.path("mailing.csv")).len(), 4);
    assert!(
        s.path("rejects/contractors.csv").exists(),
        "one rejects file a pipeline"
    );

    // A failing pipeline makes the command fail, the others still run.
    std::fs::remove_file(s.path("people.csv")).unwrap();
    let run = s.run(&["sync", "--all"]);
    run.expect_code(1);
    assert!(run.stdout().contains("contractors"), "{}", run.stdout());
}

#[test]
fn sync_pipeline_runs_the_named_ones_and_an_unknown_name_is_a_usage_error() {
    let s = scenario();
    let run = s.run(&["sync", "--pipeline", "mailing"]);
    run.expect_code(0);
    assert!(s.path("mailing.csv").exists());
    assert!(!s.path("directory.csv").exists());
    let run = s.run(&["sync", "--pipeline", "nope"]);
    run.expect_code(2);
    assert!(
        run.stderr().contains("staff, contractors, mailing"),
        "{}",
        run.stderr()
    );
    s.run(&["sync"]).expect_code(2);
}
