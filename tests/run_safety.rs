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
                "state = \"postgres://cs:hunter2@db/cs\"",
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
