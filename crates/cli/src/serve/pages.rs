//! The pages, rendered on the server with minijinja from templates embedded in the
//! binary. Every value from the state goes through the templates' auto-escaping (they
//! are `.html`): a person named `<img src=x onerror=alert(1)>` is text. The only
//! markup not escaped is the chart, which [`super::chart`] builds from numbers.

use minijinja::{context, Environment, Value};

use super::chart;
use super::data::{shown_time, PersonEntry, PipelineOverview, PipelinePage, RunPage, CHART_RUNS};

/// The stylesheet, served at `/style.css`.
pub const STYLE: &str = include_str!("templates/style.css");

/// What every page says at its foot.
pub struct Frame<'a> {
    /// The state read, as shown (a file, or a URL without its password).
    pub state: &'a str,
    /// Now (RFC 3339).
    pub now: String,
}

/// The templates, loaded once.
pub fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    for (name, text) in [
        ("base.html", include_str!("templates/base.html")),
        ("overview.html", include_str!("templates/overview.html")),
        ("pipeline.html", include_str!("templates/pipeline.html")),
        ("run.html", include_str!("templates/run.html")),
        ("people.html", include_str!("templates/people.html")),
        ("login.html", include_str!("templates/login.html")),
        ("error.html", include_str!("templates/error.html")),
    ] {
        // The templates are part of the binary: a broken one fails its unit test.
        if let Err(e) = env.add_template(name, text) {
            tracing::error!("template {name}: {e}");
        }
    }
    env.add_filter("when", |v: Value| -> String {
        v.as_str().map(shown_time).unwrap_or_default()
    });
    env.add_filter("seconds", |v: Value| -> String {
        match v.as_usize() {
            Some(ms) => format!("{:.1} s", ms as f64 / 1000.0),
            None => "—".into(),
        }
    });
    env.add_filter("path", |v: String| -> String {
        percent_encoding::utf8_percent_encode(&v, percent_encoding::NON_ALPHANUMERIC).to_string()
    });
    env
}

fn render(env: &Environment<'_>, name: &str, frame: &Frame<'_>, ctx: Value) -> String {
    let ctx = context! { state => frame.state, now => &frame.now, ..ctx };
    match env.get_template(name).and_then(|t| t.render(ctx)) {
        Ok(html) => html,
        Err(e) => {
            tracing::error!("rendering {name}: {e:#}");
            "<!doctype html><title>contactsync</title><p>This page could not be drawn; the log says why.</p>".into()
        }
    }
}

/// `/`.
pub fn overview(
    env: &Environment<'_>,
    frame: &Frame<'_>,
    pipelines: &[PipelineOverview],
    stale_after: &str,
) -> String {
    let rows: Vec<Value> = pipelines
        .iter()
        .map(|p| {
            let mut row = Value::from_serialize(p);
            row = context! { chart => Value::from_safe_string(chart::svg(&p.recent)), ..row };
            row
        })
        .collect();
    render(
        env,
        "overview.html",
        frame,
        context! { pipelines => rows, chart_runs => CHART_RUNS, stale_after },
    )
}

/// `/pipelines/NAME`.
pub fn pipeline(env: &Environment<'_>, frame: &Frame<'_>, page: &PipelinePage) -> String {
    render(env, "pipeline.html", frame, context! { page })
}

/// `/pipelines/NAME/runs/N`.
pub fn run(env: &Environment<'_>, frame: &Frame<'_>, page: &RunPage) -> String {
    let report_json = serde_json::to_string_pretty(&page.report).unwrap_or_default();
    render(env, "run.html", frame, context! { page, report_json })
}

/// `/people?q=…`.
pub fn people(
    env: &Environment<'_>,
    frame: &Frame<'_>,
    q: &str,
    entries: &[PersonEntry],
) -> String {
    render(env, "people.html", frame, context! { q, entries })
}

/// `/login`.
pub fn login(env: &Environment<'_>, frame: &Frame<'_>) -> String {
    render(env, "login.html", frame, context! {})
}

/// A page that says what went wrong.
pub fn error(env: &Environment<'_>, frame: &Frame<'_>, title: &str, message: &str) -> String {
    render(env, "error.html", frame, context! { title, message })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::data::{FieldChange, RunSummary};

    fn frame() -> Frame<'static> {
        Frame {
            state: "state.db",
            now: "2026-12-07T10:00:00Z".into(),
        }
    }

    const HOSTILE: &str = "<img src=x onerror=alert(1)>";

    fn summary() -> RunSummary {
        RunSummary {
            run: 7,
            started_at: "2026-12-07T09:00:00Z".into(),
            finished_at: Some("2026-12-07T09:01:00Z".into()),
            status: "failed".into(),
            tone: "bad",
            duration_ms: Some(60_000),
            read: 10,
            created: 1,
            updated: 2,
            removed: 0,
            unchanged: 7,
            rejected: 0,
            dry_run: false,
            error: Some(HOSTILE.into()),
        }
    }

    #[test]
    fn every_template_renders_and_escapes_what_the_state_says() {
        let env = environment();
        let p = PipelineOverview {
            name: format!("hr->{HOSTILE}"),
            last: Some(summary()),
            last_success_at: None,
            stale: true,
            locks: Vec::new(),
            recent: vec![summary()],
        };
        let html = overview(&env, &frame(), &[p], "36h");
        assert!(!html.contains(HOSTILE), "{html}");
        assert!(html.contains("&lt;img src=x onerror=alert(1)&gt;"));
        assert!(html.contains("<svg class=\"chart\""), "the chart is markup");
        assert!(html.contains("class=\"badge stale\""));
        assert!(html.contains("2026-12-07 09:00:00 UTC"));
        let entries = vec![PersonEntry {
            pipeline: "hr->out".into(),
            run: 2,
            at: "2026-12-07T09:00:00+00:00".into(),
            key: "external_id:E1".into(),
            email: Some("a@example.com".into()),
            kind: "update".into(),
            outcome: "applied".into(),
            reason: None,
            fields: vec![FieldChange {
                name: "first_name".into(),
                before: Some("Ann".into()),
                after: Some(HOSTILE.into()),
                values: true,
            }],
        }];
        let html = people(&env, &frame(), HOSTILE, &entries);
        assert!(!html.contains(HOSTILE) && html.contains("Ann"), "{html}");
        let html = pipeline(
            &env,
            &frame(),
            &PipelinePage {
                name: "hr->out".into(),
                runs: vec![summary()],
                next_before: Some(7),
            },
        );
        assert!(html.contains("/pipelines/hr%2D%3Eout/runs/7") && html.contains("?before=7"));
        assert!(!html.contains(HOSTILE));
        let html = run(
            &env,
            &frame(),
            &RunPage {
                pipeline: "hr->out".into(),
                summary: summary(),
                report: serde_json::json!({ "error": HOSTILE }),
                rejects: Vec::new(),
                offset: 0,
                next_offset: None,
            },
        );
        assert!(!html.contains(HOSTILE), "{html}");
        assert!(login(&env, &frame()).contains("name=\"token\""));
        assert!(error(&env, &frame(), "Not found", HOSTILE).contains("&lt;img"));
    }
}
