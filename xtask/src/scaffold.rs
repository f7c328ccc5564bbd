//! `cargo xtask new-connector NAME [--sandbox] [--source-only | --sink-only] [--no-http]`:
//! a connector crate (config, the platform's calls, source, sink, a conformance test)
//! and, with `--sandbox`, its sandbox crate on the sandbox kit, wired into the binary.
//!
//! - An HTTP connector (the default) reaches its platform with `contactsync-http`; with
//!   `--sandbox` its conformance test runs against the new sandbox, without it against
//!   a test account named in the environment (an ignored test until one is given).
//! - `--no-http` writes a connector for a platform reached otherwise (a folder, a local
//!   database, a command): the placeholder platform is a folder of JSON people, and
//!   its conformance test runs against a temporary folder.
//! - `--source-only` registers no sink (and writes none); `--sink-only` registers no
//!   source (its source module stays, unregistered, as the test's read-back).
//!
//! The result builds, passes clippy and its tests unchanged; `cargo xtask test`
//! scaffolds every kind into a temporary copy of the workspace to prove it
//! (`check_in_copy`), so the templates and `docs/writing-a-connector.md` cannot rot.
//!
//! The templates are under `xtask/templates/`, with `__name__` (`acme-crm`), `__Name__`
//! (`AcmeCrm`), `__snake__` (`acme_crm`) and `__SNAKE__` (`ACME_CRM`) for the name, and
//! lines between `// @if FLAG` (or `// @if !FLAG`) and `// @end` kept only for a
//! connector of that kind (`sink`, `source`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// One template: where it goes (under the crate's folder) and its text.
type Template = (&'static str, &'static str);

/// An HTTP connector's files.
const CONNECTOR: &[Template] = &[
    (
        "Cargo.toml",
        include_str!("../templates/connector/Cargo.toml"),
    ),
    (
        "src/lib.rs",
        include_str!("../templates/connector/src/lib.rs"),
    ),
    (
        "src/config.rs",
        include_str!("../templates/connector/src/config.rs"),
    ),
    (
        "src/client.rs",
        include_str!("../templates/connector/src/client.rs"),
    ),
    (
        "src/source.rs",
        include_str!("../templates/connector/src/source.rs"),
    ),
    (
        SINK_FILE,
        include_str!("../templates/connector/src/sink.rs"),
    ),
];

const CONFORMANCE_WITH_SANDBOX: Template = (
    "tests/conformance.rs",
    include_str!("../templates/connector/tests/conformance.rs"),
);

const CONFORMANCE_WITHOUT_SANDBOX: Template = (
    "tests/conformance.rs",
    include_str!("../templates/connector/tests/conformance_without_sandbox.rs"),
);

/// A `--no-http` connector's files.
const LOCAL_CONNECTOR: &[Template] = &[
    (
        "Cargo.toml",
        include_str!("../templates/connector-local/Cargo.toml"),
    ),
    (
        "src/lib.rs",
        include_str!("../templates/connector-local/src/lib.rs"),
    ),
    (
        "src/config.rs",
        include_str!("../templates/connector-local/src/config.rs"),
    ),
    (
        "src/folder.rs",
        include_str!("../templates/connector-local/src/folder.rs"),
    ),
    (
        "src/source.rs",
        include_str!("../templates/connector-local/src/source.rs"),
    ),
    (
        SINK_FILE,
        include_str!("../templates/connector-local/src/sink.rs"),
    ),
    (
        "tests/conformance.rs",
        include_str!("../templates/connector-local/tests/conformance.rs"),
    ),
];

/// Left out of a `--source-only` connector.
const SINK_FILE: &str = "src/sink.rs";

const SANDBOX: &[Template] = &[
    (
        "Cargo.toml",
        include_str!("../templates/sandbox/Cargo.toml"),
    ),
    (
        "src/lib.rs",
        include_str!("../templates/sandbox/src/lib.rs"),
    ),
    (
        "tests/protocol.rs",
        include_str!("../templates/sandbox/tests/protocol.rs"),
    ),
];

