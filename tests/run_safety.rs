//! Safe to schedule: mistakes a careless cron line or config makes are refused before
//! anything runs (exit 2), and nothing the run writes can overwrite what it reads.

mod common;

use common::{people_csv, read_rows, Scenario};

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
"#;

fn scenario() -> Scenario {
    let s = Scenario::new();
    s.config(CONFIG);
    s.write("people.csv", &people_csv(5, |_| "Ann".into()));
    s
}

#[test]
fn an_output_naming_an_input_is_refused_and_the_input_is_intact() {
    let s = scenario();
    s.run(&["sync", "--from", "hr", "--to", "out"])
        .expect_code(0);
    let source = std::fs::read(s.path("people.csv")).unwrap();
    let sink = std::fs::read(s.path("out.csv")).unwrap();
    for (flag, file, what) in [
        ("--report", "out.csv", "the sink file"),
        ("--rejects", "people.csv", "the source file"),
        ("--plan", "./people.csv", "the source file"),
        ("--rejects", "data/state.db", "the state"),
    ] {
        let run = s.run(&["sync", "--from", "hr", "--to", "out", flag, file]);
        run.expect_code(2);
        assert!(
            run.stderr().contains(flag) && run.stderr().contains(what),
            "{flag} {file}: {}",
            run.stderr()
        );
        assert_eq!(std::fs::read(s.path("people.csv")).unwrap(), source);
        assert_eq!(std::fs::read(s.path("out.csv")).unwrap(), sink);
    }
    let report = s.path("same.json");
    let run = s.run(&[
        "sync",
        "--from",
        "hr",
        "--to",
        "out",
        "--report",
        report.to_str().unwrap(),
        "--plan",
        report.to_str().unwrap(),
    ]);
    run.expect_code(2);
    assert_eq!(read_rows(&s.path("out.csv")).len(), 5);
}

/// Files are compared by identity, not by name: a hard link to the source, a symbolic
/// link to the config, the state and a lookup table named as `--metrics`, `--report`,
/// `--rejects` or `--plan` are refused, and every one of them is intact after.
#[test]
fn an_output_that_is_an_input_under_another_name_is_refused() {
    let s = scenario();
    s.config(&format!(
        "{CONFIG}\n[lookups.centers]\nfile = \"centers.csv\"\n"
    ));
    s.write("centers.csv", "department,center\nDept1,CC-1\n");
    s.run(&["sync", "--from", "hr", "--to", "out"])
        .expect_code(0);
    std::fs::hard_link(s.path("people.csv"), s.path("people-link.csv")).unwrap();
    std::os::unix::fs::symlink(s.path("contactsync.toml"), s.path("config-link.toml")).unwrap();
    let kept: Vec<(&str, Vec<u8>)> = [
        "people.csv",
        "contactsync.toml",
        "data/state.db",
        "centers.csv",
        "out.csv",
    ]
    .into_iter()
    .map(|f| (f, std::fs::read(s.path(f)).unwrap()))
    .collect();
    for (flag, file, what) in [
        ("--report", "people-link.csv", "the source file"),
        ("--rejects", "config-link.toml", "the config file"),
        ("--plan", "contactsync.toml", "the config file"),
        ("--metrics", "data/state.db", "the state"),
        ("--metrics", "people.csv", "the source file"),
        ("--metrics", "out.csv", "the sink file"),
        ("--report", "centers.csv", "a lookup file"),
    ] {
        let run = s.run(&["sync", "--from", "hr", "--to", "out", flag, file]);
        run.expect_code(2);
        assert!(
            run.stderr().contains(flag) && run.stderr().contains(what),
            "{flag} {file}: {}",
            run.stderr()
        );
        for (name, bytes) in &kept {
            assert_eq!(
                &std::fs::read(s.path(name)).unwrap(),
                bytes,
                "{flag} {file}: {name}"
            );
        }
    }
}

