//! How a sink's staged rows become synced when its finish succeeds: a first sync's
//! plain insert, the email index built again after a large one, and the staging table
//! emptied (PostgreSQL's side of
//! [`PendingJournal::confirm_finished`](crate::roles::PendingJournal::confirm_finished)).

use super::{describe, synced_email_index};
use crate::REBUILD_EMAIL_INDEX_ROWS;
use postgres::GenericClient;

// The savepoints below are named in SQL rather than taken from a `Transaction`, so that
// the steps run the same in a transaction of their own and in a confirm held open on
// the client (`hold_confirm`), where `transaction()` would begin and commit one apart.

/// Undoes what was done since the savepoint `name` (its locks and `SET LOCAL`s with it),
/// and ends it.
fn roll_back_to(tx: &mut impl GenericClient, name: &str) -> Result<(), postgres::Error> {
    tx.batch_execute(&format!(
        "ROLLBACK TO SAVEPOINT {name}; RELEASE SAVEPOINT {name}"
    ))
}

/// Moves a run's applied changes, pending and staged, into `synced` (removals out of
/// it), and out of `pending` and `staged`, and marks the run `confirmed`; returns how
/// many. Run in one transaction, `tx`'s or one held open on the client.
pub(super) fn confirm_run(
    tx: &mut impl GenericClient,
    pipeline: &str,
    run: i64,
) -> Result<u64, postgres::Error> {
    let removed = tx.execute(
        "DELETE FROM synced WHERE pipeline = $1 AND key_hash IN
           (SELECT key_hash FROM pending WHERE pipeline = $1 AND run = $2 AND applied AND kind = 'remove')",
        &[&pipeline, &run],
    )?;
    let upserted = tx.execute(
        "INSERT INTO synced (pipeline, key_hash, key, content_hash, email, handle, record)
           SELECT pipeline, key_hash, key, content_hash, email, handle, record FROM pending
           WHERE pipeline = $1 AND run = $2 AND applied AND kind <> 'remove'
         ON CONFLICT (pipeline, key_hash) DO UPDATE SET content_hash = excluded.content_hash,
           email = excluded.email, handle = COALESCE(excluded.handle, synced.handle),
           record = COALESCE(excluded.record, synced.record),
           created_run = CASE WHEN excluded.record IS NULL THEN synced.created_run END",
        &[&pipeline, &run],
    )?;
    tx.execute(
        "DELETE FROM pending WHERE pipeline = $1 AND run = $2 AND applied",
        &[&pipeline, &run],
    )?;
    let staged_removed = tx.execute(
        "DELETE FROM synced WHERE pipeline = $1 AND key_hash IN
           (SELECT key_hash FROM staged WHERE pipeline = $1 AND run = $2 AND kind = 'remove')",
        &[&pipeline, &run],
    )?;
    let staged_upserted = insert_staged(tx, pipeline, run)?;
    clear_staged(tx, pipeline, run)?;
    let confirmed = removed + upserted + staged_removed + staged_upserted;
    if confirmed > 0 {
        // Until the run's end says how it ended: `history` then tells its changes
        // applied even if the process dies first.
        tx.execute(
            "UPDATE runs SET status = 'confirmed' WHERE pipeline = $1 AND run = $2 AND status IS NULL",
            &[&pipeline, &run],
        )?;
    }
    Ok(confirmed)
}

/// Moves a run's staged rows (removals aside) into `synced`, in key order.
///
/// Into a pipeline with no synced row yet (a first sync), as plain inserts: an `ON
/// CONFLICT` clause makes each row a speculative insertion, which took the insert of a
/// 1M first sync from 4.9 s to 6.8 s. (The staged rows hold a key once: the diff reads
/// each key once.)
///
/// When those rows are also many and outnumber every pipeline's synced rows (the first
/// pipeline of a new database, a large one joining small ones), `synced_email` is
/// dropped and built again after them, in the same transaction: its hashes are random,
/// and inserting them row by row took 2.5 s of that insert, building the index 1.4 s.
/// The drop locks `synced` until the commit, so that other workers wait for it, for
/// some seconds at most, as the table is small; it waits a second at most for their
/// reads, or keeps the index.
pub(super) fn insert_staged(
    tx: &mut impl GenericClient,
    pipeline: &str,
    run: i64,
) -> Result<u64, postgres::Error> {
    const COLUMNS: &str = "INSERT INTO synced (pipeline, key_hash, key, content_hash, email, handle, record, created_run)
           SELECT pipeline, key_hash, key, content_hash, email, handle, record, created_run FROM staged
           WHERE pipeline = $1 AND run = $2 AND kind <> 'remove'
           ORDER BY key_hash";
    let first: bool = tx
        .query_one(
            "SELECT NOT EXISTS (SELECT 1 FROM synced WHERE pipeline = $1)",
            &[&pipeline],
        )?
        .get(0);
    if first {
        let rebuild = outnumber_synced(tx, pipeline, run)? && drop_email_index(tx)?;
        let inserted = tx.execute(COLUMNS, &[&pipeline, &run])?;
        if rebuild {
            tx.batch_execute(synced_email_index!())?;
        }
        return Ok(inserted);
    }
    tx.execute(
        &format!(
            "{COLUMNS}
             ON CONFLICT (pipeline, key_hash) DO UPDATE SET content_hash = excluded.content_hash,
               email = excluded.email, handle = COALESCE(excluded.handle, synced.handle),
               record = COALESCE(excluded.record, synced.record),
               created_run = CASE WHEN excluded.record IS NULL THEN synced.created_run
                 ELSE excluded.created_run END"
        ),
        &[&pipeline, &run],
    )
}