/// The name in each of its spellings.
#[derive(Debug, Clone)]
pub struct Name {
    /// `acme-crm`: the folder, the crate suffix and the `type` in a config section.
    pub kebab: String,
    /// `AcmeCrm`: type names.
    pub camel: String,
    /// `acme_crm`: the crate's identifier.
    pub snake: String,
}

impl Name {
    /// Checks `name`: lower-case letters, digits and inner hyphens, starting with a letter.
    pub fn parse(name: &str) -> Result<Name> {
        let valid = name.starts_with(|c: char| c.is_ascii_lowercase())
            && !name.ends_with('-')
            && !name.contains("--")
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !valid {
            bail!("{name:?} is not a connector name: use lower-case letters, digits and hyphens, starting with a letter (`acme-crm`)");
        }
        let camel = name
            .split('-')
            .map(|part| {
                let mut chars = part.chars();
                chars
                    .next()
                    .map(|first| first.to_ascii_uppercase().to_string() + chars.as_str())
                    .unwrap_or_default()
            })
            .collect();
        Ok(Name {
            kebab: name.to_string(),
            camel,
            snake: name.replace('-', "_"),
        })
    }

    fn fill(&self, template: &str, kind: &Kind) -> String {
        let sandbox_dev = if kind.sandbox {
            format!(
                "contactsync-sandbox-{0} = {{ path = \"../../sandboxes/{0}\" }}\n",
                self.kebab
            )
        } else {
            String::new()
        };
        kind.select(template)
            .replace("__sandbox_dev_dependency__", &sandbox_dev)
            .replace("__name__", &self.kebab)
            .replace("__Name__", &self.camel)
            .replace("__snake__", &self.snake)
            .replace("__SNAKE__", &self.snake.to_ascii_uppercase())
    }
}

/// What kind of connector to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind {
    /// It registers a source.
    pub source: bool,
    /// It registers a sink.
    pub sink: bool,
    /// It reaches its platform over HTTP (`contactsync-http`).
    pub http: bool,
    /// A sandbox crate comes with it (HTTP only).
    pub sandbox: bool,
}

const USAGE: &str =
    "usage: cargo xtask new-connector NAME [--sandbox] [--source-only | --sink-only] [--no-http]";

impl Kind {
    /// Reads the flags; refuses those that contradict each other.
    pub fn parse(flags: &[&str]) -> Result<Kind> {
        let has = |f: &str| flags.contains(&f);
        if let Some(unknown) = flags
            .iter()
            .find(|f| !["--sandbox", "--source-only", "--sink-only", "--no-http"].contains(f))
        {
            bail!("unknown option {unknown} ({USAGE})");
        }
        if has("--source-only") && has("--sink-only") {
            bail!("--source-only and --sink-only together make nothing: give one, or neither for both");
        }
        if has("--no-http") && has("--sandbox") {
            bail!("a sandbox is an HTTP server: --sandbox goes with an HTTP connector, not with --no-http");
        }
        Ok(Kind {
            source: !has("--sink-only"),
            sink: !has("--source-only"),
            http: !has("--no-http"),
            sandbox: has("--sandbox"),
        })
    }

    /// Whether a template's `// @if FLAG` holds for this kind.
    fn holds(&self, flag: &str) -> bool {
        match flag.strip_prefix('!') {
            Some(flag) => !self.holds(flag),
            None => match flag {
                "source" => self.source,
                "sink" => self.sink,
                _ => false,
            },
        }
    }

    /// `template` with the lines of `// @if FLAG` … `// @end` blocks kept where the
    /// flag holds, and the markers dropped.
    fn select(&self, template: &str) -> String {
        let mut keep = true;
        let mut out = String::with_capacity(template.len());
        for line in template.split_inclusive('\n') {
            let marker = line.trim();
            if let Some(flag) = marker.strip_prefix("// @if ") {
                keep = self.holds(flag.trim());
            } else if marker == "// @end" {
                keep = true;
            } else if keep {
                out.push_str(line);
            }
        }
        out
    }

