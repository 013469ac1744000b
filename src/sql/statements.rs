//! Every statement baton issues, in one place. They use only SQL that SQLite (3.35+), PostgreSQL
//! and Aurora PostgreSQL through the Data API all accept: `:name` parameters, `RETURNING`,
//! `ON CONFLICT`, window functions, `UPDATE ... FROM (VALUES ...)` (whose columns are named
//! `column1, column2, ...` in both engines). Times are epoch milliseconds passed in as `:now`
//! (the engine's clock is a port), never the database's own clock.
//!
//! Statements over the job's source query embed the user's SQL as a subquery `src` and its key
//! column (validated as a plain identifier in config). Pages are key ranges `(lo, hi]`; the
//! first page has no `lo`.

use super::{Params, Stmt, Value};
use crate::engine::state::{ChainState, ItemState, RunState, State, Transition, sql_list};

/// `status IN (...)` of the states a run, chain or item may move to `to` from (the transition
/// table in [`crate::engine::state`]).
fn from_list<S: Transition>(to: S) -> String {
    sql_list(S::from_states(to))
}

// ---- runs -------------------------------------------------------------------------------------

pub const RUN_COLUMNS: &str = "run_id, job, run_key, status, reason, job_config, key_type, chains, \
     total_items, total_pages, max_hops, failure_baseline, deadline_at, created_at, updated_at, finished_at, null_keys, start_trace";

pub fn run_by_id(run_id: &str) -> Stmt {
    Stmt::named(
        "run_by_id",
        format!("SELECT {RUN_COLUMNS} FROM baton_runs WHERE run_id = :run_id"),
        Params::new().with("run_id", run_id),
    )
}

pub fn run_by_key(job: &str, run_key: &str) -> Stmt {
    Stmt::named(
        "run_by_key",
        format!("SELECT {RUN_COLUMNS} FROM baton_runs WHERE job = :job AND run_key = :run_key"),
        Params::new().with("job", job).with("run_key", run_key),
    )
}

pub fn latest_run() -> Stmt {
    Stmt::named(
        "latest_run",
        format!("SELECT {RUN_COLUMNS} FROM baton_runs ORDER BY created_at DESC, run_id DESC LIMIT 1"),
        Params::new(),
    )
}

pub struct NewRun<'a> {
    pub run_id: &'a str,
    pub job: &'a str,
    pub run_key: &'a str,
    pub job_config: &'a str,
    pub key_type: &'a str,
    pub null_keys: i64,
    pub deadline_at: i64,
    pub now: i64,
    /// The start span's W3C `traceparent`, linked from every hop.
    pub start_trace: Option<&'a str>,
}

/// The planning transaction: the run row, its pages (every `page_size`-th key of the source, in
/// one statement), its chains (`min(chains, pages)`, at least one) and its totals. Fails as a
/// whole on a unique violation when `(job, run_key)` already exists.
pub fn plan_run(
    run: &NewRun<'_>,
    source: &str,
    key: &str,
    page_size: i64,
    chains: i64,
    hops_per_page: i64,
    hop_slack: i64,
) -> Vec<Stmt> {
    let run_id = run.run_id;
    vec![
        Stmt::named("plan_run", 
            "INSERT INTO baton_runs (run_id, job, run_key, status, job_config, key_type, null_keys, deadline_at, created_at, updated_at, start_trace)
             VALUES (:run_id, :job, :run_key, 'planning', :job_config, :key_type, :null_keys, :deadline_at, :now, :now, :start_trace)",
            Params::new()
                .with("run_id", run_id)
                .with("job", run.job)
                .with("run_key", run.run_key)
                .with("job_config", run.job_config)
                .with("key_type", run.key_type)
                .with("null_keys", run.null_keys)
                .with("deadline_at", run.deadline_at)
                .with("now", run.now)
                .with("start_trace", run.start_trace.map(str::to_owned)),
        ),
        Stmt::named("plan_run", 
            format!(
                "INSERT INTO baton_pages (run_id, page_no, lo, hi, items, status, attempts)
                 SELECT :run_id, b.page_no, LAG(b.k) OVER (ORDER BY b.rn), b.k,
                        b.rn - COALESCE(LAG(b.rn) OVER (ORDER BY b.rn), 0), 'pending', 0
                 FROM (
                   SELECT n.k, n.rn, ROW_NUMBER() OVER (ORDER BY n.rn) AS page_no
                   FROM (
                     SELECT CAST(src.{key} AS TEXT) AS k,
                            ROW_NUMBER() OVER (ORDER BY src.{key}) AS rn,
                            COUNT(*) OVER () AS total
                     FROM ({source}) AS src
                     WHERE src.{key} IS NOT NULL
                   ) AS n
                   WHERE n.rn % :page_size = 0 OR n.rn = n.total
                 ) AS b"
            ),
            Params::new().with("run_id", run_id).with("page_size", page_size),
        ),
        Stmt::named("plan_run", 
            "WITH RECURSIVE seq(n) AS (
                SELECT 0
                UNION ALL
                SELECT n + 1 FROM seq
                WHERE n + 1 < :chains
                  AND n + 1 < (SELECT COUNT(*) FROM baton_pages WHERE run_id = :run_id)
             )
             INSERT INTO baton_chains (run_id, chain_no, next_hop, status, heartbeat_at, restarts)
             SELECT :run_id, n, 1, 'active', :now, 0 FROM seq",
            Params::new().with("run_id", run_id).with("chains", chains).with("now", run.now),
        ),
        Stmt::named("plan_run", 
            "UPDATE baton_runs SET
                status = 'running',
                chains = (SELECT COUNT(*) FROM baton_chains WHERE run_id = :run_id),
                total_pages = (SELECT COUNT(*) FROM baton_pages WHERE run_id = :run_id),
                total_items = (SELECT CAST(COALESCE(SUM(items), 0) AS BIGINT) FROM baton_pages WHERE run_id = :run_id),
                max_hops = (SELECT COUNT(*) FROM baton_pages WHERE run_id = :run_id) * :hops_per_page + :hop_slack
             WHERE run_id = :run_id",
            Params::new()
                .with("run_id", run_id)
                .with("hops_per_page", hops_per_page)
                .with("hop_slack", hop_slack),
        ),
    ]
}

/// Moves a run to `to` if the transition table allows it from its current status. Returns the
/// row when it changed.
pub fn set_run_status(run_id: &str, to: RunState, reason: Option<&str>, now: i64) -> Stmt {
    let params = Params::new()
        .with("run_id", run_id)
        .with("to", to.as_str())
        .with("reason", reason.map(str::to_owned))
        .with("now", now);
    let from_list = from_list(to);
    let finished = if to.is_final() { ":now" } else { "finished_at" };
    Stmt::named(
        "set_run_status",
        format!(
            "UPDATE baton_runs SET status = :to, reason = COALESCE(:reason, reason), updated_at = :now,
                 finished_at = {finished}
             WHERE run_id = :run_id AND status IN ({from_list})
             RETURNING run_id, status"
        ),
        params,
    )
}

/// Resume: back to `running`, forgetting the failures counted so far for the threshold.
pub fn resume_run(run_id: &str, now: i64) -> Stmt {
    Stmt::named(
        "resume_run",
        format!(
            "UPDATE baton_runs SET status = 'running', reason = NULL, updated_at = :now,
                 failure_baseline = (SELECT COUNT(*) FROM baton_ledger WHERE run_id = :run_id AND state = 'failed')
             WHERE run_id = :run_id AND status IN ({})
             RETURNING run_id",
            from_list(RunState::Running)
        ),
        Params::new().with("run_id", run_id).with("now", now),
    )
}

