//! The sandbox's own XML handling: a small namespace-resolved tree for requests, and
//! text templates for answers.
//!
//! Deliberately separate from the client's `soap` module: if the client and the
//! sandbox shared their reading of the protocol, one misunderstanding would hide
//! itself on both sides.

use quick_xml::events::Event;
use quick_xml::name::ResolveResult;
use quick_xml::NsReader;

/// The SOAP 1.1 envelope namespace.
pub const SOAP11_NS: &str = "http://schemas.xmlsoap.org/soap/envelope/";
/// The SOAP 1.2 envelope namespace.
pub const SOAP12_NS: &str = "http://www.w3.org/2003/05/soap-envelope";
/// The namespace of every CRM operation and its children.
pub const CRM_NS: &str = "http://tempuri.org/CatalystDeveloperService/CatalystCRMWebservice";
const XSI_NS: &str = "http://www.w3.org/2001/XMLSchema-instance";

/// One element of a request, with its namespace resolved (prefixes are forgotten).
#[derive(Debug, Clone, Default)]
pub struct XmlNode {
    /// The namespace URI, empty when unbound.
    pub ns: String,
    /// The local name.
    pub name: String,
    /// Child elements in document order.
    pub children: Vec<XmlNode>,
    /// The concatenated text content (unescaped).
    pub text: String,
    /// Whether `xsi:nil="true"` was set.
    pub nil: bool,
}

impl XmlNode {
    /// Whether this node is `{ns}name`.
    #[cfg(test)]
    pub fn is(&self, ns: &str, name: &str) -> bool {
        self.ns == ns && self.name == name
    }

    /// The first child in the CRM namespace called `name` (case-insensitive: the
    /// service's parameter names are matched liberally, `entityID` as `entityId`).
    pub fn crm_child(&self, name: &str) -> Option<&XmlNode> {
        self.children
            .iter()
            .find(|c| c.ns == CRM_NS && c.name.eq_ignore_ascii_case(name))
    }

    /// Every child in the CRM namespace called `name`.
    pub fn crm_children<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a XmlNode> + 'a {
        self.children
            .iter()
            .filter(move |c| c.ns == CRM_NS && c.name.eq_ignore_ascii_case(name))
    }

    /// The trimmed text of the CRM child `name`, if present.
    pub fn crm_text(&self, name: &str) -> Option<&str> {
        self.crm_child(name).map(|c| c.text.trim())
    }
}

/// Why a request body is not XML the sandbox can read.
#[derive(Debug, thiserror::Error)]
#[error("malformed XML: {0}")]
pub struct XmlError(pub String);

/// Parses a whole document into its root element.
pub fn parse_document(body: &str) -> Result<XmlNode, XmlError> {
    let mut reader = NsReader::from_str(body);
    reader.config_mut().expand_empty_elements = true;
    let mut stack: Vec<XmlNode> = Vec::new();
    loop {
        let (resolved, event) = reader
            .read_resolved_event()
            .map_err(|e| XmlError(e.to_string()))?;
        match event {
            Event::Start(start) => {
                let ns = match resolved {
                    ResolveResult::Bound(ns) => String::from_utf8_lossy(ns.as_ref()).into_owned(),
                    ResolveResult::Unbound => String::new(),
                    ResolveResult::Unknown(prefix) => {
                        return Err(XmlError(format!(
                            "undeclared prefix {:?}",
                            String::from_utf8_lossy(&prefix)
                        )))
                    }
                };
                let name = String::from_utf8_lossy(start.local_name().as_ref()).into_owned();
                let mut nil = false;
                for attr in start.attributes().flatten() {
                    let (attr_ns, local) = reader.resolve_attribute(attr.key);
                    let is_xsi = matches!(attr_ns, ResolveResult::Bound(ns) if ns.as_ref() == XSI_NS.as_bytes());
                    if is_xsi && local.as_ref() == b"nil" {
                        nil = attr.value.as_ref() == b"true" || attr.value.as_ref() == b"1";
                    }
                }
                stack.push(XmlNode {
                    ns,
                    name,
                    nil,
                    ..XmlNode::default()
                });
            }
            Event::End(_) => {
                let node = stack
                    .pop()
                    .ok_or_else(|| XmlError("unbalanced end tag".into()))?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(node),
                    None => return Ok(node),
                }
            }
            Event::Text(text) => {
                if let Some(top) = stack.last_mut() {
                    let value = text.unescape().map_err(|e| XmlError(e.to_string()))?;
                    top.text.push_str(&value);
                }
            }
            Event::CData(data) => {
                if let Some(top) = stack.last_mut() {
                    top.text
                        .push_str(&String::from_utf8_lossy(&data.into_inner()));
                }
            }
            Event::Eof => {
                return Err(XmlError(
                    "document ended before its root element closed".into(),
                ))
            }
            _ => {}
        }
    }
}

