//! The overview's chart, drawn on the server as SVG (no script): created, updated,
//! removed and rejected over a pipeline's recent runs, one point a run for each, with
//! a title a browser shows on hover.

use std::fmt::Write;

use super::data::RunSummary;

const WIDTH: f64 = 360.0;
const HEIGHT: f64 = 72.0;
const PAD: f64 = 4.0;

/// One series: its CSS class, its label, and a run's value.
type Series = (&'static str, &'static str, fn(&RunSummary) -> u64);

/// The series, in drawing order.
const SERIES: [Series; 4] = [
    ("created", "created", |r| r.created),
    ("updated", "updated", |r| r.updated),
    ("removed", "removed", |r| r.removed),
    ("rejected", "rejected", |r| r.rejected),
];

/// The chart of `runs` (oldest first). Its text holds numbers and fixed words only,
/// so it is safe to put in a page as it is.
pub fn svg(runs: &[RunSummary]) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg class="chart" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" xmlns="http://www.w3.org/2000/svg"><title>created, updated, removed and rejected over the last {} runs</title>"#,
        runs.len()
    );
    if runs.is_empty() {
        out.push_str("</svg>");
        return out;
    }
    let top = runs
        .iter()
        .flat_map(|r| SERIES.iter().map(move |(_, _, v)| v(r)))
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    // A logarithmic scale: a first sync of a million and a night of twelve both show.
    let y = |v: u64| {
        let share = ((v as f64) + 1.0).ln() / (top + 1.0).ln();
        HEIGHT - PAD - share * (HEIGHT - 2.0 * PAD)
    };
    let step = if runs.len() > 1 {
        (WIDTH - 2.0 * PAD) / (runs.len() - 1) as f64
    } else {
        0.0
    };
    let x = |i: usize| {
        if runs.len() > 1 {
            PAD + step * i as f64
        } else {
            WIDTH / 2.0
        }
    };
    for (class, label, value) in SERIES {
        let points: Vec<String> = runs
            .iter()
            .enumerate()
            .map(|(i, r)| format!("{:.1},{:.1}", x(i), y(value(r))))
            .collect();
        let _ = write!(
            out,
            r#"<g class="series {class}"><polyline points="{}"/>"#,
            points.join(" ")
        );
        for (i, r) in runs.iter().enumerate() {
            let _ = write!(
                out,
                r#"<circle class="point {class}" data-run="{}" cx="{:.1}" cy="{:.1}" r="2"><title>run {}: {} {label}</title></circle>"#,
                r.run,
                x(i),
                y(value(r)),
                r.run,
                value(r)
            );
        }
        out.push_str("</g>");
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(n: i64, created: u64) -> RunSummary {
        RunSummary {
            run: n,
            started_at: String::new(),
            finished_at: None,
            status: "synced".into(),
            tone: "ok",
            duration_ms: None,
            read: 0,
            created,
            updated: 0,
            removed: 0,
            unchanged: 0,
            rejected: 0,
            dry_run: false,
            error: None,
        }
    }

    #[test]
    fn one_point_a_run_in_each_series() {
        let chart = svg(&[run(1, 1_000_000), run(2, 12), run(3, 0)]);
        assert_eq!(chart.matches(r#"<circle class="point created""#).count(), 3);
        assert_eq!(
            chart.matches(r#"<circle class="point rejected""#).count(),
            3
        );
        assert!(chart.contains("run 2: 12 created"));
        assert!(svg(&[]).ends_with("</svg>"));
    }
}