/// Completion, exactly once: only the statement that moves `running` to `succeeded` while no
/// page is left undone and no item is left `claimed` returns a row; `token` (the completing hop
/// or sweep) makes its own re-run after a lost answer return it again, and nobody else's.
pub fn complete_run(run_id: &str, now: i64, token: &str) -> Stmt {
    Stmt::named(
        "complete_run",
        format!(
            "UPDATE baton_runs SET status = 'succeeded', updated_at = :now, finished_at = :now, completed_by = :token
             WHERE run_id = :run_id AND (
                 (status = 'succeeded' AND completed_by = :token)
                 OR (status IN ({})
                     AND NOT EXISTS (SELECT 1 FROM baton_pages WHERE run_id = :run_id AND status <> 'done')
                     AND NOT EXISTS (SELECT 1 FROM baton_ledger WHERE run_id = :run_id AND state = 'claimed')))
             RETURNING run_id",
            from_list(RunState::Succeeded)
        ),
        Params::new().with("run_id", run_id).with("now", now).with("token", token),
    )
}

/// After completion: chains still marked active (a hop in flight, a queued next hop) end.
pub fn end_chains(run_id: &str) -> Stmt {
    Stmt::named(
        "end_chains",
        format!(
            "UPDATE baton_chains SET status = 'ended' WHERE run_id = :run_id AND status IN ({})",
            from_list(ChainState::Ended)
        ),
        Params::new().with("run_id", run_id),
    )
}

/// A pausing run becomes paused once no chain is active.
pub fn settle_pause(run_id: &str, now: i64) -> Stmt {
    Stmt::named(
        "settle_pause",
        format!(
            "UPDATE baton_runs SET status = 'paused', updated_at = :now
             WHERE run_id = :run_id AND status IN ({})
               AND NOT EXISTS (SELECT 1 FROM baton_chains WHERE run_id = :run_id AND status = 'active')
             RETURNING run_id",
            from_list(RunState::Paused)
        ),
        Params::new().with("run_id", run_id).with("now", now),
    )
}

/// Runs that may need the sweeper: every run past planning and not in a final state.
pub fn open_runs() -> Stmt {
    let open: Vec<RunState> =
        RunState::ALL.iter().copied().filter(|s| !s.is_final() && *s != RunState::Planning).collect();
    Stmt::named(
        "open_runs",
        format!("SELECT {RUN_COLUMNS} FROM baton_runs WHERE status IN ({}) ORDER BY created_at", sql_list(&open)),
        Params::new(),
    )
}

/// Final runs (cancelled, failed, succeeded) with pages whose lease expired while still held: a
/// hop that died after the run ended left claims nobody else will settle.
pub fn final_runs_with_dead_leases(now: i64) -> Stmt {
    let finals: Vec<RunState> = RunState::ALL.iter().copied().filter(|s| s.is_final()).collect();
    Stmt::named(
        "final_runs_with_dead_leases",
        format!(
            "SELECT r.run_id FROM baton_runs r WHERE r.status IN ({})
               AND EXISTS (SELECT 1 FROM baton_pages p WHERE p.run_id = r.run_id AND p.status = 'leased'
                           AND p.lease_expires_at < :now)",
            sql_list(&finals)
        ),
        Params::new().with("now", now),
    )
}

/// In a final run, a dead hop's claims may or may not have been sent: `unknown`, like any claim
/// a dead hop leaves (then [`release_dead_leases`] lets the pages go).
pub fn settle_dead_claims(run_id: &str, now: i64) -> Stmt {
    Stmt::named(
        "settle_dead_claims",
        "UPDATE baton_ledger SET state = 'unknown', updated_at = :now,
             reason = 'the hop that claimed it stopped before recording a result, after the run ended'
         WHERE run_id = :run_id AND state = 'claimed'
           AND page_no IN (SELECT page_no FROM baton_pages WHERE run_id = :run_id AND status = 'leased'
                           AND lease_expires_at < :now)",
        Params::new().with("run_id", run_id).with("now", now),
    )
}

pub fn release_dead_leases(run_id: &str, now: i64) -> Stmt {
    Stmt::named(
        "release_dead_leases",
        "UPDATE baton_pages SET status = 'pending', lease_expires_at = NULL
         WHERE run_id = :run_id AND status = 'leased' AND lease_expires_at < :now",
        Params::new().with("run_id", run_id).with("now", now),
    )
}

// ---- chains -----------------------------------------------------------------------------------

/// The fork-proof hop start: compare-and-set `next_hop = hop -> hop + 1`. A duplicate delivery of
/// the same hop, or a stale one, changes nothing and gets no row back.
///
/// `token` is unique to this invocation and stored with the move, so a re-run of this very
/// statement (its commit's response was lost) recognises its own move and gets the row again,
/// while a duplicate delivery, which has another token, still loses.
///
/// `trace` (this hop's `traceparent`, `None` when it is not traced) becomes the chain's
/// `last_trace`, in the same statement: a stale id would send a restart's link and `status`'s
/// trace id to an older hop.
pub fn start_hop(run_id: &str, chain: i64, hop: i64, token: &str, now: i64, trace: Option<&str>) -> Stmt {
    Stmt::named(
        "start_hop",
        "UPDATE baton_chains SET next_hop = :hop + 1, heartbeat_at = :now, hop_token = :token,
             last_trace = :trace
         WHERE run_id = :run_id AND chain_no = :chain AND status = 'active'
           AND (next_hop = :hop OR (next_hop = :hop + 1 AND hop_token = :token))
         RETURNING chain_no, send_after, restarts",
        Params::new()
            .with("run_id", run_id)
            .with("chain", chain)
            .with("hop", hop)
            .with("token", token)
            .with("now", now)
            .with("trace", trace.map(str::to_owned)),
    )
}

/// The chain is alive at `hop`; `send_after` is when it may send next under the run's rate
/// (kept when `None`). Returns the run's status and its active chains (the hop's kill switch
/// and rate share mid-page), or no row when the chain is no longer at `hop`.
pub fn heartbeat(run_id: &str, chain: i64, hop: i64, now: i64, send_after: Option<i64>) -> Stmt {
    Stmt::named(
        "heartbeat",
        "UPDATE baton_chains SET heartbeat_at = :now, send_after = COALESCE(:send_after, send_after)
         WHERE run_id = :run_id AND chain_no = :chain AND next_hop = :hop + 1
         RETURNING (SELECT status FROM baton_runs WHERE run_id = :run_id) AS run_status,
             (SELECT COUNT(*) FROM baton_chains c WHERE c.run_id = :run_id AND c.status = 'active') AS live_chains",
        Params::new()
            .with("run_id", run_id)
            .with("chain", chain)
            .with("hop", hop)
            .with("now", now)
            .with("send_after", send_after),
    )
}

/// Ends or fails a chain, but only if `hop` is still its current hop (or, with `hop = None`,
/// whatever its hop) and the transition table allows `to` from its status.
pub fn set_chain_status(run_id: &str, chain: i64, hop: Option<i64>, to: ChainState, reason: Option<&str>) -> Stmt {
    let mut params = Params::new()
        .with("run_id", run_id)
        .with("chain", chain)
        .with("to", to.as_str())
        .with("reason", reason.map(str::to_owned));
    let from_list = from_list(to);
    let hop_cond = match hop {
        Some(h) => {
            params.push("hop", h);
            "AND next_hop = :hop + 1"
        }
        None => "",
    };
    Stmt::named(
        "set_chain_status",
        format!(
            "UPDATE baton_chains SET status = :to, reason = COALESCE(:reason, reason)
             WHERE run_id = :run_id AND chain_no = :chain AND status IN ({from_list}) {hop_cond}
             RETURNING chain_no, next_hop, last_trace"
        ),
        params,
    )
}

