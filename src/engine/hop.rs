//! One hop of a chain: the compare-and-set that makes hops fork-proof, the page loop under the
//! time budget, and the hand-over to the next hop.
//!
//! Per page the hop issues a fixed number of statements whatever the page size: claim the page,
//! (settle a crashed owner's claims, only on a re-offered page), load its rows, claim its items,
//! write results, (drop unattempted claims, only when the budget ran out mid-page), finish or
//! release the page, heartbeat.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::StreamExt;
use tokio::time::Instant;

use super::state::{ChainState, ItemState, RunState, State};
use super::{Engine, EngineError, HopNext, Outcome, item_of, run::RunRow, soft_deadline};
use crate::jobs::{Item, ItemContext, ItemJob, ItemOutcome, Job, JobError, RangeJob, RangeOutcome, resend_ambiguous};
use crate::sql::{KeyType, Record, statements as st};

/// A leased page.
struct Page {
    page_no: i64,
    lo: Option<String>,
    hi: String,
    attempts: i64,
    lease_expires_at: i64,
}

impl Page {
    fn from_record(r: Record<'_>) -> Page {
        Page {
            page_no: r.int("page_no"),
            lo: r.text("lo"),
            hi: r.text("hi").unwrap_or_default(),
            attempts: r.int("attempts"),
            lease_expires_at: r.int("lease_expires_at"),
        }
    }
}

/// What processing one page amounted to.
#[derive(Default)]
struct PageReport {
    finished: bool,
    failures: u64,
    pause_reason: Option<String>,
    fail_reason: Option<String>,
}

/// The reason recorded for a send still in flight when the hop had to stop waiting for it.
pub const CUT_OFF_IN_FLIGHT: &str = "the send was still in flight when the hop had to stop";

/// Claims retried when a concurrent claim took the page this one aimed at.
const CLAIM_RETRIES: u32 = 3;

/// Items per batched ledger statement. A page up to this size takes one statement each to claim,
/// record and release; larger pages take a few, so no statement outgrows the Data API's 64 KiB
/// limit on SQL text.
const ITEMS_PER_STATEMENT: usize = 1000;

/// Under at-least-once, items whose outcome is unknown are sent again on later claims of their
/// page, up to this many claims; past it they are recorded `unknown` rather than mailed without
/// end (a recipient whose every send times out).
const RESEND_CLAIMS: i64 = 4;

