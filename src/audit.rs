//! The product's promise, checked after a run: nobody mailed twice, every deliverable recipient
//! mailed once unless the ledger says `unknown` (sent at most once, never retried) or failed
//! the key on purpose (a second source row with the same key appeared mid-run), nobody with an
//! undeliverable address mailed at all, and nobody suppressed before the run started mailed
//! (read from the suppression list itself, not from the ledger's account of it). `baton demo`
//! and the test suite use this one check.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::engine::{Engine, EngineError};

/// What a run was expected to mail: one recipient of the source.
#[derive(Debug, Clone)]
pub struct Recipient {
    /// The item's ledger key.
    pub key: String,
    /// The address as the source holds it (`None`: NULL).
    pub address: Option<String>,
}

/// What the check found. [`ExactlyOnce::holds`] is the verdict.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ExactlyOnce {
    /// Recipients with a deliverable address.
    pub deliverable: usize,
    /// Addresses mailed more than once, sorted.
    pub duplicated: Vec<String>,
    /// Keys of deliverable recipients never mailed and not accounted for by the ledger.
    pub missed: Vec<String>,
    /// Addresses mailed although they are not deliverable.
    pub undeliverable_mailed: Vec<String>,
    /// Keys the ledger holds as `unknown`.
    pub unknown: usize,
    /// Deliverable recipients suppressed (for the run's job or every job) before the run began.
    pub suppressed: usize,
    /// Addresses mailed although they were suppressed before the run began.
    pub suppressed_mailed: Vec<String>,
}

impl ExactlyOnce {
    pub fn holds(&self) -> bool {
        self.duplicated.is_empty()
            && self.missed.is_empty()
            && self.undeliverable_mailed.is_empty()
            && self.suppressed_mailed.is_empty()
    }
}

/// Reason prefix of items failed because their key turned out to be duplicated mid-run.
const DUPLICATE_KEY: &str = "duplicate key";

/// Checks `sent` (the `To` address of every message that left, once per message) against
/// `recipients` and the run's ledger. Whether an address is deliverable follows the run's own
/// job (`smtputf8`). With `sent` unknown (`None`: mail went to a provider, which keeps no copy
/// here) only the counts are filled in and nothing is called missed.
pub async fn exactly_once(
    engine: &Engine,
    run_id: &str,
    recipients: impl IntoIterator<Item = Recipient>,
    sent: Option<&[String]>,
) -> Result<ExactlyOnce, EngineError> {
    let run = engine.load_run(run_id).await?;
    let smtputf8 = run.job_config.newsletter.as_ref().is_some_and(|n| n.smtputf8);
    let unknown: HashSet<String> =
        engine.items_in_state(run_id, "unknown", i64::MAX).await?.into_iter().map(|(k, _)| k).collect();
    let excused: HashSet<String> = engine
        .items_in_state(run_id, "failed", i64::MAX)
        .await?
        .into_iter()
        .filter(|(_, reason)| reason.as_deref().is_some_and(|r| r.starts_with(DUPLICATE_KEY)))
        .map(|(k, _)| k)
        .collect();
    // Suppressed before the run and in force since: must not be mailed (and is not missed).
    // Suppressed or lifted since the run began: may or may not have been mailed (it depends on
    // when its page loaded), so neither is wrong. Lifted before the run: an ordinary recipient.
    let mut suppressed: HashMap<String, bool> = HashMap::new();
    engine
        .each_suppression(true, |s| {
            if s.scope != crate::engine::suppression::EVERY_JOB && s.scope != run.job {
                return Ok::<_, EngineError>(());
            }
            let strict = s.created_at_ms <= run.created_at && s.removed_at_ms.is_none();
            let changed_during =
                s.created_at_ms > run.created_at || s.removed_at_ms.is_some_and(|r| r > run.created_at);
            if strict || changed_during {
                *suppressed.entry(s.address.clone()).or_default() |= strict;
            }
            Ok(())
        })
        .await?;
    let mut per_address: HashMap<&str, usize> = HashMap::new();
    for a in sent.unwrap_or_default() {
        *per_address.entry(a.as_str()).or_default() += 1;
    }
    let mut found = ExactlyOnce { unknown: unknown.len(), ..ExactlyOnce::default() };
    found.duplicated = per_address.iter().filter(|(_, n)| **n > 1).map(|(a, _)| a.to_string()).collect();
    found.duplicated.sort();
    for Recipient { key, address } in recipients {
        let Some(raw) = address else { continue };
        match crate::mail::deliverable(&raw, smtputf8) {
            Ok(address) => {
                found.deliverable += 1;
                let mailed = per_address.contains_key(address.as_str());
                let keys = crate::mail::suppression_keys(&raw).unwrap_or_default();
                match keys.iter().find_map(|k| suppressed.get(k)) {
                    Some(true) => {
                        found.suppressed += 1;
                        if mailed {
                            found.suppressed_mailed.push(address);
                        }
                    }
                    Some(false) => {}
                    None if sent.is_some() && !mailed && !unknown.contains(&key) && !excused.contains(&key) => {
                        found.missed.push(key);
                    }
                    None => {}
                }
            }
            Err(_) if per_address.contains_key(raw.trim()) => found.undeliverable_mailed.push(raw),
            Err(_) => {}
        }
    }
    Ok(found)
}
