//! The connector against its sandbox, over real HTTP on 127.0.0.1.

use chrono::{TimeZone, Utc};
use contactsync_businesscatalyst::{sink, source};
use contactsync_core::{
    Change, ChangeBatch, ConnectorError, ConnectorSettings, Contact, ContactKey, ContactStatus,
    Field, Origin, Outcome, ReadMode, SandboxOptions, Sink, Source, SyncedEntry,
};
use contactsync_sandbox_businesscatalyst::{
    Faults, Injected, Sandbox, SandboxConfig, SandboxContact, SoapCall, WireFaults,
};
use contactsync_testkit::changes::{self, create};
use contactsync_testkit::{read_all, source_conformance, MemoryStore, SinkConformance};

fn settings_for(base_url: &str, extra: &str) -> ConnectorSettings {
    ConnectorSettings::from_toml(
        "sources.bc",
        &format!(
            "base_url = \"{base_url}\"\nsite_id = 1\nusername = \"sandbox\"\npassword = \"sandbox\"\n\
             retry_backoff = \"5ms\"\n{extra}"
        ),
    )
    .unwrap()
}

fn source_of(sb: &Sandbox, extra: &str) -> Box<dyn Source> {
    source::build(&settings_for(sb.base_url(), extra)).unwrap()
}

fn sink_of(sb: &Sandbox, extra: &str) -> Box<dyn Sink> {
    sink::build(&settings_for(sb.base_url(), extra)).unwrap()
}

async fn sandbox() -> Sandbox {
    let sb = Sandbox::start(SandboxConfig::default()).await.unwrap();
    sb.set_clock(Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap());
    sb
}

fn person(i: usize) -> SandboxContact {
    SandboxContact {
        external_id: Some(format!("E{i:04}")),
        email_address: Some(format!("p{i:04}@example.com")),
        first_name: Some(format!("First{i}")),
        last_name: Some("Last".into()),
        master_opt_in: true,
        ..SandboxContact::default()
    }
}

fn contact(ext: Option<&str>, email: Option<&str>, first: &str) -> Contact {
    let mut c = Contact::default();
    if let Some(e) = ext {
        c.set(&Field::ExternalId, e).unwrap();
    }
    if let Some(e) = email {
        c.set(&Field::Email, e).unwrap();
    }
    c.set(&Field::FirstName, first).unwrap();
    c
}

fn batch(changes: Vec<Change>) -> ChangeBatch {
    ChangeBatch {
        id: "test-1".into(),
        changes,
    }
}

fn calls<'a>(log: &'a [SoapCall], op: &'a str) -> Vec<&'a SoapCall> {
    log.iter().filter(|r| r.operation == op).collect()
}

