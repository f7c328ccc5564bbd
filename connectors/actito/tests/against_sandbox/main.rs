//! The Actito sink and source against the sandbox, over real HTTP on 127.0.0.1.

use std::time::Duration;

use contactsync_actito::sink::{posts_key, quota_key};
use contactsync_actito::{ActitoSink, ActitoSource, SinkConfig, SourceConfig};
use contactsync_core::{
    Change, ChangeBatch, ChangePlan, ConnectorError, ConnectorSettings, Contact, KeyRule, Origin,
    Outcome, Sink,
};
use contactsync_sandbox_actito::{
    ActitoSandbox, Attribute, ProfileInput, RunningActito, SandboxConfig, TableDef, WireFaults,
};
use contactsync_testkit::changes::{self, removal};
use contactsync_testkit::{sample_contacts, source_conformance, MemoryStore, SinkConformance};

mod budget;

/// The default table plus the attributes the sample contacts carry.
fn rich_table() -> TableDef {
    let mut def = TableDef::default_named("contacts");
    for name in ["company", "jobTitle", "cost_center", "site"] {
        def.attributes.push(Attribute::custom(name, "STRING"));
    }
    def
}

async fn sandbox(config: SandboxConfig) -> RunningActito {
    ActitoSandbox::start(SandboxConfig {
        tables: vec![rich_table()],
        import_delay: Duration::from_millis(20),
        ..config
    })
    .await
    .expect("sandbox starts")
}

fn toml(sb: &RunningActito, extra: &str) -> String {
    format!(
        "base_url = \"{}\"\nentity = \"{}\"\ntable = \"contacts\"\napi_key = \"{}\"\nretry_backoff = \"50ms\"\n{extra}\n[attributes]\nexternal_id = \"customerId\"\n[subscriptions]\nnewsletter = \"Newsletter\"\nevents = \"Events\"\n",
        sb.base_url(),
        sb.entity(),
        sb.api_key()
    )
}

fn sink(sb: &RunningActito, extra: &str) -> ActitoSink {
    let settings = ConnectorSettings::from_toml(
        "sinks.actito",
        &toml(sb, &format!("poll_interval = \"50ms\"\n{extra}")),
    )
    .expect("toml");
    ActitoSink::new(SinkConfig::from_settings(&settings).expect("config")).expect("sink")
}

fn source(sb: &RunningActito) -> ActitoSource {
    let settings =
        ConnectorSettings::from_toml("sources.actito", &toml(sb, "page_size = 4")).expect("toml");
    ActitoSource::new(SourceConfig::from_settings(&settings).expect("config")).expect("source")
}

fn creates(contacts: &[Contact]) -> Vec<Change> {
    contacts
        .iter()
        .enumerate()
        .map(|(i, c)| Change::Create {
            key: c.key(KeyRule::Auto).expect("key"),
            contact: c.clone(),
            origin: Origin::line("test", i as u64 + 1),
        })
        .collect()
}

fn plan_of(changes: &[Change]) -> ChangePlan {
    ChangePlan {
        creates: changes.len() as u64,
        ..ChangePlan::default()
    }
}

/// begin + one apply per batch + finish; returns every outcome.
async fn run(
    sink: &mut ActitoSink,
    store: &mut MemoryStore,
    batches: Vec<Vec<Change>>,
) -> Result<Vec<Outcome>, ConnectorError> {
    let total: Vec<Change> = batches.iter().flatten().cloned().collect();
    let mut ctx = store.context();
    sink.begin(&plan_of(&total), &mut ctx).await?;
    let mut all = Vec::new();
    for (n, changes) in batches.into_iter().enumerate() {
        let batch = ChangeBatch {
            id: format!("run-1-batch-{}", n + 1),
            changes,
        };
        all.extend(sink.apply(&batch, &mut ctx).await?);
    }
    sink.finish(&mut ctx).await?;
    Ok(all)
}

/// Creates `n` sample people through a sink with the `extra` settings, in one batch,
/// and checks that every one was applied.
async fn create_applied(
    sb: &RunningActito,
    store: &mut MemoryStore,
    extra: &str,
    n: usize,
) -> Vec<Outcome> {
    applied(sb, store, extra, creates(&sample_contacts(n))).await
}

