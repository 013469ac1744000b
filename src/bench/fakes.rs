//! The simulated AWS side of `baton bench`, on loopback so that the real SDK clients (request
//! pipeline, signing, HTTP) are in the figures:
//!
//! - [`serve_ses`]: SES v2 `SendEmail` and `GetAccount`, answering after a sampled latency, and
//!   `429 TooManyRequestsException` above its per-second rate. It counts what it accepted per
//!   recipient ([`Tally`]): the truth about duplicates and misses.
//! - [`serve_lambda`]: Lambda `Invoke` (`Event`): answers 202 after a sampled latency, then runs
//!   the hop on the engine, as Lambda's asynchronous queue would, and bills its wall time.
//! - [`DataApiLatency`]: a store wrapper that adds the Data API's round trip to every
//!   statement (the SQL itself runs on the real store under it).

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};

use crate::engine::Engine;
use crate::sql::{Rows, SqlError, SqlStore, Stmt};

/// A latency distribution: uniform in `mean ± jitter × mean`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    pub mean_ms: f64,
    pub jitter: f64,
}

impl Latency {
    pub fn sample(&self) -> Duration {
        let spread = self.mean_ms * self.jitter.clamp(0.0, 1.0);
        let ms = self.mean_ms - spread + rand::random::<f64>() * 2.0 * spread;
        Duration::from_secs_f64(ms.max(0.0) / 1000.0)
    }

    pub async fn wait(&self) {
        if self.mean_ms > 0.0 {
            tokio::time::sleep(self.sample()).await;
        }
    }
}

/// Messages accepted per synthetic user (the demo's users: address `user{id}@example.com`,
/// `id = 7i + 1..7i + 7`), one byte each, so counting a million users takes a megabyte.
pub struct Tally {
    counts: Vec<AtomicU8>,
}

impl Tally {
    pub fn new(users: u32) -> Tally {
        Tally { counts: (0..users).map(|_| AtomicU8::new(0)).collect() }
    }

    pub fn accept(&self, address: &str) {
        let index = address
            .strip_prefix("user")
            .and_then(|a| a.strip_suffix("@example.com"))
            .and_then(|id| id.parse::<u64>().ok())
            .map(|id| (id.saturating_sub(1) / 7) as usize);
        // Only the scenario's users are ever mailed.
        if let Some(c) = index.and_then(|i| self.counts.get(i)) {
            let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_add(1)));
        }
    }

    /// Recipients mailed at least once, and those mailed more than once.
    pub fn distinct_and_duplicated(&self) -> (u64, u64) {
        self.counts.iter().fold((0, 0), |(d, dup), c| match c.load(Ordering::Relaxed) {
            0 => (d, dup),
            1 => (d + 1, dup),
            _ => (d + 1, dup + 1),
        })
    }
}

// ---- SES v2 -----------------------------------------------------------------------------------

pub struct FakeSes {
    pub latency: Latency,
    pub max_rate: f64,
    limiter: DefaultDirectRateLimiter,
    pub tally: Tally,
    pub throttled: AtomicU64,
}

impl FakeSes {
    /// `max_rate`: the account's per-second sending rate (also what `GetAccount` says).
    pub fn new(latency: Latency, max_rate: f64, users: u32) -> FakeSes {
        let per_second = std::num::NonZeroU32::new(max_rate.ceil().max(1.0) as u32).expect("at least 1");
        FakeSes {
            latency,
            max_rate,
            limiter: RateLimiter::direct(Quota::per_second(per_second)),
            tally: Tally::new(users),
            throttled: AtomicU64::new(0),
        }
    }
}

fn aws_error(kind: &str, status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({ "message": message }).to_string();
    (status, [("x-amzn-errortype", kind), ("content-type", "application/json")], body).into_response()
}

