//! What a `[pipelines.NAME]` section may say: how a pair of source and sink syncs.

use std::collections::BTreeMap;

use contactsync_core::{Contact, Field, KeyRule};
use serde::{Deserialize, Serialize};

/// Which kinds of change a run applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyncMode {
    /// Create and update; never remove.
    Upsert,
    /// Create, update and remove: the sink mirrors the source (the default).
    #[default]
    Mirror,
    /// Only update people the sink already has.
    UpdateOnly,
    /// Only create people the sink does not have.
    CreateOnly,
}

impl SyncMode {
    /// Whether creates are applied.
    pub fn creates(self) -> bool {
        matches!(
            self,
            SyncMode::Upsert | SyncMode::Mirror | SyncMode::CreateOnly
        )
    }
    /// Whether updates are applied.
    pub fn updates(self) -> bool {
        matches!(
            self,
            SyncMode::Upsert | SyncMode::Mirror | SyncMode::UpdateOnly
        )
    }
    /// Whether removals are applied.
    pub fn removals(self) -> bool {
        matches!(self, SyncMode::Mirror)
    }
}

impl std::str::FromStr for SyncMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "upsert" => Ok(SyncMode::Upsert),
            "mirror" => Ok(SyncMode::Mirror),
            "update-only" => Ok(SyncMode::UpdateOnly),
            "create-only" => Ok(SyncMode::CreateOnly),
            other => Err(format!(
                "unknown mode {other:?}: use upsert, mirror, update-only or create-only"
            )),
        }
    }
}

/// What becomes of a person synced before who falls out of the pipeline's `where`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutOfScope {
    /// Removed, like a person who left the source (through the removal guard).
    #[default]
    Remove,
    /// Left as last synced.
    Keep,
}

/// The default share of the synced population one run may remove.
pub const DEFAULT_MAX_REMOVAL_RATIO: f64 = 0.10;

/// The settings of one pipeline. Every field has a default, so a pipeline needs no
/// section at all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineSettings {
    /// Which changes to apply.
    pub mode: SyncMode,
    /// Which field identifies a person.
    pub key: KeyRule,
    /// A run that would remove more than this share of the synced population is
    /// refused unless `--allow-mass-removal` is given.
    pub max_removal_ratio: f64,
    /// Read everything (and so detect removals by absence) every N runs of an
    /// incremental source; `Some(0)` (written `"never"`): only on `--full` or when there
    /// is no cursor; `None`: the source's own default
    /// ([`contactsync_core::SourceCapabilities::full_every`]). A written `0` is refused:
    /// it reads as "every 0 runs".
    #[serde(
        deserialize_with = "full_every_setting",
        serialize_with = "write_full_every"
    )]
    pub full_every: Option<u32>,
    /// Copies between fields after the source's own mapping: `target = "source"`,
    /// e.g. `"attributes.cost_center" = "department"`.
    pub fields: BTreeMap<String, String>,
    /// Fields to clear before syncing (never sent, never compared).
    pub drop: Vec<String>,
    /// Changes per batch, when smaller than the sink's own limit.
    pub batch_size: Option<usize>,
    /// Days every applied change is kept in the state for `contactsync history`;
    /// 0 keeps none.
    pub audit_days: u32,
    /// Whether the audit keeps the fields' values (`false`: only their names).
    pub audit_values: bool,
    /// Field → Jinja template, evaluated on each record after the source's mapping:
    /// `display_name = "{{ first_name }} {{ last_name | upper }}"`.
    pub map: BTreeMap<String, String>,
    /// Field → template, set only when the person is created (never compared or sent
    /// again afterwards).
    pub on_create: BTreeMap<String, String>,
    /// A Jinja expression; records for which it is false are out of scope.
    #[serde(rename = "where")]
    pub scope: Option<String>,
    /// What becomes of a synced person who falls out of scope.
    pub out_of_scope: OutOfScope,
    /// Send every update's status and subscriptions as the source has them, even when
    /// they did not change there: turns platform-side opt-outs and unsubscribes back
    /// on. Off by default, since consent belongs to the person.
    pub resubscribe: bool,
}