/// Applies `changes` in one batch through a sink with the `extra` settings, and checks
/// that every one was applied.
async fn applied(
    sb: &RunningActito,
    store: &mut MemoryStore,
    extra: &str,
    changes: Vec<Change>,
) -> Vec<Outcome> {
    let outcomes = run(&mut sink(sb, extra), store, vec![changes])
        .await
        .expect("run");
    all_applied(&outcomes);
    outcomes
}

/// Today's count of bulk imports in the sink's store.
fn quota_today(sb: &RunningActito, store: &MemoryStore) -> Option<String> {
    let key = quota_key(sb.entity(), "contacts", chrono::Utc::now().date_naive());
    store.values().get(&key).cloned()
}

/// Today's count of bulk imports in the sink's store, as a number (0 when unset).
fn quota_used(sb: &RunningActito, store: &MemoryStore) -> u32 {
    quota_today(sb, store).map_or(0, |n| n.parse().expect("a count"))
}

/// A profile someone made in Actito: `email` under the customer id `id`.
fn seed_person(sb: &RunningActito, email: &str, id: &str) {
    sb.seed_profile(
        "contacts",
        &ProfileInput {
            attributes: vec![
                ("emailAddress".into(), Some(email.into())),
                ("customerId".into(), Some(id.into())),
            ],
            ..ProfileInput::default()
        },
    )
    .expect("seed");
}

/// Begins a run of `changes` on `sink`.
async fn begin(
    sink: &mut ActitoSink,
    changes: &[Change],
    ctx: &mut contactsync_core::SinkContext<'_>,
) {
    sink.begin(&plan_of(changes), ctx).await.expect("begin");
}

/// A sandbox holding `n` sample people, created through the sink, and the sink's store.
async fn seeded(n: usize) -> (RunningActito, Vec<Contact>, MemoryStore) {
    let sb = sandbox(SandboxConfig::default()).await;
    let contacts = sample_contacts(n);
    let mut store = MemoryStore::new();
    applied(&sb, &mut store, "", creates(&contacts)).await;
    (sb, contacts, store)
}

/// A full read while staff change the table as `faults` say.
async fn read_with_faults(
    sb: &RunningActito,
    faults: contactsync_sandbox_actito::Faults,
) -> contactsync_testkit::SourceRead {
    sb.set_faults(faults);
    contactsync_testkit::read_all(&source(sb), contactsync_core::ReadMode::Full)
        .await
        .expect("read")
}

/// A full read while staff delete the table's first profile as each of the first
/// `pages` pages is read.
async fn read_deleting(sb: &RunningActito, pages: u32) -> contactsync_testkit::SourceRead {
    let faults = contactsync_sandbox_actito::Faults {
        delete_while_paging: pages,
        ..Default::default()
    };
    read_with_faults(sb, faults).await
}

/// A full read while staff replace the table's first profile by a new one as each of
/// the first `pages` pages is read (the count stays, the list shifts).
async fn read_replacing(sb: &RunningActito, pages: u32) -> contactsync_testkit::SourceRead {
    let faults = contactsync_sandbox_actito::Faults {
        replace_while_paging: pages,
        ..Default::default()
    };
    read_with_faults(sb, faults).await
}

/// A sandbox whose imports take 300 ms: long enough to crash a run in the middle.
async fn slow_import_sandbox() -> RunningActito {
    sandbox(SandboxConfig {
        import_delay: Duration::from_millis(300),
        ..SandboxConfig::default()
    })
    .await
}

/// A sandbox, 20 creates, a sink that goes bulk from 10, and its store.
async fn bulk_of_20() -> (RunningActito, Vec<Change>, ActitoSink, MemoryStore) {
    let sb = sandbox(SandboxConfig::default()).await;
    let changes = creates(&sample_contacts(20));
    let sink = sink(&sb, "bulk_threshold = 10");
    (sb, changes, sink, MemoryStore::new())
}

/// Keeps `posts` (when bulk imports were posted) in the sink's store, as a run would.
fn remember_posts(sb: &RunningActito, store: &mut MemoryStore, posts: &[String]) {
    store
        .context()
        .store
        .put(
            &posts_key(sb.entity(), "contacts"),
            &serde_json::to_string(posts).expect("json"),
        )
        .expect("put");
}

