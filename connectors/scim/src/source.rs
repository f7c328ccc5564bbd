//! Reading users back: `GET /Users?startIndex=…&count=…` (1-based), one page in memory
//! at a time.
//!
//! A full read is complete only when its pages covered `totalResults`, no id came
//! twice and the total did not change while paging: a server that reorders or gains
//! users while a client pages can make a page skip someone, and a read that might have
//! skipped someone removes nobody. An incremental read asks for
//! `filter=meta.lastModified gt "CURSOR"` when the server supports filters (a full read
//! otherwise, or when the server refuses that filter); it is never complete. The cursor
//! is the latest `meta.lastModified` read.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use contactsync_core::async_trait;
use contactsync_core::{
    CheckFindings, ConnectorError, Origin, ReadMode, ReadOutcome, RecordStream, Source,
    SourceCapabilities, SourceItem, SourceRecord,
};
use serde_json::{Map, Value};

use crate::client::{quoted, ScimClient};
use crate::config::ScimConfig;
use crate::user::Mapping;

/// The SCIM source. Built by the `scim` [`contactsync_core::SourceFactory`].
#[derive(Debug)]
pub struct ScimSource {
    client: ScimClient,
    config: ScimConfig,
    /// What `check` found the server supports.
    described: CheckFindings,
}

impl ScimSource {
    /// A source for `config`. Touches no network.
    pub fn new(config: ScimConfig) -> Result<Self, ConnectorError> {
        Ok(ScimSource {
            client: ScimClient::new(&config.connection)?,
            config,
            described: CheckFindings::default(),
        })
    }
}

impl ScimSource {
    /// The subscriptions each user has through the groups named in `groups`, from the
    /// groups' `members` (many servers do not show a user's `groups`).
    async fn memberships(&self) -> Result<HashMap<String, BTreeSet<String>>, ConnectorError> {
        let mut memberships: HashMap<String, BTreeSet<String>> = HashMap::new();
        for (subscription, name) in &self.config.groups {
            let Some(group) = self.client.find("Groups", "displayName", name).await? else {
                tracing::warn!("the group {name:?} (groups.{subscription}) is not in the app: nobody has {subscription}");
                continue;
            };
            let members = group.get("members").and_then(Value::as_array);
            for id in members
                .into_iter()
                .flatten()
                .filter_map(|m| m.get("value").and_then(Value::as_str))
            {
                memberships
                    .entry(id.to_string())
                    .or_default()
                    .insert(subscription.clone());
            }
        }
        Ok(memberships)
    }
}

#[async_trait]
impl Source for ScimSource {
    fn capabilities(&self) -> SourceCapabilities {
        SourceCapabilities {
            incremental: true,
            reports_deletions: false,
            // Incremental reads cannot see deletions: a full read a week.
            full_every: Some(7),
            skips_unchanged: false,
        }
    }

    async fn check(&self) -> Result<(), ConnectorError> {
        let provider = self.client.provider().await?;
        let page = self.client.page("Users", 1, 1, None).await?;
        let described = format!("{provider}; {} users", page.total);
        tracing::info!(
            "SCIM server {}: {described}",
            self.config.connection.http.base_url
        );
        self.described.set(described);
        Ok(())
    }

    fn described(&self) -> Option<String> {
        self.described.get()
    }

    async fn read(&self, mode: ReadMode) -> Result<Box<dyn RecordStream>, ConnectorError> {
        let since = match mode {
            ReadMode::Incremental { cursor: Some(c) } if self.client.provider().await?.filter => {
                Some(c)
            }
            _ => None,
        };
        let started = std::time::Instant::now();
        let memberships = self.memberships().await?;
        let mut users = Users {
            started,
            memberships,
            client: self.client.clone(),
            mapping: self.config.mapping.clone(),
            groups: self.config.groups.clone(),
            page_size: self.config.page_size,
            filter: since
                .as_deref()
                .map(|c| format!("meta.lastModified gt {}", quoted(c))),
            next_index: 1,
            page: 0,
            total: None,
            call: String::new(),
            buffer: VecDeque::new(),
            seen: HashSet::new(),
            complete: true,
            finished: false,
            newest: None,
            since,
        };
        if users.filter.is_some() {
            if let Err(e) = users.fetch().await {
                tracing::warn!("the server refused the incremental filter ({e}); reading everyone");
                users.filter = None;
                users.page = 0;
                users.total = None;
                users.next_index = 1;
            }
        }
        Ok(Box::new(users))
    }
}