impl Engine {
    #[tracing::instrument(skip(self, deadline), fields(baton.run_id = run_id, baton.chain = chain, baton.hop = hop))]
    pub async fn hop(&self, run_id: &str, chain: u32, hop: u64, deadline: Instant) -> Result<Outcome, EngineError> {
        // Fencing starts here: leases and staleness derive from `hop_timeout`, so no hop may
        // live longer than that, whatever deadline its environment gives it (a Lambda function
        // timeout longer than `hop_timeout` would otherwise let a hop send after its lease
        // expired and another hop took its page over).
        let deadline = deadline.min(Instant::now() + self.config.settings.hop_timeout);
        let (chain, hop) = (chain as i64, hop as i64);
        let run = self.load_run(run_id).await?;
        let now = self.now_ms();
        if run.is_terminal() {
            // The chain was waiting for this hop: it ends with its run.
            self.sql(st::set_chain_status(run_id, chain, Some(hop - 1), ChainState::Ended, None)).await?;
            return Ok(Outcome::Hopped { pages: 0, next: HopNext::Stopped });
        }
        if hop > run.max_hops {
            let reason = format!(
                "chain {chain} reached hop {hop}, beyond its budget of {} hops: stopped as a runaway",
                run.max_hops
            );
            return self.fail_run(&run, chain, &reason).await;
        }
        if now > run.deadline_at {
            return self.fail_run(&run, chain, "the run passed its deadline (jobs.NAME.run_deadline)").await;
        }
        // The fork guard: only one delivery of hop `hop` gets past this. The token tells this
        // invocation's own re-run of the statement apart from another delivery.
        let token = uuid::Uuid::new_v4().simple().to_string();
        let started = self.sql(st::start_hop(run_id, chain, hop, &token, now)).await?;
        let Some(send_after) = started.first().map(|r| r.get("send_after").as_i64()) else {
            tracing::info!("duplicate or stale hop: nothing to do");
            return Ok(Outcome::Duplicate);
        };
        tracing::debug!("hop started");
        let job = match self.build_job(&run.job, &run.job_config) {
            Ok(job) => job,
            Err(e) => {
                // This environment cannot run the job (a secret missing or too short, a kind not
                // registered): every hop and restart would fail the same way, so the run pauses
                // with the reason instead of looping, and resumes once the environment is fixed.
                let reason = format!("this environment cannot run the job: {e}; fix it, then `baton resume`");
                tracing::error!(%reason, "pausing the run");
                self.sql(st::set_run_status(run_id, RunState::Pausing, Some(&reason), now)).await?;
                if !self.sql(st::park_chain(run_id, chain, hop, &token)).await?.rows.is_empty() {
                    self.sql(st::settle_pause(run_id, now)).await?;
                }
                return Ok(Outcome::Hopped { pages: 0, next: HopNext::Parked });
            }
        };
        if let Job::Items(j) = &job {
            j.begin_hop(run.chains as u32, send_after);
        }
        let soft = soft_deadline(deadline, self.config.settings.hop_margin);
        // Unique per invocation: a duplicate delivery that somehow got this far could not pass
        // for this hop's lease holder.
        let owner = format!("c{chain}h{hop}.{}", &token[..12]);
        let lease_ms = self.config.settings.lease().as_millis() as i64;
        let mut pages = 0u32;
        let mut retries = 0;
        // Do not start a page that would likely outlast the budget: keep the slowest page seen.
        let mut slowest = std::time::Duration::ZERO;
        while Instant::now() + slowest < soft {
            let claim = st::claim_page(run_id, chain, hop, run.chains, &owner, self.now_ms(), lease_ms);
            let Some(page) = self.sql(claim).await?.first().map(Page::from_record) else {
                match self.no_page(&run, chain, hop, &token).await? {
                    Some(next) => return Ok(Outcome::Hopped { pages, next }),
                    None if retries < CLAIM_RETRIES => {
                        retries += 1;
                        continue;
                    }
                    None => break,
                }
            };
            let page_started = Instant::now();
            let report = match &job {
                Job::Items(j) => self.process_items(&run, chain, &owner, &page, j, (soft, deadline)).await?,
                Job::Ranges(j) => self.process_range(&run, &page, j, soft).await?,
            };
            tracing::debug!(
                page = page.page_no,
                ms = page_started.elapsed().as_millis() as u64,
                finished = report.finished,
                "page processed"
            );
            let now = self.now_ms();
            self.finish_page(run_id, page.page_no, &owner, report.finished).await?;
            let send_after = match &job {
                Job::Items(j) => j.send_after_ms(),
                Job::Ranges(_) => None,
            };
            self.sql(st::heartbeat(run_id, chain, hop, now, send_after)).await?;
            pages += 1;
            slowest = slowest.max(page_started.elapsed());
            if let Some(reason) = report.fail_reason {
                self.sql(st::set_run_status(run_id, RunState::Failed, Some(&reason), now)).await?;
            } else if let Some(reason) = report.pause_reason {
                self.sql(st::set_run_status(run_id, RunState::Pausing, Some(&reason), now)).await?;
            } else if report.failures > 0 {
                self.check_failure_threshold(&run).await?;
            }
            if self.config.settings.max_pages_per_hop.is_some_and(|max| pages >= max) {
                break;
            }
            if !report.finished {
                // The page needs another invocation (budget spent mid-page, or the kind said
                // so): hand over to the next hop rather than spin on it here.
                break;
            }
        }
        if let Job::Items(j) = &job
            && let Some(at) = j.send_after_ms()
        {
            // Rate-limited and the chain's next send is later than this hop's budget allows:
            // spend the budget waiting rather than hand over at once (a hop that sends nothing
            // and invokes the next costs an invocation and a page's statements).
            let wait = std::time::Duration::from_millis((at - self.now_ms()).max(0) as u64);
            tokio::time::sleep_until((Instant::now() + wait).min(soft)).await;
        }
        match self.invoke_hop(run_id, chain, hop + 1).await {
            Ok(()) => Ok(Outcome::Hopped { pages, next: HopNext::Continued }),
            Err(e) if e.fatal => self.fail_run(&run, chain, &e.message).await,
            Err(e) => {
                tracing::warn!(error = %e, "next hop not accepted; the sweeper will restart this chain");
                Ok(Outcome::Hopped { pages, next: HopNext::Continued })
            }
        }
    }