/// A hop that found its run pausing parks its chain, but only while the run is still pausing
/// (or paused) and the hop is still the chain's current one (its `token`, stored by
/// [`start_hop`]): a resume that came in between wins. A re-run after a lost answer finds the
/// chain parked by this hop and returns it again.
pub fn park_chain(run_id: &str, chain: i64, hop: i64, token: &str) -> Stmt {
    Stmt::named(
        "park_chain",
        format!(
            "UPDATE baton_chains SET status = 'paused'
             WHERE run_id = :run_id AND chain_no = :chain AND status IN ({}, 'paused')
               AND next_hop = :hop + 1 AND hop_token = :token
               AND EXISTS (SELECT 1 FROM baton_runs WHERE run_id = :run_id AND status IN ('pausing', 'paused'))
             RETURNING chain_no",
            from_list(ChainState::Paused)
        ),
        Params::new().with("run_id", run_id).with("chain", chain).with("hop", hop).with("token", token),
    )
}

/// Resume (and the sweeper, for a running run): every parked chain becomes active again and is
/// returned with its checkpoint (the `paused -> active` edge of the transition table). `token`
/// makes a re-run after a lost answer return the same chains.
pub fn unpark_chains(run_id: &str, now: i64, token: &str) -> Stmt {
    Stmt::named(
        "unpark_chains",
        "UPDATE baton_chains SET status = 'active', heartbeat_at = :now, restart_token = :token
         WHERE run_id = :run_id AND (status = 'paused' OR (status = 'active' AND restart_token = :token))
           AND EXISTS (SELECT 1 FROM baton_runs WHERE run_id = :run_id AND status = 'running')
         RETURNING chain_no, next_hop, last_trace",
        Params::new().with("run_id", run_id).with("now", now).with("token", token),
    )
}

/// Sweeper: active chains silent since `stale_before` are claimed for a restart (the heartbeat
/// moves, so a second sweeper finds nothing) and returned with their checkpoint. `token` is
/// unique to the call: a re-run after a lost answer returns the same chains (and counts the
/// restart once).
pub fn claim_stale_chains(run_id: &str, stale_before: i64, now: i64, token: &str) -> Stmt {
    Stmt::named(
        "claim_stale_chains",
        "UPDATE baton_chains SET heartbeat_at = :now,
             restarts = CASE WHEN restart_token = :token THEN restarts ELSE restarts + 1 END,
             restart_hops = CASE WHEN restart_token = :token THEN restart_hops
                                 WHEN restart_hops IS NULL THEN CAST(next_hop AS TEXT)
                                 ELSE restart_hops || ',' || CAST(next_hop AS TEXT) END,
             last_error = CASE WHEN restart_token = :token THEN last_error
                               ELSE 'hop ' || CAST(next_hop - 1 AS TEXT) || ' went silent (no heartbeat): the sweeper restarted the chain at hop '
                                    || CAST(next_hop AS TEXT) END,
             restart_token = :token
         WHERE run_id = :run_id AND status = 'active'
           AND (heartbeat_at < :stale_before OR restart_token = :token)
         RETURNING chain_no, next_hop, last_trace",
        Params::new().with("run_id", run_id).with("stale_before", stale_before).with("now", now).with("token", token),
    )
}

/// Sweeper: when pages are claimable but no chain is active, revive one ended chain (the
/// `ended -> active` edge of the transition table).
/// `token` makes a re-run after a lost answer return the chain it revived.
pub fn revive_chain(run_id: &str, now: i64, token: &str) -> Stmt {
    Stmt::named(
        "revive_chain",
        "UPDATE baton_chains SET status = 'active', heartbeat_at = :now,
             restarts = CASE WHEN restart_token = :token THEN restarts ELSE restarts + 1 END,
             restart_token = :token
         WHERE run_id = :run_id AND (
             (status = 'active' AND restart_token = :token)
             OR (chain_no = (SELECT MIN(chain_no) FROM baton_chains WHERE run_id = :run_id AND status = 'ended')
                 AND EXISTS (SELECT 1 FROM baton_runs WHERE run_id = :run_id AND status = 'running')
                 AND NOT EXISTS (SELECT 1 FROM baton_chains WHERE run_id = :run_id AND status = 'active')
                 AND EXISTS (SELECT 1 FROM baton_pages WHERE run_id = :run_id
                             AND (status = 'pending' OR (status = 'leased' AND lease_expires_at < :now)))))
         RETURNING chain_no, next_hop, last_trace",
        Params::new().with("run_id", run_id).with("now", now).with("token", token),
    )
}

/// Sweeper, pausing runs: a chain that stopped answering is parked where it is (only while the
/// run is still pausing).
pub fn park_stale_chains(run_id: &str, stale_before: i64) -> Stmt {
    Stmt::named(
        "park_stale_chains",
        format!(
            "UPDATE baton_chains SET status = 'paused'
             WHERE run_id = :run_id AND status IN ({}) AND heartbeat_at < :stale_before
               AND EXISTS (SELECT 1 FROM baton_runs WHERE run_id = :run_id AND status = 'pausing')
             RETURNING chain_no",
            from_list(ChainState::Paused)
        ),
        Params::new().with("run_id", run_id).with("stale_before", stale_before),
    )
}

pub fn chains_of(run_id: &str) -> Stmt {
    Stmt::named(
        "chains_of",
        "SELECT chain_no, next_hop, status, reason, heartbeat_at, restarts, restart_hops, last_error, last_trace FROM baton_chains
         WHERE run_id = :run_id ORDER BY chain_no",
        Params::new().with("run_id", run_id),
    )
}

/// Records what went wrong with a chain's hop, for `baton status`. Diagnostic only: it changes
/// no state the protocol reads, so running it twice, late or never is harmless.
pub fn note_chain_error(run_id: &str, chain: i64, hop: i64, error: &str) -> Stmt {
    Stmt::named(
        "note_chain_error",
        "UPDATE baton_chains SET last_error = :error WHERE run_id = :run_id AND chain_no = :chain",
        Params::new().with("run_id", run_id).with("chain", chain).with("error", format!("hop {hop} failed: {error}")),
    )
}

// ---- pages ------------------------------------------------------------------------------------

const CLAIMABLE: &str = "(status = 'pending' OR (status = 'leased' AND lease_expires_at < :now))";
const OWN_LEASE: &str = "(status = 'leased' AND lease_owner = :owner)";

/// Fencing: a ledger write on page `:page_no` changes something only while `:owner` still holds
/// the page's lease. A writer whose lease was taken over (it outlived its lease, or its clock
/// ran slow) writes nothing.
const HOLDS_LEASE: &str = "EXISTS (SELECT 1 FROM baton_pages lp WHERE lp.run_id = :run_id AND lp.page_no = :page_no
                              AND lp.status = 'leased' AND lp.lease_owner = :owner)";

