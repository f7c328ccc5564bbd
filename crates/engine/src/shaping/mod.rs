//! What a person becomes on the platform: a pipeline's `map` (a Jinja expression per
//! field, evaluated with `minijinja` on each record after the source's own column
//! mapping), its `on_create` values, its `where` scope, and the lookup tables they use.
//!
//! Templates are compiled once, when the pipeline is loaded: a syntax error is a config
//! error naming the pipeline, the field and the position. Every expression sees the
//! whole record as read (`first_name`, `attributes.cost_center`, `subscriptions`, …),
//! and can call `lookup('table', key)` (or `lookup('table', key, 'default')`). The
//! environment offers no way to read a file, the environment, a secret or the clock: a
//! record as read and the pipeline's settings decide what it becomes.

mod direct;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use direct::{Condition, DirectTemplate};

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
    /// The `map` (and `on_create`) templates joined into one, so that a record costs one
    /// render, not one a field: their outputs are split at [`SEPARATOR`].
    map_all: Option<String>,
    on_create_all: Option<String>,
    /// `where` and `map` in one template (`0`, or `1` and the map's outputs), so that
    /// a record in scope costs one render in all.
    scope_and_map: Option<String>,
    /// The same templates evaluated on the record itself, when they are all of the
    /// subset [`direct`] knows (the common case); minijinja renders the rest.
    direct: Direct,
    lookups: Arc<Lookups>,
}

/// A pipeline's templates as [`direct`] evaluates them: each part only when every one
/// of its templates is of the subset.
#[derive(Default)]
struct Direct {
    map: Option<Vec<DirectTemplate>>,
    on_create: Option<Vec<DirectTemplate>>,
    /// The `where`, when there is one and it is of the subset.
    scope: Option<Condition>,
}

impl Direct {
    fn compile(
        map: &BTreeMap<String, String>,
        on_create: &BTreeMap<String, String>,
        scope: Option<&str>,
    ) -> Direct {
        let all = |templates: &BTreeMap<String, String>| {
            templates
                .values()
                .map(|source| DirectTemplate::parse(source))
                .collect::<Option<Vec<_>>>()
        };
        Direct {
            map: all(map),
            on_create: all(on_create),
            scope: scope.and_then(Condition::parse),
        }
    }
}

/// The value `lookup(table, key, default)` gives, or why there is none. Templates call
/// it through minijinja and through [`direct`], so both say the same.
pub(crate) fn lookup_value(
    tables: &Lookups,
    table: &str,
    key: &str,
    default: Option<&str>,
) -> Result<String, String> {
    let found = tables
        .get(table)
        .ok_or_else(|| format!("no lookup table {table:?} (define [lookups.{table}])"))?;
    match (found.get(key), default) {
        (Some(value), _) => Ok(value.clone()),
        (None, Some(default)) => Ok(default.to_string()),
        (None, None) => Err(format!(
            "{key:?} is not in lookup table {table:?}, and no default was given"
        )),
    }
}

/// What `where` and `map` make of a record.
pub(crate) enum Shaped {
    /// In scope, and mapped.
    In(Contact),
    /// Out of scope (not mapped).
    Out(Contact),
    /// `where` failed to evaluate.
    ScopeError(Contact, String),
    /// A `map` template failed, or a value it gave is invalid.
    MapError(Box<FieldFailure>),
}

/// Between the outputs of the joined templates: a control character no value has (one
/// that does makes the record fall back to one render a field).
const SEPARATOR: char = '\u{1f}';

/// The most steps (minijinja's fuel: about one per instruction) one render may take: a
/// loop over a loop must not hold a run for ever.
pub const TEMPLATE_FUEL: u64 = 100_000;

/// The most bytes one template may render for one field; a joined render of several
/// fields may render this much a field.
pub const MAX_RENDERED_BYTES: usize = 64 * 1024;

/// Globals of minijinja that a template has no use for here, and that let it build
/// work or text out of nothing (`range`, `dict`, `namespace`) or read the engine's
/// internals into a field (`debug`): the documented language is fields, filters, tests
/// and `lookup`.
const REMOVED_GLOBALS: [&str; 4] = ["range", "dict", "namespace", "debug"];

