//! Knowing what happened without reading logs: webhooks and commands on failure and
//! rejects (once per change of state), Prometheus metrics, JSON logs, the run history
//! and what the tool did to one person.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{counts, people_csv, Scenario};

const PASSWORD: &str = "Sup3r-Secret-Pw-4711";

/// How the webhook receiver answers.
#[derive(Clone, Copy, PartialEq)]
enum Answer {
    Ok,
    ServerError,
    Never,
    Echo,
}

/// A webhook receiver on loopback, recording every request body it gets.
struct Receiver {
    port: u16,
    bodies: Arc<Mutex<Vec<String>>>,
}

impl Receiver {
    fn start(answer: Answer) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let bodies: Arc<Mutex<Vec<String>>> = Arc::default();
        let seen = bodies.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut length = 0usize;
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    head.push_str(&line);
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0u8; length];
                let _ = reader.read_exact(&mut body);
                seen.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&body).into_owned());
                match answer {
                    Answer::Ok => {
                        let _ = stream.write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                        );
                    }
                    Answer::ServerError => {
                        let _ = stream.write_all(
                            b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                        );
                    }
                    Answer::Never => std::thread::sleep(Duration::from_secs(30)),
                    // A server that echoes the request in its error body.
                    Answer::Echo => {
                        // What it echoes first: the credentials of the SOAP body, then
                        // the request's head (its `Authorization`).
                        let body = String::from_utf8_lossy(&body);
                        let from = body.find("<username>").unwrap_or(0);
                        let echoed = format!("{} {head}", &body[from..]);
                        let _ = stream.write_all(
                            format!(
                                "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{echoed}",
                                echoed.len()
                            )
                            .as_bytes(),
                        );
                    }
                }
            }
        });
        Receiver { port, bodies }
    }

    fn bodies(&self) -> Vec<serde_json::Value> {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .map(|b| serde_json::from_str(b).expect("a JSON payload"))
            .collect()
    }
}

fn config(receiver_port: u16, extra_hook: &str) -> String {
    format!(
        r#"
state = "data/state.db"

[sources.hr]
type = "csv"
path = "people.csv"

[sinks.poppulo]
type = "poppulo"
base_url = "sandbox"
account = "acme"
username = "api-user"
password = "{PASSWORD}"
min_poll_interval = "100ms"

[sinks.out]
type = "csv"
path = "out.csv"

[[notify.webhook]]
url = "http://127.0.0.1:{receiver_port}/hooks/contactsync?token=hook-token-123"
on = ["failed", "refused", "rejects", "recovered"]
rejects_over = 0
timeout = "300ms"
{extra_hook}

[pipelines.p]
from = "hr"
to = "out"
"#
    )
}

#[test]
fn a_run_with_rejects_posts_one_payload_with_counts_and_rejections_and_no_secret() {
    let receiver = Receiver::start(Answer::Ok);
    let s = Scenario::new();
    s.config(&config(receiver.port, ""));
    s.write(
        "people.csv",
        &people_csv(5, |_| "Ann".into()).replace("person2@example.com", "not-an-email"),
    );
    let (run, report) = s.sync("hr", "poppulo", &[]);
    run.expect_code(3);
    let bodies = receiver.bodies();
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    let payload = &bodies[0];
    assert_eq!(payload["event"], "rejects");
    assert_eq!(payload["pipeline"], "hr->poppulo");
    assert_eq!(payload["status"], "finished_with_rejects");
    assert_eq!(payload["created"], 4);
    assert_eq!(payload["rejected"], 1);
    assert_eq!(payload["rejections"][0]["key"], "external_id:E2");
    assert_eq!(payload["rejections"][0]["origin"], "people.csv:3");
    assert_eq!(payload["rejections"][0]["field"], "email");
    assert_eq!(counts(payload), counts(&report));
    let text = receiver.bodies.lock().unwrap()[0].clone();
    assert!(!text.contains(PASSWORD), "{text}");
    assert!(!text.contains("hook-token-123"), "{text}");
    assert!(!text.contains("Last2"), "no whole record: {text}");
    let all = format!("{}{}", run.stdout(), run.stderr());
    assert!(!all.contains("hook-token-123"), "{all}");

    // Still rejecting: nobody is told again.
    s.sync("hr", "poppulo", &[]).0.expect_code(3);
    assert_eq!(receiver.bodies().len(), 1);
}

