//! The state in PostgreSQL, through the binary: `state = "postgres://…"` against a
//! throwaway cluster on loopback. The csv -> csv and csv -> poppulo (sandbox) scenarios
//! with the shared state, and the run locks as advisory locks between two processes,
//! freed at once when the holder is killed.

mod common;

use std::time::{Duration, Instant};

use common::{counts, people_csv, read_rows, Scenario};
use contactsync_sandbox_poppulo::RunningPoppulo;
use contactsync_testkit::postgres::Postgres;

fn csv_scenario(url: &str) -> Scenario {
    let s = Scenario::new();
    s.config(&format!(
        r#"
state = "{url}"

[sources.hr]
type = "csv"
path = "people.csv"

[sinks.out]
type = "csv"
path = "out.csv"

[pipelines.p]
from = "hr"
to = "out"
max_removal_ratio = 0.2
"#
    ));
    s
}

#[test]
fn csv_to_csv_keeps_its_state_in_postgres() {
    let pg = Postgres::start().expect("a PostgreSQL cluster starts");
    let url = pg.new_database().unwrap();
    let s = csv_scenario(&url);
    s.write("people.csv", &people_csv(20, |_| "Ann".into()));
    let (run, report) = s.sync("hr", "out", &[]);
    run.expect_code(0);
    assert_eq!(counts(&report), [20, 20, 0, 0, 0, 0]);
    assert!(!s.path("data").exists(), "no state file beside the config");

    // The nightly: one edit, one leaver, one newcomer; only the delta is sent.
    let csv = people_csv(21, |i| if i == 7 { "Bea".into() } else { "Ann".into() })
        .lines()
        .filter(|l| !l.starts_with("E3,"))
        .collect::<Vec<_>>()
        .join("\n")
        + "\n";
    s.write("people.csv", &csv);
    let (run, report) = s.sync("hr", "out", &[]);
    run.expect_code(0);
    assert_eq!(counts(&report), [20, 1, 1, 1, 18, 0]);
    let rows = read_rows(&s.path("out.csv"));
    assert_eq!(rows.len(), 20);

    let shown = s.run(&["state", "show"]);
    shown.expect_code(0);
    assert!(shown.stdout().contains("hr->out"), "{}", shown.stdout());
    let runs = s.run(&["runs", "--json"]);
    runs.expect_code(0);
    assert!(runs.stdout().contains("\"run\": 2"), "{}", runs.stdout());
}

