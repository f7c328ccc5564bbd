//! `contactsync sync`: which pipelines, in which groups and slots, each run with its
//! outputs, notifications and metrics, and the exit code of them all.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use clap::Parser;
use contactsync_core::CancellationToken;
use contactsync_core::{Sink, Source};
use contactsync_engine::{run, Pipeline, RunOptions, RunReport, RunStatus, StateStore, SyncMode};
use futures::StreamExt;
use tracing::Instrument;

use crate::progress::RunProgress;
use crate::settings::Settings;
use crate::*;

#[derive(Parser, Debug, Clone)]
pub struct SyncArgs {
    /// The `[sources.NAME]` section to read (with --to).
    #[arg(long, value_name = "NAME", requires = "to", conflicts_with_all = ["all", "pipeline"])]
    pub from: Option<String>,
    /// The `[sinks.NAME]` section to write (with --from).
    #[arg(long, value_name = "NAME", requires = "from")]
    pub to: Option<String>,
    /// Run every `[pipelines.NAME]` of the config, in the order the file lists them.
    #[arg(long, conflicts_with = "pipeline")]
    pub all: bool,
    /// Run the `[pipelines.NAME]` section NAME (repeatable).
    #[arg(long, value_name = "NAME")]
    pub pipeline: Vec<String>,
    /// How many pipelines may run at once (pipelines that write one sink section
    /// always run one after the other).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub jobs: usize,
    /// Show the plan; change neither the sink nor the state.
    #[arg(long)]
    pub dry_run: bool,
    /// upsert, mirror (default), update-only or create-only.
    #[arg(long, value_name = "MODE")]
    pub mode: Option<SyncMode>,
    /// Read everything, even from an incremental source (and so detect removals).
    #[arg(long)]
    pub full: bool,
    /// Allow removing more than the pipeline's max_removal_ratio of the synced people.
    #[arg(long)]
    pub allow_mass_removal: bool,
    /// Write the run's report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Write rejected records as CSV to FILE (default: last-rejects.csv beside the state).
    #[arg(long, value_name = "FILE")]
    pub rejects: Option<PathBuf>,
    /// Write every change of the run to FILE, one JSON object a line, with each
    /// field's value before and after (with or without --dry-run).
    #[arg(long, value_name = "FILE")]
    pub plan: Option<PathBuf>,
    /// The state database (default: from the config).
    #[arg(long, value_name = "FILE")]
    pub state: Option<PathBuf>,
    /// Write the run's metrics in the Prometheus text format to FILE (atomically), for
    /// node_exporter's textfile collector.
    #[arg(long, value_name = "FILE")]
    pub metrics: Option<PathBuf>,
    /// When another run holds this pipeline (or its sink section), wait up to DURATION
    /// (`90s`, `10m`) for it instead of exiting 5.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub wait_for_lock: Option<std::time::Duration>,
    /// With --all: share the night with the other workers started with the same config
    /// and state (on any machine): take the next pipeline not yet run in this slot,
    /// until none is left. Pipelines that write one sink section wait for each other.
    #[arg(long, requires = "all")]
    pub worker: bool,
    /// The schedule slot --worker fills: each pipeline runs once a slot (default:
    /// today's date, UTC, `2026-12-01`).
    #[arg(long, value_name = "SLOT", requires = "worker")]
    pub slot: Option<String>,
}

pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    contactsync_core::DurationSetting::parse(text).map(|d| d.0)
}

/// One pipeline a `sync` runs.
#[derive(Debug, Clone)]
pub struct Job {
    /// How the user knows it: the `[pipelines.NAME]` section, or `from->to`.
    name: String,
    from: String,
    to: String,
}

/// What one pipeline's run came to.
pub struct Finished {
    job: Job,
    report: Option<RunReport>,
    code: u8,
    /// When the pipeline last synced (Unix seconds), for the metrics.
    last_success: Option<f64>,
}

impl Finished {
    /// What a pipeline's run gave, or, when it failed before it had a report, its
    /// error said on the console and its exit code.
    pub fn or_failed(result: Result<Finished, Failure>, job: Job) -> Finished {
        match result {
            Ok(finished) => finished,
            Err(Failure { code, error }) => {
                say(
                    tracing::Level::ERROR,
                    &format!("error: {}: {error:#}", job.name),
                );
                Finished {
                    job,
                    report: None,
                    code,
                    last_success: None,
                }
            }
        }
    }
}

