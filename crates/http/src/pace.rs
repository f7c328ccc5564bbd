//! Pacing: a client keeps to the platform's documented rate and concurrency itself,
//! rather than learning them from slowed calls and 429s.
//!
//! The rate is a sliding window: at most `calls` requests in any `per` (Actito: 100 a
//! minute; Poppulo: about 1,000 an hour). A call that would be one too many waits until
//! the oldest call of the window is `per` old, dated by its answer (the platform saw
//! it no later than that). So a run of fewer calls than the window
//! holds goes at full speed, and no window ever holds more than the documented count.
//! (A token bucket, as the `governor` crate keeps, admits its burst *and* the refill
//! within one window: up to twice the documented count in the first minute, which a
//! service that counts per window slows.)
//!
//! The concurrency bound is a semaphore: a call holds one of `max_in_flight` permits
//! from before its request is sent until its answer is read.
//!
//! Every attempt counts, retries included: the platform counts them too. One [`Pacer`]
//! is shared by all clones of an [`crate::HttpClient`], so one connector instance keeps
//! one budget across its concurrent calls.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use contactsync_core::{CancellationToken, ConnectorError};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// A documented rate: at most `calls` requests in any `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// The most requests in one window (at least 1).
    pub calls: u32,
    /// The window.
    pub per: Duration,
}

impl Rate {
    /// `calls` a minute.
    pub const fn per_minute(calls: u32) -> Rate {
        Rate {
            calls,
            per: Duration::from_secs(60),
        }
    }

    /// `calls` an hour.
    pub const fn per_hour(calls: u32) -> Rate {
        Rate {
            calls,
            per: Duration::from_secs(3600),
        }
    }

    /// Reads `"100/min"`, `"1000/h"`, `"20/s"`, `"100/1m"` or `"500/90s"`: a count, a
    /// slash and a window (a humantime duration; a bare unit means one of it).
    ///
    /// ```
    /// use contactsync_http::Rate;
    /// assert_eq!(Rate::parse("100/min"), Ok(Rate::per_minute(100)));
    /// assert_eq!(Rate::parse("1000/h"), Ok(Rate::per_hour(1000)));
    /// assert!(Rate::parse("0/min").is_err());
    /// ```
    pub fn parse(text: &str) -> Result<Rate, String> {
        let usage =
            "write a count and a window, as \"100/min\", \"1000/h\" or \"20/s\", or \"off\"";
        let (count, window) = text
            .split_once('/')
            .ok_or_else(|| format!("not a rate: {text:?}; {usage}"))?;
        let calls: u32 = count.trim().parse().map_err(|_| {
            format!("not a rate: {text:?} (the count is not a whole number); {usage}")
        })?;
        if calls == 0 {
            return Err(format!(
                "not a rate: {text:?} (the count must be at least 1); {usage}"
            ));
        }
        let window = window.trim();
        let window = if window.starts_with(|c: char| c.is_ascii_alphabetic()) {
            format!("1{window}")
        } else {
            window.to_string()
        };
        let per = humantime::parse_duration(&window)
            .map_err(|e| format!("not a rate: {text:?} ({e}); {usage}"))?;
        if per.is_zero() {
            return Err(format!(
                "not a rate: {text:?} (the window must be longer than 0); {usage}"
            ));
        }
        Ok(Rate { calls, per })
    }

    /// How long `requests` take at this rate, beyond the first window's worth (which
    /// goes at once): the time a run of that many calls needs at the documented rate.
    pub fn time_for(&self, requests: u64) -> Duration {
        let calls = u64::from(self.calls);
        if requests <= calls {
            return Duration::ZERO;
        }
        let windows = (requests - 1) / calls;
        self.per
            .saturating_mul(u32::try_from(windows).unwrap_or(u32::MAX))
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let per = match self.per.as_secs() {
            60 => "min".to_string(),
            3600 => "h".to_string(),
            1 => "s".to_string(),
            _ => humantime::format_duration(self.per).to_string(),
        };
        write!(f, "{}/{per}", self.calls)
    }
}

/// How a client paces its calls: `None` fields do not bound.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pace {
    /// The documented rate.
    pub rate: Option<Rate>,
    /// The most calls in flight at once.
    pub max_in_flight: Option<u32>,
}

/// The calls of the current window: those answered (when, since the platform saw
/// them no later than that) and those still in flight (counted, not yet dated).
#[derive(Debug, Default)]
struct Window {
    answered: VecDeque<Instant>,
    in_flight: usize,
}

/// The shared state of a [`Pace`]: the window's calls and the in-flight permits.
/// Cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct Pacer {
    window: Option<(Rate, Arc<std::sync::Mutex<Window>>, Arc<Notify>)>,
    slots: Option<Arc<Semaphore>>,
}

impl fmt::Debug for Pacer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pacer")
            .field("rate", &self.window.as_ref().map(|(r, _, _)| *r))
            .field("slots", &self.slots.as_ref().map(|s| s.available_permits()))
            .finish()
    }
}

