//! What goes over the wire, without a server: the import job we build, and the status
//! entities, imports, subscriber pages and rejected-rows CSV we read (fixtures from the
//! API documents).

use contactsync_core::{
    Change, ChangeBatch, ConnectorSettings, Contact, ContactKey, ContactStatus, Origin, SyncedEntry,
};
use contactsync_poppulo::rejected::{parse_rejected, RejectionKind};
use contactsync_poppulo::source::subscriber_to_contact;
use contactsync_poppulo::xml::{
    cdata_sections, parse_time, Element, ImportState, ImportStatus, StatusEntity, SubscriberPage,
};
use contactsync_poppulo::{PoppuloSink, SinkConfig};
use contactsync_testkit::changes::{self, create};

fn settings(extra: &str) -> ConnectorSettings {
    ConnectorSettings::from_toml(
        "sinks.poppulo",
        &format!("account = \"acme\"\nusername = \"api\"\npassword = \"pw\"\n{extra}"),
    )
    .unwrap()
}

fn sink(extra: &str) -> PoppuloSink {
    PoppuloSink::new(SinkConfig::from_settings(&settings(extra)).unwrap()).unwrap()
}

fn contact(email: &str, first: &str) -> Contact {
    Contact {
        email: Some(email.into()),
        first_name: Some(first.into()),
        last_name: Some("Lee".into()),
        ..Contact::default()
    }
}

fn remove(email: &str) -> Change {
    Change::Remove {
        key: ContactKey::ExternalId("E9".into()),
        previous: SyncedEntry {
            content_hash: 1,
            email: Some(email.into()),
            handle: None,
            record: None,
        },
        origin: Origin::Derived,
    }
}

fn rows_of(root: &Element) -> Vec<Vec<String>> {
    let data = root.child("subscriber_data").unwrap();
    let csv_text = &data.child("data").unwrap().text;
    csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(csv_text.as_bytes())
        .records()
        .map(|r| r.unwrap().iter().map(str::to_string).collect())
        .collect()
}

fn columns_of(root: &Element) -> String {
    root.child("subscriber_data")
        .unwrap()
        .child_text("columns")
        .unwrap()
        .to_string()
}

fn update(c: Contact, before: Contact) -> Change {
    changes::update_from(&before, c)
}

fn remove_known(before: Contact) -> Change {
    changes::removal(&before)
}

/// The part (import) whose first row is sent under `email`, with `update_existing` as
/// given.
fn part_of(
    prepared: &contactsync_poppulo::sink::PreparedImport,
    email: &str,
    update_existing: bool,
) -> Element {
    let part = prepared
        .parts
        .iter()
        .find(|p| {
            let root = Element::parse(&p.xml).unwrap();
            p.rows.iter().any(|r| r.email == email)
                && root.child_text("update_existing")
                    == Some(if update_existing { "true" } else { "false" })
        })
        .unwrap_or_else(|| panic!("no import for {email} (update_existing {update_existing})"));
    Element::parse(&part.xml).unwrap()
}