/// Claims one page for a hop, in one statement, only while the run is `running` and the hop is
/// still its chain's current hop (the kill switch and the fork guard). Chains prefer their own
/// stripe of pages (`page_no % chains = chain`) so concurrent claims rarely collide. A page this
/// owner already holds comes first: a re-run of a claim whose response was lost gets it back
/// instead of stranding it until its lease expires.
pub fn claim_page(run_id: &str, chain: i64, hop: i64, chains: i64, owner: &str, now: i64, lease_ms: i64) -> Stmt {
    Stmt::named(
        "claim_page",
        format!(
            "UPDATE baton_pages SET status = 'leased', lease_owner = :owner,
                 lease_expires_at = :lease_expires_at, attempts = attempts + 1, claimed_at = :now,
                 finished_at = NULL
             WHERE run_id = :run_id
               AND page_no = (
                   SELECT page_no FROM baton_pages
                   WHERE run_id = :run_id AND ({CLAIMABLE} OR {OWN_LEASE})
                   ORDER BY CASE WHEN {OWN_LEASE} THEN 0 WHEN page_no % :chains = :chain THEN 1 ELSE 2 END, page_no
                   LIMIT 1)
               AND ({CLAIMABLE} OR {OWN_LEASE})
               AND EXISTS (SELECT 1 FROM baton_runs WHERE run_id = :run_id AND status = 'running')
               AND EXISTS (SELECT 1 FROM baton_chains WHERE run_id = :run_id AND chain_no = :chain
                           AND next_hop = :hop + 1 AND status = 'active')
               AND :chain < (SELECT chains FROM baton_runs WHERE run_id = :run_id)
             RETURNING page_no, lo, hi, items, attempts, lease_expires_at,
                 (SELECT COUNT(*) FROM baton_chains WHERE run_id = :run_id AND status = 'active') AS live_chains,
                 (SELECT COUNT(*) FROM baton_pages WHERE run_id = :run_id AND status = 'pending') AS pending_pages"
        ),
        Params::new()
            .with("run_id", run_id)
            .with("chain", chain)
            .with("hop", hop)
            .with("chains", chains.max(1))
            .with("owner", owner)
            .with("now", now)
            .with("lease_expires_at", now + lease_ms),
    )
}

/// `tune`: a live run's new config snapshot, chain count and hop budget.
pub fn retune_run(run_id: &str, job_config: &str, chains: i64, max_hops: i64, now: i64) -> Stmt {
    Stmt::named(
        "retune_run",
        "UPDATE baton_runs SET job_config = :job_config, chains = :chains, max_hops = :max_hops, updated_at = :now
         WHERE run_id = :run_id AND status IN ('running', 'pausing', 'paused')
         RETURNING run_id",
        Params::new()
            .with("run_id", run_id)
            .with("job_config", job_config)
            .with("chains", chains)
            .with("max_hops", max_hops)
            .with("now", now),
    )
}

/// `tune`: chains `from..to` that do not exist yet, at hop 1 (safe to re-run: existing chains
/// are left alone). Active in a running run, parked in a pausing or paused one (resume starts
/// them). `heartbeat_at = 0` leaves them for the next sweep to start.
pub fn add_chains(run_id: &str, to: i64, heartbeat_at: i64, send_after: i64) -> Stmt {
    Stmt::named(
        "add_chains",
        "WITH RECURSIVE seq(n) AS (SELECT CAST(0 AS BIGINT) UNION ALL SELECT n + 1 FROM seq WHERE n + 1 < :to)
         INSERT INTO baton_chains (run_id, chain_no, next_hop, status, heartbeat_at, restarts, send_after)
         SELECT :run_id, n, 1,
                CASE WHEN (SELECT status FROM baton_runs WHERE run_id = :run_id) = 'running' THEN 'active' ELSE 'paused' END,
                :heartbeat_at, 0, :send_after
         FROM seq WHERE n < :to
           AND EXISTS (SELECT 1 FROM baton_runs WHERE run_id = :run_id AND status IN ('running', 'pausing', 'paused'))
         ON CONFLICT (run_id, chain_no) DO NOTHING
         RETURNING chain_no, next_hop, last_trace",
        Params::new()
            .with("run_id", run_id)
            .with("to", to)
            .with("heartbeat_at", heartbeat_at)
            .with("send_after", send_after),
    )
}

/// `tune`: chains below the new count that had ended (an earlier `tune` lowered the count, or
/// they found no page) take part again from their checkpoint; returned to be invoked. Safe to
/// re-run.
pub fn reactivate_chains(run_id: &str, to: i64, heartbeat_at: i64) -> Stmt {
    Stmt::named(
        "reactivate_chains",
        "UPDATE baton_chains SET status = 'active', heartbeat_at = :heartbeat_at
         WHERE run_id = :run_id AND chain_no < :to AND status = 'ended'
           AND EXISTS (SELECT 1 FROM baton_runs WHERE run_id = :run_id AND status = 'running')
         RETURNING chain_no, next_hop, last_trace",
        Params::new().with("run_id", run_id).with("to", to).with("heartbeat_at", heartbeat_at),
    )
}

/// Why a claim found nothing: the run's status and the pages still open.
pub fn page_summary(run_id: &str, now: i64) -> Stmt {
    Stmt::named(
        "page_summary",
        format!(
            "SELECT r.status AS run_status, r.chains AS chains,
                    (SELECT COUNT(*) FROM baton_pages WHERE run_id = :run_id AND {CLAIMABLE}) AS claimable,
                    (SELECT COUNT(*) FROM baton_pages WHERE run_id = :run_id AND status = 'leased'
                        AND lease_expires_at >= :now) AS leased,
                    (SELECT COUNT(*) FROM baton_pages WHERE run_id = :run_id AND status = 'done') AS done
             FROM baton_runs r WHERE r.run_id = :run_id"
        ),
        Params::new().with("run_id", run_id).with("now", now),
    )
}

/// Finishes (`done`) or releases (`pending`) a page, only while the caller holds its lease. A
/// page is `done` only when none of its items is left `claimed`; the row comes back when it is
/// (also on a re-run after a lost response: the last owner stays recorded).
pub fn finish_page(run_id: &str, page_no: i64, owner: &str, done: bool, now: i64) -> Stmt {
    let sql = if done {
        "UPDATE baton_pages SET status = 'done', lease_expires_at = NULL, finished_at = :now
         WHERE run_id = :run_id AND page_no = :page_no AND lease_owner = :owner AND status IN ('leased', 'done')
           AND NOT EXISTS (SELECT 1 FROM baton_ledger WHERE run_id = :run_id AND page_no = :page_no AND state = 'claimed')
         RETURNING page_no"
    } else {
        "UPDATE baton_pages SET status = 'pending', lease_expires_at = NULL, finished_at = :now
         WHERE run_id = :run_id AND page_no = :page_no AND lease_owner = :owner AND status = 'leased'
         RETURNING page_no"
    };
    let params = Params::new().with("run_id", run_id).with("page_no", page_no).with("owner", owner).with("now", now);
    Stmt::named("finish_page", sql, params)
}

/// A hop started (or, with `outcome = Some("duplicate")`, a duplicate delivery was turned
/// away), for `baton report`. Diagnostic only, and safe to re-run: a second insert of the same
/// hop and token changes nothing.
pub fn record_hop(hop: &HopRecord<'_>, outcome: Option<&str>) -> Stmt {
    Stmt::named(
        "record_hop",
        "INSERT INTO baton_hops (run_id, chain_no, hop, token, started_at, ended_at, outcome, restarts, trace)
         VALUES (:run_id, :chain, :hop, :token, :now, CASE WHEN CAST(:outcome AS TEXT) IS NULL THEN NULL ELSE :now END, :outcome,
                 :restarts, :trace)
         ON CONFLICT (run_id, chain_no, hop, token) DO NOTHING",
        Params::new()
            .with("run_id", hop.run_id)
            .with("chain", hop.chain)
            .with("hop", hop.hop)
            .with("token", hop.token)
            .with("now", hop.now)
            .with("outcome", outcome.map(str::to_owned))
            .with("restarts", hop.restarts)
            .with("trace", hop.trace.map(str::to_owned)),
    )
}

/// What [`record_hop`] records.
pub struct HopRecord<'a> {
    pub run_id: &'a str,
    pub chain: i64,
    pub hop: i64,
    pub token: &'a str,
    pub now: i64,
    pub restarts: i64,
    pub trace: Option<&'a str>,
}

