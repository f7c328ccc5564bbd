//! SOAP 1.2 envelopes for the CRM web service: building requests and reading answers.
//!
//! Why by hand: the service is an ASP.NET `.asmx` whose XmlSerializer silently drops
//! elements sent out of order, so the order of a `ContactRecord`'s elements is part of
//! the protocol and is written out explicitly here ([`ContactRecord::write`]). Answers
//! are read into a small tree whose names are resolved by namespace, never by prefix:
//! another server (or a proxy) may choose any prefixes it likes.

use quick_xml::events::Event;
use quick_xml::name::ResolveResult;
use quick_xml::NsReader;

/// The namespace of every CRM operation and of each of its child elements.
pub const CRM_NS: &str = "http://tempuri.org/CatalystDeveloperService/CatalystCRMWebservice";
/// SOAP 1.2's envelope namespace (what the client sends).
pub const SOAP12_ENV: &str = "http://www.w3.org/2003/05/soap-envelope";
/// SOAP 1.1's envelope namespace (accepted in answers).
pub const SOAP11_ENV: &str = "http://schemas.xmlsoap.org/soap/envelope/";
/// The content type of SOAP 1.2 requests.
pub const CONTENT_TYPE: &str = "application/soap+xml; charset=utf-8";
/// The date BC uses for "no date".
pub const UNSET_DATE: &str = "0001-01-01T00:00:00";
const XSI_NS: &str = "http://www.w3.org/2001/XMLSchema-instance";

/// Escapes text for element content, without the characters XML cannot carry (which
/// would fault the whole call, and every later run's again).
fn esc(text: &str) -> String {
    quick_xml::escape::escape(contactsync_core::text::xml_safe(text).as_ref()).into_owned()
}

/// Appends `<name>text</name>`.
fn element(out: &mut String, name: &str, text: &str) {
    out.push('<');
    out.push_str(name);
    out.push('>');
    out.push_str(&esc(text));
    out.push_str("</");
    out.push_str(name);
    out.push('>');
}

/// The credentials every call carries.
pub struct Login<'a> {
    /// `username` (empty in site-token mode).
    pub username: &'a str,
    /// `password` (the token in site-token mode).
    pub password: &'a str,
    /// `siteId`.
    pub site_id: i64,
}

/// Builds a SOAP 1.2 request for `operation`: the operation element carries the CRM
/// namespace as default `xmlns`, then `username`, `password`, `siteId`, then `params`
/// (already serialised, in the operation's order).
pub fn request(operation: &str, login: &Login<'_>, params: &str) -> String {
    let mut out = String::with_capacity(512 + params.len());
    out.push_str("<?xml version=\"1.0\" encoding=\"utf-8\"?>");
    out.push_str("<soap12:Envelope xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" ");
    out.push_str("xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\" xmlns:soap12=\"");
    out.push_str(SOAP12_ENV);
    out.push_str("\"><soap12:Body><");
    out.push_str(operation);
    out.push_str(" xmlns=\"");
    out.push_str(CRM_NS);
    out.push_str("\">");
    element(&mut out, "username", login.username);
    element(&mut out, "password", login.password);
    element(&mut out, "siteId", &login.site_id.to_string());
    out.push_str(params);
    out.push_str("</");
    out.push_str(operation);
    out.push_str("></soap12:Body></soap12:Envelope>");
    out
}

/// Serialises simple parameters `<name>value</name>` in the given order.
pub fn params(values: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (name, value) in values {
        element(&mut out, name, value);
    }
    out
}

/// A phone number (`PhoneNo`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PhoneNo {
    /// `phoneNoTypeID`.
    pub type_id: u32,
    /// `phoneNo`.
    pub number: String,
}

/// An address (`Address`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Address {
    /// `addressTypeID`.
    pub type_id: u32,
    /// `addressLine1`.
    pub line1: String,
    /// `addressLine2`.
    pub line2: String,
    /// `city`.
    pub city: String,
    /// `zipcode`.
    pub zipcode: String,
    /// `state`.
    pub state: String,
    /// `countryCode`.
    pub country_code: String,
}

