//! What each page shows, read from the state: plain data, serialised as the JSON API
//! and rendered by [`super::pages`]. Nothing here writes.

use chrono::{DateTime, Utc};
use contactsync_engine::state::roles::*;
use contactsync_engine::state::{HeldLock, RejectRow, RunRecord, StateError};
use serde::Serialize;

/// Runs the overview's chart shows a pipeline.
pub const CHART_RUNS: usize = 60;
/// Runs a pipeline's page lists at a time.
pub const RUNS_PAGE: usize = 50;
/// Rejects a run's page lists at a time.
pub const REJECTS_PAGE: usize = 100;

/// How a status reads at a glance: `ok` (synced), `warn` (finished, but something
/// was held back or rejected), `bad` (failed or refused), `idle` (interrupted, locked
/// out, still running or killed).
pub fn tone(status: &str) -> &'static str {
    match status {
        "synced" => "ok",
        "finished_with_rejects" | "removals_held" => "warn",
        "failed" | "refused" => "bad",
        _ => "idle",
    }
}

/// A point in time as pages show it: `2026-12-07 10:00:00 UTC`.
pub fn shown_time(rfc3339: &str) -> String {
    DateTime::parse_from_rfc3339(rfc3339)
        .map(|t| {
            t.with_timezone(&Utc)
                .format("%Y-%m-%d %H:%M:%S UTC")
                .to_string()
        })
        .unwrap_or_else(|_| rfc3339.to_string())
}

/// One run, as lists and charts show it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunSummary {
    /// Its number.
    pub run: i64,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// When it finished; `None` while it runs, or when it was killed.
    pub finished_at: Option<String>,
    /// How it ended, in the report's words; `running` or `killed` when it has not.
    pub status: String,
    /// See [`tone`].
    pub tone: &'static str,
    /// How long it took.
    pub duration_ms: Option<u64>,
    /// Records read.
    pub read: u64,
    /// People created.
    pub created: u64,
    /// People updated.
    pub updated: u64,
    /// People removed.
    pub removed: u64,
    /// People unchanged.
    pub unchanged: u64,
    /// Records rejected.
    pub rejected: u64,
    /// Whether it was a dry run.
    pub dry_run: bool,
    /// The error that stopped it.
    pub error: Option<String>,
}

impl RunSummary {
    /// A stored run; `running` tells a run without an end that holds its lock now.
    pub fn of(record: &RunRecord, running: bool) -> RunSummary {
        let report: serde_json::Value = record
            .report
            .as_deref()
            .and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or_default();
        let n = |k: &str| report[k].as_u64().unwrap_or(0);
        let status = match (&record.status, running) {
            (Some(s), _) => s.clone(),
            (None, true) => "running".into(),
            (None, false) => "killed".into(),
        };
        RunSummary {
            run: record.run,
            started_at: record.started_at.clone(),
            finished_at: record.finished_at.clone(),
            tone: tone(&status),
            status,
            duration_ms: report["duration_ms"].as_u64(),
            read: n("read"),
            created: n("created"),
            updated: n("updated"),
            removed: n("removed"),
            unchanged: n("unchanged"),
            rejected: n("rejected"),
            dry_run: report["dry_run"].as_bool().unwrap_or(false),
            error: report["error"].as_str().map(str::to_string),
        }
    }

    /// Whether the run synced (as the metrics' last success counts it).
    pub fn succeeded(&self) -> bool {
        matches!(
            self.status.as_str(),
            "synced" | "finished_with_rejects" | "removals_held"
        )
    }
}

/// A run lock, as the overview shows who holds it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LockView {
    /// `pipeline:…` or `sink:…`.
    pub name: String,
    /// The host of the process that holds it.
    pub host: String,
    /// Its process id.
    pub pid: u32,
    /// Since when (RFC 3339).
    pub since: String,
    /// Whether the holder is alive; a dead holder's lock is taken over by the next run.
    pub live: bool,
}

impl LockView {
    fn of(lock: &HeldLock) -> LockView {
        LockView {
            name: lock.name.clone(),
            host: lock.holder.host.clone(),
            pid: lock.holder.pid,
            since: lock.holder.since.clone(),
            live: lock.live,
        }
    }
}

/// One row of the overview.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PipelineOverview {
    /// `source->sink`.
    pub name: String,
    /// Its last run.
    pub last: Option<RunSummary>,
    /// When it last synced (RFC 3339).
    pub last_success_at: Option<String>,
    /// Whether its last success is older than `stale_after` (or it never synced).
    pub stale: bool,
    /// The locks its runs hold now.
    pub locks: Vec<LockView>,
    /// Its last [`CHART_RUNS`] runs, oldest first (dry runs left out).
    pub recent: Vec<RunSummary>,
}

