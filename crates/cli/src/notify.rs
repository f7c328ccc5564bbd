//! Telling someone when a nightly run needs them: webhooks (JSON or Slack-compatible)
//! and commands, on a failed, refused or rejecting run, and once more when it recovers.
//!
//! A target is told once per change of a pipeline's state, not every night: what the
//! previous run was is read back from the runs in the state. A notification that fails
//! is logged and never changes the run's exit code. Payloads carry the run's report
//! (counts, status, the first rejections with key, origin and reason), never a secret
//! and never a whole record.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use contactsync_core::{DurationSetting, ExposeSecret, SecretString};
use contactsync_engine::{RunReport, RunStatus};
use contactsync_http::{Auth, ClientConfig, HttpClient, Method, RetryPolicy, Url};
use serde::Deserialize;

/// What a run was, as far as telling anyone goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// The run failed.
    Failed,
    /// The removal guard refused the run.
    Refused,
    /// The run finished with more rejected records than `rejects_over`.
    Rejects,
    /// The first good run after a failed or refused one.
    Recovered,
}

impl Event {
    fn as_str(self) -> &'static str {
        match self {
            Event::Failed => "failed",
            Event::Refused => "refused",
            Event::Rejects => "rejects",
            Event::Recovered => "recovered",
        }
    }
}

fn default_on() -> Vec<Event> {
    vec![Event::Failed, Event::Refused, Event::Recovered]
}

/// How a webhook's body looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// The run's report as JSON, with `event`.
    #[default]
    Json,
    /// `{"text": "…"}`, as Slack's incoming webhooks (and Mattermost, Teams' Slack
    /// connector) take it.
    Slack,
}

/// `[[notify.webhook]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// The URL (it may hold a token: it is never logged).
    #[serde(default)]
    pub url: Option<SecretString>,
    /// A file holding the URL.
    #[serde(default)]
    pub url_file: Option<PathBuf>,
    /// An environment variable holding the URL.
    #[serde(default)]
    pub url_env: Option<String>,
    /// The events to notify on; default failed, refused, recovered.
    #[serde(default = "default_on")]
    pub on: Vec<Event>,
    /// Rejected records a run may have before it counts as `rejects`; default 0.
    #[serde(default)]
    pub rejects_over: u64,
    /// `json` (default) or `slack`.
    #[serde(default)]
    pub format: Format,
    /// How long one attempt may take; default 10 s. Three attempts at most.
    #[serde(default = "default_timeout")]
    pub timeout: DurationSetting,
}

fn default_timeout() -> DurationSetting {
    DurationSetting::secs(10)
}

/// `[[notify.command]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandSettings {
    /// The program and its arguments; `{report}` becomes the path of a file holding
    /// the JSON payload, `{event}` the event's name.
    pub run: Vec<String>,
    /// The events to run it on; default failed, refused, recovered.
    #[serde(default = "default_on")]
    pub on: Vec<Event>,
    /// Rejected records a run may have before it counts as `rejects`; default 0.
    #[serde(default)]
    pub rejects_over: u64,
}

/// `[notify]`, top-level or in a pipeline's section (which then replaces it).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifySettings {
    /// Webhooks.
    #[serde(default)]
    pub webhook: Vec<WebhookSettings>,
    /// Commands.
    #[serde(default)]
    pub command: Vec<CommandSettings>,
}

impl NotifySettings {
    /// Checks what can be checked before any run: every webhook has exactly one source
    /// for its URL, every command a program.
    pub fn validate(&self, section: &str) -> Result<()> {
        for (i, hook) in self.webhook.iter().enumerate() {
            let given = [
                hook.url.is_some(),
                hook.url_file.is_some(),
                hook.url_env.is_some(),
            ]
            .iter()
            .filter(|g| **g)
            .count();
            if given != 1 {
                anyhow::bail!(
                    "[{section}] webhook {}: give exactly one of url, url_file, url_env",
                    i + 1
                );
            }
        }
        for (i, command) in self.command.iter().enumerate() {
            if command.run.is_empty() {
                anyhow::bail!("[{section}] command {}: `run` names no program", i + 1);
            }
        }
        Ok(())
    }

