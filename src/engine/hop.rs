//! One hop of a chain: the compare-and-set that makes hops fork-proof, the page loop under the
//! time budget, and the hand-over to the next hop.
//!
//! Per page the hop issues a fixed number of statements whatever the page size: claim the page,
//! (settle a crashed owner's claims, only on a re-offered page), load its rows, claim its items,
//! write results, (drop unattempted claims, only when the budget ran out mid-page), finish or
//! release the page. A heartbeat every few seconds tells the sweeper the chain lives and the hop
//! whether the run still runs (the kill switch mid-page) and how many chains share its rate.
//!
//! A hop holds at most two pages: the one being sent and, once that one's last window's worth
//! of items is left to start, the next, whose sends take the slots the first one's tail frees
//! (one window of `in_flight` slots for the hop), so the window stays full across pages.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::StreamExt;
use opentelemetry::KeyValue;
use opentelemetry::trace::TraceContextExt;
use tokio::time::Instant;

use super::state::{ChainState, ItemState, RunState, State};
use super::{Engine, EngineError, HopNext, Outcome, item_of, metrics, run::RunRow, soft_deadline, trace};
use crate::jobs::{Item, ItemContext, ItemJob, ItemOutcome, Job, JobError, RangeJob, RangeOutcome, resend_ambiguous};
use crate::ports::InvokeError;
use crate::sql::{KeyType, Record, Rows, SqlError, statements as st};

/// A leased page.
struct Page {
    page_no: i64,
    lo: Option<String>,
    hi: String,
    attempts: i64,
    lease_expires_at: i64,
    /// Chains active, and pages left pending, when it was claimed.
    live_chains: Option<i64>,
    pending_pages: Option<i64>,
}

impl Page {
    fn from_record(r: Record<'_>) -> Result<Page, SqlError> {
        Ok(Page {
            page_no: r.int("page_no")?,
            lo: r.text("lo")?,
            hi: r.text("hi")?.unwrap_or_default(),
            attempts: r.int("attempts")?,
            lease_expires_at: r.int("lease_expires_at")?,
            live_chains: r.opt_int("live_chains")?,
            pending_pages: r.opt_int("pending_pages")?,
        })
    }
}

/// The hop at hand, for the steps of its page loop.
struct ThisHop<'a> {
    run: &'a RunRow,
    chain: i64,
    hop: i64,
    token: &'a str,
    /// This hop's W3C `traceparent`, linked from the next hop.
    trace: Option<String>,
    job: &'a Job,
    /// Past this no page and no send starts.
    soft: Instant,
    /// When the hop is killed.
    deadline: Instant,
}

/// Whether a hop may run.
enum Admission {
    Admitted,
    /// It may not, and this is its outcome.
    Refused(Outcome),
}

/// How a hop's page loop ended.
enum LoopEnd {
    /// The budget is spent (or a page needs another hop): the next hop continues the chain.
    HandOver,
    /// The chain stops here: it ended, completed the run, parked or stopped.
    ChainStops(HopNext),
}

/// Why no page was claimed, and what the hop does about it.
enum NoPage {
    /// Pages are claimable: a concurrent claim won the race. Claim again.
    TryAgain,
    /// The chain stops claiming: it ended, completed the run, parked or stopped.
    Then(HopNext),
}

/// What processing one page amounted to.
#[derive(Default)]
struct PageReport {
    /// Every item settled: the page can be done (else it is released to be claimed again).
    finished: bool,
    /// Items failed on this page, counted against the failure threshold.
    failures: u64,
    /// The page found that the whole run must stop.
    stop: Option<RunStop>,
}

/// Why a page stops its whole run, and how.
enum RunStop {
    /// Pause, with the reason (the account stopped sending, the source changed): `baton
    /// resume` continues once it is fixed.
    Pause(String),
    /// Fail, with the reason (a range kind's statement failed for good).
    Fail(String),
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
    /// Runs hop `hop` of `chain` ([`Self::run_hop`]), then records how it ended (for `status`
    /// and `report`).
    pub async fn hop(&self, run_id: &str, chain: u32, hop: u64, deadline: Instant) -> Result<Outcome, EngineError> {
        // Unique to this invocation: see `start_hop`.
        let token = uuid::Uuid::new_v4().simple().to_string();
        let result = self.run_hop(run_id, chain, hop, deadline, &token).await;
        let (chain, hop) = (chain as i64, hop as i64);
        let ended = match &result {
            Ok(Outcome::Hopped { pages, next }) => Some((next.label(), *pages as i64)),
            Ok(_) => None,
            Err(e) => {
                self.note(st::note_chain_error(run_id, chain, hop, &e.to_string())).await;
                Some(("error", 0))
            }
        };
        if let Some((outcome, pages)) = ended {
            self.note(st::end_hop(run_id, chain, hop, &token, outcome, pages, self.now_ms())).await;
        }
        self.changed();
        result
    }

    /// Runs hop `hop` of `chain`, top to bottom: admit (run live, within its budgets), the
    /// fork guard, the job, the page loop under the time budget, the hand-over.
    #[tracing::instrument(skip(self, deadline, token), fields(baton.run_id = run_id, baton.chain = chain, baton.hop = hop))]
    async fn run_hop(
        &self,
        run_id: &str,
        chain: u32,
        hop: u64,
        deadline: Instant,
        token: &str,
    ) -> Result<Outcome, EngineError> {
        // Fencing starts here: leases and staleness derive from `hop_timeout`, so no hop may
        // live longer than that, whatever deadline its environment gives it (a Lambda function
        // timeout longer than `hop_timeout` would otherwise let a hop send after its lease
        // expired and another hop took its page over).
        let deadline = deadline.min(Instant::now() + self.config.settings.hop_timeout);
        let (chain, hop) = (chain as i64, hop as i64);
        let run = self.load_run(run_id).await?;
        metrics::job(&run.job);
        trace::annotate([
            KeyValue::new("baton.job", run.job.clone()),
            KeyValue::new("baton.run_key", run.run_key.clone()),
        ]);
        trace::link(run.start_trace.as_deref(), vec![KeyValue::new("baton.link", "run start")]);
        if let Admission::Refused(outcome) = self.admit(&run, chain, hop).await? {
            return Ok(outcome);
        }
        let trace = trace::current_traceparent();
        let Some(send_after) = self.fork_guard(run_id, chain, hop, token, trace.as_deref()).await? else {
            return Ok(Outcome::Duplicate);
        };
        let token = token.to_owned();
        tracing::debug!("hop started");
        let job = match self.build_job(&run.job, &run.job_config) {
            Ok(job) => job,
            Err(e) => {
                // This environment cannot run the job (a secret missing or too short, a kind
                // not registered): every hop and restart would fail the same way, so the run
                // pauses with the reason instead of looping, and resumes once it is fixed.
                let reason = format!("this environment cannot run the job: {e}; fix it, then `baton resume`");
                self.pause_here(&run, chain, hop, &token, &reason).await?;
                return Ok(Outcome::Hopped { pages: 0, next: HopNext::Parked });
            }
        };
        if let Job::Items(j) = &job {
            j.begin_hop(run.chains as u32, send_after);
        }
        let soft = soft_deadline(deadline, self.config.settings.hop_margin);
        let this = ThisHop { run: &run, chain, hop, token: &token, trace, job: &job, soft, deadline };
        let (pages, end) = self.page_loop(&this).await?;
        if let LoopEnd::ChainStops(next) = end {
            return Ok(Outcome::Hopped { pages, next });
        }
        self.wait_for_rate(&job, soft).await;
        let next = self.hand_over(&this).await?;
        Ok(Outcome::Hopped { pages, next })
    }

