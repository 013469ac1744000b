//! The built binary in Lambda mode, against loopback emulators: the Lambda Runtime API (it
//! polls `/next`, posts responses and errors), Lambda `Invoke` (each hop the binary invokes is
//! queued back into the runtime, as Lambda's async queue would), and SES v2 (`SendEmail`,
//! `GetAccount`). State lives in the test PostgreSQL server.

use std::collections::{HashMap, VecDeque};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use baton::sql::{Params, Stmt};
use tokio::sync::Notify;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

use crate::fakes::{FakeSes, ses_router};
use crate::support::{fake_aws_env, int_users, pg_with_users};

#[derive(Default)]
struct Emulator {
    queue: Mutex<VecDeque<(String, Vec<u8>)>>,
    queued: Notify,
    results: Mutex<HashMap<String, (bool, String)>>,
    answered: Notify,
    next_id: Mutex<u64>,
    invokes: Mutex<u64>,
    /// `X-Amzn-Trace-Id` headers seen on Invoke requests.
    trace_headers: Mutex<Vec<String>>,
    /// Invoke payloads (hop events).
    invoked: Mutex<Vec<serde_json::Value>>,
    /// Spans posted to `/v1/traces` (OTLP/HTTP protobuf), decoded with the official schema.
    spans: Mutex<Vec<Span>>,
}

impl Emulator {
    fn enqueue(&self, payload: &[u8]) -> String {
        let mut n = self.next_id.lock().unwrap();
        *n += 1;
        let id = format!("req-{n}");
        self.queue.lock().unwrap().push_back((id.clone(), payload.to_vec()));
        self.queued.notify_one();
        id
    }

    async fn result(&self, id: &str) -> (bool, String) {
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

/// A string, int or bool attribute of a span, as text.
pub fn attribute(span: &Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    let value = span.attributes.iter().find(|a| a.key == key)?.value.as_ref()?.value.as_ref()?;
    Some(match value {
        Value::StringValue(s) => s.clone(),
        Value::IntValue(i) => i.to_string(),
        Value::BoolValue(b) => b.to_string(),
        other => format!("{other:?}"),
    })
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_lambda_events_start_hops_and_malformed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _name, database_url) = pg_with_users(dir.path(), &int_users(120)).await;
    let config = dir.path().join("baton.toml");
    std::fs::write(
        &config,
        r#"
[settings]
hop_timeout = "2s"
hop_margin = "800ms"
max_pages_per_hop = 1

[jobs.news]
kind = "newsletter"
source = "SELECT id, email, name FROM users"
page_size = 20
chains = 2

[jobs.news.newsletter]
from = "News <news@example.com>"
subject = "Hello {{ recipient.name }}"
text = "Hi. {{ unsubscribe_url }}"
unsubscribe_url = "https://example.com/u"
"#,
    )
    .unwrap();

    let em = Arc::new(Emulator::default());
    let ses = Arc::new(FakeSes { max_send_rate: 2000.0, ..Default::default() });
    let app = Router::new()
        .route("/2018-06-01/runtime/invocation/next", get(next))
        .route("/2018-06-01/runtime/invocation/{id}/response", post(respond))
        .route("/2018-06-01/runtime/invocation/{id}/error", post(error))
        .route("/2015-03-31/functions/{function}/invocations", post(invoke))
        .route("/v1/traces", post(traces))
        .with_state(em.clone())
        .merge(ses_router(ses.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let mut child = Killed(
        fake_aws_env(Command::new(env!("CARGO_BIN_EXE_baton")).env_clear())
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("AWS_LAMBDA_RUNTIME_API", addr.to_string())
            .env("AWS_LAMBDA_FUNCTION_NAME", "baton")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512")
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env("AWS_ENDPOINT_URL", format!("http://{addr}"))
            .env("BATON_CONFIG", &config)
            .env("BATON_STORE", "postgres")
            .env("BATON_DATABASE_URL", &database_url)
            .env("BATON_UNSUBSCRIBE_SECRET", "0123456789abcdef-lambda")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the binary starts"),
    );
    // Stdout is CloudWatch Logs: the per-hop metric lines land there.
    let stdout_lines = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stdout = child.0.stdout.take().unwrap();
    let collected = stdout_lines.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            collected.lock().unwrap().push(line);
        }
    });

