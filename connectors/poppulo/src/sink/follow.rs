//! Following a posted import to its end, and finding out which rows it did not count.

use super::*;

impl PoppuloSink {
    /// Follows the import at `href` to its end: per row (by `emails`), what Poppulo
    /// counted it as, and the results; or why the rows' fate is not known.
    pub(super) async fn follow(
        &self,
        href: &str,
        columns: &[String],
        emails: &[String],
        ctx: &mut SinkContext<'_>,
    ) -> Result<Followed, ConnectorError> {
        let label = format!("Poppulo import {}", import_id(href));
        let started = Instant::now();
        let mut wait = self.config.min_poll_interval;
        loop {
            let cancelled = || {
                Followed::Pending(format!(
                    "cancelled while {label} was running; the next run resumes it"
                ))
            };
            if !sleep(&ctx.cancel, wait).await {
                return Ok(cancelled());
            }
            let state = match self.client.import(href, ctx.cancel.clone()).await {
                Ok(s) => s,
                Err(ConnectorError::Cancelled) => return Ok(cancelled()),
                Err(e) => return Err(e),
            };
            match state.status {
                ImportStatus::InProgress => {
                    if let (Some(done), Some(total)) =
                        (state.records_processed, state.total_records)
                    {
                        ctx.progress.job_progress(&JobProgress {
                            label: label.clone(),
                            done,
                            total,
                        });
                    }
                    wait = match state.ping_after {
                        Some(at) => {
                            (at - Utc::now()).to_std().unwrap_or(Duration::ZERO) + PING_MARGIN
                        }
                        None => self.config.poll_interval,
                    }
                    .max(self.config.min_poll_interval);
                    if started.elapsed() + wait > self.config.max_import_wait {
                        tracing::warn!(import = %href, "{label} still running after {}s; the next run resumes following it", started.elapsed().as_secs());
                        return Ok(Followed::Pending(format!(
                            "{label} still running; the next run resumes following it"
                        )));
                    }
                }
                ImportStatus::Completed => {
                    let results = state.results.clone().unwrap_or_default();
                    let total = results.total_records.unwrap_or(emails.len() as u64);
                    ctx.progress.job_progress(&JobProgress {
                        label: label.clone(),
                        done: total,
                        total,
                    });
                    let rejected = if results.has_rejections() {
                        let link = results.invalid_link.clone().unwrap_or_else(|| {
                            format!("{}/invalid_subscribers", href.trim_end_matches('/'))
                        });
                        let text = self.client.rejected_rows(&link, ctx.cancel.clone()).await?;
                        parse_rejected(&text, columns).map_err(|m| ConnectorError::Protocol {
                            call: format!("GET {}", url_path(&link)),
                            message: m,
                        })?
                    } else {
                        Vec::new()
                    };
                    let (mut verdicts, unmatched) = verdicts(emails, &rejected);
                    let listed =
                        results.invalid + results.duplicates + results.previously_opted_out;
                    if listed as usize != rejected.len() {
                        tracing::warn!(
                            import = %href,
                            "{label}: results count {listed} rejected rows, the list holds {}",
                            rejected.len()
                        );
                    }
                    // A rejection that cannot be matched to a row (an address Poppulo
                    // rewrote, a list shorter than the count) leaves every row that
                    // looks applied uncertain: none is recorded as applied.
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
                    return Ok(Followed::Completed(Completed {
                        verdicts,
                        uncounted: total.saturating_sub(counted),
                        created: state.created,
                    }));
                }
                ImportStatus::Error | ImportStatus::Cancelled => {
                    let why = state
                        .message
                        .as_deref()
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default();
                    tracing::error!(
                        import = %href,
                        status = %state.status_text,
                        "{label} ended {}{why}; its rows will be sent again by the next run",
                        state.status_text
                    );
                    ctx.progress.note(&format!(
                        "{label} ended {}{why}; its rows will be sent again",
                        state.status_text
                    ));
                    return Ok(Followed::Ended(format!(
                        "{label} ended {}{why}",
                        state.status_text
                    )));
                }
            }
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
                    || (!self.config.update_existing && rows[i].create)
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
                    if !self.config.update_existing && row.create && *modified < before =>
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
