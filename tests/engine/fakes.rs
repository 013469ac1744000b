//! Wire-level fakes on loopback for the AWS adapters. `FakeLambda` speaks Lambda's `Invoke`
//! REST API: it answers `Event` invocations with 202 and then runs the production handler on
//! the payload, delivering some events twice, so a whole run goes through `aws-sdk-lambda`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use baton::engine::Engine;

#[derive(Default)]
pub struct FakeLambda {
    pub engine: OnceLock<Arc<Engine>>,
    /// Every n-th accepted event is delivered twice (0: never).
    pub duplicate_every: u64,
    pub accepted: AtomicU64,
    pub duplicated: AtomicU64,
    pub rejected: AtomicU64,
    pub timeout: Duration,
}

async fn invocations(
    State(fake): State<Arc<FakeLambda>>,
    Path(_function): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    if headers.get("x-amz-invocation-type").and_then(|v| v.to_str().ok()) != Some("Event") {
        fake.rejected.fetch_add(1, Ordering::SeqCst);
        return StatusCode::BAD_REQUEST;
    }
    if body.len() > 1024 * 1024 {
        fake.rejected.fetch_add(1, Ordering::SeqCst);
        return StatusCode::PAYLOAD_TOO_LARGE;
    }
    let n = fake.accepted.fetch_add(1, Ordering::SeqCst) + 1;
    let deliveries = if fake.duplicate_every > 0 && n % fake.duplicate_every == 0 { 2 } else { 1 };
    for _ in 0..deliveries {
        let (fake, body) = (fake.clone(), body.clone());
        tokio::spawn(async move {
            // Without an engine the fake only accepts (an operator test watches the queue).
            let Some(engine) = fake.engine.get().cloned() else { return };
            let deadline = tokio::time::Instant::now() + fake.timeout;
            // Like Lambda: the invocation is killed at its deadline.
            let _ = tokio::time::timeout_at(deadline, engine.handle_payload(&body, deadline)).await;
        });
    }
    if deliveries == 2 {
        fake.duplicated.fetch_add(1, Ordering::SeqCst);
    }
    StatusCode::ACCEPTED
}

/// Serves the fake on a free loopback port; returns its endpoint URL.
pub async fn serve_lambda(fake: Arc<FakeLambda>) -> String {
    serve(Router::new().route("/2015-03-31/functions/{function}/invocations", post(invocations)).with_state(fake)).await
}

/// An SDK config for loopback fakes: fixed region and credentials, the given endpoint.
pub use baton::bench::fakes::sdk_config;

// ---- the RDS Data API, over a real PostgreSQL ----------------------------------------------

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU32;

use axum::Json;
use axum::response::{IntoResponse, Response};
use baton::adapters::postgres::{PostgresStore, execute_on};
use baton::sql::{Params, Rows, SqlError, Stmt, Value};
use serde_json::{Value as J, json};

/// Speaks the Data API's REST protocol and runs the SQL on a real PostgreSQL server, typing
/// parameters and results as the Data API documents it: a parameter's SQL type comes from its
/// `Field` kind and `typeHint` alone (`stringValue` without a hint is `varchar`, so comparing it
/// with a uuid column fails as on Aurora), and uuid, timestamp and numeric columns come back as
/// `stringValue` with the column's `typeName`.
pub struct FakeDataApi {
    pub pg: PostgresStore,
    pub transactions: Mutex<HashMap<String, Arc<tokio::sync::Mutex<deadpool_postgres::Object>>>>,
    /// The next n `Execute` calls fail with `DatabaseResumingException` (nothing runs).
    pub resuming_next: AtomicU32,
    /// The next n `Execute` calls fail with `StatementTimeoutException` (nothing runs).
    pub timeout_next: AtomicU32,
    pub executes: AtomicU64,
    pub response_limit: usize,
    /// Every n-th `Execute` outside a transaction runs and commits, then answers 503 as if its
    /// response were lost on the way back (0: never).
    pub lost_every: u64,
    pub lost: AtomicU64,
}

impl FakeDataApi {
    pub fn new(pg: PostgresStore) -> Self {
        Self {
            pg,
            transactions: Mutex::default(),
            resuming_next: AtomicU32::new(0),
            timeout_next: AtomicU32::new(0),
            executes: AtomicU64::new(0),
            response_limit: 1024 * 1024,
            lost_every: 0,
            lost: AtomicU64::new(0),
        }
    }
}

fn aws_error(kind: &str, status: StatusCode, message: &str) -> Response {
    (
        status,
        [("x-amzn-errortype", kind), ("content-type", "application/json")],
        json!({ "message": message }).to_string(),
    )
        .into_response()
}

fn take_one(counter: &AtomicU32) -> bool {
    counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
}

