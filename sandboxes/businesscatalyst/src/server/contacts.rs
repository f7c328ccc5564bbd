//! The CRM operations on contacts: retrieve a page by last update, upsert a batch,
//! look one up, delete one; and the `ContactRecord` element read and written.

use super::*;

pub(super) fn bool_result(op: &str, value: bool) -> Answer {
    Answer::Ok(format!(
        "<{op}Response xmlns=\"{CRM_NS}\"><{op}Result>{value}</{op}Result></{op}Response>"
    ))
}

/// What the service says when a `Contact_RetrieveBy*` finds nobody: a fault, never an
/// empty answer (public client code that wraps the service documents these words).
pub const NOT_RETRIEVED: &str = "Contact record could not be retrieved.";
/// The words of [`crate::Faults::transient_faults`]: the service's trouble, no record's.
pub const TRANSIENT: &str =
    "A database error occurred while processing the request. Please try again later.";

/// A `Contact_RetrieveBy*` answer; no contact: the service's fault.
pub(super) fn single_result(op: &str, contact: Option<&SandboxContact>) -> Answer {
    match contact {
        Some(c) => Answer::Ok(format!(
            "<{op}Response xmlns=\"{CRM_NS}\"><{op}Result>{}</{op}Result></{op}Response>",
            contact_fields(c)
        )),
        None => error_fault(NOT_RETRIEVED),
    }
}

/// Parses a date as the service would: site-local, with or without fraction; a
/// zoned value is converted into the site's zone; a bare date means midnight.
pub(super) fn parse_date(value: &str, tz: Tz) -> Option<NaiveDateTime> {
    let value = value.trim();
    let local = || NaiveDateTime::parse_from_str(value, "%Y-%m-%dT%H:%M:%S%.f").ok();
    let zoned = || DateTime::parse_from_rfc3339(value).ok();
    let day = || chrono::NaiveDate::parse_from_str(value, "%Y-%m-%d").ok();
    local()
        .or_else(|| zoned().map(|d| d.with_timezone(&tz).naive_local()))
        .or_else(|| day()?.and_hms_opt(0, 0, 0))
}

pub(super) fn format_date(date: Option<NaiveDateTime>) -> String {
    match date {
        None => UNSET_DATE.to_string(),
        Some(d) if d.and_utc().timestamp_subsec_millis() == 0 => {
            d.format("%Y-%m-%dT%H:%M:%S").to_string()
        }
        Some(d) => d.format("%Y-%m-%dT%H:%M:%S%.3f").to_string(),
    }
}

pub(super) fn retrieve_list(inner: &mut Inner, op: &XmlNode, entry: &mut SoapCall) -> Answer {
    let since = match op.crm_text("lastUpdateDate") {
        None | Some("") => None,
        Some(v) => match parse_date(v, inner.time_zone) {
            Some(d) => Some(d),
            None => return error_fault(format!("lastUpdateDate {v:?} is not a date.")),
        },
    };
    let since = since.unwrap_or(NaiveDateTime::MIN);
    let start = match op.crm_text("recordStart").map(str::parse::<i64>) {
        None => 0,
        Some(Ok(n)) if n >= 0 => n,
        Some(_) => return error_fault("recordStart must be a non-negative integer."),
    };
    let start = usize::try_from(start).unwrap_or(usize::MAX);
    if start > 0 && inner.faults.edit_while_paging > 0 {
        inner.faults.edit_while_paging -= 1;
        let now = inner.now_local();
        inner.store.edit_head(since, now);
    }
    let (page, more) = inner.store.list_since(since, start);
    entry.records = page.len();
    let records: String = page
        .iter()
        .map(|c| format!("<ContactRecord>{}</ContactRecord>", contact_fields(c)))
        .collect();
    let more = if inner.faults.omit_more_records {
        String::new()
    } else {
        format!("<moreRecords>{more}</moreRecords>")
    };
    Answer::Ok(format!(
        "<ContactList_RetrieveResponse xmlns=\"{CRM_NS}\"><ContactList_RetrieveResult>{records}\
         </ContactList_RetrieveResult><recordStart>{start}</recordStart>{more}\
         </ContactList_RetrieveResponse>"
    ))
}

