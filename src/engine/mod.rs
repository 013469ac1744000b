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

pub mod event;
pub mod hop;
pub mod run;
pub mod state;
pub mod sweep;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::config::{Config, ConfigError, JobConfig};
use crate::jobs::{Item, Job, JobDeps, JobError, KindRegistry, backoff};
use crate::ports::{Clock, InvokeError, Invoker, Mailer};
use crate::sql::{KeyType, Rows, SqlError, SqlStore, Stmt, Value, migrations, statements as st};
use event::{ControlAction, Event, EventError};
use run::{ChainStatus, RunRow, RunStatus};
use state::{ChainState, RunState, State};

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
    #[error("cannot continue the chain: {0}")]
    Invoke(#[from] InvokeError),
    #[error(
        "run {run_id} is {status}: it cannot {action} (a run that ended stays ended; start a new one with \
         `baton run JOB --run-key KEY`)"
    )]
    NotAllowed { run_id: String, action: String, status: RunState },
    #[error("corrupt state: {0}")]
    State(String),
    #[error("the mail provider cannot send: {0}")]
    MailerUnavailable(String),
}

impl EngineError {
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
            EngineError::Invoke(_) => "baton.InvokeFailed",
            EngineError::State(_) => "baton.CorruptState",
            EngineError::MailerUnavailable(_) => "baton.MailerUnavailable",
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

/// Everything the engine needs: ports, config, kinds.
pub struct EngineParts {
    pub store: Arc<dyn SqlStore>,
    pub invoker: Arc<dyn Invoker>,
    pub mailer: Arc<dyn Mailer>,
    pub clock: Arc<dyn Clock>,
    pub config: Config,
    pub kinds: KindRegistry,
}

pub struct Engine {
    store: Arc<dyn SqlStore>,
    invoker: Arc<dyn Invoker>,
    mailer: Arc<dyn Mailer>,
    clock: Arc<dyn Clock>,
    config: Config,
    kinds: KindRegistry,
}

impl Engine {
    pub fn new(parts: EngineParts) -> Self {
        let EngineParts { store, invoker, mailer, clock, config, kinds } = parts;
        Self { store, invoker, mailer, clock, config, kinds }
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
                self.start(&job, Some(&run_key)).await
            }
            Event::Hop { run_id, chain, hop, .. } => self.hop(&run_id, chain, hop, deadline).await,
            Event::Sweep {} => Ok(Outcome::Swept(self.sweep().await?)),
            Event::Control { run_id, action } => self.control(&run_id, action).await,
        }
    }

    fn deps(&self, job: &str, config: &JobConfig) -> JobDeps {
        let secret = self
            .config
            .jobs
            .get(job)
            .and_then(|j| j.newsletter.as_ref())
            .or(config.newsletter.as_ref())
            .and_then(|n| n.secret());
        JobDeps { store: self.store.clone(), mailer: self.mailer.clone(), clock: self.clock.clone(), secret }
    }

    pub fn build_job(&self, name: &str, config: &JobConfig) -> Result<Job, JobError> {
        self.kinds.build(name, config, &self.deps(name, config))
    }

    /// Runs one statement, re-running it when the SQL port calls the error transient (a dropped
    /// connection, a 5xx, a timeout: the statement may or may not have committed). Every
    /// statement the engine issues is safe to re-run after it committed and its response was
    /// lost (see [`crate::sql::statements`]), so a re-run can only find what already happened.
    pub(crate) async fn sql(&self, stmt: Stmt) -> Result<Rows, SqlError> {
        self.rerun_transient(stmt.name, || self.store.query(stmt.clone())).await
    }

    /// [`Self::sql`] for statements that must commit together; every one of them must be safe
    /// to re-run in the same way.
    pub(crate) async fn sql_transaction(&self, stmts: Vec<Stmt>) -> Result<Vec<Rows>, SqlError> {
        let name = stmts.first().map_or("transaction", |s| s.name);
        self.rerun_transient(name, || self.store.transaction(stmts.clone())).await
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

    pub(crate) async fn load_run(&self, run_id: &str) -> Result<RunRow, EngineError> {
        let rows = self.sql(st::run_by_id(run_id)).await?;
        RunRow::first(&rows).map_err(EngineError::State)?.ok_or_else(|| EngineError::RunNotFound(run_id.into()))
    }

    pub(crate) async fn invoke_hop(&self, run_id: &str, chain: i64, hop: i64) -> Result<(), InvokeError> {
        let event = Event::Hop { run_id: run_id.to_owned(), chain: chain as u32, hop: hop as u64, traceparent: None };
        self.invoker.invoke(&event).await
    }

    /// Invokes each `(chain, next_hop)`; a failed invoke is logged and left to the sweeper.
    pub(crate) async fn invoke_chains(&self, run_id: &str, rows: &crate::sql::Rows) -> usize {
        let mut invoked = 0;
        for r in rows.records() {
            match self.invoke_hop(run_id, r.int("chain_no"), r.int("next_hop")).await {
                Ok(()) => invoked += 1,
                Err(e) => {
                    tracing::warn!(run_id, chain = r.int("chain_no"), error = %e, "invoke failed; the sweeper will retry")
                }
            }
        }
        invoked
    }

    // ---- start ------------------------------------------------------------------------------

    /// Validates, plans and starts a run; returns the existing run if `(job, run_key)` exists.
    pub async fn start(&self, job_name: &str, run_key: Option<&str>) -> Result<Outcome, EngineError> {
        let mut config = self.config.job(job_name)?.clone();
        let run_key = match run_key {
            Some(k) => k.to_owned(),
            None => period_key(self.now_ms(), &config.time_zone)?,
        };
        if let Err(why) = event::check_run_key(&run_key) {
            return Err(EngineError::RunKey(run_key, why));
        }
        if let Some(existing) = self.existing_run(job_name, &run_key).await? {
            return Ok(existing);
        }
        if let Some(newsletter) = config.newsletter.as_mut() {
            self.cap_send_rate(job_name, newsletter).await?;
        }
        let job = self.build_job(job_name, &config)?;
        let SourceCheck { key_type, null_keys } = self.check_source(job_name, &config, &job).await?;
        if null_keys > 0 {
            tracing::warn!(
                job = job_name,
                null_keys,
                "source rows with a NULL key are left out of the run (`baton status` counts them)"
            );
        }

        let now = self.now_ms();
        let run_id = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
        let snapshot = serde_json::to_string(&config).expect("config serialises");
        let hops_per_page = self.hops_per_page(&config, &job);
        let plan = st::plan_run(
            &st::NewRun {
                run_id: &run_id,
                job: job_name,
                run_key: &run_key,
                job_config: &snapshot,
                key_type: key_type.as_str(),
                null_keys,
                deadline_at: now + config.run_deadline.as_millis() as i64,
                now,
            },
            &config.source,
            &config.key_column,
            config.page_size as i64,
            config.chains as i64,
            hops_per_page,
            config.hop_slack as i64,
        );
        let mut attempt = 0;
        while let Err(e) = self.store.transaction(plan.clone()).await {
            attempt += 1;
            match self.existing_run(job_name, &run_key).await? {
                // The plan committed and only its answer was lost: this is our run, go on.
                Some(Outcome::Started { run_id: found, .. }) if found == run_id => {
                    tracing::warn!(run_id, error = %e, "the plan committed although its answer was lost");
                    break;
                }
                // Lost a race with another start of the same run: that one is the run.
                Some(existing) => return Ok(existing),
                // Not committed (nothing holds the run key): safe to try again.
                None if e.is_transient() && attempt < SQL_ATTEMPTS => {
                    tokio::time::sleep(backoff(attempt, Duration::from_millis(20), Duration::from_millis(500))).await;
                }
                None => return Err(source_error(job_name, e)),
            }
        }
        let run = self.load_run(&run_id).await?;
        let chains = self.sql(st::chains_of(&run_id)).await?;
        self.invoke_chains(&run_id, &chains).await;
        tracing::info!(
            run_id,
            job = job_name,
            run_key,
            pages = run.total_pages,
            items = run.total_items,
            "run started"
        );
        Ok(Outcome::Started {
            run_id,
            chains: run.chains,
            pages: run.total_pages,
            items: run.total_items,
            existing: false,
        })
    }

    /// Caps the run's send rate at the provider's maximum (SES `MaxSendRate`); the capped rate
    /// is what the run stores and every hop uses.
    async fn cap_send_rate(&self, job: &str, n: &mut crate::config::NewsletterConfig) -> Result<(), EngineError> {
        match self.mailer.max_rate().await {
            Ok(Some(max)) if n.send_rate == 0.0 || n.send_rate > max => {
                tracing::warn!(job, configured = n.send_rate, max, "send rate capped at the provider's maximum");
                n.send_rate = max;
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(crate::ports::MailError::AccountStopped(why)) => Err(EngineError::MailerUnavailable(why)),
            Err(e) => {
                tracing::warn!(job, error = %e, "could not read the provider's send rate; using the configured one");
                Ok(())
            }
        }
    }

    /// The run key of a scheduled start: the month of `scheduled_time` in the job's time zone.
    fn scheduled_run_key(&self, job: &str, scheduled_time: &str) -> Result<String, EngineError> {
        let config = self.config.job(job)?;
        let at: jiff::Timestamp = scheduled_time.parse().map_err(|e| {
            EventError::Malformed(format!(
                "`scheduled_time` must be an RFC 3339 time such as 2026-12-01T08:00:00Z, got `{scheduled_time}`: {e}"
            ))
        })?;
        period_key(at.as_millisecond(), &config.time_zone)
    }

    async fn existing_run(&self, job: &str, run_key: &str) -> Result<Option<Outcome>, EngineError> {
        let rows = self.sql(st::run_by_key(job, run_key)).await?;
        Ok(RunRow::first(&rows).map_err(EngineError::State)?.map(|r| Outcome::Started {
            run_id: r.run_id,
            chains: r.chains,
            pages: r.total_pages,
            items: r.total_items,
            existing: true,
        }))
    }

    /// Runs the source once on a sample: the key column exists, is unique and of a sortable
    /// type, and the job accepts the columns and the first item. Returns the key's type and
    /// how many rows have a NULL key (they are left out of the run and reported).
    async fn check_source(&self, name: &str, config: &JobConfig, job: &Job) -> Result<SourceCheck, EngineError> {
        let key = &config.key_column;
        let mut stmts = st::source_sample(&config.source, key);
        let counts = stmts.pop().expect("two statements");
        let sample = self.sql(stmts.pop().expect("two statements")).await.map_err(|e| source_error(name, e))?;
        if sample.column(key).is_none() {
            return Err(JobError::Invalid {
                field: format!("jobs.{name}.key_column"),
                message: format!(
                    "the source query has no column `{key}`; its columns are: {}",
                    sample.columns.join(", ")
                ),
            }
            .into());
        }
        let columns = Arc::new(sample.columns.clone());
        let item = sample.rows.first().map(|values| item_of(&columns, key, values.clone()));
        let key_idx = sample.column(key).expect("checked");
        let mut sample = sample;
        if sample.rows.first().is_some_and(|row| row[key_idx].is_null()) {
            // The first row has a NULL key (left out of the run): the type comes from a row
            // with a key, or every item of a typed key would look mistyped.
            sample = self.sql(st::keyed_sample(&config.source, key)).await.map_err(|e| source_error(name, e))?;
        }
        let key_type = match sample.rows.first().map(|v| &v[key_idx]) {
            None => KeyType::Text,
            Some(v) if v.is_null() => KeyType::Text,
            Some(v) => v.key_type().ok_or_else(|| JobError::Invalid {
                field: format!("jobs.{name}.key_column"),
                message: format!(
                    "`{key}` holds {} values (e.g. {v}); a key must be an integer, text, uuid or timestamp: cast it \
                     in the source, e.g. `SELECT CAST({key} AS TEXT) AS {key}, ...`",
                    v.type_name()
                ),
            })?,
        };
        if self.store.dynamic_types() {
            self.check_key_types(name, config, key_type).await?;
        }
        let counts = self.sql(counts).await.map_err(|e| source_error(name, e))?;
        let (n, distinct, rows) = counts.first().map(|r| (r.int("n"), r.int("d"), r.int("total"))).unwrap_or((0, 0, 0));
        if n != distinct {
            return Err(JobError::Invalid {
                field: format!("jobs.{name}.key_column"),
                message: format!("`{key}` is not unique in the source ({n} rows with a key, {distinct} distinct keys)"),
            }
            .into());
        }
        match job {
            Job::Items(j) => j.check(&sample.columns, item.as_ref())?,
            Job::Ranges(j) => j.check(&sample.columns)?,
        }
        Ok(SourceCheck { key_type, null_keys: rows - n })
    }

    /// Where a column's values may differ in type row by row (SQLite), every key must have the
    /// run's key type: a real-valued key has no ledger key, and integer 2 and text '2' would be
    /// one recipient to the ledger and two to the pages.
    async fn check_key_types(&self, name: &str, config: &JobConfig, expected: KeyType) -> Result<(), EngineError> {
        let key = &config.key_column;
        let census = self.sql(st::key_type_census(&config.source, key)).await.map_err(|e| source_error(name, e))?;
        let found: Vec<(String, i64, String)> = census
            .records()
            .map(|r| (r.text("t").unwrap_or_default(), r.int("n"), r.text("example").unwrap_or_default()))
            .collect();
        let fits = |t: &str| match expected {
            KeyType::Int => t == "integer",
            KeyType::Text | KeyType::Uuid | KeyType::Timestamp => t == "text",
        };
        if found.iter().all(|(t, ..)| fits(t)) {
            return Ok(());
        }
        let listed: Vec<String> =
            found.iter().map(|(t, n, e)| format!("{n} {t} (e.g. {})", crate::text::printable_short(e))).collect();
        Err(JobError::Invalid {
            field: format!("jobs.{name}.key_column"),
            message: format!(
                "`{key}` holds keys of more than one type, or of a type a key cannot have: {}. Every key must be an \
                 integer, or every key text: cast it in the source, e.g. `SELECT CAST({key} AS TEXT) AS {key}, ...`",
                listed.join(", ")
            ),
        }
        .into())
    }

    /// Hops one page may need: more than one when a rate-limited page outlasts a hop.
    fn hops_per_page(&self, config: &JobConfig, job: &Job) -> i64 {
        let per_item = match job {
            Job::Items(j) => j.seconds_per_item(),
            Job::Ranges(_) => None,
        };
        hops_per_page(&self.config.settings, config, per_item)
    }

    /// Settings in which the config file's job now differs from what `run_id` started with, as
    /// `field: run -> file` (a run keeps its snapshot; only `tune` changes a live run).
    pub async fn config_drift(&self, run_id: &str) -> Result<Vec<String>, EngineError> {
        let run = self.load_run(run_id).await?;
        let Ok(file) = self.config.job(&run.job) else { return Ok(Vec::new()) };
        let (mut ran, mut now) = (Vec::new(), Vec::new());
        flatten("", &serde_json::to_value(&run.job_config).expect("serialises"), &mut ran);
        flatten("", &serde_json::to_value(file).expect("serialises"), &mut now);
        let ran: std::collections::BTreeMap<_, _> = ran.into_iter().collect();
        let now: std::collections::BTreeMap<_, _> = now.into_iter().collect();
        let mut keys: Vec<&String> = ran.keys().chain(now.keys()).collect();
        keys.sort();
        keys.dedup();
        Ok(keys
            .into_iter()
            .filter(|k| ran.get(*k) != now.get(*k))
            .map(|k| {
                let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "(unset)".into());
                format!(
                    "{k}: {} -> {}",
                    crate::text::printable_short(&show(ran.get(k))),
                    crate::text::printable_short(&show(now.get(k)))
                )
            })
            .collect())
    }

    // ---- tune -------------------------------------------------------------------------------

    /// Changes a live run's send rate and chain count (the rest of its config is fixed when it
    /// starts). The rate applies from each chain's next hop; the hop budget grows to fit a lower
    /// rate. New chains are invoked now when `invoke_new` (chains run elsewhere, in Lambda), or
    /// left for the next sweep to start (the local driver of the run, in another process). With
    /// fewer chains, those beyond the count end after their current page.
    pub async fn tune(
        &self,
        run_id: &str,
        send_rate: Option<f64>,
        chains: Option<u32>,
        invoke_new: bool,
    ) -> Result<Tuned, EngineError> {
        let run = self.load_run(run_id).await?;
        if !matches!(run.status, RunState::Running | RunState::Pausing | RunState::Paused) {
            return Err(EngineError::NotAllowed {
                run_id: run_id.into(),
                action: "be tuned".into(),
                status: run.status,
            });
        }
        let mut config = run.job_config.clone();
        let before = (config.newsletter.as_ref().map(|n| n.send_rate), run.chains);
        if let Some(rate) = send_rate {
            let n = config.newsletter.as_mut().ok_or_else(|| JobError::Invalid {
                field: "--send-rate".into(),
                message: format!("run {run_id} is a `{}` job, which has no send rate", config.kind),
            })?;
            n.send_rate = rate;
        }
        if let Some(k) = chains {
            config.chains = k;
        }
        config.validate(&run.job).map_err(|e| match e {
            ConfigError::Invalid { field, message } => JobError::Invalid {
                field: if field.ends_with("send_rate") {
                    "--send-rate".into()
                } else if field.ends_with("chains") {
                    "--chains".into()
                } else {
                    field
                },
                message,
            }
            .into(),
            other => EngineError::Config(other),
        })?;
        let per_item = |c: &JobConfig| c.newsletter.as_ref().filter(|n| n.send_rate > 0.0).map(|n| 1.0 / n.send_rate);
        let chain_rows = self.sql(st::chains_of(run_id)).await?;
        let furthest = chain_rows.records().map(|c| c.int("next_hop")).max().unwrap_or(1);
        // The budget the run was given for its pages, scaled by how much longer a page takes now,
        // beyond the furthest chain's hop; never less than before. A ratio, so this process's
        // own hop settings (not the deployed function's) cancel out.
        let settings = &self.config.settings;
        let (hpp_old, hpp_new) = (
            hops_per_page(settings, &run.job_config, per_item(&run.job_config)),
            hops_per_page(settings, &config, per_item(&config)),
        );
        let paged = (run.max_hops - run.job_config.hop_slack as i64).max(run.total_pages);
        let scaled = (paged as f64 * hpp_new as f64 / hpp_old.max(1) as f64).ceil().min(1e15) as i64;
        let max_hops = run.max_hops.max(furthest.saturating_add(scaled).saturating_add(config.hop_slack as i64));
        let k = config.chains as i64;
        let now = self.now_ms();
        let snapshot = serde_json::to_string(&config).expect("config serialises");
        // New chains start one period of the new per-chain rate from now, so the run's rate is
        // not exceeded while the running chains still pace at the old share (until their next
        // hop reads the new config).
        let period_ms = per_item(&config).map_or(0, |s| (s * k as f64 * 1000.0).min(1e12) as i64);
        let heartbeat = if invoke_new { now } else { 0 };
        let plan = vec![
            st::retune_run(run_id, &snapshot, k, max_hops, now),
            st::add_chains(run_id, k, heartbeat, now + period_ms),
            st::reactivate_chains(run_id, k, heartbeat),
        ];
        // Every statement is safe to re-run; a re-run after a lost answer finds the chains already
        // added (the sweeper then starts any that were not invoked).
        let results = self.sql_transaction(plan).await?;
        if results[0].rows.is_empty() {
            let now_status = self.load_run(run_id).await?.status;
            return Err(EngineError::NotAllowed {
                run_id: run_id.into(),
                action: "be tuned".into(),
                status: now_status,
            });
        }
        let added = results[1].rows.len() + results[2].rows.len();
        if invoke_new && run.status == RunState::Running {
            self.invoke_chains(run_id, &results[1]).await;
            self.invoke_chains(run_id, &results[2]).await;
        }
        tracing::info!(run_id, ?send_rate, ?chains, max_hops, "run tuned");
        Ok(Tuned {
            run_id: run_id.to_owned(),
            send_rate: (before.0, config.newsletter.as_ref().map(|n| n.send_rate)),
            chains: (before.1, k),
            chains_added: added,
            max_hops: (run.max_hops, max_hops),
        })
    }
    // ---- control ----------------------------------------------------------------------------

    /// Pause, resume or cancel. An action the run's state does not allow (resuming a cancelled
    /// run, pausing a finished one) is an error that changes nothing; a resume first checks
    /// that this environment can run the job (its secret, its kind), so it cannot leave a run
    /// `running` with chains that fail at once.
    pub async fn control(&self, run_id: &str, action: ControlAction) -> Result<Outcome, EngineError> {
        let run = self.load_run(run_id).await?;
        let now = self.now_ms();
        let allowed = match action {
            ControlAction::Pause => matches!(run.status, RunState::Running | RunState::Pausing | RunState::Paused),
            ControlAction::Resume => matches!(run.status, RunState::Running | RunState::Pausing | RunState::Paused),
            ControlAction::Cancel => !run.status.is_final(),
        };
        if !allowed {
            return Err(EngineError::NotAllowed {
                run_id: run_id.to_owned(),
                action: format!("{action:?}").to_lowercase(),
                status: run.status,
            });
        }
        if action == ControlAction::Resume {
            self.build_job(&run.job, &run.job_config)?;
        }
        match action {
            ControlAction::Pause => {
                self.sql(st::set_run_status(run_id, RunState::Pausing, Some("paused by operator"), now)).await?;
                self.sql(st::settle_pause(run_id, now)).await?;
            }
            ControlAction::Resume => {
                self.sql(st::resume_run(run_id, now)).await?;
                let token = uuid::Uuid::new_v4().simple().to_string();
                let chains = self.sql(st::unpark_chains(run_id, now, &format!("{token}.unpark"))).await?;
                self.invoke_chains(run_id, &chains).await;
                let revived = self.sql(st::revive_chain(run_id, now, &format!("{token}.revive"))).await?;
                self.invoke_chains(run_id, &revived).await;
            }
            ControlAction::Cancel => {
                self.sql(st::set_run_status(run_id, RunState::Cancelled, Some("cancelled by operator"), now)).await?;
            }
        }
        let after = self.load_run(run_id).await?;
        tracing::info!(run_id, ?action, from = %run.status, to = %after.status, "control");
        Ok(Outcome::Controlled { run_id: run_id.to_owned(), status: after.status })
    }

    // ---- status -----------------------------------------------------------------------------

    /// The latest run, or `run_id`'s.
    pub async fn status(&self, run_id: Option<&str>) -> Result<Option<RunStatus>, EngineError> {
        let run = match run_id {
            Some(id) => self.load_run(id).await?,
            None => match RunRow::first(&self.sql(st::latest_run()).await?).map_err(EngineError::State)? {
                Some(r) => r,
                None => return Ok(None),
            },
        };
        let id = run.run_id.as_str();
        let counts = count_by(&self.sql(st::ledger_counts(id)).await?, "state");
        let page_rows = self.sql(st::page_progress(id)).await?;
        let pages = count_by(&page_rows, "status");
        let mut counts = counts;
        if counts.is_empty() && self.is_range_kind(&run) {
            // Range kinds (`sql`) claim pages, not items: their items are those of done pages.
            let done_items = page_rows
                .records()
                .filter(|r| r.text("status").as_deref() == Some("done"))
                .map(|r| r.int("items"))
                .sum();
            counts.insert("done".to_owned(), done_items);
        }
        let chains = self.sql(st::chains_of(id)).await?;
        let get = |m: &HashMap<String, i64>, k: &str| m.get(k).copied().unwrap_or(0);
        let recorded: i64 = counts.values().sum();
        Ok(Some(RunStatus {
            run_id: run.run_id.clone(),
            job: run.job.clone(),
            run_key: run.run_key.clone(),
            status: run.status,
            reason: run.reason.clone(),
            total: run.total_items,
            done: get(&counts, "done"),
            failed: get(&counts, "failed"),
            skipped: get(&counts, "skipped"),
            unknown: get(&counts, "unknown"),
            claimed: get(&counts, "claimed"),
            pending: (run.total_items - recorded).max(0),
            null_keys: run.null_keys,
            pages_done: get(&pages, "done"),
            pages_total: run.total_pages,
            chains: chains
                .records()
                .map(|c| {
                    let lost_at_hops: Vec<i64> = c
                        .text("restart_hops")
                        .unwrap_or_default()
                        .split(',')
                        .filter_map(|h| h.trim().parse().ok())
                        .collect();
                    ChainStatus {
                        chain: c.int("chain_no"),
                        status: ChainState::parse(&c.text("status").unwrap_or_default()).unwrap_or(ChainState::Failed),
                        reason: c.text("reason"),
                        hops: c.int("next_hop") - 1,
                        hop_budget: run.max_hops,
                        restarts: c.int("restarts"),
                        warning: run::loss_pattern(&lost_at_hops),
                        lost_at_hops,
                        heartbeat_at_ms: c.int("heartbeat_at"),
                    }
                })
                .collect(),
            created_at_ms: run.created_at,
            finished_at_ms: run.finished_at,
            // A paused run's clock stops when it paused.
            elapsed_ms: match (run.finished_at, run.status) {
                (Some(at), _) => at,
                (None, RunState::Paused) => run.updated_at,
                (None, _) => self.now_ms(),
            } - run.created_at,
        }))
    }

    /// Whether the run's kind works on whole ranges (no ledger: its items are those of done
    /// pages). Item kinds are counted from the ledger only, so a page done with nothing recorded
    /// never counts as mail sent.
    fn is_range_kind(&self, run: &RunRow) -> bool {
        match run.job_config.kind.as_str() {
            "sql" => true,
            "newsletter" => false,
            _ => matches!(self.build_job(&run.job, &run.job_config), Ok(Job::Ranges(_))),
        }
    }

    /// Progress without scanning the ledger: cheap enough to poll while the run goes.
    pub async fn progress(&self, run_id: &str) -> Result<run::RunProgress, EngineError> {
        let run = self.load_run(run_id).await?;
        let pages = self.sql(st::page_progress(run_id)).await?;
        let chains = self.sql(st::chains_of(run_id)).await?;
        let done = pages.records().find(|r| r.text("status").as_deref() == Some("done"));
        Ok(run::RunProgress {
            status: run.status,
            total: run.total_items,
            items_done: done.map(|r| r.int("items")).unwrap_or(0),
            pages_done: done.map(|r| r.int("n")).unwrap_or(0),
            pages_total: run.total_pages,
            active_chains: chains
                .records()
                .filter(|c| c.text("status").as_deref() == Some(ChainState::Active.as_str()))
                .count(),
            hops: chains.records().map(|c| c.int("next_hop") - 1).sum(),
        })
    }

    /// Items of a run in one ledger state (e.g. the `unknown` ones to check by hand).
    pub async fn items_in_state(
        &self,
        run_id: &str,
        state: &str,
        limit: i64,
    ) -> Result<Vec<(String, Option<String>)>, EngineError> {
        let rows = self.sql(st::ledger_items(run_id, state, limit)).await?;
        Ok(rows.records().map(|r| (r.text("item_key").unwrap_or_default(), r.text("reason"))).collect())
    }

    /// Source rows the run left out because their key is NULL, as `column=value` pairs (the
    /// run's own source query, as it stood when the run started).
    pub async fn null_key_rows(&self, run_id: &str, limit: i64) -> Result<Vec<Vec<(String, String)>>, EngineError> {
        let run = self.load_run(run_id).await?;
        let cfg = &run.job_config;
        let rows = self.sql(st::null_key_rows(&cfg.source, &cfg.key_column, limit)).await?;
        Ok(rows
            .records()
            .map(|r| r.columns.iter().cloned().zip(r.values.iter().map(|v| v.to_string())).collect())
            .collect())
    }

    /// Renders one item's message without sending (the `preview` command).
    pub async fn preview(
        &self,
        job_name: &str,
        key: Option<&str>,
    ) -> Result<Option<crate::jobs::newsletter::Rendered>, EngineError> {
        let config = self.config.job(job_name)?.clone();
        let job = crate::jobs::newsletter::Newsletter::new(job_name, &config, &self.deps(job_name, &config))?;
        let stmt = match key {
            None => st::source_sample(&config.source, &config.key_column).remove(0),
            Some(k) => {
                // The key's type is unknown here: compare as text, which all key types support.
                crate::sql::Stmt::new(
                    format!(
                        "SELECT * FROM ({}) AS src WHERE CAST(src.{} AS TEXT) = :key",
                        config.source, config.key_column
                    ),
                    crate::sql::Params::new().with("key", k),
                )
            }
        };
        let rows = self.sql(stmt).await.map_err(|e| source_error(job_name, e))?;
        let columns = Arc::new(rows.columns.clone());
        let Some(values) = rows.rows.into_iter().next() else {
            return Ok(None);
        };
        let item = item_of(&columns, &config.key_column, values);
        let newsletter = config.newsletter.as_ref();
        let email_col = newsletter.map(|n| n.email_column.clone()).unwrap_or_default();
        let raw = item.get(&email_col).to_string();
        let address = crate::mail::deliverable(&raw, newsletter.is_some_and(|n| n.smtputf8)).map_err(|why| {
            JobError::Invalid {
                field: format!("jobs.{job_name}.newsletter.{email_col}"),
                message: format!("this recipient is skipped: {why}"),
            }
        })?;
        job.render(&item, "preview", &address)
            .map(Some)
            .map_err(|(field, message)| JobError::Invalid { field, message }.into())
    }
}

