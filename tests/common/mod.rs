//! What every end-to-end scenario needs: a scratch directory with a config, and the
//! real `contactsync` binary run in it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A scratch directory holding a config, its data and its state.
pub struct Scenario {
    pub dir: Dir,
    _guard: Option<tempfile::TempDir>,
}

/// The scenario's directory.
pub enum Dir {
    Borrowed(PathBuf),
}

impl Dir {
    pub fn path(&self) -> &Path {
        match self {
            Dir::Borrowed(p) => p,
        }
    }
}

impl Scenario {
    pub fn new() -> Self {
        let guard = tempfile::tempdir().expect("temp dir");
        Scenario {
            dir: Dir::Borrowed(guard.path().to_path_buf()),
            _guard: Some(guard),
        }
    }

    /// Another handle on the same directory (for a blocking task), which does not
    /// delete it when dropped.
    pub fn at(dir: PathBuf) -> Self {
        Scenario {
            dir: Dir::Borrowed(dir),
            _guard: None,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write(&self, name: &str, content: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, content).expect("write fixture");
        path
    }

    pub fn config(&self, toml: &str) {
        self.write("contactsync.toml", toml);
    }

    /// The binary, with the scenario's config, in the scenario's directory.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_contactsync"));
        cmd.arg("--config")
            .arg(self.path("contactsync.toml"))
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("CONTACTSYNC_CONFIG")
            .env("RUST_LOG", "warn");
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Run {
        let output = self.command(args).output().expect("run contactsync");
        Run { output }
    }

    /// `sync` with a report and a rejects file; returns the run and its report.
    pub fn sync(&self, from: &str, to: &str, extra: &[&str]) -> (Run, serde_json::Value) {
        let report = self.path("report.json");
        let rejects = self.path("rejects.csv");
        let _ = std::fs::remove_file(&report);
        let mut args = vec![
            "sync",
            "--from",
            from,
            "--to",
            to,
            "--report",
            report.to_str().unwrap(),
            "--rejects",
            rejects.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let run = self.run(&args);
        let json = std::fs::read_to_string(&report)
            .map(|text| serde_json::from_str(&text).expect("report is JSON"))
            .unwrap_or(serde_json::Value::Null);
        (run, json)
    }

    /// [`Scenario::sync`] on a blocking thread, so that a sandbox served by the test's
    /// own runtime keeps answering while the binary runs.
    pub async fn sync_off_runtime(
        &self,
        from: &str,
        to: &str,
        extra: &[&str],
    ) -> (Run, serde_json::Value) {
        let (from, to) = (from.to_string(), to.to_string());
        let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        let dir = self.dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || {
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            Scenario::at(dir).sync(&from, &to, &extra)
        })
        .await
        .expect("sync task")
    }

    /// [`Scenario::run`] on a blocking thread, as [`Scenario::sync_off_runtime`].
    pub async fn run_off_runtime(&self, args: &[&str]) -> Run {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let dir = self.dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Scenario::at(dir).run(&args)
        })
        .await
        .expect("run task")
    }

    /// The rejects file's rows (without the header).
    pub fn rejects(&self) -> Vec<csv::StringRecord> {
        let mut reader = csv::Reader::from_path(self.path("rejects.csv")).expect("rejects file");
        reader.records().map(|r| r.expect("rejects row")).collect()
    }
}

pub struct Run {
    pub output: Output,
}

impl Run {
    pub fn code(&self) -> i32 {
        self.output.status.code().unwrap_or(-1)
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }
    /// Asserts the exit code, showing the output when it differs.
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code(),
            code,
            "exit code\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout(),
            self.stderr()
        );
        self
    }
}

/// The counts of a report, in the order read, created, updated, removed, unchanged, rejected.
pub fn counts(report: &serde_json::Value) -> [u64; 6] {
    [
        "read",
        "created",
        "updated",
        "removed",
        "unchanged",
        "rejected",
    ]
    .map(|k| {
        report[k]
            .as_u64()
            .unwrap_or_else(|| panic!("report lacks {k}: {report}"))
    })
}

/// A CSV of people `E1..En`, with the given first name for everyone.
pub fn people_csv(n: usize, first_name: impl Fn(usize) -> String) -> String {
    let mut s = String::from("external_id,email,first_name,last_name,department\n");
    for i in 1..=n {
        s.push_str(&format!(
            "E{i},person{i}@example.com,{},Last{i},Dept{}\n",
            first_name(i),
            i % 3
        ));
    }
    s
}

pub fn read_rows(path: &Path) -> Vec<csv::StringRecord> {
    let mut reader = csv::Reader::from_path(path).expect("csv file");
    reader.records().map(|r| r.expect("csv row")).collect()
}

/// The password of the Poppulo sandboxes the scenarios start.
pub const POPPULO_PASSWORD: &str = "s3cret-Pw-4711";

/// A Poppulo sandbox on loopback for account `acme` (user `api-user`), working through
/// `records_per_tick` rows every 50 ms.
pub async fn poppulo_sandbox(
    records_per_tick: usize,
) -> contactsync_sandbox_poppulo::RunningPoppulo {
    use contactsync_sandbox_poppulo::{PoppuloSandbox, SandboxConfig};
    PoppuloSandbox::start(SandboxConfig {
        account: "acme".into(),
        username: "api-user".into(),
        password: POPPULO_PASSWORD.into(),
        records_per_tick,
        tick: std::time::Duration::from_millis(50),
        ping_interval: std::time::Duration::from_millis(300),
        ..SandboxConfig::default()
    })
    .await
    .expect("sandbox starts")
}
