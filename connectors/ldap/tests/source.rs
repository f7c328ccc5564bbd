//! The LDAP source against a real slapd: mapping, incremental reads, disabled accounts,
//! paging under a server size limit, bind failures, and the testkit's conformance suite.

mod common;

use std::time::{Duration, Instant};

use common::{expected_person, settings_as, slapd, source, source_settings};
use contactsync_core::{ConnectorError, ContactStatus, Origin, ReadMode};
use contactsync_ldap::source::format_generalized_time;
use contactsync_ldap::SourceConfig;
use contactsync_testkit::slapd::Slapd;
use contactsync_testkit::{read_all, source_conformance};

#[tokio::test]
async fn full_read_maps_inet_org_person_and_passes_conformance() {
    let server = slapd(Slapd::builder().people(5));
    let src = source(&source_settings(&server, ""));
    let expected: Vec<_> = (0..5).map(expected_person).collect();
    let read = source_conformance(src.as_ref(), &expected)
        .await
        .expect("conformance");
    assert!(read.outcome.complete);
    assert!(
        read.outcome.cursor.is_some(),
        "a full read returns the newest modifyTimestamp"
    );
    let first = read
        .records
        .iter()
        .find(|r| r.contact.external_id.as_deref() == Some("E00003"))
        .expect("person 3");
    assert_eq!(
        first.origin,
        Origin::Entry {
            dn: Slapd::person_dn(3)
        }
    );
    assert!(
        first.contact.updated_at.is_some(),
        "updated_at comes from modifyTimestamp"
    );
}

#[tokio::test]
async fn attribute_mapping_is_configuration() {
    let server = slapd(Slapd::builder().people(2));
    server
        .ldapmodify(&format!(
            "dn: {}\nchangetype: modify\nadd: title\ntitle: Architect\n",
            Slapd::person_dn(1)
        ))
        .unwrap();
    let settings = source_settings(
        &server,
        "multi_value = \"join\"\nmulti_value_separator = \" / \"\n\
         [attributes]\nuid = \"external_id\"\ntelephoneNumber = \"\"\nentryUUID = \"attributes.ldap_entry_uuid\"\n",
    );
    let read = read_all(source(&settings).as_ref(), ReadMode::Full)
        .await
        .unwrap();
    assert_eq!(read.records.len(), 2);
    let one = read
        .records
        .iter()
        .map(|r| &r.contact)
        .find(|c| c.external_id.as_deref() == Some("person00001"))
        .expect("uid is the external id now");
    assert_eq!(one.phone, None, "an attribute mapped to \"\" is not read");
    assert_eq!(one.job_title.as_deref(), Some("Engineer / Architect"));
    let uuid = one
        .attributes
        .get("ldap_entry_uuid")
        .expect("entryUUID mapped");
    assert_eq!(uuid.len(), 36, "{uuid}");
}

#[tokio::test]
async fn incremental_read_returns_only_what_changed_since_the_cursor() {
    let server = slapd(Slapd::builder().people(5));
    // modifyTimestamp has one-second resolution: let the seeding second pass.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The server runs on this machine, so its clock is ours.
    let cursor = format_generalized_time(chrono::Utc::now());
    server
        .ldapmodify(&format!(
            "dn: {}\nchangetype: modify\nreplace: title\ntitle: Manager\n",
            Slapd::person_dn(2)
        ))
        .unwrap();
    let src = source(&source_settings(&server, ""));
    let read = read_all(
        src.as_ref(),
        ReadMode::Incremental {
            cursor: Some(cursor.clone()),
        },
    )
    .await
    .unwrap();
    let ids: Vec<_> = read
        .contacts()
        .into_iter()
        .map(|c| c.external_id.unwrap())
        .collect();
    assert_eq!(ids, vec!["E00002".to_string()]);
    assert_eq!(read.contacts()[0].job_title.as_deref(), Some("Manager"));
    assert!(
        !read.outcome.complete,
        "an incremental read never implies removals"
    );
    assert!(read.outcome.cursor.as_deref().unwrap() >= cursor.as_str());
}

