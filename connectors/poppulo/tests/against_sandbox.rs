//! The Poppulo client against the Poppulo sandbox, over HTTP only, as against the real
//! platform: round trips, rejected rows mapped back, a busy account, throttling, imports
//! that end in ERROR or CANCELLED, resuming after a crash, and the testkit conformance
//! suite. The sandbox is started through its public API; the client never sees its types.

use std::time::Duration;

use contactsync_core::{
    Change, ChangeBatch, ChangeKind, ConnectorError, ConnectorSettings, Contact, ContactKey,
    ContactStatus, Field, Origin, Outcome, PendingBatch, PendingRecord, ReadMode, Sink, Source,
    SyncedEntry,
};
use contactsync_poppulo::sink::{store_key, REASON_DUPLICATE, REASON_INVALID, REASON_OPTED_OUT};
use contactsync_poppulo::{PoppuloSink, PoppuloSource, SinkConfig, SourceConfig};
use contactsync_sandbox_poppulo::{
    Faults, PoppuloSandbox, RunningPoppulo, SandboxConfig, Subscriber, WireFaults,
};
use contactsync_testkit::changes::{self, create, update};
use contactsync_testkit::{read_all, MemoryStore, SinkConformance};

async fn sandbox() -> RunningPoppulo {
    PoppuloSandbox::start(
        SandboxConfig {
            tick: Duration::from_millis(20),
            records_per_tick: 2,
            ping_interval: Duration::from_millis(150),
            ..SandboxConfig::default()
        }
        .with_custom_fields(["cost_center", "site"]),
    )
    .await
    .unwrap()
}

fn settings(sb: &RunningPoppulo, section: &str, extra: &str) -> ConnectorSettings {
    settings_with_password(sb, section, sb.password(), extra)
}

/// As [`settings`], with `password` for the API user's.
fn settings_with_password(
    sb: &RunningPoppulo,
    section: &str,
    password: &str,
    extra: &str,
) -> ConnectorSettings {
    let toml = format!(
        "base_url = \"{}\"\naccount = \"{}\"\nusername = \"{}\"\npassword = \"{password}\"\n{extra}",
        sb.base_url(),
        sb.account(),
        sb.username(),
    );
    ConnectorSettings::from_toml(section, &toml).unwrap()
}

const FAST: &str = "min_poll_interval = \"20ms\"\nbusy_retry_interval = \"100ms\"\nmax_wait_for_busy_account = \"10s\"\nmax_retry_time = \"30s\"";

fn sink(sb: &RunningPoppulo, extra: &str) -> PoppuloSink {
    // `extra` wins over FAST for any key it sets.
    let fast: Vec<&str> = FAST
        .lines()
        .filter(|l| {
            !extra
                .lines()
                .any(|e| e.split('=').next() == l.split('=').next())
        })
        .collect();
    let s = settings(
        sb,
        "sinks.poppulo",
        &format!("{}\n{extra}", fast.join("\n")),
    );
    PoppuloSink::new(SinkConfig::from_settings(&s).unwrap()).unwrap()
}

fn source(sb: &RunningPoppulo) -> PoppuloSource {
    let s = settings(sb, "sources.poppulo", "");
    PoppuloSource::new(SourceConfig::from_settings(&s).unwrap()).unwrap()
}

fn person(email: &str, first: &str) -> Contact {
    Contact {
        email: Some(email.into()),
        first_name: Some(first.into()),
        last_name: Some("Lee".into()),
        company: Some("Acme".into()),
        ..Contact::default()
    }
}

fn remove(email: &str) -> Change {
    changes::removal(&Contact {
        email: Some(email.into()),
        ..Contact::default()
    })
}

fn batch(id: &str, changes: Vec<Change>) -> ChangeBatch {
    ChangeBatch {
        id: id.into(),
        changes,
    }
}

async fn apply(sink: &mut PoppuloSink, store: &mut MemoryStore, b: &ChangeBatch) -> Vec<Outcome> {
    let mut ctx = store.context();
    sink.apply(b, &mut ctx).await.unwrap()
}