/// Every pipeline the state knows, by name.
pub fn overview(
    state: &mut dyn StateStore,
    now: DateTime<Utc>,
    stale_after: std::time::Duration,
) -> Result<Vec<PipelineOverview>, StateError> {
    let locks = state.held_locks()?;
    let mut rows = Vec::new();
    for name in state.pipelines()? {
        let held: Vec<LockView> = locks
            .iter()
            .filter(|l| l.holder.pipeline == name)
            .map(LockView::of)
            .collect();
        let running = held.iter().any(|l| l.live);
        let records = state.run_page(&name, None, CHART_RUNS)?;
        let recent: Vec<RunSummary> = records
            .iter()
            .enumerate()
            .map(|(i, r)| RunSummary::of(r, running && i == 0))
            .collect();
        let last_success_at = last_success(state, &name, &recent)?;
        let stale = match &last_success_at {
            Some(at) => DateTime::parse_from_rfc3339(at).is_ok_and(|t| {
                now.signed_duration_since(t.with_timezone(&Utc))
                    .to_std()
                    .is_ok_and(|age| age > stale_after)
            }),
            None => true,
        };
        rows.push(PipelineOverview {
            last: recent.first().cloned(),
            recent: recent.into_iter().rev().filter(|r| !r.dry_run).collect(),
            name,
            last_success_at,
            stale,
            locks: held,
        });
    }
    Ok(rows)
}

/// When `pipeline` last synced: among its recent runs, else further back a page at a
/// time.
fn last_success(
    state: &mut dyn StateStore,
    pipeline: &str,
    recent: &[RunSummary],
) -> Result<Option<String>, StateError> {
    let ended = |r: &RunSummary| r.finished_at.clone().or_else(|| Some(r.started_at.clone()));
    if let Some(r) = recent.iter().find(|r| r.succeeded()) {
        return Ok(ended(r));
    }
    let mut before = recent.last().map(|r| r.run);
    while let Some(b) = before {
        let page = state.run_page(pipeline, Some(b), 500)?;
        if let Some(r) = page
            .iter()
            .map(|r| RunSummary::of(r, false))
            .find(RunSummary::succeeded)
        {
            return Ok(ended(&r));
        }
        before = page.last().map(|r| r.run);
    }
    Ok(None)
}

/// A pipeline's page: a page of its runs, newest first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PipelinePage {
    /// `source->sink`.
    pub name: String,
    /// The runs, newest first.
    pub runs: Vec<RunSummary>,
    /// The `before` of the next page, when there is one.
    pub next_before: Option<i64>,
}

/// `pipeline`'s runs numbered below `before`; `None` when the state has no such
/// pipeline.
pub fn pipeline_page(
    state: &mut dyn StateStore,
    pipeline: &str,
    before: Option<i64>,
) -> Result<Option<PipelinePage>, StateError> {
    if !state.pipelines()?.iter().any(|p| p == pipeline) {
        return Ok(None);
    }
    let running = state
        .held_locks()?
        .iter()
        .any(|l| l.live && l.holder.pipeline == pipeline);
    let records = state.run_page(pipeline, before, RUNS_PAGE + 1)?;
    let next_before = (records.len() > RUNS_PAGE).then(|| records[RUNS_PAGE - 1].run);
    let runs = records
        .iter()
        .take(RUNS_PAGE)
        .map(|r| RunSummary::of(r, running && before.is_none() && r.run == records[0].run))
        .collect();
    Ok(Some(PipelinePage {
        name: pipeline.to_string(),
        runs,
        next_before,
    }))
}

/// A run's page: its report and a page of its rejects.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunPage {
    /// `source->sink`.
    pub pipeline: String,
    /// The run.
    pub summary: RunSummary,
    /// Its report as the state keeps it.
    pub report: serde_json::Value,
    /// A page of its rejects, from `offset`.
    pub rejects: Vec<RejectRow>,
    /// The position of the first reject shown.
    pub offset: u64,
    /// The `offset` of the next page, when there is one.
    pub next_offset: Option<u64>,
}

