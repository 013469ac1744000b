//! The run row and the status report built from the state tables.

use serde::Serialize;

use super::EngineError;
use super::state::{ChainState, RunState, State};
use crate::config::JobConfig;
use crate::sql::{KeyType, Record, Rows};

#[derive(Debug, Clone)]
pub struct RunRow {
    pub run_id: String,
    pub job: String,
    pub run_key: String,
    pub status: RunState,
    pub reason: Option<String>,
    pub job_config: JobConfig,
    pub key_type: KeyType,
    pub chains: i64,
    pub total_items: i64,
    pub total_pages: i64,
    pub max_hops: i64,
    /// Source rows left out at planning because their key is NULL.
    pub null_keys: i64,
    pub deadline_at: i64,
    pub created_at: i64,
    pub updated_at: i64,
    pub finished_at: Option<i64>,
    /// The start span's W3C `traceparent`, linked from every hop.
    pub start_trace: Option<String>,
}

impl RunRow {
    /// A run's row; a missing column or an unknown status is an error, never a default.
    pub fn from_record(r: Record<'_>) -> Result<RunRow, EngineError> {
        let state = |why: String| EngineError::State(why);
        let stored = r.text("job_config")?.unwrap_or_default();
        let job_config: JobConfig =
            serde_json::from_str(&stored).map_err(|e| state(format!("run's stored job config does not parse: {e}")))?;
        let status = r.text("status")?.unwrap_or_default();
        let key_type = r.text("key_type")?.unwrap_or_default();
        Ok(RunRow {
            run_id: r.text("run_id")?.unwrap_or_default(),
            job: r.text("job")?.unwrap_or_default(),
            run_key: r.text("run_key")?.unwrap_or_default(),
            status: RunState::parse(&status).ok_or_else(|| state(format!("run has an unknown status {status:?}")))?,
            reason: r.text("reason")?,
            job_config,
            key_type: KeyType::parse(&key_type)
                .ok_or_else(|| state(format!("run has an unknown key type {key_type:?}")))?,
            chains: r.int("chains")?,
            total_items: r.int("total_items")?,
            total_pages: r.int("total_pages")?,
            max_hops: r.int("max_hops")?,
            null_keys: r.int("null_keys")?,
            deadline_at: r.int("deadline_at")?,
            created_at: r.int("created_at")?,
            updated_at: r.int("updated_at")?,
            finished_at: r.opt_int("finished_at")?,
            start_trace: r.text("start_trace")?,
        })
    }

    pub fn first(rows: &Rows) -> Result<Option<RunRow>, EngineError> {
        rows.first().map(RunRow::from_record).transpose()
    }

    pub fn is_terminal(&self) -> bool {
        self.status.is_final()
    }
}