    /// The fork guard: only one delivery of hop `hop` gets past this compare-and-set of the
    /// chain's `next_hop` from `hop` to `hop + 1`; it returns when the chain may send next. The
    /// token tells this invocation's own re-run of the statement (after a lost answer) apart
    /// from another delivery, which gets `None`: a duplicate, marked in its span and the hop
    /// table, and nothing else.
    async fn fork_guard(
        &self,
        run_id: &str,
        chain: i64,
        hop: i64,
        token: &str,
        trace: Option<&str>,
    ) -> Result<Option<Option<i64>>, EngineError> {
        let started = self.sql(st::start_hop(run_id, chain, hop, token, self.now_ms(), trace)).await?;
        let record = |restarts| st::HopRecord { run_id, chain, hop, token, now: self.now_ms(), restarts, trace };
        let Some(first) = started.first() else {
            tracing::info!("duplicate or stale hop: nothing to do");
            let cx = opentelemetry::Context::current();
            cx.span().update_name("hop (duplicate)");
            cx.span().set_attribute(KeyValue::new("baton.duplicate", true));
            self.note(st::record_hop(&record(0), Some("duplicate"))).await;
            return Ok(None);
        };
        // `restarts` is only for traces and the report: never a reason to fail a hop that won.
        let (send_after, restarts) = (first.opt_int("send_after")?, first.int("restarts").unwrap_or(0));
        trace::annotate([KeyValue::new("baton.restart", restarts)]);
        self.note(st::record_hop(&record(restarts), None)).await;
        Ok(Some(send_after))
    }

    /// Invokes the chain's next hop.
    async fn hand_over(&self, this: &ThisHop<'_>) -> Result<HopNext, EngineError> {
        match self.invoke_hop(&this.run.run_id, this.chain, this.hop + 1, this.trace.clone()).await {
            Ok(()) => Ok(HopNext::Continued),
            // The next hop can never be invoked as things stand (the recursion stop, the role
            // not allowed to invoke the function): pause, so that once it is fixed `baton
            // resume` continues the run from here, rather than fail it for good.
            Err(InvokeError::Fatal(why)) => {
                let reason = format!("the next hop cannot be invoked: {why}; fix it, then `baton resume`");
                self.pause_here(this.run, this.chain, this.hop, this.token, &reason).await?;
                Ok(HopNext::Parked)
            }
            // Not queued, or not known to be: the sweeper restarts the chain from its checkpoint
            // (a second delivery of hop + 1 loses at the fork guard).
            Err(e) => {
                tracing::warn!(error = %e, "next hop not accepted; the sweeper will restart this chain");
                Ok(HopNext::Continued)
            }
        }
    }

    /// Whether this hop may run. It may not when the run is over (the chain ends with it), the
    /// chain is past its hop budget (a runaway), or the run is past its deadline.
    async fn admit(&self, run: &RunRow, chain: i64, hop: i64) -> Result<Admission, EngineError> {
        if run.is_terminal() {
            // The chain was waiting for this hop: it ends with its run.
            let end = st::set_chain_status(&run.run_id, chain, Some(hop - 1), ChainState::Ended, None);
            self.sql(end).await?;
            return Ok(Admission::Refused(Outcome::Hopped { pages: 0, next: HopNext::Stopped }));
        }
        if hop > run.max_hops {
            let reason = format!(
                "chain {chain} reached hop {hop}, beyond its budget of {} hops: stopped as a runaway",
                run.max_hops
            );
            return self.fail_run(run, chain, &reason).await.map(Admission::Refused);
        }
        if self.now_ms() > run.deadline_at {
            let reason = "the run passed its deadline (jobs.NAME.run_deadline)";
            return self.fail_run(run, chain, reason).await.map(Admission::Refused);
        }
        Ok(Admission::Admitted)
    }

    /// Pauses the run with `reason` and parks this chain at its checkpoint (the hop after this
    /// one), for something no retry fixes but an operator can.
    async fn pause_here(
        &self,
        run: &RunRow,
        chain: i64,
        hop: i64,
        token: &str,
        reason: &str,
    ) -> Result<(), EngineError> {
        let (run_id, now) = (run.run_id.as_str(), self.now_ms());
        tracing::error!(%reason, "pausing the run");
        self.sql(st::set_run_status(run_id, RunState::Pausing, Some(reason), now)).await?;
        if !self.sql(st::park_chain(run_id, chain, hop, token)).await?.rows.is_empty() {
            self.sql(st::settle_pause(run_id, now)).await?;
        }
        Ok(())
    }