/// A custom field value (`CrmFormFields`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CrmFormField {
    /// `fieldId`.
    pub field_id: i64,
    /// `fieldTypeId`.
    pub field_type_id: i64,
    /// `fieldName`.
    pub name: String,
    /// `fieldValue`.
    pub value: String,
}

/// A CRM form with values (`CrmForms`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CrmForm {
    /// `formId`.
    pub form_id: i64,
    /// `formName`.
    pub name: String,
    /// `crmFormFields`.
    pub fields: Vec<CrmFormField>,
}

/// The client's view of a `ContactRecord`: what it reads and what it writes.
///
/// For writing, `None` leaves an element out (the service keeps its value) and
/// `Some("")` sends it empty (the service clears it).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContactRecord {
    /// `entityId`; -1 for a contact the client does not know the id of.
    pub entity_id: i64,
    /// `externalId`.
    pub external_id: Option<String>,
    /// `emailAddress`.
    pub email_address: Option<String>,
    /// `deleted` (read only: never sent as true).
    pub deleted: bool,
    /// `fullName`.
    pub full_name: Option<String>,
    /// `firstName`.
    pub first_name: Option<String>,
    /// `lastName`.
    pub last_name: Option<String>,
    /// `createDate`, as the service wrote it (read only).
    pub create_date: Option<String>,
    /// `lastUpdateDate`, as the service wrote it (read only).
    pub last_update_date: Option<String>,
    /// `addresses`; `None`: not sent.
    pub addresses: Option<Vec<Address>>,
    /// `phoneNos`; `None`: not sent.
    pub phone_nos: Option<Vec<PhoneNo>>,
    /// `crmForms`; `None`: not sent.
    pub crm_forms: Option<Vec<CrmForm>>,
    /// `MasterOptIn`; `None`: not sent.
    pub master_opt_in: Option<bool>,
}

impl ContactRecord {
    /// Appends `<ContactRecord>…</ContactRecord>`, elements strictly in the documented
    /// order: entityId, externalId, emailAddress, (contactTitle), deleted, fullName,
    /// firstName, lastName, (username … ratingType: never sent), (relationships),
    /// addresses, phoneNos, crmForms, MasterOptIn.
    pub fn write(&self, out: &mut String) {
        out.push_str("<ContactRecord>");
        element(out, "entityId", &self.entity_id.to_string());
        let opt = |out: &mut String, name: &str, v: &Option<String>| {
            if let Some(v) = v {
                element(out, name, v);
            }
        };
        opt(out, "externalId", &self.external_id);
        opt(out, "emailAddress", &self.email_address);
        element(out, "deleted", "false");
        opt(out, "fullName", &self.full_name);
        opt(out, "firstName", &self.first_name);
        opt(out, "lastName", &self.last_name);
        if let Some(addresses) = &self.addresses {
            out.push_str("<addresses>");
            for a in addresses {
                out.push_str("<Address>");
                element(out, "addressTypeID", &a.type_id.to_string());
                element(out, "addressLine1", &a.line1);
                element(out, "addressLine2", &a.line2);
                element(out, "city", &a.city);
                element(out, "zipcode", &a.zipcode);
                element(out, "state", &a.state);
                element(out, "countryCode", &a.country_code);
                out.push_str("</Address>");
            }
            out.push_str("</addresses>");
        }
        if let Some(phones) = &self.phone_nos {
            out.push_str("<phoneNos>");
            for p in phones {
                out.push_str("<PhoneNo>");
                element(out, "phoneNoTypeID", &p.type_id.to_string());
                element(out, "phoneNo", &p.number);
                out.push_str("</PhoneNo>");
            }
            out.push_str("</phoneNos>");
        }
        if let Some(forms) = &self.crm_forms {
            out.push_str("<crmForms>");
            for f in forms {
                out.push_str("<CrmForms>");
                element(out, "formId", &f.form_id.to_string());
                element(out, "formName", &f.name);
                out.push_str("<crmFormFields>");
                for field in &f.fields {
                    out.push_str("<CrmFormFields>");
                    element(out, "fieldId", &field.field_id.to_string());
                    element(out, "fieldTypeId", &field.field_type_id.to_string());
                    element(out, "fieldName", &field.name);
                    element(out, "fieldValue", &field.value);
                    out.push_str("</CrmFormFields>");
                }
                out.push_str("</crmFormFields></CrmForms>");
            }
            out.push_str("</crmForms>");
        }
        if let Some(opt_in) = self.master_opt_in {
            element(out, "MasterOptIn", if opt_in { "true" } else { "false" });
        }
        out.push_str("</ContactRecord>");
    }

