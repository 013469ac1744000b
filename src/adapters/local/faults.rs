//! Injected faults for the local Lambda model, the outbox and the SQL port, and the
//! deterministic dice they are decided with.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

use crate::sql::{Rows, SqlError, SqlStore, Stmt};

/// Probabilities (0..=1) of each fault.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Faults {
    /// A hop event is delivered twice.
    pub duplicate_hop: f64,
    /// A hop event is accepted and then lost.
    pub drop_hop: f64,
    /// A hop's sandbox dies at a random moment of its run (mid-page, typically).
    pub crash_hop: f64,
    /// A hop event waits up to `max_delay` in the queue before delivery.
    pub delay_hop: f64,
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// A send fails before the message is accepted.
    pub mail_transient: f64,
    /// A send is refused as over the rate.
    pub mail_throttle: f64,
    /// A send is accepted but the caller sees a timeout.
    pub mail_ambiguous: f64,
    /// A SQL statement fails before it commits (it never ran).
    pub sql_fail: f64,
    /// A SQL statement commits and its response is lost (a Data API 5xx or timeout, a dropped
    /// connection): the caller sees an error for something that happened.
    pub sql_lost: f64,
    /// Each invocation's clock is off by up to this much, either way.
    #[serde(with = "humantime_serde")]
    pub clock_skew: Duration,
    /// An invocation gets a deadline three times the hop timeout (a function timeout longer
    /// than `hop_timeout`): unless the hop keeps to `hop_timeout` itself, it outlives its lease.
    pub long_sandbox: f64,
}

impl Faults {
    /// `--chaos`: the documented default rates.
    pub fn chaos() -> Self {
        Faults {
            duplicate_hop: 0.02,
            drop_hop: 0.01,
            crash_hop: 0.01,
            delay_hop: 0.05,
            max_delay: Duration::from_millis(300),
            mail_transient: 0.02,
            mail_throttle: 0.01,
            mail_ambiguous: 0.002,
            sql_fail: 0.003,
            sql_lost: 0.003,
            clock_skew: Duration::from_millis(100),
            long_sandbox: 0.05,
        }
    }
}

/// What the SQL faults did, per statement name.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SqlFaultCounts {
    pub failed_before_commit: u64,
    pub response_lost: u64,
    pub by_statement: BTreeMap<String, (u64, u64)>,
}

/// The SQL port with injected faults. Per statement, decided by the dice from its name and how
/// often that name ran: *failed before commit* (the statement never ran, the caller sees an
/// error) or *committed, response lost* (it ran, the caller sees an error). Both are what the
/// RDS Data API produces (5xx, timeouts, dropped connections); the engine must be safe under
/// either for every statement it issues.
pub struct FaultyStore {
    inner: Arc<dyn SqlStore>,
    faults: Faults,
    seed: u64,
    seen: Mutex<HashMap<&'static str, u64>>,
    counts: Mutex<SqlFaultCounts>,
}

/// How a SQL statement fails, if it does: it never ran, or it committed and its answer was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqlFault {
    BeforeCommit,
    ResponseLost,
}

impl SqlFault {
    /// Runs `stmt` on `store` as `fault` says: normally, not at all (an error), or to its commit
    /// followed by an error (the answer lost).
    pub async fn query(fault: Option<SqlFault>, store: &dyn SqlStore, stmt: Stmt) -> Result<Rows, SqlError> {
        let name = stmt.name;
        match fault {
            None => store.query(stmt).await,
            Some(SqlFault::BeforeCommit) => Err(injected("connection lost before the statement ran", name)),
            Some(SqlFault::ResponseLost) => {
                store.query(stmt).await?;
                Err(injected("the statement committed, its response was lost", name))
            }
        }
    }

    /// The same for a transaction (named after its first statement).
    pub async fn transaction(
        fault: Option<SqlFault>,
        store: &dyn SqlStore,
        stmts: Vec<Stmt>,
    ) -> Result<Vec<Rows>, SqlError> {
        let name = stmts.first().map(|s| s.name).unwrap_or("transaction");
        match fault {
            None => store.transaction(stmts).await,
            Some(SqlFault::BeforeCommit) => Err(injected("connection lost before the transaction ran", name)),
            Some(SqlFault::ResponseLost) => {
                store.transaction(stmts).await?;
                Err(injected("the transaction committed, its response was lost", name))
            }
        }
    }
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn SqlStore>, faults: Faults, seed: u64) -> Self {
        Self { inner, faults, seed, seen: Mutex::default(), counts: Mutex::default() }
    }

    pub fn counts(&self) -> SqlFaultCounts {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn roll(&self, name: &'static str) -> Option<SqlFault> {
        if self.faults.sql_fail <= 0.0 && self.faults.sql_lost <= 0.0 {
            return None;
        }
        let n = {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            let n = seen.entry(name).or_default();
            *n += 1;
            *n
        };
        let r = dice(self.seed, &[b"sql", name.as_bytes(), &n.to_le_bytes()]);
        let fault = if r < self.faults.sql_fail {
            SqlFault::BeforeCommit
        } else if r < self.faults.sql_fail + self.faults.sql_lost {
            SqlFault::ResponseLost
        } else {
            return None;
        };
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let entry = counts.by_statement.entry(name.to_owned()).or_default();
        match fault {
            SqlFault::BeforeCommit => entry.0 += 1,
            SqlFault::ResponseLost => entry.1 += 1,
        }
        match fault {
            SqlFault::BeforeCommit => counts.failed_before_commit += 1,
            SqlFault::ResponseLost => counts.response_lost += 1,
        }
        Some(fault)
    }
}

fn injected(what: &str, name: &str) -> SqlError {
    SqlError::transient(format!("injected fault: {what} ({name})"))
}

#[async_trait]
impl SqlStore for FaultyStore {
    async fn query(&self, stmt: Stmt) -> Result<Rows, SqlError> {
        SqlFault::query(self.roll(stmt.name), self.inner.as_ref(), stmt).await
    }

    async fn transaction(&self, stmts: Vec<Stmt>) -> Result<Vec<Rows>, SqlError> {
        let fault = self.roll(stmts.first().map(|s| s.name).unwrap_or("transaction"));
        SqlFault::transaction(fault, self.inner.as_ref(), stmts).await
    }

    fn dynamic_types(&self) -> bool {
        self.inner.dynamic_types()
    }
}

/// A uniform number in `[0, 1)` fixed by the seed and the parts (FNV-1a, then SplitMix64).
pub fn dice(seed: u64, parts: &[&[u8]]) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for part in parts {
        for b in part.iter().chain(&[0xff]) {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
    let mut z = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::dice;

    #[test]
    fn dice_are_deterministic_and_roughly_uniform() {
        assert_eq!(dice(7, &[b"a", b"1"]), dice(7, &[b"a", b"1"]));
        assert_ne!(dice(7, &[b"a", b"1"]), dice(8, &[b"a", b"1"]));
        let n: u64 = 20_000;
        let below: usize = (0..n).filter(|i| dice(1, &[&i.to_le_bytes()]) < 0.1).count();
        assert!((1_700..2_300).contains(&below), "{below}");
    }
}