/// The pipelines `args` names: `--from/--to`, `--pipeline NAME…` or `--all`.
pub fn select_jobs(settings: &Settings, args: &SyncArgs) -> Result<Vec<Job>> {
    if let (Some(from), Some(to)) = (&args.from, &args.to) {
        return Ok(vec![Job {
            name: Pipeline::id(from, to),
            from: from.clone(),
            to: to.clone(),
        }]);
    }
    let all = settings.pipelines();
    if args.all {
        if all.is_empty() {
            anyhow::bail!("--all: the config has no [pipelines.NAME] section");
        }
        return Ok(all
            .into_iter()
            .map(|(name, from, to)| Job { name, from, to })
            .collect());
    }
    if args.pipeline.is_empty() {
        anyhow::bail!("say what to sync: --from NAME --to NAME, --pipeline NAME, or --all");
    }
    args.pipeline
        .iter()
        .map(|wanted| {
            all.iter()
                .find(|(name, _, _)| name == wanted)
                .map(|(name, from, to)| Job {
                    name: name.clone(),
                    from: from.clone(),
                    to: to.clone(),
                })
                .ok_or_else(|| {
                    anyhow!(
                        "--pipeline {wanted}: no [pipelines.{wanted}] section (configured: {})",
                        all.iter()
                            .map(|(n, _, _)| n.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })
        })
        .collect()
}

/// The order of badness of exit codes: the worst of several runs is the command's.
pub fn severity(code: u8) -> u8 {
    match code {
        0 => 0,
        3 => 1,
        5 => 2,
        4 => 3,
        2 => 4,
        1 => 5,
        _ => 6, // 130: interrupted
    }
}

pub async fn sync(settings: &Settings, args: SyncArgs) -> Result<u8, Failure> {
    let jobs = select_jobs(settings, &args).map_err(usage)?;
    let many = jobs.len() > 1;
    // Every section, pipeline and path is checked before any of them runs.
    for job in &jobs {
        let source = settings.source(&job.from).map_err(usage)?;
        let source = built_for_checks(&source, build_source).map_err(usage)?;
        let sink = settings.sink(&job.to).map_err(usage)?;
        let sink = built_for_checks(&sink, build_sink).map_err(usage)?;
        settings.pipeline(&job.from, &job.to).map_err(usage)?;
        settings
            .pipeline_notify(&job.from, &job.to)
            .map_err(usage)?;
        let (rejects, plan) = outputs(settings, &args, job, many);
        let mut inputs: Vec<(&str, &Path)> = vec![("the config file", settings.file.as_path())];
        inputs.extend(
            settings
                .lookup_files
                .iter()
                .map(|f| ("a lookup file", f.as_path())),
        );
        check_paths(
            &inputs,
            source.as_ref(),
            sink.as_ref(),
            &[
                ("--report", args.report.as_deref()),
                ("--rejects", Some(&rejects)),
                ("--plan", plan.as_deref()),
                ("--metrics", args.metrics.as_deref()),
                ("the state", settings.state.file()),
            ],
        )
        .map_err(usage)?;
    }
    let cancel = CancellationToken::new();
    let on_interrupt = cancel.clone();
    // Each run stops at its next step and says what was left in its summary line.
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_interrupt.cancel();
        }
    });
    let sandboxes = tokio::sync::Mutex::new(Sandboxes::default());
    // Pipelines that write one sink section run one after the other, in config order;
    // the groups run side by side, up to --jobs at a time.
    let mut groups: Vec<Vec<(usize, Job)>> = Vec::new();
    for (i, job) in jobs.iter().cloned().enumerate() {
        match groups.iter_mut().find(|g| g[0].1.to == job.to) {
            Some(group) => group.push((i, job)),
            None => groups.push(vec![(i, job)]),
        }
    }
    let interactive = std::io::stderr().is_terminal() && args.jobs <= 1;
    let args = &args;
    let sandboxes = &sandboxes;
    let cancel = &cancel;
    let mut finished: Vec<(usize, Finished)> = if args.worker {
        work_the_slot(settings, args, &jobs, many, sandboxes, cancel).await?
    } else {
        futures::stream::iter(groups)
            .map(|group| async move {
                let mut done = Vec::new();
                for (i, job) in group {
                    let result =
                        sync_one(settings, args, &job, many, interactive, sandboxes, cancel).await;
                    done.push((i, Finished::or_failed(result, job)));
                }
                done
            })
            .buffer_unordered(args.jobs.max(1))
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .flatten()
            .collect()
    };
    finished.sort_by_key(|(i, _)| *i);
    std::mem::take(&mut *sandboxes.lock().await).stop();

    let worst = finished
        .iter()
        .map(|(_, f)| f.code)
        .max_by_key(|c| severity(*c))
        .unwrap_or(0);
    if many {
        print_table(&finished);
    }
    let reports: Vec<&RunReport> = finished
        .iter()
        .filter_map(|(_, f)| f.report.as_ref())
        .collect();
    // A worker with nothing left to run still writes its report: an empty list.
    if let (Some(path), true) = (&args.report, !reports.is_empty() || args.worker) {
        let json = if many {
            serde_json::to_string_pretty(&serde_json::json!({ "pipelines": reports }))
        } else {
            match reports.first() {
                Some(report) => serde_json::to_string_pretty(report),
                None => Ok(String::from("null")),
            }
        }
        .map_err(|e| failed(anyhow!(e)))?;
        std::fs::write(path, json + "\n")
            .with_context(|| format!("writing the report to {}", path.display()))
            .map_err(failed)?;
    }
    let measured: Vec<(&RunReport, Option<f64>)> = finished
        .iter()
        .filter_map(|(_, f)| {
            f.report
                .as_ref()
                .filter(|r| !r.dry_run)
                .map(|r| (r, f.last_success))
        })
        .collect();
    if !measured.is_empty() && (args.metrics.is_some() || settings.metrics.push_gateway.is_some()) {
        write_metrics(settings, args, &measured).await;
    }
    Ok(worst)
}

