//! The read model behind `baton report`: a run's status, every hop (when it ran, how it ended,
//! its pages, restarts and duplicates), every page's last claim, and items settled over time.
//! Three statements whatever the run's size, from rows the hops already write.

use serde::Serialize;

use super::run::RunStatus;
use super::{Engine, EngineError};
use crate::sql::{SqlError, statements as st};

/// How a run went, over time.
#[derive(Debug, Clone, Serialize)]
pub struct Timeline {
    pub status: RunStatus,
    pub hops: Vec<HopSpan>,
    pub pages: Vec<PageSpan>,
    /// Items settled per [`Self::bucket_ms`], from the run's start.
    pub settled: Vec<SettledBucket>,
    pub bucket_ms: i64,
    /// When the timeline was read (its right edge while the run is live).
    pub now_ms: i64,
}

/// One invocation of a hop.
#[derive(Debug, Clone, Serialize)]
pub struct HopSpan {
    pub chain: i64,
    pub hop: i64,
    pub started_at_ms: i64,
    /// `None`: it never recorded an end (killed at its deadline, crashed, or still running).
    pub ended_at_ms: Option<i64>,
    /// continued, ended, completed, parked, stopped, failed, error, duplicate; `None` with no end.
    pub outcome: Option<String>,
    pub pages: i64,
    /// The chain's restart count when the hop started: a rise means the sweeper restarted it.
    pub restarts: i64,
    pub trace_id: Option<String>,
}

/// A page's last claim.
#[derive(Debug, Clone, Serialize)]
pub struct PageSpan {
    pub page: i64,
    /// The chain and hop that held it last (from its lease owner, `c{chain}h{hop}.{token}`).
    pub chain: Option<i64>,
    pub hop: Option<i64>,
    pub claimed_at_ms: i64,
    pub finished_at_ms: Option<i64>,
    pub status: String,
    pub attempts: i64,
    pub items: i64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SettledBucket {
    pub at_ms: i64,
    pub done: i64,
    pub failed: i64,
    pub skipped: i64,
    pub unknown: i64,
}

impl Engine {
    /// The latest run's timeline, or `run_id`'s; `None` when there is no run.
    pub async fn timeline(&self, run_id: Option<&str>) -> Result<Option<Timeline>, EngineError> {
        let Some(status) = self.status(run_id).await? else { return Ok(None) };
        let id = status.run_id.clone();
        let now_ms = self.now_ms();
        let end = status.finished_at_ms.unwrap_or(now_ms);
        // About 80 buckets over the run (rounded to 10 ms), so a short run has a shape too.
        let bucket_ms = ((end - status.created_at_ms) / 80 / 10 * 10).max(10);
        let hops = self.hop_spans(&id).await?;
        let pages = self.page_spans(&id).await?;
        let settled = self.settled(&id, bucket_ms).await?;
        Ok(Some(Timeline { status, hops, pages, settled, bucket_ms, now_ms }))
    }

    /// Every hop of the run, read in keyset pages (one answer stays small on the Data API),
    /// in time order per chain.
    async fn hop_spans(&self, run_id: &str) -> Result<Vec<HopSpan>, SqlError> {
        let (mut hops, mut after) = (Vec::new(), None::<(i64, i64, String)>);
        loop {
            let key = after.as_ref().map(|(c, h, t)| (*c, *h, t.as_str()));
            let rows = self.sql(st::hop_timeline(run_id, key)).await?;
            for r in rows.records() {
                after = Some((r.int("chain_no")?, r.int("hop")?, r.text("token")?.unwrap_or_default()));
                hops.push(HopSpan {
                    chain: r.int("chain_no")?,
                    hop: r.int("hop")?,
                    started_at_ms: r.int("started_at")?,
                    ended_at_ms: r.opt_int("ended_at")?,
                    outcome: r.text("outcome")?,
                    pages: r.int("pages")?,
                    restarts: r.int("restarts")?,
                    trace_id: r.text("trace")?.as_deref().and_then(super::trace::trace_id),
                });
            }
            if (rows.rows.len() as i64) < st::TIMELINE_ROWS {
                break;
            }
        }
        hops.sort_by_key(|h| (h.chain, h.started_at_ms, h.hop));
        Ok(hops)
    }

    /// Every page's last claim, read in keyset pages.
    async fn page_spans(&self, run_id: &str) -> Result<Vec<PageSpan>, SqlError> {
        let (mut pages, mut after) = (Vec::new(), 0);
        loop {
            let rows = self.sql(st::page_timeline(run_id, after)).await?;
            for r in rows.records() {
                let owner = r.text("lease_owner")?.unwrap_or_default();
                let (chain, hop) = owner_of(&owner);
                after = r.int("page_no")?;
                pages.push(PageSpan {
                    page: after,
                    chain,
                    hop,
                    claimed_at_ms: r.int("claimed_at")?,
                    finished_at_ms: r.opt_int("finished_at")?,
                    status: r.text("status")?.unwrap_or_default(),
                    attempts: r.int("attempts")?,
                    items: r.int("items")?,
                });
            }
            if (rows.rows.len() as i64) < st::TIMELINE_ROWS {
                break;
            }
        }
        Ok(pages)
    }

    async fn settled(&self, run_id: &str, bucket_ms: i64) -> Result<Vec<SettledBucket>, SqlError> {
        let mut buckets: Vec<SettledBucket> = Vec::new();
        for r in self.sql(st::settled_over_time(run_id, bucket_ms)).await?.records() {
            let at_ms = r.int("bucket")? * bucket_ms;
            if buckets.last().is_none_or(|b| b.at_ms != at_ms) {
                buckets.push(SettledBucket { at_ms, ..Default::default() });
            }
            let bucket = buckets.last_mut().expect("pushed");
            let n = r.int("n")?;
            match r.text("state")?.as_deref() {
                Some("done") => bucket.done += n,
                Some("failed") => bucket.failed += n,
                Some("skipped") => bucket.skipped += n,
                Some("unknown") => bucket.unknown += n,
                _ => {}
            }
        }
        Ok(buckets)
    }
}

/// `c{chain}h{hop}.{token}` → (chain, hop).
fn owner_of(owner: &str) -> (Option<i64>, Option<i64>) {
    let head = owner.split('.').next().unwrap_or_default();
    let Some(rest) = head.strip_prefix('c') else { return (None, None) };
    let Some((chain, hop)) = rest.split_once('h') else { return (None, None) };
    (chain.parse().ok(), hop.parse().ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_lease_owner_names_its_chain_and_hop() {
        assert_eq!(super::owner_of("c3h17.0123456789ab"), (Some(3), Some(17)));
        assert_eq!(super::owner_of("A"), (None, None));
        assert_eq!(super::owner_of("cxhy.z"), (None, None));
    }
}