    /// Claims and processes pages until the budget is nearly spent. Returns the pages done and
    /// whether the chain continues.
    ///
    /// The hop's sends share one window of the kind's `in_flight` slots. Once the page being
    /// sent has its last window's worth of items left to start, the next page is claimed and
    /// loaded, and its items take the slots the first page's tail frees: the window stays full
    /// across pages instead of draining at every page's end. At most two pages are held at once.
    async fn page_loop(&self, this: &ThisHop<'_>) -> Result<(u32, LoopEnd), EngineError> {
        let window = Arc::new(tokio::sync::Semaphore::new(match this.job {
            Job::Items(j) => j.in_flight().max(1),
            Job::Ranges(_) => 1,
        }));
        // Pages being processed, each closing itself (finish or release, act on what it found)
        // when done; every await below polls them too, so no page's sends wait on a statement.
        let mut held = futures::stream::FuturesUnordered::new();
        let mut done = Closed::new(Instant::now() + self.beat_every());
        let (mut claimed, mut retries) = (0u32, 0);
        // The latest page's progress in starting its sends: the next is claimed as it nears its end.
        let mut latest: Option<Arc<Started>> = None;
        loop {
            let within_budget = self.config.settings.max_pages_per_hop.is_none_or(|max| claimed < max);
            // Whether another page may be claimed now, its turn aside.
            let may_claim =
                done.may_claim(held.is_empty()) && within_budget && Instant::now() + done.slowest < this.soft;
            if may_claim && self.next_pages_turn(this, held.len(), latest.as_deref(), &done) {
                let asked = Instant::now();
                match self.claim_next(this, claimed, &mut held, &mut done).await {
                    Some((owner, page)) => {
                        claimed += 1;
                        let started = Arc::new(Started::new(asked));
                        latest = Some(started.clone());
                        let sends = Sends { window: window.clone(), started, halt: done.halt.clone() };
                        held.push(self.run_page(this, owner, page, sends));
                        continue;
                    }
                    None if held.is_empty() && done.failed.is_none() => {
                        match self.no_page(this.run, this.chain, this.hop, this.token).await? {
                            NoPage::Then(next) => return Ok((done.pages, LoopEnd::ChainStops(next))),
                            NoPage::TryAgain if retries < CLAIM_RETRIES => retries += 1,
                            NoPage::TryAgain => break,
                        }
                        continue;
                    }
                    None => done.near_the_end(true),
                }
            }
            if held.is_empty() {
                break;
            }
            // Only a turn to come: one that came (its claim not made or declined) would end the
            // wait at once, and the loop would spin.
            let next_due = latest.clone().filter(|l| held.len() == 1 && may_claim && !l.nearly_all());
            self.wait_for_pages(this, &mut held, &mut done, next_due).await;
        }
        if let Some(e) = done.failed {
            return Err(e);
        }
        // The next hop starts from this one's `send_after`.
        self.heartbeat(this).await?;
        Ok((done.pages, LoopEnd::HandOver))
    }

    /// Whether it is the next page's turn to be claimed, with `held` pages held and `latest` the
    /// one claimed last. Rate-limited, a page is claimed only if a send of it could start
    /// within the budget, counting the time the last page took from its claim to its sends:
    /// a page claimed past that would only be released again, and each claim counts toward
    /// its resends under at-least-once ([`RESEND_CLAIMS`]).
    fn next_pages_turn(&self, this: &ThisHop<'_>, held: usize, latest: Option<&Started>, done: &Closed) -> bool {
        let lead = latest.map_or(std::time::Duration::ZERO, Started::lead);
        match held {
            // A hop can start with its next slot past its budget, or come to it: the next hop
            // claims (unless this claim is what ends the chain or parks it).
            0 => done.must_claim() || self.sends_in_budget(this, 0, lead),
            // A second page only if the first nears its end, and after the first's sends still
            // to start.
            1 => latest.is_some_and(|l| l.nearly_all() && self.sends_in_budget(this, l.unstarted(), lead)),
            _ => false,
        }
    }

    /// Whether the job can start a send before this hop's budget ends, after `queued` sends
    /// still to start and `lead` from now (not when rate-limited with the slot it would get
    /// past the budget).
    fn sends_in_budget(&self, this: &ThisHop<'_>, queued: usize, lead: std::time::Duration) -> bool {
        let left_ms = this.soft.saturating_duration_since(Instant::now() + lead).as_millis() as i64;
        match this.job {
            Job::Items(j) => j.send_after_ms(queued).is_none_or(|at| at < self.now_ms() + left_ms),
            Job::Ranges(_) => true,
        }
    }

    /// How often a hop heartbeats: at most every [`HEARTBEAT_EVERY`], a quarter of `hop_timeout`
    /// if less.
    fn beat_every(&self) -> std::time::Duration {
        HEARTBEAT_EVERY.min(self.config.settings.hop_timeout / 4)
    }

    /// Claims the next page (the kill switch: only while the run is `running`) while the pages
    /// held go on, and takes the run's rate share the claim reports. A claim that fails for good
    /// fails the hop once the pages held are settled (`done.failed`).
    async fn claim_next<F>(
        &self,
        this: &ThisHop<'_>,
        claimed: u32,
        held: &mut futures::stream::FuturesUnordered<F>,
        done: &mut Closed,
    ) -> Option<(String, Page)>
    where
        F: std::future::Future<Output = Result<(Instant, PageReport), EngineError>>,
    {
        // Unique per invocation and per page it holds: a duplicate delivery that somehow got
        // this far could not pass for this hop's lease holder, and the claim of the next page
        // cannot take back the page still being sent (a claim returns the page its owner
        // already holds, for a re-run whose answer was lost).
        let owner = format!("c{}h{}.{}.{}", this.chain, this.hop, &this.token[..12], claimed);
        let (run, lease_ms) = (this.run, self.config.settings.lease().as_millis() as i64);
        let claim = st::claim_page(&run.run_id, this.chain, this.hop, run.chains, &owner, self.now_ms(), lease_ms);
        let claimed = {
            let claim = self.sql(claim);
            tokio::pin!(claim);
            loop {
                tokio::select! {
                    rows = &mut claim => break rows,
                    Some(closed) = held.next() => done.page(closed),
                }
            }
        };
        let read = |rows: Rows| rows.first().map(Page::from_record).transpose().map_err(EngineError::from);
        let page = match claimed.map_err(EngineError::from).and_then(read) {
            Ok(found) => found?,
            Err(e) => {
                done.fail(e);
                return None;
            }
        };
        let (live, pending) = (page.live_chains, page.pending_pages);
        done.none_left |= pending == Some(0);
        // The claim proves the run is running: sends may start again.
        done.halt.store(false, std::sync::atomic::Ordering::SeqCst);
        if let (Job::Items(j), Some(live)) = (this.job, live) {
            j.share_rate(live.max(1) as u32);
            // Fewer pages left than chains: some chains end soon, and their share of the rate
            // should not end with them.
            if pending.is_some_and(|p| p < live) {
                done.near_the_end(false);
            }
        }
        Some((owner, page))
    }

    /// Waits for a held page to close, for the latest one (`next_due`) to near its end, or for
    /// the next heartbeat: it tells the sweeper the chain lives and answers whether the run still
    /// runs (if not, no more sends start: pause and cancel take effect within a heartbeat) and
    /// how many chains share its rate (near the run's end, rate-limited, every second, since
    /// chains that ended leave their share to the others).
    async fn wait_for_pages<F>(
        &self,
        this: &ThisHop<'_>,
        held: &mut futures::stream::FuturesUnordered<F>,
        done: &mut Closed,
        next_due: Option<Arc<Started>>,
    ) where
        F: std::future::Future<Output = Result<(Instant, PageReport), EngineError>>,
    {
        let next_due = async move {
            match next_due {
                Some(l) => l.wait_nearly_all().await,
                None => std::future::pending().await,
            }
        };
        let at = done.next_beat;
        let beat = async move {
            tokio::time::sleep_until(at).await;
            self.heartbeat(this).await
        };
        tokio::select! {
            Some(closed) = held.next() => done.page(closed),
            _ = next_due => {}
            beat = beat => {
                let rate_limited = matches!(this.job, Job::Items(j) if j.seconds_per_item().is_some());
                let every = match done.tail && rate_limited {
                    true => LIVE_CHAINS_EVERY.min(self.beat_every()),
                    false => self.beat_every(),
                };
                done.next_beat = Instant::now() + every;
                match beat {
                    Ok(Some(Pulse { running, live })) => {
                        if let (Job::Items(j), Some(live)) = (this.job, live) {
                            j.share_rate(live.max(1) as u32);
                        }
                        done.halt.store(!running, std::sync::atomic::Ordering::SeqCst);
                    }
                    // The chain moved on without this hop (the sweeper restarted it): stop.
                    Ok(None) => done.halt.store(true, std::sync::atomic::Ordering::SeqCst),
                    Err(e) => tracing::warn!(error = %e, "heartbeat failed; the next one may pass"),
                }
            }
        }
    }

