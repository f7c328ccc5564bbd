//! `contactsync`: the command line. Wires configured connectors into the engine, shows
//! progress, writes reports, and turns every outcome into one clear sentence and an
//! exit code (0 synced, 1 failure, 2 usage or config error, 3 rejected records or
//! removals held back, 4 refused by the removal guard, 130 interrupted).

/// `println!` that a closed stdout does not stop: when the reader went away
/// (`contactsync sync --all | head -1`), the output ends quietly and the work goes on
/// (`println!` would panic, and the pipelines after it would never run).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

mod jsonlog;
mod metrics;
mod notify;
mod progress;
mod settings;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, Context, Result};
use clap::{Parser, Subcommand};
use contactsync_core::CancellationToken;
use contactsync_core::{registry, RunningSandbox, SandboxOptions, Sink, Source};
use contactsync_engine::{
    run, Pipeline, RunOptions, RunReport, RunStatus, StateItem, StateLocation, StateStore, SyncMode,
};
use futures::StreamExt;
use tracing::Instrument;

use crate::progress::RunProgress;
use crate::settings::{base_url, with_base_url, Section, Settings};

// The connectors this binary links. Adding a connector means adding its crate here and
// to Cargo.toml; each registers itself by name. `extern crate` (not `use … as _`) makes
// rustc link a crate nothing else names, and with it the crate's registrations.
extern crate contactsync_actito;
extern crate contactsync_businesscatalyst;
extern crate contactsync_csv;
extern crate contactsync_ldap;
extern crate contactsync_poppulo;
// The sandboxes register themselves the same way, in builds with the `sandboxes` feature.
#[cfg(feature = "sandboxes")]
extern crate contactsync_sandbox_actito;
#[cfg(feature = "sandboxes")]
extern crate contactsync_sandbox_businesscatalyst;
#[cfg(feature = "sandboxes")]
extern crate contactsync_sandbox_poppulo;

// The run allocates on two threads (the source's parser and the engine) and frees on
// the other one: glibc's allocator serialises that on its arena lock, mimalloc does not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (15 in the v2 and the v3 headers the crate
/// vendors; the crate names no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Freed memory goes back to the system 10 ms after it is freed, not mimalloc v3's
/// 1 s: a run frees each phase's memory (the read's records, a batch) as the next one
/// grows, and holding it for a second put a 1M nightly's peak at 100 MB instead of 80.
/// `MIMALLOC_PURGE_DELAY` in the environment still decides, when set.
fn return_freed_memory_promptly() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a plain integer option; mimalloc reads options atomically.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 10) }
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "contactsync",
    version,
    about = "Keeps the people in one system in step with the platforms that mail them."
)]
struct Cli {
    /// The config file (default: $CONTACTSYNC_CONFIG, else ./contactsync.toml).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// `text` (default) or `json`: one JSON object a line on stderr, for log shippers.
    #[arg(long, global = true, value_name = "FORMAT", default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// For people.
    Text,
    /// One JSON object a line: time, level, pipeline, run, message, fields.
    Json,
}

/// Where log records go: stderr, each record whole and cleaned of every secret this
/// process knows ([`contactsync_core::redact_secrets`]), whatever put it there (a
/// platform's error body that echoes the request).
struct RedactingWriter(Vec<u8>);

impl std::io::Write for RedactingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for RedactingWriter {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.0);
        let text = contactsync_core::redact_secrets(&text);
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), text.as_bytes());
    }
}