    /// No page could be claimed. Decide why: `None` means pages are claimable (a concurrent
    /// claim won the race) and the caller should try again.
    async fn no_page(&self, run: &RunRow, chain: i64, hop: i64, token: &str) -> Result<Option<HopNext>, EngineError> {
        let id = run.run_id.as_str();
        let now = self.now_ms();
        let summary = self.sql(st::page_summary(id, now)).await?;
        let Some(s) = summary.first() else {
            return Err(EngineError::RunNotFound(id.into()));
        };
        let text = s.text("run_status").unwrap_or_default();
        let status = RunState::parse(&text).ok_or_else(|| EngineError::State(format!("run status `{text}`")))?;
        let end = st::set_chain_status(id, chain, Some(hop), ChainState::Ended, None);
        match status {
            // A chain beyond the run's chain count (`tune` lowered it) claims nothing more: it
            // ends below, completing the run if its page was the last.
            RunState::Running if s.int("claimable") > 0 && chain < s.int("chains") => {
                // Pages are claimable but this claim got none: a concurrent claim took the page
                // it aimed at, or a restart overtook this hop (the claim's guard refuses it).
                // The caller retries a few times, then hands over; the CAS settles any overlap.
                Ok(None)
            }
            RunState::Running => {
                self.sql(end).await?;
                if s.int("leased") == 0 && !self.sql(st::complete_run(id, now, token)).await?.rows.is_empty() {
                    tracing::info!(run_id = id, "run succeeded");
                    self.sql(st::end_chains(id)).await?;
                    return Ok(Some(HopNext::Completed));
                }
                Ok(Some(HopNext::Ended))
            }
            RunState::Pausing | RunState::Paused => {
                // Parks only while the run is still pausing: a resume in between wins, and then
                // this hop goes on claiming.
                if self.sql(st::park_chain(id, chain, hop, token)).await?.rows.is_empty() {
                    return Ok(None);
                }
                self.sql(st::settle_pause(id, now)).await?;
                Ok(Some(HopNext::Parked))
            }
            _ => {
                self.sql(end).await?;
                Ok(Some(HopNext::Stopped))
            }
        }
    }

    /// Finishes a page this hop holds: `done` when `finished` and none of its items is left
    /// `claimed`; otherwise, or if claims remain, released to be claimed again (whoever claims it
    /// settles what is left). A hop that lost the lease changes nothing.
    async fn finish_page(&self, run_id: &str, page_no: i64, owner: &str, finished: bool) -> Result<(), EngineError> {
        if finished && !self.sql(st::finish_page(run_id, page_no, owner, true)).await?.rows.is_empty() {
            return Ok(());
        }
        if finished {
            tracing::warn!(page = page_no, "page still has claimed items: released instead of finished");
        }
        self.sql(st::finish_page(run_id, page_no, owner, false)).await?;
        Ok(())
    }

    async fn fail_run(&self, run: &RunRow, chain: i64, reason: &str) -> Result<Outcome, EngineError> {
        let now = self.now_ms();
        tracing::error!(run_id = run.run_id, chain, reason, "run failed");
        self.sql(st::set_chain_status(&run.run_id, chain, None, ChainState::Failed, Some(reason))).await?;
        self.sql(st::set_run_status(&run.run_id, RunState::Failed, Some(reason), now)).await?;
        Ok(Outcome::Hopped { pages: 0, next: HopNext::Failed(reason.to_owned()) })
    }