    /// Processes one claimed page under its span, then closes it (finish or release it, act on
    /// what it found); returns when it started and what it came to.
    async fn run_page(
        &self,
        this: &ThisHop<'_>,
        owner: String,
        page: Page,
        sends: Sends,
    ) -> Result<(Instant, PageReport), EngineError> {
        let page_started = Instant::now();
        let (run, soft) = (this.run, this.soft);
        let attributes =
            vec![KeyValue::new("baton.page", page.page_no), KeyValue::new("baton.page_attempt", page.attempts)];
        let process = async {
            match this.job {
                Job::Items(j) => self.process_items(this, &owner, &page, j, sends).await,
                Job::Ranges(j) => self.process_range(run, &page, j, soft).await,
            }
        };
        let report = self.tracing.in_span("page", attributes, process).await?;
        let ms = page_started.elapsed().as_millis() as u64;
        tracing::debug!(page = page.page_no, ms, finished = report.finished, "page processed");
        let now = self.now_ms();
        self.finish_page(&this.run.run_id, page.page_no, &owner, report.finished).await?;
        metrics::page();
        self.changed();
        self.act_on_page(this.run, &report, now).await?;
        Ok((page_started, report))
    }

    /// Tells the sweeper the chain is alive, with when it may send next; answers whether the
    /// run still runs and how many chains are active (`None`: the chain is no longer at this
    /// hop).
    async fn heartbeat(&self, this: &ThisHop<'_>) -> Result<Option<Pulse>, EngineError> {
        let send_after = match this.job {
            Job::Items(j) => j.send_after_ms(0),
            Job::Ranges(_) => None,
        };
        let rows = self.sql(st::heartbeat(&this.run.run_id, this.chain, this.hop, self.now_ms(), send_after)).await?;
        let Some(r) = rows.first() else { return Ok(None) };
        let running = r.text("run_status")?.as_deref() == Some(RunState::Running.as_str());
        Ok(Some(Pulse { running, live: r.opt_int("live_chains")? }))
    }

    /// Acts on what a page found: a fatal failure fails the run, a stop pauses it, failures
    /// count against the threshold.
    async fn act_on_page(&self, run: &RunRow, report: &PageReport, now: i64) -> Result<(), EngineError> {
        let run_id = run.run_id.as_str();
        match &report.stop {
            Some(RunStop::Fail(reason)) => {
                self.sql(st::set_run_status(run_id, RunState::Failed, Some(reason), now)).await?;
            }
            Some(RunStop::Pause(reason)) => {
                self.sql(st::set_run_status(run_id, RunState::Pausing, Some(reason), now)).await?;
            }
            None if report.failures > 0 => self.check_failure_threshold(run).await?,
            None => {}
        }
        Ok(())
    }

    /// Rate-limited and the chain's next send is later than this hop's budget allows: spend the
    /// budget waiting rather than hand over at once (a hop that sends nothing and invokes the
    /// next costs an invocation and a page's statements).
    async fn wait_for_rate(&self, job: &Job, soft: Instant) {
        if let Job::Items(j) = job
            && let Some(at) = j.send_after_ms(0)
        {
            let wait = std::time::Duration::from_millis((at - self.now_ms()).max(0) as u64);
            tokio::time::sleep_until((Instant::now() + wait).min(soft)).await;
        }
    }

    /// No page could be claimed. Decide why: pages still claimable (a concurrent claim won the
    /// race) means try again; otherwise the chain ends, completes the run, parks or stops.
    async fn no_page(&self, run: &RunRow, chain: i64, hop: i64, token: &str) -> Result<NoPage, EngineError> {
        let id = run.run_id.as_str();
        let now = self.now_ms();
        let summary = self.sql(st::page_summary(id, now)).await?;
        let Some(s) = summary.first() else {
            return Err(EngineError::RunNotFound(id.into()));
        };
        let text = s.text("run_status")?.unwrap_or_default();
        let status = RunState::parse(&text).ok_or_else(|| EngineError::State(format!("run status `{text}`")))?;
        let end = st::set_chain_status(id, chain, Some(hop), ChainState::Ended, None);
        match status {
            // A chain beyond the run's chain count (`tune` lowered it) claims nothing more: it
            // ends below, completing the run if its page was the last.
            RunState::Running if s.int("claimable")? > 0 && chain < s.int("chains")? => {
                // Pages are claimable but this claim got none: a concurrent claim took the page
                // it aimed at, or a restart overtook this hop (the claim's guard refuses it).
                // The caller retries a few times, then hands over; the CAS settles any overlap.
                Ok(NoPage::TryAgain)
            }
            RunState::Running => {
                self.sql(end).await?;
                // Completion happens exactly once: `complete_run` flips `running` to
                // `succeeded` only when no page is left and no lease is live.
                if s.int("leased")? == 0 && !self.sql(st::complete_run(id, now, token)).await?.rows.is_empty() {
                    tracing::info!(run_id = id, "run succeeded");
                    self.sql(st::end_chains(id)).await?;
                    return Ok(NoPage::Then(HopNext::Completed));
                }
                Ok(NoPage::Then(HopNext::Ended))
            }
            RunState::Pausing | RunState::Paused => {
                // Parks only while the run is still pausing: a resume in between wins, and then
                // this hop goes on claiming.
                if self.sql(st::park_chain(id, chain, hop, token)).await?.rows.is_empty() {
                    return Ok(NoPage::TryAgain);
                }
                self.sql(st::settle_pause(id, now)).await?;
                Ok(NoPage::Then(HopNext::Parked))
            }
            _ => {
                self.sql(end).await?;
                Ok(NoPage::Then(HopNext::Stopped))
            }
        }
    }