#[test]
fn a_failing_pipeline_notifies_once_then_recovered_once_and_a_command_gets_the_report() {
    let receiver = Receiver::start(Answer::Ok);
    let s = Scenario::new();
    let script = s.write(
        "on-sync.sh",
        "#!/bin/sh\ncp \"$1\" \"$(dirname \"$0\")/command-$2.json\"\n",
    );
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    s.config(&config(
        receiver.port,
        &format!(
            "[[notify.command]]\nrun = [\"{}\", \"{{report}}\", \"{{event}}\"]\non = [\"failed\", \"recovered\"]",
            script.display()
        ),
    ));
    // No source file: every run fails.
    for _ in 0..3 {
        s.sync("hr", "out", &[]).0.expect_code(1);
    }
    let bodies = receiver.bodies();
    assert_eq!(bodies.len(), 1, "once over three failing runs: {bodies:?}");
    assert_eq!(bodies[0]["event"], "failed");
    assert!(bodies[0]["error"].as_str().unwrap().contains("people.csv"));
    let command: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.path("command-failed.json")).unwrap())
            .unwrap();
    assert_eq!(command["status"], "failed");

    s.write("people.csv", &people_csv(3, |_| "Ann".into()));
    s.sync("hr", "out", &[]).0.expect_code(0);
    s.sync("hr", "out", &[]).0.expect_code(0);
    let bodies = receiver.bodies();
    assert_eq!(bodies.len(), 2, "{bodies:?}");
    assert_eq!(bodies[1]["event"], "recovered");
    assert_eq!(bodies[1]["status"], "synced");
    assert!(s.path("command-recovered.json").exists());
}

#[test]
fn a_receiver_that_fails_or_never_answers_does_not_change_the_exit_code() {
    for answer in [Answer::ServerError, Answer::Never] {
        let receiver = Receiver::start(answer);
        let s = Scenario::new();
        s.config(&config(receiver.port, ""));
        // Missing source: the run fails (1), and tells the receiver, which fails.
        let (run, _) = s.sync("hr", "out", &[]);
        run.expect_code(1);
        assert!(
            run.stderr()
                .contains("notification (failed) by webhook failed"),
            "{}",
            run.stderr()
        );
        assert!(!run.stderr().contains("hook-token-123"), "{}", run.stderr());
        s.write("people.csv", &people_csv(3, |_| "Ann".into()));
        let (run, _) = s.sync("hr", "out", &[]);
        run.expect_code(0);
        assert!(!receiver.bodies.lock().unwrap().is_empty());
    }
}

#[test]
fn metrics_parse_as_prometheus_text_and_equal_the_report() {
    let receiver = Receiver::start(Answer::Ok);
    let s = Scenario::new();
    s.config(&config(receiver.port, ""));
    s.write(
        "people.csv",
        &people_csv(6, |_| "Ann".into()).replace("person4@example.com", "broken"),
    );
    let (run, report) = s.sync("hr", "out", &["--metrics", "metrics/contactsync.prom"]);
    run.expect_code(3);
    let text = std::fs::read_to_string(s.path("metrics/contactsync.prom")).unwrap();
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
    let value = |name: &str, label: (&str, &str)| -> f64 {
        let sample = scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == name
                    && s.labels.get("pipeline") == Some("hr->out")
                    && s.labels.get(label.0) == Some(label.1)
            })
            .unwrap_or_else(|| panic!("{name}{{{}={}}} in {text}", label.0, label.1));
        match sample.value {
            prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{other:?}"),
        }
    };
    for outcome in ["created", "updated", "removed", "unchanged", "rejected"] {
        assert_eq!(
            value("contactsync_records", ("outcome", outcome)),
            report[outcome].as_f64().unwrap(),
            "{outcome}"
        );
    }
    assert_eq!(value("contactsync_records", ("outcome", "held")), 0.0);
    assert_eq!(
        value(
            "contactsync_run_status",
            ("status", "finished_with_rejects")
        ),
        1.0
    );
    assert_eq!(value("contactsync_run_status", ("status", "synced")), 0.0);
    let has = |name: &str| scrape.samples.iter().any(|s| s.metric == name);
    assert!(has("contactsync_run_duration_seconds"));
    assert!(has("contactsync_last_run_timestamp_seconds"));
    assert!(has("contactsync_last_success_timestamp_seconds"));
}

