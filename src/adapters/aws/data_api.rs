//! The SQL port on Aurora through the RDS Data API (`aws-sdk-rdsdata`). The shared `:name`
//! statements go through unchanged: the Data API takes `:name` parameters natively.
//!
//! - Parameters are typed `Field`s; uuids carry `typeHint: UUID`. A typed NULL (a first page's
//!   `:lo`) cannot be hinted as bigint or text, so its uses are wrapped in `CAST(:lo AS type)`.
//! - Results are decoded from `Field` values with column names from the result metadata.
//! - The client's own SDK retries are off ([`DataApiStore::client_from`]): the SDK would
//!   re-send after timeouts, transport errors and 5xx, which can follow a commit.
//! - `DatabaseResumingException` (an auto-paused Aurora Serverless v2 takes up to ~15 s to
//!   resume, and the SDK does not retry it) and `StatementTimeoutException` (the statement was
//!   cancelled and rolled back) are retried here with jittered backoff: neither ran. Other
//!   errors are returned, transport errors and 5xx as transient: the engine re-runs those
//!   itself, since every statement it issues is safe to re-run after a lost response.
//! - The 1 MiB response limit comes back as a clear error naming `page_size`, never as a
//!   silently shortened page.
//! - Several statements that must be atomic run in a Data API transaction.

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_rdsdata::error::SdkError;
use aws_sdk_rdsdata::operation::execute_statement::ExecuteStatementError;
use aws_sdk_rdsdata::types::{Field, SqlParameter, TypeHint};

use crate::jobs::backoff;
use crate::sql::params::{cast_params, names};
use crate::sql::{KeyType, Rows, SqlError, SqlStore, Stmt, Value};

/// Where the database is: the cluster ARN, the Secrets Manager secret with its credentials, and
/// the database name.
#[derive(Debug, Clone)]
pub struct DataApiTarget {
    pub resource_arn: String,
    pub secret_arn: String,
    pub database: String,
}

pub struct DataApiStore {
    client: aws_sdk_rdsdata::Client,
    target: DataApiTarget,
    /// How long to keep retrying a resuming database.
    resume_budget: Duration,
}

impl DataApiStore {
    pub fn new(client: aws_sdk_rdsdata::Client, target: DataApiTarget) -> Self {
        Self { client, target, resume_budget: Duration::from_secs(45) }
    }

    /// A client from the shared AWS config with the SDK's own retries off. The SDK would re-send
    /// a statement after a timeout, a transport error or a 5xx, all of which can follow a
    /// commit; baton re-runs statements itself, and only those its classification says are
    /// safe (see the module docs).
    pub fn client_from(shared: &aws_config::SdkConfig) -> aws_sdk_rdsdata::Client {
        let config = aws_sdk_rdsdata::config::Builder::from(shared)
            .retry_config(aws_sdk_rdsdata::config::retry::RetryConfig::disabled())
            .build();
        aws_sdk_rdsdata::Client::from_conf(config)
    }

    pub fn with_resume_budget(mut self, budget: Duration) -> Self {
        self.resume_budget = budget;
        self
    }

    async fn execute(&self, stmt: &Stmt, transaction: Option<&str>) -> Result<Rows, SqlError> {
        let (sql, parameters) = encode(stmt)?;
        let started = tokio::time::Instant::now();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let sent = self
                .client
                .execute_statement()
                .resource_arn(&self.target.resource_arn)
                .secret_arn(&self.target.secret_arn)
                .database(&self.target.database)
                .sql(&sql)
                .set_parameters(Some(parameters.clone()))
                .set_transaction_id(transaction.map(str::to_owned))
                .include_result_metadata(true)
                .send()
                .await;
            let err = match sent {
                Ok(out) => return decode(out),
                Err(e) => classify(&e),
            };
            let retryable = matches!(err, Retry::Resuming(_) | Retry::Timeout(_)) && transaction.is_none();
            if !retryable || started.elapsed() >= self.resume_budget {
                return Err(err.into_error());
            }
            tracing::warn!(attempt, error = ?err, "Data API statement will be retried");
            tokio::time::sleep(backoff(attempt, Duration::from_millis(500), Duration::from_secs(5))).await;
        }
    }
}