#[test]
fn the_job_has_explicit_columns_escaped_values_and_csv_in_cdata() {
    let s = sink(
        "set_fields = { \"so<urce\" = \"hr & co\" }\nadd_permissions = [\"News\"]\ntags = [\"HR \\\"Sync\\\"\"]\n[columns]\nsubscriptions = \"permissions\"\n\"attributes.Cost Center\" = \"Cost Center\"",
    );
    let mut ann = contact("ann@Example.COM", "Ann, \"the\" <first>");
    ann.attributes.insert("Cost Center".into(), "C]]>42".into());
    ann.subscriptions.insert("Newsletter".into());
    ann.subscriptions.insert("Flyer".into());
    let mut bob = contact("bob@example.com", "Bob");
    bob.status = ContactStatus::OptedOut;
    let batch = ChangeBatch {
        id: "run-1-batch-1".into(),
        changes: vec![
            create(ann),
            create(bob),
            Change::Create {
                key: ContactKey::ExternalId("E1".into()),
                contact: Contact::default(),
                origin: Origin::Derived,
            },
        ],
    };
    let prepared = s.build_import(&batch).unwrap();
    // Ann and Bob have different cells, and their creates grant permissions: each is
    // created (with the grants) by an import that creates only, then updated (without
    // them) by one that updates too.
    assert_eq!(prepared.parts.len(), 4);
    let xml = &prepared
        .parts
        .iter()
        .find(|p| p.rows[0].email == "ann@example.com")
        .unwrap()
        .xml;
    assert!(xml.contains("<![CDATA["), "{xml}");
    let root = part_of(&prepared, "ann@example.com", false);
    assert!(root.is("subscriber_import_job"));
    assert_eq!(root.child_text("accept_terms"), Some("true"));
    assert_eq!(root.child_text("reactivate_api_removed"), Some("true"));
    assert_eq!(root.child_text("reactivate_admin_removed"), Some("false"));
    let set_field = root
        .child("set_fields")
        .unwrap()
        .child("set_field")
        .unwrap();
    assert_eq!(set_field.attr("name"), Some("so<urce"));
    assert_eq!(set_field.text, "hr & co");
    assert_eq!(
        root.child("tags")
            .unwrap()
            .child("tag")
            .unwrap()
            .attr("name"),
        Some("HR \"Sync\"")
    );
    assert_eq!(
        root.child("add_permissions")
            .unwrap()
            .child("permission")
            .unwrap()
            .attr("name"),
        Some("News")
    );
    let data = root.child("subscriber_data").unwrap();
    // Only the columns the source gives: no company, department, position or
    // external id column to blank.
    assert_eq!(
        columns_of(&root),
        "email,name.first name,name.surname,Cost Center,permissions,status"
    );
    assert_eq!(data.child_text("skip_first_line"), Some("false"));
    assert_eq!(data.child_text("field_separator"), Some("comma"));
    // The CSV, once XML-decoded, is RFC 4180 and round-trips.
    let rows = rows_of(&root);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0][0], "ann@example.com");
    assert_eq!(rows[0][1], "Ann, \"the\" <first>");
    assert_eq!(rows[0][3], "C]]>42");
    assert_eq!(rows[0][4], "Flyer|Newsletter");
    assert_eq!(rows[0][5], "ACTIVE");
    // Bob has no cost centre: his rows have no such cell, not an empty one that would
    // clear what a Poppulo admin gave him.
    let bob_new = part_of(&prepared, "bob@example.com", false);
    assert_eq!(
        columns_of(&bob_new),
        "email,name.first name,name.surname,status"
    );
    assert_eq!(rows_of(&bob_new)[0][3], "OPT_OUT");
    // The second import of each updates existing people and grants nothing.
    let ann_update = part_of(&prepared, "ann@example.com", true);
    assert!(ann_update.child("add_permissions").is_none());
    assert_eq!(
        columns_of(&ann_update),
        "email,name.first name,name.surname,Cost Center,status"
    );
    assert!(matches!(
        &prepared.known[2],
        contactsync_core::Outcome::Rejected { retry: false, .. }
    ));
}