    /// The connector's files.
    fn templates(&self) -> Vec<&'static Template> {
        let mut files: Vec<&Template> = if self.http {
            let conformance = if self.sandbox {
                &CONFORMANCE_WITH_SANDBOX
            } else {
                &CONFORMANCE_WITHOUT_SANDBOX
            };
            CONNECTOR
                .iter()
                .chain(std::iter::once(conformance))
                .collect()
        } else {
            LOCAL_CONNECTOR.iter().collect()
        };
        if !self.sink {
            files.retain(|(path, _)| *path != SINK_FILE);
        }
        files
    }
}

/// `cargo xtask new-connector NAME [FLAGS]`, in the workspace at `root`.
pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let (flags, names): (Vec<&str>, Vec<&str>) = args
        .iter()
        .map(String::as_str)
        .partition(|a| a.starts_with('-'));
    let name = match names.as_slice() {
        [name] => name,
        [] => bail!("{USAGE}"),
        [_, extra, ..] => bail!("one name only, not also {extra:?}"),
    };
    new_connector(root, &Name::parse(name)?, Kind::parse(&flags)?)
}

/// Writes the crates and wires them in.
pub fn new_connector(root: &Path, name: &Name, kind: Kind) -> Result<()> {
    let connector = root.join("connectors").join(&name.kebab);
    let sandbox = root.join("sandboxes").join(&name.kebab);
    for dir in [&connector, &sandbox] {
        if dir.exists() {
            bail!("{} exists already: pick another name", dir.display());
        }
    }
    write_all(&connector, kind.templates().into_iter(), name, &kind)?;
    if kind.sandbox {
        write_all(&sandbox, SANDBOX.iter(), name, &kind)?;
    }
    wire_in(root, name, &kind)?;
    // The binary's crate too: its new `extern crate` lines are put in rustfmt's order.
    let mut packages = vec![
        "contactsync".to_string(),
        format!("contactsync-{}", name.kebab),
    ];
    if kind.sandbox {
        packages.push(format!("contactsync-sandbox-{}", name.kebab));
    }
    let mut fmt = vec!["fmt".to_string()];
    for package in &packages {
        fmt.extend(["-p".to_string(), package.clone()]);
    }
    let fmt: Vec<&str> = fmt.iter().map(String::as_str).collect();
    crate::run(&crate::cargo(), &fmt, root)?;
    eprintln!(
        "xtask new-connector: wrote {}{}, and wired `{}` into crates/cli/Cargo.toml (a dependency and a feature) and README.md, with a docs/connectors/ page to fill in.\n\
         Next: replace the placeholder platform with the real one (docs/writing-a-connector.md), then `cargo xtask test`.",
        connector.display(),
        if kind.sandbox { format!(" and {}", sandbox.display()) } else { String::new() },
        name.kebab
    );
    Ok(())
}

fn write_all<'a>(
    dir: &Path,
    templates: impl Iterator<Item = &'a Template>,
    name: &Name,
    kind: &Kind,
) -> Result<()> {
    for (path, text) in templates {
        let target = dir.join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&target, name.fill(text, kind))
            .with_context(|| format!("writing {}", target.display()))?;
    }
    Ok(())
}

/// Inserts `line` into `text` after the first line for which `after` holds; fails
/// naming `what` when there is none.
fn insert_after(
    text: &str,
    after: impl Fn(&str) -> bool,
    line: &str,
    what: &str,
) -> Result<String> {
    let lines: Vec<&str> = text.lines().collect();
    let Some(at) = lines.iter().rposition(|l| after(l)) else {
        bail!("cannot find {what}: add `{line}` by hand");
    };
    let mut out: Vec<&str> = lines[..=at].to_vec();
    out.push(line);
    out.extend(&lines[at + 1..]);
    Ok(out.join("\n") + "\n")
}

fn edit(path: &Path, change: impl FnOnce(&str) -> Result<String>) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let changed = change(&text).with_context(|| format!("editing {}", path.display()))?;
    std::fs::write(path, changed).with_context(|| format!("writing {}", path.display()))
}

