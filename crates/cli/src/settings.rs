//! The config file: where it is, what it holds, and how environment variables
//! override it. Sections map one-to-one onto components: `[sources.NAME]` and
//! `[sinks.NAME]` each name a registered connector `type`; `[pipelines.NAME]` holds how
//! a `from`/`to` pair syncs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use config::{Config, Environment, File, FileFormat, Value, ValueKind};
use contactsync_core::ConnectorSettings;
use std::sync::Arc;

use contactsync_engine::{Lookups, Pipeline, PipelineSettings, StateLocation};

use crate::metrics::MetricsSettings;
use crate::notify::NotifySettings;

/// The loaded config.
pub struct Settings {
    /// The config file.
    pub file: PathBuf,
    /// Its directory: relative paths resolve against it.
    pub base_dir: PathBuf,
    /// The state: a SQLite file, or a PostgreSQL database.
    pub state: StateLocation,
    sources: BTreeMap<String, Value>,
    sinks: BTreeMap<String, Value>,
    pipelines: BTreeMap<String, Value>,
    /// `[notify]`: who is told about runs, unless a pipeline says otherwise.
    pub notify: NotifySettings,
    /// `[metrics]`.
    pub metrics: MetricsSettings,
    /// `[dashboard]`: what `contactsync serve` shows.
    pub dashboard: crate::serve::DashboardSettings,
    /// The `[pipelines.NAME]` sections in the order the file lists them.
    pipeline_order: Vec<String>,
    /// `[lookups.NAME]`: the tables `lookup()` reads, loaded once.
    pub lookups: Arc<Lookups>,
    /// The files those tables were read from (no run may write them).
    pub lookup_files: Vec<PathBuf>,
}

/// A connector section, ready for its factory.
pub struct Section {
    /// The registered connector type.
    pub connector: String,
    /// Its settings.
    pub settings: ConnectorSettings,
}

const TOP_LEVEL: [&str; 12] = [
    "lookups",
    "state",
    "state_ca_file",
    "state_password",
    "state_password_file",
    "sources",
    "sinks",
    "pipelines",
    "config",
    "notify",
    "metrics",
    "dashboard",
];