/// `a.b.c = value` pairs of a JSON value's leaves.
fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, v, out);
            }
        }
        other => out.push((prefix.to_owned(), other.to_string())),
    }
}

/// What `tune` changed: each pair is (before, after).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tuned {
    pub run_id: String,
    pub send_rate: (Option<f64>, Option<f64>),
    pub chains: (i64, i64),
    pub chains_added: usize,
    pub max_hops: (i64, i64),
}

/// Hops one page may need at `seconds_per_item` for the whole run: more than one when a
/// rate-limited page outlasts a hop.
fn hops_per_page(settings: &crate::config::Settings, config: &JobConfig, seconds_per_item: Option<f64>) -> i64 {
    let usable = settings.hop_timeout.saturating_sub(settings.hop_margin);
    match seconds_per_item {
        Some(s) => {
            let page_secs = s * config.chains as f64 * config.page_size as f64;
            // Bounded: validated rates keep this far below the cap, which guards the arithmetic.
            (page_secs / usable.as_secs_f64().max(0.001)).ceil().clamp(1.0, 1e9) as i64 + 1
        }
        None => 1,
    }
}

/// What checking a job's source found out.
struct SourceCheck {
    key_type: KeyType,
    null_keys: i64,
}

pub(crate) fn item_of(columns: &Arc<Vec<String>>, key: &str, values: Vec<Value>) -> Item {
    let idx = columns.iter().position(|c| c.eq_ignore_ascii_case(key));
    // A key of a type a key cannot have still gets a distinct ledger key, so it can be failed.
    let key = idx.map(|i| values[i].key_text().unwrap_or_else(|| values[i].to_string())).unwrap_or_default();
    Item { key, columns: columns.clone(), values }
}