#[tokio::test]
async fn create_update_remove_round_trip() {
    let sb = sandbox().await;
    let mut sink = sink(&sb, "");
    let mut store = MemoryStore::new();
    let people = [
        person("ann@example.com", "Ann"),
        person("bob@Example.com", "Bob"),
        person("carol@example.com", "Carol"),
    ];
    let out = apply(
        &mut sink,
        &mut store,
        &batch("b1", people.iter().cloned().map(create).collect()),
    )
    .await;
    assert_eq!(out, vec![Outcome::applied(); 3]);
    assert!(
        store.values().is_empty(),
        "the import's href is removed when done"
    );

    let mut ann = people[0].clone();
    ann.job_title = Some("Engineer".into());
    let out = apply(
        &mut sink,
        &mut store,
        &batch("b2", vec![update(ann), remove("carol@example.com")]),
    )
    .await;
    assert_eq!(out, vec![Outcome::applied(); 2]);

    let read = read_all(&source(&sb), ReadMode::Full).await.unwrap();
    assert!(read.outcome.complete);
    let contacts = read.contacts();
    let find = |e: &str| {
        contacts
            .iter()
            .find(|c| c.email.as_deref() == Some(e))
            .cloned()
            .unwrap()
    };
    assert_eq!(
        find("ann@example.com").job_title.as_deref(),
        Some("Engineer")
    );
    assert_eq!(find("bob@example.com").first_name.as_deref(), Some("Bob"));
    assert_eq!(find("carol@example.com").status, ContactStatus::Inactive);
    let stats = sb.stats();
    assert_eq!(
        stats.imports_posted, 3,
        "one import for the creates, one for the update, one (email,status) for the removal"
    );
    assert_eq!(sink.summary().jobs, Some(3));
    assert_eq!(stats.early_polls, 0, "never polled before ping_after");
}

#[tokio::test]
async fn rejected_rows_are_mapped_back_to_their_changes() {
    let sb = sandbox().await;
    sb.seed_subscriber(Subscriber::self_opted_out("olga@example.com"))
        .unwrap();
    let mut sink = sink(&sb, "");
    let mut store = MemoryStore::new();
    let b = batch(
        "b1",
        vec![
            create(person("ann@example.com", "Ann")),
            create(person("not-an-email", "Nobody")),
            create(person("dup@example.com", "First")),
            create(person("olga@example.com", "Olga")),
            create(person("dup@example.com", "Second")),
            create(person("zed@example.com", "Zed")),
        ],
    );
    let out = apply(&mut sink, &mut store, &b).await;
    let reason = |o: &Outcome| match o {
        Outcome::Rejected { reason, retry, .. } => Some((reason.clone(), *retry)),
        _ => None,
    };
    assert_eq!(out[0], Outcome::applied());
    assert_eq!(reason(&out[1]), Some((REASON_INVALID.to_string(), true)));
    assert_eq!(out[2], Outcome::applied());
    assert_eq!(reason(&out[3]), Some((REASON_OPTED_OUT.to_string(), false)));
    assert_eq!(reason(&out[4]), Some((REASON_DUPLICATE.to_string(), true)));
    assert_eq!(out[5], Outcome::applied());
    assert_eq!(sb.stats().early_polls, 0);
}

#[tokio::test]
async fn a_busy_account_is_waited_out() {
    let sb = sandbox().await;
    sb.set_faults(Faults {
        busy_for_ms: 600,
        ..Faults::default()
    });
    let mut sink = sink(&sb, "");
    let mut store = MemoryStore::new();
    let out = apply(
        &mut sink,
        &mut store,
        &batch("b1", vec![create(person("ann@example.com", "Ann"))]),
    )
    .await;
    assert_eq!(out, vec![Outcome::applied()]);
    let stats = sb.stats();
    assert!(stats.imports_refused_busy >= 1, "{stats:?}");
    assert_eq!(stats.imports_posted, 1);
}

#[tokio::test]
async fn a_busy_account_is_given_up_on_at_the_bound() {
    let sb = sandbox().await;
    sb.set_faults(Faults {
        busy_for_ms: 60_000,
        ..Faults::default()
    });
    let mut sink = sink(&sb, "max_wait_for_busy_account = \"400ms\"");
    let mut store = MemoryStore::new();
    let mut ctx = store.context();
    let err = sink
        .apply(
            &batch("b1", vec![create(person("ann@example.com", "Ann"))]),
            &mut ctx,
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("another import"), "{err}");
    assert_eq!(sb.stats().imports_posted, 0);
}

#[tokio::test]
async fn throttling_is_survived() {
    let sb = sandbox().await;
    sb.set_wire_faults(WireFaults {
        throttle_every: 2,
        retry_after_secs: 1,
        ..WireFaults::default()
    });
    let mut sink = sink(&sb, "");
    let mut store = MemoryStore::new();
    let out = apply(
        &mut sink,
        &mut store,
        &batch(
            "b1",
            vec![
                create(person("ann@example.com", "Ann")),
                create(person("bob@example.com", "Bob")),
            ],
        ),
    )
    .await;
    assert_eq!(out, vec![Outcome::applied(); 2]);
    assert!(sb.stats().throttled >= 1);
    assert_eq!(sb.stats().imports_posted, 1);
}

