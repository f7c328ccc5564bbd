//! How a run shows itself: progress bars on a terminal, plain log lines otherwise.
//! Only the binary talks to the terminal.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use contactsync_core::{JobProgress, ProgressReporter};
use contactsync_engine::{Phase, RunObserver};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Draws a run's progress.
pub struct Progress {
    bar: Option<ProgressBar>,
    interactive: bool,
    last_line: Mutex<Instant>,
    job: Mutex<Option<ProgressBar>>,
}

impl Progress {
    /// Bars when `interactive`, log lines otherwise.
    pub fn new(interactive: bool) -> Self {
        Progress {
            bar: None,
            interactive,
            last_line: Mutex::new(Instant::now()),
            job: Mutex::new(None),
        }
    }

    /// Clears whatever is drawn.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        if let Ok(mut job) = self.job.lock() {
            if let Some(bar) = job.take() {
                bar.finish_and_clear();
            }
        }
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

/// A bar's look for a phase.
fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
}

impl ProgressReporter for Progress {
    fn job_progress(&self, p: &JobProgress) {
        if self.interactive {
            if let Ok(mut job) = self.job.lock() {
                let bar = job.get_or_insert_with(|| {
                    let bar = ProgressBar::new(p.total);
                    bar.set_draw_target(ProgressDrawTarget::stderr());
                    bar.set_style(style("{msg:30} [{bar:40}] {pos}/{len} ({eta})"));
                    bar
                });
                bar.set_length(p.total);
                bar.set_position(p.done);
                bar.set_message(p.label.clone());
                if p.done >= p.total {
                    bar.finish_and_clear();
                    *job = None;
                }
            }
        } else if self.throttled() || p.done >= p.total {
            tracing::info!("{}: {}/{} records processed", p.label, p.done, p.total);
        }
    }

    fn note(&self, message: &str) {
        match &self.bar {
            Some(bar) if self.interactive => bar.println(message),
            _ => tracing::info!("{message}"),
        }
    }
}

/// One bar, reused across phases.
pub struct RunProgress {
    inner: Progress,
}

impl RunProgress {
    /// A progress display; bars when stderr is a terminal.
    pub fn new(interactive: bool) -> Self {
        let mut inner = Progress::new(interactive);
        if interactive {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.enable_steady_tick(Duration::from_millis(200));
            inner.bar = Some(bar);
        }
        RunProgress { inner }
    }

    /// Clears the display.
    pub fn finish(&self) {
        self.inner.finish();
    }
}

impl ProgressReporter for RunProgress {
    fn job_progress(&self, progress: &JobProgress) {
        self.inner.job_progress(progress)
    }
    fn note(&self, message: &str) {
        self.inner.note(message)
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
        match &self.inner.bar {
            Some(bar) => {
                bar.reset();
                match total {
                    Some(total) => {
                        bar.set_length(total);
                        bar.set_style(style("{msg:12} [{bar:40}] {pos}/{len} ({per_sec}, {eta})"));
                    }
                    None if phase == Phase::Reading => {
                        bar.unset_length();
                        bar.set_style(style("{spinner} {msg:12} {pos} records ({per_sec})"));
                    }
                    None => {
                        bar.unset_length();
                        bar.set_style(style("{spinner} {msg}"));
                    }
                }
                bar.set_message(label);
            }
            None => match (phase, total) {
                (Phase::Applying, Some(total)) => tracing::info!("{label}: {total} changes"),
                (_, Some(total)) => tracing::debug!("{label}: {total}"),
                (_, None) => tracing::debug!("{label}"),
            },
        }
    }

    fn advance(&self, n: u64) {
        if let Some(bar) = &self.inner.bar {
            bar.inc(n);
        }
    }
}
