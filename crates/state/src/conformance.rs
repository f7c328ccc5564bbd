//! The contract every [`StateStore`] backend keeps, as a suite a backend's tests run:
//!
//! ```
//! # fn main() -> Result<(), String> {
//! let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
//! let mut n = 0;
//! contactsync_state::conformance::check(&mut || {
//!     n += 1;
//!     let path = dir.path().join(format!("state-{n}.db"));
//!     contactsync_state::SqliteState::open(&path)
//!         .map(|s| Box::new(s) as Box<dyn contactsync_state::StateStore>)
//!         .map_err(|e| e.to_string())
//! })
//! # }
//! ```
//!
//! Each part starts from a new, empty store (`new_store` is called once per part) and
//! says which promise broke. The engine's own tests cover how a run uses these
//! promises; this suite covers only what a second backend (PostgreSQL) must also do.

use contactsync_core::{ChangeKind, Contact, ContactKey, SyncedEntry};

use super::{AuditEntry, LockAttempt, LockHolder, PendingRow, Settlement, SourceMemo, StateStore};

/// Makes a new, empty store.
pub type NewStore<'a> = dyn FnMut() -> Result<Box<dyn StateStore>, String> + 'a;

/// Runs every part of the suite; the first broken promise is the error.
pub fn check(new_store: &mut NewStore<'_>) -> Result<(), String> {
    runs_and_cursor(new_store()?.as_mut()).map_err(|e| format!("runs and cursor: {e}"))?;
    pending_then_settled(new_store()?.as_mut())
        .map_err(|e| format!("pending and settlement: {e}"))?;
    awaiting_finish(new_store()?.as_mut()).map_err(|e| format!("awaiting finish: {e}"))?;
    confirm_held_while_finishing(new_store()?.as_mut())
        .map_err(|e| format!("confirm held while the sink finishes: {e}"))?;
    locks_are_exclusive(new_store()?.as_mut()).map_err(|e| format!("locks: {e}"))?;
    sink_store_is_scoped(new_store()?.as_mut()).map_err(|e| format!("sink store: {e}"))?;
    audit_and_history(new_store()?.as_mut()).map_err(|e| format!("audit: {e}"))?;
    slots_run_each_pipeline_once(new_store()?.as_mut()).map_err(|e| format!("slots: {e}"))?;
    rejects_kept_with_their_run(new_store()?.as_mut()).map_err(|e| format!("rejects: {e}"))?;
    runs_a_page_at_a_time(new_store()?.as_mut()).map_err(|e| format!("run pages: {e}"))?;
    source_memo_kept_in_order_and_reset(new_store()?.as_mut())
        .map_err(|e| format!("source memo: {e}"))?;
    creates_kept_as_one_entry_a_run(new_store)
        .map_err(|e| format!("creates kept as one entry a run: {e}"))?;
    let mut from = new_store()?;
    let mut to = new_store()?;
    export_then_import(from.as_mut(), to.as_mut()).map_err(|e| format!("copy: {e}"))?;
    Ok(())
}