#[tokio::test]
async fn full_then_incremental_read_asks_from_the_cursor() {
    let sb = sandbox().await;
    sb.seed((1..=250).map(person).collect());
    let src = source_of(&sb, "");
    let full = read_all(src.as_ref(), ReadMode::Full).await.unwrap();
    assert_eq!(full.records.len(), 250);
    assert!(full.outcome.complete);
    assert_eq!(full.outcome.cursor.as_deref(), Some("2026-03-01T12:00:00"));
    let log = sb.requests();
    let pages = calls(&log, "ContactList_Retrieve");
    let starts: Vec<_> = pages.iter().map(|r| r.record_start).collect();
    assert_eq!(starts, [Some(0), Some(100), Some(200)]);
    assert!(pages
        .iter()
        .all(|r| r.last_update_date.as_deref() == Some("0001-01-01T00:00:00")));
    let first = &full.records[0];
    assert_eq!(
        first.origin,
        Origin::Record {
            system: "businesscatalyst".into(),
            id: "1".into()
        }
    );
    assert_eq!(first.contact.external_id.as_deref(), Some("E0001"));
    assert_eq!(
        first.contact.updated_at,
        Some(Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap())
    );

    // Later: two changes and a deletion.
    sb.advance_clock(chrono::Duration::minutes(5));
    sb.clear_requests();
    let mut snk = sink_of(&sb, "");
    let mut store = MemoryStore::new();
    let updated = contact(Some("E0007"), Some("p0007@example.com"), "Changed");
    let new = contact(Some("E9999"), Some("new@example.com"), "New");
    let removal = Change::Remove {
        key: ContactKey::ExternalId("E0010".into()),
        previous: SyncedEntry {
            content_hash: 0,
            email: Some("p0010@example.com".into()),
            handle: Some("10".into()),
            record: None,
        },
        origin: Origin::Derived,
    };
    let out = snk
        .apply(
            &batch(vec![create(updated), create(new), removal]),
            &mut store.context(),
        )
        .await
        .unwrap();
    assert!(
        out.iter().all(|o| matches!(o, Outcome::Applied { .. })),
        "{out:?}"
    );

    let inc = read_all(
        src.as_ref(),
        ReadMode::Incremental {
            cursor: full.outcome.cursor.clone(),
        },
    )
    .await
    .unwrap();
    assert!(!inc.outcome.complete);
    // Inclusive from the cursor: the 250 of 12:00 are read again, plus the 3 new changes.
    let after: Vec<_> = inc
        .records
        .iter()
        .filter(|r| {
            r.contact.updated_at > Some(Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap())
        })
        .collect();
    assert_eq!(after.len(), 3);
    let deleted: Vec<_> = after.iter().filter(|r| r.deleted).collect();
    assert_eq!(deleted.len(), 1);
    assert_eq!(deleted[0].contact.external_id.as_deref(), Some("E0010"));
    assert_eq!(inc.outcome.cursor.as_deref(), Some("2026-03-01T12:05:00"));
    let log = sb.requests();
    let retrieves = calls(&log, "ContactList_Retrieve");
    assert!(retrieves
        .iter()
        .all(|r| r.last_update_date.as_deref() == Some("2026-03-01T12:00:00")));

    // From the new cursor, only the three.
    let next = read_all(
        src.as_ref(),
        ReadMode::Incremental {
            cursor: inc.outcome.cursor.clone(),
        },
    )
    .await
    .unwrap();
    assert_eq!(next.records.len(), 3);
    assert_eq!(next.outcome.cursor, inc.outcome.cursor);
    // Nothing new: the cursor is kept.
    sb.advance_clock(chrono::Duration::minutes(5));
    let far = read_all(
        src.as_ref(),
        ReadMode::Incremental {
            cursor: Some("2026-03-02T00:00:00".into()),
        },
    )
    .await
    .unwrap();
    assert!(far.records.is_empty());
    assert_eq!(far.outcome.cursor.as_deref(), Some("2026-03-02T00:00:00"));
}

#[tokio::test]
async fn upserts_match_by_external_id_then_email_and_keyless_is_rejected_unsent() {
    let sb = sandbox().await;
    let mut snk = sink_of(&sb, "resolve_entity_ids = true");
    let mut store = MemoryStore::new();
    let out = snk
        .apply(
            &batch(vec![
                create(contact(Some("X1"), Some("x1@example.com"), "Ann")),
                create(contact(None, Some("only@example.com"), "Bo")),
                create(contact(None, None, "Nobody")),
            ]),
            &mut store.context(),
        )
        .await
        .unwrap();
    assert_eq!(
        out[0],
        Outcome::Applied {
            handle: Some("1".into())
        }
    );
    assert_eq!(
        out[1],
        Outcome::Applied {
            handle: Some("2".into())
        }
    );
    assert!(
        matches!(&out[2], Outcome::Rejected { reason, retry: false, .. } if reason.contains("neither"))
    );
    let log = sb.requests();
    assert_eq!(calls(&log, "ContactList_UpdateInsert")[0].records, 2);
    assert!(log.iter().all(|r| r.ignored_elements.is_empty()), "{log:?}");

    // Update by external id (email changes too), and by email.
    let out = snk
        .apply(
            &batch(vec![
                create(contact(Some("X1"), Some("x1.new@example.com"), "Anne")),
                create(contact(None, Some("ONLY@EXAMPLE.COM"), "Bob")),
            ]),
            &mut store.context(),
        )
        .await
        .unwrap();
    assert!(out.iter().all(|o| matches!(o, Outcome::Applied { .. })));
    let stored = sb.contacts();
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[0].first_name.as_deref(), Some("Anne"));
    assert_eq!(
        stored[0].email_address.as_deref(),
        Some("x1.new@example.com")
    );
    assert_eq!(stored[1].first_name.as_deref(), Some("Bob"));
}