/// How the invocation `token` of hop `hop` ended. Diagnostic only; a re-run finds the outcome
/// set and changes nothing.
pub fn end_hop(run_id: &str, chain: i64, hop: i64, token: &str, outcome: &str, pages: i64, now: i64) -> Stmt {
    Stmt::named(
        "end_hop",
        "UPDATE baton_hops SET ended_at = :now, outcome = :outcome, pages = :pages
         WHERE run_id = :run_id AND chain_no = :chain AND hop = :hop AND token = :token AND outcome IS NULL",
        Params::new()
            .with("run_id", run_id)
            .with("chain", chain)
            .with("hop", hop)
            .with("token", token)
            .with("outcome", outcome)
            .with("pages", pages)
            .with("now", now),
    )
}

/// Rows per answer of the report's reads: far below the Data API's 1 MiB per answer.
pub const TIMELINE_ROWS: i64 = 2000;

/// The hops of a run after `after` (chain, hop, token; keyset order), [`TIMELINE_ROWS`] at a
/// time, for `baton report`.
pub fn hop_timeline(run_id: &str, after: Option<(i64, i64, &str)>) -> Stmt {
    let (chain, hop, token) = after.unwrap_or((-1, 0, ""));
    Stmt::named(
        "hop_timeline",
        "SELECT chain_no, hop, token, started_at, ended_at, outcome, pages, restarts, trace FROM baton_hops
         WHERE run_id = :run_id
           AND (chain_no > :chain OR (chain_no = :chain AND (hop > :hop OR (hop = :hop AND token > :token))))
         ORDER BY chain_no, hop, token LIMIT :limit",
        Params::new()
            .with("run_id", run_id)
            .with("chain", chain)
            .with("hop", hop)
            .with("token", token)
            .with("limit", TIMELINE_ROWS),
    )
}

/// The last claim of each page after page `after`, [`TIMELINE_ROWS`] at a time, for `baton
/// report`.
pub fn page_timeline(run_id: &str, after: i64) -> Stmt {
    Stmt::named(
        "page_timeline",
        "SELECT page_no, lease_owner, claimed_at, finished_at, status, attempts, items FROM baton_pages
         WHERE run_id = :run_id AND page_no > :after AND claimed_at IS NOT NULL ORDER BY page_no LIMIT :limit",
        Params::new().with("run_id", run_id).with("after", after).with("limit", TIMELINE_ROWS),
    )
}

/// Items settled per `bucket_ms` of time, by state, for `baton report`'s send rate.
pub fn settled_over_time(run_id: &str, bucket_ms: i64) -> Stmt {
    Stmt::named(
        "settled_over_time",
        "SELECT CAST(updated_at / :bucket AS BIGINT) AS bucket, state, COUNT(*) AS n FROM baton_ledger
         WHERE run_id = :run_id AND state <> 'claimed'
         GROUP BY 1, 2 ORDER BY 1",
        Params::new().with("run_id", run_id).with("bucket", bucket_ms.max(1)),
    )
}

/// A run's progress in one statement (a progress bar polls it): its status and totals, the
/// items and pages done, the chains active and the hops made.
pub fn run_progress(run_id: &str) -> Stmt {
    Stmt::named(
        "run_progress",
        "SELECT r.status, r.total_items, r.total_pages,
             (SELECT CAST(COALESCE(SUM(p.items), 0) AS BIGINT) FROM baton_pages p
              WHERE p.run_id = r.run_id AND p.status = 'done') AS items_done,
             (SELECT COUNT(*) FROM baton_pages p WHERE p.run_id = r.run_id AND p.status = 'done') AS pages_done,
             (SELECT COUNT(*) FROM baton_chains c WHERE c.run_id = r.run_id AND c.status = 'active') AS active_chains,
             (SELECT CAST(COALESCE(SUM(c.next_hop - 1), 0) AS BIGINT) FROM baton_chains c
              WHERE c.run_id = r.run_id) AS hops
         FROM baton_runs r WHERE r.run_id = :run_id",
        Params::new().with("run_id", run_id),
    )
}

pub fn page_progress(run_id: &str) -> Stmt {
    Stmt::named(
        "page_progress",
        "SELECT status, COUNT(*) AS n, CAST(COALESCE(SUM(items), 0) AS BIGINT) AS items FROM baton_pages
         WHERE run_id = :run_id GROUP BY status",
        Params::new().with("run_id", run_id),
    )
}

// ---- the job's source -------------------------------------------------------------------------

/// One row of the source, to validate columns and templates before a run starts (it names no
/// column, so a missing key column is reported by name, not as an SQL error). Then counts rows
/// and distinct keys, since a key that is not unique cannot page.
/// One row of the source whose key is not NULL (the sample's type when its first row has none).
pub fn keyed_sample(source: &str, key: &str) -> Stmt {
    Stmt::named(
        "source_sample",
        format!("SELECT * FROM ({source}) AS src WHERE src.{key} IS NOT NULL LIMIT 1"),
        Params::new(),
    )
}

pub fn source_sample(source: &str, key: &str) -> Vec<Stmt> {
    vec![
        Stmt::named("source_sample", format!("SELECT * FROM ({source}) AS src LIMIT 1"), Params::new()),
        Stmt::named(
            "source_sample",
            format!(
                "SELECT COUNT(src.{key}) AS n, COUNT(DISTINCT CAST(src.{key} AS TEXT)) AS d, COUNT(*) AS total
                 FROM ({source}) AS src"
            ),
            Params::new(),
        ),
    ]
}

/// The source row whose key is `key`. The key's type is not known here (`baton preview
/// --key`), so the comparison is on text, which every key type supports.
pub fn source_row_by_key(source: &str, key_column: &str, key: &str) -> Stmt {
    Stmt::named(
        "source_row_by_key",
        format!("SELECT * FROM ({source}) AS src WHERE CAST(src.{key_column} AS TEXT) = :key"),
        Params::new().with("key", key),
    )
}

/// SQLite only ([`crate::sql::SqlStore::dynamic_types`]): how many keys of each storage class
/// (`integer`, `real`, `text`, `blob`) the source holds, with an example of each. A column
/// declared NUMERIC holds 1 as an integer and 1.5 as a real; integer 2 and text '2' are one key
/// to the ledger. One scan, at start.
pub fn key_type_census(source: &str, key: &str) -> Stmt {
    Stmt::named(
        "key_type_census",
        format!(
            "SELECT typeof(src.{key}) AS t, COUNT(*) AS n, MIN(CAST(src.{key} AS TEXT)) AS example
             FROM ({source}) AS src WHERE src.{key} IS NOT NULL GROUP BY typeof(src.{key}) ORDER BY 2 DESC"
        ),
        Params::new(),
    )
}

/// Rows of the source whose key is NULL: left out of every run, listed by `status`.
pub fn null_key_rows(source: &str, key: &str, limit: i64) -> Stmt {
    Stmt::named(
        "null_key_rows",
        format!("SELECT * FROM ({source}) AS src WHERE src.{key} IS NULL LIMIT :limit"),
        Params::new().with("limit", limit),
    )
}

/// The `WHERE` condition of a page's key range over `src`, and its parameters.
pub fn range_condition(key: &str, lo: Option<Value>, hi: Value) -> (String, Params) {
    match lo {
        Some(lo) => (format!("src.{key} > :lo AND src.{key} <= :hi"), Params::new().with("lo", lo).with("hi", hi)),
        None => (format!("src.{key} <= :hi"), Params::new().with("hi", hi)),
    }
}

/// What a page load checks against the suppression list: the source's address column (a plain
/// identifier, validated in config) and the job, whose own suppressions and those of every job
/// (`*`) apply.
#[derive(Debug, Clone, Copy)]
pub struct SuppressionCheck<'a> {
    pub email_column: &'a str,
    pub job: &'a str,
}

/// The column a suppression-checked page load adds after the source's own: the reason the
/// row's address is suppressed, or NULL.
pub const SUPPRESSED_COLUMN: &str = "baton_suppressed";

