//! The report of a run as a person reads it on the terminal.

use std::path::Path;

use contactsync_engine::{RunReport, RunStatus};

use crate::*;

pub fn print_report(report: &RunReport, rejects: &Path) {
    if report.status == RunStatus::Interrupted {
        say!(
            "interrupted: {}: {} changes not confirmed; the next run sends them again",
            report.pipeline,
            report.unconfirmed
        );
        return;
    }
    // The first word says how the run ended. The counts of a dry run, or of a run the
    // guard refused, are what the run would have done: nothing was changed.
    let word = if report.dry_run {
        "plan"
    } else {
        report.status.as_str()
    };
    // A refused run did nothing: its counts are 0, and what it would have done is the
    // plan's.
    let (planned, counts) = match (&report.planned, report.dry_run) {
        (Some(plan), _) => (true, *plan),
        (None, dry_run) => (
            dry_run,
            contactsync_engine::ChangeCounts {
                created: report.created,
                updated: report.updated,
                removed: report.removed,
            },
        ),
    };
    let counts = format!(
        "{}created {}, updated {}, removed {}",
        if planned { "would have " } else { "" },
        counts.created,
        counts.updated,
        counts.removed
    );
    say!(
        "{word}: {}: read {}, {counts}, unchanged {}, rejected {}{}{}{} ({:.1} s)",
        report.pipeline,
        report.read,
        report.unchanged,
        report.rejected,
        [
            ("removals held", report.removals_held),
            ("address taken", report.address_taken)
        ]
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(what, n)| format!(", {what} {n}"))
        .collect::<String>(),
        if report.skipped > 0 {
            format!(", skipped by mode {}", report.skipped)
        } else {
            String::new()
        },
        if report.unknown > 0 {
            format!(", unknown {}", report.unknown)
        } else {
            String::new()
        },
        report.duration_ms as f64 / 1000.0
    );
    if report.dry_run {
        if report.sample.is_empty() {
            say!("nothing to do");
        }
        for change in &report.sample {
            say!(
                "  {:6} {} {} ({})",
                change.kind.as_str(),
                change.key,
                change.email.as_deref().unwrap_or(""),
                change.origin
            );
            for field in &change.fields {
                let show = |v: &Option<String>| match v {
                    Some(v) => format!("{v:?}"),
                    None => "(unset)".to_string(),
                };
                if change.kind == contactsync_core::ChangeKind::Create || !change.before_known {
                    say!("           {}: {}", field.field, show(&field.after));
                } else {
                    say!(
                        "           {}: {} -> {}",
                        field.field,
                        show(&field.before),
                        show(&field.after)
                    );
                }
            }
        }
        say!("dry run: nothing was changed");
    }
    if report.rejected > 0 {
        say!(
            "rejected records, with their origin and reason: {}",
            rejects.display()
        );
    }
    if let Some(reason) = &report.rebuilt {
        say!("rebuilt: {reason}, so everyone of this read was written again");
    }
    if let Some(reason) = &report.foreign {
        say!(
            "note: {reason}; removals cannot be detected for people synced before this state existed{}",
            report
                .unknown_in_sink
                .map(|n| format!(" ({n} kept, not in the source: unknown_in_sink)"))
                .unwrap_or_default()
        );
    }
    if let Some(reason) = &report.removals_held_reason {
        say!("removals held: {reason}");
    }
    if let Some(error) = &report.error {
        say(tracing::Level::ERROR, &format!("error: {error}"));
    }
}