#[derive(Debug)]
enum Retry {
    Resuming(String),
    Timeout(String),
    Fatal(SqlError),
}

impl Retry {
    fn into_error(self) -> SqlError {
        match self {
            Retry::Resuming(m) => SqlError::transient(format!("the database is still resuming: {m}")),
            Retry::Timeout(m) => SqlError::transient(format!("statement timed out: {m}")),
            Retry::Fatal(e) => e,
        }
    }
}

fn classify(e: &SdkError<ExecuteStatementError, aws_sdk_rdsdata::config::http::HttpResponse>) -> Retry {
    match e {
        SdkError::ServiceError(s) => {
            let err = s.err();
            let message = err.to_string();
            match err {
                ExecuteStatementError::DatabaseResumingException(_) => Retry::Resuming(message),
                ExecuteStatementError::StatementTimeoutException(_) => Retry::Timeout(message),
                ExecuteStatementError::DatabaseUnavailableException(_)
                | ExecuteStatementError::ServiceUnavailableError(_)
                | ExecuteStatementError::InternalServerErrorException(_) => Retry::Fatal(SqlError::transient(message)),
                _ if message.contains("response size") || message.contains("exceeds the limit") => {
                    Retry::Fatal(SqlError::statement(format!(
                        "{message}. A page's rows must fit in the Data API's 1 MiB response: lower jobs.NAME.page_size"
                    )))
                }
                // An unmodelled 5xx may follow a commit: transient, for the engine to re-run.
                _ if s.raw().status().as_u16() >= 500 => Retry::Fatal(SqlError::transient(message)),
                // Aurora's own errors carry their SQLSTATE: a failover or a lock timeout is
                // worth another try; an undefined column is a schema that changed.
                ExecuteStatementError::DatabaseErrorException(_)
                    if ["40001", "40P01", "57014", "57P01", "57P02", "57P03", "55P03"]
                        .iter()
                        .any(|code| message.contains(&format!("SQLState: {code}"))) =>
                {
                    Retry::Fatal(SqlError::transient(message))
                }
                _ => Retry::Fatal(SqlError::statement_with_state(message)),
            }
        }
        other => Retry::Fatal(SqlError::transient(format!("Data API request failed: {other:?}"))),
    }
}

/// The statement's SQL (with casts for typed NULLs) and its typed parameters.
fn encode(stmt: &Stmt) -> Result<(String, Vec<SqlParameter>), SqlError> {
    let mut casts = Vec::new();
    let mut parameters = Vec::new();
    let by_name = stmt.params.by_name();
    for name in names(&stmt.sql) {
        let value = by_name
            .get(name.as_str())
            .copied()
            .ok_or_else(|| SqlError::statement(format!("no value given for parameter :{name}")))?;
        let (field, hint) = match value {
            Value::Null => (Field::IsNull(true), None),
            Value::NullOf(k) => {
                casts.push((
                    name.clone(),
                    match k {
                        KeyType::Int => "BIGINT",
                        KeyType::Text => "TEXT",
                        KeyType::Uuid => "UUID",
                        KeyType::Timestamp => "TIMESTAMP",
                    },
                ));
                (Field::IsNull(true), None)
            }
            Value::Int(i) => (Field::LongValue(*i), None),
            Value::Real(f) => (Field::DoubleValue(*f), None),
            Value::Bool(b) => (Field::BooleanValue(*b), None),
            Value::Text(s) => (Field::StringValue(s.clone()), None),
            Value::Uuid(s) => (Field::StringValue(s.clone()), Some(TypeHint::Uuid)),
            // The TIMESTAMP hint takes `YYYY-MM-DD HH:MM:SS[.FFF]` (milliseconds); PostgreSQL keys
            // carry microseconds. A plain string cast in SQL keeps them exact.
            Value::Timestamp(s) => {
                casts.push((name.clone(), "TIMESTAMP"));
                (Field::StringValue(s.clone()), None)
            }
        };
        parameters.push(SqlParameter::builder().name(&name).value(field).set_type_hint(hint).build());
    }
    let casts: Vec<(&str, &str)> = casts.iter().map(|(n, t)| (n.as_str(), *t)).collect();
    Ok((cast_params(&stmt.sql, &casts), parameters))
}