/// All rows of one page, in key order; with `check`, each row also says whether its address is
/// suppressed ([`SUPPRESSED_COLUMN`], last), decided in this one statement (an index lookup per
/// row on the suppression list's key, never a statement per item). Addresses are compared
/// trimmed and lower-cased, as [`crate::mail::suppression_keys`] stores them.
pub fn load_page(source: &str, key: &str, lo: Option<Value>, hi: Value, check: Option<SuppressionCheck<'_>>) -> Stmt {
    let (cond, mut params) = range_condition(key, lo, hi);
    let suppressed = match check {
        None => String::new(),
        Some(c) => {
            params.push("scope", c.job);
            format!(
                ", (SELECT MIN(sup.reason) FROM baton_suppressions sup
                    WHERE sup.address = LOWER(TRIM(CAST(src.{col} AS TEXT))) AND sup.scope IN ('*', :scope)
                      AND sup.removed_at IS NULL)
                   AS {SUPPRESSED_COLUMN}",
                col = c.email_column
            )
        }
    };
    Stmt::named(
        "load_page",
        format!("SELECT src.*{suppressed} FROM ({source}) AS src WHERE {cond} ORDER BY src.{key}"),
        params,
    )
}

// ---- the delivery ledger ----------------------------------------------------------------------

/// Item claims before effects: one statement inserts a `claimed` row per key and returns the
/// keys this owner now holds as `claimed`: the new ones, and (on a re-run after a lost
/// response, or after taking over a dead owner's claims) those it already held. Keys that are
/// done, failed, skipped, unknown or claimed by someone else are not returned. Fenced: nothing
/// is claimed unless the owner holds the page's lease and, by its clock, the lease is current.
/// `keys` must be distinct (the engine de-duplicates a page's rows first).
pub fn claim_items(run_id: &str, page_no: i64, owner: &str, now: i64, keys: &[String]) -> Stmt {
    let mut params =
        Params::new().with("run_id", run_id).with("page_no", page_no).with("owner", owner).with("now", now);
    let rows: Vec<String> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            params.push(format!("k{i}"), k.as_str());
            format!("(:k{i})")
        })
        .collect();
    Stmt::named(
        "claim_items",
        format!(
            "INSERT INTO baton_ledger (run_id, item_key, page_no, state, claimed_by, updated_at)
             SELECT :run_id, v.column1, :page_no, 'claimed', :owner, :now
             FROM (VALUES {}) AS v
             WHERE {HOLDS_LEASE}
               AND EXISTS (SELECT 1 FROM baton_pages cp WHERE cp.run_id = :run_id AND cp.page_no = :page_no
                           AND cp.lease_expires_at > :now)
             ON CONFLICT (run_id, item_key) DO UPDATE SET updated_at = excluded.updated_at
               WHERE baton_ledger.claimed_by = excluded.claimed_by AND baton_ledger.state = 'claimed'
             RETURNING item_key",
            rows.join(", ")
        ),
        params,
    )
}

/// A page re-offered after its lease expired may hold items its crashed owner claimed and may
/// or may not have processed. At-most-once: they become `unknown`, never retried. At-least-once:
/// the new owner takes the claims over and processes them again; the statement returns every
/// claim the owner then holds on the page, so a re-run after a lost response returns the same
/// set. Fenced on the owner holding the page's lease.
pub fn settle_stale_claims(run_id: &str, page_no: i64, owner: &str, resend: bool, now: i64) -> Stmt {
    let params = Params::new().with("run_id", run_id).with("page_no", page_no).with("owner", owner).with("now", now);
    let (set, whose) = if resend {
        ("claimed_by = :owner", "")
    } else {
        (
            "state = 'unknown', reason = 'the hop that claimed it stopped before recording a result'",
            "AND claimed_by <> :owner",
        )
    };
    Stmt::named(
        "settle_stale_claims",
        format!(
            "UPDATE baton_ledger SET {set}, updated_at = :now
             WHERE run_id = :run_id AND page_no = :page_no AND state = 'claimed' {whose} AND {HOLDS_LEASE}
             RETURNING item_key"
        ),
        params,
    )
}

/// Results written back in one statement: `(key, state, reason)` for each processed item, only
/// over rows this owner still holds as `claimed` on a page whose lease it still holds. A re-run
/// finds nothing left `claimed` and changes nothing.
pub fn record_results(
    run_id: &str,
    page_no: i64,
    owner: &str,
    now: i64,
    results: &[(String, ItemState, Option<String>)],
) -> Stmt {
    let mut params =
        Params::new().with("run_id", run_id).with("page_no", page_no).with("owner", owner).with("now", now);
    let mut seen = std::collections::HashSet::new();
    let rows: Vec<String> = results
        .iter()
        .filter(|(key, ..)| seen.insert(key.as_str()))
        .enumerate()
        .map(|(i, (key, state, reason))| {
            params.push(format!("k{i}"), key.as_str());
            debug_assert!(ItemState::from_states(*state).contains(&ItemState::Claimed), "a result state");
            params.push(format!("s{i}"), state.as_str());
            params.push(format!("r{i}"), reason.clone().unwrap_or_default());
            format!("(:k{i}, :s{i}, :r{i})")
        })
        .collect();
    // An update written as an upsert, so that each result finds its ledger row by the primary
    // key: O(n log N) on both stores. (`UPDATE … FROM (VALUES …)` got SQLite, which has no
    // table statistics, to scan the VALUES once per ledger row of the page: 65 ms for a page of
    // 1,000.) The SELECT yields only keys that have a ledger row, so every row conflicts and
    // nothing is ever inserted; the conflict's WHERE is the fence.
    Stmt::named(
        "record_results",
        format!(
            "INSERT INTO baton_ledger (run_id, item_key, page_no, state, reason, claimed_by, updated_at)
             SELECT :run_id, v.column1, :page_no, v.column2, NULLIF(v.column3, ''), :owner, :now
             FROM (VALUES {}) AS v
             WHERE EXISTS (SELECT 1 FROM baton_ledger e WHERE e.run_id = :run_id AND e.item_key = v.column1
                           AND e.page_no = :page_no AND e.claimed_by = :owner AND e.state = 'claimed')
               AND {HOLDS_LEASE}
             ON CONFLICT (run_id, item_key) DO UPDATE
             SET state = excluded.state, reason = excluded.reason, updated_at = excluded.updated_at
             WHERE baton_ledger.page_no = :page_no AND baton_ledger.claimed_by = :owner
               AND baton_ledger.state = 'claimed' AND {HOLDS_LEASE}",
            rows.join(", ")
        ),
        params,
    )
}

/// Claims this owner holds but never acted on (the time budget ran out): definitely not sent,
/// so they are dropped and the page will claim them again. Fenced on the page's lease.
pub fn release_claims(run_id: &str, page_no: i64, owner: &str, keys: &[String]) -> Stmt {
    let mut params = Params::new().with("run_id", run_id).with("page_no", page_no).with("owner", owner);
    let list = in_list(&mut params, "k", keys.iter().map(|k| Value::from(k.as_str())));
    Stmt::named(
        "release_claims",
        format!(
            "DELETE FROM baton_ledger
             WHERE run_id = :run_id AND page_no = :page_no AND claimed_by = :owner AND state = 'claimed'
               AND item_key IN ({list}) AND {HOLDS_LEASE}"
        ),
        params,
    )
}

pub fn ledger_counts(run_id: &str) -> Stmt {
    Stmt::named(
        "ledger_counts",
        "SELECT state, COUNT(*) AS n FROM baton_ledger WHERE run_id = :run_id GROUP BY state",
        Params::new().with("run_id", run_id),
    )
}

/// The failure threshold's count: failures since the run last resumed.
pub fn failures_since_baseline(run_id: &str) -> Stmt {
    Stmt::named(
        "failures_since_baseline",
        "SELECT (SELECT COUNT(*) FROM baton_ledger WHERE run_id = :run_id AND state = 'failed')
                - r.failure_baseline AS failures, r.total_items AS total
         FROM baton_runs r WHERE r.run_id = :run_id",
        Params::new().with("run_id", run_id),
    )
}