#[tokio::test]
async fn error_and_cancelled_imports_leave_every_row_unknown() {
    let sb = sandbox().await;
    let mut sink = sink(&sb, "");
    let mut store = MemoryStore::new();
    let rows = || {
        vec![
            create(person("ann@example.com", "Ann")),
            create(person("bob@example.com", "Bob")),
        ]
    };
    sb.set_faults(Faults {
        fail_next_import: true,
        ..Faults::default()
    });
    let out = apply(&mut sink, &mut store, &batch("b1", rows())).await;
    assert!(
        out.iter()
            .all(|o| matches!(o, Outcome::Unknown { reason } if reason.contains("ERROR"))),
        "{out:?}"
    );
    sb.set_faults(Faults {
        cancel_next_import_after: Some(1),
        ..Faults::default()
    });
    let out = apply(&mut sink, &mut store, &batch("b2", rows())).await;
    assert!(
        out.iter()
            .all(|o| matches!(o, Outcome::Unknown { reason } if reason.contains("CANCELLED"))),
        "{out:?}"
    );
    assert!(store.values().is_empty());
}

/// Posts an import job the way a run that crashed right after did: returns its href.
async fn post_as_a_crashed_run(sb: &RunningPoppulo, xml: String) -> String {
    let answer = reqwest::Client::new()
        .post(format!("{}/subscriber_imports", sb.account_url()))
        .basic_auth(sb.username(), Some(sb.password()))
        .header("User-Agent", "crashed-run")
        .header("Content-Type", "application/xml; charset=UTF-8")
        .body(xml)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 202);
    let entity =
        contactsync_poppulo::xml::StatusEntity::parse(&answer.text().await.unwrap()).unwrap();
    entity.created.unwrap()
}

#[tokio::test]
async fn recover_follows_the_import_a_crashed_run_left_behind() {
    let sb = sandbox().await;
    let mut sink = sink(&sb, "");
    let b = batch(
        "run-7-batch-1",
        vec![
            create(person("ann@example.com", "Ann")),
            create(person("not-an-email", "X")),
        ],
    );
    // The crashed run: it posted the import and stored its href, then died.
    let xml = sink.build_import(&b).unwrap().xml().unwrap().to_string();
    let href = post_as_a_crashed_run(&sb, xml).await;
    let mut store = MemoryStore::new();
    let mut ctx = store.context();
    ctx.store.put(&store_key(&b.id), &href).unwrap();

    let pending = PendingBatch {
        id: b.id.clone(),
        records: b
            .changes
            .iter()
            .map(|c| PendingRecord {
                key: c.key().clone(),
                kind: ChangeKind::Create,
                email: c.email().map(str::to_string),
            })
            .collect(),
    };
    let out = sink.recover(&pending, &mut ctx).await.unwrap().unwrap();
    assert_eq!(out[0], Outcome::applied());
    assert!(matches!(&out[1], Outcome::Rejected { reason, .. } if reason == REASON_INVALID));
    assert_eq!(sb.stats().imports_posted, 1, "no second import");
    assert_eq!(ctx.store.get(&store_key(&b.id)).unwrap(), None);
    // Nothing stored for another batch: nothing to recover.
    let other = PendingBatch {
        id: "run-7-batch-2".into(),
        records: vec![],
    };
    assert_eq!(sink.recover(&other, &mut ctx).await.unwrap(), None);
}

