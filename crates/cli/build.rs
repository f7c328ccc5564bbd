//! Writes the `extern crate` line of every connector and sandbox this build links, from
//! the crate's enabled features: a feature `NAME` links the crate `contactsync-NAME`, a
//! feature `sandbox-NAME` the crate `contactsync-sandbox-NAME`. `extern crate` (not
//! `use … as _`) makes rustc link a crate nothing else names, and with it the crate's
//! registrations (`inventory`). So a new connector is a dependency line and a feature
//! line in this crate's Cargo.toml, and nothing else.

use std::fmt::Write as _;

fn main() {
    let mut lines = String::new();
    let mut features: Vec<String> = std::env::vars()
        .filter_map(|(k, _)| k.strip_prefix("CARGO_FEATURE_").map(str::to_string))
        .collect();
    features.sort();
    for feature in features {
        let name = feature.to_ascii_lowercase();
        if matches!(name.as_str(), "default" | "sandboxes" | "connectors") {
            continue;
        }
        // Cargo gives `sandbox-acme` as `SANDBOX_ACME`: the crate is
        // `contactsync_sandbox_acme` either way.
        let _ = writeln!(lines, "extern crate contactsync_{name};");
    }
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    std::fs::write(std::path::Path::new(&out).join("linked.rs"), lines)
        .expect("writing the linked connectors");
    println!("cargo::rerun-if-changed=build.rs");
}
