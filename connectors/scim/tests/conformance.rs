//! The testkit's conformance suites, against the SCIM sandbox over HTTP: with `/Bulk`,
//! one call a change, and GET + PUT on a server without PATCH.

use contactsync_core::{ConnectorSettings, Contact, Field};
use contactsync_sandbox_scim::{
    Faults, Kind, RunningScim, SandboxConfig, ScimSandbox, GROUP_SCHEMA,
};
use contactsync_scim::{ScimConfig, ScimSink, ScimSource};
use contactsync_testkit::{
    default_round_trip_fields, sample_contacts, source_conformance, SinkConformance,
};
use serde_json::json;

mod support;

/// The sample people's attributes, kept in an extension of the test's own.
const FIELDS: &str = r#"fields = { "attributes.cost_center" = "urn:example:params:scim:schemas:extension:test:2.0:User:costCenter", site = "urn:example:params:scim:schemas:extension:test:2.0:User:site" }
groups = { newsletter = "Newsletter", events = "Events" }"#;

async fn sandbox(config: SandboxConfig) -> RunningScim {
    let sb = ScimSandbox::start(config).await.expect("sandbox started");
    for name in ["Newsletter", "Events"] {
        sb.seed(
            Kind::Group,
            json!({ "schemas": [GROUP_SCHEMA], "displayName": name }),
        )
        .expect("group");
    }
    sb
}

fn settings(sb: &RunningScim, extra: &str) -> ConnectorSettings {
    ConnectorSettings::from_toml(
        "sinks.scim",
        &format!(
            "base_url = \"{}\"\ntoken = \"{}\"\npage_size = 2\nretry_backoff = \"10ms\"\n{FIELDS}\n{extra}",
            sb.base_url(),
            sb.token()
        ),
    )
    .expect("settings")
}

fn config(sb: &RunningScim, extra: &str) -> ScimConfig {
    ScimConfig::from_settings(&settings(sb, extra)).expect("config")
}

/// Records the app refuses: no email to make a userName from (refused before sending),
/// and an address the server does not take.
fn unacceptable() -> Vec<Contact> {
    vec![
        Contact {
            external_id: Some("NO-EMAIL".into()),
            ..Contact::default()
        },
        Contact {
            external_id: Some("BAD-EMAIL".into()),
            email: Some("someone@localhost".into()),
            ..Contact::default()
        },
    ]
}

async fn sink_conformance(sb: &RunningScim, extra: &str) {
    let fields: Vec<Field> = default_round_trip_fields()
        .into_iter()
        .filter(|f| *f != Field::Phone && *f != Field::Mobile)
        .collect();
    SinkConformance::new(
        Box::new(ScimSink::new(config(sb, extra)).expect("sink")),
        Box::new(ScimSource::new(config(sb, extra)).expect("source")),
    )
    .with_round_trip_fields(fields)
    .with_unacceptable(unacceptable())
    .run()
    .await
    .expect("sink conformance");
}

#[tokio::test]
async fn the_sink_passes_the_conformance_suite_in_bulk() {
    // Four operations, or 3,000 bytes, a request: a batch needs several either way.
    let sb = sandbox(SandboxConfig {
        bulk_max_operations: 4,
        bulk_max_payload: 3000,
        ..SandboxConfig::default()
    })
    .await;
    sink_conformance(&sb, "").await;
    let bulk = sb.requests().iter().filter(|r| r.path == "/Bulk").count();
    assert!(
        bulk >= 2,
        "the writes went in bulk requests of at most 4: {bulk}"
    );
}

#[tokio::test]
async fn the_sink_passes_the_conformance_suite_one_call_a_change() {
    let sb = sandbox(SandboxConfig::default()).await;
    sink_conformance(&sb, "bulk = false").await;
    assert!(sb.requests().iter().all(|r| r.path != "/Bulk"));
    assert!(sb
        .requests()
        .iter()
        .any(|r| r.method == "PATCH" && r.path.starts_with("/Users/")));
}

#[tokio::test]
async fn the_sink_passes_the_conformance_suite_with_put_on_a_server_without_patch() {
    let sb = sandbox(SandboxConfig::default()).await;
    sb.set_faults(Faults {
        patch_unsupported: true,
        bulk_unsupported: true,
        ..Faults::default()
    });
    // Group membership is a PATCH too: a server without PATCH keeps no groups here.
    let sink_fields = FIELDS.lines().next().expect("fields line").to_string();
    let sb_settings = |extra: &str| {
        ScimConfig::from_settings(
            &ConnectorSettings::from_toml(
                "sinks.scim",
                &format!(
                    "base_url = \"{}\"\ntoken = \"{}\"\npage_size = 2\nretry_backoff = \"10ms\"\n{sink_fields}\n{extra}",
                    sb.base_url(),
                    sb.token()
                ),
            )
            .expect("settings"),
        )
        .expect("config")
    };
    let fields: Vec<Field> = default_round_trip_fields()
        .into_iter()
        .filter(|f| !matches!(f, Field::Phone | Field::Mobile | Field::Subscriptions))
        .collect();
    let people: Vec<Contact> = sample_contacts(6)
        .into_iter()
        .map(|c| Contact {
            subscriptions: Default::default(),
            ..c
        })
        .collect();
    SinkConformance::new(
        Box::new(ScimSink::new(sb_settings("")).expect("sink")),
        Box::new(ScimSource::new(sb_settings("")).expect("source")),
    )
    .with_contacts(people)
    .with_round_trip_fields(fields)
    .with_unacceptable(unacceptable())
    .run()
    .await
    .expect("sink conformance");
    let requests = sb.requests();
    assert!(
        requests.iter().any(|r| r.method == "PUT"),
        "updates went as PUT"
    );
    assert!(requests.iter().all(|r| r.method != "PATCH"));
}

#[tokio::test]
async fn the_source_passes_the_conformance_suite() {
    let sb = sandbox(SandboxConfig::default()).await;
    let contacts = sample_contacts(5);
    let mut sink = ScimSink::new(config(&sb, "")).expect("sink");
    support::seed(&mut sink, &contacts).await;
    source_conformance(
        &ScimSource::new(config(&sb, "")).expect("source"),
        &contacts,
    )
    .await
    .expect("source conformance");
}
