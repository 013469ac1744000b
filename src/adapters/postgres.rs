//! The direct PostgreSQL adapter (`tokio-postgres` with a `deadpool` pool). The same image can
//! run as a long-lived container against any PostgreSQL; the test suite runs every statement
//! through it on a real server.
//!
//! Statements are rewritten from `:name` to `$n` ([`crate::sql::params`]); parameter types come
//! from the server's own inference (`prepare`), and each [`Value`] is encoded as the type the
//! server asked for, so `:lo` binds as `bigint`, `text` or `uuid` as the key column demands.

use std::error::Error as StdError;
use std::str::FromStr;

use async_trait::async_trait;
use bytes::BytesMut;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{NoTls, Row};

use crate::sql::params::to_positional;
use crate::sql::{KeyType, Rows, SqlError, SqlStore, Stmt, Value};

#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
}

impl PostgresStore {
    /// Connects lazily: `url` is a libpq-style URL or key=value string.
    pub fn connect(url: &str, max_connections: usize) -> Result<Self, SqlError> {
        let config = tokio_postgres::Config::from_str(url)
            .map_err(|e| SqlError::Config(format!("invalid database URL: {e}")))?;
        let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(max_connections.max(1))
            .build()
            .map_err(|e| SqlError::Config(format!("cannot build connection pool: {e}")))?;
        Ok(Self { pool })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, SqlError> {
        self.pool.get().await.map_err(|e| SqlError::transient(format!("cannot connect to PostgreSQL: {e}")))
    }

    /// A connection of its own, for callers that keep a transaction open across calls (the
    /// Data API emulator); use it with [`execute_on`] and `BEGIN` / `COMMIT` / `ROLLBACK`.
    pub async fn dedicated(&self) -> Result<deadpool_postgres::Object, SqlError> {
        self.client().await
    }
}

/// Runs one statement on a given connection (see [`PostgresStore::dedicated`]).
pub async fn execute_on(client: &deadpool_postgres::Object, stmt: &Stmt) -> Result<Rows, SqlError> {
    run_one(client, stmt).await
}

#[derive(Debug)]
struct PgParam<'a>(&'a Value);

type BoxError = Box<dyn StdError + Sync + Send>;

impl ToSql for PgParam<'_> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        let mismatch = || -> BoxError { format!("cannot bind {:?} as a {ty} parameter", self.0).into() };
        match self.0 {
            Value::Null | Value::NullOf(_) => Ok(IsNull::Yes),
            Value::Int(i) => match *ty {
                Type::INT8 => i.to_sql(ty, out),
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::FLOAT8 => (*i as f64).to_sql(ty, out),
                Type::FLOAT4 => (*i as f32).to_sql(ty, out),
                Type::BOOL => (*i != 0).to_sql(ty, out),
                Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => i.to_string().to_sql(ty, out),
                _ => Err(mismatch()),
            },
            Value::Real(f) => match *ty {
                Type::FLOAT8 => f.to_sql(ty, out),
                Type::FLOAT4 => (*f as f32).to_sql(ty, out),
                Type::TEXT | Type::VARCHAR => f.to_string().to_sql(ty, out),
                _ => Err(mismatch()),
            },
            Value::Bool(b) => match *ty {
                Type::BOOL => b.to_sql(ty, out),
                Type::INT8 | Type::INT4 | Type::INT2 => PgParam(&Value::Int(*b as i64)).to_sql(ty, out),
                _ => Err(mismatch()),
            },
            Value::Text(s) | Value::Uuid(s) | Value::Timestamp(s) => match *ty {
                Type::UUID => uuid::Uuid::parse_str(s)?.to_sql(ty, out),
                Type::TIMESTAMP => pg_timestamp_micros(s)?.to_sql(&Type::INT8, out),
                Type::INT8 | Type::INT4 | Type::INT2 => {
                    PgParam(&Value::Int(s.parse().map_err(|_| mismatch())?)).to_sql(ty, out)
                }
                Type::JSON | Type::JSONB => serde_json::from_str::<serde_json::Value>(s)?.to_sql(ty, out),
                _ => s.as_str().to_sql(ty, out),
            },
        }
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// A `numeric` read as its exact decimal text (as the Data API returns it).
struct Numeric(String);