    /// Finishes a page this hop holds: `done` when `finished` and none of its items is left
    /// `claimed`; otherwise, or if claims remain, released to be claimed again (whoever claims it
    /// settles what is left). A hop that lost the lease changes nothing.
    async fn finish_page(&self, run_id: &str, page_no: i64, owner: &str, finished: bool) -> Result<(), EngineError> {
        let now = self.now_ms();
        if finished && !self.sql(st::finish_page(run_id, page_no, owner, true, now)).await?.rows.is_empty() {
            return Ok(());
        }
        if finished {
            tracing::warn!(page = page_no, "page still has claimed items: released instead of finished");
        }
        self.sql(st::finish_page(run_id, page_no, owner, false, now)).await?;
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
        let (failures, total) = (r.int("failures")?, r.int("total")?.max(1));
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

    /// One page of an item job: claim its items → send until the cut-off → settle each
    /// outcome → record the results, a fixed number of statements whatever the page size.
    async fn process_items(
        &self,
        this: &ThisHop<'_>,
        owner: &str,
        page: &Page,
        job: &Arc<dyn ItemJob>,
        sends: Sends,
    ) -> Result<PageReport, EngineError> {
        let (run, chain, soft, deadline) = (this.run, this.chain, this.soft, this.deadline);
        let (work, decided) = match self.claim_items(run, owner, page, job, soft).await? {
            Claim::Empty => return Ok(PageReport { finished: true, ..Default::default() }),
            Claim::TooLate => return Ok(PageReport::default()),
            Claim::SourceChanged(why) => {
                let reason = format!("{why}; fix the source, then `baton resume`");
                return Ok(PageReport { stop: Some(RunStop::Pause(reason)), ..Default::default() });
            }
            Claim::Mine { work, decided } => (work, decided),
        };
        let cx = ItemContext {
            run_id: run.run_id.clone(),
            run_key: run.run_key.clone(),
            chain: chain as u32,
            soft_deadline: soft,
        };
        let batch = self.tracing.child("mail batch", vec![KeyValue::new("baton.items", work.len() as i64)]);
        let send = send_until_cutoff(job, work, cx, deadline, page.page_no, sends);
        let outcomes = match &batch {
            Some(batch) => trace::within(batch.clone(), send).await,
            None => send.await,
        };
        // At-least-once: an outcome that may not have happened is sent again by a later hop, up
        // to RESEND_CLAIMS claims of the page, never parked as `unknown`.
        let on_unknown = match resend_ambiguous(&run.job_config) && page.attempts < RESEND_CLAIMS {
            true => OnUnknown::SendAgain,
            false => OnUnknown::Record,
        };
        let settled = settle(outcomes, decided, on_unknown);
        if let Some(batch) = batch {
            describe_batch(&batch, &settled);
        }
        let now = self.now_ms();
        let id = run.run_id.as_str();
        // Results first, then releases: an item is either recorded or free again, never both.
        for chunk in settled.results.chunks(ITEMS_PER_STATEMENT) {
            self.sql(st::record_results(id, page.page_no, owner, now, chunk)).await?;
            chunk.iter().for_each(|(_, state, _)| metrics::recorded(*state));
        }
        for chunk in settled.released.chunks(ITEMS_PER_STATEMENT) {
            self.sql(st::release_claims(id, page.page_no, owner, chunk)).await?;
        }
        Ok(settled.report)
    }

    /// A re-offered page: settles what a dead owner left claimed (see the ambiguity policy).
    /// Returns the keys taken over to be sent again (at-least-once).
    async fn take_over_stale_claims(
        &self,
        run: &RunRow,
        page: &Page,
        owner: &str,
    ) -> Result<HashSet<String>, EngineError> {
        if page.attempts <= 1 {
            return Ok(HashSet::new());
        }
        let resend = resend_ambiguous(&run.job_config);
        let stmt = st::settle_stale_claims(&run.run_id, page.page_no, owner, resend, self.now_ms());
        let settled = self.sql(stmt).await?;
        Ok(if resend { item_keys(&settled)? } else { HashSet::new() })
    }

    /// The page's source rows, or why the source no longer serves the run as it was checked at
    /// start. A source query that worked at start and fails now (a table or column renamed or
    /// dropped) would fail every hop and restart the same way until the run's deadline.
    async fn load_rows(
        &self,
        run: &RunRow,
        page: &Page,
        job: &Arc<dyn ItemJob>,
    ) -> Result<Result<Rows, String>, EngineError> {
        let cfg = &run.job_config;
        let lo = page.lo.as_deref().map(|l| run.key_type.value(l));
        let hi = run.key_type.value(&page.hi);
        let check = job.suppression_column().map(|email_column| st::SuppressionCheck { email_column, job: &run.job });
        let rows = match self.sql(st::load_page(&cfg.source, &cfg.key_column, lo, hi, check)).await {
            // Only a table, column or function that no longer exists: any other failure (a
            // failover, a lock timeout) fails this hop, and the sweeper restarts the chain.
            Err(SqlError::Undefined { message }) => {
                return Ok(Err(format!("the job's source query fails: {message}")));
            }
            other => other?,
        };
        Ok(match source_changed(&rows, &cfg.key_column, job.as_ref()) {
            Some(why) => Err(why),
            None => Ok(rows),
        })
    }

    /// Loads the page's rows and claims its items in the ledger, before any side effect. Rows
    /// that cannot be sent (a mistyped or duplicated key, a claim whose row left the source) are
    /// decided here and claimed with the rest, so they are recorded in the same statements.
    async fn claim_items(
        &self,
        run: &RunRow,
        owner: &str,
        page: &Page,
        job: &Arc<dyn ItemJob>,
        soft: Instant,
    ) -> Result<Claim, EngineError> {
        let (id, cfg) = (run.run_id.as_str(), &run.job_config);
        let retaken = self.take_over_stale_claims(run, page, owner).await?;
        let rows = match self.load_rows(run, page, job).await? {
            Ok(rows) => rows,
            Err(why) => {
                tracing::error!(page = page.page_no, why, "pausing the run");
                return Ok(Claim::SourceChanged(why));
            }
        };
        let (rows, reasons) = split_suppressed(rows, job.suppression_column().is_some())?;
        let columns = Arc::new(rows.columns.clone());
        let loaded: Vec<_> = rows.rows.into_iter().map(|v| item_of(&columns, &cfg.key_column, v)).collect();
        let suppressed = self.suppressed_items(&run.job, job.as_ref(), &loaded, reasons).await?;
        let (loaded, mistyped) = refuse_mistyped_keys(loaded, &cfg.key_column, run.key_type);
        let (items, mut decided) = dedupe_by_key(loaded, &cfg.key_column);
        let (items, suppressed) = skip_suppressed(items, suppressed);
        decided.extend(mistyped);
        decided.extend(suppressed);
        decided.extend(vanished(&retaken, &items, &decided));
        if items.is_empty() && decided.is_empty() {
            return Ok(Claim::Empty);
        }
        // The page load may have stalled (a resuming database): claim nothing past the lease or
        // the budget. The check and the claim's own fence use the same clock reading, so a claim
        // that comes back empty means the items are settled or someone else holds the page,
        // never that this hop's lease ran out (which would finish the page with nothing sent).
        let now = self.now_ms();
        if now >= page.lease_expires_at || Instant::now() >= soft {
            tracing::warn!(page = page.page_no, "the page took too long to load: released unclaimed");
            return Ok(Claim::TooLate);
        }
        let keys: Vec<String> =
            items.iter().map(|i| i.key.clone()).chain(decided.iter().map(|r| r.0.clone())).collect();
        // The claim returns every key this owner holds on the page, including claims it took
        // over from a dead owner and, on a re-run after a lost response, its own.
        let mut mine: HashSet<String> = HashSet::with_capacity(keys.len());
        for chunk in keys.chunks(ITEMS_PER_STATEMENT) {
            let claimed = self.sql(st::claim_items(id, page.page_no, owner, now, chunk)).await?;
            mine.extend(item_keys(&claimed)?);
        }
        tracing::debug!(page = page.page_no, claimed = mine.len(), "items claimed");
        decided.retain(|(k, _, _)| mine.contains(k));
        let work = items.into_iter().filter(|i| mine.contains(&i.key)).collect();
        Ok(Claim::Mine { work, decided })
    }

    /// Each loaded item's suppression reason, by key: as the page load found it, plus (in one
    /// statement, and only when a page has such rows) rows whose address SQL's
    /// `LOWER(TRIM(..))` does not fold as [`crate::mail::suppression_keys`] does: capitals
    /// outside ASCII (SQLite folds ASCII only), tabs and other white space around it.
    async fn suppressed_items(
        &self,
        job_name: &str,
        job: &dyn ItemJob,
        loaded: &[Item],
        reasons: Vec<Option<String>>,
    ) -> Result<HashMap<String, String>, EngineError> {
        let mut suppressed: HashMap<String, String> =
            loaded.iter().zip(reasons).filter_map(|(item, reason)| Some((item.key.clone(), reason?))).collect();
        let Some(column) = job.suppression_column() else { return Ok(suppressed) };
        let recheck: Vec<(&str, Vec<String>)> = loaded
            .iter()
            .filter(|item| !suppressed.contains_key(&item.key) && !item.get(column).is_null())
            .filter_map(|item| {
                let raw = item.get(column).to_string();
                let keys = crate::mail::suppression_keys(&raw).ok()?;
                let sql_folded = raw.trim_matches(' ').to_ascii_lowercase();
                (!keys.contains(&sql_folded)).then_some((item.key.as_str(), keys))
            })
            .collect();
        let all: Vec<String> = recheck.iter().flat_map(|(_, keys)| keys.iter().cloned()).collect();
        let mut found: HashMap<String, String> = HashMap::new();
        for chunk in all.chunks(st::SUPPRESSIONS_PER_STATEMENT) {
            for r in self.sql(st::suppressed_among(chunk, job_name)).await?.records() {
                if let (Some(address), Some(reason)) = (r.text("address")?, r.text("reason")?) {
                    found.insert(address, reason);
                }
            }
        }
        for (key, keys) in recheck {
            if let Some(reason) = keys.iter().find_map(|k| found.get(k)) {
                suppressed.insert(key.to_owned(), reason.clone());
            }
        }
        Ok(suppressed)
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
            Err(e) => {
                let reason = format!("page {}: {e}", page.page_no);
                PageReport { stop: Some(RunStop::Fail(reason)), ..Default::default() }
            }
        })
    }
}

