//! Job kinds: what a run does with its items. The engine owns paging, leases, claims and the
//! ledger; a kind only says how to process.
//!
//! - [`ItemJob`]: item by item, each claimed in the delivery ledger before its side effect
//!   (`newsletter`). The engine runs up to [`ItemJob::in_flight`] items at once.
//! - [`RangeJob`]: a whole page (key range) at a time, the page lease being the only claim
//!   (`sql`: one statement per range, for chunked backfills).
//!
//! Users add kinds in Rust by registering a builder in [`KindRegistry`] under a `kind` name.

pub mod newsletter;
pub mod sql;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::config::{Ambiguity, JobConfig};
use crate::engine::state::ItemState;
use crate::ports::{Clock, Mailer};
use crate::sql::{SqlStore, Value};

/// One item of a page: its canonical key and the source row.
#[derive(Debug, Clone)]
pub struct Item {
    pub key: String,
    pub columns: Arc<Vec<String>>,
    pub values: Vec<Value>,
}

impl Item {
    pub fn get(&self, column: &str) -> &Value {
        const NULL: &Value = &Value::Null;
        self.columns.iter().position(|c| c.eq_ignore_ascii_case(column)).map(|i| &self.values[i]).unwrap_or(NULL)
    }
}

/// What became of one item. Everything but `Released` is written to the ledger.
#[derive(Debug, Clone, PartialEq)]
pub enum ItemOutcome {
    Done,
    /// Permanently failed, with the reason.
    Failed(String),
    /// Deliberately not processed (invalid address, ...), with the reason.
    Skipped(String),
    /// The side effect may or may not have happened.
    Unknown(String),
    /// Not attempted, or attempted and certainly without effect: the claim is dropped and the
    /// item is processed again later.
    Released,
    /// Certainly without effect, and the run must pause (e.g. the sending quota is spent).
    PauseRun(String),
}

impl ItemOutcome {
    /// The ledger state and reason, for outcomes that are recorded.
    pub fn ledger(&self) -> Option<(ItemState, Option<String>)> {
        match self {
            ItemOutcome::Done => Some((ItemState::Done, None)),
            ItemOutcome::Failed(r) => Some((ItemState::Failed, Some(r.clone()))),
            ItemOutcome::Skipped(r) => Some((ItemState::Skipped, Some(r.clone()))),
            ItemOutcome::Unknown(r) => Some((ItemState::Unknown, Some(r.clone()))),
            ItemOutcome::Released | ItemOutcome::PauseRun(_) => None,
        }
    }
}

/// What a hop tells a kind about the item at hand.
#[derive(Debug, Clone)]
pub struct ItemContext {
    pub run_id: String,
    pub run_key: String,
    pub chain: u32,
    /// Past this instant, start nothing new: return `Released` if nothing was sent.
    pub soft_deadline: Instant,
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The job cannot run as configured (bad template, missing column, ...). Stops a run
    /// before it starts.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// A failure that may pass (database resuming, ...): the page is retried later.
    #[error("{0}")]
    Transient(String),
    /// A failure that will not pass: the run fails with this reason.
    #[error("{0}")]
    Fatal(String),
}

#[async_trait]
pub trait ItemJob: Send + Sync {
    /// Checks the source's columns and renders a sample item before a run starts, so a bad
    /// template or column stops the run before the first side effect.
    fn check(&self, columns: &[String], sample: Option<&Item>) -> Result<(), JobError>;
    /// Checks only that the source still has the columns the kind reads: cheap, run on every
    /// page, so a source changed mid-run pauses the run instead of every item reading NULL.
    fn check_columns(&self, _columns: &[String]) -> Result<(), JobError> {
        Ok(())
    }
    /// The source column holding each item's mail address, if the kind honours the suppression
    /// list: the page load then marks suppressed rows, which are `skipped`, never processed.
    fn suppression_column(&self) -> Option<&str> {
        None
    }
    /// Items processed concurrently per hop.
    fn in_flight(&self) -> usize;
    /// Seconds one item takes at the configured rate for the whole run, if rate-limited.
    fn seconds_per_item(&self) -> Option<f64> {
        None
    }
    /// Called once per hop before any item, with the run's chain count (to split the rate) and
    /// when the chain may send next (epoch ms, from the previous hop's [`Self::send_after_ms`]).
    fn begin_hop(&self, _chains: u32, _send_after_ms: Option<i64>) {}
    /// How many chains of the run are active now (the page claim says, and a hop whose chain
    /// has no page left asks now and then): the run's rate is shared among them, so chains that
    /// ended leave their share to the others.
    fn share_rate(&self, _live_chains: u32) {}
    /// When the chain may send next under the rate (epoch ms), once `queued` sends still to take
    /// their slots have had theirs; with none queued, kept for the next hop.
    fn send_after_ms(&self, _queued: usize) -> Option<i64> {
        None
    }
    async fn process(&self, item: &Item, cx: &ItemContext) -> ItemOutcome;
    /// The item as it would be processed, with no side effect; `None` when the kind has
    /// nothing to show.
    fn preview(&self, _item: &Item) -> Result<Option<Preview>, JobError> {
        Ok(None)
    }
}