#[test]
fn creates_updates_and_removals_go_in_imports_of_their_own_cells() {
    let s = sink("set_fields = { source = \"hr\" }\ntags = [\"HR\"]\nadd_permissions = [\"News\"]\n[columns]\nsubscriptions = \"permissions\"");
    let mut before = contact("old@example.com", "Cy");
    before.subscriptions.insert("Flyer".into());
    let mut moved = contact("new@example.com", "Cy");
    moved.subscriptions.insert("Flyer".into());
    moved.subscriptions.insert("Digest".into());
    let mut gone = contact("gone@example.com", "Gus");
    gone.company = Some("Acme".into());
    let batch = ChangeBatch {
        id: "b".into(),
        changes: vec![
            create(contact("ann@example.com", "Ann")),
            update(moved, before),
            remove_known(gone),
        ],
    };
    let prepared = s.build_import(&batch).unwrap();
    assert_eq!(prepared.parts.len(), 4, "{:#?}", prepared.parts);
    // Ann's create grants `add_permissions` only to someone new to Poppulo.
    let new_only = part_of(&prepared, "ann@example.com", false);
    assert_eq!(
        columns_of(&new_only),
        "email,name.first name,name.surname,status"
    );
    assert!(new_only.child("add_permissions").is_some());
    assert_eq!(
        rows_of(&new_only),
        [["ann@example.com", "Ann", "Lee", "ACTIVE"]]
    );
    // Then updated with the same cells, granted nothing.
    let ann = part_of(&prepared, "ann@example.com", true);
    assert!(ann.child("add_permissions").is_none());
    assert_eq!(rows_of(&ann), [["ann@example.com", "Ann", "Lee", "ACTIVE"]]);
    // An update whose status the source did not change leaves it to the person, and
    // grants only the permission the source added; it is granted nothing else.
    let cy = part_of(&prepared, "new@example.com", true);
    assert!(cy.child("add_permissions").is_none());
    assert_eq!(
        cy.child("tags").unwrap().child("tag").unwrap().attr("name"),
        Some("HR")
    );
    assert_eq!(
        columns_of(&cy),
        "email,name.first name,name.surname,permissions"
    );
    assert_eq!(rows_of(&cy), [["new@example.com", "Cy", "Lee", "Digest"]]);
    // The old address and the removal: the email and the removal status, nothing that
    // would clear a field; no tags, set fields or grants.
    let removal = part_of(&prepared, "old@example.com", true);
    assert_eq!(columns_of(&removal), "email,status");
    assert!(removal.child("tags").is_none());
    assert!(removal.child("set_fields").is_none());
    assert_eq!(
        rows_of(&removal),
        [
            ["old@example.com", "INACTIVE"],
            ["gone@example.com", "INACTIVE"]
        ]
    );
}

#[test]
fn with_resubscribe_a_create_grants_in_one_import() {
    let mut s = sink("add_permissions = [\"News\"]\n[columns]\nsubscriptions = \"permissions\"");
    s.set_resubscribe(true);
    let batch = ChangeBatch {
        id: "b".into(),
        changes: vec![create(contact("ann@example.com", "Ann"))],
    };
    let prepared = s.build_import(&batch).unwrap();
    assert_eq!(prepared.parts.len(), 1);
    let root = part_of(&prepared, "ann@example.com", true);
    assert!(root.child("add_permissions").is_some());
}

#[test]
fn withdrawn_permissions_and_removals_get_their_own_imports() {
    let s = sink("[columns]\nsubscriptions = \"permissions\"");
    let mut before = contact("cy@example.com", "Cy");
    before.subscriptions.insert("Flyer".into());
    let batch = ChangeBatch {
        id: "b".into(),
        changes: vec![
            create(contact("ann@example.com", "Ann")),
            update(contact("cy@example.com", "Cy"), before),
            remove("x@example.com"),
        ],
    };
    let prepared = s.build_import(&batch).unwrap();
    assert_eq!(prepared.parts.len(), 3);
    let withdraw = part_of(&prepared, "cy@example.com", true);
    assert_eq!(
        withdraw
            .child("remove_permissions")
            .unwrap()
            .child("permission")
            .unwrap()
            .attr("name"),
        Some("Flyer")
    );
    assert_eq!(rows_of(&withdraw)[0][0], "cy@example.com");
    assert!(
        !columns_of(&withdraw).contains("status"),
        "no row sets a status, so no status column: {}",
        columns_of(&withdraw)
    );
    // A removal carries only the email and the removal status: a blank cell would
    // clear the person's fields.
    let bare = part_of(&prepared, "x@example.com", true);
    assert_eq!(columns_of(&bare), "email,status");
    assert_eq!(rows_of(&bare), [["x@example.com", "INACTIVE"]]);
}

