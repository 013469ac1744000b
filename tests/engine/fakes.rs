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
            let engine = fake.engine.get().expect("engine set").clone();
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
    let app = Router::new().route("/2015-03-31/functions/{function}/invocations", post(invocations)).with_state(fake);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// An SDK config for loopback fakes: fixed region and credentials, the given endpoint.
pub fn sdk_config(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("eu-west-1"))
        .credentials_provider(aws_sdk_lambda::config::SharedCredentialsProvider::new(
            aws_sdk_lambda::config::Credentials::new("AKIDTEST", "secret", None, None, "baton-tests"),
        ))
        .endpoint_url(endpoint)
        .build()
}
