//! What a person becomes on the platform: a pipeline's `map` (a Jinja expression per
//! field, evaluated with `minijinja` on each record after the source's own column
//! mapping), its `on_create` values, its `where` scope, and the lookup tables they use.
//!
//! Templates are compiled once, when the pipeline is loaded: a syntax error is a config
//! error naming the pipeline, the field and the position. Every expression sees the
//! whole record as read (`first_name`, `attributes.cost_center`, `subscriptions`, …),
//! and can call `lookup('table', key)` (or `lookup('table', key, 'default')`). The
//! environment offers no way to read a file, the environment or a secret.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use contactsync_core::{Contact, Field};
use minijinja::value::{Object, Value};
use minijinja::{Environment, ErrorKind, UndefinedBehavior};

/// Lookup tables by name: key → value.
pub type Lookups = HashMap<String, HashMap<String, String>>;

/// A template that does not compile, or a lookup a template names that does not exist.
#[derive(Debug, thiserror::Error)]
#[error("[pipelines.{pipeline}] {what}: {message}")]
pub struct ShapingError {
    /// The pipeline section.
    pub pipeline: String,
    /// Where: `map."email"`, `on_create."attributes.origin"`, `where`.
    pub what: String,
    /// What is wrong, with the position.
    pub message: String,
}

/// A record a template could not shape: the record, the field and why.
#[derive(Debug)]
pub(crate) struct FieldFailure {
    pub(crate) contact: Contact,
    pub(crate) field: String,
    pub(crate) reason: String,
}

/// A record's `where` said no.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    In,
    Out,
}

/// A pipeline's compiled expressions.
pub struct RecordShaping {
    env: Environment<'static>,
    map: Vec<(Field, String)>,
    on_create: Vec<(Field, String)>,
    scope: Option<String>,
}

impl std::fmt::Debug for RecordShaping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordShaping")
            .field(
                "map",
                &self
                    .map
                    .iter()
                    .map(|(f, _)| f.to_string())
                    .collect::<Vec<_>>(),
            )
            .field(
                "on_create",
                &self
                    .on_create
                    .iter()
                    .map(|(f, _)| f.to_string())
                    .collect::<Vec<_>>(),
            )
            .field("where", &self.scope.is_some())
            .finish()
    }
}

/// The record as templates see it.
#[derive(Debug)]
struct RecordView(Arc<Contact>);

impl Object for RecordView {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let name = key.as_str()?;
        let contact = &self.0;
        match name {
            "attributes" => Some(Value::from_iter(
                contact
                    .attributes
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::from(v.as_str()))),
            )),
            "subscriptions" => Some(Value::from_iter(
                contact
                    .subscriptions
                    .iter()
                    .map(|s| Value::from(s.as_str())),
            )),
            _ => {
                let field = Field::parse(name);
                // Unset is undefined, so that `default(…)` applies.
                field
                    .is_canonical()
                    .then(|| contact.get(&field))
                    .flatten()
                    .map(Value::from)
            }
        }
    }
}

fn position(error: &minijinja::Error) -> String {
    let mut text = error.detail().unwrap_or("").to_string();
    if text.is_empty() {
        text = error.kind().to_string();
    }
    match error.line() {
        Some(line) => match error.range() {
            Some(range) => format!("{text} (line {line}, at byte {})", range.start),
            None => format!("{text} (line {line})"),
        },
        None => text,
    }
}

