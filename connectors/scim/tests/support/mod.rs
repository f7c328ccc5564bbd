//! What the SCIM connector's test files share: a run of the sink over one batch.

#![allow(dead_code)]

use contactsync_core::{
    Change, ChangeBatch, ChangePlan, Contact, ContactKey, Origin, Outcome, Sink,
};
use contactsync_scim::ScimSink;
use contactsync_testkit::MemoryStore;

/// A batch creating `contacts`, keyed by external id.
pub fn creates(contacts: &[Contact]) -> ChangeBatch {
    ChangeBatch {
        id: "batch".into(),
        changes: contacts
            .iter()
            .map(|c| Change::Create {
                key: ContactKey::ExternalId(c.external_id.clone().expect("id")),
                contact: c.clone(),
                origin: Origin::Derived,
            })
            .collect(),
    }
}

/// `begin` and `apply` of one batch, as the engine runs them.
pub async fn apply(sink: &mut ScimSink, batch: &ChangeBatch) -> Vec<Outcome> {
    let mut store = MemoryStore::new();
    let mut ctx = store.context();
    sink.begin(&ChangePlan::default(), &mut ctx)
        .await
        .expect("begin");
    sink.apply(batch, &mut ctx).await.expect("apply")
}

/// Creates `contacts` through the sink, each one applied.
pub async fn seed(sink: &mut ScimSink, contacts: &[Contact]) {
    let outcomes = apply(sink, &creates(contacts)).await;
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Outcome::Applied { .. })),
        "{outcomes:?}"
    );
}
