//! csv → csv through the binary: the behaviours every pipeline has.

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
max_removal_ratio = 0.10
"#;

fn scenario(n: usize) -> Scenario {
    let s = Scenario::new();
    s.config(CONFIG);
    s.write("people.csv", &people_csv(n, |_| "Ann".into()));
    s
}

#[test]
fn first_run_creates_rerun_does_nothing_an_edit_sends_only_the_edit() {
    let s = scenario(20);
    let (run, report) = s.sync("hr", "out", &[]);
    run.expect_code(0);
    assert_eq!(counts(&report), [20, 20, 0, 0, 0, 0]);
    assert_eq!(read_rows(&s.path("out.csv")).len(), 20);

    let (run, report) = s.sync("hr", "out", &[]);
    run.expect_code(0);
    assert_eq!(counts(&report), [20, 0, 0, 0, 20, 0]);

    s.write(
        "people.csv",
        &people_csv(20, |i| if i == 7 { "Bea".into() } else { "Ann".into() }),
    );
    let (run, report) = s.sync("hr", "out", &[]);
    run.expect_code(0);
    assert_eq!(counts(&report), [20, 0, 1, 0, 19, 0]);
    let rows = read_rows(&s.path("out.csv"));
    let e7 = rows
        .iter()
        .find(|r| r.get(0) == Some("E7"))
        .expect("E7 kept");
    assert!(e7.iter().any(|v| v == "Bea"), "{e7:?}");
    assert_eq!(rows.len(), 20);
}

#[test]
fn dry_run_prints_the_plan_and_changes_nothing() {
    let s = scenario(5);
    let (run, report) = s.sync("hr", "out", &["--dry-run"]);
    run.expect_code(0);
    assert_eq!(report["dry_run"], true);
    assert_eq!(counts(&report)[1], 5, "planned creates");
    assert!(run.stdout().contains("create"), "{}", run.stdout());
    assert!(run.stdout().contains("external_id:E1"), "{}", run.stdout());
    assert!(!s.path("out.csv").exists(), "the sink was not touched");
    let state = s.run(&["state", "show", "--json"]);
    state.expect_code(0);
    assert_eq!(state.stdout().trim(), "[]", "the state was not touched");
}

#[test]
fn a_truncated_export_is_refused_unless_allowed() {
    let s = scenario(30);
    s.sync("hr", "out", &[]).0.expect_code(0);
    s.write("people.csv", &people_csv(3, |_| "Ann".into()));
    let (run, report) = s.sync("hr", "out", &["--metrics", "m.prom"]);
    run.expect_code(4);
    assert_eq!(report["status"], "refused");
    assert!(
        run.stderr().contains("--allow-mass-removal"),
        "{}",
        run.stderr()
    );
    assert_eq!(read_rows(&s.path("out.csv")).len(), 30, "nothing removed");
    // The counts say what happened (nothing); what would have is the plan's, in its
    // own words, the same in the report, the summary, `runs` and the metrics.
    assert_eq!(report["removed"], 0, "{report}");
    assert_eq!(report["planned"]["removed"], 27, "{report}");
    assert!(
        run.stdout()
            .contains("would have created 0, updated 0, removed 27"),
        "{}",
        run.stdout()
    );
    let runs: serde_json::Value =
        serde_json::from_str(&s.run(&["runs", "--json"]).stdout()).unwrap();
    let last = runs
        .as_array()
        .and_then(|r| r.iter().find(|r| r["status"] == "refused"))
        .cloned()
        .unwrap_or_default();
    assert!(!last.to_string().contains("\"removed\":27"), "{last}");
    let metrics = std::fs::read_to_string(s.path("m.prom")).unwrap();
    assert!(
        metrics.contains("contactsync_records{pipeline=\"hr->out\",outcome=\"removed\"} 0"),
        "{metrics}"
    );

    // An empty file (header only) as well.
    s.write(
        "people.csv",
        "external_id,email,first_name,last_name,department\n",
    );
    s.sync("hr", "out", &[]).0.expect_code(4);
    assert_eq!(read_rows(&s.path("out.csv")).len(), 30);

    s.write("people.csv", &people_csv(3, |_| "Ann".into()));
    let (run, report) = s.sync("hr", "out", &["--allow-mass-removal"]);
    run.expect_code(0);
    assert_eq!(counts(&report)[3], 27);
    assert_eq!(read_rows(&s.path("out.csv")).len(), 3);
}