/// Renders `template` on `view`, at most `limit` bytes: past that the render fails
/// (`ErrorKind::WriteFailure`, which [`position`] words).
fn render_bounded(
    template: &minijinja::Template<'_, '_>,
    view: &Value,
    limit: usize,
) -> Result<String, minijinja::Error> {
    struct Bounded {
        out: Vec<u8>,
        limit: usize,
    }
    impl std::io::Write for Bounded {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.out.len() + buf.len() > self.limit {
                return Err(std::io::Error::other("rendered text too long"));
            }
            self.out.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut out = Bounded {
        out: Vec::new(),
        limit,
    };
    template.render_captured_to(view, &mut out)?;
    String::from_utf8(out.out)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("not UTF-8: {e}")))
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
            name => match direct::text_field(name) {
                // Unset is undefined, so that `default(…)` applies.
                Some(field) => contact.get_str(&field).map(Value::from),
                None => {
                    let field = Field::parse(name);
                    field
                        .is_canonical()
                        .then(|| contact.get(&field))
                        .flatten()
                        .map(Value::from)
                }
            },
        }
    }
}

/// Lends `contact` to templates as their context for `work`, and hands it back
/// without copying it (the view holds the only other reference, dropped first).
fn with_view<R>(contact: Contact, work: impl FnOnce(&Value) -> R) -> (Contact, R) {
    let shared = Arc::new(contact);
    let view = Value::from_object(RecordView(shared.clone()));
    let result = work(&view);
    drop(view);
    let contact = Arc::try_unwrap(shared).unwrap_or_else(|shared| (*shared).clone());
    (contact, result)
}

/// Sets each field to its rendered value, in order; the first invalid value names its
/// field.
fn set_all<'v>(
    mut contact: Contact,
    templates: &[(Field, String)],
    values: impl Iterator<Item = &'v str>,
) -> Result<Contact, Box<FieldFailure>> {
    for ((field, _), value) in templates.iter().zip(values) {
        if let Err(reason) = contact.set(field, value) {
            return Err(Box::new(FieldFailure {
                contact,
                field: field.to_string(),
                reason,
            }));
        }
    }
    Ok(contact)
}

