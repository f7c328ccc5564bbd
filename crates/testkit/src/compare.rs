//! Comparing what a system holds with what it should hold, field by field, so that a
//! failing check says which person and which field differ rather than "not equal".

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use contactsync_core::{Contact, Field, KeyRule};

/// One field that differs between the expected and the actual contact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDifference {
    /// The field.
    pub field: Field,
    /// Its value in the expected contact.
    pub expected: Option<String>,
    /// Its value in the contact read.
    pub actual: Option<String>,
}

impl fmt::Display for FieldDifference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: expected {:?}, got {:?}",
            self.field, self.expected, self.actual
        )
    }
}

/// One way in which what was read differs from what was expected. People are named
/// by their key (`external_id:CS-0001`), or by content hash when they have none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    /// An expected person was not read.
    Missing {
        /// Who.
        key: String,
    },
    /// A person was read who was not expected.
    Unexpected {
        /// Who.
        key: String,
    },
    /// A person was read more than once.
    Duplicate {
        /// Who.
        key: String,
        /// How many times.
        count: usize,
    },
    /// A person was read with different content.
    Changed {
        /// Who.
        key: String,
        /// The fields that differ.
        fields: Vec<FieldDifference>,
    },
    /// A person removed with a marking removal style is still active.
    StillActive {
        /// Who.
        key: String,
    },
    /// A person that must not be in the system (removed with `Delete`, or rejected) is.
    Present {
        /// Who.
        key: String,
    },
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Difference::Missing { key } => write!(f, "{key} is missing"),
            Difference::Unexpected { key } => write!(f, "{key} was not expected"),
            Difference::Duplicate { key, count } => write!(f, "{key} appears {count} times"),
            Difference::Changed { key, fields } => {
                write!(f, "{key} differs (")?;
                for (i, d) in fields.iter().enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    write!(f, "{d}")?;
                }
                f.write_str(")")
            }
            Difference::StillActive { key } => write!(f, "{key} was removed but is still active"),
            Difference::Present { key } => write!(f, "{key} should not be present but is"),
        }
    }
}

/// How a contact is named in differences and matched between two lists: its key under
/// [`KeyRule::Auto`], or its content hash when it has no key.
pub(crate) fn identity(contact: &Contact) -> String {
    contact
        .key(KeyRule::Auto)
        .map(|k| k.to_string())
        .unwrap_or_else(|| format!("(no key, content {:016x})", contact.content_hash()))
}

/// Every field that makes up a contact's content ([`Contact::content_hash`]): the
/// canonical fields but `updated_at`, and the attributes either contact has.
fn content_fields(a: &Contact, b: &Contact) -> Vec<Field> {
    let attributes: BTreeSet<&String> = a.attributes.keys().chain(b.attributes.keys()).collect();
    Field::CANONICAL
        .iter()
        .filter(|f| **f != Field::UpdatedAt)
        .cloned()
        .chain(attributes.into_iter().map(|a| Field::Attribute(a.clone())))
        .collect()
}

/// The fields in which `actual` differs from `expected`, among `fields` (`None`: all
/// content fields).
pub(crate) fn field_differences(
    expected: &Contact,
    actual: &Contact,
    fields: Option<&[Field]>,
) -> Vec<FieldDifference> {
    let all;
    let fields = match fields {
        Some(f) => f,
        None => {
            all = content_fields(expected, actual);
            &all
        }
    };
    fields
        .iter()
        .filter_map(|field| {
            let (e, a) = (expected.get(field), actual.get(field));
            (e != a).then(|| FieldDifference {
                field: field.clone(),
                expected: e,
                actual: a,
            })
        })
        .collect()
}

/// Compares two populations, in any order: each expected contact must be read exactly
/// once, with the same values in `fields` (`None`: the whole content), and nothing else
/// may be read. Returns every difference found; empty means equal.
///
/// ```
/// use contactsync_testkit::{compare_contacts, sample_contacts, Difference};
///
/// let expected = sample_contacts(3);
/// let mut actual = expected.clone();
/// actual.reverse();
/// assert!(compare_contacts(&expected, &actual, None).is_empty());
/// actual.pop();
/// assert!(matches!(compare_contacts(&expected, &actual, None)[..], [Difference::Missing { .. }]));
/// ```
pub fn compare_contacts(
    expected: &[Contact],
    actual: &[Contact],
    fields: Option<&[Field]>,
) -> Vec<Difference> {
    let mut read: BTreeMap<String, Vec<&Contact>> = BTreeMap::new();
    for contact in actual {
        read.entry(identity(contact)).or_default().push(contact);
    }
    let mut differences = Vec::new();
    let mut wanted = BTreeSet::new();
    for contact in expected {
        let key = identity(contact);
        wanted.insert(key.clone());
        match read.get(&key).map(Vec::as_slice) {
            None | Some([]) => differences.push(Difference::Missing { key }),
            Some([found]) => {
                let fields = field_differences(contact, found, fields);
                if !fields.is_empty() {
                    differences.push(Difference::Changed { key, fields });
                }
            }
            Some(many) => differences.push(Difference::Duplicate {
                key,
                count: many.len(),
            }),
        }
    }
    for (key, found) in &read {
        if !wanted.contains(key) {
            differences.push(Difference::Unexpected { key: key.clone() });
            if found.len() > 1 {
                differences.push(Difference::Duplicate {
                    key: key.clone(),
                    count: found.len(),
                });
            }
        }
    }
    differences
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample_contacts;

    #[test]
    fn reports_changed_field_duplicate_and_unexpected() {
        let expected = sample_contacts(3);
        let mut actual = expected.clone();
        actual[0].first_name = Some("Zed".into());
        actual.push(expected[1].clone());
        let mut stranger = expected[2].clone();
        stranger.external_id = Some("OTHER".into());
        actual.push(stranger);
        let diffs = compare_contacts(&expected, &actual, None);
        assert_eq!(diffs.len(), 3, "{diffs:?}");
        assert!(
            matches!(&diffs[0], Difference::Changed { fields, .. } if fields[0].field == Field::FirstName)
        );
        assert!(matches!(&diffs[1], Difference::Duplicate { count: 2, .. }));
        assert!(matches!(&diffs[2], Difference::Unexpected { key } if key == "external_id:OTHER"));
    }

    #[test]
    fn fields_outside_the_list_are_not_compared() {
        let expected = sample_contacts(1);
        let mut actual = expected.clone();
        actual[0].phone = Some("+32 2 123 45 67".into());
        assert!(compare_contacts(&expected, &actual, Some(&[Field::Email])).is_empty());
        assert_eq!(compare_contacts(&expected, &actual, None).len(), 1);
    }
}
