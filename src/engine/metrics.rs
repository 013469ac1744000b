//! What one invocation did, counted as it happens: pages, items by outcome, throttled sends, SQL
//! statements. Whoever wants the figures runs the invocation inside [`measured`] (Lambda mode
//! turns them into one CloudWatch Embedded Metric Format line per hop); outside it, counting
//! costs nothing. The counters are task-local, so concurrent hops in one process (the local
//! runtime) never mix their figures.

use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

tokio::task_local! {
    static CURRENT: Arc<Counters>;
}

#[derive(Default)]
pub(crate) struct Counters {
    job: Mutex<Option<String>>,
    pages: AtomicU64,
    done: AtomicU64,
    failed: AtomicU64,
    skipped: AtomicU64,
    unknown: AtomicU64,
    throttles: AtomicU64,
    sql_statements: AtomicU64,
}

/// One invocation's figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct HopMetrics {
    /// The job the invocation worked for, once it knew.
    pub job: Option<String>,
    pub pages: u64,
    pub items_done: u64,
    pub items_failed: u64,
    pub items_skipped: u64,
    pub items_unknown: u64,
    /// Sends the provider throttled (each retried with backoff).
    pub throttles: u64,
    /// Statements issued, re-runs included.
    pub sql_statements: u64,
}

/// Runs `f`, counting what it does.
pub async fn measured<F: Future>(f: F) -> (F::Output, HopMetrics) {
    let counters = Arc::new(Counters::default());
    let out = CURRENT.scope(counters.clone(), f).await;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let metrics = HopMetrics {
        job: counters.job.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        pages: get(&counters.pages),
        items_done: get(&counters.done),
        items_failed: get(&counters.failed),
        items_skipped: get(&counters.skipped),
        items_unknown: get(&counters.unknown),
        throttles: get(&counters.throttles),
        sql_statements: get(&counters.sql_statements),
    };
    (out, metrics)
}

fn with(f: impl FnOnce(&Counters)) {
    let _ = CURRENT.try_with(|c| f(c));
}

pub(crate) fn job(name: &str) {
    with(|c| *c.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(name.to_owned()));
}

pub(crate) fn page() {
    with(|c| {
        c.pages.fetch_add(1, Ordering::Relaxed);
    });
}

pub(crate) fn sql_statement() {
    with(|c| {
        c.sql_statements.fetch_add(1, Ordering::Relaxed);
    });
}

/// A send the provider throttled (counted by the kind that sends).
pub fn throttled() {
    with(|c| {
        c.throttles.fetch_add(1, Ordering::Relaxed);
    });
}

/// Items recorded in the ledger, by state.
pub(crate) fn recorded(state: super::state::ItemState) {
    use super::state::ItemState;
    with(|c| {
        let counter = match state {
            ItemState::Done => &c.done,
            ItemState::Failed => &c.failed,
            ItemState::Skipped => &c.skipped,
            ItemState::Unknown => &c.unknown,
            _ => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    });
}
