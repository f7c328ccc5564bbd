//! SCIM filters (RFC 7644 §3.4.2.2), as far as the sandbox serves them: comparisons
//! `eq ne co sw ew gt ge lt le`, presence `pr`, joined by `and` / `or` (`and` binds
//! tighter), no parentheses. Attribute paths are the ones [`values_at`] resolves.

use chrono::DateTime;
use serde_json::{Map, Value};

/// A parsed filter: alternatives (`or`) of conjunctions (`and`) of comparisons.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    any_of: Vec<Vec<Comparison>>,
}

#[derive(Debug, Clone, PartialEq)]
struct Comparison {
    path: String,
    op: Op,
    value: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Co,
    Sw,
    Ew,
    Gt,
    Ge,
    Lt,
    Le,
    Pr,
}

/// The attributes compared case-sensitively (RFC 7643: `caseExact`).
const CASE_EXACT: [&str; 3] = ["id", "externalId", "meta.version"];

impl Filter {
    /// Parses `text`; the error says what is wrong, for a 400 `invalidFilter`.
    pub fn parse(text: &str) -> Result<Filter, String> {
        let tokens = tokenize(text)?;
        let mut any_of = vec![Vec::new()];
        let mut rest = tokens.as_slice();
        loop {
            let (comparison, after) = comparison(rest)?;
            if let Some(all) = any_of.last_mut() {
                all.push(comparison);
            }
            match after.split_first() {
                None => break,
                Some((Token::Word(w), tail)) if w.eq_ignore_ascii_case("and") => rest = tail,
                Some((Token::Word(w), tail)) if w.eq_ignore_ascii_case("or") => {
                    any_of.push(Vec::new());
                    rest = tail;
                }
                Some((t, _)) => return Err(format!("expected `and` or `or`, found {t:?}")),
            }
        }
        Ok(Filter { any_of })
    }

    /// Whether `resource` matches.
    pub fn matches(&self, resource: &Map<String, Value>) -> bool {
        self.any_of
            .iter()
            .any(|all| all.iter().all(|c| c.matches(resource)))
    }

    /// The value `attr eq VALUE` compares, when the filter is just that (the sandbox
    /// answers such a filter on `userName` from its index).
    pub fn equality_on(&self, attr: &str) -> Option<&str> {
        match self.any_of.as_slice() {
            [all] => match all.as_slice() {
                [c] if c.op == Op::Eq && c.path.eq_ignore_ascii_case(attr) => c.value.as_str(),
                _ => None,
            },
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Text(String),
}

fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '"' {
            chars.next();
            let mut s = String::new();
            loop {
                match chars.next() {
                    None => return Err("a quoted value is not closed".into()),
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some('n') => s.push('\n'),
                        Some('t') => s.push('\t'),
                        Some(other) => s.push(other),
                        None => return Err("a quoted value ends in `\\`".into()),
                    },
                    Some(other) => s.push(other),
                }
            }
            tokens.push(Token::Text(s));
        } else if c == '(' || c == ')' {
            return Err("parentheses are not supported by this server".into());
        } else {
            let mut w = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                w.push(c);
                chars.next();
            }
            tokens.push(Token::Word(w));
        }
    }
    Ok(tokens)
}

