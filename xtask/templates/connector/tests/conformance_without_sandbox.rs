//! The testkit's conformance suites, against a __Name__ instance: give its URL and API
//! key in `CONTACTSYNC___SNAKE___URL` and `CONTACTSYNC___SNAKE___API_KEY` (a test account:
//! the suite writes and deletes people). Without them the test says so and fails, so
//! that it is never mistaken for a pass; `cargo xtask new-connector __name__ --sandbox`
//! writes a sandbox to run it against instead.

use contactsync___snake__::{__Name__Sink, __Name__Source, SinkConfig, SourceConfig};
use contactsync_core::{ConnectorSettings, Contact};
use contactsync_testkit::SinkConformance;

#[tokio::test]
#[ignore = "needs a test account on __Name__: set CONTACTSYNC___SNAKE___URL and CONTACTSYNC___SNAKE___API_KEY, then run with --ignored"]
async fn the_sink_passes_the_conformance_suite() {
    let url = std::env::var("CONTACTSYNC___SNAKE___URL").expect("CONTACTSYNC___SNAKE___URL");
    let key = std::env::var("CONTACTSYNC___SNAKE___API_KEY").expect("CONTACTSYNC___SNAKE___API_KEY");
    let settings = ConnectorSettings::from_toml(
        "sinks.__name__",
        &format!("base_url = \"{url}\"\napi_key = \"{key}\""),
    )
    .expect("settings");
    let sink = __Name__Sink::new(SinkConfig::from_settings(&settings).expect("config")).expect("sink");
    let source =
        __Name__Source::new(SourceConfig::from_settings(&settings).expect("config")).expect("source");
    let no_email = Contact {
        external_id: Some("NO-EMAIL".into()),
        ..Contact::default()
    };
    SinkConformance::new(Box::new(sink), Box::new(source))
        .with_unacceptable(vec![no_email])
        .run()
        .await
        .expect("sink conformance");
}