    /// Reads a `ContactRecord` (or a `…Result` of that type). Liberal: elements in any
    /// order, unknown ones ignored, blank strings as absent, booleans as
    /// `true`/`false`/`1`/`0`.
    pub fn read(node: &Node) -> Result<ContactRecord, String> {
        let text = |name: &str| {
            node.child(name)
                .filter(|c| !c.nil)
                .map(|c| c.text.trim().to_string())
                .filter(|t| !t.is_empty())
        };
        let entity_id = match text("entityId") {
            Some(v) => v
                .parse()
                .map_err(|_| format!("entityId {v:?} is not an integer"))?,
            None => return Err("the record has no entityId".into()),
        };
        let deleted = match text("deleted") {
            Some(v) => parse_bool(&v).ok_or_else(|| format!("deleted {v:?} is not a boolean"))?,
            None => false,
        };
        let master_opt_in = match text("MasterOptIn") {
            Some(v) => {
                Some(parse_bool(&v).ok_or_else(|| format!("MasterOptIn {v:?} is not a boolean"))?)
            }
            None => None,
        };
        let int = |n: &Node, name: &str| -> Result<i64, String> {
            let v = n.child(name).map(|c| c.text.trim()).unwrap_or("");
            v.parse()
                .map_err(|_| format!("{name} {v:?} is not an integer"))
        };
        let string = |n: &Node, name: &str| {
            n.child(name)
                .map(|c| c.text.trim().to_string())
                .unwrap_or_default()
        };
        let phone_nos = match node.child("phoneNos") {
            Some(list) => {
                let mut phones = Vec::new();
                for p in list.children_named("PhoneNo") {
                    phones.push(PhoneNo {
                        type_id: u32::try_from(int(p, "phoneNoTypeID")?)
                            .map_err(|e| e.to_string())?,
                        number: string(p, "phoneNo"),
                    });
                }
                Some(phones)
            }
            None => None,
        };
        let addresses = match node.child("addresses") {
            Some(list) => {
                let mut out = Vec::new();
                for a in list.children_named("Address") {
                    out.push(Address {
                        type_id: u32::try_from(int(a, "addressTypeID")?)
                            .map_err(|e| e.to_string())?,
                        line1: string(a, "addressLine1"),
                        line2: string(a, "addressLine2"),
                        city: string(a, "city"),
                        zipcode: string(a, "zipcode"),
                        state: string(a, "state"),
                        country_code: string(a, "countryCode"),
                    });
                }
                Some(out)
            }
            None => None,
        };
        let crm_forms = match node.child("crmForms") {
            Some(list) => {
                let mut forms = Vec::new();
                for f in list.children_named("CrmForms") {
                    let mut fields = Vec::new();
                    if let Some(field_list) = f.child("crmFormFields") {
                        for field in field_list.children_named("CrmFormFields") {
                            fields.push(CrmFormField {
                                field_id: int(field, "fieldId").unwrap_or(0),
                                field_type_id: int(field, "fieldTypeId").unwrap_or(0),
                                name: string(field, "fieldName"),
                                value: string(field, "fieldValue"),
                            });
                        }
                    }
                    forms.push(CrmForm {
                        form_id: int(f, "formId").unwrap_or(0),
                        name: string(f, "formName"),
                        fields,
                    });
                }
                Some(forms)
            }
            None => None,
        };
        Ok(ContactRecord {
            entity_id,
            external_id: text("externalId"),
            email_address: text("emailAddress"),
            deleted,
            full_name: text("fullName"),
            first_name: text("firstName"),
            last_name: text("lastName"),
            create_date: text("createDate"),
            last_update_date: text("lastUpdateDate"),
            addresses,
            phone_nos,
            crm_forms,
            master_opt_in,
        })
    }
}

