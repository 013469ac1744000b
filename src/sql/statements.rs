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

// ---- runs -------------------------------------------------------------------------------------

pub const RUN_COLUMNS: &str = "run_id, job, run_key, status, reason, job_config, key_type, chains, \
     total_items, total_pages, max_hops, failure_baseline, deadline_at, created_at, updated_at, finished_at";

pub fn run_by_id(run_id: &str) -> Stmt {
    Stmt::new(
        format!("SELECT {RUN_COLUMNS} FROM baton_runs WHERE run_id = :run_id"),
        Params::new().with("run_id", run_id),
    )
}

pub fn run_by_key(job: &str, run_key: &str) -> Stmt {
    Stmt::new(
        format!("SELECT {RUN_COLUMNS} FROM baton_runs WHERE job = :job AND run_key = :run_key"),
        Params::new().with("job", job).with("run_key", run_key),
    )
}

pub fn latest_run() -> Stmt {
    Stmt::new(
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
    pub deadline_at: i64,
    pub now: i64,
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
        Stmt::new(
            "INSERT INTO baton_runs (run_id, job, run_key, status, job_config, key_type, deadline_at, created_at, updated_at)
             VALUES (:run_id, :job, :run_key, 'planning', :job_config, :key_type, :deadline_at, :now, :now)",
            Params::new()
                .with("run_id", run_id)
                .with("job", run.job)
                .with("run_key", run.run_key)
                .with("job_config", run.job_config)
                .with("key_type", run.key_type)
                .with("deadline_at", run.deadline_at)
                .with("now", run.now),
        ),
        Stmt::new(
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
        Stmt::new(
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
        Stmt::new(
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

/// Sets a run's status if it is currently one of `from`. Returns the row when it changed.
pub fn set_run_status(run_id: &str, from: &[&str], to: &str, reason: Option<&str>, now: i64) -> Stmt {
    let mut params =
        Params::new().with("run_id", run_id).with("to", to).with("reason", reason.map(str::to_owned)).with("now", now);
    let from_list = in_list(&mut params, "from", from.iter().map(|s| Value::from(*s)));
    let finished = if matches!(to, "succeeded" | "failed" | "cancelled") { ":now" } else { "finished_at" };
    Stmt::new(
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
    Stmt::new(
        "UPDATE baton_runs SET status = 'running', reason = NULL, updated_at = :now,
             failure_baseline = (SELECT COUNT(*) FROM baton_ledger WHERE run_id = :run_id AND state = 'failed')
         WHERE run_id = :run_id AND status IN ('pausing', 'paused')
         RETURNING run_id",
        Params::new().with("run_id", run_id).with("now", now),
    )
}

/// Completion, exactly once: only the statement that moves `running` to `succeeded` while no
/// page is left undone returns a row.
pub fn complete_run(run_id: &str, now: i64) -> Stmt {
    Stmt::new(
        "UPDATE baton_runs SET status = 'succeeded', updated_at = :now, finished_at = :now
         WHERE run_id = :run_id AND status = 'running'
           AND NOT EXISTS (SELECT 1 FROM baton_pages WHERE run_id = :run_id AND status <> 'done')
         RETURNING run_id",
        Params::new().with("run_id", run_id).with("now", now),
    )
}

/// After completion: chains still marked active (a hop in flight, a queued next hop) end.
pub fn end_chains(run_id: &str) -> Stmt {
    Stmt::new(
        "UPDATE baton_chains SET status = 'ended' WHERE run_id = :run_id AND status = 'active'",
        Params::new().with("run_id", run_id),
    )
}

/// A pausing run becomes paused once no chain is active.
pub fn settle_pause(run_id: &str, now: i64) -> Stmt {
    Stmt::new(
        "UPDATE baton_runs SET status = 'paused', updated_at = :now
         WHERE run_id = :run_id AND status = 'pausing'
           AND NOT EXISTS (SELECT 1 FROM baton_chains WHERE run_id = :run_id AND status = 'active')
         RETURNING run_id",
        Params::new().with("run_id", run_id).with("now", now),
    )
}

/// Runs that may need the sweeper: every run not in a final state.
pub fn open_runs() -> Stmt {
    Stmt::new(
        format!("SELECT {RUN_COLUMNS} FROM baton_runs WHERE status IN ('running', 'pausing') ORDER BY created_at"),
        Params::new(),
    )
}

// ---- chains -----------------------------------------------------------------------------------

/// The fork-proof hop start: compare-and-set `next_hop = hop -> hop + 1`. A duplicate delivery of
/// the same hop, or a stale one, changes nothing and gets no row back.
pub fn start_hop(run_id: &str, chain: i64, hop: i64, now: i64) -> Stmt {
    Stmt::new(
        "UPDATE baton_chains SET next_hop = :hop + 1, heartbeat_at = :now
         WHERE run_id = :run_id AND chain_no = :chain AND next_hop = :hop AND status = 'active'
         RETURNING chain_no",
        Params::new().with("run_id", run_id).with("chain", chain).with("hop", hop).with("now", now),
    )
}

pub fn heartbeat(run_id: &str, chain: i64, hop: i64, now: i64) -> Stmt {
    Stmt::new(
        "UPDATE baton_chains SET heartbeat_at = :now
         WHERE run_id = :run_id AND chain_no = :chain AND next_hop = :hop + 1",
        Params::new().with("run_id", run_id).with("chain", chain).with("hop", hop).with("now", now),
    )
}

/// Ends, parks or fails a chain, but only if `hop` is still its current hop (or, with
/// `hop = None`, whatever its hop) and it is in one of `from`.
pub fn set_chain_status(
    run_id: &str,
    chain: i64,
    hop: Option<i64>,
    from: &[&str],
    to: &str,
    reason: Option<&str>,
) -> Stmt {
    let mut params = Params::new()
        .with("run_id", run_id)
        .with("chain", chain)
        .with("to", to)
        .with("reason", reason.map(str::to_owned));
    let from_list = in_list(&mut params, "from", from.iter().map(|s| Value::from(*s)));
    let hop_cond = match hop {
        Some(h) => {
            params.push("hop", h);
            "AND next_hop = :hop + 1"
        }
        None => "",
    };
    Stmt::new(
        format!(
            "UPDATE baton_chains SET status = :to, reason = COALESCE(:reason, reason)
             WHERE run_id = :run_id AND chain_no = :chain AND status IN ({from_list}) {hop_cond}
             RETURNING chain_no, next_hop"
        ),
        params,
    )
}

/// Resume: every parked chain becomes active again and is returned with its checkpoint.
pub fn unpark_chains(run_id: &str, now: i64) -> Stmt {
    Stmt::new(
        "UPDATE baton_chains SET status = 'active', heartbeat_at = :now
         WHERE run_id = :run_id AND status = 'paused'
         RETURNING chain_no, next_hop",
        Params::new().with("run_id", run_id).with("now", now),
    )
}

/// Sweeper: active chains silent since `stale_before` are claimed for a restart (the heartbeat
/// moves, so a second sweeper finds nothing) and returned with their checkpoint.
pub fn claim_stale_chains(run_id: &str, stale_before: i64, now: i64) -> Stmt {
    Stmt::new(
        "UPDATE baton_chains SET heartbeat_at = :now, restarts = restarts + 1
         WHERE run_id = :run_id AND status = 'active' AND heartbeat_at < :stale_before
         RETURNING chain_no, next_hop",
        Params::new().with("run_id", run_id).with("stale_before", stale_before).with("now", now),
    )
}

/// Sweeper: when pages are claimable but no chain is active, revive one ended chain.
pub fn revive_chain(run_id: &str, now: i64) -> Stmt {
    Stmt::new(
        "UPDATE baton_chains SET status = 'active', heartbeat_at = :now, restarts = restarts + 1
         WHERE run_id = :run_id AND chain_no = (
             SELECT MIN(chain_no) FROM baton_chains WHERE run_id = :run_id AND status = 'ended')
           AND NOT EXISTS (SELECT 1 FROM baton_chains WHERE run_id = :run_id AND status = 'active')
           AND EXISTS (SELECT 1 FROM baton_pages WHERE run_id = :run_id
                       AND (status = 'pending' OR (status = 'leased' AND lease_expires_at < :now)))
         RETURNING chain_no, next_hop",
        Params::new().with("run_id", run_id).with("now", now),
    )
}

/// Sweeper, pausing runs: a chain that stopped answering is parked where it is.
pub fn park_stale_chains(run_id: &str, stale_before: i64) -> Stmt {
    Stmt::new(
        "UPDATE baton_chains SET status = 'paused'
         WHERE run_id = :run_id AND status = 'active' AND heartbeat_at < :stale_before
         RETURNING chain_no",
        Params::new().with("run_id", run_id).with("stale_before", stale_before),
    )
}

pub fn chains_of(run_id: &str) -> Stmt {
    Stmt::new(
        "SELECT chain_no, next_hop, status, reason, heartbeat_at, restarts FROM baton_chains
         WHERE run_id = :run_id ORDER BY chain_no",
        Params::new().with("run_id", run_id),
    )
}

// ---- pages ------------------------------------------------------------------------------------

const CLAIMABLE: &str = "(status = 'pending' OR (status = 'leased' AND lease_expires_at < :now))";

/// Claims one page for a hop, in one statement, only while the run is `running` and the hop is
/// still its chain's current hop (the kill switch and the fork guard). Chains prefer their own
/// stripe of pages (`page_no % chains = chain`) so concurrent claims rarely collide.
pub fn claim_page(run_id: &str, chain: i64, hop: i64, chains: i64, owner: &str, now: i64, lease_ms: i64) -> Stmt {
    Stmt::new(
        format!(
            "UPDATE baton_pages SET status = 'leased', lease_owner = :owner,
                 lease_expires_at = :lease_expires_at, attempts = attempts + 1
             WHERE run_id = :run_id
               AND page_no = (
                   SELECT page_no FROM baton_pages
                   WHERE run_id = :run_id AND {CLAIMABLE}
                   ORDER BY CASE WHEN page_no % :chains = :chain THEN 0 ELSE 1 END, page_no
                   LIMIT 1)
               AND {CLAIMABLE}
               AND EXISTS (SELECT 1 FROM baton_runs WHERE run_id = :run_id AND status = 'running')
               AND EXISTS (SELECT 1 FROM baton_chains WHERE run_id = :run_id AND chain_no = :chain
                           AND next_hop = :hop + 1 AND status = 'active')
             RETURNING page_no, lo, hi, items, attempts"
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

/// Why a claim found nothing: the run's status and the pages still open.
pub fn page_summary(run_id: &str, now: i64) -> Stmt {
    Stmt::new(
        format!(
            "SELECT r.status AS run_status,
                    (SELECT COUNT(*) FROM baton_pages WHERE run_id = :run_id AND {CLAIMABLE}) AS claimable,
                    (SELECT COUNT(*) FROM baton_pages WHERE run_id = :run_id AND status = 'leased'
                        AND lease_expires_at >= :now) AS leased,
                    (SELECT COUNT(*) FROM baton_pages WHERE run_id = :run_id AND status = 'done') AS done
             FROM baton_runs r WHERE r.run_id = :run_id"
        ),
        Params::new().with("run_id", run_id).with("now", now),
    )
}

/// Finishes (`done`) or releases (`pending`) a page, only while the caller holds its lease.
pub fn finish_page(run_id: &str, page_no: i64, owner: &str, done: bool) -> Stmt {
    let status = if done { "done" } else { "pending" };
    Stmt::new(
        format!(
            "UPDATE baton_pages SET status = '{status}', lease_owner = NULL, lease_expires_at = NULL
             WHERE run_id = :run_id AND page_no = :page_no AND status = 'leased' AND lease_owner = :owner
             RETURNING page_no"
        ),
        Params::new().with("run_id", run_id).with("page_no", page_no).with("owner", owner),
    )
}

pub fn page_progress(run_id: &str) -> Stmt {
    Stmt::new(
        "SELECT status, COUNT(*) AS n, CAST(COALESCE(SUM(items), 0) AS BIGINT) AS items FROM baton_pages
         WHERE run_id = :run_id GROUP BY status",
        Params::new().with("run_id", run_id),
    )
}

// ---- the job's source -------------------------------------------------------------------------

/// One row of the source, to validate columns and templates before a run starts (it names no
/// column, so a missing key column is reported by name, not as an SQL error). Then counts rows
/// and distinct keys, since a key that is not unique cannot page.
pub fn source_sample(source: &str, key: &str) -> Vec<Stmt> {
    vec![
        Stmt::new(format!("SELECT * FROM ({source}) AS src LIMIT 1"), Params::new()),
        Stmt::new(
            format!("SELECT COUNT(*) AS n, COUNT(DISTINCT src.{key}) AS d FROM ({source}) AS src"),
            Params::new(),
        ),
    ]
}

/// The `WHERE` condition of a page's key range over `src`, and its parameters.
pub fn range_condition(key: &str, lo: Option<Value>, hi: Value) -> (String, Params) {
    match lo {
        Some(lo) => (format!("src.{key} > :lo AND src.{key} <= :hi"), Params::new().with("lo", lo).with("hi", hi)),
        None => (format!("src.{key} <= :hi"), Params::new().with("hi", hi)),
    }
}

/// All rows of one page, in key order.
pub fn load_page(source: &str, key: &str, lo: Option<Value>, hi: Value) -> Stmt {
    let (cond, params) = range_condition(key, lo, hi);
    Stmt::new(format!("SELECT * FROM ({source}) AS src WHERE {cond} ORDER BY src.{key}"), params)
}

// ---- the delivery ledger ----------------------------------------------------------------------

/// Item claims before effects: one statement inserts a `claimed` row per key; keys already in
/// the ledger (done, failed, skipped, unknown, or claimed by someone else) are not returned.
pub fn claim_items(run_id: &str, page_no: i64, owner: &str, now: i64, keys: &[String]) -> Stmt {
    let mut params =
        Params::new().with("run_id", run_id).with("page_no", page_no).with("owner", owner).with("now", now);
    let rows: Vec<String> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            params.push(format!("k{i}"), k.as_str());
            format!("(:run_id, :k{i}, :page_no, 'claimed', :owner, :now)")
        })
        .collect();
    Stmt::new(
        format!(
            "INSERT INTO baton_ledger (run_id, item_key, page_no, state, claimed_by, updated_at)
             VALUES {}
             ON CONFLICT (run_id, item_key) DO NOTHING
             RETURNING item_key",
            rows.join(", ")
        ),
        params,
    )
}

/// A page re-offered after its lease expired may hold items its crashed owner claimed and may
/// or may not have processed. At-most-once: they become `unknown`, never retried. At-least-once:
/// the new owner takes the claims over and processes them again.
pub fn settle_stale_claims(run_id: &str, page_no: i64, owner: &str, resend: bool, now: i64) -> Stmt {
    let params = Params::new().with("run_id", run_id).with("page_no", page_no).with("owner", owner).with("now", now);
    let set = if resend {
        "claimed_by = :owner"
    } else {
        "state = 'unknown', reason = 'the hop that claimed it stopped before recording a result'"
    };
    Stmt::new(
        format!(
            "UPDATE baton_ledger SET {set}, updated_at = :now
             WHERE run_id = :run_id AND page_no = :page_no AND state = 'claimed' AND claimed_by <> :owner
             RETURNING item_key"
        ),
        params,
    )
}

/// Results written back in one statement: `(key, state, reason)` for each processed item, only
/// over rows this owner still holds as `claimed`.
pub fn record_results(run_id: &str, owner: &str, now: i64, results: &[(String, &str, Option<String>)]) -> Stmt {
    let mut params = Params::new().with("run_id", run_id).with("owner", owner).with("now", now);
    let rows: Vec<String> = results
        .iter()
        .enumerate()
        .map(|(i, (key, state, reason))| {
            params.push(format!("k{i}"), key.as_str());
            params.push(format!("s{i}"), *state);
            params.push(format!("r{i}"), reason.clone().unwrap_or_default());
            format!("(:k{i}, :s{i}, :r{i})")
        })
        .collect();
    Stmt::new(
        format!(
            "UPDATE baton_ledger SET state = v.column2, reason = NULLIF(v.column3, ''), updated_at = :now
             FROM (VALUES {}) AS v
             WHERE baton_ledger.run_id = :run_id AND baton_ledger.item_key = v.column1
               AND baton_ledger.claimed_by = :owner AND baton_ledger.state = 'claimed'",
            rows.join(", ")
        ),
        params,
    )
}

/// Claims this owner holds but never acted on (the time budget ran out): definitely not sent,
/// so they are dropped and the page will claim them again.
pub fn release_claims(run_id: &str, page_no: i64, owner: &str, keys: &[String]) -> Stmt {
    let mut params = Params::new().with("run_id", run_id).with("page_no", page_no).with("owner", owner);
    let list = in_list(&mut params, "k", keys.iter().map(|k| Value::from(k.as_str())));
    Stmt::new(
        format!(
            "DELETE FROM baton_ledger
             WHERE run_id = :run_id AND page_no = :page_no AND claimed_by = :owner AND state = 'claimed'
               AND item_key IN ({list})"
        ),
        params,
    )
}

pub fn ledger_counts(run_id: &str) -> Stmt {
    Stmt::new(
        "SELECT state, COUNT(*) AS n FROM baton_ledger WHERE run_id = :run_id GROUP BY state",
        Params::new().with("run_id", run_id),
    )
}

/// The failure threshold's count: failures since the run last resumed.
pub fn failures_since_baseline(run_id: &str) -> Stmt {
    Stmt::new(
        "SELECT (SELECT COUNT(*) FROM baton_ledger WHERE run_id = :run_id AND state = 'failed')
                - r.failure_baseline AS failures, r.total_items AS total
         FROM baton_runs r WHERE r.run_id = :run_id",
        Params::new().with("run_id", run_id),
    )
}

pub fn ledger_items(run_id: &str, state: &str, limit: i64) -> Stmt {
    Stmt::new(
        "SELECT item_key, state, reason FROM baton_ledger
         WHERE run_id = :run_id AND state = :state ORDER BY item_key LIMIT :limit",
        Params::new().with("run_id", run_id).with("state", state).with("limit", limit),
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
