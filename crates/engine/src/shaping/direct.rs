//! The templates most maps are made of, evaluated on the record itself.
//!
//! A nightly run renders every template of the `map` and the `where` on every record
//! read: with minijinja that is a fresh `Value` for every field a template reads and a
//! VM run a record, about as much work as the rest of the run. Most templates are a
//! field, a filter or two and some text (`{{ email | lower | trim }}`,
//! `{{ first_name }} {{ last_name | upper }}`, `{{ lookup('t', department, 'x') }}`), and
//! most scopes compare fields with text (`department != 'Contractors' and …`). Those
//! are parsed here, once, and evaluated on borrowed `&str`s.
//!
//! Nothing here defines what a template means: minijinja does. The subset is
//! deliberately narrow (the filters below, `lookup`, `==`, `!=`, `and`, `or`, `not`,
//! text), anything else is left to minijinja at compile time, and whenever a record
//! takes this path somewhere its meaning could differ (a field that is not set
//! reaching a filter or a comparison, a lookup that fails), evaluation answers `None`
//! and the caller renders that record with minijinja, which also words the errors.
//! A test checks both give the same output on generated records.

use std::borrow::Cow;

use contactsync_core::{Contact, Field};

use super::{lookup_value, Lookups};

/// The fields a template reads as text: the names the record view answers with a
/// text value (see `RecordView`), and `attributes.NAME`.
pub(super) fn text_field(name: &str) -> Option<Field> {
    let field = match name {
        "external_id" => Field::ExternalId,
        "email" => Field::Email,
        "first_name" => Field::FirstName,
        "last_name" => Field::LastName,
        "display_name" => Field::DisplayName,
        "phone" => Field::Phone,
        "mobile" => Field::Mobile,
        "company" => Field::Company,
        "department" => Field::Department,
        "job_title" => Field::JobTitle,
        "language" => Field::Language,
        "status" => Field::Status,
        _ => return None,
    };
    Some(field)
}

/// What a pipe starts from.
#[derive(Debug, Clone, PartialEq)]
enum Source {
    /// A field held as text ([`Contact::get_str`]).
    Var(Field),
    Text(String),
    /// `lookup('table', key)` or `lookup('table', key, 'default')`.
    Lookup {
        table: String,
        key: Box<Source>,
        default: Option<String>,
    },
}

/// The filters of the subset, as minijinja defines them (its `filters.rs`).
#[derive(Debug, Clone, PartialEq)]
enum Filter {
    Lower,
    Upper,
    Trim,
    Title,
    Capitalize,
    /// `default('text')`: the text when the value is undefined.
    Default(String),
}

impl Filter {
    fn apply(&self, value: &str) -> String {
        match self {
            Filter::Lower => value.to_lowercase(),
            Filter::Upper => value.to_uppercase(),
            Filter::Trim => value.trim().to_string(),
            Filter::Title => {
                let mut out = String::with_capacity(value.len());
                let mut capitalize = true;
                for c in value.chars() {
                    if c.is_ascii_punctuation() || c.is_whitespace() {
                        out.push(c);
                        capitalize = true;
                    } else if capitalize {
                        out.extend(c.to_uppercase());
                        capitalize = false;
                    } else {
                        out.extend(c.to_lowercase());
                    }
                }
                out
            }
            Filter::Capitalize => {
                let mut chars = value.chars();
                match chars.next() {
                    None => String::new(),
                    Some(first) => {
                        first.to_uppercase().collect::<String>() + &chars.as_str().to_lowercase()
                    }
                }
            }
            Filter::Default(_) => value.to_string(),
        }
    }
}

/// A value and its filters: `email | lower | trim`.
#[derive(Debug, Clone, PartialEq)]
struct Pipe {
    source: Source,
    filters: Vec<Filter>,
}

/// The outcome of one step: `Ok(None)` is undefined, `Err(())` means "ask minijinja".
type Step<'c> = Result<Option<Cow<'c, str>>, ()>;

