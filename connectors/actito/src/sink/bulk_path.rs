//! The bulk path: one import a batch, its file built from the rows' own cells, followed to its end and its error rows mapped back.

use super::*;
use contactsync_core::{
    CancellationToken, Followed, JobFollower, JobLedger, JobPoll, JobTiming, Posted,
    ProgressReporter, Submitted,
};
use std::time::Duration;

impl ActitoSink {
    /// One bulk import of `upserts` (positions in the batch, prepared rows). Returns
    /// their outcomes, or `None` when the sink fell back to one-by-one.
    pub(super) async fn bulk(
        &mut self,
        schema: &Schema,
        batch: &ChangeBatch,
        upserts: &[(usize, Prepared)],
        skipped: Vec<usize>,
        follow_up: Vec<usize>,
        ctx: &mut SinkContext<'_>,
    ) -> Result<Option<Vec<Outcome>>, ConnectorError> {
        let unknown = |reason: &str| {
            Some(vec![
                Outcome::Unknown {
                    reason: reason.to_string()
                };
                upserts.len()
            ])
        };
        if !self.settle_running(ctx).await? {
            return Ok(unknown(
                "an earlier Actito import of this table is still running; sent again next run",
            ));
        }
        let used = self.bulk_used(ctx)?;
        if used >= BULK_IMPORTS_PER_DAY {
            self.quota_exhausted(
                &format!(
                    "the {BULK_IMPORTS_PER_DAY} bulk imports Actito allows per table per day are used"
                ),
                ctx,
            )?;
            return Ok(None);
        }
        // Columns: every attribute any row sets, key column first, then one column a
        // subscription the rows set (`Y` or `N`, Actito's import format). The caller
        // hands rows that all set the same ones: no row has a cell it does not set.
        let key_column = schema.key_attribute().to_string();
        let mut columns: Vec<String> = vec![key_column.clone()];
        let mut subscription_columns: Vec<String> = Vec::new();
        for (_, p) in upserts {
            for (name, _) in &p.attributes {
                if !columns.contains(name) {
                    columns.push(name.clone());
                }
            }
            for (name, _) in &p.subscriptions {
                if !subscription_columns.contains(name) {
                    subscription_columns.push(name.clone());
                }
            }
        }
        // Written straight into the zip, a row at a time: a batch of 100,000 is
        // never held as cells too.
        let header: Vec<String> = columns
            .iter()
            .chain(subscription_columns.iter())
            .cloned()
            .collect();
        let rows = upserts.iter().map(|(_, p)| {
            let values: HashMap<&str, &str> = p
                .attributes
                .iter()
                .filter_map(|(n, v)| v.as_deref().map(|v| (n.as_str(), v)))
                .collect();
            let subscribed: HashMap<&str, bool> = p
                .subscriptions
                .iter()
                .map(|(n, on)| (n.as_str(), *on))
                .collect();
            columns
                .iter()
                .map(|c| values.get(c.as_str()).copied().unwrap_or("").to_string())
                .chain(subscription_columns.iter().map(|c| {
                    match subscribed.get(c.as_str()) {
                        Some(true) => "Y",
                        _ => "N",
                    }
                    .to_string()
                }))
                .collect::<Vec<String>>()
        });
        let zip = BulkImporter::zip_csv(&header, rows)?;
        if zip.len() > MAX_ZIP_BYTES {
            return Err(ConnectorError::Limit(format!(
                "the import file of batch {} is {} bytes, over Actito's 100 MB: lower `max_batch`",
                batch.id,
                zip.len()
            )));
        }
        let today: u32 = ctx
            .store
            .get(&self.quota_key_today())?
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        self.count_post(today, ctx)?;
        self.imports += 1;
        let imports = BulkImports {
            sink: self,
            key_column,
        };
        let ledger = self.ledger();
        let entry = |id: String| RunningImport {
            id,
            batch: batch.id.clone(),
            skipped,
            keys: upserts.iter().map(|(_, p)| p.key_value.clone()).collect(),
            follow_up,
        };
        let submitted = JobFollower::new(&imports, &ledger, self.timing())
            .submit(zip, entry, ctx)
            .await?;
        match submitted {
            Submitted::Followed(followed) => Ok(Some(outcomes_of(followed, upserts.len()))),
            Submitted::Refused(message) => {
                // Waited out as a concurrent-request 429 and still refused: the day's
                // imports are used, by contactsync's count or by another client's.
                ctx.store
                    .put(&self.quota_key_today(), &BULK_IMPORTS_PER_DAY.to_string())?;
                self.quota_exhausted(
                    &format!(
                        "Actito kept refusing another bulk import today (429: {message}) although contactsync posted {today} of the {BULK_IMPORTS_PER_DAY}; another client may post imports to this table"
                    ),
                    ctx,
                )?;
                Ok(None)
            }
            Submitted::Unknown(why) => {
                // Counted (above), never posted again in this run: the rest goes one
                // profile at a time, and these rows are sent again next run.
                tracing::warn!(batch = %batch.id, "Actito may or may not have taken the import ({why}); not posting it again");
                ctx.progress.note(&format!(
                    "Actito may or may not have taken an import ({why}); its rows are sent again next run, the rest one by one"
                ));
                self.mode = Mode::OneByOne;
                Ok(unknown(&format!(
                    "the bulk import's answer was lost ({why}): whether Actito took it is unknown; sent again next run"
                )))
            }
        }
    }

