//! How a batch becomes imports: rows grouped by the cells their own change sets.

use super::*;

impl PoppuloSink {
    /// The imports for `batch` and what becomes of each change.
    pub fn build_import(&self, batch: &ChangeBatch) -> Result<PreparedImport, ConnectorError> {
        let mut known = vec![Outcome::applied(); batch.changes.len()];
        let mut groups: std::collections::BTreeMap<Group, Vec<Planned>> = Default::default();
        let removal_status = self.config.removal.status();
        let mapped = &self.config.columns.0;
        // A row giving an address the removal status (a removal, or a changed email's
        // old address): its email and status only, so that it clears nothing.
        let removal_row = |change: usize, email: String, old_address: bool| Planned {
            row: SentRow {
                change,
                email,
                old_address,
                status: Some(removal_status.to_string()),
                create: false,
                removal: true,
            },
            cells: mapped
                .iter()
                .map(|(f, _)| (*f == Field::Email).then(String::new))
                .collect(),
            permissions: Vec::new(),
            follow_up: false,
        };
        for (index, change) in batch.changes.iter().enumerate() {
            let Some(email) = change.email().and_then(Contact::normalize_email) else {
                known[index] = no_email(change);
                continue;
            };
            let Some(contact) = change.contact() else {
                groups
                    .entry(Group::Removal)
                    .or_default()
                    .push(removal_row(index, email, false));
                continue;
            };
            if change.kind() == ChangeKind::Update && !self.config.flags.update_existing {
                known[index] = Outcome::Rejected {
                    reason: REASON_NO_UPDATES.to_string(),
                    field: None,
                    retry: false,
                };
                continue;
            }
            let create = change.kind() == ChangeKind::Create;
            let cells: Vec<Option<String>> = mapped
                .iter()
                .map(|(f, _)| match f {
                    Field::Email => Some(email.clone()),
                    Field::Subscriptions => None,
                    f => change.owned_value(f).map(|v| one_line(&v)),
                })
                .collect();
            let (permissions, withdrawn) = self.consent(change, contact, create);
            let status = change
                .sends_status(self.resubscribe)
                .then(|| status_cell(contact.status).to_string());
            // A changed address: the old one gets the removal status, so that it is
            // not left ACTIVE for good (unless it is someone else's now: the engine
            // then hands the change without it).
            if let Some(old) = change.previous_email().and_then(Contact::normalize_email) {
                if !old.eq_ignore_ascii_case(&email) {
                    groups
                        .entry(Group::Removal)
                        .or_default()
                        .push(removal_row(index, old, true));
                }
            }
            let shape = |permissions: bool| Cells {
                mapped: cells.iter().map(Option::is_some).collect(),
                permissions,
                withdrawn: withdrawn.clone(),
            };
            let row = SentRow {
                change: index,
                email,
                old_address: false,
                status: status.clone(),
                create,
                removal: false,
            };
            let grants = !permissions.is_empty() || !self.config.flags.add_permissions.is_empty();
            if create && grants && self.grants_to_new_only() {
                groups
                    .entry(Group::NewOnly(shape(!permissions.is_empty())))
                    .or_default()
                    .push(Planned {
                        row: row.clone(),
                        cells: cells.clone(),
                        permissions,
                        follow_up: false,
                    });
                groups
                    .entry(Group::Upsert(shape(false)))
                    .or_default()
                    .push(Planned {
                        row,
                        cells,
                        permissions: Vec::new(),
                        follow_up: true,
                    });
            } else {
                groups
                    .entry(Group::Upsert(shape(!permissions.is_empty())))
                    .or_default()
                    .push(Planned {
                        row,
                        cells,
                        permissions,
                        follow_up: false,
                    });
            }
        }
        let mut parts = Vec::new();
        for (group, rows) in groups {
            if !rows.is_empty() {
                parts.push(self.part(group, rows)?);
            }
        }
        Ok(PreparedImport { parts, known })
    }