impl Source {
    fn eval<'c>(&'c self, c: &'c Contact, lookups: &Lookups) -> Step<'c> {
        match self {
            Source::Var(field) => Ok(c.get_str(field).map(Cow::Borrowed)),
            Source::Text(text) => Ok(Some(Cow::Borrowed(text))),
            Source::Lookup {
                table,
                key,
                default,
            } => {
                let key = key.eval(c, lookups)?;
                lookup_value(
                    lookups,
                    table,
                    key.as_deref().unwrap_or(""),
                    default.as_deref(),
                )
                .map(|v| Some(Cow::Owned(v)))
                .map_err(|_| ())
            }
        }
    }
}

impl Pipe {
    fn eval<'c>(&'c self, c: &'c Contact, lookups: &Lookups) -> Step<'c> {
        let mut value = self.source.eval(c, lookups)?;
        for filter in &self.filters {
            value = match (filter, value) {
                (Filter::Default(text), None) => Some(Cow::Borrowed(text.as_str())),
                (Filter::Default(_), Some(v)) => Some(v),
                // What a filter makes of undefined is minijinja's to say.
                (_, None) => return Err(()),
                (filter, Some(v)) => Some(Cow::Owned(filter.apply(&v))),
            };
        }
        Ok(value)
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Emit(Pipe),
}

/// A template of the subset: text and `{{ pipe }}`s.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct DirectTemplate(Vec<Part>);

impl DirectTemplate {
    /// The template, when it is in the subset.
    pub(super) fn parse(source: &str) -> Option<DirectTemplate> {
        // minijinja drops one trailing newline; such a template is left to it.
        if source.ends_with('\n') {
            return None;
        }
        let mut parts = Vec::new();
        let mut rest = source;
        while !rest.is_empty() {
            match rest.find('{') {
                None => {
                    parts.push(Part::Text(rest.to_string()));
                    break;
                }
                Some(at) => {
                    let after = &rest[at + 1..];
                    if after.starts_with('%') || after.starts_with('#') {
                        return None; // statements and comments are minijinja's
                    }
                    if !after.starts_with('{') {
                        // A lone brace is text.
                        let text_end = at + 1;
                        push_text(&mut parts, &rest[..text_end]);
                        rest = &rest[text_end..];
                        continue;
                    }
                    push_text(&mut parts, &rest[..at]);
                    let inner = &after[1..];
                    // Whitespace control (`{{-`, `-}}`) is left to minijinja.
                    if inner.starts_with(['-', '+']) {
                        return None;
                    }
                    let mut tokens = Tokens::new(inner);
                    let pipe = tokens.pipe()?;
                    let end = tokens.close_expression()?;
                    parts.push(Part::Emit(pipe));
                    rest = &inner[end..];
                }
            }
        }
        Some(DirectTemplate(parts))
    }

    /// The rendered text; `None` when minijinja must render this record.
    pub(super) fn render(&self, c: &Contact, lookups: &Lookups) -> Option<String> {
        let mut out = String::new();
        for part in &self.0 {
            match part {
                Part::Text(text) => out.push_str(text),
                // Lenient: undefined prints as nothing.
                Part::Emit(pipe) => {
                    if let Some(value) = pipe.eval(c, lookups).ok()? {
                        out.push_str(&value);
                    }
                }
            }
        }
        Some(out)
    }
}

fn push_text(parts: &mut Vec<Part>, text: &str) {
    if text.is_empty() {
        return;
    }
    match parts.last_mut() {
        Some(Part::Text(last)) => last.push_str(text),
        _ => parts.push(Part::Text(text.to_string())),
    }
}

/// A `where` of the subset.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Condition(Term);

#[derive(Debug, Clone, PartialEq)]
enum Term {
    /// A value is true when it is non-empty text.
    Truthy(Pipe),
    Equal(Pipe, Pipe),
    NotEqual(Pipe, Pipe),
    Not(Box<Term>),
    And(Box<Term>, Box<Term>),
    Or(Box<Term>, Box<Term>),
}

impl Condition {
    /// The expression, when it is in the subset.
    pub(super) fn parse(expression: &str) -> Option<Condition> {
        let mut tokens = Tokens::new(expression);
        let term = tokens.or()?;
        tokens.at_end().then_some(Condition(term))
    }