/// How long a worker waits for the run of another worker that writes the same sink
/// section, when `--wait-for-lock` does not say.
pub const WORKER_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(6 * 3600);

/// `sync --all --worker`: claims, in config order, each pipeline no worker ran in the
/// slot yet, and runs it; returns what this worker ran.
pub async fn work_the_slot(
    settings: &Settings,
    args: &SyncArgs,
    jobs: &[Job],
    many: bool,
    sandboxes: &tokio::sync::Mutex<Sandboxes>,
    cancel: &CancellationToken,
) -> Result<Vec<(usize, Finished)>, Failure> {
    let slot = args
        .slot
        .clone()
        .unwrap_or_else(|| chrono::Utc::now().format("%Y-%m-%d").to_string());
    let me = contactsync_engine::LockHolder::current("");
    let worker = format!("{}@{}", me.pid, me.host);
    let mut claims = settings.state.open().map_err(state_failure)?;
    let mut args = args.clone();
    args.wait_for_lock = Some(args.wait_for_lock.unwrap_or(WORKER_LOCK_WAIT));
    let mut done: Vec<(usize, Finished)> = Vec::new();
    // Pass after pass: before it stops, a worker looks again for the claims of workers
    // that died mid-pipeline after it went by (a pool that had passed such a pipeline
    // would otherwise never run it that night). A pass that claims nothing ends it.
    let mut claimed_in_pass = true;
    while claimed_in_pass && !cancel.is_cancelled() {
        claimed_in_pass = false;
        for (i, job) in jobs.iter().enumerate() {
            if cancel.is_cancelled() {
                break;
            }
            if done.iter().any(|(d, _)| *d == i) {
                continue;
            }
            let pipeline = Pipeline::id(&job.from, &job.to);
            if !claims
                .claim_slot(&slot, &pipeline, &worker)
                .map_err(|e| failed(anyhow!(e)))?
            {
                tracing::info!(%slot, %pipeline, "run in this slot already, or by another worker");
                continue;
            }
            claimed_in_pass = true;
            say(
                tracing::Level::INFO,
                &format!("worker {worker}: {} (slot {slot})", job.name),
            );
            let result = sync_one(settings, &args, job, many, false, sandboxes, cancel).await;
            let finished = Finished::or_failed(result, job.clone());
            let status = finished
                .report
                .as_ref()
                .map(|r| r.status.as_str())
                .unwrap_or("error");
            claims
                .finish_slot(&slot, &pipeline, status)
                .map_err(|e| failed(anyhow!(e)))?;
            done.push((i, finished));
        }
    }
    done.sort_by_key(|(i, _)| *i);
    if done.is_empty() {
        say(
            tracing::Level::WARN,
            &format!("worker {worker}: nothing left to run in slot {slot}"),
        );
    }
    Ok(done)
}