/// Run `run` of `pipeline`; `None` when there is no such run.
pub fn run_page(
    state: &mut dyn StateStore,
    pipeline: &str,
    run: i64,
    offset: u64,
) -> Result<Option<RunPage>, StateError> {
    let Some(record) = state
        .run_page(pipeline, Some(run.saturating_add(1)), 1)?
        .into_iter()
        .find(|r| r.run == run)
    else {
        return Ok(None);
    };
    let mut rejects = state.rejects(pipeline, run, offset, REJECTS_PAGE + 1)?;
    let next_offset = (rejects.len() > REJECTS_PAGE).then_some(offset + REJECTS_PAGE as u64);
    rejects.truncate(REJECTS_PAGE);
    Ok(Some(RunPage {
        pipeline: pipeline.to_string(),
        summary: RunSummary::of(&record, false),
        report: record
            .report
            .as_deref()
            .and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or_default(),
        rejects,
        offset,
        next_offset,
    }))
}

/// Every kept reject of a run, as CSV: `stage,origin,key,email,field,reason`.
pub fn rejects_csv(
    state: &mut dyn StateStore,
    pipeline: &str,
    run: i64,
) -> Result<Vec<u8>, StateError> {
    let mut out = csv::Writer::from_writer(Vec::new());
    let _ = out.write_record(["stage", "origin", "key", "email", "field", "reason"]);
    let mut offset = 0u64;
    loop {
        let page = state.rejects(pipeline, run, offset, 10_000)?;
        for r in &page {
            let _ = out.write_record([
                r.stage.as_str(),
                &r.origin,
                r.key.as_deref().unwrap_or_default(),
                r.email.as_deref().unwrap_or_default(),
                r.field.as_deref().unwrap_or_default(),
                &r.reason,
            ]);
        }
        if page.len() < 10_000 {
            break;
        }
        offset += page.len() as u64;
    }
    Ok(out.into_inner().unwrap_or_default())
}

/// One field a change set, before and after (`None`: unset, or not kept).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldChange {
    /// The field.
    pub name: String,
    /// Its value before.
    pub before: Option<String>,
    /// Its value after.
    pub after: Option<String>,
    /// Whether the values were kept (`audit_values`).
    pub values: bool,
}

/// One change of a person's history.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PersonEntry {
    /// `source->sink`.
    pub pipeline: String,
    /// The run.
    pub run: i64,
    /// When (RFC 3339).
    pub at: String,
    /// The person's key.
    pub key: String,
    /// Their email, when known.
    pub email: Option<String>,
    /// `create`, `update` or `remove`.
    pub kind: String,
    /// How it ended (`applied`, `rejected`, …).
    pub outcome: String,
    /// Why, when it did not apply.
    pub reason: Option<String>,
    /// The fields it set.
    pub fields: Vec<FieldChange>,
}

/// What `contactsync history WHO` prints, as entries with each field before and after.
pub fn person(state: &mut dyn StateStore, who: &str) -> Result<Vec<PersonEntry>, StateError> {
    let who = who.trim();
    if who.is_empty() {
        return Ok(Vec::new());
    }
    let entries = contactsync_engine::history(state, who)?;
    Ok(entries
        .into_iter()
        .map(|e| PersonEntry {
            at: DateTime::from_timestamp(e.at, 0)
                .map(|t| t.to_rfc3339())
                .unwrap_or_default(),
            fields: field_changes(&e.fields),
            pipeline: e.pipeline,
            run: e.run,
            key: e.key,
            email: e.email,
            kind: e.kind,
            outcome: e.outcome,
            reason: e.reason,
        })
        .collect())
}

