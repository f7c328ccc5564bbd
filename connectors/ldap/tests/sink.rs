//! The LDAP sink against a real slapd: add, modify only what changed, delete, mark,
//! upsert onto an existing entry, refusals, and the testkit's conformance suite.

mod common;

use common::{settings_as, sink, sink_settings, slapd, source, source_settings};
use contactsync_core::{Change, ChangeBatch, Contact, ContactStatus, Outcome, Sink};
use contactsync_testkit::changes::{self, create, removal as remove, update};
use contactsync_testkit::slapd::{Slapd, PEOPLE_DN};
use contactsync_testkit::{MemoryStore, SinkConformance};

/// The mapping both directions use in the conformance runs: the defaults, plus homes
/// in inetOrgPerson for the sample contacts' subscriptions and custom attributes.
const ROUND_TRIP_MAPPING: &str = "[attributes]\nbusinessCategory = \"subscriptions\"\nroomNumber = \"attributes.cost_center\"\nl = \"attributes.site\"\n";

fn ann() -> Contact {
    Contact {
        external_id: Some("S1".into()),
        email: Some("ann.lee@example.org".into()),
        first_name: Some("Ann".into()),
        last_name: Some("Lee".into()),
        job_title: Some("Engineer".into()),
        phone: Some("+32 2 555 0101".into()),
        ..Contact::default()
    }
}

/// An update whose last-sent record is `before` (what the state knows).
fn updated_from(before: Option<Contact>, contact: Contact) -> Change {
    match before {
        Some(before) => changes::update_from(&before, contact),
        None => update(contact),
    }
}

async fn apply(sink: &mut dyn Sink, changes: Vec<Change>) -> Vec<Outcome> {
    let mut store = MemoryStore::new();
    let mut ctx = store.context();
    let batch = ChangeBatch {
        id: "test-1".into(),
        changes,
    };
    let outcomes = sink.apply(&batch, &mut ctx).await.expect("apply");
    sink.finish(&mut ctx).await.expect("finish");
    assert_eq!(
        outcomes.len(),
        batch.changes.len(),
        "one outcome per change"
    );
    outcomes
}

fn dn(uid: &str) -> String {
    format!("uid={uid},{PEOPLE_DN}")
}

fn one(server: &Slapd, dn: &str, attr: &str) -> Option<String> {
    server.values(dn, attr).unwrap().into_iter().next()
}

#[tokio::test]
async fn add_then_modify_only_what_changed_then_delete() {
    let server = slapd(Slapd::builder());
    let mut sink = sink(&sink_settings(&server, ""));
    sink.check().await.expect("check");

    let outcomes = apply(sink.as_mut(), vec![create(ann())]).await;
    assert_eq!(
        outcomes,
        vec![Outcome::Applied {
            handle: Some(dn("S1"))
        }]
    );
    assert_eq!(
        one(&server, &dn("S1"), "mail").as_deref(),
        Some("ann.lee@example.org")
    );
    assert_eq!(
        one(&server, &dn("S1"), "employeeNumber").as_deref(),
        Some("S1")
    );
    assert_eq!(
        one(&server, &dn("S1"), "cn").as_deref(),
        Some("Ann Lee"),
        "cn derived"
    );
    assert_eq!(one(&server, &dn("S1"), "sn").as_deref(), Some("Lee"));

    // Something else keeps its own attribute on the entry.
    server
        .ldapmodify(&format!(
            "dn: {}\nchangetype: modify\nadd: description\ndescription: kept\n",
            dn("S1")
        ))
        .unwrap();
    let csn = one(&server, &dn("S1"), "entryCSN");

    // Sending the same content again writes nothing at all.
    let outcomes = apply(sink.as_mut(), vec![update(ann())]).await;
    assert!(matches!(outcomes[0], Outcome::Applied { .. }));
    assert_eq!(
        one(&server, &dn("S1"), "entryCSN"),
        csn,
        "an unchanged contact is not written"
    );

    // A source that never gives a phone leaves the directory's alone: absent is not
    // empty (the state knows no earlier record with one).
    let mut no_phone = ann();
    no_phone.phone = None;
    let outcomes = apply(sink.as_mut(), vec![update(no_phone)]).await;
    assert!(matches!(outcomes[0], Outcome::Applied { .. }));
    assert_eq!(
        one(&server, &dn("S1"), "telephoneNumber").as_deref(),
        ann().phone.as_deref(),
        "a phone the source does not give is kept"
    );

    // A change of title and a phone the source had and cleared: only those are written.
    let mut changed = ann();
    changed.job_title = Some("Lead".into());
    changed.phone = None;
    let outcomes = apply(sink.as_mut(), vec![updated_from(Some(ann()), changed)]).await;
    assert!(matches!(outcomes[0], Outcome::Applied { .. }));
    assert_ne!(one(&server, &dn("S1"), "entryCSN"), csn);
    assert_eq!(one(&server, &dn("S1"), "title").as_deref(), Some("Lead"));
    assert_eq!(one(&server, &dn("S1"), "telephoneNumber"), None);
    assert_eq!(
        one(&server, &dn("S1"), "description").as_deref(),
        Some("kept")
    );

    // An admin edits the title; the source then changes only the mail: the admin's
    // title stands, since the source did not change it since the last sync.
    server
        .ldapmodify(&format!(
            "dn: {}\nchangetype: modify\nreplace: title\ntitle: Director\n",
            dn("S1")
        ))
        .unwrap();
    let mut last = ann();
    last.job_title = Some("Lead".into());
    last.phone = None;
    let mut moved = last.clone();
    moved.email = Some("ann.lee@example.net".into());
    let outcomes = apply(sink.as_mut(), vec![updated_from(Some(last), moved)]).await;
    assert!(matches!(outcomes[0], Outcome::Applied { .. }));
    assert_eq!(
        one(&server, &dn("S1"), "mail").as_deref(),
        Some("ann.lee@example.net")
    );
    assert_eq!(
        one(&server, &dn("S1"), "title").as_deref(),
        Some("Director"),
        "an attribute the source did not change is the admin's"
    );

    let outcomes = apply(sink.as_mut(), vec![remove(&ann())]).await;
    assert_eq!(
        outcomes,
        vec![Outcome::Applied {
            handle: Some(dn("S1"))
        }]
    );
    assert_eq!(server.entry(&dn("S1"), &[]).unwrap(), None);
    // Removing again converges.
    let outcomes = apply(sink.as_mut(), vec![remove(&ann())]).await;
    assert!(matches!(outcomes[0], Outcome::Applied { .. }));
}