    // Malformed and unknown events are answered with baton's own error (a stable errorType and
    // a message naming the problem) and change nothing. Failed before the fix: `not json` and
    // an empty payload got the runtime's own deserialisation error, errorType a Rust type name,
    // and a 100 KB run key was blamed on the job's source.
    let long_key = format!(r#"{{"type":"start","job":"news","run_key":"{}"}}"#, "k".repeat(100_000));
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        ("not JSON", b"not json".to_vec(), "baton.BadEvent", "not JSON"),
        ("empty payload", Vec::new(), "baton.BadEvent", "the payload is empty"),
        ("JSON array", b"[]".to_vec(), "baton.BadEvent", "malformed event"),
        ("unknown type", br#"{"type":"explode"}"#.to_vec(), "baton.BadEvent", "malformed event"),
        (
            "start without a time or key",
            br#"{"type":"start","job":"news"}"#.to_vec(),
            "baton.BadEvent",
            "scheduled_time",
        ),
        (
            "start with a bad scheduled_time",
            br#"{"type":"start","job":"news","scheduled_time":"yesterday"}"#.to_vec(),
            "baton.BadEvent",
            "RFC 3339",
        ),
        ("run key of 100 KB", long_key.into_bytes(), "baton.BadEvent", "at most 64"),
        (
            "run key with CRLF",
            br#"{"type":"start","job":"news","run_key":"a\r\nb"}"#.to_vec(),
            "baton.BadEvent",
            "run_key",
        ),
        (
            "start of an unknown job",
            br#"{"type":"start","job":"nope","run_key":"x"}"#.to_vec(),
            "baton.BadConfig",
            "no job named `nope`",
        ),
        (
            "hop of an unknown run",
            br#"{"type":"hop","run_id":"nope","chain":0,"hop":1}"#.to_vec(),
            "baton.RunNotFound",
            "no run with id",
        ),
        (
            "hop with a negative chain",
            br#"{"type":"hop","run_id":"x","chain":-1,"hop":1}"#.to_vec(),
            "baton.BadEvent",
            "integer `-1`, expected u32",
        ),
        (
            "hop with an extra field",
            br#"{"type":"hop","run_id":"x","chain":0,"hop":1,"x":1}"#.to_vec(),
            "baton.BadEvent",
            "unknown field",
        ),
        (
            "control with an unknown action",
            br#"{"type":"control","run_id":"x","action":"explode"}"#.to_vec(),
            "baton.BadEvent",
            "explode",
        ),
        (
            "control of an unknown run",
            br#"{"type":"control","run_id":"nope","action":"pause"}"#.to_vec(),
            "baton.RunNotFound",
            "no run with id",
        ),
    ];
    let mut table =
        vec!["| class | input | exit | message | state changed |".to_owned(), "|---|---|---|---|---|".to_owned()];
    for (what, payload, error_type, says) in &cases {
        let id = em.enqueue(payload);
        let (ok, body) = em.result(&id).await;
        let error: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{what}: {e}: {body}"));
        let mut changed = false;
        for table in ["baton_runs", "baton_pages", "baton_chains", "baton_ledger"] {
            let rows =
                store.query(Stmt::new(format!("SELECT COUNT(*) AS n FROM {table}"), Params::new())).await.unwrap();
            changed |= rows.first().unwrap().int("n").unwrap() != 0;
        }
        let message = error["errorMessage"].as_str().unwrap_or_default();
        table.push(format!(
            "| lambda | {what} | {} | {} | {} |",
            error["errorType"].as_str().unwrap_or_default(),
            message.chars().take(150).collect::<String>().replace('|', "\\|"),
            if changed { "YES" } else { "no" }
        ));
        assert!(!ok, "{what}: accepted");
        assert_eq!(error["errorType"], *error_type, "{what}: {body}");
        assert!(message.contains(says), "{what}: `{says}` not in {message}");
        assert!(!changed, "{what} changed state");
    }
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bad-input-lambda.md");
    std::fs::write(path, table.join("\n") + "\n").unwrap();

    // A start plans the run and invokes hop 1 of each chain through Invoke; the hops run in the
    // binary through the runtime API until the run is done.
    let start = em.enqueue(br#"{"type":"start","job":"news","run_key":"2026-12"}"#);
    let (ok, body) = em.result(&start).await;
    assert!(ok, "{body}");
    let started: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(started["outcome"], "started");
    assert_eq!(started["items"], 120);
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let rows = store.query(Stmt::new("SELECT status FROM baton_runs", Params::new())).await.unwrap();
        if rows.first().and_then(|r| r.text("status").unwrap()).as_deref() == Some("succeeded") {
            break;
        }
        assert!(tokio::time::Instant::now() < until, "the run did not finish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sent = ses.sent.lock().unwrap().clone();
    let unique: std::collections::HashSet<_> = sent.iter().collect();
    assert_eq!(sent.len(), 120 - 4, "every valid user once (every 25th address is invalid)");
    assert_eq!(unique.len(), sent.len());
    assert!(*em.invokes.lock().unwrap() >= 6, "chains hopped through Invoke, one page per hop");
    // Every hop is its own trace: no Invoke carried the invocation's X-Ray header, which would
    // feed Lambda's recursive-loop detection (failed before the fix: every Invoke carried it).
    let traced = em.trace_headers.lock().unwrap().clone();
    assert!(traced.is_empty(), "Invoke requests carried X-Amzn-Trace-Id: {traced:?}");
    // ... and the hop's W3C trace context travels in the payload instead.
    let invoked = em.invoked.lock().unwrap().clone();
    for event in &invoked {
        let traceparent = event["traceparent"].as_str().unwrap_or_else(|| panic!("no traceparent: {event}"));
        assert!(baton::engine::trace::parse(traceparent).is_some(), "not a W3C traceparent: {traceparent}");
    }
    check_exported_spans(&em, &invoked).await;

    // One CloudWatch EMF line per hop, whose figures add up to the run.
    let lines = stdout_lines.lock().unwrap().clone();
    let emf: Vec<serde_json::Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("_aws").is_some())
        .collect();
    assert!(emf.iter().all(|v| v["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "baton"), "{emf:?}");
    // Hops of the malformed cases above have a line too (`HopErrors`), under job `unknown`.
    let emf: Vec<_> = emf.into_iter().filter(|v| v["job"] == "news").collect();
    assert!(emf.len() >= 6, "one metric line per hop: {lines:?}");
    let sum = |name: &str| emf.iter().map(|v| v[name].as_f64().unwrap()).sum::<f64>();
    assert_eq!(sum("ItemsDone"), 116.0, "{emf:?}");
    assert_eq!(sum("ItemsSkipped"), 4.0, "{emf:?}");

    // The same binary answers the unsubscribe link (a Function URL request: an HTTP answer,
    // never a Lambda error) and SES events from EventBridge (a malformed one is an error).
    use crate::suppression::{complaint, link_query, one_click};
    let query = link_query("user18@example.com", "0123456789abcdef-lambda", "news");
    let (ok, body) = em.result(&em.enqueue(one_click(&query).to_string().as_bytes())).await;
    assert!(ok, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["statusCode"], 200, "{answer}");
    let forged = query.replace("sig=", "sig=x");
    let (ok, body) = em.result(&em.enqueue(one_click(&forged).to_string().as_bytes())).await;
    assert!(ok && body.contains("\"statusCode\":400"), "{body}");
    let run_id = started["run_id"].as_str().unwrap();
    let (ok, body) =
        em.result(&em.enqueue(complaint("user31@example.com", "f-1", Some(run_id)).to_string().as_bytes())).await;
    assert!(ok, "{body}");
    let mut broken = complaint("user44@example.com", "f-2", Some(run_id));
    broken["detail"].as_object_mut().unwrap().remove("complaint");
    let (ok, body) = em.result(&em.enqueue(broken.to_string().as_bytes())).await;
    assert!(!ok && body.contains("baton.BadEvent"), "{body}");
    let rows = store
        .query(Stmt::new("SELECT address, scope, reason FROM baton_suppressions ORDER BY address", Params::new()))
        .await
        .unwrap();
    let rows: Vec<String> = rows.records().map(|r| r.text("address").unwrap().unwrap()).collect();
    assert_eq!(rows, vec!["user18@example.com", "user31@example.com"]);
    // SES events map back to the run through the message tags baton sets.
    let tags = ses.tags.lock().unwrap().clone();
    let expected = serde_json::json!({"Name": "run_id", "Value": run_id});
    assert!(tags.iter().all(|t| t.as_array().is_some_and(|t| t.contains(&expected))), "{tags:?}");
    let counted = store
        .query(Stmt::new(
            "SELECT COUNT(*) AS n FROM baton_mail_events WHERE run_id = :r",
            Params::new().with("r", run_id),
        ))
        .await
        .unwrap();
    assert_eq!(counted.first().unwrap().int("n").unwrap(), 1);
}

/// The spans the binary exported over OTLP/HTTP (flushed before each invocation returned): one
/// trace per invocation, whose root carries the FaaS attributes and links to the hop that
/// invoked it, and per-statement spans by name.
async fn check_exported_spans(em: &Emulator, invoked: &[serde_json::Value]) {
    // The last hop's flush may land just after the run's row says `succeeded`.
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    let hop_spans = || em.spans.lock().unwrap().iter().filter(|s| s.name == "hop").count();
    while hop_spans() < invoked.len() && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let spans = em.spans.lock().unwrap().clone();
    let roots: Vec<&Span> = spans.iter().filter(|s| s.parent_span_id.is_empty()).collect();
    let hops: Vec<&Span> = roots.iter().copied().filter(|s| s.name == "hop").collect();
    let failed = |s: &Span| s.status.as_ref().is_some_and(|st| st.code == 2);
    let start = roots.iter().find(|s| s.name == "start" && !failed(s)).expect("the start's span was exported");
    assert!(hops.len() >= invoked.len(), "{} hop spans for {} invokes", hops.len(), invoked.len());
    for root in &roots {
        for key in ["faas.invocation_id", "faas.trigger", "cloud.resource_id", "faas.coldstart"] {
            assert!(attribute(root, key).is_some(), "root span {} has no {key}", root.name);
        }
        assert_eq!(
            attribute(root, "cloud.resource_id").unwrap(),
            "arn:aws:lambda:eu-west-1:123456789012:function:baton"
        );
    }
    // Every hop that ran is linked to the span whose traceparent its event carried, and to the
    // run's start; its trace is its own.
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    for hop in hops.iter().filter(|h| attribute(h, "baton.job").is_some()) {
        let linked: Vec<String> = hop.links.iter().map(|l| hex(&l.span_id)).collect();
        assert!(linked.contains(&hex(&start.span_id)), "hop {:?} not linked to the start", attribute(hop, "baton.hop"));
        assert_ne!(hop.trace_id, start.trace_id, "a hop is its own trace");
        let number: i64 = attribute(hop, "baton.hop").unwrap().parse().unwrap();
        let chain = attribute(hop, "baton.chain").unwrap();
        let previous = invoked
            .iter()
            .find(|e| e["hop"] == number && e["chain"].as_i64() == chain.parse::<i64>().ok())
            .and_then(|e| e["traceparent"].as_str())
            .expect("an Invoke for every hop");
        let previous = baton::engine::trace::parse(previous).unwrap().span_id().to_string();
        assert!(linked.contains(&previous), "hop {number} of chain {chain}: {linked:?} lacks {previous}");
    }
    // Statements are child spans, by name.
    for name in ["start_hop", "claim_page", "record_results"] {
        assert!(spans.iter().any(|s| s.name == name && !s.parent_span_id.is_empty()), "no `{name}` span");
    }
    assert!(spans.iter().any(|s| s.name == "mail batch" && attribute(s, "baton.items.done").is_some()));
}
