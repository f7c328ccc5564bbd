//! The XML Poppulo speaks: the import job we send, and the status entity, import and
//! subscriber listings we read.
//!
//! Strict in what we send (every value escaped, characters XML cannot carry dropped,
//! `]]>` split across CDATA sections); liberal in what we accept (element names matched
//! without namespace prefix and ignoring ASCII case, a status as attribute or child,
//! timestamps with or without fractional seconds). Answers are small (one page, one
//! import), so they are read into a tiny element tree and queried.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDateTime, Utc};
use contactsync_core::text::xml_safe;
use quick_xml::events::{BytesCData, BytesDecl, BytesEnd, BytesStart, BytesText, Event};

/// One XML element: name (local, without prefix), attributes, children, and its own text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Element {
    /// Local name.
    pub name: String,
    /// Attributes by local name, in document order.
    pub attributes: Vec<(String, String)>,
    /// Child elements.
    pub children: Vec<Element>,
    /// Text and CDATA directly inside, concatenated.
    pub text: String,
}

impl Element {
    /// Parses a document into its root element.
    pub fn parse(xml: &str) -> Result<Element, String> {
        let mut reader = quick_xml::Reader::from_str(xml);
        let mut stack: Vec<Element> = Vec::new();
        let mut root: Option<Element> = None;
        loop {
            let event = reader
                .read_event()
                .map_err(|e| format!("malformed XML at byte {}: {e}", reader.buffer_position()))?;
            match event {
                Event::Start(start) => stack.push(open(&start)?),
                Event::Empty(start) => {
                    let element = open(&start)?;
                    close(element, &mut stack, &mut root);
                }
                Event::End(_) => {
                    let element = stack.pop().ok_or("malformed XML: unbalanced end tag")?;
                    close(element, &mut stack, &mut root);
                }
                Event::Text(text) => {
                    if let Some(top) = stack.last_mut() {
                        let t = text
                            .unescape()
                            .map_err(|e| format!("malformed XML text: {e}"))?;
                        top.text.push_str(&t);
                    }
                }
                Event::CData(data) => {
                    if let Some(top) = stack.last_mut() {
                        top.text
                            .push_str(&String::from_utf8_lossy(&data.into_inner()));
                    }
                }
                Event::Eof => break,
                _ => {}
            }
        }
        if !stack.is_empty() {
            return Err("malformed XML: the document ends inside an element".into());
        }
        root.ok_or_else(|| "not XML: no root element".to_string())
    }

    /// Whether the element's local name is `name` (ASCII case ignored).
    pub fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
    }

    /// The first child called `name`.
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.is(name))
    }

    /// Every child called `name`.
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.is(name))
    }

    /// The attribute `name` (ASCII case ignored).
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The trimmed text of the child `name`, if present and not blank.
    pub fn child_text(&self, name: &str) -> Option<&str> {
        self.child(name)
            .map(|c| c.text.trim())
            .filter(|t| !t.is_empty())
    }

    /// The value called `name`: an attribute, else a child's text.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.attr(name)
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .or_else(|| self.child_text(name))
    }

    /// Every descendant, depth first.
    pub fn descendants(&self) -> Vec<&Element> {
        let mut out = Vec::new();
        let mut todo: Vec<&Element> = self.children.iter().rev().collect();
        while let Some(e) = todo.pop() {
            out.push(e);
            todo.extend(e.children.iter().rev());
        }
        out
    }
}

fn open(start: &BytesStart<'_>) -> Result<Element, String> {
    let name = String::from_utf8_lossy(start.local_name().as_ref()).into_owned();
    let mut attributes = Vec::new();
    for attr in start.attributes() {
        let attr = attr.map_err(|e| format!("malformed XML attribute: {e}"))?;
        let key = String::from_utf8_lossy(attr.key.local_name().as_ref()).into_owned();
        let value = attr
            .unescape_value()
            .map_err(|e| format!("malformed XML attribute value: {e}"))?
            .into_owned();
        attributes.push((key, value));
    }
    Ok(Element {
        name,
        attributes,
        ..Element::default()
    })
}

fn close(element: Element, stack: &mut [Element], root: &mut Option<Element>) {
    match stack.last_mut() {
        Some(parent) => parent.children.push(element),
        None => {
            if root.is_none() {
                *root = Some(element);
            }
        }
    }
}