    async fn check_failure_threshold(&self, run: &RunRow) -> Result<(), EngineError> {
        let cfg = &run.job_config;
        if cfg.max_failures.is_none() && cfg.max_failure_percent.is_none() {
            return Ok(());
        }
        let rows = self.sql(st::failures_since_baseline(&run.run_id)).await?;
        let Some(r) = rows.first() else { return Ok(()) };
        let (failures, total) = (r.int("failures"), r.int("total").max(1));
        let over_count = cfg.max_failures.is_some_and(|m| failures as u64 > m);
        let over_percent = cfg.max_failure_percent.is_some_and(|p| failures as f64 * 100.0 / total as f64 > p);
        if over_count || over_percent {
            let reason = format!(
                "{failures} items failed, over the failure threshold ({}); `baton status` lists them, `baton resume` continues",
                match (cfg.max_failures, cfg.max_failure_percent) {
                    (Some(m), Some(p)) => format!("max_failures = {m}, max_failure_percent = {p}"),
                    (Some(m), None) => format!("max_failures = {m}"),
                    (None, Some(p)) => format!("max_failure_percent = {p}"),
                    (None, None) => unreachable!(),
                }
            );
            tracing::warn!(run_id = run.run_id, reason, "pausing run");
            self.sql(st::set_run_status(&run.run_id, RunState::Pausing, Some(&reason), self.now_ms())).await?;
        }
        Ok(())
    }