fn all_applied(outcomes: &[Outcome]) {
    for (i, o) in outcomes.iter().enumerate() {
        assert!(matches!(o, Outcome::Applied { .. }), "outcome {i}: {o:?}");
    }
}

fn unacceptable() -> Vec<Contact> {
    vec![
        Contact {
            external_id: Some("BAD-EMAIL".into()),
            email: Some("not-an-email".into()),
            ..Contact::default()
        },
        Contact {
            external_id: Some("X".repeat(51)),
            email: Some("too.long.id@example.com".into()),
            ..Contact::default()
        },
    ]
}

#[tokio::test]
async fn sink_conformance_with_unsubscribe_removal() {
    let sb = sandbox(SandboxConfig::default()).await;
    let mut suite = SinkConformance::new(Box::new(sink(&sb, "")), Box::new(source(&sb)))
        .with_unacceptable(unacceptable());
    suite.run().await.expect("conformance");
    assert_eq!(sb.stats().imports_posted, 0);
}

#[tokio::test]
async fn sink_conformance_with_delete_removal_and_bulk() {
    let sb = sandbox(SandboxConfig::default()).await;
    // Threshold 1: every step goes through bulk imports.
    let mut suite = SinkConformance::new(
        Box::new(sink(&sb, "removal = \"delete\"\nbulk_threshold = 1")),
        Box::new(source(&sb)),
    )
    .with_round_trip_fields(vec![
        contactsync_core::Field::ExternalId,
        contactsync_core::Field::Email,
        contactsync_core::Field::FirstName,
        contactsync_core::Field::LastName,
        contactsync_core::Field::Department,
        contactsync_core::Field::JobTitle,
    ])
    .with_unacceptable(unacceptable());
    suite.run().await.expect("conformance");
    assert!(sb.stats().imports_posted >= 2, "{:?}", sb.stats());
}

#[tokio::test]
async fn source_conformance_reads_what_the_sink_wrote() {
    let (sb, contacts, _) = seeded(9).await;
    let read = source_conformance(&source(&sb), &contacts)
        .await
        .expect("source conformance");
    assert!(matches!(
        read.records[0].origin,
        Origin::Page {
            page: 1,
            index: 1,
            ..
        }
    ));
    assert!(matches!(
        read.records[4].origin,
        Origin::Page {
            page: 2,
            index: 1,
            ..
        }
    ));
}

#[tokio::test]
async fn small_change_set_goes_one_by_one() {
    let sb = sandbox(SandboxConfig::default()).await;
    let mut store = MemoryStore::new();
    let outcomes = create_applied(&sb, &mut store, "bulk_threshold = 10", 5).await;
    assert!(outcomes
        .iter()
        .all(|o| matches!(o, Outcome::Applied { handle: Some(_) })));
    let stats = sb.stats();
    assert_eq!(stats.imports_posted, 0);
    assert_eq!(stats.profile_posts, 5);
    assert_eq!(stats.tokens_issued, 1);
    assert_eq!(sb.profiles("contacts").len(), 5);
}

#[tokio::test]
async fn large_change_set_goes_bulk_once() {
    let sb = sandbox(SandboxConfig::default()).await;
    let mut store = MemoryStore::new();
    let contacts = sample_contacts(30);
    applied(&sb, &mut store, "bulk_threshold = 10", creates(&contacts)).await;
    let stats = sb.stats();
    assert_eq!(stats.imports_posted, 1);
    // The subscriptions of the new profiles travel in the import file (`Y`/`N`
    // columns): no call a profile.
    let subscribed = contacts
        .iter()
        .filter(|c| !c.subscriptions.is_empty())
        .count();
    assert!(subscribed > 0);
    assert_eq!(stats.profile_posts, 0);
    assert_eq!(sb.profiles("contacts").len(), 30);
    let with = contacts
        .iter()
        .find(|c| !c.subscriptions.is_empty())
        .unwrap();
    let profile = sb
        .profile_where(
            "contacts",
            "customerId",
            with.external_id.as_deref().unwrap(),
        )
        .unwrap();
    assert!(
        profile.subscriptions.values().any(|on| *on),
        "{:?}",
        profile.subscriptions
    );
    let p = sb
        .profile_where("contacts", "customerId", "CS-0007")
        .expect("imported");
    assert_eq!(
        p.attributes.get("emailAddress").map(String::as_str),
        Some("conformance.0007@example.com")
    );
    let key = quota_key(sb.entity(), "contacts", chrono::Utc::now().date_naive());
    assert_eq!(store.values().get(&key).map(String::as_str), Some("1"));
    assert!(!store.values().keys().any(|k| k.starts_with("import:")));
}

