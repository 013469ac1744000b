//! The `sql` kind: one parameterised statement per page, bound with `:lo` (exclusive, NULL on
//! the first page) and `:hi` (inclusive). For chunked backfills and migrations; the statement
//! should be idempotent, since a page whose hop crashed runs again.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::time::Instant;

use super::{JobDeps, JobError, RangeJob, RangeOutcome};
use crate::config::JobConfig;
use crate::sql::{Params, SqlStore, Stmt, Value};

pub struct SqlJob {
    statement: String,
    store: Arc<dyn SqlStore>,
}

impl SqlJob {
    pub fn new(name: &str, config: &JobConfig, deps: &JobDeps) -> Result<Self, JobError> {
        let statement = config.sql.as_ref().map(|s| s.statement.clone()).ok_or_else(|| JobError::Invalid {
            field: format!("jobs.{name}.sql"),
            message: "a `sql` job needs a [jobs.NAME.sql] section with `statement`".into(),
        })?;
        Ok(Self { statement, store: deps.store.clone() })
    }
}

#[async_trait]
impl RangeJob for SqlJob {
    async fn process(&self, lo: Option<Value>, hi: Value, _soft_deadline: Instant) -> Result<RangeOutcome, JobError> {
        let lo = lo.unwrap_or_else(|| hi.null_like());
        let params = Params::new().with("lo", lo).with("hi", hi);
        match self.store.query(Stmt::named("job_statement", self.statement.clone(), params)).await {
            Ok(_) => Ok(RangeOutcome::Done),
            Err(e) if e.is_transient() => Err(JobError::Transient(e.to_string())),
            Err(e) => Err(JobError::Fatal(format!("the job's statement failed: {e}"))),
        }
    }
}