#[tokio::test]
async fn batches_never_exceed_100_records() {
    let sb = sandbox().await;
    let mut snk = sink_of(&sb, "");
    assert_eq!(snk.capabilities().max_batch, 100);
    let changes: Vec<Change> = (0..250)
        .map(|i| {
            create(contact(
                Some(&format!("B{i}")),
                Some(&format!("b{i}@example.com")),
                "B",
            ))
        })
        .collect();
    let mut store = MemoryStore::new();
    // Even handed 250 at once, the sink sends 100, 100, 50.
    let out = snk
        .apply(&batch(changes), &mut store.context())
        .await
        .unwrap();
    assert_eq!(out.len(), 250);
    let log = sb.requests();
    let sizes: Vec<_> = calls(&log, "ContactList_UpdateInsert")
        .iter()
        .map(|r| r.records)
        .collect();
    assert_eq!(sizes, [100, 100, 50]);
    assert_eq!(sb.contacts().len(), 250);
}

#[tokio::test]
async fn a_fault_on_one_record_rejects_only_that_record() {
    let sb = sandbox().await;
    sb.set_faults(Faults {
        fault_on_emails: vec!["bad@example.com".into()],
        ..Faults::default()
    });
    let mut snk = sink_of(&sb, "");
    let mut store = MemoryStore::new();
    let out = snk
        .apply(
            &batch(vec![
                create(contact(Some("F1"), Some("ok1@example.com"), "A")),
                create(contact(Some("F2"), Some("bad@example.com"), "B")),
                create(contact(Some("F3"), Some("not-an-email"), "C")),
                create(contact(Some("F4"), Some("ok2@example.com"), "D")),
            ]),
            &mut store.context(),
        )
        .await
        .unwrap();
    assert!(matches!(out[0], Outcome::Applied { .. }));
    // Faults that follow the record when it is sent alone are final: sent unchanged,
    // it would fault again every run.
    assert!(
        matches!(&out[1], Outcome::Rejected { reason, retry: false, .. } if reason.contains("ERROR:") && reason.contains("bad@example.com")),
        "{out:?}"
    );
    assert!(
        matches!(&out[2], Outcome::Rejected { reason, retry: false, .. } if reason.contains("Invalid email address")),
        "{out:?}"
    );
    assert!(matches!(out[3], Outcome::Applied { .. }));
    let emails: Vec<_> = sb
        .contacts()
        .into_iter()
        .filter_map(|c| c.email_address)
        .collect();
    assert_eq!(emails, ["ok1@example.com", "ok2@example.com"]);
    // One bulk call, then one per record; no fault was retried.
    assert_eq!(calls(&sb.requests(), "ContactList_UpdateInsert").len(), 5);
}

#[tokio::test]
async fn characters_xml_cannot_carry_are_left_out_of_what_is_sent() {
    let sb = sandbox().await;
    let mut snk = sink_of(&sb, "");
    let mut store = MemoryStore::new();
    let out = snk
        .apply(
            &batch(vec![create(contact(
                Some("X1"),
                Some("ann@example.com"),
                "An\u{1}n\u{b}",
            ))]),
            &mut store.context(),
        )
        .await
        .unwrap();
    assert!(matches!(out[0], Outcome::Applied { .. }), "{out:?}");
    let names: Vec<_> = sb
        .contacts()
        .into_iter()
        .filter_map(|c| c.first_name)
        .collect();
    assert_eq!(names, ["Ann"]);
}