/// The `item_key` of every row.
fn item_keys(rows: &Rows) -> Result<HashSet<String>, SqlError> {
    rows.records().filter_map(|r| r.text("item_key").transpose()).collect()
}

/// What claiming a page's items came to.
enum Claim {
    /// The page has no rows: it is done.
    Empty,
    /// The page took too long to load: nothing claimed, the page is released.
    TooLate,
    /// The source lost a column the run needs since it started: nothing claimed, the run
    /// pauses with the reason.
    SourceChanged(String),
    /// The items this hop holds: those to process, and those already decided (recorded as is).
    Mine { work: Vec<Item>, decided: Vec<LedgerResult> },
}

/// Why the page's rows cannot be processed as the run was checked at start: the key column or
/// a column the kind needs is gone (renamed, dropped) from the source. Without this check every
/// remaining item would read the missing column as NULL: skipped for good, or failed as
/// mistyped, and the run would end "succeeded".
fn source_changed(rows: &Rows, key_column: &str, job: &dyn ItemJob) -> Option<String> {
    if rows.rows.is_empty() {
        return None; // some stores name no columns for an empty result
    }
    if rows.column(key_column).is_none() {
        let columns = rows.columns.join(", ");
        return Some(format!("the job's source no longer has its key column `{key_column}` (it has: {columns})"));
    }
    job.check_columns(&rows.columns).err().map(|e| format!("the job's source changed since the run started: {e}"))
}

/// Claims taken over from a dead owner whose row has left the source since: nothing to send,
/// and the page cannot be done while they stay `claimed`.
fn vanished(retaken: &HashSet<String>, items: &[Item], decided: &[LedgerResult]) -> Vec<LedgerResult> {
    let present: HashSet<&str> =
        items.iter().map(|i| i.key.as_str()).chain(decided.iter().map(|r| r.0.as_str())).collect();
    retaken
        .iter()
        .filter(|k| !present.contains(k.as_str()))
        .map(|k| (k.clone(), ItemState::Skipped, Some("no longer in the job's source".to_owned())))
        .collect()
}

/// Runs up to the kind's `in_flight` items at once. Past `soft` no send starts. Halfway from
/// `soft` to the hard deadline the hop stops waiting for sends still in flight, so it can always
/// record what it knows: those few are `unknown` (they may or may not go out), never-started
/// ones are released. Without this cut-off a slow provider would get the hop killed and its
/// whole page's claims would become `unknown`.
async fn send_until_cutoff(
    job: &Arc<dyn ItemJob>,
    work: Vec<Item>,
    cx: ItemContext,
    deadline: Instant,
    page_no: i64,
    sends: Sends,
) -> Vec<(String, ItemOutcome)> {
    let cutoff = cx.soft_deadline + deadline.saturating_duration_since(cx.soft_deadline) / 2;
    let work_keys: Vec<String> = work.iter().map(|i| i.key.clone()).collect();
    let started: Arc<std::sync::Mutex<HashSet<String>>> = Default::default();
    let mut outcomes: Vec<(String, ItemOutcome)> = Vec::with_capacity(work_keys.len());
    let in_flight = job.in_flight().max(1);
    sends.started.expect(work_keys.len(), in_flight);
    {
        let (job, cx, started) = (job.clone(), Arc::new(cx), started.clone());
        let mut stream = futures::stream::iter(work)
            .map(move |item| send_one(job.clone(), cx.clone(), item, started.clone(), sends.clone()))
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
                let outcome = match started.contains(k) {
                    true => ItemOutcome::Unknown(CUT_OFF_IN_FLIGHT.into()),
                    false => ItemOutcome::Released,
                };
                (k.clone(), outcome)
            })
            .collect();
        tracing::warn!(page = page_no, stopped = left.len(), "stopped waiting for sends at the hop's cut-off");
        outcomes.extend(left);
    }
    tracing::debug!(page = page_no, outcomes = outcomes.len(), "items processed");
    outcomes
}

