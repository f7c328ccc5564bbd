//! Following a posted import to its end, and finding out which rows it did not count.

use super::*;

/// Poppulo's subscriber imports, as the core [`JobFollower`] follows them.
pub(super) struct Imports<'a> {
    pub(super) sink: &'a PoppuloSink,
}

#[async_trait]
impl contactsync_core::ImportJob for Imports<'_> {
    type Payload = String;
    type Entry = PostedImport;
    type Completed = ImportState;
    type Result = Completed;

    fn label(&self, href: &str) -> String {
        format!("Poppulo import {}", import_id(href))
    }

    async fn post(
        &self,
        xml: String,
        progress: &dyn ProgressReporter,
        cancel: &CancellationToken,
    ) -> Result<Posted, ConnectorError> {
        let config = &self.sink.config;
        self.sink
            .client
            .post_import(
                xml,
                config.busy_retry_interval,
                config.max_wait_for_busy_account,
                progress,
                cancel.clone(),
            )
            .await
    }

    async fn poll(
        &self,
        href: &str,
        cancel: &CancellationToken,
    ) -> Result<JobPoll<ImportState>, ConnectorError> {
        let state = self.sink.client.import(href, cancel.clone()).await?;
        Ok(match state.status {
            ImportStatus::InProgress => JobPoll::Running {
                done: state.records_processed,
                total: state.total_records,
                ask_again_in: state
                    .ping_after
                    .map(|at| (at - Utc::now()).to_std().unwrap_or(Duration::ZERO)),
            },
            ImportStatus::Completed => JobPoll::Completed(state),
            ImportStatus::Error | ImportStatus::Cancelled => {
                let why = state
                    .message
                    .as_deref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default();
                JobPoll::Failed(format!("{}{why}", state.status_text))
            }
        })
    }

    /// Per row (by email), what Poppulo counted it as, and the import's counts.
    async fn result(
        &self,
        import: &PostedImport,
        state: ImportState,
        cancel: &CancellationToken,
    ) -> Result<Completed, ConnectorError> {
        let href = &import.href;
        let label = self.label(href);
        let emails: Vec<String> = import.rows.iter().map(|r| r.email.clone()).collect();
        let results = state.results.clone().unwrap_or_default();
        let total = results.total_records.unwrap_or(emails.len() as u64);
        let rejected = if results.has_rejections() {
            let link = results
                .invalid_link
                .clone()
                .unwrap_or_else(|| format!("{}/invalid_subscribers", href.trim_end_matches('/')));
            let text = self
                .sink
                .client
                .rejected_rows(&link, cancel.clone())
                .await?;
            parse_rejected(&text, &import.columns).map_err(|m| ConnectorError::Protocol {
                call: format!("GET {}", url_path(&link)),
                message: m,
            })?
        } else {
            Vec::new()
        };
        let (mut verdicts, unmatched) = verdicts(&emails, &rejected);
        let listed = results.invalid + results.duplicates + results.previously_opted_out;
        if listed as usize != rejected.len() {
            tracing::warn!(
                import = %href,
                "{label}: results count {listed} rejected rows, the list holds {}",
                rejected.len()
            );
        }
        // A rejection that cannot be matched to a row (an address Poppulo rewrote, a
        // list shorter than the count) leaves every row that looks applied uncertain:
        // none is recorded as applied.
        if unmatched > 0 || listed as usize > rejected.len() {
            tracing::warn!(import = %href, unmatched, "{label}: rejected rows that match no row sent; its applied rows are sent again");
            for verdict in verdicts.iter_mut().filter(|v| **v == RowResult::Applied) {
                *verdict = RowResult::Unknown(
                    "Poppulo rejected a row of this import that cannot be told apart; sent again next run".into(),
                );
            }
        }
        tracing::info!(
            import = %href,
            new = results.new_subscribers,
            updated = results.updated_subscribers,
            invalid = results.invalid,
            duplicates = results.duplicates,
            opted_out = results.previously_opted_out,
            "{label} completed"
        );
        let counted = results.new_subscribers + results.updated_subscribers + listed;
        Ok(Completed {
            verdicts,
            uncounted: total.saturating_sub(counted),
            created: state.created,
        })
    }
}

impl PoppuloSink {
    /// How Poppulo's imports are polled: no earlier than `min_poll_interval`, at
    /// `ping_after` when it says, for at most `max_import_wait`.
    pub(super) fn timing(&self) -> JobTiming {
        JobTiming {
            first_poll: self.config.min_poll_interval,
            poll_interval: self.config.poll_interval,
            min_poll_interval: self.config.min_poll_interval,
            max_wait: self.config.max_import_wait,
        }
    }