    /// The permissions a row grants and those it withdraws. Consent is the person's: a
    /// create grants what the source lists (to someone new to Poppulo only, see
    /// `Group::NewOnly`), an update only what the source added since the last sync,
    /// and withdraws what it took away; a permission the person dropped on Poppulo
    /// stays dropped until the source changes it.
    fn consent(
        &self,
        change: &Change,
        contact: &Contact,
        create: bool,
    ) -> (Vec<String>, Vec<String>) {
        if !self.manages_permissions() {
            return (Vec::new(), Vec::new());
        }
        let before = change.before();
        let withdrawn = || -> Vec<String> {
            before
                .map(|b| {
                    b.subscriptions
                        .difference(&contact.subscriptions)
                        .cloned()
                        .collect()
                })
                .unwrap_or_default()
        };
        if create || self.resubscribe {
            return (contact.subscriptions.iter().cloned().collect(), withdrawn());
        }
        match before {
            Some(b) => (
                contact
                    .subscriptions
                    .difference(&b.subscriptions)
                    .cloned()
                    .collect(),
                withdrawn(),
            ),
            None => (Vec::new(), Vec::new()),
        }
    }

    /// One import: the rows' own cells, and the job-level settings that belong to it.
    pub(super) fn part(
        &self,
        group: Group,
        rows: Vec<Planned>,
    ) -> Result<ImportPart, ConnectorError> {
        let c = &self.config.flags;
        let mapped = &self.config.columns.0;
        let cells = match &group {
            Group::NewOnly(cells) | Group::Upsert(cells) => Some(cells),
            Group::Removal => None,
        };
        let included: Vec<usize> = (0..mapped.len())
            .filter(|&j| mapped[j].0 == Field::Email || cells.is_some_and(|s| s.mapped[j]))
            .collect();
        let mut columns: Vec<String> = included.iter().map(|&j| mapped[j].1.clone()).collect();
        let permissions = cells.is_some_and(|s| s.permissions);
        if permissions {
            columns.push(self.permissions_column());
        }
        // A job in which no row sets a status has no status column at all.
        let status = rows.iter().any(|p| p.row.status.is_some());
        if status {
            columns.push("status".to_string());
        }
        let mut writer = csv::WriterBuilder::new()
            .terminator(csv::Terminator::Any(b'\n'))
            .quote_style(csv::QuoteStyle::Necessary)
            .from_writer(Vec::new());
        let mut sent = Vec::with_capacity(rows.len());
        for planned in &rows {
            let mut record: Vec<String> = included
                .iter()
                .map(|&j| match mapped[j].0 {
                    Field::Email => planned.row.email.clone(),
                    _ => planned.cells[j].clone().unwrap_or_default(),
                })
                .collect();
            if permissions {
                record.push(planned.permissions.join(PERMISSION_SEPARATOR));
            }
            if status {
                record.push(planned.row.status.clone().unwrap_or_default());
            }
            writer
                .write_record(&record)
                .map_err(|e| ConnectorError::Other(format!("cannot write the import CSV: {e}")))?;
            sent.push(planned.row.clone());
        }
        let data = writer
            .into_inner()
            .map_err(|e| ConnectorError::Other(format!("cannot write the import CSV: {e}")))?;
        let data = String::from_utf8_lossy(&data);
        let upserts = cells.is_some();
        let mut remove_permissions = if upserts {
            c.remove_permissions.clone()
        } else {
            Vec::new()
        };
        for p in cells.map(|s| s.withdrawn.as_slice()).unwrap_or_default() {
            if !remove_permissions.contains(p) {
                remove_permissions.push(p.clone());
            }
        }
        // `add_permissions` goes with a create's grants: in the `NewOnly` import, or
        // where there is none (`update_existing = false`, `resubscribe`) with every
        // create and update.
        let add_permissions = match &group {
            Group::NewOnly(_) => c.add_permissions.clone(),
            Group::Upsert(_) if !self.grants_to_new_only() => c.add_permissions.clone(),
            _ => Vec::new(),
        };
        let job = ImportJob {
            accept_terms: true,
            flags: ImportFlags {
                update_existing: match &group {
                    Group::NewOnly(_) => false,
                    Group::Upsert(_) => c.update_existing,
                    // A removal must reach existing people whatever the setting.
                    Group::Removal => true,
                },
                reactivate_api_removed: upserts && c.reactivate_api_removed,
                reactivate_admin_removed: upserts && c.reactivate_admin_removed,
                reactivate_bounced_removed: upserts && c.reactivate_bounced_removed,
                set_fields: if upserts {
                    c.set_fields.clone()
                } else {
                    Default::default()
                },
                add_permissions,
                remove_permissions,
                tags: if upserts { c.tags.clone() } else { Vec::new() },
            },
            columns: columns.clone(),
        };
        let xml = job.to_xml(&data).map_err(ConnectorError::Other)?;
        Ok(ImportPart {
            group,
            xml,
            columns,
            rows: sent,
            planned: rows,
        })
    }
}
