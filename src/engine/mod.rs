//! The engine: the chain protocol, identical in Lambda and on one machine. It is generic over
//! its ports (SQL, next hop, mail, clock) and never names an adapter.
//!
//! How a run moves (see DESIGN.md for the why):
//!
//! 1. `start` validates the job against a sample of its source (columns, unique key, templates),
//!    then plans the run in one transaction: the run row, its pages (every `page_size`-th key,
//!    fixed now), and K chains with `next_hop = 1`. It then invokes hop 1 of every chain. A
//!    second `start` of the same `(job, run_key)` finds the run and starts nothing.
//! 2. A `hop` first compare-and-sets its chain's `next_hop` from `hop` to `hop + 1`
//!    ([`hop`]); a duplicate or stale delivery loses and exits without side effects. It then
//!    claims pages one at a time (the claim also checks the run is `running`: the kill switch)
//!    and processes each until its time budget is nearly spent, then invokes `hop + 1`.
//! 3. Items are claimed in the delivery ledger in one statement before any side effect, and
//!    their results written back in one statement after. A page whose lease expired (its hop
//!    died) is claimed again; its leftover claims become `unknown` (at-most-once) or are sent
//!    again (at-least-once).
//! 4. A chain that finds no page ends; the one that finds no page and no live lease marks the
//!    run `succeeded`, exactly once ([`crate::sql::statements::complete_run`]).
//! 5. `sweep` restarts chains whose heartbeat stopped (lost event, crashed hop) from their
//!    checkpoint, through the same compare-and-set, so a late original and the restart cannot
//!    both run. Hop budgets and the run deadline bound every chain even if all else were wrong.

pub mod calendar;
pub mod control;
pub mod event;
pub mod hop;
pub mod metrics;
pub mod preview;
pub mod run;
pub mod start;
pub mod state;
pub mod status;
pub mod suppression;
pub mod sweep;
pub mod timeline;
pub mod trace;

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::KeyValue;
use serde::Serialize;
use tokio::time::Instant;

use crate::config::{Config, ConfigError, JobConfig};
use crate::jobs::{Item, Job, JobDeps, JobError, KindRegistry, backoff};
use crate::ports::{Clock, InvokeError, Invoker, Mailer};
use crate::sql::{Rows, SqlError, SqlStore, Stmt, Value, migrations, statements as st};
pub use calendar::period_key;
pub use control::Tuned;
use event::{Event, EventError};
use run::RunRow;
use state::RunState;
pub use trace::Tracing;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Event(#[from] EventError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Job(#[from] JobError),
    #[error(transparent)]
    Sql(#[from] SqlError),
    #[error("no run with id `{0}`; `baton status` lists the latest run")]
    RunNotFound(String),
    #[error("invalid run key `{shown}`: {why}", shown = crate::text::printable_short(.0), why = .1)]
    RunKey(String, String),
    #[error(
        "run {run_id} is {status}: it cannot {action} (a run that ended stays ended; start a new one with \
         `baton run JOB --run-key KEY`)"
    )]
    NotAllowed { run_id: String, action: String, status: RunState },
    #[error("corrupt state: {0}")]
    State(String),
    #[error("the mail provider cannot send: {0}")]
    MailerUnavailable(String),
    /// A value refused by the suppression list (not an address, or not a scope).
    #[error("`{address}`: {why}")]
    BadAddress { address: String, why: String },
}

/// What kind of failure an [`EngineError`] is, which says what happens next.
///
/// In Lambda every class fails the invocation, on purpose: with `MaximumRetryAttempts: 0` the
/// event then lands in the on-failure queue and counts in `Errors`, so nothing fails quietly.
/// What differs is who acts: a `Retryable` failure of a hop is recovered by the sweeper on its
/// own (from the chain's checkpoint), while a `start` or `control` that failed retryably waits
/// in the on-failure queue to be sent again; a `Rejected` request needs fixing by its sender;
/// `Fatal` needs an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// The request is wrong (event, config, job, run key, an action the run's state does not
    /// allow): sent again unchanged, it fails again.
    Rejected,
    /// A passing failure (the database resuming, a dropped connection, an invoke throttled): the
    /// same request may succeed later.
    Retryable,
    /// Broken state or environment (corrupt rows, the mail account stopped, a statement that
    /// fails): an operator must look.
    Fatal,
}

