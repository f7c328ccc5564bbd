//! The testkit's conformance suites, against a folder of its own.

use contactsync___snake__::folder::Folder;
// @if sink
use contactsync___snake__::{SinkConfig, __Name__Sink};
use contactsync_testkit::SinkConformance;
// @end
use contactsync___snake__::{SourceConfig, __Name__Source};
use contactsync_core::{ConnectorSettings, ContactKey};
use contactsync_testkit::{sample_contacts, source_conformance};

fn settings(dir: &std::path::Path) -> ConnectorSettings {
    ConnectorSettings::from_toml("sinks.__name__", &format!("dir = {:?}", dir.display().to_string()))
        .expect("settings")
}

fn source(dir: &std::path::Path) -> __Name__Source {
    __Name__Source::new(SourceConfig::from_settings(&settings(dir)).expect("config"))
}

// @if sink
#[tokio::test]
async fn the_sink_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().expect("a folder");
    let sink = __Name__Sink::new(SinkConfig::from_settings(&settings(dir.path())).expect("config"));
    SinkConformance::new(Box::new(sink), Box::new(source(dir.path())))
        .run()
        .await
        .expect("sink conformance");
}
// @end

#[tokio::test]
async fn the_source_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().expect("a folder");
    let contacts = sample_contacts(5);
    let folder = Folder::new(dir.path().to_path_buf());
    for contact in &contacts {
        let key = ContactKey::ExternalId(contact.external_id.clone().expect("an id"));
        folder.write(&key, contact).await.expect("seeded");
    }
    source_conformance(&source(dir.path()), &contacts)
        .await
        .expect("source conformance");
}