/// The summary of several runs: one line a pipeline.
pub fn print_table(finished: &[(usize, Finished)]) {
    say!(
        "{:<20} {:<22} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "pipeline",
        "status",
        "created",
        "updated",
        "removed",
        "rejected",
        "time"
    );
    for (_, f) in finished {
        match &f.report {
            Some(r) => say!(
                "{:<20} {:<22} {:>8} {:>8} {:>8} {:>8} {:>6.1} s",
                f.job.name,
                r.status.as_str(),
                r.created,
                r.updated,
                r.removed,
                r.rejected,
                r.duration_ms as f64 / 1000.0
            ),
            None => say!(
                "{:<20} {:<22} {:>8} {:>8} {:>8} {:>8} {:>8}",
                f.job.name,
                format!("error (exit {})", f.code),
                "-",
                "-",
                "-",
                "-",
                "-"
            ),
        }
    }
}

/// A run's rejects file and plan file.
pub fn outputs(
    settings: &Settings,
    args: &SyncArgs,
    job: &Job,
    many: bool,
) -> (PathBuf, Option<PathBuf>) {
    let rejects = per_pipeline(args.rejects.as_deref(), many, job, "csv").unwrap_or_else(|| {
        if many {
            settings
                .data_dir()
                .join(format!("last-rejects-{}.csv", file_safe(&job.name)))
        } else {
            settings.data_dir().join("last-rejects.csv")
        }
    });
    (
        rejects,
        per_pipeline(args.plan.as_deref(), many, job, "jsonl"),
    )
}

/// Where a run's rejects or plan go: the file given, or with several pipelines one file
/// a pipeline in the directory given.
pub fn per_pipeline(given: Option<&Path>, many: bool, job: &Job, ext: &str) -> Option<PathBuf> {
    let given = given?;
    if !many {
        return Some(given.to_path_buf());
    }
    let _ = std::fs::create_dir_all(given);
    Some(given.join(format!("{}.{ext}", file_safe(&job.name))))
}