macro_rules! ensure {
    ($cond:expr, $($message:tt)+) => {
        if !$cond {
            return Err(format!($($message)+));
        }
    };
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

const PIPELINE: &str = "hr->platform";

fn person(id: &str) -> (ContactKey, Contact) {
    let contact = Contact {
        external_id: Some(id.to_string()),
        email: Some(format!("{}@example.com", id.to_lowercase())),
        first_name: Some("Ann".into()),
        ..Contact::default()
    };
    (ContactKey::ExternalId(id.to_string()), contact)
}

/// `n` people (`E0`, `E1`, …, emails `e0@example.com`, …) created, as the pending rows
/// of a batch: for a backend's own tests.
pub fn created_people(n: u64) -> Vec<PendingRow> {
    (0..n)
        .map(|i| {
            let (key, contact) = person(&format!("E{i}"));
            PendingRow {
                key,
                kind: ChangeKind::Create,
                content_hash: i,
                email: contact.email.clone(),
                record: Some(contact),
            }
        })
        .collect()
}

fn runs_and_cursor(store: &mut dyn StateStore) -> Result<(), String> {
    let (first, full) = store.begin_run(PIPELINE).map_err(err)?;
    ensure!(
        first == 1 && full.is_none(),
        "a first run is 1 with no full read before it, got {first}, {full:?}"
    );
    store
        .finish_run(PIPELINE, first, "synced", "{}", Some("c1"), true)
        .map_err(err)?;
    ensure!(
        store.cursor(PIPELINE).map_err(err)?.as_deref() == Some("c1"),
        "the cursor a finished run stores is read back"
    );
    let (second, full) = store.begin_run(PIPELINE).map_err(err)?;
    ensure!(
        second == 2 && full == Some(1),
        "the second run knows the full read of run 1, got {second}, {full:?}"
    );
    store
        .finish_run(PIPELINE, second, "failed", "{}", None, false)
        .map_err(err)?;
    ensure!(
        store.cursor(PIPELINE).map_err(err)?.as_deref() == Some("c1"),
        "a run that stores no cursor keeps the last one"
    );
    let runs = store.runs(Some(PIPELINE), 10).map_err(err)?;
    ensure!(
        runs.iter().map(|r| r.run).collect::<Vec<_>>() == [2, 1],
        "runs are listed newest first"
    );
    store.reset(PIPELINE).map_err(err)?;
    ensure!(
        store.cursor(PIPELINE).map_err(err)?.is_none(),
        "reset forgets the cursor"
    );
    Ok(())
}

fn pending_then_settled(store: &mut dyn StateStore) -> Result<(), String> {
    let (run, _) = store.begin_run(PIPELINE).map_err(err)?;
    let (ann, ann_record) = person("E1");
    let (bob, bob_record) = person("E2");
    let rows = vec![
        PendingRow {
            key: ann.clone(),
            kind: ChangeKind::Create,
            content_hash: 11,
            email: ann_record.email.clone(),
            record: Some(ann_record.clone()),
        },
        PendingRow {
            key: bob.clone(),
            kind: ChangeKind::Create,
            content_hash: 22,
            email: bob_record.email.clone(),
            record: Some(bob_record),
        },
    ];
    store
        .record_pending(PIPELINE, run, "b1", &rows)
        .map_err(err)?;
    let pending = store.pending_batches(PIPELINE).map_err(err)?;
    ensure!(
        pending.len() == 1 && pending[0].1 == rows,
        "a recorded batch is read back whole, in order: {pending:?}"
    );
    let mut index = Vec::new();
    store
        .scan_index(PIPELINE, &mut |k, h| index.push((k, h)))
        .map_err(err)?;
    ensure!(index.is_empty(), "pending changes are not synced yet");
    store
        .settle(
            PIPELINE,
            "b1",
            &[
                Settlement::Synced {
                    key: ann.clone(),
                    entry: SyncedEntry {
                        content_hash: 11,
                        email: ann_record.email.clone(),
                        handle: Some("h1".into()),
                        record: Some(Box::new(ann_record.clone())),
                    },
                },
                Settlement::Dropped { key: bob.clone() },
            ],
        )
        .map_err(err)?;
    ensure!(
        store.pending_batches(PIPELINE).map_err(err)?.is_empty(),
        "a settled batch is no longer pending"
    );
    let many = store
        .synced_many(PIPELINE, &[bob.hash64(), ann.hash64(), ann.hash64()])
        .map_err(err)?;
    ensure!(
        many.iter()
            .map(|r| r.as_ref().map(|r| (&r.key, r.entry.content_hash)))
            .collect::<Vec<_>>()
            == vec![None, Some((&ann, 11)), Some((&ann, 11))],
        "synced rows looked up together come in the order asked, none where there is none: {many:?}"
    );
    ensure!(
        store.synced_many(PIPELINE, &[]).map_err(err)?.is_empty(),
        "looking up no one finds no one"
    );
    let row = store.synced(PIPELINE, ann.hash64()).map_err(err)?;
    ensure!(
        row.as_ref()
            .map(|r| (&r.key, r.entry.content_hash, r.entry.handle.as_deref()))
            == Some((&ann, 11, Some("h1"))),
        "a synced settlement is remembered with its handle: {row:?}"
    );
    ensure!(
        row.and_then(|r| r.entry.record).map(|r| *r) == Some(ann_record),
        "the last-sent record is kept"
    );
    ensure!(
        store.synced(PIPELINE, bob.hash64()).map_err(err)?.is_none(),
        "a dropped change leaves nothing synced"
    );
    let mut index = Vec::new();
    store
        .scan_index(PIPELINE, &mut |k, h| index.push((k, h)))
        .map_err(err)?;
    ensure!(
        index == [(ann.hash64(), 11)],
        "the index holds what was synced: {index:?}"
    );
    store
        .record_pending(
            PIPELINE,
            run,
            "b2",
            &[PendingRow {
                key: ann.clone(),
                kind: ChangeKind::Remove,
                content_hash: 0,
                email: None,
                record: None,
            }],
        )
        .map_err(err)?;
    store
        .settle(
            PIPELINE,
            "b2",
            &[Settlement::Forgotten { key: ann.clone() }],
        )
        .map_err(err)?;
    ensure!(
        store.synced(PIPELINE, ann.hash64()).map_err(err)?.is_none(),
        "a forgotten person is no longer synced"
    );
    Ok(())
}

/// A sink durable only at its finish: applied changes stay pending until the run
/// confirms them, whole batches or part of one, and other pipelines' pending changes
/// are left alone.
fn awaiting_finish(store: &mut dyn StateStore) -> Result<(), String> {
    const OTHER: &str = "crm->platform";
    let create = |id: &str| {
        let (key, record) = person(id);
        PendingRow {
            key,
            kind: ChangeKind::Create,
            content_hash: 7,
            email: record.email.clone(),
            record: Some(record),
        }
    };
    let awaiting = |row: &PendingRow| Settlement::AwaitingFinish {
        key: row.key.clone(),
        handle: None,
    };
    let (run, _) = store.begin_run(PIPELINE).map_err(err)?;
    let (other_run, _) = store.begin_run(OTHER).map_err(err)?;
    let whole = [create("E1"), create("E2")];
    let part = [create("E3"), create("E4")];
    let elsewhere = [create("E5")];
    // b1 as a sink that keeps nothing before its finish has it recorded: taken
    // already, in one step; b2 recorded first and settled after.
    store
        .record_awaiting_finish(
            PIPELINE,
            run,
            "b1",
            whole.to_vec(),
            vec![None, Some("h-2".into())],
        )
        .map_err(err)?;
    store
        .record_pending(PIPELINE, run, "b2", &part)
        .map_err(err)?;
    store
        .record_pending(OTHER, other_run, "o1", &elsewhere)
        .map_err(err)?;
    // E4's outcome is unknown: it is not settled at all.
    store
        .settle(PIPELINE, "b2", &[awaiting(&part[0])])
        .map_err(err)?;
    ensure!(
        store
            .synced(PIPELINE, whole[0].key.hash64())
            .map_err(err)?
            .is_none(),
        "a change awaiting the finish is not synced yet"
    );
    let confirmed = store.confirm_finished(PIPELINE, run).map_err(err)?;
    ensure!(
        confirmed == 3,
        "the three applied changes are confirmed, not {confirmed}"
    );
    let runs = store.runs(Some(PIPELINE), 1).map_err(err)?;
    ensure!(
        runs.first().and_then(|r| r.status.as_deref()) == Some("confirmed"),
        "a run whose changes are confirmed is marked so until its end says more: {runs:?}"
    );
    for row in [&whole[0], &whole[1], &part[0]] {
        ensure!(
            store
                .synced(PIPELINE, row.key.hash64())
                .map_err(err)?
                .is_some(),
            "{} is synced once confirmed",
            row.key
        );
    }
    let handle = store
        .synced(PIPELINE, whole[1].key.hash64())
        .map_err(err)?
        .and_then(|row| row.entry.handle);
    ensure!(
        handle.as_deref() == Some("h-2"),
        "the handle a batch was recorded with is kept once confirmed, not {handle:?}"
    );
    ensure!(
        store
            .synced(PIPELINE, part[1].key.hash64())
            .map_err(err)?
            .is_none(),
        "a change never settled is not confirmed"
    );
    let left: Vec<_> = store
        .pending_batches(PIPELINE)
        .map_err(err)?
        .into_iter()
        .flat_map(|(_, rows)| rows)
        .map(|row| row.key)
        .collect();
    ensure!(
        left == [part[1].key.clone()],
        "only the unsettled change is still pending: {left:?}"
    );
    let other = store.pending_batches(OTHER).map_err(err)?;
    ensure!(
        other.len() == 1 && other[0].1 == elsewhere,
        "another pipeline's pending changes are kept: {other:?}"
    );
    // Alone in the pending table now: confirming empties it.
    store
        .settle(
            PIPELINE,
            "b2",
            &[Settlement::Dropped {
                key: part[1].key.clone(),
            }],
        )
        .map_err(err)?;
    store
        .settle(OTHER, "o1", &[awaiting(&elsewhere[0])])
        .map_err(err)?;
    ensure!(
        store.confirm_finished(OTHER, other_run).map_err(err)? == 1,
        "the other pipeline's change is confirmed"
    );
    ensure!(
        store.pending_batches(OTHER).map_err(err)?.is_empty()
            && store.pending_batches(PIPELINE).map_err(err)?.is_empty(),
        "nothing is left pending"
    );
    ensure!(
        store
            .synced(OTHER, elsewhere[0].key.hash64())
            .map_err(err)?
            .is_some(),
        "the other pipeline's change is synced"
    );
    Ok(())
}

/// A confirm held while the sink finishes: nothing of it (nor of the sink's own writes
/// made meanwhile) is kept when it is abandoned, and all of it once committed.
fn confirm_held_while_finishing(store: &mut dyn StateStore) -> Result<(), String> {
    let rows = created_people(3);
    let (run, _) = store.begin_run(PIPELINE).map_err(err)?;
    store
        .record_awaiting_finish(PIPELINE, run, "b1", rows[..2].to_vec(), vec![None, None])
        .map_err(err)?;
    store
        .record_pending(PIPELINE, run, "b2", &rows[2..])
        .map_err(err)?;
    let awaiting = Settlement::AwaitingFinish {
        key: rows[2].key.clone(),
        handle: None,
    };
    store.settle(PIPELINE, "b2", &[awaiting]).map_err(err)?;
    let synced = |store: &mut dyn StateStore| -> Result<usize, String> {
        let mut n = 0;
        for row in &rows {
            n += usize::from(
                store
                    .synced(PIPELINE, row.key.hash64())
                    .map_err(err)?
                    .is_some(),
            );
        }
        Ok(n)
    };
    let fingerprint = |store: &mut dyn StateStore| store.sink_store("sinks.a").get("fingerprint");
    let Some(held) = store.hold_confirm(PIPELINE, run).map_err(err)? else {
        // A backend that holds nothing confirms after the finish.
        ensure!(
            store.confirm_finished(PIPELINE, run).map_err(err)? == 3,
            "an unheld confirm confirms the three changes"
        );
        return Ok(());
    };
    ensure!(
        held == 3,
        "the held confirm counts the three changes, not {held}"
    );
    store
        .sink_store("sinks.a")
        .put("fingerprint", "1")
        .map_err(err)?;
    store.abandon_confirm().map_err(err)?;
    ensure!(
        synced(store)? == 0,
        "an abandoned confirm leaves nobody synced"
    );
    ensure!(
        fingerprint(store).map_err(err)?.is_none(),
        "a sink's write made while the confirm was held goes with it"
    );
    let status = |store: &mut dyn StateStore| -> Result<Option<String>, String> {
        let runs = store.runs(Some(PIPELINE), 1).map_err(err)?;
        Ok(runs.into_iter().next().and_then(|r| r.status))
    };
    ensure!(
        status(store)?.is_none(),
        "an abandoned confirm leaves the run's status unset"
    );
    ensure!(
        store.hold_confirm(PIPELINE, run).map_err(err)? == Some(3),
        "an abandoned confirm leaves the changes to confirm again"
    );
    store
        .sink_store("sinks.a")
        .put("fingerprint", "2")
        .map_err(err)?;
    store.commit_confirm().map_err(err)?;
    ensure!(synced(store)? == 3, "a committed confirm syncs the three");
    ensure!(
        status(store)?.as_deref() == Some("confirmed"),
        "a committed confirm marks its run confirmed until the run's end says more"
    );
    ensure!(
        fingerprint(store).map_err(err)?.as_deref() == Some("2"),
        "a sink's write made while the confirm was held is kept with it"
    );
    ensure!(
        store.pending_batches(PIPELINE).map_err(err)?.is_empty(),
        "nothing is left pending"
    );
    Ok(())
}

fn holder(token: &str) -> LockHolder {
    LockHolder {
        token: token.to_string(),
        ..LockHolder::current(PIPELINE)
    }
}

fn locks_are_exclusive(store: &mut dyn StateStore) -> Result<(), String> {
    let names = vec![
        format!("pipeline:{PIPELINE}"),
        "sink:sinks.platform".to_string(),
    ];
    let first = holder("first");
    let second = holder("second");
    ensure!(
        matches!(
            store.lock(&names, &first).map_err(err)?,
            LockAttempt::Acquired { .. }
        ),
        "a free lock is acquired"
    );
    let busy = store.lock(&names[1..], &second).map_err(err)?;
    ensure!(
        matches!(&busy, LockAttempt::Busy { name, holder } if name == &names[1] && holder.token == "first"),
        "a held lock is refused, naming it and its holder: {busy:?}"
    );
    let held = store.held_locks().map_err(err)?;
    ensure!(
        held.len() == 2
            && held
                .iter()
                .all(|l| l.live && l.holder.token == "first" && names.contains(&l.name)),
        "the locks held now are listed, live, with their holder: {held:?}"
    );
    store.unlock(&first).map_err(err)?;
    ensure!(
        store.held_locks().map_err(err)?.is_empty(),
        "a released lock is no longer listed"
    );
    ensure!(
        matches!(
            store.lock(&names, &second).map_err(err)?,
            LockAttempt::Acquired { .. }
        ),
        "a released lock can be taken"
    );
    store.unlock(&second).map_err(err)?;
    Ok(())
}

fn reject(n: u32) -> crate::RejectRow {
    crate::RejectRow {
        stage: "validation".into(),
        origin: format!("people.csv:{}", n + 1),
        key: n.is_multiple_of(2).then(|| format!("external_id:E{n}")),
        email: Some(format!("<b>e{n}</b>@example.com")),
        field: Some("email".into()),
        reason: format!("reason {n}"),
    }
}

fn rejects_kept_with_their_run(store: &mut dyn StateStore) -> Result<(), String> {
    let (run, _) = store.begin_run(PIPELINE).map_err(err)?;
    let (other, _) = store.begin_run(PIPELINE).map_err(err)?;
    let at = chrono::Utc::now().timestamp();
    store
        .record_rejects(PIPELINE, run, at, &[reject(0), reject(1)])
        .map_err(err)?;
    store
        .record_rejects(PIPELINE, run, at, &[reject(2)])
        .map_err(err)?;
    store
        .record_rejects(PIPELINE, other, at, &[reject(9)])
        .map_err(err)?;
    let all = store.rejects(PIPELINE, run, 0, 10).map_err(err)?;
    ensure!(
        all == [reject(0), reject(1), reject(2)],
        "a run's rejects come back as kept, in order: {all:?}"
    );
    let page = store.rejects(PIPELINE, run, 1, 1).map_err(err)?;
    ensure!(page == [reject(1)], "a page of rejects: {page:?}");
    ensure!(
        store.rejects(PIPELINE, other, 0, 10).map_err(err)? == [reject(9)],
        "each run keeps its own rejects"
    );
    store.prune_audit(PIPELINE, at + 1).map_err(err)?;
    ensure!(
        store.rejects(PIPELINE, run, 0, 10).map_err(err)?.is_empty(),
        "rejects older than the audit are pruned with it"
    );
    store
        .record_rejects(PIPELINE, run, at, &[reject(3)])
        .map_err(err)?;
    store.reset(PIPELINE).map_err(err)?;
    ensure!(
        store.rejects(PIPELINE, run, 0, 10).map_err(err)?.is_empty(),
        "reset forgets the rejects"
    );
    Ok(())
}

fn runs_a_page_at_a_time(store: &mut dyn StateStore) -> Result<(), String> {
    for _ in 0..5 {
        let (run, _) = store.begin_run(PIPELINE).map_err(err)?;
        store
            .finish_run(PIPELINE, run, "synced", "{}", None, false)
            .map_err(err)?;
    }
    ensure!(
        store.pipelines().map_err(err)? == [PIPELINE],
        "the pipelines are listed by name"
    );
    let numbers = |runs: Vec<crate::RunRecord>| runs.iter().map(|r| r.run).collect::<Vec<_>>();
    let first = numbers(store.run_page(PIPELINE, None, 2).map_err(err)?);
    ensure!(first == [5, 4], "the newest runs first: {first:?}");
    let next = numbers(store.run_page(PIPELINE, Some(4), 2).map_err(err)?);
    ensure!(
        next == [3, 2],
        "the next page starts below the last: {next:?}"
    );
    ensure!(
        store
            .run_page(PIPELINE, Some(1), 2)
            .map_err(err)?
            .is_empty()
            && store.run_page("other->x", None, 2).map_err(err)?.is_empty(),
        "no run below the first, none of another pipeline"
    );
    Ok(())
}

fn sink_store_is_scoped(store: &mut dyn StateStore) -> Result<(), String> {
    store.sink_store("sinks.a").put("job", "1").map_err(err)?;
    store.sink_store("sinks.a").put("job", "2").map_err(err)?;
    ensure!(
        store
            .sink_store("sinks.a")
            .get("job")
            .map_err(err)?
            .as_deref()
            == Some("2"),
        "a put replaces the value"
    );
    ensure!(
        store
            .sink_store("sinks.b")
            .get("job")
            .map_err(err)?
            .is_none(),
        "each sink section has its own space"
    );
    Ok(())
}

fn audit_and_history(store: &mut dyn StateStore) -> Result<(), String> {
    let entry = |at: i64, kind: &str| AuditEntry {
        pipeline: PIPELINE.to_string(),
        run: 1,
        at,
        key: "external_id:E1".into(),
        email: Some("e1@example.com".into()),
        kind: kind.into(),
        outcome: "applied".into(),
        reason: None,
        fields: r#"{"first_name":[null,"Ann"]}"#.into(),
        created: None,
    };
    store
        .record_audit(&[entry(100, "create"), entry(200, "update")])
        .map_err(err)?;
    for who in ["external_id:E1", "E1", "e1@example.com"] {
        let history = store.history(who).map_err(err)?;
        ensure!(
            history.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>() == ["create", "update"],
            "history of {who:?} is every change, oldest first: {history:?}"
        );
    }
    ensure!(
        store.prune_audit(PIPELINE, 150).map_err(err)? == 1,
        "pruning forgets the older entry"
    );
    ensure!(
        store.history("E1").map_err(err)?.len() == 1,
        "the newer entry stays"
    );
    Ok(())
}

/// What `sync --all --worker` relies on: a pipeline is claimed once a slot.
fn slots_run_each_pipeline_once(store: &mut dyn StateStore) -> Result<(), String> {
    let worker = format!("{}@{}", std::process::id(), "conformance");
    ensure!(
        store
            .claim_slot("2026-12-01", PIPELINE, &worker)
            .map_err(err)?,
        "an unclaimed pipeline is claimed"
    );
    store
        .finish_slot("2026-12-01", PIPELINE, "synced")
        .map_err(err)?;
    ensure!(
        !store
            .claim_slot("2026-12-01", PIPELINE, &worker)
            .map_err(err)?,
        "a pipeline that ran in the slot is not claimed again"
    );
    ensure!(
        store
            .claim_slot("2026-12-02", PIPELINE, &worker)
            .map_err(err)?,
        "the next slot claims it again"
    );
    Ok(())
}

/// What `state copy` relies on: everything exported and imported reads back the same.
fn source_memo_kept_in_order_and_reset(store: &mut dyn StateStore) -> Result<(), String> {
    let memo = |key_hash: u64, source_hash: u64| SourceMemo {
        key_hash,
        source_hash,
        // Hashes use all 64 bits: the top one too.
        tag: u64::MAX - key_hash,
    };
    let scan = |store: &mut dyn StateStore, pipeline: &str| -> Result<Vec<SourceMemo>, String> {
        let mut seen = Vec::new();
        store
            .scan_source_memo(pipeline, &mut |m| seen.push(m))
            .map_err(err)?;
        Ok(seen)
    };
    store.begin_run(PIPELINE).map_err(err)?;
    store.begin_run("other").map_err(err)?;
    // More than a stored row holds, so that the order across rows is checked too.
    let first: Vec<SourceMemo> = (0..5000).map(|k| memo(k, k + 1)).collect();
    store
        .record_source_memo(PIPELINE, &first, false)
        .map_err(err)?;
    // Written one at a time, as many nights would: more stored rows than a backend
    // may read at once.
    let mut later = vec![memo(2, 21), memo(1 << 63, 30)];
    later.extend((0..100).map(|n| memo(n, 1000 + n)));
    for entry in &later {
        store
            .record_source_memo(PIPELINE, std::slice::from_ref(entry), false)
            .map_err(err)?;
    }
    store
        .record_source_memo("other", &[memo(1, 99)], false)
        .map_err(err)?;
    let kept = scan(store, PIPELINE)?;
    ensure!(
        kept.len() == 5102 && kept[..5000] == first[..] && kept[5000..] == later[..],
        "the entries come back in the order they were recorded, got {} entries",
        kept.len()
    );
    store
        .record_source_memo(PIPELINE, &[memo(7, 70)], true)
        .map_err(err)?;
    let kept = scan(store, PIPELINE)?;
    ensure!(
        kept == [memo(7, 70)],
        "a replacing write leaves only its entries, got {kept:?}"
    );
    store.reset(PIPELINE).map_err(err)?;
    ensure!(
        scan(store, PIPELINE)?.is_empty(),
        "reset forgets the pipeline's memo"
    );
    ensure!(
        scan(store, "other")? == [memo(1, 99)],
        "each pipeline keeps its own memo, and reset keeps another's"
    );
    Ok(())
}

fn export_then_import(from: &mut dyn StateStore, to: &mut dyn StateStore) -> Result<(), String> {
    let (run, _) = from.begin_run(PIPELINE).map_err(err)?;
    let (ann, ann_record) = person("E1");
    from.record_pending(
        PIPELINE,
        run,
        "b1",
        &[PendingRow {
            key: ann.clone(),
            kind: ChangeKind::Create,
            content_hash: 11,
            email: ann_record.email.clone(),
            record: Some(ann_record.clone()),
        }],
    )
    .map_err(err)?;
    from.settle(
        PIPELINE,
        "b1",
        &[Settlement::Synced {
            key: ann.clone(),
            entry: SyncedEntry {
                content_hash: 11,
                email: ann_record.email.clone(),
                handle: Some("h-1".into()),
                record: Some(Box::new(ann_record.clone())),
            },
        }],
    )
    .map_err(err)?;
    from.finish_run(PIPELINE, run, "synced", "{}", Some("c-1"), true)
        .map_err(err)?;
    from.record_audit(&[AuditEntry {
        pipeline: PIPELINE.to_string(),
        run,
        at: 100,
        key: ann.to_string(),
        email: ann_record.email.clone(),
        kind: "create".into(),
        outcome: "applied".into(),
        reason: None,
        fields: "[]".into(),
        created: None,
    }])
    .map_err(err)?;
    from.sink_store("sinks.platform")
        .put("quota", "3")
        .map_err(err)?;
    from.record_rejects(PIPELINE, run, 100, &[reject(0), reject(1)])
        .map_err(err)?;
    let mut items = Vec::new();
    from.export(&mut |item| {
        items.push(item);
        Ok(())
    })
    .map_err(err)?;
    to.import(&items).map_err(err)?;
    ensure!(
        from.summaries().map_err(err)? == to.summaries().map_err(err)?,
        "the summaries match"
    );
    ensure!(
        to.synced(PIPELINE, ann.hash64()).map_err(err)?
            == from.synced(PIPELINE, ann.hash64()).map_err(err)?,
        "a synced person, record and handle included, is copied"
    );
    ensure!(
        to.cursor(PIPELINE).map_err(err)?.as_deref() == Some("c-1"),
        "the cursor is copied"
    );
    ensure!(
        to.begin_run(PIPELINE).map_err(err)? == (run + 1, Some(run)),
        "the run counter and last complete read continue"
    );
    ensure!(
        to.history("E1").map_err(err)?.len() == 1,
        "the audit is copied"
    );
    ensure!(
        to.sink_store("sinks.platform")
            .get("quota")
            .map_err(err)?
            .as_deref()
            == Some("3"),
        "the sink's values are copied"
    );
    ensure!(
        to.rejects(PIPELINE, run, 0, 10).map_err(err)? == [reject(0), reject(1)],
        "a run's rejects are copied, in order"
    );
    Ok(())
}

/// Plays three runs of a sink durable at its finish into `state`: E1..E4 created; E2
/// updated and E3 removed in the same second; E3 created again and E4 updated. With
/// `kept`, the creates are kept as one entry a run where the backend can
/// ([`AuditLog::record_created_run`]); else an entry a person.
///
/// [`AuditLog::record_created_run`]: crate::AuditLog::record_created_run
pub(crate) fn play_three_runs(
    state: &mut dyn StateStore,
    kept: bool,
    values: bool,
) -> Result<(), String> {
    let people = created_people(5);
    let entry = |run: i64, at: i64, row: &PendingRow| {
        let created = (values && row.kind == ChangeKind::Create)
            .then(|| row.record.clone().map(Box::new))
            .flatten();
        let fields = match (&created, &row.record) {
            (Some(_), _) => String::new(),
            (None, Some(r)) if !values && row.kind == ChangeKind::Create => {
                let names: Vec<String> = Contact::field_changes(None, r)
                    .into_iter()
                    .map(|c| c.field.to_string())
                    .collect();
                serde_json::Value::from(names).to_string()
            }
            _ => "{}".to_string(),
        };
        AuditEntry {
            pipeline: PIPELINE.into(),
            run,
            at,
            key: row.key.to_string(),
            email: row.email.clone(),
            kind: row.kind.as_str().into(),
            outcome: "sent".into(),
            reason: None,
            fields,
            created,
        }
    };
    let apply = |state: &mut dyn StateStore, at: i64, rows: Vec<PendingRow>| {
        let (run, _) = state.begin_run(PIPELINE).map_err(err)?;
        let has_creates = rows.iter().any(|r| r.kind == ChangeKind::Create);
        let kept = kept
            && has_creates
            && state
                .record_created_run(PIPELINE, run, at, values)
                .map_err(err)?;
        let id = format!("run-{run}-batch-1");
        state
            .record_awaiting_finish(PIPELINE, run, &id, rows.clone(), vec![None; rows.len()])
            .map_err(err)?;
        let entries: Vec<AuditEntry> = rows
            .iter()
            .filter(|r| !(kept && r.kind == ChangeKind::Create))
            .map(|r| entry(run, at, r))
            .collect();
        state.record_audit(&entries).map_err(err)?;
        state.confirm_finished(PIPELINE, run).map_err(err)?;
        state
            .finish_run(PIPELINE, run, "synced", "{}", None, false)
            .map_err(err)
    };
    apply(state, 100, people[1..5].to_vec())?;
    let renamed = |row: &PendingRow, name: &str| {
        let mut row = row.clone();
        row.kind = ChangeKind::Update;
        row.content_hash += 100;
        if let Some(r) = row.record.as_mut() {
            r.first_name = Some(name.into());
        }
        row
    };
    let gone = PendingRow {
        kind: ChangeKind::Remove,
        content_hash: 0,
        record: None,
        ..people[3].clone()
    };
    apply(state, 100, vec![renamed(&people[2], "Bea"), gone])?;
    apply(
        state,
        200,
        vec![people[3].clone(), renamed(&people[4], "Zoe")],
    )?;
    // An update of E1 the sink refuses for now, two nights running: its create is
    // written out each night and still told, and the history tells it once.
    for at in [300, 400] {
        let (run, _) = state.begin_run(PIPELINE).map_err(err)?;
        let mut refused = entry(run, at, &renamed(&people[1], "Ada"));
        refused.outcome = "rejected".into();
        state.record_audit(&[refused]).map_err(err)?;
        state
            .finish_run(PIPELINE, run, "finished_with_rejects", "{}", None, false)
            .map_err(err)?;
    }
    Ok(())
}

/// A run that keeps its creates as one entry tells every person's history as an entry
/// a person told it: created and left alone, updated or removed in the second of their
/// create, created again; with values kept and without; and so does a copy of the
/// state.
fn creates_kept_as_one_entry_a_run(new_store: &mut NewStore<'_>) -> Result<(), String> {
    for values in [true, false] {
        let mut kept = new_store()?;
        let mut each = new_store()?;
        play_three_runs(kept.as_mut(), true, values)?;
        play_three_runs(each.as_mut(), false, values)?;
        let mut items = Vec::new();
        kept.export(&mut |item| {
            items.push(item);
            Ok(())
        })
        .map_err(err)?;
        let mut copy = new_store()?;
        copy.import(&items).map_err(err)?;
        for who in ["e1@example.com", "E2", "external_id:E3", "e4@example.com"] {
            let told = crate::history(each.as_mut(), who).map_err(err)?;
            ensure!(!told.is_empty(), "{who}: no history");
            let kept_told = crate::history(kept.as_mut(), who).map_err(err)?;
            ensure!(
                kept_told == told,
                "{who} (values {values}): {kept_told:?}, not {told:?}"
            );
            let copied = crate::history(copy.as_mut(), who).map_err(err)?;
            ensure!(
                copied == told,
                "{who} copied (values {values}): {copied:?}, not {told:?}"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn sqlite_keeps_the_contract() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut n = 0;
        let result = super::check(&mut || {
            n += 1;
            super::super::SqliteState::open(&dir.path().join(format!("state-{n}.db")))
                .map(|s| Box::new(s) as Box<dyn super::StateStore>)
                .map_err(|e| e.to_string())
        });
        assert_eq!(result, Ok(()));
    }
}
