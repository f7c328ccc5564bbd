//! Within the platform's budget and without losing a change: resumed imports, 429s
//! told apart, pages that shift under a read, pacing, and the bulk choice.

use super::*;

/// A run killed while its bulk import runs: the next run's `recover` does all the
/// uninterrupted batch would. The unsubscribes travel in the import file, so they reach
/// Actito; a rejected row is matched to its own person although a removal stands
/// before it in the batch; the removal, which the import did not carry, is left
/// unknown (the engine's diff sends it again), never recorded as done.
#[tokio::test]
async fn a_resumed_import_carries_its_unsubscribes_and_maps_rejections_past_a_removal() {
    let sb = slow_import_sandbox().await;
    let contacts = sample_contacts(13);
    for c in &contacts {
        sb.seed_profile(
            "contacts",
            &ProfileInput {
                attributes: vec![
                    ("emailAddress".into(), c.email.clone()),
                    ("customerId".into(), c.external_id.clone()),
                ],
                subscriptions: vec![("Newsletter".into(), true)],
                ..ProfileInput::default()
            },
        )
        .expect("seed");
    }
    // The address the 6th person moves to belongs to another profile in Actito: the
    // import rejects their row.
    seed_person(&sb, "taken@example.com", "OTHER");
    // Position 0 removes the first person; 1..=12 unsubscribe the others from the
    // newsletter (the source withdrew it).
    let mut changes = vec![removal(&contacts[0])];
    for (n, c) in contacts[1..].iter().enumerate() {
        let mut before = c.clone();
        before.subscriptions = ["newsletter".to_string()].into();
        let mut after = c.clone();
        after.subscriptions.clear();
        if n == 4 {
            after.email = Some("taken@example.com".into());
        }
        changes.push(update_from(&before, &after));
    }
    let batch = ChangeBatch {
        id: "run-1-batch-1".into(),
        changes: changes.clone(),
    };
    let mut store = MemoryStore::new();
    {
        let mut sink = sink(&sb, "bulk_threshold = 10\nmax_import_wait = \"10ms\"");
        let mut ctx = store.context();
        let plan = ChangePlan {
            updates: 12,
            removals: 1,
            ..ChangePlan::default()
        };
        sink.begin(&plan, &mut ctx).await.expect("begin");
        let outcomes = sink.apply(&batch, &mut ctx).await.expect("apply");
        assert!(outcomes[1..]
            .iter()
            .all(|o| matches!(o, Outcome::Unknown { .. })));
        // The run dies here: its outcomes are never recorded.
    }
    let pending = changes::pending(&batch.id.clone(), &changes);
    let recovered = sink(&sb, "bulk_threshold = 10")
        .recover(&pending, &mut store.context())
        .await
        .expect("recover")
        .expect("the import is ours");
    assert_eq!(recovered.len(), 13);
    assert!(
        matches!(recovered[0], Outcome::Unknown { .. }),
        "the removal was not in the import: {:?}",
        recovered[0]
    );
    for (i, o) in recovered.iter().enumerate().skip(1) {
        if i == 5 {
            assert!(matches!(o, Outcome::Rejected { .. }), "row {i}: {o:?}");
        } else {
            assert!(matches!(o, Outcome::Applied { .. }), "row {i}: {o:?}");
        }
    }
    for (i, c) in contacts.iter().enumerate().skip(1) {
        let id = c.external_id.as_deref().expect("id");
        let profile = sb
            .profile_where("contacts", "customerId", id)
            .expect("profile");
        if i == 5 {
            assert_eq!(profile.subscriptions.get("Newsletter"), Some(&true));
        } else {
            assert_eq!(
                profile.subscriptions.get("Newsletter"),
                Some(&false),
                "{id} was unsubscribed by the resumed import"
            );
        }
    }
    assert_eq!(sb.stats().imports_posted, 1);
}

