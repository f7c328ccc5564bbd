//! How a run shows itself: one progress bar on a terminal, plain log lines otherwise.
//! Only the binary talks to the terminal.
//!
//! The bar shows one thing at a time: the phase (reading: records and their rate;
//! applying: changes confirmed of the change set), and while a platform job runs, the
//! job's own `records_processed / total_records`, so that it moves during a long
//! import instead of only at the end of each batch.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use contactsync_core::{JobProgress, ProgressReporter};
use contactsync_engine::{Phase, RunObserver};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

/// Draws a run's progress.
pub struct RunProgress {
    /// The one bar, on a terminal.
    bar: Option<ProgressBar>,
    /// Changes confirmed so far in the applying phase, and of how many.
    applied: AtomicU64,
    applying_total: AtomicU64,
    /// Whether the run is in its applying phase (`advance` counts changes then).
    applying: AtomicBool,
    /// Whether the bar shows a platform job now.
    showing_job: Mutex<bool>,
    /// When the last log line about a job was written (off a terminal).
    last_line: Mutex<Instant>,
}

/// A bar's look, with whole-number rates (`3,677/s`, not `3,677.5023/s`).
fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .with_key(
            "rate",
            |state: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{}/s", thousands(state.per_sec() as u64));
            },
        )
        .progress_chars("=> ")
}

/// `1234567` as `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

const APPLYING: &str = "{spinner} {msg:10} [{bar:40}] {pos}/{len} changes ({rate}, {eta})";
const READING: &str = "{spinner} {msg:10} {pos} records ({rate})";
const JOB: &str = "{spinner} {msg:24} [{bar:40}] {pos}/{len} records";
const PLAIN: &str = "{spinner} {msg}";

impl RunProgress {
    /// A progress display; a bar when `interactive` (stderr is a terminal).
    pub fn new(interactive: bool) -> Self {
        let bar = interactive.then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        RunProgress {
            bar,
            applied: AtomicU64::new(0),
            applying_total: AtomicU64::new(0),
            applying: AtomicBool::new(false),
            showing_job: Mutex::new(false),
            last_line: Mutex::new(Instant::now()),
        }
    }

    /// Clears the display.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }

    /// Shows the applying phase again after a job ended.
    fn back_to_applying(&self, bar: &ProgressBar) {
        bar.set_style(style(APPLYING));
        bar.set_message("applying");
        bar.set_length(self.applying_total.load(Ordering::Relaxed));
        bar.set_position(self.applied.load(Ordering::Relaxed));
    }

    fn throttled(&self) -> bool {
        let Ok(mut last) = self.last_line.lock() else {
            return false;
        };
        if last.elapsed() >= Duration::from_secs(5) {
            *last = Instant::now();
            true
        } else {
            false
        }
    }
}

impl ProgressReporter for RunProgress {
    fn job_progress(&self, p: &JobProgress) {
        let Some(bar) = &self.bar else {
            if self.throttled() || p.done >= p.total {
                tracing::info!("{}: {}/{} records processed", p.label, p.done, p.total);
            }
            return;
        };
        let Ok(mut showing) = self.showing_job.lock() else {
            return;
        };
        if p.done >= p.total {
            if *showing {
                *showing = false;
                self.back_to_applying(bar);
            }
            return;
        }
        if !*showing {
            *showing = true;
            bar.set_style(style(JOB));
        }
        bar.set_message(p.label.clone());
        bar.set_length(p.total);
        bar.set_position(p.done);
    }

    fn note(&self, message: &str) {
        match &self.bar {
            Some(bar) => bar.println(message),
            None => tracing::info!("{message}"),
        }
    }
}

impl RunObserver for RunProgress {
    fn phase(&self, phase: Phase, total: Option<u64>) {
        let label = match phase {
            Phase::Recovering => "settling an interrupted run",
            Phase::Reading => "reading",
            Phase::Applying => "applying",
            Phase::Finishing => "finishing",
        };
        if let Ok(mut showing) = self.showing_job.lock() {
            *showing = false;
        }
        self.applying
            .store(phase == Phase::Applying, Ordering::Relaxed);
        let Some(bar) = &self.bar else {
            match (phase, total) {
                (Phase::Applying, Some(total)) => tracing::info!("{label}: {total} changes"),
                (_, Some(total)) => tracing::debug!("{label}: {total}"),
                (_, None) => tracing::debug!("{label}"),
            }
            return;
        };
        bar.reset();
        match (phase, total) {
            (Phase::Applying, Some(total)) => {
                self.applied.store(0, Ordering::Relaxed);
                self.applying_total.store(total, Ordering::Relaxed);
                bar.set_length(total);
                bar.set_style(style(APPLYING));
            }
            (Phase::Reading, _) => {
                bar.unset_length();
                bar.set_style(style(READING));
            }
            _ => {
                bar.unset_length();
                bar.set_style(style(PLAIN));
            }
        }
        bar.set_message(label);
    }

    fn advance(&self, n: u64) {
        let Some(bar) = &self.bar else {
            return;
        };
        if !self.applying.load(Ordering::Relaxed) {
            bar.inc(n);
            return;
        }
        self.applied.fetch_add(n, Ordering::Relaxed);
        match self.showing_job.lock() {
            // A batch ended while its job's bar was shown: back to the change count.
            Ok(mut showing) if *showing => {
                *showing = false;
                self.back_to_applying(bar);
            }
            _ => bar.inc(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::thousands;

    #[test]
    fn rates_are_whole_numbers_with_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(3677), "3,677");
        assert_eq!(thousands(1234567), "1,234,567");
    }
}