/// The SQL type the Data API gives a parameter: from its `Field` kind and `typeHint` only.
fn sql_type_of(field: &J, hint: Option<&str>) -> Option<&'static str> {
    if field.get("longValue").is_some() {
        Some("bigint")
    } else if field.get("doubleValue").is_some() {
        Some("double precision")
    } else if field.get("booleanValue").is_some() {
        Some("boolean")
    } else if field.get("stringValue").is_some() {
        Some(match hint {
            Some("UUID") => "uuid",
            Some("TIMESTAMP") => "timestamp",
            Some("DATE") => "date",
            Some("TIME") => "time",
            Some("DECIMAL") => "numeric",
            Some("JSON") => "jsonb",
            _ => "varchar",
        })
    } else {
        None // isNull: untyped, the server infers it
    }
}

fn value_of(field: &J, hint: Option<&str>) -> Value {
    if let Some(i) = field.get("longValue").and_then(J::as_i64) {
        Value::Int(i)
    } else if let Some(s) = field.get("stringValue").and_then(J::as_str) {
        match hint {
            Some("UUID") => Value::Uuid(s.to_owned()),
            Some("TIMESTAMP") => Value::Timestamp(s.to_owned()),
            _ => Value::Text(s.to_owned()),
        }
    } else if let Some(f) = field.get("doubleValue").and_then(J::as_f64) {
        Value::Real(f)
    } else if let Some(b) = field.get("booleanValue").and_then(J::as_bool) {
        Value::Bool(b)
    } else {
        Value::Null
    }
}

fn field_of(v: &Value) -> J {
    match v {
        Value::Int(i) => json!({ "longValue": i }),
        Value::Real(f) => json!({ "doubleValue": f }),
        Value::Bool(b) => json!({ "booleanValue": b }),
        Value::Text(s) | Value::Uuid(s) | Value::Timestamp(s) => json!({ "stringValue": s }),
        Value::Null | Value::NullOf(_) => json!({ "isNull": true }),
    }
}

/// A column's `typeName`, from the first value that is not NULL.
fn type_name_of(rows: &Rows, column: usize) -> &'static str {
    match rows.rows.iter().map(|r| &r[column]).find(|v| !v.is_null()) {
        Some(Value::Int(_)) => "int8",
        Some(Value::Real(_)) => "float8",
        Some(Value::Bool(_)) => "bool",
        Some(Value::Uuid(_)) => "uuid",
        Some(Value::Timestamp(_)) => "timestamp",
        _ => "text",
    }
}