#[test]
fn every_bad_setting_is_refused_with_exit_2_naming_its_key() {
    let cases: Vec<(String, &str)> = vec![
        (
            CONFIG.replace("to = \"out\"", "to = \"out\"\nmax_removal_ratio = -1"),
            "max_removal_ratio",
        ),
        (
            CONFIG.replace("to = \"out\"", "to = \"out\"\nmax_removal_ratio = 5"),
            "max_removal_ratio",
        ),
        (
            CONFIG.replace("to = \"out\"", "to = \"out\"\nbatch_size = 0"),
            "batch_size",
        ),
        (
            CONFIG.replace("to = \"out\"", "to = \"out\"\nfull_every = -1"),
            "full_every",
        ),
        // "Every 0 runs" is not "never": refused, with what to write instead.
        (
            CONFIG.replace("to = \"out\"", "to = \"out\"\nfull_every = 0"),
            "full_every",
        ),
        (
            CONFIG.replace(
                "path = \"people.csv\"",
                "path = \"people.csv\"\ndelimiter = \"\\n\"",
            ),
            "delimiter",
        ),
        (
            CONFIG.replace(
                "path = \"people.csv\"",
                "path = \"people.csv\"\ndelimiter = '\"'",
            ),
            "quote",
        ),
        (
            CONFIG.replace("path = \"out.csv\"", "path = \"people.csv\""),
            "the same file",
        ),
        (
            CONFIG.replace(
                "state = \"data/state.db\"",
                "state = \"mysql://cs:hunter2@db/cs\"",
            ),
            "state",
        ),
        (
            CONFIG.replace(
                "[sinks.out]\ntype = \"csv\"\npath = \"out.csv\"",
                "[sinks.out]\ntype = \"poppulo\"\nbase_url = \"sandbox\"\naccount = \"acme\"\nusername = \"u\"",
            ),
            "password",
        ),
        (
            CONFIG.replace(
                "[sinks.out]\ntype = \"csv\"\npath = \"out.csv\"",
                "[sinks.out]\ntype = \"poppulo\"\nbase_url = \"sandbox\"\nusername = \"u\"\npassword = \"p\"",
            ),
            "account",
        ),
    ];
    for (config, key) in cases {
        let s = scenario();
        s.config(&config);
        let run = s.run(&["sync", "--from", "hr", "--to", "out"]);
        run.expect_code(2);
        assert!(
            run.stderr().contains(key),
            "{key}: {}\n{config}",
            run.stderr()
        );
        assert!(!run.stderr().contains("hunter2"), "{}", run.stderr());
        assert!(!s.path("postgres:").exists(), "no folder named after a URL");
        assert!(!s.path("out.csv").exists(), "nothing ran");
    }
}

fn rows_with(s: &Scenario, first_name: &str) -> usize {
    rows_in(&s.path("out.csv"), first_name)
}

fn rows_in(path: &std::path::Path, first_name: &str) -> usize {
    read_rows(path)
        .iter()
        .filter(|r| r.iter().any(|v| v == first_name))
        .count()
}

#[test]
fn a_deleted_sink_file_is_rebuilt_from_the_read() {
    let s = scenario();
    s.write("people.csv", &people_csv(100, |_| "Ann".into()));
    s.sync("hr", "out", &[]).0.expect_code(0);
    std::fs::remove_file(s.path("out.csv")).unwrap();
    // One source row changes too: the new file must still hold all 100.
    s.write(
        "people.csv",
        &people_csv(100, |i| if i == 5 { "Bea".into() } else { "Ann".into() }),
    );
    let (run, report) = s.sync("hr", "out", &[]);
    run.expect_code(0);
    assert!(
        report["rebuilt"].as_str().unwrap().contains("missing"),
        "{report}"
    );
    assert!(run.stdout().contains("rebuilt:"), "{}", run.stdout());
    assert_eq!(read_rows(&s.path("out.csv")).len(), 100);
    assert_eq!(rows_with(&s, "Bea"), 1);

    // Trusted again: the next run sends nothing.
    let (run, report) = s.sync("hr", "out", &[]);
    run.expect_code(0);
    assert_eq!(report["unchanged"], 100);
    assert!(report["rebuilt"].is_null());
}

