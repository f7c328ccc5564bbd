//! Deterministic contacts to feed connectors, so that a failure reproduces exactly.

use contactsync_core::{Contact, ContactStatus, Field};

/// The custom attributes every [`sample_contacts`] contact carries.
pub const SAMPLE_ATTRIBUTES: [&str; 2] = ["cost_center", "site"];

/// `n` distinct, valid contacts: each has an external id (`CS-0001`…), a valid email
/// (`conformance.0001@example.com`…), first and last name, company, department, job
/// title, language, the attributes [`SAMPLE_ATTRIBUTES`], one or two subscriptions, and
/// status active. The same `n` always gives the same contacts.
pub fn sample_contacts(n: usize) -> Vec<Contact> {
    const FIRST: [&str; 5] = ["Ann", "Bruno", "Chloé", "Dirk", "Eva"];
    const LAST: [&str; 5] = ["Lee", "Peeters", "Dubois", "Janssens", "Müller"];
    const DEPARTMENTS: [&str; 3] = ["Sales", "Finance", "R&D"];
    const LANGUAGES: [&str; 3] = ["en", "fr-BE", "nl"];
    (1..=n)
        .map(|i| {
            let mut subscriptions = std::collections::BTreeSet::from(["newsletter".to_string()]);
            if i % 2 == 0 {
                subscriptions.insert("events".to_string());
            }
            Contact {
                external_id: Some(format!("CS-{i:04}")),
                email: Some(format!("conformance.{i:04}@example.com")),
                first_name: Some(FIRST[i % FIRST.len()].to_string()),
                last_name: Some(LAST[i % LAST.len()].to_string()),
                company: Some("Example Corp".to_string()),
                department: Some(DEPARTMENTS[i % DEPARTMENTS.len()].to_string()),
                job_title: Some(format!("Analyst {i}")),
                language: Some(LANGUAGES[i % LANGUAGES.len()].to_string()),
                attributes: [
                    (
                        SAMPLE_ATTRIBUTES[0].to_string(),
                        format!("CC{}", 100 + i % 7),
                    ),
                    (SAMPLE_ATTRIBUTES[1].to_string(), "Brussels, BE".to_string()),
                ]
                .into_iter()
                .collect(),
                subscriptions,
                status: ContactStatus::Active,
                ..Contact::default()
            }
        })
        .collect()
}

/// The fields a platform that stores everything round-trips: every canonical field but
/// `updated_at` (which platforms stamp themselves), plus the [`SAMPLE_ATTRIBUTES`].
/// Platforms that drop some fields pass a shorter list to
/// [`crate::SinkConformance::round_trip_fields`].
pub fn default_round_trip_fields() -> Vec<Field> {
    Field::CANONICAL
        .iter()
        .filter(|f| **f != Field::UpdatedAt)
        .cloned()
        .chain(
            SAMPLE_ATTRIBUTES
                .iter()
                .map(|a| Field::Attribute(a.to_string())),
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use contactsync_core::KeyRule;

    #[test]
    fn samples_are_deterministic_distinct_and_valid() {
        let a = sample_contacts(12);
        assert_eq!(a, sample_contacts(12));
        let keys: std::collections::HashSet<_> = a.iter().map(|c| c.key(KeyRule::Auto)).collect();
        assert_eq!(keys.len(), 12);
        for c in &a {
            assert!(Contact::is_valid_email(c.email.as_deref().unwrap()));
            assert_eq!(c.attributes.len(), SAMPLE_ATTRIBUTES.len());
        }
    }
}