pub(super) fn update_insert(inner: &mut Inner, op: &XmlNode, entry: &mut SoapCall) -> Answer {
    let records: Vec<&XmlNode> = op
        .crm_child("contactsList")
        .map(|list| list.crm_children("ContactRecord").collect())
        .unwrap_or_default();
    entry.records = records.len();
    if inner.faults.transient_faults > 0 {
        inner.faults.transient_faults -= 1;
        return error_fault(TRANSIENT);
    }
    if records.len() > MAX_BATCH {
        return error_fault(format!(
            "A maximum of {MAX_BATCH} contacts can be sent per call; {} were sent.",
            records.len()
        ));
    }
    // Validate the whole batch first: a faulty record faults the call, and nothing of
    // it is written (inferred: the service's bulk call is one transaction).
    let mut parsed = Vec::with_capacity(records.len());
    for (i, node) in records.iter().enumerate() {
        let record = match parse_record(node, &mut entry.ignored_elements) {
            Ok(r) => r,
            Err(e) => return error_fault(format!("record {} of contactsList: {e}", i + 1)),
        };
        if let Some(email) = record
            .email_address
            .as_deref()
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            if !email_is_acceptable(email) {
                return error_fault(format!(
                    "Invalid email address '{email}' in record {} of contactsList.",
                    i + 1
                ));
            }
            if inner
                .faults
                .fault_on_emails
                .iter()
                .any(|f| f.trim().eq_ignore_ascii_case(email))
            {
                return error_fault(format!(
                    "Contact '{email}' (record {} of contactsList) could not be saved (injected fault).",
                    i + 1
                ));
            }
        }
        parsed.push(record);
    }
    let now = inner.now_local();
    for record in parsed {
        inner.store.upsert(record, now);
    }
    entry.wrote = !records.is_empty();
    Answer::Ok(format!(
        "<ContactList_UpdateInsertResponse xmlns=\"{CRM_NS}\" />"
    ))
}

/// `ContactRecord` elements in the order XmlSerializer expects them.
pub(super) const RECORD_ORDER: [&str; 22] = [
    "entityId",
    "externalId",
    "emailAddress",
    "contactTitle",
    "deleted",
    "fullName",
    "firstName",
    "lastName",
    "username",
    "password",
    "dateOfBirth",
    "createDate",
    "lastUpdateDate",
    "customerType",
    "industryType",
    "leadSourceType",
    "ratingType",
    "relationships",
    "addresses",
    "phoneNos",
    "crmForms",
    "MasterOptIn",
];

pub(super) fn parse_bool(value: &str) -> Result<bool, String> {
    match value.trim() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        other => Err(format!("{other:?} is not a boolean")),
    }
}

pub(super) fn parse_int<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, String> {
    value
        .trim()
        .parse()
        .map_err(|_| format!("{name} {value:?} is not an integer"))
}

/// Reads a `ContactRecord` the way XmlSerializer does: known elements in the CRM
/// namespace in the documented order; an element out of order (or unknown) is ignored,
/// and noted in the request log so tests see it.
pub(super) fn parse_record(
    node: &XmlNode,
    ignored: &mut Vec<String>,
) -> Result<IncomingRecord, String> {
    let mut record = IncomingRecord::default();
    let mut last = 0usize;
    for child in &node.children {
        let position = RECORD_ORDER
            .iter()
            .position(|n| *n == child.name && child.ns == CRM_NS);
        let Some(position) = position.filter(|p| *p >= last) else {
            ignored.push(child.name.clone());
            continue;
        };
        last = position;
        let text = || {
            if child.nil {
                None
            } else {
                Some(child.text.clone())
            }
        };
        match child.name.as_str() {
            "entityId" => record.entity_id = Some(parse_int("entityId", &child.text)?),
            "externalId" => record.external_id = text(),
            "emailAddress" => record.email_address = text(),
            "contactTitle" => record.contact_title = text(),
            "fullName" => record.full_name = text(),
            "firstName" => record.first_name = text(),
            "lastName" => record.last_name = text(),
            "username" => record.username = text(),
            "dateOfBirth" => record.date_of_birth = text(),
            "customerType" => record.customer_type = text(),
            "industryType" => record.industry_type = text(),
            "leadSourceType" => record.lead_source_type = text(),
            "ratingType" => record.rating_type = text(),
            "addresses" => {
                let mut list = Vec::new();
                for a in child.crm_children("Address") {
                    let part = |n: &str| a.crm_text(n).unwrap_or("").to_string();
                    list.push(SandboxAddress {
                        address_type_id: parse_int(
                            "addressTypeID",
                            a.crm_text("addressTypeID").unwrap_or(""),
                        )?,
                        address_line1: part("addressLine1"),
                        address_line2: part("addressLine2"),
                        city: part("city"),
                        zipcode: part("zipcode"),
                        state: part("state"),
                        country_code: part("countryCode"),
                    });
                }
                record.addresses = Some(list);
            }
            "phoneNos" => {
                let mut list = Vec::new();
                for p in child.crm_children("PhoneNo") {
                    list.push(SandboxPhone {
                        phone_no_type_id: parse_int(
                            "phoneNoTypeID",
                            p.crm_text("phoneNoTypeID").unwrap_or(""),
                        )?,
                        phone_no: p.crm_text("phoneNo").unwrap_or("").to_string(),
                    });
                }
                record.phone_nos = Some(list);
            }
            "crmForms" => {
                let mut forms = Vec::new();
                for f in child.crm_children("CrmForms") {
                    let mut fields = Vec::new();
                    for field in f
                        .crm_child("crmFormFields")
                        .map(|c| c.crm_children("CrmFormFields").collect::<Vec<_>>())
                        .unwrap_or_default()
                    {
                        fields.push(SandboxCrmField {
                            field_id: parse_int(
                                "fieldId",
                                field.crm_text("fieldId").unwrap_or("0"),
                            )?,
                            field_type_id: parse_int(
                                "fieldTypeId",
                                field.crm_text("fieldTypeId").unwrap_or("1"),
                            )?,
                            field_name: field.crm_text("fieldName").unwrap_or("").to_string(),
                            field_value: field.crm_text("fieldValue").unwrap_or("").to_string(),
                        });
                    }
                    forms.push(SandboxCrmForm {
                        form_id: parse_int("formId", f.crm_text("formId").unwrap_or("0"))?,
                        form_name: f.crm_text("formName").unwrap_or("").to_string(),
                        fields,
                    });
                }
                record.crm_forms = Some(forms);
            }
            "MasterOptIn" => {
                record.master_opt_in =
                    Some(parse_bool(&child.text).map_err(|e| format!("MasterOptIn: {e}"))?)
            }
            // deleted, password, createDate, lastUpdateDate, relationships: read-only or
            // not modelled by the sandbox.
            _ => {}
        }
    }
    Ok(record)
}