#[tokio::test]
async fn the_13th_bulk_of_the_day_is_never_sent() {
    let sb = sandbox(SandboxConfig::default()).await;
    let key = quota_key(sb.entity(), "contacts", chrono::Utc::now().date_naive());
    let contacts = sample_contacts(20);

    // Fallback (the default): one by one.
    let mut store = MemoryStore::new();
    store.context().store.put(&key, "12").expect("put");
    applied(&sb, &mut store, "bulk_threshold = 10", creates(&contacts)).await;
    assert_eq!(sb.stats().imports_posted, 0);
    assert_eq!(sb.stats().profile_posts, 20);

    // Stop: a clear limit error, nothing posted.
    let mut store = MemoryStore::new();
    store.context().store.put(&key, "12").expect("put");
    let err = run(
        &mut sink(
            &sb,
            "bulk_threshold = 10\nwhen_bulk_quota_exhausted = \"stop\"",
        ),
        &mut store,
        vec![creates(&contacts)],
    )
    .await
    .expect_err("stops");
    assert!(matches!(err, ConnectorError::Limit(_)), "{err}");
    assert!(err.to_string().contains("12 bulk imports"), "{err}");
    assert_eq!(sb.stats().imports_posted, 0);
}

#[tokio::test]
async fn platform_quota_refusal_falls_back_and_is_remembered() {
    let sb = sandbox(SandboxConfig::default()).await;
    sb.set_bulk_count_today("contacts", 12);
    let mut store = MemoryStore::new();
    create_applied(&sb, &mut store, "bulk_threshold = 10", 12).await;
    assert_eq!(sb.stats().imports_posted, 0);
    assert_eq!(sb.stats().profile_posts, 12);
    let key = quota_key(sb.entity(), "contacts", chrono::Utc::now().date_naive());
    assert_eq!(store.values().get(&key).map(String::as_str), Some("12"));
}

#[tokio::test]
async fn token_expiry_mid_run_is_survived() {
    let sb = sandbox(SandboxConfig::default()).await;
    let contacts = sample_contacts(6);
    let mut sink = sink(&sb, "");
    let mut store = MemoryStore::new();
    let changes = creates(&contacts);
    let mut ctx = store.context();
    begin(&mut sink, &changes, &mut ctx).await;
    let first = ChangeBatch {
        id: "b1".into(),
        changes: changes[..3].to_vec(),
    };
    all_applied(&sink.apply(&first, &mut ctx).await.expect("first"));
    sb.expire_tokens();
    let second = ChangeBatch {
        id: "b2".into(),
        changes: changes[3..].to_vec(),
    };
    all_applied(&sink.apply(&second, &mut ctx).await.expect("second"));
    let stats = sb.stats();
    assert!(stats.unauthorized >= 1, "{stats:?}");
    assert!(stats.tokens_issued >= 2, "{stats:?}");
    assert_eq!(sb.profiles("contacts").len(), 6);
}

#[tokio::test]
async fn short_lived_tokens_are_refreshed_before_expiry() {
    let sb = sandbox(SandboxConfig {
        token_lifetime: Duration::from_secs(1),
        ..SandboxConfig::default()
    })
    .await;
    let changes = creates(&sample_contacts(4));
    let mut sink = sink(&sb, "");
    let mut store = MemoryStore::new();
    let mut ctx = store.context();
    begin(&mut sink, &changes, &mut ctx).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let batch = ChangeBatch {
        id: "b1".into(),
        changes,
    };
    all_applied(&sink.apply(&batch, &mut ctx).await.expect("apply"));
    assert_eq!(sb.stats().unauthorized, 0);
    assert!(sb.stats().tokens_issued >= 2);
}

