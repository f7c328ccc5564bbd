//! The commands beside `sync`: `state`, `runs`, `history`, `connectors` and `sandbox`.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use clap::Subcommand;
use contactsync_core::{registry, SandboxOptions};
use contactsync_engine::{Pipeline, StateItem, StateLocation};

use crate::settings::Settings;
use crate::*;

#[derive(Subcommand, Debug)]
pub enum StateCommand {
    /// Show every pipeline's synced count, pending changes, cursor and last run.
    Show {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Copy the whole state into another (empty) one: a SQLite file into PostgreSQL, or
    /// back, so that an installation moves without resending everyone.
    Copy {
        /// Where to: a file path or a `postgres://` URL.
        #[arg(long, value_name = "FILE|URL")]
        to: String,
    },
    /// Forget a pipeline: the next run syncs everyone again (upserts, no duplicates).
    Reset {
        /// The source section of the pipeline.
        #[arg(long, value_name = "NAME")]
        from: String,
        /// The sink section of the pipeline.
        #[arg(long, value_name = "NAME")]
        to: String,
        /// Confirm.
        #[arg(long)]
        yes: bool,
    },
}

/// `--state FILE|URL`, else the config's `state`.
pub fn state_path(config: &Path, flag: Option<PathBuf>) -> Result<StateLocation, Failure> {
    match flag {
        Some(path) => StateLocation::parse(&path.to_string_lossy(), Path::new(""))
            .map_err(|e| usage(anyhow!("--state {e}"))),
        None => Ok(Settings::load(config, None).map_err(usage)?.state),
    }
}

pub fn runs_command(
    path: &StateLocation,
    pipeline: Option<&str>,
    last: usize,
    json: bool,
) -> Result<u8, Failure> {
    let mut state = path.open().map_err(state_failure)?;
    let runs = state.runs(pipeline, last).map_err(|e| failed(anyhow!(e)))?;
    let rows: Vec<serde_json::Value> = runs
        .iter()
        .map(|r| {
            let report: serde_json::Value = r
                .report
                .as_deref()
                .and_then(|t| serde_json::from_str(t).ok())
                .unwrap_or_default();
            serde_json::json!({
                "pipeline": r.pipeline,
                "run": r.run,
                "started_at": chrono::DateTime::parse_from_rfc3339(&r.started_at)
                    .map(|t| t.with_timezone(&chrono::Utc).format("%Y-%m-%d %H:%M:%S").to_string())
                    .unwrap_or_else(|_| r.started_at.clone()),
                "finished_at": r.finished_at,
                "status": r.status.as_deref().unwrap_or("running or killed"),
                "duration_ms": report["duration_ms"],
                "read": report["read"],
                "created": report["created"],
                "updated": report["updated"],
                "removed": report["removed"],
                "unchanged": report["unchanged"],
                "rejected": report["rejected"],
            })
        })
        .collect();
    if json {
        say!(
            "{}",
            serde_json::to_string_pretty(&rows).map_err(|e| failed(anyhow!(e)))?
        );
        return Ok(0);
    }
    if rows.is_empty() {
        say!("no runs recorded in {}", path);
        return Ok(0);
    }
    say!(
        "{:<24} {:>5} {:<19} {:>8} {:<22} {:>8} {:>8} {:>8} {:>8}",
        "pipeline",
        "run",
        "started (UTC)",
        "time",
        "status",
        "created",
        "updated",
        "removed",
        "rejected"
    );
    for r in &rows {
        let n = |k: &str| r[k].as_u64().map(|v| v.to_string()).unwrap_or("-".into());
        let time = r["duration_ms"]
            .as_u64()
            .map(|ms| format!("{:.1} s", ms as f64 / 1000.0))
            .unwrap_or("-".into());
        say!(
            "{:<24} {:>5} {:<19} {:>8} {:<22} {:>8} {:>8} {:>8} {:>8}",
            r["pipeline"].as_str().unwrap_or(""),
            r["run"],
            r["started_at"].as_str().unwrap_or(""),
            time,
            r["status"].as_str().unwrap_or(""),
            n("created"),
            n("updated"),
            n("removed"),
            n("rejected")
        );
    }
    Ok(0)
}

pub fn history_command(path: &StateLocation, who: &str, json: bool) -> Result<u8, Failure> {
    let mut state = path.open().map_err(state_failure)?;
    let entries =
        contactsync_engine::history(state.as_mut(), who).map_err(|e| failed(anyhow!(e)))?;
    if json {
        say!(
            "{}",
            serde_json::to_string_pretty(&entries).map_err(|e| failed(anyhow!(e)))?
        );
        return Ok(0);
    }
    if entries.is_empty() {
        say!("{who}: nothing in the audit (kept for each pipeline's audit_days)");
        return Ok(0);
    }
    for e in &entries {
        let at = chrono::DateTime::from_timestamp(e.at, 0)
            .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
            .unwrap_or_default();
        let fields = describe_fields(&e.fields);
        say!(
            "{at}  {} run {}  {} {} ({}){}{}",
            e.pipeline,
            e.run,
            e.kind,
            e.key,
            e.outcome,
            if fields.is_empty() {
                String::new()
            } else {
                format!(": {fields}")
            },
            e.reason
                .as_deref()
                .map(|r| format!(" — {r}"))
                .unwrap_or_default()
        );
    }
    Ok(0)
}

/// An audit entry's fields as `last_name: "Lee" -> "Smith", …` (or just names).
pub fn describe_fields(fields: &str) -> String {
    let show = |v: &serde_json::Value| match v.as_str() {
        Some(s) => format!("{s:?}"),
        None => "(unset)".to_string(),
    };
    match serde_json::from_str::<serde_json::Value>(fields) {
        Ok(serde_json::Value::Object(map)) => map
            .iter()
            .map(|(name, pair)| format!("{name}: {} -> {}", show(&pair[0]), show(&pair[1])))
            .collect::<Vec<_>>()
            .join(", "),
        Ok(serde_json::Value::Array(names)) => names
            .iter()
            .filter_map(|n| n.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        _ => String::new(),
    }
}

pub fn list_connectors() {
    say!("sources:");
    for f in registry::sources() {
        say!("  {:18} {}", f.name, f.summary);
    }
    say!("sinks:");
    for f in registry::sinks() {
        say!("  {:18} {}", f.name, f.summary);
    }
    let sandboxes: Vec<&str> = registry::sandboxes().iter().map(|f| f.name).collect();
    if !sandboxes.is_empty() {
        say!(
            "sandboxes (base_url = \"sandbox\", or `contactsync sandbox NAME`): {}",
            sandboxes.join(", ")
        );
    }
}

pub fn state_command(path: &StateLocation, command: StateCommand) -> Result<u8, Failure> {
    let mut state = path.open().map_err(state_failure)?;
    match command {
        StateCommand::Show { json } => {
            let summaries = state.summaries().map_err(|e| failed(anyhow!(e)))?;
            if json {
                say!(
                    "{}",
                    serde_json::to_string_pretty(&summaries).map_err(|e| failed(anyhow!(e)))?
                );
            } else if summaries.is_empty() {
                say!("{}: no pipeline has run yet", path);
            } else {
                say!("{}:", path);
                for s in summaries {
                    say!(
                        "  {}: {} synced, {} pending, {} runs, cursor {}, last run {}",
                        s.pipeline,
                        s.synced,
                        s.pending,
                        s.runs,
                        s.cursor.as_deref().unwrap_or("-"),
                        s.last_run.as_deref().unwrap_or("-")
                    );
                }
            }
            Ok(0)
        }
        StateCommand::Copy { to } => {
            let target_location =
                StateLocation::parse(&to, Path::new("")).map_err(|e| usage(anyhow!("--to {e}")))?;
            if &target_location == path {
                return Err(usage(anyhow!("--to names the state being copied")));
            }
            let summaries = state.summaries().map_err(|e| failed(anyhow!(e)))?;
            if let Some(busy) = summaries.iter().find(|s| s.pending > 0) {
                return Err(failed(anyhow!(
                    "{} has {} changes sent and not yet confirmed: run it once so that they settle, then copy",
                    busy.pipeline,
                    busy.pending
                )));
            }
            let mut target = target_location.open().map_err(state_failure)?;
            let held = target.summaries().map_err(|e| failed(anyhow!(e)))?;
            if let Some(first) = held.first() {
                return Err(failed(anyhow!(
                    "{target_location} already holds the state of {} ({} pipelines): copy into an empty state",
                    first.pipeline,
                    held.len()
                )));
            }
            let mut counts = [0u64; 6];
            let mut chunk = Vec::with_capacity(10_000);
            state
                .export(&mut |item| {
                    let slot = match &item {
                        StateItem::Pipeline { .. } => 0,
                        StateItem::Synced { .. } => 1,
                        StateItem::Run(_) => 2,
                        StateItem::Audit(_) => 3,
                        StateItem::SinkData { .. } => 4,
                        StateItem::Reject { .. } => 5,
                    };
                    counts[slot] += 1;
                    chunk.push(item);
                    if chunk.len() == 10_000 {
                        target.import(&chunk)?;
                        chunk.clear();
                    }
                    Ok(())
                })
                .map_err(|e| failed(anyhow!(e)))?;
            target.import(&chunk).map_err(|e| failed(anyhow!(e)))?;
            say!(
                "copied {path} to {target_location}: {} pipelines, {} synced people, {} runs, {} audit entries, {} sink values, {} rejects",
                counts[0], counts[1], counts[2], counts[3], counts[4], counts[5]
            );
            Ok(0)
        }
        StateCommand::Reset { from, to, yes } => {
            let pipeline = Pipeline::id(&from, &to);
            if !yes {
                return Err(usage(anyhow!(
                    "resetting {pipeline} makes the next run send everyone again; add --yes to confirm"
                )));
            }
            state.reset(&pipeline).map_err(|e| failed(anyhow!(e)))?;
            say!("{pipeline}: state reset");
            Ok(0)
        }
    }
}

pub async fn sandbox(name: &str, port: u16, data: Option<PathBuf>) -> Result<u8, Failure> {
    let factory = registry::sandbox(name).ok_or_else(|| {
        usage(anyhow!(
            "no sandbox called {name:?} (available: {}){NO_SANDBOXES_HINT}",
            registry::sandboxes()
                .iter()
                .map(|f| f.name)
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    let running = (factory.start)(SandboxOptions {
        data_file: data,
        port,
        settings: None,
    })
    .await
    .map_err(|e| failed(anyhow!(e)))?;
    say!(
        "{name} sandbox listening on {} (not the real platform); Ctrl-C stops it",
        running.base_url
    );
    let _ = tokio::signal::ctrl_c().await;
    running.shutdown.cancel();
    Ok(0)
}