#[test]
fn json_logs_are_json_on_every_line() {
    let receiver = Receiver::start(Answer::Ok);
    let s = Scenario::new();
    s.config(&config(receiver.port, ""));
    s.write(
        "people.csv",
        &people_csv(4, |_| "Ann".into()).replace("person4@example.com", "broken"),
    );
    let output = s
        .command(&[
            "--log-format",
            "json",
            "sync",
            "--from",
            "hr",
            "--to",
            "poppulo",
        ])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let mut lines = 0;
    for line in stderr.lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        // The README's keys, on every line.
        for key in ["time", "level", "message"] {
            assert!(value[key].is_string(), "{key}: {line}");
        }
        assert!(value["fields"].is_object(), "{line}");
        assert!(
            chrono::DateTime::parse_from_rfc3339(value["time"].as_str().unwrap()).is_ok(),
            "{line}"
        );
        if value.get("pipeline").is_some() {
            assert_eq!(value["pipeline"], "hr->poppulo", "{line}");
        }
        lines += 1;
    }
    assert!(lines >= 3, "{stderr}");
    assert!(stderr.contains("\"pipeline\":\"hr->poppulo\""), "{stderr}");
    assert!(stderr.contains("\"run\":1"), "{stderr}");
    assert!(!stderr.contains(PASSWORD));
}