#[test]
fn opt_out_removal_and_job_flags_follow_the_settings() {
    let s =
        sink("removal = \"opt_out\"\nupdate_existing = false\nreactivate_bounced_removed = true");
    let removals = ChangeBatch {
        id: "b".into(),
        changes: vec![remove("x@example.com")],
    };
    let prepared = s.build_import(&removals).unwrap();
    let root = Element::parse(prepared.xml().unwrap()).unwrap();
    // A removal job carries only the email and the removal status (a blank cell would
    // clear the person's fields), and must update existing people whatever the setting.
    assert_eq!(root.child_text("update_existing"), Some("true"));
    let data = root.child("subscriber_data").unwrap();
    assert_eq!(data.child_text("columns"), Some("email,status"));
    assert_eq!(
        data.child("data").unwrap().text.trim_end(),
        "x@example.com,OPT_OUT"
    );

    let upserts = ChangeBatch {
        id: "c".into(),
        changes: vec![
            create(contact("y@example.com", "Yan")),
            update(
                contact("z@example.com", "Zoe"),
                contact("z@example.com", "Zo"),
            ),
        ],
    };
    let prepared = s.build_import(&upserts).unwrap();
    let root = Element::parse(prepared.xml().unwrap()).unwrap();
    assert_eq!(root.child_text("update_existing"), Some("false"));
    assert_eq!(root.child_text("reactivate_bounced_removed"), Some("true"));
    // Poppulo would skip the update: it is not sent, and said so once.
    assert_eq!(rows_of(&root).len(), 1);
    assert!(matches!(
        &prepared.known[1],
        contactsync_core::Outcome::Rejected { retry: false, reason, .. } if reason.contains("update_existing")
    ));
}

#[test]
fn cdata_never_holds_its_terminator() {
    assert_eq!(cdata_sections("a]]>b"), vec!["a]]", ">b"]);
    assert_eq!(cdata_sections("]]>]]>"), vec!["]]", ">]]", ">"]);
    assert_eq!(cdata_sections("plain"), vec!["plain"]);
}

#[test]
fn settings_are_checked() {
    let err = |extra: &str| {
        SinkConfig::from_settings(&settings(extra))
            .unwrap_err()
            .to_string()
    };
    assert!(err("acount = \"typo\"").contains("acount"));
    assert!(err("accept_terms = false").contains("accept_terms"));
    assert!(err("[columns]\nfirst_name = \"email\"").contains("twice"));
    assert!(err("[columns]\nemail = \"\"").contains("email"));
    assert!(err("[columns]\nstatus = \"x\"").contains("status"));
    assert!(
        err("removal = \"delete\"").contains("removal")
            || err("removal = \"delete\"").contains("delete")
    );
    let missing =
        ConnectorSettings::from_toml("sinks.poppulo", "account = \"a\"\nusername = \"u\"").unwrap();
    let text = SinkConfig::from_settings(&missing).unwrap_err().to_string();
    assert!(
        text.contains("CONTACTSYNC_SINKS__POPPULO__PASSWORD"),
        "{text}"
    );
    let ok = SinkConfig::from_settings(&settings(
        "max_wait_for_busy_account = \"15m\"\nmin_poll_interval = 0.25",
    ))
    .unwrap();
    assert_eq!(ok.max_wait_for_busy_account.as_secs(), 900);
    assert_eq!(ok.min_poll_interval.as_millis(), 250);
    assert_eq!(ok.connection.http.base_url, "https://api.newsweaver.com/v2");
    // The password never shows.
    assert!(!format!("{ok:?}").contains("\"pw\""));
    assert!(!format!("{:?}", sink("")).contains("\"pw\""));
}