/// An audit entry's fields (`{"last_name":["Lee","Smith"]}` or `["last_name"]`).
fn field_changes(fields: &str) -> Vec<FieldChange> {
    let text = |v: &serde_json::Value| v.as_str().map(str::to_string);
    match serde_json::from_str::<serde_json::Value>(fields) {
        Ok(serde_json::Value::Object(map)) => map
            .iter()
            .map(|(name, pair)| FieldChange {
                name: name.clone(),
                before: text(&pair[0]),
                after: text(&pair[1]),
                values: true,
            })
            .collect(),
        Ok(serde_json::Value::Array(names)) => names
            .iter()
            .filter_map(|n| n.as_str())
            .map(|name| FieldChange {
                name: name.to_string(),
                before: None,
                after: None,
                values: false,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The numbers `/metrics` answers: each pipeline's last finished run.
pub fn metrics(state: &mut dyn StateStore) -> Result<Vec<crate::metrics::RunNumbers>, StateError> {
    let mut numbers = Vec::new();
    for name in state.pipelines()? {
        let records = state.run_page(&name, None, CHART_RUNS)?;
        let recent: Vec<RunSummary> = records.iter().map(|r| RunSummary::of(r, false)).collect();
        let Some((last, record)) = recent
            .iter()
            .zip(&records)
            .find(|(r, _)| r.finished_at.is_some() && !r.dry_run)
        else {
            continue;
        };
        let seconds = |at: &str| {
            DateTime::parse_from_rfc3339(at)
                .map(|t| t.timestamp() as f64)
                .ok()
        };
        let report: serde_json::Value = record
            .report
            .as_deref()
            .and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or_default();
        let last_success = last_success(state, &name, &recent)?;
        numbers.push(crate::metrics::RunNumbers::of_stored(
            &name,
            &last.status,
            &report,
            last.finished_at.as_deref().and_then(seconds).unwrap_or(0.0),
            last_success.as_deref().and_then(seconds),
        ));
    }
    Ok(numbers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use contactsync_engine::state::SqliteState;

    fn state_with_runs() -> (tempfile::TempDir, SqliteState) {
        let dir = tempfile::tempdir().expect("dir");
        let mut state = SqliteState::open(&dir.path().join("state.db")).expect("state");
        for (status, created) in [("synced", 3), ("failed", 0), ("finished_with_rejects", 1)] {
            let (run, _) = state.begin_run("hr->out").expect("run");
            let report = serde_json::json!({
                "status": status, "created": created, "rejected": u64::from(status != "synced"),
                "duration_ms": 1200, "dry_run": false,
                "error": (status == "failed").then_some("the platform said no"),
            });
            state
                .finish_run("hr->out", run, status, &report.to_string(), None, false)
                .expect("finish");
        }
        let (run, _) = state.begin_run("hr->out").expect("killed run");
        assert_eq!(run, 4);
        (dir, state)
    }

    #[test]
    fn the_overview_says_each_pipelines_last_run_success_and_staleness() {
        let (_dir, mut state) = state_with_runs();
        let rows = overview(&mut state, Utc::now(), std::time::Duration::from_secs(3600))
            .expect("overview");
        assert_eq!(rows.len(), 1);
        let row = &rows[0];
        let last = row.last.as_ref().expect("last run");
        assert_eq!((last.run, last.status.as_str()), (4, "killed"));
        assert_eq!(row.recent.len(), 4, "one point per run, oldest first");
        assert_eq!(row.recent[0].created, 3);
        assert!(row.last_success_at.is_some() && !row.stale);
        let later = Utc::now() + chrono::Duration::hours(2);
        let rows =
            overview(&mut state, later, std::time::Duration::from_secs(3600)).expect("overview");
        assert!(rows[0].stale, "no success for longer than stale_after");
    }

    #[test]
    fn a_pipeline_page_lists_runs_newest_first_and_a_run_its_rejects() {
        let (_dir, mut state) = state_with_runs();
        let page = pipeline_page(&mut state, "hr->out", None)
            .expect("page")
            .expect("known");
        assert_eq!(
            page.runs.iter().map(|r| r.run).collect::<Vec<_>>(),
            [4, 3, 2, 1]
        );
        assert_eq!(page.runs[2].error.as_deref(), Some("the platform said no"));
        assert_eq!(page.runs[2].tone, "bad");
        assert!(pipeline_page(&mut state, "nope->x", None)
            .expect("page")
            .is_none());
        let row = RejectRow {
            stage: "validation".into(),
            origin: "people.csv:3".into(),
            key: Some("external_id:E2".into()),
            email: Some("x@example.com".into()),
            field: Some("email".into()),
            reason: "not a valid email".into(),
        };
        state
            .record_rejects("hr->out", 3, 0, std::slice::from_ref(&row))
            .expect("rejects");
        let run = run_page(&mut state, "hr->out", 3, 0)
            .expect("run")
            .expect("known");
        assert_eq!(run.rejects, [row]);
        assert_eq!(run.summary.status, "finished_with_rejects");
        let csv =
            String::from_utf8(rejects_csv(&mut state, "hr->out", 3).expect("csv")).expect("utf-8");
        assert_eq!(
            csv,
            "stage,origin,key,email,field,reason\nvalidation,people.csv:3,external_id:E2,x@example.com,email,not a valid email\n"
        );
        assert!(run_page(&mut state, "hr->out", 9, 0)
            .expect("run")
            .is_none());
    }

    #[test]
    fn field_changes_read_values_or_names() {
        assert_eq!(
            field_changes(r#"{"last_name":["Lee","Smith"],"phone":[null,"1"]}"#),
            [
                FieldChange {
                    name: "last_name".into(),
                    before: Some("Lee".into()),
                    after: Some("Smith".into()),
                    values: true
                },
                FieldChange {
                    name: "phone".into(),
                    before: None,
                    after: Some("1".into()),
                    values: true
                }
            ]
        );
        assert!(!field_changes(r#"["email"]"#)[0].values);
    }
}