/// Whether a range job finished its page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeOutcome {
    Done,
    /// Not finished: release the page so it is claimed again.
    Incomplete,
}

#[async_trait]
pub trait RangeJob: Send + Sync {
    fn check(&self, _columns: &[String]) -> Result<(), JobError> {
        Ok(())
    }
    async fn process(&self, lo: Option<Value>, hi: Value, soft_deadline: Instant) -> Result<RangeOutcome, JobError>;
}

#[derive(Clone)]
pub enum Job {
    Items(Arc<dyn ItemJob>),
    Ranges(Arc<dyn RangeJob>),
}

/// What kinds may use to do their work.
#[derive(Clone)]
pub struct JobDeps {
    pub store: Arc<dyn SqlStore>,
    pub mailer: Arc<dyn Mailer>,
    pub clock: Arc<dyn Clock>,
    /// This job as this environment's config file defines it, if it does. A run's stored
    /// config never holds secrets: a kind that needs one resolves it from here first.
    pub configured: Option<Arc<JobConfig>>,
}

/// One item as its kind would process it, with no side effect (`baton preview`).
#[derive(Debug, Clone)]
pub struct Preview {
    /// Header lines in order, shown `Name: value`.
    pub headers: Vec<(String, String)>,
    /// Named bodies (`text`, `html`), shown in full.
    pub bodies: Vec<(String, String)>,
    /// The same for `--json`, as one object.
    pub json: serde_json::Value,
}

pub type KindBuilder = Arc<dyn Fn(&str, &JobConfig, &JobDeps) -> Result<Job, JobError> + Send + Sync>;

/// Builds jobs from their config by `kind`: the built-in `newsletter` and `sql`, plus any
/// registered in Rust.
#[derive(Clone, Default)]
pub struct KindRegistry {
    custom: HashMap<String, KindBuilder>,
}

impl KindRegistry {
    pub fn register(&mut self, kind: &str, builder: KindBuilder) {
        self.custom.insert(kind.to_owned(), builder);
    }

    /// Whether `kind` works on whole key ranges (no ledger), where that is known without
    /// building a job: for the built-in kinds.
    pub fn builtin_works_on_ranges(kind: &str) -> Option<bool> {
        match kind {
            "newsletter" => Some(false),
            "sql" => Some(true),
            _ => None,
        }
    }

    pub fn build(&self, name: &str, config: &JobConfig, deps: &JobDeps) -> Result<Job, JobError> {
        match config.kind.as_str() {
            "newsletter" => Ok(Job::Items(Arc::new(newsletter::Newsletter::new(name, config, deps)?))),
            "sql" => Ok(Job::Ranges(Arc::new(sql::SqlJob::new(name, config, deps)?))),
            other => match self.custom.get(other) {
                Some(builder) => builder(name, config, deps),
                None => Err(JobError::Invalid {
                    field: format!("jobs.{name}.kind"),
                    message: format!("unknown kind `{other}`: use `newsletter`, `sql`, or register it in Rust"),
                }),
            },
        }
    }
}

/// The ambiguity policy of a job config.
pub fn resend_ambiguous(config: &JobConfig) -> bool {
    config.ambiguity == Ambiguity::AtLeastOnce
}

/// Exponential backoff with full jitter: attempt 1 waits up to `base`, doubling to `cap`.
pub fn backoff(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.min(16).saturating_sub(1)).min(cap);
    exp.mul_f64(rand::random::<f64>().max(0.1))
}