    async fn process_items(
        &self,
        run: &RunRow,
        chain: i64,
        owner: &str,
        page: &Page,
        job: &Arc<dyn ItemJob>,
        (soft, deadline): (Instant, Instant),
    ) -> Result<PageReport, EngineError> {
        let id = run.run_id.as_str();
        let cfg = &run.job_config;
        let resend = resend_ambiguous(cfg);
        let mut retaken: HashSet<String> = HashSet::new();
        if page.attempts > 1 {
            // A re-offered page: settle what a dead owner left claimed (see the ambiguity policy).
            let settled = self.sql(st::settle_stale_claims(id, page.page_no, owner, resend, self.now_ms())).await?;
            if resend {
                retaken = settled.records().filter_map(|r| r.text("item_key")).collect();
            }
        }
        let lo = page.lo.as_deref().map(|l| run.key_type.value(l));
        let hi = run.key_type.value(&page.hi);
        let rows = self.sql(st::load_page(&cfg.source, &cfg.key_column, lo, hi)).await?;
        let columns = Arc::new(rows.columns.clone());
        let loaded: Vec<_> = rows.rows.into_iter().map(|v| item_of(&columns, &cfg.key_column, v)).collect();
        let (loaded, mistyped) = refuse_mistyped_keys(loaded, &cfg.key_column, run.key_type);
        let (items, mut results) = dedupe_by_key(loaded, &cfg.key_column);
        results.extend(mistyped);
        // Claims taken over from a dead owner whose row has left the source since: nothing to
        // send, and the page cannot be done while they stay `claimed`.
        let present: HashSet<&str> =
            items.iter().map(|i| i.key.as_str()).chain(results.iter().map(|(k, _, _)| k.as_str())).collect();
        let vanished: Vec<String> = retaken.iter().filter(|k| !present.contains(k.as_str())).cloned().collect();
        drop(present);
        results.extend(
            vanished.into_iter().map(|k| (k, ItemState::Skipped, Some("no longer in the job's source".to_owned()))),
        );
        if items.is_empty() && results.is_empty() {
            return Ok(PageReport { finished: true, ..Default::default() });
        }
        let keys: Vec<String> =
            items.iter().map(|i| i.key.clone()).chain(results.iter().map(|(k, _, _)| k.clone())).collect();
        // The page load may have stalled (a resuming database): claim nothing past the lease or
        // the budget. The check and the claim's own fence use the same clock reading, so a claim
        // that comes back empty means the items are settled or someone else holds the page,
        // never that this hop's lease ran out (which would finish the page with nothing sent).
        let now = self.now_ms();
        if now >= page.lease_expires_at || Instant::now() >= soft {
            tracing::warn!(page = page.page_no, "the page took too long to load: released unclaimed");
            return Ok(PageReport::default());
        }
        // The claim returns every key this owner holds on the page, including claims it took
        // over from a dead owner and, on a re-run after a lost response, its own.
        let mut mine: HashSet<String> = HashSet::with_capacity(keys.len());
        for chunk in keys.chunks(ITEMS_PER_STATEMENT) {
            let claimed = self.sql(st::claim_items(id, page.page_no, owner, now, chunk)).await?;
            mine.extend(claimed.records().filter_map(|r| r.text("item_key")));
        }
        results.retain(|(k, _, _)| mine.contains(k));
        let work: Vec<Item> = items.into_iter().filter(|i| mine.contains(&i.key)).collect();
        let work_keys: Vec<String> = work.iter().map(|i| i.key.clone()).collect();
        let cx = ItemContext {
            run_id: id.to_owned(),
            run_key: run.run_key.clone(),
            chain: chain as u32,
            soft_deadline: soft,
        };
        tracing::debug!(page = page.page_no, claimed = mine.len(), "items claimed");
        drop(mine);
        // Past `soft` no send starts. Halfway from `soft` to the hard deadline the hop stops
        // waiting for sends still in flight, so it can always record what it knows: those few
        // are `unknown` (they may or may not go out), never-started ones are released. Without
        // this cut-off a slow provider would get the hop killed and its whole page's claims
        // would become `unknown`.
        let cutoff = soft + deadline.saturating_duration_since(soft) / 2;
        let started: Arc<std::sync::Mutex<HashSet<String>>> = Default::default();
        let mut outcomes: Vec<(String, ItemOutcome)> = Vec::with_capacity(work_keys.len());
        {
            let (job, cx, started) = (job.clone(), Arc::new(cx), started.clone());
            let in_flight = job.in_flight().max(1);
            let mut stream = futures::stream::iter(work)
                .map(move |item| {
                    let (job, cx, started) = (job.clone(), cx.clone(), started.clone());
                    async move {
                        if Instant::now() >= cx.soft_deadline {
                            return (item.key, ItemOutcome::Released);
                        }
                        started.lock().expect("not poisoned").insert(item.key.clone());
                        let outcome = job.process(&item, &cx).await;
                        (item.key, outcome)
                    }
                })
                .buffer_unordered(in_flight)
                .boxed();
            while let Ok(Some(done)) = tokio::time::timeout_at(cutoff, stream.next()).await {
                outcomes.push(done);
            }
        }
        if outcomes.len() < work_keys.len() {
            let finished: HashSet<&String> = outcomes.iter().map(|(k, _)| k).collect();
            let started = started.lock().expect("not poisoned");
            let left: Vec<(String, ItemOutcome)> = work_keys
                .iter()
                .filter(|k| !finished.contains(k))
                .map(|k| {
                    let outcome = if started.contains(k) {
                        ItemOutcome::Unknown(CUT_OFF_IN_FLIGHT.into())
                    } else {
                        ItemOutcome::Released
                    };
                    (k.clone(), outcome)
                })
                .collect();
            tracing::warn!(page = page.page_no, stopped = left.len(), "stopped waiting for sends at the hop's cut-off");
            outcomes.extend(left);
        }
        tracing::debug!(page = page.page_no, outcomes = outcomes.len(), "items processed");
        let mut report = PageReport { finished: true, ..Default::default() };
        report.failures += results.iter().filter(|(_, state, _)| *state == ItemState::Failed).count() as u64;
        let mut released = Vec::new();
        for (key, outcome) in outcomes {
            // At-least-once: an outcome that may not have happened is sent again by a later hop,
            // never parked as `unknown`.
            let outcome = match outcome {
                ItemOutcome::Unknown(_) if resend && page.attempts < RESEND_CLAIMS => ItemOutcome::Released,
                other => other,
            };
            match outcome.ledger() {
                Some((state, reason)) => {
                    report.failures += (state == ItemState::Failed) as u64;
                    results.push((key, state, reason));
                }
                None => {
                    if let ItemOutcome::PauseRun(reason) = outcome {
                        report.pause_reason = Some(format!("sending stopped: {reason}"));
                    }
                    released.push(key);
                }
            }
        }
        let now = self.now_ms();
        for chunk in results.chunks(ITEMS_PER_STATEMENT) {
            self.sql(st::record_results(id, page.page_no, owner, now, chunk)).await?;
        }
        for chunk in released.chunks(ITEMS_PER_STATEMENT) {
            self.sql(st::release_claims(id, page.page_no, owner, chunk)).await?;
            report.finished = false;
        }
        Ok(report)
    }