#[test]
fn bad_rows_are_rejected_with_file_line_and_field_and_the_run_goes_on() {
    let s = scenario(0);
    s.write(
        "people.csv",
        "external_id,email,first_name,last_name,department\n\
         E1,ann@example.com,Ann,Lee,Sales\n\
         E2,not-an-email,Bob,Marsh,Sales\n\
         E1,ann.again@example.com,Ann,Again,Sales\n\
         E3,carl@example.com,Carl\n\
         ,,Nobody,Nokey,Sales\n\
         E4,dana@example.com,Dana,Ek,Ops\n",
    );
    let (run, report) = s.sync("hr", "out", &[]);
    run.expect_code(3);
    assert_eq!(report["status"], "finished_with_rejects");
    assert_eq!(counts(&report), [6, 2, 0, 0, 0, 4]);
    let rejects = s.rejects();
    let by_line = |line: &str| {
        rejects
            .iter()
            .find(|r| r.get(2) == Some(line))
            .unwrap_or_else(|| panic!("no reject at line {line}: {rejects:?}"))
            .clone()
    };
    assert!(by_line("3").get(1).unwrap().ends_with("people.csv"));
    assert_eq!(by_line("3").get(5), Some("email"));
    assert!(by_line("4").get(6).unwrap().contains("duplicate key"));
    assert!(
        by_line("5").get(6).unwrap().contains("fields"),
        "{:?}",
        by_line("5")
    );
    assert!(by_line("6").get(6).unwrap().contains("no key"));
    assert!(
        run.stdout().contains("rejects.csv"),
        "the summary names the rejects file"
    );
    assert_eq!(read_rows(&s.path("out.csv")).len(), 2);
}

/// A nightly settles the rows it finds as the state holds them by their hashes alone
/// (no record built), and they are still seen: a second row of a person, identical to
/// what was synced, is rejected as a duplicate with its line, and the person is kept.
#[test]
fn a_nightly_rejects_a_repeated_unchanged_row_and_keeps_its_person() {
    let s = scenario(5);
    let (run, report) = s.sync("hr", "out", &[]);
    run.expect_code(0);
    assert_eq!(counts(&report), [5, 5, 0, 0, 0, 0]);
    let mut rows: Vec<String> = people_csv(5, |_| "Ann".into())
        .lines()
        .map(str::to_string)
        .collect();
    // Line 4 repeats line 3 (E2) as it was synced; E4's row changes; E3's row reads as
    // before through padding and a domain in capitals.
    rows.insert(3, rows[2].clone());
    rows[4] = " E3 , person3@EXAMPLE.com ,Ann,Last3,Dept0".to_string();
    rows[5] = rows[5].replace("Ann", "Bea");
    s.write("people.csv", &(rows.join("\n") + "\n"));
    let (run, report) = s.sync("hr", "out", &[]);
    run.expect_code(3);
    assert_eq!(counts(&report), [6, 0, 1, 0, 4, 1]);
    let rejects = s.rejects();
    assert_eq!(rejects.len(), 1, "{rejects:?}");
    assert_eq!(rejects[0].get(2), Some("4"));
    assert_eq!(rejects[0].get(5), Some("external_id"));
    assert!(
        rejects[0]
            .get(6)
            .unwrap()
            .contains("duplicate key external_id:E2"),
        "{rejects:?}"
    );
    assert_eq!(read_rows(&s.path("out.csv")).len(), 5);
}

#[test]
fn config_errors_name_the_key_and_exit_2() {
    let s = scenario(1);
    s.config(&CONFIG.replace(
        "path = \"people.csv\"",
        "path = \"people.csv\"\npaht = \"x\"",
    ));
    let run = s.run(&["sync", "--from", "hr", "--to", "out"]);
    run.expect_code(2);
    assert!(run.stderr().contains("paht"), "{}", run.stderr());
    assert!(run.stderr().contains("sources.hr"), "{}", run.stderr());

    let run = s.run(&["sync", "--from", "nope", "--to", "out"]);
    run.expect_code(2);
    assert!(run.stderr().contains("[sources.nope]"), "{}", run.stderr());

    let run = s.run(&["sync", "--from", "hr", "--to", "out", "--mode", "sideways"]);
    run.expect_code(2);
}

