//! `baton preview`: one item of a job's source, as its kind would process it, with no side
//! effect. What a preview shows is the kind's business ([`crate::jobs::ItemJob::preview`]).

use std::sync::Arc;

use super::start::source_error;
use super::{Engine, EngineError, item_of};
use crate::jobs::{Job, JobError, Preview};
use crate::sql::statements as st;

impl Engine {
    /// The item with key `key` (the first one when `None`) of `job_name`'s source, previewed;
    /// `None` when there is no such item.
    pub async fn preview(&self, job_name: &str, key: Option<&str>) -> Result<Option<Preview>, EngineError> {
        let config = self.config.job(job_name)?.clone();
        let Job::Items(job) = self.build_job(job_name, &config)? else {
            return Err(nothing_to_preview(job_name, &config.kind));
        };
        let stmt = match key {
            None => st::source_sample(&config.source, &config.key_column).remove(0),
            Some(k) => st::source_row_by_key(&config.source, &config.key_column, k),
        };
        let rows = self.sql(stmt).await.map_err(|e| source_error(job_name, e))?;
        let columns = Arc::new(rows.columns.clone());
        let Some(values) = rows.rows.into_iter().next() else {
            return Ok(None);
        };
        let item = item_of(&columns, &config.key_column, values);
        job.preview(&item)?.map(Some).ok_or_else(|| nothing_to_preview(job_name, &config.kind))
    }
}

fn nothing_to_preview(job: &str, kind: &str) -> EngineError {
    JobError::Invalid {
        field: format!("jobs.{job}.kind"),
        message: format!("a `{kind}` job has nothing to preview: only kinds that render items (newsletter) do"),
    }
    .into()
}
