//! `cargo xtask bench --only dashboard`: how fast `contactsync serve` answers on a big
//! state: a pipeline with 1,000 runs (each with a reject), the dashboard started on it,
//! the overview fetched all through a first sync of 1M people into another pipeline
//! (the state written meanwhile), then each page fetched 20 times: the median and the
//! slowest time of each, against the 200 ms the dashboard promises.

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bench::{generate, Day};

/// Runs of the small pipeline.
const RUNS: usize = 1_000;
/// Fetches of each page.
const FETCHES: usize = 20;

/// Fills the state, serves it, and prints a table of page times.
pub fn run(binary: &Path, dir: &Path, people: usize) -> Result<String> {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir)?;
    let big = dir.join("people.csv");
    generate(&big.to_path_buf(), people, Day::First)?;
    fs::write(
        dir.join("contactsync.toml"),
        format!(
            "state = \"{0}/state.db\"\n[sources.big]\ntype = \"csv\"\npath = \"{0}/people.csv\"\n[sinks.big]\ntype = \"csv\"\npath = \"{0}/big-out.csv\"\n\
             [sources.small]\ntype = \"csv\"\npath = \"{0}/small.csv\"\n[sinks.small]\ntype = \"csv\"\npath = \"{0}/small-out.csv\"\n",
            dir.display()
        ),
    )?;
    let sync = |from: &str, to: &str| -> Result<()> {
        let out = Command::new(binary)
            .arg("--config")
            .arg(dir.join("contactsync.toml"))
            // Each night of the small pipeline replaces one of its two people.
            .args(["sync", "--from", from, "--to", to, "--allow-mass-removal"])
            .output()
            .context("running contactsync")?;
        // 3: finished with rejects (the small pipeline rejects one a run).
        if !matches!(out.status.code(), Some(0 | 3)) {
            bail!("sync failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    eprintln!("dashboard bench: {RUNS} runs of a small pipeline");
    for i in 0..RUNS {
        fs::write(
            dir.join("small.csv"),
            format!(
                "external_id,email,first_name\nS1,s1@example.com,Night {i}\nS2,not-an-email,Bad\nS{},s{}@example.com,New\n",
                i + 3,
                i + 3
            ),
        )?;
        sync("small", "small")?;
    }
    let mut server = Command::new(binary)
        .arg("--config")
        .arg(dir.join("contactsync.toml"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting contactsync serve")?;
    let mut line = String::new();
    if let Some(out) = server.stdout.take() {
        BufReader::new(out).read_line(&mut line)?;
    }
    let base = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .map(|h| format!("http://{h}"))
        .with_context(|| format!("serve said {line:?}"))?;
    let middle = people / 2;
    let pages = [
        ("overview", "/".to_string()),
        (
            "pipeline (1,000 runs)",
            "/pipelines/small-%3Esmall".to_string(),
        ),
        (
            "run with its rejects",
            format!("/pipelines/small-%3Esmall/runs/{}", RUNS / 2),
        ),
        (
            "person by email (1M people)",
            format!("/people?q=person{middle}@example.com"),
        ),
        (
            "person by external id (1M people)",
            format!("/people?q=E{middle:08}"),
        ),
        ("metrics", "/metrics".to_string()),
    ];
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build();
    // The dashboard keeps answering while a run writes the state: the overview fetched
    // all through a first sync of a million people.
    eprintln!("dashboard bench: a first sync of {people} people, the overview fetched meanwhile");
    let mut first_sync = Command::new(binary)
        .arg("--config")
        .arg(dir.join("contactsync.toml"))
        .args(["sync", "--from", "big", "--to", "big"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the first sync")?;
    let mut during = Vec::new();
    while first_sync.try_wait()?.is_none() {
        let started = Instant::now();
        agent
            .get(&format!("{base}/"))
            .call()
            .context("the overview during the first sync")?;
        during.push(started.elapsed());
        std::thread::sleep(Duration::from_millis(100));
    }
    if !first_sync.wait()?.success() {
        bail!("the first sync of {people} people failed");
    }
    during.sort();
    let mut table = String::new();
    writeln!(table, "| page | state | median | slowest |")?;
    writeln!(table, "|---|---|---:|---:|")?;
    if let (Some(median), Some(slowest)) = (during.get(during.len() / 2), during.last()) {
        let line = format!(
            "| overview, fetched {} times during the first sync of {people} | SQLite, written meanwhile | {:.0} ms | {:.0} ms |",
            during.len(),
            median.as_secs_f64() * 1000.0,
            slowest.as_secs_f64() * 1000.0
        );
        eprintln!("{line}");
        writeln!(table, "{line}")?;
    }
    for (name, path) in pages {
        let mut times = Vec::with_capacity(FETCHES);
        for _ in 0..FETCHES {
            let started = Instant::now();
            let response = agent.get(&format!("{base}{path}")).call();
            let body = match response {
                Ok(r) => r.into_string().unwrap_or_default(),
                Err(e) => bail!("GET {path}: {e}"),
            };
            times.push(started.elapsed());
            if body.is_empty() {
                bail!("GET {path}: an empty page");
            }
        }
        times.sort();
        let line = format!(
            "| {name} | SQLite, {people} people, {} runs | {:.0} ms | {:.0} ms |",
            RUNS + 1,
            times[FETCHES / 2].as_secs_f64() * 1000.0,
            times[FETCHES - 1].as_secs_f64() * 1000.0
        );
        eprintln!("{line}");
        writeln!(table, "{line}")?;
    }
    let _ = server.kill();
    let _ = server.wait();
    Ok(table)
}
