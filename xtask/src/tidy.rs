//! The architecture's invariants as tests, in the manner of rust-analyzer's
//! `xtask/src/tidy.rs`: `cargo xtask test` runs them with every other test, and a change
//! that breaks one fails CI with a sentence saying which rule and where.
//!
//! The crate graph comes from `cargo metadata`; the rules are the ones `ARCHITECTURE.md`
//! names.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use cargo_metadata::{DependencyKind, Metadata, MetadataCommand, Package};

/// The workspace's crates by where they live.
#[derive(Debug)]
pub struct Workspace {
    root: PathBuf,
    metadata: Metadata,
}

/// What a crate is, by the folder it lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `connectors/*`.
    Connector,
    /// `sandboxes/*`.
    Sandbox,
    /// `crates/*` other than the binary.
    Library,
    /// `crates/cli`.
    Binary,
    /// `xtask`.
    Xtask,
}

impl Workspace {
    /// Reads `cargo metadata` of the workspace at `root`.
    pub fn load(root: &Path) -> Result<Self> {
        let metadata = MetadataCommand::new()
            .manifest_path(root.join("Cargo.toml"))
            .no_deps()
            .exec()
            .context("running `cargo metadata`")?;
        Ok(Workspace {
            root: root.to_path_buf(),
            metadata,
        })
    }

    /// The workspace's own packages.
    pub fn packages(&self) -> impl Iterator<Item = &Package> {
        self.metadata
            .packages
            .iter()
            .filter(|p| self.metadata.workspace_members.contains(&p.id))
    }

    /// What `package` is, from its folder.
    pub fn role(&self, package: &Package) -> Role {
        let dir = package
            .manifest_path
            .parent()
            .map(|d| d.as_std_path().to_path_buf())
            .unwrap_or_default();
        let relative = dir.strip_prefix(&self.root).unwrap_or(&dir);
        let first = relative
            .components()
            .next()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .unwrap_or_default();
        match first.as_str() {
            "connectors" => Role::Connector,
            "sandboxes" => Role::Sandbox,
            "xtask" => Role::Xtask,
            _ if relative == Path::new("crates/cli") => Role::Binary,
            _ => Role::Library,
        }
    }

    /// The names of the workspace packages with this role.
    pub fn named(&self, role: Role) -> BTreeSet<String> {
        self.packages()
            .filter(|p| self.role(p) == role)
            .map(|p| p.name.to_string())
            .collect()
    }

    /// Every rule the crate graph breaks, one sentence each.
    pub fn dependency_violations(&self) -> Vec<String> {
        let connectors = self.named(Role::Connector);
        let sandboxes = self.named(Role::Sandbox);
        let mut found = Vec::new();
        for package in self.packages() {
            let role = self.role(package);
            for dep in &package.dependencies {
                let name = dep.name.as_str();
                let linked = dep.kind != DependencyKind::Development;
                let kind = match dep.kind {
                    DependencyKind::Development => "dev-dependency",
                    DependencyKind::Build => "build-dependency",
                    _ => "dependency",
                };
                let mut broken = |rule: &str| {
                    found.push(format!("{} has {kind} `{name}`: {rule}", package.name))
                };
                match role {
                    Role::Connector if linked => {
                        if connectors.contains(name) {
                            broken("a connector never depends on another connector");
                        }
                        if name == "contactsync-engine" {
                            broken("a connector never depends on the engine (it sees state only through SinkStore)");
                        }
                        // A connector may use a database client for its own platform
                        // (a SQL source); the sync state is the engine's alone.
                        if name == "contactsync-state" {
                            broken("a connector never depends on the state crate (it sees state only through SinkStore)");
                        }
                        if sandboxes.contains(name) || name == "contactsync-sandbox-kit" {
                            broken("a connector never links a sandbox (only its tests may)");
                        }
                    }
                    Role::Library
                        if linked
                            && matches!(
                                package.name.as_str(),
                                "contactsync-engine" | "contactsync-state"
                            )
                            && (name == "contactsync-http" || name == "reqwest") =>
                    {
                        broken("the engine and the state speak no HTTP (the TLS helper is `contactsync-tls`)");
                    }
                    Role::Sandbox => {
                        if connectors.contains(name) {
                            broken("a sandbox never depends on a connector: both are written from the documents, apart");
                        }
                        if sandboxes.contains(name) {
                            broken("a sandbox never depends on another sandbox");
                        }
                    }
                    _ => {}
                }
                if linked && name == "indicatif" && !matches!(role, Role::Binary | Role::Xtask) {
                    broken("only the binary draws on the terminal");
                }
            }
        }
        found
    }

