//! One run per pipeline and per sink section at a time, through the binary against the
//! Poppulo sandbox: a cron run overlapping a manual one must not post the same change
//! set twice, nor let the later state win over half of the people.

mod common;

use std::process::Child;
use std::time::{Duration, Instant};

use common::{counts, people_csv, Run, Scenario};
use contactsync_sandbox_poppulo::RunningPoppulo;

const PASSWORD: &str = common::POPPULO_PASSWORD;

/// 10 records per 50 ms tick: 300 people take about 1.5 s to import.
async fn slow_sandbox() -> RunningPoppulo {
    common::poppulo_sandbox(10).await
}

fn scenario(sandbox: &RunningPoppulo, people: &str) -> Scenario {
    let s = Scenario::new();
    s.write("people.csv", people);
    s.write(
        "others.csv",
        &people_csv(3, |_| "Other".into()).replace("person", "other"),
    );
    s.write("password.txt", PASSWORD);
    s.config(&format!(
        r#"
state = "data/state.db"
[sources.hr]
type = "csv"
path = "people.csv"
[sources.contractors]
type = "csv"
path = "others.csv"
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

/// Runs a sync without blocking the sandbox's runtime.
async fn sync(s: &Scenario, from: &str, extra: &[&str]) -> (Run, serde_json::Value) {
    s.sync_off_runtime(from, "poppulo", extra).await
}

/// Starts a sync in the background and returns once it polls its import on the
/// platform, that is while it holds the locks.
async fn start_holder(s: &Scenario, sandbox: &RunningPoppulo) -> Child {
    let report = s.path("holder-report.json");
    let child = s
        .command(&[
            "sync",
            "--from",
            "hr",
            "--to",
            "poppulo",
            "--report",
            report.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    // Polling: the import is posted and its handle stored.
    while sandbox.stats().import_polls == 0 {
        assert!(Instant::now() < deadline, "the first run never polled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child
}

async fn wait(mut child: Child) -> i32 {
    tokio::task::spawn_blocking(move || child.wait().unwrap().code().unwrap_or(-1))
        .await
        .unwrap()
}

fn assert_platform_equals(sandbox: &RunningPoppulo, n: usize, first_name: &str) {
    let subscribers = sandbox.subscribers();
    assert_eq!(subscribers.len(), n);
    for s in subscribers {
        assert_eq!(
            s.fields.get("first_name").map(String::as_str),
            Some(first_name),
            "{s:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_of_the_same_pipeline_exits_5_and_the_first_finishes() {
    let sandbox = slow_sandbox().await;
    let s = scenario(&sandbox, &people_csv(300, |_| "Ann".into()));
    let holder = start_holder(&s, &sandbox).await;

    // The source changes while the first run works; the second run is refused, so it
    // cannot post a change set of its own over the first one's.
    s.write("people.csv", &people_csv(300, |_| "Bea".into()));
    let (run, report) = sync(&s, "hr", &[]).await;
    run.expect_code(5);
    assert_eq!(report["status"], "locked");
    let error = report["error"].as_str().unwrap();
    assert!(
        error.contains("pipeline hr->poppulo is being synced by pid"),
        "{error}"
    );
    assert!(error.contains("--wait-for-lock"), "{error}");
    assert!(run.stdout().starts_with("locked:"), "{}", run.stdout());

    // Another pipeline writing the same sink section is refused too.
    let (run, report) = sync(&s, "contractors", &[]).await;
    run.expect_code(5);
    assert!(
        report["error"]
            .as_str()
            .unwrap()
            .contains("sink section sinks.poppulo is being written by pipeline hr->poppulo"),
        "{report}"
    );

    assert_eq!(wait(holder).await, 0, "the first run finishes");
    assert_eq!(
        sandbox.stats().imports_posted,
        1,
        "only the first run posted"
    );
    assert_platform_equals(&sandbox, 300, "Ann");

    // The next run sees the change the refused run could not send.
    let (run, report) = sync(&s, "hr", &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report), [300, 0, 300, 0, 0, 0]);
    assert_platform_equals(&sandbox, 300, "Bea");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_lock_waits_for_the_holder_then_runs() {
    let sandbox = slow_sandbox().await;
    let s = scenario(&sandbox, &people_csv(300, |_| "Ann".into()));
    let holder = start_holder(&s, &sandbox).await;
    s.write("people.csv", &people_csv(300, |_| "Bea".into()));
    let (run, report) = sync(&s, "hr", &["--wait-for-lock", "60s"]).await;
    run.expect_code(0);
    assert_eq!(wait(holder).await, 0);
    assert_eq!(counts(&report), [300, 0, 300, 0, 0, 0], "{report}");
    assert_eq!(sandbox.stats().imports_posted, 2, "one after the other");
    assert_platform_equals(&sandbox, 300, "Bea");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lock_of_a_killed_run_is_taken_over() {
    let sandbox = slow_sandbox().await;
    let s = scenario(&sandbox, &people_csv(300, |_| "Ann".into()));
    let holder = start_holder(&s, &sandbox).await;
    unsafe {
        libc::kill(holder.id() as i32, libc::SIGKILL);
    }
    assert_eq!(wait(holder).await, -1, "killed");
    let (run, report) = sync(&s, "hr", &[]).await;
    run.expect_code(0);
    assert!(
        run.stderr().contains("took over the lock"),
        "{}",
        run.stderr()
    );
    assert_eq!(report["recovered"], 300, "{report}");
    assert_platform_equals(&sandbox, 300, "Ann");
    let (run, report) = sync(&s, "hr", &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report), [300, 0, 0, 0, 300, 0]);
}