fn comparison(tokens: &[Token]) -> Result<(Comparison, &[Token]), String> {
    let Some((Token::Word(path), rest)) = tokens.split_first() else {
        return Err("expected an attribute path".into());
    };
    let Some((Token::Word(op), rest)) = rest.split_first() else {
        return Err(format!("expected an operator after {path}"));
    };
    let op = match op.to_ascii_lowercase().as_str() {
        "eq" => Op::Eq,
        "ne" => Op::Ne,
        "co" => Op::Co,
        "sw" => Op::Sw,
        "ew" => Op::Ew,
        "gt" => Op::Gt,
        "ge" => Op::Ge,
        "lt" => Op::Lt,
        "le" => Op::Le,
        "pr" => Op::Pr,
        other => return Err(format!("unknown operator {other:?}")),
    };
    if op == Op::Pr {
        let c = Comparison {
            path: path.clone(),
            op,
            value: Value::Null,
        };
        return Ok((c, rest));
    }
    let (value, rest) = match rest.split_first() {
        Some((Token::Text(s), rest)) => (Value::String(s.clone()), rest),
        Some((Token::Word(w), rest)) => {
            let v = match w.to_ascii_lowercase().as_str() {
                "true" => Value::Bool(true),
                "false" => Value::Bool(false),
                "null" => Value::Null,
                _ => serde_json::from_str::<serde_json::Number>(w)
                    .map(Value::Number)
                    .map_err(|_| format!("{w:?} is not a value: quote text"))?,
            };
            (v, rest)
        }
        None => return Err(format!("expected a value after {path}")),
    };
    let c = Comparison {
        path: path.clone(),
        op,
        value,
    };
    Ok((c, rest))
}

impl Comparison {
    fn matches(&self, resource: &Map<String, Value>) -> bool {
        let found = values_at(resource, &self.path);
        if self.op == Op::Pr {
            return found.iter().any(|v| !v.is_null() && v.as_str() != Some(""));
        }
        let exact = CASE_EXACT
            .iter()
            .any(|a| a.eq_ignore_ascii_case(&self.path));
        let hit = found.iter().any(|v| self.compares(v, exact));
        // `ne` holds when no value equals.
        if self.op == Op::Ne {
            !found.iter().any(|v| equal(v, &self.value, exact))
        } else {
            hit
        }
    }

    fn compares(&self, found: &Value, exact: bool) -> bool {
        let fold = |s: &str| {
            if exact {
                s.to_string()
            } else {
                s.to_lowercase()
            }
        };
        match self.op {
            Op::Eq => equal(found, &self.value, exact),
            Op::Ne | Op::Pr => false,
            Op::Co | Op::Sw | Op::Ew => match (found.as_str(), self.value.as_str()) {
                (Some(f), Some(v)) => {
                    let (f, v) = (fold(f), fold(v));
                    match self.op {
                        Op::Co => f.contains(&v),
                        Op::Sw => f.starts_with(&v),
                        _ => f.ends_with(&v),
                    }
                }
                _ => false,
            },
            Op::Gt | Op::Ge | Op::Lt | Op::Le => {
                let Some(order) = order(found, &self.value, exact) else {
                    return false;
                };
                match self.op {
                    Op::Gt => order.is_gt(),
                    Op::Ge => order.is_ge(),
                    Op::Lt => order.is_lt(),
                    _ => order.is_le(),
                }
            }
        }
    }
}

fn equal(found: &Value, wanted: &Value, exact: bool) -> bool {
    match (found, wanted) {
        (Value::String(f), Value::String(w)) if exact => f == w,
        (Value::String(f), Value::String(w)) => f.to_lowercase() == w.to_lowercase(),
        (f, w) => f == w,
    }
}

fn order(found: &Value, wanted: &Value, exact: bool) -> Option<std::cmp::Ordering> {
    match (found, wanted) {
        (Value::String(f), Value::String(w)) => {
            if let (Ok(f), Ok(w)) = (
                DateTime::parse_from_rfc3339(f),
                DateTime::parse_from_rfc3339(w),
            ) {
                return Some(f.cmp(&w));
            }
            if exact {
                Some(f.cmp(w))
            } else {
                Some(f.to_lowercase().cmp(&w.to_lowercase()))
            }
        }
        (Value::Number(f), Value::Number(w)) => f.as_f64()?.partial_cmp(&w.as_f64()?),
        _ => None,
    }
}