/// The lines outside the new crates, all in `crates/cli/Cargo.toml`: the connector's
/// dependency and feature (in `connectors`), and the sandbox's (in `sandboxes`).
/// `crates/cli/build.rs` links every enabled feature's crate.
fn wire_in(root: &Path, name: &Name, kind: &Kind) -> Result<()> {
    let kebab = &name.kebab;
    edit(&root.join("crates/cli/Cargo.toml"), |text| {
        let mut text = insert_after(
            text,
            |l| l == "[dependencies]",
            &format!(
                "contactsync-{kebab} = {{ path = \"../../connectors/{kebab}\", optional = true }}"
            ),
            "[dependencies]",
        )?;
        text = insert_after(
            &text,
            |l| l.starts_with("connectors = ["),
            &format!("{kebab} = [\"dep:contactsync-{kebab}\"]"),
            "the `connectors` feature",
        )?;
        text = add_to_feature(&text, "connectors", kebab)?;
        if kind.sandbox {
            text = insert_after(
                &text,
                |l| l == "[dependencies]",
                &format!(
                    "contactsync-sandbox-{kebab} = {{ path = \"../../sandboxes/{kebab}\", optional = true }}"
                ),
                "[dependencies]",
            )?;
            text = insert_after(
                &text,
                |l| l.starts_with("sandboxes = ["),
                &format!("sandbox-{kebab} = [\"dep:contactsync-sandbox-{kebab}\"]"),
                "the `sandboxes` feature",
            )?;
            text = add_to_feature(&text, "sandboxes", &format!("sandbox-{kebab}"))?;
        }
        Ok(text)
    })?;
    write_docs_page(root, name, kind)
}

/// Adds `item` to the one-line feature list `feature = [...]`.
fn add_to_feature(text: &str, feature: &str, item: &str) -> Result<String> {
    let prefix = format!("{feature} = [");
    let mut found = false;
    let lines: Vec<String> = text
        .lines()
        .map(
            |l| match l.strip_prefix(&prefix).and_then(|r| r.strip_suffix(']')) {
                Some(list) => {
                    found = true;
                    let mut items: Vec<String> = list
                        .split(',')
                        .map(|i| i.trim().to_string())
                        .filter(|i| !i.is_empty())
                        .collect();
                    items.push(format!("\"{item}\""));
                    items.sort();
                    format!("{prefix}{}]", items.join(", "))
                }
                None => l.to_string(),
            },
        )
        .collect();
    if !found {
        bail!("crates/cli/Cargo.toml has no one-line `{prefix}...]`: add \"{item}\" by hand");
    }
    Ok(lines.join("\n") + "\n")
}

/// A `docs/connectors/NAME.md` that names every key the new connector takes (tidy
/// checks it does), and the connector's row in README's table.
fn write_docs_page(root: &Path, name: &Name, kind: &Kind) -> Result<()> {
    let dir = root.join("connectors").join(&name.kebab);
    let keys = crate::tidy::config_keys(&dir)?;
    for registered in crate::tidy::registered_names(&dir)? {
        let rows: String = keys
            .iter()
            .map(|k| format!("| `{k}` | describe it |\n"))
            .collect();
        let page = format!(
            "# {registered} (`type = \"{registered}\"`)\n\n\
             Written by `cargo xtask new-connector`: say what the platform is, what the\n\
             connector follows of its documents, and its cost model.\n\n\
             ## Settings\n\n| key | meaning |\n|---|---|\n{rows}"
        );
        let path = root
            .join("docs/connectors")
            .join(format!("{registered}.md"));
        std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
        edit(&root.join("README.md"), |text| {
            insert_after(
                text,
                |l| l.starts_with("| `") && l.contains("| yes |"),
                &format!(
                    "| `{registered}` | {} | {} | written by `cargo xtask new-connector` |",
                    yes_no(kind.source),
                    yes_no(kind.sink)
                ),
                "README's connector table",
            )
        })?;
    }
    Ok(())
}

fn yes_no(yes: bool) -> &'static str {
    if yes {
        "yes"
    } else {
        "no"
    }
}

/// The kinds `cargo xtask test` scaffolds, each under its own name in one copy.
const CHECKED_KINDS: &[(&str, &[&str])] = &[
    ("demo", &["--sandbox"]),
    ("demo-http", &["--sink-only"]),
    ("demo-local", &["--source-only", "--no-http"]),
    ("demo-folder", &["--sink-only", "--no-http"]),
];