    /// The folder names of the connector crates (`csv-file`).
    pub fn connector_folders(&self) -> BTreeSet<String> {
        self.packages()
            .filter(|p| self.role(p) == Role::Connector)
            .filter_map(|p| {
                let dir = p.manifest_path.parent()?;
                Some(dir.file_name()?.to_string())
            })
            .collect()
    }

    /// The folder names under `crates/` (`core`, `cli`).
    pub fn crate_folders(&self) -> BTreeSet<String> {
        self.packages()
            .filter(|p| matches!(self.role(p), Role::Library | Role::Binary))
            .filter_map(|p| {
                let dir = p.manifest_path.parent()?;
                Some(dir.file_name()?.to_string())
            })
            .collect()
    }

    /// The library crates (all but the binary and xtask, which may print) whose
    /// manifest does not take the workspace's lints.
    pub fn crates_without_workspace_lints(&self) -> Result<Vec<String>> {
        let mut missing = Vec::new();
        for package in self.packages() {
            if matches!(self.role(package), Role::Binary | Role::Xtask) {
                continue;
            }
            let text = std::fs::read_to_string(&package.manifest_path)
                .with_context(|| format!("reading {}", package.manifest_path))?;
            let manifest: toml::Table = text
                .parse()
                .with_context(|| format!("parsing {}", package.manifest_path))?;
            let inherits = manifest
                .get("lints")
                .and_then(|l| l.get("workspace"))
                .and_then(toml::Value::as_bool)
                == Some(true);
            if !inherits {
                missing.push(package.name.to_string());
            }
        }
        Ok(missing)
    }
}

/// `cargo xtask tidy`: the same checks as the tests, as one report.
pub fn run(root: &Path) -> Result<()> {
    let workspace = Workspace::load(root)?;
    let mut problems = workspace.dependency_violations();
    for name in workspace.crates_without_workspace_lints()? {
        problems.push(format!(
            "{name}: add `[lints] workspace = true` to its Cargo.toml"
        ));
    }
    let text =
        std::fs::read_to_string(root.join("ARCHITECTURE.md")).context("reading ARCHITECTURE.md")?;
    problems.extend(workspace.docs_violations()?);
    let mapped = crates_in_architecture(&text);
    let crates = workspace.crate_folders();
    if mapped != crates {
        problems.push(format!(
            "ARCHITECTURE.md's map has the crates {mapped:?}, the workspace has {crates:?}"
        ));
    }
    if problems.is_empty() {
        eprintln!("xtask tidy: the crate graph keeps ARCHITECTURE.md's invariants");
        return Ok(());
    }
    anyhow::bail!("xtask tidy:\n- {}", problems.join("\n- "))
}

/// The crates ARCHITECTURE.md's map names: each `### \`crates/NAME\`` heading.
pub fn crates_in_architecture(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("### `crates/"))
        .filter_map(|rest| rest.split('`').next())
        .map(str::to_string)
        .collect()
}