fn position(error: &minijinja::Error) -> String {
    let mut text = error.detail().unwrap_or("").to_string();
    if text.is_empty() {
        text = error.kind().to_string();
    }
    match error.kind() {
        ErrorKind::OutOfFuel => {
            text = format!(
                "the template takes more than {TEMPLATE_FUEL} steps for this record; it is rejected rather than left to run"
            )
        }
        ErrorKind::WriteFailure => {
            text = format!(
                "the template renders more than {MAX_RENDERED_BYTES} bytes for this record; it is rejected rather than sent"
            )
        }
        _ => {}
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
        env.set_fuel(Some(TEMPLATE_FUEL));
        for name in REMOVED_GLOBALS {
            env.remove_global(name);
        }
        // Values are data, not HTML: a template named after a field such as
        // `attributes.page.html` must not escape what it renders.
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        let direct = Direct::compile(map, on_create, scope);
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
                lookup_value(&tables, &table, &key, default.as_deref())
                    .map_err(|message| minijinja::Error::new(ErrorKind::InvalidOperation, message))
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
        let map_sources: Vec<String> = map.values().cloned().collect();
        let map_body = map_sources.clone();
        let expression = scope.map(str::to_string);
        let on_create_sources: Vec<String> = on_create.values().cloned().collect();
        let map = add("map", map)?;
        let on_create = add("on_create", on_create)?;
        // Each part compiled alone above, so the joined one compiles too.
        let mut join = |name: &str, sources: Vec<String>| -> Result<Option<String>, ShapingError> {
            if sources.len() < 2 {
                return Ok(None);
            }
            let joined = sources.join(&SEPARATOR.to_string());
            env.add_template_owned(name.to_string(), joined)
                .map_err(|e| error(name.to_string(), e))?;
            Ok(Some(name.to_string()))
        };
        let map_all = join("map (all fields)", map_sources)?;
        let on_create_all = join("on_create (all fields)", on_create_sources)?;
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
        let scope_and_map = match (scope.as_deref(), map.is_empty()) {
            (Some(_), false) => {
                let expression = expression.unwrap_or_default();
                let body = map_body.join(&SEPARATOR.to_string());
                let name = "where and map".to_string();
                env.add_template_owned(
                    name.clone(),
                    format!("{{% if {expression} %}}1{SEPARATOR}{body}{{% else %}}0{{% endif %}}"),
                )
                .map_err(|e| error(name.clone(), e))?;
                Some(name)
            }
            _ => None,
        };
        Ok(RecordShaping {
            env,
            map,
            on_create,
            scope,
            map_all,
            on_create_all,
            scope_and_map,
            direct,
            lookups,
        })
    }

    /// The lookup tables the templates read.
    pub(crate) fn lookups(&self) -> &Lookups {
        &self.lookups
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
                let value = render_bounded(&template, view, MAX_RENDERED_BYTES)
                    .map_err(|e| (field.to_string(), position(&e)))?;
                Ok((field.clone(), value))
            })
            .collect()
    }

    /// One render of the joined templates, split back into one value a field; `None`
    /// when that does not work out (an error, whose field the single renders then
    /// name, or a value holding the separator).
    fn render_joined(
        &self,
        templates: &[(Field, String)],
        joined: Option<&String>,
        view: &Value,
    ) -> Option<Vec<(Field, String)>> {
        let template = self.env.get_template(joined?).ok()?;
        let out = render_bounded(&template, view, MAX_RENDERED_BYTES * templates.len()).ok()?;
        let parts: Vec<&str> = out.split(SEPARATOR).collect();
        (parts.len() == templates.len()).then(|| {
            templates
                .iter()
                .zip(parts)
                .map(|((field, _), value)| (field.clone(), value.to_string()))
                .collect()
        })
    }

    /// What `direct` renders of a record, one value a template; `None` when minijinja
    /// must render it.
    fn render_direct(
        &self,
        direct: Option<&[DirectTemplate]>,
        contact: &Contact,
    ) -> Option<Vec<String>> {
        direct?
            .iter()
            .map(|template| template.render(contact, &self.lookups))
            .collect()
    }

    /// Applies `templates`, each evaluated on the record as it was before any of them.
    fn apply(
        &self,
        templates: &[(Field, String)],
        joined: Option<&String>,
        direct: Option<&[DirectTemplate]>,
        contact: Contact,
    ) -> Result<Contact, Box<FieldFailure>> {
        if templates.is_empty() {
            return Ok(contact);
        }
        if let Some(values) = self.render_direct(direct, &contact) {
            return set_all(contact, templates, values.iter().map(String::as_str));
        }
        let (contact, rendered) = with_view(contact, |view| {
            match self.render_joined(templates, joined, view) {
                Some(values) => Ok(values),
                None => self.render(templates, view),
            }
        });
        match rendered {
            Ok(values) => set_all(contact, templates, values.iter().map(|(_, v)| v.as_str())),
            Err((field, reason)) => Err(Box::new(FieldFailure {
                contact,
                field,
                reason,
            })),
        }
    }

    /// `where`, then `map` for a record in scope: one render when both are set; the
    /// separate evaluations (which name what failed) when that render does not work out.
    pub(crate) fn scope_and_map(&self, contact: Contact) -> Shaped {
        let direct_scope = match (&self.scope, &self.direct.scope) {
            (None, _) => Some(true),
            (Some(_), Some(condition)) => condition.eval(&contact, &self.lookups),
            (Some(_), None) => None,
        };
        match direct_scope {
            Some(false) => return Shaped::Out(contact),
            Some(true) => {
                if let Some(values) = self.render_direct(self.direct.map.as_deref(), &contact) {
                    return match set_all(contact, &self.map, values.iter().map(String::as_str)) {
                        Ok(contact) => Shaped::In(contact),
                        Err(failure) => Shaped::MapError(failure),
                    };
                }
            }
            None => {}
        }
        if let Some(name) = &self.scope_and_map {
            let (contact, out) = with_view(contact, |view| {
                self.env.get_template(name).ok().and_then(|t| {
                    render_bounded(&t, view, MAX_RENDERED_BYTES * (self.map.len() + 1)).ok()
                })
            });
            match out.as_deref() {
                Some("0") => return Shaped::Out(contact),
                Some(out) => {
                    let parts: Vec<&str> = out.split(SEPARATOR).collect();
                    if parts.len() == self.map.len() + 1 && parts[0] == "1" {
                        return match set_all(contact, &self.map, parts[1..].iter().copied()) {
                            Ok(contact) => Shaped::In(contact),
                            Err(failure) => Shaped::MapError(failure),
                        };
                    }
                    return self.scope_then_map(contact);
                }
                None => return self.scope_then_map(contact),
            }
        }
        self.scope_then_map(contact)
    }

    fn scope_then_map(&self, contact: Contact) -> Shaped {
        let (contact, verdict) = self.scope(contact);
        match verdict {
            Err(reason) => Shaped::ScopeError(contact, reason),
            Ok(Scope::Out) => Shaped::Out(contact),
            Ok(Scope::In) => match self.map(contact) {
                Ok(contact) => Shaped::In(contact),
                Err(failure) => Shaped::MapError(failure),
            },
        }
    }

    /// The `map`: the record as the pipeline sends it. An error names the field.
    pub(crate) fn map(&self, contact: Contact) -> Result<Contact, Box<FieldFailure>> {
        self.apply(
            &self.map,
            self.map_all.as_ref(),
            self.direct.map.as_deref(),
            contact,
        )
    }

    /// The `on_create` values, added to a person about to be created.
    pub(crate) fn on_create(&self, contact: Contact) -> Result<Contact, Box<FieldFailure>> {
        self.apply(
            &self.on_create,
            self.on_create_all.as_ref(),
            self.direct.on_create.as_deref(),
            contact,
        )
    }

    /// Whether the record is in the pipeline's `where` scope; hands the record back.
    pub(crate) fn scope(&self, contact: Contact) -> (Contact, Result<Scope, String>) {
        let Some(name) = &self.scope else {
            return (contact, Ok(Scope::In));
        };
        with_view(contact, |view| {
            self.env
                .get_template(name)
                .map_err(|e| e.to_string())
                .and_then(|t| {
                    render_bounded(&t, view, MAX_RENDERED_BYTES).map_err(|e| position(&e))
                })
                .map(|out| if out == "1" { Scope::In } else { Scope::Out })
        })
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
    fn a_template_that_runs_long_or_renders_much_rejects_its_record_naming_the_field() {
        // Loops over loops over the record's own text: out of fuel, not for ever.
        let long = "{% for a in email %}{% for b in email %}{% for c in email %}{% for d in email %}x{% endfor %}{% endfor %}{% endfor %}{% endfor %}";
        // Text doubled into megabytes: over the bound, not sent.
        let much = "{% set s = email ~ email ~ email ~ email %}{% set s = s ~ s ~ s ~ s %}{% set s = s ~ s ~ s ~ s %}{% set s = s ~ s ~ s ~ s %}{% set s = s ~ s ~ s ~ s %}{% set s = s ~ s ~ s ~ s %}{% set s = s ~ s ~ s ~ s %}{{ s }}";
        for (template, words) in [(long, "steps"), (much, "bytes")] {
            let s = shaping(
                &[
                    ("first_name", "{{ first_name }}"),
                    ("attributes.x", template),
                ],
                None,
            )
            .unwrap();
            let failure = s.map(person()).unwrap_err();
            assert_eq!(failure.field, "attributes.x");
            assert!(failure.reason.contains(words), "{}", failure.reason);
        }
    }

    #[test]
    fn the_functions_beyond_lookup_are_gone() {
        for template in [
            "{{ range(3) }}",
            "{{ dict(a=1) }}",
            "{% set ns = namespace(a=1) %}{{ ns.a }}",
            "{{ debug() }}",
        ] {
            let rendered = shaping(&[("attributes.x", template)], None)
                .map_err(|e| e.to_string())
                .and_then(|s| {
                    s.map(person())
                        .map(|c| c.attributes.get("x").cloned().unwrap_or_default())
                        .map_err(|f| f.reason)
                });
            assert!(rendered.is_err(), "{template}: {rendered:?}");
        }
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
        // Several templates render as one; an error still names its own field.
        let s = shaping(
            &[
                ("attributes.cc", "{{ lookup('cost_centers', 'Ops') }}"),
                ("first_name", "{{ first_name | upper }}"),
            ],
            None,
        )
        .unwrap();
        assert_eq!(s.map(person()).unwrap_err().field, "attributes.cc");
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

    /// What a record became, in a form two shapings can be compared by.
    fn outcome(shaped: Shaped) -> String {
        match shaped {
            Shaped::In(c) => format!("in {c:?}"),
            Shaped::Out(c) => format!("out {c:?}"),
            Shaped::ScopeError(c, reason) => format!("scope error {reason} {c:?}"),
            Shaped::MapError(f) => format!("map error {} {} {:?}", f.field, f.reason, f.contact),
        }
    }

    /// Records with every kind of value a filter treats differently: unset, blank,
    /// spaces, punctuation, case that changes length (ß, İ), title-case letters (ǅ).
    fn generated_records() -> Vec<Contact> {
        let values = [
            None,
            Some(""),
            Some("  "),
            Some(" Ann "),
            Some("ann lee"),
            Some("O'NEIL-smith"),
            Some("élodie DUPONT"),
            Some("straße"),
            Some("İstanbul"),
            Some("ǅungla x"),
            Some("Sales"),
            Some("Contractors"),
            Some("hello,world!again"),
            Some("a\tb"),
        ];
        let fields = [
            "first_name",
            "last_name",
            "company",
            "department",
            "job_title",
            "attributes.site",
        ];
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        (0..400)
            .map(|i| {
                let mut c = Contact::default();
                c.set(&Field::Email, &format!("p{i}@Example.COM")).unwrap();
                for field in fields {
                    if let Some(value) = values[(next() % values.len() as u64) as usize] {
                        c.set(&Field::parse(field), value).unwrap();
                    }
                }
                if next() % 5 == 0 {
                    c.set(&Field::Status, "inactive").unwrap();
                }
                c
            })
            .collect()
    }

    #[test]
    fn the_direct_path_renders_what_minijinja_renders() {
        let templates = [
            "{{ first_name }} {{ last_name | upper }}",
            "{{ email | lower | trim }}",
            "{{ company | default('Acme') }}",
            "{{ lookup('cost_centers', department, 'CC-000') }}",
            "{{ lookup('cost_centers', department) }}",
            "{{ lookup('cost_centers', attributes.site, 'none') | lower }}",
            "{{ job_title | title }}",
            "{{ attributes.site | capitalize }}",
            "{{ department | d('none') | upper }}",
            "{{ company | upper | default('A') }}",
            "x {{last_name|trim}} { y }",
            "{{ 'ann lee' | title }}{{ status }}",
            "{{ attributes.missing }}-{{ attributes.site|default('s') }}",
        ];
        let scopes = [
            None,
            Some("department != 'Contractors'"),
            Some("department == 'Sales' or not (company == \"Acme\")"),
            Some("first_name and last_name"),
            Some("not department"),
            Some("department | lower == 'sales' and status == 'active'"),
        ];
        let records = generated_records();
        for scope in scopes {
            for template in templates {
                let map = [("job_title", template), ("attributes.out", template)];
                let direct = shaping(&map, scope).unwrap();
                assert!(direct.direct.map.is_some(), "{template} is of the subset");
                if let Some(scope) = scope {
                    assert!(direct.direct.scope.is_some(), "{scope} is of the subset");
                }
                let mut minijinja_only = shaping(&map, scope).unwrap();
                minijinja_only.direct = Direct::default();
                for record in &records {
                    assert_eq!(
                        outcome(direct.scope_and_map(record.clone())),
                        outcome(minijinja_only.scope_and_map(record.clone())),
                        "template {template:?}, where {scope:?}"
                    );
                    assert_eq!(
                        direct.map(record.clone()).map_err(|f| (f.field, f.reason)),
                        minijinja_only
                            .map(record.clone())
                            .map_err(|f| (f.field, f.reason)),
                        "template {template:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_field_named_like_an_html_file_is_not_escaped() {
        let c = mapped(&[("attributes.page.html", "{{ first_name ~ ' <b>&' }}")]);
        assert_eq!(c.attributes["page.html"], "Ann <b>&");
    }

    #[test]
    fn templates_outside_the_subset_are_left_to_minijinja() {
        for template in [
            "{{ first_name[0] }}",
            "{% if department %}x{% endif %}",
            "{{- first_name }}",
            "{{ first_name -}}",
            "{{ first_name }}\n",
            "{# note #}{{ first_name }}",
            "{{ first_name | replace('a', 'b') }}",
            "{{ first_name | trim('x') }}",
            "{{ subscriptions }}",
            "{{ 'a\\'b' }}",
            "{{ first_name ~ last_name }}",
            "{{ email.split('@') }}",
            "{{ range(3) }}",
            "{{ first_name",
        ] {
            assert_eq!(direct::DirectTemplate::parse(template), None, "{template}");
        }
        for scope in [
            "department in ['a']",
            "x is defined",
            "department == 1",
            "(a) == 'b'",
        ] {
            assert!(direct::Condition::parse(scope).is_none(), "{scope}");
        }
    }
}