/// What `cargo xtask test` does with the scaffold: a temporary copy of the workspace
/// (its tracked and unignored files), `new-connector` of every kind in
/// [`CHECKED_KINDS`] in it (together touching at most two existing files), then format,
/// clippy and the new crates' tests (an ignored test is compiled, not run), the
/// binary's build, its `contactsync connectors` listing each new one as what it is,
/// and the tidy checks.
pub fn check_in_copy(root: &Path) -> Result<()> {
    let copy = tempfile::Builder::new()
        .prefix("contactsync-scaffold-")
        .tempdir()
        .context("creating a temporary directory")?;
    let files = copy_workspace(root, copy.path())?;
    let mut packages: Vec<String> = Vec::new();
    let mut kinds = Vec::new();
    for (name, flags) in CHECKED_KINDS {
        let name = Name::parse(name)?;
        let kind = Kind::parse(flags)?;
        new_connector(copy.path(), &name, kind)?;
        packages.push(format!("contactsync-{}", name.kebab));
        if kind.sandbox {
            packages.push(format!("contactsync-sandbox-{}", name.kebab));
        }
        // A new connector touches at most two existing files (all of them the same two).
        let touched: Vec<&PathBuf> = files
            .iter()
            .filter(|f| std::fs::read(root.join(f)).ok() != std::fs::read(copy.path().join(f)).ok())
            .collect();
        if touched.len() > 2 {
            bail!(
                "new-connector {} {} touched {} existing files, at most 2 allowed: {touched:?}",
                name.kebab,
                flags.join(" "),
                touched.len()
            );
        }
        kinds.push((name, kind));
    }
    let cargo = crate::cargo();
    // A target directory of its own, kept between runs, so that only the copy's
    // crates are built again.
    let target = root.join("target").join("scaffold");
    let target = target.to_string_lossy().into_owned();
    let in_copy = |args: &[&str]| -> Result<()> {
        eprintln!("$ (scaffold copy) {cargo} {}", args.join(" "));
        let status = std::process::Command::new(&cargo)
            .args(args)
            .current_dir(copy.path())
            .env("CARGO_TARGET_DIR", &target)
            .status()
            .with_context(|| format!("starting {cargo}"))?;
        if !status.success() {
            bail!(
                "the scaffold does not pass `cargo {}` ({status}): fix xtask/templates",
                args.join(" ")
            );
        }
        Ok(())
    };
    let mut selected: Vec<&str> = Vec::new();
    for package in &packages {
        selected.extend(["-p", package.as_str()]);
    }
    in_copy(&["fmt", "--all", "--", "--check"])?;
    let mut clippy = vec!["clippy"];
    clippy.extend(&selected);
    clippy.extend(["--all-targets", "--", "-D", "warnings"]);
    in_copy(&clippy)?;
    let mut test = vec!["test"];
    test.extend(&selected);
    in_copy(&test)?;
    in_copy(&["build", "-p", "contactsync"])?;
    let listed =
        std::process::Command::new(std::path::Path::new(&target).join("debug/contactsync"))
            .arg("connectors")
            .output()
            .context("running the copy's `contactsync connectors`")?;
    let listed = String::from_utf8_lossy(&listed.stdout);
    for (name, kind) in &kinds {
        let (as_source, as_sink) = listed_as(&listed, &name.kebab);
        if (as_source, as_sink) != (kind.source, kind.sink) {
            bail!(
                "the copy's `contactsync connectors` lists `{}` as a source: {as_source}, a sink: {as_sink}; it should be {}, {}:\n{listed}",
                name.kebab,
                kind.source,
                kind.sink
            );
        }
    }
    crate::tidy::run(copy.path()).context("the scaffold breaks a tidy rule")?;
    eprintln!(
        "xtask test: new-connector of every kind ({}) builds, passes clippy and its tests",
        CHECKED_KINDS
            .iter()
            .map(|(name, flags)| format!("{name} {}", flags.join(" ")))
            .collect::<Vec<_>>()
            .join("; ")
    );
    Ok(())
}

