//! Starting a run: the job is checked against a sample of its source (columns, a unique key of
//! one sortable type, templates), then the run is planned in one transaction (the run row, its
//! pages fixed now, K chains) and hop 1 of every chain is invoked. A second start of the same
//! `(job, run_key)` finds the run and starts nothing, even when the plan committed and its
//! answer was lost.

use std::sync::Arc;
use std::time::Duration;

use super::event::{self, EventError};
use super::run::RunRow;
use super::trace;
use super::{Engine, EngineError, Outcome, SQL_ATTEMPTS, item_of, period_key};
use crate::config::{JobConfig, Settings};
use crate::jobs::{Job, JobError, backoff};
use crate::ports::MailError;

use crate::sql::{KeyType, SqlError, statements as st};

impl Engine {
    /// Validates, plans and starts a run; returns the existing run if `(job, run_key)` exists.
    /// Traced like a `start` event: the start span every hop of the run links to.
    pub async fn start(&self, job_name: &str, run_key: Option<&str>) -> Result<Outcome, EngineError> {
        let attributes = vec![opentelemetry::KeyValue::new("baton.job", job_name.to_owned())];
        self.in_root("start", attributes, None, self.start_run(job_name, run_key)).await
    }

    pub(crate) async fn start_run(&self, job_name: &str, run_key: Option<&str>) -> Result<Outcome, EngineError> {
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
        let check = self.check_source(job_name, &config, &job).await?;
        if check.null_keys > 0 {
            let null_keys = check.null_keys;
            tracing::warn!(
                job = job_name,
                null_keys,
                "source rows with a NULL key are left out (`baton status` counts them)"
            );
        }
        let run_id = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
        let plan = self.plan(&run_id, job_name, &run_key, &config, &job, &check);
        if let Some(existing) = self.commit_plan(plan, job_name, &run_key, &run_id).await? {
            return Ok(existing);
        }
        let run = self.load_run(&run_id).await?;
        let chains = self.sql(st::chains_of(&run_id)).await?;
        self.invoke_chains(&run_id, &chains).await?;
        let (pages, items) = (run.total_pages, run.total_items);
        tracing::info!(run_id, job = job_name, run_key, pages, items, "run started");
        Ok(Outcome::Started {
            run_id,
            chains: run.chains,
            pages: run.total_pages,
            items: run.total_items,
            existing: false,
        })
    }

    /// The statements that plan the run, committed together: the run row (with the job's config
    /// as it is now, without secrets), its pages (every `page_size`-th key, fixed now) and its
    /// chains.
    fn plan(
        &self,
        run_id: &str,
        job_name: &str,
        run_key: &str,
        config: &JobConfig,
        job: &Job,
        check: &SourceCheck,
    ) -> Vec<crate::sql::Stmt> {
        let now = self.now_ms();
        let snapshot = serde_json::to_string(config).expect("config serialises");
        let start_trace = trace::current_traceparent();
        let run = st::NewRun {
            run_id,
            job: job_name,
            run_key,
            job_config: &snapshot,
            key_type: check.key_type.as_str(),
            null_keys: check.null_keys,
            deadline_at: now + config.run_deadline.as_millis() as i64,
            now,
            start_trace: start_trace.as_deref(),
        };
        st::plan_run(
            &run,
            &config.source,
            &config.key_column,
            config.page_size as i64,
            config.chains as i64,
            self.hops_per_page(config, job),
            config.hop_slack as i64,
        )
    }

    /// Commits the plan of run `run_id`. Returns the run that holds `(job, run_key)` when it is
    /// another one (a concurrent start won): that one is the run, and this plan is dropped.
    async fn commit_plan(
        &self,
        plan: Vec<crate::sql::Stmt>,
        job: &str,
        run_key: &str,
        run_id: &str,
    ) -> Result<Option<Outcome>, EngineError> {
        let mut attempt = 0;
        while let Err(e) = self.store.transaction(plan.clone()).await {
            attempt += 1;
            match self.existing_run(job, run_key).await? {
                // The plan committed and only its answer was lost: this is our run, go on.
                Some(Outcome::Started { run_id: found, .. }) if found == run_id => {
                    tracing::warn!(run_id, error = %e, "the plan committed although its answer was lost");
                    break;
                }
                // Lost a race with another start of the same run: that one is the run.
                Some(existing) => return Ok(Some(existing)),
                // Not committed (nothing holds the run key): safe to try again.
                None if e.is_transient() && attempt < SQL_ATTEMPTS => {
                    tokio::time::sleep(backoff(attempt, Duration::from_millis(20), Duration::from_millis(500))).await;
                }
                None => return Err(source_error(job, e)),
            }
        }
        Ok(None)
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
            Err(MailError::AccountStopped(why)) => Err(EngineError::MailerUnavailable(why)),
            Err(e) => {
                tracing::warn!(job, error = %e, "could not read the provider's send rate; using the configured one");
                Ok(())
            }
        }
    }

    /// The run key of a scheduled start: the month of `scheduled_time` in the job's time zone.
    pub(super) fn scheduled_run_key(&self, job: &str, scheduled_time: &str) -> Result<String, EngineError> {
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
        Ok(RunRow::first(&rows)?.map(|r| Outcome::Started {
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
        let (n, distinct, rows) = match counts.first() {
            Some(r) => (r.int("n")?, r.int("d")?, r.int("total")?),
            None => (0, 0, 0),
        };
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
            .map(|r| Ok((r.text("t")?.unwrap_or_default(), r.int("n")?, r.text("example")?.unwrap_or_default())))
            .collect::<Result<_, SqlError>>()?;
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
}

/// Hops one page may need at `seconds_per_item` for the whole run: more than one when a
/// rate-limited page outlasts a hop.
pub(super) fn hops_per_page(settings: &Settings, config: &JobConfig, seconds_per_item: Option<f64>) -> i64 {
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

pub(super) fn source_error(job: &str, e: SqlError) -> EngineError {
    match e {
        SqlError::Statement { message } | SqlError::Undefined { message } => JobError::Invalid {
            field: format!("jobs.{job}.source"),
            message: format!("the source query failed: {message}"),
        }
        .into(),
        other => other.into(),
    }
}
