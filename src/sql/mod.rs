//! The SQL port: one set of statements with `:name` parameters (the RDS Data API's syntax) that
//! runs unchanged on SQLite, on PostgreSQL and, later, on Aurora through the Data API.
//!
//! - [`Value`] / [`Rows`]: the few types that cross the port. Keys may be integers, text or uuids.
//! - [`SqlStore`]: the port trait. `query` runs one statement; `transaction` runs several
//!   atomically (used only where a protocol step needs more than one statement, e.g. planning).
//! - [`statements`]: every statement the engine issues, in one place.
//! - [`migrations`]: the versioned schema, applied automatically and safely twice.
//! - [`params`]: parsing of `:name` parameters, shared by adapters that need positional ones.

pub mod migrations;
pub mod params;
pub mod statements;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// A value bound to a parameter or read from a column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum Value {
    Null,
    /// A NULL of a key's type, for engines that must know a parameter's type (PostgreSQL
    /// cannot infer `:lo` in `:lo IS NULL OR id > :lo`; the Data API needs a `typeHint`).
    NullOf(KeyType),
    Int(i64),
    Real(f64),
    Text(String),
    /// A uuid, kept in its canonical lowercase hyphenated text form.
    Uuid(String),
    /// A timestamp without time zone, in PostgreSQL's text form (`2026-12-01 08:00:00`, with
    /// `.ffffff` when it has fractions of a second).
    Timestamp(String),
    Bool(bool),
}

impl Value {
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Real(f) => Some(*f as i64),
            Value::Text(s) => s.parse().ok(),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Text(s) | Value::Uuid(s) | Value::Timestamp(s) => Some(s),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null | Value::NullOf(_))
    }

    /// A NULL of the same key type as `self`.
    pub fn null_like(&self) -> Value {
        self.key_type().map(Value::NullOf).unwrap_or(Value::Null)
    }

    /// The canonical text form of a key, identical to what `CAST(key AS TEXT)` yields on both
    /// PostgreSQL and SQLite for the supported key types. Ledger rows are keyed by it.
    pub fn key_text(&self) -> Option<String> {
        match self {
            Value::Int(i) => Some(i.to_string()),
            Value::Text(s) | Value::Uuid(s) | Value::Timestamp(s) => Some(s.clone()),
            _ => None,
        }
    }

    /// The value's type in words, for messages and the ledger keys of mistyped items.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null | Value::NullOf(_) => "NULL",
            Value::Int(_) => "integer",
            Value::Real(_) => "real",
            Value::Bool(_) => "boolean",
            Value::Text(_) => "text",
            Value::Uuid(_) => "uuid",
            Value::Timestamp(_) => "timestamp",
        }
    }

    /// The kind of key this value is, if it can be one.
    pub fn key_type(&self) -> Option<KeyType> {
        match self {
            Value::Int(_) => Some(KeyType::Int),
            Value::Text(_) => Some(KeyType::Text),
            Value::Uuid(_) => Some(KeyType::Uuid),
            Value::Timestamp(_) => Some(KeyType::Timestamp),
            _ => None,
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null | Value::NullOf(_) => f.write_str("NULL"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Real(r) => write!(f, "{r}"),
            Value::Text(s) | Value::Uuid(s) | Value::Timestamp(s) => f.write_str(s),
            Value::Bool(b) => write!(f, "{b}"),
        }
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Value::Int(v as i64)
    }
}
impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::Int(v as i64)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_owned())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map(Into::into).unwrap_or(Value::Null)
    }
}

/// The sortable key types pages can range over. (A `timestamp` key is a PostgreSQL or Aurora
/// `timestamp without time zone` column; SQLite keeps times as text, which pages as `text`.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyType {
    Int,
    Text,
    Uuid,
    Timestamp,
}

impl KeyType {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::Int => "int",
            KeyType::Text => "text",
            KeyType::Uuid => "uuid",
            KeyType::Timestamp => "timestamp",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "int" => Some(KeyType::Int),
            "text" => Some(KeyType::Text),
            "uuid" => Some(KeyType::Uuid),
            "timestamp" => Some(KeyType::Timestamp),
            _ => None,
        }
    }

    /// Turns a stored key text back into a typed value for binding.
    pub fn value(self, text: &str) -> Value {
        match self {
            KeyType::Int => text.parse().map(Value::Int).unwrap_or(Value::Text(text.into())),
            KeyType::Text => Value::Text(text.into()),
            KeyType::Uuid => Value::Uuid(text.into()),
            KeyType::Timestamp => Value::Timestamp(text.into()),
        }
    }
}

/// Named parameters of one statement.
#[derive(Debug, Clone, Default)]
pub struct Params(pub Vec<(String, Value)>);