fn decode(out: aws_sdk_rdsdata::operation::execute_statement::ExecuteStatementOutput) -> Result<Rows, SqlError> {
    let columns: Vec<String> = out.column_metadata().iter().map(|c| c.name().unwrap_or_default().to_owned()).collect();
    // The Data API returns uuids and timestamps as strings; the column's type name says which
    // they are, so a uuid key binds back as a uuid (not as varchar, which Aurora cannot compare
    // with a uuid column) and a timestamp key as a timestamp.
    let kinds: Vec<Option<KeyType>> = out
        .column_metadata()
        .iter()
        .map(|c| match c.type_name().unwrap_or_default().to_ascii_lowercase().as_str() {
            "uuid" => Some(KeyType::Uuid),
            "timestamp" => Some(KeyType::Timestamp),
            _ => None,
        })
        .collect();
    let rows: Vec<Vec<Value>> = out
        .records()
        .iter()
        .map(|record| {
            record
                .iter()
                .enumerate()
                .map(|(i, field)| match field {
                    Field::IsNull(_) => Value::Null,
                    Field::LongValue(i) => Value::Int(*i),
                    Field::DoubleValue(f) => Value::Real(*f),
                    Field::BooleanValue(b) => Value::Bool(*b),
                    Field::StringValue(s) => match kinds.get(i).copied().flatten() {
                        Some(k) => k.value(s),
                        None => Value::Text(s.clone()),
                    },
                    Field::BlobValue(b) => Value::Text(String::from_utf8_lossy(b.as_ref()).into_owned()),
                    other => Value::Text(format!("{other:?}")),
                })
                .collect()
        })
        .collect();
    if columns.is_empty() && rows.is_empty() {
        return Ok(Rows { columns, rows, affected: out.number_of_records_updated().max(0) as u64 });
    }
    Ok(Rows::returned(columns, rows))
}

#[async_trait]
impl SqlStore for DataApiStore {
    /// A column has one declared type.
    fn dynamic_types(&self) -> bool {
        false
    }

    async fn query(&self, stmt: Stmt) -> Result<Rows, SqlError> {
        self.execute(&stmt, None).await
    }

    async fn transaction(&self, stmts: Vec<Stmt>) -> Result<Vec<Rows>, SqlError> {
        let begun = self
            .client
            .begin_transaction()
            .resource_arn(&self.target.resource_arn)
            .secret_arn(&self.target.secret_arn)
            .database(&self.target.database)
            .send()
            .await
            .map_err(|e| SqlError::transient(format!("BeginTransaction failed: {e:?}")))?;
        let id = begun.transaction_id().unwrap_or_default().to_owned();
        let mut out = Vec::with_capacity(stmts.len());
        for stmt in &stmts {
            match self.execute(stmt, Some(&id)).await {
                Ok(rows) => out.push(rows),
                Err(e) => {
                    let _ = self
                        .client
                        .rollback_transaction()
                        .resource_arn(&self.target.resource_arn)
                        .secret_arn(&self.target.secret_arn)
                        .transaction_id(&id)
                        .send()
                        .await;
                    return Err(e);
                }
            }
        }
        self.client
            .commit_transaction()
            .resource_arn(&self.target.resource_arn)
            .secret_arn(&self.target.secret_arn)
            .transaction_id(&id)
            .send()
            .await
            .map_err(|e| SqlError::transient(format!("CommitTransaction failed: {e:?}")))?;
        Ok(out)
    }
}