/// A crashed run's imports of a changed address (the new address's row, and the old
/// address's removal row) are read back row by row as they were sent: the new
/// address's own verdict decides, so an opted-out new address is not recorded as
/// applied because the old one was removed.
#[tokio::test]
async fn recover_reads_each_row_of_a_moved_address_under_its_own_address() {
    use contactsync_poppulo::sink::PostedImport;
    let sb = sandbox().await;
    sb.seed_subscriber(Subscriber::self_opted_out("new@example.com"))
        .unwrap();
    sb.seed_subscriber(Subscriber::new("old@example.com"))
        .unwrap();
    let mut sink = sink(&sb, "");
    let moved = Change::Update {
        key: ContactKey::ExternalId("E1".into()),
        previous: SyncedEntry {
            content_hash: 1,
            email: Some("old@example.com".into()),
            handle: None,
            record: Some(Box::new(person("old@example.com", "Ann"))),
        },
        contact: person("new@example.com", "Ann"),
        origin: Origin::Derived,
    };
    let b = batch("run-8-batch-1", vec![moved]);
    let prepared = sink.build_import(&b).unwrap();
    assert_eq!(prepared.parts.len(), 2, "the new address, then the old one");
    // The crashed run: it posted both imports and stored them, then died.
    let mut posted = Vec::new();
    for part in &prepared.parts {
        posted.push(PostedImport {
            href: post_as_a_crashed_run(&sb, part.xml.clone()).await,
            changes: part.rows.iter().map(|r| r.change).collect(),
            columns: part.columns.clone(),
            rows: part.rows.clone(),
            new_only: false,
        });
        // One import at a time per account: wait for it before posting the next.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut store = MemoryStore::new();
    let mut ctx = store.context();
    ctx.store
        .put(&store_key(&b.id), &serde_json::to_string(&posted).unwrap())
        .unwrap();
    let pending = PendingBatch {
        id: b.id.clone(),
        records: vec![PendingRecord {
            key: ContactKey::ExternalId("E1".into()),
            kind: ChangeKind::Update,
            email: Some("new@example.com".into()),
        }],
    };
    let out = sink.recover(&pending, &mut ctx).await.unwrap().unwrap();
    assert!(
        matches!(&out[0], Outcome::Rejected { reason, retry: false, .. } if reason == REASON_OPTED_OUT),
        "{out:?}"
    );
    assert_eq!(sb.stats().imports_posted, 2, "nothing posted again");
}

#[tokio::test]
async fn bad_credentials_are_an_auth_error() {
    let sb = sandbox().await;
    let s = settings_with_password(&sb, "sinks.poppulo", "wrong-secret", "");
    let mut sink = PoppuloSink::new(SinkConfig::from_settings(&s).unwrap()).unwrap();
    let err = sink.check().await.unwrap_err();
    assert!(matches!(err, ConnectorError::Auth { .. }), "{err:?}");
    assert!(!err.to_string().contains("wrong-secret"));
    let mut good = self::sink(&sb, "");
    good.check().await.unwrap();
    source(&sb).check().await.unwrap();
}

#[tokio::test]
async fn the_source_follows_next_links_page_by_page() {
    let sb = PoppuloSandbox::start(SandboxConfig {
        page_size: 3,
        ..SandboxConfig::default()
    })
    .await
    .unwrap();
    for i in 0..8 {
        sb.seed_subscriber(
            Subscriber::new(format!("p{i}@example.com")).with_field("first_name", format!("P{i}")),
        )
        .unwrap();
    }
    let read = read_all(&source(&sb), ReadMode::Full).await.unwrap();
    assert!(read.outcome.complete);
    let contacts = read.contacts();
    assert_eq!(contacts.len(), 8);
    assert_eq!(contacts[7].first_name.as_deref(), Some("P7"));
    assert!(sb.stats().requests >= 3);
}

#[tokio::test]
async fn testkit_conformance() {
    let sb = sandbox().await;
    let sink = sink(
        &sb,
        "[columns]\ncost_center = \"cost_center\"\nsite = \"site\"",
    );
    let fields = vec![
        Field::ExternalId,
        Field::Email,
        Field::FirstName,
        Field::LastName,
        Field::Company,
        Field::Department,
        Field::JobTitle,
        Field::Attribute("cost_center".into()),
        Field::Attribute("site".into()),
    ];
    SinkConformance::new(Box::new(sink), Box::new(source(&sb)))
        .with_round_trip_fields(fields)
        .run()
        .await
        .unwrap();
}

#[tokio::test]
async fn polls_wait_for_ping_after() {
    let sb = PoppuloSandbox::start(SandboxConfig {
        tick: Duration::from_millis(50),
        records_per_tick: 1,
        ping_interval: Duration::from_millis(300),
        ..SandboxConfig::default()
    })
    .await
    .unwrap();
    let mut sink = sink(&sb, "");
    let mut store = MemoryStore::new();
    let changes = (0..10)
        .map(|i| create(person(&format!("p{i}@example.com"), "P")))
        .collect();
    let started = std::time::Instant::now();
    let out = apply(&mut sink, &mut store, &batch("b1", changes)).await;
    assert_eq!(out, vec![Outcome::applied(); 10]);
    let stats = sb.stats();
    assert_eq!(stats.early_polls, 0);
    // About 500 ms of processing, polled every 300 ms at most: a handful of polls.
    let most = started.elapsed().as_millis() as u64 / 300 + 2;
    assert!(
        stats.import_polls <= most,
        "{} polls in {:?}",
        stats.import_polls,
        started.elapsed()
    );
}

#[tokio::test]
async fn cancelling_while_polling_leaves_rows_unknown_and_the_import_resumable() {
    let sb = PoppuloSandbox::start(SandboxConfig {
        tick: Duration::from_millis(200),
        records_per_tick: 1,
        ping_interval: Duration::from_millis(100),
        ..SandboxConfig::default()
    })
    .await
    .unwrap();
    let mut sink = sink(&sb, "");
    let mut store = MemoryStore::new();
    let b = batch(
        "b1",
        (0..20)
            .map(|i| create(person(&format!("p{i}@example.com"), "P")))
            .collect(),
    );
    let out = {
        let mut ctx = store.context();
        let cancel = ctx.cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            cancel.cancel();
        });
        sink.apply(&b, &mut ctx).await.unwrap()
    };
    assert!(
        out.iter().all(|o| matches!(o, Outcome::Unknown { .. })),
        "{out:?}"
    );
    assert!(
        store.values().contains_key(&store_key("b1")),
        "kept for the next run"
    );
}