/// A 429 on the import POST while contactsync has posted fewer than twelve imports
/// today is another application holding the licence's five concurrent slots: it is
/// waited out and the import posted, never taken for the day's quota.
#[tokio::test]
async fn a_concurrent_request_429_on_the_import_is_waited_out() {
    use contactsync_sandbox_actito::Faults;
    let (sb, changes, mut sink, mut store) = bulk_of_20().await;
    let mut ctx = store.context();
    begin(&mut sink, &changes, &mut ctx).await;
    // The next calls the sink makes are the import POST and its retries.
    sb.set_faults(Faults {
        busy_licence: 5,
        ..Faults::default()
    });
    let outcomes = sink
        .apply(
            &ChangeBatch {
                id: "b1".into(),
                changes,
            },
            &mut ctx,
        )
        .await
        .expect("apply");
    all_applied(&outcomes);
    assert_eq!(sb.stats().imports_posted, 1);
    assert_eq!(sb.stats().profile_posts, 0, "no fall back to one by one");
    assert!(sb.stats().too_many_requests >= 5);
    drop(ctx);
    assert_eq!(
        quota_used(&sb, &store),
        1,
        "one import counted, the quota not marked used"
    );
}

/// One profile deleted and another created while the table is paged keep its count
/// and still shift the list by one: the read sees the newcomer, knows the pass may
/// have skipped someone, and reads again, so that nobody is missing (and so removed by
/// the sweep).
#[tokio::test]
async fn a_profile_deleted_and_another_created_while_paging_skip_nobody() {
    let (sb, contacts, _) = seeded(10).await;
    let read = read_replacing(&sb, 1).await;
    assert!(read.outcome.complete, "read again until nothing moved");
    let got: Vec<String> = read
        .contacts()
        .iter()
        .filter_map(|c| c.email.clone())
        .collect();
    for c in &contacts[1..] {
        let email = c.email.clone().expect("email");
        assert!(got.contains(&email), "{email} was skipped: {got:?}");
    }
    assert!(
        got.iter().any(|e| e.starts_with("created.while.paging")),
        "{got:?}"
    );
    assert_eq!(sb.profiles("contacts").len(), 10, "the count never changed");

    // Replacements that never stop: not complete.
    let read = read_replacing(&sb, 100).await;
    assert!(!read.outcome.complete);
}

/// The client keeps to the documented rate itself. The sandbox slows calls beyond a
/// rate as Actito does (here 20 a second, scaled down from 100 a minute so that the
/// test is short); a client paced to it is never slowed, one that is not is.
#[tokio::test]
async fn calls_paced_to_the_documented_rate_are_never_slowed() {
    for (pace, slowed) in [
        ("rate_limit = \"20/s\"", false),
        ("rate_limit = \"off\"", true),
    ] {
        let sb = sandbox(SandboxConfig {
            wire_faults: WireFaults {
                rate_calls: 20,
                rate_window_ms: 1000,
                ..WireFaults::default()
            },
            ..SandboxConfig::default()
        })
        .await;
        let contacts = sample_contacts(45);
        let mut store = MemoryStore::new();
        applied(
            &sb,
            &mut store,
            &format!("bulk_threshold = 1000\n{pace}"),
            creates(&contacts),
        )
        .await;
        let stats = sb.stats();
        assert!(stats.requests > 45, "{stats:?}");
        assert_eq!(stats.slowed > 0, slowed, "{pace}: {stats:?}");
        assert!(stats.max_in_flight <= 5, "{stats:?}");
    }
}

/// Without a `bulk_threshold`, the run goes bulk when that is quicker at the
/// documented rate, and the report says which and why.
#[tokio::test]
async fn bulk_or_one_by_one_is_chosen_on_time_at_the_documented_rate() {
    let sb = sandbox(SandboxConfig::default()).await;
    for (creates, bulk) in [(2_400, true), (150, false)] {
        // The default poll interval: polls count at the rate too.
        let settings = ConnectorSettings::from_toml("sinks.actito", &toml(&sb, "")).expect("toml");
        let mut sink =
            ActitoSink::new(SinkConfig::from_settings(&settings).expect("config")).expect("sink");
        let mut store = MemoryStore::new();
        sink.begin(
            &ChangePlan {
                creates,
                ..ChangePlan::default()
            },
            &mut store.context(),
        )
        .await
        .expect("begin");
        let how = sink.summary().how.expect("the choice is reported");
        assert_eq!(how.starts_with("bulk: 1 import"), bulk, "{creates}: {how}");
        assert!(how.contains(&format!("{creates} calls")), "{how}");
        assert!(how.contains("at 100/min"), "{how}");
    }
}