    async fn process_range(
        &self,
        run: &RunRow,
        page: &Page,
        job: &Arc<dyn RangeJob>,
        soft: Instant,
    ) -> Result<PageReport, EngineError> {
        let lo = page.lo.as_deref().map(|l| run.key_type.value(l));
        let hi = run.key_type.value(&page.hi);
        Ok(match job.process(lo, hi, soft).await {
            Ok(RangeOutcome::Done) => PageReport { finished: true, ..Default::default() },
            Ok(RangeOutcome::Incomplete) => PageReport::default(),
            Err(JobError::Transient(e)) => {
                tracing::warn!(page = page.page_no, error = e, "page will be retried");
                PageReport::default()
            }
            Err(e) => PageReport { fail_reason: Some(format!("page {}: {e}", page.page_no)), ..Default::default() },
        })
    }
}

/// A ledger result: key, state, reason.
type LedgerResult = (String, ItemState, Option<String>);

/// Rows whose key is not of the run's key type (a row added mid-run to a SQLite column of
/// mixed types; start refuses such a source) are `failed` with the reason, never sent: their
/// key may collide with another row's in the ledger (integer 2, text '2').
fn refuse_mistyped_keys(items: Vec<Item>, key_column: &str, key_type: KeyType) -> (Vec<Item>, Vec<LedgerResult>) {
    let (good, bad): (Vec<Item>, Vec<Item>) =
        items.into_iter().partition(|item| item.get(key_column).key_type() == Some(key_type));
    let failed = bad
        .into_iter()
        .map(|item| {
            // Its ledger key names its type, so it cannot share a row with a valid key of the
            // same text (integer 2 beside text '2').
            let kind = item.get(key_column).type_name();
            let ledger_key = format!("{} ({kind})", item.key);
            let reason = format!(
                "{key_column} = {} is of type {kind}, not this run's key type ({}); not sent (make every key the same type)",
                item.key,
                key_type.as_str()
            );
            (ledger_key, ItemState::Failed, Some(reason))
        })
        .collect();
    (good, failed)
}

/// A page's rows with each key once. A key that appears on more than one row (a source built on
/// a join, a row inserted mid-run: key uniqueness is only checked at start) cannot be told
/// which row is its recipient, so none of its rows is processed: the key is `failed` with a
/// reason naming it. Nothing is ever sent twice for one key.
fn dedupe_by_key(items: Vec<Item>, key_column: &str) -> (Vec<Item>, Vec<LedgerResult>) {
    let mut count: HashMap<String, usize> = HashMap::with_capacity(items.len());
    for item in &items {
        *count.entry(item.key.clone()).or_default() += 1;
    }
    if count.len() == items.len() {
        return (items, Vec::new());
    }
    let mut failed: Vec<LedgerResult> = Vec::new();
    let mut kept = Vec::with_capacity(count.len());
    for item in items {
        match count.get(&item.key).copied() {
            Some(1) => kept.push(item),
            Some(n) => {
                count.remove(&item.key);
                let reason = format!(
                    "duplicate key: {n} source rows have {key_column} = {}; none was sent (make the key unique)",
                    item.key
                );
                failed.push((item.key, ItemState::Failed, Some(reason)));
            }
            None => {} // a further row of a key already failed
        }
    }
    (kept, failed)
}