#[tokio::test]
async fn throttling_429s_are_survived() {
    // Concurrency: the sandbox takes 2 in flight, the sink sends 5.
    let sb = sandbox(SandboxConfig {
        max_concurrent: 2,
        wire_faults: WireFaults {
            delay_ms: 60,
            ..WireFaults::default()
        },
        ..SandboxConfig::default()
    })
    .await;
    let mut store = MemoryStore::new();
    create_applied(&sb, &mut store, "", 10).await;
    assert!(sb.stats().too_many_requests > 0, "{:?}", sb.stats());
    assert_eq!(sb.profiles("contacts").len(), 10);

    // Injected: every 3rd request.
    let sb = sandbox(SandboxConfig::default()).await;
    sb.set_wire_faults(WireFaults {
        throttle_every: 3,
        ..WireFaults::default()
    });
    let mut store = MemoryStore::new();
    create_applied(&sb, &mut store, "", 10).await;
    assert!(sb.stats().too_many_requests >= 3);
    assert_eq!(sb.profiles("contacts").len(), 10);
}

#[tokio::test]
async fn records_failing_table_validation_are_never_sent() {
    let sb = sandbox(SandboxConfig::default()).await;
    let mut contacts = sample_contacts(2);
    contacts.extend(unacceptable());
    let mut unknown_subscription = sample_contacts(3).remove(2);
    unknown_subscription.subscriptions.insert("gossip".into());
    contacts.push(unknown_subscription);
    let mut store = MemoryStore::new();
    let outcomes = run(&mut sink(&sb, ""), &mut store, vec![creates(&contacts)])
        .await
        .expect("run");
    assert!(matches!(outcomes[0], Outcome::Applied { .. }));
    assert!(matches!(outcomes[1], Outcome::Applied { .. }));
    let fields: Vec<Option<String>> = outcomes[2..]
        .iter()
        .map(|o| match o {
            Outcome::Rejected { field, .. } => field.clone(),
            other => panic!("expected a rejection, got {other:?}"),
        })
        .collect();
    assert_eq!(
        fields,
        vec![
            Some("email".to_string()),
            Some("external_id".to_string()),
            Some("subscriptions".to_string())
        ]
    );
    assert_eq!(
        sb.stats().profile_posts,
        2,
        "invalid records reached the platform"
    );
    assert_eq!(sb.profiles("contacts").len(), 2);
}

#[tokio::test]
async fn removal_by_unsubscribe_and_by_delete() {
    let (sb, contacts, mut store) = seeded(3).await;
    // Unsubscribe: the profile stays, subscribed to nothing.
    applied(&sb, &mut store, "", vec![removal(&contacts[1])]).await;
    let p = sb
        .profile_where("contacts", "customerId", "CS-0002")
        .expect("kept");
    assert!(
        !p.subscribed("Newsletter") && !p.subscribed("Events"),
        "{p:?}"
    );
    // Delete, twice: the second finds nothing (404) and still counts as applied.
    for _ in 0..2 {
        applied(
            &sb,
            &mut store,
            "removal = \"delete\"",
            vec![removal(&contacts[2])],
        )
        .await;
    }
    assert!(sb
        .profile_where("contacts", "customerId", "CS-0003")
        .is_none());
    assert_eq!(sb.profiles("contacts").len(), 2);
}

#[tokio::test]
async fn bulk_error_rows_map_back_to_their_records() {
    let sb = sandbox(SandboxConfig::default()).await;
    // The 4th contact's email and id belong to two different profiles: its row
    // conflicts on the platform (the client cannot know it beforehand).
    for (email, id) in [
        ("conformance.0004@example.com", "OTHER"),
        ("someone.else@example.com", "CS-0004"),
    ] {
        seed_person(&sb, email, id);
    }
    let contacts = sample_contacts(12);
    let mut store = MemoryStore::new();
    let outcomes = run(
        &mut sink(&sb, "bulk_threshold = 10"),
        &mut store,
        vec![creates(&contacts)],
    )
    .await
    .expect("run");
    assert_eq!(sb.stats().imports_posted, 1);
    for (i, o) in outcomes.iter().enumerate() {
        if i == 3 {
            match o {
                Outcome::Rejected { reason, .. } => {
                    assert!(reason.contains("different profiles"), "{reason}")
                }
                other => panic!("expected a rejection, got {other:?}"),
            }
        } else {
            assert!(matches!(o, Outcome::Applied { .. }), "{i}: {o:?}");
        }
    }
}

