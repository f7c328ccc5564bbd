//! When to try again, and how long to wait first.
//!
//! The policy is bounded three ways (attempts, total time, largest single wait) so that
//! a nightly run always ends; what counts as worth retrying is the connector's call,
//! through [`Classify`], with [`Decision::standard`] as the shared default.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;

use crate::Answer;

/// How a [`crate::Call`] retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The most attempts of one call, the first included (1 = never retry).
    /// [`Decision::Wait`] tries do not count against it.
    pub max_attempts: u32,
    /// The backoff before the first retry; doubled at each further retry.
    pub base_backoff: Duration,
    /// The longest backoff computed from `base_backoff` (a platform's `Retry-After` may
    /// ask for longer, up to what is left of `max_elapsed`).
    pub max_backoff: Duration,
    /// The most time one call may spend, waits included, outside [`Decision::Wait`]s.
    /// A `Retry-After` that would end beyond it makes the call give up at once.
    pub max_elapsed: Duration,
    /// Whether connection errors and timeouts are retried. Turn off for a call that
    /// must not be repeated if it may have reached the platform.
    pub retry_transport_errors: bool,
}

impl Default for RetryPolicy {
    /// 5 attempts, 1 s doubling up to 60 s, at most 10 minutes in all.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            base_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            max_elapsed: Duration::from_secs(600),
            retry_transport_errors: true,
        }
    }
}

impl RetryPolicy {
    /// A policy that never retries.
    pub fn never() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// The backoff before retry number `retry` (1-based): exponential from
    /// `base_backoff`, capped at `max_backoff`, with "equal jitter" (between half and
    /// all of it) so that many clients do not retry in step.
    pub fn backoff(&self, retry: u32) -> Duration {
        let exp = retry.saturating_sub(1).min(20);
        let full = self
            .base_backoff
            .saturating_mul(1u32 << exp)
            .min(self.max_backoff);
        let half = full / 2;
        let jitter_ms =
            rand::thread_rng().gen_range(0..=half.as_millis().min(u64::MAX as u128) as u64);
        half + Duration::from_millis(jitter_ms)
    }
}

/// What to do with an answer. Returned by a [`Classify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Hand the answer to the caller, whatever its status: the caller interprets it.
    Accept,
    /// Stop and return the answer as an error ([`Answer::error`]).
    Fail,
    /// A transient failure: try again after the policy's backoff, within its bounds.
    Retry,
    /// The platform said when to come back (`Retry-After`): try again after this delay,
    /// within the policy's bounds (counts as an attempt).
    RetryAfter(Duration),
    /// A known, longer condition (another import running in the account): wait `delay`
    /// and try again, for at most `bound` in all since the first such answer of this
    /// call. These tries count against neither `max_attempts` nor `max_elapsed`;
    /// `note` is reported through the call's [`contactsync_core::ProgressReporter`].
    Wait {
        /// The wait before the next try.
        delay: Duration,
        /// The most time to spend waiting for this condition, in all.
        bound: Duration,
        /// What is being waited for, in a sentence (`another import is running`).
        note: String,
    },
}

impl Decision {
    /// The shared default reading of an answer:
    /// - 1xx/2xx/3xx: [`Decision::Accept`];
    /// - 429 or 503 with a readable `Retry-After`: [`Decision::RetryAfter`];
    /// - 408, 429, and every 5xx: [`Decision::Retry`];
    /// - any other 4xx: [`Decision::Fail`] (not retried: sending it again would be
    ///   refused again).
    pub fn standard(answer: &Answer) -> Decision {
        let status = answer.status().as_u16();
        match status {
            0..=399 => Decision::Accept,
            429 | 503 => match answer.retry_after() {
                Some(delay) => Decision::RetryAfter(delay),
                None => Decision::Retry,
            },
            408 | 500..=599 => Decision::Retry,
            _ => Decision::Fail,
        }
    }
}

/// A connector's reading of answers. Implemented for every
/// `Fn(&Answer) -> Decision + Send + Sync`, so a closure will do; call
/// [`Decision::standard`] for what the connector has no special rule for.
pub trait Classify: Send + Sync {
    /// What to do with `answer`.
    fn classify(&self, answer: &Answer) -> Decision;
}

impl<F> Classify for F
where
    F: Fn(&Answer) -> Decision + Send + Sync,
{
    fn classify(&self, answer: &Answer) -> Decision {
        self(answer)
    }
}

/// The standard classifier, [`Decision::standard`].
pub(crate) struct Standard;

impl Classify for Standard {
    fn classify(&self, answer: &Answer) -> Decision {
        Decision::standard(answer)
    }
}

/// Parses a `Retry-After` value (delay-seconds, or an HTTP-date as in RFC 9110:
/// `Wed, 21 Oct 2015 07:28:00 GMT`) into a delay from `now`. A date in the past is a
/// zero delay; an unreadable value is `None`.
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    // Some servers send fractional seconds; be liberal.
    if let Ok(secs) = value.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Some(Duration::from_secs_f64(secs.min(1e9)));
        }
    }
    let when = DateTime::parse_from_rfc2822(value)
        .ok()
        .map(|d| d.with_timezone(&Utc))
        .or_else(|| {
            // RFC 850 and asctime forms, obsolete but allowed for recipients.
            chrono::NaiveDateTime::parse_from_str(value, "%A, %d-%b-%y %H:%M:%S GMT")
                .or_else(|_| chrono::NaiveDateTime::parse_from_str(value, "%a %b %e %H:%M:%S %Y"))
                .ok()
                .map(|n| n.and_utc())
        })?;
    Some((when - now).to_std().unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = DateTime::parse_from_rfc3339("2015-10-21T07:28:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Wednesday, 21-Oct-15 07:29:00 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
            ..RetryPolicy::default()
        };
        for _ in 0..50 {
            let b1 = p.backoff(1);
            assert!(b1 >= Duration::from_millis(50) && b1 <= Duration::from_millis(100));
            let b3 = p.backoff(3);
            assert!(b3 >= Duration::from_millis(200) && b3 <= Duration::from_millis(400));
            let b30 = p.backoff(30);
            assert!(b30 >= Duration::from_millis(500) && b30 <= Duration::from_millis(1000));
        }
    }
}
