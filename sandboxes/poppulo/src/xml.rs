//! The little XML the sandbox needs: a tree reader for request bodies and a writer for
//! answers.
//!
//! Request bodies are small (an import job, one subscriber), so a plain element tree is
//! simpler and stricter than serde mapping: the handlers see exactly which elements
//! were sent, which matters for telling "absent" from "empty". Text and CDATA sections
//! of one element are concatenated, so data split across several CDATA sections (the
//! only way to carry `]]>`) reads back whole.

use quick_xml::events::Event;
use quick_xml::Reader;

/// One element of a parsed document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Element {
    /// The element's name, as written (no namespace handling).
    pub name: String,
    /// Its attributes, in document order, unescaped.
    pub attributes: Vec<(String, String)>,
    /// Its child elements, in document order.
    pub children: Vec<Element>,
    /// Its text and CDATA content, concatenated; whitespace-only text between child
    /// elements is dropped.
    pub text: String,
}

/// Why a body is not well-formed XML.
#[derive(Debug, thiserror::Error)]
#[error("malformed XML: {0}")]
pub(crate) struct XmlError(String);

impl Element {
    /// The first child called `name`.
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    /// Every child called `name`.
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The attribute `name`.
    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The text of the child `name`, when present.
    pub fn child_text(&self, name: &str) -> Option<&str> {
        self.child(name).map(|c| c.text.as_str())
    }
}

/// Parses a whole document and returns its root element.
pub(crate) fn parse(body: &str) -> Result<Element, XmlError> {
    let mut reader = Reader::from_str(body);
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    loop {
        let event = reader
            .read_event()
            .map_err(|e| XmlError(format!("at byte {}: {e}", reader.buffer_position())))?;
        match event {
            Event::Start(start) => {
                if root.is_some() {
                    return Err(XmlError("content after the root element".into()));
                }
                stack.push(element_from(&start)?);
            }
            Event::Empty(start) => {
                let element = element_from(&start)?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(element),
                    None if root.is_none() => root = Some(element),
                    None => return Err(XmlError("content after the root element".into())),
                }
            }
            Event::End(_) => {
                // quick-xml checks that end tags match their start tags.
                let mut element = stack
                    .pop()
                    .ok_or_else(|| XmlError("unexpected end tag".into()))?;
                if !element.children.is_empty() && element.text.trim().is_empty() {
                    element.text.clear();
                }
                match stack.last_mut() {
                    Some(parent) => parent.children.push(element),
                    None => root = Some(element),
                }
            }
            Event::Text(text) => {
                let text = text
                    .unescape()
                    .map_err(|e| XmlError(format!("bad text: {e}")))?;
                match stack.last_mut() {
                    Some(current) => current.text.push_str(&text),
                    None if text.trim().is_empty() => {}
                    None => return Err(XmlError("text outside the root element".into())),
                }
            }
            Event::CData(data) => {
                let data = std::str::from_utf8(&data)
                    .map_err(|e| XmlError(format!("CDATA is not UTF-8: {e}")))?
                    .to_string();
                match stack.last_mut() {
                    Some(current) => current.text.push_str(&data),
                    None => return Err(XmlError("CDATA outside the root element".into())),
                }
            }
            Event::Eof => break,
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) | Event::DocType(_) => {}
        }
    }
    if !stack.is_empty() {
        return Err(XmlError("unexpected end of document".into()));
    }
    root.ok_or_else(|| XmlError("no root element".into()))
}

fn element_from(start: &quick_xml::events::BytesStart<'_>) -> Result<Element, XmlError> {
    let name = std::str::from_utf8(start.name().as_ref())
        .map_err(|e| XmlError(format!("element name is not UTF-8: {e}")))?
        .to_string();
    let mut attributes = Vec::new();
    for attribute in start.attributes() {
        let attribute =
            attribute.map_err(|e| XmlError(format!("bad attribute in <{name}>: {e}")))?;
        let key = std::str::from_utf8(attribute.key.as_ref())
            .map_err(|e| XmlError(format!("attribute name is not UTF-8: {e}")))?
            .to_string();
        let value = attribute
            .unescape_value()
            .map_err(|e| XmlError(format!("bad attribute value in <{name}>: {e}")))?
            .into_owned();
        attributes.push((key, value));
    }
    Ok(Element {
        name,
        attributes,
        children: Vec::new(),
        text: String::new(),
    })
}

/// Escapes text for element content and attribute values.
pub(crate) fn escape(text: &str) -> String {
    quick_xml::escape::escape(text).into_owned()
}

/// Builds an XML document as a string; elements are closed in order by the caller.
#[derive(Debug, Default)]
pub(crate) struct XmlWriter {
    out: String,
}

impl XmlWriter {
    /// A document with the XML declaration.
    pub fn new() -> Self {
        XmlWriter {
            out: String::from("<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"yes\"?>\n"),
        }
    }

    /// Opens `<name attr="v"...>`.
    pub fn open(&mut self, name: &str, attributes: &[(&str, &str)]) -> &mut Self {
        self.start_tag(name, attributes, ">")
    }

    /// Closes `</name>`.
    pub fn close(&mut self, name: &str) -> &mut Self {
        self.out.push_str("</");
        self.out.push_str(name);
        self.out.push('>');
        self
    }

    /// Writes `<name attr="v".../>`.
    pub fn empty(&mut self, name: &str, attributes: &[(&str, &str)]) -> &mut Self {
        self.start_tag(name, attributes, "/>")
    }

    /// `<name attr="v"...` and `end` (`>` or `/>`).
    fn start_tag(&mut self, name: &str, attributes: &[(&str, &str)], end: &str) -> &mut Self {
        self.out.push('<');
        self.out.push_str(name);
        self.push_attributes(attributes);
        self.out.push_str(end);
        self
    }

    /// Writes `<name>text</name>`.
    pub fn text(&mut self, name: &str, text: &str) -> &mut Self {
        self.text_with(name, &[], text)
    }

    /// Writes `<name>number</name>`.
    pub fn number(&mut self, name: &str, number: impl std::fmt::Display) -> &mut Self {
        self.text(name, &number.to_string())
    }

    /// Writes `<name attr="v"...>text</name>`.
    pub fn text_with(&mut self, name: &str, attributes: &[(&str, &str)], text: &str) -> &mut Self {
        self.open(name, attributes);
        self.out.push_str(&escape(text));
        self.close(name)
    }

    /// The document.
    pub fn finish(self) -> String {
        self.out
    }

    fn push_attributes(&mut self, attributes: &[(&str, &str)]) {
        for (key, value) in attributes {
            self.out.push(' ');
            self.out.push_str(key);
            self.out.push_str("=\"");
            self.out.push_str(&escape(value));
            self.out.push('"');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_cdata_reads_back_whole() {
        let root = parse("<a><data><![CDATA[x]]]]><![CDATA[>y]]></data><b n=\"&amp;1\"/></a>")
            .map_err(|e| e.to_string());
        let root = root.as_ref().map(|r| {
            (
                r.child_text("data"),
                r.child("b").and_then(|b| b.attribute("n")),
            )
        });
        assert_eq!(root, Ok((Some("x]]>y"), Some("&1"))));
    }

    #[test]
    fn malformed_is_an_error() {
        assert!(parse("<a><b></a>").is_err());
        assert!(parse("").is_err());
        assert!(parse("<a/><b/>").is_err());
    }
}