    /// Whether a record is in scope; `None` when minijinja must decide.
    pub(super) fn eval(&self, c: &Contact, lookups: &Lookups) -> Option<bool> {
        self.0.eval(c, lookups)
    }
}

impl Term {
    fn eval(&self, c: &Contact, lookups: &Lookups) -> Option<bool> {
        // A field that is not set is left to minijinja (undefined compares and tests
        // by its rules).
        let text = |pipe| Pipe::eval(pipe, c, lookups).ok().flatten();
        Some(match self {
            Term::Truthy(pipe) => !text(pipe)?.is_empty(),
            Term::Equal(a, b) => text(a)? == text(b)?,
            Term::NotEqual(a, b) => text(a)? != text(b)?,
            Term::Not(inner) => !inner.eval(c, lookups)?,
            Term::And(a, b) => a.eval(c, lookups)? && b.eval(c, lookups)?,
            Term::Or(a, b) => a.eval(c, lookups)? || b.eval(c, lookups)?,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Text(String),
    Dot,
    Bar,
    Open,
    Close,
    Comma,
    EqualEqual,
    NotEqual,
}

/// A cursor over the text of one expression.
struct Tokens<'s> {
    source: &'s str,
    at: usize,
    peeked: Option<(Token, usize)>,
}

impl<'s> Tokens<'s> {
    fn new(source: &'s str) -> Self {
        Tokens {
            source,
            at: 0,
            peeked: None,
        }
    }

    fn skip_space(&mut self) {
        let rest = &self.source[self.at..];
        self.at += rest.len() - rest.trim_start_matches([' ', '\t', '\n', '\r']).len();
    }

    /// The next token and the offset after it, without taking it.
    fn peek(&mut self) -> Option<Token> {
        if self.peeked.is_none() {
            self.skip_space();
            let rest = &self.source[self.at..];
            let mut chars = rest.chars();
            let first = chars.next()?;
            let (token, len) = match first {
                '.' => (Token::Dot, 1),
                '|' => (Token::Bar, 1),
                '(' => (Token::Open, 1),
                ')' => (Token::Close, 1),
                ',' => (Token::Comma, 1),
                '=' if rest.starts_with("==") => (Token::EqualEqual, 2),
                '!' if rest.starts_with("!=") => (Token::NotEqual, 2),
                '\'' | '"' => {
                    let body = &rest[1..];
                    let end = body.find(first)?;
                    let text = &body[..end];
                    // Escapes are minijinja's to read.
                    if text.contains('\\') {
                        return None;
                    }
                    (Token::Text(text.to_string()), end + 2)
                }
                c if c.is_ascii_alphabetic() || c == '_' => {
                    let len = rest
                        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .unwrap_or(rest.len());
                    (Token::Ident(rest[..len].to_string()), len)
                }
                _ => return None,
            };
            self.peeked = Some((token, self.at + len));
        }
        self.peeked.as_ref().map(|(t, _)| t.clone())
    }

    fn next(&mut self) -> Option<Token> {
        let token = self.peek()?;
        if let Some((_, end)) = self.peeked.take() {
            self.at = end;
        }
        Some(token)
    }

    fn expect(&mut self, token: Token) -> Option<()> {
        (self.next()? == token).then_some(())
    }

    fn at_end(&mut self) -> bool {
        self.skip_space();
        self.peeked.is_none() && self.at == self.source.len()
    }

    /// `}}` after the expression: the offset after it.
    fn close_expression(&mut self) -> Option<usize> {
        if self.peeked.is_some() {
            return None;
        }
        self.skip_space();
        let rest = &self.source[self.at..];
        rest.starts_with("}}").then_some(self.at + 2)
    }

    fn text(&mut self) -> Option<String> {
        match self.next()? {
            Token::Text(text) => Some(text),
            _ => None,
        }
    }

    /// A field, a text, or `lookup(…)`.
    fn source(&mut self) -> Option<Source> {
        match self.next()? {
            Token::Text(text) => Some(Source::Text(text)),
            Token::Ident(name) if name == "lookup" => {
                self.expect(Token::Open)?;
                let table = self.text()?;
                self.expect(Token::Comma)?;
                let key = self.source()?;
                let default = match self.next()? {
                    Token::Comma => {
                        let default = self.text()?;
                        self.expect(Token::Close)?;
                        Some(default)
                    }
                    Token::Close => None,
                    _ => return None,
                };
                Some(Source::Lookup {
                    table,
                    key: Box::new(key),
                    default,
                })
            }
            Token::Ident(name) if name == "attributes" => {
                self.expect(Token::Dot)?;
                match self.next()? {
                    Token::Ident(attribute) => Some(Source::Var(Field::Attribute(attribute))),
                    _ => None,
                }
            }
            Token::Ident(name) => {
                let field = text_field(&name)?;
                // `email.split`, `email(…)`: minijinja's.
                match self.peek() {
                    Some(Token::Dot | Token::Open) => None,
                    _ => Some(Source::Var(field)),
                }
            }
            _ => None,
        }
    }

    fn pipe(&mut self) -> Option<Pipe> {
        let source = self.source()?;
        let mut filters = Vec::new();
        while self.peek() == Some(Token::Bar) {
            self.next();
            let Token::Ident(name) = self.next()? else {
                return None;
            };
            let mut args = Vec::new();
            if self.peek() == Some(Token::Open) {
                self.next();
                if self.peek() == Some(Token::Close) {
                    self.next();
                } else {
                    loop {
                        args.push(self.text()?);
                        match self.next()? {
                            Token::Comma => continue,
                            Token::Close => break,
                            _ => return None,
                        }
                    }
                }
            }
            let filter = match (name.as_str(), args.as_slice()) {
                ("lower", []) => Filter::Lower,
                ("upper", []) => Filter::Upper,
                ("trim", []) => Filter::Trim,
                ("title", []) => Filter::Title,
                ("capitalize", []) => Filter::Capitalize,
                ("default" | "d", [text]) => Filter::Default(text.clone()),
                _ => return None,
            };
            filters.push(filter);
        }
        Some(Pipe { source, filters })
    }

    fn or(&mut self) -> Option<Term> {
        let mut left = self.and()?;
        while self.peek() == Some(Token::Ident("or".into())) {
            self.next();
            left = Term::Or(Box::new(left), Box::new(self.and()?));
        }
        Some(left)
    }

    fn and(&mut self) -> Option<Term> {
        let mut left = self.not()?;
        while self.peek() == Some(Token::Ident("and".into())) {
            self.next();
            left = Term::And(Box::new(left), Box::new(self.not()?));
        }
        Some(left)
    }

    fn not(&mut self) -> Option<Term> {
        match self.peek()? {
            Token::Ident(word) if word == "not" => {
                self.next();
                Some(Term::Not(Box::new(self.not()?)))
            }
            Token::Open => {
                self.next();
                let inner = self.or()?;
                self.expect(Token::Close)?;
                Some(inner)
            }
            _ => {
                let left = self.pipe()?;
                match self.peek() {
                    Some(Token::EqualEqual) => {
                        self.next();
                        Some(Term::Equal(left, self.pipe()?))
                    }
                    Some(Token::NotEqual) => {
                        self.next();
                        Some(Term::NotEqual(left, self.pipe()?))
                    }
                    _ => Some(Term::Truthy(left)),
                }
            }
        }
    }
}