/// What a heartbeat answers.
struct Pulse {
    /// The run is `running`.
    running: bool,
    /// Chains active.
    live: Option<i64>,
}

/// What the pages of a hop came to, and what it has learned.
struct Closed {
    pages: u32,
    /// The slowest page so far: no page is claimed that would likely outlast the budget.
    slowest: std::time::Duration,
    /// A page needs another invocation (budget spent mid-page, or the kind said so): the hop
    /// hands over to the next hop rather than spin on it.
    stop_claiming: bool,
    /// No page was claimable while one was held: claim again once it is closed (it may be the
    /// run's last, and only then can the chain end or complete the run).
    exhausted: bool,
    /// No page is left to claim (a claim found none, or said none was pending): once none is
    /// held, the next claim is what ends the chain or completes the run, whatever the rate
    /// (unlike `exhausted`, never cleared).
    none_left: bool,
    /// The run has fewer pages left than live chains: chains are ending.
    tail: bool,
    /// A statement failed for good: the hop fails with this once the pages it holds are
    /// settled (dropping one mid-send would leave all its claims `unknown`, sent or not).
    failed: Option<EngineError>,
    /// No more sends start (shared with the pages' sends): a statement failed, the run is no
    /// longer running, or the chain moved on without this hop.
    halt: Arc<std::sync::atomic::AtomicBool>,
    next_beat: Instant,
}

impl Closed {
    fn new(next_beat: Instant) -> Closed {
        Closed {
            pages: 0,
            slowest: std::time::Duration::ZERO,
            stop_claiming: false,
            exhausted: false,
            none_left: false,
            tail: false,
            failed: None,
            halt: Arc::default(),
            next_beat,
        }
    }

    fn page(&mut self, closed: Result<(Instant, PageReport), EngineError>) {
        self.exhausted = false;
        match closed {
            Ok((started, report)) => {
                self.pages += 1;
                self.slowest = self.slowest.max(started.elapsed());
                self.stop_claiming |= !report.finished;
            }
            Err(e) => self.fail(e),
        }
    }

    /// The run nears its end (`exhausted`: no page was left to claim): heartbeats come every
    /// second from now on, to take up the rate share of chains that end.
    fn near_the_end(&mut self, exhausted: bool) {
        self.exhausted |= exhausted;
        self.none_left |= exhausted;
        self.tail = true;
        self.next_beat = self.next_beat.min(Instant::now() + LIVE_CHAINS_EVERY);
    }

    fn fail(&mut self, e: EngineError) {
        self.failed.get_or_insert(e);
        self.halt.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether a claim is due whatever the rate allows: it ends the chain or completes the run
    /// (no page was left), or parks the chain (halted by a heartbeat: the run stopped).
    fn must_claim(&self) -> bool {
        self.none_left || self.halt.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Halted by a heartbeat, a page is claimed only once none is held: the claim then finds
    /// the run stopped (and the chain parks or ends), or running again.
    fn may_claim(&self, none_held: bool) -> bool {
        let halted = self.halt.load(std::sync::atomic::Ordering::SeqCst);
        !self.exhausted && !self.stop_claiming && self.failed.is_none() && (none_held || !halted)
    }
}

/// Heartbeats at most this often (or a quarter of `hop_timeout`, if less): a statement per
/// page would be a good part of a fast run's statements, and the sweeper calls a chain stale
/// only after more than a `hop_timeout` without one.
const HEARTBEAT_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// How often a hop near the run's end (no page left to claim, or fewer than chains) asks how
/// many chains still run, to take up the rate share of those that ended.
const LIVE_CHAINS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A page's part in the hop's send window: the shared slots, its progress in starting, and
/// the hop's halt (set: no more sends start).
#[derive(Clone)]
struct Sends {
    window: Arc<tokio::sync::Semaphore>,
    started: Arc<Started>,
    halt: Arc<std::sync::atomic::AtomicBool>,
}

/// How far a page is in starting its sends: "nearly all" once no more than a window's worth
/// is left to start, which is when the hop claims the next page. A page that ends without
/// sending (nothing to send, claimed too late, the source changed) never is: the next page is
/// claimed once it is closed, and only if it finished.
///
/// A send starts when it takes its window slot, and a rate-limited one takes its send slot in
/// the same poll (see the newsletter's `process`): the items yet to start are those still to
/// take a send slot.
struct Started {
    /// When the page's claim was asked for.
    asked: Instant,
    /// From the claim to knowing the items (nanoseconds): the lead a page needs before its
    /// first send can start.
    lead_ns: std::sync::atomic::AtomicU64,
    /// Items yet to start; meaningless until `known`.
    unstarted: std::sync::atomic::AtomicUsize,
    window: std::sync::atomic::AtomicUsize,
    known: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
}

impl Started {
    fn new(asked: Instant) -> Started {
        Started {
            asked,
            lead_ns: Default::default(),
            unstarted: Default::default(),
            window: Default::default(),
            known: Default::default(),
            notify: Default::default(),
        }
    }

    fn expect(&self, items: usize, window: usize) {
        use std::sync::atomic::Ordering::SeqCst;
        self.lead_ns.store(u64::try_from(self.asked.elapsed().as_nanos()).unwrap_or(u64::MAX), SeqCst);
        self.unstarted.store(items, SeqCst);
        self.window.store(window, SeqCst);
        self.known.store(true, SeqCst);
        if items <= window {
            self.notify.notify_waiters();
        }
    }

    fn one_started(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        let before = self.unstarted.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1));
        if before.is_ok_and(|n| n - 1 == self.window.load(SeqCst)) {
            self.notify.notify_waiters();
        }
    }

    fn nearly_all(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        self.known.load(SeqCst) && self.unstarted.load(SeqCst) <= self.window.load(SeqCst)
    }

