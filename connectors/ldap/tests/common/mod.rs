//! Shared by the LDAP tests: settings pointing at a throwaway slapd.
#![allow(dead_code)]

use contactsync_core::{ConnectorSettings, Contact, Sink, Source};
use contactsync_testkit::slapd::Slapd;

/// Starts a slapd, panicking with the fixture's own message (which says what to
/// install) when it cannot.
pub fn slapd(builder: contactsync_testkit::slapd::SlapdBuilder) -> Slapd {
    match builder.start() {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    }
}

/// The settings of `section` binding as `bind_dn` with `password`, under `base_dn`,
/// plus `extra` TOML lines.
pub fn settings_as(
    slapd: &Slapd,
    section: &str,
    (bind_dn, password): (&str, &str),
    base_dn: &str,
    extra: &str,
) -> ConnectorSettings {
    let toml = format!(
        "url = \"{}\"\nbind_dn = \"{bind_dn}\"\npassword = \"{password}\"\nbase_dn = \"{base_dn}\"\n{extra}",
        slapd.url(),
    );
    ConnectorSettings::from_toml(section, &toml).expect("settings")
}

/// Source settings reading `ou=people` as the reader account, plus `extra` TOML lines.
pub fn source_settings(slapd: &Slapd, extra: &str) -> ConnectorSettings {
    let reader = (slapd.reader_dn(), slapd.reader_password());
    let extra = format!("operation_timeout = \"10s\"\n{extra}");
    settings_as(
        slapd,
        "sources.directory",
        reader,
        slapd.people_dn(),
        &extra,
    )
}

/// Sink settings writing under `ou=people` as the admin, plus `extra` TOML lines.
pub fn sink_settings(slapd: &Slapd, extra: &str) -> ConnectorSettings {
    let admin = (slapd.admin_dn(), slapd.admin_password());
    settings_as(slapd, "sinks.directory", admin, slapd.people_dn(), extra)
}

/// Builds through the registry, as the binary does.
pub fn source(settings: &ConnectorSettings) -> Box<dyn Source> {
    // Naming the crate's factory makes the linker keep the object that registers it.
    std::hint::black_box(contactsync_ldap::build_source as fn(_) -> _);
    let factory = contactsync_core::registry::source("ldap").expect("ldap source registered");
    (factory.build)(settings).expect("source builds")
}

/// Builds through the registry, as the binary does.
pub fn sink(settings: &ConnectorSettings) -> Box<dyn Sink> {
    std::hint::black_box(contactsync_ldap::build_sink as fn(_) -> _);
    let factory = contactsync_core::registry::sink("ldap").expect("ldap sink registered");
    (factory.build)(settings).expect("sink builds")
}

/// What the default mapping reads from generated person `i` of the fixture.
pub fn expected_person(i: usize) -> Contact {
    Contact {
        external_id: Some(format!("E{i:05}")),
        email: Some(format!("person{i:05}@example.org")),
        first_name: Some(format!("Given{i}")),
        last_name: Some(format!("Family{i}")),
        display_name: Some(format!("Given{i} Family{i}")),
        phone: Some(format!("+32 2 555 {:04}", i % 10_000)),
        company: Some("Example".into()),
        department: Some(format!("D{}", i % 10)),
        job_title: Some("Engineer".into()),
        language: Some("en".into()),
        ..Contact::default()
    }
}