#[tokio::test]
async fn removal_can_mark_instead_of_delete_and_a_comeback_unmarks() {
    let server = slapd(Slapd::builder());
    let settings = sink_settings(
        &server,
        "removal = { attribute = \"employeeType\", value = \"disabled\" }\n",
    );
    let mut sink = sink(&settings);
    apply(sink.as_mut(), vec![create(ann())]).await;
    server
        .ldapmodify(&format!(
            "dn: {}\nchangetype: modify\nadd: employeeType\nemployeeType: contractor\n",
            dn("S1")
        ))
        .unwrap();

    let outcomes = apply(sink.as_mut(), vec![remove(&ann())]).await;
    assert!(matches!(outcomes[0], Outcome::Applied { .. }));
    let mut types = server.values(&dn("S1"), "employeeType").unwrap();
    types.sort();
    assert_eq!(
        types,
        vec!["contractor".to_string(), "disabled".to_string()]
    );

    // The source with the matching inactive_filter reads the person as inactive.
    let src = source(&source_settings(
        &server,
        "inactive_filter = \"(employeeType=disabled)\"\n",
    ));
    let read = contactsync_testkit::read_all(src.as_ref(), contactsync_core::ReadMode::Full)
        .await
        .unwrap();
    assert_eq!(read.contacts()[0].status, ContactStatus::Inactive);

    // An inactive contact is written marked; an active one unmarked, other values kept.
    let outcomes = apply(sink.as_mut(), vec![update(ann())]).await;
    assert!(matches!(outcomes[0], Outcome::Applied { .. }));
    assert_eq!(
        server.values(&dn("S1"), "employeeType").unwrap(),
        vec!["contractor".to_string()]
    );
    let mut inactive = ann();
    inactive.status = ContactStatus::Inactive;
    apply(sink.as_mut(), vec![update(inactive)]).await;
    assert!(server
        .values(&dn("S1"), "employeeType")
        .unwrap()
        .contains(&"disabled".to_string()));
}

#[tokio::test]
async fn a_create_onto_an_existing_entry_converges() {
    let server = slapd(Slapd::builder());
    server
        .ldapadd(&format!(
            "dn: {}\nobjectClass: inetOrgPerson\nuid: S1\ncn: Old Name\nsn: Old\nmail: old@example.org\ntitle: Intern\n",
            dn("S1")
        ))
        .unwrap();
    let mut sink = sink(&sink_settings(&server, ""));
    let outcomes = apply(sink.as_mut(), vec![create(ann()), create(ann())]).await;
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Outcome::Applied { .. })),
        "{outcomes:?}"
    );
    assert_eq!(
        one(&server, &dn("S1"), "mail").as_deref(),
        Some("ann.lee@example.org")
    );
    assert_eq!(
        one(&server, &dn("S1"), "title").as_deref(),
        Some("Engineer")
    );
    assert_eq!(one(&server, &dn("S1"), "sn").as_deref(), Some("Lee"));
}