/// What an import job asks of Poppulo besides its rows: the sink's settings of the
/// same names, as each job sends them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportFlags {
    /// Update existing subscribers (false: only create).
    pub update_existing: bool,
    /// Reactivate people removed through the API.
    pub reactivate_api_removed: bool,
    /// Reactivate people removed by an administrator.
    pub reactivate_admin_removed: bool,
    /// Reactivate people removed by bounces.
    pub reactivate_bounced_removed: bool,
    /// Fields set on every row.
    pub set_fields: BTreeMap<String, String>,
    /// Permissions granted to every row.
    pub add_permissions: Vec<String>,
    /// Permissions withdrawn from every row.
    pub remove_permissions: Vec<String>,
    /// Tags put on every row.
    pub tags: Vec<String>,
}

/// The `<subscriber_import_job>` to post, except its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportJob {
    /// Always true in practice (the config refuses false).
    pub accept_terms: bool,
    /// What the job asks besides its rows.
    pub flags: ImportFlags,
    /// The column names, in data order.
    pub columns: Vec<String>,
}

type XmlResult = Result<(), std::io::Error>;

impl ImportJob {
    /// The job as an XML document, with `data` (CSV, no header line) in CDATA.
    pub fn to_xml(&self, data: &str) -> Result<String, String> {
        self.write(data)
            .map_err(|e| format!("cannot write the import job XML: {e}"))
    }

    fn write(&self, data: &str) -> Result<String, std::io::Error> {
        let mut w = quick_xml::Writer::new(Vec::new());
        w.write_event(Event::Decl(BytesDecl::new("1.0", Some("UTF-8"), None)))?;
        w.write_event(Event::Start(BytesStart::new("subscriber_import_job")))?;
        let flags = &self.flags;
        let flag = |w: &mut quick_xml::Writer<Vec<u8>>, name: &str, v: bool| -> XmlResult {
            text_element(w, name, if v { "true" } else { "false" })
        };
        flag(&mut w, "accept_terms", self.accept_terms)?;
        flag(&mut w, "update_existing", flags.update_existing)?;
        flag(
            &mut w,
            "reactivate_api_removed",
            flags.reactivate_api_removed,
        )?;
        flag(
            &mut w,
            "reactivate_admin_removed",
            flags.reactivate_admin_removed,
        )?;
        flag(
            &mut w,
            "reactivate_bounced_removed",
            flags.reactivate_bounced_removed,
        )?;
        if !flags.set_fields.is_empty() {
            w.write_event(Event::Start(BytesStart::new("set_fields")))?;
            for (name, value) in &flags.set_fields {
                let mut start = BytesStart::new("set_field");
                start.push_attribute(("name", xml_safe(name).as_ref()));
                w.write_event(Event::Start(start))?;
                w.write_event(Event::Text(BytesText::new(&xml_safe(value))))?;
                w.write_event(Event::End(BytesEnd::new("set_field")))?;
            }
            w.write_event(Event::End(BytesEnd::new("set_fields")))?;
        }
        named_list(
            &mut w,
            "add_permissions",
            "permission",
            &flags.add_permissions,
        )?;
        named_list(
            &mut w,
            "remove_permissions",
            "permission",
            &flags.remove_permissions,
        )?;
        named_list(&mut w, "tags", "tag", &flags.tags)?;
        w.write_event(Event::Start(BytesStart::new("subscriber_data")))?;
        text_element(&mut w, "columns", &self.columns.join(","))?;
        text_element(&mut w, "skip_first_line", "false")?;
        text_element(&mut w, "field_separator", "comma")?;
        w.write_event(Event::Start(BytesStart::new("data")))?;
        for section in cdata_sections(&xml_safe(data)) {
            w.write_event(Event::CData(BytesCData::new(section)))?;
        }
        w.write_event(Event::End(BytesEnd::new("data")))?;
        w.write_event(Event::End(BytesEnd::new("subscriber_data")))?;
        w.write_event(Event::End(BytesEnd::new("subscriber_import_job")))?;
        Ok(String::from_utf8_lossy(&w.into_inner()).into_owned())
    }
}

fn text_element(w: &mut quick_xml::Writer<Vec<u8>>, name: &str, text: &str) -> XmlResult {
    w.write_event(Event::Start(BytesStart::new(name)))?;
    w.write_event(Event::Text(BytesText::new(&xml_safe(text))))?;
    w.write_event(Event::End(BytesEnd::new(name)))
}

fn named_list(
    w: &mut quick_xml::Writer<Vec<u8>>,
    list: &str,
    item: &str,
    names: &[String],
) -> XmlResult {
    if names.is_empty() {
        return Ok(());
    }
    w.write_event(Event::Start(BytesStart::new(list)))?;
    for name in names {
        let mut start = BytesStart::new(item);
        start.push_attribute(("name", xml_safe(name).as_ref()));
        w.write_event(Event::Empty(start))?;
    }
    w.write_event(Event::End(BytesEnd::new(list)))
}