#[tokio::test]
async fn a_running_import_is_recovered_after_a_crash() {
    let sb = slow_import_sandbox().await;
    let contacts = sample_contacts(11);
    let changes = creates(&contacts);
    let mut store = MemoryStore::new();
    {
        let mut sink = sink(&sb, "bulk_threshold = 10\nmax_import_wait = \"10ms\"");
        let mut ctx = store.context();
        begin(&mut sink, &changes, &mut ctx).await;
        let outcomes = sink
            .apply(
                &ChangeBatch {
                    id: "run-1-batch-1".into(),
                    changes: changes.clone(),
                },
                &mut ctx,
            )
            .await
            .expect("apply");
        assert!(outcomes
            .iter()
            .all(|o| matches!(o, Outcome::Unknown { .. })));
    }
    assert!(store.values().keys().any(|k| k.starts_with("import:")));
    let pending = changes::pending("run-1-batch-1", &changes);
    let mut sink = sink(&sb, "bulk_threshold = 10");
    let mut ctx = store.context();
    let recovered = sink
        .recover(&pending, &mut ctx)
        .await
        .expect("recover")
        .expect("known import");
    all_applied(&recovered);
    assert_eq!(sb.stats().imports_posted, 1);
    assert!(!store.values().keys().any(|k| k.starts_with("import:")));
    let other = contactsync_core::PendingBatch {
        id: "other".into(),
        records: Vec::new(),
    };
    assert!(sink
        .recover(&other, &mut store.context())
        .await
        .expect("none")
        .is_none());
}

/// The bulk POST is not idempotent: an answer lost after Actito took the import, or a
/// 5xx, is never followed by a second post. The rows are reported unknown (the engine
/// sends them again next run) and the import counts against the day's quota.
#[tokio::test]
async fn a_bulk_import_whose_answer_is_lost_or_fails_is_not_posted_again() {
    for (fault, taken) in [(WireFaults::answer_lost(1), 1), (WireFaults::fails(1), 0)] {
        let (sb, changes, mut sink, mut store) = bulk_of_20().await;
        let mut ctx = store.context();
        begin(&mut sink, &changes, &mut ctx).await;
        // The next call the sink makes is the import POST.
        sb.set_wire_faults(fault.clone());
        let batch = ChangeBatch {
            id: "b1".into(),
            changes,
        };
        let outcomes = sink.apply(&batch, &mut ctx).await.expect("apply");
        assert_eq!(outcomes.len(), 20);
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, Outcome::Unknown { .. })),
            "{fault:?}: {outcomes:?}"
        );
        drop(ctx);
        assert_eq!(
            quota_used(&sb, &store),
            1,
            "{fault:?}: counted against the quota"
        );
        let posts = sb
            .requests()
            .iter()
            .filter(|r| r.method == "POST" && r.path.ends_with("/import"))
            .count();
        assert_eq!(posts, 1, "{fault:?}: posted once, never again");
        assert_eq!(sb.imports().len(), taken, "{fault:?}");
    }
}