impl EngineError {
    pub fn class(&self) -> ErrorClass {
        match self {
            EngineError::Event(_)
            | EngineError::RunKey(..)
            | EngineError::Config(_)
            | EngineError::Job(JobError::Invalid { .. })
            | EngineError::RunNotFound(_)
            | EngineError::BadAddress { .. }
            | EngineError::NotAllowed { .. } => ErrorClass::Rejected,
            EngineError::Sql(e) if e.is_transient() => ErrorClass::Retryable,
            EngineError::Job(JobError::Transient(_)) => ErrorClass::Retryable,
            EngineError::Sql(_)
            | EngineError::Job(JobError::Fatal(_))
            | EngineError::State(_)
            | EngineError::MailerUnavailable(_) => ErrorClass::Fatal,
        }
    }

    /// A stable name for the kind of error, for Lambda's `errorType` (alarms and log queries
    /// match on it) and scripts.
    pub fn error_type(&self) -> &'static str {
        match self {
            EngineError::Event(_) | EngineError::RunKey(..) => "baton.BadEvent",
            EngineError::Config(_) => "baton.BadConfig",
            EngineError::Job(_) => "baton.InvalidJob",
            EngineError::Sql(e) if e.is_transient() => "baton.DatabaseUnavailable",
            EngineError::Sql(_) => "baton.DatabaseError",
            EngineError::RunNotFound(_) => "baton.RunNotFound",
            EngineError::NotAllowed { .. } => "baton.NotAllowed",
            EngineError::State(_) => "baton.CorruptState",
            EngineError::MailerUnavailable(_) => "baton.MailerUnavailable",
            EngineError::BadAddress { .. } => "baton.BadAddress",
        }
    }
}

/// Tries per statement when the SQL port reports a transient error.
pub const SQL_ATTEMPTS: u32 = 4;

/// What an invocation did, for logs, the CLI and tests.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Started {
        run_id: String,
        chains: i64,
        pages: i64,
        items: i64,
        existing: bool,
    },
    Hopped {
        pages: u32,
        next: HopNext,
    },
    /// Another delivery of this hop already ran (or the chain moved on): nothing was done.
    Duplicate,
    Swept(sweep::SweepReport),
    Controlled {
        run_id: String,
        status: RunState,
    },
}

/// How a hop left its chain.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HopNext {
    /// The next hop was invoked.
    Continued,
    /// No page left for this chain.
    Ended,
    /// This hop marked the run `succeeded`.
    Completed,
    /// The run is pausing: the chain parked at its checkpoint.
    Parked,
    /// The run is over (cancelled, failed, succeeded): the chain stopped.
    Stopped,
    /// The chain exceeded its hop budget, or the run its deadline: both are failed.
    Failed(String),
}

impl HopNext {
    /// The outcome's name, as `baton report` and the hop table record it.
    pub fn label(&self) -> &'static str {
        match self {
            HopNext::Continued => "continued",
            HopNext::Ended => "ended",
            HopNext::Completed => "completed",
            HopNext::Parked => "parked",
            HopNext::Stopped => "stopped",
            HopNext::Failed(_) => "failed",
        }
    }
}

/// Everything the engine needs: ports, config, kinds.
pub struct EngineParts {
    pub store: Arc<dyn SqlStore>,
    pub invoker: Arc<dyn Invoker>,
    pub mailer: Arc<dyn Mailer>,
    pub clock: Arc<dyn Clock>,
    pub config: Config,
    pub kinds: KindRegistry,
    pub tracing: Tracing,
}