/// The names a connector crate registers (`SourceFactory { name: "csv", .. }`), read from
/// its `src/lib.rs`.
pub fn registered_names(connector_dir: &Path) -> Result<BTreeSet<String>> {
    let text = std::fs::read_to_string(connector_dir.join("src/lib.rs"))
        .with_context(|| format!("reading {}", connector_dir.display()))?;
    let mut names = BTreeSet::new();
    for factory in ["SourceFactory", "SinkFactory"] {
        for (at, _) in text.match_indices(factory) {
            let rest = &text[at + factory.len()..];
            if !rest.trim_start().starts_with('{') {
                continue;
            }
            if let Some(name) = rest
                .split_once("name:")
                .and_then(|(_, after)| after.trim_start().strip_prefix('"'))
                .and_then(|quoted| quoted.split_once('"'))
                .map(|(name, _)| name.to_string())
            {
                names.insert(name);
            }
        }
    }
    Ok(names)
}

/// The keys a connector's section takes: the serde names of the fields of every
/// `Deserialize` struct in its `src/config.rs` (`rename` followed; `skip` and
/// `flatten` fields are not keys).
pub fn config_keys(connector_dir: &Path) -> Result<BTreeSet<String>> {
    let path = connector_dir.join("src/config.rs");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let file = syn::parse_file(&text).with_context(|| format!("parsing {}", path.display()))?;
    let mut keys = BTreeSet::new();
    for item in file.items {
        let syn::Item::Struct(item) = item else {
            continue;
        };
        let deserialized = item.attrs.iter().any(|a| {
            a.path().is_ident("derive")
                && a.meta
                    .require_list()
                    .is_ok_and(|l| l.tokens.to_string().contains("Deserialize"))
        });
        let syn::Fields::Named(fields) = item.fields else {
            continue;
        };
        if !deserialized {
            continue;
        }
        for field in fields.named {
            let mut name = field.ident.map(|i| i.to_string());
            let mut key = true;
            for attr in field.attrs.iter().filter(|a| a.path().is_ident("serde")) {
                attr.parse_nested_meta(|meta| {
                    if meta.path.is_ident("rename") {
                        let value: syn::LitStr = meta.value()?.parse()?;
                        name = Some(value.value());
                    } else if ["skip", "skip_deserializing", "flatten"]
                        .iter()
                        .any(|w| meta.path.is_ident(w))
                    {
                        key = false;
                    } else if meta.input.peek(syn::Token![=]) {
                        let _: syn::Expr = meta.value()?.parse()?;
                    }
                    Ok(())
                })
                .with_context(|| format!("reading a serde attribute in {}", path.display()))?;
            }
            if let (true, Some(name)) = (key, name) {
                keys.insert(name);
            }
        }
    }
    Ok(keys)
}

/// Whether a docs page names `key`: in backticks, as `key =` at the start of a line (a
/// TOML example), or as a `[….key]` table.
pub fn page_names_key(page: &str, key: &str) -> bool {
    page.contains(&format!("`{key}`"))
        || page.contains(&format!(".{key}]"))
        || page.lines().any(|l| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|r| r.trim_start().starts_with('='))
        })
}

/// The connector names in the first column of README's `## Connectors` table.
pub fn connectors_in_readme(readme: &str) -> BTreeSet<String> {
    let Some(start) = readme.find("## Connectors") else {
        return BTreeSet::new();
    };
    readme[start..]
        .lines()
        .skip(1)
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| l.split('|').nth(1))
        .filter_map(|cell| cell.trim().strip_prefix('`')?.split('`').next())
        .map(str::to_string)
        .collect()
}