/// A pipeline name as a file name (`hr->poppulo` → `hr-poppulo`).
pub fn file_safe(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if c.is_ascii_alphanumeric() || matches!(c, '_' | '.') {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out
}

/// Syncs one pipeline and prints its summary.
pub async fn sync_one(
    settings: &Settings,
    args: &SyncArgs,
    job: &Job,
    many: bool,
    interactive: bool,
    sandboxes: &tokio::sync::Mutex<Sandboxes>,
    cancel: &CancellationToken,
) -> Result<Finished, Failure> {
    let data_dir = settings.data_dir();
    // A SQLite state creates it; with the state in PostgreSQL the spool and the
    // rejects file still need it.
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))
        .map_err(failed)?;
    let source_section = settings.source(&job.from).map_err(usage)?;
    let sink_section = settings.sink(&job.to).map_err(usage)?;
    let (source_section, sink_section) = {
        let mut sandboxes = sandboxes.lock().await;
        let source = sandboxes
            .resolve(source_section, &data_dir)
            .await
            .map_err(failed)?;
        let sink = sandboxes
            .resolve(sink_section, &data_dir)
            .await
            .map_err(failed)?;
        (source, sink)
    };
    let source = build_source(&source_section).map_err(usage)?;
    let mut sink = build_sink(&sink_section).map_err(usage)?;
    let mut pipeline_settings = settings.pipeline(&job.from, &job.to).map_err(usage)?;
    if let Some(mode) = args.mode {
        pipeline_settings.mode = mode;
    }
    let section = settings
        .pipeline_section(&job.from, &job.to)
        .unwrap_or_else(|| job.name.clone());
    let pipeline = Pipeline::new(
        &job.from,
        &job.to,
        &sink_section.settings.section,
        pipeline_settings,
    )
    .with_shaping(&section, settings.lookups.clone())
    .map_err(|e| usage(anyhow!(e)))?;
    let (rejects, plan) = outputs(settings, args, job, many);
    let mut state = settings.state.open().map_err(state_failure)?;
    let options = RunOptions {
        dry_run: args.dry_run,
        allow_mass_removal: args.allow_mass_removal,
        full: args.full,
        rejects: Some(rejects.clone()),
        plan,
        wait_for_lock: args.wait_for_lock,
        sample_size: if args.dry_run { 5 } else { 0 },
        spool_dir: Some(data_dir.clone()),
        cancel: cancel.clone(),
    };
    let notify = settings
        .pipeline_notify(&job.from, &job.to)
        .map_err(usage)?;
    let progress = RunProgress::new(interactive);
    // Every log line of the run carries the pipeline and (once known) the run number.
    // At WARN level, so that the default filter (warnings) keeps it for every line.
    let span = tracing::warn_span!("run", pipeline = %pipeline.name, run = tracing::field::Empty);
    let report = run(
        &pipeline,
        source.as_ref(),
        sink.as_mut(),
        state.as_mut(),
        &options,
        &progress,
    )
    .instrument(span.clone())
    .await;
    progress.finish();
    drop(sink);

    // In the run's span: its error line carries the pipeline and run like the others.
    span.in_scope(|| print_report(&report, &rejects));
    let last_success = after_run(&notify, state.as_mut(), &report)
        .instrument(span)
        .await;
    Ok(Finished {
        job: job.clone(),
        code: exit_code(report.status),
        report: Some(report),
        last_success,
    })
}

/// Writes and pushes the metrics of the runs of this command.
pub async fn write_metrics(
    settings: &Settings,
    args: &SyncArgs,
    runs: &[(&RunReport, Option<f64>)],
) {
    let now = chrono::Utc::now().timestamp() as f64;
    let text = match metrics::render(runs, now) {
        Ok(text) => text,
        Err(e) => {
            tracing::warn!("{e:#}");
            return;
        }
    };
    if let Some(path) = &args.metrics {
        if let Err(e) = metrics::write_file(path, &text) {
            tracing::warn!("writing the metrics: {e:#}");
        }
    }
    // The Pushgateway groups by pipeline: each pipeline's metrics replace only its own.
    if let Some(gateway) = &settings.metrics.push_gateway {
        for &(report, last_success) in runs {
            let pushed = match metrics::render(&[(report, last_success)], now) {
                Ok(text) => metrics::push(gateway, &report.pipeline, text).await,
                Err(e) => Err(e),
            };
            if let Err(e) = pushed {
                tracing::warn!("pushing the metrics to the Pushgateway: {e:#}");
            }
        }
    }
}

/// Notifications of a finished run (they never change the exit code: a problem is
/// logged), and when the pipeline last synced, for the metrics.
pub async fn after_run(
    notify: &notify::NotifySettings,
    state: &mut dyn StateStore,
    report: &RunReport,
) -> Option<f64> {
    if report.dry_run {
        return None;
    }
    // The runs in the state, newest first: this one (unless it never started), then
    // the one before, whose status says whether anything changed.
    let runs = match state.runs(Some(&report.pipeline), 50) {
        Ok(runs) => runs,
        Err(e) => {
            tracing::warn!("reading the run history for notifications and metrics: {e}");
            Vec::new()
        }
    };
    let earlier: Vec<_> = runs.iter().filter(|r| r.run != report.run).collect();
    let last_success = if report.status.succeeded() {
        Some(chrono::Utc::now().timestamp() as f64)
    } else {
        earlier
            .iter()
            .filter(|r| {
                matches!(
                    r.status.as_deref(),
                    Some("synced" | "finished_with_rejects" | "removals_held")
                )
            })
            .find_map(|r| r.finished_at.as_deref())
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.timestamp() as f64)
    };
    if !notify.is_empty() {
        let previous = earlier.first().and_then(|r| {
            let status = r.status.clone()?;
            let rejected = r
                .report
                .as_deref()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok())
                .and_then(|v| v["rejected"].as_u64())
                .unwrap_or(0);
            Some((status, rejected))
        });
        notify::after_run(notify, report, previous).await;
    }
    last_success
}

