//! Following an asynchronous import job on a platform, once for every sink that posts
//! one (Poppulo's subscriber imports, Actito's bulk imports).
//!
//! A sink describes its platform's job with [`ImportJob`] (post, poll, fetch the
//! result); [`JobFollower`] does the rest the same way for all of them:
//!
//! - the job's entry goes into the sink's [`SinkStore`] (a [`JobLedger`]) the moment
//!   the platform took it, so a crash from then on resumes the job instead of posting
//!   another (a post is not idempotent: it is never made again blindly);
//! - polls honour the platform's "ask again after" hint, never faster than the
//!   minimum interval, and stop at the maximum wait or on cancellation, leaving the
//!   job in the ledger for the next run;
//! - progress goes to the run's progress bar;
//! - an ended job leaves the ledger once its result is read, so it is never followed
//!   twice.
//!
//! Nothing here speaks HTTP: the sink's [`ImportJob`] does.

use std::marker::PhantomData;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::sink::{JobProgress, ProgressReporter, SinkContext, SinkStore};
use crate::ConnectorError;

/// What a poll of a job said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobPoll<C> {
    /// Queued or running.
    Running {
        /// Rows processed so far, when the platform says.
        done: Option<u64>,
        /// Rows in the job, when the platform says.
        total: Option<u64>,
        /// When the platform asks to be polled again (Poppulo's `ping_after`).
        ask_again_in: Option<Duration>,
    },
    /// It ended and its result can be read; what the poll said at the end.
    Completed(C),
    /// It ended without importing (failed, or cancelled on the platform), with why.
    Failed(String),
}

/// What posting a job came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Posted {
    /// Taken: the job's handle (an id or a URL).
    Accepted(String),
    /// Refused, with what the platform said: nothing was taken.
    Refused(String),
    /// The answer was lost: whether the platform took the job is unknown. It is not
    /// posted again; its rows are sent again by the next run.
    Unknown(String),
}

/// What a sink keeps of a job in flight: enough to follow it and read its result in a
/// later run (the rows it carried, in order).
pub trait JobEntry: Serialize + DeserializeOwned + Clone + Send + Sync {
    /// The job's handle, as [`Posted::Accepted`] gave it.
    fn handle(&self) -> &str;
    /// How many rows the job carries (for the progress bar).
    fn rows(&self) -> usize;
}

/// A platform's asynchronous import job: how to post one, poll it and read its result.
#[async_trait]
pub trait ImportJob: Send + Sync {
    /// What a post sends (the file, its rows' key column).
    type Payload: Send;
    /// What the sink keeps of a job in flight.
    type Entry: JobEntry;
    /// What the last poll said of a completed job.
    type Completed: Send;
    /// What reading a completed job's result gives the sink.
    type Result: Send;

    /// How the job is named in logs and progress (`Poppulo import 6732468`).
    fn label(&self, handle: &str) -> String;

    /// Posts a job. Retries of a refusal that means "later" (a busy account, a
    /// concurrent-request limit) happen here; a lost answer is [`Posted::Unknown`].
    async fn post(
        &self,
        payload: Self::Payload,
        progress: &dyn ProgressReporter,
        cancel: &CancellationToken,
    ) -> Result<Posted, ConnectorError>;

    /// Asks how the job stands.
    async fn poll(
        &self,
        handle: &str,
        cancel: &CancellationToken,
    ) -> Result<JobPoll<Self::Completed>, ConnectorError>;

    /// Reads the result of a completed job (the rows it rejected, mapped onto
    /// `entry`'s rows).
    async fn result(
        &self,
        entry: &Self::Entry,
        completed: Self::Completed,
        cancel: &CancellationToken,
    ) -> Result<Self::Result, ConnectorError>;
}

/// How often and how long a job is polled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobTiming {
    /// Before the first poll of a job (zero: at once, as for a job an earlier run left).
    pub first_poll: Duration,
    /// Between polls when the platform gives no hint.
    pub poll_interval: Duration,
    /// The shortest wait between polls, whatever the platform's hint.
    pub min_poll_interval: Duration,
    /// How long one run follows a job before leaving it to the next run.
    pub max_wait: Duration,
}

/// Added to the platform's "ask again after" so the poll lands after it.
const HINT_MARGIN: Duration = Duration::from_millis(100);