#[test]
fn status_entity_gives_the_created_link() {
    let body = r#"<?xml version="1.0"?>
<status>
  <status_code>202</status_code>
  <resources_created>
    <link rel="http://api-info.newsweaver.com/v2/rels/status.created"
          href="https://api.newsweaver.com/v2/acme/subscriber_import/6732468" title="import"/>
  </resources_created>
  <resources_updated/> <resources_deleted/>
  <warnings><warning>text</warning></warnings>
</status>"#;
    let e = StatusEntity::parse(body).unwrap();
    assert_eq!(e.status_code, Some(202));
    assert_eq!(
        e.created.as_deref(),
        Some("https://api.newsweaver.com/v2/acme/subscriber_import/6732468")
    );
    assert_eq!(e.messages, vec!["text"]);
}

#[test]
fn an_import_in_progress_from_the_documents() {
    let body = r#"<subscriber_import created="2012-01-11T16:40:13Z" status="IN_PROGRESS" uri="https://api.newsweaver.com/v2/test-account/subscriber_import/6732468">
<progress>
<total_records>5000</total_records>
<records_processed>1234</records_processed>
<ping_after>2012-01-11T16:41:13Z</ping_after>
</progress>
<specification>
<accept_terms>true</accept_terms>
<subscriber_data><columns>email,name.first name,name.surname</columns></subscriber_data>
</specification>
</subscriber_import>"#;
    let s = ImportState::parse(body).unwrap();
    assert_eq!(s.status, ImportStatus::InProgress);
    assert_eq!(s.total_records, Some(5000));
    assert_eq!(s.records_processed, Some(1234));
    assert_eq!(s.ping_after, parse_time("2012-01-11T16:41:13Z"));
    assert!(s.results.is_none());
}

