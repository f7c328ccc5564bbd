//! csv → csv through the binary: what a run does to people when the export is not
//! clean. Seen is not valid: a rejected row keeps its person; a row whose person cannot
//! be told holds back every removal; the header's shape is checked once for the file;
//! the plan shows each field that changes.

mod common;

use common::{counts, people_csv, read_rows, Scenario};

const CONFIG: &str = r#"
state = "data/state.db"

[sources.hr]
type = "csv"
path = "people.csv"

[sinks.out]
type = "csv"
path = "out.csv"

[pipelines.p]
from = "hr"
to = "out"
max_removal_ratio = 0.5
"#;

const HEADER: &str = "external_id,email,first_name,last_name,department\n";

fn row(i: usize, first: &str) -> String {
    format!("E{i},person{i}@example.com,{first},Last{i},Dept{}\n", i % 3)
}

fn synced_scenario(n: usize) -> Scenario {
    let s = Scenario::new();
    s.config(CONFIG);
    s.write("people.csv", &people_csv(n, |_| "Ann".into()));
    s.sync("hr", "out", &[]).0.expect_code(0);
    assert_eq!(read_rows(&s.path("out.csv")).len(), n);
    s
}

fn reject_at<'a>(rejects: &'a [csv::StringRecord], line: &str) -> &'a csv::StringRecord {
    rejects
        .iter()
        .find(|r| r.get(2) == Some(line))
        .unwrap_or_else(|| panic!("no reject at line {line}: {rejects:?}"))
}

fn out_row(s: &Scenario, id: &str) -> Option<csv::StringRecord> {
    read_rows(&s.path("out.csv"))
        .into_iter()
        .find(|r| r.get(0) == Some(id))
}

#[test]
fn invalid_rows_keep_their_people_and_an_unreadable_row_holds_back_removals() {
    let s = synced_scenario(10);
    // Line 3 (E2) has a bad email, line 4 (E3) an unknown status, line 5 (E4) a field
    // too few; everyone else changes their first name.
    let mut csv = String::from("external_id,email,first_name,last_name,department,status\n");
    for i in 1..=10 {
        csv.push_str(&match i {
            2 => "E2,not-an-email,Bea,Last2,Dept2,active\n".to_string(),
            3 => "E3,person3@example.com,Bea,Last3,Dept0,maybe\n".to_string(),
            4 => "E4,person4@example.com,Bea,Last4\n".to_string(),
            _ => format!(
                "E{i},person{i}@example.com,Bea,Last{i},Dept{},active\n",
                i % 3
            ),
        });
    }
    s.write("people.csv", &csv);
    let (run, report) = s.sync("hr", "out", &[]);
    run.expect_code(3);
    assert_eq!(report["status"], "removals_held", "{report}");
    // 7 updated, nobody removed, 3 rejected.
    assert_eq!(counts(&report), [10, 0, 7, 0, 0, 3]);
    // E4's row cannot be read, so E4 is the one person the sweep would have removed.
    assert_eq!(report["removals_held"], 1, "{report}");
    assert!(report["removals_held_reason"]
        .as_str()
        .unwrap()
        .contains("no key"));
    assert!(
        run.stdout().starts_with("removals_held: hr->out:"),
        "{}",
        run.stdout()
    );
    assert!(run.stdout().contains("removals held"), "{}", run.stdout());

    let rejects = s.rejects();
    assert_eq!(rejects.len(), 3, "{rejects:?}");
    assert_eq!(reject_at(&rejects, "3").get(5), Some("email"));
    assert_eq!(reject_at(&rejects, "3").get(3), Some("external_id:E2"));
    assert_eq!(reject_at(&rejects, "4").get(5), Some("status"));
    assert_eq!(reject_at(&rejects, "4").get(3), Some("external_id:E3"));
    assert!(reject_at(&rejects, "5").get(6).unwrap().contains("fields"));

    // All ten are still there; the three rejected keep what was last synced.
    assert_eq!(read_rows(&s.path("out.csv")).len(), 10);
    for id in ["E2", "E3", "E4"] {
        let row = out_row(&s, id).unwrap_or_else(|| panic!("{id} was removed"));
        assert!(
            row.iter().any(|v| v == "Ann"),
            "{id} kept its values: {row:?}"
        );
    }
    assert!(out_row(&s, "E5").unwrap().iter().any(|v| v == "Bea"));

    // Fixed, the next run updates the three and removes nobody.
    s.write("people.csv", &people_csv(10, |_| "Bea".into()));
    let (run, report) = s.sync("hr", "out", &[]);
    run.expect_code(0);
    assert_eq!(counts(&report), [10, 0, 3, 0, 7, 0]);
}