/// How following a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Followed<R> {
    /// It completed; its result.
    Completed(R),
    /// Still running after the maximum wait, or the run was cancelled: it stays in the
    /// ledger and the next run resumes following it. Why, for the rows' outcomes.
    Pending(String),
    /// It failed or was cancelled on the platform: nothing to resume, it left the
    /// ledger. Why.
    Ended(String),
}

/// How waiting for a job ended, its result not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Waited<C> {
    /// It completed; what the last poll said.
    Completed(C),
    /// Still running, or cancelled; why.
    Pending(String),
    /// It failed on the platform; why.
    Failed(String),
}

/// How posting and following a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted<R> {
    /// The platform took it; how following it ended.
    Followed(Followed<R>),
    /// The platform refused it; nothing was taken.
    Refused(String),
    /// The answer was lost; see [`Posted::Unknown`].
    Unknown(String),
}

/// The jobs a sink posted and has not seen end, under one key of its [`SinkStore`]:
/// a JSON list of entries. A single entry (as earlier versions kept one) is read as
/// a list of one.
#[derive(Debug, Clone)]
pub struct JobLedger<E> {
    key: String,
    entries: PhantomData<fn() -> E>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stored<E> {
    Many(Vec<E>),
    One(E),
}

impl<E: JobEntry> JobLedger<E> {
    /// The ledger kept under `key`.
    pub fn new(key: impl Into<String>) -> Self {
        JobLedger {
            key: key.into(),
            entries: PhantomData,
        }
    }

    /// The store key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The entries kept, or `None` when nothing is kept. A value this version cannot
    /// read goes to `legacy` (an older format the sink still reads), whose `None`
    /// drops it: a job that cannot be followed must not wedge the pipeline, and its
    /// rows are sent again.
    pub fn load(
        &self,
        store: &dyn SinkStore,
        legacy: impl FnOnce(&str) -> Option<Vec<E>>,
    ) -> Result<Option<Vec<E>>, ConnectorError> {
        let Some(text) = store.get(&self.key)? else {
            return Ok(None);
        };
        Ok(match serde_json::from_str::<Stored<E>>(&text) {
            Ok(Stored::Many(entries)) => Some(entries),
            Ok(Stored::One(entry)) => Some(vec![entry]),
            Err(_) => {
                let entries = legacy(&text);
                if entries.is_none() {
                    tracing::warn!(key = %self.key, "a job record this version cannot read is dropped; its rows are sent again");
                }
                entries
            }
        })
    }

    /// Keeps `entries` (none: the key is removed).
    pub fn save(&self, store: &mut dyn SinkStore, entries: &[E]) -> Result<(), ConnectorError> {
        if entries.is_empty() {
            return store.remove(&self.key);
        }
        let json = serde_json::to_string(entries)
            .map_err(|e| ConnectorError::Other(format!("cannot record the job: {e}")))?;
        store.put(&self.key, &json)
    }

    /// Adds `entry` to those kept.
    pub fn add(&self, store: &mut dyn SinkStore, entry: E) -> Result<(), ConnectorError> {
        let mut entries = self.load(store, |_| None)?.unwrap_or_default();
        entries.push(entry);
        self.save(store, &entries)
    }

    /// Forgets the job `handle`. A value in an older format (read by the sink's
    /// `legacy`) names a single job: it is removed whole.
    pub fn forget(&self, store: &mut dyn SinkStore, handle: &str) -> Result<(), ConnectorError> {
        let Some(text) = store.get(&self.key)? else {
            return Ok(());
        };
        let mut entries = match serde_json::from_str::<Stored<E>>(&text) {
            Ok(Stored::Many(entries)) => entries,
            Ok(Stored::One(entry)) => vec![entry],
            Err(_) => return store.remove(&self.key),
        };
        entries.retain(|e| e.handle() != handle);
        self.save(store, &entries)
    }
}

/// Posts, keeps and follows the jobs of one [`ImportJob`].
pub struct JobFollower<'a, J: ImportJob> {
    job: &'a J,
    ledger: &'a JobLedger<J::Entry>,
    timing: JobTiming,
}

impl<'a, J: ImportJob> JobFollower<'a, J> {
    /// A follower of `job`'s jobs, kept in `ledger`.
    pub fn new(job: &'a J, ledger: &'a JobLedger<J::Entry>, timing: JobTiming) -> Self {
        JobFollower {
            job,
            ledger,
            timing,
        }
    }