/// Whether a run's staged rows are at least [`REBUILD_EMAIL_INDEX_ROWS`] and more than
/// `synced` holds in all. Counted no further than that tells: a first sync into an
/// empty database counts 10,000 staged rows, not its million (0.4 s).
fn outnumber_synced(
    tx: &mut impl GenericClient,
    pipeline: &str,
    run: i64,
) -> Result<bool, postgres::Error> {
    let held: i64 = tx
        .query_one(
            "SELECT COUNT(*) FROM (SELECT 1 FROM synced LIMIT $1) s",
            &[&SYNCED_COUNTED],
        )?
        .get(0);
    if held >= SYNCED_COUNTED {
        return Ok(false);
    }
    let enough = (held + 1).max(REBUILD_EMAIL_INDEX_ROWS);
    let staged: i64 = tx
        .query_one(
            "SELECT COUNT(*) FROM (SELECT 1 FROM staged WHERE pipeline = $1 AND run = $2 LIMIT $3) s",
            &[&pipeline, &run, &enough],
        )?
        .get(0);
    Ok(staged >= enough)
}

/// Drops `synced_email`, and says whether it did: the drop waits a second at most for
/// other workers' reads of `synced`, or the index is kept.
fn drop_email_index(tx: &mut impl GenericClient) -> Result<bool, postgres::Error> {
    tx.batch_execute("SAVEPOINT drop_email_index")?;
    let dropped = tx.batch_execute(
        "SET LOCAL lock_timeout = '1s'; DROP INDEX synced_email; SET LOCAL lock_timeout = 0",
    );
    match dropped {
        Ok(()) => tx
            .batch_execute("RELEASE SAVEPOINT drop_email_index")
            .map(|()| true),
        Err(e) => {
            tracing::debug!("synced_email kept for a first sync: {}", describe(&e));
            roll_back_to(tx, "drop_email_index").map(|()| false)
        }
    }
}

/// Empties a confirmed run's staged rows out of `staged`: when they are all it holds (a
/// run alone, as usual), by truncating it in the confirm's transaction, which also gives
/// its space back (deleting a 1M first sync's rows took 0.4-0.6 s and left their space
/// to a vacuum); otherwise, or when another runner is copying into it just now (waited
/// for 200 ms at most), by deleting them.
pub(super) fn clear_staged(
    tx: &mut impl GenericClient,
    pipeline: &str,
    run: i64,
) -> Result<(), postgres::Error> {
    tx.batch_execute("SAVEPOINT truncate_staged")?;
    let alone = (|| -> Result<bool, postgres::Error> {
        tx.batch_execute(
            "SET LOCAL lock_timeout = '200ms'; LOCK TABLE staged IN ACCESS EXCLUSIVE MODE;
             SET LOCAL lock_timeout = 0",
        )?;
        // Both ends of `staged_run` are this run: no row of another run or pipeline.
        // (Read as the first row each way, which the index gives at once; a filter for
        // the other rows was planned as a scan of the whole table.)
        let mut others = false;
        for order in ["ASC", "DESC"] {
            let end = tx.query_opt(
                &format!("SELECT pipeline, run FROM staged ORDER BY pipeline {order}, run {order} LIMIT 1"),
                &[],
            )?;
            others |= end.is_some_and(|row| {
                row.get::<_, &str>(0) != pipeline || row.get::<_, i64>(1) != run
            });
        }
        if !others {
            tx.batch_execute("TRUNCATE staged")?;
        }
        Ok(!others)
    })();
    match alone {
        Ok(true) => return tx.batch_execute("RELEASE SAVEPOINT truncate_staged"),
        Ok(false) => {}
        Err(e) => tracing::debug!("staged rows deleted, not truncated: {}", describe(&e)),
    }
    // Rolled back, the savepoint lets the table's lock go.
    roll_back_to(tx, "truncate_staged")?;
    tx.execute(
        "DELETE FROM staged WHERE pipeline = $1 AND run = $2",
        &[&pipeline, &run],
    )
    .map(drop)
}

/// How far [`outnumber_synced`] counts `synced`; a `synced` that large keeps its index
/// (counting further would scan a large table at every large first sync).
const SYNCED_COUNTED: i64 = 1_000_000;