#[test]
fn environment_overrides_the_file() {
    let s = scenario(2);
    s.write("other.csv", &people_csv(4, |_| "Env".into()));
    let report = s.path("report.json");
    let run = s
        .command(&[
            "sync",
            "--from",
            "hr",
            "--to",
            "out",
            "--report",
            report.to_str().unwrap(),
        ])
        .env("CONTACTSYNC_SOURCES__HR__PATH", "other.csv")
        .output()
        .unwrap();
    assert_eq!(
        run.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap();
    assert_eq!(report["created"], 4);
}

/// An override that names a section the file does not have is a config error naming
/// the variable: the guard a user thinks they set must not silently be missing.
#[test]
fn an_override_of_a_section_the_file_lacks_is_a_config_error() {
    let s = scenario(0);
    s.write("people.csv", &people_csv(4, |_| "Ann".into()));
    let run = s
        .command(&["sync", "--from", "hr", "--to", "out"])
        .env("CONTACTSYNC_PIPELINES__NIGHTLYY__MAX_REMOVAL_RATIO", "0.01")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("CONTACTSYNC_PIPELINES__NIGHTLYY__MAX_REMOVAL_RATIO"),
        "{stderr}"
    );
    assert!(!s.path("out.csv").exists(), "nothing ran");
}