pub fn ledger_items(run_id: &str, state: &str, limit: i64) -> Stmt {
    Stmt::named(
        "ledger_items",
        "SELECT item_key, state, reason FROM baton_ledger
         WHERE run_id = :run_id AND state = :state ORDER BY item_key LIMIT :limit",
        Params::new().with("run_id", run_id).with("state", state).with("limit", limit),
    )
}

// ---- the suppression list and SES events -------------------------------------------------------

/// A suppression is in force while its `removed_at` is NULL.
const IN_FORCE: &str = "removed_at IS NULL";

/// When an upsert of a suppression rewrites the row already there: the row was lifted (an
/// operator's `suppress remove`, a late delivery), or it is held for transient bounces only and
/// a permanent reason (a complaint, a hard bounce, an unsubscribe, an operator) comes, which a
/// late delivery must not lift. Otherwise the first suppression in force is kept.
const REWRITES: &str = "baton_suppressions.removed_at IS NOT NULL
               OR (baton_suppressions.reason = 'soft_bounces' AND excluded.reason <> 'soft_bounces')";

/// Suppresses `address` (normalised) for `scope` (a job, or `*`) as of `now`. Adding one in
/// force again changes nothing, so a re-run after a lost response is harmless ([`REWRITES`]
/// says when the row is rewritten). Returns the row if it is new, back, or now permanent.
pub fn suppress(address: &str, scope: &str, reason: &str, source: &str, detail: Option<&str>, now: i64) -> Stmt {
    suppress_many(&[address.to_owned()], scope, reason, source, detail, now)
}

/// [`suppress`] for many distinct addresses in one statement (the engine sends at most
/// [`SUPPRESSIONS_PER_STATEMENT`]).
pub fn suppress_many(
    addresses: &[String],
    scope: &str,
    reason: &str,
    source: &str,
    detail: Option<&str>,
    now: i64,
) -> Stmt {
    let mut params = Params::new()
        .with("scope", scope)
        .with("reason", reason)
        .with("source", source)
        .with("detail", detail)
        .with("now", now);
    let rows: Vec<String> = addresses
        .iter()
        .enumerate()
        .map(|(i, a)| {
            params.push(format!("a{i}"), a.as_str());
            format!("(:a{i}, :scope, :reason, :source, :detail, :now)")
        })
        .collect();
    Stmt::named(
        "suppress",
        format!(
            "INSERT INTO baton_suppressions (address, scope, reason, source, detail, created_at)
             VALUES {}
             ON CONFLICT (address, scope) DO UPDATE SET reason = excluded.reason, source = excluded.source,
               detail = excluded.detail, created_at = excluded.created_at, removed_at = NULL
             WHERE {REWRITES}
             RETURNING address",
            rows.join(", ")
        ),
        params,
    )
}

pub const SUPPRESSIONS_PER_STATEMENT: usize = 500;

/// Which of `addresses` (normalised, at most [`SUPPRESSIONS_PER_STATEMENT`]) are suppressed for
/// `job` or every job, with a reason each: the page load's check for the few addresses SQL
/// cannot fold alike on every store.
pub fn suppressed_among(addresses: &[String], job: &str) -> Stmt {
    let mut params = Params::new().with("scope", job);
    let list = in_list(&mut params, "a", addresses.iter().map(|a| Value::from(a.as_str())));
    Stmt::named(
        "suppressed_among",
        format!(
            "SELECT address, MIN(reason) AS reason FROM baton_suppressions
             WHERE scope IN ('*', :scope) AND address IN ({list}) AND {IN_FORCE} GROUP BY address"
        ),
        params,
    )
}

/// Lifts `address`'s suppression for `scope`, or for every scope; the row stays, marked lifted
/// at `now` (transient bounces count again from then). Returns the rows lifted.
pub fn unsuppress(address: &str, scope: Option<&str>, now: i64) -> Stmt {
    let mut params = Params::new().with("address", address).with("now", now);
    let which = match scope {
        Some(scope) => {
            params.push("scope", scope);
            "AND scope = :scope"
        }
        None => "",
    };
    Stmt::named(
        "unsuppress",
        format!(
            "UPDATE baton_suppressions SET removed_at = :now
             WHERE address = :address {which} AND {IN_FORCE} RETURNING address, scope"
        ),
        params,
    )
}

pub const SUPPRESSION_COLUMNS: &str = "address, scope, reason, source, detail, created_at, removed_at";

/// Suppressions in `(address, scope)` order, `limit` rows after `after` (keyset pages, so a long
/// list is read in bounded answers): those in force, or with `lifted_too` every row.
pub fn suppressions(after: Option<(&str, &str)>, limit: i64, lifted_too: bool) -> Stmt {
    let mut params = Params::new().with("limit", limit);
    let mut conds: Vec<&str> = Vec::new();
    if !lifted_too {
        conds.push(IN_FORCE);
    }
    if let Some((address, scope)) = after {
        params.push("address", address);
        params.push("scope", scope);
        conds.push("(address > :address OR (address = :address AND scope > :scope))");
    }
    let cond = if conds.is_empty() { String::new() } else { format!("WHERE {}", conds.join(" AND ")) };
    Stmt::named(
        "suppressions",
        format!("SELECT {SUPPRESSION_COLUMNS} FROM baton_suppressions {cond} ORDER BY address, scope LIMIT :limit"),
        params,
    )
}

/// One SES event for one recipient, once: a replay (same event key and address) inserts
/// nothing. Returns the row if it is new.
pub fn record_mail_event(
    event_key: &str,
    address: &str,
    kind: &str,
    run: (Option<&str>, Option<&str>),
    detail: Option<&str>,
    at: i64,
    now: i64,
) -> Stmt {
    Stmt::named(
        "record_mail_event",
        "INSERT INTO baton_mail_events (event_key, address, kind, run_id, job, detail, at, recorded_at)
         VALUES (:event_key, :address, :kind, :run_id, :job, :detail, :at, :now)
         ON CONFLICT (event_key, address) DO NOTHING
         RETURNING address",
        Params::new()
            .with("event_key", event_key)
            .with("address", address)
            .with("kind", kind)
            .with("run_id", run.0)
            .with("job", run.1)
            .with("detail", detail)
            .with("at", at)
            .with("now", now),
    )
}

/// Whether an event already recorded for `address` had its effect applied (a row with
/// `applied_at` set), for a replay.
pub fn mail_event_applied(event_key: &str, address: &str) -> Stmt {
    Stmt::named(
        "mail_event_applied",
        "SELECT applied_at FROM baton_mail_events WHERE event_key = :event_key AND address = :address",
        Params::new().with("event_key", event_key).with("address", address),
    )
}

/// Marks an event's effect on the suppression list as made: replays change nothing from now on.
pub fn mark_mail_event_applied(event_key: &str, address: &str, now: i64) -> Stmt {
    Stmt::named(
        "mark_mail_event_applied",
        "UPDATE baton_mail_events SET applied_at = :now
         WHERE event_key = :event_key AND address = :address AND applied_at IS NULL",
        Params::new().with("event_key", event_key).with("address", address).with("now", now),
    )
}

/// Transient bounces of `:counted` since its last delivery (by SES's clock) and recorded since
/// its every-job suppression was last lifted (by baton's), as a scalar subquery.
const SOFT_BOUNCES_SINCE: &str = "(SELECT COUNT(*) FROM baton_mail_events b
      WHERE b.address = :counted AND b.kind = 'soft_bounce'
        AND b.at > COALESCE((SELECT MAX(d.at) FROM baton_mail_events d
                             WHERE d.address = :counted AND d.kind = 'delivery'), -1)
        AND b.recorded_at > COALESCE((SELECT l.removed_at FROM baton_suppressions l
                                      WHERE l.address = :counted AND l.scope = '*'), -1))";