#[test]
fn a_bad_value_alone_does_not_hold_back_real_removals() {
    let s = synced_scenario(10);
    // E10 left; E2's email is broken.
    let mut csv = String::from(HEADER);
    for i in 1..=9 {
        csv.push_str(&if i == 2 {
            "E2,person2-at-example.com,Ann,Last2,Dept2\n".to_string()
        } else {
            row(i, "Ann")
        });
    }
    s.write("people.csv", &csv);
    let (run, report) = s.sync("hr", "out", &[]);
    run.expect_code(3);
    assert_eq!(report["status"], "finished_with_rejects");
    assert_eq!(counts(&report), [9, 0, 0, 1, 8, 1]);
    assert!(out_row(&s, "E10").is_none(), "the leaver is removed");
    assert!(
        out_row(&s, "E2").is_some(),
        "the invalid row's person stays"
    );
}

#[test]
fn an_unterminated_quote_is_rejected_at_its_line_and_removes_nobody() {
    let s = synced_scenario(30);
    // Line 30 of 31 opens a quote that never closes: it would swallow line 31.
    let mut csv = String::from(HEADER);
    for i in 1..=30 {
        csv.push_str(&if i == 29 {
            "E29,person29@example.com,Ann,\"Last29,Dept2\n".to_string()
        } else {
            row(i, "Ann")
        });
    }
    s.write("people.csv", &csv);
    let (run, report) = s.sync("hr", "out", &[]);
    run.expect_code(3);
    assert_eq!(report["status"], "removals_held", "{report}");
    assert_eq!(report["removed"], 0);
    assert_eq!(report["removals_held"], 2, "E29 and E30: {report}");
    let rejects = s.rejects();
    assert_eq!(rejects.len(), 1, "{rejects:?}");
    let reason = reject_at(&rejects, "30").get(6).unwrap();
    assert!(reason.contains("never closed"), "{reason}");
    assert_eq!(read_rows(&s.path("out.csv")).len(), 30, "nobody removed");
}

#[test]
fn a_header_without_keys_or_with_a_column_twice_is_one_error_for_the_file() {
    let s = synced_scenario(5);
    let before = std::fs::read(s.path("out.csv")).unwrap();
    s.write(
        "people.csv",
        "id,mail,first_name\n1,a@example.com,Ann\n2,b@example.com,Bob\n",
    );
    let (run, report) = s.sync("hr", "out", &[]);
    run.expect_code(1);
    assert_eq!(report["status"], "failed");
    assert_eq!(report["rejected"], 0, "one error, not one reject a row");
    let error = report["error"].as_str().unwrap();
    assert!(error.contains("people.csv"), "{error}");
    assert!(
        error.contains("neither an email nor an external_id"),
        "{error}"
    );
    assert_eq!(
        std::fs::read(s.path("out.csv")).unwrap(),
        before,
        "sink untouched"
    );

    s.write(
        "people.csv",
        "external_id,email,first_name,Email\nE1,a@example.com,Ann,b@example.com\n",
    );
    let (run, report) = s.sync("hr", "out", &[]);
    run.expect_code(1);
    let error = report["error"].as_str().unwrap();
    assert!(error.contains("\"Email\""), "{error}");
    assert!(error.contains("both give the field email"), "{error}");
    assert_eq!(
        std::fs::read(s.path("out.csv")).unwrap(),
        before,
        "sink untouched"
    );
}

#[test]
fn line_numbers_are_right_in_a_file_with_windows_line_endings() {
    let s = Scenario::new();
    s.config(CONFIG);
    let csv = format!(
        "{HEADER}{}{}E3,broken,Cy,Last3,Dept0\n{}",
        row(1, "Ann"),
        row(2, "Ann"),
        row(4, "Ann")
    )
    .replace('\n', "\r\n");
    s.write("people.csv", &csv);
    let (run, report) = s.sync("hr", "out", &[]);
    run.expect_code(3);
    assert_eq!(counts(&report), [4, 3, 0, 0, 0, 1]);
    let rejects = s.rejects();
    assert_eq!(reject_at(&rejects, "4").get(3), Some("external_id:E3"));
    // The line ending is not part of the last field.
    let rows = read_rows(&s.path("out.csv"));
    assert!(
        rows.iter().any(|r| r.iter().any(|v| v == "Dept1")),
        "{rows:?}"
    );
    assert!(!rows.iter().any(|r| r.iter().any(|v| v.contains('\r'))));
}

#[test]
fn an_email_change_replaces_the_row() {
    let s = synced_scenario(5);
    s.write(
        "people.csv",
        &people_csv(5, |_| "Ann".into()).replace("person3@example.com", "new3@example.com"),
    );
    let (run, report) = s.sync("hr", "out", &["--plan", "plan.jsonl"]);
    run.expect_code(0);
    assert_eq!(counts(&report), [5, 0, 1, 0, 4, 0]);
    let rows = read_rows(&s.path("out.csv"));
    assert_eq!(rows.len(), 5);
    let e3 = out_row(&s, "E3").unwrap();
    assert!(e3.iter().any(|v| v == "new3@example.com"), "{e3:?}");
    assert!(!rows
        .iter()
        .any(|r| r.iter().any(|v| v == "person3@example.com")));
    let plan = std::fs::read_to_string(s.path("plan.jsonl")).unwrap();
    let change: serde_json::Value = serde_json::from_str(plan.trim()).unwrap();
    assert_eq!(
        change["fields"]["email"],
        serde_json::json!({"before": "person3@example.com", "after": "new3@example.com"})
    );
}