/// Serialises `records` as a `contactsList`.
pub fn contacts_list(records: &[ContactRecord]) -> String {
    let mut out = String::from("<contactsList>");
    for r in records {
        r.write(&mut out);
    }
    out.push_str("</contactsList>");
    out
}

/// `true`/`false`/`1`/`0`, any case.
pub fn parse_bool(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" => Some(true),
        "false" | "0" => Some(false),
        _ => None,
    }
}

/// One element of an answer, its name resolved to (namespace, local name).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Node {
    /// The namespace URI; empty when unbound.
    pub ns: String,
    /// The local name.
    pub name: String,
    /// Child elements, in order.
    pub children: Vec<Node>,
    /// Text content, unescaped.
    pub text: String,
    /// `xsi:nil="true"`.
    pub nil: bool,
}

impl Node {
    /// The first child `name` in the CRM namespace (or in none: liberal).
    pub fn child(&self, name: &str) -> Option<&Node> {
        self.children
            .iter()
            .find(|c| c.name == name && (c.ns == CRM_NS || c.ns.is_empty()))
    }

    /// The children `name` in the CRM namespace (or in none).
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.children
            .iter()
            .filter(move |c| c.name == name && (c.ns == CRM_NS || c.ns.is_empty()))
    }

    fn child_in(&self, ns: &str, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.ns == ns && c.name == name)
    }
}

/// A SOAP Fault, in either version's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// `Code/Value` (1.2) or `faultcode` (1.1), e.g. `soap:Receiver`.
    pub code: String,
    /// `Reason/Text` (1.2) or `faultstring` (1.1): the service's words.
    pub text: String,
}

impl Fault {
    /// Whether the fault is the service's answer to a Retrieve of a record it does not
    /// hold: `Server was unable to process request. ---> ERROR: Contact record could not
    /// be retrieved.` (a Retrieve never answers "nobody" with an empty result).
    pub fn is_not_found(&self) -> bool {
        let t = self.text.to_ascii_lowercase();
        t.contains("could not be retrieved") || t.contains("could not be found")
    }

    /// Whether the fault says what is wrong with the request or a record in it
    /// (validation: "Invalid email address 'x' in record 3 of contactsList", "entityId
    /// must be an integer", a `soap:Sender`/`Client` code), or that a record is not
    /// there: the same call would fault again, so the outcome is final. Any other
    /// fault ("A database error occurred…", "Object reference not set…", a timeout) is
    /// the service's own trouble and worth trying again: the service reports its
    /// transient errors as faults too (inferred: the spec lists no codes, and a fault
    /// names a record only when one is at fault).
    pub fn is_about_the_request(&self) -> bool {
        let code = self.code.to_ascii_lowercase();
        if code.ends_with("sender") || code.ends_with("client") {
            return true;
        }
        let t = self.text.to_ascii_lowercase();
        self.is_not_found()
            || [
                "invalid",
                "of contactslist",
                "must be",
                "is not a",
                "is required",
                "required field",
                "too long",
                "not valid",
                "a maximum of",
                "already exists",
                "duplicate",
            ]
            .iter()
            .any(|p| t.contains(p))
    }

    /// Whether the fault is about the credentials or the site (the service says so
    /// only in words; these are the words it and the sandbox use).
    pub fn is_authentication(&self) -> bool {
        let t = self.text.to_ascii_lowercase();
        [
            "username or password",
            "invalid username",
            "invalid password",
            "invalid login",
            "login failed",
            "authentication",
            "invalid siteid",
            "invalid site id",
            "unauthorized",
            "not authorised",
            "not authorized",
            "invalid token",
            "access denied",
        ]
        .iter()
        .any(|p| t.contains(p))
    }
}

/// The body of an answer: the operation's response element, or a Fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The first element of the Body (`{CRM_NS}…Response`).
    Response(Node),
    /// A SOAP Fault.
    Fault(Fault),
}