/// Twelve imports in the last 24 hours use the quota up, whatever the UTC day says (a
/// run just after midnight must not post a 13th within 24 hours).
#[tokio::test]
async fn twelve_imports_in_the_last_24_hours_use_the_quota_up() {
    let sb = sandbox(SandboxConfig::default()).await;
    let mut store = MemoryStore::new();
    let yesterday_evening: Vec<String> = (0..12)
        .map(|i| {
            (chrono::Utc::now() - chrono::Duration::hours(23) + chrono::Duration::minutes(i))
                .to_rfc3339()
        })
        .collect();
    remember_posts(&sb, &mut store, &yesterday_evening);
    create_applied(&sb, &mut store, "bulk_threshold = 10", 20).await;
    assert_eq!(
        sb.stats().imports_posted,
        0,
        "no 13th import within 24 hours"
    );
    assert_eq!(sb.stats().profile_posts, 20, "one by one instead");

    // A day later those posts no longer count: one bulk import, remembered.
    let old: Vec<String> = (0..12)
        .map(|i| {
            (chrono::Utc::now() - chrono::Duration::hours(25) + chrono::Duration::minutes(-i))
                .to_rfc3339()
        })
        .collect();
    let mut store = MemoryStore::new();
    remember_posts(&sb, &mut store, &old);
    create_applied(&sb, &mut store, "bulk_threshold = 10", 20).await;
    assert_eq!(sb.stats().imports_posted, 1);
    let posts: Vec<String> = store
        .values()
        .get(&posts_key(sb.entity(), "contacts"))
        .and_then(|v| serde_json::from_str(v).ok())
        .expect("posts kept");
    assert_eq!(
        posts.len(),
        1,
        "the day-old posts are forgotten, this one kept"
    );
}

fn update_from(before: &Contact, after: &Contact) -> Change {
    changes::update_from(before, after.clone())
}

/// Consent belongs to the person: a source without subscriptions (a CSV) unsubscribes
/// nobody, and someone who subscribed in Actito stays subscribed; a subscription the
/// source itself takes away is sent.
#[tokio::test]
async fn only_the_subscriptions_the_source_changed_are_sent() {
    let sb = sandbox(SandboxConfig::default()).await;
    let mut person = sample_contacts(1).remove(0);
    person.subscriptions.clear();
    let mut store = MemoryStore::new();
    all_applied(
        &run(
            &mut sink(&sb, ""),
            &mut store,
            vec![creates(&[person.clone()])],
        )
        .await
        .expect("created"),
    );
    let id = || {
        sb.profile_where("contacts", "customerId", "CS-0001")
            .expect("profile")
    };
    // The person subscribes in Actito themselves.
    let mut subscribed = ProfileInput::default();
    subscribed
        .attributes
        .push(("customerId".into(), Some("CS-0001".into())));
    subscribed.subscriptions.push(("Newsletter".into(), true));
    sb.seed_profile("contacts", &subscribed)
        .expect("subscribed in Actito");
    assert_eq!(id().subscriptions.get("Newsletter"), Some(&true));

    // The source (no subscriptions column) changes their name: they stay subscribed.
    let mut renamed = person.clone();
    renamed.first_name = Some("Renamed".into());
    applied(&sb, &mut store, "", vec![update_from(&person, &renamed)]).await;
    assert_eq!(
        id().attributes.get("firstName").map(String::as_str),
        Some("Renamed")
    );
    assert_eq!(
        id().subscriptions.get("Newsletter"),
        Some(&true),
        "their own choice stands"
    );

    // A source that had the subscription and drops it: that is sent.
    let mut with = renamed.clone();
    with.subscriptions.insert("newsletter".into());
    let without = renamed.clone();
    applied(&sb, &mut store, "", vec![update_from(&with, &without)]).await;
    assert_eq!(id().subscriptions.get("Newsletter"), Some(&false));
}

#[tokio::test]
async fn profiles_deleted_while_the_table_is_paged_skip_nobody() {
    let (sb, contacts, _) = seeded(10).await;
    let ids = |read: &contactsync_testkit::SourceRead| -> Vec<String> {
        read.contacts()
            .iter()
            .filter_map(|c| c.external_id.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect()
    };
    // Staff delete the table's first profile while the read is on page 2: the others
    // shift back by one, and paging by offset alone skips the first of page 2.
    let read = read_deleting(&sb, 1).await;
    assert!(read.outcome.complete, "read again until nothing moved");
    let got = ids(&read);
    for id in contacts[1..].iter().filter_map(|c| c.external_id.as_ref()) {
        assert!(got.contains(id), "{id} was skipped: {got:?}");
    }
    assert_eq!(got.len(), read.contacts().len(), "no profile twice");

    // Deletions that never stop: not complete, so no removal comes from it.
    let read = read_deleting(&sb, 100).await;
    assert!(!read.outcome.complete);
}
