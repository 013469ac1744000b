//! The embedded SQL adapter: one SQLite file in WAL mode, shared by the engine's tasks through a
//! mutex (SQLite serialises writers anyway) and by other `baton` processes through the file
//! (`busy_timeout`), so `baton pause` in a second terminal reaches a running `baton run`.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, ToSql};

use crate::sql::{Rows, SqlError, SqlStore, Stmt, Value};

#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self, SqlError> {
        let conn = Connection::open(path)
            .map_err(|e| SqlError::Config(format!("cannot open SQLite database {}: {e}", path.display())))?;
        Self::configure(conn)
    }

    pub fn in_memory() -> Result<Self, SqlError> {
        Self::configure(Connection::open_in_memory().map_err(SqlError::statement)?)
    }

    fn configure(conn: Connection) -> Result<Self, SqlError> {
        conn.busy_timeout(Duration::from_secs(30)).map_err(SqlError::statement)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(SqlError::statement)?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(SqlError::statement)?;
        Ok(Self { conn: Arc::new(Mutex::new(conn)) })
    }

    /// Runs a closure on the connection on a blocking thread (for bulk loads such as demo data).
    pub async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, SqlError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let waited = std::time::Instant::now();
            let mut guard = conn.lock().unwrap_or_else(|e| e.into_inner());
            let started = std::time::Instant::now();
            let result = f(&mut guard).map_err(classify);
            let (wait, held) = (started - waited, started.elapsed());
            if held > Duration::from_millis(30) || wait > Duration::from_millis(30) {
                tracing::debug!(
                    wait_ms = wait.as_millis() as u64,
                    held_ms = held.as_millis() as u64,
                    "slow SQLite call"
                );
            }
            result
        })
        .await
        .map_err(|e| SqlError::statement(format!("database task failed: {e}")))?
    }
}

struct Param<'a>(&'a Value);

impl ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self.0 {
            Value::Null | Value::NullOf(_) => ToSqlOutput::Borrowed(ValueRef::Null),
            Value::Int(i) => ToSqlOutput::Owned(rusqlite::types::Value::Integer(*i)),
            Value::Real(f) => ToSqlOutput::Owned(rusqlite::types::Value::Real(*f)),
            Value::Bool(b) => ToSqlOutput::Owned(rusqlite::types::Value::Integer(*b as i64)),
            Value::Text(s) | Value::Uuid(s) | Value::Timestamp(s) => {
                ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes()))
            }
        })
    }
}

fn classify(e: rusqlite::Error) -> SqlError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) =>
        {
            SqlError::transient(e)
        }
        // The file or its folder, not the statement: a read-only data dir, a full disk. Told
        // apart so that no one blames the job's source query for it.
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(
                f.code,
                rusqlite::ErrorCode::ReadOnly
                    | rusqlite::ErrorCode::CannotOpen
                    | rusqlite::ErrorCode::DiskFull
                    | rusqlite::ErrorCode::PermissionDenied
                    | rusqlite::ErrorCode::SystemIoFailure
            ) =>
        {
            SqlError::Config(format!(
                "the SQLite database cannot be written ({e}): check that --data-dir is writable and its disk has room"
            ))
        }
        // SQLite has no code for these; its messages are fixed English text.
        _ if ["no such column", "no such table", "no such function"].iter().any(|s| e.to_string().starts_with(s)) => {
            SqlError::Undefined { message: e.to_string() }
        }
        _ => SqlError::statement(e),
    }
}

fn run_one(conn: &Connection, stmt: &Stmt) -> rusqlite::Result<Rows> {
    let mut prepared = conn.prepare_cached(&stmt.sql)?;
    let by_name = stmt.params.by_name();
    // Bound by position. SQLite numbers `:name` parameters in order of first use, which is the
    // order `names` reads them in: asking SQLite for each position's name (or binding by name)
    // scans its list of names each time, O(n²) for the thousand-row statements of a page.
    let mut names = crate::sql::params::names(&stmt.sql);
    let count = prepared.parameter_count();
    let agrees = |i: usize| prepared.parameter_name(i).and_then(|n| n.strip_prefix(':')) == Some(names[i - 1].as_str());
    if names.len() != count || (count > 0 && !(agrees(1) && agrees(count))) {
        // Text baton's reader takes apart otherwise than SQLite (a `[bracketed]` or backquoted
        // name holding a colon, in a source query of the user's): SQLite's own names, slowly.
        names = (1..=count)
            .map(|i| prepared.parameter_name(i).unwrap_or_default().trim_start_matches(':').to_owned())
            .collect();
    }
    for (i, name) in names.iter().enumerate() {
        let value = by_name.get(name.as_str()).copied().ok_or_else(|| {
            rusqlite::Error::InvalidParameterName(format!(":{name} (no value given for this parameter)"))
        })?;
        prepared.raw_bind_parameter(i + 1, Param(value))?;
    }
    let columns: Vec<String> = prepared.column_names().iter().map(|c| c.to_string()).collect();
    if columns.is_empty() {
        let affected = prepared.raw_execute()? as u64;
        return Ok(Rows { columns, rows: Vec::new(), affected });
    }
    let width = columns.len();
    let mut rows = Vec::new();
    let mut cursor = prepared.raw_query();
    while let Some(row) = cursor.next()? {
        let mut values = Vec::with_capacity(width);
        for i in 0..width {
            values.push(match row.get_ref(i)? {
                ValueRef::Null => Value::Null,
                ValueRef::Integer(v) => Value::Int(v),
                ValueRef::Real(v) => Value::Real(v),
                ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
                ValueRef::Blob(b) => Value::Text(String::from_utf8_lossy(b).into_owned()),
            });
        }
        rows.push(values);
    }
    Ok(Rows::returned(columns, rows))
}

#[async_trait]
impl SqlStore for SqliteStore {
    async fn query(&self, stmt: Stmt) -> Result<Rows, SqlError> {
        self.with_conn(move |conn| run_one(conn, &stmt)).await
    }

    fn dynamic_types(&self) -> bool {
        true
    }

    async fn transaction(&self, stmts: Vec<Stmt>) -> Result<Vec<Rows>, SqlError> {
        self.with_conn(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let mut out = Vec::with_capacity(stmts.len());
            for stmt in &stmts {
                out.push(run_one(&tx, stmt)?);
            }
            tx.commit()?;
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::Params;

    #[test]
    fn a_read_only_database_is_a_storage_error_not_a_statement_error() {
        let dir = tempfile_dir();
        let path = dir.join("baton.db");
        Connection::open(&path).unwrap().execute_batch("CREATE TABLE t (id INTEGER)").unwrap();
        let ro = Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        let err = run_one(&ro, &Stmt::new("INSERT INTO t VALUES (1)", Params::new())).map_err(classify).unwrap_err();
        assert!(matches!(err, SqlError::Config(_)), "{err}");
        assert!(err.to_string().contains("--data-dir is writable"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("baton-sqlite-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