/// A reader that goes away (`contactsync sync --all | head -1`) ends the output
/// quietly: no panic, and the pipelines after the first still run.
#[test]
fn a_closed_stdout_stops_neither_the_sync_nor_later_pipelines() {
    let s = Scenario::new();
    s.config(&format!(
        "{CONFIG}\n[sinks.out2]\ntype = \"csv\"\npath = \"out2.csv\"\n\n[pipelines.q]\nfrom = \"hr\"\nto = \"out2\"\n"
    ));
    s.write("people.csv", &people_csv(5, |_| "Ann".into()));
    let mut child = s
        .command(&["sync", "--all"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The reader is gone before anything is written.
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(read_rows(&s.path("out.csv")).len(), 5);
    assert_eq!(
        read_rows(&s.path("out2.csv")).len(),
        5,
        "the second pipeline ran"
    );
    // `history --json | head`: the same.
    let mut child = s
        .command(&["history", "person1@example.com", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    assert!(
        !String::from_utf8_lossy(&output.stderr).contains("panicked"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_ne!(output.status.code(), Some(101));
}

/// Where a run is killed: before the sink's finish (applying), during it (the file
/// written while the state's confirm is held open: either may be done, the state not
/// yet told), after it (the file renamed, the confirm committed, the sink's
/// fingerprint kept). The log line that says the run got there.
const KILL_POINTS: [(&str, &str); 3] = [
    ("before the finish", "applying:"),
    ("during the finish", "finishing"),
    ("after the finish", "CSV file written"),
];

/// The log line of a first sync's point before the finish: it is sent to the sink
/// while it is read, so it is applying before the read ends.
const FIRST_SYNC_SENDING: &str = "sent to the sink as it is read";

/// A first sync and a nightly, each killed with -9 at each point: the rerun converges
/// with no duplicate and no lost change. A sink durable at its finish has its batches
/// recorded straight into the state once its file is durable, so a kill before that
/// leaves nothing recorded, and the rerun sends everything again into a file that is
/// keyed; a kill after it leaves nothing to do.
#[test]
fn a_run_killed_before_during_or_after_the_sinks_finish_is_finished_by_the_next_without_duplicates()
{
    let n = 60_000;
    for (point, line) in KILL_POINTS {
        let s = scenario(0);
        s.write("people.csv", &people_csv(n, |_| "Ann".into()));
        let first_sync_line = match point {
            "before the finish" => FIRST_SYNC_SENDING,
            _ => line,
        };
        kill_at(&s, first_sync_line, point);
        let written_before_rerun = std::fs::metadata(s.path("out.csv")).is_ok();
        let after = point == "after the finish";
        if after {
            assert!(written_before_rerun, "{point}: the file was written");
            assert_eq!(read_rows(&s.path("out.csv")).len(), n, "{point}");
        }
        // Sent again: everyone unless the run got to its end.
        let again = if after { 0 } else { n as u64 };
        assert_eq!(
            synced(&s),
            n as u64 - again,
            "{point}: recorded once the file was durable, not before"
        );
        let (run, report) = s.sync("hr", "out", &[]);
        run.expect_code(0);
        assert_eq!(report["created"], again, "{point}: sent again");
        assert_eq!(
            read_rows(&s.path("out.csv")).len(),
            n,
            "{point}: no duplicate"
        );

        // Everyone changes, and the nightly is killed at the same point.
        s.write("people.csv", &people_csv(n, |_| "Zoe".into()));
        kill_at(&s, line, point);
        if point == "after the finish" {
            let rows = read_rows(&s.path("out.csv"));
            assert!(rows.iter().all(|r| r.iter().any(|v| v == "Zoe")), "{point}");
        }
        let (run, report) = s.sync("hr", "out", &[]);
        run.expect_code(0);
        assert_eq!(report["rejected"], 0);
        assert_eq!(report["updated"], again, "{point}: sent again");
        let rows = read_rows(&s.path("out.csv"));
        assert_eq!(rows.len(), n, "{point}: no duplicate, no loss");
        assert!(
            rows.iter().all(|r| r.iter().any(|v| v == "Zoe")),
            "{point}: every change applied"
        );
        let (_, report) = s.sync("hr", "out", &[]);
        assert_eq!(
            counts(&report),
            [n as u64, 0, 0, 0, n as u64, 0],
            "{point}: converged"
        );
        // The history says what the sink confirmed: the killed runs' changes (if they
        // were audited before the kill) were sent, never made durable; the ones that
        // were are the reruns'.
        let history = s.run(&["history", "person1@example.com"]).stdout();
        for kind in [" create ", " update "] {
            let lines: Vec<&str> = history.lines().filter(|l| l.contains(kind)).collect();
            assert_eq!(
                lines.iter().filter(|l| l.contains("(applied)")).count(),
                1,
                "{point}: {history}"
            );
        }
    }
}

/// Counts say what the sink confirmed: a run interrupted before the CSV file was
/// written counts no create or update (those sent are `unconfirmed`), and neither do
/// `runs` nor the metrics. A first sync is sent as it is read, so it is interrupted
/// once it has begun sending.
#[test]
fn an_interrupted_run_counts_nothing_the_sink_did_not_make_durable() {
    let s = scenario(0);
    let n = 60_000;
    s.write("people.csv", &people_csv(n, |_| "Ann".into()));
    let mut child = s
        .command(&[
            "sync",
            "--from",
            "hr",
            "--to",
            "out",
            "--report",
            "report.json",
            "--metrics",
            "m.prom",
        ])
        .stdout(std::process::Stdio::null())
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_line(&mut child, FIRST_SYNC_SENDING);
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    assert_eq!(child.wait().unwrap().code(), Some(130));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.path("report.json")).unwrap()).unwrap();
    assert_eq!(report["status"], "interrupted");
    assert_eq!(report["created"], 0, "{report}");
    assert!(
        report["unconfirmed"]
            .as_u64()
            .is_some_and(|sent| sent <= n as u64),
        "{report}"
    );
    let runs = s.run(&["runs", "--json"]).stdout();
    let runs: serde_json::Value = serde_json::from_str(&runs).unwrap();
    assert!(!runs.to_string().contains("\"created\":60000"), "{runs}");
    let metrics = std::fs::read_to_string(s.path("m.prom")).unwrap();
    assert!(
        metrics.contains("contactsync_records{pipeline=\"hr->out\",outcome=\"created\"} 0"),
        "{metrics}"
    );
    let (run, report) = s.sync("hr", "out", &[]);
    run.expect_code(0);
    assert_eq!(report["created"], n as u64);
}

#[test]
fn connectors_lists_every_linked_connector() {
    let s = scenario(0);
    let run = s.run(&["connectors"]);
    run.expect_code(0);
    for name in ["csv", "poppulo", "businesscatalyst", "ldap", "actito"] {
        assert!(
            run.stdout().contains(name),
            "{name} missing: {}",
            run.stdout()
        );
    }
}

#[test]
fn state_show_and_reset() {
    let s = scenario(3);
    s.sync("hr", "out", &[]).0.expect_code(0);
    let run = s.run(&["state", "show"]);
    assert!(
        run.stdout().contains("hr->out: 3 synced, 0 pending"),
        "{}",
        run.stdout()
    );
    s.run(&["state", "reset", "--from", "hr", "--to", "out"])
        .expect_code(2);
    s.run(&["state", "reset", "--from", "hr", "--to", "out", "--yes"])
        .expect_code(0);
    let (_, report) = s.sync("hr", "out", &[]);
    assert_eq!(report["created"], 3, "everyone sent again, as upserts");
    assert_eq!(
        read_rows(&s.path("out.csv")).len(),
        3,
        "no duplicates after a reset"
    );
}

/// A worker that died mid-pipeline leaves its claim: a worker that went by while the
/// holder was alive looks again before it stops, and runs that pipeline. A worker with
/// nothing left to run still writes its report (an empty list).
#[test]
fn a_dead_workers_claim_is_run_by_a_worker_before_it_stops() {
    let s = Scenario::new();
    s.config(
        r#"
state = "data/state.db"
[sources.hr]
type = "csv"
path = "people.csv"
[sinks.out]
type = "csv"
path = "out.csv"
[sinks.out2]
type = "csv"
path = "out2.csv"
[pipelines.second]
from = "hr"
to = "out2"
[pipelines.first]
from = "hr"
to = "out"
"#,
    );
    s.write("people.csv", &people_csv(150_000, |_| "Ann".into()));
    s.run(&["state", "show"]).expect_code(0);
    // Another worker claimed `second` and is alive for a moment, then dies without
    // finishing it.
    let mut holder = std::process::Command::new("sleep")
        .arg("1")
        .spawn()
        .unwrap();
    let claimed = std::process::Command::new("python3")
        .arg("-c")
        .arg(
            "import socket, sqlite3, sys\n\
             c = sqlite3.connect(sys.argv[1], timeout=10)\n\
             c.execute(\"INSERT INTO slots (slot, pipeline, worker, status, claimed_at) VALUES ('night', 'hr->out2', ?, 'claimed', '2026-12-06T00:00:00Z')\", (sys.argv[2] + '@' + socket.gethostname(),))\n\
             c.commit()\n",
        )
        .arg(s.path("data/state.db"))
        .arg(holder.id().to_string())
        .status()
        .unwrap();
    assert!(claimed.success());
    // Reaped as soon as it ends: a zombie's pid would still look alive.
    let reaper = std::thread::spawn(move || holder.wait());
    let worker = s.run(&[
        "sync",
        "--all",
        "--worker",
        "--slot",
        "night",
        "--report",
        "worker.json",
    ]);
    let _ = reaper.join();
    worker.expect_code(0);
    assert_eq!(read_rows(&s.path("out.csv")).len(), 150_000);
    assert_eq!(
        read_rows(&s.path("out2.csv")).len(),
        150_000,
        "the dead worker's pipeline was run: {}",
        worker.stderr()
    );
    // The slot is full: a late worker has nothing to run, and says so in its report.
    let late = s.run(&[
        "sync",
        "--all",
        "--worker",
        "--slot",
        "night",
        "--report",
        "late.json",
    ]);
    late.expect_code(0);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.path("late.json")).unwrap()).unwrap();
    assert_eq!(report["pipelines"], serde_json::json!([]), "{report}");
}

/// The batches the state holds as pending (0 when it cannot tell).
/// How many people the state holds as synced.
fn synced(s: &Scenario) -> u64 {
    let out = s.run(&["state", "show", "--json"]).stdout();
    serde_json::from_str::<serde_json::Value>(&out)
        .ok()
        .and_then(|v| v[0]["synced"].as_u64())
        .unwrap_or(0)
}

/// Runs the pipeline and kills it with -9 as soon as its log says `line`; fails the
/// test if the run ended first.
fn kill_at(s: &Scenario, line: &str, point: &str) {
    let mut child = s
        .command(&["sync", "--from", "hr", "--to", "out"])
        .env("RUST_LOG", "info,contactsync=debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_line(&mut child, line);
    unsafe {
        libc::kill(child.id() as i32, libc::SIGKILL);
    }
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "killed {point}");
}

/// Reads `child`'s stderr until a line holds `needle`; fails the test if the output
/// ends first (the run ended before it got there).
fn wait_for_line(child: &mut std::process::Child, needle: &str) {
    use std::io::BufRead;
    let stderr = child.stderr.take().expect("stderr piped");
    let mut lines = std::io::BufReader::new(stderr).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if line.contains(needle) => break,
            Some(Ok(_)) => {}
            _ => panic!("the run ended before its log said {needle:?}"),
        }
    }
    // The rest of the output is read and dropped, so that the run never blocks on a
    // full pipe before it is killed.
    std::thread::spawn(move || lines.for_each(drop));
}