    /// Posts `payload`; once the platform took it, keeps `entry(handle)` in the ledger
    /// and follows the job to its end (or the maximum wait).
    pub async fn submit(
        &self,
        payload: J::Payload,
        entry: impl FnOnce(String) -> J::Entry + Send,
        ctx: &mut SinkContext<'_>,
    ) -> Result<Submitted<J::Result>, ConnectorError> {
        let handle = match self.job.post(payload, ctx.progress, &ctx.cancel).await? {
            Posted::Accepted(handle) => handle,
            Posted::Refused(why) => return Ok(Submitted::Refused(why)),
            Posted::Unknown(why) => return Ok(Submitted::Unknown(why)),
        };
        let entry = entry(handle);
        // At once: a crash from here on resumes this job instead of posting another.
        self.ledger.add(ctx.store, entry.clone())?;
        tracing::info!(job = %entry.handle(), rows = entry.rows(), "{} posted", self.job.label(entry.handle()));
        self.follow(&entry, ctx).await.map(Submitted::Followed)
    }

    /// Follows the job of `entry` (posted by this run or an earlier one) to its end,
    /// reads its result and forgets it; a job still running after the maximum wait
    /// stays in the ledger.
    pub async fn follow(
        &self,
        entry: &J::Entry,
        ctx: &mut SinkContext<'_>,
    ) -> Result<Followed<J::Result>, ConnectorError> {
        let handle = entry.handle();
        match self
            .wait(handle, Some(entry.rows()), ctx.progress, &ctx.cancel)
            .await?
        {
            Waited::Pending(why) => Ok(Followed::Pending(why)),
            Waited::Failed(why) => {
                self.ledger.forget(ctx.store, handle)?;
                Ok(Followed::Ended(why))
            }
            Waited::Completed(completed) => {
                let result = self.job.result(entry, completed, &ctx.cancel).await?;
                self.ledger.forget(ctx.store, handle)?;
                Ok(Followed::Completed(result))
            }
        }
    }

