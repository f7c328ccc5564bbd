//! Reading subscribers out of Poppulo: `GET /{account}/subscribers?status=all`, then
//! every `<link rel="next">` until there is none, one page in memory at a time.
//!
//! A read is complete only when the last page was reached: an error on any page ends the
//! read with that error, never with a short list (which the engine would take for
//! removals).

use std::collections::{HashSet, VecDeque};

use contactsync_core::async_trait;
use contactsync_core::{
    ConnectorError, Contact, ContactStatus, Field, Origin, ReadMode, ReadOutcome, RecordError,
    RecordStream, Source, SourceItem, SourceRecord,
};

use crate::client::PoppuloClient;
use crate::config::SourceConfig;
use crate::xml::{parse_time, Element};

/// The Poppulo source. Built by the `poppulo` [`contactsync_core::SourceFactory`].
#[derive(Debug)]
pub struct PoppuloSource {
    config: SourceConfig,
    client: PoppuloClient,
}

impl PoppuloSource {
    /// A source for `config`. Touches no network.
    pub fn new(config: SourceConfig) -> Result<Self, ConnectorError> {
        let client = PoppuloClient::new(&config.connection)?;
        Ok(PoppuloSource { config, client })
    }
}

#[async_trait]
impl Source for PoppuloSource {
    async fn check(&self) -> Result<(), ConnectorError> {
        self.client
            .subscribers_page(&self.config.status, None)
            .await
            .map(|_| ())
    }

    async fn read(&self, _mode: ReadMode) -> Result<Box<dyn RecordStream>, ConnectorError> {
        Ok(Box::new(SubscriberStream {
            client: self.client.clone(),
            status: self.config.status.clone(),
            call: format!("GET /{}/subscribers", self.client.account()),
            next: None,
            started: false,
            done: false,
            page: 0,
            buffer: VecDeque::new(),
            seen_links: HashSet::new(),
        }))
    }
}

/// A read in progress: the current page's items and the next page's link.
struct SubscriberStream {
    client: PoppuloClient,
    status: String,
    call: String,
    next: Option<String>,
    started: bool,
    done: bool,
    page: u64,
    buffer: VecDeque<SourceItem>,
    seen_links: HashSet<String>,
}

impl SubscriberStream {
    async fn fetch(&mut self) -> Result<(), ConnectorError> {
        let href = if self.started {
            match self.next.take() {
                Some(h) => Some(h),
                None => {
                    self.done = true;
                    return Ok(());
                }
            }
        } else {
            self.started = true;
            None
        };
        let (call, page) = self
            .client
            .subscribers_page(&self.status, href.as_deref())
            .await?;
        self.page += 1;
        tracing::debug!(
            page = self.page,
            items = page.subscribers.len(),
            "Poppulo subscribers page"
        );
        for (i, element) in page.subscribers.iter().enumerate() {
            let origin = Origin::Page {
                call: self.call.clone(),
                page: self.page,
                index: i as u64 + 1,
            };
            self.buffer.push_back(match subscriber_to_contact(element) {
                Ok(contact) => SourceItem::Record(Box::new(SourceRecord::new(contact, origin))),
                Err((field, reason)) => {
                    let mut e = RecordError::new(origin, reason);
                    if let Some(f) = field {
                        e = e.with_field(f);
                    }
                    SourceItem::Rejected(Box::new(e))
                }
            });
        }
        match page.next {
            Some(next) => {
                if !self.seen_links.insert(next.clone()) {
                    return Err(ConnectorError::Protocol {
                        call,
                        message: format!(
                            "the `next` links loop back to a page already read (page {})",
                            self.page
                        ),
                    });
                }
                self.next = Some(next);
            }
            None => self.done = true,
        }
        Ok(())
    }
}

#[async_trait]
impl RecordStream for SubscriberStream {
    async fn next(&mut self) -> Result<Option<SourceItem>, ConnectorError> {
        loop {
            if let Some(item) = self.buffer.pop_front() {
                return Ok(Some(item));
            }
            if self.done {
                return Ok(None);
            }
            self.fetch().await?;
        }
    }

    async fn finish(self: Box<Self>) -> Result<ReadOutcome, ConnectorError> {
        Ok(ReadOutcome {
            complete: self.done && self.buffer.is_empty(),
            cursor: None,
        })
    }
}

/// Maps a `<subscriber>` into a [`Contact`]; on failure, the field at fault and why.
///
/// `UNCONFIRMED` people (who have not confirmed their subscription) are read as
/// inactive: they are not mailed.
pub fn subscriber_to_contact(e: &Element) -> Result<Contact, (Option<String>, String)> {
    let mut c = Contact::default();
    let set = |c: &mut Contact,
               field: Field,
               value: Option<&str>|
     -> Result<(), (Option<String>, String)> {
        if let Some(v) = value {
            c.set(&field, v)
                .map_err(|m| (Some(field.name().to_string()), m))?;
        }
        Ok(())
    };
    let email = e.value("email");
    if email.is_none() {
        return Err((Some("email".into()), "the subscriber has no email".into()));
    }
    set(&mut c, Field::Email, email)?;
    set(&mut c, Field::FirstName, e.value("first_name"))?;
    set(
        &mut c,
        Field::LastName,
        e.value("surname").or_else(|| e.value("last_name")),
    )?;
    set(&mut c, Field::Company, e.value("company"))?;
    set(
        &mut c,
        Field::JobTitle,
        e.value("position_company").or_else(|| e.value("position")),
    )?;
    set(
        &mut c,
        Field::ExternalId,
        e.value("external_id").or_else(|| e.value("externalId")),
    )?;
    set(
        &mut c,
        Field::Phone,
        e.value("phone_number").or_else(|| e.value("phone")),
    )?;
    set(
        &mut c,
        Field::Mobile,
        e.value("mobile_number").or_else(|| e.value("mobile")),
    )?;
    set(&mut c, Field::Language, e.value("language"))?;
    let department = e.value("department").or_else(|| {
        ["work_details", "workDetails"]
            .iter()
            .find_map(|n| e.child(n).and_then(|w| w.value("department")))
    });
    set(&mut c, Field::Department, department)?;
    if let Some(status) = e.value("status") {
        c.status = match status.trim().to_ascii_uppercase().as_str() {
            "ACTIVE" => ContactStatus::Active,
            "INACTIVE" | "UNCONFIRMED" => ContactStatus::Inactive,
            "OPT_OUT" | "OPTED_OUT" | "OPTOUT" => ContactStatus::OptedOut,
            _ => {
                return Err((
                    Some("status".into()),
                    format!("unknown Poppulo status {status:?}"),
                ))
            }
        };
    }
    if let Some(fields) = e.child("custom_fields") {
        for f in fields.children_named("custom_field") {
            if let Some(name) = f.attr("name").map(str::trim).filter(|n| !n.is_empty()) {
                let value = f.value("value").unwrap_or(f.text.trim());
                c.set(&Field::Attribute(name.to_string()), value)
                    .map_err(|m| (Some(name.to_string()), m))?;
            }
        }
    }
    if let Some(perms) = e.child("permissions") {
        c.subscriptions = perms
            .children_named("permission")
            .filter_map(|p| p.attr("name").or(Some(p.text.trim())))
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .collect();
    }
    c.updated_at = e.attr("date_modified").and_then(parse_time);
    Ok(c)
}