#[test]
fn a_hand_edited_sink_file_is_rebuilt_and_a_touched_one_is_not() {
    let s = scenario();
    s.write("people.csv", &people_csv(20, |_| "Ann".into()));
    s.sync("hr", "out", &[]).0.expect_code(0);

    // Only the modification time moves: the content hash says nothing changed.
    let text = std::fs::read_to_string(s.path("out.csv")).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(s.path("out.csv"), &text).unwrap();
    let (run, report) = s.sync("hr", "out", &[]);
    run.expect_code(0);
    assert!(report["rebuilt"].is_null(), "{report}");

    // Someone deletes a row and edits another.
    let edited: String = text
        .lines()
        .filter(|l| !l.starts_with("E3,"))
        .map(|l| l.replace("Last4", "Hand-edited") + "\n")
        .collect();
    std::fs::write(s.path("out.csv"), edited).unwrap();
    let (run, report) = s.sync("hr", "out", &[]);
    run.expect_code(0);
    assert!(
        report["rebuilt"]
            .as_str()
            .unwrap()
            .contains("changed outside contactsync"),
        "{report}"
    );
    let rows = read_rows(&s.path("out.csv"));
    assert_eq!(rows.len(), 20);
    assert!(!rows.iter().any(|r| r.iter().any(|v| v == "Hand-edited")));
    assert!(rows.iter().any(|r| r.get(0) == Some("E3")));
}

#[test]
fn the_sink_creates_its_directory_and_keeps_the_file_mode() {
    use std::os::unix::fs::PermissionsExt;
    let s = scenario();
    s.config(&CONFIG.replace("path = \"out.csv\"", "path = \"exports/today/out.csv\""));
    s.sync("hr", "out", &[]).0.expect_code(0);
    let out = s.path("exports/today/out.csv");
    assert_eq!(read_rows(&out).len(), 5);
    // A new file gets the mode any new file gets here (under the umask), not 0600.
    let probe = s.path("probe");
    std::fs::write(&probe, "").unwrap();
    let usual = std::fs::metadata(&probe).unwrap().permissions().mode() & 0o777;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&out), usual);

    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o640)).unwrap();
    s.write("people.csv", &people_csv(5, |_| "Bea".into()));
    s.sync("hr", "out", &[]).0.expect_code(0);
    assert_eq!(read_rows(&out).len(), 5);
    assert_eq!(mode(&out), 0o640, "an existing file keeps its mode");
}

#[test]
fn a_new_state_facing_a_non_empty_sink_file_says_so_and_keeps_its_rows() {
    let s = scenario();
    s.write("people.csv", &people_csv(3, |_| "Ann".into()));
    s.write(
        "out.csv",
        "external_id,email,first_name\nE1,person1@example.com,Old\nX9,someone@example.com,Stranger\n",
    );
    let (run, report) = s.sync("hr", "out", &[]);
    run.expect_code(0);
    assert!(
        report["foreign"].as_str().unwrap().contains("2 rows"),
        "{report}"
    );
    assert_eq!(report["unknown_in_sink"], 1, "{report}");
    assert!(
        run.stdout().contains("removals cannot be detected"),
        "{}",
        run.stdout()
    );
    let rows = read_rows(&s.path("out.csv"));
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert!(rows.iter().any(|r| r.get(0) == Some("X9")), "kept");
    // Said once: the state knows its people now.
    let (run, report) = s.sync("hr", "out", &[]);
    run.expect_code(0);
    assert!(report["foreign"].is_null(), "{report}");
}

/// The README's own setup: Poppulo behind `base_url = "sandbox"`, started inside the
/// process and killed with it.
const SANDBOX_CONFIG: &str = r#"
state = "data/state.db"

[sources.hr]
type = "csv"
path = "people.csv"

[sinks.poppulo]
type = "poppulo"
base_url = "sandbox"
account = "acme"
username = "api-user"
password = "sandbox-password"
min_poll_interval = "100ms"
busy_retry_interval = "200ms"

[sources.back]
type = "poppulo"
base_url = "sandbox"
account = "acme"
username = "api-user"
password = "sandbox-password"

[sinks.export]
type = "csv"
path = "export.csv"

[pipelines.nightly]
from = "hr"
to = "poppulo"
max_removal_ratio = 1.0
"#;