/// Splits `data` into CDATA section contents so that none contains `]]>`: the `]]` ends
/// one section and the `>` starts the next.
pub fn cdata_sections(data: &str) -> Vec<String> {
    let parts: Vec<&str> = data.split("]]>").collect();
    let last = parts.len() - 1;
    parts
        .iter()
        .enumerate()
        .map(|(i, part)| {
            let mut s = String::with_capacity(part.len() + 3);
            if i > 0 {
                s.push('>');
            }
            s.push_str(part);
            if i < last {
                s.push_str("]]");
            }
            s
        })
        .collect()
}

/// A status entity (answer to a POST, and to many errors).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusEntity {
    /// `status_code`, when given.
    pub status_code: Option<u16>,
    /// The first `resources_created/link/@href`.
    pub created: Option<String>,
    /// Every other text in it (sub code, messages, warnings), for error messages.
    pub messages: Vec<String>,
}

impl StatusEntity {
    /// Reads a status entity; `None` if the body is not one.
    pub fn parse(body: &str) -> Option<StatusEntity> {
        let root = Element::parse(body).ok()?;
        let mut entity = StatusEntity {
            status_code: root.child_text("status_code").and_then(|t| t.parse().ok()),
            ..StatusEntity::default()
        };
        if let Some(created) = root.child("resources_created") {
            entity.created = created
                .descendants()
                .into_iter()
                .filter(|e| e.is("link"))
                .find_map(|e| e.attr("href").map(str::trim).filter(|h| !h.is_empty()))
                .map(str::to_string);
        }
        for e in root.descendants() {
            let text = e.text.trim();
            if !text.is_empty() && !e.is("status_code") {
                entity.messages.push(text.to_string());
            }
        }
        Some(entity)
    }
}

/// The platform's words in an error answer: the texts of a status entity (or any XML),
/// else the body itself; one line.
pub fn error_text(body: &str) -> String {
    let text = match Element::parse(body) {
        Ok(root) => {
            let mut parts: Vec<String> = Vec::new();
            if !root.text.trim().is_empty() {
                parts.push(root.text.trim().to_string());
            }
            for e in root.descendants() {
                let t = e.text.trim();
                if !t.is_empty() && !e.is("status_code") {
                    parts.push(t.to_string());
                }
            }
            parts.join("; ")
        }
        Err(_) => body.to_string(),
    };
    let collapsed = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if collapsed.chars().count() > 500 {
        format!("{}…", collapsed.chars().take(500).collect::<String>())
    } else {
        collapsed
    }
}

/// Where an import stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportStatus {
    /// Still running.
    InProgress,
    /// Finished (some rows may have been rejected).
    Completed,
    /// Failed before processing.
    Error,
    /// Cancelled in the web application.
    Cancelled,
}

/// The final counts of an import.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportResults {
    /// Rows in the import.
    pub total_records: Option<u64>,
    /// New subscribers.
    pub new_subscribers: u64,
    /// Updated subscribers.
    pub updated_subscribers: u64,
    /// Rows rejected as invalid (`invalid_subscribers` or `invalid_records`).
    pub invalid: u64,
    /// Rows skipped as duplicates within the import.
    pub duplicates: u64,
    /// Rows skipped because the person opted out.
    pub previously_opted_out: u64,
    /// The link to the rejected rows' CSV, when given.
    pub invalid_link: Option<String>,
}

impl ImportResults {
    /// Whether any row was rejected or skipped.
    pub fn has_rejections(&self) -> bool {
        self.invalid + self.duplicates + self.previously_opted_out > 0
    }
}

/// A subscriber import, as polled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportState {
    /// Its status.
    pub status: ImportStatus,
    /// The status as written, for messages.
    pub status_text: String,
    /// `progress/total_records`.
    pub total_records: Option<u64>,
    /// `progress/records_processed`.
    pub records_processed: Option<u64>,
    /// `progress/ping_after`.
    pub ping_after: Option<DateTime<Utc>>,
    /// `results`, when finished.
    pub results: Option<ImportResults>,
    /// Any message the import carries (`error`, `message`, warnings), for logs.
    pub message: Option<String>,
    /// When the import was submitted (the `created` attribute), when given.
    pub created: Option<DateTime<Utc>>,
}

fn number(e: &Element, name: &str) -> Option<u64> {
    e.value(name).and_then(|t| t.trim().parse::<u64>().ok())
}