/// Suppresses `address` (one of the forms of `counted`, the address its events are recorded
/// under) for every job once `counted` has `threshold` transient bounces ([`SOFT_BOUNCES_SINCE`]).
/// Decided from the recorded events in the one statement, so it is idempotent: a replay, or a
/// re-run after a lost response, reaches the same answer.
pub fn suppress_after_soft_bounces(counted: &str, address: &str, threshold: i64, now: i64) -> Stmt {
    Stmt::named(
        "suppress_after_soft_bounces",
        format!(
            "INSERT INTO baton_suppressions (address, scope, reason, source, detail, created_at)
             SELECT :address, '*', 'soft_bounces', 'ses', :detail, :now
             WHERE {SOFT_BOUNCES_SINCE} >= :threshold
             ON CONFLICT (address, scope) DO UPDATE SET reason = excluded.reason, source = excluded.source,
               detail = excluded.detail, created_at = excluded.created_at, removed_at = NULL
             WHERE {REWRITES}
             RETURNING address"
        ),
        Params::new()
            .with("counted", counted)
            .with("address", address)
            .with("threshold", threshold)
            .with("detail", format!("{threshold} transient bounces since the last delivery"))
            .with("now", now),
    )
}

/// A delivery that arrives after the bounces it preceded: lifts a `soft_bounces` suppression of
/// `address` (a form of `counted`) whose count, recounted since this delivery, is under the
/// threshold (bounces count afresh from the lifting). A suppression for any other reason stays.
/// Returns the rows lifted.
pub fn lift_soft_bounce_suppression(counted: &str, address: &str, threshold: i64, now: i64) -> Stmt {
    Stmt::named(
        "lift_soft_bounce_suppression",
        format!(
            "UPDATE baton_suppressions SET removed_at = :now
             WHERE address = :address AND scope = '*' AND reason = 'soft_bounces' AND {IN_FORCE}
               AND {SOFT_BOUNCES_SINCE} < :threshold
             RETURNING address"
        ),
        Params::new().with("counted", counted).with("address", address).with("threshold", threshold).with("now", now),
    )
}

/// A run's SES events by kind (`delivery`, `hard_bounce`, `soft_bounce`, `complaint`).
pub fn mail_event_counts(run_id: &str) -> Stmt {
    Stmt::named(
        "mail_event_counts",
        "SELECT kind, COUNT(*) AS n FROM baton_mail_events WHERE run_id = :run_id GROUP BY kind",
        Params::new().with("run_id", run_id),
    )
}

// ---- helpers ----------------------------------------------------------------------------------

/// Binds each value as `:{prefix}{i}` and returns the comma-separated placeholder list.
fn in_list(params: &mut Params, prefix: &str, values: impl Iterator<Item = Value>) -> String {
    let names: Vec<String> = values
        .enumerate()
        .map(|(i, v)| {
            let name = format!("{prefix}{i}");
            params.push(name.clone(), v);
            format!(":{name}")
        })
        .collect();
    if names.is_empty() { "NULL".to_owned() } else { names.join(", ") }
}

// ---- `baton demo`'s synthetic users ---------------------------------------------------------

/// SQLite, read-only, before the demo replaces a data dir: the tables a `baton.db` holds.
pub const SQLITE_TABLES: &str = "SELECT name FROM sqlite_master WHERE type = 'table'";

/// SQLite, read-only, before the demo replaces a data dir: a run other than `(?1, ?2)`, if any.
pub const RUN_OTHER_THAN: &str = "SELECT job, run_key FROM baton_runs WHERE job <> ?1 OR run_key <> ?2 LIMIT 1";

/// One synthetic user: id, email (NULL for a few), name, city, plan.
pub type DemoUser = (i64, Option<String>, String, &'static str, &'static str);

/// Drops and creates the demo's source tables: `table` and `{table}_late` (rows that appear
/// mid-run). `table` is one of the demo's fixed names, never user input.
pub fn demo_tables(table: &str) -> Vec<Stmt> {
    let columns = "id BIGINT, email TEXT, name TEXT, city TEXT, plan TEXT";
    let keyed = "id BIGINT PRIMARY KEY, email TEXT, name TEXT NOT NULL, city TEXT, plan TEXT";
    vec![
        Stmt::named("demo_drop_late", format!("DROP TABLE IF EXISTS {table}_late"), Params::new()),
        Stmt::named("demo_create_late", format!("CREATE TABLE {table}_late ({columns})"), Params::new()),
        Stmt::named("demo_drop_users", format!("DROP TABLE IF EXISTS {table}"), Params::new()),
        Stmt::named("demo_create_users", format!("CREATE TABLE {table} ({keyed})"), Params::new()),
    ]
}

/// Inserts `users` into `table` (or `{table}_late` when `late`) in one statement.
pub fn insert_demo_users(table: &str, late: bool, users: &[DemoUser]) -> Stmt {
    let mut params = Params::new();
    let rows: Vec<String> = users
        .iter()
        .enumerate()
        .map(|(j, (id, email, name, city, plan))| {
            params.push(format!("i{j}"), *id);
            params.push(format!("e{j}"), email.clone());
            params.push(format!("n{j}"), name.clone());
            params.push(format!("c{j}"), *city);
            params.push(format!("p{j}"), *plan);
            format!("(:i{j}, :e{j}, :n{j}, :c{j}, :p{j})")
        })
        .collect();
    let table = if late { format!("{table}_late") } else { table.to_owned() };
    let sql = format!("INSERT INTO {table} (id, email, name, city, plan) VALUES {}", rows.join(", "));
    Stmt::named("insert_demo_users", sql, params)
}

// ---- the benchmark (`baton bench`) -----------------------------------------------------------

/// The billed time of a run's hops: every hop's wall time, milliseconds.
pub fn bench_billed_ms(run_id: &str) -> Stmt {
    Stmt::named(
        "bench_billed_ms",
        "SELECT CAST(COALESCE(SUM(ended_at - started_at), 0) AS BIGINT) AS ms FROM baton_hops
         WHERE run_id = :run_id AND ended_at IS NOT NULL",
        Params::new().with("run_id", run_id),
    )
}

/// The naive design's bookkeeping: one row per user sent.
pub fn bench_baseline_table() -> Vec<Stmt> {
    vec![
        Stmt::named("bench_baseline_drop", "DROP TABLE IF EXISTS baton_bench_sent", Params::new()),
        Stmt::named(
            "bench_baseline_create",
            "CREATE TABLE baton_bench_sent (id BIGINT PRIMARY KEY, state TEXT)",
            Params::new(),
        ),
    ]
}

/// Every id of the demo's users, in order (the naive design splits them into fixed ranges).
pub fn bench_user_ids(table: &str) -> Stmt {
    Stmt::named("bench_user_ids", format!("SELECT id FROM {table} ORDER BY id"), Params::new())
}

/// The naive design's next user: one row after `last`, up to `hi`.
pub fn bench_next_user(table: &str, last: i64, hi: i64) -> Stmt {
    Stmt::named(
        "bench_next_user",
        format!("SELECT id, email, name, city, plan FROM {table} WHERE id > :last AND id <= :hi ORDER BY id LIMIT 1"),
        Params::new().with("last", last).with("hi", hi),
    )
}

/// The naive design's result for one user.
pub fn bench_user_sent(id: i64, state: &str) -> Stmt {
    Stmt::named(
        "bench_user_sent",
        "INSERT INTO baton_bench_sent (id, state) VALUES (:id, :state)",
        Params::new().with("id", id).with("state", state),
    )
}