#[tokio::test]
async fn dn_values_with_special_characters_are_escaped() {
    let server = slapd(Slapd::builder());
    let mut sink = sink(&sink_settings(&server, ""));
    let mut tricky = ann();
    tricky.external_id = Some(r"E*(1)\x,+=#".into());
    let outcomes = apply(
        sink.as_mut(),
        vec![create(tricky.clone()), update(tricky.clone())],
    )
    .await;
    let Outcome::Applied {
        handle: Some(handle),
    } = &outcomes[0]
    else {
        panic!("{outcomes:?}");
    };
    assert!(matches!(outcomes[1], Outcome::Applied { .. }));
    assert_eq!(
        server.values(handle, "employeeNumber").unwrap(),
        vec![r"E*(1)\x,+=#".to_string()]
    );
    let outcomes = apply(sink.as_mut(), vec![remove(&tricky)]).await;
    assert!(matches!(outcomes[0], Outcome::Applied { .. }));
    assert_eq!(server.entry(handle, &[]).unwrap(), None);
}

#[tokio::test]
async fn a_person_without_a_surname_is_rejected_with_a_reason() {
    let server = slapd(Slapd::builder());
    let mut sink = sink(&sink_settings(&server, ""));
    let nameless = Contact {
        external_id: Some("S2".into()),
        email: Some("nameless@example.org".into()),
        ..Contact::default()
    };
    let outcomes = apply(sink.as_mut(), vec![create(nameless), create(ann())]).await;
    match &outcomes[0] {
        Outcome::Rejected { reason, retry, .. } => {
            assert!(reason.contains("sn"), "{reason}");
            assert!(!retry);
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert!(
        matches!(outcomes[1], Outcome::Applied { .. }),
        "the batch goes on"
    );
}

#[tokio::test]
async fn a_bad_bind_fails_the_batch_without_naming_the_password() {
    let server = slapd(Slapd::builder());
    let wrong = (server.admin_dn(), "not-the-secret");
    let settings = settings_as(&server, "sinks.directory", wrong, PEOPLE_DN, "");
    let mut sink = sink(&settings);
    let mut store = MemoryStore::new();
    let mut ctx = store.context();
    let batch = ChangeBatch {
        id: "b".into(),
        changes: vec![create(ann())],
    };
    let err = sink.apply(&batch, &mut ctx).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(server.admin_dn()) && !text.contains("not-the-secret"),
        "{text}"
    );
}

#[tokio::test]
async fn sink_conformance_with_delete() {
    let server = slapd(Slapd::builder());
    let sink = sink(&sink_settings(&server, ROUND_TRIP_MAPPING));
    let readback = source(&source_settings(
        &server,
        &format!("multi_value = \"join\"\n{ROUND_TRIP_MAPPING}"),
    ));
    let unacceptable = Contact {
        external_id: Some("NO-NAME".into()),
        email: Some("no.name@example.com".into()),
        ..Contact::default()
    };
    SinkConformance::new(sink, readback)
        .with_unacceptable(vec![unacceptable])
        .run()
        .await
        .expect("conformance");
}

#[tokio::test]
async fn sink_conformance_with_mark_removal() {
    let server = slapd(Slapd::builder());
    let sink = sink(&sink_settings(
        &server,
        &format!(
            "removal = {{ attribute = \"employeeType\", value = \"left\" }}\n{ROUND_TRIP_MAPPING}"
        ),
    ));
    let readback = source(&source_settings(
        &server,
        &format!("multi_value = \"join\"\ninactive_filter = \"(employeeType=left)\"\n{ROUND_TRIP_MAPPING}"),
    ));
    SinkConformance::new(sink, readback)
        .run()
        .await
        .expect("conformance");
}

/// `check` of both directions names a base DN the directory does not hold (one check,
/// `client::check_base`, serves both).
#[tokio::test]
async fn check_names_a_base_dn_that_does_not_exist() {
    let server = slapd(Slapd::builder());
    let toml = |dn: &str, password: &str| {
        format!(
            "url = \"{}\"\nbind_dn = \"{dn}\"\npassword = \"{password}\"\nbase_dn = \"ou=nobody,{}\"\n",
            server.url(),
            server.people_dn()
        )
    };
    let source_settings = contactsync_core::ConnectorSettings::from_toml(
        "sources.directory",
        &toml(server.reader_dn(), server.reader_password()),
    )
    .expect("settings");
    let sink_settings = contactsync_core::ConnectorSettings::from_toml(
        "sinks.directory",
        &toml(server.admin_dn(), server.admin_password()),
    )
    .expect("settings");
    let from_source = source(&source_settings)
        .check()
        .await
        .expect_err("no such base");
    let from_sink = sink(&sink_settings)
        .check()
        .await
        .expect_err("no such base");
    for error in [from_source, from_sink] {
        assert!(
            error.to_string().contains("ou=nobody") && error.to_string().contains("does not exist"),
            "{error}"
        );
    }
}