#[tokio::test]
async fn cursor_from_one_read_feeds_the_next() {
    let server = slapd(Slapd::builder().people(5));
    let src = source(&source_settings(&server, ""));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    server
        .ldapmodify(&format!(
            "dn: {}\nchangetype: modify\nreplace: title\ntitle: A\n",
            Slapd::person_dn(1)
        ))
        .unwrap();
    let full = read_all(src.as_ref(), ReadMode::Incremental { cursor: None })
        .await
        .unwrap();
    assert_eq!(full.records.len(), 5);
    assert!(full.outcome.complete, "no cursor yet: everything was read");
    let cursor = full.outcome.cursor.clone().expect("cursor");

    tokio::time::sleep(Duration::from_millis(1100)).await;
    server
        .ldapmodify(&format!(
            "dn: {}\nchangetype: modify\nreplace: title\ntitle: B\n",
            Slapd::person_dn(3)
        ))
        .unwrap();
    let next = read_all(
        src.as_ref(),
        ReadMode::Incremental {
            cursor: Some(cursor.clone()),
        },
    )
    .await
    .unwrap();
    let mut ids: Vec<_> = next
        .contacts()
        .into_iter()
        .map(|c| c.external_id.unwrap())
        .collect();
    ids.sort();
    // `>=`: person 1, changed in the cursor's own second, is read again on purpose (a
    // change later in that second must not be lost); the engine finds it unchanged.
    assert_eq!(ids, vec!["E00001".to_string(), "E00003".to_string()]);
    let advanced = next.outcome.cursor.clone().expect("cursor");
    assert!(advanced > cursor, "{advanced} > {cursor}");

    // Nothing changed since: only the boundary second is read again.
    let idle = read_all(
        src.as_ref(),
        ReadMode::Incremental {
            cursor: Some(advanced.clone()),
        },
    )
    .await
    .unwrap();
    let ids: Vec<_> = idle
        .contacts()
        .into_iter()
        .map(|c| c.external_id.unwrap())
        .collect();
    assert_eq!(ids, vec!["E00003".to_string()]);
    assert_eq!(idle.outcome.cursor, Some(advanced));
}

#[tokio::test]
async fn a_malformed_cursor_is_refused_not_put_into_the_filter() {
    let server = slapd(Slapd::builder().people(1));
    let src = source(&source_settings(&server, ""));
    let err = match src
        .read(ReadMode::Incremental {
            cursor: Some("*)(uid=*".into()),
        })
        .await
    {
        Ok(_) => panic!("a cursor that is not a time must be refused"),
        Err(e) => e,
    };
    assert!(err.to_string().contains("not a generalized time"), "{err}");
}

#[tokio::test]
async fn disabled_accounts_are_read_as_inactive() {
    let server = slapd(
        Slapd::builder()
            .people(3)
            .ldif(format!("{}employeeType: disabled\n", Slapd::person_ldif(3))),
    );
    let settings = source_settings(&server, "inactive_filter = \"(employeeType=disabled)\"\n");
    let read = read_all(source(&settings).as_ref(), ReadMode::Full)
        .await
        .unwrap();
    assert_eq!(
        read.records.len(),
        4,
        "disabled people are read, not dropped"
    );
    for record in &read.records {
        let expected = if record.contact.external_id.as_deref() == Some("E00003") {
            ContactStatus::Inactive
        } else {
            ContactStatus::Active
        };
        assert_eq!(
            record.contact.status, expected,
            "{:?}",
            record.contact.external_id
        );
    }
}