async fn send_email(State(ses): State<Arc<FakeSes>>, body: Bytes) -> Response {
    ses.latency.wait().await;
    if ses.limiter.check().is_err() {
        ses.throttled.fetch_add(1, Ordering::Relaxed);
        return aws_error("TooManyRequestsException", StatusCode::TOO_MANY_REQUESTS, "Maximum sending rate exceeded.");
    }
    let request: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return aws_error("BadRequestException", StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let Some(to) = request["Destination"]["ToAddresses"][0].as_str() else {
        return aws_error("BadRequestException", StatusCode::BAD_REQUEST, "Destination.ToAddresses is required");
    };
    ses.tally.accept(to);
    let id = uuid::Uuid::new_v4().simple().to_string();
    (StatusCode::OK, [("content-type", "application/json")], format!("{{\"MessageId\":\"{id}\"}}")).into_response()
}

async fn get_account(State(ses): State<Arc<FakeSes>>) -> Response {
    let body = serde_json::json!({
        "SendingEnabled": true,
        "SendQuota": { "Max24HourSend": 1e9, "MaxSendRate": ses.max_rate, "SentLast24Hours": 0.0 }
    });
    (StatusCode::OK, [("content-type", "application/json")], body.to_string()).into_response()
}

/// Serves the SES fake on a free loopback port; returns its URL.
pub async fn serve_ses(ses: Arc<FakeSes>) -> std::io::Result<String> {
    let router = Router::new()
        .route("/v2/email/outbound-emails", post(send_email))
        .route("/v2/email/account", get(get_account))
        .with_state(ses);
    serve(router).await
}

// ---- Lambda Invoke ----------------------------------------------------------------------------

/// Lambda's `Invoke` for `Event` invocations: the queue, the function and its bill.
pub struct FakeLambda {
    pub latency: Latency,
    pub engine: OnceLock<Arc<Engine>>,
    /// Each invocation's deadline (the function timeout).
    pub timeout: Duration,
    pub invokes: AtomicU64,
}

impl FakeLambda {
    pub fn new(latency: Latency, timeout: Duration) -> FakeLambda {
        FakeLambda { latency, engine: OnceLock::new(), timeout, invokes: AtomicU64::new(0) }
    }
}

async fn invoke(State(fake): State<Arc<FakeLambda>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    if headers.get("x-amz-invocation-type").and_then(|v| v.to_str().ok()) != Some("Event") {
        return StatusCode::BAD_REQUEST;
    }
    fake.latency.wait().await;
    fake.invokes.fetch_add(1, Ordering::Relaxed);
    let task = fake.clone();
    tokio::spawn(async move {
        let Some(engine) = task.engine.get().cloned() else { return };
        let deadline = tokio::time::Instant::now() + task.timeout;
        let _ = tokio::time::timeout_at(deadline, engine.handle_payload(&body, deadline)).await;
    });
    StatusCode::ACCEPTED
}

/// Serves the Lambda fake on a free loopback port; returns its URL.
pub async fn serve_lambda(fake: Arc<FakeLambda>) -> std::io::Result<String> {
    serve(Router::new().route("/2015-03-31/functions/{function}/invocations", post(invoke)).with_state(fake)).await
}

async fn serve(router: Router) -> std::io::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Ok(url)
}

/// An SDK config for the loopback fakes: fixed region and credentials, the given endpoint.
pub fn sdk_config(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("eu-west-1"))
        .credentials_provider(aws_sdk_lambda::config::SharedCredentialsProvider::new(
            aws_sdk_lambda::config::Credentials::new("AKIDBENCH", "bench-secret", None, None, "baton-bench"),
        ))
        .endpoint_url(endpoint)
        .build()
}

// ---- the Data API's round trip ----------------------------------------------------------------

/// Adds a Data API round trip to every statement on the store under it (a transaction: begin,
/// each statement, commit).
pub struct DataApiLatency<S> {
    pub inner: S,
    pub latency: Latency,
}

#[async_trait]
impl<S: SqlStore> SqlStore for DataApiLatency<S> {
    async fn query(&self, stmt: Stmt) -> Result<Rows, SqlError> {
        let rows = self.inner.query(stmt).await;
        self.latency.wait().await;
        rows
    }

    async fn transaction(&self, stmts: Vec<Stmt>) -> Result<Vec<Rows>, SqlError> {
        let trips = stmts.len() + 2;
        let rows = self.inner.transaction(stmts).await;
        for _ in 0..trips {
            self.latency.wait().await;
        }
        rows
    }

    fn dynamic_types(&self) -> bool {
        self.inner.dynamic_types()
    }
}