    /// Rows Poppulo did not count (a `total` above the sum of new, updated, invalid,
    /// duplicate and opted-out rows) were skipped: find out which, from the account's subscribers, so
    /// that none is recorded as applied. Only rows that can be skipped are looked at:
    /// ACTIVE rows (a person removed on the platform is not reactivated) and, with
    /// `update_existing = false`, creates of people who exist already.
    ///
    /// The first page of the account's subscribers is read; it tells the account's
    /// size. When fewer rows are left to look at than pages are left to read, each is
    /// looked up on its own (`GET …/subscriber/{email}`): one bounced person in an
    /// account of a million is a few reads, not a thousand pages (an hour of the
    /// fair-use allowance). Returns the reads made.
    pub(super) async fn reconcile(
        &self,
        rows: &[SentRow],
        results: &mut [RowResult],
        followed: &Completed,
        posted_at: chrono::DateTime<Utc>,
        cancel: &contactsync_core::CancellationToken,
    ) -> Result<u64, ConnectorError> {
        if followed.uncounted == 0 {
            return Ok(0);
        }
        let candidates: Vec<usize> = (0..rows.len())
            .filter(|&i| results[i] == RowResult::Applied)
            .filter(|&i| {
                rows[i].status.as_deref() == Some("ACTIVE")
                    || (!self.config.flags.update_existing && rows[i].create)
            })
            .collect();
        tracing::warn!(
            uncounted = followed.uncounted,
            candidates = candidates.len(),
            "Poppulo counted fewer rows than the import held; reading the account to find the skipped ones"
        );
        if candidates.is_empty() {
            return Ok(0);
        }
        type Seen = HashMap<String, (String, Option<chrono::DateTime<Utc>>)>;
        let remember = |platform: &mut Seen, s: &crate::xml::Element| {
            if let Some(email) = s.value("email") {
                let status = s.value("status").unwrap_or("ACTIVE").to_ascii_uppercase();
                let modified = s.value("date_modified").and_then(crate::xml::parse_time);
                platform.insert(email.to_lowercase(), (status, modified));
            }
        };
        let mut platform: Seen = HashMap::new();
        let mut reads = 1u64;
        let (_, first) = self.client.subscribers_page("all", None).await?;
        for s in &first.subscribers {
            remember(&mut platform, s);
        }
        let got = first.subscribers.len() as u64;
        let pages_left = match (first.next.as_ref(), first.total_results) {
            (None, _) => 0,
            (Some(_), Some(total)) if got > 0 => total.saturating_sub(got).div_ceil(got),
            (Some(_), _) => u64::MAX,
        };
        let missing: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|&i| !platform.contains_key(&rows[i].email.to_lowercase()))
            .collect();
        if pages_left > 0 && (missing.len() as u64) < pages_left {
            tracing::info!(
                lookups = missing.len(),
                pages_left,
                "Poppulo: looking the uncounted rows up one by one (fewer reads than paging)"
            );
            for i in missing {
                if cancel.is_cancelled() {
                    return Err(ConnectorError::Cancelled);
                }
                reads += 1;
                if let Some(s) = self.client.subscriber(&rows[i].email).await? {
                    remember(&mut platform, &s);
                }
            }
        } else {
            let mut next = first.next.filter(|_| got > 0);
            while let Some(href) = next {
                if cancel.is_cancelled() {
                    return Err(ConnectorError::Cancelled);
                }
                reads += 1;
                let (_, page) = self.client.subscribers_page("all", Some(&href)).await?;
                for s in &page.subscribers {
                    remember(&mut platform, s);
                }
                next = page.next.filter(|_| !page.subscribers.is_empty());
            }
        }
        let before = followed.created.unwrap_or(posted_at);
        let mut found = 0u64;
        for i in candidates {
            let row = &rows[i];
            match platform.get(&row.email.to_lowercase()) {
                None => {
                    results[i] =
                        RowResult::Unknown("not found on Poppulo after the import".to_string());
                    found += 1;
                }
                Some((status, _))
                    if row.status.as_deref() == Some("ACTIVE") && status != "ACTIVE" =>
                {
                    results[i] = RowResult::Skipped(REASON_REMOVED_ON_PLATFORM);
                    found += 1;
                }
                Some((_, Some(modified)))
                    if !self.config.flags.update_existing && row.create && *modified < before =>
                {
                    results[i] = RowResult::Skipped(REASON_EXISTS);
                    found += 1;
                }
                _ => {}
            }
        }
        if found < followed.uncounted {
            tracing::warn!(
                "Poppulo skipped {} rows this sink cannot tell apart; they are recorded as applied",
                followed.uncounted - found
            );
        }
        Ok(reads)
    }
}