    /// Whether anything is configured.
    pub fn is_empty(&self) -> bool {
        self.webhook.is_empty() && self.command.is_empty()
    }
}

/// What a run counts as for a target with `rejects_over`: `None` for a good run.
fn classify(status: &str, rejected: u64, rejects_over: u64) -> Option<Event> {
    match status {
        "failed" => Some(Event::Failed),
        "refused" => Some(Event::Refused),
        _ if rejected > rejects_over => Some(Event::Rejects),
        _ => None,
    }
}

/// The events to send a target for this run, given the previous run's status and
/// rejected count: a bad state once when it starts, `recovered` once when it ends.
fn events(
    on: &[Event],
    rejects_over: u64,
    now: (&str, u64),
    previous: Option<(&str, u64)>,
) -> Vec<Event> {
    let current = classify(now.0, now.1, rejects_over);
    let before = previous.and_then(|(s, r)| classify(s, r, rejects_over));
    let mut out = Vec::new();
    if let Some(event) = current {
        if before != Some(event) {
            out.push(event);
        }
    }
    let good_now = !matches!(current, Some(Event::Failed | Event::Refused));
    if good_now && matches!(before, Some(Event::Failed | Event::Refused)) {
        out.push(Event::Recovered);
    }
    out.retain(|e| on.contains(e));
    out
}

/// The JSON payload: the report (without the dry-run sample) and the event.
fn payload(report: &RunReport, event: Event) -> serde_json::Value {
    let mut value = serde_json::to_value(report).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        map.remove("sample");
        map.insert("event".into(), event.as_str().into());
    }
    value
}

fn slack_text(report: &RunReport, event: Event) -> String {
    let what = match event {
        Event::Failed => format!(
            "failed: {}",
            report.error.as_deref().unwrap_or("see the log")
        ),
        Event::Refused => format!(
            "was refused by the removal guard: {}",
            report.error.as_deref().unwrap_or("")
        ),
        Event::Rejects => format!("finished with {} rejected records", report.rejected),
        Event::Recovered => "recovered: the last run synced".to_string(),
    };
    format!(
        "contactsync: pipeline {} (run {}) {what}. Created {}, updated {}, removed {}, rejected {}.",
        report.pipeline, report.run, report.created, report.updated, report.removed, report.rejected
    )
}

/// Sends what `settings` asks for after a run. `previous` is the status and rejected
/// count of the pipeline's run before this one. Never fails: problems are logged.
pub async fn after_run(
    settings: &NotifySettings,
    report: &RunReport,
    previous: Option<(String, u64)>,
) {
    if report.dry_run || report.status == RunStatus::Locked {
        return;
    }
    let now = (report.status.as_str(), report.rejected);
    let previous = previous.as_ref().map(|(s, r)| (s.as_str(), *r));
    for hook in &settings.webhook {
        for event in events(&hook.on, hook.rejects_over, now, previous) {
            if let Err(e) = send_webhook(hook, report, event).await {
                tracing::warn!("notification ({}) by webhook failed: {e:#}", event.as_str());
            }
        }
    }
    for command in &settings.command {
        for event in events(&command.on, command.rejects_over, now, previous) {
            if let Err(e) = run_command(command, report, event).await {
                tracing::warn!("notification ({}) by command failed: {e:#}", event.as_str());
            }
        }
    }
}

fn webhook_url(hook: &WebhookSettings) -> Result<SecretString> {
    let url = find_webhook_url(hook)?;
    contactsync_core::remember_secret(url.expose_secret());
    Ok(url)
}

fn find_webhook_url(hook: &WebhookSettings) -> Result<SecretString> {
    if let Some(url) = &hook.url {
        return Ok(url.clone());
    }
    if let Some(file) = &hook.url_file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading the webhook URL from {}", file.display()))?;
        return Ok(SecretString::from(text.trim().to_string()));
    }
    if let Some(var) = &hook.url_env {
        let text = std::env::var(var).map_err(|_| {
            anyhow!("the environment variable {var} holding the webhook URL is not set")
        })?;
        return Ok(SecretString::from(text.trim().to_string()));
    }
    Err(anyhow!("the webhook has no URL"))
}

