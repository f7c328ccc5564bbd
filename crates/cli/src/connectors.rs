//! Building the configured connectors, and the in-process sandboxes behind
//! `base_url = "sandbox"`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, Context, Result};

use contactsync_core::{registry, RunningSandbox, SandboxOptions, Sink, Source};

use crate::settings::{base_url, with_base_url, Section};
use crate::*;

/// The port of a `http://127.0.0.1:PORT/…` URL.
pub fn url_port(url: &str) -> Option<u16> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    authority.rsplit_once(':')?.1.parse().ok()
}

/// Said after "no sandbox" in builds that left the sandboxes out.
pub const NO_SANDBOXES_HINT: &str = if cfg!(feature = "sandboxes") {
    ""
} else {
    " (this build has no sandboxes: build with the default `sandboxes` feature)"
};

/// Sandboxes started in this process, one per platform, so that a source and a sink of
/// the same platform see the same data.
#[derive(Default)]
pub struct Sandboxes {
    running: BTreeMap<String, RunningSandbox>,
}

impl Sandboxes {
    /// Starts the sandbox a section asks for with `base_url = "sandbox"`, and points the
    /// section at it.
    pub async fn resolve(&mut self, section: Section, data_dir: &Path) -> Result<Section> {
        if base_url(&section.settings).as_deref() != Some("sandbox") {
            return Ok(section);
        }
        let url = match self.running.get(&section.connector) {
            Some(running) => running.base_url.clone(),
            None => {
                let factory = registry::sandbox(&section.connector).ok_or_else(|| {
                    anyhow!(
                        "[{}] base_url = \"sandbox\", but connector `{}` has no sandbox{}",
                        section.settings.section,
                        section.connector,
                        NO_SANDBOXES_HINT
                    )
                })?;
                std::fs::create_dir_all(data_dir)
                    .with_context(|| format!("creating {}", data_dir.display()))?;
                let data_file = data_dir.join(format!("sandbox-{}.json", section.connector));
                // The sandbox keeps the port it had, when it is free, so that the link
                // of an import a killed run left behind still leads to it.
                let port_file = data_dir.join(format!("sandbox-{}.port", section.connector));
                let last_port = std::fs::read_to_string(&port_file)
                    .ok()
                    .and_then(|p| p.trim().parse::<u16>().ok());
                let options = |port| SandboxOptions {
                    data_file: Some(data_file.clone()),
                    port,
                    settings: Some(section.settings.clone()),
                };
                let started = match last_port {
                    Some(port) => {
                        match (factory.start)(options(port)).await {
                            Ok(running) => Ok(running),
                            Err(e) => {
                                tracing::info!("port {port} of the last {} sandbox is taken ({e}); using another", section.connector);
                                (factory.start)(options(0)).await
                            }
                        }
                    }
                    None => (factory.start)(options(0)).await,
                };
                let running = started
                    .with_context(|| format!("starting the {} sandbox", section.connector))?;
                if let Some(port) = url_port(&running.base_url) {
                    if let Err(e) = std::fs::write(&port_file, format!("{port}\n")) {
                        tracing::warn!(
                            "could not keep the sandbox's port in {}: {e}",
                            port_file.display()
                        );
                    }
                }
                say(tracing::Level::WARN, &format!(
                    "note: [{}] uses the built-in {} SANDBOX at {} (data in {}), not the real platform",
                    section.settings.section,
                    section.connector,
                    running.base_url,
                    data_file.display()
                ));
                let url = running.base_url.clone();
                self.running.insert(section.connector.clone(), running);
                url
            }
        };
        Ok(Section {
            settings: with_base_url(&section.settings, &url),
            connector: section.connector,
        })
    }

    pub fn stop(self) {
        for (_, running) in self.running {
            running.shutdown.cancel();
        }
    }
}

/// Builds a connector only to check it (settings, files) before anything runs; a
/// section with `base_url = "sandbox"` against a loopback address nothing listens on
/// (building opens no connection), so that its settings are checked before a sandbox
/// is started for it.
pub fn built_for_checks<T>(section: &Section, build: fn(&Section) -> Result<T>) -> Result<T> {
    if base_url(&section.settings).as_deref() != Some("sandbox") {
        return build(section);
    }
    let probe = Section {
        connector: section.connector.clone(),
        settings: with_base_url(&section.settings, "http://127.0.0.1:9/"),
    };
    build(&probe)
}

pub fn build_source(section: &Section) -> Result<Box<dyn Source>> {
    let factory = registry::source(&section.connector).ok_or_else(|| {
        anyhow!(
            "[{}] type = \"{}\": no such source (registered: {})",
            section.settings.section,
            section.connector,
            registry::sources()
                .iter()
                .map(|f| f.name)
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    Ok((factory.build)(&section.settings)?)
}

pub fn build_sink(section: &Section) -> Result<Box<dyn Sink>> {
    let factory = registry::sink(&section.connector).ok_or_else(|| {
        anyhow!(
            "[{}] type = \"{}\": no such sink (registered: {})",
            section.settings.section,
            section.connector,
            registry::sinks()
                .iter()
                .map(|f| f.name)
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    Ok((factory.build)(&section.settings)?)
}