async fn execute(State(api): State<Arc<FakeDataApi>>, Json(req): Json<J>) -> Response {
    let n = api.executes.fetch_add(1, Ordering::SeqCst) + 1;
    let lose = api.lost_every > 0 && n % api.lost_every == 0 && req.get("transactionId").is_none();
    if take_one(&api.resuming_next) {
        return aws_error(
            "DatabaseResumingException",
            StatusCode::BAD_REQUEST,
            "The database is resuming after being auto-paused.",
        );
    }
    if take_one(&api.timeout_next) {
        return aws_error("StatementTimeoutException", StatusCode::BAD_REQUEST, "The statement timed out.");
    }
    for field in ["resourceArn", "secretArn", "sql"] {
        if req.get(field).and_then(J::as_str).is_none() {
            return aws_error("BadRequestException", StatusCode::BAD_REQUEST, &format!("{field} is required"));
        }
    }
    let mut params = Params::new();
    let mut casts: Vec<(String, &'static str)> = Vec::new();
    for p in req.get("parameters").and_then(J::as_array).cloned().unwrap_or_default() {
        let name = p["name"].as_str().unwrap_or_default();
        let hint = p.get("typeHint").and_then(J::as_str);
        if let Some(ty) = sql_type_of(&p["value"], hint) {
            casts.push((name.to_owned(), ty));
        }
        params.push(name, value_of(&p["value"], hint));
    }
    let casts: Vec<(&str, &str)> = casts.iter().map(|(n, t)| (n.as_str(), *t)).collect();
    let sql = baton::sql::params::cast_params(req["sql"].as_str().unwrap(), &casts);
    let stmt = Stmt::new(sql, params);
    let result: Result<Rows, SqlError> = match req.get("transactionId").and_then(J::as_str) {
        Some(id) => {
            let tx = api.transactions.lock().unwrap().get(id).cloned();
            match tx {
                Some(tx) => execute_on(&*tx.lock().await, &stmt).await,
                None => return aws_error("BadRequestException", StatusCode::BAD_REQUEST, "Transaction not found"),
            }
        }
        None => baton::sql::SqlStore::query(&api.pg, stmt).await,
    };
    let rows = match result {
        Ok(rows) => rows,
        Err(e) => return aws_error("DatabaseErrorException", StatusCode::BAD_REQUEST, &e.to_string()),
    };
    if lose {
        api.lost.fetch_add(1, Ordering::SeqCst);
        return aws_error("ServiceUnavailableError", StatusCode::SERVICE_UNAVAILABLE, "response lost (injected)");
    }
    let body = json!({
        "records": rows.rows.iter().map(|r| r.iter().map(field_of).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "columnMetadata": rows
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| json!({ "name": c, "label": c, "typeName": type_name_of(&rows, i) }))
            .collect::<Vec<_>>(),
        "numberOfRecordsUpdated": if rows.columns.is_empty() { rows.affected } else { 0 },
    })
    .to_string();
    if body.len() > api.response_limit {
        return aws_error(
            "BadRequestException",
            StatusCode::BAD_REQUEST,
            "Database returned more than the allowed response size limit",
        );
    }
    ([("content-type", "application/json")], body).into_response()
}

async fn begin(State(api): State<Arc<FakeDataApi>>) -> Response {
    let client = match api.pg.dedicated().await {
        Ok(c) => c,
        Err(e) => return aws_error("DatabaseUnavailableException", StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    if let Err(e) = client.batch_execute("BEGIN").await {
        return aws_error("DatabaseErrorException", StatusCode::BAD_REQUEST, &e.to_string());
    }
    let id = uuid::Uuid::new_v4().to_string();
    api.transactions.lock().unwrap().insert(id.clone(), Arc::new(tokio::sync::Mutex::new(client)));
    Json(json!({ "transactionId": id })).into_response()
}

async fn finish(api: &FakeDataApi, req: &J, sql: &str, status: &str) -> Response {
    let id = req.get("transactionId").and_then(J::as_str).unwrap_or_default();
    let Some(tx) = api.transactions.lock().unwrap().remove(id) else {
        return aws_error("NotFoundException", StatusCode::NOT_FOUND, "Transaction not found");
    };
    match tx.lock().await.batch_execute(sql).await {
        Ok(()) => Json(json!({ "transactionStatus": status })).into_response(),
        Err(e) => aws_error("DatabaseErrorException", StatusCode::BAD_REQUEST, &e.to_string()),
    }
}

async fn commit(State(api): State<Arc<FakeDataApi>>, Json(req): Json<J>) -> Response {
    finish(&api, &req, "COMMIT", "Transaction Committed").await
}

async fn rollback(State(api): State<Arc<FakeDataApi>>, Json(req): Json<J>) -> Response {
    finish(&api, &req, "ROLLBACK", "Rollback Complete").await
}

/// Serves the Data API emulator on a free loopback port; returns its endpoint URL.
pub async fn serve_data_api(api: Arc<FakeDataApi>) -> String {
    let app = Router::new()
        .route("/Execute", post(execute))
        .route("/BeginTransaction", post(begin))
        .route("/CommitTransaction", post(commit))
        .route("/RollbackTransaction", post(rollback))
        .with_state(api);
    serve(app).await
}

// ---- SES v2 -----------------------------------------------------------------------------------

/// Speaks SES v2's `SendEmail` and `GetAccount`; records each accepted message's recipient.
#[derive(Default)]
pub struct FakeSes {
    pub sent: Mutex<Vec<String>>,
    /// Each message as sent (the raw MIME text).
    pub raw: Mutex<Vec<String>>,
    /// Each message's `EmailTags`, as sent.
    pub tags: Mutex<Vec<J>>,
    pub max_send_rate: f64,
}

async fn send_email(State(ses): State<Arc<FakeSes>>, body: Bytes) -> Response {
    use base64::Engine as _;
    let request: J = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return aws_error("BadRequestException", StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let Some(raw) = request["Content"]["Raw"]["Data"].as_str() else {
        return aws_error("BadRequestException", StatusCode::BAD_REQUEST, "Content.Raw.Data is required");
    };
    let raw = base64::engine::general_purpose::STANDARD.decode(raw).unwrap_or_default();
    if !String::from_utf8_lossy(&raw).contains("List-Unsubscribe-Post: List-Unsubscribe=One-Click") {
        return aws_error("MessageRejected", StatusCode::BAD_REQUEST, "no one-click unsubscribe header");
    }
    let to = request["Destination"]["ToAddresses"][0].as_str().unwrap_or_default().to_owned();
    ses.sent.lock().unwrap().push(to);
    ses.raw.lock().unwrap().push(String::from_utf8_lossy(&raw).into_owned());
    ses.tags.lock().unwrap().push(request["EmailTags"].clone());
    Json(json!({ "MessageId": uuid::Uuid::new_v4().to_string() })).into_response()
}

async fn get_account(State(ses): State<Arc<FakeSes>>) -> Response {
    Json(json!({
        "SendingEnabled": true,
        "SendQuota": { "Max24HourSend": 1_000_000.0, "MaxSendRate": ses.max_send_rate, "SentLast24Hours": 0.0 }
    }))
    .into_response()
}

/// The SES v2 routes, to serve alone or merged into another fake's router.
pub fn ses_router(ses: Arc<FakeSes>) -> Router {
    Router::new()
        .route("/v2/email/outbound-emails", post(send_email))
        .route("/v2/email/account", axum::routing::get(get_account))
        .with_state(ses)
}

/// Serves a router on a free loopback port; returns its URL.
pub async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    url
}