#[test]
fn a_password_comes_from_the_environment_and_is_never_shown() {
    let pg = Postgres::start().expect("a PostgreSQL cluster starts");
    // Nothing listens on port 1: the message names the database, not the password.
    let s = csv_scenario("postgres://contactsync:hunter2@127.0.0.1:1/contactsync");
    s.write("people.csv", &people_csv(2, |_| "Ann".into()));
    let run = s.run(&["sync", "--from", "hr", "--to", "out"]);
    assert_ne!(run.code(), 0);
    assert!(run.stderr().contains("127.0.0.1:1"), "{}", run.stderr());
    assert!(!run.stderr().contains("hunter2"), "{}", run.stderr());
    assert!(!run.stdout().contains("hunter2"), "{}", run.stdout());
    // With `trust` any password is accepted: the variable is read, the run works.
    let url = pg.new_database().unwrap();
    let s = csv_scenario(&url);
    s.write("people.csv", &people_csv(2, |_| "Ann".into()));
    let run = s
        .command(&["sync", "--from", "hr", "--to", "out"])
        .env("CONTACTSYNC_STATE_PASSWORD", "from-the-env")
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

fn poppulo_scenario(sandbox: &RunningPoppulo, url: &str, people: &str) -> Scenario {
    let s = Scenario::new();
    s.write("people.csv", people);
    s.write("password.txt", common::POPPULO_PASSWORD);
    s.config(&format!(
        r#"
state = "{url}"
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
[pipelines.nightly]
from = "hr"
to = "poppulo"
max_removal_ratio = 0.5
"#,
        sandbox.base_url()
    ));
    s
}

async fn sync(s: &Scenario, extra: &[&str]) -> (common::Run, serde_json::Value) {
    let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
    let dir = s.dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || {
        let s = Scenario::at(dir);
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        s.sync("hr", "poppulo", &extra)
    })
    .await
    .expect("sync task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_one_pipeline_one_is_refused_and_a_killed_holder_frees_the_lock_at_once() {
    let pg = Postgres::start().expect("a PostgreSQL cluster starts");
    let url = pg.new_database().unwrap();
    // 10 records a 50 ms tick: 300 people take about 1.5 s to import.
    let sandbox = common::poppulo_sandbox(10).await;
    let s = poppulo_scenario(&sandbox, &url, &people_csv(300, |_| "Ann".into()));

    let start_holder = || {
        s.command(&["sync", "--from", "hr", "--to", "poppulo"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let wait_for_polls = |at_least: u64| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while sandbox.stats().import_polls < at_least {
            assert!(Instant::now() < deadline, "the holder never polled");
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    // A holder, and a second process for the same pipeline: refused with exit 5.
    let mut holder = start_holder();
    wait_for_polls(1);
    let (run, report) = sync(&s, &[]).await;
    run.expect_code(5);
    assert_eq!(report["status"], "locked", "{report}");
    let status = tokio::task::spawn_blocking(move || holder.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "the holder finishes");
    assert_eq!(
        sandbox.subscribers().len(),
        300,
        "the sink equals the source"
    );

    // A holder killed with -9 mid-import: its connection closes, so the next run takes
    // the lock at once (no heartbeat to wait out) and settles the import it left.
    s.write("people.csv", &people_csv(300, |_| "Bea".into()));
    let polls = sandbox.stats().import_polls;
    let mut holder = start_holder();
    wait_for_polls(polls + 1);
    unsafe {
        libc::kill(holder.id() as i32, libc::SIGKILL);
    }
    let _ = holder.wait();
    let started = Instant::now();
    let (run, report) = sync(&s, &[]).await;
    run.expect_code(0);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the lock was free at once"
    );
    assert_eq!(report["recovered"], 300, "{report}");
    let (run, report) = sync(&s, &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report), [300, 0, 0, 0, 300, 0], "{report}");
    for subscriber in sandbox.subscribers() {
        assert_eq!(
            subscriber.fields.get("first_name").map(String::as_str),
            Some("Bea")
        );
    }
}

#[test]
fn state_copy_moves_a_sqlite_state_into_postgres_and_the_nightly_sends_only_the_delta() {
    let pg = Postgres::start().expect("a PostgreSQL cluster starts");
    let url = pg.new_database().unwrap();
    let s = csv_scenario("data/state.db");
    s.write("people.csv", &people_csv(30, |_| "Ann".into()));
    s.sync("hr", "out", &[]).0.expect_code(0);

    let copied = s.run(&["state", "copy", "--to", &url]);
    copied.expect_code(0);
    assert!(
        copied.stdout().contains("30 synced people"),
        "{}",
        copied.stdout()
    );
    // Copying again into the now full database is refused.
    let again = s.run(&["state", "copy", "--to", &url]);
    assert_ne!(again.code(), 0);
    assert!(
        again.stderr().contains("already holds"),
        "{}",
        again.stderr()
    );

    // The installation moves: the config now names the database.
    let config = std::fs::read_to_string(s.path("contactsync.toml")).unwrap();
    s.config(&config.replace("state = \"data/state.db\"", &format!("state = \"{url}\"")));
    s.write(
        "people.csv",
        &people_csv(30, |i| if i == 4 { "Dora".into() } else { "Ann".into() }),
    );
    let (run, report) = s.sync("hr", "out", &[]);
    run.expect_code(0);
    assert_eq!(
        counts(&report),
        [30, 0, 1, 0, 29, 0],
        "only the delta: {report}"
    );
    assert_eq!(report["run"], 2, "the run counter goes on: {report}");

    // And back: PostgreSQL into a new SQLite file.
    let back = s.run(&["state", "copy", "--to", "data/back.db"]);
    back.expect_code(0);
    assert!(
        back.stdout().contains("30 synced people"),
        "{}",
        back.stdout()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_share_nine_pipelines_each_run_once_one_import_at_a_time_per_account() {
    let pg = Postgres::start().expect("a PostgreSQL cluster starts");
    let url = pg.new_database().unwrap();
    // 10 records a 50 ms tick: each Poppulo import of 60 people takes about 0.3 s.
    let sandbox = common::poppulo_sandbox(10).await;
    let s = Scenario::new();
    s.write("password.txt", common::POPPULO_PASSWORD);
    let mut config = format!(
        r#"
state = "{url}"
[sinks.poppulo]
type = "poppulo"
base_url = "{}"
account = "acme"
username = "api-user"
password_file = "password.txt"
min_poll_interval = "50ms"
busy_retry_interval = "100ms"
"#,
        sandbox.base_url()
    );
    for i in 1..=9 {
        s.write(
            &format!("people{i}.csv"),
            &people_csv(60, |_| "Ann".into()).replace("person", &format!("p{i}-")),
        );
        config.push_str(&format!(
            "[sources.hr{i}]\ntype = \"csv\"\npath = \"people{i}.csv\"\n"
        ));
        if i <= 3 {
            config.push_str(&format!(
                "[pipelines.to_poppulo_{i}]\nfrom = \"hr{i}\"\nto = \"poppulo\"\n"
            ));
        } else {
            config.push_str(&format!(
                "[sinks.out{i}]\ntype = \"csv\"\npath = \"out{i}.csv\"\n[pipelines.to_csv_{i}]\nfrom = \"hr{i}\"\nto = \"out{i}\"\n"
            ));
        }
    }
    s.config(&config);

    let workers: Vec<std::process::Child> = (0..3)
        .map(|n| {
            s.command(&["sync", "--all", "--worker", "--slot", "2026-12-01"])
                .arg("--report")
                .arg(s.path(&format!("worker-{n}.json")))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let codes = tokio::task::spawn_blocking(move || {
        workers
            .into_iter()
            .map(|mut w| w.wait().unwrap().code().unwrap_or(-1))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert_eq!(codes, [0, 0, 0], "every worker exits 0");

    // Each pipeline ran exactly once, by one of the workers.
    let runs = s.run(&["runs", "--json", "--last", "100"]);
    runs.expect_code(0);
    let runs: serde_json::Value = serde_json::from_str(&runs.stdout()).unwrap();
    let runs = runs.as_array().unwrap();
    assert_eq!(runs.len(), 9, "{runs:?}");
    let mut pipelines: Vec<&str> = runs
        .iter()
        .map(|r| r["pipeline"].as_str().unwrap())
        .collect();
    pipelines.sort();
    pipelines.dedup();
    assert_eq!(pipelines.len(), 9, "{runs:?}");
    // Never two imports on the account at a time: none was refused as busy, and each
    // began after the one before had been posted and followed to its end.
    assert_eq!(sandbox.stats().imports_refused_busy, 0);
    let imports = sandbox.imports();
    assert_eq!(imports.len(), 3);
    assert_eq!(sandbox.subscribers().len(), 180);
    for i in 4..=9 {
        assert_eq!(read_rows(&s.path(&format!("out{i}.csv"))).len(), 60);
    }

    // The slot is full: a fourth worker has nothing left to run.
    let late = s.run(&["sync", "--all", "--worker", "--slot", "2026-12-01"]);
    late.expect_code(0);
    assert!(late.stderr().contains("nothing left"), "{}", late.stderr());
}