/// Where the config is: `--config`, else `$CONTACTSYNC_CONFIG`, else `./contactsync.toml`.
pub fn locate(flag: Option<&Path>) -> PathBuf {
    flag.map(Path::to_path_buf)
        .or_else(|| std::env::var_os("CONTACTSYNC_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("contactsync.toml"))
}

fn table(value: Value, what: &str, file: &Path) -> Result<BTreeMap<String, Value>> {
    match value.kind {
        ValueKind::Table(t) => Ok(t.into_iter().collect()),
        ValueKind::Nil => Ok(BTreeMap::new()),
        _ => bail!("{}: `{what}` must be a table of sections", file.display()),
    }
}

/// Refuses an environment override that names a `[sources.NAME]`, `[sinks.NAME]` or
/// `[pipelines.NAME]` section the file does not have (`CONTACTSYNC_PIPELINES__PP__…` for
/// a pipeline `p`): the setting a user thinks they made, a removal guard say, would
/// silently not be there. Names compare without regard to case, as the environment's
/// are lower-cased on the way in.
fn check_overrides_name_sections(
    file: &Path,
    vars: impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Result<()> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading config file {}", file.display()))?;
    // A file that does not parse is reported, with its line, by the config crate.
    let Ok(parsed) = text.parse::<toml::Table>() else {
        return Ok(());
    };
    for (name, _) in vars {
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix("CONTACTSYNC_") else {
            continue;
        };
        let mut parts = rest.split("__");
        let (Some(kind), Some(section)) = (parts.next(), parts.next()) else {
            continue;
        };
        let kind = kind.to_ascii_lowercase();
        if !["sources", "sinks", "pipelines"].contains(&kind.as_str()) {
            continue;
        }
        let known = parsed
            .get(&kind)
            .and_then(toml::Value::as_table)
            .is_some_and(|t| t.keys().any(|k| k.eq_ignore_ascii_case(section)));
        if !known {
            bail!(
                "environment variable {name} names [{kind}.{}], which {} does not have: check the name (sections are matched without regard to case; a variable cannot add a section)",
                section.to_ascii_lowercase(),
                file.display()
            );
        }
    }
    Ok(())
}

impl Settings {
    /// Loads `file`, then `CONTACTSYNC_…` environment overrides
    /// (`CONTACTSYNC_SINKS__POPPULO__PASSWORD` sets `sinks.poppulo.password`).
    pub fn load(file: &Path, state_flag: Option<&Path>) -> Result<Settings> {
        if !file.exists() {
            bail!(
                "config file {} not found: pass --config FILE, set CONTACTSYNC_CONFIG, or create contactsync.toml (see README.md)",
                file.display()
            );
        }
        check_overrides_name_sections(file, std::env::vars_os())?;
        let config = Config::builder()
            .add_source(File::from(file).format(FileFormat::Toml).required(true))
            .add_source(
                Environment::with_prefix("CONTACTSYNC")
                    .prefix_separator("_")
                    .separator("__"),
            )
            .build()
            .with_context(|| format!("reading config file {}", file.display()))?;
        let root = table(config.cache, "(root)", file)?;
        for key in root.keys() {
            if !TOP_LEVEL.contains(&key.as_str()) {
                bail!(
                    "{}: unknown top-level key `{key}` (expected state, [sources.NAME], [sinks.NAME], [pipelines.NAME], [notify], [metrics], [dashboard])",
                    file.display()
                );
            }
        }
        let base_dir = file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let mut state = match (state_flag, root.get("state")) {
            (Some(flag), _) => StateLocation::parse(&flag.to_string_lossy(), Path::new(""))
                .map_err(|e| anyhow!("--state {e}"))?,
            (None, Some(value)) => StateLocation::parse(
                &value
                    .clone()
                    .into_string()
                    .map_err(|e| anyhow!("{}: `state`: {e}", file.display()))?,
                &base_dir,
            )
            .map_err(|e| anyhow!("{}: `state` = {e}", file.display()))?,
            (None, None) => StateLocation::File(base_dir.join("contactsync-data").join("state.db")),
        };
        // `CONTACTSYNC_STATE_PASSWORD` reaches the config as `state_password`; the
        // state reads it from the environment. Written in the file, it is refused.
        if root.contains_key("state_password")
            && std::env::var_os("CONTACTSYNC_STATE_PASSWORD").is_none()
        {
            bail!(
                "{}: `state_password`: keep the state's password out of the config: set CONTACTSYNC_STATE_PASSWORD, or name a file with `state_password_file`",
                file.display()
            );
        }
        if let StateLocation::Postgres {
            password_file,
            ca_file,
            ..
        } = &mut state
        {
            let path_of = |key: &str| -> Result<Option<PathBuf>> {
                root.get(key)
                    .map(|value| {
                        value
                            .clone()
                            .into_string()
                            .map(|p| base_dir.join(p))
                            .map_err(|e| anyhow!("{}: `{key}`: {e}", file.display()))
                    })
                    .transpose()
            };
            *password_file = path_of("state_password_file")?;
            *ca_file = path_of("state_ca_file")?;
        }
        let get = |name: &str| -> Result<BTreeMap<String, Value>> {
            root.get(name)
                .cloned()
                .map(|v| table(v, name, file))
                .transpose()
                .map(Option::unwrap_or_default)
        };
        let notify: NotifySettings = match root.get("notify") {
            Some(value) => value
                .clone()
                .try_deserialize()
                .map_err(|e| anyhow!("{}: [notify]: {e}", file.display()))?,
            None => NotifySettings::default(),
        };
        notify.validate("notify")?;
        let metrics: MetricsSettings = match root.get("metrics") {
            Some(value) => value
                .clone()
                .try_deserialize()
                .map_err(|e| anyhow!("{}: [metrics]: {e}", file.display()))?,
            None => MetricsSettings::default(),
        };
        let dashboard: crate::serve::DashboardSettings = match root.get("dashboard") {
            Some(value) => value
                .clone()
                .try_deserialize()
                .map_err(|e| anyhow!("{}: [dashboard]: {e}", file.display()))?,
            None => crate::serve::DashboardSettings::default(),
        };
        // The config crate keeps no order; `sync --all` runs pipelines as listed.
        let pipeline_order = std::fs::read_to_string(file)
            .ok()
            .and_then(|text| text.parse::<toml::Table>().ok())
            .and_then(|t| t.get("pipelines").and_then(|p| p.as_table()).cloned())
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default();
        let (lookups, lookup_files) = load_lookups(root.get("lookups"), file, &base_dir)?;
        Ok(Settings {
            lookups: Arc::new(lookups),
            lookup_files,
            pipeline_order,
            notify,
            metrics,
            dashboard,
            file: file.to_path_buf(),
            base_dir,
            state,
            sources: get("sources")?,
            sinks: get("sinks")?,
            pipelines: get("pipelines")?,
        })
    }

    /// Where connectors and sandboxes keep files: beside the state database, or, with
    /// the state in PostgreSQL, in `contactsync-data` beside the config.
    pub fn data_dir(&self) -> PathBuf {
        match self.state.file() {
            Some(file) => file
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from(".")),
            None => self.base_dir.join("contactsync-data"),
        }
    }

    /// Names of the `[sources.NAME]` sections.
    pub fn source_names(&self) -> Vec<String> {
        self.sources.keys().cloned().collect()
    }

    /// Names of the `[sinks.NAME]` sections.
    pub fn sink_names(&self) -> Vec<String> {
        self.sinks.keys().cloned().collect()
    }

    /// The `[sources.NAME]` section.
    pub fn source(&self, name: &str) -> Result<Section> {
        self.section(
            "sources",
            name,
            self.sources.get(name),
            &self.source_names(),
        )
    }

    /// The `[sinks.NAME]` section.
    pub fn sink(&self, name: &str) -> Result<Section> {
        self.section("sinks", name, self.sinks.get(name), &self.sink_names())
    }

    fn section(
        &self,
        kind: &str,
        name: &str,
        value: Option<&Value>,
        known: &[String],
    ) -> Result<Section> {
        let value = value.ok_or_else(|| {
            anyhow!(
                "{}: no [{kind}.{name}] section (configured: {})",
                self.file.display(),
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )
        })?;
        let mut values = table(value.clone(), &format!("{kind}.{name}"), &self.file)?;
        let connector = values
            .remove("type")
            .ok_or_else(|| anyhow!("{}: [{kind}.{name}] `type`: missing; name the connector (see `contactsync connectors`)", self.file.display()))?
            .into_string()
            .map_err(|e| anyhow!("{}: [{kind}.{name}] `type`: {e}", self.file.display()))?;
        Ok(Section {
            connector,
            settings: ConnectorSettings {
                section: format!("{kind}.{name}"),
                name: name.to_string(),
                values: Value::new(None, ValueKind::Table(values.into_iter().collect())),
                base_dir: self.base_dir.clone(),
                data_dir: self.data_dir(),
                file: Some(self.file.clone()),
            },
        })
    }

    /// The settings of the pipeline from `from` to `to`: the `[pipelines.NAME]` section
    /// whose `from` and `to` match, else the defaults.
    pub fn pipeline(&self, from: &str, to: &str) -> Result<PipelineSettings> {
        for (name, value) in &self.pipelines {
            let mut values = table(value.clone(), &format!("pipelines.{name}"), &self.file)?;
            let field = |values: &mut BTreeMap<String, Value>, key: &str| -> Result<String> {
                values
                    .remove(key)
                    .ok_or_else(|| {
                        anyhow!(
                            "{}: [pipelines.{name}] `{key}`: missing",
                            self.file.display()
                        )
                    })?
                    .into_string()
                    .map_err(|e| {
                        anyhow!("{}: [pipelines.{name}] `{key}`: {e}", self.file.display())
                    })
            };
            let (f, t) = (field(&mut values, "from")?, field(&mut values, "to")?);
            // Read by `pipeline_notify`.
            values.remove("notify");
            if f == from && t == to {
                let value = Value::new(None, ValueKind::Table(values.into_iter().collect()));
                let settings = value
                    .try_deserialize::<PipelineSettings>()
                    .map_err(|e| anyhow!("{}: [pipelines.{name}]: {e}", self.file.display()))?;
                settings.validate().map_err(|(key, message)| {
                    anyhow!(
                        "{}: [pipelines.{name}] `{key}`: {message}",
                        self.file.display()
                    )
                })?;
                // Compiled here too, so that a template error is a config error at load.
                Pipeline::new(from, to, "", settings.clone())
                    .with_shaping(name, self.lookups.clone())
                    .map_err(|e| anyhow!("{}: {e}", self.file.display()))?;
                return Ok(settings);
            }
        }
        Ok(PipelineSettings::default())
    }

    /// The `[pipelines.NAME]` section of the pair, if there is one.
    pub fn pipeline_section(&self, from: &str, to: &str) -> Option<String> {
        self.pipelines()
            .into_iter()
            .find(|(_, f, t)| f == from && t == to)
            .map(|(name, _, _)| name)
    }

    /// Who is told about runs of the pipeline from `from` to `to`: its own `notify`
    /// section, else the top-level one.
    pub fn pipeline_notify(&self, from: &str, to: &str) -> Result<NotifySettings> {
        for (name, value) in &self.pipelines {
            let values = table(value.clone(), &format!("pipelines.{name}"), &self.file)?;
            let is = |key: &str, want: &str| {
                values
                    .get(key)
                    .and_then(|v| v.clone().into_string().ok())
                    .is_some_and(|v| v == want)
            };
            if is("from", from) && is("to", to) {
                if let Some(notify) = values.get("notify") {
                    let notify: NotifySettings = notify.clone().try_deserialize().map_err(|e| {
                        anyhow!("{}: [pipelines.{name}.notify]: {e}", self.file.display())
                    })?;
                    notify.validate(&format!("pipelines.{name}.notify"))?;
                    return Ok(notify);
                }
            }
        }
        Ok(self.notify.clone())
    }

    /// Every pipeline section's (name, from, to), in the order of the config file
    /// (sections that only the environment adds come last, by name).
    pub fn pipelines(&self) -> Vec<(String, String, String)> {
        let mut all: Vec<(String, String, String)> = self
            .pipelines
            .iter()
            .filter_map(|(name, value)| {
                let t = table(value.clone(), name, &self.file).ok()?;
                let from = t.get("from")?.clone().into_string().ok()?;
                let to = t.get("to")?.clone().into_string().ok()?;
                Some((name.clone(), from, to))
            })
            .collect();
        let rank = |name: &str| {
            self.pipeline_order
                .iter()
                .position(|n| n == name)
                .unwrap_or(usize::MAX)
        };
        all.sort_by(|a, b| rank(&a.0).cmp(&rank(&b.0)).then(a.0.cmp(&b.0)));
        all
    }
}

/// Loads `[lookups.NAME]` tables: inline (`Sales = "CC-100"`) or from a two-column
/// CSV file (`file = "cost-centers.csv"`, header row, key then value); with the files
/// read.
fn load_lookups(
    value: Option<&Value>,
    file: &Path,
    base_dir: &Path,
) -> Result<(Lookups, Vec<PathBuf>)> {
    let mut lookups = Lookups::new();
    let mut files = Vec::new();
    let Some(value) = value else {
        return Ok((lookups, files));
    };
    for (name, table_value) in table(value.clone(), "lookups", file)? {
        let entries = table(table_value, &format!("lookups.{name}"), file)?;
        let mut map = std::collections::HashMap::new();
        if let Some(path) = entries.get("file") {
            let path = path
                .clone()
                .into_string()
                .map_err(|e| anyhow!("{}: [lookups.{name}] `file`: {e}", file.display()))?;
            if entries.len() > 1 {
                bail!(
                    "{}: [lookups.{name}]: a table is either `file = \"…\"` or key = value lines, not both",
                    file.display()
                );
            }
            let full = base_dir.join(&path);
            files.push(full.clone());
            let mut reader = csv::ReaderBuilder::new()
                .flexible(true)
                .from_path(&full)
                .with_context(|| {
                    format!(
                        "{}: [lookups.{name}] `file`: {}",
                        file.display(),
                        full.display()
                    )
                })?;
            for (i, row) in reader.records().enumerate() {
                let row = row.with_context(|| format!("{}: line {}", full.display(), i + 2))?;
                match (row.get(0), row.get(1)) {
                    (Some(k), Some(v)) => {
                        map.insert(k.trim().to_string(), v.trim().to_string());
                    }
                    _ => bail!(
                        "{}: line {}: a lookup row needs a key and a value",
                        full.display(),
                        i + 2
                    ),
                }
            }
        } else {
            for (key, v) in entries {
                let v = v
                    .into_string()
                    .map_err(|e| anyhow!("{}: [lookups.{name}] `{key}`: {e}", file.display()))?;
                map.insert(key, v);
            }
        }
        lookups.insert(name, map);
    }
    Ok((lookups, files))
}

/// Replaces `base_url` in a section's settings.
pub fn with_base_url(settings: &ConnectorSettings, url: &str) -> ConnectorSettings {
    let mut values: BTreeMap<String, Value> = match settings.values.kind.clone() {
        ValueKind::Table(t) => t.into_iter().collect(),
        _ => BTreeMap::new(),
    };
    values.insert("base_url".into(), Value::from(url));
    ConnectorSettings {
        values: Value::new(None, ValueKind::Table(values.into_iter().collect())),
        ..settings.clone()
    }
}

/// The section's `base_url`, when it is a string.
pub fn base_url(settings: &ConnectorSettings) -> Option<String> {
    match &settings.values.kind {
        ValueKind::Table(t) => t.get("base_url").and_then(|v| v.clone().into_string().ok()),
        _ => None,
    }
}
