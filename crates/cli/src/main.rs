//! `contactsync`: the command line. Wires configured connectors into the engine, shows
//! progress, writes reports, and turns every outcome into one clear sentence and an
//! exit code (0 synced, 1 failure, 2 usage or config error, 3 rejected records or
//! removals held back, 4 refused by the removal guard, 130 interrupted).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use contactsync_app::settings::{self, Settings};
use contactsync_app::{
    check, history_command, init_logging, list_connectors, runs_command, sandbox, say,
    state_command, state_path, sync, usage, Failure, LogFormat, StateCommand, SyncArgs,
};

// The connectors and sandboxes this build links: an `extern crate` line for each enabled
// feature of this crate, written by `build.rs` (rustc links a crate nothing else names
// only when told, and with the crate its registrations).
include!(concat!(env!("OUT_DIR"), "/linked.rs"));

// The run allocates on two threads (the source's parser and the engine) and frees on
// the other one: glibc's allocator serialises that on its arena lock, mimalloc does not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (15 in the v2 and the v3 headers the crate
/// vendors; the crate names no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Freed memory goes back to the system 10 ms after it is freed, not mimalloc v3's
/// 1 s: a run frees each phase's memory (the read's records, a batch) as the next one
/// grows, and holding it for a second put a 1M nightly's peak at 100 MB instead of 80.
/// `MIMALLOC_PURGE_DELAY` in the environment still decides, when set.
fn return_freed_memory_promptly() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a plain integer option; mimalloc reads options atomically.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 10) }
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "contactsync",
    version,
    about = "Keeps the people in one system in step with the platforms that mail them."
)]
struct Cli {
    /// The config file (default: $CONTACTSYNC_CONFIG, else ./contactsync.toml).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// `text` (default) or `json`: one JSON object a line on stderr, for log shippers.
    #[arg(long, global = true, value_name = "FORMAT", default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Sync the people of a source into a sink.
    Sync(SyncArgs),
    /// List the registered connectors.
    Connectors,
    /// Validate the config and open every configured endpoint, changing nothing.
    Check,
    /// Show or reset the sync state.
    State {
        #[command(subcommand)]
        command: StateCommand,
        /// The state database (default: from the config).
        #[arg(long, value_name = "FILE", global = true)]
        state: Option<PathBuf>,
    },
    /// List past runs from the state: start, duration, status, counts.
    Runs {
        /// Only this pipeline (`from->to`).
        #[arg(long, value_name = "NAME")]
        pipeline: Option<String>,
        /// How many, newest first.
        #[arg(long, value_name = "N", default_value_t = 20)]
        last: usize,
        /// As JSON.
        #[arg(long)]
        json: bool,
        /// The state database (default: from the config).
        #[arg(long, value_name = "FILE")]
        state: Option<PathBuf>,
    },
    /// What contactsync did to one person, from the state's audit (`audit_days`).
    History {
        /// The person's email, key (`external_id:E1`) or external id.
        who: String,
        /// As JSON.
        #[arg(long)]
        json: bool,
        /// The state database (default: from the config).
        #[arg(long, value_name = "FILE")]
        state: Option<PathBuf>,
    },
    /// Serve a read-only web dashboard of the state: pipelines, runs, rejects, people.
    Serve(contactsync_app::serve::ServeArgs),
    /// Run a platform's sandbox on loopback until interrupted, to try a mapping offline.
    Sandbox {
        /// The platform (see `contactsync connectors`).
        name: String,
        /// The port to listen on (default: any free port).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Keep the sandbox's data in this file between runs.
        #[arg(long, value_name = "FILE")]
        data: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    return_freed_memory_promptly();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    init_logging(cli.verbose, cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(Failure { code, error }) => {
            say(tracing::Level::ERROR, &format!("error: {error:#}"));
            ExitCode::from(code)
        }
    }
}

async fn dispatch(cli: Cli) -> Result<u8, Failure> {
    let config_path = settings::locate(cli.config.as_deref());
    match cli.command {
        Command::Connectors => {
            list_connectors();
            Ok(0)
        }
        Command::Sync(args) => {
            let settings = Settings::load(&config_path, args.state.as_deref()).map_err(usage)?;
            sync(&settings, args).await
        }
        Command::Check => {
            let settings = Settings::load(&config_path, None).map_err(usage)?;
            check(&settings).await
        }
        Command::State { command, state } => {
            let path = state_path(&config_path, state)?;
            state_command(&path, command)
        }
        Command::Runs {
            pipeline,
            last,
            json,
            state,
        } => {
            let path = state_path(&config_path, state)?;
            runs_command(&path, pipeline.as_deref(), last, json)
        }
        Command::History { who, json, state } => {
            let path = state_path(&config_path, state)?;
            history_command(&path, &who, json)
        }
        Command::Serve(args) => contactsync_app::serve::serve(&config_path, args).await,
        Command::Sandbox { name, port, data } => sandbox(&name, port, data).await,
    }
}

#[cfg(test)]
mod tests {
    /// The option set is the purge delay: it reads mimalloc v3's default for that
    /// option (1000 ms) before, and the value set after.
    #[test]
    fn the_allocator_option_set_is_the_purge_delay() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return; // the environment decides, and the default is not there to check
        }
        // SAFETY: reads a plain integer option.
        let get = || unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert_eq!(get(), 1000);
        super::return_freed_memory_promptly();
        assert_eq!(get(), 10);
    }
}
