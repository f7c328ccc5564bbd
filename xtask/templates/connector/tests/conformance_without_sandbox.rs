//! The testkit's conformance suites, against a __Name__ instance: give its URL and API
//! key in `CONTACTSYNC___SNAKE___URL` and `CONTACTSYNC___SNAKE___API_KEY` (a test account:
//! the suite writes and deletes people). Without them the test says so and fails, so
//! that it is never mistaken for a pass; `cargo xtask new-connector __name__ --sandbox`
//! writes a sandbox to run it against instead.

// @if sink
use contactsync___snake__::{SinkConfig, __Name__Sink};
use contactsync_core::Contact;
use contactsync_testkit::SinkConformance;
// @end
use contactsync___snake__::{SourceConfig, __Name__Source};
use contactsync_core::ConnectorSettings;

/// The test account's settings, from the environment.
fn settings() -> ConnectorSettings {
    let url = std::env::var("CONTACTSYNC___SNAKE___URL").expect("CONTACTSYNC___SNAKE___URL");
    let key = std::env::var("CONTACTSYNC___SNAKE___API_KEY").expect("CONTACTSYNC___SNAKE___API_KEY");
    ConnectorSettings::from_toml(
        "sinks.__name__",
        &format!("base_url = \"{url}\"\napi_key = \"{key}\""),
    )
    .expect("settings")
}

fn source(settings: &ConnectorSettings) -> __Name__Source {
    __Name__Source::new(SourceConfig::from_settings(settings).expect("config")).expect("source")
}

// @if sink
#[tokio::test]
#[ignore = "needs a test account on __Name__: set CONTACTSYNC___SNAKE___URL and CONTACTSYNC___SNAKE___API_KEY, then run with --ignored"]
async fn the_sink_passes_the_conformance_suite() {
    let settings = settings();
    let sink = __Name__Sink::new(SinkConfig::from_settings(&settings).expect("config")).expect("sink");
    let no_email = Contact {
        external_id: Some("NO-EMAIL".into()),
        ..Contact::default()
    };
    SinkConformance::new(Box::new(sink), Box::new(source(&settings)))
        .with_unacceptable(vec![no_email])
        .run()
        .await
        .expect("sink conformance");
}
// @end

#[tokio::test]
#[ignore = "needs a test account on __Name__ holding people: set CONTACTSYNC___SNAKE___URL and CONTACTSYNC___SNAKE___API_KEY, then run with --ignored"]
async fn the_source_reads_the_test_account() {
    let source = source(&settings());
    contactsync_core::Source::check(&source).await.expect("the account answers");
    let mut read = contactsync_core::Source::read(&source, contactsync_core::ReadMode::Full)
        .await
        .expect("a read");
    let mut people = 0;
    while let Some(item) = read.next().await.expect("the next person") {
        if let contactsync_core::SourceItem::Record(_) = item {
            people += 1;
        }
    }
    assert!(read.finish().await.expect("the read ended").complete);
    assert!(people > 0, "the test account holds nobody");
}
