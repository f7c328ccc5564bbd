//! The testkit's conformance suites against scim2-server, the python-scim project's
//! reference SCIM 2.0 server, written by others from the RFCs: what the sandbox and the
//! connector could both have misread shows here.

use contactsync_core::{ConnectorSettings, Contact, Field};
use contactsync_scim::client::ScimClient;
use contactsync_scim::{ScimConfig, ScimSink, ScimSource};
use contactsync_testkit::scim2_server::Scim2Server;
use contactsync_testkit::{
    default_round_trip_fields, sample_contacts, source_conformance, SinkConformance,
};
use serde_json::json;

mod support;

/// The sample people's attributes, in the enterprise extension scim2-server knows.
const FIELDS: &str = r#"fields = { "attributes.cost_center" = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:costCenter", site = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:division", homepage = "profileUrl" }
groups = { newsletter = "Newsletter", events = "Events" }"#;

fn config(server: &Scim2Server, extra: &str) -> ScimConfig {
    let text = format!(
        "base_url = \"{}\"\ntoken = \"{}\"\npage_size = 2\nretry_backoff = \"10ms\"\n{FIELDS}\n{extra}",
        server.base_url(),
        server.token()
    );
    ScimConfig::from_settings(&ConnectorSettings::from_toml("sinks.scim", &text).expect("settings"))
        .expect("config")
}

/// The server with the groups the configuration names.
async fn server() -> Scim2Server {
    let server = Scim2Server::start().expect("scim2-server started");
    let client = ScimClient::new(&config(&server, "").connection).expect("client");
    for name in ["Newsletter", "Events"] {
        let group = json!({ "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": name });
        client
            .create("Groups", &group)
            .await
            .expect("group created");
    }
    server
}

fn unacceptable() -> Vec<Contact> {
    vec![
        Contact {
            external_id: Some("NO-EMAIL".into()),
            ..Contact::default()
        },
        // scim2-server takes any email, but not a profileUrl that is no URI.
        Contact {
            external_id: Some("BAD-URL".into()),
            email: Some("bad.url@example.com".into()),
            attributes: [("homepage".to_string(), "not a url".to_string())].into(),
            ..Contact::default()
        },
    ]
}

async fn sink_conformance(extra: &str) {
    let server = server().await;
    let fields: Vec<Field> = default_round_trip_fields()
        .into_iter()
        .filter(|f| *f != Field::Phone && *f != Field::Mobile)
        .collect();
    SinkConformance::new(
        Box::new(ScimSink::new(config(&server, extra)).expect("sink")),
        Box::new(ScimSource::new(config(&server, extra)).expect("source")),
    )
    .with_round_trip_fields(fields)
    .with_unacceptable(unacceptable())
    .run()
    .await
    .expect("sink conformance against scim2-server");
}

#[tokio::test]
async fn the_sink_passes_the_conformance_suite_in_bulk() {
    sink_conformance("").await;
}

#[tokio::test]
async fn the_sink_passes_the_conformance_suite_one_call_a_change() {
    sink_conformance("bulk = false").await;
}

#[tokio::test]
async fn the_sink_passes_the_conformance_suite_with_put() {
    sink_conformance("update = \"put\"\nbulk = false").await;
}

#[tokio::test]
async fn the_source_passes_the_conformance_suite() {
    let server = server().await;
    let contacts = sample_contacts(5);
    let mut sink = ScimSink::new(config(&server, "")).expect("sink");
    support::seed(&mut sink, &contacts).await;
    source_conformance(
        &ScimSource::new(config(&server, "")).expect("source"),
        &contacts,
    )
    .await
    .expect("source conformance against scim2-server");
}