/// Whether `contactsync connectors` lists `name` under `sources:` and under `sinks:`.
fn listed_as(listing: &str, name: &str) -> (bool, bool) {
    let mut section = "";
    let (mut source, mut sink) = (false, false);
    for line in listing.lines() {
        if !line.starts_with(' ') {
            section = line.split(' ').next().unwrap_or("");
            continue;
        }
        if line.split_whitespace().next() == Some(name) {
            match section {
                "sources:" => source = true,
                "sinks:" => sink = true,
                _ => {}
            }
        }
    }
    (source, sink)
}

/// Copies the files git would put in a clean clone (tracked, and new files not ignored),
/// and says which.
fn copy_workspace(root: &Path, to: &Path) -> Result<Vec<PathBuf>> {
    let listed = std::process::Command::new("git")
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ])
        .current_dir(root)
        .output()
        .context("running git ls-files")?;
    if !listed.status.success() {
        bail!(
            "git ls-files failed: {}",
            String::from_utf8_lossy(&listed.stderr)
        );
    }
    let mut copied = Vec::new();
    for file in listed.stdout.split(|b| *b == 0).filter(|f| !f.is_empty()) {
        let relative = PathBuf::from(String::from_utf8_lossy(file).into_owned());
        let from = root.join(&relative);
        if !from.is_file() {
            continue; // deleted in the work tree
        }
        let target = to.join(&relative);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(&from, &target).with_context(|| format!("copying {}", from.display()))?;
        copied.push(relative);
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_spelt_every_way_and_bad_ones_refused() {
        let name = Name::parse("acme-crm").expect("a name");
        assert_eq!(
            (name.camel.as_str(), name.snake.as_str()),
            ("AcmeCrm", "acme_crm")
        );
        for bad in ["Acme", "1acme", "acme-", "ac--me", "acme_crm", ""] {
            assert!(Name::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn kinds_keep_their_own_lines_and_contradictions_are_refused() {
        let template = "a\n// @if sink\nsink\n// @end\n// @if !source\nreadback\n// @end\nz\n";
        let sink_only = Kind::parse(&["--sink-only"]).expect("a kind");
        assert_eq!(sink_only.select(template), "a\nsink\nreadback\nz\n");
        let both = Kind::parse(&[]).expect("a kind");
        assert_eq!(both.select(template), "a\nsink\nz\n");
        let source_only = Kind::parse(&["--source-only", "--no-http"]).expect("a kind");
        assert_eq!(source_only.select(template), "a\nz\n");
        assert!(!source_only
            .templates()
            .iter()
            .any(|(path, _)| *path == SINK_FILE));
        for bad in [
            &["--source-only", "--sink-only"][..],
            &["--no-http", "--sandbox"],
            &["--sandbx"],
        ] {
            assert!(Kind::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_listing_says_what_each_connector_is() {
        let listing =
            "sources:\n  csv   reads\n  demo-local  x\nsinks:\n  csv   keeps\nsandboxes (…): a\n";
        assert_eq!(listed_as(listing, "csv"), (true, true));
        assert_eq!(listed_as(listing, "demo-local"), (true, false));
        assert_eq!(listed_as(listing, "demo"), (false, false));
    }

    #[test]
    fn a_feature_list_takes_the_new_item_in_order() {
        let text = "[features]\nconnectors = [\"actito\", \"ldap\"]\nx = 1\n";
        let added = add_to_feature(text, "connectors", "demo").expect("added");
        assert_eq!(
            added,
            "[features]\nconnectors = [\"actito\", \"demo\", \"ldap\"]\nx = 1\n"
        );
        assert!(add_to_feature(text, "sandboxes", "sandbox-demo").is_err());
    }

    #[test]
    fn lines_go_after_the_last_match() {
        let text = "a\nextern crate x;\nextern crate y;\nb\n";
        let out = insert_after(
            text,
            |l| l.starts_with("extern crate"),
            "extern crate z;",
            "externs",
        );
        assert_eq!(
            out.expect("inserted"),
            "a\nextern crate x;\nextern crate y;\nextern crate z;\nb\n"
        );
    }
}
