//! Versioned schema migrations for baton's state tables (`baton_*`), applied automatically at
//! start (in Lambda, at every cold start: many sandboxes may migrate one fresh database at once).
//!
//! Each version runs in one transaction whose *first* statement inserts its row in
//! `baton_schema_migrations` (a plain `INSERT`, no `ON CONFLICT`). Two processes applying the
//! same version therefore serialise on that row's unique key before either runs any DDL: the
//! second waits for the first to commit, then fails with a unique violation, rolls back, finds
//! the version applied and moves on. (Without this, concurrent `CREATE TABLE IF NOT EXISTS` on
//! PostgreSQL fail with `23505` on `pg_type_typname_nsp_index`.) The versions table itself is
//! created with `IF NOT EXISTS`, retried when that very race hits it.

use super::{Params, SqlError, SqlStore, Stmt};

/// Each entry is one schema version: its statements, in order. Append only; never edit.
pub const MIGRATIONS: &[&[&str]] = &[
    &[
        "CREATE TABLE IF NOT EXISTS baton_runs (
        run_id TEXT PRIMARY KEY,
        job TEXT NOT NULL,
        run_key TEXT NOT NULL,
        status TEXT NOT NULL,
        reason TEXT,
        job_config TEXT NOT NULL,
        key_type TEXT NOT NULL,
        chains BIGINT NOT NULL DEFAULT 0,
        total_items BIGINT NOT NULL DEFAULT 0,
        total_pages BIGINT NOT NULL DEFAULT 0,
        max_hops BIGINT NOT NULL DEFAULT 0,
        failure_baseline BIGINT NOT NULL DEFAULT 0,
        deadline_at BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        finished_at BIGINT,
        UNIQUE (job, run_key)
    )",
        "CREATE TABLE IF NOT EXISTS baton_pages (
        run_id TEXT NOT NULL,
        page_no BIGINT NOT NULL,
        lo TEXT,
        hi TEXT NOT NULL,
        items BIGINT NOT NULL,
        status TEXT NOT NULL,
        lease_owner TEXT,
        lease_expires_at BIGINT,
        attempts BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (run_id, page_no)
    )",
        "CREATE INDEX IF NOT EXISTS baton_pages_claimable ON baton_pages (run_id, status, page_no)",
        "CREATE TABLE IF NOT EXISTS baton_chains (
        run_id TEXT NOT NULL,
        chain_no BIGINT NOT NULL,
        next_hop BIGINT NOT NULL,
        status TEXT NOT NULL,
        reason TEXT,
        heartbeat_at BIGINT NOT NULL,
        restarts BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (run_id, chain_no)
    )",
        "CREATE TABLE IF NOT EXISTS baton_ledger (
        run_id TEXT NOT NULL,
        item_key TEXT NOT NULL,
        page_no BIGINT NOT NULL,
        state TEXT NOT NULL,
        reason TEXT,
        claimed_by TEXT NOT NULL,
        updated_at BIGINT NOT NULL,
        PRIMARY KEY (run_id, item_key)
    )",
        "CREATE INDEX IF NOT EXISTS baton_ledger_page ON baton_ledger (run_id, page_no, state)",
        "CREATE INDEX IF NOT EXISTS baton_ledger_state ON baton_ledger (run_id, state)",
    ],
    &[
        // The invocation that moved a chain's `next_hop` last, so a re-run of its own hop start
        // (response lost) is told apart from a duplicate delivery.
        "ALTER TABLE baton_chains ADD COLUMN hop_token TEXT",
        // The hop numbers at which the sweeper restarted the chain (comma-separated), so `status`
        // can tell a chain whose hops keep being lost at a fixed stride (Lambda's loop detection).
        "ALTER TABLE baton_chains ADD COLUMN restart_hops TEXT",
        // The sweeper or resume call that last (re)activated the chain, and the hop or sweep that
        // completed the run: a re-run of their statement (answer lost) finds its own change again.
        "ALTER TABLE baton_chains ADD COLUMN restart_token TEXT",
        "ALTER TABLE baton_runs ADD COLUMN completed_by TEXT",
        // Source rows left out of the run because their key is NULL (reported by `status`).
        "ALTER TABLE baton_runs ADD COLUMN null_keys BIGINT NOT NULL DEFAULT 0",
    ],
    &[
        // When the chain may send next (epoch ms) under the run's send rate: the pacing carries
        // over from hop to hop, so a rate holds over any window, not per invocation.
        "ALTER TABLE baton_chains ADD COLUMN send_after BIGINT",
    ],
    &[
        // The last thing that went wrong with the chain (a hop that failed with an error, a
        // restart by the sweeper), for `baton status` to show next to a stuck chain.
        "ALTER TABLE baton_chains ADD COLUMN last_error TEXT",
    ],
    &[
        // W3C `traceparent`s: the run's start span, linked from every hop, and each chain's last
        // hop, linked from the hop a restart, resume or `tune` invokes (and shown by `status`).
        "ALTER TABLE baton_runs ADD COLUMN start_trace TEXT",
        "ALTER TABLE baton_chains ADD COLUMN last_trace TEXT",
    ],
    &[
        // One row per hop that started (and per duplicate delivery), for `baton report`: when it
        // ran, how it ended (NULL: it was killed, or its end could not be written), its pages.
        "CREATE TABLE IF NOT EXISTS baton_hops (
        run_id TEXT NOT NULL,
        chain_no BIGINT NOT NULL,
        hop BIGINT NOT NULL,
        token TEXT NOT NULL,
        started_at BIGINT NOT NULL,
        ended_at BIGINT,
        outcome TEXT,
        pages BIGINT NOT NULL DEFAULT 0,
        restarts BIGINT NOT NULL DEFAULT 0,
        trace TEXT,
        PRIMARY KEY (run_id, chain_no, hop, token)
    )",
        // When each page's last claim began and ended, written by the claim and finish
        // statements a page already makes.
        "ALTER TABLE baton_pages ADD COLUMN claimed_at BIGINT",
        "ALTER TABLE baton_pages ADD COLUMN finished_at BIGINT",
    ],
    &[
        // The suppression list every newsletter run honours in the statement that loads a page:
        // one row per normalised address and scope (a job's name, or `*` for every job); a
        // lifted one keeps its row with `removed_at`, so replayed older events cannot undo it.
        "CREATE TABLE IF NOT EXISTS baton_suppressions (
        address TEXT NOT NULL,
        scope TEXT NOT NULL,
        reason TEXT NOT NULL,
        source TEXT NOT NULL,
        detail TEXT,
        created_at BIGINT NOT NULL,
        removed_at BIGINT,
        PRIMARY KEY (address, scope)
    )",
        // SES events (deliveries, bounces, complaints), one row per event and recipient: replays
        // insert nothing, per-run counts and transient-bounce thresholds are counted from here.
        // `at` is the event's own time (SES's clock), `recorded_at` when baton first saw it,
        // `applied_at` when its effect on the suppression list was made: a replay of an event
        // already applied changes nothing, one whose first delivery failed half-way finishes it.
        "CREATE TABLE IF NOT EXISTS baton_mail_events (
        event_key TEXT NOT NULL,
        address TEXT NOT NULL,
        kind TEXT NOT NULL,
        run_id TEXT,
        job TEXT,
        detail TEXT,
        at BIGINT NOT NULL,
        recorded_at BIGINT NOT NULL,
        applied_at BIGINT,
        PRIMARY KEY (event_key, address)
    )",
        "CREATE INDEX IF NOT EXISTS baton_mail_events_by_run ON baton_mail_events (run_id, kind)",
        "CREATE INDEX IF NOT EXISTS baton_mail_events_by_address ON baton_mail_events (address, kind, at)",
    ],
];