    /// The ledger of the table's import in flight.
    pub(super) fn ledger(&self) -> JobLedger<RunningImport> {
        JobLedger::new(running_key(self.client.entity(), self.client.table()))
    }

    /// How Actito's imports are polled: at once, then every `poll_interval`, for at
    /// most `max_import_wait`.
    pub(super) fn timing(&self) -> JobTiming {
        JobTiming {
            first_poll: Duration::ZERO,
            poll_interval: self.config.poll_interval,
            min_poll_interval: self.config.poll_interval,
            max_wait: self.config.max_import_wait,
        }
    }
}

/// One outcome a row from how following an import ended.
pub(super) fn outcomes_of(followed: Followed<Vec<Outcome>>, rows: usize) -> Vec<Outcome> {
    match followed {
        Followed::Completed(outcomes) => outcomes,
        Followed::Pending(reason) | Followed::Ended(reason) => {
            vec![Outcome::Unknown { reason }; rows]
        }
    }
}

/// Actito's bulk imports of one table, as the core [`JobFollower`] follows them.
pub(super) struct BulkImports<'a> {
    pub(super) sink: &'a ActitoSink,
    /// The file's key column.
    pub(super) key_column: String,
}

#[async_trait]
impl contactsync_core::ImportJob for BulkImports<'_> {
    type Payload = Vec<u8>;
    type Entry = RunningImport;
    type Completed = ();
    type Result = Vec<Outcome>;

    fn label(&self, id: &str) -> String {
        format!("Actito import {id}")
    }

    async fn post(
        &self,
        zip: Vec<u8>,
        _progress: &dyn ProgressReporter,
        cancel: &CancellationToken,
    ) -> Result<Posted, ConnectorError> {
        BulkImporter::new(&self.sink.client)
            .post(zip, &self.key_column, cancel)
            .await
    }

    async fn poll(
        &self,
        id: &str,
        cancel: &CancellationToken,
    ) -> Result<JobPoll<()>, ConnectorError> {
        Ok(
            match BulkImporter::new(&self.sink.client)
                .state(id, cancel)
                .await?
            {
                ImportState::Running(_) => JobPoll::Running {
                    done: None,
                    total: None,
                    ask_again_in: None,
                },
                ImportState::Finished => JobPoll::Completed(()),
                ImportState::Failed(status, message) => {
                    JobPoll::Failed(format!("{status}: {message}"))
                }
            },
        )
    }

    /// Maps the import's error rows onto the entry's `keys` (the key column's value of
    /// each row of its file, in order): one outcome a row.
    async fn result(
        &self,
        import: &RunningImport,
        (): (),
        cancel: &CancellationToken,
    ) -> Result<Vec<Outcome>, ConnectorError> {
        let label = self.label(&import.id);
        let keys = &import.keys;
        let rejected: Vec<RejectedRow> = BulkImporter::new(&self.sink.client)
            .rejected_rows(&import.id, &self.key_column, cancel)
            .await?;
        // Keys compared as Actito compares them: an address it normalised (case,
        // spaces) is still the row's.
        let mut by_key: HashMap<String, usize> = HashMap::new();
        for (i, k) in keys.iter().enumerate() {
            by_key.insert(Schema::existing_key(k), i);
        }
        let mut outcomes: Vec<Outcome> = vec![Outcome::applied(); keys.len()];
        let mut unmatched = 0;
        for row in &rejected {
            let index = row
                .key
                .as_deref()
                .and_then(|k| by_key.get(&Schema::existing_key(k)).copied())
                .or_else(|| {
                    row.line
                        .and_then(|l| l.checked_sub(1))
                        .filter(|i| *i < keys.len())
                });
            match index {
                Some(i) => {
                    outcomes[i] = Outcome::Rejected {
                        reason: format!("Actito import: {}", row.reason),
                        field: self
                            .sink
                            .schema
                            .as_ref()
                            .and_then(|s| s.field_in_message(&row.reason)),
                        retry: false,
                    }
                }
                None => unmatched += 1,
            }
        }
        if unmatched > 0 {
            // Some row was rejected, and which is not known: no row that looks applied
            // is recorded as applied; they are all sent again.
            tracing::warn!("{label}: {unmatched} rejected rows could not be matched to a change; its applied rows are sent again");
            for outcome in outcomes
                .iter_mut()
                .filter(|o| matches!(o, Outcome::Applied { .. }))
            {
                *outcome = Outcome::Unknown {
                    reason: format!(
                        "{label} rejected a row that cannot be told apart; sent again next run"
                    ),
                };
            }
        }
        tracing::info!(
            rows = keys.len(),
            rejected = rejected.len(),
            "{label} finished"
        );
        Ok(outcomes)
    }
}