impl Params {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.0.push((name.to_owned(), value.into()));
        self
    }

    pub fn push(&mut self, name: impl Into<String>, value: impl Into<Value>) {
        self.0.push((name.into(), value.into()));
    }

    pub fn get(&self, name: &str) -> Option<&Value> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// A lookup by name for binding many parameters (a linear `get` per parameter would make
    /// binding a page's batched statement quadratic).
    pub fn by_name(&self) -> HashMap<&str, &Value> {
        self.0.iter().map(|(n, v)| (n.as_str(), v)).collect()
    }
}

/// One statement with its parameters, and a name that says what it is for (the protocol's
/// statements are named after their function in [`statements`]; others are `adhoc`). Fault
/// injection, logs and tests address statements by name, never by their SQL text.
#[derive(Debug, Clone)]
pub struct Stmt {
    pub name: &'static str,
    pub sql: String,
    pub params: Params,
}

impl Stmt {
    pub fn new(sql: impl Into<String>, params: Params) -> Self {
        Self { name: "adhoc", sql: sql.into(), params }
    }

    pub fn named(name: &'static str, sql: impl Into<String>, params: Params) -> Self {
        Self { name, sql: sql.into(), params }
    }
}

/// The result of one statement: column names (present even when there are no rows) and rows.
#[derive(Debug, Clone, Default)]
pub struct Rows {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
    /// Rows changed, for statements without `RETURNING`.
    pub affected: u64,
}

impl Rows {
    /// The rows a query returned (`affected` counts them, as for `RETURNING`).
    pub fn returned(columns: Vec<String>, rows: Vec<Vec<Value>>) -> Self {
        let affected = rows.len() as u64;
        Rows { columns, rows, affected }
    }

    pub fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.eq_ignore_ascii_case(name))
    }

    /// Rows as maps from column name to value.
    pub fn records(&self) -> impl Iterator<Item = Record<'_>> {
        self.rows.iter().map(move |r| Record { columns: &self.columns, values: r })
    }

    pub fn first(&self) -> Option<Record<'_>> {
        self.records().next()
    }
}

/// One row, addressed by column name.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub columns: &'a [String],
    pub values: &'a [Value],
}

impl<'a> Record<'a> {
    /// The value of column `name`. A column the statement does not return is an error, never
    /// NULL: a misspelt name must not read as "nothing there".
    pub fn get(&self, name: &str) -> Result<&'a Value, SqlError> {
        match self.columns.iter().position(|c| c.eq_ignore_ascii_case(name)) {
            Some(i) => Ok(&self.values[i]),
            None => Err(SqlError::MissingColumn { column: name.to_owned(), columns: self.columns.join(", ") }),
        }
    }

    /// An integer column; NULL reads as 0 (`COUNT`, `SUM`, `MAX` over no rows), anything that
    /// is not an integer is an error.
    pub fn int(&self, name: &str) -> Result<i64, SqlError> {
        Ok(self.opt_int(name)?.unwrap_or(0))
    }

    /// An integer column that may be NULL.
    pub fn opt_int(&self, name: &str) -> Result<Option<i64>, SqlError> {
        match self.get(name)? {
            v if v.is_null() => Ok(None),
            v => v.as_i64().map(Some).ok_or_else(|| {
                SqlError::statement(format!("column `{name}` holds {} where an integer was expected", v.type_name()))
            }),
        }
    }

    /// A column as text (`None` for NULL).
    pub fn text(&self, name: &str) -> Result<Option<String>, SqlError> {
        Ok(match self.get(name)? {
            v if v.is_null() => None,
            v => Some(v.to_string()),
        })
    }
}

/// Errors of the SQL port. `Transient` errors may succeed when retried (a resuming database,
/// a statement timeout, a dropped connection) and may or may not have committed (ambiguous:
/// the engine only re-runs statements safe to re-run); `Statement` errors did not commit and
/// will not on retry.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    #[error("database statement failed: {message}")]
    Statement { message: String },
    /// The statement names a table, column or function the database does not have
    /// (PostgreSQL SQLSTATE 42703, 42P01, 42883; SQLite "no such ..."): the schema is not what
    /// the statement was written for. Never transient.
    #[error("database statement failed: {message}")]
    Undefined { message: String },
    #[error("database temporarily unavailable: {message}")]
    Transient { message: String },
    #[error("database configuration error: {0}")]
    Config(String),
    /// A statement's result lacks a column baton reads: baton and its schema disagree (or a
    /// statement and its reader do).
    #[error(
        "a statement's result has no column `{column}` (it has: {columns}); is the database's schema from another version of baton?"
    )]
    MissingColumn { column: String, columns: String },
}