/// What `baton status` prints (and `--json` emits).
#[derive(Debug, Clone, Serialize)]
pub struct RunStatus {
    pub run_id: String,
    pub job: String,
    pub run_key: String,
    pub status: RunState,
    pub reason: Option<String>,
    pub total: i64,
    pub done: i64,
    pub failed: i64,
    pub skipped: i64,
    pub unknown: i64,
    /// Claimed but not yet recorded (in flight, or left by a crashed hop until its lease ends).
    pub claimed: i64,
    pub pending: i64,
    /// Source rows left out because their key is NULL (not part of `total`).
    pub null_keys: i64,
    pub pages_done: i64,
    pub pages_total: i64,
    pub chains: Vec<ChainStatus>,
    /// What SES reported back for this run's messages (deliveries, bounces, complaints).
    pub mail: super::suppression::MailCounts,
    pub created_at_ms: i64,
    pub finished_at_ms: Option<i64>,
    pub elapsed_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChainStatus {
    pub chain: i64,
    pub status: ChainState,
    pub reason: Option<String>,
    /// Hops this chain has started (its next hop number minus one).
    pub hops: i64,
    /// The most hops this chain may take (the run's hop budget).
    pub hop_budget: i64,
    pub restarts: i64,
    /// The hop numbers at which the sweeper found the chain silent and restarted it.
    pub lost_at_hops: Vec<i64>,
    /// Set when those losses look systematic rather than chance (see [`loss_pattern`]).
    pub warning: Option<String>,
    pub heartbeat_at_ms: i64,
    /// How long ago the chain last showed life (a hop's heartbeat every 5 s or quarter
    /// `hop_timeout`, a hop's start or hand-over, a restart).
    pub heartbeat_age_ms: i64,
    /// An active chain silent for longer than the stale threshold (`settings.stale_after`): its
    /// hop died or its event was lost, and the next sweep restarts it. A chain that stays stuck
    /// after sweeps is what to look at (`last_error`, `warning`).
    pub stuck: bool,
    /// The last thing that went wrong with the chain: a hop that failed with an error, or a
    /// restart by the sweeper.
    pub last_error: Option<String>,
    /// The trace id of the chain's last hop that started (32 hex digits): paste it into Grafana
    /// (Tempo, or the X-Ray data source) or X-Ray's trace search. `None` without tracing.
    pub last_trace_id: Option<String>,
}

/// A chain whose hops keep being lost at the same stride (hop 17, 33, 49, ...) is not unlucky:
/// something stops it every N hops, and Lambda's recursive-loop detection does exactly that
/// after about 16 hops when the function does not allow recursion. Two or more restarts at an
/// equal stride of at most 20 hops (counted from hop 1) say so.
///
/// A chain restarted at the same hop number again and again is stuck there: every delivery of
/// that hop dies (or errs) before it starts its work.
pub fn loss_pattern(lost_at: &[i64]) -> Option<String> {
    if lost_at.len() < 2 {
        return None;
    }
    let last = lost_at[lost_at.len() - 1];
    let again = lost_at.iter().rev().take_while(|h| **h == last).count();
    if again >= 2 {
        return Some(format!(
            "hop {last} was lost {again} times in a row: every delivery of it dies or fails before its work starts; its trace (`last_trace_id`, the hop before) and `last_error` say where"
        ));
    }
    let stride = lost_at[0] - 1;
    let regular = (1..=20).contains(&stride) && lost_at.windows(2).all(|w| w[1] - w[0] == stride);
    regular.then(|| {
        format!(
            "hops are lost every {stride} hops (at {}): Lambda's recursive-loop detection stops chains after \
             about 16 hops; set `RecursiveLoop: Allow` on the function",
            lost_at.iter().map(|h| format!("hop {h}")).collect::<Vec<_>>().join(", ")
        )
    })
}

impl RunStatus {
    pub fn is_terminal(&self) -> bool {
        self.status.is_final()
    }

    /// The identity that must hold when a run succeeded.
    pub fn accounted(&self) -> bool {
        self.done + self.failed + self.skipped + self.unknown == self.total
    }
}

/// A cheap view of a run for progress displays: no ledger scan (O(pages + chains)).
#[derive(Debug, Clone, Serialize)]
pub struct RunProgress {
    pub status: RunState,
    pub total: i64,
    /// Items of finished pages.
    pub items_done: i64,
    pub pages_done: i64,
    pub pages_total: i64,
    pub active_chains: usize,
    pub hops: i64,
}

impl RunProgress {
    pub fn is_settled(&self) -> bool {
        self.status.is_settled()
    }
}

#[cfg(test)]
mod tests {
    use super::loss_pattern;

    #[test]
    fn hops_lost_at_a_fixed_stride_are_flagged() {
        let flagged = loss_pattern(&[17, 33, 49]).unwrap();
        assert!(flagged.contains("every 16 hops") && flagged.contains("RecursiveLoop: Allow"), "{flagged}");
        assert!(loss_pattern(&[17]).is_none(), "one loss is chance");
        assert!(loss_pattern(&[5, 40]).is_none(), "irregular losses are chance");
        assert!(loss_pattern(&[101, 201]).is_none(), "a stride far beyond 16 is not loop detection");
    }

    #[test]
    fn a_hop_lost_again_and_again_at_the_same_number_is_flagged() {
        let flagged = loss_pattern(&[3, 9, 9, 9]).unwrap();
        assert!(flagged.contains("hop 9 was lost 3 times in a row"), "{flagged}");
        assert!(loss_pattern(&[9, 9, 12]).is_none(), "the chain got past it");
    }
}
