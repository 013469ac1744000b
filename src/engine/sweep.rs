//! The sweeper: run from a frequent schedule (`sweep` event) or the local runtime's timer. For
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
    /// Claims left by hops that died after their run ended, now `unknown`.
    pub settled: usize,
    pub completed: usize,
    pub failed: usize,
}

impl Engine {
    pub async fn sweep(&self) -> Result<SweepReport, EngineError> {
        let mut report = SweepReport::default();
        report.settled += self.settle_final_runs().await?;
        let open = self.sql(st::open_runs()).await?;
        for record in open.records() {
            // One call's token: its own re-runs (lost answers) find its own changes again.
            let token = uuid::Uuid::new_v4().simple().to_string();
            let run = match RunRow::from_record(record) {
                Ok(run) => run,
                Err(e) => {
                    // One unreadable run (e.g. written by a newer baton) must not stop the sweep
                    // of every other run.
                    tracing::error!(
                        run_id = record.text("run_id").ok().flatten(),
                        error = %e,
                        "skipping a run the sweeper cannot read"
                    );
                    continue;
                }
            };
            report.runs += 1;
            self.sweep_run(&run, &token, &mut report).await?;
        }
        Ok(report)
    }

    /// Sweeps one open run: fails it past its deadline, parks a pausing run's silent chains,
    /// restarts a running run's silent chains from their checkpoints (through the same
    /// compare-and-set a hop makes, so a late original and the restart cannot both run), and
    /// completes it if nothing is left.
    async fn sweep_run(&self, run: &RunRow, token: &str, report: &mut SweepReport) -> Result<(), EngineError> {
        let (id, now) = (run.run_id.as_str(), self.now_ms());
        let stale_ms = self.config.settings.stale_after().as_millis() as i64;
        if now > run.deadline_at {
            let reason = "the run passed its deadline (jobs.NAME.run_deadline)";
            if !self.sql(st::set_run_status(id, RunState::Failed, Some(reason), now)).await?.rows.is_empty() {
                report.failed += 1;
            }
            return Ok(());
        }
        match run.status {
            RunState::Paused => return Ok(()), // waits for the operator; only its deadline applies
            RunState::Pausing => {
                report.parked += self.sql(st::park_stale_chains(id, now - stale_ms)).await?.rows.len();
                self.sql(st::settle_pause(id, now)).await?;
                return Ok(());
            }
            _ => {}
        }
        let stale = self.sql(st::claim_stale_chains(id, now - stale_ms, now, &format!("{token}.restart"))).await?;
        for c in stale.records() {
            let (chain, hop) = (c.int("chain_no")?, c.int("next_hop")?);
            tracing::info!(run_id = id, chain, hop, "restarting a silent chain");
        }
        report.restarted += self.invoke_chains(id, &stale).await?;
        // Chains parked although the run is running (a resume raced their parking): back to
        // work from their checkpoints.
        let parked = self.sql(st::unpark_chains(id, now, &format!("{token}.unpark"))).await?;
        report.unparked += self.invoke_chains(id, &parked).await?;
        let revived = self.sql(st::revive_chain(id, now, &format!("{token}.revive"))).await?;
        report.revived += self.invoke_chains(id, &revived).await?;
        if !self.sql(st::complete_run(id, now, token)).await?.rows.is_empty() {
            report.completed += 1;
            self.sql(st::end_chains(id)).await?;
        }
        Ok(())
    }

    /// Runs that ended (cancelled, failed) while a hop was mid-page, and that hop then died: its
    /// claims become `unknown` (they may have been sent) and its pages are let go. Returns how
    /// many claims were settled.
    async fn settle_final_runs(&self) -> Result<usize, EngineError> {
        let now = self.now_ms();
        let mut settled = 0;
        for r in self.sql(st::final_runs_with_dead_leases(now)).await?.records() {
            let id = r.text("run_id")?.unwrap_or_default();
            settled += self.sql(st::settle_dead_claims(&id, now)).await?.affected as usize;
            self.sql(st::release_dead_leases(&id, now)).await?;
            self.sql(st::end_chains(&id)).await?;
        }
        Ok(settled)
    }
}