async fn send_webhook(hook: &WebhookSettings, report: &RunReport, event: Event) -> Result<()> {
    let url = webhook_url(hook)?;
    let url = url.expose_secret();
    let parsed = Url::parse(url).map_err(|_| anyhow!("the webhook URL is not a URL"))?;
    let origin = parsed.origin().ascii_serialization();
    let mut settings = ClientConfig::new(&origin).map_err(|e| anyhow!("{e}"))?;
    settings.connect_timeout = hook.timeout.0.min(Duration::from_secs(5));
    settings.request_timeout = hook.timeout.0;
    // Bounded: a receiver that is down costs the run at most half a minute.
    settings.retry = RetryPolicy {
        max_attempts: 3,
        base_backoff: Duration::from_millis(500),
        max_backoff: Duration::from_secs(5),
        max_elapsed: Duration::from_secs(30),
        retry_transport_errors: true,
    };
    let client = HttpClient::new(settings, Auth::None).map_err(|e| anyhow!("{e}"))?;
    let body = match hook.format {
        Format::Json => payload(report, event).to_string(),
        Format::Slack => serde_json::json!({ "text": slack_text(report, event) }).to_string(),
    };
    client
        .request_url(Method::POST, url)
        .body("application/json", body)
        .send()
        .await
        // The error names the call by its path only, never the query that may hold a token.
        .map_err(|e| anyhow!("{e}"))?;
    tracing::info!(host = %parsed.host_str().unwrap_or(""), event = event.as_str(), "notified by webhook");
    Ok(())
}

async fn run_command(command: &CommandSettings, report: &RunReport, event: Event) -> Result<()> {
    let mut file = tempfile::Builder::new()
        .prefix("contactsync-report-")
        .suffix(".json")
        .tempfile()
        .context("creating the report file for the command")?;
    std::io::Write::write_all(&mut file, payload(report, event).to_string().as_bytes())
        .context("writing the report file for the command")?;
    let path = file.path().display().to_string();
    let args: Vec<String> = command
        .run
        .iter()
        .map(|a| {
            a.replace("{report}", &path)
                .replace("{event}", event.as_str())
        })
        .collect();
    let mut child = tokio::process::Command::new(&args[0])
        .args(&args[1..])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", args[0]))?;
    match tokio::time::timeout(Duration::from_secs(60), child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(anyhow!("{} exited with {status}", args[0])),
        Ok(Err(e)) => Err(anyhow!("waiting for {}: {e}", args[0])),
        Err(_) => Err(anyhow!("{} still ran after 60 s; stopped", args[0])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Event; 4] = [
        Event::Failed,
        Event::Refused,
        Event::Rejects,
        Event::Recovered,
    ];

    #[test]
    fn once_per_change_of_state_then_recovered() {
        let on = ALL;
        assert_eq!(
            events(&on, 0, ("failed", 0), Some(("synced", 0))),
            [Event::Failed]
        );
        assert!(events(&on, 0, ("failed", 0), Some(("failed", 0))).is_empty());
        assert_eq!(
            events(&on, 0, ("synced", 0), Some(("failed", 0))),
            [Event::Recovered]
        );
        assert!(events(&on, 0, ("synced", 0), Some(("synced", 0))).is_empty());
        assert_eq!(
            events(&on, 0, ("finished_with_rejects", 3), None),
            [Event::Rejects]
        );
        assert!(events(&on, 5, ("finished_with_rejects", 3), None).is_empty());
        assert_eq!(
            events(&on, 0, ("finished_with_rejects", 1), Some(("refused", 0))),
            [Event::Rejects, Event::Recovered]
        );
        assert!(events(&[Event::Failed], 0, ("synced", 0), Some(("failed", 0))).is_empty());
    }
}