    /// Polls job `handle` until it ends, the maximum wait passes or the run is
    /// cancelled. Reads no result and leaves the ledger as it is. `rows`, when known,
    /// completes the progress bar at the end.
    pub async fn wait(
        &self,
        handle: &str,
        rows: Option<usize>,
        progress: &dyn ProgressReporter,
        cancel: &CancellationToken,
    ) -> Result<Waited<J::Completed>, ConnectorError> {
        let label = self.job.label(handle);
        let started = Instant::now();
        let mut wait = self.timing.first_poll;
        let cancelled = || {
            Waited::Pending(format!(
                "cancelled while {label} was running; the next run resumes it"
            ))
        };
        loop {
            if !wait.is_zero() {
                tokio::select! {
                    () = cancel.cancelled() => return Ok(cancelled()),
                    () = tokio::time::sleep(wait) => {}
                }
            } else if cancel.is_cancelled() {
                return Ok(cancelled());
            }
            let poll = match self.job.poll(handle, cancel).await {
                Ok(poll) => poll,
                Err(ConnectorError::Cancelled) => return Ok(cancelled()),
                Err(e) => return Err(e),
            };
            match poll {
                JobPoll::Running {
                    done,
                    total,
                    ask_again_in,
                } => {
                    if let (Some(done), Some(total)) = (done, total) {
                        progress.job_progress(&JobProgress {
                            label: label.clone(),
                            done,
                            total,
                        });
                    }
                    wait = ask_again_in
                        .map(|d| d + HINT_MARGIN)
                        .unwrap_or(self.timing.poll_interval)
                        .max(self.timing.min_poll_interval);
                    if started.elapsed() + wait > self.timing.max_wait {
                        tracing::warn!(job = %handle, "{label} still running after {}s; the next run resumes following it", started.elapsed().as_secs());
                        return Ok(Waited::Pending(format!(
                            "{label} still running; the next run resumes following it"
                        )));
                    }
                }
                JobPoll::Completed(completed) => {
                    if let Some(rows) = rows {
                        progress.job_progress(&JobProgress {
                            label: label.clone(),
                            done: rows as u64,
                            total: rows as u64,
                        });
                    }
                    return Ok(Waited::Completed(completed));
                }
                JobPoll::Failed(why) => {
                    tracing::error!(job = %handle, "{label} ended: {why}; its rows are sent again by the next run");
                    progress.note(&format!("{label} ended: {why}; its rows are sent again"));
                    return Ok(Waited::Failed(format!("{label} ended: {why}")));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::NoProgress;
    use std::collections::HashMap;
    use std::sync::Mutex;

    #[derive(Default)]
    struct MemoryStore(HashMap<String, String>);

    impl SinkStore for MemoryStore {
        fn get(&self, key: &str) -> Result<Option<String>, ConnectorError> {
            Ok(self.0.get(key).cloned())
        }
        fn put(&mut self, key: &str, value: &str) -> Result<(), ConnectorError> {
            self.0.insert(key.to_string(), value.to_string());
            Ok(())
        }
        fn remove(&mut self, key: &str) -> Result<(), ConnectorError> {
            self.0.remove(key);
            Ok(())
        }
    }

    #[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
    struct Entry {
        id: String,
        rows: Vec<String>,
    }

    impl JobEntry for Entry {
        fn handle(&self) -> &str {
            &self.id
        }
        fn rows(&self) -> usize {
            self.rows.len()
        }
    }

    /// A job that answers the polls it was given, in order, then keeps running.
    struct Scripted {
        polls: Mutex<Vec<JobPoll<u32>>>,
        posted: Mutex<u32>,
        post_answer: Posted,
    }

    impl Scripted {
        fn new(post_answer: Posted, polls: Vec<JobPoll<u32>>) -> Self {
            Scripted {
                polls: Mutex::new(polls.into_iter().rev().collect()),
                posted: Mutex::new(0),
                post_answer,
            }
        }
    }

    fn running(ask_again_in: Option<Duration>) -> JobPoll<u32> {
        JobPoll::Running {
            done: Some(1),
            total: Some(2),
            ask_again_in,
        }
    }

    #[async_trait]
    impl ImportJob for Scripted {
        type Payload = ();
        type Entry = Entry;
        type Completed = u32;
        type Result = String;

        fn label(&self, handle: &str) -> String {
            format!("job {handle}")
        }
        async fn post(
            &self,
            _: (),
            _progress: &dyn ProgressReporter,
            _cancel: &CancellationToken,
        ) -> Result<Posted, ConnectorError> {
            *self.posted.lock().unwrap() += 1;
            Ok(self.post_answer.clone())
        }
        async fn poll(
            &self,
            _handle: &str,
            _cancel: &CancellationToken,
        ) -> Result<JobPoll<u32>, ConnectorError> {
            Ok(self.polls.lock().unwrap().pop().unwrap_or(running(None)))
        }
        async fn result(
            &self,
            entry: &Entry,
            completed: u32,
            _cancel: &CancellationToken,
        ) -> Result<String, ConnectorError> {
            Ok(format!("{} rows, code {completed}", entry.rows.len()))
        }
    }

    const FAST: JobTiming = JobTiming {
        first_poll: Duration::ZERO,
        poll_interval: Duration::from_millis(1),
        min_poll_interval: Duration::from_millis(1),
        max_wait: Duration::from_secs(5),
    };

    fn context<'a>(store: &'a mut MemoryStore, cancel: CancellationToken) -> SinkContext<'a> {
        SinkContext {
            store,
            progress: &NoProgress,
            cancel,
            resubscribe: false,
        }
    }

    fn entry(id: String) -> Entry {
        Entry {
            id,
            rows: vec!["a".into(), "b".into()],
        }
    }

    /// Posts and follows `job` with `timing`, a fresh ledger under `jobs` in `store`.
    async fn submit(
        job: &Scripted,
        timing: JobTiming,
        store: &mut MemoryStore,
        cancel: CancellationToken,
    ) -> Submitted<String> {
        let ledger = JobLedger::<Entry>::new("jobs");
        let mut ctx = context(store, cancel);
        JobFollower::new(job, &ledger, timing)
            .submit((), entry, &mut ctx)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_completed_job_gives_its_result_and_leaves_the_ledger() {
        let job = Scripted::new(
            Posted::Accepted("7".into()),
            vec![running(None), JobPoll::Completed(3)],
        );
        let mut store = MemoryStore::default();
        let followed = submit(&job, FAST, &mut store, CancellationToken::new()).await;
        assert_eq!(
            followed,
            Submitted::Followed(Followed::Completed("2 rows, code 3".into()))
        );
        assert!(store.0.is_empty(), "{:?}", store.0);
    }

    #[tokio::test]
    async fn a_job_still_running_at_the_maximum_wait_stays_for_the_next_run() {
        let job = Scripted::new(Posted::Accepted("7".into()), vec![]);
        let mut store = MemoryStore::default();
        let timing = JobTiming {
            max_wait: Duration::from_millis(20),
            poll_interval: Duration::from_millis(5),
            ..FAST
        };
        let followed = submit(&job, timing, &mut store, CancellationToken::new()).await;
        assert!(
            matches!(followed, Submitted::Followed(Followed::Pending(_))),
            "{followed:?}"
        );
        let ledger = JobLedger::<Entry>::new("jobs");
        let kept = ledger.load(&store, |_| None).unwrap().unwrap();
        assert_eq!(kept, vec![entry("7".into())]);

        // The next run resumes it from the ledger and reads its result.
        let job = Scripted::new(
            Posted::Refused("never posted".into()),
            vec![JobPoll::Completed(0)],
        );
        let mut ctx = context(&mut store, CancellationToken::new());
        let followed = JobFollower::new(&job, &ledger, FAST)
            .follow(&kept[0], &mut ctx)
            .await
            .unwrap();
        assert_eq!(followed, Followed::Completed("2 rows, code 0".into()));
        assert_eq!(
            *job.posted.lock().unwrap(),
            0,
            "a resumed job is never posted again"
        );
        assert!(store.0.is_empty());
    }

    #[tokio::test]
    async fn the_platforms_hint_is_honoured_but_never_below_the_minimum() {
        // A hint of 0 with a minimum of 30 ms: two polls take at least 30 ms.
        let job = Scripted::new(
            Posted::Accepted("7".into()),
            vec![running(Some(Duration::ZERO)), JobPoll::Completed(1)],
        );
        let mut store = MemoryStore::default();
        let timing = JobTiming {
            min_poll_interval: Duration::from_millis(30),
            ..FAST
        };
        let started = Instant::now();
        submit(&job, timing, &mut store, CancellationToken::new()).await;
        assert!(started.elapsed() >= Duration::from_millis(30));
    }

    #[tokio::test]
    async fn a_failed_job_leaves_the_ledger_and_says_why() {
        let job = Scripted::new(
            Posted::Accepted("7".into()),
            vec![JobPoll::Failed("ERROR: bad file".into())],
        );
        let mut store = MemoryStore::default();
        let followed = submit(&job, FAST, &mut store, CancellationToken::new()).await;
        assert_eq!(
            followed,
            Submitted::Followed(Followed::Ended("job 7 ended: ERROR: bad file".into()))
        );
        assert!(store.0.is_empty());
    }

    #[tokio::test]
    async fn a_cancelled_run_keeps_the_job_and_a_lost_answer_keeps_nothing() {
        let job = Scripted::new(Posted::Accepted("7".into()), vec![]);
        let ledger = JobLedger::<Entry>::new("jobs");
        let mut store = MemoryStore::default();
        let cancel = CancellationToken::new();
        cancel.cancel();
        let mut ctx = context(&mut store, cancel);
        let followed = JobFollower::new(&job, &ledger, FAST)
            .submit((), entry, &mut ctx)
            .await
            .unwrap();
        assert!(matches!(
            followed,
            Submitted::Followed(Followed::Pending(_))
        ));
        assert!(store.0.contains_key("jobs"));

        let lost = Scripted::new(Posted::Unknown("connection reset".into()), vec![]);
        let mut store = MemoryStore::default();
        let mut ctx = context(&mut store, CancellationToken::new());
        let followed = JobFollower::new(&lost, &ledger, FAST)
            .submit((), entry, &mut ctx)
            .await
            .unwrap();
        assert_eq!(followed, Submitted::Unknown("connection reset".into()));
        assert!(store.0.is_empty());
    }

    #[test]
    fn the_ledger_reads_a_single_entry_and_hands_other_text_to_legacy() {
        let ledger = JobLedger::<Entry>::new("jobs");
        let mut store = MemoryStore::default();
        store.put("jobs", r#"{"id":"9","rows":["x"]}"#).unwrap();
        assert_eq!(
            ledger.load(&store, |_| None).unwrap(),
            Some(vec![Entry {
                id: "9".into(),
                rows: vec!["x".into()]
            }])
        );
        store.put("jobs", "https://old/href").unwrap();
        let legacy = ledger
            .load(&store, |text| Some(vec![entry(text.to_string())]))
            .unwrap();
        assert_eq!(legacy, Some(vec![entry("https://old/href".into())]));
        assert_eq!(ledger.load(&store, |_| None).unwrap(), None);
    }
}