/// The values at `path` in `resource`: `userName`, `name.givenName`, `emails.value`
/// (every element's), `meta.lastModified`, an extension's
/// `urn:…:enterprise:2.0:User:employeeNumber`, or a core attribute named with its
/// schema (`urn:ietf:params:scim:schemas:core:2.0:User:userName`). Attribute names are
/// case-insensitive.
pub fn values_at<'a>(resource: &'a Map<String, Value>, path: &str) -> Vec<&'a Value> {
    let (container, rest) = split_urn(resource, path);
    let mut current: Vec<&Value> = Vec::new();
    let mut parts = rest.split('.');
    let Some(first) = parts.next() else {
        return current;
    };
    if let Some(v) = get_ci(container, first) {
        current.push(v);
    }
    for part in parts {
        let mut next = Vec::new();
        for v in current {
            match v {
                Value::Object(m) => next.extend(get_ci(m, part)),
                Value::Array(items) => next.extend(
                    items
                        .iter()
                        .filter_map(|i| i.as_object().and_then(|m| get_ci(m, part))),
                ),
                _ => {}
            }
        }
        current = next;
    }
    current
        .into_iter()
        .flat_map(|v| match v {
            Value::Array(items) => items.iter().collect::<Vec<_>>(),
            other => vec![other],
        })
        .collect()
}

/// The object a path starting with a schema URN addresses, and the rest of the path.
pub fn split_urn<'a, 'p>(
    resource: &'a Map<String, Value>,
    path: &'p str,
) -> (&'a Map<String, Value>, &'p str) {
    if !path.to_ascii_lowercase().starts_with("urn:") {
        return (resource, path);
    }
    for (key, value) in resource {
        if let (Some(rest), Value::Object(ext)) = (strip_prefix_ci(path, key), value) {
            if let Some(rest) = rest.strip_prefix(':') {
                return (ext, rest);
            }
        }
    }
    // A core attribute named with its schema: the part after the last `:`.
    match path.rsplit_once(':') {
        Some((_, attr)) => (resource, attr),
        None => (resource, path),
    }
}

fn strip_prefix_ci<'p>(text: &'p str, prefix: &str) -> Option<&'p str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

/// `map[name]`, with the name compared case-insensitively as SCIM wants.
pub fn get_ci<'a>(map: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    map.get(name).or_else(|| {
        map.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn user() -> Map<String, Value> {
        json!({
            "id": "abc",
            "userName": "Ann@Example.com",
            "externalId": "E1",
            "name": { "givenName": "Ann" },
            "emails": [{ "value": "ann@example.com", "type": "work" }],
            "active": true,
            "meta": { "lastModified": "2026-12-01T10:00:00Z" },
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User": { "employeeNumber": "42" }
        })
        .as_object()
        .cloned()
        .expect("object")
    }

    fn holds(filter: &str) -> bool {
        Filter::parse(filter).expect(filter).matches(&user())
    }

    #[test]
    fn comparisons_follow_the_attribute_case_rules() {
        assert!(holds(r#"userName eq "ann@example.com""#));
        assert!(holds(r#"USERNAME Eq "ANN@EXAMPLE.COM""#));
        assert!(!holds(r#"externalId eq "e1""#), "externalId is case-exact");
        assert!(holds(r#"externalId eq "E1" and active eq true"#));
        assert!(holds(r#"externalId eq "X" or name.givenName sw "an""#));
        assert!(holds(r#"emails.value co "@example""#));
        assert!(holds(r#"meta.lastModified gt "2026-12-01T09:59:59+00:00""#));
        assert!(!holds(r#"meta.lastModified gt "2026-12-01T10:00:00Z""#));
        assert!(holds(
            r#"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber eq "42""#
        ));
        assert!(holds(
            r#"urn:ietf:params:scim:schemas:core:2.0:User:userName pr"#
        ));
        assert!(holds(r#"title ne "Boss""#));
    }

    #[test]
    fn bad_filters_say_why() {
        for bad in [
            "userName",
            r#"userName eq "open"#,
            "userName is 3",
            "(a eq 1)",
            "a eq b",
        ] {
            assert!(Filter::parse(bad).is_err(), "{bad}");
        }
    }
}
