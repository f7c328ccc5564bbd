//! The `contactsync` application as a library: pipelines and `sync --all`, job groups,
//! workers and slots, notifications, metrics, the in-process sandboxes, and the other
//! commands. `main.rs` parses the arguments and dispatches here; unit tests reach every
//! part without running the binary.
//!
//! Every outcome becomes one clear sentence and an exit code (0 synced, 1 failure, 2
//! usage or config error, 3 rejected records or removals held back, 4 refused by the
//! removal guard, 5 locked, 130 interrupted).

/// `println!` that a closed stdout does not stop: when the reader went away
/// (`contactsync sync --all | head -1`), the output ends quietly and the work goes on
/// (`println!` would panic, and the pipelines after it would never run).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

pub mod check;
pub mod commands;
pub mod connectors;
pub mod jsonlog;
pub mod metrics;
pub mod notify;
pub mod output;
pub mod progress;
pub mod report_text;
pub mod serve;
pub mod settings;
pub mod sync;

pub use check::*;
pub use commands::*;
pub use connectors::*;
pub use output::*;
pub use report_text::*;
pub use sync::*;
