//! The `.asmx` endpoint: content type and `SOAPAction` checked the way ASP.NET checks
//! them, the envelope read, the caller authenticated, the operation dispatched.

use super::*;

pub(super) async fn soap_endpoint(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !uri.path().eq_ignore_ascii_case(ENDPOINT_PATH) {
        return plain(StatusCode::NOT_FOUND, "not found");
    }
    if method == Method::GET {
        return plain(
            StatusCode::OK,
            "Business Catalyst CRM web service sandbox: POST SOAP 1.1 or 1.2 requests here.",
        );
    }
    if method != Method::POST {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "only POST is served here");
    }

    let mut entry = SoapCall::default();
    let mut response = handle_soap(&shared, &headers, &body, &mut entry);
    if entry.status == 0 {
        entry.status = response.status().as_u16();
    }
    tracing::debug!(operation = %entry.operation, status = entry.status, "businesscatalyst sandbox: request");
    if let Ok(detail) = serde_json::to_value(&entry) {
        response.extensions_mut().insert(LogDetail(detail));
    }
    response
}

pub(super) fn handle_soap(
    shared: &Shared,
    headers: &HeaderMap,
    body: &[u8],
    entry: &mut SoapCall,
) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut parts = content_type.split(';').map(str::trim);
    let media = parts.next().unwrap_or("").to_ascii_lowercase();
    let version = match media.as_str() {
        "text/xml" => SoapVersion::V11,
        "application/soap+xml" => SoapVersion::V12,
        _ => {
            entry.status = 415;
            return plain(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "expected Content-Type text/xml (SOAP 1.1) or application/soap+xml (SOAP 1.2)",
            );
        }
    };
    entry.soap_version = Some(version);
    let action_param = parts
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("action"))
        .map(|(_, v)| v.trim().trim_matches('"').to_string());
    let answer = process(shared, version, headers, action_param, body, entry);
    let (status, xml_body) = match answer {
        Answer::Ok(inner) => (StatusCode::OK, xml::envelope(version, &inner)),
        Answer::Fault { sender, text } => {
            entry.fault = Some(text.clone());
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                xml::fault(version, sender, &text),
            )
        }
    };
    (
        status,
        [(header::CONTENT_TYPE, version.content_type())],
        xml_body,
    )
        .into_response()
}

pub(super) fn process(
    shared: &Shared,
    version: SoapVersion,
    headers: &HeaderMap,
    action_param: Option<String>,
    body: &[u8],
    entry: &mut SoapCall,
) -> Answer {
    let sender_fault = |text: String| Answer::Fault { sender: true, text };
    let Ok(text) = std::str::from_utf8(body) else {
        return sender_fault("The request body is not UTF-8.".into());
    };
    // XmlSerializer refuses characters XML 1.0 cannot carry, raw or as references.
    if let Some((at, c)) = invalid_xml_char(text) {
        return sender_fault(format!(
            "Server was unable to read request. ---> There is an error in XML document (1, {}). ---> '{}', hexadecimal value 0x{:02X}, is an invalid character.",
            at + 1,
            c.escape_unicode(),
            c as u32
        ));
    }
    let root = match xml::parse_document(text) {
        Ok(root) => root,
        Err(e) => return sender_fault(format!("Server was unable to read request. ---> {e}")),
    };
    if root.name != "Envelope" || (root.ns != xml::SOAP11_NS && root.ns != xml::SOAP12_NS) {
        return sender_fault("The root element is not a SOAP Envelope.".into());
    }
    if root.ns != version.namespace() {
        return sender_fault(format!(
            "VersionMismatch: the envelope namespace {} does not go with this Content-Type.",
            root.ns
        ));
    }
    let Some(op) = root
        .children
        .iter()
        .find(|c| c.ns == root.ns && c.name == "Body")
        .and_then(|b| b.children.first())
    else {
        return sender_fault("The SOAP Body is missing or empty.".into());
    };
    entry.operation = op.name.clone();
    if op.ns != CRM_NS {
        return sender_fault(format!(
            "Server did not recognize the value of HTTP Header SOAPAction or the operation {{{}}}{}.",
            op.ns, op.name
        ));
    }
    let expected_action = format!("{CRM_NS}/{}", op.name);
    let action = match version {
        SoapVersion::V11 => match headers.get("soapaction").and_then(|v| v.to_str().ok()) {
            Some(v) => Some(v.trim().trim_matches('"').to_string()),
            None => return sender_fault("The SOAPAction header is required for SOAP 1.1.".into()),
        },
        SoapVersion::V12 => action_param,
    };
    if let Some(action) = action {
        if action != expected_action {
            return sender_fault(format!(
                "Server did not recognize the value of HTTP Header SOAPAction: {action}."
            ));
        }
    }
    entry.last_update_date = op.crm_text("lastUpdateDate").map(String::from);
    entry.record_start = op.crm_text("recordStart").and_then(|v| v.parse().ok());

    if let Some(fault) = authenticate(&shared.credentials, op) {
        return fault;
    }
    let mut inner = shared.lock();
    let answer = dispatch(&mut inner, op, entry);
    if entry.wrote {
        if let Err(e) = shared.save_store(&inner.store) {
            tracing::error!(error = %e, "businesscatalyst sandbox: cannot save its data file");
            return error_fault(format!("storage failure: {e}"));
        }
    }
    answer
}