/// A read in progress.
struct Users {
    /// When the read began: the cursor is moved back by the read's duration.
    started: std::time::Instant,
    /// User id -> subscriptions through group membership.
    memberships: HashMap<String, BTreeSet<String>>,
    client: ScimClient,
    mapping: Mapping,
    groups: BTreeMap<String, String>,
    page_size: usize,
    filter: Option<String>,
    next_index: u64,
    page: u64,
    total: Option<u64>,
    call: String,
    buffer: VecDeque<(u64, Map<String, Value>)>,
    seen: HashSet<String>,
    complete: bool,
    finished: bool,
    /// The latest `meta.lastModified` read.
    newest: Option<String>,
    /// The cursor this read started from.
    since: Option<String>,
}

impl Users {
    /// Reads the next page into the buffer.
    async fn fetch(&mut self) -> Result<(), ConnectorError> {
        let page = self
            .client
            .page(
                "Users",
                self.next_index,
                self.page_size,
                self.filter.as_deref(),
            )
            .await?;
        self.page += 1;
        match self.total {
            None => self.total = Some(page.total),
            Some(total) if total != page.total => {
                tracing::warn!(
                    "the app's user count changed while paging ({total} -> {}): the read is not complete",
                    page.total
                );
                self.complete = false;
            }
            Some(_) => {}
        }
        let got = page.resources.len() as u64;
        self.next_index += got;
        self.call = page.call;
        self.buffer = (1..).zip(page.resources).collect();
        let total = self.total.unwrap_or(0);
        if got == 0 || self.next_index > total {
            self.finished = true;
            if self.next_index <= total {
                tracing::warn!(
                    "the app said {total} users but its pages held {}: the read is not complete",
                    self.next_index - 1
                );
                self.complete = false;
            }
        }
        Ok(())
    }
}

#[async_trait]
impl RecordStream for Users {
    async fn next(&mut self) -> Result<Option<SourceItem>, ConnectorError> {
        loop {
            if let Some((index, user)) = self.buffer.pop_front() {
                let id = user
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                if !self.seen.insert(id.clone()) {
                    tracing::warn!(
                        "the user {id} came twice while paging: the read is not complete"
                    );
                    self.complete = false;
                    continue;
                }
                let modified = user
                    .get("meta")
                    .and_then(|m| m.get("lastModified"))
                    .and_then(Value::as_str);
                if let Some(m) = modified {
                    if self.newest.as_deref().is_none_or(|c| later(m, c)) {
                        self.newest = Some(m.to_string());
                    }
                }
                let mut contact = self.mapping.to_contact(&user, &self.groups);
                if let Some(subscriptions) = self.memberships.get(&id) {
                    contact.subscriptions.extend(subscriptions.iter().cloned());
                }
                let origin = Origin::Page {
                    call: self.call.clone(),
                    page: self.page,
                    index,
                };
                return Ok(Some(SourceItem::Record(Box::new(SourceRecord::new(
                    contact, origin,
                )))));
            }
            if self.finished {
                return Ok(None);
            }
            self.fetch().await?;
        }
    }

    async fn finish(self: Box<Self>) -> Result<ReadOutcome, ConnectorError> {
        // A user changed while the pages were read may carry an earlier time than one
        // read after it: the next read starts the read's duration (and a minute) back.
        let overlap = self.started.elapsed() + std::time::Duration::from_secs(60);
        let moved_back = self
            .newest
            .map(|c| match chrono::DateTime::parse_from_rfc3339(&c) {
                Ok(t) => chrono::Duration::from_std(overlap)
                    .ok()
                    .and_then(|d| t.checked_sub_signed(d))
                    .map_or(c, |t| {
                        t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                    }),
                Err(_) => c,
            });
        // Never behind where this read started: a quiet night keeps the cursor.
        let cursor = match (moved_back, self.since) {
            (Some(m), Some(s)) if !later(&m, &s) => Some(s),
            (Some(m), _) => Some(m),
            (None, s) => s,
        };
        Ok(ReadOutcome {
            complete: self.complete && self.filter.is_none(),
            cursor,
        })
    }
}

/// Whether timestamp `a` is later than `b` (RFC 3339; compared as text when either
/// does not parse).
fn later(a: &str, b: &str) -> bool {
    match (
        chrono::DateTime::parse_from_rfc3339(a),
        chrono::DateTime::parse_from_rfc3339(b),
    ) {
        (Ok(a), Ok(b)) => a > b,
        _ => a > b,
    }
}
