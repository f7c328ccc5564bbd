//! The testkit's conformance suites, against the __Name__ sandbox over HTTP.

use contactsync___snake__::client::__Name__Client;
// @if sink
use contactsync___snake__::{SinkConfig, __Name__Sink};
use contactsync_core::Contact;
use contactsync_testkit::SinkConformance;
// @end
use contactsync___snake__::{SourceConfig, __Name__Source};
use contactsync_core::{ConnectorSettings, ContactKey};
use contactsync_sandbox___snake__::{Running__Name__, SandboxConfig, __Name__Sandbox};
use contactsync_testkit::{sample_contacts, source_conformance};

async fn sandbox() -> Running__Name__ {
    __Name__Sandbox::start(SandboxConfig::default())
        .await
        .expect("sandbox started")
}

fn settings(sb: &Running__Name__) -> ConnectorSettings {
    ConnectorSettings::from_toml(
        "sinks.__name__",
        &format!(
            "base_url = \"{}\"\napi_key = \"{}\"\npage_size = 2\nretry_backoff = \"10ms\"",
            sb.base_url(),
            sb.api_key()
        ),
    )
    .expect("settings")
}

fn source(sb: &Running__Name__) -> __Name__Source {
    __Name__Source::new(SourceConfig::from_settings(&settings(sb)).expect("config")).expect("source")
}

// @if sink
fn sink(sb: &Running__Name__) -> __Name__Sink {
    __Name__Sink::new(SinkConfig::from_settings(&settings(sb)).expect("config")).expect("sink")
}

#[tokio::test]
async fn the_sink_passes_the_conformance_suite() {
    let sb = sandbox().await;
    let no_email = Contact {
        external_id: Some("NO-EMAIL".into()),
        ..Contact::default()
    };
    SinkConformance::new(Box::new(sink(&sb)), Box::new(source(&sb)))
        .with_unacceptable(vec![no_email])
        .run()
        .await
        .expect("sink conformance");
}
// @end

#[tokio::test]
async fn the_source_passes_the_conformance_suite() {
    let sb = sandbox().await;
    let contacts = sample_contacts(5);
    let config = SourceConfig::from_settings(&settings(&sb)).expect("config");
    let client = __Name__Client::new(&config.connection).expect("client");
    for contact in &contacts {
        let key = ContactKey::ExternalId(contact.external_id.clone().expect("an id"));
        client.put(&key, contact).await.expect("seeded");
    }
    // Five people in pages of two: the read must follow three pages.
    source_conformance(&source(&sb), &contacts)
        .await
        .expect("source conformance");
}
