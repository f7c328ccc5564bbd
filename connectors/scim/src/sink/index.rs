//! The app's users read once, for a run with many creates: a first sync of 100,000
//! would otherwise look each person up with a call of their own (100,000 GETs), where
//! reading the app in pages of the server's `maxResults` costs one call a page (one,
//! for an app that is still empty). The run reads the app when that is fewer calls
//! than looking its creates up.

use std::collections::{HashMap, HashSet};

use contactsync_core::ConnectorError;
use serde_json::{Map, Value};

use super::{ScimSink, Tally};

/// Who the app holds: ids by lower-cased `userName` and by `externalId`.
#[derive(Debug, Default)]
pub struct AppIndex {
    by_user_name: HashMap<String, String>,
    by_external_id: HashMap<String, String>,
}

impl AppIndex {
    /// The id of the user whose `attr` (`userName`, case-insensitively, or
    /// `externalId`) is `value`.
    pub fn id(&self, attr: &str, value: &str) -> Option<&String> {
        if attr == "userName" {
            self.by_user_name.get(&value.to_lowercase())
        } else {
            self.by_external_id.get(value)
        }
    }

    fn add(&mut self, user: &Map<String, Value>) {
        let Some(id) = user.get("id").and_then(Value::as_str) else {
            return;
        };
        let text = |name: &str| {
            user.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .and_then(|(_, v)| v.as_str())
        };
        if let Some(name) = text("userName") {
            self.by_user_name
                .insert(name.to_lowercase(), id.to_string());
        }
        if let Some(external) = text("externalId") {
            self.by_external_id
                .insert(external.to_string(), id.to_string());
        }
    }
}

impl ScimSink {
    /// The app's users, read once when that takes fewer calls than looking `creates`
    /// people up one by one; `None` to look them up.
    pub(super) async fn app_for(&self, creates: u64) -> Result<Option<AppIndex>, ConnectorError> {
        if creates == 0 {
            return Ok(None);
        }
        Tally::add(&self.tally.lookups, 1);
        let total = self.client.page("Users", 1, 1, None).await?.total;
        let pages = total.div_ceil(self.page_of_users() as u64);
        if creates <= pages {
            return Ok(None);
        }
        self.read_app().await
    }

    fn page_of_users(&self) -> usize {
        self.provider().max_results.unwrap_or(200).min(1000)
    }

    /// Reads every user of the app once. `None` when the read may have skipped
    /// someone (the total moved, an id came twice, the pages fell short): the run then
    /// looks each create up, as a small one does.
    pub(super) async fn read_app(&self) -> Result<Option<AppIndex>, ConnectorError> {
        let count = self.page_of_users();
        let mut index = AppIndex::default();
        let mut seen = HashSet::new();
        let mut start = 1;
        let mut total = None;
        loop {
            Tally::add(&self.tally.lookups, 1);
            let page = self.client.page("Users", start, count, None).await?;
            if *total.get_or_insert(page.total) != page.total {
                tracing::info!(
                    "the app's users changed while they were read: each create is looked up"
                );
                return Ok(None);
            }
            if page.resources.is_empty() {
                break;
            }
            start += page.resources.len() as u64;
            for user in &page.resources {
                let id = user.get("id").and_then(Value::as_str).unwrap_or_default();
                if !seen.insert(id.to_string()) {
                    return Ok(None);
                }
                index.add(user);
            }
            if start > page.total {
                break;
            }
        }
        if (seen.len() as u64) < total.unwrap_or(0) {
            return Ok(None);
        }
        Ok(Some(index))
    }
}