#[tokio::test]
async fn an_answer_without_more_records_stops_the_read_instead_of_ending_it() {
    let sb = sandbox().await;
    sb.seed((1..=150).map(person).collect());
    sb.set_faults(Faults {
        omit_more_records: true,
        ..Faults::default()
    });
    let err = read_all(source_of(&sb, "").as_ref(), ReadMode::Full)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ConnectorError::Protocol { message, .. } if message.contains("moreRecords")),
        "a read that cannot tell whether more pages follow is not complete: {err}"
    );
}

#[tokio::test]
async fn authentication_faults_are_clear_errors() {
    let sb = sandbox().await;
    let bad = ConnectorSettings::from_toml(
        "sources.bc",
        &format!(
            "base_url = \"{}\"\nsite_id = 1\nusername = \"sandbox\"\npassword = \"wrong\"",
            sb.base_url()
        ),
    )
    .unwrap();
    let err = source::build(&bad).unwrap().check().await.unwrap_err();
    assert!(
        matches!(&err, ConnectorError::Auth { message, .. } if message.contains("Invalid username or password")),
        "{err}"
    );
    let other_site = ConnectorSettings::from_toml(
        "sinks.bc",
        &format!(
            "base_url = \"{}\"\nsite_id = 2\nusername = \"sandbox\"\npassword = \"sandbox\"",
            sb.base_url()
        ),
    )
    .unwrap();
    let err = sink::build(&other_site).unwrap().check().await.unwrap_err();
    assert!(
        matches!(&err, ConnectorError::Auth { message, .. } if message.contains("siteId")),
        "{err}"
    );
    // A fault is not retried.
    assert_eq!(sb.requests().len(), 2);
    source_of(&sb, "").check().await.unwrap();
}