impl Workspace {
    /// The connector docs that do not say what the code takes: a registered connector
    /// without `docs/connectors/NAME.md`, a config key its page never names, and README's
    /// connector table against the registered names.
    pub fn docs_violations(&self) -> Result<Vec<String>> {
        let mut found = Vec::new();
        let mut registered = BTreeSet::new();
        for folder in self.connector_folders() {
            let dir = self.root.join("connectors").join(&folder);
            let keys = config_keys(&dir)?;
            for name in registered_names(&dir)? {
                let page_path = self.root.join("docs/connectors").join(format!("{name}.md"));
                match std::fs::read_to_string(&page_path) {
                    Err(_) => found.push(format!(
                        "connectors/{folder} registers `{name}` but docs/connectors/{name}.md is missing"
                    )),
                    Ok(page) => {
                        for key in keys.iter().filter(|k| !page_names_key(&page, k)) {
                            found.push(format!(
                                "docs/connectors/{name}.md never names `{key}`, a key connectors/{folder}/src/config.rs takes"
                            ));
                        }
                    }
                }
                registered.insert(name);
            }
        }
        let readme =
            std::fs::read_to_string(self.root.join("README.md")).context("reading README.md")?;
        let listed = connectors_in_readme(&readme);
        if listed != registered {
            found.push(format!(
                "README's connector table lists {listed:?}, the connectors register {registered:?}"
            ));
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workspace() -> Workspace {
        let root = crate::root().expect("workspace root");
        Workspace::load(&root).expect("cargo metadata")
    }

    #[test]
    fn crate_graph_keeps_the_architecture() {
        let violations = workspace().dependency_violations();
        assert!(
            violations.is_empty(),
            "the crate graph breaks ARCHITECTURE.md's invariants:\n- {}",
            violations.join("\n- ")
        );
    }

    #[test]
    fn architecture_maps_every_crate() {
        let workspace = workspace();
        let text = std::fs::read_to_string(workspace.root.join("ARCHITECTURE.md"))
            .expect("ARCHITECTURE.md");
        assert_eq!(
            crates_in_architecture(&text),
            workspace.crate_folders(),
            "ARCHITECTURE.md's map (its `### crates/NAME` headings) names other crates than the workspace has"
        );
    }

    #[test]
    fn the_crate_map_is_read_from_the_headings() {
        let text = "### `crates/core` (`x`)\ntext `crates/no`\n### `crates/sandbox-kit` and `sandboxes/*`\n";
        let mapped: Vec<String> = crates_in_architecture(text).into_iter().collect();
        assert_eq!(mapped, ["core", "sandbox-kit"]);
    }

    #[test]
    fn every_connector_page_names_every_key_and_readme_lists_every_connector() {
        let violations = workspace().docs_violations().expect("docs");
        assert!(
            violations.is_empty(),
            "the docs do not say what the code takes:\n- {}",
            violations.join("\n- ")
        );
    }

    #[test]
    fn keys_registrations_and_tables_are_read_as_written() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::create_dir_all(dir.path().join("src")).expect("src");
        std::fs::write(
            dir.path().join("src/config.rs"),
            "#[derive(Debug, Deserialize)]\n#[serde(deny_unknown_fields)]\npub struct Raw {\n    pub path: String,\n    #[serde(rename = \"where\", default)]\n    pub scope: Option<String>,\n    #[serde(skip)]\n    pub cache: u8,\n}\npub struct NotSettings {\n    pub hidden: u8,\n}\n",
        )
        .expect("config");
        std::fs::write(
            dir.path().join("src/lib.rs"),
            "inventory::submit! {\n    SourceFactory {\n        name: \"acme\",\n    }\n}\n",
        )
        .expect("lib");
        let keys: Vec<String> = config_keys(dir.path()).expect("keys").into_iter().collect();
        assert_eq!(keys, ["path", "where"]);
        let names: Vec<String> = registered_names(dir.path())
            .expect("names")
            .into_iter()
            .collect();
        assert_eq!(names, ["acme"]);
        assert!(page_names_key("| `path` | x |", "path"));
        assert!(page_names_key("```toml\npath = \"x\"\n```", "path"));
        assert!(page_names_key("[sinks.x.columns]", "columns"));
        assert!(!page_names_key("the path of it", "path"));
        let readme = "# X\n## Connectors\n\n| connector | a |\n|---|---|\n| `csv` | yes |\n| `ldap` | yes |\n\nText `no`.\n";
        let listed: Vec<String> = connectors_in_readme(readme).into_iter().collect();
        assert_eq!(listed, ["csv", "ldap"]);
    }

    #[test]
    fn every_crate_takes_the_workspace_lints() {
        let missing = workspace()
            .crates_without_workspace_lints()
            .expect("manifests");
        assert!(
            missing.is_empty(),
            "add `[lints] workspace = true` to: {}",
            missing.join(", ")
        );
    }
}