/// The import post is not idempotent: after an answer lost once Poppulo took the job,
/// or a 5xx, it is never posted again. Its rows are unknown, for the engine to send
/// again next run.
#[tokio::test]
async fn an_import_whose_answer_is_lost_or_fails_is_not_posted_again() {
    for (fault, taken) in [(WireFaults::answer_lost(1), 1), (WireFaults::fails(1), 0)] {
        let sb = sandbox().await;
        let mut sink = sink(&sb, "");
        let mut store = MemoryStore::new();
        // The import post is the sink's first call.
        sb.set_wire_faults(fault.clone());
        let out = apply(
            &mut sink,
            &mut store,
            &batch(
                "b1",
                vec![
                    create(person("ann@example.com", "Ann")),
                    create(person("bob@example.com", "Bob")),
                ],
            ),
        )
        .await;
        assert!(
            out.iter()
                .all(|o| matches!(o, Outcome::Unknown { reason } if reason.contains("unknown"))),
            "{fault:?}: {out:?}"
        );
        assert_eq!(sb.imports().len(), taken, "{fault:?}");
        assert_eq!(
            sb.stats()
                .requests_by_route
                .get("POST /v2/{account}/subscriber_imports"),
            Some(&1),
            "{fault:?}: posted once, never again"
        );
        assert!(store.values().is_empty(), "no import to resume");
    }
}

/// One bounced person in a large account: Poppulo skips their ACTIVE row without
/// counting it, and the sink finds out which row by looking up the rows not on the
/// account's first page, one by one, rather than paging through the whole account.
#[tokio::test]
async fn an_uncounted_row_in_a_large_account_is_looked_up_not_paged_for() {
    use contactsync_sandbox_poppulo::{RemovedBy, SubscriberStatus};
    let sb = PoppuloSandbox::start(SandboxConfig {
        tick: Duration::from_millis(20),
        records_per_tick: 50,
        ping_interval: Duration::from_millis(100),
        page_size: 10,
        ..SandboxConfig::default()
    })
    .await
    .unwrap();
    for i in 0..100 {
        sb.seed_subscriber(Subscriber::new(format!("p{i:03}@example.com")))
            .unwrap();
    }
    // A bounce removes p090 on the platform.
    assert!(sb.edit_on_platform("p090@example.com", |p| {
        p.status = SubscriberStatus::Inactive;
        p.removed_by = Some(RemovedBy::Bounced);
    }));
    // Creates (to this state: a first sync into a filled account) carry ACTIVE.
    let update = |email: &str| Change::Create {
        key: ContactKey::Email(email.into()),
        contact: person(email, "New"),
        origin: Origin::Derived,
    };
    let mut snk = sink(&sb, "");
    let mut store = MemoryStore::new();
    let before = sb.requests().len();
    let outcomes = snk
        .apply(
            &ChangeBatch {
                id: "b1".into(),
                changes: vec![update("p080@example.com"), update("p090@example.com")],
            },
            &mut store.context(),
        )
        .await
        .unwrap();
    assert!(
        matches!(outcomes[0], Outcome::Applied { .. }),
        "{outcomes:?}"
    );
    assert!(
        !matches!(outcomes[1], Outcome::Applied { .. }),
        "the bounced person's row was skipped: {outcomes:?}"
    );
    let log = sb.requests()[before..].to_vec();
    let pages = log
        .iter()
        .filter(|r| r.method == "GET" && r.path.ends_with("/subscribers"))
        .count();
    let lookups = log
        .iter()
        .filter(|r| r.method == "GET" && r.path.contains("/subscriber/"))
        .count();
    assert_eq!(pages, 1, "only the first page: {log:?}");
    assert_eq!(lookups, 2, "the two rows not on it");
    assert_eq!(snk.summary().reads, Some(3));
}