#[tokio::test]
async fn bind_failure_names_the_bind_dn_and_not_the_password() {
    let server = slapd(Slapd::builder().people(1));
    let password = "Wr0ng-Pa55word";
    let settings = contactsync_core::ConnectorSettings::from_toml(
        "sources.directory",
        &format!(
            "url = \"{}\"\nbind_dn = \"{}\"\npassword = \"{password}\"\nbase_dn = \"{}\"\n",
            server.url(),
            server.reader_dn(),
            server.people_dn()
        ),
    )
    .unwrap();
    let src = source(&settings);
    for err in [
        src.check().await.expect_err("check must fail"),
        src.read(ReadMode::Full)
            .await
            .err()
            .expect("read must fail"),
    ] {
        assert!(matches!(err, ConnectorError::Auth { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains(server.reader_dn()), "{text}");
        assert!(text.contains("invalidCredentials"), "{text}");
        assert!(!text.contains(password), "{text}");
        assert!(!format!("{err:?}").contains(password));
    }
    let config = contactsync_ldap::SourceConfig::from_settings(&settings).unwrap();
    assert!(
        !format!("{config:?}").contains(password),
        "settings' Debug hides the password"
    );
}

#[tokio::test]
async fn a_missing_base_dn_is_reported_by_check() {
    let server = slapd(Slapd::builder());
    let reader = (server.reader_dn(), server.reader_password());
    let nowhere = "ou=nowhere,dc=example,dc=org";
    let settings = settings_as(&server, "sources.directory", reader, nowhere, "");
    let err = source(&settings).check().await.unwrap_err();
    assert!(
        err.to_string().contains("ou=nowhere,dc=example,dc=org"),
        "{err}"
    );
}

#[tokio::test]
async fn filter_values_with_special_characters_are_escaped() {
    let tricky = r"E*(1)\x";
    let server = slapd(Slapd::builder().people(2).ldif(format!(
        "dn: uid=tricky,{}\nobjectClass: inetOrgPerson\nuid: tricky\ncn: Tricky\nsn: Tricky\nemployeeNumber: {tricky}\n",
        contactsync_testkit::slapd::PEOPLE_DN
    )));
    // Unescaped, `E*(1)\x` would be a malformed filter (or a wildcard matching more).
    let filter = format!("(employeeNumber={})", ldap3::ldap_escape(tricky));
    let settings = source_settings(&server, &format!("filter = '{filter}'\n"));
    let read = read_all(source(&settings).as_ref(), ReadMode::Full)
        .await
        .unwrap();
    let ids: Vec<_> = read
        .contacts()
        .into_iter()
        .map(|c| c.external_id.unwrap())
        .collect();
    assert_eq!(ids, vec![tricky.to_string()]);
}

/// 20 000 people through a server that answers at most 1 000 entries per search: only
/// a real paged read gets them all.
#[tokio::test]
async fn twenty_thousand_entries_are_read_in_pages_under_a_size_limit() {
    let server = slapd(Slapd::builder().size_limit(1000).people(20_000));

    // The limit is in force for the reader: an unpaged search is cut short.
    let (conn, mut ldap) = ldap3::LdapConnAsync::new(server.url()).await.unwrap();
    ldap3::drive!(conn);
    ldap.simple_bind(server.reader_dn(), server.reader_password())
        .await
        .unwrap()
        .success()
        .unwrap();
    let unpaged = ldap
        .search(
            server.people_dn(),
            ldap3::Scope::Subtree,
            "(objectClass=inetOrgPerson)",
            vec!["1.1"],
        )
        .await
        .unwrap();
    assert_eq!(unpaged.1.rc, 4, "sizeLimitExceeded without paging");
    let _ = ldap.unbind().await;

    let src = source(&source_settings(&server, "page_size = 500\n"));
    let mut stream = src.read(ReadMode::Full).await.unwrap();
    let mut count = 0usize;
    let mut last = None;
    while let Some(item) = stream.next().await.unwrap() {
        match item {
            contactsync_core::SourceItem::Record(r) => {
                count += 1;
                last = r.contact.external_id;
            }
            contactsync_core::SourceItem::Rejected(e) => panic!("rejected: {e}"),
            contactsync_core::SourceItem::Unchanged(row) => panic!("not asked for: {row:?}"),
        }
    }
    let outcome = stream.finish().await.unwrap();
    assert_eq!(count, 20_000);
    assert!(last.is_some());
    assert!(outcome.complete);
}

#[tokio::test]
async fn a_server_that_never_answers_times_out_clearly() {
    // Accepts TCP connections (the kernel's backlog) but never speaks LDAP.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ldap://{}", silent.local_addr().unwrap());
    let settings = contactsync_core::ConnectorSettings::from_toml(
        "sources.directory",
        &format!(
            "url = \"{url}\"\nbind_dn = \"cn=x\"\npassword = \"p\"\nbase_dn = \"dc=x\"\noperation_timeout = \"300ms\"\n"
        ),
    )
    .unwrap();
    let started = Instant::now();
    let err = source(&settings).check().await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    let text = err.to_string();
    assert!(
        text.contains("operation_timeout") && text.contains("cn=x"),
        "{text}"
    );
}

#[tokio::test]
async fn ldaps_and_starttls_connect() {
    let server = slapd(Slapd::builder().people(2).tls());
    let ldaps = server.ldaps_url().expect("ldaps url").to_string();
    let ca = server.ca_certificate().expect("the fixture's CA");
    let settings_with = |url: &str, extra: &str| {
        contactsync_core::ConnectorSettings::from_toml(
            "sources.directory",
            &format!(
                "url = \"{url}\"\n{extra}bind_dn = \"{}\"\npassword = \"{}\"\nbase_dn = \"{}\"\n",
                server.reader_dn(),
                server.reader_password(),
                server.people_dn()
            ),
        )
        .unwrap()
    };
    // The directory's certificate is signed by a private CA: trusted with `ca_file`,
    // with verification on (the default), over ldaps:// and StartTLS.
    let with_ca = format!("ca_file = \"{}\"\n", ca.display());
    for (url, extra) in [
        (ldaps.clone(), with_ca.clone()),
        (
            server.url().to_string(),
            format!("tls = \"starttls\"\n{with_ca}"),
        ),
        (ldaps.clone(), "tls_verify = false\n".to_string()),
    ] {
        let read = read_all(
            source(&settings_with(&url, &extra)).as_ref(),
            ReadMode::Full,
        )
        .await
        .unwrap();
        assert_eq!(read.records.len(), 2, "{url} {extra}");
    }
    // Verification on without the CA: the system's trust store does not know it.
    let err = source(&settings_with(&ldaps, ""))
        .check()
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&ldaps), "{err}");
    // A ca_file that is not a certificate file is a config error naming the key.
    let not_pem = server.people_dn();
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("ca.pem");
    std::fs::write(&bad, format!("not a certificate: {not_pem}")).unwrap();
    let err = SourceConfig::from_settings(&settings_with(
        &ldaps,
        &format!("ca_file = \"{}\"\n", bad.display()),
    ))
    .unwrap_err();
    assert_eq!(err.key.as_deref(), Some("ca_file"), "{err}");
}

