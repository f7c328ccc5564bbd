//! What a run costs at Actito's documented rate, and the choice it decides: a bulk
//! import or one call a profile.
//!
//! The licence allows 100 calls a minute; one-by-one writing costs a call a change. A
//! bulk import costs a few calls (the POST, its polls, its result) but Actito's own
//! processing, and the entity's imports run one at a time; twelve a day at most. So a
//! run goes bulk when its one-by-one calls would take longer at the rate than the
//! imports it needs, and the day's budget has them.

use std::fmt;
use std::time::Duration;

use contactsync_core::ChangePlan;
use contactsync_http::Rate;

/// Actito's documented rate: "100 calls a minute per licence".
pub const DOCUMENTED_RATE: Rate = Rate::per_minute(100);

/// Calls one import costs besides its polls: the POST, the result, the error report.
pub const CALLS_PER_IMPORT: u64 = 3;

/// The time allowed for Actito's own processing of one import, queue included. Not
/// documented (inferred): minutes for a file of some thousand rows.
pub const IMPORT_ALLOWANCE: Duration = Duration::from_secs(5 * 60);

/// How a run writes, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteChoice {
    /// Bulk imports (removals still go one by one).
    pub bulk: bool,
    /// Imports the change set needs in bulk.
    pub imports: u64,
    /// Calls one by one.
    pub calls: u64,
    /// The time one by one at the rate.
    pub one_by_one: Duration,
    /// The time in bulk at the rate, with the imports' processing.
    pub in_bulk: Duration,
    /// The rate costed at.
    pub rate: Rate,
    /// Set when the choice was not made on time: the configured `bulk_threshold`, or
    /// the day's budget.
    pub reason: Option<String>,
}

impl fmt::Display for WriteChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let imports = format!(
            "{} import{}",
            self.imports,
            if self.imports == 1 { "" } else { "s" }
        );
        if self.bulk {
            write!(
                f,
                "bulk: {imports} (≈ {}) instead of {} calls (≈ {}) at {}",
                minutes(self.in_bulk),
                self.calls,
                minutes(self.one_by_one),
                self.rate
            )?;
        } else {
            write!(
                f,
                "one by one: {} calls (≈ {}) at {}",
                self.calls,
                minutes(self.one_by_one),
                self.rate
            )?;
            if self.imports > 0 {
                write!(f, " instead of {imports} (≈ {})", minutes(self.in_bulk))?;
            }
        }
        if let Some(reason) = &self.reason {
            write!(f, "; {reason}")?;
        }
        Ok(())
    }
}

fn minutes(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 90.0 {
        format!("{secs:.0} s")
    } else if secs < 5400.0 {
        format!("{:.0} min", secs / 60.0)
    } else {
        format!("{:.1} h", secs / 3600.0)
    }
}

/// The calls one import costs: [`CALLS_PER_IMPORT`] and a poll every `poll_interval`
/// through the [`IMPORT_ALLOWANCE`].
fn calls_per_import(poll_interval: Duration) -> u64 {
    let polls =
        (IMPORT_ALLOWANCE.as_secs_f64() / poll_interval.as_secs_f64().max(0.01)).ceil() as u64;
    CALLS_PER_IMPORT + polls
}

/// The time `calls` take at `rate` (calls ÷ rate).
pub fn at_rate(calls: u64, rate: Rate) -> Duration {
    rate.per.mul_f64(calls as f64 / f64::from(rate.calls))
}

/// What writing `plan` costs each way, and the choice: bulk when it is quicker at
/// `rate` and the day has `imports_left` for it; `threshold` (the configured
/// `bulk_threshold`) overrides the time rule.
pub fn choose(
    plan: &ChangePlan,
    rate: Rate,
    max_batch: usize,
    poll_interval: Duration,
    threshold: Option<u64>,
    imports_left: u32,
) -> WriteChoice {
    let upserts = plan.creates + plan.updates;
    let calls = plan.total();
    let imports = upserts.div_ceil(max_batch.max(1) as u64);
    let in_bulk = at_rate(
        imports * calls_per_import(poll_interval) + plan.removals,
        rate,
    ) + IMPORT_ALLOWANCE * u32::try_from(imports).unwrap_or(u32::MAX);
    let one_by_one = at_rate(calls, rate);
    let mut choice = WriteChoice {
        bulk: false,
        imports,
        calls,
        one_by_one,
        in_bulk,
        rate,
        reason: None,
    };
    if imports == 0 {
        return choice;
    }
    choice.bulk = match threshold {
        Some(t) => {
            choice.reason = Some(format!("`bulk_threshold` is {t}"));
            calls >= t
        }
        None => in_bulk < one_by_one,
    };
    if choice.bulk && imports > u64::from(imports_left) {
        choice.bulk = false;
        choice.reason = Some(format!("{imports_left} of today's 12 imports left"));
    }
    choice
}

/// The smallest group of rows worth an import of its own at `rate`: below it, its rows
/// go one by one quicker.
pub fn break_even(rate: Rate, poll_interval: Duration) -> u64 {
    let one_import = at_rate(calls_per_import(poll_interval), rate) + IMPORT_ALLOWANCE;
    (one_import.as_secs_f64() / rate.per.as_secs_f64() * f64::from(rate.calls)).ceil() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(creates: u64, updates: u64, removals: u64) -> ChangePlan {
        ChangePlan {
            creates,
            updates,
            removals,
        }
    }

    #[test]
    fn a_large_change_set_goes_bulk_and_says_why() {
        let c = choose(
            &plan(2000, 400, 0),
            DOCUMENTED_RATE,
            100_000,
            Duration::from_secs(5),
            None,
            12,
        );
        assert!(c.bulk);
        assert_eq!(c.imports, 1);
        assert_eq!(c.one_by_one, Duration::from_secs(24 * 60));
        assert_eq!(
            c.to_string(),
            "bulk: 1 import (≈ 6 min) instead of 2400 calls (≈ 24 min) at 100/min"
        );
    }

    #[test]
    fn a_small_one_goes_one_by_one() {
        let c = choose(
            &plan(100, 50, 10),
            DOCUMENTED_RATE,
            100_000,
            Duration::from_secs(5),
            None,
            12,
        );
        assert!(!c.bulk);
        assert_eq!(
            c.to_string(),
            "one by one: 160 calls (≈ 2 min) at 100/min instead of 1 import (≈ 6 min)"
        );
    }

    #[test]
    fn the_threshold_and_the_budget_override_time() {
        let small = plan(20, 0, 0);
        let c = choose(
            &small,
            DOCUMENTED_RATE,
            100_000,
            Duration::from_secs(5),
            Some(10),
            12,
        );
        assert!(c.bulk);
        let big = plan(100_000, 0, 0);
        let c = choose(
            &big,
            DOCUMENTED_RATE,
            20_000,
            Duration::from_secs(5),
            None,
            3,
        );
        assert!(!c.bulk, "5 imports, 3 left");
        assert!(
            c.to_string().ends_with("3 of today's 12 imports left"),
            "{c}"
        );
    }

    #[test]
    fn break_even_is_where_an_import_is_quicker() {
        let n = break_even(DOCUMENTED_RATE, Duration::from_secs(5));
        assert!(at_rate(n, DOCUMENTED_RATE) >= IMPORT_ALLOWANCE);
        assert!(n > 500 && n < 700, "{n}");
    }
}