impl ImportState {
    /// Reads a `<subscriber_import>`.
    pub fn parse(body: &str) -> Result<ImportState, String> {
        let root = Element::parse(body)?;
        let status_text = root
            .value("status")
            .ok_or("the import has no status")?
            .to_string();
        let status = match status_text
            .to_ascii_uppercase()
            .replace([' ', '-'], "_")
            .as_str()
        {
            "COMPLETED" | "COMPLETE" => ImportStatus::Completed,
            "ERROR" | "FAILED" => ImportStatus::Error,
            "CANCELLED" | "CANCELED" => ImportStatus::Cancelled,
            // IN_PROGRESS, and anything else not final: keep polling (bounded).
            _ => ImportStatus::InProgress,
        };
        let progress = root.child("progress");
        let results = root.child("results").map(|r| {
            let invalid_link = r
                .descendants()
                .into_iter()
                .filter(|e| e.is("link"))
                .find(|e| {
                    e.attr("rel")
                        .is_none_or(|rel| rel.to_ascii_lowercase().contains("invalid"))
                })
                .or_else(|| {
                    r.child("invalid_subscribers")
                        .filter(|e| e.attr("href").is_some())
                })
                .and_then(|e| e.attr("href"))
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty());
            ImportResults {
                total_records: number(r, "total_records"),
                new_subscribers: number(r, "new_subscribers").unwrap_or(0),
                updated_subscribers: number(r, "updated_subscribers").unwrap_or(0),
                invalid: number(r, "invalid_subscribers")
                    .or_else(|| number(r, "invalid_records"))
                    .unwrap_or(0),
                duplicates: number(r, "duplicate_subscribers")
                    .or_else(|| number(r, "duplicate_records"))
                    .unwrap_or(0),
                previously_opted_out: number(r, "previously_opted_out").unwrap_or(0),
                invalid_link,
            }
        });
        let message = ["error", "message", "error_message", "reason"]
            .iter()
            .find_map(|n| root.child_text(n).or_else(|| results_text(&root, n)))
            .map(str::to_string);
        Ok(ImportState {
            status,
            status_text,
            total_records: progress.and_then(|p| number(p, "total_records")),
            records_processed: progress.and_then(|p| number(p, "records_processed")),
            ping_after: progress
                .and_then(|p| p.value("ping_after"))
                .or_else(|| root.value("ping_after"))
                .and_then(parse_time),
            results,
            message,
            created: root.value("created").and_then(parse_time),
        })
    }
}

fn results_text<'a>(root: &'a Element, name: &str) -> Option<&'a str> {
    root.child("results").and_then(|r| r.child_text(name))
}

/// Parses an ISO 8601 timestamp: with or without fractional seconds, `Z` or an offset,
/// or no zone at all (taken as UTC, as the API's dates are).
pub fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    let t = text.trim();
    if let Ok(d) = DateTime::parse_from_rfc3339(t) {
        return Some(d.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%dT%H:%M:%S%.f%:z"] {
        if let Ok(d) = DateTime::parse_from_str(t, format) {
            return Some(d.with_timezone(&Utc));
        }
    }
    let naive = t.trim_end_matches(['Z', 'z']);
    for format in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(n) = NaiveDateTime::parse_from_str(naive, format) {
            return Some(n.and_utc());
        }
    }
    None
}

/// One page of `GET /subscribers`.
#[derive(Debug, Clone, Default)]
pub struct SubscriberPage {
    /// The `<subscriber>` elements, in order.
    pub subscribers: Vec<Element>,
    /// The `next` link, if any.
    pub next: Option<String>,
    /// `totalResults`, when given.
    pub total_results: Option<u64>,
}

impl SubscriberPage {
    /// Reads a `<subscribers>` page.
    pub fn parse(body: &str) -> Result<SubscriberPage, String> {
        let root = Element::parse(body)?;
        if root.is("subscriber") {
            // A single subscriber where a list was expected: liberal, take it.
            return Ok(SubscriberPage {
                subscribers: vec![root],
                ..SubscriberPage::default()
            });
        }
        let next = root
            .children_named("link")
            .find(|l| {
                l.attr("rel").is_some_and(|rel| {
                    let rel = rel.trim().to_ascii_lowercase();
                    rel == "next" || rel.ends_with("/next") || rel.ends_with(".next")
                })
            })
            .and_then(|l| l.attr("href"))
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty());
        let total_results = root
            .attr("totalResults")
            .and_then(|t| t.trim().parse().ok());
        let subscribers = root
            .children
            .into_iter()
            .filter(|c| c.is("subscriber"))
            .collect();
        Ok(SubscriberPage {
            subscribers,
            next,
            total_results,
        })
    }
}
