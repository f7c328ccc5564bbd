use contactsync_core::ConnectorSettings;
use std::collections::BTreeMap;

#[derive(serde::Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct S {
    path: String,
    #[serde(default)]
    columns: BTreeMap<String, String>,
    #[serde(default)]
    max_rows: Option<usize>,
}

#[test]
fn settings_keep_key_case_and_name_unknown_keys() {
    let s = ConnectorSettings::from_toml(
        "sinks.x",
        "path = 'a.csv'\nmax_rows = 5\n[columns]\n\"Cost Center\" = \"CC\"\n",
    )
    .unwrap();
    let parsed: S = s.parse().unwrap();
    assert_eq!(parsed.path, "a.csv");
    assert_eq!(parsed.max_rows, Some(5));
    assert_eq!(
        parsed.columns.get("Cost Center").map(String::as_str),
        Some("CC")
    );

    let bad = ConnectorSettings::from_toml("sinks.x", "path = 'a.csv'\npaht = 1\n").unwrap();
    let err = bad.parse::<S>().unwrap_err().to_string();
    assert!(err.contains("paht"), "{err}");
    assert!(err.contains("sinks.x"), "{err}");
}

#[test]
fn a_value_of_the_wrong_type_names_its_key() {
    let s = ConnectorSettings::from_toml("sinks.x", "path = 'a.csv'\nmax_rows = 'many'\n").unwrap();
    let err = s.parse::<S>().unwrap_err();
    assert_eq!(err.key.as_deref(), Some("max_rows"), "{err}");
    assert!(err.to_string().contains("`max_rows`"), "{err}");
}