impl SqlError {
    pub fn statement(message: impl fmt::Display) -> Self {
        SqlError::Statement { message: message.to_string() }
    }
    pub fn transient(message: impl fmt::Display) -> Self {
        SqlError::Transient { message: message.to_string() }
    }
    pub fn is_transient(&self) -> bool {
        matches!(self, SqlError::Transient { .. })
    }

    /// A statement error; [`SqlError::Undefined`] when the message carries an SQLSTATE of an
    /// undefined column, table or function (the Data API writes `SQLState: 42703`).
    pub fn statement_with_state(message: impl fmt::Display) -> Self {
        let message = message.to_string();
        let undefined = ["42703", "42P01", "42883"].iter().any(|code| message.contains(code));
        if undefined { SqlError::Undefined { message } } else { SqlError::Statement { message } }
    }
}

/// The SQL port. Adapters: SQLite (embedded), PostgreSQL (direct), RDS Data API (Lambda).
///
/// Error contract: each statement, and each `transaction`, is atomic: it committed whole or not
/// at all. `SqlError::Statement` means it did not commit and will not on retry. A
/// `SqlError::Transient` error is worth retrying, but says nothing about whether the statement
/// committed: a dropped connection, a timeout or a lost response can follow a commit. Callers
/// therefore only re-run statements that are safe to re-run after they committed (every one in
/// [`statements`] is; see the engine's `Engine::sql`).
#[async_trait]
pub trait SqlStore: Send + Sync {
    async fn query(&self, stmt: Stmt) -> Result<Rows, SqlError>;
    async fn transaction(&self, stmts: Vec<Stmt>) -> Result<Vec<Rows>, SqlError>;
    /// Whether one column's values may differ in type from row to row (SQLite's dynamic
    /// typing). Where they may, a run's start checks the type of every key
    /// ([`statements::key_type_census`]); elsewhere a column has one declared type. No default:
    /// a wrapper that forgot to forward it would silently turn the check off.
    fn dynamic_types(&self) -> bool;
}

/// Counts statements, so tests and benchmarks can check the O(1)-statements-per-page rule.
pub struct CountingStore<S> {
    inner: S,
    statements: AtomicU64,
}

impl<S> CountingStore<S> {
    pub fn new(inner: S) -> Self {
        Self { inner, statements: AtomicU64::new(0) }
    }
    pub fn statements(&self) -> u64 {
        self.statements.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl<S: SqlStore> SqlStore for CountingStore<S> {
    async fn query(&self, stmt: Stmt) -> Result<Rows, SqlError> {
        self.statements.fetch_add(1, Ordering::Relaxed);
        self.inner.query(stmt).await
    }
    async fn transaction(&self, stmts: Vec<Stmt>) -> Result<Vec<Rows>, SqlError> {
        self.statements.fetch_add(stmts.len() as u64, Ordering::Relaxed);
        self.inner.transaction(stmts).await
    }
    fn dynamic_types(&self) -> bool {
        self.inner.dynamic_types()
    }
}

#[async_trait]
impl<S: SqlStore + ?Sized> SqlStore for Arc<S> {
    async fn query(&self, stmt: Stmt) -> Result<Rows, SqlError> {
        (**self).query(stmt).await
    }
    async fn transaction(&self, stmts: Vec<Stmt>) -> Result<Vec<Rows>, SqlError> {
        (**self).transaction(stmts).await
    }
    fn dynamic_types(&self) -> bool {
        (**self).dynamic_types()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_column_the_statement_does_not_return_is_an_error_not_zero() {
        // Failed before the fix: `int("chians")` read 0 and `text` read None, silently.
        let rows = Rows::returned(
            vec!["chains".into(), "reason".into(), "note".into()],
            vec![vec![Value::Int(4), Value::Null, Value::Text("x".into())]],
        );
        let r = rows.first().unwrap();
        assert_eq!(r.int("chains").unwrap(), 4);
        assert_eq!(r.int("CHAINS").unwrap(), 4, "column names match without regard to case");
        assert_eq!(r.int("reason").unwrap(), 0, "NULL reads as 0 (COUNT, SUM, MAX over nothing)");
        assert_eq!(r.text("reason").unwrap(), None);
        let missing = r.int("chians").unwrap_err().to_string();
        assert!(missing.contains("`chians`") && missing.contains("chains, reason, note"), "{missing}");
        assert!(matches!(r.text("reasn"), Err(SqlError::MissingColumn { .. })));
        assert!(matches!(r.opt_int("note"), Err(SqlError::Statement { .. })), "text is not an integer");
    }
}