fn source_error(job: &str, e: SqlError) -> EngineError {
    match e {
        SqlError::Statement { message } => JobError::Invalid {
            field: format!("jobs.{job}.source"),
            message: format!("the source query failed: {message}"),
        }
        .into(),
        other => other.into(),
    }
}

fn count_by(rows: &crate::sql::Rows, column: &str) -> HashMap<String, i64> {
    rows.records().map(|r| (r.text(column).unwrap_or_default(), r.int("n"))).collect()
}

/// `YYYY-MM` of an epoch-milliseconds instant in the IANA time zone `tz`: a run key.
pub fn period_key(at_ms: i64, tz: &str) -> Result<String, EngineError> {
    let zone =
        jiff::tz::TimeZone::get(tz).map_err(|e| EngineError::State(format!("time zone `{tz}` is not known: {e}")))?;
    let at = jiff::Timestamp::from_millisecond(at_ms)
        .map_err(|e| EngineError::State(format!("time {at_ms} ms is out of range: {e}")))?;
    let local = zone.to_datetime(at);
    Ok(format!("{:04}-{:02}", local.year(), local.month()))
}

/// How long before `deadline` a hop stops claiming pages.
pub(crate) fn soft_deadline(deadline: Instant, margin: Duration) -> Instant {
    let left = deadline.saturating_duration_since(Instant::now());
    deadline - margin.min(left / 2)
}

#[cfg(test)]
mod tests {
    use super::period_key;

    #[test]
    fn period_keys_in_the_jobs_time_zone() {
        assert_eq!(period_key(0, "UTC").unwrap(), "1970-01");
        assert_eq!(period_key(1_795_000_000_000, "UTC").unwrap(), "2026-11");
        assert_eq!(period_key(951_782_400_000, "UTC").unwrap(), "2000-02"); // 2000-02-29
        // 08:00 on 1 December in Tokyo is 23:00 UTC on 30 November.
        let fired: jiff::Timestamp = "2026-11-30T23:00:00Z".parse().unwrap();
        assert_eq!(period_key(fired.as_millisecond(), "Asia/Tokyo").unwrap(), "2026-12");
        assert_eq!(period_key(fired.as_millisecond(), "UTC").unwrap(), "2026-11");
        assert!(period_key(0, "Mars/Olympus").is_err());
    }
}