pub struct Engine {
    store: Arc<dyn SqlStore>,
    invoker: Arc<dyn Invoker>,
    mailer: Arc<dyn Mailer>,
    clock: Arc<dyn Clock>,
    config: Config,
    kinds: KindRegistry,
    tracing: Tracing,
    /// Pages closed and hops ended in this process: a watcher in the same process polls the
    /// state tables only when it moved, so watching costs no statements while nothing changes.
    changes: std::sync::atomic::AtomicU64,
}

impl Engine {
    pub fn new(parts: EngineParts) -> Self {
        let EngineParts { store, invoker, mailer, clock, config, kinds, tracing } = parts;
        Self { store, invoker, mailer, clock, config, kinds, tracing, changes: Default::default() }
    }

    /// Pages closed (finished or released) and hops ended in this process so far.
    pub fn changes(&self) -> u64 {
        self.changes.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn changed(&self) {
        self.changes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn store(&self) -> &Arc<dyn SqlStore> {
        &self.store
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Applies schema migrations; safe to call at every start and from several processes.
    pub async fn migrate(&self) -> Result<Vec<i64>, EngineError> {
        Ok(migrations::migrate(self.store.as_ref(), self.now_ms()).await?)
    }

    /// Decodes and routes one Lambda payload. `deadline` is when the invocation will be killed.
    pub async fn handle_payload(&self, payload: &[u8], deadline: Instant) -> Result<Outcome, EngineError> {
        let event = Event::parse(payload)?;
        self.handle(event, deadline).await
    }

    pub async fn handle(&self, event: Event, deadline: Instant) -> Result<Outcome, EngineError> {
        self.handle_traced(event, deadline, Vec::new()).await
    }

    /// [`Self::handle`] in a new trace of its own, whose root span carries `attributes` (the
    /// invocation's, from its environment) and links to the previous hop of the chain.
    pub async fn handle_traced(
        &self,
        event: Event,
        deadline: Instant,
        mut attributes: Vec<KeyValue>,
    ) -> Result<Outcome, EngineError> {
        let (name, previous) = match &event {
            Event::Start { job, .. } => {
                attributes.push(KeyValue::new("baton.job", job.clone()));
                ("start", None)
            }
            Event::Hop { run_id, chain, hop, traceparent } => {
                attributes.extend([
                    KeyValue::new("baton.run_id", run_id.clone()),
                    KeyValue::new("baton.chain", *chain as i64),
                    KeyValue::new("baton.hop", *hop as i64),
                    trace::xray_annotations(),
                ]);
                ("hop", traceparent.clone())
            }
            Event::Sweep {} => ("sweep", None),
            Event::Control { run_id, .. } => {
                attributes.push(KeyValue::new("baton.run_id", run_id.clone()));
                ("control", None)
            }
        };
        self.in_root(name, attributes, previous.as_deref(), self.route(event, deadline)).await
    }

    /// Runs `work` in a new trace whose root span is `name`, linked to `previous`; a failure
    /// sets the span's status and `error.type`.
    pub(crate) async fn in_root<T>(
        &self,
        name: &'static str,
        attributes: Vec<KeyValue>,
        previous: Option<&str>,
        work: impl std::future::Future<Output = Result<T, EngineError>>,
    ) -> Result<T, EngineError> {
        use opentelemetry::trace::TraceContextExt;
        let cx = self.tracing.root(name, attributes, &[previous]);
        let outcome = trace::within(cx.clone(), work).await;
        if let Err(e) = &outcome {
            cx.span().set_status(opentelemetry::trace::Status::error(trace::bounded(&e.to_string(), 500)));
            cx.span().set_attribute(KeyValue::new("error.type", e.error_type()));
        }
        cx.span().end();
        outcome
    }

    async fn route(&self, event: Event, deadline: Instant) -> Result<Outcome, EngineError> {
        match event {
            Event::Start { job, run_key, scheduled_time } => {
                let run_key = match (run_key, scheduled_time) {
                    (Some(key), _) => key,
                    (None, Some(at)) => self.scheduled_run_key(&job, &at)?,
                    (None, None) => {
                        return Err(EventError::Malformed(
                            "a start event needs `scheduled_time` (EventBridge Scheduler: \
                             \"<aws.scheduler.scheduled-time>\") or `run_key`: the current month could name \
                             another period than the one the schedule fired for"
                                .into(),
                        )
                        .into());
                    }
                };
                self.start_run(&job, Some(&run_key)).await
            }
            Event::Hop { run_id, chain, hop, .. } => self.hop(&run_id, chain, hop, deadline).await,
            Event::Sweep {} => Ok(Outcome::Swept(self.sweep().await?)),
            Event::Control { run_id, action } => self.control(&run_id, action).await,
        }
    }

    /// Builds `name`'s job from `config` (the config file's, or a run's stored snapshot). The
    /// kind also sees this environment's config of the job, where it resolves secrets.
    pub fn build_job(&self, name: &str, config: &JobConfig) -> Result<Job, JobError> {
        let deps = JobDeps {
            store: self.store.clone(),
            mailer: self.mailer.clone(),
            clock: self.clock.clone(),
            configured: self.config.jobs.get(name).cloned().map(Arc::new),
        };
        self.kinds.build(name, config, &deps)
    }

    /// Runs one statement, re-running it when the SQL port calls the error transient (a dropped
    /// connection, a 5xx, a timeout: the statement may or may not have committed). Every
    /// statement the engine issues is safe to re-run after it committed and its response was
    /// lost (see [`crate::sql::statements`]), so a re-run can only find what already happened.
    pub(crate) async fn sql(&self, stmt: Stmt) -> Result<Rows, SqlError> {
        let name = stmt.name;
        let run = self.rerun_transient(name, || {
            metrics::sql_statement();
            self.store.query(stmt.clone())
        });
        self.tracing.in_span(name, vec![KeyValue::new("db.operation.name", name)], run).await
    }

    /// [`Self::sql`] for statements that must commit together; every one of them must be safe
    /// to re-run in the same way.
    pub(crate) async fn sql_transaction(&self, stmts: Vec<Stmt>) -> Result<Vec<Rows>, SqlError> {
        let name = stmts.first().map_or("transaction", |s| s.name);
        let run = self.rerun_transient(name, || {
            stmts.iter().for_each(|_| metrics::sql_statement());
            self.store.transaction(stmts.clone())
        });
        let attributes =
            vec![KeyValue::new("db.operation.name", name), KeyValue::new("db.batch.size", stmts.len() as i64)];
        self.tracing.in_span(name, attributes, run).await
    }

    async fn rerun_transient<T, F, Fut>(&self, name: &str, run: F) -> Result<T, SqlError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, SqlError>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match run().await {
                Err(e) if e.is_transient() && attempt < SQL_ATTEMPTS => {
                    tracing::info!(statement = name, attempt, error = %e, "statement will be re-run");
                    tokio::time::sleep(backoff(attempt, Duration::from_millis(20), Duration::from_millis(500))).await;
                }
                other => return other,
            }
        }
    }

    /// A diagnostic statement (for `status` and `report`), best effort: the database may be
    /// what failed, and a diagnostic never fails the work it describes.
    pub(crate) async fn note(&self, stmt: Stmt) {
        let name = stmt.name;
        if let Err(e) = self.sql(stmt).await {
            tracing::debug!(statement = name, error = %e, "could not record a diagnostic");
        }
    }

    pub(crate) async fn load_run(&self, run_id: &str) -> Result<RunRow, EngineError> {
        let rows = self.sql(st::run_by_id(run_id)).await?;
        RunRow::first(&rows)?.ok_or_else(|| EngineError::RunNotFound(run_id.into()))
    }

    /// Invokes hop `hop` of `chain`; the hop's span links to `traceparent` (the hop that
    /// invokes it, or the chain's last known hop).
    pub(crate) async fn invoke_hop(
        &self,
        run_id: &str,
        chain: i64,
        hop: i64,
        traceparent: Option<String>,
    ) -> Result<(), InvokeError> {
        let attributes = vec![KeyValue::new("baton.chain", chain), KeyValue::new("baton.hop", hop)];
        let traceparent = traceparent.or_else(trace::current_traceparent);
        let event = Event::Hop { run_id: run_id.to_owned(), chain: chain as u32, hop: hop as u64, traceparent };
        self.tracing.in_span("invoke", attributes, self.invoker.invoke(&event)).await
    }

    /// Invokes each `(chain, next_hop)`; a failed invoke is logged and left to the sweeper.
    pub(crate) async fn invoke_chains(&self, run_id: &str, rows: &crate::sql::Rows) -> Result<usize, EngineError> {
        let mut invoked = 0;
        for r in rows.records() {
            let (chain, hop) = (r.int("chain_no")?, r.int("next_hop")?);
            // The chain's last known hop, so its trace links on from there.
            let last = r.text("last_trace")?;
            trace::link(last.as_deref(), vec![KeyValue::new("baton.chain", chain)]);
            match self.invoke_hop(run_id, chain, hop, last).await {
                Ok(()) => invoked += 1,
                // No retry can fix it (the recursion stop, the role not allowed to invoke the
                // function): pause the run with the fix rather than retry until its deadline.
                // Its active chains park at their checkpoints with the next sweep.
                Err(InvokeError::Fatal(why)) => {
                    let reason = format!("a chain cannot be invoked: {why}; fix it, then `baton resume`");
                    tracing::error!(run_id, chain, reason, "pausing the run");
                    let now = self.now_ms();
                    self.sql(st::set_run_status(run_id, state::RunState::Pausing, Some(&reason), now)).await?;
                    return Ok(invoked);
                }
                Err(e) => {
                    tracing::warn!(run_id, chain, error = %e, "invoke failed; the sweeper will retry")
                }
            }
        }
        Ok(invoked)
    }
}

pub(crate) fn item_of(columns: &Arc<Vec<String>>, key: &str, values: Vec<Value>) -> Item {
    let idx = columns.iter().position(|c| c.eq_ignore_ascii_case(key));
    // A key of a type a key cannot have still gets a distinct ledger key, so it can be failed.
    let key = idx.map(|i| values[i].key_text().unwrap_or_else(|| values[i].to_string())).unwrap_or_default();
    Item { key, columns: columns.clone(), values }
}

/// How long before `deadline` a hop stops claiming pages.
pub(crate) fn soft_deadline(deadline: Instant, margin: Duration) -> Instant {
    let left = deadline.saturating_duration_since(Instant::now());
    deadline - margin.min(left / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_a_class_that_says_who_acts() {
        let class = |e: EngineError| e.class();
        assert_eq!(class(EngineError::Event(EventError::Malformed("x".into()))), ErrorClass::Rejected);
        assert_eq!(class(EngineError::RunNotFound("r".into())), ErrorClass::Rejected);
        assert_eq!(class(EngineError::Sql(SqlError::transient("resuming"))), ErrorClass::Retryable);
        assert_eq!(class(EngineError::Sql(SqlError::statement("syntax"))), ErrorClass::Fatal);
        assert_eq!(class(EngineError::Job(JobError::Transient("resuming".into()))), ErrorClass::Retryable);
        assert_eq!(class(EngineError::Job(JobError::Fatal("bad statement".into()))), ErrorClass::Fatal);
        let invalid = JobError::Invalid { field: "jobs.x.source".into(), message: "no table".into() };
        assert_eq!(class(EngineError::Job(invalid)), ErrorClass::Rejected);
        assert_eq!(class(EngineError::State("bad row".into())), ErrorClass::Fatal);
    }
}