/// Waits until the run `child` has a batch pending in the state (it is applying);
/// `Err` with its exit status when it ended first.
fn wait_for_pending(
    s: &Scenario,
    child: &mut std::process::Child,
) -> Result<(), std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no batch ever pending"
        );
        if let Some(status) = child.try_wait().unwrap() {
            return Err(status);
        }
        let show = s.run(&["state", "show", "--json"]);
        let pending = serde_json::from_str::<serde_json::Value>(&show.stdout())
            .ok()
            .and_then(|v| v[0]["pending"].as_u64())
            .unwrap_or(0);
        if pending > 0 {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Starts a sync of `hr` into the in-process sandbox and kills it with SIGKILL once a
/// batch has been pending for `after` (the import is posted within milliseconds and
/// takes about a second for 6,000 rows). Returns whether it was killed: a run that
/// finished first (it may, on a fast machine) must have finished well.
fn kill_during_import(s: &Scenario, after: std::time::Duration) -> bool {
    let mut child = s
        .command(&["sync", "--from", "hr", "--to", "poppulo"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(s.path("killed-run.stderr")).unwrap())
        .spawn()
        .unwrap();
    let stderr = || std::fs::read_to_string(s.path("killed-run.stderr")).unwrap_or_default();
    if let Err(status) = wait_for_pending(s, &mut child) {
        assert_eq!(
            status.code(),
            Some(0),
            "a run that ended by itself succeeded: {}",
            stderr()
        );
        return false;
    }
    std::thread::sleep(after);
    unsafe {
        libc::kill(child.id() as i32, libc::SIGKILL);
    }
    let status = child.wait().unwrap();
    if status.code().is_some() {
        assert_eq!(
            status.code(),
            Some(0),
            "a run that ended by itself succeeded: {}",
            stderr()
        );
        return false;
    }
    true
}

#[test]
fn kill_9_during_an_in_process_sandbox_import_ten_times_then_a_rerun_finishes() {
    let s = Scenario::new();
    s.config(SANDBOX_CONFIG);
    let n = 6000;
    // Ten kills in a row, at staggered moments of the import (a run that happens to
    // finish first does not count, and must have finished well).
    let mut kills = 0;
    for trial in 0..30 {
        s.write("people.csv", &people_csv(n, |_| format!("Trial{trial}")));
        if kill_during_import(&s, std::time::Duration::from_millis(50 + 80 * (kills % 10))) {
            kills += 1;
        }
        if kills == 10 {
            break;
        }
    }
    assert_eq!(kills, 10, "ten runs killed during their import");
    s.write("people.csv", &people_csv(n, |_| "Final".into()));
    let (run, _) = s.sync("hr", "poppulo", &[]);
    run.expect_code(0);
    // The platform equals the source: read it back through the same sandbox.
    let (run, report) = s.sync("back", "export", &[]);
    run.expect_code(0);
    assert_eq!(report["read"], n as u64, "{report}");
    assert_eq!(rows_in(&s.path("export.csv"), "Final"), n);
}

#[test]
fn an_import_that_can_no_longer_be_followed_is_given_up_and_sent_again() {
    let s = Scenario::new();
    s.config(SANDBOX_CONFIG);
    let n = 6000;
    s.write("people.csv", &people_csv(n, |_| "Ann".into()));
    let mut killed = false;
    for attempt in 0..3 {
        s.write("people.csv", &people_csv(n, |_| format!("Ann{attempt}")));
        if kill_during_import(&s, std::time::Duration::from_millis(300)) {
            killed = true;
            break;
        }
    }
    assert!(killed, "a run killed during its import");
    // The port the sandbox had is taken now: it comes back on another one, and the
    // stored link of the killed run's import leads nowhere.
    let port: u16 = std::fs::read_to_string(s.path("data/sandbox-poppulo.port"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let squatter = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let (run, _) = s.sync("hr", "poppulo", &[]);
    run.expect_code(0);
    assert!(
        run.stderr().contains("can no longer be followed") && run.stderr().contains("port"),
        "{}",
        run.stderr()
    );
    drop(squatter);
    let (run, report) = s.sync("back", "export", &[]);
    run.expect_code(0);
    assert_eq!(report["read"], n as u64, "{report}");
    // And the pipeline is not wedged: the next run has nothing to do.
    let (run, report) = s.sync("hr", "poppulo", &[]);
    run.expect_code(0);
    assert_eq!(report["unchanged"], n as u64, "{report}");
}

#[test]
fn logs_written_to_a_file_or_pipe_carry_no_escape_codes() {
    let s = scenario();
    s.config(SANDBOX_CONFIG);
    let output = s
        .command(&["sync", "--from", "hr", "--to", "poppulo"])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let run = common::Run { output };
    run.expect_code(0);
    assert!(run.stderr().contains("INFO"), "{}", run.stderr());
    assert!(!run.stderr().contains('\u{1b}'), "{:?}", run.stderr());
    assert!(!run.stdout().contains('\u{1b}'), "{:?}", run.stdout());
}

#[test]
fn ctrl_c_prints_one_line_exits_130_and_the_next_run_finishes() {
    let s = Scenario::new();
    s.config(SANDBOX_CONFIG);
    let n = 6000;
    s.write("people.csv", &people_csv(n, |_| "Ann".into()));
    let mut child = s
        .command(&["sync", "--from", "hr", "--to", "poppulo"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_pending(&s, &mut child).expect("the run was still applying");
    std::thread::sleep(std::time::Duration::from_millis(200));
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stdout}\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    assert!(
        lines[0].starts_with("interrupted: hr->poppulo: ")
            && lines[0].ends_with("changes not confirmed; the next run sends them again"),
        "{stdout}"
    );
    assert!(
        stderr.lines().filter(|l| l.contains("WARN")).count() <= 1,
        "not one line a record: {stderr}"
    );
    let (run, report) = s.sync("hr", "poppulo", &[]);
    run.expect_code(0);
    let (run, export) = s.sync("back", "export", &[]);
    run.expect_code(0);
    assert_eq!(export["read"], n as u64, "{report}");
}

/// Under a pseudo-terminal (`script`), the bar shows the import's own progress while
/// the sandbox works through it, not just 0 and then the end.
#[test]
fn on_a_terminal_the_bar_follows_the_platform_import() {
    let s = Scenario::new();
    s.config(SANDBOX_CONFIG);
    s.write("people.csv", &people_csv(8000, |_| "Ann".into()));
    let command = format!(
        "{} --config {} sync --from hr --to poppulo",
        env!("CARGO_BIN_EXE_contactsync"),
        s.path("contactsync.toml").display()
    );
    let output = std::process::Command::new("script")
        .args(["-q", "-e", "-c", &command, "/dev/null"])
        .current_dir(s.dir.path())
        .env("RUST_LOG", "warn")
        .env("COLUMNS", "160")
        .output()
        .expect("script (util-linux) runs the binary under a pseudo-terminal");
    let screen = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{screen}");
    // Positions drawn for the job: "Poppulo import 1 … 2345/8000 records".
    let positions: Vec<u64> = screen
        .split("/8000 records")
        .filter_map(|before| {
            let digits: String = before
                .chars()
                .rev()
                .take_while(|c| c.is_ascii_digit())
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            digits.parse().ok()
        })
        .collect();
    assert!(screen.contains("Poppulo import"), "{screen}");
    assert!(
        positions.iter().any(|&p| p > 0 && p < 8000),
        "the bar moved between 0 and 8000 while the import ran: {positions:?}"
    );
    // Whole-number rates only.
    assert!(!has_fractional_rate(&screen), "{screen}");
}

/// Whether `text` shows a rate with a fraction, such as `3,677.5023/s`.
fn has_fractional_rate(text: &str) -> bool {
    text.split("/s").any(|before| {
        let number: String = before
            .chars()
            .rev()
            .take_while(|c| c.is_ascii_digit() || matches!(c, '.' | ','))
            .collect();
        number.contains('.')
    })
}

/// Only a missing file is a new state: an empty state file is refused with what to do,
/// and so is a damaged one found when the last process did not close it cleanly
/// (SQLite's `quick_check`). Neither is touched.
#[test]
fn an_empty_or_damaged_state_is_refused_not_taken_for_new() {
    let s = scenario();
    std::fs::create_dir_all(s.path("data")).unwrap();
    std::fs::write(s.path("data/state.db"), b"").unwrap();
    let touched = std::process::Command::new("touch")
        .args(["-d", "1 hour ago"])
        .arg(s.path("data/state.db"))
        .status()
        .unwrap();
    assert!(touched.success());
    let run = s.run(&["sync", "--from", "hr", "--to", "out"]);
    assert_ne!(run.code(), 0, "{}", run.stderr());
    assert!(
        run.stderr().contains("empty") && run.stderr().contains("backup"),
        "{}",
        run.stderr()
    );
    assert_eq!(std::fs::metadata(s.path("data/state.db")).unwrap().len(), 0);
    assert!(!s.path("out.csv").exists(), "nothing was synced");

    // A state with garbage pages in the middle, left by a process that did not close
    // it (its write-ahead log is still there).
    let s = scenario();
    s.write("people.csv", &people_csv(400, |_| "Ann".into()));
    s.run(&["sync", "--from", "hr", "--to", "out"])
        .expect_code(0);
    let mut bytes = std::fs::read(s.path("data/state.db")).unwrap();
    assert!(bytes.len() > 4 * 4096, "{}", bytes.len());
    // Every page past the first quarter, up to the last one, is garbage.
    let (from, to) = (
        bytes.len() / 4 / 4096 * 4096,
        bytes.len() / 4096 * 4096 - 4096,
    );
    for b in &mut bytes[from..to] {
        *b = 0xA5;
    }
    std::fs::write(s.path("data/state.db"), &bytes).unwrap();
    std::fs::write(s.path("data/state.db-wal"), vec![0x5A; 1000]).unwrap();
    let run = s.run(&["sync", "--from", "hr", "--to", "out"]);
    assert_ne!(run.code(), 0, "{}", run.stdout());
    assert!(
        run.stderr().contains("damaged") && run.stderr().contains("backup"),
        "{}",
        run.stderr()
    );
}

/// A process that keeps the state's write lock (a run stopped with SIGSTOP in the middle
/// of a write) makes a second run `locked` (exit 5) after the wait, not a failure; it
/// changes nothing, and runs again once the lock is let go.
#[test]
fn a_state_another_process_keeps_busy_is_locked_not_failed() {
    let s = scenario();
    s.run(&["sync", "--from", "hr", "--to", "out"])
        .expect_code(0);
    let mut holder = std::process::Command::new("python3")
        .arg("-c")
        .arg(
            "import sqlite3, sys, time\n\
             c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)\n\
             c.execute('BEGIN IMMEDIATE')\n\
             print('holding', flush=True)\n\
             time.sleep(60)\n",
        )
        .arg(s.path("data/state.db"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "holding");
    s.write("people.csv", &people_csv(5, |_| "Bea".into()));
    let run = s.run(&["sync", "--from", "hr", "--to", "out"]);
    let _ = holder.kill();
    let _ = holder.wait();
    run.expect_code(5);
    assert!(run.stderr().contains("locked"), "{}", run.stderr());
    assert!(!run.stderr().contains("panicked"), "{}", run.stderr());
    let (run, report) = s.sync("hr", "out", &[]);
    run.expect_code(0);
    assert_eq!(report["updated"], 5, "{report}");
}

/// The takeover rule holds for a holder whose process exists but whose heartbeat
/// stopped (a run suspended with SIGSTOP between two writes): past the heartbeat limit
/// its lock is taken over, and the run goes on.
#[test]
fn a_lock_whose_holder_lives_but_stopped_beating_is_taken_over() {
    let s = scenario();
    s.run(&["sync", "--from", "hr", "--to", "out"])
        .expect_code(0);
    // A live process (this test's `sleep`) holds the pipeline's lock, its last
    // heartbeat an hour ago.
    let mut holder = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let stale = chrono::Utc::now().timestamp() - 3600;
    let put = std::process::Command::new("python3")
        .arg("-c")
        .arg(
            "import socket, sqlite3, sys\n\
             c = sqlite3.connect(sys.argv[1], timeout=10)\n\
             c.execute(\"INSERT OR REPLACE INTO locks (name, token, pid, host, pipeline, since, heartbeat) VALUES ('pipeline:hr->out', 'stopped-run', ?, ?, 'hr->out', '2026-12-06T01:00:00Z', ?)\", (int(sys.argv[2]), socket.gethostname(), int(sys.argv[3])))\n\
             c.commit()\n",
        )
        .arg(s.path("data/state.db"))
        .arg(holder.id().to_string())
        .arg(stale.to_string())
        .status()
        .unwrap();
    assert!(put.success());
    s.write("people.csv", &people_csv(5, |_| "Bea".into()));
    let (run, report) = s.sync("hr", "out", &[]);
    let _ = holder.kill();
    let _ = holder.wait();
    run.expect_code(0);
    assert_eq!(report["updated"], 5, "{report}");
    assert!(run.stderr().contains("took over"), "{}", run.stderr());
}
