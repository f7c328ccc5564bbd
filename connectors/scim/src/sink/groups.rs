//! Group membership as subscriptions: the groups named in `groups` gain and lose the
//! batch's members with one PATCH a group on its `members`.

use std::collections::BTreeMap;

use contactsync_core::{Change, ChangeBatch, ConnectorError, Outcome};
use serde_json::{json, Value};

use super::{unknown, ScimSink, Tally};
use crate::client::{quoted, Written};

/// The membership changes of one change: subscription and whether the person is in.
///
/// Consent belongs to the person: a new user joins the groups of the subscriptions the
/// source lists and leaves none; a create that adopted a user the app had changes
/// nothing (they may have left a group on their own); an update changes the
/// subscriptions whose value differs from the record last sent, and none when that
/// record is not known. With the pipeline's `resubscribe`, an update (or an adoption)
/// sends every managed subscription as the source has it. A removal changes none
/// (deactivation keeps memberships; deletion ends them on the server).
pub fn membership(
    change: &Change,
    managed: &[&String],
    adopted: bool,
    resubscribe: bool,
) -> Vec<(String, bool)> {
    let Some(contact) = change.contact() else {
        return Vec::new();
    };
    let now = |s: &String| contact.subscriptions.contains(s);
    let all = || managed.iter().map(|s| ((*s).clone(), now(s))).collect();
    match change {
        Change::Create { .. } if adopted && !resubscribe => Vec::new(),
        Change::Create { .. } if adopted => all(),
        Change::Create { .. } => managed
            .iter()
            .filter(|s| now(s))
            .map(|s| ((*s).clone(), true))
            .collect(),
        _ if resubscribe => all(),
        _ => match change.before() {
            Some(before) => managed
                .iter()
                .filter(|s| before.subscriptions.contains(**s) != now(s))
                .map(|s| ((*s).clone(), now(s)))
                .collect(),
            None => Vec::new(),
        },
    }
}

impl ScimSink {
    /// Applies the membership changes of the batch's applied changes; a change whose
    /// group write failed is left pending (its user write is repeated harmlessly).
    pub(super) async fn follow_groups(
        &self,
        batch: &ChangeBatch,
        outcomes: &mut [Outcome],
        adopted: &[bool],
        resubscribe: bool,
    ) -> Result<(), ConnectorError> {
        let Some(group_ids) = &self.group_ids else {
            return Ok(());
        };
        if group_ids.is_empty() {
            return Ok(());
        }
        let managed: Vec<&String> = group_ids.keys().collect();
        // Group id -> (member id, in or out, the change's position).
        let mut edits: BTreeMap<&String, Vec<(String, bool, usize)>> = BTreeMap::new();
        for (i, change) in batch.changes.iter().enumerate() {
            let Outcome::Applied { handle: Some(user) } = &outcomes[i] else {
                continue;
            };
            for (subscription, on) in membership(change, &managed, adopted[i], resubscribe) {
                if let Some(gid) = group_ids.get(&subscription) {
                    edits.entry(gid).or_default().push((user.clone(), on, i));
                }
            }
        }
        for (gid, members) in edits {
            let adds: Vec<Value> = members
                .iter()
                .filter(|(_, on, _)| *on)
                .map(|(id, _, _)| json!({ "value": id }))
                .collect();
            let mut ops = Vec::new();
            if !adds.is_empty() {
                ops.push(json!({ "op": "add", "path": "members", "value": adds }));
            }
            for (id, _, _) in members.iter().filter(|(_, on, _)| !*on) {
                ops.push(
                    json!({ "op": "remove", "path": format!("members[value eq {}]", quoted(id)) }),
                );
            }
            Tally::add(&self.tally.writes, 1);
            let failure = match self.client.patch("Groups", gid, &ops, None).await {
                Ok(Written::Done(_)) => None,
                Ok(other) => Some(format!(
                    "the group {gid} refused the membership change: {other:?}"
                )),
                Err(e @ (ConnectorError::Auth { .. } | ConnectorError::Cancelled)) => {
                    return Err(e)
                }
                Err(e) => Some(format!("the group {gid} could not be changed: {e}")),
            };
            if let Some(reason) = failure {
                tracing::warn!("{reason}");
                for (_, _, i) in members {
                    outcomes[i] = unknown(reason.clone());
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use contactsync_core::{Contact, ContactKey, Origin, SyncedEntry};

    fn person(subs: &[&str]) -> Contact {
        Contact {
            email: Some("a@example.com".into()),
            subscriptions: subs.iter().map(|s| s.to_string()).collect(),
            ..Contact::default()
        }
    }

    fn update(before: Option<Contact>, after: Contact) -> Change {
        Change::Update {
            key: ContactKey::Email("a@example.com".into()),
            contact: after,
            origin: Origin::Derived,
            previous: SyncedEntry {
                record: before.map(Box::new),
                ..SyncedEntry::default()
            },
        }
    }

    #[test]
    fn membership_follows_only_what_the_source_changed() {
        let (news, events) = ("news".to_string(), "events".to_string());
        let managed = vec![&news, &events];
        let create = Change::Create {
            key: ContactKey::Email("a@example.com".into()),
            contact: person(&["news", "other"]),
            origin: Origin::Derived,
        };
        assert_eq!(
            membership(&create, &managed, false, false),
            vec![("news".into(), true)]
        );
        assert!(
            membership(&create, &managed, true, false).is_empty(),
            "adopted: nothing"
        );
        let dropped = update(Some(person(&["news"])), person(&["events"]));
        assert_eq!(
            membership(&dropped, &managed, false, false),
            vec![("news".into(), false), ("events".into(), true)]
        );
        assert!(membership(&update(None, person(&["news"])), &managed, false, false).is_empty());
        assert_eq!(
            membership(&update(None, person(&["news"])), &managed, false, true).len(),
            2
        );
    }
}
