//! `--log-format json`: one JSON object a line, with the keys the README promises:
//! `time` (RFC 3339, UTC), `level`, `pipeline` and `run` (from the run's span, when the
//! line belongs to a run), `message`, and `fields` (the event's other fields).
//! tracing-subscriber's own JSON nests them (`timestamp`, `fields.message`,
//! `span.pipeline`); a log shipper should not have to know that. The span fields are
//! read as `JsonFields` wrote them (the subscriber is built with it).

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The event formatter of `--log-format json`.
pub struct JsonLines;

/// Collects an event's fields as JSON values.
#[derive(Default)]
struct Fields(Map<String, Value>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().to_string(), Value::from(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let mut line = Map::new();
        line.insert(
            "time".into(),
            Value::from(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        );
        line.insert(
            "level".into(),
            Value::from(event.metadata().level().as_str()),
        );
        // The run's span (outermost first) gives `pipeline` and `run`; its fields were
        // formatted as JSON by `JsonFields` when it was created or recorded.
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                let Some(formatted) = extensions.get::<FormattedFields<N>>() else {
                    continue;
                };
                if let Ok(Value::Object(span_fields)) =
                    serde_json::from_str::<Value>(formatted.as_str())
                {
                    for key in ["pipeline", "run"] {
                        if let Some(value) = span_fields.get(key) {
                            line.insert(key.into(), value.clone());
                        }
                    }
                }
            }
        }
        let message = fields.0.remove("message").unwrap_or(Value::from(""));
        line.insert("message".into(), message);
        line.insert("fields".into(), Value::Object(fields.0));
        writeln!(writer, "{}", Value::Object(line))
    }
}