impl<'a> tokio_postgres::types::FromSql<'a> for Numeric {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        let word = |i: usize| -> Result<i16, BoxError> {
            raw.get(i * 2..i * 2 + 2).map(|b| i16::from_be_bytes([b[0], b[1]])).ok_or_else(|| "short numeric".into())
        };
        let (ndigits, weight, sign, dscale) = (word(0)? as usize, word(1)? as i32, word(2)? as u16, word(3)? as usize);
        if sign == 0xC000 {
            return Ok(Numeric("NaN".into()));
        }
        let digit = |k: i32| -> Result<i16, BoxError> {
            if k < 0 || k as usize >= ndigits { Ok(0) } else { word(4 + k as usize) }
        };
        let mut int_part = String::new();
        for k in 0..=weight.max(-1) {
            let d = digit(k)?;
            if int_part.is_empty() { int_part = d.to_string() } else { int_part.push_str(&format!("{d:04}")) }
        }
        if int_part.is_empty() {
            int_part.push('0');
        }
        let mut frac = String::new();
        let mut k = weight + 1;
        while frac.len() < dscale {
            frac.push_str(&format!("{:04}", digit(k)?));
            k += 1;
        }
        frac.truncate(dscale);
        let sign = if sign == 0x4000 { "-" } else { "" };
        Ok(Numeric(if dscale > 0 { format!("{sign}{int_part}.{frac}") } else { format!("{sign}{int_part}") }))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::NUMERIC
    }
}

/// PostgreSQL's `timestamp` epoch (2000-01-01) in Unix microseconds.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// `2026-12-01 08:00:00[.ffffff]` (or with a `T`) as microseconds since PostgreSQL's epoch, the
/// binary form of a `timestamp` parameter.
fn pg_timestamp_micros(text: &str) -> Result<i64, BoxError> {
    let civil: jiff::civil::DateTime =
        text.trim().parse().map_err(|e| format!("`{text}` is not a timestamp (YYYY-MM-DD HH:MM:SS): {e}"))?;
    let unix = jiff::tz::TimeZone::UTC.to_timestamp(civil)?.as_microsecond();
    Ok(unix - PG_EPOCH_MICROS)
}

/// A `timestamp` read as PostgreSQL's own text form (`CAST(ts AS TEXT)`), so keys read here and
/// page bounds computed by the server are written alike.
struct PgTimestamp(String);

impl<'a> tokio_postgres::types::FromSql<'a> for PgTimestamp {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        let micros = i64::from_sql(&Type::INT8, raw)?;
        let at = jiff::Timestamp::from_microsecond(micros + PG_EPOCH_MICROS)?;
        let civil = jiff::tz::TimeZone::UTC.to_datetime(at);
        let mut text = format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
            civil.year(),
            civil.month(),
            civil.day(),
            civil.hour(),
            civil.minute(),
            civil.second()
        );
        let fraction = micros.rem_euclid(1_000_000);
        if fraction != 0 {
            text.push_str(format!(".{fraction:06}").trim_end_matches('0'));
        }
        Ok(PgTimestamp(text))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TIMESTAMP
    }
}

fn declared_type(v: &Value) -> Type {
    match v {
        Value::Int(_) | Value::NullOf(KeyType::Int) => Type::INT8,
        Value::Real(_) => Type::FLOAT8,
        Value::Bool(_) => Type::BOOL,
        Value::Text(_) | Value::NullOf(KeyType::Text) => Type::TEXT,
        Value::Uuid(_) | Value::NullOf(KeyType::Uuid) => Type::UUID,
        Value::Timestamp(_) | Value::NullOf(KeyType::Timestamp) => Type::TIMESTAMP,
        Value::Null => Type::UNKNOWN,
    }
}

fn decode(row: &Row, i: usize) -> Result<Value, SqlError> {
    let column = &row.columns()[i];
    let ty = column.type_();
    let err = |e: tokio_postgres::Error| SqlError::statement(format!("column {}: {e}", column.name()));
    Ok(match *ty {
        Type::INT8 => row.try_get::<_, Option<i64>>(i).map_err(err)?.map(Value::Int),
        Type::INT4 => row.try_get::<_, Option<i32>>(i).map_err(err)?.map(|v| Value::Int(v.into())),
        Type::INT2 => row.try_get::<_, Option<i16>>(i).map_err(err)?.map(|v| Value::Int(v.into())),
        Type::FLOAT8 => row.try_get::<_, Option<f64>>(i).map_err(err)?.map(Value::Real),
        Type::FLOAT4 => row.try_get::<_, Option<f32>>(i).map_err(err)?.map(|v| Value::Real(v.into())),
        Type::BOOL => row.try_get::<_, Option<bool>>(i).map_err(err)?.map(Value::Bool),
        Type::UUID => row.try_get::<_, Option<uuid::Uuid>>(i).map_err(err)?.map(|u| Value::Uuid(u.to_string())),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
            row.try_get::<_, Option<String>>(i).map_err(err)?.map(Value::Text)
        }
        Type::JSON | Type::JSONB => {
            row.try_get::<_, Option<serde_json::Value>>(i).map_err(err)?.map(|j| Value::Text(j.to_string()))
        }
        Type::NUMERIC => row.try_get::<_, Option<Numeric>>(i).map_err(err)?.map(|n| Value::Text(n.0)),
        Type::TIMESTAMP => row.try_get::<_, Option<PgTimestamp>>(i).map_err(err)?.map(|t| Value::Timestamp(t.0)),
        _ => {
            return Err(SqlError::statement(format!(
                "column `{}` has type {ty}, which baton does not read; cast it in the query, e.g. `{}::text`",
                column.name(),
                column.name()
            )));
        }
    }
    .unwrap_or(Value::Null))
}

