//! Steering a live run: pause, resume and cancel ([`Engine::control`]), and changing its send
//! rate or chain count ([`Engine::tune`]); plus what in the config file now differs from what a
//! run started with ([`Engine::config_drift`]).

use serde::Serialize;

use super::event::ControlAction;
use super::run::RunRow;
use super::start::hops_per_page;
use super::state::RunState;
use super::{Engine, EngineError, Outcome};
use crate::config::{ConfigError, JobConfig};
use crate::jobs::JobError;
use crate::sql::statements as st;

impl Engine {
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

    /// Changes a live run's send rate and chain count (the rest of its config is fixed when it
    /// starts). The rate applies from each chain's next hop; the hop budget grows to fit a lower
    /// rate. New chains are invoked now when `invoke_new` (chains run elsewhere, in Lambda), or
    /// left for the next sweep to start (the local runtime driving the run, in another process). With
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
        let config = tuned_config(&run, send_rate, chains)?;
        let before = (run.job_config.newsletter.as_ref().map(|n| n.send_rate), run.chains);
        let chain_rows = self.sql(st::chains_of(run_id)).await?;
        let hops: Vec<i64> = chain_rows.records().map(|c| c.int("next_hop")).collect::<Result<_, _>>()?;
        let furthest = hops.into_iter().max().unwrap_or(1);
        let max_hops = self.retuned_hop_budget(&run, &config, furthest);
        let k = config.chains as i64;
        let now = self.now_ms();
        let snapshot = serde_json::to_string(&config).expect("config serialises");
        // New chains start one period of the new per-chain rate from now, so the run's rate is
        // not exceeded while the running chains still pace at the old share (until their next
        // hop reads the new config).
        let period_ms = seconds_per_item(&config).map_or(0, |s| (s * k as f64 * 1000.0).min(1e12) as i64);
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
            self.invoke_chains(run_id, &results[1]).await?;
            self.invoke_chains(run_id, &results[2]).await?;
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

    /// The run's hop budget for `config`: what it was given for its pages, scaled by how much
    /// longer a page takes now, beyond the furthest chain's hop; never less than before. A
    /// ratio, so this process's own hop settings (not the deployed function's) cancel out.
    fn retuned_hop_budget(&self, run: &RunRow, config: &JobConfig, furthest: i64) -> i64 {
        let settings = &self.config.settings;
        let (hpp_old, hpp_new) = (
            hops_per_page(settings, &run.job_config, seconds_per_item(&run.job_config)),
            hops_per_page(settings, config, seconds_per_item(config)),
        );
        let paged = (run.max_hops - run.job_config.hop_slack as i64).max(run.total_pages);
        let scaled = (paged as f64 * hpp_new as f64 / hpp_old.max(1) as f64).ceil().min(1e15) as i64;
        run.max_hops.max(furthest.saturating_add(scaled).saturating_add(config.hop_slack as i64))
    }

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
                self.invoke_chains(run_id, &chains).await?;
                let revived = self.sql(st::revive_chain(run_id, now, &format!("{token}.revive"))).await?;
                self.invoke_chains(run_id, &revived).await?;
            }
            ControlAction::Cancel => {
                self.sql(st::set_run_status(run_id, RunState::Cancelled, Some("cancelled by operator"), now)).await?;
            }
        }
        let after = self.load_run(run_id).await?;
        tracing::info!(run_id, ?action, from = %run.status, to = %after.status, "control");
        Ok(Outcome::Controlled { run_id: run_id.to_owned(), status: after.status })
    }
}

/// The run's config with a new send rate and chain count, validated; an error names the flag.
fn tuned_config(run: &RunRow, send_rate: Option<f64>, chains: Option<u32>) -> Result<JobConfig, EngineError> {
    let mut config = run.job_config.clone();
    if let Some(rate) = send_rate {
        let n = config.newsletter.as_mut().ok_or_else(|| JobError::Invalid {
            field: "--send-rate".into(),
            message: format!("run {} is a `{}` job, which has no send rate", run.run_id, config.kind),
        })?;
        n.send_rate = rate;
    }
    if let Some(k) = chains {
        config.chains = k;
    }
    config.validate(&run.job).map_err(|e| match e {
        ConfigError::Invalid { field, message } => {
            let field = match field {
                f if f.ends_with("send_rate") => "--send-rate".into(),
                f if f.ends_with("chains") => "--chains".into(),
                f => f,
            };
            JobError::Invalid { field, message }.into()
        }
        other => EngineError::Config(other),
    })?;
    Ok(config)
}

/// Seconds one item takes at the job's rate for the whole run, if it is rate-limited.
fn seconds_per_item(config: &JobConfig) -> Option<f64> {
    config.newsletter.as_ref().filter(|n| n.send_rate > 0.0).map(|n| 1.0 / n.send_rate)
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
