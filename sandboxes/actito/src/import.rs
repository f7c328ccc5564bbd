//! The single FIFO worker that processes bulk imports one after another, as Actito
//! does. Posting and following an import over HTTP is `routes::imports`.

use std::sync::Arc;

use super::model::{ImportMode, ImportStatus, ProfileInput};
use super::Shared;
use contactsync_sandbox_kit::Platform as _;

/// Now, as the sandbox stamps profiles and imports (`YYYY-MM-DD HH:MM:SS`, UTC).
pub fn now() -> String {
    chrono::Utc::now().format("%Y-%m-%d %H:%M:%S").to_string()
}

/// The one worker: imports run one after another, in the order posted.
pub async fn worker(shared: Arc<Shared>, mut queue: tokio::sync::mpsc::UnboundedReceiver<u64>) {
    loop {
        let id = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            id = queue.recv() => match id { Some(id) => id, None => return },
        };
        if let Some(i) = shared.lock().store.imports.get_mut(&id) {
            i.status = ImportStatus::Running;
        }
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            () = tokio::time::sleep(shared.config.import_delay) => {}
        }
        process(&shared, id);
        shared.save_logged();
    }
}

fn process(shared: &Shared, id: u64) {
    let stamp = now();
    let mut state = shared.lock();
    let store = &mut state.store;
    let Some(mut import) = store.imports.get(&id).cloned() else {
        return;
    };
    let Some(table) = store.tables.get_mut(&import.table) else {
        if let Some(i) = store.imports.get_mut(&id) {
            i.status = ImportStatus::Error;
        }
        return;
    };
    let mut next = store.next_profile_id;
    let (create, update) = match import.mode {
        ImportMode::CreateOnly => (true, false),
        ImportMode::UpdateOnly => (false, true),
        ImportMode::CreateUpdate => (true, true),
    };
    for row in &import.rows {
        if row.len() != import.header.len() {
            import.errors.push((
                row.clone(),
                format!("{} values for {} columns", row.len(), import.header.len()),
            ));
            continue;
        }
        if let Some(k) = &import.key_column {
            let idx = import.header.iter().position(|h| h == k);
            if idx
                .and_then(|i| row.get(i))
                .is_none_or(|v| v.trim().is_empty())
            {
                import
                    .errors
                    .push((row.clone(), format!("no value for the key column {k}")));
                continue;
            }
        }
        let mut input = ProfileInput::default();
        let mut bad = None;
        for (h, v) in import.header.iter().zip(row) {
            if !table.def.subscriptions.contains(h) {
                input
                    .attributes
                    .push((h.clone(), (!v.is_empty()).then(|| v.clone())));
                continue;
            }
            // `Y` subscribes, `N` unsubscribes. What a blank cell does is not
            // documented: the sandbox refuses the row, so that a client sending one
            // is caught.
            match v.trim() {
                "Y" | "y" => input.subscriptions.push((h.clone(), true)),
                "N" | "n" => input.subscriptions.push((h.clone(), false)),
                other => {
                    bad = Some(format!(
                        "the subscription column {h} holds {other:?}: Y or N"
                    ));
                    break;
                }
            }
        }
        if let Some(reason) = bad {
            import.errors.push((row.clone(), reason));
            continue;
        }
        match table.write(&input, create, update, &mut next, &stamp) {
            Ok((_, true)) => import.created += 1,
            Ok((_, false)) => import.updated += 1,
            Err(reason) => import.errors.push((row.clone(), reason)),
        }
    }
    store.next_profile_id = next;
    import.status = ImportStatus::Finished;
    store.imports.insert(id, import);
}