/// Reads an answer envelope (SOAP 1.2 or 1.1, any prefixes).
pub fn parse_reply(body: &str) -> Result<Reply, String> {
    let root = parse_tree(body)?;
    if root.name != "Envelope" || (root.ns != SOAP12_ENV && root.ns != SOAP11_ENV) {
        return Err(format!(
            "not a SOAP envelope (root element {{{}}}{})",
            root.ns, root.name
        ));
    }
    let env = root.ns.clone();
    let body = root
        .child_in(&env, "Body")
        .ok_or_else(|| "the envelope has no Body".to_string())?;
    let first = body
        .children
        .first()
        .ok_or_else(|| "the SOAP Body is empty".to_string())?;
    if first.ns == env && first.name == "Fault" {
        let fault = if env == SOAP12_ENV {
            Fault {
                code: first
                    .child_in(&env, "Code")
                    .and_then(|c| c.child_in(&env, "Value"))
                    .map(|v| v.text.trim().to_string())
                    .unwrap_or_default(),
                text: first
                    .child_in(&env, "Reason")
                    .and_then(|r| r.children.iter().find(|c| c.ns == env && c.name == "Text"))
                    .map(|t| t.text.trim().to_string())
                    .unwrap_or_default(),
            }
        } else {
            // SOAP 1.1: faultcode and faultstring are unqualified.
            let text_of = |name: &str| {
                first
                    .children
                    .iter()
                    .find(|c| c.name == name && (c.ns.is_empty() || c.ns == env))
                    .map(|c| c.text.trim().to_string())
                    .unwrap_or_default()
            };
            Fault {
                code: text_of("faultcode"),
                text: text_of("faultstring"),
            }
        };
        return Ok(Reply::Fault(fault));
    }
    Ok(Reply::Response(first.clone()))
}