pub(super) fn authenticate(credentials: &Credentials, op: &XmlNode) -> Option<Answer> {
    let username = op.crm_text("username").unwrap_or("");
    let password = op.crm_text("password").unwrap_or("");
    let site_ok = match op.crm_text("siteId").map(str::parse::<i64>) {
        Some(Ok(id)) => id == credentials.site_id,
        Some(Err(_)) => return Some(error_fault("siteId must be an integer.")),
        None => false,
    };
    let login_ok = if username.is_empty() {
        credentials.username.is_empty() && password == credentials.password
            || credentials.site_token.as_deref() == Some(password) && !password.is_empty()
    } else {
        username == credentials.username && password == credentials.password
    };
    if !login_ok {
        return Some(error_fault("Invalid username or password."));
    }
    if !site_ok {
        return Some(error_fault(
            "Invalid siteId, or the user has no access to this site.",
        ));
    }
    None
}

pub(super) fn dispatch(inner: &mut Inner, op: &XmlNode, entry: &mut SoapCall) -> Answer {
    let name = op.name.as_str();
    match name {
        "ContactList_Retrieve" => retrieve_list(inner, op, entry),
        "ContactList_UpdateInsert" => update_insert(inner, op, entry),
        "Contact_RetrieveByEntityID" => {
            let Some(id) = op.crm_text("entityId").and_then(|v| v.parse::<i64>().ok()) else {
                return error_fault("entityId must be an integer.");
            };
            single_result(name, inner.store.by_entity_id(id))
        }
        "Contact_RetrieveByExternalID" => {
            let ext = op.crm_text("externalId").unwrap_or("");
            single_result(name, inner.store.by_external_id(ext))
        }
        "Contact_RetrieveByEmailAddress" => {
            let email = op
                .crm_text("emailAddress")
                .or(op.crm_text("email"))
                .unwrap_or("");
            single_result(name, inner.store.by_email(email))
        }
        "Contact_DeleteByEntityID" => {
            let Some(id) = op.crm_text("entityId").and_then(|v| v.parse::<i64>().ok()) else {
                return error_fault("entityId must be an integer.");
            };
            let now = inner.now_local();
            let done = inner.store.delete_entity(id, now);
            entry.wrote = done;
            bool_result(name, done)
        }
        "Contact_DeleteByEmailAddress" => {
            let email = op
                .crm_text("email")
                .or(op.crm_text("emailAddress"))
                .unwrap_or("");
            let now = inner.now_local();
            let id = inner.store.by_email(email).map(|c| c.entity_id);
            let done = id.is_some_and(|id| inner.store.delete_entity(id, now));
            entry.wrote = done;
            bool_result(name, done)
        }
        other => Answer::Fault {
            sender: true,
            text: format!(
                "Server did not recognize the value of HTTP Header SOAPAction: {CRM_NS}/{other}."
            ),
        },
    }
}

/// The first character XML 1.0 cannot carry, raw or as a `&#…;` reference, and where.
pub(super) fn invalid_xml_char(text: &str) -> Option<(usize, char)> {
    let allowed = |c: char| {
        matches!(c, '\t' | '\n' | '\r') || (c >= ' ' && c != '\u{FFFE}' && c != '\u{FFFF}')
    };
    if let Some((at, c)) = text.char_indices().find(|&(_, c)| !allowed(c)) {
        return Some((at, c));
    }
    let mut rest = text;
    let mut offset = 0;
    while let Some(start) = rest.find("&#") {
        let tail = &rest[start + 2..];
        let end = tail.find(';')?;
        let number = &tail[..end];
        let value = match number.strip_prefix(['x', 'X']) {
            Some(hex) => u32::from_str_radix(hex, 16).ok(),
            None => number.parse().ok(),
        };
        if let Some(c) = value.and_then(char::from_u32).filter(|c| !allowed(*c)) {
            return Some((offset + start, c));
        }
        offset += start + 2 + end;
        rest = &tail[end..];
    }
    None
}