    /// How long the page took from its claim to knowing its items (zero until it knows them).
    fn lead(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.lead_ns.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// Items yet to start (none until the page knows its items).
    fn unstarted(&self) -> usize {
        use std::sync::atomic::Ordering::SeqCst;
        if self.known.load(SeqCst) { self.unstarted.load(SeqCst) } else { 0 }
    }

    async fn wait_nearly_all(&self) {
        loop {
            let notified = self.notify.notified();
            if self.nearly_all() {
                return;
            }
            notified.await;
        }
    }
}

/// One item through the hop's window: a slot (shared with the next page's sends), then its
/// send, unless the hop halted or the soft deadline passed. (The window is never closed: an
/// error getting a slot would only mean no limit, so the item is released too.)
async fn send_one(
    job: Arc<dyn ItemJob>,
    cx: Arc<ItemContext>,
    item: Item,
    started: Arc<std::sync::Mutex<HashSet<String>>>,
    sends: Sends,
) -> (String, ItemOutcome) {
    let slot = sends.window.acquire_owned().await;
    sends.started.one_started();
    let halted = sends.halt.load(std::sync::atomic::Ordering::SeqCst);
    if slot.is_err() || halted || Instant::now() >= cx.soft_deadline {
        return (item.key, ItemOutcome::Released);
    }
    started.lock().expect("not poisoned").insert(item.key.clone());
    let outcome = job.process(&item, &cx).await;
    (item.key, outcome)
}

/// A page's outcomes sorted into what is recorded and what is released.
struct Settled {
    report: PageReport,
    results: Vec<LedgerResult>,
    released: Vec<String>,
}

/// What becomes of an item whose outcome is unknown (the ambiguity policy, per page).
#[derive(Clone, Copy, PartialEq, Eq)]
enum OnUnknown {
    /// Recorded `unknown`: never sent again (at-most-once, or at-least-once past its claims).
    Record,
    /// Released, so a later hop sends it again (at-least-once).
    SendAgain,
}

/// Sorts outcomes into ledger results and released claims.
fn settle(outcomes: Vec<(String, ItemOutcome)>, decided: Vec<LedgerResult>, on_unknown: OnUnknown) -> Settled {
    let mut report = PageReport { finished: true, ..Default::default() };
    report.failures += decided.iter().filter(|(_, state, _)| *state == ItemState::Failed).count() as u64;
    let (mut results, mut released) = (decided, Vec::new());
    for (key, outcome) in outcomes {
        let outcome = match outcome {
            ItemOutcome::Unknown(_) if on_unknown == OnUnknown::SendAgain => ItemOutcome::Released,
            other => other,
        };
        match outcome.ledger() {
            Some((state, reason)) => {
                report.failures += (state == ItemState::Failed) as u64;
                results.push((key, state, reason));
            }
            None => {
                if let ItemOutcome::PauseRun(reason) = outcome {
                    report.stop = Some(RunStop::Pause(format!("sending stopped: {reason}")));
                }
                released.push(key);
            }
        }
    }
    // A page with claims released is not done: another hop claims it again.
    report.finished = released.is_empty();
    Settled { report, results, released }
}

/// Failures a mail batch span lists as events (their counts are attributes): enough to see why,
/// bounded so a page of bounces stays one small span.
const FAILURE_EVENTS: usize = 20;

/// The mail batch span's counts, and its first failures as events with their reasons; ends it.
fn describe_batch(batch: &opentelemetry::Context, settled: &Settled) {
    let span = batch.span();
    let count = |s: ItemState| settled.results.iter().filter(|(_, state, _)| *state == s).count() as i64;
    span.set_attributes([
        KeyValue::new("baton.items.done", count(ItemState::Done)),
        KeyValue::new("baton.items.failed", count(ItemState::Failed)),
        KeyValue::new("baton.items.skipped", count(ItemState::Skipped)),
        KeyValue::new("baton.items.unknown", count(ItemState::Unknown)),
        KeyValue::new("baton.items.released", settled.released.len() as i64),
    ]);
    let failures =
        settled.results.iter().filter(|(_, state, _)| matches!(state, ItemState::Failed | ItemState::Unknown));
    for (key, state, reason) in failures.take(FAILURE_EVENTS) {
        let attributes = vec![
            KeyValue::new("baton.item", trace::bounded(key, 64)),
            KeyValue::new("baton.item.state", state.as_str()),
            KeyValue::new("baton.item.reason", trace::bounded(reason.as_deref().unwrap_or_default(), 300)),
        ];
        span.add_event("item failed", attributes);
    }
    span.end();
}

/// A ledger result: key, state, reason.
type LedgerResult = (String, ItemState, Option<String>);

/// Takes the suppression column the page load added (last) off the rows: the rows as the
/// source has them, and each row's suppression reason. A checked load whose rows lack it fails
/// (closed): nobody is sent unchecked.
fn split_suppressed(mut rows: Rows, checked: bool) -> Result<(Rows, Vec<Option<String>>), EngineError> {
    if !checked || rows.rows.is_empty() {
        return Ok((rows, Vec::new()));
    }
    if !rows.columns.last().is_some_and(|c| c.eq_ignore_ascii_case(st::SUPPRESSED_COLUMN)) {
        return Err(EngineError::State(format!(
            "the page load did not return its suppression column `{}` last",
            st::SUPPRESSED_COLUMN
        )));
    }
    rows.columns.pop();
    let reasons = rows
        .rows
        .iter_mut()
        .map(|row| match row.pop() {
            Some(v) if !v.is_null() => Some(v.to_string()),
            _ => None,
        })
        .collect();
    Ok((rows, reasons))
}

/// Items whose address is on the suppression list are `skipped` with the reason, never sent.
fn skip_suppressed(items: Vec<Item>, suppressed: HashMap<String, String>) -> (Vec<Item>, Vec<LedgerResult>) {
    if suppressed.is_empty() {
        return (items, Vec::new());
    }
    let (skipped, kept): (Vec<Item>, Vec<Item>) = items.into_iter().partition(|i| suppressed.contains_key(&i.key));
    let decided = skipped
        .into_iter()
        .map(|i| {
            let reason = format!("suppressed: {}", suppressed[&i.key]);
            (i.key, ItemState::Skipped, Some(reason))
        })
        .collect();
    (kept, decided)
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_page_is_nearly_all_started_once_a_window_or_less_is_left() {
        let page = Arc::new(Started::new(Instant::now()));
        assert!(!page.nearly_all() && page.unstarted() == 0 && page.lead().is_zero(), "nothing known yet");
        page.expect(4, 2);
        assert!(!page.nearly_all() && page.unstarted() == 4);
        let waiter = tokio::spawn({
            let page = page.clone();
            async move { page.wait_nearly_all().await }
        });
        page.one_started();
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished() && !page.nearly_all(), "3 left to start through a window of 2");
        page.one_started();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await.unwrap().unwrap();
        assert!(page.nearly_all() && page.unstarted() == 2);
        page.one_started();
        page.one_started();
        page.one_started(); // never below zero
        assert_eq!(page.unstarted(), 0);

        let small = Started::new(Instant::now() - std::time::Duration::from_millis(5));
        small.expect(2, 2);
        assert!(small.nearly_all(), "a page no larger than the window is nearly all started at once");
        small.wait_nearly_all().await;
        assert!(small.lead() >= std::time::Duration::from_millis(5), "from its claim to its items");
    }
}