/// Escapes text for an element's content.
pub fn esc(text: &str) -> String {
    quick_xml::escape::escape(text).into_owned()
}

/// Wraps an operation's answer in an envelope of `version`.
pub fn envelope(version: SoapVersion, body: &str) -> String {
    let ns = version.namespace();
    format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\
         <soap:Envelope xmlns:soap=\"{ns}\" xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" \
         xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\"><soap:Body>{body}</soap:Body></soap:Envelope>"
    )
}

/// A SOAP Fault in the shape of `version`, as ASP.NET web services write them.
pub fn fault(version: SoapVersion, sender: bool, text: &str) -> String {
    let text = esc(text);
    let inner = match version {
        SoapVersion::V11 => {
            let code = if sender { "soap:Client" } else { "soap:Server" };
            format!("<soap:Fault><faultcode>{code}</faultcode><faultstring>{text}</faultstring><detail /></soap:Fault>")
        }
        SoapVersion::V12 => {
            let code = if sender {
                "soap:Sender"
            } else {
                "soap:Receiver"
            };
            format!(
                "<soap:Fault><soap:Code><soap:Value>{code}</soap:Value></soap:Code>\
                 <soap:Reason><soap:Text xml:lang=\"en\">{text}</soap:Text></soap:Reason>\
                 <soap:Detail /></soap:Fault>"
            )
        }
    };
    envelope(version, &inner)
}

/// Which SOAP a request spoke; answers are given in the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SoapVersion {
    /// SOAP 1.1 (`text/xml`, `SOAPAction` header).
    V11,
    /// SOAP 1.2 (`application/soap+xml`).
    V12,
}

impl SoapVersion {
    /// The envelope namespace.
    pub fn namespace(self) -> &'static str {
        match self {
            SoapVersion::V11 => SOAP11_NS,
            SoapVersion::V12 => SOAP12_NS,
        }
    }

    /// The content type of answers.
    pub fn content_type(self) -> &'static str {
        match self {
            SoapVersion::V11 => "text/xml; charset=utf-8",
            SoapVersion::V12 => "application/soap+xml; charset=utf-8",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_namespaces_whatever_the_prefix() {
        let doc = r#"<e:Envelope xmlns:e="http://www.w3.org/2003/05/soap-envelope"><e:Body>
            <x:Op xmlns:x="http://tempuri.org/CatalystDeveloperService/CatalystCRMWebservice">
              <x:username>u &amp; v</x:username><x:empty/><x:n xsi:nil="true" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"/>
            </x:Op></e:Body></e:Envelope>"#;
        let root = parse_document(doc).unwrap();
        assert!(root.is(SOAP12_NS, "Envelope"));
        let op = &root.children[0].children[0];
        assert!(op.is(CRM_NS, "Op"));
        assert_eq!(op.crm_text("username"), Some("u & v"));
        assert_eq!(op.crm_text("empty"), Some(""));
        assert!(op.crm_child("n").unwrap().nil);
    }

    #[test]
    fn malformed_documents_are_errors_not_panics() {
        for doc in ["", "<a>", "<a></b>", "<p:a/>", "<a>&bogus;</a>"] {
            assert!(parse_document(doc).is_err(), "{doc}");
        }
    }
}