/// Whether logs are JSON: then everything on stderr goes through the log.
static JSON_LOGS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// Says something on stderr: a line for a person, or a log record in JSON mode, so
/// that every line of stderr stays parseable.
fn say(level: tracing::Level, message: &str) {
    let message = &*contactsync_core::redact_secrets(message);
    if JSON_LOGS.get().copied().unwrap_or(false) {
        match level {
            tracing::Level::ERROR => tracing::error!("{message}"),
            tracing::Level::WARN => tracing::warn!("{message}"),
            _ => tracing::info!("{message}"),
        }
    } else {
        eprintln!("{message}");
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Sync the people of a source into a sink.
    Sync(SyncArgs),
    /// List the registered connectors.
    Connectors,
    /// Validate the config and open every configured endpoint, changing nothing.
    Check,
    /// Show or reset the sync state.
    State {
        #[command(subcommand)]
        command: StateCommand,
        /// The state database (default: from the config).
        #[arg(long, value_name = "FILE", global = true)]
        state: Option<PathBuf>,
    },
    /// List past runs from the state: start, duration, status, counts.
    Runs {
        /// Only this pipeline (`from->to`).
        #[arg(long, value_name = "NAME")]
        pipeline: Option<String>,
        /// How many, newest first.
        #[arg(long, value_name = "N", default_value_t = 20)]
        last: usize,
        /// As JSON.
        #[arg(long)]
        json: bool,
        /// The state database (default: from the config).
        #[arg(long, value_name = "FILE")]
        state: Option<PathBuf>,
    },
    /// What contactsync did to one person, from the state's audit (`audit_days`).
    History {
        /// The person's email, key (`external_id:E1`) or external id.
        who: String,
        /// As JSON.
        #[arg(long)]
        json: bool,
        /// The state database (default: from the config).
        #[arg(long, value_name = "FILE")]
        state: Option<PathBuf>,
    },
    /// Run a platform's sandbox on loopback until interrupted, to try a mapping offline.
    Sandbox {
        /// The platform (see `contactsync connectors`).
        name: String,
        /// The port to listen on (default: any free port).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Keep the sandbox's data in this file between runs.
        #[arg(long, value_name = "FILE")]
        data: Option<PathBuf>,
    },
}

#[derive(Parser, Debug, Clone)]
struct SyncArgs {
    /// The `[sources.NAME]` section to read (with --to).
    #[arg(long, value_name = "NAME", requires = "to", conflicts_with_all = ["all", "pipeline"])]
    from: Option<String>,
    /// The `[sinks.NAME]` section to write (with --from).
    #[arg(long, value_name = "NAME", requires = "from")]
    to: Option<String>,
    /// Run every `[pipelines.NAME]` of the config, in the order the file lists them.
    #[arg(long, conflicts_with = "pipeline")]
    all: bool,
    /// Run the `[pipelines.NAME]` section NAME (repeatable).
    #[arg(long, value_name = "NAME")]
    pipeline: Vec<String>,
    /// How many pipelines may run at once (pipelines that write one sink section
    /// always run one after the other).
    #[arg(long, value_name = "N", default_value_t = 1)]
    jobs: usize,
    /// Show the plan; change neither the sink nor the state.
    #[arg(long)]
    dry_run: bool,
    /// upsert, mirror (default), update-only or create-only.
    #[arg(long, value_name = "MODE")]
    mode: Option<SyncMode>,
    /// Read everything, even from an incremental source (and so detect removals).
    #[arg(long)]
    full: bool,
    /// Allow removing more than the pipeline's max_removal_ratio of the synced people.
    #[arg(long)]
    allow_mass_removal: bool,
    /// Write the run's report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Write rejected records as CSV to FILE (default: last-rejects.csv beside the state).
    #[arg(long, value_name = "FILE")]
    rejects: Option<PathBuf>,
    /// Write every change of the run to FILE, one JSON object a line, with each
    /// field's value before and after (with or without --dry-run).
    #[arg(long, value_name = "FILE")]
    plan: Option<PathBuf>,
    /// The state database (default: from the config).
    #[arg(long, value_name = "FILE")]
    state: Option<PathBuf>,
    /// Write the run's metrics in the Prometheus text format to FILE (atomically), for
    /// node_exporter's textfile collector.
    #[arg(long, value_name = "FILE")]
    metrics: Option<PathBuf>,
    /// When another run holds this pipeline (or its sink section), wait up to DURATION
    /// (`90s`, `10m`) for it instead of exiting 5.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    wait_for_lock: Option<std::time::Duration>,
    /// With --all: share the night with the other workers started with the same config
    /// and state (on any machine): take the next pipeline not yet run in this slot,
    /// until none is left. Pipelines that write one sink section wait for each other.
    #[arg(long, requires = "all")]
    worker: bool,
    /// The schedule slot --worker fills: each pipeline runs once a slot (default:
    /// today's date, UTC, `2026-12-01`).
    #[arg(long, value_name = "SLOT", requires = "worker")]
    slot: Option<String>,
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    contactsync_core::DurationSetting::parse(text).map(|d| d.0)
}

#[derive(Subcommand, Debug)]
enum StateCommand {
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

/// An error and the exit code it deserves.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

fn usage(error: anyhow::Error) -> Failure {
    Failure { code: 2, error }
}

fn failed(error: anyhow::Error) -> Failure {
    Failure { code: 1, error }
}

/// A state that cannot be opened: `locked` (exit 5) while another process keeps its
/// write lock (a run stopped mid-write), a failure otherwise.
fn state_failure(error: contactsync_engine::StateError) -> Failure {
    match error {
        contactsync_engine::StateError::Busy { .. } => Failure {
            code: 5,
            error: anyhow!("locked: {error}"),
        },
        error => failed(anyhow!(error)),
    }
}

fn main() -> ExitCode {
    return_freed_memory_promptly();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    init_logging(cli.verbose, cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(Failure { code, error }) => {
            say(tracing::Level::ERROR, &format!("error: {error:#}"));
            ExitCode::from(code)
        }
    }
}

fn init_logging(verbose: u8, format: LogFormat) {
    let _ = JSON_LOGS.set(format == LogFormat::Json);
    let default = match verbose {
        // Warnings, and the progress lines of a run that is not on a terminal (cron logs).
        0 => "warn,contactsync::progress=info",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colour only for a person at a terminal: never in a file, a pipe or a cron mail,
    // and never when NO_COLOR is set (https://no-color.org).
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| RedactingWriter(Vec::new()))
        .with_target(false);
    match format {
        LogFormat::Text => builder.with_ansi(colour).init(),
        // `pipeline` and `run` come from the run's span.
        LogFormat::Json => builder
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(jsonlog::JsonLines)
            .init(),
    }
}

async fn dispatch(cli: Cli) -> Result<u8, Failure> {
    let config_path = settings::locate(cli.config.as_deref());
    match cli.command {
        Command::Connectors => {
            list_connectors();
            Ok(0)
        }
        Command::Sync(args) => {
            let settings = Settings::load(&config_path, args.state.as_deref()).map_err(usage)?;
            sync(&settings, args).await
        }
        Command::Check => {
            let settings = Settings::load(&config_path, None).map_err(usage)?;
            check(&settings).await
        }
        Command::State { command, state } => {
            let path = state_path(&config_path, state)?;
            state_command(&path, command)
        }
        Command::Runs {
            pipeline,
            last,
            json,
            state,
        } => {
            let path = state_path(&config_path, state)?;
            runs_command(&path, pipeline.as_deref(), last, json)
        }
        Command::History { who, json, state } => {
            let path = state_path(&config_path, state)?;
            history_command(&path, &who, json)
        }
        Command::Sandbox { name, port, data } => sandbox(&name, port, data).await,
    }
}

/// `--state FILE|URL`, else the config's `state`.
fn state_path(config: &Path, flag: Option<PathBuf>) -> Result<StateLocation, Failure> {
    match flag {
        Some(path) => StateLocation::parse(&path.to_string_lossy(), Path::new(""))
            .map_err(|e| usage(anyhow!("--state {e}"))),
        None => Ok(Settings::load(config, None).map_err(usage)?.state),
    }
}

fn runs_command(
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

fn history_command(path: &StateLocation, who: &str, json: bool) -> Result<u8, Failure> {
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
fn describe_fields(fields: &str) -> String {
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

fn list_connectors() {
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

/// The port of a `http://127.0.0.1:PORT/…` URL.
fn url_port(url: &str) -> Option<u16> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    authority.rsplit_once(':')?.1.parse().ok()
}

/// Said after "no sandbox" in builds that left the sandboxes out.
const NO_SANDBOXES_HINT: &str = if cfg!(feature = "sandboxes") {
    ""
} else {
    " (this build has no sandboxes: build with the default `sandboxes` feature)"
};

/// Sandboxes started in this process, one per platform, so that a source and a sink of
/// the same platform see the same data.
#[derive(Default)]
struct Sandboxes {
    running: BTreeMap<String, RunningSandbox>,
}

impl Sandboxes {
    /// Starts the sandbox a section asks for with `base_url = "sandbox"`, and points the
    /// section at it.
    async fn resolve(&mut self, section: Section, data_dir: &Path) -> Result<Section> {
        if base_url(&section.settings).as_deref() != Some("sandbox") {
            return Ok(section);
        }
        let url = match self.running.get(&section.connector) {
            Some(running) => running.base_url.clone(),
            None => {
                let factory = registry::sandbox(&section.connector).ok_or_else(|| {
                    anyhow!(
                        "[{}] base_url = \"sandbox\", but connector `{}` has no sandbox{}",
                        section.settings.section,
                        section.connector,
                        NO_SANDBOXES_HINT
                    )
                })?;
                std::fs::create_dir_all(data_dir)
                    .with_context(|| format!("creating {}", data_dir.display()))?;
                let data_file = data_dir.join(format!("sandbox-{}.json", section.connector));
                // The sandbox keeps the port it had, when it is free, so that the link
                // of an import a killed run left behind still leads to it.
                let port_file = data_dir.join(format!("sandbox-{}.port", section.connector));
                let last_port = std::fs::read_to_string(&port_file)
                    .ok()
                    .and_then(|p| p.trim().parse::<u16>().ok());
                let options = |port| SandboxOptions {
                    data_file: Some(data_file.clone()),
                    port,
                    settings: Some(section.settings.clone()),
                };
                let started = match last_port {
                    Some(port) => {
                        match (factory.start)(options(port)).await {
                            Ok(running) => Ok(running),
                            Err(e) => {
                                tracing::info!("port {port} of the last {} sandbox is taken ({e}); using another", section.connector);
                                (factory.start)(options(0)).await
                            }
                        }
                    }
                    None => (factory.start)(options(0)).await,
                };
                let running = started
                    .with_context(|| format!("starting the {} sandbox", section.connector))?;
                if let Some(port) = url_port(&running.base_url) {
                    if let Err(e) = std::fs::write(&port_file, format!("{port}\n")) {
                        tracing::warn!(
                            "could not keep the sandbox's port in {}: {e}",
                            port_file.display()
                        );
                    }
                }
                say(tracing::Level::WARN, &format!(
                    "note: [{}] uses the built-in {} SANDBOX at {} (data in {}), not the real platform",
                    section.settings.section,
                    section.connector,
                    running.base_url,
                    data_file.display()
                ));
                let url = running.base_url.clone();
                self.running.insert(section.connector.clone(), running);
                url
            }
        };
        Ok(Section {
            settings: with_base_url(&section.settings, &url),
            connector: section.connector,
        })
    }

    fn stop(self) {
        for (_, running) in self.running {
            running.shutdown.cancel();
        }
    }
}

/// Builds a connector only to check it (settings, files) before anything runs; a
/// section with `base_url = "sandbox"` against a loopback address nothing listens on
/// (building opens no connection), so that its settings are checked before a sandbox
/// is started for it.
fn built_for_checks<T>(section: &Section, build: fn(&Section) -> Result<T>) -> Result<T> {
    if base_url(&section.settings).as_deref() != Some("sandbox") {
        return build(section);
    }
    let probe = Section {
        connector: section.connector.clone(),
        settings: with_base_url(&section.settings, "http://127.0.0.1:9/"),
    };
    build(&probe)
}

fn build_source(section: &Section) -> Result<Box<dyn Source>> {
    let factory = registry::source(&section.connector).ok_or_else(|| {
        anyhow!(
            "[{}] type = \"{}\": no such source (registered: {})",
            section.settings.section,
            section.connector,
            registry::sources()
                .iter()
                .map(|f| f.name)
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    Ok((factory.build)(&section.settings)?)
}

fn build_sink(section: &Section) -> Result<Box<dyn Sink>> {
    let factory = registry::sink(&section.connector).ok_or_else(|| {
        anyhow!(
            "[{}] type = \"{}\": no such sink (registered: {})",
            section.settings.section,
            section.connector,
            registry::sinks()
                .iter()
                .map(|f| f.name)
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    Ok((factory.build)(&section.settings)?)
}

/// One pipeline a `sync` runs.
#[derive(Debug, Clone)]
struct Job {
    /// How the user knows it: the `[pipelines.NAME]` section, or `from->to`.
    name: String,
    from: String,
    to: String,
}

/// What one pipeline's run came to.
struct Finished {
    job: Job,
    report: Option<RunReport>,
    code: u8,
    /// When the pipeline last synced (Unix seconds), for the metrics.
    last_success: Option<f64>,
}

impl Finished {
    /// What a pipeline's run gave, or, when it failed before it had a report, its
    /// error said on the console and its exit code.
    fn or_failed(result: Result<Finished, Failure>, job: Job) -> Finished {
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
fn select_jobs(settings: &Settings, args: &SyncArgs) -> Result<Vec<Job>> {
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
fn severity(code: u8) -> u8 {
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

async fn sync(settings: &Settings, args: SyncArgs) -> Result<u8, Failure> {
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
const WORKER_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(6 * 3600);

/// `sync --all --worker`: claims, in config order, each pipeline no worker ran in the
/// slot yet, and runs it; returns what this worker ran.
async fn work_the_slot(
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
fn print_table(finished: &[(usize, Finished)]) {
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
fn outputs(
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
fn per_pipeline(given: Option<&Path>, many: bool, job: &Job, ext: &str) -> Option<PathBuf> {
    let given = given?;
    if !many {
        return Some(given.to_path_buf());
    }
    let _ = std::fs::create_dir_all(given);
    Some(given.join(format!("{}.{ext}", file_safe(&job.name))))
}

/// A pipeline name as a file name (`hr->poppulo` → `hr-poppulo`).
fn file_safe(name: &str) -> String {
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
async fn sync_one(
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
async fn write_metrics(settings: &Settings, args: &SyncArgs, runs: &[(&RunReport, Option<f64>)]) {
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
async fn after_run(
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
fn check_paths(
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
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if let (Ok(x), Ok(y)) = (std::fs::metadata(a), std::fs::metadata(b)) {
        return x.dev() == y.dev() && x.ino() == y.ino();
    }
    fn normal(p: &Path) -> PathBuf {
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
fn exit_code(status: RunStatus) -> u8 {
    match status {
        RunStatus::Synced => 0,
        RunStatus::Failed => 1,
        RunStatus::FinishedWithRejects | RunStatus::RemovalsHeld => 3,
        RunStatus::Refused => 4,
        RunStatus::Locked => 5,
        RunStatus::Interrupted => 130,
    }
}

fn print_report(report: &RunReport, rejects: &Path) {
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

async fn check(settings: &Settings) -> Result<u8, Failure> {
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
            Ok(()) => say!("ok    [sources.{name}] ({})", section.connector),
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
            Ok(()) => say!("ok    [sinks.{name}] ({})", section.connector),
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
const PREVIEW_READ: usize = 100;
const PREVIEW_SHOWN: usize = 5;

/// The first records before and after the pipeline's mapping, and counts over all read.
fn print_preview(records: &[contactsync_engine::PreviewRecord]) {
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

fn state_command(path: &StateLocation, command: StateCommand) -> Result<u8, Failure> {
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
            let mut counts = [0u64; 5];
            let mut chunk = Vec::with_capacity(10_000);
            state
                .export(&mut |item| {
                    let slot = match &item {
                        StateItem::Pipeline { .. } => 0,
                        StateItem::Synced { .. } => 1,
                        StateItem::Run(_) => 2,
                        StateItem::Audit(_) => 3,
                        StateItem::SinkData { .. } => 4,
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
                "copied {path} to {target_location}: {} pipelines, {} synced people, {} runs, {} audit entries, {} sink values",
                counts[0], counts[1], counts[2], counts[3], counts[4]
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

async fn sandbox(name: &str, port: u16, data: Option<PathBuf>) -> Result<u8, Failure> {
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

#[cfg(test)]
mod tests {
    /// The option set is the purge delay: it reads mimalloc v3's default for that
    /// option (1000 ms) before, and the value set after.
    #[test]
    fn the_allocator_option_set_is_the_purge_delay() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return; // the environment decides, and the default is not there to check
        }
        // SAFETY: reads a plain integer option.
        let get = || unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert_eq!(get(), 1000);
        super::return_freed_memory_promptly();
        assert_eq!(get(), 10);
    }
}
