//! The sweeper: run from a frequent schedule (`sweep` event) or the local driver's timer. For
//! every open run it restarts chains whose heartbeat stopped (their hop died or their event was
//! lost) from their checkpoint, revives a chain when pages are claimable but none is active,
//! unparks chains of a running run (a resume that raced their parking), parks silent chains of
//! a pausing run, fails runs past their deadline, and completes a run
//! whose last chain died after finishing the last page.

use serde::Serialize;

use super::state::RunState;
use super::{Engine, EngineError, run::RunRow};
use crate::sql::statements as st;

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SweepReport {
    pub runs: usize,
    pub restarted: usize,
    pub revived: usize,
    pub parked: usize,
    pub unparked: usize,
    pub completed: usize,
    pub failed: usize,
}

impl Engine {
    pub async fn sweep(&self) -> Result<SweepReport, EngineError> {
        let mut report = SweepReport::default();
        let open = self.sql(st::open_runs()).await?;
        let stale_ms = self.config.settings.stale_after().as_millis() as i64;
        for record in open.records() {
            let run = RunRow::from_record(record).map_err(EngineError::State)?;
            let id = run.run_id.as_str();
            let now = self.now_ms();
            report.runs += 1;
            if now > run.deadline_at {
                let reason = "the run passed its deadline (jobs.NAME.run_deadline)";
                if !self.sql(st::set_run_status(id, RunState::Failed, Some(reason), now)).await?.rows.is_empty() {
                    report.failed += 1;
                }
                continue;
            }
            if run.status == RunState::Paused {
                continue; // waits for the operator; only its deadline applies
            }
            if run.status == RunState::Pausing {
                report.parked += self.sql(st::park_stale_chains(id, now - stale_ms)).await?.rows.len();
                self.sql(st::settle_pause(id, now)).await?;
                continue;
            }
            let stale = self.sql(st::claim_stale_chains(id, now - stale_ms, now)).await?;
            for c in stale.records() {
                tracing::info!(
                    run_id = id,
                    chain = c.int("chain_no"),
                    hop = c.int("next_hop"),
                    "restarting a silent chain"
                );
            }
            report.restarted += self.invoke_chains(id, &stale).await;
            // Chains parked although the run is running (a resume raced their parking): back
            // to work from their checkpoints.
            let parked = self.sql(st::unpark_chains(id, now)).await?;
            report.unparked += self.invoke_chains(id, &parked).await;
            let revived = self.sql(st::revive_chain(id, now)).await?;
            report.revived += self.invoke_chains(id, &revived).await;
            if !self.sql(st::complete_run(id, now)).await?.rows.is_empty() {
                report.completed += 1;
                self.sql(st::end_chains(id)).await?;
            }
        }
        Ok(report)
    }
}