#[tokio::test]
async fn an_entry_changed_during_the_read_is_not_passed_by_the_cursor() {
    let server = slapd(Slapd::builder().people(6));
    let src = source(&source_settings(&server, "page_size = 1"));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let cursor = format_generalized_time(chrono::Utc::now());
    let set_title = |i: usize, title: &str| {
        server
            .ldapmodify(&format!(
                "dn: {}\nchangetype: modify\nreplace: title\ntitle: {title}\n",
                Slapd::person_dn(i)
            ))
            .unwrap();
    };
    set_title(2, "First");
    set_title(5, "Old");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut stream = src
        .read(ReadMode::Incremental {
            cursor: Some(cursor.clone()),
        })
        .await
        .unwrap();
    let first = match stream.next().await.unwrap() {
        Some(contactsync_core::SourceItem::Record(r)) => r.contact,
        other => panic!("{other:?}"),
    };
    assert_eq!(first.external_id.as_deref(), Some("E00002"));
    // While the read goes on: E2 changes again (after its page was returned), then,
    // a second later, E5, which the read has yet to reach.
    set_title(2, "Second");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    set_title(5, "New");
    let mut rest = Vec::new();
    while let Some(item) = stream.next().await.unwrap() {
        if let contactsync_core::SourceItem::Record(r) = item {
            rest.push(r.contact);
        }
    }
    let outcome = stream.finish().await.unwrap();
    assert!(
        rest.iter()
            .all(|c| c.external_id.as_deref() != Some("E00002")),
        "a person is yielded once a read"
    );
    // The cursor stays at or before the version of E2 read, so its second change is
    // read by the next run instead of being passed by E5's newer time.
    let next = read_all(
        src.as_ref(),
        ReadMode::Incremental {
            cursor: outcome.cursor.clone(),
        },
    )
    .await
    .unwrap();
    let e2 = next
        .contacts()
        .into_iter()
        .find(|c| c.external_id.as_deref() == Some("E00002"))
        .expect("E2 read again");
    assert_eq!(e2.job_title.as_deref(), Some("Second"), "no lost update");
}

/// A night's worth of changes in one `ldapmodify` (the tool prints a line an entry,
/// more than a pipe holds): the test kit reads that output while it writes the LDIF,
/// and the read sees the last value.
#[tokio::test]
async fn a_long_ldif_is_applied_in_one_call() {
    let server = slapd(Slapd::builder().people(2));
    let ldif: String = (0..6000)
        .map(|n| {
            format!(
                "dn: {}\nchangetype: modify\nreplace: title\ntitle: Title {n}\n\n",
                Slapd::person_dn(1)
            )
        })
        .collect();
    server.ldapmodify(&ldif).unwrap();
    assert_eq!(
        server.values(&Slapd::person_dn(1), "title").unwrap(),
        vec!["Title 5999".to_string()]
    );
}