impl RecordShaping {
    /// Compiles a pipeline's `map`, `on_create` and `where` against `lookups`.
    pub fn compile(
        pipeline: &str,
        map: &BTreeMap<String, String>,
        on_create: &BTreeMap<String, String>,
        scope: Option<&str>,
        lookups: Arc<Lookups>,
    ) -> Result<Self, ShapingError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        // No loader, no includes: a template cannot reach a file.
        let tables = lookups.clone();
        env.add_function(
            "lookup",
            move |table: String,
                  key: Value,
                  default: Option<String>|
                  -> Result<String, minijinja::Error> {
                let key = key.as_str().map(str::to_string).unwrap_or_else(|| {
                    if key.is_undefined() || key.is_none() {
                        String::new()
                    } else {
                        key.to_string()
                    }
                });
                let found = tables.get(&table).ok_or_else(|| {
                    minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        format!("no lookup table {table:?} (define [lookups.{table}])"),
                    )
                })?;
                match (found.get(&key), default) {
                    (Some(value), _) => Ok(value.clone()),
                    (None, Some(default)) => Ok(default),
                    (None, None) => Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        format!(
                            "{key:?} is not in lookup table {table:?}, and no default was given"
                        ),
                    )),
                }
            },
        );
        let error = |what: String, e: minijinja::Error| ShapingError {
            pipeline: pipeline.to_string(),
            what,
            message: position(&e),
        };
        let mut add = |section: &str, templates: &BTreeMap<String, String>| {
            let mut out = Vec::new();
            for (target, source) in templates {
                let name = format!("{section}.{target}");
                env.add_template_owned(name.clone(), source.clone())
                    .map_err(|e| error(format!("{section}.{target:?}"), e))?;
                out.push((Field::parse(target), name));
            }
            Ok::<_, ShapingError>(out)
        };
        let map = add("map", map)?;
        let on_create = add("on_create", on_create)?;
        let scope = match scope {
            Some(expression) => {
                let name = "where".to_string();
                env.add_template_owned(
                    name.clone(),
                    format!("{{% if {expression} %}}1{{% endif %}}"),
                )
                .map_err(|e| error("where".into(), e))?;
                Some(name)
            }
            None => None,
        };
        Ok(RecordShaping {
            env,
            map,
            on_create,
            scope,
        })
    }

    /// Whether there is anything to do.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty() && self.on_create.is_empty() && self.scope.is_none()
    }

    /// The fields `on_create` sets: the state's content hash leaves them out, so that a
    /// value set on create is never compared, nor sent again.
    pub(crate) fn on_create_fields(&self) -> impl Iterator<Item = &Field> {
        self.on_create.iter().map(|(f, _)| f)
    }

    fn render(
        &self,
        templates: &[(Field, String)],
        view: &Value,
    ) -> Result<Vec<(Field, String)>, (String, String)> {
        templates
            .iter()
            .map(|(field, name)| {
                let template = self
                    .env
                    .get_template(name)
                    .map_err(|e| (field.to_string(), e.to_string()))?;
                let value = template
                    .render(view)
                    .map_err(|e| (field.to_string(), position(&e)))?;
                Ok((field.clone(), value))
            })
            .collect()
    }

    /// Applies `templates`, each evaluated on the record as it was before any of them.
    fn apply(
        &self,
        templates: &[(Field, String)],
        contact: Contact,
    ) -> Result<Contact, Box<FieldFailure>> {
        if templates.is_empty() {
            return Ok(contact);
        }
        let shared = Arc::new(contact);
        let view = Value::from_object(RecordView(shared.clone()));
        let rendered = self.render(templates, &view);
        drop(view);
        let mut contact = Arc::try_unwrap(shared).unwrap_or_else(|shared| (*shared).clone());
        let values = match rendered {
            Ok(values) => values,
            Err((field, reason)) => {
                return Err(Box::new(FieldFailure {
                    contact,
                    field,
                    reason,
                }))
            }
        };
        for (field, value) in values {
            if let Err(reason) = contact.set(&field, &value) {
                return Err(Box::new(FieldFailure {
                    contact,
                    field: field.to_string(),
                    reason,
                }));
            }
        }
        Ok(contact)
    }

    /// The `map`: the record as the pipeline sends it. An error names the field.
    pub(crate) fn map(&self, contact: Contact) -> Result<Contact, Box<FieldFailure>> {
        self.apply(&self.map, contact)
    }

    /// The `on_create` values, added to a person about to be created.
    pub(crate) fn on_create(&self, contact: Contact) -> Result<Contact, Box<FieldFailure>> {
        self.apply(&self.on_create, contact)
    }

    /// Whether the record is in the pipeline's `where` scope; hands the record back.
    pub(crate) fn scope(&self, contact: Contact) -> (Contact, Result<Scope, String>) {
        let Some(name) = &self.scope else {
            return (contact, Ok(Scope::In));
        };
        let shared = Arc::new(contact);
        let view = Value::from_object(RecordView(shared.clone()));
        let verdict = self
            .env
            .get_template(name)
            .map_err(|e| e.to_string())
            .and_then(|t| t.render(&view).map_err(|e| position(&e)))
            .map(|out| if out == "1" { Scope::In } else { Scope::Out });
        drop(view);
        let contact = Arc::try_unwrap(shared).unwrap_or_else(|shared| (*shared).clone());
        (contact, verdict)
    }

    /// What `contact` hashes to for the diff: without the fields `on_create` owns.
    pub(crate) fn diff_hash(&self, contact: &Contact) -> u64 {
        if self.on_create.is_empty() {
            return contact.content_hash();
        }
        let mut bare = contact.clone();
        for field in self.on_create_fields() {
            let _ = bare.set(field, "");
        }
        bare.content_hash()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn person() -> Contact {
        let mut c = Contact::default();
        for (f, v) in [
            ("email", " Ann.Lee@Example.COM "),
            ("first_name", "Ann"),
            ("last_name", "Lee"),
            ("department", "Sales"),
            ("attributes.site", "Gent"),
        ] {
            c.set(&Field::parse(f), v).unwrap();
        }
        c
    }

    fn shaping(map: &[(&str, &str)], scope: Option<&str>) -> Result<RecordShaping, ShapingError> {
        let mut lookups = Lookups::new();
        lookups.insert(
            "cost_centers".into(),
            [("Sales".to_string(), "CC-100".to_string())].into(),
        );
        RecordShaping::compile(
            "nightly",
            &map.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            &BTreeMap::new(),
            scope,
            Arc::new(lookups),
        )
    }

    fn mapped(map: &[(&str, &str)]) -> Contact {
        shaping(map, None)
            .unwrap()
            .map(person())
            .map_err(|f| format!("{}: {}", f.field, f.reason))
            .unwrap()
    }

    #[test]
    fn the_filters_and_functions_the_docs_name() {
        let c = mapped(&[
            ("display_name", "{{ first_name }} {{ last_name | upper }}"),
            ("email", "{{ email | lower | trim }}"),
            ("company", "{{ company | default('Acme') }}"),
            (
                "attributes.cost_center",
                "{{ lookup('cost_centers', department) }}",
            ),
            ("job_title", "{{ lookup('cost_centers', 'Nope', 'none') }}"),
            ("language", "{{ attributes.site | replace('Gent', 'nl') }}"),
            (
                "attributes.initials",
                "{{ first_name[0] }}{{ last_name[0] }}",
            ),
            (
                "attributes.kind",
                "{% if department == 'Sales' %}seller{% else %}other{% endif %}",
            ),
            ("attributes.title", "{{ 'ann lee' | title }}"),
        ]);
        assert_eq!(c.display_name.as_deref(), Some("Ann LEE"));
        assert_eq!(c.email.as_deref(), Some("ann.lee@example.com"));
        assert_eq!(c.company.as_deref(), Some("Acme"));
        assert_eq!(c.attributes["cost_center"], "CC-100");
        assert_eq!(c.job_title.as_deref(), Some("none"));
        assert_eq!(c.language.as_deref(), Some("nl"));
        assert_eq!(c.attributes["initials"], "AL");
        assert_eq!(c.attributes["kind"], "seller");
        assert_eq!(c.attributes["title"], "Ann Lee");
    }

    #[test]
    fn an_unknown_lookup_key_or_an_invalid_value_names_the_field() {
        let s = shaping(
            &[("attributes.cc", "{{ lookup('cost_centers', 'Ops') }}")],
            None,
        )
        .unwrap();
        let failure = s.map(person()).unwrap_err();
        assert_eq!(failure.field, "attributes.cc");
        assert!(
            failure.reason.contains("not in lookup table"),
            "{}",
            failure.reason
        );
        let s = shaping(&[("status", "{{ 'maybe' }}")], None).unwrap();
        let failure = s.map(person()).unwrap_err();
        assert_eq!(failure.field, "status");
        assert!(
            failure.reason.contains("unknown status"),
            "{}",
            failure.reason
        );
    }

    #[test]
    fn a_syntax_error_names_the_pipeline_the_field_and_the_position() {
        let err = shaping(&[("email", "{{ email | lower ")], None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("[pipelines.nightly] map.\"email\""), "{err}");
        assert!(err.contains("line 1"), "{err}");
        let err = shaping(&[], Some("department ==")).unwrap_err().to_string();
        assert!(err.contains("where"), "{err}");
    }

    #[test]
    fn scope_and_diff_hash() {
        let s = shaping(
            &[],
            Some("department != 'Contractors' and status == 'active'"),
        )
        .unwrap();
        assert_eq!(s.scope(person()).1.unwrap(), Scope::In);
        let mut c = person();
        c.set(&Field::Department, "Contractors").unwrap();
        assert_eq!(s.scope(c).1.unwrap(), Scope::Out);
        let s = RecordShaping::compile(
            "p",
            &BTreeMap::new(),
            &[("attributes.origin".to_string(), "hr-sync".to_string())].into(),
            None,
            Arc::default(),
        )
        .unwrap();
        let created = s.on_create(person()).map_err(|_| ()).unwrap();
        assert_eq!(created.attributes["origin"], "hr-sync");
        assert_eq!(s.diff_hash(&created), person().content_hash());
    }
}
