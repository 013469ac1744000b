//! The read models: a run's status with per-chain detail ([`Engine::status`]), cheap progress
//! for polling ([`Engine::progress`]), and the items or source rows an operator checks by hand.

use std::collections::HashMap;

use super::run::{self, ChainStatus, RunRow, RunStatus};
use super::state::{ChainState, RunState, State};
use super::{Engine, EngineError};
use crate::jobs::{Job, KindRegistry};
use crate::sql::{Record, Rows, SqlError, statements as st};

impl Engine {
    /// The latest run, or `run_id`'s.
    pub async fn status(&self, run_id: Option<&str>) -> Result<Option<RunStatus>, EngineError> {
        let run = match run_id {
            Some(id) => self.load_run(id).await?,
            None => match RunRow::first(&self.sql(st::latest_run()).await?)? {
                Some(r) => r,
                None => return Ok(None),
            },
        };
        let id = run.run_id.as_str();
        let mut counts = count_by(&self.sql(st::ledger_counts(id)).await?, "state", "n")?;
        let page_rows = self.sql(st::page_progress(id)).await?;
        let pages = count_by(&page_rows, "status", "n")?;
        if counts.is_empty() && self.is_range_kind(&run) {
            // Range kinds (`sql`) claim pages, not items: their items are those of done pages.
            let done_items = count_by(&page_rows, "status", "items")?.remove("done").unwrap_or(0);
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
            chains: chains.records().map(|c| self.chain_status(c, run.max_hops)).collect::<Result<_, _>>()?,
            mail: self.mail_counts(id).await?,
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
        KindRegistry::builtin_works_on_ranges(&run.job_config.kind)
            .unwrap_or_else(|| matches!(self.build_job(&run.job, &run.job_config), Ok(Job::Ranges(_))))
    }

    /// Progress without scanning the ledger: cheap enough to poll while the run goes.
    pub async fn progress(&self, run_id: &str) -> Result<run::RunProgress, EngineError> {
        let rows = self.sql(st::run_progress(run_id)).await?;
        let r = rows.first().ok_or_else(|| EngineError::RunNotFound(run_id.into()))?;
        let text = r.text("status")?.unwrap_or_default();
        let status = RunState::parse(&text).ok_or_else(|| EngineError::State(format!("run status `{text}`")))?;
        Ok(run::RunProgress {
            status,
            total: r.int("total_items")?,
            items_done: r.int("items_done")?,
            pages_done: r.int("pages_done")?,
            pages_total: r.int("total_pages")?,
            active_chains: r.int("active_chains")? as usize,
            hops: r.int("hops")?,
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
        let items = rows.records().map(|r| Ok((r.text("item_key")?.unwrap_or_default(), r.text("reason")?)));
        Ok(items.collect::<Result<_, SqlError>>()?)
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
}

impl Engine {
    /// One chain's row, for [`RunStatus`]: its hops against the budget, how long it has been
    /// silent (flagged `stuck` past the stale threshold), its last error, and the hops at which
    /// the sweeper found it lost (a pattern of losses at one hop number is flagged).
    fn chain_status(&self, c: Record<'_>, hop_budget: i64) -> Result<ChainStatus, SqlError> {
        let lost_at_hops: Vec<i64> =
            c.text("restart_hops")?.unwrap_or_default().split(',').filter_map(|h| h.trim().parse().ok()).collect();
        let status = ChainState::parse(&c.text("status")?.unwrap_or_default()).unwrap_or(ChainState::Failed);
        let heartbeat_at_ms = c.int("heartbeat_at")?;
        let heartbeat_age_ms = (self.now_ms() - heartbeat_at_ms).max(0);
        let stale_ms = self.config.settings.stale_after().as_millis() as i64;
        Ok(ChainStatus {
            chain: c.int("chain_no")?,
            status,
            reason: c.text("reason")?,
            hops: c.int("next_hop")? - 1,
            hop_budget,
            restarts: c.int("restarts")?,
            warning: run::loss_pattern(&lost_at_hops),
            lost_at_hops,
            heartbeat_at_ms,
            heartbeat_age_ms,
            stuck: status == ChainState::Active && heartbeat_age_ms > stale_ms,
            last_error: c.text("last_error")?,
            last_trace_id: c.text("last_trace")?.as_deref().and_then(super::trace::trace_id),
        })
    }
}

/// `key` column → `value` column, over every row.
fn count_by(rows: &Rows, key: &str, value: &str) -> Result<HashMap<String, i64>, SqlError> {
    rows.records().map(|r| Ok((r.text(key)?.unwrap_or_default(), r.int(value)?))).collect()
}