/// A refused run's error line belongs to its run: it carries the pipeline and the run
/// number like every other line of the run.
#[test]
fn a_refused_runs_error_line_carries_its_pipeline_and_run() {
    let receiver = Receiver::start(Answer::Ok);
    let s = Scenario::new();
    s.config(&config(receiver.port, ""));
    s.write("people.csv", &people_csv(10, |_| "Ann".into()));
    s.sync("hr", "out", &[]).0.expect_code(0);
    s.write("people.csv", &people_csv(2, |_| "Ann".into()));
    let output = s
        .command(&[
            "--log-format",
            "json",
            "sync",
            "--from",
            "hr",
            "--to",
            "out",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let refused: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON"))
        .filter(|v| v["message"].as_str().unwrap_or("").contains("refused"))
        .collect();
    assert!(!refused.is_empty(), "{stderr}");
    for line in refused {
        assert_eq!(line["pipeline"], "hr->out", "{line}");
        assert!(line["run"].is_number(), "{line}");
    }
}

#[test]
fn history_shows_a_create_an_update_and_a_removal_and_runs_lists_the_runs() {
    let receiver = Receiver::start(Answer::Ok);
    let s = Scenario::new();
    s.config(
        &config(receiver.port, "").replace("to = \"out\"", "to = \"out\"\nmax_removal_ratio = 1.0"),
    );
    s.write("people.csv", &people_csv(3, |_| "Ann".into()));
    s.sync("hr", "out", &[]).0.expect_code(0);
    s.write(
        "people.csv",
        &people_csv(3, |i| if i == 2 { "Bea".into() } else { "Ann".into() }),
    );
    s.sync("hr", "out", &[]).0.expect_code(0);
    s.write("people.csv", &people_csv(1, |_| "Ann".into()));
    s.sync("hr", "out", &[]).0.expect_code(0);

    let history = s.run(&["history", "person2@example.com"]);
    history.expect_code(0);
    let stdout = history.stdout();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(lines[0].contains("run 1") && lines[0].contains("create external_id:E2"));
    assert!(
        lines[0].contains("first_name: (unset) -> \"Ann\""),
        "a create keeps its values: {}",
        lines[0]
    );
    assert!(
        lines[1].contains("run 2")
            && lines[1].contains("update")
            && lines[1].contains("first_name: \"Ann\" -> \"Bea\""),
        "{}",
        lines[1]
    );
    assert!(
        lines[2].contains("run 3") && lines[2].contains("remove"),
        "{}",
        lines[2]
    );
    let json = s.run(&["history", "E2", "--json"]);
    let entries: serde_json::Value = serde_json::from_str(&json.stdout()).unwrap();
    assert_eq!(entries.as_array().unwrap().len(), 3);
    assert_eq!(entries[1]["outcome"], "applied");

    let runs = s.run(&["runs", "--pipeline", "hr->out", "--json"]);
    runs.expect_code(0);
    let runs: serde_json::Value = serde_json::from_str(&runs.stdout()).unwrap();
    let runs = runs.as_array().unwrap();
    assert_eq!(runs.len(), 3);
    assert_eq!(runs[0]["run"], 3, "newest first");
    assert_eq!(runs[0]["removed"], 2);
    assert_eq!(runs[1]["updated"], 1);
    assert_eq!(runs[2]["created"], 3);
    assert!(runs.iter().all(|r| r["status"] == "synced"));
    let text = s.run(&["runs", "--last", "2"]);
    assert_eq!(text.stdout().lines().count(), 3, "a header and two runs");
}

#[test]
fn metrics_are_pushed_to_a_pushgateway() {
    let gateway = Receiver::start(Answer::Ok);
    let hook = Receiver::start(Answer::Ok);
    let s = Scenario::new();
    s.config(&format!(
        "{}\n[metrics]\npush_gateway = \"http://127.0.0.1:{}\"\n",
        config(hook.port, ""),
        gateway.port
    ));
    s.write("people.csv", &people_csv(2, |_| "Ann".into()));
    s.sync("hr", "out", &[]).0.expect_code(0);
    let pushed = gateway.bodies.lock().unwrap().clone();
    assert_eq!(pushed.len(), 1, "{pushed:?}");
    let lines = pushed[0].lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
    assert!(scrape
        .samples
        .iter()
        .any(|s| s.metric == "contactsync_records" && s.labels.get("outcome") == Some("created")));
}

/// Label values are escaped as the exposition format says: a section named
/// `we"ird\src` leaves the metrics file readable.
#[test]
fn metrics_label_values_are_escaped() {
    let s = Scenario::new();
    s.config(
        r#"
state = "data/state.db"
[sources."we\"ird\\src"]
type = "csv"
path = "people.csv"
[sinks.out]
type = "csv"
path = "out.csv"
"#,
    );
    s.write("people.csv", &people_csv(3, |_| "Ann".into()));
    let (run, _) = s.sync("we\"ird\\src", "out", &["--metrics", "m.prom"]);
    run.expect_code(0);
    let text = std::fs::read_to_string(s.path("m.prom")).unwrap();
    assert!(text.contains(r#"pipeline="we\"ird\\src->out""#), "{text}");
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
    assert!(
        scrape
            .samples
            .iter()
            .any(|s| s.metric == "contactsync_records"),
        "{text}"
    );
}

/// Secrets never leave the process, whatever their origin: a platform that echoes the
/// request (its `Authorization` header, the password in it) in its error body puts
/// nothing of them in stderr, the report, the runs, or the webhook payload.
#[test]
fn a_platform_echoing_the_request_leaks_no_secret() {
    let platform = Receiver::start(Answer::Echo);
    let hooks = Receiver::start(Answer::Ok);
    let s = Scenario::new();
    s.config(&format!(
        "{}\n[sinks.echo]\ntype = \"businesscatalyst\"\nbase_url = \"http://127.0.0.1:{}\"\nsite_id = 1\nusername = \"api-user\"\npassword = \"{PASSWORD}\"\nretry_backoff = \"10ms\"\n",
        config(hooks.port, ""),
        platform.port
    ));
    s.write("people.csv", &people_csv(3, |_| "Ann".into()));
    let report = s.path("report.json");
    let run = s.run(&[
        "sync",
        "--from",
        "hr",
        "--to",
        "echo",
        "--report",
        report.to_str().unwrap(),
    ]);
    assert_eq!(run.code(), 1, "{}", run.stderr());
    let basic = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!("api-user:{PASSWORD}"))
    };
    let report_text = std::fs::read_to_string(&report).unwrap();
    let runs = s.run(&["runs"]);
    let payloads: Vec<String> = hooks.bodies().iter().map(|b| b.to_string()).collect();
    assert!(!payloads.is_empty(), "the failure was notified");
    assert!(
        run.stderr().contains("[redacted]"),
        "the echo reached the error (else this test shows nothing): {}",
        run.stderr()
    );
    for (what, text) in [
        ("stderr", run.stderr()),
        ("stdout", run.stdout()),
        ("report", report_text),
        ("runs", runs.stdout()),
        ("webhook", payloads.join("\n")),
    ] {
        assert!(!text.contains(PASSWORD), "{what}: {text}");
        assert!(!text.contains(&basic), "{what}: {text}");
    }
}