fn classify(e: tokio_postgres::Error) -> SqlError {
    if e.is_closed() || e.as_db_error().is_none() && e.source().is_some_and(|s| s.is::<std::io::Error>()) {
        return SqlError::transient(e);
    }
    match e.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            // 40001 serialization failure, 40P01 deadlock, 57014 statement timeout, 57P01-03
            // shutdown or restart (a failover), 55P03 lock timeout, 08xxx connection, 53xxx
            // insufficient resources, 58xxx system errors: worth another try.
            let message = format!("{} ({code})", db.message());
            let transient = ["40001", "40P01", "57014", "57P01", "57P02", "57P03", "55P03"].contains(&code)
                || ["08", "53", "58"].iter().any(|class| code.starts_with(class));
            if transient { SqlError::transient(message) } else { SqlError::statement_with_state(message) }
        }
        None => SqlError::statement(e),
    }
}

/// PostgreSQL's "cached plan must not change result type": SQLSTATE 0A000 (feature not
/// supported), which [`classify`] puts at the end of the message, whatever the server's
/// language.
fn is_stale_plan(e: &SqlError) -> bool {
    matches!(e, SqlError::Statement { message } if message.ends_with("(0A000)"))
}

async fn run_one<C: deadpool_postgres::GenericClient>(client: &C, stmt: &Stmt) -> Result<Rows, SqlError> {
    let (sql, names) = to_positional(&stmt.sql);
    let by_name = stmt.params.by_name();
    let mut values = Vec::with_capacity(names.len());
    for name in &names {
        let v = by_name
            .get(name.as_str())
            .copied()
            .ok_or_else(|| SqlError::statement(format!("no value given for parameter :{name}")))?;
        values.push(PgParam(v));
    }
    let prepared = match client.prepare_cached(&sql).await {
        Ok(p) => p,
        // The server could not infer a parameter's type from its context (42P08): declare the
        // types our values carry, leaving plain NULLs for the server to infer.
        Err(e)
            if e.code() == Some(&tokio_postgres::error::SqlState::AMBIGUOUS_PARAMETER)
                || e.code() == Some(&tokio_postgres::error::SqlState::INDETERMINATE_DATATYPE) =>
        {
            let types: Vec<Type> = values.iter().map(|v| declared_type(v.0)).collect();
            client.prepare_typed_cached(&sql, &types).await.map_err(classify)?
        }
        Err(e) => return Err(classify(e)),
    };
    let refs: Vec<&(dyn ToSql + Sync)> = values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
    let columns: Vec<String> = prepared.columns().iter().map(|c| c.name().to_owned()).collect();
    if columns.is_empty() {
        let affected = client.execute(&prepared, &refs).await.map_err(classify)?;
        return Ok(Rows { columns, rows: Vec::new(), affected });
    }
    let found = client.query(&prepared, &refs).await.map_err(classify)?;
    let mut rows = Vec::with_capacity(found.len());
    for row in &found {
        rows.push((0..columns.len()).map(|i| decode(row, i)).collect::<Result<Vec<_>, _>>()?);
    }
    Ok(Rows::returned(columns, rows))
}

#[async_trait]
impl SqlStore for PostgresStore {
    /// A column has one declared type.
    fn dynamic_types(&self) -> bool {
        false
    }

    async fn query(&self, stmt: Stmt) -> Result<Rows, SqlError> {
        let client = self.client().await?;
        match run_one(&client, &stmt).await {
            // The tables under a cached statement changed shape since it was prepared (a source
            // column renamed or dropped mid-run): PostgreSQL refuses the cached plan on every
            // connection that holds it. Forget them all and prepare this one again.
            Err(e) if is_stale_plan(&e) => {
                self.pool.manager().statement_caches.clear();
                run_one(&client, &stmt).await
            }
            other => other,
        }
    }

    async fn transaction(&self, stmts: Vec<Stmt>) -> Result<Vec<Rows>, SqlError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(classify)?;
        let mut out = Vec::with_capacity(stmts.len());
        for stmt in &stmts {
            out.push(run_one(&tx, stmt).await?);
        }
        tx.commit().await.map_err(classify)?;
        Ok(out)
    }
}