/// Parses a document into a namespace-resolved tree.
pub fn parse_tree(body: &str) -> Result<Node, String> {
    let mut reader = NsReader::from_str(body);
    reader.config_mut().expand_empty_elements = true;
    let mut stack: Vec<Node> = Vec::new();
    loop {
        let (resolved, event) = reader
            .read_resolved_event()
            .map_err(|e| format!("malformed XML: {e}"))?;
        match event {
            Event::Start(start) => {
                let ns = match resolved {
                    ResolveResult::Bound(ns) => String::from_utf8_lossy(ns.as_ref()).into_owned(),
                    ResolveResult::Unbound => String::new(),
                    ResolveResult::Unknown(p) => {
                        return Err(format!(
                            "malformed XML: undeclared prefix {}",
                            String::from_utf8_lossy(&p)
                        ))
                    }
                };
                let mut node = Node {
                    ns,
                    name: String::from_utf8_lossy(start.local_name().as_ref()).into_owned(),
                    ..Node::default()
                };
                for attr in start.attributes().flatten() {
                    let (attr_ns, local) = reader.resolve_attribute(attr.key);
                    if matches!(attr_ns, ResolveResult::Bound(n) if n.as_ref() == XSI_NS.as_bytes())
                        && local.as_ref() == b"nil"
                    {
                        node.nil = matches!(attr.value.as_ref(), b"true" | b"1");
                    }
                }
                stack.push(node);
            }
            Event::End(_) => {
                let node = stack.pop().ok_or("malformed XML: unbalanced end tag")?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(node),
                    None => return Ok(node),
                }
            }
            Event::Text(t) => {
                if let Some(top) = stack.last_mut() {
                    top.text
                        .push_str(&t.unescape().map_err(|e| format!("malformed XML: {e}"))?);
                }
            }
            Event::CData(c) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&String::from_utf8_lossy(&c.into_inner()));
                }
            }
            Event::Eof => return Err("malformed XML: the document ended early".into()),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(xml: &str) -> Vec<String> {
        let root = parse_tree(xml).unwrap();
        root.children.iter().map(|c| c.name.clone()).collect()
    }

    #[test]
    fn request_has_default_namespace_and_credentials_first() {
        let login = Login {
            username: "u<1>",
            password: "p&q",
            site_id: 123,
        };
        let xml = request(
            "ContactList_Retrieve",
            &login,
            &params(&[("lastUpdateDate", "2026-11-21T00:00:00")]),
        );
        assert!(xml.contains(&format!("<ContactList_Retrieve xmlns=\"{CRM_NS}\">")));
        assert!(xml.contains("<username>u&lt;1&gt;</username><password>p&amp;q</password><siteId>123</siteId><lastUpdateDate>"));
        let root = parse_tree(&xml).unwrap();
        assert_eq!(root.ns, SOAP12_ENV);
        let op = &root.children[0].children[0];
        assert_eq!(
            (op.ns.as_str(), op.name.as_str()),
            (CRM_NS, "ContactList_Retrieve")
        );
        assert!(op.children.iter().all(|c| c.ns == CRM_NS));
    }

    #[test]
    fn contact_record_elements_are_in_the_documented_order() {
        let record = ContactRecord {
            entity_id: -1,
            external_id: Some("E1".into()),
            email_address: Some("a@b.org".into()),
            full_name: Some("Ann Lee".into()),
            first_name: Some("Ann".into()),
            last_name: Some("Lee".into()),
            addresses: Some(vec![Address {
                type_id: 2,
                city: "Leeds".into(),
                ..Address::default()
            }]),
            phone_nos: Some(vec![PhoneNo {
                type_id: 3,
                number: "+44 1".into(),
            }]),
            crm_forms: Some(vec![CrmForm {
                form_id: 9,
                name: "F".into(),
                fields: vec![CrmFormField {
                    field_id: 1,
                    field_type_id: 1,
                    name: "Level".into(),
                    value: "Gold".into(),
                }],
            }]),
            master_opt_in: Some(false),
            ..ContactRecord::default()
        };
        let mut xml = String::new();
        record.write(&mut xml);
        let with_ns = xml.replacen(
            "<ContactRecord>",
            &format!("<ContactRecord xmlns=\"{CRM_NS}\">"),
            1,
        );
        assert_eq!(
            names(&with_ns),
            [
                "entityId",
                "externalId",
                "emailAddress",
                "deleted",
                "fullName",
                "firstName",
                "lastName",
                "addresses",
                "phoneNos",
                "crmForms",
                "MasterOptIn"
            ]
        );
        let root = parse_tree(&with_ns).unwrap();
        let address: Vec<_> = root.children[7].children[0]
            .children
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            address,
            [
                "addressTypeID",
                "addressLine1",
                "addressLine2",
                "city",
                "zipcode",
                "state",
                "countryCode"
            ]
        );
        let field: Vec<_> = root.children[9].children[0].children[2].children[0]
            .children
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(field, ["fieldId", "fieldTypeId", "fieldName", "fieldValue"]);
        // And it reads back the same.
        let back = ContactRecord::read(&root).unwrap();
        assert_eq!(back.external_id.as_deref(), Some("E1"));
        assert_eq!(back.master_opt_in, Some(false));
        assert_eq!(back.crm_forms.unwrap()[0].fields[0].value, "Gold");
    }

    #[test]
    fn reads_responses_whatever_the_prefixes() {
        let xml = format!(
            r#"<?xml version="1.0"?><s:Envelope xmlns:s="{SOAP12_ENV}"><s:Body>
            <r:ContactList_RetrieveResponse xmlns:r="{CRM_NS}"><r:ContactList_RetrieveResult>
              <r:ContactRecord><r:entityId>7</r:entityId><r:emailAddress>a@b.org</r:emailAddress>
              <r:deleted>1</r:deleted><r:lastUpdateDate>2026-01-02T03:04:05.123</r:lastUpdateDate>
              <r:phoneNos/></r:ContactRecord>
            </r:ContactList_RetrieveResult><r:moreRecords>true</r:moreRecords></r:ContactList_RetrieveResponse>
            </s:Body></s:Envelope>"#
        );
        let Reply::Response(resp) = parse_reply(&xml).unwrap() else {
            panic!("expected a response")
        };
        assert_eq!(resp.name, "ContactList_RetrieveResponse");
        let list = resp.child("ContactList_RetrieveResult").unwrap();
        let rec = ContactRecord::read(list.child("ContactRecord").unwrap()).unwrap();
        assert_eq!(rec.entity_id, 7);
        assert!(rec.deleted);
        assert_eq!(rec.phone_nos, Some(vec![]));
        assert_eq!(
            rec.last_update_date.as_deref(),
            Some("2026-01-02T03:04:05.123")
        );
    }

    #[test]
    fn a_prefix_bound_to_another_namespace_is_not_the_crm_namespace() {
        let xml = format!(
            r#"<soap:Envelope xmlns:soap="{SOAP12_ENV}"><soap:Body><x:Thing xmlns:x="urn:other"><x:entityId>1</x:entityId></x:Thing></soap:Body></soap:Envelope>"#
        );
        let Reply::Response(resp) = parse_reply(&xml).unwrap() else {
            panic!()
        };
        assert!(resp.child("entityId").is_none());
    }

    #[test]
    fn soap12_fault() {
        let xml = format!(
            r#"<env:Envelope xmlns:env="{SOAP12_ENV}"><env:Body><env:Fault><env:Code><env:Value>env:Receiver</env:Value></env:Code>
            <env:Reason><env:Text xml:lang="en">Server was unable to process request. ---&gt; ERROR: Invalid username or password.</env:Text></env:Reason></env:Fault></env:Body></env:Envelope>"#
        );
        let Reply::Fault(f) = parse_reply(&xml).unwrap() else {
            panic!()
        };
        assert_eq!(f.code, "env:Receiver");
        assert!(f.text.ends_with("ERROR: Invalid username or password."));
        assert!(f.is_authentication());
    }

    #[test]
    fn soap11_fault() {
        let xml = format!(
            r#"<a:Envelope xmlns:a="{SOAP11_ENV}"><a:Body><a:Fault><faultcode>a:Server</faultcode>
            <faultstring>Server was unable to process request. ---&gt; ERROR: Invalid email address 'x'</faultstring><detail/></a:Fault></a:Body></a:Envelope>"#
        );
        let Reply::Fault(f) = parse_reply(&xml).unwrap() else {
            panic!()
        };
        assert_eq!(f.code, "a:Server");
        assert!(f.text.contains("Invalid email address 'x'"));
        assert!(!f.is_authentication());
    }

    #[test]
    fn a_fault_is_final_only_when_it_says_what_is_wrong_with_the_request() {
        let fault = |code: &str, text: &str| Fault {
            code: code.into(),
            text: format!("Server was unable to process request. ---> ERROR: {text}"),
        };
        for text in [
            "Invalid email address 'x' in record 3 of contactsList.",
            "Contact 'a@b.c' (record 2 of contactsList) could not be saved (injected fault).",
            "entityId must be an integer.",
            "Contact record could not be retrieved.",
            "A maximum of 100 contacts can be sent per call; 101 were sent.",
        ] {
            assert!(
                fault("soap:Receiver", text).is_about_the_request(),
                "{text}"
            );
        }
        for text in [
            "A database error occurred while processing the request. Please try again later.",
            "Object reference not set to an instance of an object.",
            "Timeout expired.",
        ] {
            assert!(
                !fault("soap:Receiver", text).is_about_the_request(),
                "{text}"
            );
        }
        assert!(fault("soap:Sender", "Timeout expired.").is_about_the_request());
    }

    #[test]
    fn the_unknown_contact_fault_is_not_found_and_nothing_else_is() {
        let xml = format!(
            r#"<env:Envelope xmlns:env="{SOAP12_ENV}"><env:Body><env:Fault><env:Code><env:Value>env:Receiver</env:Value></env:Code>
            <env:Reason><env:Text xml:lang="en">Server was unable to process request. ---&gt; ERROR: Contact record could not be retrieved.</env:Text></env:Reason></env:Fault></env:Body></env:Envelope>"#
        );
        let Reply::Fault(f) = parse_reply(&xml).unwrap() else {
            panic!()
        };
        assert!(f.is_not_found());
        assert!(!f.is_authentication());
        for other in [
            "Server was unable to process request. ---> ERROR: Invalid email address 'x'",
            "Server was unable to process request. ---> ERROR: Invalid username or password.",
            "Server was unable to process request. ---> Timeout expired.",
        ] {
            let f = Fault {
                code: "soap:Receiver".into(),
                text: other.into(),
            };
            assert!(!f.is_not_found(), "{other}");
        }
    }

    #[test]
    fn garbage_is_an_error() {
        for doc in ["", "<html>oops</html>", "<a", "not xml"] {
            assert!(parse_reply(doc).is_err(), "{doc}");
        }
    }
}
