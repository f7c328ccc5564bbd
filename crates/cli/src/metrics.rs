//! A run's numbers for Prometheus: `--metrics FILE` writes them in the text exposition
//! format, atomically, for node_exporter's textfile collector; `[metrics]
//! push_gateway = "http://…"` pushes the same to a Pushgateway. Encoded by the
//! `prometheus-client` crate.

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use contactsync_engine::{RunReport, RunStatus};
use contactsync_http::{Auth, ClientConfig, HttpClient, Method, RetryPolicy};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Deserialize;

/// `[metrics]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// A Pushgateway to push each run's metrics to (`http://pushgateway:9091`).
    #[serde(default)]
    pub push_gateway: Option<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PipelineLabel {
    pipeline: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    pipeline: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    pipeline: String,
    status: String,
}

/// Every status a run can end with, so that a dashboard sees the zeros too.
const STATUSES: [RunStatus; 7] = [
    RunStatus::Synced,
    RunStatus::FinishedWithRejects,
    RunStatus::RemovalsHeld,
    RunStatus::Refused,
    RunStatus::Failed,
    RunStatus::Interrupted,
    RunStatus::Locked,
];

/// A label value as the text exposition format writes it: `\`, `"` and a line break
/// escaped (`prometheus-client` writes label values as they are, and a section named
/// `we"ird\src` would make the whole file unreadable).
fn label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// What the metrics say of one run: its report's numbers, when it finished and when
/// its pipeline last synced (Unix seconds).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunNumbers {
    /// `source->sink`.
    pub pipeline: String,
    /// How it ended (`synced`, `failed`, …).
    pub status: String,
    /// Records by outcome: created, updated, removed, unchanged, rejected, held,
    /// address_taken.
    pub outcomes: [u64; 7],
    /// How long it took.
    pub duration_ms: u64,
    /// When it finished.
    pub finished_at: f64,
    /// When the pipeline last synced.
    pub last_success: Option<f64>,
}

/// The outcomes [`RunNumbers::outcomes`] counts, in its order.
const OUTCOMES: [&str; 7] = [
    "created",
    "updated",
    "removed",
    "unchanged",
    "rejected",
    "held",
    "address_taken",
];

impl RunNumbers {
    /// The numbers of a run's report.
    pub fn of_report(report: &RunReport, finished_at: f64, last_success: Option<f64>) -> Self {
        RunNumbers {
            pipeline: report.pipeline.clone(),
            status: report.status.as_str().to_string(),
            outcomes: [
                report.created,
                report.updated,
                report.removed,
                report.unchanged,
                report.rejected,
                report.removals_held,
                report.address_taken,
            ],
            duration_ms: report.duration_ms,
            finished_at,
            last_success,
        }
    }

    /// The numbers of a report as the state keeps it (JSON); a field it lacks is 0.
    pub fn of_stored(
        pipeline: &str,
        status: &str,
        report: &serde_json::Value,
        finished_at: f64,
        last_success: Option<f64>,
    ) -> Self {
        let n = |k: &str| report[k].as_u64().unwrap_or(0);
        RunNumbers {
            pipeline: pipeline.to_string(),
            status: status.to_string(),
            outcomes: [
                n("created"),
                n("updated"),
                n("removed"),
                n("unchanged"),
                n("rejected"),
                n("removals_held"),
                n("address_taken"),
            ],
            duration_ms: n("duration_ms"),
            finished_at,
            last_success,
        }
    }
}

/// The text exposition of the metrics of one or more runs (one a pipeline), finished
/// at `finished_at`; with each, when its pipeline last synced (Unix seconds).
pub fn render(runs: &[(&RunReport, Option<f64>)], finished_at: f64) -> Result<String> {
    let numbers: Vec<RunNumbers> = runs
        .iter()
        .map(|&(report, last_success)| RunNumbers::of_report(report, finished_at, last_success))
        .collect();
    render_numbers(&numbers)
}

/// The text exposition of the metrics of runs (one a pipeline): what `--metrics`
/// writes, and what `contactsync serve` answers at `/metrics`.
pub fn render_numbers(runs: &[RunNumbers]) -> Result<String> {
    let mut registry = Registry::default();
    let records = Family::<OutcomeLabels, Gauge>::default();
    registry.register(
        "contactsync_records",
        "Records of the last run, by outcome",
        records.clone(),
    );
    let seconds = |name: &str, help: &str, registry: &mut Registry| {
        let family = Family::<PipelineLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(name, help, family.clone());
        family
    };
    let duration = seconds(
        "contactsync_run_duration_seconds",
        "How long the last run took",
        &mut registry,
    );
    let last_run = seconds(
        "contactsync_last_run_timestamp_seconds",
        "When the last run finished",
        &mut registry,
    );
    let last_success_family = seconds(
        "contactsync_last_success_timestamp_seconds",
        "When the pipeline last synced",
        &mut registry,
    );
    let status = Family::<StatusLabels, Gauge>::default();
    registry.register(
        "contactsync_run_status",
        "1 for the status the last run ended with, 0 for the others",
        status.clone(),
    );
    for run in runs {
        let pipeline = label_value(&run.pipeline);
        for (outcome, n) in OUTCOMES.iter().zip(run.outcomes) {
            records
                .get_or_create(&OutcomeLabels {
                    pipeline: pipeline.clone(),
                    outcome: (*outcome).into(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let label = PipelineLabel {
            pipeline: pipeline.clone(),
        };
        duration
            .get_or_create(&label)
            .set(run.duration_ms as f64 / 1000.0);
        last_run.get_or_create(&label).set(run.finished_at);
        if let Some(at) = run.last_success {
            last_success_family.get_or_create(&label).set(at);
        }
        for s in STATUSES {
            status
                .get_or_create(&StatusLabels {
                    pipeline: pipeline.clone(),
                    status: s.as_str().into(),
                })
                .set(i64::from(s.as_str() == run.status));
        }
    }
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)
        .map_err(|e| anyhow!("encoding the metrics: {e}"))?;
    Ok(out)
}

/// Writes `text` to `path` atomically (a temporary file in the same directory, renamed
/// over it), so that a collector never reads half a file.
pub fn write_file(path: &Path, text: &str) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut temp = tempfile::Builder::new()
        .prefix(".contactsync-metrics.")
        .permissions({
            use std::os::unix::fs::PermissionsExt;
            std::fs::Permissions::from_mode(0o644)
        })
        .tempfile_in(&dir)
        .with_context(|| format!("writing metrics in {}", dir.display()))?;
    std::io::Write::write_all(&mut temp, text.as_bytes())
        .with_context(|| format!("writing metrics in {}", dir.display()))?;
    temp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Pushes `text` to a Pushgateway, grouped by job `contactsync` and the pipeline.
pub async fn push(gateway: &str, pipeline: &str, text: String) -> Result<()> {
    let mut settings = ClientConfig::new(gateway).map_err(|e| anyhow!("{e}"))?;
    settings.request_timeout = Duration::from_secs(10);
    settings.retry = RetryPolicy {
        max_attempts: 3,
        max_elapsed: Duration::from_secs(30),
        ..RetryPolicy::default()
    };
    let client = HttpClient::new(settings, Auth::None).map_err(|e| anyhow!("{e}"))?;
    client
        .request_segments(
            Method::PUT,
            &["metrics", "job", "contactsync", "pipeline", pipeline],
        )
        .body("text/plain; version=0.0.4", text)
        .send()
        .await
        .map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