/// A contact's fields, every element in the documented order (null strings left out,
/// as XmlSerializer does).
pub(super) fn contact_fields(c: &SandboxContact) -> String {
    let mut out = String::new();
    let opt = |out: &mut String, name: &str, v: &Option<String>| {
        if let Some(v) = v {
            out.push_str(&format!("<{name}>{}</{name}>", esc(v)));
        }
    };
    out.push_str(&format!("<entityId>{}</entityId>", c.entity_id));
    opt(&mut out, "externalId", &c.external_id);
    opt(&mut out, "emailAddress", &c.email_address);
    opt(&mut out, "contactTitle", &c.contact_title);
    out.push_str(&format!("<deleted>{}</deleted>", c.deleted));
    opt(&mut out, "fullName", &c.full_name);
    opt(&mut out, "firstName", &c.first_name);
    opt(&mut out, "lastName", &c.last_name);
    opt(&mut out, "username", &c.username);
    opt(&mut out, "dateOfBirth", &c.date_of_birth);
    out.push_str(&format!(
        "<createDate>{}</createDate>",
        format_date(c.create_date)
    ));
    out.push_str(&format!(
        "<lastUpdateDate>{}</lastUpdateDate>",
        format_date(c.last_update_date)
    ));
    opt(&mut out, "customerType", &c.customer_type);
    opt(&mut out, "industryType", &c.industry_type);
    opt(&mut out, "leadSourceType", &c.lead_source_type);
    opt(&mut out, "ratingType", &c.rating_type);
    out.push_str("<relationships />");
    out.push_str("<addresses>");
    for a in &c.addresses {
        out.push_str(&format!(
            "<Address><addressTypeID>{}</addressTypeID><addressLine1>{}</addressLine1>\
             <addressLine2>{}</addressLine2><city>{}</city><zipcode>{}</zipcode><state>{}</state>\
             <countryCode>{}</countryCode></Address>",
            a.address_type_id,
            esc(&a.address_line1),
            esc(&a.address_line2),
            esc(&a.city),
            esc(&a.zipcode),
            esc(&a.state),
            esc(&a.country_code)
        ));
    }
    out.push_str("</addresses><phoneNos>");
    for p in &c.phone_nos {
        out.push_str(&format!(
            "<PhoneNo><phoneNoTypeID>{}</phoneNoTypeID><phoneNo>{}</phoneNo></PhoneNo>",
            p.phone_no_type_id,
            esc(&p.phone_no)
        ));
    }
    out.push_str("</phoneNos><crmForms>");
    for f in &c.crm_forms {
        out.push_str(&format!(
            "<CrmForms><formId>{}</formId><formName>{}</formName><crmFormFields>",
            f.form_id,
            esc(&f.form_name)
        ));
        for field in &f.fields {
            out.push_str(&format!(
                "<CrmFormFields><fieldId>{}</fieldId><fieldTypeId>{}</fieldTypeId><fieldName>{}</fieldName>\
                 <fieldValue>{}</fieldValue></CrmFormFields>",
                field.field_id,
                field.field_type_id,
                esc(&field.field_name),
                esc(&field.field_value)
            ));
        }
        out.push_str("</crmFormFields></CrmForms>");
    }
    out.push_str("</crmForms>");
    out.push_str(&format!("<MasterOptIn>{}</MasterOptIn>", c.master_opt_in));
    out
}