/// Refuses, before anything runs, a source and sink on one file, and a file the run
/// writes (the sink's, report, rejects, plan, metrics, state) that is a file it reads
/// (the config, a lookup table, the source's) or another it writes: the run would
/// truncate the export before reading it, overwrite the config, or turn the state into
/// metrics text. Files are compared by identity (device and inode: a hard link or a
/// symbolic link is the file it names), by path when they do not exist yet.
pub fn check_paths(
    inputs: &[(&str, &Path)],
    source: &dyn Source,
    sink: &dyn Sink,
    outputs: &[(&str, Option<&Path>)],
) -> Result<()> {
    let source_files = source.files();
    let sink_files = sink.files();
    for s in &source_files {
        if sink_files.iter().any(|k| same_file(s, k)) {
            anyhow::bail!(
                "the source and the sink are the same file ({}): a sink file is rewritten while it is read; give the sink its own path",
                s.display()
            );
        }
    }
    let mut named: Vec<(String, &Path)> = inputs
        .iter()
        .map(|(what, path)| (what.to_string(), *path))
        .chain(
            source_files
                .iter()
                .map(|f| ("the source file".to_string(), f.as_path())),
        )
        .collect();
    let written = sink_files
        .iter()
        .map(|f| ("the sink file", Some(f.as_path())))
        .chain(outputs.iter().copied());
    for (what, path) in written {
        let Some(path) = path else { continue };
        if let Some((other, _)) = named.iter().find(|(_, p)| same_file(p, path)) {
            anyhow::bail!(
                "{what} {} is also {other}: writing it would destroy that file; choose another path",
                path.display()
            );
        }
        named.push((what.to_string(), path));
    }
    Ok(())
}

/// Whether two paths name one file: the same device and inode when both exist (links
/// included), else the same path once made absolute.
pub fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if let (Ok(x), Ok(y)) = (std::fs::metadata(a), std::fs::metadata(b)) {
        return x.dev() == y.dev() && x.ino() == y.ino();
    }
    pub fn normal(p: &Path) -> PathBuf {
        if let Ok(real) = p.canonicalize() {
            return real;
        }
        let absolute = std::env::current_dir()
            .map(|dir| dir.join(p))
            .unwrap_or_else(|_| p.to_path_buf());
        match (absolute.parent(), absolute.file_name()) {
            (Some(dir), Some(name)) => dir
                .canonicalize()
                .map(|d| d.join(name))
                .unwrap_or(absolute.clone()),
            _ => absolute,
        }
    }
    normal(a) == normal(b)
}

/// The exit code of a run that ended with `status` (the README's table).
pub fn exit_code(status: RunStatus) -> u8 {
    match status {
        RunStatus::Synced => 0,
        RunStatus::Failed => 1,
        RunStatus::FinishedWithRejects | RunStatus::RemovalsHeld => 3,
        RunStatus::Refused => 4,
        RunStatus::Locked => 5,
        RunStatus::Interrupted => 130,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worst_outcome_of_many_runs_decides_the_exit_code() {
        // Synced < rejects < locked < refused < usage < failure < interrupted.
        let order = [0u8, 3, 5, 4, 2, 1, 130];
        for pair in order.windows(2) {
            assert!(severity(pair[0]) < severity(pair[1]), "{pair:?}");
        }
        assert_eq!(exit_code(RunStatus::RemovalsHeld), 3);
        assert_eq!(exit_code(RunStatus::Locked), 5);
    }

    #[test]
    fn a_pipeline_name_becomes_a_safe_file_name() {
        assert_eq!(file_safe("csv->poppulo"), "csv-poppulo");
        assert_eq!(file_safe("hr/../x y"), "hr-..-x-y");
    }
}
