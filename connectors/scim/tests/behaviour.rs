//! What the sink does when the app or the network does something of its own, against
//! the SCIM sandbox: a create whose answer was lost, a userName taken, another person
//! holding an address, throttling and server errors, a wrong token.

use contactsync_core::{
    Change, ChangeBatch, ConnectorError, ConnectorSettings, ContactKey, ContactStatus, Origin,
    Outcome, Sink,
};
use contactsync_sandbox_scim::{
    Kind, RunningScim, SandboxConfig, ScimSandbox, WireFaults, USER_SCHEMA,
};
use contactsync_scim::{ScimConfig, ScimSink};
use support::{apply, creates};

mod support;
use contactsync_testkit::sample_contacts;
use serde_json::json;

fn sink(sb: &RunningScim, extra: &str) -> ScimSink {
    let text = format!(
        "base_url = \"{}\"\ntoken = \"{}\"\nretry_backoff = \"10ms\"\n{extra}",
        sb.base_url(),
        sb.token()
    );
    let config = ScimConfig::from_settings(
        &ConnectorSettings::from_toml("sinks.scim", &text).expect("settings"),
    )
    .expect("config");
    ScimSink::new(config).expect("sink")
}

fn posts(sb: &RunningScim) -> usize {
    sb.requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path == "/Users")
        .count()
}

#[tokio::test]
async fn a_create_whose_answer_was_lost_is_found_not_sent_twice() {
    let sb = ScimSandbox::start(SandboxConfig::default())
        .await
        .expect("sandbox");
    let people = sample_contacts(1);
    let mut sink = sink(&sb, "bulk = false");
    // Calls: ServiceProviderConfig, the look-up, then the POST, whose answer is lost
    // after the user was created.
    sb.set_wire_faults(WireFaults::answer_lost(3));
    let outcomes = apply(&mut sink, &creates(&people)).await;
    let Outcome::Applied { handle: Some(id) } = &outcomes[0] else {
        panic!("applied with the user's id: {outcomes:?}");
    };
    assert_eq!(sb.users().len(), 1, "no second user");
    assert_eq!(&sb.users()[0]["id"], id.as_str());
    assert_eq!(posts(&sb), 1, "the POST was not repeated");
}

#[tokio::test]
async fn a_taken_user_name_is_adopted_or_refused_never_posted_twice() {
    let sb = ScimSandbox::start(SandboxConfig::default())
        .await
        .expect("sandbox");
    let mut people = sample_contacts(2);
    // The app has person 1 under their address, without an externalId (a sign-up),
    // deactivated by an admin; and person 2's address belongs to someone else.
    let user = |name: &str| json!({ "schemas": [USER_SCHEMA], "userName": name, "active": false });
    sb.seed(Kind::User, user(people[0].email.as_deref().expect("email")))
        .expect("seeded");
    let mut other = user(people[1].email.as_deref().expect("email"));
    other["externalId"] = json!("SOMEONE-ELSE");
    sb.seed(Kind::User, other).expect("seeded");
    people[1].status = ContactStatus::Active;
    // Looked up by externalId, nobody is found; the POSTs meet 409.
    let mut sink = sink(&sb, "match_on = \"externalId\"\nbulk = false");
    let outcomes = apply(&mut sink, &creates(&people)).await;
    assert!(
        matches!(&outcomes[0], Outcome::Applied { handle: Some(_) }),
        "{outcomes:?}"
    );
    let Outcome::Rejected { reason, retry, .. } = &outcomes[1] else {
        panic!("another person's address is refused: {outcomes:?}");
    };
    assert!(reason.contains("SOMEONE-ELSE") && *retry, "{reason}");
    assert_eq!(sb.users().len(), 2, "nobody created twice");
    assert_eq!(posts(&sb), 2, "one POST each");
    let adopted = sb
        .user(people[0].email.as_deref().expect("email"))
        .expect("adopted");
    assert_eq!(adopted["externalId"], "CS-0001");
    assert_eq!(
        adopted["active"], false,
        "a user an admin deactivated stays so"
    );
}

#[tokio::test]
async fn throttled_and_failed_calls_are_retried() {
    let sb = ScimSandbox::start(SandboxConfig::default())
        .await
        .expect("sandbox");
    let people = sample_contacts(6);
    sb.set_wire_faults(WireFaults {
        throttle_every: 3,
        retry_after_secs: 0,
        fail_every: 5,
        ..WireFaults::default()
    });
    let mut sink = sink(&sb, "");
    let outcomes = apply(&mut sink, &creates(&people)).await;
    // A failed bulk request may have created users: those changes stay pending, and a
    // second run adopts what the first created.
    let again = apply(&mut sink, &creates(&people)).await;
    assert!(
        again.iter().all(|o| matches!(o, Outcome::Applied { .. })),
        "first {outcomes:?}, then {again:?}"
    );
    assert_eq!(sb.users().len(), 6, "nobody twice");
    assert!(sb.requests().iter().any(|r| r.status == 429));
}