/// The nightly the bench makes: 1% changed, 0.5% added, 0.5% removed.
#[test]
fn the_plan_lists_exactly_the_nightly_delta_with_before_and_after() {
    let n = 400;
    let s = synced_scenario(n);
    let changed = |i: usize| i % 100 == 7;
    let removed = |i: usize| i % 200 == 13;
    let added = (n + 1)..=(n + n / 200);
    let mut csv = String::from(HEADER);
    for i in (1..=n).chain(added.clone()) {
        if removed(i) {
            continue;
        }
        csv.push_str(&row(i, if changed(i) { "Zed" } else { "Ann" }));
    }
    s.write("people.csv", &csv);

    let (run, report) = s.sync("hr", "out", &["--dry-run", "--plan", "plan.jsonl"]);
    run.expect_code(0);
    let expected_updates: Vec<usize> = (1..=n).filter(|&i| changed(i) && !removed(i)).collect();
    let expected_removals: Vec<usize> = (1..=n).filter(|&i| removed(i)).collect();
    assert_eq!(
        counts(&report)[1..4],
        [
            added.clone().count() as u64,
            expected_updates.len() as u64,
            expected_removals.len() as u64
        ]
    );
    // The dry run's summary shows the fields of the first changes.
    assert!(
        run.stdout().contains("first_name: \"Ann\" -> \"Zed\""),
        "{}",
        run.stdout()
    );

    let lines: Vec<serde_json::Value> = std::fs::read_to_string(s.path("plan.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    let of_kind = |kind: &str| -> Vec<&serde_json::Value> {
        lines.iter().filter(|l| l["kind"] == kind).collect()
    };
    let ids = |kind: &str| -> Vec<usize> {
        let mut ids: Vec<usize> = of_kind(kind)
            .iter()
            .map(|l| {
                l["key"].as_str().unwrap()["external_id:E".len()..]
                    .parse()
                    .unwrap()
            })
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(
        lines.len() as u64,
        counts(&report)[1..4].iter().sum::<u64>()
    );
    assert_eq!(ids("update"), expected_updates);
    assert_eq!(ids("remove"), expected_removals);
    assert_eq!(ids("create"), added.collect::<Vec<_>>());
    for update in of_kind("update") {
        assert_eq!(
            update["fields"],
            serde_json::json!({"first_name": {"before": "Ann", "after": "Zed"}}),
            "{update}"
        );
        assert!(update["origin"]
            .as_str()
            .unwrap()
            .starts_with("people.csv:"));
    }
    for create in of_kind("create") {
        assert_eq!(
            create["fields"]["first_name"]["before"],
            serde_json::Value::Null
        );
        assert_eq!(create["fields"]["first_name"]["after"], "Ann");
    }
    for removal in of_kind("remove") {
        assert_eq!(removal["fields"], serde_json::json!({}));
        assert!(removal["email"].as_str().unwrap().ends_with("@example.com"));
    }
    // A dry run changed nothing: the real run finds the same plan.
    let (run, report) = s.sync("hr", "out", &["--plan", "plan2.jsonl"]);
    run.expect_code(0);
    assert_eq!(report["updated"], expected_updates.len() as u64);
    assert_eq!(
        std::fs::read_to_string(s.path("plan2.jsonl"))
            .unwrap()
            .lines()
            .count(),
        lines.len()
    );
}

#[test]
fn a_record_longer_than_max_record_bytes_is_rejected_with_its_line_unread() {
    let s = Scenario::new();
    s.config(&CONFIG.replace(
        "path = \"people.csv\"",
        "path = \"people.csv\"\nmax_record_bytes = 4096",
    ));
    // Line 3 holds a 100 kB quoted value with line breaks; line 4 is a 100 kB bare one.
    let huge = "x".repeat(50_000);
    let csv = format!(
        "{HEADER}{}E2,person2@example.com,\"{huge}\n{huge}\",Last2,Dept2\nE3,person3@example.com,{huge}{huge},Last3,Dept0\n{}",
        row(1, "Ann"),
        row(5, "Ann"),
    );
    s.write("people.csv", &csv);
    let (run, report) = s.sync("hr", "out", &[]);
    run.expect_code(3);
    assert_eq!(counts(&report), [4, 2, 0, 0, 0, 2], "{report}");
    let rejects = s.rejects();
    for line in ["3", "5"] {
        let reason = reject_at(&rejects, line).get(6).unwrap();
        assert!(reason.contains("max_record_bytes (4096 bytes)"), "{reason}");
    }
    // The rejects file carries at most the limit of each, not the whole record.
    assert!(std::fs::metadata(s.path("rejects.csv")).unwrap().len() < 20_000);
    assert!(out_row(&s, "E5").is_some(), "the rows after it are read");
}