/// What a paced call holds while it is in flight. Dropped when its answer is read:
/// the call is then dated in the window by that moment. Dating it by its answer, not
/// by its sending, keeps a margin for the time the request took to arrive, so that
/// the platform, which counts arrivals, never sees one call too many in a window.
pub(crate) struct Slot {
    window: Option<(Arc<std::sync::Mutex<Window>>, Arc<Notify>)>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some((window, notify)) = self.window.take() {
            {
                let mut w = window.lock().unwrap_or_else(|e| e.into_inner());
                w.in_flight = w.in_flight.saturating_sub(1);
                w.answered.push_back(Instant::now());
            }
            notify.notify_waiters();
        }
    }
}

impl Pacer {
    pub(crate) fn new(pace: Pace) -> Pacer {
        Pacer {
            window: pace.rate.map(|r| {
                (
                    r,
                    Arc::new(std::sync::Mutex::new(Window::default())),
                    Arc::new(Notify::new()),
                )
            }),
            slots: pace
                .max_in_flight
                .map(|n| Arc::new(Semaphore::new(n.max(1) as usize))),
        }
    }

    /// Waits for a free slot and the window's room, then takes both.
    pub(crate) async fn acquire(
        &self,
        cancel: Option<&CancellationToken>,
    ) -> Result<Slot, ConnectorError> {
        let permit = match &self.slots {
            Some(slots) => {
                let acquire = slots.clone().acquire_owned();
                let permit = match cancel {
                    Some(c) => tokio::select! {
                        () = c.cancelled() => return Err(ConnectorError::Cancelled),
                        p = acquire => p,
                    },
                    None => acquire.await,
                };
                // The semaphore is never closed.
                permit.ok()
            }
            None => None,
        };
        let mut slot = Slot {
            window: None,
            _permit: permit,
        };
        if let Some((rate, window, notify)) = &self.window {
            loop {
                // Created before the check, so that an answer read in between wakes it.
                let answered = notify.notified();
                let wait = {
                    let mut w = window.lock().unwrap_or_else(|e| e.into_inner());
                    let now = Instant::now();
                    while w
                        .answered
                        .front()
                        .is_some_and(|t| now.duration_since(*t) >= rate.per)
                    {
                        w.answered.pop_front();
                    }
                    if w.answered.len() + w.in_flight < rate.calls as usize {
                        w.in_flight += 1;
                        None
                    } else {
                        // Until the oldest answered call leaves the window, or, with
                        // every call of the window still in flight, an answer.
                        Some(
                            w.answered
                                .front()
                                .map(|oldest| rate.per.saturating_sub(now.duration_since(*oldest))),
                        )
                    }
                };
                let Some(wait) = wait else { break };
                tracing::debug!(rate = %rate, "pacing to the platform's rate");
                let sleep = tokio::time::sleep(wait.unwrap_or(rate.per));
                match cancel {
                    Some(c) => tokio::select! {
                        () = c.cancelled() => return Err(ConnectorError::Cancelled),
                        () = sleep => {}
                        () = answered => {}
                    },
                    None => tokio::select! {
                        () = sleep => {}
                        () = answered => {}
                    },
                }
            }
            slot.window = Some((window.clone(), notify.clone()));
        }
        Ok(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_read_as_written() {
        assert_eq!(Rate::parse("100/min"), Ok(Rate::per_minute(100)));
        assert_eq!(Rate::parse(" 100 / 1m "), Ok(Rate::per_minute(100)));
        assert_eq!(Rate::parse("1000/h"), Ok(Rate::per_hour(1000)));
        assert_eq!(
            Rate::parse("20/s"),
            Ok(Rate {
                calls: 20,
                per: Duration::from_secs(1)
            })
        );
        for bad in ["100", "x/min", "0/min", "100/0s", "100/fortnight"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Rate::per_minute(100).to_string(), "100/min");
    }

    #[test]
    fn time_for_counts_whole_windows_past_the_first() {
        let r = Rate::per_minute(100);
        assert_eq!(r.time_for(0), Duration::ZERO);
        assert_eq!(r.time_for(100), Duration::ZERO);
        assert_eq!(r.time_for(101), Duration::from_secs(60));
        assert_eq!(r.time_for(100_003), Duration::from_secs(60 * 1000));
    }

    #[tokio::test]
    async fn no_window_holds_more_than_the_rate() {
        let window = Duration::from_millis(200);
        let pacer = Pacer::new(Pace {
            rate: Some(Rate {
                calls: 3,
                per: window,
            }),
            max_in_flight: None,
        });
        let start = Instant::now();
        let mut at = Vec::new();
        for _ in 0..7 {
            let _slot = pacer.acquire(None).await.expect("slot");
            at.push(start.elapsed());
        }
        // Three at once, three a window later, one more a window after that.
        assert!(at[..3].iter().all(|d| *d < window / 2), "{at:?}");
        assert!(at[3..6].iter().all(|d| *d >= window), "{at:?}");
        assert!(at[6] >= window * 2, "{at:?}");
    }

    #[tokio::test]
    async fn no_more_than_max_in_flight_at_once() {
        let pacer = Pacer::new(Pace {
            rate: None,
            max_in_flight: Some(2),
        });
        let a = pacer.acquire(None).await.expect("a");
        let _b = pacer.acquire(None).await.expect("b");
        let third = tokio::time::timeout(Duration::from_millis(50), pacer.acquire(None)).await;
        assert!(third.is_err(), "a third waits while two are in flight");
        drop(a);
        let third = tokio::time::timeout(Duration::from_millis(500), pacer.acquire(None)).await;
        assert!(third.is_ok());
    }
}