#[tokio::test]
async fn a_wrong_token_fails_the_check_with_what_to_do() {
    let sb = ScimSandbox::start(SandboxConfig::default())
        .await
        .expect("sandbox");
    let text = format!(
        "base_url = \"{}\"\ntoken = \"tok-9f3a-not-the-secret\"\n",
        sb.base_url()
    );
    let config = ScimConfig::from_settings(
        &ConnectorSettings::from_toml("sinks.scim", &text).expect("settings"),
    )
    .expect("config");
    let error = ScimSink::new(config)
        .expect("sink")
        .check()
        .await
        .expect_err("refused");
    assert!(matches!(error, ConnectorError::Auth { .. }), "{error:?}");
    assert!(
        !error.to_string().contains("tok-9f3a"),
        "the token is never printed: {error}"
    );
}

fn source(sb: &RunningScim) -> contactsync_scim::ScimSource {
    let text = format!(
        "base_url = \"{}\"\ntoken = \"{}\"\npage_size = 2\n",
        sb.base_url(),
        sb.token()
    );
    let config = ScimConfig::from_settings(
        &ConnectorSettings::from_toml("sources.scim", &text).expect("settings"),
    )
    .expect("config");
    contactsync_scim::ScimSource::new(config).expect("source")
}

fn seed_users(sb: &RunningScim, names: std::ops::Range<usize>) {
    for i in names {
        let user = json!({ "schemas": [USER_SCHEMA], "userName": format!("u{i}@example.com"),
            "emails": [{ "value": format!("u{i}@example.com"), "type": "work" }] });
        sb.seed(Kind::User, user).expect("seeded");
    }
}

#[tokio::test]
async fn a_read_during_which_users_were_added_is_not_complete() {
    use contactsync_core::{ReadMode, Source};
    let sb = ScimSandbox::start(SandboxConfig::default())
        .await
        .expect("sandbox");
    seed_users(&sb, 0..5);
    let source = source(&sb);
    let full = contactsync_testkit::read_all(&source, ReadMode::Full)
        .await
        .expect("read");
    assert!(full.outcome.complete);
    assert_eq!(full.records.len(), 5);

    // Someone is added in the app after the first page was read.
    let mut stream = source.read(ReadMode::Full).await.expect("read");
    stream.next().await.expect("first").expect("a user");
    seed_users(&sb, 5..6);
    while stream.next().await.expect("next").is_some() {}
    let outcome = stream.finish().await.expect("finish");
    assert!(
        !outcome.complete,
        "the total moved while paging: no removal may come of it"
    );

    // An incremental read asks only for what changed since the cursor, and is never
    // complete.
    let cursor = outcome.cursor.expect("a cursor");
    sb.clear_requests();
    let read = contactsync_testkit::read_all(
        &source,
        ReadMode::Incremental {
            cursor: Some(cursor.clone()),
        },
    )
    .await
    .expect("incremental");
    assert!(!read.outcome.complete);
    let listing = sb
        .requests()
        .into_iter()
        .find(|r| r.path == "/Users")
        .expect("a listing");
    let query = listing.query.unwrap_or_default();
    assert!(query.contains("meta.lastModified"), "{query}");
    assert!(
        read.outcome.cursor.is_some_and(|c| c >= cursor),
        "a cursor never moves back"
    );
}

#[tokio::test]
async fn a_put_that_finds_the_user_changed_reads_them_again_once() {
    use contactsync_sandbox_scim::Faults;
    let sb = ScimSandbox::start(SandboxConfig::default())
        .await
        .expect("sandbox");
    let people = sample_contacts(2);
    let mut sink = sink(&sb, "update = \"put\"\nbulk = false");
    let created = apply(&mut sink, &creates(&people)).await;
    let update = |i: usize, title: &str| {
        let mut after = people[i].clone();
        after.job_title = Some(title.into());
        let Outcome::Applied { handle } = &created[i] else {
            panic!("{created:?}")
        };
        Change::Update {
            key: ContactKey::ExternalId(after.external_id.clone().expect("id")),
            contact: after,
            origin: Origin::Derived,
            previous: contactsync_core::SyncedEntry {
                handle: handle.clone(),
                record: Some(Box::new(people[i].clone())),
                ..Default::default()
            },
        }
    };
    // Someone edits person 1 between the read and the write: read again, written.
    sb.set_faults(Faults {
        stale_writes: 1,
        ..Faults::default()
    });
    let batch = ChangeBatch {
        id: "b".into(),
        changes: vec![update(0, "Boss")],
    };
    let outcomes = apply(&mut sink, &batch).await;
    assert!(
        matches!(outcomes[0], Outcome::Applied { .. }),
        "{outcomes:?}"
    );
    let email = |i: usize| people[i].email.clone().expect("email");
    assert_eq!(sb.user(&email(0)).expect("user")["title"], "Boss");
    // ...twice in a row: left pending, not forced.
    sb.set_faults(Faults {
        stale_writes: 2,
        ..Faults::default()
    });
    let batch = ChangeBatch {
        id: "c".into(),
        changes: vec![update(1, "Chief")],
    };
    let outcomes = apply(&mut sink, &batch).await;
    assert!(
        matches!(outcomes[0], Outcome::Unknown { .. }),
        "{outcomes:?}"
    );
    assert_ne!(sb.user(&email(1)).expect("user")["title"], "Chief");
}