/// Reads `full_every`: a number of runs, at least 1 (also as text, from the
/// environment), or `"never"` (kept as `Some(0)`).
fn full_every_setting<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    use serde::de::Error;
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Runs(i64),
        Word(String),
    }
    let refuse_zero = || {
        D::Error::custom(
            "must be at least 1 (the runs from one full read to the next); leave it out for the source's own default, or write \"never\"",
        )
    };
    let runs = match Written::deserialize(d)? {
        Written::Word(w) if w.trim().eq_ignore_ascii_case("never") => return Ok(Some(0)),
        Written::Word(w) => w.trim().parse::<i64>().map_err(|_| {
            D::Error::custom(format!(
                "{w:?} is not a number of runs; write a number from 1, or \"never\""
            ))
        })?,
        Written::Runs(n) => n,
    };
    match runs {
        0 => Err(refuse_zero()),
        n => u32::try_from(n).map(Some).map_err(|_| {
            D::Error::custom(format!(
                "{n} is not a number of runs; write a number from 1, or \"never\""
            ))
        }),
    }
}

/// Writes `full_every` as it is read: a number, or `"never"`.
fn write_full_every<S: serde::Serializer>(value: &Option<u32>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(0) => s.serialize_str("never"),
        Some(n) => s.serialize_u32(*n),
        None => s.serialize_none(),
    }
}

impl PipelineSettings {
    /// Checks every value's range, naming the key at fault and what it may be.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let ratio = self.max_removal_ratio;
        if !(0.0..=1.0).contains(&ratio) || ratio.is_nan() {
            return Err((
                "max_removal_ratio",
                format!(
                    "must be a share between 0 and 1 (0.10 allows removing 10% a run), got {ratio}"
                ),
            ));
        }
        if self.batch_size == Some(0) {
            return Err((
                "batch_size",
                "must be at least 1; leave it out to use the sink's own batch size".into(),
            ));
        }
        Ok(())
    }
}

impl Default for PipelineSettings {
    fn default() -> Self {
        PipelineSettings {
            mode: SyncMode::default(),
            key: KeyRule::default(),
            max_removal_ratio: DEFAULT_MAX_REMOVAL_RATIO,
            full_every: None,
            fields: BTreeMap::new(),
            drop: Vec::new(),
            batch_size: None,
            audit_days: 90,
            audit_values: true,
            map: BTreeMap::new(),
            on_create: BTreeMap::new(),
            scope: None,
            out_of_scope: OutOfScope::default(),
            resubscribe: false,
        }
    }
}

/// The pipeline's field mapping, parsed once per run.
#[derive(Debug, Clone, Default)]
pub(crate) struct FieldMapping {
    copies: Vec<(Field, Field)>,
    drops: Vec<Field>,
}

impl FieldMapping {
    pub(crate) fn new(settings: &PipelineSettings) -> Self {
        FieldMapping {
            copies: settings
                .fields
                .iter()
                .map(|(target, source)| (Field::parse(target), Field::parse(source)))
                .collect(),
            drops: settings.drop.iter().map(|f| Field::parse(f)).collect(),
        }
    }

    /// Whether the mapping leaves every record as it was read.
    pub(crate) fn is_identity(&self) -> bool {
        self.copies.is_empty() && self.drops.is_empty()
    }

    /// Applies the mapping; an error names the target field and why.
    pub(crate) fn apply(&self, contact: &mut Contact) -> Result<(), (String, String)> {
        for (target, source) in &self.copies {
            let value = contact.get(source).unwrap_or_default();
            contact
                .set(target, &value)
                .map_err(|reason| (target.to_string(), reason))?;
        }
        for field in &self.drops {
            // Clearing never fails: a blank value unsets every field but status, which
            // falls back to active.
            let _ = contact.set(field, "");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full_every(json: &str) -> Result<Option<u32>, String> {
        serde_json::from_str::<PipelineSettings>(json)
            .map(|s| s.full_every)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn full_every_is_a_number_of_runs_or_never_and_never_zero() {
        assert_eq!(full_every("{}"), Ok(None));
        assert_eq!(full_every(r#"{"full_every":7}"#), Ok(Some(7)));
        assert_eq!(full_every(r#"{"full_every":"7"}"#), Ok(Some(7)));
        assert_eq!(full_every(r#"{"full_every":"never"}"#), Ok(Some(0)));
        let zero = full_every(r#"{"full_every":0}"#).expect_err("0 is refused");
        assert!(
            zero.contains("leave it out") && zero.contains("never"),
            "{zero}"
        );
        assert!(full_every(r#"{"full_every":-1}"#).is_err());
        let never = PipelineSettings {
            full_every: Some(0),
            ..PipelineSettings::default()
        };
        let written = serde_json::to_string(&never).expect("json");
        assert!(written.contains(r#""full_every":"never""#), "{written}");
    }
}
