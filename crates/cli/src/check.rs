//! `contactsync check`: the configuration, each connector reached, and a preview of
//! what the pipelines' shaping does to the first records.

use anyhow::{anyhow, Result};
use contactsync_engine::Pipeline;

use crate::settings::Settings;
use crate::*;

pub async fn check(settings: &Settings) -> Result<u8, Failure> {
    let data_dir = settings.data_dir();
    let mut sandboxes = Sandboxes::default();
    let mut ok = true;
    for name in settings.source_names() {
        let section = settings.source(&name).map_err(usage)?;
        built_for_checks(&section, build_source).map_err(usage)?;
        let section = sandboxes
            .resolve(section, &data_dir)
            .await
            .map_err(failed)?;
        let source = build_source(&section).map_err(usage)?;
        match source.check().await {
            Ok(()) => say!(
                "ok    [sources.{name}] ({}){}",
                section.connector,
                source
                    .described()
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default()
            ),
            Err(e) => {
                ok = false;
                say!("FAIL  [sources.{name}] ({}): {e}", section.connector);
            }
        }
    }
    for name in settings.sink_names() {
        let section = settings.sink(&name).map_err(usage)?;
        built_for_checks(&section, build_sink).map_err(usage)?;
        let section = sandboxes
            .resolve(section, &data_dir)
            .await
            .map_err(failed)?;
        let mut sink = build_sink(&section).map_err(usage)?;
        match sink.check().await {
            Ok(()) => say!(
                "ok    [sinks.{name}] ({}){}",
                section.connector,
                sink.described()
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default()
            ),
            Err(e) => {
                ok = false;
                say!("FAIL  [sinks.{name}] ({}): {e}", section.connector);
            }
        }
    }
    for (name, from, to) in settings.pipelines() {
        let pipeline_settings = settings.pipeline(&from, &to).map_err(usage)?;
        say!("ok    [pipelines.{name}] ({from} -> {to})");
        let pipeline = Pipeline::new(&from, &to, "", pipeline_settings)
            .with_shaping(&name, settings.lookups.clone())
            .map_err(|e| usage(anyhow!(e)))?;
        // What the mapping and scope make of the first records, before any sync.
        let section = sandboxes
            .resolve(settings.source(&from).map_err(usage)?, &data_dir)
            .await
            .map_err(failed)?;
        let source = build_source(&section).map_err(usage)?;
        match contactsync_engine::preview(&pipeline, source.as_ref(), PREVIEW_READ).await {
            Ok(records) => print_preview(&records),
            Err(e) => {
                ok = false;
                say!("FAIL  [pipelines.{name}]: reading {from} for a preview: {e}");
            }
        }
    }
    sandboxes.stop();
    Ok(if ok { 0 } else { 1 })
}

/// Records `check` reads for a pipeline's preview, and how many it shows.
pub const PREVIEW_READ: usize = 100;
pub const PREVIEW_SHOWN: usize = 5;

/// The first records before and after the pipeline's mapping, and counts over all read.
pub fn print_preview(records: &[contactsync_engine::PreviewRecord]) {
    use contactsync_engine::PreviewOutcome;
    let sent = records
        .iter()
        .filter(|r| matches!(r.outcome, PreviewOutcome::Sent { .. }))
        .count();
    let out = records
        .iter()
        .filter(|r| r.outcome == PreviewOutcome::OutOfScope)
        .count();
    say!(
        "      first {} records: {sent} would be sent, {out} out of scope, {} rejected",
        records.len(),
        records.len() - sent - out
    );
    let show = |v: &Option<String>| match v {
        Some(v) => format!("{v:?}"),
        None => "(unset)".to_string(),
    };
    for record in records.iter().take(PREVIEW_SHOWN) {
        match &record.outcome {
            PreviewOutcome::Sent { after } => {
                say!("      {}: sent as", record.origin);
                let before = record.before.as_deref();
                for (field, value) in after.set_fields() {
                    let old = before.and_then(|b| b.get(&field));
                    if old.as_deref() == Some(value.as_str()) {
                        say!("        {field}: {value:?}");
                    } else {
                        say!("        {field}: {} -> {value:?}", show(&old));
                    }
                }
            }
            PreviewOutcome::OutOfScope => say!("      {}: out of scope (where)", record.origin),
            PreviewOutcome::Rejected { field, reason } => say!(
                "      {}: rejected{}: {reason}",
                record.origin,
                field
                    .as_deref()
                    .map(|f| format!(" at {f}"))
                    .unwrap_or_default()
            ),
        }
    }
}
