//! The sandbox's own `/_sandbox/…` routes beyond the kit's: counters, subscribers, imports, seeding.

use super::*;
use contactsync_sandbox_kit::Platform as _;

pub(super) async fn get_stats(State(shared): SharedState) -> Json<Stats> {
    Json(shared.stats())
}

pub(super) async fn admin_subscribers(State(shared): SharedState) -> Json<Vec<Subscriber>> {
    Json(shared.lock().store.subscribers().cloned().collect())
}

pub(super) async fn admin_imports(State(shared): SharedState) -> Json<Vec<Import>> {
    Json(shared.lock().store.imports.values().cloned().collect())
}

/// A subscriber to seed through `POST /_sandbox/subscribers`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SeedRequest {
    email: String,
    #[serde(default)]
    status: Option<SubscriberStatus>,
    #[serde(default)]
    removed_by: Option<RemovedBy>,
    #[serde(default)]
    fields: BTreeMap<String, String>,
    #[serde(default)]
    custom_fields: BTreeMap<String, String>,
    #[serde(default)]
    permissions: BTreeSet<String>,
    #[serde(default)]
    tags: BTreeSet<String>,
}

pub(super) async fn admin_seed(
    State(shared): SharedState,
    Json(seed): Json<SeedRequest>,
) -> Response {
    let subscriber = Subscriber {
        fields: seed.fields,
        custom_fields: seed.custom_fields,
        permissions: seed.permissions,
        tags: seed.tags,
        ..Subscriber::new(seed.email)
    }
    .with_status(
        seed.status.unwrap_or(SubscriberStatus::Active),
        seed.removed_by,
    );
    match crate::seed(&shared, subscriber) {
        Ok(seeded) => {
            shared.save_logged();
            (StatusCode::CREATED, Json(seeded)).into_response()
        }
        Err(e) => (StatusCode::CONFLICT, e.to_string()).into_response(),
    }
}