const CREATE_VERSIONS: &str = "CREATE TABLE IF NOT EXISTS baton_schema_migrations (
    version BIGINT PRIMARY KEY,
    applied_at BIGINT NOT NULL
)";

async fn applied_versions(store: &dyn SqlStore) -> Result<Vec<i64>, SqlError> {
    let rows = store
        .query(Stmt::named("applied_versions", "SELECT version FROM baton_schema_migrations", Params::new()))
        .await?;
    Ok(rows.rows.iter().filter_map(|r| r[0].as_i64()).collect())
}

/// The highest schema version applied to `store` (0 for none).
pub async fn store_version(store: &dyn SqlStore) -> Result<i64, SqlError> {
    Ok(applied_versions(store).await?.into_iter().max().unwrap_or(0))
}

/// The schema version this binary migrates to.
pub fn latest_version() -> i64 {
    MIGRATIONS.len() as i64
}

/// Applies every migration not yet recorded. Returns the versions applied now (by this call;
/// versions another process applied meanwhile are not included).
pub async fn migrate(store: &dyn SqlStore, now_ms: i64) -> Result<Vec<i64>, SqlError> {
    let mut attempt = 0;
    while let Err(e) = store.query(Stmt::named("create_schema_versions", CREATE_VERSIONS, Params::new())).await {
        // Another process is creating the table this very moment (PostgreSQL reports the race
        // as a unique violation); once it committed, `IF NOT EXISTS` sees the table.
        attempt += 1;
        if attempt >= 5 {
            return Err(e);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20 * attempt)).await;
    }
    let applied = applied_versions(store).await?;
    let mut now_applied = Vec::new();
    for (i, steps) in MIGRATIONS.iter().enumerate() {
        let version = i as i64 + 1;
        if applied.contains(&version) {
            continue;
        }
        let mut stmts = vec![Stmt::named(
            "record_schema_version",
            "INSERT INTO baton_schema_migrations (version, applied_at) VALUES (:version, :now)",
            Params::new().with("version", version).with("now", now_ms),
        )];
        stmts.extend(steps.iter().map(|s| Stmt::named("migration_step", *s, Params::new())));
        if let Err(e) = store.transaction(stmts).await {
            if applied_versions(store).await?.contains(&version) {
                continue; // another process applied it first
            }
            return Err(e);
        }
        now_applied.push(version);
    }
    Ok(now_applied)
}