#[test]
fn a_completed_import_with_status_as_a_child_and_invalid_records() {
    let body = r#"<ns:subscriber_import xmlns:ns="urn:x">
  <ns:status>COMPLETED</ns:status>
  <results>
    <total_records>5</total_records><new_subscribers>2</new_subscribers>
    <updated_subscribers>0</updated_subscribers><invalid_records>1</invalid_records>
    <duplicate_subscribers>1</duplicate_subscribers><previously_opted_out>1</previously_opted_out>
    <link rel="http://api-info.newsweaver.com/v2/rels/subscriber_import.invalid_subscribers"
          href="https://api.newsweaver.com/v2/acme/subscriber_import/7/invalid_subscribers"/>
  </results>
</ns:subscriber_import>"#;
    let s = ImportState::parse(body).unwrap();
    assert_eq!(s.status, ImportStatus::Completed);
    let r = s.results.unwrap();
    assert_eq!((r.invalid, r.duplicates, r.previously_opted_out), (1, 1, 1));
    assert!(r.has_rejections());
    assert_eq!(
        r.invalid_link.as_deref(),
        Some("https://api.newsweaver.com/v2/acme/subscriber_import/7/invalid_subscribers")
    );
    for (text, status) in [
        ("ERROR", ImportStatus::Error),
        ("CANCELLED", ImportStatus::Cancelled),
    ] {
        let s = ImportState::parse(&format!(r#"<subscriber_import status="{text}"/>"#)).unwrap();
        assert_eq!(s.status, status);
    }
}

#[test]
fn timestamps_with_and_without_fractions() {
    let whole = parse_time("2012-01-11T16:41:13Z").unwrap();
    let frac = parse_time("2012-01-11T16:41:13.250Z").unwrap();
    assert_eq!((frac - whole).num_milliseconds(), 250);
    assert_eq!(parse_time("2012-01-11T16:41:13"), Some(whole));
    assert_eq!(parse_time("2012-01-11T17:41:13+01:00"), Some(whole));
    assert_eq!(parse_time("2012-01-11T16:41:13.250+0000"), Some(frac));
    assert_eq!(parse_time("yesterday"), None);
}

#[test]
fn a_subscriber_page_with_a_next_link() {
    let body = r#"<subscribers itemsPerPage="2" startIndex="1" totalResults="3">
  <link rel="next" href="https://api.newsweaver.com/v2/acme/subscribers?status=all&amp;startIndex=3"/>
  <subscriber uri="https://api.newsweaver.com/v2/acme/subscriber/1" date_modified="2024-05-01T10:00:00Z">
    <email>Ann@Example.COM</email><status>ACTIVE</status>
    <first_name>Ann</first_name><surname>Lee</surname><company>Acme</company>
    <position_company>Engineer</position_company><external_id>E1</external_id>
    <work_details><department>R&amp;D</department></work_details>
    <custom_fields><custom_field name="Cost Center">C42</custom_field></custom_fields>
  </subscriber>
  <subscriber><email>bob@example.com</email><status>OPT_OUT</status></subscriber>
</subscribers>"#;
    let page = SubscriberPage::parse(body).unwrap();
    assert_eq!(
        page.next.as_deref(),
        Some("https://api.newsweaver.com/v2/acme/subscribers?status=all&startIndex=3")
    );
    assert_eq!(page.total_results, Some(3));
    assert_eq!(page.subscribers.len(), 2);
    let ann = subscriber_to_contact(&page.subscribers[0]).unwrap();
    let named = [
        &ann.email,
        &ann.last_name,
        &ann.job_title,
        &ann.external_id,
        &ann.department,
    ];
    assert_eq!(
        named.map(|v| v.as_deref()),
        [
            Some("Ann@example.com"),
            Some("Lee"),
            Some("Engineer"),
            Some("E1"),
            Some("R&D")
        ]
    );
    assert_eq!(
        ann.attributes.get("Cost Center").map(String::as_str),
        Some("C42")
    );
    assert!(ann.updated_at.is_some());
    let bob = subscriber_to_contact(&page.subscribers[1]).unwrap();
    assert_eq!(bob.status, ContactStatus::OptedOut);
    let bad =
        Element::parse("<subscriber><email>x@y.org</email><status>WEIRD</status></subscriber>")
            .unwrap();
    assert!(subscriber_to_contact(&bad).is_err());
}

#[test]
fn the_rejected_rows_csv_in_three_sections() {
    let columns = ["email", "name.first name", "status"].map(String::from);
    let text = "\"Invalid Subscribers\"\r\n\"email\",\"name.first name\",\"status\"\r\n\"not-an-email\",\"Ann, Jr.\",\"ACTIVE\"\r\n\
\r\n\"Duplicate Subscribers\"\r\nemail,name.first name,status\r\nbob@example.com,\"Bob \"\"B\"\"\",ACTIVE\r\n\
\"Opted-out Subscribers\"\r\n\"email\",\"name.first name\",\"status\"\r\n\"Carol@Example.com\",\"Carol\",\"ACTIVE\"\r\n";
    let rows = parse_rejected(text, &columns).unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(
        (rows[0].kind, rows[0].email.as_str()),
        (RejectionKind::Invalid, "not-an-email")
    );
    assert_eq!(
        (rows[1].kind, rows[1].email.as_str()),
        (RejectionKind::Duplicate, "bob@example.com")
    );
    assert_eq!(
        (rows[2].kind, rows[2].email.as_str()),
        (RejectionKind::OptedOut, "Carol@Example.com")
    );
    // Empty sections, and a header in another column order.
    let text = "\"Invalid Subscribers\"\n\"Duplicate Subscribers\"\nstatus,email\n\"Opted-out Subscribers\"\nstatus,email\nACTIVE,dan@example.com\n";
    let rows = parse_rejected(text, &columns).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].kind, rows[0].email.as_str()),
        (RejectionKind::OptedOut, "dan@example.com")
    );
}
