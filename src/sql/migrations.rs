//! Versioned schema migrations for baton's state tables (`baton_*`), applied automatically at
//! start. Each version runs in one transaction together with its row in
//! `baton_schema_migrations`; every DDL statement is `IF NOT EXISTS`, so two processes migrating
//! at once, or one migrating twice, end in the same state.

use super::{Params, SqlError, SqlStore, Stmt};

/// Each entry is one schema version: its statements, in order. Append only; never edit.
pub const MIGRATIONS: &[&[&str]] = &[&[
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
]];

const CREATE_VERSIONS: &str = "CREATE TABLE IF NOT EXISTS baton_schema_migrations (
    version BIGINT PRIMARY KEY,
    applied_at BIGINT NOT NULL
)";

/// Applies every migration not yet recorded. Returns the versions applied now.
pub async fn migrate(store: &dyn SqlStore, now_ms: i64) -> Result<Vec<i64>, SqlError> {
    store.query(Stmt::new(CREATE_VERSIONS, Params::new())).await?;
    let applied = store.query(Stmt::new("SELECT version FROM baton_schema_migrations", Params::new())).await?;
    let applied: Vec<i64> = applied.rows.iter().filter_map(|r| r[0].as_i64()).collect();
    let mut now_applied = Vec::new();
    for (i, steps) in MIGRATIONS.iter().enumerate() {
        let version = i as i64 + 1;
        if applied.contains(&version) {
            continue;
        }
        let mut stmts: Vec<Stmt> = steps.iter().map(|s| Stmt::new(*s, Params::new())).collect();
        stmts.push(Stmt::new(
            "INSERT INTO baton_schema_migrations (version, applied_at) VALUES (:version, :now)
             ON CONFLICT (version) DO NOTHING",
            Params::new().with("version", version).with("now", now_ms),
        ));
        store.transaction(stmts).await?;
        now_applied.push(version);
    }
    Ok(now_applied)
}
