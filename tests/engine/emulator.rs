//! A loopback model of what Lambda gives a function: the Runtime API (`/next`, responses and
//! errors, with the deadline, request id, X-Ray trace and function ARN headers), Lambda
//! `Invoke` (each async invoke is queued back into the runtime, as Lambda's queue would),
//! Secrets Manager `GetSecretValue`, an OTLP/HTTP receiver, and SES v2 (the fakes' router).
//! [`serve`] starts it; [`launch`] runs a baton binary against it, in Lambda mode.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tokio::sync::Notify;

use crate::fakes::{FakeSes, ses_router};
use crate::support::fake_aws_env;

/// The secret the Secrets Manager fake holds (any id): the unsubscribe key of launched binaries
/// that are given `BATON_UNSUBSCRIBE_SECRET_ARN`.
pub const SECRET_STRING: &str = "0123456789abcdef-from-secrets-manager";

#[derive(Default)]
pub struct Emulator {
    pub queue: Mutex<VecDeque<(String, Vec<u8>)>>,
    pub queued: Notify,
    pub results: Mutex<HashMap<String, (bool, String)>>,
    pub answered: Notify,
    pub next_id: Mutex<u64>,
    pub invokes: Mutex<u64>,
    /// `X-Amzn-Trace-Id` headers seen on Invoke requests.
    pub trace_headers: Mutex<Vec<String>>,
    /// Invoke payloads (hop events).
    pub invoked: Mutex<Vec<serde_json::Value>>,
    /// Spans posted to `/v1/traces` (OTLP/HTTP protobuf), decoded with the official schema.
    pub spans: Mutex<Vec<Span>>,
    /// Secret ids read through Secrets Manager.
    pub secrets_read: Mutex<Vec<String>>,
}

impl Emulator {
    pub fn enqueue(&self, payload: &[u8]) -> String {
        let mut n = self.next_id.lock().unwrap();
        *n += 1;
        let id = format!("req-{n}");
        self.queue.lock().unwrap().push_back((id.clone(), payload.to_vec()));
        self.queued.notify_one();
        id
    }

    pub async fn result(&self, id: &str) -> (bool, String) {
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let answered = self.answered.notified();
            if let Some(r) = self.results.lock().unwrap().get(id) {
                return r.clone();
            }
            assert!(tokio::time::Instant::now() < until, "no answer for {id}");
            let _ = tokio::time::timeout(Duration::from_millis(200), answered).await;
        }
    }
}

async fn next(State(em): State<Arc<Emulator>>) -> Response {
    loop {
        let notified = em.queued.notified();
        if let Some((id, payload)) = em.queue.lock().unwrap().pop_front() {
            let deadline =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() + 2_000;
            let mut headers = HeaderMap::new();
            headers.insert("lambda-runtime-aws-request-id", HeaderValue::from_str(&id).unwrap());
            headers.insert("lambda-runtime-deadline-ms", HeaderValue::from_str(&deadline.to_string()).unwrap());
            // As Lambda does: the invocation's X-Ray trace, which lambda_runtime puts in
            // `_X_AMZN_TRACE_ID` and the SDK would copy into every request.
            headers.insert(
                "lambda-runtime-trace-id",
                HeaderValue::from_str(&format!(
                    "Root=1-{:08x}-{:024x};Parent={:016x};Sampled=1",
                    deadline as u32, deadline, deadline as u64
                ))
                .unwrap(),
            );
            headers.insert(
                "lambda-runtime-invoked-function-arn",
                HeaderValue::from_static("arn:aws:lambda:eu-west-1:123456789012:function:baton"),
            );
            headers.insert("content-type", HeaderValue::from_static("application/json"));
            return (StatusCode::OK, headers, payload).into_response();
        }
        notified.await;
    }
}

async fn respond(State(em): State<Arc<Emulator>>, Path(id): Path<String>, body: Bytes) -> StatusCode {
    em.results.lock().unwrap().insert(id, (true, String::from_utf8_lossy(&body).into_owned()));
    em.answered.notify_waiters();
    StatusCode::ACCEPTED
}

async fn error(State(em): State<Arc<Emulator>>, Path(id): Path<String>, body: Bytes) -> StatusCode {
    em.results.lock().unwrap().insert(id, (false, String::from_utf8_lossy(&body).into_owned()));
    em.answered.notify_waiters();
    StatusCode::ACCEPTED
}