#[tokio::test]
async fn transport_failures_are_retried() {
    let sb = sandbox().await;
    sb.seed((1..=250).map(person).collect());
    sb.set_wire_faults(WireFaults {
        fail_every: 2,
        ..WireFaults::default()
    });
    let read = read_all(source_of(&sb, "").as_ref(), ReadMode::Full)
        .await
        .unwrap();
    assert_eq!(read.records.len(), 250);
    sb.set_wire_faults(WireFaults {
        drop_every: 2,
        ..WireFaults::default()
    });
    let read = read_all(source_of(&sb, "").as_ref(), ReadMode::Full)
        .await
        .unwrap();
    assert_eq!(read.records.len(), 250);
    let log = sb.requests();
    assert!(log.iter().any(|r| r.injected == Some(Injected::Failed)));
    assert!(log.iter().any(|r| r.injected == Some(Injected::Dropped)));
    // Always failing: the read fails (bounded), it does not end short.
    sb.set_wire_faults(WireFaults {
        fail_every: 1,
        ..WireFaults::default()
    });
    let err = read_all(source_of(&sb, "max_attempts = 2").as_ref(), ReadMode::Full)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ConnectorError::Call {
                status: Some(500),
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn removal_policies() {
    let sb = sandbox().await;
    sb.seed(vec![person(1), person(2), person(3)]);
    let remove = |key: ContactKey, email: Option<&str>, handle: Option<&str>| Change::Remove {
        key,
        previous: SyncedEntry {
            content_hash: 0,
            email: email.map(String::from),
            handle: handle.map(String::from),
            record: None,
        },
        origin: Origin::Derived,
    };
    let mut store = MemoryStore::new();
    let mut deleting = sink_of(&sb, "");
    let out = deleting
        .apply(
            &batch(vec![
                remove(ContactKey::ExternalId("E0001".into()), None, None),
                remove(
                    ContactKey::Email("p0002@example.com".into()),
                    Some("p0002@example.com"),
                    None,
                ),
                remove(
                    ContactKey::Email("gone@example.com".into()),
                    Some("gone@example.com"),
                    None,
                ),
            ]),
            &mut store.context(),
        )
        .await
        .unwrap();
    assert!(
        out.iter().all(|o| matches!(o, Outcome::Applied { .. })),
        "{out:?}"
    );
    let ops: Vec<_> = sb.requests().into_iter().map(|r| r.operation).collect();
    assert_eq!(
        ops,
        [
            "Contact_RetrieveByExternalID",
            "Contact_DeleteByEntityID",
            "Contact_DeleteByEmailAddress",
            "Contact_DeleteByEmailAddress"
        ]
    );
    let mut opting_out = sink_of(&sb, "removal = \"opt_out\"");
    assert_eq!(
        opting_out.capabilities().removal,
        contactsync_core::RemovalStyle::OptOut
    );
    let out = opting_out
        .apply(
            &batch(vec![remove(
                ContactKey::ExternalId("E0003".into()),
                None,
                Some("3"),
            )]),
            &mut store.context(),
        )
        .await
        .unwrap();
    assert!(matches!(out[0], Outcome::Applied { .. }));
    let stored = sb.contacts();
    assert!(stored[0].deleted && stored[1].deleted && !stored[2].deleted);
    assert!(!stored[2].master_opt_in);
    assert_eq!(
        stored[2].first_name.as_deref(),
        Some("First3"),
        "opt-out keeps the rest"
    );
    let read = read_all(source_of(&sb, "").as_ref(), ReadMode::Full)
        .await
        .unwrap();
    let third = read
        .records
        .iter()
        .find(|r| r.contact.external_id.as_deref() == Some("E0003"))
        .unwrap();
    assert_eq!(third.contact.status, ContactStatus::OptedOut);
}

#[tokio::test]
async fn site_time_zone_is_applied_to_dates() {
    let sb = Sandbox::start(SandboxConfig {
        time_zone: chrono_tz::Europe::London,
        ..SandboxConfig::default()
    })
    .await
    .unwrap();
    sb.set_clock(Utc.with_ymd_and_hms(2026, 7, 1, 9, 0, 0).unwrap());
    sb.seed(vec![person(1)]);
    let read = read_all(
        source_of(&sb, "time_zone = \"Europe/London\"").as_ref(),
        ReadMode::Full,
    )
    .await
    .unwrap();
    assert_eq!(read.outcome.cursor.as_deref(), Some("2026-07-01T10:00:00"));
    assert_eq!(
        read.records[0].contact.updated_at,
        Some(Utc.with_ymd_and_hms(2026, 7, 1, 9, 0, 0).unwrap())
    );
}

#[tokio::test]
async fn source_conformance_suite() {
    let sb = sandbox().await;
    sb.seed((1..=5).map(person).collect());
    let expected: Vec<Contact> = (1..=5)
        .map(|i| {
            let mut c = contact(
                Some(&format!("E{i:04}")),
                Some(&format!("p{i:04}@example.com")),
                &format!("First{i}"),
            );
            c.set(&Field::LastName, "Last").unwrap();
            c
        })
        .collect();
    source_conformance(source_of(&sb, "").as_ref(), &expected)
        .await
        .unwrap();
}

#[tokio::test]
async fn sink_conformance_suite() {
    let sb = sandbox().await;
    sb.use_system_clock();
    let fields = vec![
        Field::ExternalId,
        Field::Email,
        Field::FirstName,
        Field::LastName,
        Field::DisplayName,
        Field::Phone,
        Field::Mobile,
        Field::Status,
    ];
    let unacceptable = vec![
        Contact {
            first_name: Some("No identity".into()),
            ..Contact::default()
        },
        Contact {
            external_id: Some("BAD-EMAIL".into()),
            email: Some("not-an-email".into()),
            ..Contact::default()
        },
    ];
    SinkConformance::new(sink_of(&sb, ""), source_of(&sb, ""))
        .with_round_trip_fields(fields)
        .with_unacceptable(unacceptable)
        .run()
        .await
        .unwrap();
}

#[tokio::test]
async fn registry_sandbox_accepts_exactly_the_sections_account() {
    let factory = contactsync_core::registry::sandbox("businesscatalyst").unwrap();
    let section = ConnectorSettings::from_toml(
        "sources.bc",
        "base_url = \"sandbox\"\nsite_id = 77\nusername = \"api\"\npassword = \"s3cret\"\nremoval = \"opt_out\"",
    )
    .unwrap();
    let running = (factory.start)(SandboxOptions {
        settings: Some(section),
        ..SandboxOptions::default()
    })
    .await
    .unwrap();
    let good = ConnectorSettings::from_toml(
        "sources.bc",
        &format!(
            "base_url = \"{}\"\nsite_id = 77\nusername = \"api\"\npassword = \"s3cret\"",
            running.base_url
        ),
    )
    .unwrap();
    source::build(&good).unwrap().check().await.unwrap();
    let defaults = settings_for(&running.base_url, "");
    let err = source::build(&defaults).unwrap().check().await.unwrap_err();
    assert!(matches!(err, ConnectorError::Auth { .. }));
    running.shutdown.cancel();
    assert!(contactsync_core::registry::source("businesscatalyst").is_some());
    assert!(contactsync_core::registry::sink("businesscatalyst").is_some());
}

#[tokio::test]
async fn data_file_persists_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bc.json");
    let config = SandboxConfig {
        data_file: Some(file.clone()),
        ..SandboxConfig::default()
    };
    let sb = Sandbox::start(config.clone()).await.unwrap();
    let mut snk = sink_of(&sb, "");
    let mut store = MemoryStore::new();
    snk.apply(
        &batch(vec![create(contact(
            Some("P1"),
            Some("p1@example.com"),
            "Kept",
        ))]),
        &mut store.context(),
    )
    .await
    .unwrap();
    sb.shutdown().await.unwrap();
    assert!(file.exists());
    let sb = Sandbox::start(config).await.unwrap();
    let contacts = sb.contacts();
    assert_eq!(contacts.len(), 1);
    assert_eq!(contacts[0].first_name.as_deref(), Some("Kept"));
    // New ids continue after the stored ones.
    assert_eq!(sb.seed(vec![person(2)]), [2]);
}

/// A site's contacts without an `externalId` (web sign-ups) are matched by email before
/// a create, so the first sync into an existing site duplicates nobody: one by one for
/// a small change set, through one read of the site for a large one.
#[tokio::test]
async fn creates_update_the_site_s_contacts_that_have_no_external_id() {
    for creates in [3usize, 150] {
        let sb = sandbox().await;
        let signed_up: Vec<SandboxContact> = (1..=creates)
            .map(|i| SandboxContact {
                external_id: None,
                first_name: Some("Web".into()),
                ..person(i)
            })
            .collect();
        let ids = sb.seed(signed_up);
        let mut snk = sink_of(&sb, "");
        let mut store = MemoryStore::new();
        let changes: Vec<Change> = (1..=creates)
            .map(|i| {
                let email = format!("P{i:04}@Example.com");
                create(contact(Some(&format!("HR{i}")), Some(&email), "Ann"))
            })
            .collect();
        let plan = contactsync_core::ChangePlan {
            creates: creates as u64,
            ..Default::default()
        };
        let mut ctx = store.context();
        snk.begin(&plan, &mut ctx).await.unwrap();
        let out = snk.apply(&batch(changes), &mut ctx).await.unwrap();
        let live: Vec<SandboxContact> = sb.contacts().into_iter().filter(|c| !c.deleted).collect();
        assert_eq!(live.len(), creates, "{creates}: nobody added twice");
        assert!(
            out.iter()
                .all(|o| matches!(o, Outcome::Applied { handle: Some(_) })),
            "the matched entity id is kept as the handle: {out:?}"
        );
        let first = live
            .iter()
            .find(|c| c.entity_id == ids[0])
            .expect("the signed-up contact");
        assert_eq!(first.external_id.as_deref(), Some("HR1"));
        assert_eq!(first.first_name.as_deref(), Some("Ann"));
        let retrieves = calls(&sb.requests(), "ContactList_Retrieve").len();
        let lookups = calls(&sb.requests(), "Contact_RetrieveByEmailAddress").len();
        if creates > 100 {
            assert_eq!(
                (retrieves, lookups),
                (2, 0),
                "one read of the site, 2 pages"
            );
        } else {
            assert_eq!((retrieves, lookups), (0, creates), "one lookup a create");
        }
    }
}

fn update_from(before: Contact, after: Contact) -> Change {
    changes::update_from(&before, after)
}

/// Consent belongs to the person and fields to the source that gives them: an update
/// neither re-opts-in someone who opted out on the site nor blanks a field the source
/// does not have; a status that changed in the source, and a field the source cleared,
/// are sent.
#[tokio::test]
async fn an_update_keeps_the_site_s_consent_and_the_fields_the_source_does_not_give() {
    use contactsync_sandbox_businesscatalyst::SandboxPhone;
    let sb = sandbox().await;
    sb.seed(vec![SandboxContact {
        full_name: Some("Ann Lee (admin)".into()),
        last_name: Some("Lee".into()),
        master_opt_in: false,
        phone_nos: vec![SandboxPhone {
            phone_no_type_id: 3,
            phone_no: "+32 2 555 01 01".into(),
        }],
        ..person(1)
    }]);
    let mut snk = sink_of(&sb, "");
    let mut store = MemoryStore::new();
    let before = {
        let mut c = contact(Some("E0001"), Some("p0001@example.com"), "First1");
        c.set(&Field::LastName, "Lee").unwrap();
        c
    };
    // The source (no phone, no display name) renames her; she stays active there.
    let mut renamed = before.clone();
    renamed.set(&Field::FirstName, "Annie").unwrap();
    let out = snk
        .apply(
            &batch(vec![update_from(before.clone(), renamed.clone())]),
            &mut store.context(),
        )
        .await
        .unwrap();
    assert!(matches!(out[0], Outcome::Applied { .. }), "{out:?}");
    let now = sb.contacts().remove(0);
    assert_eq!(now.first_name.as_deref(), Some("Annie"));
    assert!(!now.master_opt_in, "her own opt-out on the site stands");
    assert_eq!(now.phone_nos.len(), 1, "the admin's phone stays");
    assert_eq!(now.full_name.as_deref(), Some("Ann Lee (admin)"));

    // The source clears her last name and makes her inactive: both are sent.
    let mut left = renamed.clone();
    left.set(&Field::LastName, "").unwrap();
    left.status = ContactStatus::Inactive;
    snk.apply(
        &batch(vec![update_from(renamed, left.clone())]),
        &mut store.context(),
    )
    .await
    .unwrap();
    let now = sb.contacts().remove(0);
    assert_eq!(now.last_name, None, "a field the source cleared is cleared");
    assert!(!now.master_opt_in);
    assert_eq!(now.phone_nos.len(), 1);

    // Back to active in the source: a status change, so it is sent.
    let mut back = left.clone();
    back.status = ContactStatus::Active;
    snk.apply(&batch(vec![update_from(left, back)]), &mut store.context())
        .await
        .unwrap();
    assert!(
        sb.contacts().remove(0).master_opt_in,
        "the source's own change is sent"
    );
}

/// The autumn night repeats an hour of the site's clock: a change made in the repeated
/// hour's second run is stamped earlier than the cursor a read took in its first. The
/// next incremental read still brings it.
#[tokio::test]
async fn a_change_in_the_repeated_hour_is_read_after_a_cursor_taken_in_its_first_run() {
    let sb = sandbox().await;
    let london: chrono_tz::Tz = "Europe/London".parse().unwrap();
    sb.set_time_zone(london);
    // 00:50 UTC on 25 October 2026 is 01:50 BST; at 01:00 UTC the clock goes back to
    // 01:00 GMT.
    sb.set_clock(Utc.with_ymd_and_hms(2026, 10, 25, 0, 50, 0).unwrap());
    sb.seed((1..=3).map(person).collect());
    let src = source_of(&sb, "time_zone = \"Europe/London\"");
    let first = read_all(src.as_ref(), ReadMode::Full).await.unwrap();
    assert_eq!(first.outcome.cursor.as_deref(), Some("2026-10-25T01:50:00"));
    // Twenty minutes later, 01:10 GMT: someone changes E0002.
    sb.advance_clock(chrono::Duration::minutes(20));
    let mut snk = sink_of(&sb, "time_zone = \"Europe/London\"");
    let out = snk
        .apply(
            &batch(vec![create(contact(
                Some("E0002"),
                Some("p0002@example.com"),
                "ChangedInTheRepeatedHour",
            ))]),
            &mut MemoryStore::new().context(),
        )
        .await
        .unwrap();
    assert!(matches!(out[0], Outcome::Applied { .. }), "{out:?}");
    let next = read_all(
        src.as_ref(),
        ReadMode::Incremental {
            cursor: first.outcome.cursor.clone(),
        },
    )
    .await
    .unwrap();
    let changed: Vec<_> = next
        .records
        .iter()
        .filter(|r| r.contact.first_name.as_deref() == Some("ChangedInTheRepeatedHour"))
        .collect();
    assert_eq!(
        changed.len(),
        1,
        "the change stamped 01:10 after a cursor of 01:50"
    );
    // A cursor outside a repeated hour is sent as it is.
    sb.clear_requests();
    read_all(
        src.as_ref(),
        ReadMode::Incremental {
            cursor: Some("2026-10-25T03:00:00".into()),
        },
    )
    .await
    .unwrap();
    let log = sb.requests();
    assert!(calls(&log, "ContactList_Retrieve")
        .iter()
        .all(|r| r.last_update_date.as_deref() == Some("2026-10-25T03:00:00")));
}

/// A fault that names no record is the service's own trouble: the upsert is tried
/// again and goes through; if the trouble lasts, the records stay pending (unknown,
/// sent again next run), never rejected for good and never recorded as written.
#[tokio::test]
async fn a_transient_fault_is_tried_again_and_never_a_final_rejection() {
    let sb = sandbox().await;
    let changes = || {
        batch(vec![
            create(contact(Some("T1"), Some("t1@example.com"), "A")),
            create(contact(Some("T2"), Some("t2@example.com"), "B")),
        ])
    };
    sb.set_faults(Faults {
        transient_faults: 1,
        ..Faults::default()
    });
    let mut snk = sink_of(&sb, "");
    let out = snk
        .apply(&changes(), &mut MemoryStore::new().context())
        .await
        .unwrap();
    assert!(
        out.iter().all(|o| matches!(o, Outcome::Applied { .. })),
        "{out:?}"
    );
    assert_eq!(sb.contacts().len(), 2);
    assert_eq!(calls(&sb.requests(), "ContactList_UpdateInsert").len(), 2);

    // Trouble that outlasts the tries: pending, not rejected.
    sb.clear_requests();
    sb.set_faults(Faults {
        transient_faults: 100,
        ..Faults::default()
    });
    let out = snk
        .apply(&changes(), &mut MemoryStore::new().context())
        .await
        .unwrap();
    assert!(
        out.iter().all(|o| matches!(o, Outcome::Unknown { .. })),
        "{out:?}"
    );
    assert_eq!(calls(&sb.requests(), "ContactList_UpdateInsert").len(), 3);
}