async fn invoke(State(em): State<Arc<Emulator>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    assert_eq!(headers.get("x-amz-invocation-type").and_then(|v| v.to_str().ok()), Some("Event"));
    *em.invokes.lock().unwrap() += 1;
    if let Some(trace) = headers.get("x-amzn-trace-id") {
        em.trace_headers.lock().unwrap().push(trace.to_str().unwrap_or_default().to_owned());
    }
    em.invoked.lock().unwrap().push(serde_json::from_slice(&body).expect("an Invoke payload is JSON"));
    em.enqueue(&body);
    StatusCode::ACCEPTED
}

/// An OTLP/HTTP receiver: decodes the protobuf request with the `opentelemetry-proto` types.
async fn traces(State(em): State<Arc<Emulator>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    assert_eq!(headers.get("content-type").and_then(|v| v.to_str().ok()), Some("application/x-protobuf"));
    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf export request");
    let spans = request.resource_spans.into_iter().flat_map(|r| r.scope_spans).flat_map(|s| s.spans);
    em.spans.lock().unwrap().extend(spans);
    StatusCode::OK
}

/// Secrets Manager's `GetSecretValue` (JSON 1.1 at `/`): [`SECRET_STRING`] for any id; the ids
/// asked for are kept.
async fn secrets_manager(State(em): State<Arc<Emulator>>, headers: HeaderMap, body: Bytes) -> Response {
    let target = headers.get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or_default();
    if target != "secretsmanager.GetSecretValue" {
        return (StatusCode::BAD_REQUEST, format!("unexpected target {target}")).into_response();
    }
    let request: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let id = request["SecretId"].as_str().unwrap_or_default().to_owned();
    em.secrets_read.lock().unwrap().push(id.clone());
    let answer =
        serde_json::json!({"ARN": id, "Name": "unsubscribe", "SecretString": SECRET_STRING, "VersionId": "v1"});
    ([("content-type", "application/x-amz-json-1.1")], answer.to_string()).into_response()
}

/// Starts the emulator on a free loopback port, with `ses` answering SES v2.
pub async fn serve(ses: Arc<FakeSes>) -> (Arc<Emulator>, SocketAddr) {
    let em = Arc::new(Emulator::default());
    let app = Router::new()
        .route("/2018-06-01/runtime/invocation/next", get(next))
        .route("/2018-06-01/runtime/invocation/{id}/response", post(respond))
        .route("/2018-06-01/runtime/invocation/{id}/error", post(error))
        .route("/2015-03-31/functions/{function}/invocations", post(invoke))
        .route("/v1/traces", post(traces))
        .route("/", post(secrets_manager))
        .with_state(em.clone())
        .merge(ses_router(ses));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (em, addr)
}

/// A baton binary running in Lambda mode against the emulator; killed when dropped.
pub struct Launched {
    process: Child,
    /// What it printed on stdout (CloudWatch Logs: the EMF metric lines land there).
    pub stdout: Arc<Mutex<Vec<String>>>,
    /// What it printed on stderr (a sandbox that cannot start says why there).
    pub stderr: Arc<Mutex<Vec<String>>>,
}

/// Runs `binary` as Lambda would (a clean environment, `AWS_LAMBDA_RUNTIME_API` pointing at the
/// emulator, every AWS endpoint at the emulator) with `env` added.
pub fn launch(binary: &std::path::Path, addr: SocketAddr, env: &[(&str, String)]) -> Launched {
    let mut command = Command::new(binary);
    fake_aws_env(command.env_clear())
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AWS_LAMBDA_RUNTIME_API", addr.to_string())
        .env("AWS_LAMBDA_FUNCTION_NAME", "baton")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_ENDPOINT_URL", format!("http://{addr}"));
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("the binary starts");
    let stdout = collect_lines(child.stdout.take().unwrap());
    let stderr = collect_lines(child.stderr.take().unwrap());
    Launched { process: child, stdout, stderr }
}

/// The lines a pipe carries, as they come.
fn collect_lines(pipe: impl std::io::Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let collected = lines.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
            collected.lock().unwrap().push(line);
        }
    });
    lines
}

impl Launched {
    /// The answer to invocation `id`; if the process exits first (a sandbox that cannot start),
    /// a panic with what it printed on stderr.
    pub async fn answer(&mut self, em: &Emulator, id: &str) -> (bool, String) {
        let until = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(r) = em.results.lock().unwrap().get(id) {
                return r.clone();
            }
            if let Ok(Some(status)) = self.process.try_wait() {
                tokio::time::sleep(Duration::from_millis(200)).await; // the last stderr lines
                panic!(
                    "the function exited ({status}) before answering {id}:\n{}",
                    self.stderr.lock().unwrap().join("\n")
                );
            }
            assert!(tokio::time::Instant::now() < until, "no answer for {id}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}
